//! The ban maps (layouts in `relay_guard_common::ban`): which ports each ban
//! section covers, the banned prefixes with their expiry on CLOCK_BOOTTIME,
//! the pre-filter bits, and the ban drop counters.
//!
//! Written by the agent and by `relay-guard ban`/`unban` while the agent
//! runs, so every change is local (one prefix at a time, read-modify-write
//! of its entry) and never a full rewrite that would undo the other
//! writer's. The pre-filter only grows between [`BanMaps::rebuild_filter`]s;
//! a rebuild clears the bits no entry needs and then sets every entry's bits
//! again from a second read, so a ban added meanwhile keeps its bit.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{
    Array, Map, MapData, MapError, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use relay_guard_common::{
    PORT_SLOTS,
    ban::{
        BAN_PORT_SLOTS, BAN_VERDICT_SLOTS, BanEntry, BanPort, FILTER_WORDS, MAX_BANS, ban_counter_index, filter_bit_v4,
        filter_bit_v6,
    },
    maps,
};

use crate::{
    config::ban::Ban,
    error::{LoadError, SyncError},
    kernel::pins::Pins,
};

/// `BPF_NOEXIST` of `bpf(BPF_MAP_UPDATE_ELEM)`: create only.
const BPF_NOEXIST: u64 = 1;

/// The ban drop counters, shared with the metrics collector.
pub type BanCounters = Arc<Mutex<CounterState>>;

/// The counter map. A scrape reads up to tens of thousands of per-CPU
/// entries: in batch syscalls (one per interface and ban section), not one
/// syscall each.
pub struct CounterState {
    map: PerCpuArray<MapData, u64>,
    /// Possible CPUs (the per-CPU value count), once known.
    cpus: Option<usize>,
    /// `BPF_MAP_LOOKUP_BATCH` works here (else one lookup per counter).
    batch_ok: bool,
}

/// Typed handles on the ban maps.
pub struct BanMaps {
    ports: Array<MapData, BanPort>,
    filter: Filter,
    v4: LpmTrie<MapData, [u8; 4], BanEntry>,
    v6: LpmTrie<MapData, [u8; 16], BanEntry>,
    pub counters: BanCounters,
    /// `state_dir/bans.lock`: held (flock) across every read-modify-write
    /// of a trie entry, by the agent and the CLI alike, so that neither
    /// undoes the other's change of the same prefix.
    lock: Option<std::fs::File>,
}

/// The lock file beside `bans.json` (see [`BanMaps::set_lock`]).
pub const LOCK_FILE: &str = "bans.lock";

/// An flock held until dropped (on the fd of [`BanMaps`]'s lock file,
/// which outlives every call that holds it).
struct Held(Option<std::os::fd::RawFd>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            // SAFETY: flock on the lock file's fd, still open.
            unsafe { libc::flock(fd, libc::LOCK_UN) };
        }
    }
}

/// `RG_BAN_FILTER` mapped into memory.
struct Filter {
    _map: MapData,
    words: *const AtomicU64,
}

// SAFETY: the mapping lives as long as `_map` (unmapped in Drop), and every
// access is through atomics.
unsafe impl Send for Filter {}
unsafe impl Sync for Filter {}

const FILTER_BYTES: usize = FILTER_WORDS as usize * 8;

