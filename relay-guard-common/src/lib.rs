//! The contract between relay-guard's XDP program and its agent.
//!
//! Everything the two sides must agree on byte for byte lives here: map
//! names, capacities, and the `#[repr(C)]` key and value layouts. The crate
//! is `no_std` and has no dependencies except `aya` behind the `user` feature
//! (which adds `aya::Pod` impls). Padding is explicit and must be zero; sizes
//! are checked at compile time so a layout change cannot slip through.
#![no_std]

use core::mem::size_of;

pub mod ban;
pub use ban::{BAN_PORT_SLOTS, MAX_BANS};

/// Map names as they appear in the object file and under the pin directory.
///
/// `#[map]` in the eBPF crate needs literals, so a userspace test checks that
/// every name in [`maps::ALL`] exists in the built object (relay-guard/tests/object.rs).
pub mod maps {
    /// `Array<PortEntry>` indexed by TCP destination port (host order): the
    /// port's owner in each generation (see [`super::Settings::generation`]).
    pub const PORTS: &str = "RG_PORTS";
    /// `Array<[u32; 2]>`, mmapable: the IPv4 first level, one `u32` per /16
    /// (slot `s` is lane `s & 1` of entry `s >> 1`). A value with
    /// [`super::TBL16_BLOCK`] set is the index of the /16's block of 256 /24
    /// entries in [`TBL24`]; any other value is the mask index every /24 of
    /// the /16 shares (0: deny).
    pub const TBL16: &str = "RG_TBL16";
    /// `Array<[u16; 4]>`, mmapable: blocks of 256 /24 entries, one block per
    /// /16 that is not uniform (/24 `c` of block `k` is lane `c & 3` of entry
    /// `k * 64 + c / 4`). A value is a mask index into [`MASKS`], or
    /// [`super::LONG_BLOCK`] when the /24 holds longer prefixes. Sized by the
    /// agent to the config's need (at most [`super::TBL24_ENTRIES`]).
    pub const TBL24: &str = "RG_TBL24";
    /// `HashMap<u32, LongBlock>`, sized by the agent: the hosts of the /24s
    /// marked [`super::LONG_BLOCK`] in [`TBL24`], 16 at a time. Key: the
    /// /28 (`addr >> 4`); value: one mask index per host. Only the /28s
    /// whose hosts are not all the /24's own mask (the low bits of its
    /// [`TBL24`] entry) are stored: a /24 holding one /32 costs one entry.
    pub const LONG24: &str = "RG_LONG24";
    /// `Array<u64>`: mask index → allow bits (bit g: guard g allows). Index 0
    /// is all zeros: no match, deny.
    pub const MASKS: &str = "RG_MASKS";
    /// `Array<[u32; 2]>`, mmapable: the IPv6 first level, one entry (see
    /// [`super::v6`]) per top 20 bits of the address (slot `s` is lane `s & 1`
    /// of entry `s >> 1`: array values are 8-byte aligned when mmapable).
    pub const V6_TOP: &str = "RG_V6_TOP";
    /// `Array<V6Node>`, mmapable: multibit-trie nodes, 16 entries (4 address
    /// bits) each. Index 0 is never a node.
    pub const V6_NODES: &str = "RG_V6_NODES";
    /// `Array<V6Leaf>`, mmapable: path compression, subtrees holding one prefix
    /// (leaves) and chains of single-child nodes (skips).
    pub const V6_LEAVES: &str = "RG_V6_LEAVES";
    /// `Array<IfaceSlot>` indexed by `ifindex & 0xffff`: counter slot of an interface.
    pub const IFACES: &str = "RG_IFACES";
    /// `PerCpuArray<u64>` indexed by [`super::counter_index`].
    pub const COUNTERS: &str = "RG_COUNTERS";
    /// `Array<Settings>` with one entry: knobs that change at run time.
    pub const SETTINGS: &str = "RG_SETTINGS";
    /// `PerCpuArray<SourceStats>`: recently blocked sources, for `top`; a
    /// direct-mapped cache indexed by [`super::source_slot`].
    pub const SOURCES: &str = "RG_SOURCES";
    /// `PerCpuArray<EventBudget>` with one entry: each CPU's token bucket for
    /// blocked-source log events, and the events it refused.
    pub const EVENTS: &str = "RG_EVENTS";
    /// `Array<BanPort>` indexed by TCP destination port: the ban sections
    /// that cover it (see [`super::ban`]).
    pub const BAN_PORTS: &str = "RG_BAN_PORTS";
    /// `Array<u64>`: the bans' pre-filter bits.
    pub const BAN_FILTER: &str = "RG_BAN_FILTER";
    /// `LpmTrie<[u8; 4], BanEntry>`: banned IPv4 prefixes.
    pub const BAN_V4: &str = "RG_BAN_V4";
    /// `LpmTrie<[u8; 16], BanEntry>`: banned IPv6 prefixes.
    pub const BAN_V6: &str = "RG_BAN_V6";
    /// `PerCpuArray<u64>` indexed by [`super::ban::ban_counter_index`].
    pub const BAN_COUNTERS: &str = "RG_BAN_COUNTERS";
    /// Every map the program must define (and the agent pins).
    pub const ALL: &[&str] = &[
        PORTS,
        TBL16,
        TBL24,
        LONG24,
        MASKS,
        V6_TOP,
        V6_NODES,
        V6_LEAVES,
        IFACES,
        COUNTERS,
        SETTINGS,
        SOURCES,
        EVENTS,
        BAN_PORTS,
        BAN_FILTER,
        BAN_V4,
        BAN_V6,
        BAN_COUNTERS,
    ];
}

