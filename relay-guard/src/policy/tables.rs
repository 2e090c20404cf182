//! IPv4 lookup tables (DIR-24-8 style) compiled from a [`Policy`]. Pure: no
//! aya types, no I/O.
//!
//! `tbl24` has one entry per /24 block: a mask index (into a palette of the
//! distinct allow masks), or [`LONG_BLOCK`] when the block holds prefixes
//! longer than /24, whose hosts then have their own 256 entries in `long`.
//! Painting prefixes from short to long makes every entry hold the mask of
//! the longest stored prefix containing it, which is exactly what
//! [`Policy::lookup`] computes; a property test checks the two agree.
use std::collections::{BTreeMap, HashMap};

use relay_guard_common::{AllowMask, LONG_BLOCK, LongBlock, MAX_MASKS};

#[cfg(test)]
use crate::policy::Policy;

/// Number of /24 blocks.
pub const BLOCKS: usize = 1 << 24;

/// Mask index assignment, stable across syncs: a mask keeps its index for as
/// long as it is in use, and a new mask only takes an index that the tables
/// in the kernel do not reference (so no reader ever sees a reused index
/// with a new meaning).
#[derive(Debug, Clone)]
pub struct Palette {
    /// index → mask; index 0 is 0 (no match).
    pub masks: Vec<u64>,
    by_mask: HashMap<u64, u16>,
    /// Indices that were free when the palette was read from the kernel.
    free: Vec<u16>,
    /// Indices handed out since [`Palette::take_allocated`] last ran: their
    /// masks must reach the kernel before any table references them.
    allocated: Vec<u16>,
    /// Indices released by the current sync: free only from the next one,
    /// so no reader that still holds one sees it with a new meaning.
    released: Vec<u16>,
}

impl Palette {
    /// A palette from the kernel's `RG_MASKS` contents (all zero when new).
    pub fn from_kernel(masks: Vec<u64>) -> Palette {
        let mut by_mask = HashMap::new();
        let mut free = Vec::new();
        for (i, &m) in masks.iter().enumerate().skip(1) {
            let i = u16::try_from(i).expect("MAX_MASKS fits u16");
            if m == 0 {
                free.push(i);
            } else {
                by_mask.entry(m).or_insert(i);
            }
        }
        free.reverse();
        Palette {
            masks,
            by_mask,
            free,
            allocated: Vec::new(),
            released: Vec::new(),
        }
    }

    /// An empty palette (nothing in the kernel yet).
    pub fn new() -> Palette {
        Palette::from_kernel(vec![0; MAX_MASKS as usize])
    }

    /// The index of `mask`, allocating one if needed; None when full.
    pub fn index(&mut self, mask: u64) -> Option<u16> {
        if mask == 0 {
            return Some(0);
        }
        if let Some(&i) = self.by_mask.get(&mask) {
            return Some(i);
        }
        let i = self.free.pop()?;
        self.masks[usize::from(i)] = mask;
        self.by_mask.insert(mask, i);
        self.allocated.push(i);
        Some(i)
    }

    /// The indices allocated since the last call.
    pub fn take_allocated(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.allocated)
    }

    /// Marks index `i` unused (its kernel entry is being cleared). It is
    /// handed out again only after [`Palette::recycle`].
    pub fn release(&mut self, i: u16) {
        let m = std::mem::take(&mut self.masks[usize::from(i)]);
        if self.by_mask.get(&m) == Some(&i) {
            self.by_mask.remove(&m);
        }
        self.released.push(i);
    }

    /// Makes the indices released by an earlier sync available again.
    pub fn recycle(&mut self) {
        self.free.append(&mut self.released);
    }
}

impl Default for Palette {
    fn default() -> Self {
        Palette::new()
    }
}

/// A /24 block holding prefixes longer than /24, kept compact (the 256
/// host entries are materialized only when written to the kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongSpec {
    /// Mask index of the hosts no longer prefix covers.
    pub base: u16,
    /// (prefix length, first host, mask index), sorted by length.
    pub prefixes: Vec<(u8, u8, u16)>,
}

impl LongSpec {
    /// The 256 host entries, painted short to long.
    pub fn hosts(&self) -> Box<LongBlock> {
        let mut hosts: Box<LongBlock> = Box::new([self.base; 256]);
        for &(len, start, idx) in &self.prefixes {
            let count = 1usize << (32 - u32::from(len));
            hosts[usize::from(start)..usize::from(start) + count].fill(idx);
        }
        hosts
    }
}

/// The compiled IPv4 tables, built whole: the reference the unit tests
/// hold [`paint_range`] (what production paints, a range at a time) to.
#[cfg(test)]
pub struct V4Tables {
    /// One entry per /24 block.
    pub tbl24: Vec<u16>,
    /// Blocks marked [`LONG_BLOCK`].
    pub long: BTreeMap<u32, LongSpec>,
    /// Mask indices referenced by the tables.
    pub used: Vec<bool>,
}

