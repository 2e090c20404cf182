//! `cargo xtask test`: every test, on a fresh machine.
//!
//! 1. Make sure the toolchain (nightly rust-src, bpf-linker) and the Debian
//!    tools the privileged tests drive are installed.
//! 2. Unit tests (`cargo test`, no root).
//! 3. Build the agent, then the privileged test binaries (`--no-run
//!    --message-format=json`, as aya's xtask does) and run each one as root
//!    (directly, or under `sudo -E`), with RELAY_GUARD_BIN pointing at the agent.
//!
//! Ends with one line `N passed, M failed, K skipped` over everything that
//! ran. A test that skipped itself (or a check inside it) at run time, for a
//! missing privilege or tool, is counted as skipped, not passed: the tests'
//! privilege gate (tests/src/require.rs) writes it to a log this reads.
//! Under CI any skip fails the run.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    build_ebpf, toolchain,
    utils::{in_ci, is_root},
    vm,
};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Only run tests whose name contains this (passed to every test binary).
    pub filter: Option<String>,
    /// Skip the unit tests.
    #[arg(long)]
    pub privileged_only: bool,
    /// Skip the kernel matrix (the privileged tests in VMs booting the
    /// kernels of tests/kernels.txt).
    #[arg(long, conflicts_with = "vm_only")]
    pub no_vm: bool,
    /// Run only the kernel matrix (no unit tests, no privileged tests on
    /// this host's kernel).
    #[arg(long)]
    pub vm_only: bool,
    /// Only these kernel lines of tests/kernels.txt (repeatable), e.g.
    /// `--kernel 5.10`.
    #[arg(long = "kernel", value_name = "NAME")]
    pub kernels: Vec<String>,
}

/// `tests/tools.txt`: every program a test runs and how to install it
/// (ip, nft, bpftool, postfix and its smtp-sink, dovecot, swaks, xdp-filter
/// and xdp-loader, prometheus and promtool, systemd-analyze, journalctl,
/// mmdebstrap, systemd-nspawn, strace, dpkg, cargo-deb, kubernetes-validate,
/// ...). The
/// tests' privilege gate refuses a tool that is not listed there, so what
/// this installs and what the tests require cannot drift apart.
const TOOL_LIST: &str = include_str!("../../tests/tools.txt");

/// kubernetes-validate and other `pip:` tools live in this venv, linked into
/// /usr/local/bin (kubernetes-validate ships the Kubernetes JSON schemas, so
/// it validates offline).
const PIP_VENV: &str = "/usr/local/lib/relay-guard-test-tools/venv";

/// How one tool is installed.
#[derive(Debug, PartialEq, Eq)]
enum Installer<'a> {
    Deb(&'a str),
    Cargo {
        krate: &'a str,
        version: &'a str,
    },
    Pip(&'a str),
    /// Part of the Rust toolchain running this xtask.
    Toolchain,
}

/// The `(tool, installer)` lines of [`TOOL_LIST`].
fn tools() -> anyhow::Result<Vec<(&'static str, Installer<'static>)>> {
    let mut out = Vec::new();
    for (n, line) in TOOL_LIST.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            anyhow::anyhow!(
                "tests/tools.txt:{}: want `TOOL deb:PKG|cargo:CRATE@VER|pip:PKG|toolchain`, got {line:?}",
                n + 1
            )
        };
        let mut words = line.split_whitespace();
        let (Some(tool), Some(how), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad());
        };
        let installer = if how == "toolchain" {
            Installer::Toolchain
        } else if let Some(pkg) = how.strip_prefix("deb:") {
            Installer::Deb(pkg)
        } else if let Some(spec) = how.strip_prefix("cargo:") {
            let (krate, version) = spec.split_once('@').ok_or_else(bad)?;
            Installer::Cargo { krate, version }
        } else if let Some(pkg) = how.strip_prefix("pip:") {
            Installer::Pip(pkg)
        } else {
            return Err(bad());
        };
        out.push((tool, installer));
    }
    Ok(out)
}

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    /// libtest's `ignored` plus the tests that skipped themselves.
    skipped: u64,
    /// `test: reason` of each test counted as skipped at run time.
    skip_reasons: Vec<String>,
    /// `(binary@kernel, passed, failed, skipped)` of each guest run.
    by_kernel: Vec<(String, u64, u64, u64)>,
}

