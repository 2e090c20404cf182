//! Config → kernel map contents. Pure: no aya types, no I/O.
//!
//! One set of prefixes per family serves every guard (looked up through the
//! IPv4 tables of `tables.rs` and the IPv6 trie of `tables6.rs`, which find
//! the longest stored prefix). Its value for a prefix P is a bitmask: bit g is set when guard g's own longest entry containing P is an
//! allow entry. Because prefixes that contain one address are nested, the
//! longest stored prefix containing an address A is the P that decides, and
//! guard g's longest entry containing A is its longest entry containing P. So
//! one lookup gives SPEC.md's "longest matching prefix of that guard decides;
//! no match: deny" for all guards at once.
//!
//! [`model_allows`] is the plain reference for those semantics; tests check
//! [`Policy::lookup`] (what the kernel computes from the maps) against it.
//!
//! The layer above `config` and below `kernel`: it owns compiling a config
//! into prefixes (`mod.rs`), the IPv4 DIR-24-8 tables and mask palette
//! (`tables`) and the IPv6 trie (`tables6`), as plain values. It uses only
//! `config`, makes no syscall and keeps no state: `kernel::sync` writes what
//! it computes.
pub mod bans;
pub mod tables;
pub mod tables6;

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    net::IpAddr,
};

use ipnet::IpNet;
use relay_guard_common::{
    AllowMask, COUNTER_PORT_SLOTS, GuardedPort, MAX_LONG_BLOCKS, MAX_LONG_SUBBLOCKS, MAX_MASKS, mode, v6 as trie,
};

use crate::{
    config::{Action, Config, Guard, Mode},
    policy::{
        tables::Palette,
        tables6::{V6Full, V6Tables},
    },
};

/// Map contents compiled from a config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `RG_PORTS`: guarded port → owner.
    pub ports: BTreeMap<u16, GuardedPort>,
    /// IPv4: (prefix length, network address) → mask (compiled into `tables`).
    pub v4: BTreeMap<(u8, [u8; 4]), AllowMask>,
    /// IPv6, the same way (compiled into the trie of `tables6`).
    pub v6: BTreeMap<(u8, [u8; 16]), AllowMask>,
    /// `RG_SETTINGS.mode`.
    pub mode: u32,
    /// Guard (config position) → its bit in the masks and in `ports`.
    /// [`Policy::compile`] makes them positional; `sync` moves them to the
    /// bits the kernel keys on ([`Policy::with_bits`]).
    pub bits: Vec<u8>,
}

/// A kernel limit a policy goes over (see [`Policy::limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub what: &'static str,
    pub count: usize,
    pub limit: usize,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (the limit is {})", self.what, self.count, self.limit)
    }
}

/// What the kernel decides for one (address, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The port is in no guard: passes untouched.
    NotGuarded,
    /// Judged by `guard`; `prefix` is the longest stored prefix that matched.
    Judged {
        guard: u8,
        allowed: bool,
        prefix: Option<IpNet>,
    },
}

impl Policy {
    pub fn compile(cfg: &Config) -> Policy {
        let mut ports = BTreeMap::new();
        for (gi, g) in cfg.guards.iter().enumerate() {
            let guard = u8::try_from(gi).expect("validation caps guards at 64");
            for &p in &g.ports {
                ports.insert(
                    p,
                    GuardedPort {
                        active: 1,
                        guard,
                        slot: 0,
                    },
                );
            }
        }
        let v4_entries: Vec<Vec<(u8, u32, Action)>> = cfg
            .guards
            .iter()
            .map(|g| {
                g.entries
                    .iter()
                    .filter_map(|e| match e.net {
                        IpNet::V4(n) => Some((n.prefix_len(), u32::from(n.network()), e.action)),
                        IpNet::V6(_) => None,
                    })
                    .collect()
            })
            .collect();
        let v6_entries: Vec<Vec<(u8, u128, Action)>> = cfg
            .guards
            .iter()
            .map(|g| {
                g.entries
                    .iter()
                    .filter_map(|e| match e.net {
                        IpNet::V6(n) => Some((n.prefix_len(), u128::from(n.network()), e.action)),
                        IpNet::V4(_) => None,
                    })
                    .collect()
            })
            .collect();
        let v4 = compile_family(&v4_entries, mask_u32)
            .into_iter()
            .map(|((len, a), m)| ((len, a.to_be_bytes()), m))
            .collect();
        let v6 = compile_family(&v6_entries, mask_u128)
            .into_iter()
            .map(|((len, a), m)| ((len, a.to_be_bytes()), m))
            .collect();
        let mode = match cfg.mode {
            Mode::Enforce => mode::ENFORCE,
            Mode::Monitor => mode::MONITOR,
        };
        let bits = (0..cfg.guards.len())
            .map(|g| u8::try_from(g).expect("validation caps guards at 64"))
            .collect();
        Policy {
            ports,
            v4,
            v6,
            mode,
            bits,
        }
    }

