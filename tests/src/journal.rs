//! A private systemd journal for one test: the calling thread moves into a
//! new mount namespace with tmpfs over `/run/systemd`, `/run/log` and
//! `/var/log/journal`, and a tmpfs `/dev` that holds the host's device nodes
//! plus `/dev/log` → the private journald's syslog socket. A real
//! `systemd-journald` runs there; programs started from this thread (Postfix,
//! Dovecot, `journalctl`, the agent) log to it and read it, and the host's
//! journal and `/dev` are not touched.
//!
//! Only for a thread of its own (`std::thread::scope`): its mount namespace
//! stays with it. Namespaces (`ip netns add`) must be made and deleted
//! outside that thread, so their mounts stay visible to the host.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};

/// The journald binary (Debian's `systemd` package).
pub const JOURNALD: &str = "/lib/systemd/systemd-journald";

pub struct PrivateJournal {
    journald: Option<Child>,
    /// journald's own stdout and stderr.
    pub log: PathBuf,
}

fn tmpfs(at: &str) {
    std::fs::create_dir_all(at).unwrap_or_else(|e| panic!("create {at}: {e}"));
    mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))
        .unwrap_or_else(|e| panic!("mount tmpfs on {at}: {e}"));
}

fn bind(from: &Path, to: &Path) {
    mount(
        Some(from),
        to,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("bind {} on {}: {e}", from.display(), to.display()));
}

impl PrivateJournal {
    /// Moves this thread into its own mount namespace and starts journald
    /// there; `dir` keeps its log.
    pub fn start(dir: &Path) -> PrivateJournal {
        unshare(CloneFlags::CLONE_NEWNS).expect("unshare the mount namespace");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        // The host's /dev, kept where the new one can bind its nodes from.
        tmpfs("/run/systemd");
        let old_dev = Path::new("/run/systemd/host-dev");
        std::fs::create_dir_all(old_dev).expect("create host-dev");
        bind(Path::new("/dev"), old_dev);
        tmpfs("/dev");
        for node in ["null", "zero", "full", "random", "urandom", "tty", "ptmx", "console"] {
            let from = old_dev.join(node);
            if from.exists() {
                let to = Path::new("/dev").join(node);
                std::fs::File::create(&to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
                bind(&from, &to);
            }
        }
        for d in ["pts", "shm", "net"] {
            let from = old_dev.join(d);
            if from.exists() {
                let to = Path::new("/dev").join(d);
                std::fs::create_dir_all(&to).expect("create dev dir");
                bind(&from, &to);
            }
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("log", "/run/systemd/journal/dev-log"),
        ] {
            std::os::unix::fs::symlink(target, Path::new("/dev").join(link)).expect("symlink in /dev");
        }
        std::fs::create_dir_all("/run/systemd/journal").expect("create /run/systemd/journal");
        tmpfs("/run/log");
        std::fs::create_dir_all("/run/log/journal").expect("create /run/log/journal");
        tmpfs("/var/log/journal");
        let log = dir.join("journald.log");
        let out = std::fs::File::create(&log).expect("create journald log");
        let child = Command::new(JOURNALD)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {JOURNALD}: {e}"));
        let mut j = PrivateJournal {
            journald: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new("/run/systemd/journal/dev-log").exists() {
            if let Some(c) = j.journald.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "journald exited ({status}): {}",
                    std::fs::read_to_string(&j.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "journald made no /dev/log socket in 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        j
    }
}

impl Drop for PrivateJournal {
    fn drop(&mut self) {
        if let Some(mut c) = self.journald.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
