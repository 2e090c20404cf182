//! Random mixes: a seeded generator of realistic and hostile frames aimed
//! at the config under test.
use std::net::{Ipv4Addr, Ipv6Addr};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

use super::{
    CLIENT_MAC, Ext, Ipv4, Ipv6, SERVER_MAC, Tcp, Vlan, ethernet, ethertype, icmp_echo, icmpv6_echo, ipv4_options,
    proto, tcp_flags, tcp_v4, tcp_v6, udp,
};

/// Where the generator takes addresses and ports from: the prefixes of the
/// config under test (so frames land on allow, deny, carve-outs and no-match)
/// and its guarded ports.
#[derive(Debug, Clone)]
pub struct Targets {
    /// (network, prefix length) of every IPv4 entry in the config.
    pub v4: Vec<(Ipv4Addr, u8)>,
    pub v6: Vec<(Ipv6Addr, u8)>,
    /// Ports some guard owns.
    pub guarded: Vec<u16>,
    /// Destinations.
    pub dst_v4: Ipv4Addr,
    pub dst_v6: Ipv6Addr,
}

/// Seeded generator of frames. Each frame comes with a short label of what it
/// was built to be, for the breakdown and for failure messages.
pub struct FrameGen {
    rng: StdRng,
    targets: Targets,
}

/// Extension-header types as the generator draws them.
const EXT_KINDS: [u8; 5] = [
    proto::HOPOPTS,
    proto::ROUTING,
    proto::FRAGMENT,
    proto::AH,
    proto::DSTOPTS,
];

impl FrameGen {
    pub fn new(seed: u64, targets: Targets) -> FrameGen {
        FrameGen {
            rng: StdRng::seed_from_u64(seed),
            targets,
        }
    }

    /// An IPv4 source: mostly inside (or at the edges of) a config prefix,
    /// else anywhere in clustered documentation-like space.
    fn src_v4(&mut self) -> Ipv4Addr {
        let r = &mut self.rng;
        if !self.targets.v4.is_empty() && r.random_bool(0.85) {
            let &(net, len) = self.targets.v4.choose(r).expect("non-empty");
            let host_bits = 32 - u32::from(len);
            let mask = if host_bits == 32 {
                u32::MAX
            } else {
                (1u32 << host_bits) - 1
            };
            let host = match r.random_range(0..10) {
                0 => 0,
                1 => mask,
                _ => r.random::<u32>() & mask,
            };
            return Ipv4Addr::from(u32::from(net) | host);
        }
        let base: [u8; 3] = *[[192, 0, 2], [198, 51, 100], [203, 0, 113], [198, 18, 0], [10, 0, 0]]
            .choose(r)
            .expect("non-empty");
        Ipv4Addr::new(base[0], base[1], base[2], r.random())
    }

    fn src_v6(&mut self) -> Ipv6Addr {
        let r = &mut self.rng;
        if !self.targets.v6.is_empty() && r.random_bool(0.85) {
            let &(net, len) = self.targets.v6.choose(r).expect("non-empty");
            let host_bits = 128 - u32::from(len);
            let mask = if host_bits == 128 {
                u128::MAX
            } else {
                (1u128 << host_bits) - 1
            };
            let host = match r.random_range(0..10) {
                0 => 0,
                1 => mask,
                // Small host parts, like real assignments.
                2..=5 => u128::from(r.random::<u16>()) & mask,
                _ => r.random::<u128>() & mask,
            };
            return Ipv6Addr::from(u128::from(net) | host);
        }
        let hi: u128 = 0x2001_0db8 << 96;
        let site = u128::from(r.random_range(0u16..0x20)) << 80;
        Ipv6Addr::from(hi | site | u128::from(r.random::<u32>()))
    }

    fn dst_port(&mut self) -> u16 {
        let r = &mut self.rng;
        if !self.targets.guarded.is_empty() && r.random_bool(0.7) {
            *self.targets.guarded.choose(r).expect("non-empty")
        } else {
            *[22, 24, 26, 80, 443, 586, 588, 2525, 0, 65535, r.random()]
                .choose(r)
                .expect("non-empty")
        }
    }