/// The palette ran out of mask indices.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("more than {} distinct guard combinations", MAX_MASKS - 1)]
pub struct PaletteFull;

#[cfg(test)]
impl V4Tables {
    pub fn build(v4: &BTreeMap<(u8, [u8; 4]), AllowMask>, palette: &mut Palette) -> Result<V4Tables, PaletteFull> {
        let mut tbl24 = vec![0u16; BLOCKS];
        let mut short: Vec<(u8, u32, u16)> = Vec::new();
        let mut long_prefixes: BTreeMap<u32, Vec<(u8, u32, u16)>> = BTreeMap::new();
        for (&(len, addr), m) in v4 {
            let idx = palette.index(m.allow).ok_or(PaletteFull)?;
            let a = u32::from_be_bytes(addr);
            if len <= 24 {
                short.push((len, a, idx));
            } else {
                long_prefixes.entry(a >> 8).or_default().push((len, a, idx));
            }
        }
        short.sort_unstable_by_key(|&(len, _, _)| len);
        for (len, a, idx) in short {
            let start = (a >> 8) as usize;
            let count = 1usize << (24 - u32::from(len));
            tbl24[start..start + count].fill(idx);
        }
        let mut long = BTreeMap::new();
        for (block, mut prefixes) in long_prefixes {
            prefixes.sort_unstable_by_key(|&(len, _, _)| len);
            let spec = LongSpec {
                base: tbl24[block as usize],
                prefixes: prefixes
                    .into_iter()
                    .map(|(len, a, idx)| (len, (a & 0xff) as u8, idx))
                    .collect(),
            };
            tbl24[block as usize] = LONG_BLOCK;
            long.insert(block, spec);
        }
        let mut used = vec![false; MAX_MASKS as usize];
        for &e in &tbl24 {
            if e & LONG_BLOCK == 0 {
                used[usize::from(e)] = true;
            }
        }
        for spec in long.values() {
            used[usize::from(spec.base)] = true;
            for &(_, _, idx) in &spec.prefixes {
                used[usize::from(idx)] = true;
            }
        }
        Ok(V4Tables { tbl24, long, used })
    }

    /// The allow mask the kernel finds for `addr` in these tables.
    pub fn lookup(&self, addr: [u8; 4], palette: &Palette) -> u64 {
        let a = u32::from_be_bytes(addr);
        let mut idx = self.tbl24[(a >> 8) as usize];
        if idx & LONG_BLOCK != 0 {
            idx = self
                .long
                .get(&(a >> 8))
                .map_or(0, |spec| spec.hosts()[(a & 0xff) as usize]);
        }
        palette.masks.get(usize::from(idx)).copied().unwrap_or(0)
    }
}

/// The /24 entries and long blocks of blocks `start..end`, an aligned
/// range of `2^(24 - l)` blocks (the blocks of one /`l` prefix): what a
/// whole build of the tables (`V4Tables::build`, in the tests) gives for
/// them, computed from the prefixes that overlap the range only. Entries of long blocks are [`LONG_BLOCK`].
pub struct RangePaint {
    pub tbl: Vec<u16>,
    pub long: BTreeMap<u32, LongSpec>,
}

fn mask_v4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

pub fn paint_range(
    v4: &BTreeMap<(u8, [u8; 4]), AllowMask>,
    palette: &mut Palette,
    start: u32,
    end: u32,
    l: u8,
) -> Result<RangePaint, PaletteFull> {
    debug_assert_eq!(end - start, 1 << (24 - u32::from(l)));
    let first = start << 8;
    let last = ((end - 1) << 8) | 0xff;
    // The longest stored prefix shorter than the range that contains it.
    let mut base = 0u16;
    for len in (0..l).rev() {
        if let Some(m) = v4.get(&(len, mask_v4(first, len).to_be_bytes())) {
            base = palette.index(m.allow).ok_or(PaletteFull)?;
            break;
        }
    }
    let mut tbl = vec![base; (end - start) as usize];
    // Short to long: the longest prefix containing a block paints it last.
    for len in l..=24 {
        for (&(_, a), m) in v4.range((len, first.to_be_bytes())..=(len, last.to_be_bytes())) {
            let idx = palette.index(m.allow).ok_or(PaletteFull)?;
            let s = ((u32::from_be_bytes(a) >> 8) - start) as usize;
            tbl[s..s + (1usize << (24 - u32::from(len)))].fill(idx);
        }
    }
    let mut long: BTreeMap<u32, LongSpec> = BTreeMap::new();
    for len in 25..=32u8 {
        for (&(_, a), m) in v4.range((len, first.to_be_bytes())..=(len, last.to_be_bytes())) {
            let idx = palette.index(m.allow).ok_or(PaletteFull)?;
            let a = u32::from_be_bytes(a);
            let block = a >> 8;
            let slot = &mut tbl[(block - start) as usize];
            let spec = long.entry(block).or_insert_with(|| LongSpec {
                base: *slot,
                prefixes: Vec::new(),
            });
            *slot = LONG_BLOCK;
            spec.prefixes.push((len, (a & 0xff) as u8, idx));
        }
    }
    Ok(RangePaint { tbl, long })
}

