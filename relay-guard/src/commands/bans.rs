//! `relay-guard ban`, `unban` and `bans`: work on the pinned maps directly
//! (a ban holds at once, with or without the agent), and leave a line in
//! `state_dir/bans.cmd` so that the agent (now, or at its next start) takes
//! the change into its engine and its saved ban list (`agent::bans`).
use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::Context as _;
use ipnet::IpNet;
use serde_json::json;

use crate::{
    agent::bans::{Command, SavedBan, append_command, ensure_state_dir, load_saved},
    config::{
        Config,
        ban::{Ban, parse_duration},
    },
    kernel::{
        bans::{BanMaps, boot_expiry, boot_ns, wall_expiry, wall_now},
        pins::Pins,
    },
    policy::bans::BanEngine,
};

fn open(cfg: &Config) -> anyhow::Result<BanMaps> {
    let pins = Pins::new(&cfg.pin_dir);
    BanMaps::open(&pins).with_context(|| {
        format!(
            "cannot open the pinned ban maps under {} (has the agent run with this config?)",
            cfg.pin_dir.display()
        )
    })
}

/// The maps, for a change: `state_dir` checked first (nothing is written
/// to the kernel that could not be recorded), and its lock taken for each
/// entry's read-modify-write.
fn open_for_change(cfg: &Config) -> anyhow::Result<BanMaps> {
    ensure_state_dir(&cfg.state_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut maps = open(cfg)?;
    maps.set_lock(&cfg.state_dir)
        .with_context(|| format!("cannot open the ban lock file in {}", cfg.state_dir.display()))?;
    Ok(maps)
}

fn parse_target(s: &str) -> anyhow::Result<IpNet> {
    let net: IpNet = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => IpNet::from(
            s.parse::<IpAddr>()
                .map_err(|_| anyhow::anyhow!("`{s}` is not an address or ADDR/LEN"))?,
        ),
    };
    if net.addr() != net.network() {
        anyhow::bail!("`{s}`: host bits set; did you mean `{}`?", net.trunc());
    }
    Ok(net)
}

