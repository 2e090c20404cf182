//! Containers for the deployment tests: a Debian root file system built with
//! mmdebstrap (cached as a tarball under `target/`), booted with systemd as
//! PID 1 by systemd-nspawn, or an OCI bundle run by systemd-nspawn
//! `--oci-bundle`. The host has no systemd of its own: `--register=no
//! --keep-unit` keep nspawn from asking it for a scope. A container is
//! driven from outside with `nsenter -t <its init> -a`, powered off (then
//! killed) in `Drop`.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The workspace's target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from)
}

fn text(o: &Output) -> String {
    let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
    t.push_str(&String::from_utf8_lossy(&o.stderr));
    t
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout
/// and stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed ({}):\n{}", o.status, text(&o));
    text(&o)
}

/// A Debian bookworm root file system (`mmdebstrap --variant=minbase`) with
/// `packages`, as a tarball cached under `target/rootfs/`, keyed by the
/// package list: built once (it needs Debian's mirror), reused after.
pub fn debian_rootfs(packages: &[&str]) -> PathBuf {
    let dir = target_dir().join("rootfs");
    std::fs::create_dir_all(&dir).expect("create target/rootfs");
    let key = packages.join(",");
    let tarball = dir.join(format!("bookworm-minbase-{}.tar", packages.join("+")));
    if tarball.is_file() {
        return tarball;
    }
    let partial = dir.join(format!(".{}.partial.tar", std::process::id()));
    let started = Instant::now();
    let o = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={key}"))
        .arg("bookworm")
        .arg(&partial)
        .output()
        .expect("run mmdebstrap");
    if !o.status.success() {
        let _ = std::fs::remove_file(&partial);
        panic!(
            "mmdebstrap bookworm --include={key} failed ({}); it needs Debian's mirror:\n{}",
            o.status,
            text(&o)
        );
    }
    std::fs::rename(&partial, &tarball).expect("rename the rootfs tarball");
    eprintln!("built {} in {:.0?}", tarball.display(), started.elapsed());
    tarball
}

/// Unpacks a root file system tarball into `dir` (created).
pub fn unpack(tarball: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).expect("create rootfs dir");
    run_ok(Command::new("tar").arg("-C").arg(dir).arg("-xf").arg(tarball));
}

/// The `.deb` of the relay-guard package, built by cargo-deb into `out`
/// (a release build; a no-op when fresh).
pub fn build_deb(out: &Path) -> PathBuf {
    run_ok(
        Command::new("cargo")
            .current_dir(repo())
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["deb", "--package", "relay-guard", "--output"])
            .arg(out),
    );
    std::fs::read_dir(out)
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo deb wrote a .deb")
}

/// A running systemd-nspawn container.
pub struct Container {
    nspawn: Child,
    /// The host PID of the container's PID 1.
    pub init: i32,
    pub log: PathBuf,
}

impl Container {
    /// Starts `systemd-nspawn --register=no --keep-unit ARGS…` with its
    /// console written to `log`, and waits (up to 30 s) for its PID 1.
    pub fn spawn(args: &[&str], log: PathBuf) -> Container {
        Container::start(args, log, None)
    }

    /// As [`Container::spawn`], for an OCI bundle (`--oci-bundle=` in
    /// `args`), with nspawn (and so the container) moved into the cgroup
    /// whose `cgroup.procs` is `procs` before it execs.
    pub fn spawn_in(args: &[&str], log: PathBuf, procs: &Path) -> Container {
        Container::start(args, log, Some(procs))
    }

    fn start(args: &[&str], log: PathBuf, procs: Option<&Path>) -> Container {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let out = std::fs::File::create(&log).expect("create nspawn log");
        let err = out.try_clone().expect("clone log handle");
        let mut cmd = Command::new("systemd-nspawn");
        // nspawn's default seccomp filter denies bpf(2) to the payload;
        // what it runs here is an XDP agent. (A host's systemd has no such
        // filter; on Kubernetes the runtime's default profile allows bpf(2)
        // to holders of CAP_BPF.)
        cmd.args([
            "--register=no",
            "--keep-unit",
            "--console=passive",
            "--quiet",
            "--system-call-filter=bpf",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        let procs = procs.map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        });
        if procs.is_some() {
            // An OCI payload is no systemd that could set up the legacy
            // hierarchies, and nspawn fails on a cgroup v1 host whose
            // /proc/cgroups lists controllers it has not mounted: give it
            // the unified hierarchy.
            cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        }
        if let Some(f) = &procs {
            let fd = f.as_raw_fd();
            // SAFETY: only write(2) between fork and exec; "0" moves the
            // writing process into the cgroup.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let nspawn = cmd.spawn().expect("run systemd-nspawn");
        drop(procs);
        let mut c = Container { nspawn, init: 0, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // nspawn's first child is its "outer child", which forks the
            // container's PID 1 in a new PID namespace and exits: wait for
            // a child in another PID namespace than nspawn's.
            let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
            let own = ns(c.nspawn.id() as i32);
            if let Some(pid) = children(c.nspawn.id() as i32)
                .into_iter()
                .find(|p| ns(*p).is_some_and(|n| Some(n) != own))
            {
                c.init = pid;
                return c;
            }
            if let Ok(Some(status)) = c.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({status}):\n{}", c.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no container init after 30 s:\n{}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a command in all of the container's namespaces; its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "--"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap_or_else(|e| panic!("nsenter {args:?}: {e}"))
    }

    /// As [`Container::exec`], panicking unless it succeeds; stdout.
    pub fn sh(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "in the container: {args:?} failed ({}):\n{}",
            o.status,
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub fn prop(&self, unit: &str, prop: &str) -> String {
        self.sh(&["systemctl", "show", "-p", prop, "--value", unit])
            .trim()
            .to_string()
    }

    /// Waits (bounded) until systemd inside has finished booting; returns
    /// `is-system-running`'s answer (`running` or `degraded`).
    pub fn wait_booted(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.exec(&["systemctl", "is-system-running"]);
            let mut state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if state.is_empty() {
                state = String::from_utf8_lossy(&o.stderr).trim().to_string();
            }
            if state == "running" || state == "degraded" {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "the container did not finish booting ({state}):\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The host PID of the container's process `pid` (as seen inside).
    pub fn host_pid(&self, pid: i32) -> i32 {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init)).expect("init's pid namespace");
        for e in std::fs::read_dir("/proc").expect("list /proc").flatten() {
            let Some(host) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{host}/ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            let status = std::fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<i32>().ok());
            if inner == Some(pid) {
                return host;
            }
        }
        panic!("no host process for the container's PID {pid}");
    }

    /// Waits up to `timeout` for nspawn to exit; its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.nspawn.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Powers the container off (SIGTERM to nspawn: an orderly shutdown of
    /// a booted container), waits up to 30 s, then kills it.
    pub fn poweroff(&mut self) -> bool {
        if let Ok(Some(_)) = self.nspawn.try_wait() {
            return true;
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        if self.wait(Duration::from_secs(30)).is_some() {
            return true;
        }
        // SAFETY: kill(2); the container's init takes its PID namespace along.
        unsafe { libc::kill(self.init, libc::SIGKILL) };
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        false
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.poweroff();
    }
}

/// The children of `pid` (from /proc/PID/task/*/children).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// A field of /proc/PID/status (`CapEff`, `NoNewPrivs`, …), trimmed.
pub fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in:\n{status}"))
        .trim()
        .to_string()
}
