//! `relay-guard top`: the sources dropped (or would-dropped) most often, from
//! the kernel's per-CPU cache of blocked sources (`RG_SOURCES`). A cache slot
//! holds one source at a time, so the ranking is approximate: recent heavy
//! hitters. "Last seen" is within a tick of the last drop (the program reads
//! the clock once per tick per slot).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use relay_guard_common::{family, verdict};
use serde_json::json;

use crate::{
    config::{ConfigFile, LoadOptions},
    kernel::{inspect, pins::Pins},
};

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a valid timespec. The program uses
    // bpf_ktime_get_ns, i.e. CLOCK_MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

pub fn execute(config_path: &Path, limit: usize, as_json: bool) -> anyhow::Result<()> {
    let text = super::config_text(config_path)?;
    let file = ConfigFile::parse(config_path, &text);
    let pin_dir = super::pin_dir_of(&file)?;
    let km = inspect::open(&Pins::new(&pin_dir))?;
    // Guard names by the bit the kernel keys them on.
    let names: Vec<String> = file
        .validate(&LoadOptions::default())
        .map(|c| {
            let names: Vec<String> = c.guards.iter().map(|g| g.name.clone()).collect();
            let policy = crate::policy::Policy::compile(&c);
            match crate::kernel::sync::kernel_bits(&km, &policy) {
                Ok(bits) => policy.with_bits(&bits).names_by_bit(&names),
                Err(_) => names,
            }
        })
        .unwrap_or_default();
    // Merge the per-CPU cache slots by source: packets add up, the latest
    // sighting wins for last-seen, port, guard and verdict.
    let mut merged: std::collections::BTreeMap<(u8, [u8; 16]), relay_guard_common::SourceStats> = Default::default();
    for slot in 0..relay_guard_common::SOURCE_SLOTS {
        for s in km.sources.get(&slot, 0)?.iter() {
            if s.packets == 0 {
                continue;
            }
            let e = merged.entry((s.source.family, s.source.addr)).or_default();
            let total = e.packets + s.packets;
            if s.last_seen_ns >= e.last_seen_ns {
                *e = *s;
            }
            e.packets = total;
        }
    }
    let mut rows = Vec::new();
    for ((fam, addr), s) in merged {
        let addr = if fam == family::IPV4 {
            IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(addr))
        };
        rows.push((addr, s));
    }
    rows.sort_by(|a, b| b.1.packets.cmp(&a.1.packets).then(a.0.cmp(&b.0)));
    rows.truncate(limit);
    let now = monotonic_ns();
    let guard = |g: u8| {
        names
            .get(usize::from(g))
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| format!("guard bit {g}"))
    };
    let vname = |v: u8| {
        if v == verdict::WOULD_DROP {
            "would_drop"
        } else {
            "dropped"
        }
    };
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
    println!(
        "{:<40} {:>12} {:>10} {:>6} {:<14} {:<10}",
        "SOURCE", "PACKETS", "LAST SEEN", "PORT", "GUARD", "VERDICT"
    );
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
