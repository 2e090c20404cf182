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
use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{
    build_ebpf, toolchain,
    utils::{is_root, workspace_root},
};

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
mod prefixes;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod sys;
#[cfg(feature = "bench")]
mod testrun;

/// Set for the re-run from the release build.
const INNER_ENV: &str = "RG_BENCH_INNER";
/// The release agent binary, for the re-run.
const AGENT_ENV: &str = "RG_BENCH_AGENT";
/// The command line the user typed, for the report.
const COMMAND_ENV: &str = "RG_BENCH_COMMAND";

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Smoke run: allowlists of 10 and 1,000 prefixes, 100,000 repeats x 3
    /// runs, one flood round of 300,000 SYNs. Writes to target/bench/ unless
    /// --out is given, and judges no target defined at 1M prefixes.
    #[arg(long)]
    pub quick: bool,
    /// Allowlist sizes (prefixes) for the per-packet costs; the largest is
    /// also the list of the load and end-to-end parts
    /// [default: 10,10000,100000,1000000].
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub sizes: Vec<usize>,
    /// BPF_PROG_TEST_RUN repeat count of one run [default: 1000000].
    #[arg(long)]
    pub repeat: Option<u32>,
    /// Runs of each per-packet measurement; the median is reported [default: 7].
    #[arg(long)]
    pub runs: Option<usize>,
    /// SYNs in one end-to-end flood [default: 3000000].
    #[arg(long)]
    pub flood: Option<u64>,
    /// End-to-end rounds (each floods every contender once, in rotating order) [default: 4].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Parts to leave out.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub skip: Vec<Part>,
    /// Only these parts (e.g. `--only memory`); the report goes to
    /// target/bench/ unless --out is given, so docs/ keeps the full run's.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub only: Vec<Part>,
    /// Directory for benchmarks.md and benchmarks.png [default: docs/, or
    /// target/bench/ with --quick].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the generated prefix lists.
    #[arg(long, default_value_t = 6)]
    pub seed: u64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Per-packet cost (BPF_PROG_TEST_RUN).
    TestRun,
    /// Allowlist load, one-line change, agent RSS.
    Load,
    /// End-to-end SYN flood across veth.
    E2e,
    /// Bans: SYN cost with 0 and 100,000 bans, bans/s from a burst, restore.
    Bans,
    /// Memory in the agent's own cgroup: example config, a reload to 1M
    /// prefixes and back; nftables and ipset beside it.
    Memory,
}

impl Options {
    /// The options as arguments, to pass to the re-run.
    fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.quick {
            a.push("--quick".to_string());
        }
        if !self.sizes.is_empty() {
            a.push("--sizes".into());
            a.push(self.sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
        }
        for (flag, v) in [
            ("--repeat", self.repeat.map(u64::from)),
            ("--runs", self.runs.map(|v| v as u64)),
            ("--flood", self.flood),
            ("--rounds", self.rounds.map(|v| v as u64)),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v.to_string());
            }
        }
        for (flag, parts) in [("--skip", &self.skip), ("--only", &self.only)] {
            if !parts.is_empty() {
                use clap::ValueEnum as _;
                a.push(flag.into());
                let names: Vec<String> = parts
                    .iter()
                    .filter_map(|p| p.to_possible_value().map(|v| v.get_name().to_string()))
                    .collect();
                a.push(names.join(","));
            }
        }
        if let Some(o) = &self.out {
            a.push("--out".into());
            a.push(o.display().to_string());
        }
        a.push("--seed".into());
        a.push(self.seed.to_string());
        a
    }
}

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
