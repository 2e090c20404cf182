//! Bans (SPEC.md "Bans"; layouts in `relay_guard_common::ban`): a banned
//! source's TCP packets to its ban's ports are dropped, whatever a guard
//! says, until the ban's expiry on CLOCK_BOOTTIME passes. The kernel decides
//! expiry, so bans lift on time with the agent down.
//!
//! Cost for a packet that is not banned: one array read (the port's ban
//! sections; none: done) and, for a covered port, one more (the source's
//! pre-filter bit, clear unless a ban shares its /24 or its IPv6 hash
//! bucket). Only a set bit reads the LPM trie and the clock, out of line.
use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use relay_guard_common::{
    PORT_SLOTS,
    ban::{
        BAN_COUNTER_ENTRIES, BANNED, BanEntry, BanPort, FILTER_WORDS, MAX_BAN_ENTRIES, MAX_BANS, MAX_NESTED,
        WOULD_DROP, ban_counter_index, filter_bit_v4, filter_bit_v6,
    },
};

use crate::{counters, generation, ipv6::V6Src, monitor};

#[map(name = "RG_BAN_PORTS")]
static BAN_PORTS: Array<BanPort> = Array::with_max_entries(PORT_SLOTS, 0);

/// mmapable: the agent and the CLI set bits with atomic ORs in memory.
#[map(name = "RG_BAN_FILTER")]
static BAN_FILTER: Array<u64> = Array::with_max_entries(FILTER_WORDS, BPF_F_MMAPABLE);

#[map(name = "RG_BAN_V4")]
static BAN_V4: LpmTrie<[u8; 4], BanEntry> = LpmTrie::with_max_entries(MAX_BAN_ENTRIES, 0);

#[map(name = "RG_BAN_V6")]
static BAN_V6: LpmTrie<[u8; 16], BanEntry> = LpmTrie::with_max_entries(MAX_BAN_ENTRIES, 0);

#[map(name = "RG_BAN_COUNTERS")]
static BAN_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BAN_COUNTER_ENTRIES, 0);

/// No ban applies (a section index is below [`MAX_BANS`]).
const NONE: u32 = u32::MAX;

/// The ban sections covering `port` (0: none) and its counter slot.
#[inline(always)]
fn covering(port: u16) -> BanPort {
    match BAN_PORTS.get(u32::from(port)) {
        Some(e) => *e,
        None => BanPort::default(),
    }
}

#[inline(always)]
fn filter_hit(bit: u32) -> bool {
    match BAN_FILTER.get(bit >> 6) {
        Some(w) => (*w >> (bit & 63)) & 1 == 1,
        None => false,
    }
}

/// The section (of `sections`) with a ban in force in `e`, or [`NONE`].
#[inline(always)]
fn in_force(e: &BanEntry, sections: u8, now: u64) -> u32 {
    let mut b = 0;
    while b < MAX_BANS {
        if (sections >> b) & 1 == 1 && e.expires_ns[b] > now {
            return b as u32;
        }
        b += 1;
    }
    NONE
}

/// `Some(action)` when an IPv4 source is banned from `port`.
#[inline(always)]
pub fn judge_v4(ctx: &XdpContext, src: [u8; 4], port: u16) -> Option<u32> {
    let bp = covering(port);
    if bp.sections == 0 || !filter_hit(filter_bit_v4(src)) {
        return None;
    }
    let ban = lookup_v4(u32::from_ne_bytes(src), u32::from(bp.sections));
    if ban == NONE {
        return None;
    }
    Some(banned(ctx, ban, u32::from(bp.slot), false))
}

/// `Some(action)` when an IPv6 source is banned from `port`.
#[inline(always)]
pub fn judge_v6(ctx: &XdpContext, src: &V6Src, port: u16) -> Option<u32> {
    let bp = covering(port);
    if bp.sections == 0 || !filter_hit(filter_bit_v6(u64::from_be(src.0[0]))) {
        return None;
    }
    let ban = lookup_v6(src, u32::from(bp.sections));
    if ban == NONE {
        return None;
    }
    Some(banned(ctx, ban, u32::from(bp.slot), true))
}

/// The trie walk: the longest banned prefix holding `src`; when none of
/// its bans applies (another section's, or expired), the next shorter one,
/// up to [`MAX_NESTED`] prefixes.
#[inline(never)]
fn lookup_v4(src: u32, sections: u32) -> u32 {
    let data = src.to_ne_bytes();
    let mut len = 32u32;
    let mut now = 0u64;
    let mut i = 0;
    while i < MAX_NESTED {
        let Some(e) = BAN_V4.get(Key::new(len, data)) else {
            return NONE;
        };
        if now == 0 {
            // SAFETY: a helper without arguments.
            now = unsafe { bpf_ktime_get_boot_ns() };
        }
        let b = in_force(e, sections as u8, now);
        if b != NONE {
            return b;
        }
        if e.len == 0 || e.len > 32 {
            return NONE;
        }
        len = e.len - 1;
        i += 1;
    }
    NONE
}

#[inline(never)]
fn lookup_v6(src: &V6Src, sections: u32) -> u32 {
    let data = src.bytes();
    let mut len = 128u32;
    let mut now = 0u64;
    let mut i = 0;
    while i < MAX_NESTED {
        let Some(e) = BAN_V6.get(Key::new(len, data)) else {
            return NONE;
        };
        if now == 0 {
            // SAFETY: a helper without arguments.
            now = unsafe { bpf_ktime_get_boot_ns() };
        }
        let b = in_force(e, sections as u8, now);
        if b != NONE {
            return b;
        }
        if e.len == 0 || e.len > 128 {
            return NONE;
        }
        len = e.len - 1;
        i += 1;
    }
    NONE
}

/// Counts a banned packet (`banned`, or `would_drop` in monitor mode) and
/// returns its action.
#[inline(never)]
fn banned(ctx: &XdpContext, ban: u32, port_slot: u32, v6: bool) -> u32 {
    let monitor = monitor(generation());
    let verdict = if monitor { WOULD_DROP } else { BANNED };
    let index = ban_counter_index(counters::iface_slot(ctx), ban, port_slot, v6, verdict);
    if let Some(v) = BAN_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a live array element.
        unsafe { *v += 1 };
    }
    if monitor { XDP_PASS } else { XDP_DROP }
}
