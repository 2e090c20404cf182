//! Guarded-port lookup and the allowlist decision.
//!
//! Given map contents this is pure: the agent's policy model computes the
//! same answer from the config, and the differential tests compare the two.
use aya_ebpf::maps::lpm_trie::Key;
use relay_guard_common::{AllowMask, GuardedPort, MAX_GUARDS};

use crate::{PORTS, PREFIXES_V4, PREFIXES_V6};

/// The guard that owns `port`, if any.
#[inline(always)]
pub fn guard_of(port: u16) -> Option<u8> {
    match PORTS.get(u32::from(port)) {
        Some(GuardedPort { active: 1, guard, .. }) => Some(*guard),
        _ => None,
    }
}

/// Whether `guard` allows `mask`: bit `guard` set. No match means deny.
#[inline(always)]
fn allows(mask: Option<&AllowMask>, guard: u8) -> bool {
    match mask {
        Some(m) if usize::from(guard) < MAX_GUARDS => (m.allow >> guard) & 1 == 1,
        _ => false,
    }
}

#[inline(always)]
pub fn allowed_v4(src: [u8; 4], guard: u8) -> bool {
    allows(PREFIXES_V4.get(Key::new(32, src)), guard)
}

#[inline(always)]
pub fn allowed_v6(src: [u8; 16], guard: u8) -> bool {
    allows(PREFIXES_V6.get(Key::new(128, src)), guard)
}
