//! `relay-guard explain ADDR PORT`: the verdict for one source and port, and
//! the prefix and guard that decide it — from the config (with file and
//! line) and from the kernel maps — flagging any difference (exit 1).
use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use serde_json::json;

use crate::{
    config::{Action, ConfigFile, LoadOptions},
    kernel::{inspect, pins::Pins},
    policy::{Lookup, model_allows},
};

/// Returns the exit code: 0 when config and kernel agree (or the kernel has
/// no state to compare), 1 when they differ.
pub fn execute(config_path: &Path, addr: IpAddr, port: u16, as_json: bool) -> anyhow::Result<i32> {
    // An invalid config still lets the kernel side be shown (that is what is
    // enforcing right now); the config side then reports the errors.
    let text = super::config_text(config_path)?;
    let file = ConfigFile::parse(config_path, &text);
    let loaded = file.validate(&LoadOptions::default());
    let config_error = loaded.as_ref().err().map(ToString::to_string);
    let pin_dir = match &loaded {
        Ok(c) => c.pin_dir.clone(),
        Err(_) => super::pin_dir_of(&file)?,
    };
    let cfg = loaded.ok();
    let guards = cfg.as_ref().map(|c| c.guards.clone()).unwrap_or_default();
    let guard = guards.iter().enumerate().find(|(_, g)| g.ports.contains(&port));
    let config_side = guard.map(|(gi, g)| {
        let (allowed, net) = model_allows(g, addr);
        let entry = net.and_then(|n| g.entries.iter().find(|e| e.net == n));
        (gi, g.name.clone(), allowed, entry.cloned())
    });

    crate::kernel::pins::check_pin_dir(&pin_dir)?;
    let pins = Pins::new(&pin_dir);
    // The kernel keys guards on bits, not on their place in the config.
    let mut bits: Vec<u8> = (0..guards.len()).map(|g| u8::try_from(g).unwrap_or(u8::MAX)).collect();
    let kernel_side = match inspect::open(&pins) {
        Ok(km) => {
            if let Some(c) = &cfg
                && let Ok(b) = crate::kernel::sync::kernel_bits(&km, &crate::policy::Policy::compile(c))
            {
                bits = b;
            }
            Some(inspect::lookup(&km, addr, port).context("failed to read the pinned maps")?)
        }
        Err(e) => {
            if !as_json {
                println!("kernel: no pinned state to compare ({e})");
            }
            None
        }
    };
    let ban = super::bans::deciding_ban(cfg.as_ref(), &pins, addr, port);
    let position = |bit: u8| bits.iter().position(|&b| b == bit);
    let name_of = |bit: u8| {
        position(bit)
            .and_then(|gi| guards.get(gi))
            .map_or(format!("guard bit {bit}"), |g| g.name.clone())
    };

    let agree = match (&config_side, &kernel_side) {
        _ if config_error.is_some() => false,
        (_, None) => true,
        (None, Some(Lookup::NotGuarded)) => true,
        (Some((gi, _, allowed, _)), Some(Lookup::Judged { guard, allowed: k, .. })) => {
            position(*guard) == Some(*gi) && allowed == k
        }
        _ => false,
    };

    if as_json {
        let c = config_side.as_ref().map_or(json!({"guarded": false, "verdict": "pass (port not guarded)"}), |(_, name, allowed, e)| {
            json!({
                "guarded": true, "guard": name, "verdict": if *allowed { "allow" } else { "deny" },
                "prefix": e.as_ref().map(|e| e.net.to_string()),
                "entry": e.as_ref().map(|e| json!({"action": if e.action == Action::Allow { "allow" } else { "deny" }, "file": e.origin.file.to_path_buf(), "line": e.origin.line})),
            })
        });
        let k = kernel_side.map(|k| match k {
            Lookup::NotGuarded => json!({"guarded": false}),
            Lookup::Judged { guard, allowed, prefix } => json!({
                "guarded": true, "guard": name_of(guard), "verdict": if allowed { "allow" } else { "deny" },
                "prefix": prefix.map(|p| p.to_string()),
            }),
        });
        let c = if let Some(e) = &config_error {
            json!({"error": e})
        } else {
            c
        };
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"address": addr, "port": port, "config": c, "kernel": k, "agree": agree,
                    "ban": ban.as_ref().map(|(name, net, left)| json!({"ban": name, "prefix": net.to_string(), "seconds_left": left}))})
            )?
        );
        return Ok(if agree { 0 } else { 1 });
    }

    match &config_side {
        _ if config_error.is_some() => println!(
            "config: {} is invalid:\n{}",
            config_path.display(),
            config_error.as_deref().unwrap_or("")
        ),
        None => println!("config: port {port} is in no guard: {addr} passes untouched"),
        Some((_, name, allowed, entry)) => {
            let why = match entry {
                Some(e) => format!(
                    "longest matching entry {} {} ({})",
                    if e.action == Action::Allow { "allow" } else { "deny" },
                    e.net,
                    e.origin
                ),
                None => "no entry matches (no match: deny)".to_string(),
            };
            println!(
                "config: port {port} belongs to guard `{name}`; {why} => {}",
                if *allowed { "ALLOW" } else { "DENY" }
            );
        }
    }
    match kernel_side {
        None => {}
        Some(Lookup::NotGuarded) => println!("kernel: port {port} is not guarded: {addr} passes"),
        Some(Lookup::Judged { guard, allowed, prefix }) => println!(
            "kernel: port {port} -> guard `{}`; table entry {} => {}",
            name_of(guard),
            prefix.map_or("none (no match: deny)".to_string(), |p| p.to_string()),
            if allowed { "ALLOW" } else { "DENY" }
        ),
    }
    if let Some((name, net, left)) = &ban {
        println!(
            "ban: {addr} is banned from port {port} by ban `{name}` ({net}, {left}s left): its packets are DROPPED whatever the guard says"
        );
    }
    if config_error.is_some() {
        println!("the kernel keeps enforcing its last good policy; fix the config, then reload");
    } else if !agree {
        println!("DIFFERENCE: the kernel maps do not match the config; reload the agent (SIGHUP) or check its log");
    }
    Ok(if agree { 0 } else { 1 })
}
