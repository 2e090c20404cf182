//! Typed handles on every map of the program ([`Maps`]), from a loaded
//! object or from pins. Typed handles (`Array::try_from`,
//! `HashMap::try_from`, …) check key and value sizes against the object, so
//! a layout mismatch between the agent and the program is an error here, not
//! a misread later; the mmapable arrays (`RG_TBL24`, the IPv6 trie) are
//! mapped into memory, the IPv6 ones after checking their value size,
//! capacity and flags.
use std::{
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use relay_guard_common::{
    COUNTER_PORT_SLOTS, IFACE_SLOTS, IFACE_TABLE, IfaceSlot, LONG_BLOCK, LongBlock, PortEntry, Settings, SourceStats,
    TBL16_BLOCK, TBL16_ENTRIES, TBL24_BLOCK_ENTRIES, TBL24_ENTRIES, V6Leaf, V6Node, VERDICT_SLOTS, counter_index, maps,
    v6,
};
use tracing::warn;

use crate::{
    error::LoadError,
    policy::tables6::{V6Hit, V6Tables, V6Write, walk},
};

/// Every map of the program, typed.
pub struct Maps {
    pub ports: Array<MapData, PortEntry>,
    pub tbl24: Tbl24,
    pub long24: HashMap<MapData, u32, LongBlock>,
    /// The same map through a second fd, for a second writer thread.
    pub long24_aux: HashMap<MapData, u32, LongBlock>,
    /// `RG_LONG24`'s capacity (max_entries).
    pub long24_capacity: u32,
    pub masks: Array<MapData, u64>,
    pub v6: V6Arrays,
    pub ifaces: Array<MapData, IfaceSlot>,
    pub settings: Array<MapData, Settings>,
    /// Shared with the metrics collector, which reads it at scrape time.
    pub counters: Counters,
    pub sources: PerCpuArray<MapData, SourceStats>,
}

/// The counter array, shared with the metrics collector.
pub type Counters = Arc<Mutex<PerCpuArray<MapData, u64>>>;

/// A `BPF_F_MMAPABLE` map's memory, mapped into the agent a chunk at a
/// time. The kernel maps every page of a BPF map mmap at once, so mapping a
/// 32 MiB array whole costs 32 MiB of RSS; here the whole address range is
/// reserved (no memory) and each chunk is mapped over it on first access
/// (the base pointer never moves, so references stay valid), and
/// [`Region::release`] gives the chunks back when no reference is held.
struct Region {
    /// Keeps the map (and so the mapping's backing) alive.
    map: MapData,
    base: *mut u8,
    bytes: usize,
    mapped: Vec<std::sync::atomic::AtomicBool>,
    lock: Mutex<()>,
}

/// Granule of [`Region`] mappings (a multiple of the page size).
const CHUNK: usize = 1 << 20;

// SAFETY: the memory is shared with the kernel; the agent accesses it with
// single aligned loads and stores (volatile or atomic), and chunk mappings
// are made under `lock`.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new(map: MapData, bytes: usize) -> std::io::Result<Region> {
        // SAFETY: an anonymous, inaccessible reservation: no memory, only addresses.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let chunks = bytes.div_ceil(CHUNK);
        let r = Region {
            map,
            base: base.cast(),
            bytes,
            mapped: (0..chunks).map(|_| std::sync::atomic::AtomicBool::new(false)).collect(),
            lock: Mutex::new(()),
        };
        // Map the first chunk now, so a map that cannot be mapped fails here.
        r.ensure(0, 1)?;
        Ok(r)
    }

    /// Maps the chunks holding bytes `off..off + len`.
    fn ensure(&self, off: usize, len: usize) -> std::io::Result<()> {
        use std::{os::fd::AsFd as _, sync::atomic::Ordering};
        let (first, last) = (off / CHUNK, (off + len - 1) / CHUNK);
        for c in first..=last {
            if self.mapped[c].load(Ordering::Acquire) {
                continue;
            }
            let _g = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if self.mapped[c].load(Ordering::Acquire) {
                continue;
            }
            let start = c * CHUNK;
            let size = CHUNK.min(self.bytes - start);
            let fd = self.map.fd().as_fd().as_raw_fd();
            // SAFETY: replaces part of our own reservation (MAP_FIXED inside
            // it) with the map's pages at the same offset; `bytes` is the
            // map's size, so the range is inside the map.
            let p = unsafe {
                libc::mmap(
                    self.base.add(start).cast(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    libc::off_t::try_from(start).expect("fits"),
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            self.mapped[c].store(true, Ordering::Release);
        }
        Ok(())
    }

    /// A pointer to bytes `off..off + len`, mapped. Panics if the kernel
    /// refuses to map a chunk it mapped before (the map is alive: it cannot).
    fn at(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off + len <= self.bytes);
        self.ensure(off, len).expect("mapping a chunk of a live BPF map");
        // SAFETY: in bounds (checked) of the reservation.
        unsafe { self.base.add(off) }
    }

    /// Unmaps every chunk (their RSS goes; the kernel keeps the data).
    fn release(&mut self) {
        use std::sync::atomic::Ordering;
        for (c, m) in self.mapped.iter().enumerate() {
            if m.swap(false, Ordering::AcqRel) {
                let start = c * CHUNK;
                // SAFETY: turns our own mapped chunk back into reservation;
                // `&mut self`: no reference into it is held.
                unsafe {
                    libc::mmap(
                        self.base.add(start).cast(),
                        CHUNK.min(self.bytes - start),
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
            }
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the reservation `new` made (and the
        // chunks mapped inside it).
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

/// The IPv4 table, two levels (`RG_TBL16` over `RG_TBL24`'s blocks),
/// mapped into the agent's memory (`BPF_F_MMAPABLE`): read and written as
/// one /24 entry per block of the address space, as if it were flat. A /16
/// whose 256 entries are equal is one `RG_TBL16` value; setting one of its
/// entries to another value first gives it a block (filled with the shared
/// value, then linked by one store), and [`Tbl24::compact`] folds blocks
/// that became uniform back. A block unlinked by this process is reused
/// only after an RCU grace period (a lookup may still be reading it).
pub struct Tbl24 {
    top: Region,
    blocks: Region,
    /// Blocks in `RG_TBL24`.
    capacity: u32,
    /// Blocks no `RG_TBL16` slot links (lowest last).
    free: Vec<u32>,
    /// Blocks this process unlinked, free after a grace period.
    pending: Vec<u32>,
}

/// Out of blocks in `RG_TBL24` (a sync checks before writing, so only a
/// bug gets this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlocksFull;

const BLOCK_BYTES: usize = TBL24_BLOCK_ENTRIES as usize * 8;

impl Tbl24 {
    fn new(top: MapData, blocks: MapData) -> Result<Tbl24, LoadError> {
        const BPF_F_MMAPABLE: u32 = 1 << 10;
        let check = |name: &'static str, map: &MapData, value: u32| -> Result<u32, LoadError> {
            let info = map.info().map_err(|source| LoadError::MapType { name, source })?;
            if info.value_size() != value || info.map_flags() & BPF_F_MMAPABLE == 0 {
                return Err(LoadError::MapLayout {
                    name,
                    what: format!(
                        "value size {}, flags {:#x}; expected {value}, mmapable",
                        info.value_size(),
                        info.map_flags()
                    ),
                });
            }
            Ok(info.max_entries())
        };
        if check(maps::TBL16, &top, 8)? != TBL16_ENTRIES {
            return Err(LoadError::MapLayout {
                name: maps::TBL16,
                what: format!("expected {TBL16_ENTRIES} entries"),
            });
        }
        let entries = check(maps::TBL24, &blocks, 8)?;
        if entries % TBL24_BLOCK_ENTRIES != 0 || entries > TBL24_ENTRIES || entries == 0 {
            return Err(LoadError::MapLayout {
                name: maps::TBL24,
                what: format!(
                    "{entries} entries: not a whole number of blocks of {TBL24_BLOCK_ENTRIES}, at most {TBL24_ENTRIES}"
                ),
            });
        }
        let capacity = entries / TBL24_BLOCK_ENTRIES;
        let mmap = |name: &'static str, map, bytes| {
            Region::new(map, bytes).map_err(|source| LoadError::Pin {
                op: "mmap",
                path: name.into(),
                source,
            })
        };
        let mut t = Tbl24 {
            top: mmap(maps::TBL16, top, TBL16_ENTRIES as usize * 8)?,
            blocks: mmap(maps::TBL24, blocks, capacity as usize * BLOCK_BYTES)?,
            capacity,
            free: Vec::new(),
            pending: Vec::new(),
        };
        let mut linked = vec![false; capacity as usize];
        for slot in 0..SLOTS {
            if let Some(k) = t.block_of(slot) {
                linked[k as usize] = true;
            }
        }
        t.free = (0..capacity).rev().filter(|&k| !linked[k as usize]).collect();
        t.top.release();
        Ok(t)
    }

    fn top_word(&self, slot: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(slot < SLOTS);
        // SAFETY: in bounds (checked), 4-byte aligned, inside the live
        // mapping; shared with the kernel, so only atomic access is used.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.top.at(slot * 4, 4).cast()) }
    }

    /// The `RG_TBL16` value of /16 `slot`.
    fn top(&self, slot: usize) -> u32 {
        self.top_word(slot).load(std::sync::atomic::Ordering::Acquire)
    }

    /// The block /16 `slot` links, if it links one (in range).
    fn block_of(&self, slot: usize) -> Option<u32> {
        let t = self.top(slot);
        (t & TBL16_BLOCK != 0 && t & !TBL16_BLOCK < self.capacity).then_some(t & !TBL16_BLOCK)
    }

    fn lane(&self, block: u32, c: usize) -> *mut u16 {
        // SAFETY: `at` checks the bounds; lanes are 2-byte aligned.
        self.blocks.at(block as usize * BLOCK_BYTES + c * 2, 2).cast()
    }

    /// Entry of /24 block `block` (0..2^24).
    pub fn get(&self, block: usize) -> u16 {
        assert!(block < crate::policy::tables::BLOCKS);
        let t = self.top(block >> 8);
        if t & TBL16_BLOCK == 0 {
            return t as u16;
        }
        match self.block_of(block >> 8) {
            // SAFETY: mapped, in bounds and aligned (`lane` checks and maps).
            Some(k) => unsafe { self.lane(k, block & 255).read_volatile() },
            // Past the table: the program fails closed.
            None => 0,
        }
    }

    /// Sets the entry of /24 block `block`; one aligned store (or, for a
    /// uniform /16, a new block linked by one store), so the XDP program
    /// sees the old or the new value, never a mix.
    pub fn set(&mut self, block: usize, v: u16) -> Result<(), BlocksFull> {
        assert!(block < crate::policy::tables::BLOCKS);
        let slot = block >> 8;
        let k = match self.block_of(slot) {
            Some(k) => k,
            None => {
                let t = self.top(slot);
                let shared = if t & TBL16_BLOCK == 0 { t as u16 } else { 0 };
                if shared == v {
                    return Ok(());
                }
                let k = self.take()?;
                for c in 0..256 {
                    // SAFETY: an unlinked block of the mapping.
                    unsafe { self.lane(k, c).write_volatile(shared) };
                }
                // SAFETY: as above.
                unsafe { self.lane(k, block & 255).write_volatile(v) };
                self.top_word(slot)
                    .store(TBL16_BLOCK | k, std::sync::atomic::Ordering::Release);
                return Ok(());
            }
        };
        // SAFETY: mapped, in bounds and aligned.
        unsafe { self.lane(k, block & 255).write_volatile(v) };
        Ok(())
    }

    /// Sets all 256 entries of /16 `slot` to `v` with one store (a mask
    /// index, not [`LONG_BLOCK`]); a block it linked waits for a grace period.
    pub fn set16(&mut self, slot: usize, v: u16) {
        assert!(v & LONG_BLOCK == 0);
        if self.top(slot) == u32::from(v) {
            return;
        }
        let old = self.block_of(slot);
        self.top_word(slot)
            .store(u32::from(v), std::sync::atomic::Ordering::Release);
        if let Some(k) = old {
            self.pending.push(k);
        }
    }

    /// Whether /16 `slot` is one value (no block).
    pub fn is_uniform(&self, slot: usize) -> bool {
        self.block_of(slot).is_none()
    }

    /// Folds every block whose 256 entries are one mask index back into its
    /// /16 slot. Returns how many it folded.
    pub fn compact(&mut self) -> usize {
        let mut n = 0;
        for slot in 0..SLOTS {
            let Some(k) = self.block_of(slot) else { continue };
            // SAFETY: mapped, in bounds and aligned.
            let first = unsafe { self.lane(k, 0).read_volatile() };
            // SAFETY: as above.
            if first & LONG_BLOCK == 0 && (1..256).all(|c| unsafe { self.lane(k, c).read_volatile() } == first) {
                self.set16(slot, first);
                n += 1;
            }
        }
        self.release();
        n
    }

    /// A free block: from the free list, else (after a grace period) one
    /// this process unlinked.
    fn take(&mut self) -> Result<u32, BlocksFull> {
        if self.free.is_empty() && !self.pending.is_empty() {
            crate::kernel::sync::grace_period();
            self.free.append(&mut self.pending);
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.free.pop().ok_or(BlocksFull)
    }

    /// Blocks in `RG_TBL24`.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Blocks free now or after a grace period.
    pub fn available(&self) -> u32 {
        u32::try_from(self.free.len() + self.pending.len()).expect("<= capacity")
    }

    /// Gives back the memory of the chunks mapped so far.
    pub fn release(&mut self) {
        self.top.release();
        self.blocks.release();
    }
}

/// /16 slots of the IPv4 table.
pub const SLOTS: usize = 1 << 16;

/// A `BPF_F_MMAPABLE` array mapped into the agent's memory. Pages count
/// toward the agent's RSS only once touched, so readers follow links rather
/// than scan.
pub struct MmapArray {
    /// Mapped a chunk at a time: indices are allocated from the bottom, so
    /// only the part in use costs RSS.
    region: Region,
    value_size: usize,
    entries: u32,
}

impl MmapArray {
    /// Maps `map`, after checking it is a mmapable array of `entries`
    /// values (any number from 2 up to `entries` when `sized`: the agent
    /// sizes it) of `value_size` bytes (a multiple of 8, as the kernel lays
    /// mmapable arrays out).
    fn new(
        name: &'static str,
        map: MapData,
        value_size: usize,
        entries: u32,
        sized: bool,
    ) -> Result<MmapArray, LoadError> {
        const BPF_F_MMAPABLE: u32 = 1 << 10;
        assert!(value_size.is_multiple_of(8), "mmapable array values are 8-byte aligned");
        let info = map.info().map_err(|source| LoadError::MapType { name, source })?;
        let count_ok = if sized {
            (2..=entries).contains(&info.max_entries())
        } else {
            info.max_entries() == entries
        };
        if info.value_size() as usize != value_size || !count_ok || info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(LoadError::MapLayout {
                name,
                what: format!(
                    "value size {}, {} entries, flags {:#x}; expected {value_size}, {}{entries}, mmapable",
                    info.value_size(),
                    info.max_entries(),
                    info.map_flags(),
                    if sized { "at most " } else { "" }
                ),
            });
        }
        let entries = info.max_entries();
        let bytes = value_size * entries as usize;
        let region = Region::new(map, bytes).map_err(|source| LoadError::Pin {
            op: "mmap",
            path: name.into(),
            source,
        })?;
        Ok(MmapArray {
            region,
            value_size,
            entries,
        })
    }

    /// The `u32` at word `word` of value `index`, or None out of range.
    fn word(&self, index: u32, word: usize) -> Option<&std::sync::atomic::AtomicU32> {
        if index >= self.entries || (word + 1) * 4 > self.value_size {
            return None;
        }
        // SAFETY: in bounds (checked), 4-byte aligned (values are 8-byte
        // aligned in a page-aligned mapping), inside the live mapping; the
        // memory is shared with the kernel, so only atomic access is used.
        Some(unsafe {
            std::sync::atomic::AtomicU32::from_ptr(
                self.region.at(index as usize * self.value_size + word * 4, 4).cast(),
            )
        })
    }

    /// Value `index` as raw bytes copied out (None out of range).
    fn read<T: Copy + Default>(&self, index: u32) -> Option<T> {
        if index >= self.entries || size_of::<T>() > self.value_size {
            return None;
        }
        // SAFETY: in bounds, aligned for T (align <= 8), inside the mapping;
        // T is plain data (integers only).
        Some(unsafe {
            self.region
                .at(index as usize * self.value_size, size_of::<T>())
                .cast::<T>()
                .read_volatile()
        })
    }

    /// Writes value `index` whole. Only for values nothing links yet.
    fn write<T: Copy>(&self, index: u32, v: T) {
        assert!(index < self.entries && size_of::<T>() <= self.value_size);
        // SAFETY: in bounds (checked), aligned, inside the mapping.
        unsafe {
            self.region
                .at(index as usize * self.value_size, size_of::<T>())
                .cast::<T>()
                .write_volatile(v)
        }
    }
}

/// The IPv6 trie's arrays (`RG_V6_TOP`, `RG_V6_NODES`, `RG_V6_LEAVES`),
/// mapped: the agent reads and writes them as memory.
pub struct V6Arrays {
    top: MmapArray,
    nodes: MmapArray,
    leaves: MmapArray,
}

impl V6Arrays {
    fn new(top: MapData, nodes: MapData, leaves: MapData) -> Result<V6Arrays, LoadError> {
        Ok(V6Arrays {
            top: MmapArray::new(maps::V6_TOP, top, 8, v6::TOP_ENTRIES, false)?,
            nodes: MmapArray::new(maps::V6_NODES, nodes, size_of::<V6Node>(), v6::NODE_CAPACITY, true)?,
            leaves: MmapArray::new(maps::V6_LEAVES, leaves, size_of::<V6Leaf>(), v6::LEAF_CAPACITY, true)?,
        })
    }

    /// (nodes, leaves) the maps hold (index 0 of each is never used).
    pub fn capacity(&self) -> (u32, u32) {
        (self.nodes.entries, self.leaves.entries)
    }

    /// Top-level entry `slot` (0..65536).
    pub fn top(&self, slot: usize) -> u32 {
        let s = u32::try_from(slot).expect("< TOP_SLOTS");
        self.top
            .word(s >> 1, (s & 1) as usize)
            .expect("slot < TOP_SLOTS")
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn node(&self, index: u32) -> Option<V6Node> {
        let mut n = [0u32; 16];
        for (c, e) in n.iter_mut().enumerate() {
            *e = self.nodes.word(index, c)?.load(std::sync::atomic::Ordering::Acquire);
        }
        Some(n)
    }

    pub fn leaf(&self, index: u32) -> Option<V6Leaf> {
        self.leaves.read(index)
    }

    /// What the XDP program finds for `addr`.
    pub fn lookup(&self, addr: [u8; 16]) -> V6Hit {
        walk(addr, |s| self.top(s), |i| self.node(i), |i| self.leaf(i))
    }

    /// The tables the kernel holds (following links only).
    pub fn read_tables(&self) -> V6Tables {
        V6Tables::from_kernel(
            self.nodes.entries,
            self.leaves.entries,
            |s| self.top(s),
            |i| self.node(i).unwrap_or([u32::MAX; 16]),
            |i| self.leaf(i).unwrap_or_default(),
        )
    }

    /// Performs one write of a plan. Content goes to unlinked indices as
    /// plain stores; links are single u32 stores with release ordering, so
    /// a CPU that sees the link sees the content.
    pub fn apply(&self, w: &V6Write) {
        use std::sync::atomic::Ordering::Release;
        match *w {
            V6Write::Leaf { index, leaf } => {
                self.leaves.write(index, leaf);
            }
            V6Write::Node { index, node } => {
                for (c, &e) in node.iter().enumerate() {
                    self.nodes
                        .word(index, c)
                        .expect("index < NODE_CAPACITY")
                        .store(e, Release);
                }
            }
            V6Write::NodeEntry { index, slot, value } => self
                .nodes
                .word(index, usize::from(slot))
                .expect("index < NODE_CAPACITY")
                .store(value, Release),
            V6Write::Top { slot, value } => {
                let s = slot;
                self.top
                    .word(s >> 1, (s & 1) as usize)
                    .expect("slot < TOP_SLOTS")
                    .store(value, Release);
            }
        }
    }
}

impl Maps {
    /// Typed handles from the maps of a loaded object, or opened from pins.
    pub fn from_source(mut get: impl FnMut(&'static str) -> Result<Map, LoadError>) -> Result<Maps, LoadError> {
        fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(name: &'static str, m: Map) -> Result<T, LoadError> {
            T::try_from(m).map_err(|source| LoadError::MapType { name, source })
        }
        let mut array = |name| match get(name)? {
            Map::Array(data) => Ok(data),
            _ => Err(LoadError::NoMap { name }),
        };
        let tbl24 = Tbl24::new(array(maps::TBL16)?, array(maps::TBL24)?)?;
        let v6 = V6Arrays::new(array(maps::V6_TOP)?, array(maps::V6_NODES)?, array(maps::V6_LEAVES)?)?;
        // A second handle on RG_LONG24 (a dup of its fd), so a sync can
        // insert long blocks from two threads.
        let long24 = get(maps::LONG24)?;
        let (long24_aux, long24_capacity) = match &long24 {
            Map::HashMap(data) => {
                let capacity = data
                    .info()
                    .map_err(|source| LoadError::MapType {
                        name: maps::LONG24,
                        source,
                    })?
                    .max_entries();
                use std::os::fd::AsFd as _;
                let fd = data
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| LoadError::Pin {
                        op: "dup",
                        path: maps::LONG24.into(),
                        source,
                    })?;
                let dup = MapData::from_fd(fd).map_err(|source| LoadError::MapType {
                    name: maps::LONG24,
                    source,
                })?;
                (typed(maps::LONG24, Map::HashMap(dup))?, capacity)
            }
            _ => return Err(LoadError::NoMap { name: maps::LONG24 }),
        };
        Ok(Maps {
            ports: typed(maps::PORTS, get(maps::PORTS)?)?,
            tbl24,
            long24: typed(maps::LONG24, long24)?,
            long24_aux,
            long24_capacity,
            masks: typed(maps::MASKS, get(maps::MASKS)?)?,
            v6,
            ifaces: typed(maps::IFACES, get(maps::IFACES)?)?,
            settings: typed(maps::SETTINGS, get(maps::SETTINGS)?)?,
            counters: Arc::new(Mutex::new(typed(maps::COUNTERS, get(maps::COUNTERS)?)?)),
            sources: typed(maps::SOURCES, get(maps::SOURCES)?)?,
        })
    }

    /// Gives `ifindex` a counter slot (kept if it has one), so its packets
    /// are counted under its own name. A new slot's counters are zeroed.
    pub fn register_iface(&mut self, ifindex: u32) -> Result<u32, LoadError> {
        let err = |source| LoadError::MapType {
            name: maps::IFACES,
            source,
        };
        let mut used = [false; IFACE_SLOTS as usize];
        let at = ifindex & (IFACE_TABLE - 1);
        let here = self.ifaces.get(&at, 0).map_err(err)?;
        if here.ifindex == ifindex && here.slot != 0 {
            return Ok(here.slot);
        }
        for i in 0..IFACE_TABLE {
            let e = self.ifaces.get(&i, 0).map_err(err)?;
            if e.slot != 0 && (e.slot as usize) < used.len() {
                used[e.slot as usize] = true;
            }
        }
        let Some(slot) = (1..IFACE_SLOTS).find(|&s| !used[s as usize]) else {
            warn!(
                ifindex,
                "no free interface counter slot: counted as interface \"other\""
            );
            return Ok(0);
        };
        self.zero_counters(|i, _| i == slot)?;
        self.ifaces.set(at, IfaceSlot { ifindex, slot }, 0).map_err(err)?;
        Ok(slot)
    }

    /// Hands the counter slot of `old` (a device that is gone) to `new` (the
    /// device that took its name), counters kept, so an interface deleted and
    /// created again counts on under its name and does not use up a slot each
    /// time. Returns false (nothing changed) when `old` has no slot.
    pub fn move_iface_slot(&mut self, old: u32, new: u32) -> Result<bool, LoadError> {
        let err = |source| LoadError::MapType {
            name: maps::IFACES,
            source,
        };
        let from = old & (IFACE_TABLE - 1);
        let e = self.ifaces.get(&from, 0).map_err(err)?;
        if e.ifindex != old || e.slot == 0 || old == new {
            return Ok(false);
        }
        self.ifaces
            .set(
                new & (IFACE_TABLE - 1),
                IfaceSlot {
                    ifindex: new,
                    slot: e.slot,
                },
                0,
            )
            .map_err(err)?;
        if from != new & (IFACE_TABLE - 1) {
            self.ifaces
                .set(from, IfaceSlot { ifindex: 0, slot: 0 }, 0)
                .map_err(err)?;
        }
        Ok(true)
    }

    /// Zeroes every counter whose (iface slot, port slot) matches `pick`.
    pub fn zero_counters(&mut self, pick: impl Fn(u32, u32) -> bool) -> Result<(), LoadError> {
        let err = |source| LoadError::MapType {
            name: maps::COUNTERS,
            source,
        };
        let ncpu = aya::util::nr_cpus().map_err(|(path, source)| LoadError::Pin {
            op: "read",
            path: path.into(),
            source,
        })?;
        let mut counters = self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for i in 0..IFACE_SLOTS {
            for p in 0..COUNTER_PORT_SLOTS {
                if !pick(i, p) {
                    continue;
                }
                for f in [
                    relay_guard_common::family::IPV4,
                    relay_guard_common::family::IPV6,
                    relay_guard_common::family::UNKNOWN,
                ] {
                    for v in 0..VERDICT_SLOTS as u8 {
                        let zeros = PerCpuValues::try_from(vec![0u64; ncpu]).map_err(|source| LoadError::Pin {
                            op: "size per-CPU values for",
                            path: maps::COUNTERS.into(),
                            source,
                        })?;
                        counters.set(counter_index(i, p, f, v), zeros, 0).map_err(err)?;
                    }
                }
            }
        }
        Ok(())
    }
}
