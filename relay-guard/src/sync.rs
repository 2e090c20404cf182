//! Makes the kernel maps equal to a compiled [`Policy`], as a diff against
//! what the maps hold now; or, with [`plan`], only counts what would change.
//!
//! Order matters for "no gap". Phase 1 writes everything new or changed:
//! new masks (into indices no table references), then long blocks, then the
//! /24 table, then the IPv6 trie (new nodes and leaves into unlinked indices,
//! then the entries that link them; see `tables6`), ports and the mode.
//! Phase 2 removes what is stale: ports, long blocks, and finally masks that
//! neither family references. IPv6 nodes and leaves that were unlinked are
//! left as they are (a lookup may still be inside them) and reused by a
//! later sync.
//! Every single write is atomic for the XDP program (one aligned store or one
//! map update), and at every instant each entry holds its old or its new
//! value, both of which allow an address that is allowed before and after.
//! Entries that did not change are not touched.
use std::collections::{BTreeMap, BTreeSet};

use relay_guard_common::{COUNTER_PORT_SLOTS, GuardedPort, MAX_MASKS, PORT_SLOTS, Settings, maps};

use crate::{
    error::SyncError,
    loader::Maps,
    policy::Policy,
    tables::{BLOCKS, Palette, V4Tables},
    tables6::V6Write,
};

/// What a sync changed (or, from [`plan`], would change), in kernel entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
    pub unchanged: usize,
}

impl SyncStats {
    /// Whether the kernel already matched.
    pub fn is_noop(&self) -> bool {
        self.written == 0 && self.removed == 0
    }
}

/// Applies `policy` to `maps`.
pub fn apply(maps: &mut Maps, policy: &Policy) -> Result<SyncStats, SyncError> {
    run(maps, policy, true)
}

/// Counts what [`apply`] would change, writing nothing (drift detection).
pub fn plan(maps: &mut Maps, policy: &Policy) -> Result<SyncStats, SyncError> {
    run(maps, policy, false)
}

