//! The allowlists: a seeded mix of IPv4 /8–/32 and IPv6 /32–/128 prefixes,
//! and the test addresses, which come from the documentation ranges.
//!
//! Documentation ranges are far too small for a million prefixes, so list
//! *contents* come from the whole address space. Nothing is ever sent to or
//! from them: they only sit in maps, sets and files. The generated prefixes
//! never overlap the documentation ranges, so the test sources decide
//! exactly as intended: 192.0.2.0/24 and 2001:db8:a110::/48 are the
//! (fixed, first) allowed entries, and 198.51.100.0/24 and 2001:db8:dead::/48
//! are allowed by no entry. Two more fixed entries, 2001:db8:beef::6/128 and
//! 2001:db8:beef::8/128, are the IPv6 trie's worst case: /128s that share all
//! but their last bits, with a denied source between them
//! ([`BESIDE_V6`]), whose lookup walks the whole depth of the trie unless
//! chains of single-child nodes are compressed.
use std::{
    collections::HashSet,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Allowed source of the "allowed" packets.
pub const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Source of the denied packets (and the base of the flood's sources).
pub const DENIED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const DENIED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xdead, 0, 0, 0, 0, 7);
/// Denied IPv6 source between the two fixed /128s ::6 and ::8 of 2001:db8:beef::/48.
pub const BESIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbeef, 0, 0, 0, 0, 7);
/// Destination of every test packet.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

const DOC_V4: [[u8; 3]; 3] = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];

/// The first entries of every list: the allowed test ranges, then the two
/// /128s beside [`BESIDE_V6`].
fn fixed() -> [IpNet; 4] {
    [
        IpNet::V4(Ipv4Net::new(Ipv4Addr::new(192, 0, 2, 0), 24).expect("valid")),
        IpNet::V6(Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0xa110, 0, 0, 0, 0, 0), 48).expect("valid")),
        IpNet::V6(Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0xbeef, 0, 0, 0, 0, 6), 128).expect("valid")),
        IpNet::V6(Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0xbeef, 0, 0, 0, 0, 8), 128).expect("valid")),
    ]
}

fn mask32(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask128(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

/// IPv4 prefix lengths in proportions like a real allowlist or drop list:
/// mostly /24 and /32, some /16–/23 and /25–/31, very few /8–/15.
fn v4_len(rng: &mut StdRng) -> u8 {
    let r: f64 = rng.random();
    if r < 0.35 {
        32
    } else if r < 0.80 {
        24
    } else if r < 0.95 {
        rng.random_range(16..=23)
    } else if r < 0.999 {
        rng.random_range(25..=31)
    } else {
        rng.random_range(8..=15)
    }
}

fn v6_len(rng: &mut StdRng) -> u8 {
    const LENS: [u8; 10] = [32, 40, 48, 48, 48, 56, 64, 64, 64, 128];
    LENS[rng.random_range(0..LENS.len())]
}

fn overlaps_doc_v4(a: u32, len: u8) -> bool {
    DOC_V4.iter().any(|d| {
        let doc = u32::from(Ipv4Addr::new(d[0], d[1], d[2], 0));
        if len <= 24 {
            mask32(doc, len) == a
        } else {
            mask32(a, 24) == doc
        }
    })
}

fn overlaps_doc_v6(a: u128, len: u8) -> bool {
    let doc = 0x2001_0db8u128 << 96;
    if len <= 32 {
        mask128(doc, len) == a
    } else {
        mask128(a, 32) == doc
    }
}

/// `n` distinct prefixes, about 80% IPv4: the fixed allowed ranges first,
/// then random ones. The list of size k is the first k of the list of any
/// larger size with the same seed.
pub fn generate(n: usize, seed: u64) -> Vec<IpNet> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: HashSet<IpNet> = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for f in fixed().into_iter().take(n) {
        seen.insert(f);
        out.push(f);
    }
    while out.len() < n {
        let net = if rng.random_bool(0.8) {
            let len = v4_len(&mut rng);
            let a = mask32(rng.random(), len);
            // 0/8, loopback, multicast and reserved space are no one's sources.
            let first = (a >> 24) as u8;
            if first == 0 || first == 127 || first >= 224 || overlaps_doc_v4(a, len) {
                continue;
            }
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), len).expect("len <= 32"))
        } else {
            let len = v6_len(&mut rng);
            // Global unicast, 2000::/3.
            let a = mask128((0b001u128 << 125) | (rng.random::<u128>() >> 3), len);
            if overlaps_doc_v6(a, len) {
                continue;
            }
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).expect("len <= 128"))
        };
        if seen.insert(net) {
            out.push(net);
        }
    }
    out
}

