//! How big the sized maps of a set are ([`Sizes`]): the IPv4 blocks of
//! `RG_TBL24`, the entries of `RG_LONG24` (its hash buckets are allocated
//! up front) and the IPv6 trie's nodes and leaves, chosen for a policy
//! with room to grow, so a small config does not pay for the largest one
//! (the maps' memory is charged to the agent's cgroup). A reload whose
//! policy needs more, or much less, gets a new set of maps (see
//! `kernel::loader::Loaded::new_set`).
use std::collections::BTreeSet;

use relay_guard_common::{MAX_LONG_SUBBLOCKS, MAX_TBL24_BLOCKS, TBL24_BLOCK_ENTRIES, V6Leaf, V6Node, maps, v6};

use crate::{
    kernel::maps::Maps,
    policy::{
        Policy,
        tables::{self, Palette},
        tables6::V6Tables,
    },
};

/// Capacities of a set's sized maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Blocks of 256 /24 entries in `RG_TBL24`.
    pub tbl24_blocks: u32,
    /// Entries of `RG_LONG24` (/28s of hosts).
    pub long_blocks: u32,
    /// Entries of `RG_V6_NODES` (index 0 unused).
    pub v6_nodes: u32,
    /// Entries of `RG_V6_LEAVES` (index 0 unused).
    pub v6_leaves: u32,
}

/// The least of each, so a config that grows a little needs no resize.
const MIN: Sizes = Sizes {
    tbl24_blocks: 256,
    long_blocks: 1024,
    v6_nodes: 1024,
    v6_leaves: 1024,
};

/// Bytes of one bucket of a kernel hash map (a list head and a lock),
/// allocated for each power of two up to its capacity.
const LONG24_BUCKET_BYTES: u64 = 16;

/// A set this much larger than a policy's sizes is shrunk at a reload…
const SHRINK_FACTOR: u64 = 4;
/// …when that gives back at least this many bytes.
const SHRINK_MIN_BYTES: u64 = 8 << 20;

impl Sizes {
    /// The object's sizes: the most any policy can use.
    pub const MAX: Sizes = Sizes {
        tbl24_blocks: MAX_TBL24_BLOCKS,
        long_blocks: MAX_LONG_SUBBLOCKS,
        v6_nodes: v6::NODE_CAPACITY,
        v6_leaves: v6::LEAF_CAPACITY,
    };

    /// What `policy` needs in a fresh set: the /16s holding a prefix longer
    /// than /16 (an upper bound of those that are not uniform), the /28s
    /// holding a prefix longer than /24 (an upper bound of the long
    /// entries), and the trie as a first build lays it out.
    pub fn need(policy: &Policy) -> Sizes {
        let slots: BTreeSet<u16> = policy
            .v4
            .keys()
            .filter(|(len, _)| *len > 16)
            .map(|(_, a)| u16::from_be_bytes([a[0], a[1]]))
            .collect();
        let mut t = V6Tables::with_capacity(v6::INDEX, v6::INDEX);
        let (nodes, leaves) = match t.build(&policy.v6, &mut Palette::new()) {
            Ok(_) => t.counts(),
            // Over a limit: `Policy::limits` reports it; size for the most.
            Err(_) => (Self::MAX.v6_nodes, Self::MAX.v6_leaves),
        };
        Sizes {
            tbl24_blocks: u32::try_from(slots.len()).expect("<= 65536"),
            long_blocks: u32::try_from(tables::long_keys_bound(policy.v4.keys())).unwrap_or(u32::MAX),
            v6_nodes: nodes.saturating_add(1),
            v6_leaves: leaves.saturating_add(1),
        }
    }

    /// The sizes to load for `policy`: its need with half again as much
    /// room (an in-place update holds old and new entries for a moment),
    /// rounded up to a power of two, within [`MIN`] and [`Sizes::MAX`].
    pub fn for_policy(policy: &Policy) -> Sizes {
        Self::with_room(Self::need(policy))
    }

    fn with_room(need: Sizes) -> Sizes {
        let room = |n: u32, min: u32, max: u32| {
            let n = u64::from(n) + u64::from(n) / 2 + 64;
            u32::try_from(n.next_power_of_two()).unwrap_or(u32::MAX).clamp(min, max)
        };
        Sizes {
            tbl24_blocks: room(need.tbl24_blocks, MIN.tbl24_blocks, Self::MAX.tbl24_blocks),
            long_blocks: room(need.long_blocks, MIN.long_blocks, Self::MAX.long_blocks),
            v6_nodes: room(need.v6_nodes, MIN.v6_nodes, Self::MAX.v6_nodes),
            v6_leaves: room(need.v6_leaves, MIN.v6_leaves, Self::MAX.v6_leaves),
        }
    }

    /// Twice these, within [`Sizes::MAX`].
    pub fn doubled(&self) -> Sizes {
        let d = |n: u32, max: u32| n.saturating_mul(2).min(max);
        Sizes {
            tbl24_blocks: d(self.tbl24_blocks, Self::MAX.tbl24_blocks),
            long_blocks: d(self.long_blocks, Self::MAX.long_blocks),
            v6_nodes: d(self.v6_nodes, Self::MAX.v6_nodes),
            v6_leaves: d(self.v6_leaves, Self::MAX.v6_leaves),
        }
    }