impl Filter {
    fn new(map: MapData) -> Result<Filter, LoadError> {
        let io = |source| LoadError::Pin {
            op: "mmap",
            path: maps::BAN_FILTER.into(),
            source,
        };
        let info = map.info().map_err(|source| LoadError::MapType {
            name: maps::BAN_FILTER,
            source,
        })?;
        if info.value_size() != 8 || info.max_entries() != FILTER_WORDS {
            return Err(LoadError::MapLayout {
                name: maps::BAN_FILTER,
                what: format!("value size {}, {} entries", info.value_size(), info.max_entries()),
            });
        }
        // SAFETY: a shared mapping of the map's fd, of the map's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILTER_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(Filter {
            _map: map,
            words: p.cast::<AtomicU64>().cast_const(),
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < FILTER_WORDS as usize);
        // SAFETY: in bounds of the live mapping; AtomicU64 has u64's layout.
        unsafe { &*self.words.add(i) }
    }

    fn set(&self, bit: u32) {
        self.word((bit >> 6) as usize)
            .fetch_or(1 << (bit & 63), Ordering::SeqCst);
    }

    fn test(&self, bit: u32) -> bool {
        self.word((bit >> 6) as usize).load(Ordering::SeqCst) >> (bit & 63) & 1 == 1
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.words.cast_mut().cast(), FILTER_BYTES) };
    }
}

use std::os::fd::AsFd as _;

/// The pre-filter bits of `net`, at most 2^24 of them whatever its length
/// (a prefix shorter than the filter resolves sets the whole family's half:
/// bounded work for a hostile pinned entry).
pub fn filter_bits(net: &IpNet) -> impl Iterator<Item = u32> {
    let (first, count, step_v6) = match net {
        IpNet::V4(n) => {
            let len = n.prefix_len();
            let count = if len >= 24 { 1 } else { 1u64 << (24 - len) };
            (u64::from(filter_bit_v4(n.network().octets())), count, None)
        }
        IpNet::V6(n) => {
            let hi = (u128::from(n.network()) >> 64) as u64;
            let len = n.prefix_len();
            if len >= 48 {
                (u64::from(filter_bit_v6(hi)), 1, None)
            } else if 48 - len <= 24 {
                (hi, 1u64 << (48 - len), Some(hi))
            } else {
                // More prefixes than bits: every IPv6 bit.
                (1 << 24, 1 << 24, None)
            }
        }
    };
    (0..count).map(move |k| match step_v6 {
        Some(hi) => filter_bit_v6(hi + (k << 16)),
        None => (first + k) as u32,
    })
}

/// Whether a map error means the trie is full (`ENOSPC`, `E2BIG`).
pub fn is_full(e: &SyncError) -> bool {
    match e {
        SyncError::Map {
            source: MapError::SyscallError(s),
            ..
        } => matches!(s.io_error.raw_os_error(), Some(libc::ENOSPC | libc::E2BIG)),
        _ => false,
    }
}

/// CLOCK_BOOTTIME now, in nanoseconds (the program's clock for expiry).
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Wall-clock time now, since the Unix epoch.
pub fn wall_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The CLOCK_BOOTTIME expiry of a ban ending at wall time `expires`.
pub fn boot_expiry(expires: Duration, wall: Duration, boot: u64) -> u64 {
    let left = expires.saturating_sub(wall);
    boot.saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
}

/// The wall-clock expiry of a kernel expiry.
pub fn wall_expiry(expires_ns: u64, wall: Duration, boot: u64) -> Duration {
    wall + Duration::from_nanos(expires_ns.saturating_sub(boot))
}

/// One entry of the tries: a prefix and each section's expiry (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBan {
    pub net: IpNet,
    pub expires_ns: [u64; MAX_BANS],
}

fn map_err(op: &'static str, map: &'static str, what: String) -> impl FnOnce(MapError) -> SyncError {
    move |source| SyncError::Map { op, map, what, source }
}

impl BanMaps {
    /// Typed handles from a loaded object or from pins.
    pub fn from_source(mut get: impl FnMut(&'static str) -> Result<Map, LoadError>) -> Result<BanMaps, LoadError> {
        fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, m: Map) -> Result<T, LoadError> {
            T::try_from(m).map_err(|source| LoadError::MapType { name, source })
        }
        let filter = match get(maps::BAN_FILTER)? {
            Map::Array(data) => Filter::new(data)?,
            _ => return Err(LoadError::NoMap { name: maps::BAN_FILTER }),
        };
        Ok(BanMaps {
            ports: typed(maps::BAN_PORTS, get(maps::BAN_PORTS)?)?,
            filter,
            v4: typed(maps::BAN_V4, get(maps::BAN_V4)?)?,
            v6: typed(maps::BAN_V6, get(maps::BAN_V6)?)?,
            counters: Arc::new(Mutex::new(CounterState {
                map: typed(maps::BAN_COUNTERS, get(maps::BAN_COUNTERS)?)?,
                cpus: None,
                batch_ok: true,
            })),
            lock: None,
        })
    }

