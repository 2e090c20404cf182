//! Loads the embedded XDP object, hands out typed map handles, and attaches
//! the program to interfaces in the configured XDP mode.
//!
//! Typed handles (`Array::try_from`, `LpmTrie::try_from`, …) check key and
//! value sizes against the object at start-up, so a layout mismatch between
//! the agent and the program is an error here, not a misread later.
use std::sync::{Arc, Mutex};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, PerCpuHashMap},
    programs::{Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use relay_guard_common::{AllowMask, CounterKey, GuardedPort, Settings, V4Addr, V6Addr, maps};
use tracing::{info, warn};

use crate::{EBPF_OBJECT, PROGRAM_NAME, config::XdpMode, error::LoadError};

/// The maps the agent writes.
pub struct Maps {
    pub ports: Array<MapData, GuardedPort>,
    pub v4: LpmTrie<MapData, V4Addr, AllowMask>,
    pub v6: LpmTrie<MapData, V6Addr, AllowMask>,
    pub settings: Array<MapData, Settings>,
}

/// The counter map, shared with the metrics collector (read at scrape time).
pub type Counters = Arc<Mutex<PerCpuHashMap<MapData, CounterKey, u64>>>;

/// One interface the program is attached to.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    /// "native" or "skb": what was actually used.
    pub mode: &'static str,
    link: XdpLinkId,
}

/// The loaded program and its maps. Dropping it detaches the program.
pub struct Loaded {
    /// Owns the program and its links; kept alive while attached.
    ebpf: Ebpf,
    pub maps: Maps,
    pub counters: Counters,
    pub attached: Vec<Attachment>,
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory to it
/// (before 5.11). Best effort: newer kernels use memcg accounting, and a
/// container may forbid raising the hard limit, so a failure is only logged.
pub fn bump_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK (not needed on kernels >= 5.11)");
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::NoMap { name })?;
    T::try_from(map).map_err(|source| LoadError::MapType { name, source })
}

impl Loaded {
    /// Loads the object and the program into the kernel (the verifier runs
    /// here). Nothing is attached yet.
    pub fn load() -> Result<Loaded, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).map_err(LoadError::Object)?;
        let maps = Maps {
            ports: take(&mut ebpf, maps::PORTS)?,
            v4: take(&mut ebpf, maps::PREFIXES_V4)?,
            v6: take(&mut ebpf, maps::PREFIXES_V6)?,
            settings: take(&mut ebpf, maps::SETTINGS)?,
        };
        let counters = Arc::new(Mutex::new(take(&mut ebpf, maps::COUNTERS)?));
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(LoadError::NoProgram { name: PROGRAM_NAME })?
            .try_into()
            .map_err(|source| LoadError::Verifier { name: PROGRAM_NAME, source })?;
        prog.load().map_err(|source| LoadError::Verifier { name: PROGRAM_NAME, source })?;
        Ok(Loaded { ebpf, maps, counters, attached: Vec::new() })
    }

    /// The loaded program, for `BPF_PROG_TEST_RUN` and attaching.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("checked in load")
            .try_into()
            .expect("checked in load")
    }

    /// Attaches to `interface`. `auto` tries native (driver) mode and falls
    /// back to generic (skb) mode with a log line saying so.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<&Attachment, LoadError> {
        let ifindex = ifindex(interface)?;
        let attempts: &[(AyaXdpMode, &'static str)] = match mode {
            XdpMode::Auto => &[(AyaXdpMode::Driver, "native"), (AyaXdpMode::Skb, "skb")],
            XdpMode::Native => &[(AyaXdpMode::Driver, "native")],
            XdpMode::Skb => &[(AyaXdpMode::Skb, "skb")],
        };
        let mut last = None;
        for &(aya_mode, name) in attempts {
            match self.program().attach_to_if_index(ifindex, aya_mode) {
                Ok(link) => {
                    info!(interface, mode = name, "attached XDP program");
                    self.attached.push(Attachment { interface: interface.to_string(), ifindex, mode: name, link });
                    return Ok(self.attached.last().expect("just pushed"));
                }
                Err(source) => {
                    if mode == XdpMode::Auto && name == "native" {
                        warn!(interface, error = %source, "native XDP not available, falling back to generic (skb) mode");
                    }
                    last = Some((name, source));
                }
            }
        }
        let (mode, source) = last.expect("at least one attempt");
        let hint = if mode == "native" {
            " - the driver may not support native XDP; try xdp_mode = \"skb\""
        } else {
            ""
        };
        Err(LoadError::Attach { interface: interface.to_string(), mode, hint, source })
    }

    /// Detaches from every interface (the links are owned by the program).
    pub fn detach_all(&mut self) {
        let links: Vec<_> = self.attached.drain(..).collect();
        for a in links {
            if let Err(e) = self.program().detach(a.link) {
                warn!(interface = a.interface, error = %e, "failed to detach");
            }
        }
    }
}

/// The kernel's index of `interface`.
pub fn ifindex(interface: &str) -> Result<u32, LoadError> {
    let c = std::ffi::CString::new(interface)
        .map_err(|_| LoadError::NoInterface { interface: interface.to_string() })?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(LoadError::NoInterface { interface: interface.to_string() });
    }
    Ok(idx)
}

/// The name of interface `ifindex`, if it exists.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}