    fn tcp(&mut self, dst_port: u16) -> Tcp {
        let r = &mut self.rng;
        let mut t = Tcp::syn(r.random_range(1024..65535), dst_port, r.random());
        t.flags = *[
            tcp_flags::SYN,
            tcp_flags::SYN,
            tcp_flags::ACK,
            tcp_flags::PSH | tcp_flags::ACK,
            tcp_flags::FIN | tcp_flags::ACK,
            tcp_flags::RST,
        ]
        .choose(r)
        .expect("non-empty");
        if t.flags != tcp_flags::SYN {
            t.options.clear();
            t.ack = r.random();
        }
        if t.flags & tcp_flags::PSH != 0 {
            t.payload = b"EHLO relay-guard.test\r\n".to_vec();
        }
        t
    }

    fn vlans(&mut self) -> Vec<Vlan> {
        let r = &mut self.rng;
        let n = match r.random_range(0..100) {
            0..70 => 0,
            70..85 => 1,
            85..95 => 2,
            95..98 => 3,
            _ => 4,
        };
        (0..n)
            .map(|i| {
                let vid = r.random_range(1..4095);
                if i == 0 && n > 1 && r.random_bool(0.7) {
                    Vlan::ad(vid)
                } else {
                    Vlan::q(vid)
                }
            })
            .collect()
    }

    fn ipv4(&mut self, protocol: u8) -> Ipv4 {
        let src = self.src_v4();
        let mut ip = Ipv4::new(src, self.targets.dst_v4, protocol);
        ip.id = self.rng.random();
        ip.dont_fragment = self.rng.random_bool(0.5);
        ip
    }

    fn ipv6(&mut self, next: u8) -> Ipv6 {
        let src = self.src_v6();
        let mut ip = Ipv6::new(src, self.targets.dst_v6, next);
        ip.flow_label = self.rng.random();
        ip
    }

    fn ext(&mut self, kind: u8) -> Ext {
        let r = &mut self.rng;
        // Mostly short headers; now and then a long one. Headers stay well
        // inside the first buffer of a test run (about 3.5 KiB): the program
        // reads only that buffer, and the model sees the whole frame.
        let len = if r.random_bool(0.9) {
            r.random_range(0..4)
        } else {
            r.random_range(4..16)
        };
        match kind {
            proto::HOPOPTS => Ext::HopByHop { len },
            proto::ROUTING => Ext::Routing { len },
            proto::DSTOPTS => Ext::DestOpts { len },
            proto::AH => Ext::Ah {
                len: len.saturating_mul(2).max(1),
                spi: r.random(),
            },
            _ => {
                let offset = if r.random_bool(0.7) {
                    0
                } else {
                    r.random_range(1..0x1fff)
                };
                Ext::Fragment {
                    offset,
                    more: r.random_bool(0.8),
                    id: r.random(),
                }
            }
        }
    }

    /// A chain of `n` headers: random types, or one type repeated, or the
    /// usual order (RFC 8200 4.1).
    fn chain(&mut self, n: usize) -> Vec<Ext> {
        match self.rng.random_range(0..4) {
            0 => {
                let kind = *EXT_KINDS.choose(&mut self.rng).expect("non-empty");
                (0..n).map(|_| self.ext(kind)).collect()
            }
            1 => {
                let order = [
                    proto::HOPOPTS,
                    proto::DSTOPTS,
                    proto::ROUTING,
                    proto::FRAGMENT,
                    proto::AH,
                    proto::DSTOPTS,
                ];
                (0..n).map(|i| self.ext(order[i % order.len()])).collect()
            }
            _ => (0..n)
                .map(|_| {
                    let kind = *EXT_KINDS.choose(&mut self.rng).expect("non-empty");
                    self.ext(kind)
                })
                .collect(),
        }
    }