/// What libtest printed in one run: its `test result:` counts and the
/// tests it reported `ok`.
#[derive(Default)]
struct RunCount {
    passed: u64,
    failed: u64,
    ignored: u64,
    ok_tests: Vec<String>,
}

impl RunCount {
    fn line(&mut self, line: &str) {
        if let Some(name) = line.strip_prefix("test ").and_then(|r| r.strip_suffix(" ... ok")) {
            self.ok_tests.push(name.to_string());
        }
        if let Some(counts) = parse_result_line(line) {
            self.passed += counts.0;
            self.failed += counts.1;
            self.ignored += counts.2;
        }
    }

    /// Adds this run to `tally`, moving the tests that wrote to the skip
    /// log (`skips`) from passed to skipped; `label` names the tests of a
    /// guest run (`@5.10`). Returns (passed, failed, skipped).
    fn settle(self, tally: &mut Tally, skips: &str, label: &str) -> (u64, u64, u64) {
        let (moved, reasons) = skipped_of(&self.ok_tests, skips);
        let moved = moved.min(self.passed);
        let counts = (self.passed - moved, self.failed, self.ignored + moved);
        tally.passed += counts.0;
        tally.failed += counts.1;
        tally.skipped += counts.2;
        tally
            .skip_reasons
            .extend(reasons.into_iter().map(|r| r.replacen(':', &format!("{label}:"), 1)));
        counts
    }
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    toolchain::ensure()?;
    ensure_tools()?;
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let skip_log = std::env::temp_dir().join(format!("relay-guard-skips-{}.log", std::process::id()));

    if !opts.privileged_only && !opts.vm_only {
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
        if !run_counting(&mut c, &skip_log, &mut tally)? {
            failures.push("unit tests".to_string());
        }
    }

    let agent = build_ebpf::build(&build_ebpf::Options { release: false })?;
    let sudo = !is_root() && toolchain::on_path("sudo");
    if !is_root() && !sudo {
        println!("xtask: not root and no sudo: the privileged tests will skip themselves, and are counted as skipped");
    }
    let executables = test_executables()?;
    for exe in executables.iter().filter(|_| !opts.vm_only) {
        let mut c = if sudo {
            let mut c = Command::new("sudo");
            c.arg("-E").arg(exe);
            c
        } else {
            Command::new(exe)
        };
        c.env("PATH", toolchain::path_env()).env("RELAY_GUARD_BIN", &agent);
        if let Some(f) = &opts.filter {
            c.arg(f);
        }
        println!("xtask: running {}", exe.rsplit('/').next().unwrap_or(exe));
        if !run_counting(&mut c, &skip_log, &mut tally)? {
            failures.push(exe.clone());
        }
    }
    if !opts.no_vm {
        let started = std::time::Instant::now();
        kernel_matrix(opts, &executables, &agent, &mut tally, &mut failures)?;
        println!("xtask: the kernel matrix took {:.0} s", started.elapsed().as_secs_f64());
    }

