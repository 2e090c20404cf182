//! Per-source accounting of blocked packets (for `relay-guard top`) and a
//! rate-limited log event per blocked source. Only the not-allowed path
//! comes here, never every packet.
//!
//! A per-CPU direct-mapped cache, not a shared LRU hash: an inlined array
//! lookup and no cross-CPU cache-line traffic keep the cost of a dropped
//! packet low under a flood. A slot holds one source at a time (a colliding
//! source takes it over), so `top` ranks recent heavy hitters; the exact
//! totals are the counters. Events: at most one per slot per CPU per
//! [`EVENT_INTERVAL_NS`]; the agent merges CPUs so it logs a source at most
//! once a second.
//!
//! Cost on the drop path: the address is compared as two 64-bit words (an
//! IPv4 source is one 32-bit word and a zero), and the clock is read only
//! when the tick (`bpf_jiffies64`, which the verifier inlines to one load)
//! has moved on since the slot last read it. The coarse clock advances only
//! at a tick, so `last_seen_ns` (and the one-second event limit) stays within
//! a tick of reading the clock on every packet.
use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use aya_log_ebpf::info;
use relay_guard_common::{EVENT_INTERVAL_NS, family, source_slot_v4, source_slot_v6, verdict};

use crate::{SOURCES, ipv6::V6Src};

/// A not-allowed IPv4 source (network order).
#[inline(always)]
pub fn record_v4(ctx: &XdpContext, src: [u8; 4], port: u16, guard: u8, v: u8) {
    let w = u32::from_ne_bytes(src);
    if touch(source_slot_v4(w), u64::from(w), 0, family::IPV4, port, guard, v) {
        info!(ctx, "{} {:i} -> port {} (guard bit {})", what(v), src, port, guard);
    }
}

/// A not-allowed IPv6 source (network order).
#[inline(always)]
pub fn record_v6(ctx: &XdpContext, src: &V6Src, port: u16, guard: u8, v: u8) {
    let [w0, w1] = src.0;
    if touch(source_slot_v6(w0, w1), w0, w1, family::IPV6, port, guard, v) {
        info!(
            ctx,
            "{} {:i} -> port {} (guard bit {})",
            what(v),
            src.bytes(),
            port,
            guard
        );
    }
}

#[inline(always)]
fn what(v: u8) -> &'static str {
    if v == verdict::WOULD_DROP {
        "would drop"
    } else {
        "dropped"
    }
}

/// Counts the packet in the source's slot (taking the slot over when another
/// source holds it). `w0`, `w1`: the address bytes as native-order words.
/// Returns whether a log event is due.
#[inline(always)]
fn touch(slot: u32, w0: u64, w1: u64, fam: u8, port: u16, guard: u8, v: u8) -> bool {
    let Some(s) = SOURCES.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: a helper without arguments; the verifier inlines it.
    let tick = unsafe { bpf_jiffies64() };
    // SAFETY: `s` is this CPU's slot of a live array element; XDP runs one
    // packet at a time per CPU, so nothing else writes it meanwhile. The
    // address is 8-aligned inside the value (checked in relay-guard-common).
    unsafe {
        let addr = (*s).source.addr.as_mut_ptr().cast::<u64>();
        if *addr == w0 && *addr.add(1) == w1 && (*s).source.family == fam {
            (*s).packets += 1;
        } else {
            *addr = w0;
            *addr.add(1) = w1;
            (*s).source.family = fam;
            (*s).packets = 1;
            (*s).last_event_ns = 0;
            (*s).last_tick = tick.wrapping_sub(1);
        }
        (*s).last_port = port;
        (*s).last_guard = guard;
        (*s).last_verdict = v;
        if (*s).last_tick == tick {
            // Same tick: the coarse clock has not moved since the last read.
            return false;
        }
        // SAFETY: a helper without arguments.
        let now = bpf_ktime_get_coarse_ns();
        (*s).last_tick = tick;
        (*s).last_seen_ns = now;
        let due = (*s).last_event_ns == 0 || now.wrapping_sub((*s).last_event_ns) >= EVENT_INTERVAL_NS;
        if due {
            (*s).last_event_ns = now;
        }
        due
    }
}
