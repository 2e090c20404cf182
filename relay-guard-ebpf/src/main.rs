//! relay-guard's XDP program: drops TCP segments to guarded ports whose
//! source is not allowed by the owning guard.
//!
//! Flow: parse (eth → ipv4/ipv6 → tcp) → verdict (port → guard → table) →
//! one exit that counts and maps to an action. There are three outcomes, kept
//! apart: not ours (pass, uncounted), a judged verdict, and malformed (drop in
//! enforce mode, pass in monitor mode, counted either way). Nothing fails open.
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]

mod bans;
mod counters;
mod cursor;
mod eth;
mod ipv4;
mod ipv6;
mod sources;
mod tcp;
mod verdict;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use relay_guard_common::{
    COUNTER_ENTRIES, EventBudget, IFACE_TABLE, IfaceSlot, LONG24_OBJECT_ENTRIES, LongBlock, MAX_MASKS, PORT_SLOTS,
    PortEntry, SOURCE_SLOTS, Settings, SourceStats, TBL16_ENTRIES, TBL24_ENTRIES, V6Leaf, V6Node, counter_index,
    family, mode, v6 as trie, verdict as v,
};

use crate::cursor::{Cursor, Stop};

// ---- Maps (names must match relay_guard_common::maps) ----

#[map(name = "RG_PORTS")]
static PORTS: Array<PortEntry> = Array::with_max_entries(PORT_SLOTS, 0);

/// The IPv4 first level (see `relay_guard_common::maps::TBL16`); mmapable,
/// so the agent writes it directly, not by syscall.
#[map(name = "RG_TBL16")]
static TBL16: Array<[u32; 2]> = Array::with_max_entries(TBL16_ENTRIES, BPF_F_MMAPABLE);

/// Blocks of /24 entries for the /16s that are not uniform; sized by the agent.
#[map(name = "RG_TBL24")]
static TBL24: Array<[u16; 4]> = Array::with_max_entries(TBL24_ENTRIES, BPF_F_MMAPABLE);

/// The hosts of long /24s, a /28 at a time; sized by the agent.
#[map(name = "RG_LONG24")]
static LONG24: HashMap<u32, LongBlock> = HashMap::with_max_entries(LONG24_OBJECT_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "RG_MASKS")]
static MASKS: Array<u64> = Array::with_max_entries(MAX_MASKS, 0);

/// The IPv6 multibit trie (see `relay_guard_common::v6`), mmapable so the
/// agent writes it as memory.
#[map(name = "RG_V6_TOP")]
static V6_TOP: Array<[u32; 2]> = Array::with_max_entries(trie::TOP_ENTRIES, BPF_F_MMAPABLE);

#[map(name = "RG_V6_NODES")]
static V6_NODES: Array<V6Node> = Array::with_max_entries(trie::NODE_CAPACITY, BPF_F_MMAPABLE);

#[map(name = "RG_V6_LEAVES")]
static V6_LEAVES: Array<V6Leaf> = Array::with_max_entries(trie::LEAF_CAPACITY, BPF_F_MMAPABLE);

#[map(name = "RG_IFACES")]
static IFACES: Array<IfaceSlot> = Array::with_max_entries(IFACE_TABLE, 0);

#[map(name = "RG_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

#[map(name = "RG_SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "RG_SOURCES")]
static SOURCES: PerCpuArray<SourceStats> = PerCpuArray::with_max_entries(SOURCE_SLOTS, 0);

#[map(name = "RG_EVENTS")]
static EVENTS: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

// ---- Entry ----

/// `frags`: the program declares multi-buffer support, so it attaches to
/// jumbo-MTU interfaces; it reads headers in the first buffer only.
#[xdp(frags)]
pub fn relay_guard(ctx: XdpContext) -> u32 {
    judge(&ctx)
}

/// The same program without `xdp.frags`, for kernels older than 5.18 (they
/// refuse the flag): the agent loads this entry point where the kernel has
/// no multi-buffer XDP (`kernel::features` in the agent).
#[xdp]
pub fn relay_guard_sb(ctx: XdpContext) -> u32 {
    judge(&ctx)
}

/// Each family runs its own path to the exit, so the IPv4 path never carries
/// a 16-byte address; both end in the same counting [`exit`].
#[inline(always)]
fn judge(ctx: &XdpContext) -> u32 {
    let mut c = Cursor::new(ctx);
    match eth::parse_eth(&mut c) {
        Ok(eth::ETH_P_IP) => judge_v4(ctx, &mut c),
        Ok(eth::ETH_P_IPV6) => judge_v6(ctx, &mut c),
        Ok(_) => XDP_PASS,
        Err(stop) => stopped(ctx, stop),
    }
}

