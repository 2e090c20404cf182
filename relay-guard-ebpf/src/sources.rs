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
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use aya_log_ebpf::info;
use relay_guard_common::{EVENT_INTERVAL_NS, SourceKey, family, source_slot, verdict};

use crate::SOURCES;

#[inline(always)]
pub fn record(ctx: &XdpContext, key: &SourceKey, port: u16, guard: u8, v: u8) {
    let Some(s) = SOURCES.get_ptr_mut(source_slot(&key.addr)) else {
        return;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: `s` is this CPU's slot of a live array element; XDP runs one
    // packet at a time per CPU, so nothing else writes it meanwhile.
    let log = unsafe {
        let same = (*s).source.addr == key.addr && (*s).source.family == key.family;
        if same {
            (*s).packets += 1;
        } else {
            (*s).source = *key;
            (*s).packets = 1;
            (*s).last_event_ns = 0;
        }
        (*s).last_seen_ns = now;
        (*s).last_port = port;
        (*s).last_guard = guard;
        (*s).last_verdict = v;
        let due = (*s).last_event_ns == 0 || now.wrapping_sub((*s).last_event_ns) >= EVENT_INTERVAL_NS;
        if due {
            (*s).last_event_ns = now;
        }
        due
    };
    if log {
        let what = if v == verdict::WOULD_DROP {
            "would drop"
        } else {
            "dropped"
        };
        if key.family == family::IPV4 {
            let a = [key.addr[0], key.addr[1], key.addr[2], key.addr[3]];
            info!(ctx, "{} {:i} -> port {} (guard {})", what, a, port, guard);
        } else {
            info!(ctx, "{} {:i} -> port {} (guard {})", what, key.addr, port, guard);
        }
    }
}
