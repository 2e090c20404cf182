//! IPv6 and a bounded walk over its extension headers.
use core::mem::MaybeUninit;

use crate::cursor::{Cursor, Stop, be16, word};

const IPV6_HLEN: usize = 40;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// SPEC: "an extension-header walk ... of at least 8 headers".
pub const MAX_IPV6_EXT: usize = 8;

#[inline(always)]
fn is_ext(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS
    )
}

/// A source address: network-order bytes held as two native-order words, so
/// the source cache compares it in two steps.
pub struct V6Src(pub [u64; 2]);

impl V6Src {
    /// The address bytes (network order).
    #[inline(always)]
    pub fn bytes(&self) -> [u8; 16] {
        // SAFETY: [u64; 2] and [u8; 16] have the same size, and any bits are valid.
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(self.0) }
    }
}

/// Parses the fixed header, walks up to [`MAX_IPV6_EXT`] extension headers,
/// and succeeds, with the source address written to `src`, when the next
/// header is TCP (an out-parameter for the reason given at
/// `ipv4::parse_ipv4`; uninitialised, because zeroing it first is a call to
/// memset). On success all 16 bytes are written.
/// A non-first fragment, or a chain ending in anything but TCP (UDP, ICMPv6,
/// ESP, no-next-header), is `NotOurs`. A truncated header, a wrong version, or
/// a chain still going after the last step is `Malformed`.
#[inline(always)]
pub fn parse_ipv6(c: &mut Cursor, src: &mut MaybeUninit<V6Src>) -> Result<(), Stop> {
    let ip = c.peek::<IPV6_HLEN>(Stop::MALFORMED_V6)?;
    if ip[0] >> 4 != 6 {
        return Err(Stop::MALFORMED_V6);
    }
    let mut next = ip[6];
    src.write(V6Src([word::<IPV6_HLEN, 8>(ip), word::<IPV6_HLEN, 16>(ip)]));
    c.skip(IPV6_HLEN, Stop::MALFORMED_V6)?;

    for _ in 0..MAX_IPV6_EXT {
        if !is_ext(next) {
            break;
        }
        next = skip_ext(c, next)?;
    }
    if next == IPPROTO_TCP {
        Ok(())
    } else if is_ext(next) {
        Err(Stop::MALFORMED_V6)
    } else {
        Err(Stop::NotOurs)
    }
}

/// Moves past one extension header of type `kind`; returns its next header.
#[inline(always)]
fn skip_ext(c: &mut Cursor, kind: u8) -> Result<u8, Stop> {
    // Every extension header starts with next-header and a length byte; the
    // fragment header is 8 bytes with a reserved second byte.
    let h = c.peek::<8>(Stop::MALFORMED_V6)?;
    let next = h[0];
    let len = match kind {
        IPPROTO_FRAGMENT => {
            // RFC 8200 4.5: offset in 8-octet units, top 13 bits.
            if be16(h[2], h[3]) >> 3 != 0 {
                return Err(Stop::NotOurs);
            }
            8
        }
        // RFC 4302 2.2: payload length in 32-bit words, minus 2.
        IPPROTO_AH => (usize::from(h[1]) + 2) * 4,
        // RFC 8200 4.3-4.6: length in 8-octet units, not counting the first 8.
        _ => (usize::from(h[1]) + 1) * 8,
    };
    c.skip(len, Stop::MALFORMED_V6)?;
    Ok(next)
}