    /// The larger of each.
    pub fn max(self, other: Sizes) -> Sizes {
        Sizes {
            tbl24_blocks: self.tbl24_blocks.max(other.tbl24_blocks),
            long_blocks: self.long_blocks.max(other.long_blocks),
            v6_nodes: self.v6_nodes.max(other.v6_nodes),
            v6_leaves: self.v6_leaves.max(other.v6_leaves),
        }
    }

    /// The capacities of `maps`.
    pub fn of(maps: &Maps) -> Sizes {
        let (v6_nodes, v6_leaves) = maps.v6.capacity();
        Sizes {
            tbl24_blocks: maps.tbl24.capacity(),
            long_blocks: maps.long24_capacity,
            v6_nodes,
            v6_leaves,
        }
    }

    /// Bytes of kernel memory the sized maps take before any entry of
    /// `RG_LONG24` (about 96 bytes each, allocated on insert).
    pub fn bytes(&self) -> u64 {
        u64::from(self.tbl24_blocks) * u64::from(TBL24_BLOCK_ENTRIES) * 8
            + u64::from(self.long_blocks).next_power_of_two() * LONG24_BUCKET_BYTES
            + u64::from(self.v6_nodes) * size_of::<V6Node>() as u64
            + u64::from(self.v6_leaves) * size_of::<V6Leaf>() as u64
    }

    /// Whether each of `need` fits in these.
    pub fn holds(&self, need: &Sizes) -> bool {
        need.tbl24_blocks <= self.tbl24_blocks
            && need.long_blocks <= self.long_blocks
            && need.v6_nodes <= self.v6_nodes
            && need.v6_leaves <= self.v6_leaves
    }

    /// The sizes a new set for `policy` should have when the set of `maps`
    /// is too small for it, or far larger than it needs; `None`: keep it.
    pub fn resize_for(maps: &Maps, policy: &Policy) -> Option<Sizes> {
        let have = Self::of(maps);
        let need = Self::need(policy);
        let want = Self::with_room(need);
        if !have.holds(&need) {
            return Some(want);
        }
        let (h, w) = (have.bytes(), want.bytes());
        (h >= w.saturating_mul(SHRINK_FACTOR) && h - w >= SHRINK_MIN_BYTES).then_some(want)
    }

    /// `(map name, max_entries)` for the loader.
    pub fn max_entries(&self) -> [(&'static str, u32); 4] {
        [
            (maps::TBL24, self.tbl24_blocks * TBL24_BLOCK_ENTRIES),
            (maps::LONG24, self.long_blocks),
            (maps::V6_NODES, self.v6_nodes),
            (maps::V6_LEAVES, self.v6_leaves),
        ]
    }
}

impl std::fmt::Display for Sizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} IPv4 blocks, {} long IPv4 /28s, {} IPv6 nodes, {} IPv6 leaves ({:.1} MiB)",
            self.tbl24_blocks,
            self.long_blocks,
            self.v6_nodes,
            self.v6_leaves,
            self.bytes() as f64 / f64::from(1 << 20)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        let cfg = crate::config::Config::parse(std::path::Path::new("/nonexistent/t.toml"), text).expect("valid");
        Policy::compile(&cfg)
    }

    #[test]
    fn a_small_config_gets_the_least_and_a_large_one_room() {
        let small = policy(
            "interfaces = [\"lo\"]\n[[guard]]\nports = [25]\nallow = [\"10.0.0.0/8\", \"192.0.2.0/24\", \"198.51.100.7\", \"2001:db8::/48\"]\n",
        );
        assert_eq!(Sizes::need(&small).tbl24_blocks, 2);
        assert_eq!(Sizes::for_policy(&small), MIN);
        let allow: Vec<String> = (0..3000u32)
            .map(|i| format!("\"10.{}.{}.0/24\"", i >> 8, i & 255))
            .collect();
        let large = policy(&format!(
            "interfaces = [\"lo\"]\n[[guard]]\nports = [25]\nallow = [{}]\n",
            allow.join(",")
        ));
        // 3000 /24s in 12 /16s.
        assert_eq!(Sizes::need(&large).tbl24_blocks, 12);
        let huge: Vec<String> = (0..3000u32)
            .map(|i| format!("\"{}.{}.1.0/24\"", 1 + i / 256, i % 256))
            .collect();
        let huge = policy(&format!(
            "interfaces = [\"lo\"]\n[[guard]]\nports = [25]\nallow = [{}]\n",
            huge.join(",")
        ));
        let s = Sizes::for_policy(&huge);
        assert!(s.tbl24_blocks >= 4500 && s.tbl24_blocks.is_power_of_two(), "{s}");
        assert!(MIN.holds(&Sizes::need(&small)) && !MIN.holds(&Sizes::need(&huge)));
        assert!(Sizes::MAX.holds(&Sizes::need(&huge)));
    }
}