    println!();
    if !tally.by_kernel.is_empty() {
        println!("kernel matrix (each test binary in a VM booting that kernel):");
        for (label, p, f, s) in &tally.by_kernel {
            println!("  {label}: {p} passed, {f} failed, {s} skipped");
        }
    }
    if !tally.skip_reasons.is_empty() {
        println!("skipped at run time (counted as skipped, not passed):");
        for r in &tally.skip_reasons {
            println!("  {r}");
        }
    }
    println!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    if !failures.is_empty() {
        bail!("failed: {}", failures.join(", "));
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    if in_ci() && tally.skipped > 0 {
        bail!("{} test(s) skipped under CI; every test must run there", tally.skipped);
    }
    Ok(())
}

/// Installs every tool of `tests/tools.txt` that is missing: Debian packages
/// with apt-get, crates with `cargo install --locked`, PyPI packages in a venv.
/// Says what it installs; does nothing when all are there. Without root it
/// cannot install system packages: outside CI it says so and goes on (the
/// tests that need them are then counted as skipped); under CI it fails.
fn ensure_tools() -> anyhow::Result<()> {
    let tools = tools()?;
    let debs: Vec<(&str, &str)> = tools
        .iter()
        .filter_map(|(t, i)| match i {
            Installer::Deb(p) => Some((*t, *p)),
            _ => None,
        })
        .collect();
    let missing_system = debs.iter().any(|(t, _)| !toolchain::on_path(t))
        || tools
            .iter()
            .any(|(t, i)| matches!(i, Installer::Pip(_)) && !toolchain::on_path(t));
    if missing_system && !is_root() && !in_ci() {
        println!(
            "xtask: not root, so missing Debian and PyPI tools are not installed; the tests that need them will be reported as skipped"
        );
    } else {
        toolchain::ensure_debian_tools(&debs)?;
    }
    for (tool, installer) in &tools {
        if toolchain::on_path(tool) {
            continue;
        }
        match installer {
            Installer::Deb(_) | Installer::Toolchain => {}
            Installer::Cargo { krate, version } => {
                println!(
                    "xtask: installing {krate} {version} from crates.io (cargo install --locked), for the tests that run `{tool}`"
                );
                toolchain::run(toolchain::cmd("cargo").args(["install", krate, "--locked", "--version", version]))?;
            }
            Installer::Pip(pkg) if is_root() => pip_install(tool, pkg)?,
            Installer::Pip(_) => {}
        }
    }
    Ok(())
}

/// Installs `pkg` from PyPI into [`PIP_VENV`] and links `tool` into
/// /usr/local/bin.
fn pip_install(tool: &str, pkg: &str) -> anyhow::Result<()> {
    let venv = std::path::Path::new(PIP_VENV);
    println!(
        "xtask: installing {pkg} from PyPI into a venv at {PIP_VENV}, linked as /usr/local/bin/{tool}, for the tests that run it"
    );
    let make_venv = || {
        venv.join("bin/pip").is_file()
            || Command::new("/usr/bin/python3")
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
            bail!("`/usr/bin/python3 -m venv {PIP_VENV}` failed after installing python3-venv");
        }
    }
    toolchain::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", pkg]))?;
    let link = std::path::Path::new("/usr/local/bin").join(tool);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(venv.join("bin").join(tool), &link)
        .with_context(|| format!("failed to link {}", link.display()))?;
    Ok(())
}

/// The short name of a test executable (`e2e` of `target/debug/deps/e2e-0123abcd`).
fn binary_name(exe: &str) -> &str {
    let file = exe.rsplit('/').next().unwrap_or(exe);
    file.rsplit_once('-').map_or(file, |(name, _)| name)
}

/// The tests of `exe` whose names contain one of `filters` (every test when
/// there are none) and `user` (the command line's filter), as `--exact`
/// names: the executable lists them here, on the host.
fn selected_tests(exe: &str, filters: &[String], user: Option<&str>) -> anyhow::Result<Vec<String>> {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("failed to list the tests of {exe}"))?;
    if !out.status.success() {
        bail!("{exe} --list failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|n| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .filter(|n| user.is_none_or(|u| n.contains(u)))
        .map(str::to_string)
        .collect())
}