/// Checks tables against the policy they came from.
#[cfg(test)]
pub fn agrees(policy: &Policy, tables: &V4Tables, palette: &Palette, addr: [u8; 4]) -> bool {
    let want = (0..=32u8).rev().find_map(|len| {
        let a = u32::from_be_bytes(addr);
        let m = if len == 0 {
            0
        } else {
            a & (u32::MAX << (32 - u32::from(len)))
        };
        policy.v4.get(&(len, m.to_be_bytes())).map(|m| m.allow)
    });
    want.unwrap_or(0) == tables.lookup(addr, palette)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(entries: &[(u8, [u8; 4], u64)]) -> Policy {
        let mut p = Policy::default();
        for &(len, a, m) in entries {
            p.v4.insert((len, a), AllowMask { allow: m });
        }
        p
    }

    #[test]
    fn nested_prefixes_paint_longest_last() {
        let p = policy(&[
            (24, [192, 0, 2, 0], 1),
            (25, [192, 0, 2, 128], 0),
            (32, [192, 0, 2, 129], 1),
            (8, [10, 0, 0, 0], 3),
        ]);
        let mut pal = Palette::new();
        let t = V4Tables::build(&p.v4, &mut pal).expect("fits");
        assert_eq!(t.lookup([192, 0, 2, 10], &pal), 1);
        assert_eq!(t.lookup([192, 0, 2, 200], &pal), 0);
        assert_eq!(t.lookup([192, 0, 2, 129], &pal), 1);
        assert_eq!(t.lookup([10, 200, 3, 4], &pal), 3);
        assert_eq!(t.lookup([11, 0, 0, 1], &pal), 0);
        assert_eq!(t.tbl24[0xc00002], LONG_BLOCK);
        assert_eq!(t.long.len(), 1);
    }

    #[test]
    fn palette_keeps_indices_and_never_reuses_a_referenced_one() {
        let mut pal = Palette::new();
        let a = pal.index(5).expect("room");
        let b = pal.index(6).expect("room");
        assert_ne!(a, b);
        assert_eq!(pal.index(5), Some(a));
        // Read back from "the kernel": 5 and 6 stay where they are; a new mask gets a free index.
        let mut again = Palette::from_kernel(pal.masks.clone());
        assert_eq!(again.index(6), Some(b));
        let c = again.index(7).expect("room");
        assert!(c != a && c != b);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn painting_a_range_gives_what_a_full_build_gives(
            entries in proptest::collection::vec((0u8..=32, 0u32..4096, 0u64..8), 0..60),
            l in 8u8..=24,
        ) {
            let base = u32::from_be_bytes([198, 51, 96, 0]);
            let mut p = Policy::default();
            for (len, off, m) in entries {
                let a = base.wrapping_add(off * 7);
                let net = if len == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(len))) };
                p.v4.insert((len, net.to_be_bytes()), AllowMask { allow: m });
            }
            let mut pal = Palette::new();
            let t = V4Tables::build(&p.v4, &mut pal).expect("fits");
            // The range of the /l holding the cluster, and its neighbour.
            for start in [base >> 8 & !((1u32 << (24 - u32::from(l))) - 1), 0] {
                let end = start + (1u32 << (24 - u32::from(l)));
                let r = paint_range(&p.v4, &mut pal, start, end, l).expect("fits");
                for b in start..end {
                    prop_assert_eq!(r.tbl[(b - start) as usize], t.tbl24[b as usize]);
                    let mut want = t.long.get(&b).cloned();
                    if let Some(w) = &mut want {
                        w.prefixes.sort_by_key(|&(len, host, _)| (len, host));
                    }
                    prop_assert_eq!(r.long.get(&b), want.as_ref());
                }
            }
        }

        #[test]
        fn tables_agree_with_longest_prefix(
            entries in proptest::collection::vec((8u8..=32, 0u32..4096, 0u64..8), 0..60),
            probes in proptest::collection::vec(0u32..4096, 64),
        ) {
            // Addresses clustered in 198.51.96.0/20 (shifted) so prefixes nest and collide.
            let base = u32::from_be_bytes([198, 51, 96, 0]);
            let mut p = Policy::default();
            for (len, off, m) in entries {
                let a = base.wrapping_add(off * 7);
                let net = a & (u32::MAX << (32 - u32::from(len)));
                p.v4.insert((len, net.to_be_bytes()), AllowMask { allow: m });
            }
            let mut pal = Palette::new();
            let t = V4Tables::build(&p.v4, &mut pal).expect("fits");
            for off in probes {
                let a = base.wrapping_add(off * 3).to_be_bytes();
                prop_assert!(agrees(&p, &t, &pal, a), "disagree at {:?}", a);
            }
        }
    }
}
