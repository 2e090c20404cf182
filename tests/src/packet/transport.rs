//! What rides on IP: TCP segments, UDP datagrams, ICMP and ICMPv6 echo
//! requests, each checksummed unless told otherwise.
use std::net::{IpAddr, Ipv6Addr};

use super::{
    checksum::{checksum, pseudo_header},
    proto, tcp_flags,
};

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