/// Version of the map layout. Pinned state lives under `layout-<N>/`, so an
/// agent never opens maps whose layout it does not know. Bump it whenever a
/// map's name, type, key, value or capacity changes.
pub const LAYOUT_VERSION: u32 = 9;

/// Number of entries in [`maps::PORTS`]: one per TCP port.
pub const PORT_SLOTS: u32 = 65_536;
/// Guards are bits of [`AllowMask::allow`].
pub const MAX_GUARDS: usize = 64;
/// Entries of [`maps::TBL16`]: two /16 slots per entry.
pub const TBL16_ENTRIES: u32 = 1 << 15;
/// [`maps::TBL16`] value: the low bits are a block index into [`maps::TBL24`].
pub const TBL16_BLOCK: u32 = 0x8000_0000;
/// [`maps::TBL24`] entries per block (256 /24 entries, four per entry).
pub const TBL24_BLOCK_ENTRIES: u32 = 64;
/// Most blocks of [`maps::TBL24`]: one per /16.
pub const MAX_TBL24_BLOCKS: u32 = 1 << 16;
/// Most entries of [`maps::TBL24`] (the object's size; the agent loads it
/// smaller, see `kernel::sizes`).
pub const TBL24_ENTRIES: u32 = MAX_TBL24_BLOCKS * TBL24_BLOCK_ENTRIES;
/// [`maps::TBL24`] flag: the /24 holds longer prefixes; look its /28 up in
/// [`maps::LONG24`], and with no entry there every host of that /28 has
/// the mask index in the low bits (the /24's own mask).
pub const LONG_BLOCK: u16 = 0x8000;
/// Entries of [`maps::MASKS`]; mask indexes are below [`LONG_BLOCK`].
pub const MAX_MASKS: u32 = 0x8000;
/// Most /24s marked [`LONG_BLOCK`] (a policy limit).
pub const MAX_LONG_BLOCKS: u32 = 1 << 19;
/// Most entries of [`maps::LONG24`] (the agent loads it smaller, see
/// `kernel::sizes`; entries are allocated on demand, the hash buckets
/// are not).
pub const MAX_LONG_SUBBLOCKS: u32 = 1 << 21;
/// [`maps::LONG24`]'s capacity in the object, for a load the agent does
/// not size.
pub const LONG24_OBJECT_ENTRIES: u32 = 1 << 19;
/// Hosts per [`maps::LONG24`] entry (a /28).
pub const LONG_HOSTS: usize = 16;
/// Value of [`maps::LONG24`]: mask index per host of the /28. 32 bytes, so
/// a kernel hash element takes 96 bytes (a 512-byte value took 1 KiB).
pub type LongBlock = [u16; LONG_HOSTS];