fn section<'a>(cfg: &'a Config, name: Option<&str>) -> anyhow::Result<(usize, &'a Ban)> {
    match name {
        Some(n) => cfg
            .bans
            .iter()
            .enumerate()
            .find(|(_, b)| b.name == n)
            .ok_or_else(|| anyhow::anyhow!("no [[ban]] section named `{n}` in {}", cfg.path.display())),
        None => match cfg.bans.as_slice() {
            [one] => Ok((0, one)),
            [] => anyhow::bail!("{} has no [[ban]] section", cfg.path.display()),
            _ => anyhow::bail!(
                "{} has several [[ban]] sections: name one with --ban ({})",
                cfg.path.display(),
                cfg.bans.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

/// `relay-guard ban ADDR[/LEN] [--for DURATION] [--ban NAME]`.
pub fn ban(config_path: &Path, target: &str, length: Option<&str>, name: Option<&str>) -> anyhow::Result<()> {
    let cfg = Config::load(config_path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    let net = parse_target(target)?;
    let (index, sec) = section(&cfg, name)?;
    if cfg.crowdsec.as_ref().is_some_and(|c| c.ban == index) {
        anyhow::bail!(
            "ban `{}` holds CrowdSec's decisions only (a deleted decision lifts what it holds): ban in another section, or add a decision with `cscli decisions add`",
            sec.name
        );
    }
    let length = match length {
        Some(l) => {
            let d = parse_duration(l).map_err(|e| anyhow::anyhow!("--for `{l}`: {e}"))?;
            if d < Duration::from_secs(1) {
                anyhow::bail!("--for `{l}`: at least 1s");
            }
            Some(d)
        }
        None => None,
    };
    // The engine decides (never, shortest prefix, escalation from the
    // saved history of this prefix).
    let mut engine = BanEngine::new(cfg.bans.clone());
    let wall = wall_now();
    let saved = load_saved(&cfg.state_dir);
    for s in saved.bans.iter().filter(|s| s.ban == sec.name && s.prefix == net) {
        // Only its count matters here: it is replaced.
        let rec = crate::policy::bans::BanRecord {
            section: index,
            net,
            expires: wall,
            times: s.times,
            failures: s.failures,
            length: Duration::from_secs(1),
        };
        let _ = engine.restore(rec, wall);
    }
    for e in saved.ended.iter().filter(|e| e.ban == sec.name && e.prefix == net) {
        let _ = engine.restore_history(index, net, e.times, Duration::from_millis(e.ended_unix_ms), wall);
    }
    let rec = engine.manual(index, net, length, wall)?;
    let mut maps = open_for_change(&cfg)?;
    maps.ban(index, rec.net, boot_expiry(rec.expires, wall, boot_ns()))?;
    append_command(&cfg.state_dir, &Command::Ban(SavedBan::from_record(&rec, &cfg.bans))).with_context(|| {
        format!(
            "banned in the kernel, but failed to record it in {}",
            cfg.state_dir.display()
        )
    })?;
    println!(
        "banned {} from ports {:?} (ban `{}`) for {} (ban number {} of this prefix)",
        rec.net,
        sec.ports,
        sec.name,
        humantime::format_duration(Duration::from_secs(rec.expires.saturating_sub(wall).as_secs())),
        rec.times
    );
    Ok(())
}

/// `relay-guard unban ADDR[/LEN] [--ban NAME]`: exit 1 when nothing was banned.
pub fn unban(config_path: &Path, target: &str, name: Option<&str>) -> anyhow::Result<i32> {
    let cfg = Config::load(config_path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    let net = parse_target(target)?;
    let index = match name {
        Some(n) => Some(section(&cfg, Some(n))?.0),
        None => None,
    };
    let mut maps = open_for_change(&cfg)?;
    let lifted = maps.unban(net, index, boot_ns())?;
    append_command(
        &cfg.state_dir,
        &Command::Unban {
            prefix: net,
            ban: name.map(str::to_string),
        },
    )
    .with_context(|| {
        format!(
            "lifted in the kernel, but failed to record it in {}",
            cfg.state_dir.display()
        )
    })?;
    if lifted.is_empty() {
        println!("{net} was not banned");
        return Ok(1);
    }
    let names: Vec<&str> = lifted
        .iter()
        .map(|&s| cfg.bans.get(s).map_or("?", |b| b.name.as_str()))
        .collect();
    println!("lifted the ban of {net} ({})", names.join(", "));
    Ok(0)
}

/// `relay-guard bans [--json]`: the bans in force, from the kernel (what is
/// enforced), with failures and times banned from `state_dir`.
pub fn list(config_path: &Path, as_json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config_path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    let maps = open(&cfg)?;
    let (wall, boot) = (wall_now(), boot_ns());
    let mut saved = load_saved(&cfg.state_dir).bans;
    // Pending CLI lines are newer than the saved list.
    if let Ok(text) = std::fs::read_to_string(cfg.state_dir.join(crate::agent::bans::COMMAND_FILE)) {
        for line in text.lines() {
            if let Ok(Command::Ban(s)) = serde_json::from_str(line) {
                saved.retain(|x| !(x.ban == s.ban && x.prefix == s.prefix));
                saved.push(s);
            }
        }
    }
    let mut rows = Vec::new();
    for kb in maps.list()? {
        for (s, &x) in kb.expires_ns.iter().enumerate() {
            if x <= boot {
                continue;
            }
            let name = cfg.bans.get(s).map_or_else(|| format!("#{s}"), |b| b.name.clone());
            let meta = saved.iter().find(|m| m.ban == name && m.prefix == kb.net);
            let expires = wall_expiry(x, wall, boot);
            rows.push((
                kb.net,
                name,
                meta.map_or(0, |m| m.failures),
                expires,
                meta.map_or(1, |m| m.times),
            ));
        }
    }
    rows.sort_by_key(|r| r.3);
    if as_json {
        let v: Vec<_> = rows
            .iter()
            .map(|(net, name, failures, expires, times)| {
                json!({
                    "prefix": net.to_string(),
                    "ban": name,
                    "failures": failures,
                    "expires": humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + *expires).to_string(),
                    "expires_in_seconds": expires.saturating_sub(wall).as_secs(),
                    "times_banned": times,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no bans in force");
        return Ok(());
    }
    println!(
        "{:<40} {:<12} {:>8} {:<22} {:>10} {:>6}",
        "PREFIX", "BAN", "FAILURES", "EXPIRES", "LEFT", "TIMES"
    );
    for (net, name, failures, expires, times) in rows {
        println!(
            "{:<40} {:<12} {:>8} {:<22} {:>10} {:>6}",
            net.to_string(),
            name,
            failures,
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + expires).to_string(),
            humantime::format_duration(Duration::from_secs(expires.saturating_sub(wall).as_secs())).to_string(),
            times
        );
    }
    Ok(())
}

/// For `explain`: the ban that decides for (`addr`, `port`) in the pinned
/// maps: (ban name, prefix, seconds left).
pub fn deciding_ban(cfg: Option<&Config>, pins: &Pins, addr: IpAddr, port: u16) -> Option<(String, IpNet, u64)> {
    let maps = BanMaps::open(pins).ok()?;
    let boot = boot_ns();
    let (s, net, x) = maps.lookup(addr, port, boot).ok()??;
    let name = cfg
        .and_then(|c| c.bans.get(s))
        .map_or_else(|| format!("ban #{s}"), |b| b.name.clone());
    Some((name, net, (x - boot) / 1_000_000_000))
}
