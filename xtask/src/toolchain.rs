//! Makes sure the eBPF toolchain is present: the nightly toolchain with
//! `rust-src` (for `-Z build-std=core`) and bpf-linker.
//!
//! bpf-linker is built from crates.io against the nightly toolchain's own
//! libLLVM (no LLVM package of the right version exists here): a folder whose
//! `lib/` holds symlinks named `libLLVM.so` and the library's soname, pointing
//! into the toolchain, is passed as `LLVM_PREFIX`. The linker keeps an rpath to
//! that folder, so it lives under `$CARGO_HOME`, not in a temp dir.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::utils::output;

pub const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "^0.13";

pub fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"))
}

/// PATH with `$CARGO_HOME/bin` first, for every child process.
pub fn path_env() -> std::ffi::OsString {
    let mut paths = vec![cargo_home().join("bin")];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    env::join_paths(paths).expect("PATH entries are joinable")
}

/// A command with the toolchain-related environment cleaned up: PATH includes
/// `$CARGO_HOME/bin`, and `RUSTUP_TOOLCHAIN` (set by `cargo` for xtask) is
/// removed so `+nightly` and the eBPF build's own toolchain choice hold.
pub fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", path_env()).env_remove("RUSTUP_TOOLCHAIN");
    c
}

pub fn run(c: &mut Command) -> anyhow::Result<()> {
    let status = c.status().with_context(|| format!("failed to start {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

/// Ensures nightly + rust-src + bpf-linker. Prints one line per thing done.
pub fn ensure() -> anyhow::Result<()> {
    let toolchains = output(cmd("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        println!("xtask: installing the {NIGHTLY} toolchain (rustup)");
        run(cmd("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    let components = output(cmd("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("xtask: adding rust-src to the {NIGHTLY} toolchain (needed by -Z build-std=core)");
        run(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    if bpf_linker_works() {
        return Ok(());
    }
    install_bpf_linker()
}

fn bpf_linker_works() -> bool {
    cmd("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let sysroot = PathBuf::from(output(cmd("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?.trim());
    let vv = output(cmd("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm_major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` does not say its LLVM version")?
        .to_string();
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("failed to list {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so")))
        })
        .with_context(|| format!("no libLLVM shared library in {}", libdir.display()))?;
    let soname = lib.file_name().expect("a file").to_owned();
    let prefix = cargo_home().join("relay-guard").join(format!("llvm-{llvm_major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("failed to create {}", prefix_lib.display()))?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname.as_os_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("failed to link {} -> {}", link.display(), lib.display()))?;
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the {NIGHTLY} toolchain's LLVM {llvm_major} ({}); this takes a minute or two",
        display(&lib)
    );
    run(cmd("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm_major}"))
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but does not run; check {}",
            prefix_lib.display()
        );
    }
    println!("xtask: bpf-linker installed in {}", display(&cargo_home().join("bin")));
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Whether `tool` is on PATH (or in an sbin directory). An absolute path is
/// checked as it is (`join` replaces the directory).
pub fn on_path(tool: &str) -> bool {
    env::split_paths(&path_env())
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .any(|d| d.join(tool).is_file())
}

/// Installs, as root with apt-get, the Debian package of every `(tool,
/// package)` whose tool is missing; says what it installs, and does nothing
/// when all are there.
pub fn ensure_debian_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|&(_, pkg)| pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::utils::is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them (apt-get install {})",
            missing.join(" ")
        );
    }
    if missing.contains(&"postfix") {
        // The tests use only the standalone smtp-sink and smtp-source; tell
        // the package not to configure (or start) a mail server on this host.
        println!("xtask: preseeding postfix as \"No configuration\" (no local mail server is set up)");
        let mut c = Command::new("debconf-set-selections")
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        if let Some(stdin) = c.stdin.as_mut() {
            use std::io::Write as _;
            stdin.write_all(b"postfix postfix/main_mailer_type select No configuration\n")?;
        }
        c.wait()?;
    }
    if missing.contains(&"crowdsec") {
        // Its postinst runs `cscli capi register` (network), unless the
        // central API's credentials exist: the tests run private LAPIs
        // only (`-no-capi`), so say "offline".
        let creds = std::path::Path::new("/etc/crowdsec/online_api_credentials.yaml");
        if std::fs::metadata(creds).map_or(true, |m| m.len() == 0) {
            println!(
                "xtask: writing {} (`# offline`) so that crowdsec's postinst does not register online",
                creds.display()
            );
            std::fs::create_dir_all("/etc/crowdsec")?;
            std::fs::write(creds, "# offline\n")?;
        }
    }
    println!("xtask: installing Debian packages {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    let install = |target: Option<&str>| {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq", "--no-install-recommends"]);
        if let Some(t) = target {
            c.args(["-t", t]);
        }
        run(c.args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
    };
    match install(None) {
        Ok(()) => Ok(()),
        // A host that took some packages from backports (qemu-utils, say)
        // can have the stable release of their siblings refused.
        Err(e) => match backports_suite() {
            Some(bpo) => {
                println!("xtask: that failed ({e:#}); trying again from {bpo}");
                install(Some(&bpo))
            }
            None => Err(e),
        },
    }
}

/// `CODENAME-backports`, when apt knows it.
fn backports_suite() -> Option<String> {
    let release = std::fs::read_to_string("/etc/os-release").ok()?;
    let codename = release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))?
        .trim_matches('"');
    let bpo = format!("{codename}-backports");
    let policy = output(Command::new("apt-cache").arg("policy")).ok()?;
    policy.contains(&format!(" {bpo}/")).then_some(bpo)
}
