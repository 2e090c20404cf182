//! IPv6 lookup tables: a multibit trie compiled from [`Policy::v6`]. Pure: no
//! aya types, no I/O.
//!
//! The top level has one entry per top 20 address bits; each node has 16
//! entries for the next 4 bits. An entry (see [`relay_guard_common::v6`]) is
//! a mask index (shared palette with IPv4, 0: deny), a node index, or a leaf
//! index. Prefixes whose length is not a level boundary are expanded over the
//! entries they cover (controlled prefix expansion), and every terminal entry
//! holds the mask of the longest prefix containing its range (leaf pushing).
//!
//! Path compression, with one kind of record ([`V6Leaf`]: a prefix, an
//! `inside` entry for addresses in it, an `outside` mask for the rest of the
//! entry's range), decided by one masked compare:
//!
//! - a subtree that holds exactly one stored prefix longer than its depth is
//!   a *leaf* (`inside` is the prefix's mask), so a random /128 costs one
//!   leaf, not 27 nodes;
//! - a subtree whose stored prefixes (two or more) all lie inside one range
//!   /D at least two levels below it, all longer than D, is a *skip* to the
//!   node at depth D (`inside` is that node, `len` D). The nodes it stands
//!   for would be a chain with one non-terminal entry each, and every other
//!   entry of the chain would hold the same mask, the subtree's inherited
//!   one (no stored prefix ends in the chain, so leaf pushing gives them all
//!   the mask of the longest prefix containing the subtree): that is
//!   `outside`. A chain beside which a prefix ends is cut there: above it a
//!   skip (or nodes), at it a node.
//!
//! So every node on a path (but the top level) either branches or has a
//! prefix ending in it, and a walk is at most 27 steps, nodes or leaves: a
//! source next to /128s that share all but their last bits reads one skip
//! and one node below their common ancestor, not a chain of nodes.
//!
//! # Updates without a gap
//!
//! A [`V6Tables`] mirrors what the kernel arrays hold. [`V6Tables::build`]
//! (every top slot) and [`V6Tables::update`] (only the top slots that the
//! changed prefixes touch) rewrite it toward a policy and return the kernel
//! writes, in an order that keeps every concurrent lookup on the old or the
//! new verdict:
//!
//! - a node keeps its index while a node exists at its path (its depth and
//!   address bits, whether the path above it is nodes or a skip), and only
//!   its changed entries are written (one aligned `u32` store each);
//! - new content (a node that did not exist, a leaf) goes into an index no
//!   entry references, written completely before the one store that links
//!   it ([`V6Plan::writes`] is ordered children before parents);
//! - leaves are never changed in place: a different leaf is a new index (a
//!   new skip may lead to a kept node; a kept leaf may move below a new node);
//! - indices freed by one call are not reused by that call (quarantine), only
//!   by later ones, when no lookup can still be inside the old subtree;
//! - mask indices come from the [`Palette`], which keeps them stable while
//!   referenced ([`V6Tables::mark_used`] adds the IPv6 references).
//!
//! An address's verdict is decided by the entries its walk reads. Of those,
//! the entries that lead to a kept node (or kept leaf) by way of new content
//! only ever lead to it, and a skip's `outside` and `inside` are never both
//! read, so a lookup depends on at most one changed entry: before it, it
//! reads only unchanged entries; after it, only the complete old or the
//! complete new subtree (a kept node's entries each change once).
use std::collections::BTreeMap;

use relay_guard_common::{AllowMask, MAX_MASKS, V6Leaf, V6Node, v6};

use crate::policy::tables::{Palette, PaletteFull};

/// Depth (address bits consumed) of the top level.
const TOP_DEPTH: u8 = v6::TOP_BITS as u8;
/// Entry value that is never written: the kernel's entry must be rewritten.
const INVALID: u32 = u32::MAX;

/// One kernel write, in the order [`V6Plan::writes`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V6Write {
    /// A leaf at an index nothing references yet.
    Leaf { index: u32, leaf: V6Leaf },
    /// A whole node at an index nothing references yet.
    Node { index: u32, node: V6Node },
    /// One entry of a linked node: a single aligned `u32` store.
    NodeEntry { index: u32, slot: u8, value: u32 },
    /// One top-level entry: a single aligned `u32` store.
    Top { slot: u32, value: u32 },
}

/// What a [`V6Tables::build`] or [`V6Tables::update`] changed.
#[derive(Debug, Clone, Default)]
pub struct V6Plan {
    /// Kernel writes, children before the entries that link them.
    pub writes: Vec<V6Write>,
    /// Node indices no longer linked (quarantined until the next call).
    pub freed_nodes: Vec<u32>,
    /// Leaf indices no longer linked (quarantined until the next call).
    pub freed_leaves: Vec<u32>,
}

