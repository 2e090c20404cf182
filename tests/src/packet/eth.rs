//! Ethernet: the frame and its VLAN tags (802.1Q, 802.1ad).
use super::ethertype;

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
