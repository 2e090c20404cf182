//! Makes the kernel maps equal to a compiled [`Policy`], as a diff against
//! what the maps hold now; or, with [`plan`], only counts what would change.
//!
//! One policy at a time: ports and mode belong to a generation, switched by
//! one store, and guard bits keep their meaning while packets may test them
//! (see [`apply_full`]). All or nothing: every limit is checked, and the
//! first pass and the switch are run without writes, before anything is
//! written.
//!
//! Order within a pass matters for "no gap". Phase 1 writes everything new
//! or changed: new masks (into indices no table references), then long
//! blocks' /28 entries, then the /24 table, then the IPv6 trie (new nodes and leaves into
//! unlinked indices, then the entries that link them; see `tables6`).
//! Phase 2 removes stale /28 entries of long blocks. A /28 with no entry
//! reads as its /24's own mask (the low bits of the /24's entry), so an
//! entry added before that mask changes, and removed after, keeps each host
//! at its old or its new value. Masks that neither family references
//! any more, and IPv6 nodes and leaves that were unlinked, are left as they
//! are (a lookup may still be about to read them): the next sync clears such
//! masks if still unreferenced, and reuses such nodes and leaves.
//!
//! [`apply`] diffs the whole policy against the kernel (start-up, config
//! changes); [`apply_delta`] writes only what a list edit touched, from the
//! [`Shadow`] the previous sync left (see `incremental`).
//! Every single write is atomic for the XDP program (one aligned store or one
//! map update), and at every instant each entry holds its old or its new
//! value, both of which allow an address that is allowed before and after.
//! Entries that did not change are not touched.
use std::collections::{BTreeMap, BTreeSet};

use relay_guard_common::{
    AllowMask, COUNTER_PORT_SLOTS, GuardedPort, LONG_BLOCK, LONG_HOSTS, LongBlock, MAX_GUARDS, MAX_MASKS, PORT_SLOTS,
    PortEntry, Settings, maps,
};

