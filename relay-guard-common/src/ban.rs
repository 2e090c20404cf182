//! Bans (SPEC.md "Bans"): the maps' layouts and the pre-filter's hashing,
//! shared by the XDP program and the agent.
//!
//! A packet to a port of [`super::maps::BAN_PORTS`] whose entry names a ban
//! section is checked in three steps: one bit of [`super::maps::BAN_FILTER`]
//! (an array read: clear for almost every source that is not banned, so the
//! guarded SYN path pays one array read), then the family's LPM trie
//! ([`super::maps::BAN_V4`], [`super::maps::BAN_V6`]), then the clock: a
//! ban is in force while `bpf_ktime_get_boot_ns()` is below its expiry.
//!
//! The clock is CLOCK_BOOTTIME: it keeps counting while the machine is
//! suspended (a one-hour ban lasts one hour of wall time), it does not jump
//! with the wall clock (NTP steps, the admin's `date`), and it restarts at
//! boot, which is why the agent saves bans with wall-clock expiry in
//! `state_dir` and converts at restore.

/// Most `[[ban]]` sections: slots of [`BanEntry::expires_ns`].
pub const MAX_BANS: usize = 8;

/// Counter port slots of the ban counters: slot 0 counts ports without one.
pub const BAN_PORT_SLOTS: u32 = 64;

/// Verdict slots of the ban counters: [`BANNED`] and [`WOULD_DROP`].
pub const BAN_VERDICT_SLOTS: u32 = 2;
/// Dropped: the source is banned from this port.
pub const BANNED: u8 = 0;
/// Monitor mode: would have been dropped as banned.
pub const WOULD_DROP: u8 = 1;

/// Entries of [`super::maps::BAN_COUNTERS`].
pub const BAN_COUNTER_ENTRIES: u32 = super::IFACE_SLOTS * MAX_BANS as u32 * BAN_PORT_SLOTS * 2 * BAN_VERDICT_SLOTS;

/// Index into [`super::maps::BAN_COUNTERS`]; out-of-range slots fold into 0.
#[inline(always)]
pub const fn ban_counter_index(iface_slot: u32, ban: u32, port_slot: u32, v6: bool, verdict: u8) -> u32 {
    let i = if iface_slot < super::IFACE_SLOTS { iface_slot } else { 0 };
    let b = if ban < MAX_BANS as u32 { ban } else { 0 };
    let p = if port_slot < BAN_PORT_SLOTS { port_slot } else { 0 };
    let v = if (verdict as u32) < BAN_VERDICT_SLOTS {
        verdict as u32
    } else {
        0
    };
    (((i * MAX_BANS as u32 + b) * BAN_PORT_SLOTS + p) * 2 + v6 as u32) * BAN_VERDICT_SLOTS + v
}

/// Value of [`super::maps::BAN_PORTS`] (indexed by TCP destination port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanPort {
    /// Bit `b`: ban section `b` covers this port. 0: no ban check at all.
    pub sections: u8,
    /// Counter port slot (1..[`BAN_PORT_SLOTS`]), 0: none.
    pub slot: u8,
    /// Must be zero.
    pub _pad: u16,
}

/// Value of the LPM tries: per ban section, when its ban of this prefix
/// ends (CLOCK_BOOTTIME ns; 0: no ban from that section).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanEntry {
    pub expires_ns: [u64; MAX_BANS],
    /// The entry's own prefix length: a lookup that finds a prefix whose
    /// bans do not apply retries with a shorter one.
    pub len: u32,
    /// Must be zero.
    pub _pad: u32,
}

/// Capacity of each LPM trie (allocated on demand).
pub const MAX_BAN_ENTRIES: u32 = 1 << 20;

/// Entries (`u64` words) of [`super::maps::BAN_FILTER`]: `2^24` bits for
/// IPv4 (one per /24) then `2^24` for IPv6 (a hash of the first 48 bits).
pub const FILTER_WORDS: u32 = 1 << 19;
/// Shortest IPv4 ban: a ban shorter than /24 sets `2^(24 - len)` bits.
pub const MIN_V4_LEN: u8 = 8;
/// Shortest IPv6 ban: a ban shorter than /48 sets `2^(48 - len)` bits.
pub const MIN_V6_LEN: u8 = 32;

/// Filter bit of an IPv4 address (network-order bytes): its /24.
#[inline(always)]
pub const fn filter_bit_v4(a: [u8; 4]) -> u32 {
    ((a[0] as u32) << 16) | ((a[1] as u32) << 8) | a[2] as u32
}

/// Filter bit of an IPv6 address whose first 64 bits are `hi`: a
/// multiplicative hash of its first 48 bits, in the upper half.
#[inline(always)]
pub const fn filter_bit_v6(hi: u64) -> u32 {
    (1 << 24) | ((hi >> 16).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as u32
}

/// Most retries of a trie lookup with a shorter prefix (nested bans).
pub const MAX_NESTED: u32 = 4;

const _: () = assert!(core::mem::size_of::<BanPort>() == 4);
const _: () = assert!(core::mem::size_of::<BanEntry>() == 72);
const _: () = assert!(MAX_BANS <= 8, "BanPort::sections is a u8");
const _: () = assert!(ban_counter_index(15, 7, 63, true, 1) == BAN_COUNTER_ENTRIES - 1);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, explicit zero padding.
    unsafe impl aya::Pod for super::BanPort {}
    unsafe impl aya::Pod for super::BanEntry {}
}
