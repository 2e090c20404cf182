//! Raw Ethernet frames for the parser tests: builders for each layer and a
//! seeded random generator of realistic and hostile mixes.
//!
//! Builders write what they are told, including nonsense (a wrong version, an
//! IHL that points past the buffer, a fragment header in the middle of a long
//! chain); lengths, checksums and next-header fields are filled in unless a
//! field says otherwise. Multi-byte fields are written in network byte order.
//!
//! [`FrameGen`] draws frames from a [`StdRng`] seeded by the caller, so a
//! failing frame can be reproduced from the seed the test prints.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

/// The lab's server MAC (`lab.rs`): frames sent to it reach `server_if`.
pub const SERVER_MAC: [u8; 6] = [0x02, 0x72, 0x67, 0x00, 0x00, 0x01];
/// The lab's client MAC.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x72, 0x67, 0x00, 0x00, 0x02];

/// Ethertypes (IEEE registry).
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q customer VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service VLAN tag (QinQ outer tag).
    pub const QINQ: u16 = 0x88a8;
}

/// IP protocol numbers / IPv6 next-header values (IANA registry).
pub mod proto {
    pub const HOPOPTS: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NONE: u8 = 59;
    pub const DSTOPTS: u8 = 60;
}

/// TCP flag bits (RFC 9293 3.1).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

// ---- Ethernet ----

/// One VLAN tag: the TPID that announces it (0x8100 or 0x88a8) and its TCI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vlan {
    pub tpid: u16,
    pub tci: u16,
}

impl Vlan {
    pub const fn q(vid: u16) -> Vlan {
        Vlan {
            tpid: ethertype::VLAN,
            tci: vid,
        }
    }

    pub const fn ad(vid: u16) -> Vlan {
        Vlan {
            tpid: ethertype::QINQ,
            tci: vid,
        }
    }
}

/// Destination, source, the tags outermost first, the ethertype, the payload.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], vlans: &[Vlan], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for v in vlans {
        f.extend_from_slice(&v.tpid.to_be_bytes());
        f.extend_from_slice(&v.tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

// ---- Checksums ----

/// RFC 1071 one's-complement sum, folded and inverted.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for chunk in chunks {
        for &b in *chunk {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

/// The pseudo-header of RFC 9293 3.1 / RFC 8200 8.1 for `len` bytes of `proto`.
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        }
        (s, d) => {
            p.extend_from_slice(&v6_octets(s));
            p.extend_from_slice(&v6_octets(d));
            p.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
    }
    p
}

fn v6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

// ---- Transport ----

/// A TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcp {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// Bits of [`tcp_flags`].
    pub flags: u8,
    pub window: u16,
    /// Options, padded with NOPs to a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    /// A SYN from an ephemeral port.
    pub fn syn(src_port: u16, dst_port: u16, seq: u32) -> Tcp {
        Tcp {
            src_port,
            dst_port,
            seq,
            ack: 0,
            flags: tcp_flags::SYN,
            window: 64_240,
            // MSS 1460, SACK permitted.
            options: vec![2, 4, 0x05, 0xb4, 4, 2],
            payload: Vec::new(),
        }
    }

    /// The segment with its checksum for `src` → `dst`.
    pub fn bytes(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(1);
        }
        let hlen = 20 + opts.len().min(40);
        let mut t = Vec::with_capacity(hlen + self.payload.len());
        t.extend_from_slice(&self.src_port.to_be_bytes());
        t.extend_from_slice(&self.dst_port.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push(u8::try_from(hlen / 4).expect("<= 15") << 4);
        t.push(self.flags);
        t.extend_from_slice(&self.window.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        t.extend_from_slice(&opts[..hlen - 20]);
        t.extend_from_slice(&self.payload);
        let sum = checksum(&[&pseudo_header(src, dst, proto::TCP, t.len()), &t]);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        t
    }
}

/// A UDP datagram with its checksum.
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8], src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let sum = checksum(&[&pseudo_header(src, dst, proto::UDP, len), &u]);
    u[6..8].copy_from_slice(&(if sum == 0 { 0xffff } else { sum }).to_be_bytes());
    u
}

