//! `cargo xtask test`: every test, on a fresh machine.
//!
//! 1. Make sure the toolchain (nightly rust-src, bpf-linker) and the Debian
//!    tools the privileged tests drive are installed.
//! 2. Unit tests (`cargo test`, no root).
//! 3. Build the agent, then the privileged test binaries (`--no-run
//!    --message-format=json`, as aya's xtask does) and run each one as root
//!    (directly, or under `sudo -E`), with RELAY_GUARD_BIN pointing at the agent.
//!
//! Ends with one line `N passed, M failed` over everything that ran.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{build_ebpf, run::is_root, toolchain};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Only run tests whose name contains this (passed to every test binary).
    pub filter: Option<String>,
    /// Skip the unit tests.
    #[arg(long)]
    pub privileged_only: bool,
}

/// Commands the privileged tests run, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[("ip", "iproute2"), ("nsenter", "util-linux"), ("nft", "nftables")];

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    toolchain::ensure()?;
    ensure_tools()?;
    let mut tally = Tally::default();
    let mut failures = Vec::new();

    if !opts.privileged_only {
        let mut c = toolchain::cmd("cargo");
        c.args(["test", "--workspace", "--exclude", "relay-guard-tests", "--exclude", "relay-guard-ebpf"]);
        if let Some(f) = &opts.filter {
            c.arg("--").arg(f);
        }
        if !run_counting(&mut c, &mut tally)? {
            failures.push("unit tests".to_string());
        }
    }

    let agent = build_ebpf::build(&build_ebpf::Options { release: false })?;
    for exe in test_executables()? {
        let mut c = if is_root() {
            Command::new(&exe)
        } else {
            let mut c = Command::new("sudo");
            c.arg("-E").arg(&exe);
            c
        };
        c.env("PATH", toolchain::path_env()).env("RELAY_GUARD_BIN", &agent);
        if let Some(f) = &opts.filter {
            c.arg(f);
        }
        println!("xtask: running {}", exe.rsplit('/').next().unwrap_or(&exe));
        if !run_counting(&mut c, &mut tally)? {
            failures.push(exe);
        }
    }

    println!();
    println!("{} passed, {} failed, {} skipped", tally.passed, tally.failed, tally.ignored);
    if !failures.is_empty() {
        bail!("failed: {}", failures.join(", "));
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Installs (as root, with apt-get) the Debian packages of missing tools.
fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; install them (apt-get install {})", missing.join(" "));
    }
    println!("xtask: installing Debian packages {}", missing.join(" "));
    toolchain::run(Command::new("apt-get").args(["update", "-qq"]))?;
    toolchain::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn on_path(tool: &str) -> bool {
    std::env::split_paths(&toolchain::path_env())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

/// Builds the privileged test crate and returns its test executables.
fn test_executables() -> anyhow::Result<Vec<String>> {
    let out = toolchain::cmd("cargo")
        .args(["test", "--package", "relay-guard-tests", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("failed to build the privileged tests")?;
    if !out.status.success() {
        bail!("building the privileged tests failed");
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
        {
            exes.push(exe.to_string());
        }
    }
    Ok(exes)
}

/// Runs a libtest-based command, echoing its output and adding up its
/// `test result:` lines. Returns whether it succeeded.
fn run_counting(c: &mut Command, tally: &mut Tally) -> anyhow::Result<bool> {
    let mut child = c.stdout(Stdio::piped()).spawn().with_context(|| format!("failed to start {c:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next())
                    && let Ok(n) = n.parse::<u64>()
                {
                    match what {
                        "passed" => tally.passed += n,
                        "failed" => tally.failed += n,
                        "ignored" => tally.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(child.wait()?.success())
}
