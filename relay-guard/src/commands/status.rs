//! `relay-guard status`: what the kernel holds for this config's pin_dir —
//! attached interfaces, mode, guarded ports, prefix counts, counters — read
//! from the pinned maps, so it works while the agent is down. Also says
//! whether the kernel maps match the config.
use std::path::Path;

use anyhow::Context as _;
use relay_guard_common::{LAYOUT_VERSION, mode};
use serde_json::json;

use crate::{
    agent::metrics::{LabelState, snapshot},
    config::{ConfigFile, LoadOptions},
    kernel::{
        counters, inspect,
        loader::ifname,
        pins::{AgentLock, Pins},
        sync,
    },
    policy::Policy,
};

pub fn execute(config_path: &Path, as_json: bool) -> anyhow::Result<()> {
    let text = super::config_text(config_path)?;
    let file = ConfigFile::parse(config_path, &text);
    let pin_dir = super::pin_dir_of(&file)?;
    let pins = Pins::new(&pin_dir);
    let mut km = inspect::open(&pins)?;
    let (ports, blocks, long_blocks, (v6_nodes, v6_leaves), kmode) =
        inspect::summary(&km).context("failed to read the pinned maps")?;
    let agent = AgentLock::holder(&pin_dir);
    let mut links = pins.pinned_links();
    // Interfaces where relay-guard runs in a shared (libxdp) dispatcher,
    // and what bypasses it there.
    let mut bypassed = Vec::new();
    for (i, _) in crate::kernel::shared::own_slots(&pins) {
        let name = ifname(i).unwrap_or_else(|| format!("ifindex {i}"));
        let bypass = crate::kernel::shared::bypasses(&pins, i);
        if !bypass.is_empty() {
            bypassed.push((name.clone(), bypass));
        }
        if !links.contains(&name) {
            links.push(name);
        }
    }

    // Labels come from the config when it is valid; the kernel state is shown either way.
    let cfg = file.validate(&LoadOptions::default());
    let slots = counters::slots(&km).context("failed to read counter slots")?;
    // Interface names as this process sees them (run it in the agent's netns for names).
    let names = slots
        .ifaces
        .values()
        .filter_map(|&i| ifname(i).map(|n| (i, n)))
        .collect();
    let mut labels = LabelState {
        slots,
        interfaces: names,
        ..LabelState::default()
    };
    let mut drift = None;
    if let Ok(cfg) = &cfg {
        let mut named = LabelState::new(cfg, labels.interfaces.clone(), labels.slots.clone());
        let policy = Policy::compile(cfg);
        if let Ok(bits) = sync::kernel_bits(&km, &policy) {
            named.guards = policy.with_bits(&bits).names_by_bit(&named.guards);
        }
        labels = named;
        // A dry run of the sync: anything it would change is drift.
        drift = Some(
            !sync::plan(&mut km, &Policy::compile(cfg))
                .context("failed to compare with the config")?
                .is_noop(),
        );
    }
    let snap = snapshot(&km.counters, &labels).context("failed to read counters")?;
    let mode_name = if kmode == mode::MONITOR { "monitor" } else { "enforce" };
    if as_json {
        let counters: Vec<_> = snap
            .packets
            .iter()
            .map(|((i, g, p, f, v), n)| json!({"interface": i, "guard": g, "port": p, "family": f, "verdict": v, "packets": n}))
            .collect();
        let out = json!({
            "pin_dir": pin_dir, "layout": LAYOUT_VERSION,
            "agent_pid": agent, "interfaces": links, "mode": mode_name,
            "guarded_ports": ports, "ipv4_blocks": blocks, "ipv4_long_blocks": long_blocks, "ipv6_nodes": v6_nodes, "ipv6_leaves": v6_leaves,
            "config_matches_kernel": drift.map(|d| !d),
            "config_error": cfg.as_ref().err().map(ToString::to_string),
            "bypassed": bypassed.iter().map(|(i, b)| json!({"interface": i, "by": b.iter().map(|b| json!({"name": b.name, "id": b.id, "priority": b.priority})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
            "counters": counters, "malformed": snap.malformed,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("pin_dir:     {} (layout {LAYOUT_VERSION})", pin_dir.display());
    println!(
        "agent:       {}",
        agent.map_or("not running (the filter stays attached)".to_string(), |p| format!(
            "running, pid {p}"
        ))
    );
    println!(
        "interfaces:  {}",
        if links.is_empty() {
            "none attached".to_string()
        } else {
            links.join(", ")
        }
    );
    for (i, b) in &bypassed {
        println!("BYPASSED:    {}", crate::kernel::shared::bypass_text(i, b));
    }
    println!("mode:        {mode_name}");
    println!(
        "ports:       {}",
        ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    println!(
        "tables:      {blocks} IPv4 /24 blocks with a match ({long_blocks} with longer prefixes), IPv6 trie of {v6_nodes} nodes and {v6_leaves} leaves"
    );
    match (&cfg, drift) {
        (Ok(_), Some(false)) => println!("config:      kernel maps match {}", config_path.display()),
        (Ok(_), _) => println!(
            "config:      kernel maps DIFFER from {} (reload the agent: SIGHUP)",
            config_path.display()
        ),
        (Err(e), _) => println!("config:      {} is invalid:\n{e}", config_path.display()),
    }
    println!();
    println!(
        "{:<16} {:<14} {:>5} {:<5} {:<10} {:>12}",
        "INTERFACE", "GUARD", "PORT", "FAM", "VERDICT", "PACKETS"
    );
    for ((i, g, p, f, v), n) in &snap.packets {
        println!("{i:<16} {g:<14} {p:>5} {f:<5} {v:<10} {n:>12}");
    }
    for (i, n) in &snap.malformed {
        println!("{i:<16} {:<14} {:>5} {:<5} {:<10} {n:>12}", "-", "-", "-", "malformed");
    }
    Ok(())
}