/// An ICMP (IPv4) echo request.
pub fn icmp_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let sum = checksum(&[&m]);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// An ICMPv6 echo request (RFC 4443 4.1), checksummed over the pseudo-header.
pub fn icmpv6_echo(id: u16, seq: u16, payload: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![128, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let sum = checksum(&[&pseudo_header(src.into(), dst.into(), proto::ICMPV6, m.len()), &m]);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

// ---- IPv4 ----

/// An IPv4 header (RFC 791 3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units (13 bits).
    pub fragment_offset: u16,
    pub ttl: u8,
    /// Options, padded with End-of-Options to a multiple of 4 (at most 40).
    pub options: Vec<u8>,
    /// Written instead of 4 when set (to build invalid headers).
    pub version: Option<u8>,
    /// Written instead of the computed IHL when set.
    pub ihl: Option<u8>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Ipv4 {
        Ipv4 {
            src,
            dst,
            protocol,
            id: 0,
            dont_fragment: false,
            more_fragments: false,
            fragment_offset: 0,
            ttl: 64,
            options: Vec::new(),
            version: None,
            ihl: None,
        }
    }

    /// Header and payload, with total length and header checksum.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut opts = self.options.clone();
        opts.truncate(40);
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let hlen = 20 + opts.len();
        let ihl = self.ihl.unwrap_or(u8::try_from(hlen / 4).expect("<= 15"));
        let mut h = Vec::with_capacity(hlen + payload.len());
        h.push((self.version.unwrap_or(4) << 4) | (ihl & 0x0f));
        h.push(0); // DSCP/ECN
        h.extend_from_slice(&u16::try_from(hlen + payload.len()).unwrap_or(u16::MAX).to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        let flags = (u16::from(self.dont_fragment) << 14) | (u16::from(self.more_fragments) << 13);
        h.extend_from_slice(&(flags | (self.fragment_offset & 0x1fff)).to_be_bytes());
        h.push(self.ttl);
        h.push(self.protocol);
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&opts);
        let sum = checksum(&[&h]);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// Realistic IPv4 options of `words` 32-bit words (1..=10): NOPs, a record
/// route with room for addresses, a timestamp, padding.
pub fn ipv4_options(words: usize) -> Vec<u8> {
    let len = words.clamp(1, 10) * 4;
    let mut o = Vec::with_capacity(len);
    if len >= 12 {
        // Record route (7): type, length (3 + 4 per slot), pointer (4 = the
        // first slot), empty slots.
        let rr = 3 + 4 * ((len - 4 - 3) / 4);
        o.extend_from_slice(&[7, u8::try_from(rr).expect("<= 39"), 4]);
        o.resize(rr, 0);
    }
    while o.len() < len - 1 {
        o.push(1); // NOP
    }
    o.push(0); // End of options
    o
}

// ---- IPv6 ----

/// One IPv6 extension header. Lengths are the header's own length field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options (0): `(len + 1) * 8` bytes of PadN.
    HopByHop { len: u8 },
    /// Routing (43), an unknown routing type with Segments Left 0 (RFC 8200
    /// 4.4: ignored by the receiver).
    Routing { len: u8 },
    /// Destination options (60).
    DestOpts { len: u8 },
    /// Fragment (44); `offset` in 8-byte units.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Authentication header (51): `(len + 2) * 4` bytes (RFC 4302 2.2).
    Ah { len: u8, spi: u32 },
}

impl Ext {
    pub fn kind(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => proto::HOPOPTS,
            Ext::Routing { .. } => proto::ROUTING,
            Ext::DestOpts { .. } => proto::DSTOPTS,
            Ext::Fragment { .. } => proto::FRAGMENT,
            Ext::Ah { .. } => proto::AH,
        }
    }

    /// The header's bytes, with `next` as its next-header field.
    pub fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            Ext::HopByHop { len } | Ext::DestOpts { len } => {
                let total = (usize::from(len) + 1) * 8;
                let mut b = vec![next, len];
                // PadN options (RFC 8200 4.2: type 1, data length, zeros) fill
                // the rest; a single leftover byte is a Pad1.
                while b.len() < total {
                    let room = total - b.len();
                    if room == 1 {
                        b.push(0);
                    } else {
                        let n = (room - 2).min(255);
                        b.extend_from_slice(&[1, u8::try_from(n).expect("<= 255")]);
                        b.resize(b.len() + n, 0);
                    }
                }
                b
            }
            Ext::Routing { len } => {
                let total = (usize::from(len) + 1) * 8;
                let mut b = vec![next, len, 253, 0];
                b.resize(total, 0);
                b
            }
            Ext::Fragment { offset, more, id } => {
                let mut b = vec![next, 0];
                b.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
            Ext::Ah { len, spi } => {
                let total = (usize::from(len) + 2) * 4;
                let mut b = vec![next, len, 0, 0];
                b.extend_from_slice(&spi.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                // The ICV fills the rest; a 2-word header (len 0) has no
                // room for the sequence number and is cut to 8 bytes.
                b.resize(total, 0xa5);
                b
            }
        }
    }
}