/// A capacity of the IPv6 tables, or the mask palette, is exhausted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum V6Full {
    #[error(
        "the IPv6 trie needs more than {0} nodes (map RG_V6_NODES is full; nodes freed by a sync are reused from the next one)"
    )]
    Nodes(u32),
    #[error(
        "the IPv6 trie needs more than {0} leaves (map RG_V6_LEAVES is full; leaves freed by a sync are reused from the next one)"
    )]
    Leaves(u32),
    #[error(transparent)]
    Palette(#[from] PaletteFull),
}

/// What a lookup found: the mask index and the deciding unit (the range of
/// the terminal entry, or the leaf's prefix), as (length, network address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6Hit {
    pub mask_index: u16,
    pub len: u8,
    pub net: [u8; 16],
    /// Nodes read on the way.
    pub nodes: u8,
    /// Skips followed on the way (the address inside their prefix).
    pub skips: u8,
    /// What ended the walk.
    pub end: V6End,
}

/// The kind of entry that decided a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6End {
    /// A mask entry (a prefix ending at, or expanded over, this range).
    Mask,
    /// A leaf, the address inside its prefix.
    LeafInside,
    /// A leaf, the address outside its prefix.
    LeafOutside,
    /// A skip, the address outside the range it skips to (its chain's mask).
    SkipOutside,
    /// A link the walk could not follow: deny.
    Broken,
}

/// The IPv6 trie as the kernel holds it (or will, once the plan is written).
#[derive(Debug, Clone)]
pub struct V6Tables {
    /// One entry per top 20 bits.
    pub top: Vec<u32>,
    /// Node contents by index (index 0 unused; unlinked indices are stale).
    nodes: Vec<V6Node>,
    /// Leaf contents by index (index 0 unused).
    leaves: Vec<V6Leaf>,
    /// Allocatable indices (lowest last), below `nodes.len()` / `leaves.len()`.
    free_nodes: Vec<u32>,
    free_leaves: Vec<u32>,
    /// Freed by the current call; allocatable from the next one.
    quarantine_nodes: Vec<u32>,
    quarantine_leaves: Vec<u32>,
    /// Indices a kernel entry may still name although it is rewritten
    /// (see [`V6Tables::from_kernel`]): quarantined for the first call.
    held_nodes: Vec<u32>,
    held_leaves: Vec<u32>,
    node_cap: u32,
    leaf_cap: u32,
    live_nodes: u32,
    live_leaves: u32,
    /// The current call's number, and per index the last call that settled
    /// it (kept, written or freed): a freeing walk stops there.
    call: u32,
    node_call: Vec<u32>,
    leaf_call: Vec<u32>,
}

/// A stored prefix below the top level: address, length, mask index.
#[derive(Debug, Clone, Copy)]
struct P {
    addr: u128,
    len: u8,
    idx: u16,
}

