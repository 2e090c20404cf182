//! The only place that touches `data`/`data_end`.
//!
//! Contract for every `parse_*` function in this crate (after xdp-tools'
//! `parsing_helpers.h`): it reads its header at the cursor, checks bounds
//! before every access, advances the cursor past the header (variable lengths
//! come from the header itself, never from a fixed size), and returns the next
//! protocol in host byte order (the IP parsers: the source address, through
//! an out-parameter), or a [`Stop`] saying why parsing ended.
use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use relay_guard_common::family;

/// Why parsing did not reach a judged TCP segment.
#[derive(Clone, Copy)]
pub enum Stop {
    /// Not ours to judge (not IP, not TCP, non-first fragment): pass, uncounted.
    NotOurs,
    /// Claims IP but is truncated, invalid or deeper than the walk follows.
    /// The payload is the family as far as it is known.
    Malformed(u8),
}

impl Stop {
    pub const MALFORMED_V4: Stop = Stop::Malformed(family::IPV4);
    pub const MALFORMED_V6: Stop = Stop::Malformed(family::IPV6);
}

/// Reading position in the first buffer of the packet.
pub struct Cursor {
    /// Address of the next unread byte.
    pos: usize,
    /// End of the first buffer: with `xdp.frags` later buffers are never read.
    end: usize,
}

impl Cursor {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            pos: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// A bounds-checked view of the next `N` bytes, or `Err(or)` when the
    /// buffer is shorter. The verifier sees the `> end` check on the same
    /// packet pointer that is then dereferenced.
    #[inline(always)]
    pub fn peek<const N: usize>(&self, or: Stop) -> Result<&[u8; N], Stop> {
        if self.pos + size_of::<[u8; N]>() > self.end {
            return Err(or);
        }
        // SAFETY: the N bytes at pos are inside the packet (checked above).
        Ok(unsafe { &*(self.pos as *const [u8; N]) })
    }

    /// Checks that `len` bytes are present, then moves past them.
    #[inline(always)]
    pub fn skip(&mut self, len: usize, or: Stop) -> Result<(), Stop> {
        if self.pos + len > self.end {
            return Err(or);
        }
        self.pos += len;
        Ok(())
    }
}

/// The 8 bytes at `h[AT..AT + 8]` as one native-order word, read with one
/// load whatever their alignment. Written in assembly because LLVM's BPF
/// backend splits a `read_unaligned` (and any load it cannot prove aligned)
/// into 8 byte loads, shifts and ors; the kernel accepts unaligned packet
/// loads on architectures with efficient unaligned access (x86-64, arm64),
/// which are the ones relay-guard targets.
#[inline(always)]
pub fn word<const N: usize, const AT: usize>(h: &[u8; N]) -> u64 {
    const { assert!(AT + 8 <= N) };
    let v: u64;
    // SAFETY: the 8 bytes are inside `h` (asserted above), which is readable.
    unsafe {
        core::arch::asm!(
            "{v} = *(u64 *)({p} + {at})",
            p = in(reg) h.as_ptr(),
            at = const AT,
            v = lateout(reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    v
}

/// Big-endian u16 from two bytes.
#[inline(always)]
pub fn be16(hi: u8, lo: u8) -> u16 {
    (u16::from(hi) << 8) | u16::from(lo)
}
