//! The IPv6 header (RFC 8200) and its extension-header chain.
use std::net::Ipv6Addr;

use super::proto;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
