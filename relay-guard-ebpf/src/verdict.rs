//! Guarded-port lookup and the allowlist decision.
//!
//! Given map contents this is pure: the agent's policy model computes the
//! same answer from the config, and the differential tests compare the two.
//!
//! IPv4 uses a DIR-24-8 style table, so a lookup costs the same at 10 and at
//! 1,000,000 prefixes: one array read for the /24 block, one hash read only
//! for the few blocks that hold longer prefixes, one array read for the mask.
//! IPv6 uses the kernel's LPM trie.
use aya_ebpf::maps::lpm_trie::Key;
use relay_guard_common::{AllowMask, GuardedPort, LONG_BLOCK, MAX_GUARDS};

use crate::{LONG24, MASKS, PORTS, PREFIXES_V6, TBL24};

/// The owner of `port`, if the port is guarded.
#[inline(always)]
pub fn guard_of(port: u16) -> Option<GuardedPort> {
    match PORTS.get(u32::from(port)) {
        Some(gp) if gp.active == 1 => Some(*gp),
        _ => None,
    }
}

/// Whether bit `guard` of `allow` is set.
#[inline(always)]
fn bit(allow: u64, guard: u8) -> bool {
    usize::from(guard) < MAX_GUARDS && (allow >> guard) & 1 == 1
}

#[inline(always)]
pub fn allowed_v4(src: [u8; 4], guard: u8) -> bool {
    let block = (u32::from(src[0]) << 16) | (u32::from(src[1]) << 8) | u32::from(src[2]);
    // Four /24 blocks per entry; `& 3` keeps the lane index provably in bounds.
    let Some(lanes) = TBL24.get(block >> 2) else {
        return false;
    };
    let mut idx = lanes[(block & 3) as usize];
    if idx & LONG_BLOCK != 0 {
        // SAFETY: a value of LONG24 is read while the map is alive.
        match unsafe { LONG24.get(&block) } {
            Some(hosts) => idx = hosts[usize::from(src[3])],
            // A block marked long without its table: fail closed.
            None => return false,
        }
    }
    if idx == 0 {
        return false;
    }
    match MASKS.get(u32::from(idx)) {
        Some(allow) => bit(*allow, guard),
        None => false,
    }
}

#[inline(always)]
pub fn allowed_v6(src: [u8; 16], guard: u8) -> bool {
    match PREFIXES_V6.get(Key::new(128, src)) {
        Some(AllowMask { allow }) => bit(*allow, guard),
        None => false,
    }
}