/// An IPv6 header (RFC 8200 3) and its extension-header chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// In order; each header's next-header field names the one after it.
    pub ext: Vec<Ext>,
    /// The next header after the chain (TCP, UDP, ICMPv6, no-next-header…).
    pub next: u8,
    pub hop_limit: u8,
    pub flow_label: u32,
    /// Written instead of 6 when set.
    pub version: Option<u8>,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next: u8) -> Ipv6 {
        Ipv6 {
            src,
            dst,
            ext: Vec::new(),
            next,
            hop_limit: 64,
            flow_label: 0,
            version: None,
        }
    }

    pub fn with_ext(mut self, ext: Vec<Ext>) -> Ipv6 {
        self.ext = ext;
        self
    }

    /// Header, chain and payload, with the payload length filled in.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut h = Vec::with_capacity(40 + payload.len());
        let first = (u32::from(self.version.unwrap_or(6)) << 28) | (self.flow_label & 0xf_ffff);
        h.extend_from_slice(&first.to_be_bytes());
        h.extend_from_slice(&[0, 0]); // payload length, below
        h.push(self.ext.first().map_or(self.next, Ext::kind));
        h.push(self.hop_limit);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        for (i, e) in self.ext.iter().enumerate() {
            h.extend_from_slice(&e.bytes(self.ext.get(i + 1).map_or(self.next, Ext::kind)));
        }
        h.extend_from_slice(payload);
        let plen = u16::try_from(h.len() - 40).unwrap_or(u16::MAX);
        h[4..6].copy_from_slice(&plen.to_be_bytes());
        h
    }
}

// ---- Whole frames ----

/// Ethernet + IPv4 + a TCP segment (addresses from the IPv4 header).
pub fn tcp_v4(vlans: &[Vlan], ip: &Ipv4, tcp: &Tcp) -> Vec<u8> {
    let seg = tcp.bytes(ip.src.into(), ip.dst.into());
    ethernet(SERVER_MAC, CLIENT_MAC, vlans, ethertype::IPV4, &ip.packet(&seg))
}

/// Ethernet + IPv6 (+ chain) + a TCP segment.
pub fn tcp_v6(vlans: &[Vlan], ip: &Ipv6, tcp: &Tcp) -> Vec<u8> {
    let seg = tcp.bytes(ip.src.into(), ip.dst.into());
    ethernet(SERVER_MAC, CLIENT_MAC, vlans, ethertype::IPV6, &ip.packet(&seg))
}

/// Every prefix of `frame`, from empty to whole: the truncation points.
pub fn truncations(frame: &[u8]) -> impl Iterator<Item = &[u8]> {
    (0..=frame.len()).map(move |n| &frame[..n])
}

/// Lowercase hex, 16 bytes a line with offsets, for failure messages.
pub fn hex(frame: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in frame.chunks(16).enumerate() {
        s += &format!("{:04x}:", i * 16);
        for b in chunk {
            s += &format!(" {b:02x}");
        }
        s.push('\n');
    }
    s
}

