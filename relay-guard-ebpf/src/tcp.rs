//! TCP: only the destination port is matched (SPEC: replies from our own
//! source port 25 are never touched).
use crate::cursor::{Cursor, Stop, be16};

const TCP_MIN_HLEN: usize = 20;

/// Returns the destination port (host order). A segment shorter than the
/// fixed 20-byte header is `Malformed` in the given family: a tiny first
/// fragment (RFC 1858) must not slip through.
#[inline(always)]
pub fn parse_tcp(c: &mut Cursor, family: u8) -> Result<u16, Stop> {
    let tcp = c.peek::<TCP_MIN_HLEN>(Stop::Malformed(family))?;
    Ok(be16(tcp[2], tcp[3]))
}