fn mask128(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

/// The 4 address bits a node at `depth` consumes.
fn nibble(a: u128, depth: u8) -> usize {
    ((a >> (124 - u32::from(depth))) & 15) as usize
}

fn top_slot(a: u128) -> usize {
    (a >> (128 - u32::from(TOP_DEPTH))) as usize
}

/// Whether `addr` lies inside the leaf's prefix.
/// (A length over 128 compares all 128 bits, as the XDP program does.)
pub fn leaf_contains(leaf: &V6Leaf, addr: [u8; 16]) -> bool {
    mask128(u128::from_be_bytes(addr), leaf.len.min(128)) == u128::from_be_bytes(leaf.addr)
}

/// Whether the leaf is a skip (its `inside` is a node).
pub fn is_skip(leaf: &V6Leaf) -> bool {
    leaf.inside & v6::TAG == v6::NODE
}

/// The lookup the XDP program does, over any reader of the three arrays
/// (`node`/`leaf` return None for an index the array does not have). Any
/// failure is a deny (mask index 0).
pub fn walk(
    addr: [u8; 16],
    top: impl Fn(usize) -> u32,
    node: impl Fn(u32) -> Option<V6Node>,
    leaf: impl Fn(u32) -> Option<V6Leaf>,
) -> V6Hit {
    let a = u128::from_be_bytes(addr);
    let mut hit = V6Hit {
        mask_index: 0,
        len: TOP_DEPTH,
        net: [0; 16],
        nodes: 0,
        skips: 0,
        end: V6End::Mask,
    };
    let mut depth = TOP_DEPTH;
    // The leaf whose inside the walk took last, and whether it was a skip.
    let mut inside: Option<V6Leaf> = None;
    let mut e = top(top_slot(a));
    for _ in 0..v6::NODE_LEVELS {
        match e & v6::TAG {
            v6::NODE => {
                let n = match node(e & v6::INDEX) {
                    Some(n) if depth <= 124 && depth.is_multiple_of(4) => n,
                    _ => return broken(a, depth, hit),
                };
                e = n[nibble(a, depth)];
                depth += 4;
                hit.nodes += 1;
                inside = None;
            }
            v6::LEAF => {
                let Some(l) = leaf(e & v6::INDEX) else {
                    return broken(a, depth, hit);
                };
                if leaf_contains(&l, addr) {
                    e = l.inside;
                    depth = l.len;
                    if is_skip(&l) {
                        hit.skips += 1;
                    }
                    inside = Some(l);
                } else {
                    e = u32::from(l.outside);
                    hit.end = if is_skip(&l) {
                        V6End::SkipOutside
                    } else {
                        V6End::LeafOutside
                    };
                    break;
                }
            }
            _ => break,
        }
    }
    if e & v6::TAG != 0 {
        return broken(a, depth, hit);
    }
    hit.mask_index = u16::try_from(e).ok().filter(|&i| u32::from(i) < MAX_MASKS).unwrap_or(0);
    hit.len = depth.min(128);
    hit.net = mask128(a, hit.len).to_be_bytes();
    if let Some(l) = inside.filter(|l| !is_skip(l)) {
        hit.end = V6End::LeafInside;
        hit.net = l.addr;
    }
    hit
}

/// The trie read back as prefixes with the value `val` gives each mask
/// index (entries the walk could not follow: 0). Runs of equal top-level
/// entries become aligned prefixes, node entries their ranges, a leaf its
/// entry's range (`outside`) and its prefix (`inside`); a prefix is only
/// stored where its value differs from the one a shorter stored prefix
/// gives, and zero is never stored at the top. The longest stored prefix
/// containing an address then has the value of what [`walk`] finds for it.
pub fn prefixes(
    top: impl Fn(usize) -> u32,
    node: impl Fn(u32) -> Option<V6Node>,
    leaf: impl Fn(u32) -> Option<V6Leaf>,
    val: &dyn Fn(u32) -> u64,
) -> BTreeMap<(u8, [u8; 16]), AllowMask> {
    struct Reader<'a, N, L> {
        node: N,
        leaf: L,
        val: &'a dyn Fn(u32) -> u64,
        out: BTreeMap<(u8, [u8; 16]), AllowMask>,
    }
    impl<N: Fn(u32) -> Option<V6Node>, L: Fn(u32) -> Option<V6Leaf>> Reader<'_, N, L> {
        fn put(&mut self, len: u8, a: u128, v: u64, parent: u64) {
            if v != parent {
                self.out.insert((len, a.to_be_bytes()), AllowMask { allow: v });
            }
        }

        /// Entry `e` covering (`depth`, `addr`), under a stored value `parent`.
        fn entry(&mut self, e: u32, depth: u8, addr: u128, parent: u64) {
            match e & v6::TAG {
                0 => self.put(depth, addr, (self.val)(e), parent),
                v6::NODE if depth <= 124 && depth.is_multiple_of(4) => match (self.node)(e & v6::INDEX) {
                    Some(n) => {
                        for (c, &child) in n.iter().enumerate() {
                            let a = addr | ((c as u128) << (124 - u32::from(depth)));
                            self.entry(child, depth + 4, a, parent);
                        }
                    }
                    None => self.put(depth, addr, 0, parent),
                },
                v6::LEAF => match (self.leaf)(e & v6::INDEX) {
                    Some(l) if l.len > depth && l.len <= 128 => {
                        let outside = (self.val)(u32::from(l.outside));
                        self.put(depth, addr, outside, parent);
                        let la = u128::from_be_bytes(l.addr);
                        match l.inside & v6::TAG {
                            0 => self.put(l.len, la, (self.val)(l.inside), outside),
                            v6::NODE => self.entry(l.inside, l.len, la, outside),
                            _ => self.put(l.len, la, 0, outside),
                        }
                    }
                    _ => self.put(depth, addr, 0, parent),
                },
                _ => self.put(depth, addr, 0, parent),
            }
        }
    }
    let mut r = Reader {
        node,
        leaf,
        val,
        out: BTreeMap::new(),
    };
    let shift = 128 - v6::TOP_BITS;
    // A run of top slots [start, end) holding the value v, as prefixes.
    let run = |r: &mut Reader<_, _>, start: u32, end: u32, v: u64| {
        let mut s = start;
        while v != 0 && s < end {
            let mut bits = if s == 0 {
                v6::TOP_BITS
            } else {
                s.trailing_zeros().min(v6::TOP_BITS)
            };
            while s + (1 << bits) > end {
                bits -= 1;
            }
            let len = TOP_DEPTH - u8::try_from(bits).expect("<= 20");
            r.out
                .insert((len, (u128::from(s) << shift).to_be_bytes()), AllowMask { allow: v });
            s += 1 << bits;
        }
    };
    let (mut start, mut value) = (0u32, 0u64);
    for slot in 0..v6::TOP_SLOTS {
        let e = top(slot as usize);
        if e & v6::TAG == 0 {
            let v = val(e);
            if v != value {
                run(&mut r, start, slot, value);
                (start, value) = (slot, v);
            }
            continue;
        }
        run(&mut r, start, slot, value);
        (start, value) = (slot + 1, 0);
        r.entry(e, TOP_DEPTH, u128::from(slot) << shift, 0);
    }
    run(&mut r, start, v6::TOP_SLOTS, value);
    r.out
}

