//! Loads the embedded XDP object, hands out its typed map handles
//! ([`Maps`], in `kernel::maps`), and attaches the program to interfaces in
//! the configured XDP mode.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use relay_guard_common::maps;
use tracing::{info, warn};

use crate::{
    EBPF_OBJECT, PROGRAM_NAME,
    config::XdpMode,
    error::LoadError,
    kernel::{maps::Maps, pins::Pins},
};

/// One interface the program is attached to. With pins, the link is pinned
/// and outlives the agent; without, the program owns it (and detaches it
/// when dropped).
#[derive(Debug, Clone)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    /// "native", "skb", or "adopted" (an existing pinned link, updated in place).
    pub mode: &'static str,
}

/// The loaded program and its maps. Without pins, dropping it detaches the
/// program; with pins, the filter outlives the agent.
pub struct Loaded {
    /// Owns the program (and unpinned links).
    ebpf: Ebpf,
    pub maps: Maps,
    /// Where state is pinned, if it is.
    pins: Option<Pins>,
    /// True when the maps were adopted from pinned state (counters kept).
    pub adopted: bool,
    /// Reader of the program's aya-log ring buffer (rate-limited blocked-source
    /// events); `run` drains it.
    pub logger: Option<aya_log::EbpfLogger<crate::kernel::events::OncePerSecond>>,
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory to it
/// (before 5.11). Best effort: newer kernels use memcg accounting, and a
/// container may forbid raising the hard limit, so a failure is only logged.
pub fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK (not needed on kernels >= 5.11)");
    }
}

impl Loaded {
    /// Loads the object and the program into the kernel (the verifier runs
    /// here). Nothing is attached yet.
    pub fn load() -> Result<Loaded, LoadError> {
        Self::load_with(None)
    }

    /// Loads with every map pinned under `pins` (adopting maps that are
    /// already pinned there: contents and counters are kept) and pins the
    /// program. Links are pinned by [`Loaded::attach`].
    pub fn load_pinned(pins: &Pins) -> Result<Loaded, LoadError> {
        pins.prepare()?;
        Self::load_with(Some(pins))
    }

