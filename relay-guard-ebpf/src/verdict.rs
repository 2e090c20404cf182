//! Guarded-port lookup and the allowlist decision.
//!
//! Given map contents this is pure: the agent's policy model computes the
//! same answer from the config, and the differential tests compare the two.
//!
//! IPv4 uses a DIR-16-8-8 style table, so a lookup costs the same at 10 and
//! at 1,000,000 prefixes: one array read for the /16, one more for the /24
//! entry only when the /16 is not uniform (so the table is sized to the
//! config, not to the address space), one hash read (of the /28) only for the
//! few blocks that hold longer prefixes, one array read for the mask.
//! IPv6 uses a multibit trie with the same property: one top-level read for
//! the first 20 bits, at most 27 steps (node reads of 4 bits each, or leaf
//! reads: path compression ends lone prefixes in a leaf and skips chains of
//! single-child nodes, so a handful in practice), one mask read.
use relay_guard_common::{GuardedPort, LONG_BLOCK, MAX_GUARDS, TBL16_BLOCK, TBL24_BLOCK_ENTRIES, v6};

use crate::{LONG24, MASKS, PORTS, TBL16, TBL24, V6_LEAVES, V6_NODES, V6_TOP};

/// The owner of `port` in generation `generation` (0 or 1), if the port is
/// guarded there.
#[inline(always)]
pub fn guard_of(port: u16, generation: usize) -> Option<GuardedPort> {
    match PORTS.get(u32::from(port)) {
        Some(e) => {
            let gp = e.gens[generation & 1];
            if gp.active == 1 { Some(gp) } else { None }
        }
        None => None,
    }
}

/// Whether bit `guard` of `allow` is set.
#[inline(always)]
fn bit(allow: u64, guard: u8) -> bool {
    usize::from(guard) < MAX_GUARDS && (allow >> guard) & 1 == 1
}

#[inline(always)]
pub fn allowed_v4(src: [u8; 4], guard: u8) -> bool {
    let slot = (u32::from(src[0]) << 8) | u32::from(src[1]);
    // Two /16 slots per entry; `& 1` keeps the lane index provably in bounds.
    let Some(top) = TBL16.get(slot >> 1) else {
        return false;
    };
    let top = top[(slot & 1) as usize];
    let mut idx = if top & TBL16_BLOCK == 0 {
        // The whole /16 shares one mask index.
        top as u16
    } else {
        // Four /24 entries per entry; `& 3` keeps the lane index provably in bounds.
        let entry = (top & !TBL16_BLOCK).wrapping_mul(TBL24_BLOCK_ENTRIES) + u32::from(src[2] >> 2);
        match TBL24.get(entry) {
            Some(lanes) => lanes[usize::from(src[2] & 3)],
            // A block index past the table: fail closed.
            None => return false,
        }
    };
    if idx & LONG_BLOCK != 0 {
        let sub =
            (u32::from(src[0]) << 20) | (u32::from(src[1]) << 12) | (u32::from(src[2]) << 4) | u32::from(src[3] >> 4);
        // SAFETY: a value of LONG24 is read while the map is alive.
        idx = match unsafe { LONG24.get(&sub) } {
            // `& 15` keeps the host index provably in bounds.
            Some(hosts) => hosts[usize::from(src[3] & 15)],
            // A /28 with no entry: every host has the /24's own mask.
            None => idx & !LONG_BLOCK,
        };
    }
    if idx == 0 {
        return false;
    }
    match MASKS.get(u32::from(idx)) {
        Some(allow) => bit(*allow, guard),
        None => false,
    }
}

/// Whether `guard` allows mask index `idx` (0: deny).
#[inline(always)]
fn mask_allows(idx: u32, guard: u8) -> bool {
    if idx == 0 {
        return false;
    }
    match MASKS.get(idx) {
        Some(allow) => bit(*allow, guard),
        None => false,
    }
}

#[inline(always)]
pub fn allowed_v6(src: [u8; 16], guard: u8) -> bool {
    let hi = u64::from_be_bytes([src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7]]);
    let lo = u64::from_be_bytes([src[8], src[9], src[10], src[11], src[12], src[13], src[14], src[15]]);
    let slot = (hi >> (64 - v6::TOP_BITS)) as u32;
    // Two slots per entry; `& 1` keeps the lane index provably in bounds.
    let Some(lanes) = V6_TOP.get(slot >> 1) else {
        return false;
    };
    let mut e = lanes[(slot & 1) as usize];
    // Address bits consumed so far; a node consumes bits depth .. depth + 4.
    let mut depth = v6::TOP_BITS;
    let mut i = 0u32;
    while i < v6::NODE_LEVELS {
        let tag = e & v6::TAG;
        if tag == v6::NODE {
            // Only a skip sets the depth from the maps: a node must sit on a
            // level boundary above the last bit, or the walk denies.
            if depth > 124 || depth & 3 != 0 {
                return false;
            }
            let Some(node) = V6_NODES.get(e & v6::INDEX) else {
                return false;
            };
            // Bits left after this node's 4; every shift is in 0..=63.
            let rest = 124 - depth;
            let nibble = if rest >= 64 { hi >> (rest - 64) } else { lo >> rest };
            e = node[(nibble & 15) as usize];
            depth += v6::STRIDE;
        } else if tag == v6::LEAF {
            let Some(leaf) = V6_LEAVES.get(e & v6::INDEX) else {
                return false;
            };
            let a = &leaf.addr;
            let ahi = u64::from_be(crate::cursor::word::<16, 0>(a));
            let alo = u64::from_be(crate::cursor::word::<16, 8>(a));
            let len = u32::from(leaf.len);
            // Network masks of the prefix's two halves; every shift is in 1..=63.
            let mhi = if len >= 64 {
                u64::MAX
            } else if len == 0 {
                0
            } else {
                u64::MAX << (64 - len)
            };
            let mlo = if len >= 128 {
                u64::MAX
            } else if len <= 64 {
                0
            } else {
                u64::MAX << (128 - len)
            };
            if ((hi ^ ahi) & mhi) | ((lo ^ alo) & mlo) == 0 {
                // A mask index (a leaf) or the node after a skipped chain.
                e = leaf.inside;
                depth = len;
            } else {
                e = u32::from(leaf.outside);
            }
        } else {
            break;
        }
        i += 1;
    }
    // Still a node or leaf after the last step, or a tag never written: deny.
    if e & v6::TAG != 0 {
        return false;
    }
    mask_allows(e, guard)
}