/// The kernel matrix: each line of tests/kernels.txt (or those `--kernel`
/// names) boots its kernel in a VM per test binary, and the binary's
/// selected tests run there as root. A kernel that cannot be fetched or a
/// guest that does not boot is a failure.
fn kernel_matrix(
    opts: &Options,
    executables: &[String],
    agent: &std::path::Path,
    tally: &mut Tally,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut lines = vm::kernel_lines()?;
    for k in &opts.kernels {
        if !lines.iter().any(|l| &l.name == k) {
            bail!("--kernel {k}: tests/kernels.txt has no such line");
        }
    }
    if !opts.kernels.is_empty() {
        lines.retain(|l| opts.kernels.contains(&l.name));
    }
    // What each line runs; lines with nothing selected need no kernel.
    let mut plan = Vec::new();
    for line in &lines {
        let mut runs = Vec::new();
        for (bin, filters) in &line.tests {
            let Some(exe) = executables.iter().find(|e| binary_name(e) == bin) else {
                bail!(
                    "tests/kernels.txt: kernel {} lists test binary `{bin}`, which tests/tests does not build",
                    line.name
                );
            };
            let tests = selected_tests(exe, filters, opts.filter.as_deref())?;
            if tests.is_empty() && opts.filter.is_none() {
                bail!(
                    "tests/kernels.txt: `{bin}/{}` selects no test of {bin}",
                    filters.join("|")
                );
            }
            if !tests.is_empty() {
                runs.push((bin.clone(), exe.clone(), tests));
            }
        }
        if !runs.is_empty() {
            plan.push((line.clone(), runs));
        }
    }
    if plan.is_empty() {
        return Ok(());
    }
    if !is_root() {
        for (line, runs) in &plan {
            for (bin, _, tests) in runs {
                let n = u64::try_from(tests.len()).unwrap_or(0);
                tally.skipped += n;
                tally.skip_reasons.push(format!(
                    "{bin}@{}: not root (the kernel matrix boots VMs as root)",
                    line.name
                ));
            }
        }
        return Ok(());
    }
    let mut env: Vec<(&str, String)> = vec![
        ("PATH", toolchain::path_env().to_string_lossy().into_owned()),
        ("RELAY_GUARD_BIN", agent.to_string_lossy().into_owned()),
        ("RUST_BACKTRACE", "1".into()),
    ];
    if let Ok(ci) = std::env::var("CI") {
        env.push(("CI", ci));
    }
    for (line, runs) in plan {
        let kernel = match vm::prepare(std::slice::from_ref(&line)) {
            Ok(mut k) => k.remove(0),
            Err(e) => {
                println!("xtask: kernel {}: {e:#}", line.name);
                tally.failed += 1;
                failures.push(format!("kernel {} (could not be prepared: {e:#})", line.name));
                continue;
            }
        };
        for (bin, exe, tests) in runs {
            let label = format!("{bin}@{}", line.name);
            println!(
                "xtask: running {bin} in a VM booting {} ({}), {} test(s)",
                kernel.release,
                line.name,
                tests.len()
            );
            let mut argv = vec![exe.clone(), "--exact".to_string()];
            argv.extend(tests.iter().cloned());
            let mut count = RunCount::default();
            let started = std::time::Instant::now();
            let outcome = vm::run(&kernel, &argv, &env, std::time::Duration::from_secs(1800), &mut |l| {
                println!("[{}] {l}", line.name);
                count.line(l);
            })?;
            let (p, mut f, s) = count.settle(tally, &outcome.skips, &format!("@{}", line.name));
            println!("xtask: {label} took {:.0} s", started.elapsed().as_secs_f64());
            if let Some(why) = &outcome.failure {
                println!("xtask: {label}: {why}");
                if f == 0 {
                    tally.failed += 1;
                    f = 1;
                }
            }
            if outcome.rc != Some(0) || f > 0 {
                failures.push(label.clone());
            }
            tally.by_kernel.push((label, p, f, s));
        }
    }
    Ok(())
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

/// Runs a libtest-based command with `RELAY_GUARD_SKIP_LOG` set to
/// `skip_log`, echoing its output and adding up its `test result:` lines. A
/// test that passed but wrote to the skip log is counted as skipped. Returns
/// whether the command succeeded.
fn run_counting(c: &mut Command, skip_log: &std::path::Path, tally: &mut Tally) -> anyhow::Result<bool> {
    let _ = std::fs::remove_file(skip_log);
    let mut child = c
        .env("RELAY_GUARD_SKIP_LOG", skip_log)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {c:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut count = RunCount::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        count.line(&line);
    }
    let success = child.wait()?.success();
    let skips = std::fs::read_to_string(skip_log).unwrap_or_default();
    let _ = std::fs::remove_file(skip_log);
    count.settle(tally, &skips, "");
    Ok(success)
}

/// `(passed, failed, ignored)` of a libtest `test result:` line.
fn parse_result_line(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let mut counts = (0, 0, 0);
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(what)) = (words.next(), words.next())
            && let Ok(n) = n.parse::<u64>()
        {
            match what {
                "passed" => counts.0 += n,
                "failed" => counts.1 += n,
                "ignored" => counts.2 += n,
                _ => {}
            }
        }
    }
    Some(counts)
}

