//! Raw Ethernet frames for the parser tests: builders for each layer and a
//! seeded random generator of realistic and hostile mixes.
//!
//! Builders write what they are told, including nonsense (a wrong version, an
//! IHL that points past the buffer, a fragment header in the middle of a long
//! chain); lengths, checksums and next-header fields are filled in unless a
//! field says otherwise. Multi-byte fields are written in network byte order.
//!
//! [`FrameGen`] draws frames from a `StdRng` seeded by the caller, so a
//! failing frame can be reproduced from the seed the test prints.
//!
//! One file a layer: `eth.rs` (Ethernet, VLAN tags), `ipv4.rs`, `ipv6.rs`
//! (with extension headers), `transport.rs` (TCP, UDP, ICMP), their
//! `checksum.rs`; `mix.rs` holds the generator, `fixed.rs` the fixed frames. This
//! file has the registries' numbers and the whole frames built from the
//! layers; every item is used as `packet::NAME`.
mod checksum;
mod eth;
mod fixed;
mod ipv4;
mod ipv6;
mod mix;
mod transport;

pub use eth::{Vlan, ethernet};
pub use fixed::base_frames;
pub use ipv4::{Ipv4, ipv4_options};
pub use ipv6::{Ext, Ipv6};
pub use mix::{FrameGen, Targets};
pub use transport::{Tcp, icmp_echo, icmpv6_echo, udp};

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