/// `?` for the parsers: on a [`Stop`], return its action from the caller.
macro_rules! parsed {
    ($ctx:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(stop) => return stopped($ctx, stop),
        }
    };
}

/// The action for a packet whose parse stopped: not ours passes uncounted;
/// malformed goes to [`malformed`].
#[inline(always)]
fn stopped(ctx: &XdpContext, stop: Stop) -> u32 {
    match stop {
        Stop::NotOurs => XDP_PASS,
        Stop::Malformed(fam) => malformed(ctx, fam),
    }
}

/// Malformed: dropped (passed in monitor mode) and counted. Out of line:
/// rare, and it keeps the judged paths short.
#[inline(never)]
fn malformed(ctx: &XdpContext, fam: u8) -> u32 {
    let verdict = if monitor(generation()) {
        v::MALFORMED_PASSED
    } else {
        v::MALFORMED_DROPPED
    };
    exit(ctx, 0, fam, verdict)
}

/// IPv4: parse, port, table lookup; only a source that is not allowed
/// reads the mode and touches the source cache.
#[inline(always)]
fn judge_v4(ctx: &XdpContext, c: &mut Cursor) -> u32 {
    let mut src = [0u8; 4];
    parsed!(ctx, ipv4::parse_ipv4(c, &mut src));
    let port = parsed!(ctx, tcp::parse_tcp(c, family::IPV4));
    if let Some(action) = bans::judge_v4(ctx, src, port) {
        return action;
    }
    let generation = generation();
    let Some(gp) = verdict::guard_of(port, generation) else {
        return XDP_PASS;
    };
    let slot = u32::from(gp.slot);
    if verdict::allowed_v4(src, gp.guard) {
        return exit(ctx, slot, family::IPV4, v::PASSED);
    }
    let verdict = not_allowed(generation);
    sources::record_v4(ctx, src, port, gp.guard, verdict);
    exit(ctx, slot, family::IPV4, verdict)
}

#[inline(always)]
fn judge_v6(ctx: &XdpContext, c: &mut Cursor) -> u32 {
    let mut src = MaybeUninit::uninit();
    parsed!(ctx, ipv6::parse_ipv6(c, &mut src));
    // SAFETY: parse_ipv6 succeeded, so it wrote all of `src`.
    let src = unsafe { src.assume_init() };
    let port = parsed!(ctx, tcp::parse_tcp(c, family::IPV6));
    if let Some(action) = bans::judge_v6(ctx, &src, port) {
        return action;
    }
    let generation = generation();
    let Some(gp) = verdict::guard_of(port, generation) else {
        return XDP_PASS;
    };
    let slot = u32::from(gp.slot);
    if verdict::allowed_v6(src.bytes(), gp.guard) {
        return exit(ctx, slot, family::IPV6, v::PASSED);
    }
    let verdict = not_allowed(generation);
    sources::record_v6(ctx, &src, port, gp.guard, verdict);
    exit(ctx, slot, family::IPV6, verdict)
}

/// The verdict for a source that is not allowed: dropped, or would_drop in
/// monitor mode.
#[inline(always)]
fn not_allowed(generation: usize) -> u8 {
    if monitor(generation) { v::WOULD_DROP } else { v::DROPPED }
}

/// The generation in force (see `Settings::generation`), read once per
/// packet: the port's owner and the mode then come from the same policy
/// even while the agent switches to another one.
#[inline(always)]
fn generation() -> usize {
    match SETTINGS.get(0) {
        // SAFETY: an aligned u32 of a live map value; one load.
        Some(s) => (unsafe { core::ptr::read_volatile(&s.generation) } & 1) as usize,
        None => 0,
    }
}

/// Whether `generation` runs in monitor mode (the modes of both
/// generations are written before the switch and stay put after it).
#[inline(always)]
fn monitor(generation: usize) -> bool {
    matches!(SETTINGS.get(0), Some(s) if s.modes[generation & 1] == mode::MONITOR)
}

/// The single exit for counted packets: count, then act on the verdict.
#[inline(always)]
fn exit(ctx: &XdpContext, port_slot: u32, fam: u8, verdict: u8) -> u32 {
    counters::record(counter_index(counters::iface_slot(ctx), port_slot, fam, verdict));
    match verdict {
        v::DROPPED | v::MALFORMED_DROPPED => XDP_DROP,
        _ => XDP_PASS,
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