    /// The next frame and its label.
    pub fn frame(&mut self) -> (&'static str, Vec<u8>) {
        let vlans = self.vlans();
        let roll = self.rng.random_range(0..100);
        let (label, mut frame) = match roll {
            0..18 => {
                let port = self.dst_port();
                let (ip, tcp) = (self.ipv4(proto::TCP), self.tcp(port));
                ("v4 tcp", tcp_v4(&vlans, &ip, &tcp))
            }
            18..34 => {
                let port = self.dst_port();
                let (ip, tcp) = (self.ipv6(proto::TCP), self.tcp(port));
                ("v6 tcp", tcp_v6(&vlans, &ip, &tcp))
            }
            34..42 => {
                let port = self.dst_port();
                let mut ip = self.ipv4(proto::TCP);
                ip.options = ipv4_options(self.rng.random_range(1..=10));
                let tcp = self.tcp(port);
                ("v4 options", tcp_v4(&vlans, &ip, &tcp))
            }
            42..50 => self.v4_fragment(&vlans),
            50..64 => self.v6_chain(&vlans),
            64..70 => self.v6_fragment(&vlans),
            70..76 => {
                let port = self.dst_port();
                if self.rng.random_bool(0.5) {
                    let ip = self.ipv4(proto::UDP);
                    let u = udp(self.rng.random(), port, b"relay-guard", ip.src.into(), ip.dst.into());
                    (
                        "v4 udp",
                        ethernet(SERVER_MAC, CLIENT_MAC, &vlans, ethertype::IPV4, &ip.packet(&u)),
                    )
                } else {
                    let mut ip = self.ipv6(proto::UDP);
                    let chain_len = self.rng.random_range(0..3);
                    ip.ext = self.chain(chain_len);
                    let u = udp(self.rng.random(), port, b"relay-guard", ip.src.into(), ip.dst.into());
                    (
                        "v6 udp",
                        ethernet(SERVER_MAC, CLIENT_MAC, &vlans, ethertype::IPV6, &ip.packet(&u)),
                    )
                }
            }
            76..81 => {
                let (id, seq) = (self.rng.random(), self.rng.random());
                if self.rng.random_bool(0.5) {
                    let ip = self.ipv4(proto::ICMP);
                    let m = icmp_echo(id, seq, b"ping");
                    (
                        "v4 icmp",
                        ethernet(SERVER_MAC, CLIENT_MAC, &vlans, ethertype::IPV4, &ip.packet(&m)),
                    )
                } else {
                    let ip = self.ipv6(proto::ICMPV6);
                    let m = icmpv6_echo(id, seq, b"ping", ip.src, ip.dst);
                    (
                        "v6 icmp",
                        ethernet(SERVER_MAC, CLIENT_MAC, &vlans, ethertype::IPV6, &ip.packet(&m)),
                    )
                }
            }
            81..84 => {
                // Replies to the host's own outbound SMTP: source port 25.
                let port = self.dst_port();
                let ephemeral = self.rng.random_range(1024..65535);
                let mut tcp = self.tcp(ephemeral);
                tcp.src_port = port;
                tcp.flags = tcp_flags::SYN | tcp_flags::ACK;
                if self.rng.random_bool(0.5) {
                    let ip = self.ipv4(proto::TCP);
                    ("v4 reply", tcp_v4(&vlans, &ip, &tcp))
                } else {
                    let ip = self.ipv6(proto::TCP);
                    ("v6 reply", tcp_v6(&vlans, &ip, &tcp))
                }
            }
            84..88 => self.corrupt_ip(&vlans),
            88..92 => {
                // A TCP-carrying frame with 1-3 bytes of its headers flipped.
                let mut f = self.tcp_frame(&vlans);
                let span = f.len().min(14 + 4 * vlans.len() + 120);
                for _ in 0..self.rng.random_range(1..=3) {
                    let at = self.rng.random_range(0..span);
                    f[at] ^= self.rng.random_range(1..=255u8);
                }
                ("mutated", f)
            }
            92..94 => {
                // Jumbo: headers in the first buffer, a payload that makes
                // BPF_PROG_TEST_RUN build a multi-buffer (xdp.frags) packet.
                let port = self.dst_port();
                let mut tcp = self.tcp(port);
                tcp.flags = tcp_flags::PSH | tcp_flags::ACK;
                tcp.payload = vec![b'j'; self.rng.random_range(4000..9000)];
                if self.rng.random_bool(0.5) {
                    let ip = self.ipv4(proto::TCP);
                    ("v4 jumbo", tcp_v4(&vlans, &ip, &tcp))
                } else {
                    let chain_len = self.rng.random_range(0..4);
                    let chain = self.chain(chain_len);
                    let ip = self.ipv6(proto::TCP).with_ext(chain);
                    ("v6 jumbo", tcp_v6(&vlans, &ip, &tcp))
                }
            }
            94..96 => {
                // Not IP at all: ARP, an unknown ethertype, runts.
                let ethertype = *[ethertype::ARP, 0x88cc, 0x0000, 0x05dc, 0xffff]
                    .choose(&mut self.rng)
                    .expect("non-empty");
                let len = self.rng.random_range(0..64);
                let payload: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                (
                    "other ethertype",
                    ethernet(SERVER_MAC, CLIENT_MAC, &vlans, ethertype, &payload),
                )
            }
            _ => {
                // A well-formed frame cut at a random point.
                let f = self.tcp_frame(&vlans);
                let cut = self.rng.random_range(0..f.len());
                ("random cut", f[..cut].to_vec())
            }
        };
        // Ethernet pads short frames to 60 bytes (without FCS); sometimes
        // with junk, as some NICs leave it.
        if frame.len() < 60 && self.rng.random_bool(0.3) {
            let junk = self.rng.random_bool(0.5);
            while frame.len() < 60 {
                frame.push(if junk { self.rng.random() } else { 0 });
            }
        }
        (label, frame)
    }

