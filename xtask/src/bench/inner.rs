//! The bench proper, run as root from the release build: the plan and the
//! lab (`plan.rs`), then each part in turn, then the report.
use anyhow::Context as _;

use super::{
    dispatch, e2e, load, memory,
    options::{Options, Part},
    plan::{Lab, Plan},
    prefixes, report,
    sys::{self, TempDir},
    testrun,
};

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
