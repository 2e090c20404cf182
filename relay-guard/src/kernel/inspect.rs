//! Read access to the pinned maps of a `pin_dir`, for `status`, `explain`
//! and `top`: they work whether or not an agent is running.
use std::net::IpAddr;

use aya::maps::{Map, MapData};
use ipnet::IpNet;
use relay_guard_common::{LONG_BLOCK, MAX_GUARDS};

use crate::{
    error::LoadError,
    kernel::{maps::Maps, pins::Pins},
    policy::Lookup,
};

/// Opens the maps pinned under `pins` (this layout only), after checking
/// that its `pin_dir` is a directory of its own on a bpffs.
pub fn open(pins: &Pins) -> Result<Maps, LoadError> {
    crate::kernel::pins::check_pin_dir(&pins.root)?;
    if !pins.has_state_maps() {
        return Err(LoadError::NotPinned {
            pin_dir: pins.root.clone(),
        });
    }
    Maps::from_source(|name| {
        let path = pins.map(name);
        let data = MapData::from_pin(&path).map_err(|source| LoadError::MapType { name, source })?;
        Map::from_map_data(data).map_err(|source| LoadError::MapType { name, source })
    })
}

/// What the XDP program decides for (`addr`, `port`) from these maps, read
/// the way the program reads them. `prefix` is the kernel's deciding unit: for
/// IPv4 the /24 block or (in a block with longer prefixes) the /32 host
/// entry; for IPv6 the range of the trie entry, or a leaf's prefix.
pub fn lookup(maps: &Maps, addr: IpAddr, port: u16) -> Result<Lookup, aya::maps::MapError> {
    let generation = maps.settings.get(&0, 0)?.current();
    let gp = maps.ports.get(&u32::from(port), 0)?.gens[generation];
    if gp.active == 0 {
        return Ok(Lookup::NotGuarded);
    }
    let guard = gp.guard;
    let bit = |allow: u64| usize::from(guard) < MAX_GUARDS && (allow >> guard) & 1 == 1;
    Ok(match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            let block = u32::from_be_bytes([0, o[0], o[1], o[2]]);
            let mut idx = maps.tbl24.get(block as usize);
            let mut unit = IpNet::new(IpAddr::from([o[0], o[1], o[2], 0]), 24).expect("valid");
            if idx & LONG_BLOCK != 0 {
                // The /28's entry, else the block's own mask (as the program reads it).
                let sub = (block << 4) | u32::from(o[3] >> 4);
                idx = maps
                    .long24
                    .get(&sub, 0)
                    .map_or(idx & !LONG_BLOCK, |h| h[usize::from(o[3] & 15)]);
                unit = IpNet::new(addr, 32).expect("valid");
            }
            let allow = if idx == 0 {
                0
            } else {
                maps.masks.get(&u32::from(idx), 0)?
            };
            Lookup::Judged {
                guard,
                allowed: bit(allow),
                prefix: (idx != 0).then_some(unit),
            }
        }
        IpAddr::V6(a) => {
            let hit = maps.v6.lookup(a.octets());
            let allow = if hit.mask_index == 0 {
                0
            } else {
                maps.masks.get(&u32::from(hit.mask_index), 0)?
            };
            Lookup::Judged {
                guard,
                allowed: bit(allow),
                prefix: (hit.mask_index != 0).then(|| IpNet::new(IpAddr::from(hit.net), hit.len).expect("len <= 128")),
            }
        }
    })
}

/// Counts of what the kernel holds: (guarded ports, /24 blocks with a
/// match, long blocks, IPv6 trie (nodes, leaves), mode).
pub type Summary = (Vec<u16>, usize, usize, (u32, u32), u32);

/// What the kernel holds, counted (see [`Summary`]).
pub fn summary(maps: &Maps) -> Result<Summary, aya::maps::MapError> {
    let settings = maps.settings.get(&0, 0)?;
    let generation = settings.current();
    let mut ports = Vec::new();
    for p in 0..relay_guard_common::PORT_SLOTS {
        if maps.ports.get(&p, 0)?.gens[generation].active != 0 {
            ports.push(u16::try_from(p).expect("< 65536"));
        }
    }
    let (mut blocks, mut long) = (0, 0);
    for b in 0..crate::policy::tables::BLOCKS {
        let e = maps.tbl24.get(b);
        blocks += usize::from(e != 0);
        long += usize::from(e & LONG_BLOCK != 0);
    }
    let v6 = maps.v6.read_tables().counts();
    let mode = settings.mode();
    Ok((ports, blocks, long, v6, mode))
}