    /// A TCP frame of either family, with IPv4 options or an IPv6 chain of
    /// up to 9 headers now and then.
    fn tcp_frame(&mut self, vlans: &[Vlan]) -> Vec<u8> {
        let port = self.dst_port();
        let tcp = self.tcp(port);
        if self.rng.random_bool(0.5) {
            let mut ip = self.ipv4(proto::TCP);
            if self.rng.random_bool(0.5) {
                ip.options = ipv4_options(self.rng.random_range(1..=10));
            }
            tcp_v4(vlans, &ip, &tcp)
        } else {
            let chain_len = self.rng.random_range(0..10);
            let chain = self.chain(chain_len);
            let ip = self.ipv6(proto::TCP).with_ext(chain);
            tcp_v6(vlans, &ip, &tcp)
        }
    }

    fn v4_fragment(&mut self, vlans: &[Vlan]) -> (&'static str, Vec<u8>) {
        let port = self.dst_port();
        let mut ip = self.ipv4(proto::TCP);
        ip.dont_fragment = false;
        ip.more_fragments = true;
        if self.rng.random_bool(0.3) {
            ip.options = ipv4_options(self.rng.random_range(1..=10));
        }
        let tcp = self.tcp(port).bytes(ip.src.into(), ip.dst.into());
        if self.rng.random_bool(0.5) {
            // First fragment: the TCP header, whole or cut (RFC 1858 tiny
            // fragments), in 8-byte multiples as fragmentation produces.
            let cut = *[8, 16, 24, tcp.len()].choose(&mut self.rng).expect("non-empty");
            let cut = cut.min(tcp.len());
            (
                "v4 first fragment",
                ethernet(SERVER_MAC, CLIENT_MAC, vlans, ethertype::IPV4, &ip.packet(&tcp[..cut])),
            )
        } else {
            // A later fragment whose bytes happen to look like a TCP header
            // to a guarded port: it carries no ports and must pass.
            ip.fragment_offset = self.rng.random_range(1..0x1fff);
            ip.more_fragments = self.rng.random_bool(0.5);
            (
                "v4 later fragment",
                ethernet(SERVER_MAC, CLIENT_MAC, vlans, ethertype::IPV4, &ip.packet(&tcp)),
            )
        }
    }