/// The IPv6 multibit trie: its entry encoding and sizes.
///
/// An entry (in [`maps::V6_TOP`], a [`V6Node`] or a [`V6Leaf`]'s `inside`)
/// is a `u32` whose top two bits tell what it is: `00` a mask index into
/// [`maps::MASKS`] (0: deny), [`v6::NODE`] a node index, [`v6::LEAF`] a
/// leaf index (a leaf whose `inside` is a node is a skip); `11` is never
/// written and denies. The top level consumes 20 address bits, each node 4
/// more and each skip at least 8, so a walk takes at most
/// [`v6::NODE_LEVELS`] steps (nodes and leaves).
pub mod v6 {
    /// Tag bits of an entry.
    pub const TAG: u32 = 0xC000_0000;
    /// Tag of a node index.
    pub const NODE: u32 = 0x4000_0000;
    /// Tag of a leaf index.
    pub const LEAF: u32 = 0x8000_0000;
    /// Index bits of an entry.
    pub const INDEX: u32 = 0x3FFF_FFFF;
    /// Address bits the top level consumes.
    pub const TOP_BITS: u32 = 20;
    /// Top-level slots (`u32` entries).
    pub const TOP_SLOTS: u32 = 1 << TOP_BITS;
    /// Entries of [`super::maps::V6_TOP`]: two slots per entry.
    pub const TOP_ENTRIES: u32 = TOP_SLOTS / 2;
    /// Address bits a node consumes.
    pub const STRIDE: u32 = 4;
    /// Most nodes on one path (depths 20, 24, …, 124), and the most steps
    /// (nodes and leaves) of a walk: a skip stands for at least two nodes.
    pub const NODE_LEVELS: u32 = (128 - TOP_BITS) / STRIDE;
    /// Most entries of [`super::maps::V6_NODES`] (64 B each: 32 MiB), the
    /// object's size; the agent loads it sized to the config.
    pub const NODE_CAPACITY: u32 = 1 << 19;
    /// Most entries of [`super::maps::V6_LEAVES`] (24 B each: 36 MiB), the
    /// object's size; the agent loads it sized to the config.
    pub const LEAF_CAPACITY: u32 = 3 << 19;
}

/// A node of the IPv6 trie: one entry per value of the next 4 address bits.
pub type V6Node = [u32; 16];

/// A leaf of the IPv6 trie (path compression): addresses of the entry's
/// range inside `addr/len` continue with the entry `inside`, the rest take
/// the mask index `outside`. `inside` is either a mask index (a leaf: the one
/// stored prefix below the entry) or a node at depth `len` (a skip: a chain
/// of nodes whose other entries all held `outside`, `len` a multiple of 4,
/// at most 124). Leaves are never changed in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Leaf {
    /// Network address, network byte order.
    pub addr: [u8; 16],
    /// Prefix length, longer than the depth of the entry pointing here.
    pub len: u8,
    /// Must be zero.
    pub _pad0: u8,
    /// Mask index for the rest of the entry's range.
    pub outside: u16,
    /// Entry for addresses inside the prefix: a mask index or a node.
    pub inside: u32,
}

/// Interface slots in the counters; slot 0 counts interfaces without one.
pub const IFACE_SLOTS: u32 = 16;
/// Port slots in the counters; slot 0 is malformed packets (no port).
pub const COUNTER_PORT_SLOTS: u32 = 128;
/// Family slots in the counters: IPv4, IPv6, unknown.
pub const FAMILY_SLOTS: u32 = 3;
/// Verdict slots in the counters (see [`verdict`]).
pub const VERDICT_SLOTS: u32 = 5;
/// Entries of [`maps::COUNTERS`].
pub const COUNTER_ENTRIES: u32 = IFACE_SLOTS * COUNTER_PORT_SLOTS * FAMILY_SLOTS * VERDICT_SLOTS;
/// Entries of [`maps::IFACES`].
pub const IFACE_TABLE: u32 = 65_536;