/// One prefix that is in neither family's documentation range nor `list`:
/// the "one-line change".
pub fn fresh(list: &[IpNet], seed: u64) -> IpNet {
    let have: HashSet<&IpNet> = list.iter().collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    loop {
        let a: u32 =
            rng.random_range(u32::from(Ipv4Addr::new(1, 0, 0, 0))..u32::from(Ipv4Addr::new(223, 255, 255, 255)));
        if overlaps_doc_v4(a, 32) || (a >> 24) == 127 {
            continue;
        }
        let net = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), 32).expect("valid"));
        if !have.contains(&net) {
            return net;
        }
    }
}

/// The list as relay-guard's `allow_files` format: one prefix a line.
pub fn write_list(path: &Path, list: &[IpNet]) -> anyhow::Result<()> {
    write_lines(path, list.iter().map(ToString::to_string))
}

/// `ipset restore` input: one hash:net set per family, sized for the list
/// up front (as an operator loading a big list would), so no resize runs.
pub fn write_ipset(path: &Path, list: &[IpNet], v4: &str, v6: &str) -> anyhow::Result<()> {
    let n4 = list.iter().filter(|n| matches!(n, IpNet::V4(_))).count();
    let n6 = list.len() - n4;
    let header = [
        format!(
            "create {v4} hash:net family inet hashsize {} maxelem {}",
            n4.next_power_of_two().max(1024),
            (2 * n4).max(65_536)
        ),
        format!(
            "create {v6} hash:net family inet6 hashsize {} maxelem {}",
            n6.next_power_of_two().max(1024),
            (2 * n6).max(65_536)
        ),
    ];
    let adds = list.iter().map(|n| match n {
        IpNet::V4(_) => format!("add {v4} {n}"),
        IpNet::V6(_) => format!("add {v6} {n}"),
    });
    write_lines(path, header.into_iter().chain(adds))
}

/// `nft -f` input: a table with one interval set per family. `auto-merge`
/// because the list nests prefixes (nft rejects overlapping intervals
/// otherwise).
pub fn write_nft(path: &Path, table: &str, list: &[IpNet]) -> anyhow::Result<()> {
    let mut lines = vec![format!("table inet {table} {{")];
    for (set, ty, v6) in [("allow4", "ipv4_addr", false), ("allow6", "ipv6_addr", true)] {
        let elems: Vec<String> = list
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
            .map(ToString::to_string)
            .collect();
        lines.push(format!("  set {set} {{"));
        lines.push(format!("    type {ty}; flags interval; auto-merge;"));
        if !elems.is_empty() {
            lines.push("    elements = {".into());
            let n = elems.len();
            for (i, e) in elems.into_iter().enumerate() {
                lines.push(format!("      {e}{}", if i + 1 < n { "," } else { "" }));
            }
            lines.push("    }".into());
        }
        lines.push("  }".into());
    }
    lines.push("}".into());
    write_lines(path, lines.into_iter())
}

fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    for l in lines {
        writeln!(w, "{l}")?;
    }
    w.flush().with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// The addresses xdp-filter can hold from `list` (it matches exact
/// addresses only): each prefix's network address, in list order, at most
/// `cap` per family.
pub fn exact_addresses(list: &[IpNet], cap: usize) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for n in list {
        match n {
            IpNet::V4(n) if v4.len() < cap => v4.push(n.network()),
            IpNet::V6(n) if v6.len() < cap => v6.push(n.network()),
            _ => {}
        }
        if v4.len() >= cap && v6.len() >= cap {
            break;
        }
    }
    (v4, v6)
}
