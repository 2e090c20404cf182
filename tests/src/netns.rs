//! Network namespaces made with `ip netns add` (so they have a /run/netns
//! name that `nsenter` and `ip -n` understand), deleted in `Drop`.
use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name: `<prefix><pid>-<n>` (fits interface names too).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command; panics with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("failed to run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
    /// False for a borrowed handle ([`NetNs::borrow`]), which never deletes.
    owned: bool,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A handle to the same namespace for another thread; dropping it does
    /// not delete the namespace.
    pub fn borrow(other: &NetNs) -> NetNs {
        NetNs {
            name: other.name.clone(),
            owned: false,
        }
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a new thread that has entered this namespace. Sockets made
    /// there stay in this namespace when used from other threads.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
