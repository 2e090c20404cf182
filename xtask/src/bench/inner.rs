//! The bench proper, run as root from the release build: plan, lab, the
//! three parts, the report.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    AGENT_ENV, COMMAND_ENV, Options, Part, dispatch, e2e, load, memory, prefixes, report,
    sys::{self, NetNs, TempDir},
    testrun,
};
use crate::utils::workspace_root;

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
    fn new(o: &Options) -> anyhow::Result<Plan> {
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
    fn new() -> anyhow::Result<Lab> {
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

pub fn run(o: &Options) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    sys::install_signal_handlers();
    let mut plan = Plan::new(o)?;
    relay_guard::kernel::loader::bump_memlock_rlimit();
    println!(
        "bench: sizes {:?}, repeat {}, {} runs; flood {} SYNs x {} rounds; parts {:?}; output {}",
        plan.sizes,
        plan.repeat,
        plan.runs,
        plan.flood,
        plan.rounds,
        plan.parts,
        plan.out.display()
    );
    let max = *plan.sizes.last().expect("non-empty");
    let dir = TempDir::new(&format!("relay-guard-bench-{}", std::process::id()))?;
    // A private copy: a build elsewhere in the workspace must not swap the
    // agent under the bench halfway.
    let agent = dir.0.join("relay-guard");
    std::fs::copy(&plan.agent, &agent).with_context(|| format!("copy {}", plan.agent.display()))?;
    // Recorded relative to the workspace: the doc names no path of this machine.
    let root = crate::utils::workspace_root();
    let shown = plan.agent.strip_prefix(&root).unwrap_or(&plan.agent);
    sys::record(format!(
        "cp {} {}  # the release agent built by `cargo xtask build-ebpf --release`",
        shown.display(),
        agent.display()
    ));
    plan.agent = agent;
    let needs_list = [Part::TestRun, Part::Load, Part::E2e].iter().any(|&p| plan.has(p));
    let list = if needs_list {
        println!("bench: generating {max} prefixes (seed {})", plan.seed);
        prefixes::generate(max, plan.seed)
    } else {
        Vec::new()
    };
    let lab = Lab::new().context("creating the bench namespaces")?;
    let mut results = report::Results::new();

    let mut loaded = None;
    if plan.has(Part::TestRun) {
        let out = testrun::run(&plan, &lab, &dir.0, &list)?;
        results.notes.extend(out.notes.iter().cloned());
        results.costs = out.sizes;
        results.diff = out.diff;
        results.program_names = out.program_names;
        loaded = out.loaded;
        match dispatch::run(&plan) {
            Ok((direct, through)) => results.notes.push(format!(
                "libxdp dispatcher: a denied IPv4 SYN :25 costs {direct:.1} ns on relay-guard directly and {through:.1} ns through the dispatcher (relay-guard in slot 0): +{:.1} ns",
                through - direct
            )),
            Err(e) => {
                sys::check_stop()?;
                println!("bench: dispatcher cost not measured: {e:#}");
                results.notes.push(format!("libxdp dispatcher cost not measured: {e:#}"));
            }
        }
    }
    if plan.has(Part::Load) {
        match load::run(&plan, &lab, &dir.0, &list) {
            Ok(r) => results.load = Some(r),
            Err(e) => {
                sys::check_stop()?;
                println!("bench: load part failed: {e:#}");
                results.notes.push(format!("load part failed: {e:#}"));
            }
        }
    }
    if plan.has(Part::E2e) {
        let loaded = match loaded.as_mut() {
            Some(l) => l,
            None => {
                let (p, text) = testrun::write_config(&dir.0, "e2e", &list[..max], &plan.pin_dir)?;
                let cfg = relay_guard::config::Config::parse(&p, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut l = relay_guard::kernel::loader::Loaded::load()?;
                relay_guard::kernel::sync::apply(&mut l.maps, &relay_guard::policy::Policy::compile(&cfg))?;
                loaded.insert(l)
            }
        };
        match e2e::run(&plan, &lab, &dir.0, &list, loaded) {
            Ok(r) => results.e2e = Some(r),
            Err(e) => {
                sys::check_stop()?;
                println!("bench: end-to-end part failed: {e:#}");
                results.notes.push(format!("end-to-end part failed: {e:#}"));
            }
        }
    }
    drop(loaded);
    if plan.has(Part::Bans) {
        match super::bans::run(&plan, &dir.0) {
            Ok(r) => results.notes.push(format!(
                "bans: SYN :25 denied {:.1}/{:.1} ns, allowed {:.1}/{:.1} ns at 0/{} bans; {:.0} bans/s from a burst; restore of {} saved bans {:.0} ms; failure line to drop median {:.2} ms, max {:.2} ms over {} rounds (target < 50 ms); {:.2} us per failure at {} trackers; log parser {:.0} lines/s",
                r.costs[0].2, r.costs[2].2, r.costs[1].2, r.costs[3].2, super::bans::BANS,
                r.burst_bans_per_s, super::bans::BANS, r.restore.as_secs_f64() * 1e3,
                r.latency.get(r.latency.len() / 2).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
                r.latency.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
                r.latency.len(),
                r.tracker_failure.as_secs_f64() * 1e6,
                relay_guard::policy::bans::MAX_TRACKERS,
                r.parse_lines_per_s
            )),
            Err(e) => {
                sys::check_stop()?;
                println!("bench: bans part failed: {e:#}");
                results.notes.push(format!("bans part failed: {e:#}"));
            }
        }
    }
    if plan.has(Part::Memory) {
        match memory::run(&plan, &lab, &dir.0) {
            Ok(r) => results.memory = Some(r),
            Err(e) => {
                sys::check_stop()?;
                println!("bench: memory part failed: {e:#}");
                results.notes.push(format!("memory part failed: {e:#}"));
            }
        }
    }
    drop(lab);
    results.elapsed = started.elapsed();
    report::write(&plan, &mut results)
}
