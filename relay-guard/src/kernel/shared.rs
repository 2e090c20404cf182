//! relay-guard as a component of a libxdp dispatcher (see
//! `kernel::dispatcher`): joining the dispatcher on an interface, telling
//! whether relay-guard's own slot is in it, and leaving it.
//!
//! relay-guard's slot is the component program that uses the `RG_COUNTERS`
//! map pinned under its `pin_dir` (this layout or another one; every set of
//! a layout shares it, see `kernel::pins`): the pins
//! stay the source of truth, and a second relay-guard with another
//! `pin_dir`, or any other program, is never touched.
use aya::{EbpfLoader, programs::Extension};
use relay_guard_common::maps;
use tracing::{info, warn};

use crate::{
    EBPF_OBJECT, PROGRAM_NAME,
    config::XdpMode,
    error::LoadError,
    kernel::{
        dispatcher::{self, Joining, Lock, OnInterface},
        loader::{Attachment, Loaded},
        pins::Pins,
    },
};

/// What an `EPERM` from loading an extension (freplace) program means.
pub const EXT_REFUSED: &str = "the kernel refuses extension (freplace, BPF_PROG_TYPE_EXT) programs with EPERM before verifying them (a locked-down kernel or an LSM policy can do this), and without them no libxdp dispatcher can run here (libxdp itself falls back to single-program mode on such a kernel)";

/// Whether a program load failed with `EPERM`.
fn is_eperm(e: &aya::programs::ProgramError) -> bool {
    crate::kernel::errno::in_chain(e, libc::EPERM)
        || matches!(e, aya::programs::ProgramError::LoadError { io_error, .. } if io_error.raw_os_error() == Some(libc::EPERM))
}

