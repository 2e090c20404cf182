//! The dispatcher of src/bin/xdp-dispatcher.rs loaded with
//! `BPF_F_XDP_HAS_FRAGS` (section `xdp.frags`), for when every component
//! supports frags (libxdp's rule; aya takes the flag from the section).
#![no_std]
#![no_main]

include!("../dispatcher.rs");

#[aya_ebpf::macros::xdp(frags)]
pub fn xdp_dispatcher(ctx: XdpContext) -> u32 {
    dispatch(ctx)
}
