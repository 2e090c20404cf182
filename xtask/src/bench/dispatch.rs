//! The dispatcher's cost: a denied IPv4 SYN to :25 test-run
//! (`BPF_PROG_TEST_RUN`) on relay-guard's program directly, and on a libxdp
//! dispatcher (relay-guard's, `kernel::dispatcher`) holding relay-guard as
//! its only component, in slot 0, same maps. Run interleaved, `runs` times;
//! the medians and their difference are the result. On a kernel that
//! refuses extension programs (lockdown `confidentiality`) there is no
//! dispatcher to measure: the result says so.
use std::path::PathBuf;

use relay_guard::{
    config::Config,
    kernel::{dispatcher, loader::Loaded, pins::Pins, shared, sync},
    policy::Policy,
};

use super::{
    bpf::{self, XDP_DROP},
    frames,
    plan::Plan,
    prefixes::{DENIED_V4, SERVER_V4},
    sys::median,
};

/// Median ns per packet (direct, through the dispatcher).
pub type Costs = (f64, f64);

pub fn run(plan: &Plan) -> anyhow::Result<Costs> {
    let root = PathBuf::from(format!("/sys/fs/bpf/rg-bench-dispatch-{}", std::process::id()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = relay_guard::kernel::pins::remove_layout(&Pins::new(&self.0).state());
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(root.clone());
    let text = format!(
        "interfaces = [\"lo\"]\npin_dir = \"{}\"\n[[guard]]\nname = \"smtp\"\nports = [25]\nallow = [\"192.0.2.0/24\"]\n",
        root.display()
    );
    let cfg = Config::parse(&root.join("bench.toml"), &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pins = Pins::new(&root);
    let mut loaded = Loaded::load_pinned(&pins)?;
    sync::apply(&mut loaded.maps, &Policy::compile(&cfg))?;
    // The pins name the set once it is filled; the extension loads from them.
    loaded.publish()?;
    let standalone = dispatcher::standalone(&mut |target, func| shared::load_extension(&pins, target, func))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let frame = frames::syn_v4(DENIED_V4, SERVER_V4, 25);
    let direct = loaded.program().fd()?.try_clone()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..plan.runs.max(1) {
        for (fd, out) in [(&direct, &mut a), (&standalone.dispatcher, &mut b)] {
            let (verdict, ns) = bpf::test_run(std::os::fd::AsFd::as_fd(fd), &frame, plan.repeat)?;
            anyhow::ensure!(verdict == XDP_DROP, "denied SYN not dropped (verdict {verdict})");
            out.push(f64::from(ns));
        }
    }
    let costs = (median(&a), median(&b));
    println!(
        "bench: dispatcher cost, denied IPv4 SYN :25: direct {:.1} ns, through the dispatcher {:.1} ns (+{:.1} ns)",
        costs.0,
        costs.1,
        costs.1 - costs.0
    );
    Ok(costs)
}
