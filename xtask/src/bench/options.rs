//! What `cargo xtask bench` is told: its options, its parts, and what the
//! outer run hands the re-run from the release build in its environment.
//! A leaf: the outer run (`bench.rs`) and the bench proper (`plan.rs`,
//! `inner.rs`) read it; it reads nothing of theirs.
use std::path::PathBuf;

/// Set for the re-run from the release build.
pub const INNER_ENV: &str = "RG_BENCH_INNER";
/// The release agent binary, for the re-run.
pub const AGENT_ENV: &str = "RG_BENCH_AGENT";
/// The command line the user typed, for the report.
pub const COMMAND_ENV: &str = "RG_BENCH_COMMAND";

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
    pub fn to_args(&self) -> Vec<String> {
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
