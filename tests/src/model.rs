//! Reference model of the XDP program's verdict on one Ethernet frame, in
//! plain Rust over a byte slice.
//!
//! It is written from SPEC.md ("Semantics", "Packet parsing"), not from the
//! eBPF code, so that `tests/tests/parser_test_run.rs` can run the real program
//! under `BPF_PROG_TEST_RUN` and compare: a disagreement means one of the two
//! is wrong. Where SPEC.md is silent the model takes the choices the eBPF
//! comments document:
//!
//! - a frame too short for its Ethernet header or a VLAN tag is not IP as far
//!   as anyone can tell: not ours;
//! - a third VLAN tag is deeper than the walk follows: malformed, family
//!   unknown;
//! - IPv4: fewer than 20 bytes, version ≠ 4, IHL < 5 or options past the
//!   buffer: malformed; then non-TCP or a fragment offset ≠ 0: not ours;
//! - IPv6: fewer than 40 bytes or version ≠ 6: malformed; the walk follows at
//!   most [`MAX_IPV6_EXT`] extension headers, each of which must have 8
//!   readable bytes and then its whole length; a non-first fragment is not
//!   ours, a header chain still going after the walk is malformed, and a chain
//!   that ends in anything but TCP is not ours;
//! - a TCP header shorter than 20 bytes is malformed in its family.
//!
//! The allowlist decision itself is [`Policy::lookup`], which the policy tests
//! check against the plain longest-match semantics.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use relay_guard_common::{CounterKey, family, mode, verdict};

use relay_guard::policy::{Lookup, Policy};

/// `XDP_DROP` from the kernel's `enum xdp_action`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS` from the kernel's `enum xdp_action`.
pub const XDP_PASS: u32 = 2;

/// SPEC.md: "Ethernet, then up to two VLAN tags".
pub const MAX_VLAN_TAGS: usize = 2;
/// SPEC.md: an extension-header walk "of at least 8 headers".
pub const MAX_IPV6_EXT: usize = 8;

/// What the program concludes about a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Not IP, not TCP, a non-first fragment, or an unguarded port: passed
    /// and not counted.
    NotOurs,
    /// Claims IP (+ TCP) but cannot be parsed; `family` is one of
    /// [`relay_guard_common::family`], as far as it was known.
    Malformed { family: u8 },
    /// A TCP segment to a guarded port, judged by its guard.
    Judged {
        port: u16,
        guard: u8,
        family: u8,
        allowed: bool,
    },
}

/// The verdict on `frame` with `policy` in the maps.
pub fn judge(frame: &[u8], policy: &Policy) -> Outcome {
    let (ethertype, l3) = match link_layer(frame) {
        Link::Ethertype(t, rest) => (t, rest),
        Link::NotOurs => return Outcome::NotOurs,
        Link::TooDeep => {
            return Outcome::Malformed {
                family: family::UNKNOWN,
            };
        }
    };
    let net = match ethertype {
        0x0800 => ipv4(l3),
        0x86dd => ipv6(l3),
        _ => return Outcome::NotOurs,
    };
    let (fam, src, segment) = match net {
        Net::Tcp { family, src, segment } => (family, src, segment),
        Net::NotOurs => return Outcome::NotOurs,
        Net::Malformed(family) => return Outcome::Malformed { family },
    };
    // RFC 9293 3.1: the fixed part of the TCP header is 20 bytes. A segment
    // cut shorter (a tiny first fragment, RFC 1858) is malformed.
    if segment.len() < 20 {
        return Outcome::Malformed { family: fam };
    }
    // Only the destination port counts (bytes 2..4, big-endian).
    let port = u16::from_be_bytes([segment[2], segment[3]]);
    match policy.lookup(src, port) {
        Lookup::NotGuarded => Outcome::NotOurs,
        Lookup::Judged { guard, allowed, .. } => Outcome::Judged {
            port,
            guard,
            family: fam,
            allowed,
        },
    }
}

