//! `cargo xtask run`: build, then run the agent as root on one interface with
//! the shipped example config (monitor mode: counts, never drops) unless a
//! config is given.
use std::{fs, path::PathBuf};

use anyhow::{Context as _, bail};

use crate::{build_ebpf, toolchain};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Interface to guard; default: the one that carries the default route.
    /// Ignored when --config is given (the config names its interfaces).
    #[arg(long, short = 'i')]
    pub interface: Option<String>,
    /// Run with this config instead of deploy/relay-guard.example.toml.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Build and run the release profile.
    #[arg(long)]
    pub release: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let bin = build_ebpf::build(&build_ebpf::Options { release: opts.release })?;
    let config = match &opts.config {
        Some(c) => c.clone(),
        None => example_config_for(opts.interface.clone())?,
    };
    println!("xtask: running {} --config {} run", bin.display(), config.display());
    let mut c = if is_root() {
        toolchain::cmd(bin.to_str().context("UTF-8 path")?)
    } else {
        let mut c = toolchain::cmd("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    c.arg("--config").arg(&config).arg("run");
    toolchain::run(&mut c)
}

/// Writes the example config with `interfaces` set to `interface` (or the
/// default-route interface) under target/, and returns its path.
fn example_config_for(interface: Option<String>) -> anyhow::Result<PathBuf> {
    let root = build_ebpf::workspace_root();
    let example = root.join("deploy").join("relay-guard.example.toml");
    let text = fs::read_to_string(&example).with_context(|| format!("failed to read {}", example.display()))?;
    let iface = match interface {
        Some(i) => i,
        None => default_route_interface()?,
    };
    let mut replaced = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if !replaced && l.trim_start().starts_with("interfaces") {
                replaced = true;
                format!("interfaces = [\"{iface}\"]")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !replaced {
        bail!("{} has no `interfaces` line", example.display());
    }
    let dest = root.join("target").join("relay-guard.run.toml");
    fs::create_dir_all(dest.parent().expect("has a parent"))?;
    fs::write(&dest, out.join("\n") + "\n").with_context(|| format!("failed to write {}", dest.display()))?;
    println!(
        "xtask: guarding interface {iface} with the example config (see {})",
        dest.display()
    );
    Ok(dest)
}

fn default_route_interface() -> anyhow::Result<String> {
    let routes = fs::read_to_string("/proc/net/route").context("failed to read /proc/net/route")?;
    routes
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&"00000000"))
        .map(|f| f[0].to_string())
        .context("no default route: pass --interface NAME")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