/// Of the tests libtest reported `ok`, those that wrote `name\treason` to
/// the skip log: their number, and `name: reason` for each (a test that
/// skipped several checks is counted once).
fn skipped_of(ok_tests: &[String], skip_log: &str) -> (u64, Vec<String>) {
    let mut seen = std::collections::BTreeMap::<&str, Vec<&str>>::new();
    for line in skip_log.lines() {
        let (name, reason) = line.split_once('\t').unwrap_or((line, ""));
        seen.entry(name).or_default().push(reason);
    }
    let mut moved = 0;
    let mut reasons = Vec::new();
    for (name, why) in seen {
        if ok_tests
            .iter()
            .any(|t| t == name || t.rsplit("::").next() == Some(name))
        {
            moved += 1;
            reasons.push(format!("{name}: {}", why.join("; ")));
        }
    }
    (moved, reasons)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tool_list_parses_and_names_bpftool() {
        let tools = tools().expect("tests/tools.txt parses");
        assert!(tools.contains(&("bpftool", Installer::Deb("bpftool"))));
        assert!(
            tools
                .iter()
                .any(|(t, i)| *t == "cargo-deb" && matches!(i, Installer::Cargo { .. }))
        );
    }

    #[test]
    fn self_skipped_tests_move_from_passed_to_skipped() {
        let ok = vec![
            "operator_cli_reads_the_pinned_maps".to_string(),
            "module::restarts_without_a_gap".to_string(),
            "other".to_string(),
        ];
        let log = "operator_cli_reads_the_pinned_maps\tnot root\nrestarts_without_a_gap\tno nft\nrestarts_without_a_gap\tno ip\nfailed_one\tnot root\n";
        let (moved, reasons) = skipped_of(&ok, log);
        // failed_one is not among the passed tests: it stays a failure.
        assert_eq!(moved, 2, "{reasons:?}");
        assert!(
            reasons.iter().any(|r| r == "restarts_without_a_gap: no nft; no ip"),
            "{reasons:?}"
        );
    }

    #[test]
    fn result_lines_are_added_up() {
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some((3, 1, 2))
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }
}

/// The project's docs link only to files inside the repository (a user's
/// clone, and the Debian package's copy, have nothing beside it).
#[cfg(test)]
mod doc_links {
    /// The relative targets of `[text](target)` links in `markdown`.
    fn relative_links(markdown: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = markdown;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = rest[..end].split('#').next().unwrap_or("");
            if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
                out.push(target.to_string());
            }
        }
        out
    }

    #[test]
    fn readme_and_docs_links_resolve_inside_the_repository() {
        let root = crate::utils::workspace_root();
        let root = root.canonicalize().expect("workspace root");
        let mut files = vec![root.join("README.md"), root.join("tests/README.md")];
        for e in std::fs::read_dir(root.join("docs")).expect("docs/") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
        let mut checked = 0;
        for file in &files {
            let text = std::fs::read_to_string(file).expect("markdown");
            for link in relative_links(&text) {
                let target = file.parent().expect("dir").join(&link);
                let resolved = target
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{}: link `{link}` does not resolve: {e}", file.display()));
                assert!(
                    resolved.starts_with(&root),
                    "{}: link `{link}` leaves the repository",
                    file.display()
                );
                checked += 1;
            }
        }
        assert!(checked > 5, "only {checked} links found: is the link parser broken?");
        assert_eq!(
            relative_links("[a](../shared/SPEC.md) [b](https://x) [c](docs/x.md#y)"),
            ["../shared/SPEC.md", "docs/x.md"]
        );
    }
}
