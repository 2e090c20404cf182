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
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("nft", "nftables"),
    ("smtp-sink", "postfix"),
    ("smtp-source", "postfix"),
    ("swaks", "swaks"),
    // swaks speaks IPv6 only with this Perl module, which is merely a
    // Recommends of swaks (and apt-get runs with --no-install-recommends).
    // An absolute path: `on_path` joins it onto each PATH entry unchanged.
    ("/usr/share/perl5/IO/Socket/INET6.pm", "libio-socket-inet6-perl"),
    ("prometheus", "prometheus"),
    // tests/tests/deploy.rs: the systemd unit, the alert rules, the package.
    ("promtool", "prometheus"),
    ("systemd-analyze", "systemd"),
    // The unit's ExecReload; `systemd-analyze verify` checks it exists.
    ("/bin/kill", "procps"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("strace", "strace"),
    ("dpkg-deb", "dpkg"),
];

/// cargo-deb, from crates.io, for the Debian package test.
const CARGO_DEB_VERSION: &str = "3.8.0";
/// kubernetes-validate (PyPI; it ships the Kubernetes JSON schemas, so it
/// validates offline) lives in this venv, linked into /usr/local/bin.
const KUBERNETES_VALIDATE_VENV: &str = "/usr/local/lib/relay-guard-test-tools/venv";

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    toolchain::ensure()?;
    ensure_tools()?;
    ensure_deploy_tools()?;
    let mut tally = Tally::default();
    let mut failures = Vec::new();

    if !opts.privileged_only {
        let mut c = toolchain::cmd("cargo");
        c.args([
            "test",
            "--workspace",
            "--exclude",
            "relay-guard-tests",
            "--exclude",
            "relay-guard-ebpf",
        ]);
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
    println!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
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
    toolchain::ensure_debian_tools(TOOLS)
}

/// Builds the privileged test crate and returns its test executables.
fn test_executables() -> anyhow::Result<Vec<String>> {
    let out = toolchain::cmd("cargo")
        .args([
            "test",
            "--package",
            "relay-guard-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("failed to build the privileged tests")?;
    if !out.status.success() {
        bail!("building the privileged tests failed");
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
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
    let mut child = c
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {c:?}"))?;
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

/// Installs the deployment tests' tools that are not Debian packages, once:
/// cargo-deb (`cargo install --locked`) and kubernetes-validate (pip, in a
/// venv). Says what it installs; does nothing when they are there.
fn ensure_deploy_tools() -> anyhow::Result<()> {
    if !toolchain::on_path("cargo-deb") {
        println!(
            "xtask: installing cargo-deb {CARGO_DEB_VERSION} from crates.io (cargo install --locked), for the Debian package test"
        );
        toolchain::run(toolchain::cmd("cargo").args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }
    if toolchain::on_path("kubernetes-validate") {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "kubernetes-validate is missing; run `cargo xtask test` as root to install it, or `pip install kubernetes-validate`"
        );
    }
    let venv = std::path::Path::new(KUBERNETES_VALIDATE_VENV);
    println!(
        "xtask: installing kubernetes-validate from PyPI into a venv at {KUBERNETES_VALIDATE_VENV}, linked as /usr/local/bin/kubernetes-validate, for the Kubernetes manifest test"
    );
    let make_venv = || {
        Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(venv)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !make_venv() {
        // Debian's python3 makes venvs only with python3-venv (ensurepip).
        let _ = std::fs::remove_dir_all(venv);
        apt_install(&["python3-venv"])?;
        if !make_venv() {
            bail!("`/usr/bin/python3 -m venv {KUBERNETES_VALIDATE_VENV}` failed after installing python3-venv");
        }
    }
    toolchain::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "kubernetes-validate"]))?;
    let link = std::path::Path::new("/usr/local/bin/kubernetes-validate");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(venv.join("bin/kubernetes-validate"), link)
        .with_context(|| format!("failed to link {}", link.display()))?;
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    println!("xtask: installing Debian packages {}", packages.join(" "));
    toolchain::run(Command::new("apt-get").args(["update", "-qq"]))?;
    toolchain::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