fn broken(a: u128, depth: u8, hit: V6Hit) -> V6Hit {
    V6Hit {
        mask_index: 0,
        len: depth.min(128),
        net: mask128(a, depth.min(128)).to_be_bytes(),
        end: V6End::Broken,
        ..hit
    }
}

/// Where a stored prefix sits below a `depth` entry holding `ps` (two or
/// more, sorted): the deepest level boundary D above every prefix's length
/// with every prefix inside one /D. A node there is the first that branches
/// or has a prefix ending in it; the levels between are a chain.
fn split_depth(depth: u8, ps: &[P]) -> u8 {
    let (first, last) = (ps[0].addr, ps[ps.len() - 1].addr);
    let common = (first ^ last).leading_zeros().min(128) as u8;
    let shortest = ps.iter().map(|p| p.len).min().unwrap_or(depth + 1);
    let d = common.min(shortest - 1) & !3;
    d.max(depth)
}

impl V6Tables {
    /// Empty tables (nothing in the kernel yet) with the kernel's capacities.
    pub fn new() -> V6Tables {
        V6Tables::with_capacity(v6::NODE_CAPACITY, v6::LEAF_CAPACITY)
    }

    /// Empty tables with the given capacities (indices 1..cap).
    pub fn with_capacity(node_cap: u32, leaf_cap: u32) -> V6Tables {
        V6Tables {
            top: vec![0; v6::TOP_SLOTS as usize],
            nodes: vec![[0; 16]],
            leaves: vec![V6Leaf::default()],
            free_nodes: Vec::new(),
            free_leaves: Vec::new(),
            quarantine_nodes: Vec::new(),
            quarantine_leaves: Vec::new(),
            held_nodes: Vec::new(),
            held_leaves: Vec::new(),
            node_cap,
            leaf_cap,
            live_nodes: 0,
            live_leaves: 0,
            call: 0,
            node_call: Vec::new(),
            leaf_call: Vec::new(),
        }
    }