/// Family slot of a [`family`] value.
#[inline(always)]
pub const fn family_slot(f: u8) -> u32 {
    match f {
        family::IPV4 => 0,
        family::IPV6 => 1,
        _ => 2,
    }
}

/// Index into [`maps::COUNTERS`]. Out-of-range slots fold into slot 0 of
/// their dimension, so the index is always in bounds.
#[inline(always)]
pub const fn counter_index(iface_slot: u32, port_slot: u32, family: u8, verdict: u8) -> u32 {
    let i = if iface_slot < IFACE_SLOTS { iface_slot } else { 0 };
    let p = if port_slot < COUNTER_PORT_SLOTS { port_slot } else { 0 };
    let v = if (verdict as u32) < VERDICT_SLOTS {
        verdict as u32
    } else {
        0
    };
    ((i * COUNTER_PORT_SLOTS + p) * FAMILY_SLOTS + family_slot(family)) * VERDICT_SLOTS + v
}

/// Slots per CPU of the blocked-source cache (a power of two).
pub const SOURCE_SLOTS: u32 = 4096;

/// log2 of [`SOURCE_SLOTS`].
const SOURCE_SLOT_BITS: u32 = SOURCE_SLOTS.trailing_zeros();

/// Cache slot of an IPv4 source: a multiplicative hash of the address as a
/// native-order word of its network-order bytes. Two sources that share a
/// slot take turns in it; `top` is a ranking of recent heavy hitters, the
/// exact totals are the counters.
#[inline(always)]
pub const fn source_slot_v4(addr: u32) -> u32 {
    addr.wrapping_mul(0x9e37_79b1) >> (32 - SOURCE_SLOT_BITS)
}

/// Cache slot of an IPv6 source: the same kind of hash over the address as
/// two native-order words of its network-order bytes.
#[inline(always)]
pub const fn source_slot_v6(w0: u64, w1: u64) -> u32 {
    ((w0 ^ w1.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SOURCE_SLOT_BITS)) as u32
}

/// At most one log event per cache slot (and so per blocked source) per CPU
/// per this many nanoseconds. A source that takes a slot over inherits the
/// slot's last event time: a random-source flood cannot reset it.
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;

/// Log events per second per CPU, whatever the number of sources: the rate
/// of each CPU's token bucket ([`maps::EVENTS`]). Also the agent's total
/// line budget per second.
pub const EVENTS_PER_SECOND: u64 = 10;

/// Events a CPU's bucket allows at once after a quiet spell.
pub const EVENT_BURST: u64 = 10;

/// Nanoseconds of bucket time one event costs.
pub const EVENT_COST_NS: u64 = 1_000_000_000 / EVENTS_PER_SECOND;

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

/// Which guard owns a port in one generation (half of a [`PortEntry`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardedPort {
    /// 1 when the port is guarded; 0 (the zeroed default) leaves it alone.
    pub active: u8,
    /// The owning guard's bit in [`AllowMask::allow`]. Bits are not config
    /// positions: a bit keeps its meaning for as long as a generation that
    /// tests it is in force (see `sync.rs`).
    pub guard: u8,
    /// Counter slot of this port (1..[`COUNTER_PORT_SLOTS`]); kept stable
    /// across reloads and restarts so counters stay with their port.
    pub slot: u16,
}

/// Value of [`maps::PORTS`]: the port's owner in generation 0 and in
/// generation 1. The program reads [`Settings::generation`] once per packet
/// and uses that half only, so the agent prepares the other half (with the
/// mode) and switches every port at once with one store.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    pub gens: [GuardedPort; 2],
}

/// Value of [`maps::IFACES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceSlot {
    /// The full ifindex, to tell apart two that share the low 16 bits.
    pub ifindex: u32,
    /// Counter slot (1..[`IFACE_SLOTS`]); 0: not registered.
    pub slot: u32,
}

/// Allow bits of one compiled prefix (the values of [`maps::MASKS`]).
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

/// A decoded counter: what one [`maps::COUNTERS`] slot counts, in label space.
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

