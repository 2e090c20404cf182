//! Ethernet and up to [`MAX_VLAN_TAGS`] VLAN tags (802.1Q, 802.1ad).
use crate::cursor::{Cursor, Stop, be16};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// SPEC: "Ethernet, then up to two VLAN tags".
pub const MAX_VLAN_TAGS: usize = 2;

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Returns the ethertype after the VLAN tags. A frame too short for its
/// Ethernet or VLAN header is not IP as far as anyone can tell: `NotOurs`.
/// A third tag is deeper than the walk follows; it could hide IP, so it is
/// `Malformed` (fail closed).
#[inline(always)]
pub fn parse_eth(c: &mut Cursor) -> Result<u16, Stop> {
    let eth = c.peek::<ETH_HLEN>(Stop::NotOurs)?;
    let mut ethertype = be16(eth[12], eth[13]);
    c.skip(ETH_HLEN, Stop::NotOurs)?;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) {
            return Ok(ethertype);
        }
        // TCI (2 bytes), then the encapsulated ethertype.
        let tag = c.peek::<VLAN_HLEN>(Stop::NotOurs)?;
        ethertype = be16(tag[2], tag[3]);
        c.skip(VLAN_HLEN, Stop::NotOurs)?;
    }
    if is_vlan(ethertype) {
        return Err(Stop::Malformed(relay_guard_common::family::UNKNOWN));
    }
    Ok(ethertype)
}
