//! The privilege gate. Missing root or tools: under `CI=true` the test fails
//! with the reason; elsewhere it prints `skipping <test>: <reason>` and the
//! caller returns.
use std::path::Path;

/// Commands the privileged tests run.
pub const TOOLS: &[&str] = &["ip", "nsenter", "nft"];

/// Returns true when the test can run. Panics under `CI=true` otherwise.
#[must_use]
pub fn privileged(test: &str) -> bool {
    privileged_with(test, &[])
}

/// As [`privileged`], also requiring `extra` tools on PATH.
#[must_use]
pub fn privileged_with(test: &str, extra: &[&str]) -> bool {
    let mut why = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        why.push("not root".to_string());
    }
    for tool in TOOLS.iter().chain(extra) {
        if which(tool).is_none() {
            why.push(format!("`{tool}` not found on PATH"));
        }
    }
    if !Path::new("/sys/fs/bpf").exists() {
        why.push("/sys/fs/bpf does not exist".into());
    }
    if why.is_empty() {
        return true;
    }
    let reason = why.join(", ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run under CI=true: {reason} (run `cargo xtask test` as root)");
    }
    eprintln!("skipping {test}: {reason}");
    false
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
