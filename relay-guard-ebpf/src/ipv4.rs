//! IPv4 with options (the header length comes from IHL, never a constant).
use crate::cursor::{Cursor, Stop, be16};

const IPV4_MIN_HLEN: usize = 20;
const IPPROTO_TCP: u8 = 6;

/// Parses the IPv4 header and moves past its options. Succeeds, with the
/// source address (network order) in `src`, when the payload is the TCP
/// header: protocol 6 and fragment offset 0 (a first fragment is judged by
/// its TCP header). The address is an out-parameter, not part of the
/// `Result`: LLVM would pack address and error into one register and, on the
/// error path, shift a packet pointer, which the verifier rejects.
/// Non-TCP and non-first fragments (they carry no ports) are `NotOurs`.
/// A header shorter than 20 bytes, not version 4, IHL < 5, or options running
/// past the buffer is `Malformed`.
#[inline(always)]
pub fn parse_ipv4(c: &mut Cursor, src: &mut [u8; 4]) -> Result<(), Stop> {
    let ip = c.peek::<IPV4_MIN_HLEN>(Stop::MALFORMED_V4)?;
    let version = ip[0] >> 4;
    // IHL counts 32-bit words; masked to 4 bits, so at most 60 bytes: the
    // verifier sees a bounded variable offset.
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let frag_offset = be16(ip[6], ip[7]) & 0x1fff;
    let protocol = ip[9];
    *src = [ip[12], ip[13], ip[14], ip[15]];
    if version != 4 || hlen < IPV4_MIN_HLEN {
        return Err(Stop::MALFORMED_V4);
    }
    c.skip(hlen, Stop::MALFORMED_V4)?;
    if protocol != IPPROTO_TCP || frag_offset != 0 {
        return Err(Stop::NotOurs);
    }
    Ok(())
}