fn merr(op: &'static str, map: &'static str, what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> SyncError {
    let what = what.into();
    move |source| SyncError::Map { op, map, what, source }
}

fn run(maps: &mut Maps, policy: &Policy, write: bool) -> Result<SyncStats, SyncError> {
    let mut st = SyncStats::default();

    // ---- IPv4 tables, computed against the kernel's mask palette ----
    let mut kernel_masks = Vec::with_capacity(MAX_MASKS as usize);
    for i in 0..MAX_MASKS {
        kernel_masks.push(
            maps.masks
                .get(&i, 0)
                .map_err(merr("read", maps::MASKS, format!("index {i}")))?,
        );
    }
    let mut palette = Palette::from_kernel(kernel_masks.clone());
    let tables = V4Tables::build(&policy.v4, &mut palette).map_err(|e| SyncError::Capacity { what: e.to_string() })?;
    // The IPv6 trie as the kernel holds it, rebuilt toward the policy
    // (allocating its masks in the same palette, before anything is written).
    let mut v6tables = maps.v6.read_tables();
    let v6plan = v6tables
        .build(&policy.v6, &mut palette)
        .map_err(|e| SyncError::Capacity { what: e.to_string() })?;
    let mut used = tables.used.clone();
    v6tables.mark_used(&mut used);

    let mut have_long: BTreeSet<u32> = BTreeSet::new();
    for k in maps.long24.keys() {
        have_long.insert(k.map_err(merr("read", maps::LONG24, "keys"))?);
    }

    // Phase 1a: masks the new tables need, in indices nothing references yet.
    for (i, (&new, &old)) in palette.masks.iter().zip(&kernel_masks).enumerate() {
        if new != old && new != 0 {
            st.written += 1;
            if write {
                let i = u32::try_from(i).expect("< MAX_MASKS");
                maps.masks
                    .set(i, new, 0)
                    .map_err(merr("write", maps::MASKS, format!("index {i}")))?;
            }
        }
    }
    // Phase 1b: long blocks, before the /24 entries that point at them.
    for (&block, spec) in &tables.long {
        let hosts = spec.hosts();
        let same = have_long.contains(&block) && maps.long24.get(&block, 0).ok().as_ref() == Some(&*hosts);
        if same {
            st.unchanged += 1;
            continue;
        }
        st.written += 1;
        if write {
            maps.long24
                .insert(block, *hosts, 0)
                .map_err(merr("write", maps::LONG24, block_name(block)))?;
        }
    }
    // Phase 1c: the /24 table.
    for block in 0..BLOCKS {
        let new = tables.tbl24[block];
        if maps.tbl24.get(block) != new {
            st.written += 1;
            if write {
                maps.tbl24.set(block, new);
            }
        }
    }

    // Phase 1d: the IPv6 trie, children before the entries that link them
    // (the plan's order); freed nodes and leaves are only unlinked.
    st.written += v6plan.writes.len();
    st.removed += v6plan.freed_nodes.len() + v6plan.freed_leaves.len();
    let (nodes, leaves) = v6tables.counts();
    let fresh = v6plan
        .writes
        .iter()
        .filter(|w| matches!(w, V6Write::Node { .. } | V6Write::Leaf { .. }))
        .count();
    st.unchanged += (nodes + leaves) as usize - fresh.min((nodes + leaves) as usize);
    if write {
        for w in &v6plan.writes {
            maps.v6.apply(w);
        }
    }

    // ---- Ports (with stable counter slots) and mode ----
    let mut have_ports: BTreeMap<u16, GuardedPort> = BTreeMap::new();
    for port in 0..PORT_SLOTS {
        let gp = maps
            .ports
            .get(&port, 0)
            .map_err(merr("read", maps::PORTS, format!("port {port}")))?;
        if gp.active != 0 {
            have_ports.insert(u16::try_from(port).expect("< 65536"), gp);
        }
    }
    let mut used_slots: BTreeSet<u16> = have_ports
        .iter()
        .filter(|(p, _)| policy.ports.contains_key(p))
        .map(|(_, gp)| gp.slot)
        .collect();
    for (&port, want) in &policy.ports {
        let slot = match have_ports.get(&port) {
            Some(gp) if gp.slot != 0 => gp.slot,
            _ => {
                let free = (1..u16::try_from(COUNTER_PORT_SLOTS).expect("fits"))
                    .find(|s| !used_slots.contains(s) && !have_ports.values().any(|gp| gp.slot == *s))
                    .or_else(|| (1..u16::try_from(COUNTER_PORT_SLOTS).expect("fits")).find(|s| !used_slots.contains(s)))
                    .ok_or_else(|| SyncError::Capacity {
                        what: format!("more than {} guarded ports", COUNTER_PORT_SLOTS - 1),
                    })?;
                used_slots.insert(free);
                if write {
                    maps.zero_counters(|_, p| p == u32::from(free))
                        .map_err(|e| SyncError::Capacity { what: e.to_string() })?;
                }
                free
            }
        };
        let gp = GuardedPort {
            active: 1,
            guard: want.guard,
            slot,
        };
        if have_ports.get(&port) == Some(&gp) {
            st.unchanged += 1;
            continue;
        }
        st.written += 1;
        if write {
            maps.ports
                .set(u32::from(port), gp, 0)
                .map_err(merr("write", maps::PORTS, format!("port {port}")))?;
        }
    }
    let mode = maps.settings.get(&0, 0).map_err(merr("read", maps::SETTINGS, "mode"))?;
    if mode.mode != policy.mode {
        st.written += 1;
        if write {
            maps.settings
                .set(0, Settings { mode: policy.mode }, 0)
                .map_err(merr("write", maps::SETTINGS, "mode"))?;
        }
    }

    // ---- Phase 2: removals ----
    for &port in have_ports.keys().filter(|p| !policy.ports.contains_key(p)) {
        st.removed += 1;
        if write {
            maps.ports
                .set(u32::from(port), GuardedPort::default(), 0)
                .map_err(merr("clear", maps::PORTS, format!("port {port}")))?;
        }
    }
    for &block in have_long.iter().filter(|b| !tables.long.contains_key(b)) {
        st.removed += 1;
        if write {
            maps.long24
                .remove(&block)
                .map_err(merr("remove", maps::LONG24, block_name(block)))?;
        }
    }
    for (i, &m) in palette.masks.iter().enumerate().skip(1) {
        if m != 0 && !used[i] {
            st.removed += 1;
            if write {
                let i = u32::try_from(i).expect("< MAX_MASKS");
                maps.masks
                    .set(i, 0, 0)
                    .map_err(merr("clear", maps::MASKS, format!("index {i}")))?;
            }
        }
    }
    Ok(st)
}

fn block_name(block: u32) -> String {
    let [_, a, b, c] = block.to_be_bytes();
    format!("block {a}.{b}.{c}.0/24")
}