/// Loads relay-guard's program as an extension (freplace) of `func` in the
/// dispatcher `target`, sharing the maps pinned under `pins`.
pub fn load_extension(
    pins: &Pins,
    target: aya::programs::ProgramFd,
    func: &str,
) -> Result<(aya::Ebpf, &'static str), dispatcher::Error> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&'static str, std::path::PathBuf)> = maps::ALL.iter().map(|&n| (n, pins.map(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.extension(PROGRAM_NAME);
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|error| dispatcher::Error::Object {
        what: "loading relay-guard as an extension",
        error,
    })?;
    let ext: &mut Extension = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(dispatcher::Error::Missing("no relay_guard program"))?
        .try_into()?;
    ext.load(target, func).map_err(|error| {
        if is_eperm(&error) {
            dispatcher::Error::ExtensionsRefused { error }
        } else {
            dispatcher::Error::Rejected {
                what: "the kernel rejected relay-guard as an extension".into(),
                error,
            }
        }
    })?;
    Ok((ebpf, PROGRAM_NAME))
}

/// The IDs of relay-guard's `RG_COUNTERS` maps pinned under `pins` (this
/// layout and any other one still pinned).
pub fn own_map_ids(pins: &Pins) -> Vec<u32> {
    std::iter::once(pins.map(maps::COUNTERS))
        .chain(pins.other_layout_maps(maps::COUNTERS))
        .filter_map(|p| dispatcher::pinned_map_id(&p))
        .collect()
}

fn share(interface: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Share {
        interface: interface.to_string(),
        why: e.to_string(),
    }
}

impl Loaded {
    /// When another program is attached to `interface`: joins it if it is a
    /// libxdp dispatcher (replacing relay-guard's own slot, if any, by this
    /// program: a new dispatcher swapped in atomically), else refuses with
    /// its name. `None`: nothing is attached (attach directly).
    pub(crate) fn attach_shared(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<Option<Attachment>, LoadError> {
        // Nothing on the interface and no dispatcher wanted: the direct
        // path, without creating or locking `<bpffs>/xdp`.
        match dispatcher::attached(ifindex) {
            Ok(None) if !self.xdp_dispatcher => return Ok(None),
            Err(e) if !self.xdp_dispatcher => {
                warn!(interface, error = %e, "could not read which XDP program the interface runs (netlink); attaching directly");
                return Ok(None);
            }
            _ => {}
        }
        let _lock = Lock::acquire().map_err(|e| share(interface, e))?;
        let existing = match dispatcher::inspect(ifindex).map_err(|e| share(interface, e))? {
            OnInterface::Nothing if !self.xdp_dispatcher => return Ok(None),
            OnInterface::Nothing => None,
            OnInterface::Foreign { name, id, why } => {
                return Err(LoadError::Foreign {
                    interface: interface.to_string(),
                    name,
                    id,
                    why,
                });
            }
            OnInterface::Dispatcher(d) => Some(d),
        };
        let Some(pins) = self.pins.clone() else {
            return Err(share(interface, "joining a dispatcher needs pinned state (pin_dir)"));
        };
        let ours = own_map_ids(&pins);
        // Set when the kernel refuses extension programs outright.
        let refused = std::cell::Cell::new(false);
        let mut load = |target: aya::programs::ProgramFd, func: &str| {
            load_extension(&pins, target, func)
                .inspect_err(|e| refused.set(matches!(e, dispatcher::Error::ExtensionsRefused { .. })))
        };
        let mode_flags = match mode {
            XdpMode::Auto => 0,
            XdpMode::Native => dispatcher::XDP_FLAGS_DRV_MODE,
            XdpMode::Skb => dispatcher::XDP_FLAGS_SKB_MODE,
        };
        let mut owner = None;
        let attached = match dispatcher::rebuild(
            ifindex,
            existing.as_ref(),
            &|c| c.map_ids.iter().any(|id| ours.contains(id)),
            Some(Joining {
                load: &mut load,
                owner: &mut owner,
                priority: self.xdp_priority,
                frags: crate::kernel::features::get().frags,
            }),
            mode_flags,
        ) {
            Ok(m) => m,
            // Alone on the interface: guarding matters more than sharing.
            Err(e) if existing.is_none() && refused.get() => {
                warn!(interface, error = %e, "xdp_dispatcher: the kernel refuses extension programs, so no libxdp dispatcher can run here (xdp-tools' libxdp falls back the same way); attaching directly");
                return Ok(None);
            }
            Err(e) => return Err(share(interface, e)),
        };
        // The extension writes its blocked-source log records to its own
        // ring buffer: read that one (at start-up, before `run` takes the
        // logger; with several shared interfaces, the last one joined).
        if let Some(mut ebpf) = owner {
            match crate::kernel::events::BlockedLog::new(&mut ebpf) {
                Ok(log) => self.logger = Some(log),
                Err(e) => warn!(interface, error = %e, "blocked-source events of the shared program unavailable"),
            }
            self.ext_owners.insert(ifindex, ebpf);
        }
        let others: Vec<&str> = existing
            .iter()
            .flat_map(|d| d.components.iter())
            .filter(|c| !c.map_ids.iter().any(|id| ours.contains(id)))
            .map(|c| c.name.as_str())
            .collect();
        info!(
            interface,
            priority = self.xdp_priority,
            with = others.join(","),
            "joined the XDP dispatcher on the interface (libxdp protocol v2)"
        );
        Ok(Some(Attachment {
            interface: interface.to_string(),
            ifindex,
            mode: if attached == 2 {
                "dispatcher (skb)"
            } else {
                "dispatcher"
            },
        }))
    }

    /// Whether relay-guard's slot is in the dispatcher on `ifindex`.
    pub fn in_dispatcher(&self, ifindex: u32) -> bool {
        let Some(pins) = &self.pins else { return false };
        in_dispatcher(pins, ifindex)
    }
}

/// Whether the dispatcher on `ifindex` holds relay-guard's slot (of `pins`).
pub fn in_dispatcher(pins: &Pins, ifindex: u32) -> bool {
    // Cheap and lock-free when nothing or a single program is attached.
    if !matches!(dispatcher::attached(ifindex), Ok(Some(_))) {
        return false;
    }
    let ours = own_map_ids(pins);
    if ours.is_empty() {
        return false;
    }
    // libxdp may be swapping dispatchers: look under its lock.
    let Ok(_lock) = Lock::acquire() else { return false };
    matches!(dispatcher::inspect(ifindex), Ok(OnInterface::Dispatcher(d))
        if d.components.iter().any(|c| c.map_ids.iter().any(|id| ours.contains(id))))
}

/// A dispatcher component that runs ahead of relay-guard's slot and ends
/// the chain when it returns `XDP_PASS` (its chain-call actions lack it):
/// whatever it passes goes up the stack without relay-guard seeing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bypass {
    pub name: String,
    pub id: u32,
    pub priority: u32,
}

impl std::fmt::Display for Bypass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` (id {}, priority {})", self.name, self.id, self.priority)
    }
}

/// The components of `d` that run ahead of relay-guard's slot (the one
/// using a map of `ours`) and do not chain on `XDP_PASS`; none when
/// relay-guard's slot is not in `d`. Slots run in order (libxdp's run
/// order: priority, then name).
pub fn ahead_without_pass(d: &dispatcher::Existing, ours: &[u32]) -> Vec<Bypass> {
    let Some(at) = d
        .components
        .iter()
        .position(|c| c.map_ids.iter().any(|id| ours.contains(id)))
    else {
        return Vec::new();
    };
    d.components[..at]
        .iter()
        .filter(|c| c.chain & (1 << dispatcher::XDP_PASS) == 0)
        .map(|c| Bypass {
            name: c.name.clone(),
            id: c.id,
            priority: c.priority,
        })
        .collect()
}

/// The components that bypass relay-guard's slot (of `pins`) in the
/// dispatcher on `ifindex` (see [`ahead_without_pass`]); none when
/// relay-guard is not in a dispatcher there.
pub fn bypasses(pins: &Pins, ifindex: u32) -> Vec<Bypass> {
    if !matches!(dispatcher::attached(ifindex), Ok(Some(_))) {
        return Vec::new();
    }
    let ours = own_map_ids(pins);
    if ours.is_empty() {
        return Vec::new();
    }
    let Ok(_lock) = Lock::acquire() else {
        return Vec::new();
    };
    match dispatcher::inspect(ifindex) {
        Ok(OnInterface::Dispatcher(d)) => ahead_without_pass(&d, &ours),
        _ => Vec::new(),
    }
}

/// What an operator reads about `bypass` on `interface`.
pub fn bypass_text(interface: &str, bypass: &[Bypass]) -> String {
    let names: Vec<String> = bypass.iter().map(ToString::to_string).collect();
    let lowest = bypass.iter().map(|b| b.priority).min().unwrap_or(0);
    format!(
        "interface {interface} is NOT guarded for what {} passes: in the XDP dispatcher it runs ahead of relay-guard and does not chain on XDP_PASS, so the packets it passes reach the stack without relay-guard seeing them; give relay-guard an xdp_priority below {lowest}, or load that program with chain-call on XDP_PASS",
        names.join(", ")
    )
}

/// The dispatchers (ifindex, dispatcher id) that hold relay-guard's slot
/// (of `pins`), from the pins under `<bpffs>/xdp`.
pub fn own_slots(pins: &Pins) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = own_map_ids(pins).into_iter().flat_map(dispatcher::slots_of).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Takes relay-guard's slot (of `pins`) out of every dispatcher that holds
/// it; the other components stay, in a new dispatcher swapped in atomically
/// (or the dispatcher goes when relay-guard was its only program). Returns
/// the ifindexes left. A dispatcher that is not attached in this network
/// namespace is an error (naming it): run `detach` in the namespace of the
/// interface.
pub fn leave_all(pins: &Pins) -> Result<Vec<u32>, dispatcher::Error> {
    let ours = own_map_ids(pins);
    if own_slots(pins).is_empty() {
        return Ok(Vec::new());
    }
    let _lock = Lock::acquire()?;
    let slots = own_slots(pins);
    for &(ifindex, id) in &slots {
        match dispatcher::attached(ifindex) {
            Ok(Some((now, _))) if now == id => {}
            _ => {
                return Err(dispatcher::Error::OtherNamespace { id, ifindex });
            }
        }
    }
    let mut left = Vec::new();
    for (ifindex, id) in slots {
        if let OnInterface::Dispatcher(d) = dispatcher::inspect(ifindex)?
            && d.id == id
        {
            dispatcher::rebuild(
                ifindex,
                Some(&d),
                &|c| c.map_ids.iter().any(|m| ours.contains(m)),
                None,
                0,
            )?;
            left.push(ifindex);
        }
    }
    Ok(left)
}
