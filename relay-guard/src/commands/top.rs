//! `relay-guard top`: the sources dropped (or would-dropped) most often, from
//! the kernel's LRU map of blocked sources.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use relay_guard_common::{family, verdict};
use serde_json::json;

use crate::{config::Config, kernel::KernelMaps, pins::Pins};

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

pub fn execute(config_path: &Path, limit: usize, as_json: bool) -> anyhow::Result<()> {
    let pin_dir = super::pin_dir_of(config_path)?;
    let km = KernelMaps::open(&Pins::new(&pin_dir))?;
    let names: Vec<String> = Config::load(config_path).map(|c| c.guards.into_iter().map(|g| g.name).collect()).unwrap_or_default();
    let mut rows = Vec::new();
    for item in km.sources.iter() {
        let (k, s) = item?;
        let addr = if k.family == family::IPV4 {
            IpAddr::V4(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(k.addr))
        };
        rows.push((addr, s));
    }
    rows.sort_by(|a, b| b.1.packets.cmp(&a.1.packets).then(a.0.cmp(&b.0)));
    rows.truncate(limit);
    let now = monotonic_ns();
    let guard = |g: u8| names.get(usize::from(g)).cloned().unwrap_or_else(|| format!("guard{}", g + 1));
    let vname = |v: u8| if v == verdict::WOULD_DROP { "would_drop" } else { "dropped" };
    #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
    let ago = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
    if as_json {
        let out: Vec<_> = rows
            .iter()
            .map(|(a, s)| json!({"source": a, "packets": s.packets, "last_seen_seconds_ago": ago(s.last_seen_ns), "last_port": s.last_port, "guard": guard(s.last_guard), "verdict": vname(s.last_verdict)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:<40} {:>12} {:>10} {:>6} {:<14} {:<10}", "SOURCE", "PACKETS", "LAST SEEN", "PORT", "GUARD", "VERDICT");
    for (a, s) in &rows {
        println!(
            "{:<40} {:>12} {:>9.1}s {:>6} {:<14} {:<10}",
            a.to_string(),
            s.packets,
            ago(s.last_seen_ns),
            s.last_port,
            guard(s.last_guard),
            vname(s.last_verdict)
        );
    }
    if rows.is_empty() {
        println!("(no blocked sources recorded)");
    }
    Ok(())
}
