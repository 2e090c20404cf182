//! Third-party programs (SMTP servers, Prometheus) as child processes inside a
//! namespace, started with `ip netns exec` (which execs the program, so the
//! child's pid is the program's). Killed and reaped in `Drop`; their output
//! is kept in a log file for failure messages.
use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

pub struct Daemon {
    child: Option<Child>,
    /// The command line, for messages.
    pub what: String,
    /// stdout and stderr of the program.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `args` inside `ns`, with stdout and stderr going to `log`.
    pub fn spawn(ns: &NetNs, args: &[&str], log: PathBuf) -> Daemon {
        let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?} in {}: {e}", ns.name));
        Daemon {
            child: Some(child),
            what: args.join(" "),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the program has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// Panics with the log when the program is no longer running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!("`{}` exited ({status}):\n{}", self.what, self.log_text());
        }
    }

    /// Polls `ready` every 100 ms until it is true. Panics with the log when
    /// the program exits first or `timeout` passes.
    pub fn wait_until(&mut self, timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{}`: not {what} after {timeout:?}:\n{}",
                self.what,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether a TCP socket listens on exactly `endpoint` (`203.0.113.1:25`,
/// `[2001:db8:1::1]:25`) inside `ns`, per `ss -Hltn`.
pub fn listening(ns: &NetNs, endpoint: &str) -> bool {
    ns.exec(&["ss", "-Hltn"])
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == endpoint))
}
