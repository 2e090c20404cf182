//! Per-source accounting of blocked packets (for `relay-guard top`) and a
//! rate-limited log event per blocked source. Only the not-allowed path
//! comes here, never every packet.
//!
//! A per-CPU direct-mapped cache, not a shared LRU hash: an inlined array
//! lookup and no cross-CPU cache-line traffic keep the cost of a dropped
//! packet low under a flood. A slot holds one source at a time (a colliding
//! source takes it over), so `top` ranks recent heavy hitters; the exact
//! totals are the counters.
//!
//! Events are bounded in total, whatever the number of sources: at most one
//! per slot per CPU per [`EVENT_INTERVAL_NS`] (a source taking a slot over
//! keeps the slot's last event time, so churn cannot make it emit), and only
//! with a token from the CPU's bucket in `RG_EVENTS` (10 a second, bursts of
//! [`EVENT_BURST`]), which counts what it refuses. The
//! agent merges CPUs, logs a source at most once a second and at most 10
//! lines a second in all.
//!
//! Cost on the drop path: the address is compared as two 64-bit words (an
//! IPv4 source is one 32-bit word and a zero), and the clock is read only
//! when the tick (`bpf_jiffies64`, which the verifier inlines to one load)
//! has moved on since the slot last read it; the bucket is read only when a
//! slot's event is due (at most once a second per slot), so `last_seen_ns`
//! (and the one-second event limit) stays within a tick of reading the
//! clock on every packet. The clock is `bpf_ktime_get_ns` (CLOCK_MONOTONIC,
//! every kernel), not the coarse one (5.11, which 5.10 lacks); it is read
//! at most once a tick per slot, as the coarse one was.
use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    programs::XdpContext,
};
use aya_log_ebpf::info;
use relay_guard_common::{
    EVENT_BURST, EVENT_COST_NS, EVENT_INTERVAL_NS, family, source_slot_v4, source_slot_v6, verdict,
};

use crate::{EVENTS, SOURCES, ipv6::V6Src};

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
/// Returns whether a log event is due and the CPU's bucket allows it.
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
            // `last_event_ns` stays: the limit belongs to the slot, so a
            // flood of new sources taking slots over emits no more than
            // one that keeps them.
            (*s).last_tick = tick.wrapping_sub(1);
        }
        (*s).last_port = port;
        (*s).last_guard = guard;
        (*s).last_verdict = v;
        if (*s).last_tick == tick {
            // Same tick: the clock was read in this tick already.
            return false;
        }
        // SAFETY: a helper without arguments.
        let now = bpf_ktime_get_ns();
        (*s).last_tick = tick;
        (*s).last_seen_ns = now;
        if (*s).last_event_ns != 0 && now.wrapping_sub((*s).last_event_ns) < EVENT_INTERVAL_NS {
            return false;
        }
        // The slot asks the bucket at most once an interval, allowed or not.
        (*s).last_event_ns = now;
        take_token(now)
    }
}

/// This CPU's event bucket (GCRA: one `u64` of state): at most
/// [`EVENT_BURST`] events at once and one per [`EVENT_COST_NS`] after that
/// (10 a second), whatever the number of sources. Reached only when a
/// slot's event is due, never on the allowed path. A refused event is
/// counted.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(b) = EVENTS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's element of a live array; XDP does not re-enter on a
    // CPU, so nothing else writes it meanwhile.
    unsafe {
        // When the bucket would be full again if nothing more were taken.
        let full_at = if (*b).next_ns > now { (*b).next_ns } else { now };
        if full_at - now > (EVENT_BURST - 1) * EVENT_COST_NS {
            (*b).suppressed += 1;
            return false;
        }
        (*b).next_ns = full_at + EVENT_COST_NS;
        true
    }
}
