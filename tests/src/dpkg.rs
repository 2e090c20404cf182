//! dpkg for the Debian package test: whether a package is installed, dpkg
//! retried while another holds its lock, and a guard that purges the package
//! if a failed (or killed) run left it installed.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::deploy::{run, text};

/// Whether dpkg has `pkg` installed.
pub fn dpkg_installed(pkg: &str) -> bool {
    let o = run("dpkg-query", &["-W", "-f=${Status}", pkg]);
    o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
}

/// dpkg ARGS, retried while another dpkg/apt holds the lock (bounded).
pub fn dpkg(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run dpkg");
        let out = text(&o);
        if o.status.success() {
            return out;
        }
        assert!(
            out.contains("lock") && Instant::now() < deadline,
            "dpkg {args:?} failed ({}):\n{out}",
            o.status
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Written before the test installs the package, removed after it purged it:
/// a marker left behind means a killed run left the package installed.
pub const DEB_TEST_MARKER: &str = "/var/tmp/relay-guard-deb-test.installed";

/// Purges the package if a failed test left it installed.
pub struct PurgeOnDrop;

impl PurgeOnDrop {
    /// Writes [`DEB_TEST_MARKER`]; the guard purges on drop.
    pub fn arm() -> PurgeOnDrop {
        std::fs::write(DEB_TEST_MARKER, "relay-guard's deb test installed the package\n").expect("write marker");
        PurgeOnDrop
    }
}

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if dpkg_installed("relay-guard") || Path::new("/etc/relay-guard").exists() {
            let _ = Command::new("dpkg").args(["--purge", "relay-guard"]).status();
        }
        let _ = std::fs::remove_file(DEB_TEST_MARKER);
    }
}