use crate::{
    error::SyncError,
    kernel::maps::Maps,
    policy::{
        Policy,
        tables::{self, LongSpec, Palette, PaletteFull},
        tables6::{V6Tables, V6Write},
    },
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

/// What the agent knows of the IPv4 tables in the kernel after a sync, so
/// the next one can be a delta ([`apply_delta`]) instead of a full diff.
#[derive(Debug)]
pub struct Shadow {
    pub palette: Palette,
    /// References to each mask index from `RG_TBL24` and `RG_LONG24`.
    pub refs: Vec<u32>,
    /// The long blocks as written (their /28 entries in `RG_LONG24` are
    /// [`LongSpec::sub_blocks`]).
    pub long: BTreeMap<u32, LongSpec>,
    /// Entries of `RG_LONG24`.
    pub long_entries: usize,
    /// The IPv6 trie as written.
    pub v6: V6Tables,
    /// Mask indices no table referenced after the last sync: the next one
    /// clears those still unreferenced (never the sync that unlinked them).
    pub stale: Vec<u16>,
}

/// Applies `policy` (as [`Policy::compile`] makes it) to `maps`.
pub fn apply(maps: &mut Maps, policy: &Policy) -> Result<SyncStats, SyncError> {
    apply_full(maps, policy, None, &[]).map(|(st, _, _)| st)
}

/// [`apply`], also returning the [`Shadow`] a later [`apply_delta`] needs
/// and the policy as written (guards on their kernel bits, see
/// [`Policy::bits`]). `old` is the policy of the last sync as written, if
/// known; `stale` is [`Shadow::stale`] of the previous sync, if known.
///
/// One policy at a time: the ports and the mode of a policy form a
/// *generation* ([`PortEntry`], [`Settings`]); the program reads the
/// generation once per packet. A guard keeps its bit when every port that
/// tests the bit stays with it, so rewriting the tables in place moves each
/// of its lookups from the old verdict to the new one. Every other guard
/// takes a free bit, and the bits it leaves ("kept") keep their old meaning
/// in the tables until the switch: the first pass writes the union of the
/// old policy (kept bits) and the new one; then the next generation's
/// ports and mode are written and one store switches to it; after an RCU
/// grace period (no packet still judged by the old generation) a second
/// pass writes the new policy alone. A mode change moves every guard.
///
/// All or nothing: the limits ([`Policy::limits`]) and a dry run of the
/// first pass run before anything is written.
pub fn apply_full(
    maps: &mut Maps,
    policy: &Policy,
    old: Option<&Policy>,
    stale: &[u16],
) -> Result<(SyncStats, Shadow, Policy), SyncError> {
    let gens = read_gens(maps)?;
    let active = gens.active();
    let mode_changes = !active.is_empty() && gens.settings.mode() != policy.mode;
    // A mode change moves every guard to a new bit, when there are enough
    // (up to 32 guards); otherwise guards keep their bits and only the
    // switch changes the mode.
    let (bits, keep) = match assign_bits(&active, policy, mode_changes) {
        Err(_) if mode_changes => assign_bits(&active, policy, false)?,
        r => r?,
    };
    let target = policy.with_bits(&bits);
    let over = target.limits();
    if !over.is_empty() {
        let what = over.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        return Err(SyncError::Capacity { what });
    }
    // The kept bits' old meaning, as the kernel holds it (the source of
    // truth, also after a restart or a failed sync); `old` if it cannot be read.
    let first = match keep {
        0 => None,
        _ => match kernel_policy(maps, keep) {
            Ok(k) => Some(Policy::union(&k, keep, &target)),
            Err(e) => match old {
                Some(old) => Some(Policy::union(old, keep, &target)),
                None => return Err(e),
            },
        },
    };
    let first_ref = first.as_ref().unwrap_or(&target);
    // Everything that can run out, checked before the first write.
    run(maps, first_ref, false, stale)?;
    plan_switch(maps, &gens, &target, false)?;

    let (mut st, shadow) = run(maps, first_ref, true, stale)?;
    let mut shadow = shadow.expect("written");
    let sw = plan_switch(maps, &gens, &target, true)?;
    st.written += sw.written;
    st.removed += sw.removed;
    st.unchanged += sw.unchanged;
    if first.is_some() {
        grace_period();
        let (st2, shadow2) = run(maps, &target, true, &shadow.stale)?;
        st.written += st2.written;
        st.removed += st2.removed;
        shadow = shadow2.expect("written");
    }
    Ok((st, shadow, target))
}

/// Counts what [`apply`] would change, writing nothing (drift detection).
/// Unreferenced masks are not drift: no lookup reaches them.
pub fn plan(maps: &mut Maps, policy: &Policy) -> Result<SyncStats, SyncError> {
    let gens = read_gens(maps)?;
    let active = gens.active();
    let Ok((bits, _)) = assign_bits(&active, policy, false) else {
        return Ok(SyncStats {
            written: 1,
            ..SyncStats::default()
        });
    };
    let target = policy.with_bits(&bits);
    let (mut st, _) = run(maps, &target, false, &[])?;
    for (&port, want) in &target.ports {
        match active.get(&port) {
            Some(&bit) if bit == want.guard => st.unchanged += 1,
            _ => st.written += 1,
        }
    }
    st.removed += active.keys().filter(|p| !target.ports.contains_key(p)).count();
    if gens.settings.mode() != target.mode {
        st.written += 1;
    }
    Ok(st)
}

/// The bits the kernel's generation in force gives `policy`'s guards
/// (config position → bit), as the next [`apply`] would keep them.
pub fn kernel_bits(maps: &Maps, policy: &Policy) -> Result<Vec<u8>, SyncError> {
    let gens = read_gens(maps)?;
    assign_bits(&gens.active(), policy, false).map(|(b, _)| b)
}

/// The verdicts of the bits `keep` as the kernel's tables hold them, as a
/// policy: runs of equal value (IPv4 /24 blocks, hosts of a long block, IPv6
/// top slots) become aligned prefixes, trie entries their ranges, leaves
/// their prefixes. A lookup in it gives, for those bits, what the program
/// finds in the kernel.
fn kernel_policy(maps: &mut Maps, keep: u64) -> Result<Policy, SyncError> {
    let mut masks = vec![0u64; MAX_MASKS as usize];
    for i in 1..MAX_MASKS {
        masks[i as usize] = maps
            .masks
            .get(&i, 0)
            .map_err(merr("read", maps::MASKS, format!("index {i}")))?;
    }
    let val = |idx: u32| masks.get(idx as usize).copied().unwrap_or(0) & keep;
    let mut p = Policy::default();
    // [start, end) of units of 2^unit_bits addresses from `base`, as prefixes.
    fn ranges(start: u64, end: u64, mut emit: impl FnMut(u32, u64)) {
        let mut s = start;
        while s < end {
            let mut size_bits = if s == 0 { 63 } else { s.trailing_zeros() };
            while size_bits > 0 && s + (1u64 << size_bits) > end {
                size_bits -= 1;
            }
            emit(size_bits, s);
            s += 1u64 << size_bits;
        }
    }
    let v4_run = |p: &mut Policy, start: u32, end: u32, v: u64| {
        if v != 0 {
            ranges(u64::from(start), u64::from(end), |bits, s| {
                let len = u8::try_from(24 - bits).expect("<= 24");
                let addr = u32::try_from(s << 8).expect("fits");
                p.v4.insert((len, addr.to_be_bytes()), AllowMask { allow: v });
            });
        }
    };
    // The long blocks' /28 entries, read once.
    let mut subs: BTreeMap<u32, LongBlock> = BTreeMap::new();
    for kv in maps.long24.iter() {
        let (k, v) = kv.map_err(merr("read", maps::LONG24, "entries"))?;
        subs.insert(k, v);
    }
    let mut run = (0u32, 0u64);
    for b in 0..tables::BLOCKS as u32 {
        let e = maps.tbl24.get(b as usize);
        if e & LONG_BLOCK == 0 {
            let v = val(u32::from(e));
            if v != run.1 {
                v4_run(&mut p, run.0, b, run.1);
                run = (b, v);
            }
            continue;
        }
        v4_run(&mut p, run.0, b, run.1);
        run = (b + 1, 0);
        // A /28 with no entry has the block's own mask.
        let mut hosts = [e & !LONG_BLOCK; 256];
        for (&k, sub) in subs.range(b << 4..(b + 1) << 4) {
            let s = (k & 15) as usize * LONG_HOSTS;
            hosts[s..s + LONG_HOSTS].copy_from_slice(sub);
        }
        let mut hrun = (0u32, val(u32::from(hosts[0])));
        for h in 1..=256u32 {
            let v = if h < 256 {
                val(u32::from(hosts[h as usize]))
            } else {
                u64::MAX
            };
            if v != hrun.1 {
                if hrun.1 != 0 {
                    ranges(u64::from(hrun.0), u64::from(h), |bits, s| {
                        let len = u8::try_from(32 - bits).expect("<= 32");
                        let addr = (b << 8) | u32::try_from(s).expect("< 256");
                        p.v4.insert((len, addr.to_be_bytes()), AllowMask { allow: hrun.1 });
                    });
                }
                hrun = (h, v);
            }
        }
    }
    v4_run(&mut p, run.0, tables::BLOCKS as u32, run.1);
    maps.tbl24.release();

    // IPv6: the trie read back as prefixes (see `tables6::prefixes`).
    p.v6 = crate::policy::tables6::prefixes(|s| maps.v6.top(s), |i| maps.v6.node(i), |i| maps.v6.leaf(i), &val);
    Ok(p)
}

/// What the kernel holds of the generations.
struct Gens {
    settings: Settings,
    /// Ports guarded in either generation.
    ports: BTreeMap<u16, PortEntry>,
}

impl Gens {
    /// Port → bit in the generation in force.
    fn active(&self) -> BTreeMap<u16, u8> {
        let cur = self.settings.current();
        self.ports
            .iter()
            .filter(|(_, e)| e.gens[cur].active != 0)
            .map(|(&p, e)| (p, e.gens[cur].guard))
            .collect()
    }
}

fn read_gens(maps: &Maps) -> Result<Gens, SyncError> {
    let settings = maps
        .settings
        .get(&0, 0)
        .map_err(merr("read", maps::SETTINGS, "generation"))?;
    let mut ports = BTreeMap::new();
    for port in 0..PORT_SLOTS {
        let e = maps
            .ports
            .get(&port, 0)
            .map_err(merr("read", maps::PORTS, format!("port {port}")))?;
        if e.gens.iter().any(|g| g.active != 0) {
            ports.insert(u16::try_from(port).expect("< 65536"), e);
        }
    }
    Ok(Gens { settings, ports })
}

/// Bits for `policy`'s guards (config position → bit) against `active`
/// (port → bit of the generation in force), and the bits of `active` that
/// must keep their meaning until the switch. A guard keeps an old bit when
/// all of that bit's ports are its own (unless `renew_all`); the others
/// take bits `active` does not use.
pub fn assign_bits(active: &BTreeMap<u16, u8>, policy: &Policy, renew_all: bool) -> Result<(Vec<u8>, u64), SyncError> {
    let n = policy.bits.len();
    let owner = |port: &u16| {
        policy
            .ports
            .get(port)
            .and_then(|gp| policy.bits.iter().position(|&b| b == gp.guard))
    };
    let mut by_bit: BTreeMap<u8, Vec<u16>> = BTreeMap::new();
    for (&p, &b) in active {
        by_bit.entry(b).or_default().push(p);
    }
    let mut bits: Vec<Option<u8>> = vec![None; n];
    let mut keep = 0u64;
    for (&b, ports) in &by_bit {
        let g = owner(&ports[0]);
        match g {
            Some(g) if !renew_all && bits[g].is_none() && ports.iter().all(|p| owner(p) == Some(g)) => {
                bits[g] = Some(b);
            }
            _ => keep |= 1 << b,
        }
    }
    let mut free = (0..MAX_GUARDS as u8).filter(|b| !by_bit.contains_key(b));
    let need = bits.iter().filter(|b| b.is_none()).count();
    let mut out = Vec::with_capacity(n);
    for b in bits {
        match b.or_else(|| free.next()) {
            Some(b) => out.push(b),
            None => {
                return Err(SyncError::Capacity {
                    what: format!(
                        "{need} guards need a new bit, but the policy in force uses {} of {MAX_GUARDS}: change fewer guards' ports (or the mode) in one reload",
                        by_bit.len()
                    ),
                });
            }
        }
    }
    Ok((out, keep))
}

/// Writes the next generation's ports and mode, then switches to it (one
/// store), unless the generation in force already is `target`'s. Counter
/// slots stay with their port.
fn plan_switch(maps: &mut Maps, gens: &Gens, target: &Policy, write: bool) -> Result<SyncStats, SyncError> {
    let mut st = SyncStats::default();
    let cur = gens.settings.current();
    let next = 1 - cur;
    let active = gens.active();
    let same_ports =
        active.len() == target.ports.len() && target.ports.iter().all(|(p, gp)| active.get(p) == Some(&gp.guard));
    if same_ports && gens.settings.mode() == target.mode {
        st.unchanged += target.ports.len() + 1;
        return Ok(st);
    }
    let slot_of = |p: &u16| {
        gens.ports
            .get(p)
            .map(|e| e.gens[cur])
            .filter(|g| g.active != 0 && g.slot != 0)
            .map(|g| g.slot)
    };
    let mut used: BTreeSet<u16> = target.ports.keys().filter_map(slot_of).collect();
    let held: BTreeSet<u16> = gens.ports.keys().filter_map(slot_of).collect();
    let max = u16::try_from(COUNTER_PORT_SLOTS).expect("fits");
    let mut want: BTreeMap<u16, GuardedPort> = BTreeMap::new();
    for (&port, gp) in &target.ports {
        let slot = match slot_of(&port) {
            Some(s) => s,
            None => {
                let free = (1..max)
                    .find(|s| !used.contains(s) && !held.contains(s))
                    .or_else(|| (1..max).find(|s| !used.contains(s)))
                    .ok_or_else(|| SyncError::Capacity {
                        what: format!("guarded ports: more than {} (the limit is {})", max - 1, max - 1),
                    })?;
                used.insert(free);
                if write {
                    maps.zero_counters(|_, p| p == u32::from(free))
                        .map_err(|e| SyncError::Capacity { what: e.to_string() })?;
                }
                free
            }
        };
        want.insert(
            port,
            GuardedPort {
                active: 1,
                guard: gp.guard,
                slot,
            },
        );
    }
    // The next generation's half of every port it or the current one names.
    let ports: BTreeSet<u16> = gens.ports.keys().chain(want.keys()).copied().collect();
    for port in ports {
        let mut e = gens.ports.get(&port).copied().unwrap_or_default();
        let half = want.get(&port).copied().unwrap_or_default();
        if e.gens[next] == half {
            continue;
        }
        e.gens[next] = half;
        if half.active != 0 {
            st.written += 1;
        } else {
            st.removed += 1;
        }
        if write {
            maps.ports
                .set(u32::from(port), e, 0)
                .map_err(merr("write", maps::PORTS, format!("port {port}")))?;
        }
    }
    st.written += 1;
    if write {
        let mut s = gens.settings;
        s.modes[next] = target.mode;
        maps.settings
            .set(0, s, 0)
            .map_err(merr("write", maps::SETTINGS, "next mode"))?;
        // The switch: only the generation's lowest byte changes.
        s.generation = u32::try_from(next).expect("0 or 1");
        maps.settings
            .set(0, s, 0)
            .map_err(merr("write", maps::SETTINGS, "generation"))?;
    }
    Ok(st)
}

/// Waits until no packet can still be judged by the generation just left:
/// XDP runs under RCU, and `membarrier(MEMBARRIER_CMD_GLOBAL)` returns after
/// an RCU grace period (`synchronize_rcu`). Where that command is refused
/// (nohz_full), a sleep far longer than any packet's run stands in.
pub(crate) fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn merr(op: &'static str, map: &'static str, what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> SyncError {
    let what = what.into();
    move |source| SyncError::Map { op, map, what, source }
}

fn run(
    maps: &mut Maps,
    policy: &Policy,
    write: bool,
    stale_before: &[u16],
) -> Result<(SyncStats, Option<Shadow>), SyncError> {
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
    let mut palette = Palette::from_kernel(kernel_masks);
    let capacity = |e: PaletteFull| SyncError::Capacity { what: e.to_string() };
    let mut have_long: BTreeSet<u32> = BTreeSet::new();
    for k in maps.long24.keys() {
        have_long.insert(k.map_err(merr("read", maps::LONG24, "keys"))?);
    }
    // The /28 keys the policy's long blocks store, ascending (spans and
    // blocks are visited in order).
    let mut new_keys: Vec<u32> = Vec::new();

    // Phase 1 for IPv4, one /8 at a time (the whole table is never built in
    // memory): masks first taken, then long blocks, then /24 entries.
    let mut refs = vec![0u32; MAX_MASKS as usize];
    let mut new_blocks = 0usize;
    let mut long_all: BTreeMap<u32, LongSpec> = BTreeMap::new();
    const SPAN_LEN: u8 = 8;
    let span = 1u32 << (24 - u32::from(SPAN_LEN));
    for start in (0..1u32 << 24).step_by(span as usize) {
        let paint = tables::paint_range(&policy.v4, &mut palette, start, start + span, SPAN_LEN).map_err(capacity)?;
        write_masks(maps, &mut palette, &mut st, write)?;
        // Long blocks' /28 entries from two threads (two fds on the map):
        // the kernel's hash inserts are most of a cold load.
        let mut specs: Vec<(u32, LongBlock)> = Vec::new();
        for (&b, spec) in &paint.long {
            spec_refs(&mut refs, spec, 1);
            specs.extend(spec.sub_blocks(b));
        }
        new_keys.extend(specs.iter().map(|&(k, _)| k));
        let (first, second) = specs.split_at(specs.len() / 2);
        let (one, two) = (&mut maps.long24, &mut maps.long24_aux);
        let (r1, r2) = std::thread::scope(|sc| {
            let h = sc.spawn(|| write_long(two, second, &have_long, write));
            (write_long(one, first, &have_long, write), h.join())
        });
        for r in [r1, r2.unwrap_or_else(|p| std::panic::resume_unwind(p))] {
            let (written, unchanged) = r?;
            st.written += written;
            st.unchanged += unchanged;
        }
        // The /24 entries, a /16 at a time: one the new policy makes
        // uniform is switched by one store; any other is written entry by
        // entry (a uniform one gets a block first, see `Tbl24`).
        for (j, chunk) in paint.tbl.chunks(256).enumerate() {
            let slot = (start as usize >> 8) + j;
            for &new in chunk {
                if new & LONG_BLOCK == 0 {
                    refs[usize::from(new)] += 1;
                }
            }
            let changed = chunk
                .iter()
                .enumerate()
                .filter(|&(c, &new)| maps.tbl24.get((slot << 8) + c) != new)
                .count();
            st.written += changed;
            if changed == 0 {
                continue;
            }
            let uniform = chunk[0] & LONG_BLOCK == 0 && chunk.iter().all(|&v| v == chunk[0]);
            if uniform {
                if write {
                    maps.tbl24.set16(slot, chunk[0]);
                }
                continue;
            }
            if maps.tbl24.is_uniform(slot) {
                new_blocks += 1;
            }
            if write {
                for (c, &new) in chunk.iter().enumerate() {
                    maps.tbl24.set((slot << 8) + c, new).map_err(|_| SyncError::Capacity {
                        what: blocks_full(maps),
                    })?;
                }
            }
        }
        // Give back the table's memory as the scan moves on (it is 32 MiB).
        if (start / span) % 8 == 7 {
            maps.tbl24.release();
        }
        long_all.extend(paint.long);
    }
    if write {
        maps.tbl24.compact();
    }
    maps.tbl24.release();
    if !write && new_blocks > maps.tbl24.available() as usize {
        return Err(SyncError::Capacity {
            what: format!(
                "IPv4 /16s holding more than one verdict (map RG_TBL24): {new_blocks} more need a block, {} are free of {}",
                maps.tbl24.available(),
                maps.tbl24.capacity()
            ),
        });
    }
    // New /28 entries are inserted before stale ones go: the map holds both.
    let peak = have_long.len() + new_keys.iter().filter(|k| !have_long.contains(k)).count();
    if !write && peak > maps.long24_capacity as usize {
        return Err(SyncError::Capacity {
            what: format!(
                "IPv4 /28s holding prefixes longer than /24 (map RG_LONG24): {peak} while the old and the new policy's entries are both present (the map holds {})",
                maps.long24_capacity
            ),
        });
    }

    // The IPv6 trie as the kernel holds it, rebuilt toward the policy
    // (allocating its masks in the same palette, written before any link).
    let mut v6tables = maps.v6.read_tables();
    let v6plan = v6tables
        .build(&policy.v6, &mut palette)
        .map_err(|e| SyncError::Capacity { what: e.to_string() })?;
    write_masks(maps, &mut palette, &mut st, write)?;
    let mut used: Vec<bool> = refs.iter().map(|&r| r > 0).collect();
    v6tables.mark_used(&mut used);

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

    // ---- Phase 2: removals ----
    for &key in have_long.iter().filter(|k| new_keys.binary_search(k).is_err()) {
        st.removed += 1;
        if write {
            maps.long24
                .remove(&key)
                .map_err(merr("remove", maps::LONG24, sub_name(key)))?;
        }
    }
    // Masks no table references any more are not cleared now: a lookup
    // that read an old table entry an instant ago may still be about to read
    // its mask. They are cleared by the next sync, if still unreferenced.
    let mut stale = Vec::new();
    for i in 1..u16::try_from(MAX_MASKS).expect("fits") {
        let m = palette.masks[usize::from(i)];
        if m != 0 && !used[usize::from(i)] {
            if write && stale_before.contains(&i) {
                st.removed += 1;
                maps.masks
                    .set(u32::from(i), 0, 0)
                    .map_err(merr("clear", maps::MASKS, format!("index {i}")))?;
                palette.release(i);
            } else {
                stale.push(i);
            }
        }
    }
    if !write {
        return Ok((st, None));
    }
    Ok((
        st,
        Some(Shadow {
            palette,
            refs,
            long: long_all,
            long_entries: new_keys.len(),
            v6: v6tables,
            stale,
        }),
    ))
}

/// Writes the /28 entries `subs` into `RG_LONG24` (through `map`, one of
/// its handles), skipping those the kernel already holds as they are:
/// (written, unchanged).
fn write_long(
    map: &mut aya::maps::HashMap<aya::maps::MapData, u32, LongBlock>,
    subs: &[(u32, LongBlock)],
    have: &BTreeSet<u32>,
    write: bool,
) -> Result<(usize, usize), SyncError> {
    let (mut written, mut unchanged) = (0, 0);
    for &(key, hosts) in subs {
        if have.contains(&key) && map.get(&key, 0).ok().as_ref() == Some(&hosts) {
            unchanged += 1;
            continue;
        }
        written += 1;
        if write {
            map.insert(key, hosts, 0)
                .map_err(merr("write", maps::LONG24, sub_name(key)))?;
        }
    }
    Ok((written, unchanged))
}

/// Writes the masks the palette handed out since the last call (before any
/// table entry that references them).
fn write_masks(maps: &mut Maps, palette: &mut Palette, st: &mut SyncStats, write: bool) -> Result<(), SyncError> {
    for i in palette.take_allocated() {
        st.written += 1;
        if write {
            maps.masks
                .set(u32::from(i), palette.masks[usize::from(i)], 0)
                .map_err(merr("write", maps::MASKS, format!("index {i}")))?;
        }
    }
    Ok(())
}

/// Adds (`sign` 1) or removes (-1) the references of a long block.
fn spec_refs(refs: &mut [u32], spec: &LongSpec, sign: i32) {
    for idx in std::iter::once(spec.base).chain(spec.prefixes.iter().map(|&(_, _, i)| i)) {
        let r = &mut refs[usize::from(idx)];
        *r = r.wrapping_add_signed(sign);
    }
}

/// Applies a change of `policy` (already updated) confined to the prefixes
/// `v4` (IPv4 keys whose mask changed, appeared or went) and `v6` (IPv6
/// keys likewise), against the kernel state
/// described by `shadow`. Same phases and guarantees as [`apply`]; the
/// cost is proportional to the /24 blocks those prefixes cover, not to the
/// size of the policy. On error the shadow no longer describes the kernel:
/// the caller must fall back to [`apply`].
pub fn apply_delta(
    maps: &mut Maps,
    shadow: &mut Shadow,
    policy: &Policy,
    v4: &[(u8, [u8; 4])],
    v6: &[(u8, [u8; 16])],
) -> Result<SyncStats, SyncError> {
    let mut st = SyncStats::default();
    let full = |e: PaletteFull| SyncError::Capacity { what: e.to_string() };
    shadow.palette.recycle();

    // Dirty /24 ranges: aligned powers of two, so two either nest or are disjoint.
    let mut ranges: Vec<(u32, u32, u8)> = v4
        .iter()
        .map(|&(len, a)| {
            let block = u32::from_be_bytes(a) >> 8;
            let l = len.min(24);
            let start = block & !((1u32 << (24 - u32::from(l))) - 1);
            (start, start + (1u32 << (24 - u32::from(l))), l)
        })
        .collect();
    ranges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut merged: Vec<(u32, u32, u8)> = Vec::new();
    for r in ranges {
        match merged.last() {
            Some(&(_, end, _)) if r.0 < end => {}
            _ => merged.push(r),
        }
    }

    // The IPv6 trie: only the top slots the changed prefixes touch.
    let v6plan = if v6.is_empty() {
        None
    } else {
        let changed = v6.iter().copied();
        Some(
            shadow
                .v6
                .update(&policy.v6, changed, &mut shadow.palette)
                .map_err(|e| SyncError::Capacity { what: e.to_string() })?,
        )
    };

    let mut tbl_writes: Vec<(usize, u16)> = Vec::new();
    // Per changed long block: its new spec (None: no longer long), the /28
    // entries to write and the keys to remove.
    let mut long_specs: Vec<(u32, Option<LongSpec>)> = Vec::new();
    let mut sub_writes: Vec<(u32, LongBlock)> = Vec::new();
    let mut sub_gone: Vec<u32> = Vec::new();
    // /28 entries new to the map.
    let mut added = 0usize;
    let mut dropped: Vec<u16> = Vec::new();
    for (start, end, l) in merged {
        let mut paint = tables::paint_range(&policy.v4, &mut shadow.palette, start, end, l).map_err(full)?;
        for block in start..end {
            let b = block as usize;
            let new = paint.tbl[b - start as usize];
            let old = maps.tbl24.get(b);
            let old_spec = shadow.long.get(&block);
            let new_spec = paint.long.remove(&block);
            if old == new && old_spec == new_spec.as_ref() {
                st.unchanged += 1;
                continue;
            }
            // References: the old entry's go, the new entry's come.
            if old & LONG_BLOCK == 0 {
                shadow.refs[usize::from(old)] -= 1;
                dropped.push(old);
            }
            if let Some(spec) = old_spec {
                spec_refs(&mut shadow.refs, spec, -1);
                dropped.push(spec.base);
                dropped.extend(spec.prefixes.iter().map(|&(_, _, i)| i));
            }
            if new & LONG_BLOCK == 0 {
                shadow.refs[usize::from(new)] += 1;
            }
            if let Some(spec) = &new_spec {
                spec_refs(&mut shadow.refs, spec, 1);
            }
            if old_spec != new_spec.as_ref() {
                let old_subs: BTreeMap<u32, LongBlock> =
                    old_spec.map(|sp| sp.sub_blocks(block).collect()).unwrap_or_default();
                let new_subs: BTreeMap<u32, LongBlock> = new_spec
                    .as_ref()
                    .map(|sp| sp.sub_blocks(block).collect())
                    .unwrap_or_default();
                added += new_subs.keys().filter(|k| !old_subs.contains_key(k)).count();
                sub_writes.extend(
                    new_subs
                        .iter()
                        .filter(|&(k, v)| old_subs.get(k) != Some(v))
                        .map(|(&k, &v)| (k, v)),
                );
                sub_gone.extend(old_subs.keys().filter(|k| !new_subs.contains_key(k)));
                long_specs.push((block, new_spec));
            }
            if old != new {
                tbl_writes.push((b, new));
            }
        }
    }

    // Blocks: each uniform /16 written may need one; checked before any write.
    let mut promote: Vec<usize> = tbl_writes
        .iter()
        .map(|&(b, _)| b >> 8)
        .filter(|&slot| maps.tbl24.is_uniform(slot))
        .collect();
    promote.dedup();
    if promote.len() > maps.tbl24.available() as usize {
        return Err(SyncError::Capacity {
            what: blocks_full(maps),
        });
    }
    // /28 entries: new ones are inserted before stale ones go.
    if shadow.long_entries + added > maps.long24_capacity as usize {
        return Err(SyncError::Capacity {
            what: format!(
                "IPv4 /28s holding prefixes longer than /24 (map RG_LONG24): {} while the old and the new entries are both present (the map holds {})",
                shadow.long_entries + added,
                maps.long24_capacity
            ),
        });
    }

    // Phase 1a: masks first taken by this sync.
    for i in shadow.palette.take_allocated() {
        st.written += 1;
        let m = shadow.palette.masks[usize::from(i)];
        maps.masks
            .set(u32::from(i), m, 0)
            .map_err(merr("write", maps::MASKS, format!("index {i}")))?;
    }
    // Phase 1b: long blocks' /28 entries, before the /24 entries that
    // point at them (and give the /28s left out their mask).
    for &(key, hosts) in &sub_writes {
        st.written += 1;
        maps.long24
            .insert(key, hosts, 0)
            .map_err(merr("write", maps::LONG24, sub_name(key)))?;
    }
    shadow.long_entries += added;
    for (block, spec) in long_specs {
        match spec {
            Some(spec) => shadow.long.insert(block, spec),
            None => shadow.long.remove(&block),
        };
    }
    // Phase 1c: the /24 table.
    for &(b, v) in &tbl_writes {
        st.written += 1;
        maps.tbl24.set(b, v).map_err(|_| SyncError::Capacity {
            what: blocks_full(maps),
        })?;
    }
    maps.tbl24.release();
    // Phase 1d: the IPv6 trie (see `tables6`): children before links.
    if let Some(plan) = &v6plan {
        st.written += plan.writes.len();
        st.removed += plan.freed_nodes.len() + plan.freed_leaves.len();
        for w in &plan.writes {
            maps.v6.apply(w);
        }
    }

    // Phase 2: removals.
    for key in sub_gone {
        st.removed += 1;
        maps.long24
            .remove(&key)
            .map_err(merr("remove", maps::LONG24, sub_name(key)))?;
        shadow.long_entries -= 1;
    }
    // Masks: clear those the previous sync left unreferenced and that still
    // are; those unreferenced since this sync wait for the next one.
    let stale_before = std::mem::take(&mut shadow.stale);
    let mut candidates = dropped;
    if v6plan.is_some() {
        candidates.extend((1..MAX_MASKS).map(|i| u16::try_from(i).expect("< MAX_MASKS")));
    }
    candidates.retain(|&i| i != 0 && shadow.refs[usize::from(i)] == 0 && shadow.palette.masks[usize::from(i)] != 0);
    if !stale_before.is_empty() || !candidates.is_empty() {
        let mut used6 = vec![false; MAX_MASKS as usize];
        shadow.v6.mark_used(&mut used6);
        let free = |i: u16, refs: &[u32]| refs[usize::from(i)] == 0 && !used6[usize::from(i)];
        for &i in &stale_before {
            if free(i, &shadow.refs) && shadow.palette.masks[usize::from(i)] != 0 {
                st.removed += 1;
                maps.masks
                    .set(u32::from(i), 0, 0)
                    .map_err(merr("clear", maps::MASKS, format!("index {i}")))?;
                shadow.palette.release(i);
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        shadow.stale = candidates
            .into_iter()
            .filter(|&i| free(i, &shadow.refs) && shadow.palette.masks[usize::from(i)] != 0)
            .collect();
    }
    Ok(st)
}

/// The error of a write that found no free block (checked before writing
/// in a full sync; a delta that meets it falls back to one).
fn blocks_full(maps: &Maps) -> String {
    format!(
        "IPv4 /16s holding more than one verdict (map RG_TBL24): all {} blocks in use",
        maps.tbl24.capacity()
    )
}

fn sub_name(key: u32) -> String {
    let [a, b, c, d] = (key << 4).to_be_bytes();
    format!("block {a}.{b}.{c}.{d}/28")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Guard, Mode};

    fn policy(guards: &[&[u16]]) -> Policy {
        let mut cfg = Config::parse(
            std::path::Path::new("/nonexistent/t.toml"),
            "interfaces = [\"lo\"]\n[[guard]]\nports = [25]\n",
        )
        .expect("valid");
        cfg.mode = Mode::Enforce;
        cfg.guards = guards
            .iter()
            .enumerate()
            .map(|(i, ports)| Guard {
                name: format!("g{i}"),
                ports: ports.to_vec(),
                entries: Vec::new(),
            })
            .collect();
        Policy::compile(&cfg)
    }

    fn active(ports: &[(u16, u8)]) -> BTreeMap<u16, u8> {
        ports.iter().copied().collect()
    }

    #[test]
    fn a_guard_keeps_its_bit_while_it_keeps_its_ports() {
        // relay (25) on bit 0; a guard inserted above it, another below.
        let (bits, keep) = assign_bits(&active(&[(25, 0)]), &policy(&[&[587], &[25], &[2525]]), false).expect("room");
        assert_eq!((bits[1], keep), (0, 0));
        assert!(bits[0] != 0 && bits[2] != 0 && bits[0] != bits[2]);
        // Reordered: both keep their bits.
        let (bits, keep) = assign_bits(&active(&[(25, 0), (587, 3)]), &policy(&[&[587], &[25]]), false).expect("room");
        assert_eq!((bits, keep), (vec![3, 0], 0));
        // A port moves to another guard: the bit it tested keeps its meaning until the switch.
        let (bits, keep) = assign_bits(&active(&[(25, 0), (587, 0)]), &policy(&[&[25], &[587]]), false).expect("room");
        assert_eq!(keep, 1);
        assert!(!bits.contains(&0));
        // A removed guard's bit is kept; a guard that gains a port keeps its bit.
        let (bits, keep) = assign_bits(&active(&[(25, 0), (587, 1)]), &policy(&[&[25, 465]]), false).expect("room");
        assert_eq!((bits, keep), (vec![0], 1 << 1));
        // A mode change moves every guard.
        let (bits, keep) = assign_bits(&active(&[(25, 0)]), &policy(&[&[25]]), true).expect("room");
        assert_eq!((bits, keep), (vec![1], 1));
    }

    #[test]
    fn running_out_of_bits_is_an_error_before_any_write() {
        let old: Vec<(u16, u8)> = (0..40u8).map(|b| (1000 + u16::from(b), b)).collect();
        let ports: Vec<Vec<u16>> = (0..30u16).map(|i| vec![3000 + i]).collect();
        let refs: Vec<&[u16]> = ports.iter().map(Vec::as_slice).collect();
        let e = assign_bits(&active(&old), &policy(&refs), false).expect_err("40 kept + 30 new > 64");
        assert!(e.to_string().contains("need a new bit"), "{e}");
    }
}
