// The dispatcher shared by src/bin/xdp-dispatcher.rs and
// src/bin/xdp-dispatcher-frags.rs (included, not a module: each bin is its
// own object). See the first for what it is.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_ABORTED, XDP_PASS},
        xdp_md,
    },
    programs::XdpContext,
};

/// Slots, as in libxdp (`MAX_DISPATCHER_ACTIONS`).
const MAX_DISPATCHER_ACTIONS: usize = 10;
/// What an unreplaced stub returns; every slot chains on it.
const XDP_DISPATCHER_RETVAL: u32 = 31;

/// `struct xdp_dispatcher_config` (version 2), 124 bytes.
#[repr(C)]
pub struct XdpDispatcherConfig {
    pub magic: u8,
    pub dispatcher_version: u8,
    pub num_progs_enabled: u8,
    pub is_xdp_frags: u8,
    pub chain_call_actions: [u32; MAX_DISPATCHER_ACTIONS],
    pub run_prios: [u32; MAX_DISPATCHER_ACTIONS],
    pub program_flags: [u32; MAX_DISPATCHER_ACTIONS],
}

/// Set by the loader (`EbpfLoader::override_global("conf", ..)`); read with
/// volatile loads so the compiler keeps the checks. The kernel freezes the
/// map and prunes the calls of unused slots.
#[unsafe(no_mangle)]
static conf: XdpDispatcherConfig = XdpDispatcherConfig {
    magic: 0,
    dispatcher_version: 0,
    num_progs_enabled: 0,
    is_xdp_frags: 0,
    chain_call_actions: [0; MAX_DISPATCHER_ACTIONS],
    run_prios: [0; MAX_DISPATCHER_ACTIONS],
    program_flags: [0; MAX_DISPATCHER_ACTIONS],
};

/// One replaceable slot: global (BTF linkage global, exported to the
/// linker) and never inlined, with the volatile return value of the C
/// original so no caller assumes what it returns.
macro_rules! stub {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(ctx: *mut xdp_md) -> u32 {
            let mut ret = 0u32;
            // SAFETY: a local on the stack.
            unsafe { write_volatile(&mut ret, XDP_DISPATCHER_RETVAL) };
            if ctx.is_null() {
                return XDP_ABORTED;
            }
            // SAFETY: as above.
            unsafe { read_volatile(&ret) }
        }
    };
}

stub!(prog0);
stub!(prog1);
stub!(prog2);
stub!(prog3);
stub!(prog4);
stub!(prog5);
stub!(prog6);
stub!(prog7);
stub!(prog8);
stub!(prog9);

/// Calls slot `$i` when it is enabled; returns its action unless that is
/// one of the slot's chain-call actions.
macro_rules! slot {
    ($ctx:expr, $n:expr, $i:literal, $f:ident) => {
        if $n < $i + 1 {
            return XDP_PASS;
        }
        let ret = $f($ctx);
        // SAFETY: a field of a static, read as the C original reads it.
        let chain = unsafe { read_volatile(&conf.chain_call_actions[$i]) };
        if (1u32.wrapping_shl(ret)) & chain == 0 {
            return ret;
        }
    };
}

/// The dispatcher's body; each bin wraps it in its `#[xdp]` entry.
#[inline(always)]
fn dispatch(ctx: XdpContext) -> u32 {
    let ctx = ctx.ctx;
    // SAFETY: a field of a static.
    let n = unsafe { read_volatile(&conf.num_progs_enabled) };
    slot!(ctx, n, 0, prog0);
    slot!(ctx, n, 1, prog1);
    slot!(ctx, n, 2, prog2);
    slot!(ctx, n, 3, prog3);
    slot!(ctx, n, 4, prog4);
    slot!(ctx, n, 5, prog5);
    slot!(ctx, n, 6, prog6);
    slot!(ctx, n, 7, prog7);
    slot!(ctx, n, 8, prog8);
    slot!(ctx, n, 9, prog9);
    XDP_PASS
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
