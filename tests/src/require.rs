//! The privilege gate, and the honest count of what did not run.
//!
//! A test that cannot run (no root, a tool missing) or that leaves out a
//! check it cannot make calls [`skip`]: under CI it fails with the reason;
//! elsewhere it prints `skipping <test>: <reason>` and appends a line to the
//! file named by `RELAY_GUARD_SKIP_LOG`, which `cargo xtask test` reads to
//! count that test as skipped, not passed (libtest has no runtime skip).
use std::{io::Write as _, path::Path};

/// Commands every privileged test runs.
pub const TOOLS: &[&str] = &["ip", "nsenter", "nft"];

/// `tests/tools.txt`: every tool a test may require, with its installer.
const TOOL_LIST: &str = include_str!("../tools.txt");

/// The environment variable naming the skip log.
pub const SKIP_LOG_ENV: &str = "RELAY_GUARD_SKIP_LOG";

/// Returns true when the test can run. Panics under CI otherwise.
#[must_use]
pub fn privileged(test: &str) -> bool {
    privileged_with(test, &[])
}

/// As [`privileged`], also requiring `extra` tools on PATH.
///
/// # Panics
/// When a tool is not listed in `tests/tools.txt` (so `cargo xtask test`
/// would not install it), and under CI when the test cannot run.
#[must_use]
pub fn privileged_with(test: &str, extra: &[&str]) -> bool {
    let mut why = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        why.push("not root".to_string());
    }
    for tool in TOOLS.iter().chain(extra) {
        assert!(
            listed(tool),
            "{test} requires `{tool}`, which tests/tools.txt does not list: add it there, so `cargo xtask test` installs it"
        );
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
    skip(test, &why.join(", "));
    false
}

/// Records that `test` (or a check inside it) did not run, and why. Under CI
/// this panics, so the run fails naming what was missing.
pub fn skip(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: cannot run under CI: {reason} (run `cargo xtask test` as root)");
    }
    eprintln!("skipping {test}: {reason}");
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV) {
        let line = format!("{test}\t{}\n", reason.replace(['\n', '\t'], " "));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("{test}: cannot record the skip in {}: {e}", Path::new(&log).display());
        }
    }
}

/// Whether this is a CI run (`CI` set to `true`, `1` or `yes`, as CI
/// services set it), where a skip fails instead.
#[must_use]
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

/// Whether `tool` is listed in `tests/tools.txt`.
fn listed(tool: &str) -> bool {
    TOOL_LIST
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .any(|t| t == tool)
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_line_of_the_tool_list_names_an_installer() {
        for line in super::TOOL_LIST
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words.len(), 2, "tools.txt line {line:?}: want `TOOL INSTALLER`");
            assert!(
                words[1] == "toolchain" || ["deb:", "cargo:", "pip:"].iter().any(|p| words[1].starts_with(p)),
                "tools.txt line {line:?}: unknown installer"
            );
        }
    }
}