// ---- Random mixes ----

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

/// Fixed frames whose every truncation point the tests run: one of each
/// header shape the parser walks, to a guarded port from `src_*`.
pub fn base_frames(src_v4: Ipv4Addr, src_v6: Ipv6Addr, targets: &Targets, port: u16) -> Vec<(&'static str, Vec<u8>)> {
    let (dst4, dst6) = (targets.dst_v4, targets.dst_v6);
    let mut tcp = Tcp::syn(40_000, port, 0x5247_0001);
    tcp.payload = b"EHLO".to_vec();
    let v4 = Ipv4::new(src_v4, dst4, proto::TCP);
    let mut v4_opts = v4.clone();
    v4_opts.options = ipv4_options(10);
    let mut v4_first = v4.clone();
    v4_first.more_fragments = true;
    let v6 = Ipv6::new(src_v6, dst6, proto::TCP);
    let eight = vec![
        Ext::HopByHop { len: 0 },
        Ext::DestOpts { len: 1 },
        Ext::Routing { len: 2 },
        Ext::Ah { len: 4, spi: 7 },
        Ext::Fragment {
            offset: 0,
            more: true,
            id: 9,
        },
        Ext::DestOpts { len: 0 },
        Ext::Ah { len: 1, spi: 8 },
        Ext::DestOpts { len: 3 },
    ];
    let mut nine = eight.clone();
    nine.push(Ext::DestOpts { len: 0 });
    let udp_v4 = Ipv4::new(src_v4, dst4, proto::UDP);
    vec![
        ("base v4", tcp_v4(&[], &v4, &tcp)),
        ("base v4 qinq", tcp_v4(&[Vlan::ad(100), Vlan::q(200)], &v4, &tcp)),
        (
            "base v4 3 tags",
            tcp_v4(&[Vlan::ad(100), Vlan::q(200), Vlan::q(300)], &v4, &tcp),
        ),
        ("base v4 options", tcp_v4(&[Vlan::q(5)], &v4_opts, &tcp)),
        ("base v4 first fragment", tcp_v4(&[], &v4_first, &tcp)),
        ("base v4 udp", {
            let u = udp(5353, port, b"x", src_v4.into(), dst4.into());
            ethernet(SERVER_MAC, CLIENT_MAC, &[], ethertype::IPV4, &udp_v4.packet(&u))
        }),
        ("base v6", tcp_v6(&[Vlan::q(7)], &v6, &tcp)),
        ("base v6 ext 8", tcp_v6(&[], &v6.clone().with_ext(eight), &tcp)),
        ("base v6 ext 9", tcp_v6(&[], &v6.clone().with_ext(nine), &tcp)),
        (
            "base v6 later fragment",
            tcp_v6(
                &[],
                &v6.clone().with_ext(vec![Ext::Fragment {
                    offset: 3,
                    more: false,
                    id: 1,
                }]),
                &tcp,
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let ip = Ipv4 {
            options: ipv4_options(3),
            ..Ipv4::new(Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(203, 0, 113, 1), 6)
        };
        let p = ip.packet(&[]);
        assert_eq!(p.len(), 32);
        assert_eq!(p[0], 0x48);
        assert_eq!(checksum(&[&p]), 0, "a header with its checksum sums to zero");
    }

    #[test]
    fn ipv6_chain_links_next_headers() {
        let ip = Ipv6::new(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, proto::TCP).with_ext(vec![
            Ext::HopByHop { len: 0 },
            Ext::Ah { len: 4, spi: 1 },
            Ext::Fragment {
                offset: 2,
                more: true,
                id: 3,
            },
        ]);
        let p = ip.packet(&[]);
        assert_eq!(p[6], proto::HOPOPTS);
        assert_eq!((p[40], p.len()), (proto::AH, 40 + 8 + 24 + 8));
        assert_eq!(p[48], proto::FRAGMENT);
        assert_eq!(p[72], proto::TCP);
        assert_eq!(u16::from_be_bytes([p[74], p[75]]) >> 3, 2);
    }

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
