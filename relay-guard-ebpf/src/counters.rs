//! Per-CPU counters. Every judged or malformed packet passes through
//! [`record`] exactly once, on the single exit path.
use aya_ebpf::bindings::BPF_NOEXIST;
use relay_guard_common::CounterKey;

use crate::COUNTERS;

/// Adds one to the counter at `key` on this CPU.
///
/// Per-CPU values need no atomics: XDP runs in softirq, one packet at a time
/// per CPU. A missing key is created with `BPF_NOEXIST`; if another CPU
/// created it first, the second lookup finds it.
#[inline(always)]
pub fn record(key: &CounterKey) {
    if let Some(v) = COUNTERS.get_ptr_mut(key) {
        // SAFETY: the pointer is this CPU's slot of a live map value.
        unsafe { *v += 1 };
        return;
    }
    if COUNTERS.insert(key, &1, u64::from(BPF_NOEXIST)).is_err()
        && let Some(v) = COUNTERS.get_ptr_mut(key)
    {
        // SAFETY: as above.
        unsafe { *v += 1 };
    }
}
