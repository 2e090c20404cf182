//! Read access to the pinned maps of a `pin_dir`, for `status`, `explain`
//! and `top`: they work whether or not an agent is running.
use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuHashMap};
use relay_guard_common::{
    AllowMask, CounterKey, GuardedPort, PORT_SLOTS, Settings, SourceKey, SourceStats, V4Addr, V6Addr, maps,
};

use crate::{error::LoadError, loader::Maps, pins::Pins, policy::Policy};

/// Every map of a pinned instance.
pub struct KernelMaps {
    pub maps: Maps,
    pub counters: PerCpuHashMap<MapData, CounterKey, u64>,
    pub sources: HashMap<MapData, SourceKey, SourceStats>,
}

fn open<T>(pins: &Pins, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|source| LoadError::MapType { name, source })?;
    let map = Map::from_map_data(data).map_err(|source| LoadError::MapType { name, source })?;
    T::try_from(map).map_err(|source| LoadError::MapType { name, source })
}

impl KernelMaps {
    /// Opens the maps pinned under `pins` (this layout only).
    pub fn open(pins: &Pins) -> Result<KernelMaps, LoadError> {
        if !pins.has_state_maps() {
            return Err(LoadError::NotPinned { pin_dir: pins.root.clone() });
        }
        Ok(KernelMaps {
            maps: Maps {
                ports: open::<Array<MapData, GuardedPort>>(pins, maps::PORTS)?,
                v4: open::<LpmTrie<MapData, V4Addr, AllowMask>>(pins, maps::PREFIXES_V4)?,
                v6: open::<LpmTrie<MapData, V6Addr, AllowMask>>(pins, maps::PREFIXES_V6)?,
                settings: open::<Array<MapData, Settings>>(pins, maps::SETTINGS)?,
            },
            counters: open(pins, maps::COUNTERS)?,
            sources: open(pins, maps::SOURCES)?,
        })
    }
}

/// What the kernel maps hold, as a [`Policy`] (so `Policy::lookup` answers
/// "what would the program decide" from the kernel's own state).
pub fn read_policy(m: &Maps) -> Result<Policy, aya::maps::MapError> {
    let mut ports = BTreeMap::new();
    for port in 0..PORT_SLOTS {
        let gp = m.ports.get(&port, 0)?;
        if gp.active != 0 {
            ports.insert(u16::try_from(port).expect("< 65536"), gp);
        }
    }
    let mut v4 = BTreeMap::new();
    for item in m.v4.iter() {
        let (k, v) = item?;
        v4.insert((u8::try_from(k.prefix_len()).unwrap_or(u8::MAX), k.data()), v);
    }
    let mut v6 = BTreeMap::new();
    for item in m.v6.iter() {
        let (k, v) = item?;
        v6.insert((u8::try_from(k.prefix_len()).unwrap_or(u8::MAX), k.data()), v);
    }
    let mode = m.settings.get(&0, 0)?.mode;
    Ok(Policy { ports, v4, v6, mode })
}