    /// This policy with guard `g` on bit `bits[g]` instead of
    /// `self.bits[g]` (masks and port owners moved alike).
    pub fn with_bits(&self, bits: &[u8]) -> Policy {
        assert_eq!(bits.len(), self.bits.len(), "one bit per guard");
        let move_bits = |m: u64| {
            self.bits
                .iter()
                .zip(bits)
                .filter(|&(&from, _)| (m >> from) & 1 == 1)
                .fold(0u64, |acc, (_, &to)| acc | 1 << to)
        };
        let to_new: BTreeMap<u8, u8> = self.bits.iter().copied().zip(bits.iter().copied()).collect();
        Policy {
            ports: self
                .ports
                .iter()
                .map(|(&p, gp)| {
                    let guard = to_new.get(&gp.guard).copied().unwrap_or(gp.guard);
                    (p, GuardedPort { guard, ..*gp })
                })
                .collect(),
            v4: self
                .v4
                .iter()
                .map(|(&k, m)| {
                    (
                        k,
                        AllowMask {
                            allow: move_bits(m.allow),
                        },
                    )
                })
                .collect(),
            v6: self
                .v6
                .iter()
                .map(|(&k, m)| {
                    (
                        k,
                        AllowMask {
                            allow: move_bits(m.allow),
                        },
                    )
                })
                .collect(),
            mode: self.mode,
            bits: bits.to_vec(),
        }
    }

    /// `names` (by config position) laid out by bit, for labels of what the
    /// kernel reports (an unused bit has an empty name).
    pub fn names_by_bit(&self, names: &[String]) -> Vec<String> {
        let mut out = vec![String::new(); relay_guard_common::MAX_GUARDS];
        for (g, &b) in self.bits.iter().enumerate() {
            if let Some(n) = names.get(g) {
                out[usize::from(b)].clone_from(n);
            }
        }
        out
    }

    /// The tables of a transition: for every prefix of `old` or `new`, the
    /// bits `keep` of what `old` decides there and every bit of what `new`
    /// decides. A lookup in them answers like `old` for the bits `keep` and
    /// like `new` for the bits of `new` (`keep` and `new.bits` disjoint), as
    /// the longest stored prefix containing an address is then at least as
    /// long as either policy's own. Ports and mode are `new`'s.
    pub fn union(old: &Policy, keep: u64, new: &Policy) -> Policy {
        Policy {
            v4: union_family(&old.v4, keep, &new.v4, mask_u32_bytes),
            v6: union_family(&old.v6, keep, &new.v6, mask_u128_bytes),
            ..new.clone()
        }
    }