    fn load_with(pins: Option<&Pins>) -> Result<Loaded, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let adopted = pins.is_some_and(Pins::has_state_maps);
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&'static str, PathBuf)> = pins
            .map(|p| maps::ALL.iter().map(|&n| (n, p.map(n))).collect())
            .unwrap_or_default();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
        let maps = Maps::from_source(|name| ebpf.take_map(name).ok_or(LoadError::NoMap { name }))?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(LoadError::NoProgram { name: PROGRAM_NAME })?
            .try_into()
            .map_err(|source| LoadError::Verifier {
                name: PROGRAM_NAME,
                source,
            })?;
        prog.load().map_err(|source| LoadError::Verifier {
            name: PROGRAM_NAME,
            source,
        })?;
        if let Some(pins) = pins {
            let path = pins.prog();
            let _ = std::fs::remove_file(&path);
            prog.pin(&path).map_err(|source| LoadError::PinObject {
                what: "program".into(),
                path,
                source,
            })?;
        }
        let logger =
            match aya_log::EbpfLogger::init_with_logger(&mut ebpf, crate::kernel::events::OncePerSecond::default()) {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!(error = %e, "blocked-source events unavailable");
                    None
                }
            };
        Ok(Loaded {
            ebpf,
            maps,
            pins: pins.cloned(),
            adopted,
            logger,
        })
    }

    /// The loaded program, for `BPF_PROG_TEST_RUN` and attaching.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("checked in load")
            .try_into()
            .expect("checked in load")
    }

    /// Attaches to `interface`. With pins, an existing pinned link for it (of
    /// this layout or another) is updated to this program atomically
    /// (`bpf_link_update`: no instant without a filter); otherwise a new
    /// bpf_link is made and pinned. `auto` tries native (driver) mode and
    /// falls back to generic (skb) mode with a log line saying so.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<Attachment, LoadError> {
        let ifindex = ifindex(interface)?;
        self.maps.register_iface(ifindex)?;
        if let Some(pins) = self.pins.clone() {
            let mut candidates = vec![pins.link(interface)];
            candidates.extend(
                pins.other_layouts()
                    .into_iter()
                    .map(|d| d.join("links").join(interface)),
            );
            for path in candidates.into_iter().filter(|p| p.exists()) {
                match self.adopt_link(&path, &pins.link(interface)) {
                    Ok(()) => {
                        info!(interface, pin = %path.display(), "replaced the program on the pinned link atomically");
                        return Ok(Attachment {
                            interface: interface.to_string(),
                            ifindex,
                            mode: "adopted",
                        });
                    }
                    Err(e) => {
                        warn!(interface, pin = %path.display(), error = %e, "pinned link is unusable (interface gone or recreated?); attaching anew");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
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
                    if let Some(pins) = self.pins.clone() {
                        self.pin_link(link, &pins.link(interface))?;
                    }
                    return Ok(Attachment {
                        interface: interface.to_string(),
                        ifindex,
                        mode: name,
                    });
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
        Err(LoadError::Attach {
            interface: interface.to_string(),
            mode,
            hint,
            source,
        })
    }

    /// Updates the link pinned at `from` to run this program, then pins it
    /// at `to` (the same path, or this layout's path for an older layout's link).
    fn adopt_link(&mut self, from: &Path, to: &Path) -> Result<(), String> {
        let pinned = PinnedLink::from_pin(from).map_err(|e| e.to_string())?;
        let fd: FdLink = pinned.into();
        let link = XdpLink::try_from(fd).map_err(|e| e.to_string())?;
        let id = self
            .program()
            .attach_to_link(link)
            .map_err(|e| format!("bpf_link_update: {e}"))?;
        let link = self.program().take_link(id).map_err(|e| e.to_string())?;
        let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(from);
        let _ = std::fs::remove_file(to);
        fd.pin(to).map_err(|e| format!("pin at {}: {e}", to.display()))?;
        Ok(())
    }

    /// Pins a newly made link so it outlives the agent.
    fn pin_link(&mut self, id: XdpLinkId, path: &Path) -> Result<(), LoadError> {
        let link = self.program().take_link(id).map_err(|source| LoadError::Verifier {
            name: PROGRAM_NAME,
            source,
        })?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                let _ = std::fs::remove_file(path);
                fd.pin(path).map_err(|source| LoadError::PinObject {
                    what: "link".into(),
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(())
            }
            Err(e) => {
                // Only a kernel without bpf_link for XDP gets here (netlink attach).
                warn!(error = %e, "the kernel attached through netlink: this attachment cannot be pinned and ends with the agent");
                Err(LoadError::PinObject {
                    what: "link (netlink attachment)".into(),
                    path: path.to_path_buf(),
                    source: aya::pin::PinError::NoFd {
                        name: "xdp link".into(),
                    },
                })
            }
        }
    }

    /// Unpins links of interfaces that are no longer configured (they detach)
    /// and removes state of other layouts. Call after attaching.
    pub fn prune(&mut self, interfaces: &[String]) {
        let Some(pins) = self.pins.clone() else { return };
        for iface in pins.pinned_links() {
            if !interfaces.contains(&iface) {
                info!(interface = iface, "detaching from an interface no longer in the config");
                let _ = std::fs::remove_file(pins.link(&iface));
            }
        }
        for other in pins.other_layouts() {
            info!(path = %other.display(), "removing pinned state of another layout version (replaced by this one)");
            let _ = std::fs::remove_dir_all(&other);
        }
    }
}

/// The kernel's index of `interface`.
pub fn ifindex(interface: &str) -> Result<u32, LoadError> {
    let c = std::ffi::CString::new(interface).map_err(|_| LoadError::NoInterface {
        interface: interface.to_string(),
    })?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(LoadError::NoInterface {
            interface: interface.to_string(),
        });
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
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}