/// The kernel's return value for `outcome` in `mode` (one of
/// [`relay_guard_common::mode`]), and the counter the program bumps, if any.
/// `ifindex` is the ingress interface the program sees (under
/// `BPF_PROG_TEST_RUN` without a context, the test namespace's loopback).
pub fn action(outcome: Outcome, run_mode: u32, ifindex: u32) -> (u32, Option<CounterKey>) {
    let monitor = run_mode == mode::MONITOR;
    let key = |port, guard, family, verdict| CounterKey {
        ifindex,
        port,
        guard,
        family,
        verdict,
        _pad: [0; 3],
    };
    match outcome {
        Outcome::NotOurs => (XDP_PASS, None),
        // SPEC.md: malformed is dropped in enforce mode, passed in monitor
        // mode, counted either way.
        Outcome::Malformed { family } if monitor => (XDP_PASS, Some(key(0, 0, family, verdict::MALFORMED_PASSED))),
        Outcome::Malformed { family } => (XDP_DROP, Some(key(0, 0, family, verdict::MALFORMED_DROPPED))),
        Outcome::Judged {
            port,
            guard,
            family,
            allowed: true,
        } => (XDP_PASS, Some(key(port, guard, family, verdict::PASSED))),
        Outcome::Judged {
            port,
            guard,
            family,
            allowed: false,
        } if monitor => (XDP_PASS, Some(key(port, guard, family, verdict::WOULD_DROP))),
        Outcome::Judged {
            port,
            guard,
            family,
            allowed: false,
        } => (XDP_DROP, Some(key(port, guard, family, verdict::DROPPED))),
    }
}

/// Result of the link layer.
enum Link<'a> {
    /// The ethertype after the tags, and the bytes after it.
    Ethertype(u16, &'a [u8]),
    NotOurs,
    TooDeep,
}

fn is_vlan_tpid(t: u16) -> bool {
    // 802.1Q customer tag, 802.1ad service tag (QinQ outer).
    t == 0x8100 || t == 0x88a8
}

/// Destination MAC (6), source MAC (6), ethertype (2); each VLAN tag is a
/// TPID in the ethertype position followed by TCI (2) and the next ethertype.
fn link_layer(frame: &[u8]) -> Link<'_> {
    // Offset of the current ethertype field; tags move it on by 4 bytes.
    let mut at = 12;
    let mut tags = 0;
    loop {
        let Some(field) = frame.get(at..at + 2) else {
            return Link::NotOurs;
        };
        let t = u16::from_be_bytes([field[0], field[1]]);
        if !is_vlan_tpid(t) {
            return Link::Ethertype(t, &frame[at + 2..]);
        }
        if tags == MAX_VLAN_TAGS {
            return Link::TooDeep;
        }
        tags += 1;
        at += 4;
    }
}

/// Result of the network layer.
enum Net<'a> {
    /// The payload is a TCP segment (possibly truncated) from `src`.
    Tcp {
        family: u8,
        src: IpAddr,
        segment: &'a [u8],
    },
    NotOurs,
    Malformed(u8),
}

/// RFC 791 3.1.
fn ipv4(p: &[u8]) -> Net<'_> {
    const MALFORMED: Net<'static> = Net::Malformed(family::IPV4);
    if p.len() < 20 {
        return MALFORMED;
    }
    let version = p[0] >> 4;
    let header_len = usize::from(p[0] & 0xf) * 4;
    if version != 4 || header_len < 20 || header_len > p.len() {
        return MALFORMED;
    }
    let fragment_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
    let protocol = p[9];
    if protocol != 6 || fragment_offset != 0 {
        return Net::NotOurs;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    Net::Tcp {
        family: family::IPV4,
        src: IpAddr::V4(src),
        segment: &p[header_len..],
    }
}

/// RFC 8200 3 and 4; AH is RFC 4302 2.2.
fn ipv6(p: &[u8]) -> Net<'_> {
    const MALFORMED: Net<'static> = Net::Malformed(family::IPV6);
    if p.len() < 40 || p[0] >> 4 != 6 {
        return MALFORMED;
    }
    let src: [u8; 16] = p[8..24].try_into().expect("16 bytes");
    let src = IpAddr::V6(Ipv6Addr::from(src));
    let mut next = p[6];
    let mut rest = &p[40..];
    let mut walked = 0;
    while let Some(kind) = ExtKind::of(next) {
        if walked == MAX_IPV6_EXT {
            // Still an extension header after the last step of the walk.
            return MALFORMED;
        }
        let Some(h) = rest.get(..8) else { return MALFORMED };
        let len = match kind {
            ExtKind::Fragment => {
                // Fragment offset: the top 13 bits of bytes 2..4.
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    return Net::NotOurs;
                }
                8
            }
            // Payload Len in 4-octet units, minus 2.
            ExtKind::Ah => (usize::from(h[1]) + 2) * 4,
            // Hdr Ext Len in 8-octet units, not counting the first 8.
            ExtKind::Options => (usize::from(h[1]) + 1) * 8,
        };
        if len > rest.len() {
            return MALFORMED;
        }
        next = h[0];
        rest = &rest[len..];
        walked += 1;
    }
    if next == 6 {
        Net::Tcp {
            family: family::IPV6,
            src,
            segment: rest,
        }
    } else {
        Net::NotOurs
    }
}

