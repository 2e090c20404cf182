//! `cargo xtask run`: build, then run the agent as root on one interface with
//! the shipped example config (monitor mode: counts, never drops) unless a
//! config is given.
use std::{fs, path::PathBuf};

use anyhow::{Context as _, bail};

use crate::{
    build_ebpf, toolchain,
    utils::{is_root, workspace_root},
};

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
    let root = workspace_root();
    let example = root.join("deploy").join("relay-guard.example.toml");
    let text = fs::read_to_string(&example).with_context(|| format!("failed to read {}", example.display()))?;
    let iface = match interface {
        Some(i) => i,
        None => default_route_interface()?,
    };
    let out =
        demo_config(&text, &iface).with_context(|| format!("{} cannot be made a demo config", example.display()))?;
    let dest = root.join("target").join("relay-guard.run.toml");
    fs::create_dir_all(dest.parent().expect("has a parent"))?;
    fs::write(&dest, out).with_context(|| format!("failed to write {}", dest.display()))?;
    println!(
        "xtask: guarding interface {iface} with the example config (see {})",
        dest.display()
    );
    Ok(dest)
}

/// The pin directory of the demo, never the default one: a demo must not
/// adopt, change or detach an installed guard's maps and links.
pub const DEMO_PIN_DIR: &str = "/sys/fs/bpf/relay-guard-demo";
/// The demo's metrics address, beside an installed guard's default.
pub const DEMO_METRICS: &str = "127.0.0.1:10948";

/// The example config with `interfaces` set to `iface`, and its own
/// `pin_dir` and `metrics_listen`, so it never touches a production instance.
fn demo_config(example: &str, iface: &str) -> anyhow::Result<String> {
    let mut seen = [false; 3];
    let out: Vec<String> = example
        .lines()
        .map(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            match key {
                "interfaces" if !seen[0] => {
                    seen[0] = true;
                    format!("interfaces = [\"{iface}\"]")
                }
                "pin_dir" if !seen[1] => {
                    seen[1] = true;
                    format!("pin_dir = \"{DEMO_PIN_DIR}\"   # the demo's own, never the default")
                }
                "metrics_listen" if !seen[2] => {
                    seen[2] = true;
                    format!("metrics_listen = \"{DEMO_METRICS}\"")
                }
                _ => l.to_string(),
            }
        })
        .collect();
    for (key, found) in ["interfaces", "pin_dir", "metrics_listen"].iter().zip(seen) {
        if !found {
            bail!("no `{key}` line");
        }
    }
    Ok(out.join("\n") + "\n")
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_config_never_uses_the_default_pin_dir() {
        let example = std::fs::read_to_string(crate::utils::workspace_root().join("deploy/relay-guard.example.toml"))
            .expect("example config");
        let demo = super::demo_config(&example, "veth-demo").expect("demo config");
        assert!(demo.contains("interfaces = [\"veth-demo\"]"), "{demo}");
        assert!(
            demo.contains(&format!("pin_dir = \"{}\"", super::DEMO_PIN_DIR)),
            "{demo}"
        );
        assert!(!demo.contains("\"/sys/fs/bpf/relay-guard\""), "{demo}");
        assert!(demo.contains(super::DEMO_METRICS), "{demo}");
    }
}
