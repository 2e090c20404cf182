//! Makes the kernel maps equal to a compiled [`Policy`], as a diff against
//! what the maps hold now.
//!
//! Order matters for "no gap": new and changed entries are written first,
//! stale ones deleted last, so an address allowed before and after is allowed
//! at every instant. (A changed mask is a single-entry overwrite, which the
//! kernel applies atomically.) Entries that did not change are not touched.
use std::collections::BTreeMap;

use aya::maps::lpm_trie::Key;
use relay_guard_common::{AllowMask, GuardedPort, PORT_SLOTS, Settings, maps};

use crate::{error::SyncError, loader::Maps, policy::Policy};

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// Applies `policy` to `maps`.
pub fn apply(maps: &mut Maps, policy: &Policy) -> Result<SyncStats, SyncError> {
    let mut stats = SyncStats::default();
    // Phase 1, additions: prefixes first, so a port becomes guarded only once
    // its allowlist is in place; then ports; then the mode.
    let stale_v4 = write_lpm(&mut maps.v4, maps::PREFIXES_V4, &policy.v4, &mut stats)?;
    let stale_v6 = write_lpm(&mut maps.v6, maps::PREFIXES_V6, &policy.v6, &mut stats)?;
    let stale_ports = write_ports(maps, policy, &mut stats)?;
    let settings = Settings { mode: policy.mode };
    maps.settings.set(0, settings, 0).map_err(|source| SyncError::Map {
        op: "write",
        map: maps::SETTINGS,
        what: "mode".into(),
        source,
    })?;
    // Phase 2, removals: ports that are no longer guarded, then stale prefixes.
    for port in stale_ports {
        maps.ports.set(port, GuardedPort::default(), 0).map_err(|source| SyncError::Map {
            op: "clear",
            map: maps::PORTS,
            what: format!("port {port}"),
            source,
        })?;
        stats.removed += 1;
    }
    remove_lpm(&mut maps.v4, maps::PREFIXES_V4, &stale_v4, &mut stats)?;
    remove_lpm(&mut maps.v6, maps::PREFIXES_V6, &stale_v6, &mut stats)?;
    Ok(stats)
}

type Lpm<const N: usize> = aya::maps::LpmTrie<aya::maps::MapData, [u8; N], AllowMask>;

fn lpm_err<const N: usize>(op: &'static str, name: &'static str, len: u8, addr: [u8; N], source: aya::maps::MapError) -> SyncError {
    SyncError::Map { op, map: name, what: format!("prefix {}/{len}", fmt_addr(&addr)), source }
}

/// Writes new and changed prefixes; returns the stale ones.
fn write_lpm<const N: usize>(
    map: &mut Lpm<N>,
    name: &'static str,
    want: &BTreeMap<(u8, [u8; N]), AllowMask>,
    stats: &mut SyncStats,
) -> Result<Vec<(u8, [u8; N])>, SyncError>
where
    [u8; N]: aya::Pod,
{
    let mut have: BTreeMap<(u8, [u8; N]), AllowMask> = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item.map_err(|source| SyncError::Map { op: "read", map: name, what: "entries".into(), source })?;
        let len = u8::try_from(k.prefix_len()).unwrap_or(u8::MAX);
        have.insert((len, k.data()), v);
    }
    for (&(len, addr), mask) in want {
        if have.get(&(len, addr)) == Some(mask) {
            stats.unchanged += 1;
            continue;
        }
        map.insert(&Key::new(u32::from(len), addr), mask, 0).map_err(|e| lpm_err("write", name, len, addr, e))?;
        stats.written += 1;
    }
    Ok(have.into_keys().filter(|k| !want.contains_key(k)).collect())
}

fn remove_lpm<const N: usize>(
    map: &mut Lpm<N>,
    name: &'static str,
    stale: &[(u8, [u8; N])],
    stats: &mut SyncStats,
) -> Result<(), SyncError>
where
    [u8; N]: aya::Pod,
{
    for &(len, addr) in stale {
        map.remove(&Key::new(u32::from(len), addr)).map_err(|e| lpm_err("remove", name, len, addr, e))?;
        stats.removed += 1;
    }
    Ok(())
}

/// Writes new and changed ports; returns those to clear.
fn write_ports(maps: &mut Maps, policy: &Policy, stats: &mut SyncStats) -> Result<Vec<u32>, SyncError> {
    let mut stale = Vec::new();
    let err = |op, port: u32, source| SyncError::Map { op, map: maps::PORTS, what: format!("port {port}"), source };
    for port in 0..PORT_SLOTS {
        let have = maps.ports.get(&port, 0).map_err(|e| err("read", port, e))?;
        let want = u16::try_from(port).ok().and_then(|p| policy.ports.get(&p)).copied();
        match want {
            Some(w) if w == have => stats.unchanged += 1,
            Some(w) => {
                maps.ports.set(port, w, 0).map_err(|e| err("write", port, e))?;
                stats.written += 1;
            }
            None if have.active != 0 => stale.push(port),
            None => {}
        }
    }
    Ok(stale)
}

fn fmt_addr(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("len 4")).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("len 16")).to_string(),
        _ => format!("{bytes:?}"),
    }
}