    /// The tables the kernel holds, read by following links from the top
    /// (so only linked nodes and leaves are read). Indices nothing links are
    /// free. An entry the kernel could not follow, or that the builder would
    /// not write (bad tag, index out of range, a node or leaf linked twice,
    /// a node too deep, a leaf that does not fit its place), is kept as an
    /// invalid value, so the next build rewrites it; an index such an entry
    /// names is quarantined, not allocated, while the entry may still point
    /// at it.
    pub fn from_kernel(
        node_cap: u32,
        leaf_cap: u32,
        top: impl Fn(usize) -> u32,
        mut node: impl FnMut(u32) -> V6Node,
        mut leaf: impl FnMut(u32) -> V6Leaf,
    ) -> V6Tables {
        let mut t = V6Tables::with_capacity(node_cap, leaf_cap);
        let mut node_seen = vec![false; node_cap as usize];
        let mut leaf_seen = vec![false; leaf_cap as usize];
        let mut held_nodes = Vec::new();
        let mut held_leaves = Vec::new();
        // (node holding the entry, or None for the top; slot; depth).
        let mut stack: Vec<(Option<u32>, usize, u8)> = Vec::new();
        for s in 0..v6::TOP_SLOTS as usize {
            t.top[s] = top(s);
            if t.top[s] & v6::TAG != 0 {
                stack.push((None, s, TOP_DEPTH));
            }
        }
        let node_free = |i: u32, seen: &[bool]| i != 0 && i < node_cap && !seen[i as usize];
        while let Some((at, s, depth)) = stack.pop() {
            let e = match at {
                None => t.top[s],
                Some(n) => t.nodes[n as usize][s],
            };
            let i = e & v6::INDEX;
            // The node an entry (or a valid skip) links, at `depth`: taken.
            let mut take_node = |t: &mut V6Tables, i: u32, depth: u8, seen: &mut [bool], stack: &mut Vec<_>| {
                seen[i as usize] = true;
                let content = node(i);
                if t.nodes.len() <= i as usize {
                    t.nodes.resize(i as usize + 1, [0; 16]);
                }
                t.nodes[i as usize] = content;
                t.live_nodes += 1;
                for (c, &child) in content.iter().enumerate() {
                    if child & v6::TAG != 0 {
                        stack.push((Some(i), c, depth + 4));
                    }
                }
            };
            let ok = match e & v6::TAG {
                v6::NODE if depth <= 124 && node_free(i, &node_seen) => {
                    take_node(&mut t, i, depth, &mut node_seen, &mut stack);
                    true
                }
                v6::LEAF if i != 0 && i < leaf_cap && !leaf_seen[i as usize] => {
                    let l = leaf(i);
                    let fits = l.len > depth
                        && l.len <= 128
                        && u32::from(l.outside) < MAX_MASKS
                        && mask128(u128::from_be_bytes(l.addr), l.len) == u128::from_be_bytes(l.addr);
                    let next = l.inside & v6::INDEX;
                    let valid = fits
                        && match l.inside & v6::TAG {
                            0 => l.inside < MAX_MASKS,
                            v6::NODE => {
                                l.len <= 124
                                    && l.len.is_multiple_of(4)
                                    && l.len >= depth + 8
                                    && node_free(next, &node_seen)
                            }
                            _ => false,
                        };
                    leaf_seen[i as usize] = true;
                    if t.leaves.len() <= i as usize {
                        t.leaves.resize(i as usize + 1, V6Leaf::default());
                    }
                    if valid {
                        t.leaves[i as usize] = l;
                        t.live_leaves += 1;
                        if is_skip(&l) {
                            take_node(&mut t, next, l.len, &mut node_seen, &mut stack);
                        }
                    } else {
                        held_leaves.push(i);
                        // The kernel may still follow it to a node: keep that too.
                        if is_skip(&l) && node_free(next, &node_seen) {
                            node_seen[next as usize] = true;
                            held_nodes.push(next);
                        }
                    }
                    valid
                }
                v6::NODE if node_free(i, &node_seen) => {
                    // Too deep: keep the index out of allocation.
                    node_seen[i as usize] = true;
                    held_nodes.push(i);
                    false
                }
                _ => false,
            };
            if !ok {
                match at {
                    None => t.top[s] = INVALID,
                    Some(n) => t.nodes[n as usize][s] = INVALID,
                }
            }
        }
        // Held indices must lie below the high-water mark, or allocation
        // would hand them out past the free list.
        let top_held = held_nodes.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        if t.nodes.len() < top_held {
            t.nodes.resize(top_held, [0; 16]);
        }
        t.free_nodes = (1..t.nodes.len() as u32)
            .rev()
            .filter(|&i| !node_seen[i as usize])
            .collect();
        t.free_leaves = (1..t.leaves.len() as u32)
            .rev()
            .filter(|&i| !leaf_seen[i as usize])
            .collect();
        t.held_nodes = held_nodes;
        t.held_leaves = held_leaves;
        t
    }

    /// Linked (nodes, leaves).
    pub fn counts(&self) -> (u32, u32) {
        (self.live_nodes, self.live_leaves)
    }

    /// What the XDP program finds for `addr` in these tables.
    pub fn lookup(&self, addr: [u8; 16]) -> V6Hit {
        walk(
            addr,
            |s| self.top[s],
            |i| self.nodes.get(i as usize).copied(),
            |i| self.leaves.get(i as usize).copied(),
        )
    }

    /// Marks every mask index the tables reference in `used` (index → bool).
    pub fn mark_used(&self, used: &mut [bool]) {
        let mut mark = |i: u32| {
            if let Some(u) = used.get_mut(i as usize) {
                *u = true;
            }
        };
        let mut stack: Vec<u32> = self.top.clone();
        while let Some(e) = stack.pop() {
            let i = e & v6::INDEX;
            match e & v6::TAG {
                0 => mark(e),
                v6::NODE => stack.extend_from_slice(&self.nodes[i as usize]),
                v6::LEAF => {
                    let l = &self.leaves[i as usize];
                    mark(u32::from(l.outside));
                    stack.push(l.inside);
                }
                _ => {}
            }
        }
    }