    /// Serializes this process's read-modify-writes of trie entries with
    /// the other writer's through `dir/bans.lock` (created 0600, no
    /// symlink followed). Without it (no usable `state_dir`) writes are
    /// unlocked, as before.
    pub fn set_lock(&mut self, dir: &std::path::Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(LOCK_FILE))?;
        self.lock = Some(f);
        Ok(())
    }

    fn hold(&self) -> Held {
        if let Some(f) = &self.lock {
            // SAFETY: flock on a valid fd we own. Blocking: the other
            // holder keeps it for one entry's read and write.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Held(Some(f.as_raw_fd()));
            }
        }
        Held(None)
    }

    /// Opens the ban maps pinned under `pins` (for the CLI).
    pub fn open(pins: &Pins) -> Result<BanMaps, LoadError> {
        crate::kernel::pins::check_pin_dir(&pins.root)?;
        if !pins.has_state_maps() {
            return Err(LoadError::NotPinned {
                pin_dir: pins.root.clone(),
            });
        }
        BanMaps::from_source(|name| {
            let path = pins.map(name);
            let data = MapData::from_pin(&path).map_err(|source| LoadError::MapType { name, source })?;
            Map::from_map_data(data).map_err(|source| LoadError::MapType { name, source })
        })
    }

    /// Writes which sections cover each port; returns the counter port
    /// slots (slot → port). Only entries that differ are written; with
    /// `read_back` false (a new, all-zero map) only the covered ports are
    /// written, without reading the 65,536 entries first.
    pub fn set_ports(&mut self, bans: &[Ban], read_back: bool) -> Result<BTreeMap<u32, u16>, SyncError> {
        let (slots, want) = port_table(bans);
        self.write_ports(&want, read_back)?;
        Ok(slots)
    }

    /// Changes the port table from `from` (what the map holds, as last
    /// written) to `to`, writing only the ports that differ.
    pub fn change_ports(
        &mut self,
        from: &BTreeMap<u16, BanPort>,
        to: &BTreeMap<u16, BanPort>,
    ) -> Result<(), SyncError> {
        let ports: std::collections::BTreeSet<u16> = from.keys().chain(to.keys()).copied().collect();
        for p in ports {
            let w = to.get(&p).copied().unwrap_or_default();
            if from.get(&p).copied().unwrap_or_default() != w {
                self.ports
                    .set(u32::from(p), w, 0)
                    .map_err(map_err("write", maps::BAN_PORTS, format!("port {p}")))?;
            }
        }
        Ok(())
    }

    /// Writes `want` (port → entry; every other port: no ban check).
    pub fn write_ports(&mut self, want: &BTreeMap<u16, BanPort>, read_back: bool) -> Result<(), SyncError> {
        if !read_back {
            for (&p, w) in want {
                self.ports
                    .set(u32::from(p), *w, 0)
                    .map_err(map_err("write", maps::BAN_PORTS, format!("port {p}")))?;
            }
            return Ok(());
        }
        for port in 0..PORT_SLOTS {
            let p = port as u16;
            let now = self
                .ports
                .get(&port, 0)
                .map_err(map_err("read", maps::BAN_PORTS, format!("port {port}")))?;
            let w = want.get(&p).copied().unwrap_or_default();
            if now != w {
                self.ports
                    .set(port, w, 0)
                    .map_err(map_err("write", maps::BAN_PORTS, format!("port {port}")))?;
            }
        }
        Ok(())
    }

    /// The sections covering `port` (bit b: section b).
    pub fn sections_of_port(&self, port: u16) -> Result<u8, SyncError> {
        Ok(self
            .ports
            .get(&u32::from(port), 0)
            .map_err(map_err("read", maps::BAN_PORTS, format!("port {port}")))?
            .sections)
    }

    fn get(&self, net: &IpNet) -> Result<Option<BanEntry>, MapError> {
        let r = match net {
            IpNet::V4(n) => self
                .v4
                .get(&Key::new(u32::from(n.prefix_len()), n.network().octets()), 0),
            IpNet::V6(n) => self
                .v6
                .get(&Key::new(u32::from(n.prefix_len()), n.network().octets()), 0),
        };
        match r {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&mut self, net: &IpNet, e: &BanEntry) -> Result<(), MapError> {
        self.put_flags(net, e, 0)
    }

    fn put_flags(&mut self, net: &IpNet, e: &BanEntry, flags: u64) -> Result<(), MapError> {
        match net {
            IpNet::V4(n) => self
                .v4
                .insert(&Key::new(u32::from(n.prefix_len()), n.network().octets()), e, flags),
            IpNet::V6(n) => self
                .v6
                .insert(&Key::new(u32::from(n.prefix_len()), n.network().octets()), e, flags),
        }
    }

    fn delete(&mut self, net: &IpNet) -> Result<(), MapError> {
        let r = match net {
            IpNet::V4(n) => self
                .v4
                .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
            IpNet::V6(n) => self
                .v6
                .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
        };
        match r {
            Err(MapError::KeyNotFound) => Ok(()),
            r => r,
        }
    }

    /// Bans `net` in `section` until `expires_ns` (CLOCK_BOOTTIME): the
    /// entry first, then its filter bits, so the program never sees a bit
    /// without the entry it stands for... nor an entry the filter hides for
    /// longer than this call.
    pub fn ban(&mut self, section: usize, net: IpNet, expires_ns: u64) -> Result<(), SyncError> {
        let net = net.trunc();
        let what = || format!("ban of {net}");
        let mut e = BanEntry {
            len: u32::from(net.prefix_len()),
            ..BanEntry::default()
        };
        if let Some(slot) = e.expires_ns.get_mut(section) {
            *slot = expires_ns;
        }
        // A new prefix (the common case) in one syscall; an existing one
        // (another section's ban, or a renewal) read, changed, written.
        match self.put_flags(&net, &e, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(ref s)) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {
                let _held = self.hold();
                let mut old = self
                    .get(&net)
                    .map_err(map_err("read", trie_name(&net), what()))?
                    .unwrap_or_default();
                old.len = e.len;
                if let Some(slot) = old.expires_ns.get_mut(section) {
                    *slot = expires_ns;
                }
                self.put(&net, &old)
                    .map_err(map_err("write", trie_name(&net), what()))?;
            }
            Err(err) => return Err(map_err("write", trie_name(&net), what())(err)),
        }
        for bit in filter_bits(&net) {
            self.filter.set(bit);
        }
        Ok(())
    }

    /// Lifts the ban of `net` (exactly that prefix) in `section`, or in
    /// every section; returns the sections whose ban was in force. Filter
    /// bits stay until the next rebuild (a set bit only costs a lookup).
    pub fn unban(&mut self, net: IpNet, section: Option<usize>, now_ns: u64) -> Result<Vec<usize>, SyncError> {
        let net = net.trunc();
        let what = || format!("ban of {net}");
        let _held = self.hold();
        let Some(mut e) = self.get(&net).map_err(map_err("read", trie_name(&net), what()))? else {
            return Ok(Vec::new());
        };
        let mut lifted = Vec::new();
        for (s, x) in e.expires_ns.iter_mut().enumerate() {
            if section.is_none_or(|want| want == s) && *x != 0 {
                if *x > now_ns {
                    lifted.push(s);
                }
                *x = 0;
            }
        }
        if e.expires_ns.iter().all(|&x| x <= now_ns) {
            self.delete(&net).map_err(map_err("delete", trie_name(&net), what()))?;
        } else {
            self.put(&net, &e).map_err(map_err("write", trie_name(&net), what()))?;
        }
        Ok(lifted)
    }

    /// Ends `section`'s ban of `net` in the trie if its kernel expiry has
    /// passed by `now_ns` (an expiry the engine counted), and deletes the
    /// entry once no section's ban of it is in force: expired entries do
    /// not linger in the walk the program makes (`MAX_NESTED`).
    pub fn expire_slot(&mut self, net: IpNet, section: usize, now_ns: u64) -> Result<bool, SyncError> {
        let net = net.trunc();
        let what = || format!("ban of {net}");
        let _held = self.hold();
        let Some(mut e) = self.get(&net).map_err(map_err("read", trie_name(&net), what()))? else {
            return Ok(false);
        };
        match e.expires_ns.get_mut(section) {
            Some(x) if *x != 0 && *x <= now_ns => *x = 0,
            _ => return Ok(false),
        }
        if e.expires_ns.iter().all(|&x| x <= now_ns) {
            self.delete(&net).map_err(map_err("delete", trie_name(&net), what()))?;
            return Ok(true);
        }
        self.put(&net, &e).map_err(map_err("write", trie_name(&net), what()))?;
        Ok(false)
    }

    /// Deletes the whole entry of `net` (a pinned entry refused at start).
    pub fn remove_entry(&mut self, net: IpNet) -> Result<(), SyncError> {
        let _held = self.hold();
        self.delete(&net)
            .map_err(map_err("delete", trie_name(&net), format!("ban of {net}")))
    }

    /// Every entry of both tries.
    pub fn list(&self) -> Result<Vec<KernelBan>, SyncError> {
        let mut out = Vec::new();
        for r in self.v4.iter() {
            let (k, e) = r.map_err(map_err("read", maps::BAN_V4, "entries".into()))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(32).min(32);
            let net = Ipv4Net::new(Ipv4Addr::from(k.data()), len).expect("len <= 32");
            out.push(KernelBan {
                net: IpNet::V4(net),
                expires_ns: e.expires_ns,
            });
        }
        for r in self.v6.iter() {
            let (k, e) = r.map_err(map_err("read", maps::BAN_V6, "entries".into()))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(128).min(128);
            let net = Ipv6Net::new(Ipv6Addr::from(k.data()), len).expect("len <= 128");
            out.push(KernelBan {
                net: IpNet::V6(net),
                expires_ns: e.expires_ns,
            });
        }
        Ok(out)
    }

    /// Deletes entries whose every ban has ended; returns how many.
    pub fn collect_expired(&mut self, now_ns: u64) -> Result<usize, SyncError> {
        let mut n = 0;
        for b in self.list()? {
            if b.expires_ns.iter().all(|&x| x <= now_ns) {
                self.delete(&b.net)
                    .map_err(map_err("delete", trie_name(&b.net), format!("ban of {}", b.net)))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Clears the filter bits no entry needs (see the module docs).
    pub fn rebuild_filter(&mut self) -> Result<(), SyncError> {
        let mut need = vec![0u64; FILTER_WORDS as usize];
        for b in self.list()? {
            for bit in filter_bits(&b.net) {
                need[(bit >> 6) as usize] |= 1 << (bit & 63);
            }
        }
        for (i, &w) in need.iter().enumerate() {
            let word = self.filter.word(i);
            if word.load(Ordering::Relaxed) & !w != 0 {
                word.fetch_and(w, Ordering::SeqCst);
            }
        }
        for b in self.list()? {
            for bit in filter_bits(&b.net) {
                self.filter.set(bit);
            }
        }
        Ok(())
    }

    /// The ban that decides for (`addr`, `port`), read the way the program
    /// reads it: (section, prefix, expiry ns), or `None`.
    pub fn lookup(&self, addr: IpAddr, port: u16, now_ns: u64) -> Result<Option<(usize, IpNet, u64)>, SyncError> {
        let sections = self.sections_of_port(port)?;
        if sections == 0 {
            return Ok(None);
        }
        let bit = match addr {
            IpAddr::V4(a) => filter_bit_v4(a.octets()),
            IpAddr::V6(a) => filter_bit_v6((u128::from(a) >> 64) as u64),
        };
        if !self.filter.test(bit) {
            return Ok(None);
        }
        // The most specific prefixes first, as the trie returns them.
        let mut all: Vec<KernelBan> = self.list()?.into_iter().filter(|b| b.net.contains(&addr)).collect();
        all.sort_by_key(|b| std::cmp::Reverse(b.net.prefix_len()));
        for b in all.iter().take(relay_guard_common::ban::MAX_NESTED as usize) {
            for (s, &x) in b.expires_ns.iter().enumerate() {
                if sections >> s & 1 == 1 && x > now_ns {
                    return Ok(Some((s, b.net, x)));
                }
            }
        }
        Ok(None)
    }
}

/// The port table of `bans`: (counter slot → port, port → entry).
pub fn port_table(bans: &[Ban]) -> (BTreeMap<u32, u16>, BTreeMap<u16, BanPort>) {
    let mut all: Vec<u16> = bans.iter().flat_map(|b| b.ports.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    let mut slots = BTreeMap::new();
    let mut want: BTreeMap<u16, BanPort> = BTreeMap::new();
    for (i, &p) in all.iter().enumerate() {
        let slot = u32::try_from(i + 1).unwrap_or(0);
        let slot = if slot < BAN_PORT_SLOTS { slot } else { 0 };
        if slot != 0 {
            slots.insert(slot, p);
        }
        want.insert(
            p,
            BanPort {
                sections: 0,
                slot: slot as u8,
                _pad: 0,
            },
        );
    }
    for (b, ban) in bans.iter().enumerate().take(MAX_BANS) {
        for p in &ban.ports {
            if let Some(e) = want.get_mut(p) {
                e.sections |= 1 << b;
            }
        }
    }
    (slots, want)
}

/// The port table to hold while a reload moves bans between section slots
/// (SPEC.md "One policy at a time"): a slot kept by the same section covers
/// the union of its old and new ports; a slot whose section is new (no
/// entries yet) covers its new ports; a slot that changes hands (its
/// section moved, or was removed, and another takes its place) covers no
/// port until its entries have moved, so no ban of one section is ever
/// applied on another's ports. Counter slots are the new ones.
pub fn transition_table(old: &[Ban], new: &[Ban]) -> BTreeMap<u16, BanPort> {
    let (_, mut want) = port_table(new);
    for e in want.values_mut() {
        e.sections = 0;
    }
    for s in 0..MAX_BANS {
        let (o, n) = (old.get(s), new.get(s));
        let ports: Vec<u16> = match (o, n) {
            (Some(o), Some(n)) if o.name == n.name => o.ports.iter().chain(&n.ports).copied().collect(),
            (None, Some(n)) => n.ports.clone(),
            _ => Vec::new(),
        };
        for p in ports {
            let e = want.entry(p).or_insert(BanPort {
                sections: 0,
                slot: 0,
                _pad: 0,
            });
            e.sections |= 1 << s;
        }
    }
    want
}

fn trie_name(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => maps::BAN_V4,
        IpNet::V6(_) => maps::BAN_V6,
    }
}

/// One ban counter, in label space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BanCount {
    pub iface_slot: u32,
    pub ban: usize,
    /// 0: a port without a counter slot.
    pub port: u16,
    pub v6: bool,
    /// `true`: would_drop (monitor mode).
    pub would_drop: bool,
    pub packets: u64,
}

/// Reads the non-zero ban counters (summed over CPUs) of the given
/// interface slots and port slots.
pub fn read_counters(
    counters: &BanCounters,
    iface_slots: &[u32],
    port_slots: &BTreeMap<u32, u16>,
    bans: usize,
) -> Result<Vec<BanCount>, SyncError> {
    let mut state = counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = Vec::new();
    let ports: Vec<(u32, u16)> = std::iter::once((0, 0))
        .chain(port_slots.iter().map(|(&s, &p)| (s, p)))
        .collect();
    // One (interface, ban) pair's counters are contiguous: BAN_PORT_SLOTS x
    // 2 families x 2 verdicts. Read them in one batch syscall when the
    // kernel has BPF_MAP_LOOKUP_BATCH (5.6+), else one lookup each.
    let per_pair = (BAN_PORT_SLOTS * 2 * BAN_VERDICT_SLOTS) as usize;
    for &islot in std::iter::once(&0).chain(iface_slots) {
        for ban in 0..bans.min(MAX_BANS) {
            let first = ban_counter_index(islot, ban as u32, 0, false, 0);
            let block = if state.batch_ok {
                match state.read_block(first, per_pair) {
                    Ok(b) => Some(b),
                    Err(_) => {
                        state.batch_ok = false;
                        None
                    }
                }
            } else {
                None
            };
            for &(pslot, port) in &ports {
                for v6 in [false, true] {
                    for verdict in 0..BAN_VERDICT_SLOTS as u8 {
                        let idx = ban_counter_index(islot, ban as u32, pslot, v6, verdict);
                        let total = match &block {
                            Some(b) => b[(idx - first) as usize],
                            None => state
                                .map
                                .get(&idx, 0)
                                .map_err(map_err("read", maps::BAN_COUNTERS, format!("index {idx}")))?
                                .iter()
                                .copied()
                                .fold(0u64, u64::wrapping_add),
                        };
                        if total != 0 {
                            out.push(BanCount {
                                iface_slot: islot,
                                ban,
                                port,
                                v6,
                                would_drop: verdict == relay_guard_common::ban::WOULD_DROP,
                                packets: total,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `BPF_MAP_LOOKUP_BATCH` of `bpf(2)`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

impl CounterState {
    /// Entries `first .. first + n`, each summed over CPUs, in batch
    /// syscalls.
    fn read_block(&mut self, first: u32, n: usize) -> std::io::Result<Vec<u64>> {
        use aya::maps::IterableMap as _;
        let cpus = match self.cpus {
            Some(c) => c,
            None => {
                let c = aya::util::nr_cpus().map_err(|(_, e)| e)?;
                self.cpus = Some(c);
                c
            }
        };
        let fd = self.map.map().fd().as_fd().as_raw_fd();
        let mut keys = vec![0u32; n];
        let mut values = vec![0u64; n * cpus];
        let mut out = vec![0u64; n];
        let mut done = 0usize;
        // in_batch is the key before the first one wanted.
        let mut prev: u32 = first.wrapping_sub(1);
        let mut out_batch: u32 = 0;
        while done < n {
            let mut attr = BatchAttr {
                in_batch: if first == 0 && done == 0 {
                    0
                } else {
                    std::ptr::from_ref(&prev) as u64
                },
                out_batch: std::ptr::from_mut(&mut out_batch) as u64,
                keys: keys[done..].as_mut_ptr() as u64,
                values: values[done * cpus..].as_mut_ptr() as u64,
                count: u32::try_from(n - done).unwrap_or(u32::MAX),
                map_fd: u32::try_from(fd).unwrap_or(0),
                ..BatchAttr::default()
            };
            // SAFETY: bpf(2) with a batch attr whose buffers hold `count`
            // keys and `count * cpus` u64 values (per-CPU values are
            // rounded up to 8 bytes, and ours are u64).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    std::ptr::from_mut(&mut attr),
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            let got = attr.count as usize;
            let err = (r < 0).then(std::io::Error::last_os_error);
            for i in done..done + got.min(n - done) {
                let k = keys[i];
                if k.wrapping_sub(first) as usize != i {
                    return Err(std::io::Error::other("batch keys out of order"));
                }
                out[i] = values[i * cpus..(i + 1) * cpus]
                    .iter()
                    .copied()
                    .fold(0u64, u64::wrapping_add);
            }
            done += got;
            match err {
                None if got > 0 => prev = first.wrapping_add(done as u32).wrapping_sub(1),
                None => return Err(std::io::Error::other("empty batch")),
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) && done >= n => {}
                Some(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_bits_cover_the_prefix() {
        let n: IpNet = "198.51.100.7/32".parse().expect("net");
        assert_eq!(filter_bits(&n).collect::<Vec<_>>(), [filter_bit_v4([198, 51, 100, 7])]);
        let n: IpNet = "198.51.0.0/16".parse().expect("net");
        let bits: Vec<u32> = filter_bits(&n).collect();
        assert_eq!(bits.len(), 256);
        assert!(bits.contains(&filter_bit_v4([198, 51, 77, 1])));
        let n: IpNet = "2001:db8:1:2::/64".parse().expect("net");
        let a: Ipv6Addr = "2001:db8:1:2:ffff::1".parse().expect("addr");
        assert_eq!(
            filter_bits(&n).collect::<Vec<_>>(),
            [filter_bit_v6((u128::from(a) >> 64) as u64)]
        );
        let n: IpNet = "2001:db8:100::/40".parse().expect("net");
        let a: Ipv6Addr = "2001:db8:1ff:7::1".parse().expect("addr");
        let bits: Vec<u32> = filter_bits(&n).collect();
        assert_eq!(bits.len(), 256);
        assert!(bits.contains(&filter_bit_v6((u128::from(a) >> 64) as u64)));
        assert!(bits.iter().all(|b| (1 << 24..FILTER_WORDS * 64).contains(b)));
        // Hostile lengths: bounded by the filter, never 2^48 of anything.
        let n: IpNet = "::/0".parse().expect("net");
        assert_eq!(filter_bits(&n).count(), 1 << 24);
        assert!(filter_bits(&n).all(|b| (1 << 24..1 << 25).contains(&b)));
        let n: IpNet = "0.0.0.0/0".parse().expect("net");
        assert_eq!(filter_bits(&n).count(), 1 << 24);
    }

    #[test]
    fn a_reorder_never_applies_one_sections_bans_on_anothers_ports() {
        let mut a = Ban::with_defaults("a");
        a.ports = vec![25];
        let mut b = Ban::with_defaults("b");
        b.ports = vec![587];
        let mut c = Ban::with_defaults("c");
        c.ports = vec![993];
        // [a, b] -> [b, a, c]: slots 0 and 1 change hands, slot 2 is new.
        let t = transition_table(&[a.clone(), b.clone()], &[b.clone(), a.clone(), c.clone()]);
        let bits = |p: u16| t.get(&p).map_or(0, |e| e.sections);
        assert_eq!(bits(25), 0, "slot 0 holds a's bans until they move: not on b's port");
        assert_eq!(bits(587), 0);
        assert_eq!(bits(993), 1 << 2, "a new section's slot has no entries yet");
        // A section that keeps its slot covers old and new ports meanwhile.
        let mut a2 = a.clone();
        a2.ports = vec![465];
        let t = transition_table(&[a, b.clone()], &[a2, b]);
        assert_eq!(t.get(&25).map(|e| e.sections), Some(1));
        assert_eq!(t.get(&465).map(|e| e.sections), Some(1));
        assert_eq!(t.get(&587).map(|e| e.sections), Some(2));
    }

    #[test]
    fn clocks_convert_both_ways() {
        let wall = Duration::from_secs(1_000_000);
        let boot = 5_000_000_000;
        let e = boot_expiry(wall + Duration::from_secs(3), wall, boot);
        assert_eq!(e, 8_000_000_000);
        assert_eq!(wall_expiry(e, wall, boot), wall + Duration::from_secs(3));
        assert_eq!(boot_expiry(wall - Duration::from_secs(3), wall, boot), boot);
    }
}
