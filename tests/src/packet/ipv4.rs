//! The IPv4 header (RFC 791) and its options.
use std::net::Ipv4Addr;

use super::checksum::checksum;

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
}