    /// The kernel limits this policy goes over, each with its count and
    /// limit: checked before a sync writes anything, and by `check-config`.
    pub fn limits(&self) -> Vec<Limit> {
        let mut out = Vec::new();
        let ports_limit = COUNTER_PORT_SLOTS as usize - 1;
        if self.ports.len() > ports_limit {
            out.push(Limit {
                what: "guarded ports",
                count: self.ports.len(),
                limit: ports_limit,
            });
        }
        let mut long: Vec<u32> = self
            .v4
            .keys()
            .filter(|(len, _)| *len > 24)
            .map(|(_, a)| u32::from_be_bytes(*a) >> 8)
            .collect();
        long.dedup();
        long.sort_unstable();
        long.dedup();
        if long.len() > MAX_LONG_BLOCKS as usize {
            out.push(Limit {
                what: "IPv4 /24 blocks holding prefixes longer than /24 (map RG_LONG24)",
                count: long.len(),
                limit: MAX_LONG_BLOCKS as usize,
            });
        } else {
            let subs = tables::long_keys_bound(self.v4.keys());
            if subs > MAX_LONG_SUBBLOCKS as usize {
                out.push(Limit {
                    what: "IPv4 /28s holding prefixes longer than /24 (map RG_LONG24)",
                    count: subs,
                    limit: MAX_LONG_SUBBLOCKS as usize,
                });
            }
        }
        let mut masks: Vec<u64> = self.v4.values().chain(self.v6.values()).map(|m| m.allow).collect();
        masks.retain(|&m| m != 0);
        masks.sort_unstable();
        masks.dedup();
        let masks_limit = MAX_MASKS as usize - 1;
        if masks.len() > masks_limit {
            out.push(Limit {
                what: "distinct combinations of guards allowing a prefix (map RG_MASKS)",
                count: masks.len(),
                limit: masks_limit,
            });
            return out;
        }
        // The trie as a first build would lay it out, without a cap.
        let mut t = V6Tables::with_capacity(trie::INDEX, trie::INDEX);
        match t.build(&self.v6, &mut Palette::new()) {
            Ok(_) => {
                let (nodes, leaves) = t.counts();
                for (what, count, cap) in [
                    ("IPv6 trie nodes (map RG_V6_NODES)", nodes, trie::NODE_CAPACITY),
                    ("IPv6 trie leaves (map RG_V6_LEAVES)", leaves, trie::LEAF_CAPACITY),
                ] {
                    if count >= cap {
                        out.push(Limit {
                            what,
                            count: count as usize,
                            limit: cap as usize - 1,
                        });
                    }
                }
            }
            Err(V6Full::Palette(_)) => {}
            Err(e) => out.push(Limit {
                what: "IPv6 trie",
                count: self.v6.len(),
                limit: match e {
                    V6Full::Nodes(n) | V6Full::Leaves(n) => n as usize,
                    V6Full::Palette(_) => 0,
                },
            }),
        }
        out
    }

    /// The verdict the XDP program reaches from these maps (longest stored
    /// prefix, then the guard's bit). Also what `explain` shows.
    pub fn lookup(&self, addr: IpAddr, port: u16) -> Lookup {
        let Some(gp) = self.ports.get(&port).filter(|p| p.active == 1) else {
            return Lookup::NotGuarded;
        };
        let guard = gp.guard;
        let hit = match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                (0..=32u8).rev().find_map(|len| {
                    let k = (len, mask_u32(a, len).to_be_bytes());
                    self.v4
                        .get(&k)
                        .map(|m| (IpNet::new(IpAddr::from(k.1), len).expect("len <= 32"), *m))
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                (0..=128u8).rev().find_map(|len| {
                    let k = (len, mask_u128(a, len).to_be_bytes());
                    self.v6
                        .get(&k)
                        .map(|m| (IpNet::new(IpAddr::from(k.1), len).expect("len <= 128"), *m))
                })
            }
        };
        match hit {
            Some((prefix, m)) => Lookup::Judged {
                guard,
                allowed: (m.allow >> guard) & 1 == 1,
                prefix: Some(prefix),
            },
            None => Lookup::Judged {
                guard,
                allowed: false,
                prefix: None,
            },
        }
    }

    /// Number of allow entries per family in a guard (the
    /// `relay_guard_allowlist_prefixes` gauge).
    pub fn allow_counts(guard: &Guard) -> (usize, usize) {
        let allow = guard.entries.iter().filter(|e| e.action == Action::Allow);
        let v4 = allow.clone().filter(|e| e.net.addr().is_ipv4()).count();
        (v4, allow.count() - v4)
    }
}

/// The reference semantics, written the obvious way: among `guard`'s entries
/// of the address's family, the longest one containing it decides; none: deny.
/// Returns the verdict and the deciding entry.
pub fn model_allows(guard: &Guard, addr: IpAddr) -> (bool, Option<IpNet>) {
    guard
        .entries
        .iter()
        .filter(|e| e.net.contains(&addr))
        .max_by_key(|e| e.net.prefix_len())
        .map_or((false, None), |e| (e.action == Action::Allow, Some(e.net)))
}

