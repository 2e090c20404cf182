//! What every part of the bench shares: the [`Plan`] of one run (the
//! options with their defaults filled in) and the [`Lab`] of two namespaces
//! it floods across. A leaf of the bench: the parts read it, and it calls
//! none of them.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    options::{AGENT_ENV, COMMAND_ENV, Options, Part},
    sys::NetNs,
};
use crate::utils::workspace_root;

/// The lab's receiver and sender ends of the veth pair.
pub const RCV_IF: &str = "rg-rcv0";
pub const SND_IF: &str = "rg-snd0";

/// Settings of one bench run, with the defaults filled in.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub sizes: Vec<usize>,
    pub repeat: u32,
    pub runs: usize,
    pub diff_runs: usize,
    pub load_rounds: usize,
    pub reloads: usize,
    pub flood: u64,
    pub flood_timeout: Duration,
    pub rounds: usize,
    pub idle_window: Duration,
    pub parts: Vec<Part>,
    pub out: PathBuf,
    pub seed: u64,
    pub command: String,
    pub agent: PathBuf,
    pub pin_dir: PathBuf,
}

impl Plan {
    pub fn new(o: &Options) -> anyhow::Result<Plan> {
        let q = o.quick;
        let mut sizes = if o.sizes.is_empty() {
            if q {
                vec![10, 1_000]
            } else {
                vec![10, 10_000, 100_000, 1_000_000]
            }
        } else {
            o.sizes.clone()
        };
        sizes.sort_unstable();
        sizes.dedup();
        if sizes[0] < 2 {
            bail!("--sizes: each allowlist needs at least 2 prefixes (the fixed allowed test ranges)");
        }
        if *sizes.last().expect("non-empty") > 1 << 20 {
            bail!(
                "--sizes: at most {} prefixes (what the generated lists are sized for; relay-guard's IPv6 trie and IPv4 long-block capacities are sized for a realistic 1M mix)",
                1 << 20
            );
        }
        let flood = o.flood.unwrap_or(if q { 300_000 } else { 3_000_000 });
        let parts = [Part::TestRun, Part::Load, Part::E2e, Part::Bans, Part::Memory]
            .into_iter()
            .filter(|p| !o.skip.contains(p) && (o.only.is_empty() || o.only.contains(p)))
            .collect();
        let partial = q || !o.only.is_empty();
        let out = o
            .out
            .clone()
            .unwrap_or_else(|| workspace_root().join(if partial { "target/bench" } else { "docs" }));
        let agent = std::env::var_os(AGENT_ENV)
            .map(PathBuf::from)
            .context("RG_BENCH_AGENT is not set (run `cargo xtask bench`)")?;
        Ok(Plan {
            quick: q,
            sizes,
            repeat: o.repeat.unwrap_or(if q { 100_000 } else { 1_000_000 }),
            runs: o.runs.unwrap_or(if q { 3 } else { 7 }).max(1),
            diff_runs: if q { 2 } else { 5 },
            load_rounds: if q { 1 } else { 3 },
            reloads: if q { 2 } else { 4 },
            flood,
            flood_timeout: Duration::from_secs(30 + flood / 20_000),
            rounds: o.rounds.unwrap_or(if q { 1 } else { 4 }).max(1),
            idle_window: Duration::from_secs(if q { 1 } else { 2 }),
            parts,
            out,
            seed: o.seed,
            command: std::env::var(COMMAND_ENV).unwrap_or_else(|_| "cargo xtask bench".into()),
            agent,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/relay-guard-bench-{}", std::process::id())),
        })
    }

    pub fn has(&self, p: Part) -> bool {
        self.parts.contains(&p)
    }
}

/// Two namespaces joined by a veth pair: rg-snd0 (sender, 203.0.113.2) and
/// rg-rcv0 (receiver, 203.0.113.1, 2001:db8:ffff::1), with fixed MACs so
/// crafted frames are addressed to the receiver. Removed on drop.
pub struct Lab {
    pub rcv: NetNs,
    pub snd: NetNs,
}

impl Lab {
    pub fn new() -> anyhow::Result<Lab> {
        let pid = std::process::id();
        let rcv = NetNs::new(&format!("rgbench-rcv-{pid}"))?;
        let snd = NetNs::new(&format!("rgbench-snd-{pid}"))?;
        rcv.sh(&[
            "ip",
            "link",
            "add",
            RCV_IF,
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            SND_IF,
            "address",
            "02:00:00:00:00:02",
            "netns",
            &snd.name,
        ])?;
        rcv.sh(&["ip", "addr", "add", "203.0.113.1/24", "dev", RCV_IF])?;
        rcv.sh(&["ip", "-6", "addr", "add", "2001:db8:ffff::1/64", "dev", RCV_IF, "nodad"])?;
        rcv.sh(&["ip", "link", "set", RCV_IF, "up"])?;
        snd.sh(&["ip", "addr", "add", "203.0.113.2/24", "dev", SND_IF])?;
        snd.sh(&["ip", "link", "set", SND_IF, "up"])?;
        Ok(Lab { rcv, snd })
    }
}
