//! `cargo xtask bench`: relay-guard against xdp-filter, nftables and
//! iptables+ipset, written up in docs/benchmarks.md and docs/benchmarks.png.
//!
//! Four parts, each built only on the agent's stable entry points
//! (`Config::parse`, `Policy::compile`, `Loaded::load`, `loaded.maps` passed
//! to `sync::apply`, `loaded.program()`, and the `relay-guard` binary), so it
//! measures whatever the data path is when it runs:
//!
//! 1. **Per-packet cost** (`BPF_PROG_TEST_RUN`, in-kernel timing): a denied
//!    IPv4 SYN to :25, an allowed one, a denied IPv6 one and a SYN to :443,
//!    at each allowlist size, beside a no-op XDP program (the floor) and
//!    xdp-filter's IPv4/IPv6 deny variant holding as many of the same
//!    addresses as its maps take. Runs are interleaved across programs and
//!    packets; the median of the runs is reported.
//! 2. **Allowlist load**: the real agent started on a config whose
//!    `allow_files` list has the largest size, until it serves metrics;
//!    `ipset restore` and `nft -f` of the same list; a one-line change (map
//!    diff through `sync::apply`, and the agent's reload); the agent's peak RSS.
//! 3. **End to end**: a bounded trafgen SYN flood from documentation
//!    addresses across a veth pair between two namespaces the bench makes,
//!    with receiver CPU (softirq time) per dropped SYN for relay-guard (native
//!    XDP), an nftables set rule, iptables+ipset and xdp-filter.
//!
//! 4. **Memory**: the agent in a memory cgroup of its own (the BPF maps are
//!    charged to it) on the example config, through a reload to 1,000,000
//!    prefixes and back; nftables and ipset holding the same lists
//!    (`bench/memory.rs`). `cargo xtask bench --only memory` runs just this
//!    part (report in target/bench/).
//!
//! With part 1: the libxdp dispatcher's cost (a denied SYN on relay-guard
//! directly and through the dispatcher, `bench/dispatch.rs`), in the notes.
//!
//! The plain `cargo xtask` binary is built without the agent library (which
//! needs bpf-linker, which xtask installs). So this command installs what is
//! missing, builds the release agent, then re-runs itself from a release build
//! of xtask with `--features bench` (library timings from a debug build would
//! mislead), as root.
use std::process::Command;

use anyhow::Context as _;

use crate::{
    build_ebpf, toolchain,
    utils::{is_root, workspace_root},
};

mod options;
pub use options::Options;
use options::{AGENT_ENV, COMMAND_ENV, INNER_ENV};

#[cfg(feature = "bench")]
mod bans;
#[cfg(feature = "bench")]
mod bpf;
#[cfg(feature = "bench")]
mod dispatch;
#[cfg(feature = "bench")]
mod e2e;
#[cfg(feature = "bench")]
mod frames;
#[cfg(feature = "bench")]
mod inner;
#[cfg(feature = "bench")]
mod load;
#[cfg(feature = "bench")]
mod memory;
#[cfg(feature = "bench")]
mod peers;
#[cfg(feature = "bench")]
mod plan;
#[cfg(feature = "bench")]
mod prefixes;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod sys;
#[cfg(feature = "bench")]
mod testrun;

/// Commands the bench runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("xdp-filter", "xdp-tools"),
    ("nft", "nftables"),
    ("ipset", "ipset"),
    ("iptables", "iptables"),
    ("ip6tables", "iptables"),
    ("bpftool", "bpftool"),
    ("trafgen", "netsniff-ng"),
    ("ethtool", "ethtool"),
    ("/usr/bin/python3", "python3"),
    // The chart; Debian's python3 (not a pyenv shim) is the one that has it.
    (
        "/usr/lib/python3/dist-packages/matplotlib/__init__.py",
        "python3-matplotlib",
    ),
];

pub fn bench(opts: &Options) -> anyhow::Result<()> {
    #[cfg(feature = "bench")]
    if std::env::var_os(INNER_ENV).is_some() {
        return inner::run(opts);
    }
    toolchain::ensure()?;
    ensure_tools()?;
    let agent = build_ebpf::build(&build_ebpf::Options { release: true })?;
    println!("xtask: building the bench itself (release, --features bench)");
    toolchain::run(toolchain::cmd("cargo").args(["build", "--release", "--package", "xtask", "--features", "bench"]))
        .context("building xtask with --features bench")?;
    let exe = workspace_root().join("target").join("release").join("xtask");
    let typed: Vec<String> = std::env::args().skip(1).collect();
    let command = format!("cargo xtask {}", typed.join(" "));
    let mut c = if is_root() {
        Command::new(&exe)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&exe);
        c
    };
    c.arg("bench")
        .args(opts.to_args())
        .env(INNER_ENV, "1")
        .env(AGENT_ENV, &agent)
        .env(COMMAND_ENV, command)
        .env("PATH", toolchain::path_env())
        .current_dir(workspace_root());
    toolchain::run(&mut c)
}

/// Installs (as root, with apt-get) the Debian packages of missing tools.
fn ensure_tools() -> anyhow::Result<()> {
    toolchain::ensure_debian_tools(TOOLS)
}