    fn v6_fragment(&mut self, vlans: &[Vlan]) -> (&'static str, Vec<u8>) {
        let port = self.dst_port();
        let tcp = self.tcp(port);
        let first = self.rng.random_bool(0.5);
        let offset = if first { 0 } else { self.rng.random_range(1..0x1fff) };
        let mut chain = Vec::new();
        if self.rng.random_bool(0.3) {
            chain.push(self.ext(proto::HOPOPTS));
        }
        chain.push(Ext::Fragment {
            offset,
            more: self.rng.random_bool(0.8),
            id: self.rng.random(),
        });
        if self.rng.random_bool(0.3) {
            chain.push(self.ext(proto::DSTOPTS));
        }
        let ip = self.ipv6(proto::TCP).with_ext(chain);
        let label = if first {
            "v6 first fragment"
        } else {
            "v6 later fragment"
        };
        (label, tcp_v6(vlans, &ip, &tcp))
    }

    fn v6_chain(&mut self, vlans: &[Vlan]) -> (&'static str, Vec<u8>) {
        let n = match self.rng.random_range(0..10) {
            0..4 => self.rng.random_range(1..7),
            4 => 7,
            5 => 8,
            6 => 9,
            7 => 10,
            _ => self.rng.random_range(11..17),
        };
        let chain = self.chain(n);
        let next = *[
            proto::TCP,
            proto::TCP,
            proto::TCP,
            proto::UDP,
            proto::ICMPV6,
            proto::NONE,
            proto::ESP,
        ]
        .choose(&mut self.rng)
        .expect("non-empty");
        let port = self.dst_port();
        let ip = self.ipv6(next).with_ext(chain);
        let frame = if next == proto::TCP {
            tcp_v6(vlans, &ip, &self.tcp(port))
        } else {
            let u = udp(self.rng.random(), port, b"relay-guard", ip.src.into(), ip.dst.into());
            ethernet(SERVER_MAC, CLIENT_MAC, vlans, ethertype::IPV6, &ip.packet(&u))
        };
        let label = match n {
            0..7 => "v6 ext 1-6",
            7 => "v6 ext 7",
            8 => "v6 ext 8",
            9 => "v6 ext 9",
            _ => "v6 ext 10+",
        };
        (label, frame)
    }

    /// Header fields a parser must not trust: version, IHL, next header.
    fn corrupt_ip(&mut self, vlans: &[Vlan]) -> (&'static str, Vec<u8>) {
        let port = self.dst_port();
        let tcp = self.tcp(port);
        if self.rng.random_bool(0.5) {
            let mut ip = self.ipv4(proto::TCP);
            match self.rng.random_range(0..3) {
                0 => ip.version = Some(self.rng.random_range(0..16)),
                1 => ip.ihl = Some(self.rng.random_range(0..16)),
                _ => ip.protocol = self.rng.random(),
            }
            ("v4 corrupt", tcp_v4(vlans, &ip, &tcp))
        } else {
            let mut ip = self.ipv6(proto::TCP);
            let chain_len = self.rng.random_range(0..4);
            ip.ext = self.chain(chain_len);
            match self.rng.random_range(0..2) {
                0 => ip.version = Some(self.rng.random_range(0..16)),
                _ => ip.next = self.rng.random(),
            }
            ("v6 corrupt", tcp_v6(vlans, &ip, &tcp))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic() {
        let t = Targets {
            v4: vec![(Ipv4Addr::new(192, 0, 2, 0), 24)],
            v6: vec![("2001:db8::".parse().expect("v6"), 48)],
            guarded: vec![25],
            dst_v4: Ipv4Addr::new(203, 0, 113, 1),
            dst_v6: "2001:db8:1::1".parse().expect("v6"),
        };
        let a: Vec<_> = {
            let mut g = FrameGen::new(7, t.clone());
            (0..200).map(|_| g.frame()).collect()
        };
        let b: Vec<_> = {
            let mut g = FrameGen::new(7, t);
            (0..200).map(|_| g.frame()).collect()
        };
        assert_eq!(a, b);
    }
}
