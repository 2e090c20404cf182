//! `cargo xtask build-ebpf`: ensure the toolchain, then build the agent, whose
//! build script compiles relay-guard-ebpf and embeds the object.
use std::path::PathBuf;

use anyhow::Context as _;

use crate::{toolchain, utils::workspace_root};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Build the release profile.
    #[arg(long)]
    pub release: bool,
}

/// Returns the path of the built `relay-guard` binary.
pub fn build(opts: &Options) -> anyhow::Result<PathBuf> {
    toolchain::ensure()?;
    let mut c = toolchain::cmd("cargo");
    c.args(["build", "--package", "relay-guard", "--bin", "relay-guard"]);
    if opts.release {
        c.arg("--release");
    }
    toolchain::run(&mut c).context("building relay-guard (and its XDP program)")?;
    let bin = workspace_root()
        .join("target")
        .join(if opts.release { "release" } else { "debug" })
        .join("relay-guard");
    println!("xtask: built {}", bin.display());
    Ok(bin)
}
