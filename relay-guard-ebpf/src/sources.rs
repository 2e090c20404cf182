//! Per-source accounting of blocked packets (for `relay-guard top`) and a
//! rate-limited log event per blocked source: at most one per source per
//! [`EVENT_INTERVAL_NS`] (two CPUs racing on one source may both log once).
//! Only the not-allowed path comes here, never every packet.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, programs::XdpContext};
use aya_log_ebpf::info;
use relay_guard_common::{EVENT_INTERVAL_NS, SourceKey, SourceStats, family, verdict};

use crate::SOURCES;

#[inline(always)]
pub fn record(ctx: &XdpContext, key: &SourceKey, port: u16, guard: u8, v: u8) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let log = match SOURCES.get_ptr_mut(key) {
        Some(s) => {
            // SAFETY: `s` points at a live value of the LRU map. The bpfel
            // target has no atomic fetch_add in Rust, so two CPUs counting
            // the same source at the same instant may lose an increment:
            // `top` is a ranking, and the exact totals are the per-CPU counters.
            unsafe {
                (*s).packets += 1;
                (*s).last_seen_ns = now;
                (*s).last_port = port;
                (*s).last_guard = guard;
                (*s).last_verdict = v;
                if now.wrapping_sub((*s).last_event_ns) >= EVENT_INTERVAL_NS {
                    (*s).last_event_ns = now;
                    true
                } else {
                    false
                }
            }
        }
        None => {
            let stats = SourceStats {
                packets: 1,
                last_seen_ns: now,
                last_event_ns: now,
                last_port: port,
                last_guard: guard,
                last_verdict: v,
                _pad: [0; 4],
            };
            // Another CPU may have inserted it first: then it logged.
            SOURCES.insert(key, &stats, u64::from(BPF_NOEXIST)).is_ok()
        }
    };
    if log {
        let what = if v == verdict::WOULD_DROP { "would drop" } else { "dropped" };
        if key.family == family::IPV4 {
            let a = [key.addr[0], key.addr[1], key.addr[2], key.addr[3]];
            info!(ctx, "{} {:i} -> port {} (guard {})", what, a, port, guard);
        } else {
            info!(ctx, "{} {:i} -> port {} (guard {})", what, key.addr, port, guard);
        }
    }
}