    /// Rewrites every top slot toward `v6` (a full build), keeping the
    /// indices of what is already here. One call is one sync: apply its
    /// plan before the next call. On error the tables are unusable (read
    /// them again from the kernel); nothing of the plan has been written.
    pub fn build(&mut self, v6: &BTreeMap<(u8, [u8; 16]), AllowMask>, palette: &mut Palette) -> Result<V6Plan, V6Full> {
        self.begin();
        let mut short: Vec<P> = Vec::new();
        let mut deep: Vec<P> = Vec::new();
        for (&(len, addr), m) in v6 {
            let p = P {
                addr: u128::from_be_bytes(addr),
                len,
                idx: palette.index(m.allow).ok_or(PaletteFull)?,
            };
            if len <= TOP_DEPTH {
                short.push(p);
            } else {
                deep.push(p);
            }
        }
        let inh = paint_top(&mut short);
        deep.sort_unstable_by_key(|p| (p.addr, p.len));
        let mut plan = V6Plan::default();
        let mut rest = &deep[..];
        for (s, &inh) in inh.iter().enumerate() {
            let n = rest.partition_point(|p| top_slot(p.addr) == s);
            let (here, after) = rest.split_at(n);
            rest = after;
            self.rebuild_slot(s, here, inh, &mut plan)?;
        }
        Ok(plan)
    }

    /// Rewrites only the top slots that the `changed` prefixes (added,
    /// removed, or with a new mask) touch; `v6` is the whole new set. The
    /// lookups are then those of a full [`build`](Self::build) of `v6`.
    pub fn update(
        &mut self,
        v6: &BTreeMap<(u8, [u8; 16]), AllowMask>,
        changed: impl IntoIterator<Item = (u8, [u8; 16])>,
        palette: &mut Palette,
    ) -> Result<V6Plan, V6Full> {
        let mut slots: Vec<usize> = Vec::new();
        let mut all = false;
        for (len, addr) in changed {
            let a = u128::from_be_bytes(addr);
            if len <= TOP_DEPTH {
                let first = top_slot(mask128(a, len));
                let n = 1usize << (TOP_DEPTH - len);
                if n >= 4096 {
                    all = true;
                    break;
                }
                slots.extend(first..first + n);
            } else {
                slots.push(top_slot(a));
            }
        }
        slots.sort_unstable();
        slots.dedup();
        if all || slots.len() >= 4096 {
            return self.build(v6, palette);
        }
        self.begin();
        let mut plan = V6Plan::default();
        for s in slots {
            let lo = (s as u128) << (128 - u32::from(TOP_DEPTH));
            let hi = lo | ((1u128 << (128 - u32::from(TOP_DEPTH))) - 1);
            let mut inh = 0;
            for len in (0..=TOP_DEPTH).rev() {
                if let Some(m) = v6.get(&(len, mask128(lo, len).to_be_bytes())) {
                    inh = palette.index(m.allow).ok_or(PaletteFull)?;
                    break;
                }
            }
            let mut here = Vec::new();
            for len in TOP_DEPTH + 1..=128 {
                for (&(l, addr), m) in v6.range((len, lo.to_be_bytes())..=(len, hi.to_be_bytes())) {
                    here.push(P {
                        addr: u128::from_be_bytes(addr),
                        len: l,
                        idx: palette.index(m.allow).ok_or(PaletteFull)?,
                    });
                }
            }
            here.sort_unstable_by_key(|p| (p.addr, p.len));
            self.rebuild_slot(s, &here, inh, &mut plan)?;
        }
        Ok(plan)
    }

    /// Starts a call: what the previous call freed becomes allocatable.
    fn begin(&mut self) {
        self.call += 1;
        self.free_nodes.append(&mut self.quarantine_nodes);
        self.free_leaves.append(&mut self.quarantine_leaves);
        self.quarantine_nodes.append(&mut self.held_nodes);
        self.quarantine_leaves.append(&mut self.held_leaves);
        // Lowest index last: allocation stays compact (fewer pages touched).
        self.free_nodes.sort_unstable_by(|a, b| b.cmp(a));
        self.free_leaves.sort_unstable_by(|a, b| b.cmp(a));
    }

    fn rebuild_slot(&mut self, s: usize, ps: &[P], inh: u16, plan: &mut V6Plan) -> Result<(), V6Full> {
        let old = self.top[s];
        let ps = prune(ps, inh);
        let new = self.entry(
            TOP_DEPTH,
            (s as u128) << (128 - u32::from(TOP_DEPTH)),
            &ps,
            inh,
            old,
            plan,
        )?;
        if new != old {
            plan.writes.push(V6Write::Top {
                slot: u32::try_from(s).expect("< TOP_SLOTS"),
                value: new,
            });
            self.top[s] = new;
        }
        Ok(())
    }

