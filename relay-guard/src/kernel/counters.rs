//! Reading the kernel's per-CPU counter array back into label space.
//!
//! The program counts into `counter_index(iface slot, port slot, family,
//! verdict)`; [`Slots`] says which interface and which port each slot stands
//! for (from `RG_IFACES` and `RG_PORTS`), and [`read`] sums the CPUs of the
//! slots in use into [`CounterKey`]s (ifindex, port, guard, family, verdict).
use std::collections::BTreeMap;

use relay_guard_common::{CounterKey, IFACE_TABLE, PORT_SLOTS, VERDICT_SLOTS, counter_index, family, maps as names};

use crate::{
    error::SyncError,
    kernel::maps::{Counters, Maps},
};

/// Which interface and port each counter slot stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    /// iface slot → ifindex (slot 0, "unregistered", is implicit).
    pub ifaces: BTreeMap<u32, u32>,
    /// port slot → (port, guard bit) of the generation in force (slot 0,
    /// "malformed", is implicit).
    pub ports: BTreeMap<u32, (u16, u8)>,
}

/// Reads the slot assignments from the kernel maps.
pub fn slots(maps: &Maps) -> Result<Slots, SyncError> {
    let err = |map: &'static str| {
        move |source| SyncError::Map {
            op: "read",
            map,
            what: "slots".into(),
            source,
        }
    };
    let mut s = Slots::default();
    for i in 0..IFACE_TABLE {
        let e = maps.ifaces.get(&i, 0).map_err(err(names::IFACES))?;
        if e.slot != 0 {
            s.ifaces.insert(e.slot, e.ifindex);
        }
    }
    let generation = maps.settings.get(&0, 0).map_err(err(names::SETTINGS))?.current();
    for p in 0..PORT_SLOTS {
        let gp = maps.ports.get(&p, 0).map_err(err(names::PORTS))?.gens[generation];
        if gp.active != 0 && gp.slot != 0 {
            s.ports
                .insert(u32::from(gp.slot), (u16::try_from(p).expect("< 65536"), gp.guard));
        }
    }
    Ok(s)
}

/// Updates the interface part of `slots` for the devices `ifindexes` only
/// (a few map reads, where [`slots`] reads all 65,536 entries): each gets
/// the slot the kernel map gives it now, and a slot that moved to one of
/// them is no longer listed for its previous device.
pub fn refresh_iface_slots(
    maps: &Maps,
    slots: &mut Slots,
    ifindexes: impl IntoIterator<Item = u32>,
) -> Result<(), SyncError> {
    for ifindex in ifindexes {
        let e = maps
            .ifaces
            .get(&(ifindex & (IFACE_TABLE - 1)), 0)
            .map_err(|source| SyncError::Map {
                op: "read",
                map: names::IFACES,
                what: format!("ifindex {ifindex}"),
                source,
            })?;
        slots.ifaces.retain(|_, &mut i| i != ifindex);
        if e.ifindex == ifindex && e.slot != 0 {
            slots.ifaces.insert(e.slot, ifindex);
        }
    }
    Ok(())
}

/// Non-zero counters of the slots in use, summed over CPUs. Unregistered
/// interfaces (slot 0) come back with ifindex 0; malformed packets with
/// port 0 and guard 0.
pub fn read(counters: &Counters, slots: &Slots) -> Result<BTreeMap<CounterKey, u64>, SyncError> {
    let counters = counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = BTreeMap::new();
    let ifaces = std::iter::once((0, 0)).chain(slots.ifaces.iter().map(|(&s, &i)| (s, i)));
    for (islot, ifindex) in ifaces {
        let ports = std::iter::once((0, (0, 0))).chain(slots.ports.iter().map(|(&s, &pg)| (s, pg)));
        for (pslot, (port, guard)) in ports {
            for fam in [family::IPV4, family::IPV6, family::UNKNOWN] {
                for verdict in 0..VERDICT_SLOTS as u8 {
                    let idx = counter_index(islot, pslot, fam, verdict);
                    let values = counters.get(&idx, 0).map_err(|source| SyncError::Map {
                        op: "read",
                        map: names::COUNTERS,
                        what: format!("index {idx}"),
                        source,
                    })?;
                    let total = values.iter().copied().fold(0u64, u64::wrapping_add);
                    if total != 0 {
                        let key = CounterKey {
                            ifindex,
                            port,
                            guard,
                            family: fam,
                            verdict,
                            _pad: [0; 3],
                        };
                        *out.entry(key).or_default() += total;
                    }
                }
            }
        }
    }
    Ok(out)
}
