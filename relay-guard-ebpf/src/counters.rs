//! Per-CPU counters in a flat array (an inlined lookup, no hashing): every
//! judged or malformed packet passes through [`record`] exactly once, on the
//! single exit path. The agent decodes slots back to labels.
use aya_ebpf::programs::XdpContext;

use crate::{COUNTERS, IFACES};

/// The counter slot of the packet's interface (0 when it has none).
#[inline(always)]
pub fn iface_slot(ctx: &XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    match IFACES.get(ifindex & 0xffff) {
        Some(e) if e.ifindex == ifindex => e.slot,
        _ => 0,
    }
}

/// Adds one to counter `index` on this CPU. Per-CPU values need no atomics:
/// XDP runs in softirq, one packet at a time per CPU.
#[inline(always)]
pub fn record(index: u32) {
    if let Some(v) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a live array element.
        unsafe { *v += 1 };
    }
}