    /// The entry for the /`depth` range at `base`: `ps` are the stored
    /// prefixes inside it longer than `depth` (sorted by address, then
    /// length), `inh` the mask index of the longest one containing the range,
    /// `old` what the range holds now: the entry there, or (below a new node)
    /// what the old tables hold for the range (see [`Self::descend`]). Pushes
    /// the writes the new subtree needs, frees what the old one no longer
    /// uses, and returns the new entry.
    fn entry(&mut self, depth: u8, base: u128, ps: &[P], inh: u16, old: u32, plan: &mut V6Plan) -> Result<u32, V6Full> {
        let new = match ps {
            [] => u32::from(inh),
            [p] => self.leaf(
                V6Leaf {
                    addr: p.addr.to_be_bytes(),
                    len: p.len,
                    outside: inh,
                    inside: u32::from(p.idx),
                    ..V6Leaf::default()
                },
                old,
                plan,
            )?,
            _ => {
                let d = split_depth(depth, ps);
                if d >= depth + 8 {
                    // A chain: a skip to the node at depth d.
                    let at = mask128(ps[0].addr, d);
                    let mut was = old;
                    let mut k = depth;
                    while k < d {
                        was = self.descend(was, k, nibble(at, k));
                        k += 4;
                    }
                    let n = self.node(d, at, ps, inh, was, plan)?;
                    self.leaf(
                        V6Leaf {
                            addr: at.to_be_bytes(),
                            len: d,
                            outside: inh,
                            inside: n,
                            ..V6Leaf::default()
                        },
                        old,
                        plan,
                    )?
                } else {
                    self.node(depth, base, ps, inh, old, plan)?
                }
            }
        };
        if new != old {
            self.free(old, plan);
        }
        Ok(new)
    }

    /// The leaf `leaf` where the old tables hold `old`: `old` itself if it is
    /// the same leaf, else a new index.
    fn leaf(&mut self, leaf: V6Leaf, old: u32, plan: &mut V6Plan) -> Result<u32, V6Full> {
        if old & v6::TAG == v6::LEAF && self.leaves[(old & v6::INDEX) as usize] == leaf {
            let unsettled = settle(&mut self.leaf_call, old & v6::INDEX, self.call);
            debug_assert!(unsettled, "leaf {} kept after it was freed", old & v6::INDEX);
            return Ok(old);
        }
        let i = self.alloc_leaf()?;
        settle(&mut self.leaf_call, i, self.call);
        self.leaves[i as usize] = leaf;
        plan.writes.push(V6Write::Leaf { index: i, leaf });
        Ok(v6::LEAF | i)
    }

    /// The node for the /`depth` range at `base` holding `ps` (as
    /// [`Self::entry`]): the old node if `old` is one (the same path), its
    /// changed entries rewritten, else a new one.
    fn node(&mut self, depth: u8, base: u128, ps: &[P], inh: u16, old: u32, plan: &mut V6Plan) -> Result<u32, V6Full> {
        let (i, fresh) = if old & v6::TAG == v6::NODE {
            (old & v6::INDEX, false)
        } else {
            (self.alloc_node()?, true)
        };
        let unsettled = settle(&mut self.node_call, i, self.call);
        debug_assert!(unsettled, "node {i} kept after it was freed");
        let mut content = if fresh { [INVALID; 16] } else { self.nodes[i as usize] };
        // Children's inherited masks: prefixes ending within this node's 4
        // bits are expanded over the children they cover, shortest first so
        // the longest wins.
        let mut child_inh = [inh; 16];
        let mut shorts: Vec<P> = ps.iter().filter(|p| p.len <= depth + 4).copied().collect();
        shorts.sort_unstable_by_key(|p| p.len);
        for p in &shorts {
            let k = u32::from(depth + 4 - p.len);
            let first = (nibble(p.addr, depth) >> k) << k;
            child_inh[first..first + (1 << k)].fill(p.idx);
        }
        let longs: Vec<P>;
        let deeper: &[P] = if shorts.is_empty() {
            ps
        } else {
            longs = ps.iter().filter(|p| p.len > depth + 4).copied().collect();
            &longs
        };
        let mut rest = deeper;
        for c in 0..16 {
            let n = rest.partition_point(|p| nibble(p.addr, depth) == c);
            let (here, after) = rest.split_at(n);
            rest = after;
            let child_base = base | ((c as u128) << (124 - u32::from(depth)));
            // A new node's children: what the old tables hold there.
            let was = if fresh { self.descend(old, depth, c) } else { content[c] };
            let e = self.entry(depth + 4, child_base, here, child_inh[c], was, plan)?;
            if !fresh && e != content[c] {
                plan.writes.push(V6Write::NodeEntry {
                    index: i,
                    slot: u8::try_from(c).expect("< 16"),
                    value: e,
                });
            }
            content[c] = e;
        }
        self.nodes[i as usize] = content;
        if fresh {
            plan.writes.push(V6Write::Node {
                index: i,
                node: content,
            });
        }
        Ok(v6::NODE | i)
    }

