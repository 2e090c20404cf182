//! relay-guard's XDP program: drops TCP segments to guarded ports whose
//! source is not allowed by the owning guard.
//!
//! Flow: parse (eth → ipv4/ipv6 → tcp) → verdict (port → guard → table) →
//! one exit that counts and maps to an action. There are three outcomes, kept
//! apart: not ours (pass, uncounted), a judged verdict, and malformed (drop in
//! enforce mode, pass in monitor mode, counted either way). Nothing fails open.
#![no_std]
#![no_main]

mod counters;
mod cursor;
mod eth;
mod ipv4;
mod ipv6;
mod sources;
mod tcp;
mod verdict;

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
    COUNTER_ENTRIES, GuardedPort, IFACE_TABLE, IfaceSlot, LongBlock, MAX_LONG_BLOCKS, MAX_MASKS, PORT_SLOTS,
    SOURCE_SLOTS, Settings, SourceKey, SourceStats, TBL24_ENTRIES, V6Leaf, V6Node, counter_index, family, mode,
    v6 as trie, verdict as v,
};

use crate::cursor::{Cursor, Stop};

// ---- Maps (names must match relay_guard_common::maps) ----

#[map(name = "RG_PORTS")]
static PORTS: Array<GuardedPort> = Array::with_max_entries(PORT_SLOTS, 0);

/// mmapable, so the agent writes the 16M-block table directly, not by syscall.
#[map(name = "RG_TBL24")]
static TBL24: Array<[u16; 4]> = Array::with_max_entries(TBL24_ENTRIES, BPF_F_MMAPABLE);

#[map(name = "RG_LONG24")]
static LONG24: HashMap<u32, LongBlock> = HashMap::with_max_entries(MAX_LONG_BLOCKS, BPF_F_NO_PREALLOC);

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

// ---- Entry ----

/// A TCP segment to a guarded port, judged.
struct Judged {
    port: u16,
    /// Counter slot of the port.
    slot: u16,
    guard: u8,
    family: u8,
    allowed: bool,
    /// Source address, network order; IPv4 in the first 4 bytes.
    src: [u8; 16],
}

/// `frags`: the program declares multi-buffer support, so it attaches to
/// jumbo-MTU interfaces; it reads headers in the first buffer only.
#[xdp(frags)]
pub fn relay_guard(ctx: XdpContext) -> u32 {
    match judge(&ctx) {
        Err(Stop::NotOurs) => XDP_PASS,
        Err(Stop::Malformed(fam)) => {
            let verdict = if monitor() {
                v::MALFORMED_PASSED
            } else {
                v::MALFORMED_DROPPED
            };
            exit(&ctx, 0, fam, verdict)
        }
        Ok(j) => {
            let verdict = match (j.allowed, monitor()) {
                (true, _) => v::PASSED,
                (false, true) => v::WOULD_DROP,
                (false, false) => v::DROPPED,
            };
            if !j.allowed {
                let src = SourceKey {
                    addr: j.src,
                    family: j.family,
                    _pad: [0; 3],
                };
                sources::record(&ctx, &src, j.port, j.guard, verdict);
            }
            exit(&ctx, u32::from(j.slot), j.family, verdict)
        }
    }
}

#[inline(always)]
fn monitor() -> bool {
    matches!(SETTINGS.get(0), Some(s) if s.mode == mode::MONITOR)
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

#[inline(always)]
fn judge(ctx: &XdpContext) -> Result<Judged, Stop> {
    let mut c = Cursor::new(ctx);
    match eth::parse_eth(&mut c)? {
        eth::ETH_P_IP => {
            let src = ipv4::parse_ipv4(&mut c)?;
            let port = tcp::parse_tcp(&mut c, family::IPV4)?;
            let gp = verdict::guard_of(port).ok_or(Stop::NotOurs)?;
            let mut addr = [0u8; 16];
            addr[0] = src[0];
            addr[1] = src[1];
            addr[2] = src[2];
            addr[3] = src[3];
            let allowed = verdict::allowed_v4(src, gp.guard);
            Ok(Judged {
                port,
                slot: gp.slot,
                guard: gp.guard,
                family: family::IPV4,
                allowed,
                src: addr,
            })
        }
        eth::ETH_P_IPV6 => {
            let src = ipv6::parse_ipv6(&mut c)?;
            let port = tcp::parse_tcp(&mut c, family::IPV6)?;
            let gp = verdict::guard_of(port).ok_or(Stop::NotOurs)?;
            let allowed = verdict::allowed_v6(src, gp.guard);
            Ok(Judged {
                port,
                slot: gp.slot,
                guard: gp.guard,
                family: family::IPV6,
                allowed,
                src,
            })
        }
        _ => Err(Stop::NotOurs),
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