/// A blocked source address.
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

/// Value of [`maps::SOURCES`]: one CPU's slot for one source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Packets from this source judged not allowed (dropped or would_drop).
    pub packets: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last such packet.
    pub last_seen_ns: u64,
    /// Same clock: the last log event for this source from this CPU.
    pub last_event_ns: u64,
    /// `bpf_jiffies64` when `last_seen_ns` was last read from the clock. The
    /// clock is read again only once the tick has moved on: a flood from one
    /// source reads it at most once per tick, not once per packet, and
    /// `last_seen_ns` stays within a tick of the truth.
    pub last_tick: u64,
    /// The source this slot counts (all zero: empty slot).
    pub source: SourceKey,
    /// Destination port of the last such packet (host order).
    pub last_port: u16,
    /// Guard of the last such packet.
    pub last_guard: u8,
    /// Verdict of the last such packet ([`verdict::DROPPED`] or [`verdict::WOULD_DROP`]).
    pub last_verdict: u8,
}

/// Value of [`maps::EVENTS`] (one entry per CPU): a GCRA token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// `bpf_ktime_get_ns` time at which the bucket is full again if
    /// nothing more is taken; an event is allowed while this is at most
    /// `(EVENT_BURST - 1) * EVENT_COST_NS` ahead of now, and moves it on by
    /// [`EVENT_COST_NS`].
    pub next_ns: u64,
    /// Events this CPU refused (a slot's event was due, the bucket was empty).
    pub suppressed: u64,
}

/// Value of [`maps::SETTINGS`] (one entry, index 0).
///
/// A policy is the pair (ports, mode) of one generation plus the tables;
/// the tables serve both generations while they differ (see `sync.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The generation in force, 0 or 1 (only bit 0 is read): which half of
    /// each [`PortEntry`] and which of [`Settings::modes`] apply. Read once
    /// per packet; the agent changes it with one aligned store.
    pub generation: u32,
    /// The mode of each generation, one of [`mode`].
    pub modes: [u32; 2],
    /// Must be zero.
    pub _pad: u32,
}

impl Settings {
    /// The generation in force (0 or 1).
    #[inline(always)]
    pub const fn current(&self) -> usize {
        (self.generation & 1) as usize
    }

    /// The mode in force.
    pub const fn mode(&self) -> u32 {
        self.modes[self.current()]
    }
}

const _: () = assert!(size_of::<GuardedPort>() == 4);
const _: () = assert!(size_of::<AllowMask>() == 8);
const _: () = assert!(size_of::<CounterKey>() == 12);
const _: () = assert!(size_of::<IfaceSlot>() == 8);
const _: () = assert!(size_of::<LongBlock>() == 32);
const _: () =
    assert!(counter_index(IFACE_SLOTS - 1, COUNTER_PORT_SLOTS - 1, family::UNKNOWN, 4) == COUNTER_ENTRIES - 1);
const _: () = assert!(size_of::<Settings>() == 16);
const _: () = assert!(size_of::<PortEntry>() == 8);
const _: () = assert!(size_of::<V6Node>() == 64);
const _: () = assert!(size_of::<V6Leaf>() == 24);
const _: () = assert!(v6::NODE_LEVELS == 27);
const _: () = assert!(MAX_MASKS <= v6::NODE);
const _: () = assert!(v6::NODE_CAPACITY <= v6::INDEX && v6::LEAF_CAPACITY <= v6::INDEX);
const _: () = assert!(size_of::<SourceKey>() == 20);
const _: () = assert!(size_of::<SourceStats>() == 56);
const _: () = assert!(size_of::<EventBudget>() == 16);
// The program compares and writes the address as two u64 words.
const _: () = assert!(core::mem::offset_of!(SourceStats, source) % 8 == 0);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made of integers, with explicit padding.
    unsafe impl aya::Pod for super::GuardedPort {}
    unsafe impl aya::Pod for super::PortEntry {}
    unsafe impl aya::Pod for super::AllowMask {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::IfaceSlot {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SourceStats {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::V6Leaf {}
}