    /// What the old tables hold for child `c` of the /`depth` range whose
    /// old content is `e`, as an entry: a node's entry, the same skip while
    /// the child still lies above its node (or that node, at its depth), and
    /// nothing reusable (0) otherwise. So a node keeps its index, and a leaf
    /// can be kept, when the path above them changes between nodes and skips.
    fn descend(&self, e: u32, depth: u8, c: usize) -> u32 {
        let i = (e & v6::INDEX) as usize;
        match e & v6::TAG {
            v6::NODE => self.nodes[i][c],
            v6::LEAF => {
                let l = &self.leaves[i];
                let a = u128::from_be_bytes(l.addr);
                if !is_skip(l) || l.len <= depth || nibble(a, depth) != c {
                    0
                } else if l.len == depth + 4 {
                    l.inside
                } else {
                    e
                }
            }
            _ => 0,
        }
    }

    /// Frees what `e` links (a leaf, or a node, and everything below them)
    /// but what this call already settled: content it keeps (and what lies
    /// below, which its own rebuild frees) or already freed.
    fn free(&mut self, e: u32, plan: &mut V6Plan) {
        let i = e & v6::INDEX;
        match e & v6::TAG {
            v6::LEAF => {
                if !settle(&mut self.leaf_call, i, self.call) {
                    return;
                }
                self.quarantine_leaves.push(i);
                self.live_leaves -= 1;
                plan.freed_leaves.push(i);
                let inside = self.leaves[i as usize].inside;
                self.free(inside, plan);
            }
            v6::NODE => {
                if !settle(&mut self.node_call, i, self.call) {
                    return;
                }
                let content = self.nodes[i as usize];
                self.quarantine_nodes.push(i);
                self.live_nodes -= 1;
                plan.freed_nodes.push(i);
                for c in content {
                    self.free(c, plan);
                }
            }
            _ => {}
        }
    }

    fn alloc_node(&mut self) -> Result<u32, V6Full> {
        let i = match self.free_nodes.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.nodes.len()).expect("bounded by the capacity");
                if i >= self.node_cap {
                    return Err(V6Full::Nodes(self.node_cap.saturating_sub(1)));
                }
                self.nodes.push([0; 16]);
                i
            }
        };
        self.live_nodes += 1;
        Ok(i)
    }

    fn alloc_leaf(&mut self) -> Result<u32, V6Full> {
        let i = match self.free_leaves.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.leaves.len()).expect("bounded by the capacity");
                if i >= self.leaf_cap {
                    return Err(V6Full::Leaves(self.leaf_cap.saturating_sub(1)));
                }
                self.leaves.push(V6Leaf::default());
                i
            }
        };
        self.live_leaves += 1;
        Ok(i)
    }
}

impl Default for V6Tables {
    fn default() -> Self {
        V6Tables::new()
    }
}

/// `ps` (sorted by address, then length) without the prefixes that change
/// no lookup: those with the mask of the longest other prefix containing
/// them (or `inh`, the slot's). Then no stored prefix ends in a chain whose
/// other entries all hold one mask, and such a chain is always a skip.
fn prune(ps: &[P], inh: u16) -> Vec<P> {
    let mut out = Vec::with_capacity(ps.len());
    // The kept prefixes containing the current one, outermost first.
    let mut around: Vec<P> = Vec::new();
    for &p in ps {
        while around
            .last()
            .is_some_and(|q| mask128(p.addr, q.len) != q.addr || q.len >= p.len)
        {
            around.pop();
        }
        if around.last().map_or(inh, |q| q.idx) != p.idx {
            around.push(p);
            out.push(p);
        }
    }
    out
}

/// Marks index `i` settled by call `call`; false if it already was.
fn settle(calls: &mut Vec<u32>, i: u32, call: u32) -> bool {
    let i = i as usize;
    if calls.len() <= i {
        calls.resize(i + 1, 0);
    }
    let fresh = calls[i] != call;
    calls[i] = call;
    fresh
}

/// The top-level inherited mask index per slot from the prefixes of length
/// 0..=16 (painted shortest first).
fn paint_top(short: &mut [P]) -> Vec<u16> {
    short.sort_unstable_by_key(|p| p.len);
    let mut inh = vec![0u16; v6::TOP_SLOTS as usize];
    for p in short.iter() {
        let first = top_slot(p.addr);
        let n = 1usize << (TOP_DEPTH - p.len);
        inh[first..first + n].fill(p.idx);
    }
    inh
}

#[cfg(test)]
mod tests;
