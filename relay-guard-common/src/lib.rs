//! The contract between relay-guard's XDP program and its agent.
//!
//! Everything the two sides must agree on byte for byte lives here: map
//! names, capacities, and the `#[repr(C)]` key and value layouts. The crate
//! is `no_std` and has no dependencies except `aya` behind the `user` feature
//! (which adds `aya::Pod` impls). Padding is explicit and must be zero; sizes
//! are checked at compile time so a layout change cannot slip through.
#![no_std]

use core::mem::size_of;

/// Map names as they appear in the object file and under the pin directory.
///
/// `#[map]` in the eBPF crate needs literals, so a userspace test checks that
/// every name in [`maps::ALL`] exists in the built object.
pub mod maps {
    /// `Array<GuardedPort>` indexed by TCP destination port (host order).
    pub const PORTS: &str = "RG_PORTS";
    /// `LpmTrie<[u8; 4], AllowMask>`: IPv4 prefixes of every guard.
    pub const PREFIXES_V4: &str = "RG_PREFIXES_V4";
    /// `LpmTrie<[u8; 16], AllowMask>`: IPv6 prefixes of every guard.
    pub const PREFIXES_V6: &str = "RG_PREFIXES_V6";
    /// `PerCpuHashMap<CounterKey, u64>`: packets per verdict.
    pub const COUNTERS: &str = "RG_COUNTERS";
    /// `Array<Settings>` with one entry: knobs that change at run time.
    pub const SETTINGS: &str = "RG_SETTINGS";
    /// `LruHashMap<SourceKey, SourceStats>`: recently blocked sources, for `top`.
    pub const SOURCES: &str = "RG_SOURCES";
    /// Every map the program must define (and the agent pins).
    pub const ALL: &[&str] = &[PORTS, PREFIXES_V4, PREFIXES_V6, COUNTERS, SETTINGS, SOURCES];
}

/// Version of the map layout. Pinned state lives under `layout-<N>/`, so an
/// agent never opens maps whose layout it does not know. Bump it whenever a
/// map's name, type, key, value or capacity changes.
pub const LAYOUT_VERSION: u32 = 1;

/// Number of entries in [`maps::PORTS`]: one per TCP port.
pub const PORT_SLOTS: u32 = 65_536;
/// Guards are bits of [`AllowMask::allow`].
pub const MAX_GUARDS: usize = 64;
/// Capacity of each LPM trie.
pub const MAX_PREFIXES: u32 = 1 << 20;
/// Capacity of the counter map: interfaces x guarded ports x families x verdicts.
pub const MAX_COUNTERS: u32 = 16_384;

/// Capacity of the blocked-source LRU map.
pub const MAX_SOURCES: u32 = 65_536;
/// At most one log event per blocked source per this many nanoseconds.
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;

/// Verdicts recorded in [`CounterKey::verdict`].
pub mod verdict {
    /// Source allowed: the packet passed.
    pub const PASSED: u8 = 0;
    /// Source not allowed, enforce mode: dropped.
    pub const DROPPED: u8 = 1;
    /// Source not allowed, monitor mode: passed but counted.
    pub const WOULD_DROP: u8 = 2;
    /// Malformed IP/TCP in enforce mode: dropped. Port and guard are zero.
    pub const MALFORMED_DROPPED: u8 = 3;
    /// Malformed IP/TCP in monitor mode: passed. Port and guard are zero.
    pub const MALFORMED_PASSED: u8 = 4;
}

/// Address families recorded in [`CounterKey::family`].
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
    /// Malformed packets whose family could not be told.
    pub const UNKNOWN: u8 = 0;
}

/// Values of [`Settings::mode`]. Zero is enforce, so an unset map fails closed.
pub mod mode {
    pub const ENFORCE: u32 = 0;
    pub const MONITOR: u32 = 1;
}

/// Value of [`maps::PORTS`]: which guard owns the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardedPort {
    /// 1 when the port is guarded; 0 (the zeroed default) leaves it alone.
    pub active: u8,
    /// Index of the owning guard: the bit to test in [`AllowMask::allow`].
    pub guard: u8,
    /// Must be zero.
    pub _pad: [u8; 2],
}

/// Value of the LPM tries.
///
/// Compiled so that for the longest stored prefix P that contains an address,
/// bit `g` is set exactly when guard `g`'s own longest entry containing P is
/// an allow entry. One lookup then answers every guard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowMask {
    /// Bit `g` set: guard `g` allows this prefix.
    pub allow: u64,
}

/// Key of [`maps::COUNTERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// Interface the packet arrived on (`ingress_ifindex`).
    pub ifindex: u32,
    /// TCP destination port, host order; 0 for malformed packets.
    pub port: u16,
    /// Guard index; 0 for malformed packets.
    pub guard: u8,
    /// One of [`family`].
    pub family: u8,
    /// One of [`verdict`].
    pub verdict: u8,
    /// Must be zero: the kernel hashes every byte of the key.
    pub _pad: [u8; 3],
}

/// Key of [`maps::SOURCES`]: a blocked source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    /// Network byte order; IPv4 uses the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
    /// One of [`family`].
    pub family: u8,
    /// Must be zero: the kernel hashes every byte of the key.
    pub _pad: [u8; 3],
}

/// Value of [`maps::SOURCES`]. Shared by all CPUs and updated without
/// atomics (last writer wins; a rare concurrent increment may be lost): it
/// ranks sources for `top`; exact totals are in [`maps::COUNTERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Packets from this source judged not allowed (dropped or would_drop).
    pub packets: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last such packet.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` of the last log event for this source.
    pub last_event_ns: u64,
    /// Destination port of the last such packet (host order).
    pub last_port: u16,
    /// Guard of the last such packet.
    pub last_guard: u8,
    /// Verdict of the last such packet ([`verdict::DROPPED`] or [`verdict::WOULD_DROP`]).
    pub last_verdict: u8,
    /// Must be zero.
    pub _pad: [u8; 4],
}

/// Value of [`maps::SETTINGS`] (one entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// One of [`mode`].
    pub mode: u32,
}

/// IPv4 LPM key data: the address in network byte order (LPM compares MSB-first).
pub type V4Addr = [u8; 4];
/// IPv6 LPM key data: the address in network byte order.
pub type V6Addr = [u8; 16];

const _: () = assert!(size_of::<GuardedPort>() == 4);
const _: () = assert!(size_of::<AllowMask>() == 8);
const _: () = assert!(size_of::<CounterKey>() == 12);
const _: () = assert!(size_of::<Settings>() == 4);
const _: () = assert!(size_of::<SourceKey>() == 20);
const _: () = assert!(size_of::<SourceStats>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made of integers, with explicit padding.
    unsafe impl aya::Pod for super::GuardedPort {}
    unsafe impl aya::Pod for super::AllowMask {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SourceStats {}
}