fn mask_u32_bytes(a: [u8; 4], len: u8) -> [u8; 4] {
    mask_u32(u32::from_be_bytes(a), len).to_be_bytes()
}

fn mask_u128_bytes(a: [u8; 16], len: u8) -> [u8; 16] {
    mask_u128(u128::from_be_bytes(a), len).to_be_bytes()
}

/// [`Policy::union`] for one family.
fn union_family<A: Copy + Ord>(
    old: &BTreeMap<(u8, A), AllowMask>,
    keep: u64,
    new: &BTreeMap<(u8, A), AllowMask>,
    mask: fn(A, u8) -> A,
) -> BTreeMap<(u8, A), AllowMask> {
    let lens = |m: &BTreeMap<(u8, A), AllowMask>| {
        let mut l: Vec<u8> = m.keys().map(|&(len, _)| len).collect();
        l.dedup();
        l.sort_unstable_by(|a, b| b.cmp(a));
        l.dedup();
        l
    };
    let (old_lens, new_lens) = (lens(old), lens(new));
    // The value of the longest prefix of `m` containing (len, addr).
    let longest = |m: &BTreeMap<(u8, A), AllowMask>, ls: &[u8], len: u8, addr: A| {
        ls.iter()
            .filter(|&&l| l <= len)
            .find_map(|&l| m.get(&(l, mask(addr, l))))
            .map_or(0, |m| m.allow)
    };
    let mut out = BTreeMap::new();
    for &(len, addr) in old.keys().chain(new.keys()) {
        out.entry((len, addr)).or_insert_with(|| AllowMask {
            allow: (longest(old, &old_lens, len, addr) & keep) | longest(new, &new_lens, len, addr),
        });
    }
    out
}

fn mask_u32(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_u128(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

/// For every prefix any guard names, the mask of guards whose longest entry
/// containing that prefix allows. Per guard, only the prefix lengths it uses
/// are probed, longest first.
fn compile_family<A: Copy + Eq + Hash + Ord>(
    guards: &[Vec<(u8, A, Action)>],
    mask: fn(A, u8) -> A,
) -> BTreeMap<(u8, A), AllowMask> {
    // A prefix's own guard decides it by the prefix itself (its longest entry
    // containing P is P). Only the other guards need probing, so when one
    // guard alone has entries of this family no lookup table is built: a
    // single 1M-entry list compiles without a 1M-entry hash map.
    let with_entries: Vec<usize> = (0..guards.len()).filter(|&g| !guards[g].is_empty()).collect();
    if let [only] = with_entries[..] {
        return guards[only]
            .iter()
            .map(|&(len, addr, act)| {
                (
                    (len, addr),
                    AllowMask {
                        allow: if act == Action::Allow { 1 << only } else { 0 },
                    },
                )
            })
            .collect();
    }
    // Per guard: its entries by (length, network), and its lengths, longest first.
    type Table<A> = (HashMap<(u8, A), Action>, Vec<u8>);
    let tables: Vec<Table<A>> = guards
        .iter()
        .map(|entries| {
            let table: HashMap<_, _> = entries.iter().map(|&(l, a, act)| ((l, a), act)).collect();
            let mut lens: Vec<u8> = entries.iter().map(|&(l, _, _)| l).collect();
            lens.sort_unstable_by(|a, b| b.cmp(a));
            lens.dedup();
            (table, lens)
        })
        .collect();
    let mut out = BTreeMap::new();
    for entries in guards {
        for &(len, addr, _) in entries {
            out.entry((len, addr)).or_insert_with(|| {
                let mut allow = 0u64;
                for (g, (table, lens)) in tables.iter().enumerate() {
                    let decided = lens
                        .iter()
                        .filter(|&&l| l <= len)
                        .find_map(|&l| table.get(&(l, mask(addr, l))));
                    if decided == Some(&Action::Allow) {
                        allow |= 1 << g;
                    }
                }
                AllowMask { allow }
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
