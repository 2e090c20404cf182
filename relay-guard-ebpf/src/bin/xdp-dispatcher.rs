//! libxdp's multi-program XDP dispatcher, protocol version 2, in Rust.
//!
//! The same program as xdp-tools' `lib/libxdp/xdp-dispatcher.c.in`: ten
//! global, never-inlined stub functions `prog0`..`prog9` that component
//! programs replace (`BPF_PROG_TYPE_EXT`, freplace), and a main function
//! `xdp_dispatcher` that calls the first `num_progs_enabled` of them in turn
//! and goes on to the next while the returned action is one of that slot's
//! chain-call actions. The configuration is the only data in `.rodata`
//! (which becomes the dispatcher's single, read-only map): the agent sets it
//! before loading, libxdp reads it back from the map. The program name, the
//! config's magic and version, the single read-only map of exactly this size
//! and the BTF of `prog0`..`prog9` are what libxdp checks to recognise a
//! dispatcher it can extend (`check_dispatcher_version` in libxdp.c).
#![no_std]
#![no_main]

include!("../dispatcher.rs");

/// Loaded without `BPF_F_XDP_HAS_FRAGS`: some component lacks frags support.
#[aya_ebpf::macros::xdp]
pub fn xdp_dispatcher(ctx: XdpContext) -> u32 {
    dispatch(ctx)
}