/// The extension headers SPEC.md names, by how their length is encoded.
enum ExtKind {
    /// Hop-by-hop (0), routing (43), destination options (60).
    Options,
    /// Fragment (44): fixed 8 bytes.
    Fragment,
    /// Authentication header (51).
    Ah,
}

impl ExtKind {
    fn of(next_header: u8) -> Option<ExtKind> {
        match next_header {
            0 | 43 | 60 => Some(ExtKind::Options),
            44 => Some(ExtKind::Fragment),
            51 => Some(ExtKind::Ah),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ipnet::IpNet;

    use super::*;
    use relay_guard::config::{Action, Config, Entry, Guard, Mode, Origin, XdpMode};

    /// Guard 0 owns 25 and allows 192.0.2.0/24 minus 192.0.2.128/25 and
    /// 2001:db8:a::/48; guard 1 owns 587 and allows 198.51.100.0/24.
    fn policy() -> Policy {
        let entry = |net: &str, action| Entry {
            net: net.parse::<IpNet>().expect("test net"),
            action,
            origin: Origin {
                file: PathBuf::from("test.toml").into(),
                line: 1,
            },
        };
        let cfg = Config {
            path: PathBuf::from("test.toml"),
            interfaces: vec!["lo".into()],
            mode: Mode::Enforce,
            xdp_mode: XdpMode::Auto,
            metrics_listen: None,
            pin_dir: PathBuf::from("/sys/fs/bpf/test"),
            state_dir: PathBuf::from(relay_guard::config::DEFAULT_STATE_DIR),
            guards: vec![
                Guard {
                    name: "relay".into(),
                    ports: vec![25],
                    entries: vec![
                        entry("192.0.2.0/24", Action::Allow),
                        entry("192.0.2.128/25", Action::Deny),
                        entry("2001:db8:a::/48", Action::Allow),
                    ],
                },
                Guard {
                    name: "submission".into(),
                    ports: vec![587],
                    entries: vec![entry("198.51.100.0/24", Action::Allow)],
                },
            ],
            relaytest: Default::default(),
            bans: vec![],
            crowdsec: None,
            list_files: vec![],
            fingerprint: 0,
            xdp_priority: 10,
            xdp_dispatcher: false,
        };
        Policy::compile(&cfg)
    }

    fn eth(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        for &tpid in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&[0, 7]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn tcp(dport: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02;
        t
    }

    fn ipv4(src: [u8; 4], protocol: u8, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
        let ihl = 5 + options.len() / 4;
        let mut h = vec![0u8; 20];
        h[0] = 0x40 | u8::try_from(ihl).expect("ihl");
        let total = u16::try_from(ihl * 4 + payload.len()).expect("len");
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = 64;
        h[9] = protocol;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&[203, 0, 113, 1]);
        h.extend_from_slice(options);
        h.extend_from_slice(payload);
        h
    }

    /// `ext`: (type, bytes) in order; the first one's type goes into the
    /// fixed header, each one's next header is the following type.
    fn ipv6(src: &str, ext: &[(u8, Vec<u8>)], last: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[6] = ext.first().map_or(last, |e| e.0);
        h[7] = 64;
        h[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().expect("v6").octets());
        h[24..40].copy_from_slice(&"2001:db8:1::1".parse::<Ipv6Addr>().expect("v6").octets());
        for (i, (_, bytes)) in ext.iter().enumerate() {
            let mut b = bytes.clone();
            b[0] = ext.get(i + 1).map_or(last, |e| e.0);
            h.extend_from_slice(&b);
        }
        h.extend_from_slice(payload);
        let plen = u16::try_from(h.len() - 40).expect("len");
        h[4..6].copy_from_slice(&plen.to_be_bytes());
        h
    }

    fn judged(port: u16, guard: u8, family: u8, allowed: bool) -> Outcome {
        Outcome::Judged {
            port,
            guard,
            family,
            allowed,
        }
    }

    #[test]
    fn plain_ipv4_allow_deny_carve_out_and_unguarded() {
        let p = policy();
        let f = |src, port| judge(&eth(&[], 0x0800, &ipv4(src, 6, &[], 0, &tcp(port))), &p);
        assert_eq!(f([192, 0, 2, 10], 25), judged(25, 0, family::IPV4, true));
        assert_eq!(
            f([192, 0, 2, 200], 25),
            judged(25, 0, family::IPV4, false),
            "deny /25 carve-out"
        );
        assert_eq!(
            f([198, 51, 100, 1], 25),
            judged(25, 0, family::IPV4, false),
            "no match: deny"
        );
        assert_eq!(f([198, 51, 100, 1], 587), judged(587, 1, family::IPV4, true));
        assert_eq!(f([198, 51, 100, 1], 22), Outcome::NotOurs);
    }

    #[test]
    fn source_port_25_is_not_matched() {
        let mut t = tcp(40000);
        t[0..2].copy_from_slice(&25u16.to_be_bytes());
        let frame = eth(&[], 0x0800, &ipv4([198, 51, 100, 1], 6, &[], 0, &t));
        assert_eq!(judge(&frame, &policy()), Outcome::NotOurs);
    }

    #[test]
    fn vlan_tags_two_judged_three_malformed() {
        let p = policy();
        let ip = ipv4([198, 51, 100, 1], 6, &[], 0, &tcp(25));
        assert_eq!(
            judge(&eth(&[0x8100], 0x0800, &ip), &p),
            judged(25, 0, family::IPV4, false)
        );
        assert_eq!(
            judge(&eth(&[0x88a8, 0x8100], 0x0800, &ip), &p),
            judged(25, 0, family::IPV4, false)
        );
        assert_eq!(
            judge(&eth(&[0x88a8, 0x8100, 0x8100], 0x0800, &ip), &p),
            Outcome::Malformed {
                family: family::UNKNOWN
            }
        );
        // Cut inside the second tag: not IP as far as anyone can tell.
        let f = eth(&[0x88a8, 0x8100], 0x0800, &ip);
        assert_eq!(judge(&f[..17], &p), Outcome::NotOurs);
        assert_eq!(judge(&f[..13], &p), Outcome::NotOurs);
    }

    #[test]
    fn ipv4_options_fragments_and_truncation() {
        let p = policy();
        let opts = [1, 1, 1, 1, 7, 7, 4, 0]; // NOP ×4, record route, padding
        let with_opts = eth(&[], 0x0800, &ipv4([198, 51, 100, 1], 6, &opts, 0, &tcp(25)));
        assert_eq!(judge(&with_opts, &p), judged(25, 0, family::IPV4, false));
        // First fragment (MF set, offset 0) is judged; a later one passes.
        let first = eth(&[], 0x0800, &ipv4([198, 51, 100, 1], 6, &[], 0x2000, &tcp(25)));
        assert_eq!(judge(&first, &p), judged(25, 0, family::IPV4, false));
        let later = eth(&[], 0x0800, &ipv4([198, 51, 100, 1], 6, &[], 0x2003, &tcp(25)));
        assert_eq!(judge(&later, &p), Outcome::NotOurs);
        // TCP header cut at 19 bytes, options cut short, IP header cut short.
        let n = with_opts.len();
        assert_eq!(
            judge(&with_opts[..n - 1], &p),
            Outcome::Malformed { family: family::IPV4 }
        );
        assert_eq!(
            judge(&with_opts[..14 + 24], &p),
            Outcome::Malformed { family: family::IPV4 }
        );
        assert_eq!(
            judge(&with_opts[..14 + 19], &p),
            Outcome::Malformed { family: family::IPV4 }
        );
        // UDP to 25 and IHL 4 and version 5.
        let udp = eth(&[], 0x0800, &ipv4([198, 51, 100, 1], 17, &[], 0, &tcp(25)));
        assert_eq!(judge(&udp, &p), Outcome::NotOurs);
        let mut bad = first.clone();
        bad[14] = 0x44;
        assert_eq!(judge(&bad, &p), Outcome::Malformed { family: family::IPV4 });
        bad[14] = 0x55;
        assert_eq!(judge(&bad, &p), Outcome::Malformed { family: family::IPV4 });
    }

    #[test]
    fn ipv6_extension_header_walk() {
        let p = policy();
        let opts = |len_units: u8| {
            let mut b = vec![0u8; (usize::from(len_units) + 1) * 8];
            b[1] = len_units;
            b
        };
        let frag = |offset: u16| {
            let mut b = vec![0u8; 8];
            b[2..4].copy_from_slice(&((offset << 3) | 1).to_be_bytes());
            b
        };
        let ah = {
            let mut b = vec![0u8; 16];
            b[1] = 2; // (2 + 2) * 4 = 16 bytes
            b
        };
        let denied = "2001:db8:d::20";
        let allowed = "2001:db8:a::10";
        let f = |src, ext: &[(u8, Vec<u8>)], last| judge(&eth(&[], 0x86dd, &ipv6(src, ext, last, &tcp(25))), &p);
        assert_eq!(f(allowed, &[], 6), judged(25, 0, family::IPV6, true));
        assert_eq!(
            f(
                denied,
                &[(0, opts(0)), (43, opts(1)), (51, ah.clone()), (60, opts(0))],
                6
            ),
            judged(25, 0, family::IPV6, false)
        );
        assert_eq!(
            f(denied, &[(44, frag(0))], 6),
            judged(25, 0, family::IPV6, false),
            "first fragment"
        );
        assert_eq!(f(denied, &[(44, frag(5))], 6), Outcome::NotOurs, "non-first fragment");
        assert_eq!(f(denied, &[(60, opts(0))], 17), Outcome::NotOurs, "chain ends in UDP");
        let eight: Vec<_> = (0..8).map(|_| (60, opts(0))).collect();
        assert_eq!(f(denied, &eight, 6), judged(25, 0, family::IPV6, false));
        let nine: Vec<_> = (0..9).map(|_| (60, opts(0))).collect();
        assert_eq!(f(denied, &nine, 6), Outcome::Malformed { family: family::IPV6 });
        // 8 headers then a non-first fragment as the ninth: the walk stops first.
        let mut eight_then_frag = eight.clone();
        eight_then_frag.push((44, frag(9)));
        assert_eq!(
            f(denied, &eight_then_frag, 6),
            Outcome::Malformed { family: family::IPV6 }
        );
        // An options header whose length runs past the buffer.
        let full = eth(&[], 0x86dd, &ipv6(denied, &[(60, opts(3))], 6, &tcp(25)));
        assert_eq!(
            judge(&full[..14 + 40 + 16], &p),
            Outcome::Malformed { family: family::IPV6 }
        );
        assert_eq!(
            judge(&full[..14 + 40 + 7], &p),
            Outcome::Malformed { family: family::IPV6 }
        );
        assert_eq!(judge(&full[..14 + 39], &p), Outcome::Malformed { family: family::IPV6 });
    }

    #[test]
    fn actions_and_counter_keys() {
        let j = judged(25, 3, family::IPV6, false);
        let (a, k) = action(j, mode::ENFORCE, 7);
        assert_eq!(a, XDP_DROP);
        assert_eq!(
            k,
            Some(CounterKey {
                ifindex: 7,
                port: 25,
                guard: 3,
                family: family::IPV6,
                verdict: verdict::DROPPED,
                _pad: [0; 3]
            })
        );
        assert_eq!(action(j, mode::MONITOR, 7).0, XDP_PASS);
        assert_eq!(
            action(j, mode::MONITOR, 7).1.map(|k| k.verdict),
            Some(verdict::WOULD_DROP)
        );
        let m = Outcome::Malformed {
            family: family::UNKNOWN,
        };
        assert_eq!(action(m, mode::ENFORCE, 1).0, XDP_DROP);
        assert_eq!(
            action(m, mode::MONITOR, 1),
            (
                XDP_PASS,
                Some(CounterKey {
                    ifindex: 1,
                    verdict: verdict::MALFORMED_PASSED,
                    ..CounterKey::default()
                })
            )
        );
        assert_eq!(action(Outcome::NotOurs, mode::ENFORCE, 1), (XDP_PASS, None));
    }
}
