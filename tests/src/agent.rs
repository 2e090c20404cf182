//! The real `relay-guard` binary as a child process in a namespace, entered
//! with `nsenter --net` (not `ip netns exec`, whose private /sys would hide
//! /sys/fs/bpf). Killed and reaped in `Drop`; its log is kept for messages.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{
    net::http_get,
    netns::{NetNs, unique},
};

/// Where the metrics endpoint listens inside the server namespace.
pub const METRICS: &str = "127.0.0.1:10947";

/// The agent binary: `RELAY_GUARD_BIN`, else `relay-guard` next to the test
/// executable's `deps/` folder (target/debug/relay-guard).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_GUARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .join("relay-guard");
    assert!(
        bin.is_file(),
        "agent binary {} not found: run `cargo xtask test` (or set RELAY_GUARD_BIN)",
        bin.display()
    );
    bin
}

/// A scratch directory for configs, lists and logs; removed in `Drop`.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let d = std::env::temp_dir().join(unique("relay-guard-test-"));
        std::fs::create_dir_all(&d).expect("create temp dir");
        TempDir(d)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Agent {
    child: Option<Child>,
    ns_path: String,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Agent {
    /// Starts `relay-guard --config CONFIG run` in `ns` and waits until its
    /// metrics endpoint answers (the program is attached by then).
    pub fn start(ns: &NetNs, config: PathBuf, dir: &TempDir) -> Agent {
        let mut a = Agent::spawn(ns, config, dir, &["run"]);
        a.wait_ready(ns, Duration::from_secs(30));
        a
    }

    /// Spawns the agent with `args` after `--config CONFIG`, without waiting.
    pub fn spawn(ns: &NetNs, config: PathBuf, dir: &TempDir, args: &[&str]) -> Agent {
        Agent::spawn_wrapped(ns, config, dir, &[], args)
    }

    /// As [`Agent::start`], with the agent run under `wrapper`: a command that
    /// ends by exec'ing the command line that follows it (`setpriv …`,
    /// `strace …`, `unshare … sh -c '…; exec "$@"' sh`).
    pub fn start_wrapped(ns: &NetNs, config: PathBuf, dir: &TempDir, wrapper: &[&str]) -> Agent {
        let mut a = Agent::spawn_wrapped(ns, config, dir, wrapper, &["run"]);
        // `strace -f` slows every syscall of the start (map creation, pins,
        // netlink) many times over; what a wrapped start shows is what it
        // does, not how fast.
        let ready_within = if wrapper.is_empty() { 30 } else { 120 };
        a.wait_ready(ns, Duration::from_secs(ready_within));
        a
    }

    /// As [`Agent::spawn`], with the agent run under `wrapper` (see
    /// [`Agent::start_wrapped`]). [`Agent::pid`] is then the wrapper's pid
    /// unless the wrapper execs the agent in place (`setpriv`, `unshare`).
    pub fn spawn_wrapped(ns: &NetNs, config: PathBuf, dir: &TempDir, wrapper: &[&str], args: &[&str]) -> Agent {
        Agent::spawn_program(ns, &agent_bin(), config, dir, wrapper, args)
    }

    /// As [`Agent::start_wrapped`], running `program` (an installed
    /// `relay-guard`, say) instead of [`agent_bin`].
    pub fn start_program(
        ns: &NetNs,
        program: &std::path::Path,
        config: PathBuf,
        dir: &TempDir,
        wrapper: &[&str],
    ) -> Agent {
        let mut a = Agent::spawn_program(ns, program, config, dir, wrapper, &["run"]);
        a.wait_ready(ns, Duration::from_secs(30));
        a
    }

    /// As [`Agent::spawn_wrapped`], running `program` instead of [`agent_bin`].
    pub fn spawn_program(
        ns: &NetNs,
        program: &std::path::Path,
        config: PathBuf,
        dir: &TempDir,
        wrapper: &[&str],
        args: &[&str],
    ) -> Agent {
        let log = dir.0.join(format!("{}.log", unique("agent")));
        let out = std::fs::File::create(&log).expect("create agent log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .args(wrapper)
            .arg(program)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("spawn nsenter relay-guard");
        Agent {
            child: Some(child),
            ns_path: ns.path(),
            log,
            config,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, ns: &NetNs, within: Duration) {
        let within = within * crate::slowdown();
        let deadline = Instant::now() + within;
        let addr: SocketAddr = METRICS.parse().expect("constant");
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                panic!("agent exited during start-up ({status}):\n{}", self.log_text());
            }
            if http_get(ns, addr, "/metrics").is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after {} s:\n{}",
                within.as_secs(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The exit status if the agent has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait"))
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().expect("running").id()).expect("pid fits")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// SIGTERM, then waits up to 10 s for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(10))
    }

    /// Waits for the agent to exit on its own (for one-shot commands);
    /// `timeout` is scaled by [`crate::slowdown`].
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let timeout = timeout * crate::slowdown();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not exit within {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The namespace path the agent runs in.
    pub fn ns_path(&self) -> &str {
        &self.ns_path
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `relay-guard --config CONFIG detach` when dropped, and removes the
/// pin_dir if that fails, so no program, link or pin outlives a test. Declare
/// it before the `Agent`s it covers: those are dropped (killed) first.
pub struct DetachOnDrop {
    pub config: PathBuf,
    pub pin_dir: PathBuf,
}

impl DetachOnDrop {
    pub fn new(config: PathBuf, pin_dir: PathBuf) -> DetachOnDrop {
        DetachOnDrop { config, pin_dir }
    }
}

/// `relay-guard --config CONFIG ARGS…` outside any namespace; (status, stdout+stderr).
pub fn cli(config: &std::path::Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(agent_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run relay-guard");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        let (status, _) = cli(&self.config, &["detach"]);
        if !status.success() || self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}
