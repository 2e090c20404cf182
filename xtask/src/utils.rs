//! Helpers that several tasks share (aya's `xtask/src/utils.rs`): a leaf
//! module, so that no task imports another for them.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// The workspace's root directory (the parent of xtask's).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

/// Whether this is a CI run (as tests/src/require.rs decides it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

/// Runs `c` and returns its standard output; an error, with its standard
/// error, if it cannot start or fails.
pub fn output(c: &mut Command) -> anyhow::Result<String> {
    let out = c.output().with_context(|| format!("failed to run {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether xtask runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
