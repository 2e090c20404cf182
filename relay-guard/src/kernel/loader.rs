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
    EBPF_OBJECT, PROGRAM_NAME, PROGRAM_NAME_SINGLE_BUFFER,
    config::XdpMode,
    error::LoadError,
    kernel::{
        features,
        maps::Maps,
        netdev::{self, LinkState},
        pins::Pins,
        sizes::Sizes,
    },
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
    /// The ban maps (`kernel::bans`).
    pub bans: crate::kernel::bans::BanMaps,
    /// Where state is pinned, if it is.
    pub(crate) pins: Option<Pins>,
    /// True when the maps were adopted from pinned state (counters kept).
    pub adopted: bool,
    /// The set (see `kernel::pins`) these maps are pinned as, and whether
    /// the pins name it yet ([`Loaded::publish`]).
    set: Option<(u32, bool)>,
    /// Reader of the program's aya-log ring buffer (bounded blocked-source
    /// events); `run` drains it.
    pub logger: Option<crate::kernel::events::BlockedLog>,
    /// Run priority in a shared (libxdp) dispatcher (`xdp_priority`).
    pub xdp_priority: u32,
    /// Attach through a dispatcher even when alone (`xdp_dispatcher`).
    pub xdp_dispatcher: bool,
    /// relay-guard's program loaded as a dispatcher component, per
    /// ifindex, kept for its log ring buffer (the latest one only).
    pub(crate) ext_owners: std::collections::HashMap<u32, Ebpf>,
    /// The entry point loaded: [`PROGRAM_NAME`] (`xdp.frags`) where the
    /// kernel has multi-buffer XDP, else [`PROGRAM_NAME_SINGLE_BUFFER`].
    prog_name: &'static str,
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
        Self::load_with(None, None)
    }

    /// [`Loaded::load`] with the sized maps at `sizes`.
    pub fn load_sized(sizes: Sizes) -> Result<Loaded, LoadError> {
        Self::load_with(None, Some(sizes))
    }

    /// Loads with every map pinned under `pins` (adopting maps that are
    /// already pinned there: contents and counters are kept) and pins the
    /// program. Links are pinned by [`Loaded::attach`]. With no set in
    /// force, a new one is made at the largest sizes.
    pub fn load_pinned(pins: &Pins) -> Result<Loaded, LoadError> {
        Self::load_pinned_sized(pins, Sizes::MAX)
    }

    /// [`Loaded::load_pinned`], a new set (when none is in force) sized
    /// `sizes`. A new set is named by the pins only once
    /// [`Loaded::publish`] says it is filled.
    pub fn load_pinned_sized(pins: &Pins, sizes: Sizes) -> Result<Loaded, LoadError> {
        pins.prepare()?;
        pins.remove_other_sets(None);
        match pins.current_set() {
            Some(k) if pins.has_state_maps() => Self::load_with(Some((pins, k, false)), None),
            _ => Self::load_with(Some((pins, pins.next_set(), true)), Some(sizes)),
        }
    }

    /// A new set of the policy's maps ([`crate::kernel::pins::SET_MAPS`])
    /// sized `sizes`, loaded beside this one with the shared maps (counters,
    /// interface slots, bans) of this one and a copy of its ports and
    /// settings (counter slots stay with their port). Fill it with
    /// `sync::apply_full`, then hand over with [`Loaded::take_over`]; this
    /// one keeps guarding until then.
    pub fn new_set(&self, sizes: Sizes) -> Result<Loaded, LoadError> {
        let Some(pins) = &self.pins else {
            return Err(LoadError::MapLayout {
                name: maps::TBL24,
                what: "maps without pins cannot be resized".into(),
            });
        };
        let k = pins.next_set();
        let mut new = Self::load_with(Some((pins, k, true)), Some(sizes))?;
        let err = |name| move |source| LoadError::MapType { name, source };
        for port in 0..relay_guard_common::PORT_SLOTS {
            let e = self.maps.ports.get(&port, 0).map_err(err(maps::PORTS))?;
            if e != relay_guard_common::PortEntry::default() {
                new.maps.ports.set(port, e, 0).map_err(err(maps::PORTS))?;
            }
        }
        let settings = self.maps.settings.get(&0, 0).map_err(err(maps::SETTINGS))?;
        new.maps.settings.set(0, settings, 0).map_err(err(maps::SETTINGS))?;
        new.maps.counters = std::sync::Arc::clone(&self.maps.counters);
        new.adopted = true;
        new.xdp_priority = self.xdp_priority;
        new.xdp_dispatcher = self.xdp_dispatcher;
        Ok(new)
    }

    /// Makes the pins name this set (once it is filled), and removes the
    /// other sets' pins. Idempotent.
    pub fn publish(&mut self) -> Result<(), LoadError> {
        let (Some(pins), Some((k, published))) = (&self.pins, &mut self.set) else {
            return Ok(());
        };
        if !*published {
            pins.publish_set(*k)?;
            *published = true;
        }
        pins.remove_other_sets(None);
        Ok(())
    }

    /// Removes the pins of sets the pins do not name (a new set that failed
    /// to fill, once dropped).
    pub fn discard_unpublished(&self) {
        if let Some(pins) = &self.pins {
            pins.remove_other_sets(self.set.map(|(k, _)| k));
        }
    }

    /// Hands the interfaces over to `new` (a filled set from
    /// [`Loaded::new_set`]): publishes it, then replaces the program on
    /// each of `interfaces` (its pinned link updated in place, or its slot
    /// in a dispatcher swapped: no gap). `self` becomes `new`; the old
    /// set's maps are freed with its program. Returns the interfaces that
    /// could not be moved (they keep the old program and its policy).
    pub fn take_over(&mut self, mut new: Loaded, interfaces: &[String], mode: XdpMode) -> Vec<(String, LoadError)> {
        if let Err(e) = new.publish() {
            // Nothing moved: the old set stays in force everywhere.
            let why = e.to_string();
            return interfaces
                .iter()
                .map(|i| {
                    (
                        i.clone(),
                        LoadError::MapLayout {
                            name: maps::SETTINGS,
                            what: format!("publishing the new set failed: {why}"),
                        },
                    )
                })
                .collect();
        }
        let mut failed = Vec::new();
        for iface in interfaces {
            if let Err(e) = new.attach(iface, mode) {
                failed.push((iface.clone(), e));
            }
        }
        for (i, owner) in self.ext_owners.drain() {
            new.ext_owners.entry(i).or_insert(owner);
        }
        *self = new;
        failed
    }

    fn load_with(pins: Option<(&Pins, u32, bool)>, sizes: Option<Sizes>) -> Result<Loaded, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        // Before 5.11 the maps are charged to RLIMIT_MEMLOCK.
        bump_memlock_rlimit();
        let kernel = features::require()?;
        let prog_name = if kernel.frags {
            PROGRAM_NAME
        } else {
            info!(
                kernel = kernel.release,
                "the kernel has no multi-buffer XDP (xdp.frags, Linux 5.18): loading the single-buffer program (a jumbo-MTU interface is guarded in skb mode only)"
            );
            PROGRAM_NAME_SINGLE_BUFFER
        };
        let adopted = pins.is_some_and(|(_, _, fresh)| !fresh);
        let mut loader = EbpfLoader::new();
        // A new set is pinned in its `next-` directory until published.
        let set_dir = pins.map(|(p, k, fresh)| if fresh { p.next_dir(k) } else { p.set_dir(k) });
        if let (Some((_, _, true)), Some(dir)) = (pins, &set_dir) {
            std::fs::create_dir_all(dir).map_err(|source| LoadError::Pin {
                op: "create",
                path: dir.clone(),
                source,
            })?;
        }
        let map_paths: Vec<(&'static str, PathBuf)> = match (pins, &set_dir) {
            (Some((p, _, _)), Some(dir)) => maps::ALL.iter().map(|&n| (n, p.map_beside(dir, n))).collect(),
            _ => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let entries = sizes.map(|s| s.max_entries());
        for &(name, n) in entries.iter().flatten() {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
        let maps = Maps::from_source(|name| ebpf.take_map(name).ok_or(LoadError::NoMap { name }))?;
        let bans =
            crate::kernel::bans::BanMaps::from_source(|name| ebpf.take_map(name).ok_or(LoadError::NoMap { name }))?;
        let prog: &mut Xdp = ebpf
            .program_mut(prog_name)
            .ok_or(LoadError::NoProgram { name: prog_name })?
            .try_into()
            .map_err(|source| LoadError::Verifier {
                name: prog_name,
                source,
            })?;
        prog.load()
            .map_err(|source| refused(prog_name, &kernel.release, source))?;
        if let Some(dir) = &set_dir {
            let path = Pins::prog_in(dir);
            let _ = std::fs::remove_file(&path);
            prog.pin(&path).map_err(|source| LoadError::PinObject {
                what: "program".into(),
                path,
                source,
            })?;
        }
        let logger = match crate::kernel::events::BlockedLog::new(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "blocked-source events unavailable");
                None
            }
        };
        Ok(Loaded {
            ebpf,
            maps,
            bans,
            pins: pins.map(|(p, _, _)| p.clone()),
            adopted,
            set: pins.map(|(_, k, fresh)| (k, !fresh)),
            logger,
            xdp_priority: crate::config::DEFAULT_XDP_PRIORITY,
            xdp_dispatcher: false,
            ext_owners: std::collections::HashMap::new(),
            prog_name,
        })
    }

    /// Whether the loaded program takes multi-buffer (`xdp.frags`) packets.
    pub fn frags(&self) -> bool {
        self.prog_name == PROGRAM_NAME
    }

    /// The kernel name of the loaded program.
    pub fn program_name(&self) -> &'static str {
        self.prog_name
    }

    /// The loaded program, for `BPF_PROG_TEST_RUN` and attaching.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(self.prog_name)
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
            candidates.extend(pins.other_layout_links(interface));
            // A pinned link is replaced only when it is provably dead (its
            // interface is gone or is another device now); any other
            // problem keeps the pin, so the filter it holds keeps guarding,
            // and fails the attach.
            for path in candidates.into_iter().filter(|p| p.exists()) {
                let verdict = match probe_link(&path, ifindex) {
                    LinkProbe::Gone => continue,
                    LinkProbe::Dead(why) => Err(Adopt::Dead(why)),
                    LinkProbe::Unusable(why) => Err(Adopt::Keep(why)),
                    LinkProbe::Live => self.adopt_link(&path, &pins.link(interface)),
                };
                match verdict {
                    Ok(()) => {
                        info!(interface, pin = %path.display(), "replaced the program on the pinned link atomically");
                        return Ok(Attachment {
                            interface: interface.to_string(),
                            ifindex,
                            mode: "adopted",
                        });
                    }
                    Err(Adopt::Dead(why)) => {
                        warn!(interface, pin = %path.display(), reason = %why, "pinned link is dead; attaching anew");
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(Adopt::Keep(why)) => {
                        return Err(LoadError::Adopt {
                            interface: interface.to_string(),
                            pin: path,
                            why,
                        });
                    }
                }
            }
        }
        // Another XDP program on the interface: join its libxdp dispatcher,
        // or refuse (a program that is not one is never replaced).
        if let Some(a) = self.attach_shared(interface, ifindex, mode)? {
            return Ok(a);
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
                        let why = features::jumbo_hint(interface).unwrap_or_default();
                        warn!(interface, error = %source, "native XDP not available, falling back to generic (skb) mode{why}");
                    }
                    last = Some((name, source));
                }
            }
        }
        let (mode, source) = last.expect("at least one attempt");
        let hint = match (mode, features::jumbo_hint(interface)) {
            ("native", Some(jumbo)) => jumbo,
            ("native", None) => " - the driver may not support native XDP; try xdp_mode = \"skb\"".to_string(),
            _ => String::new(),
        };
        Err(LoadError::Attach {
            interface: interface.to_string(),
            mode,
            hint,
            source,
        })
    }

    /// Updates the link pinned at `from` to run this program, then pins it
    /// at `to` (for an older layout's link) before unpinning `from`, so the
    /// link is pinned somewhere at every moment.
    fn adopt_link(&mut self, from: &Path, to: &Path) -> Result<(), Adopt> {
        let keep = |what: &str, e: &dyn std::fmt::Display| Adopt::Keep(format!("{what}: {e}"));
        let pinned = PinnedLink::from_pin(from).map_err(|e| keep("BPF_OBJ_GET", &e))?;
        let fd: FdLink = pinned.into();
        let link = XdpLink::try_from(fd).map_err(|e| keep("not an XDP link", &e))?;
        let id = match self.program().attach_to_link(link) {
            Ok(id) => id,
            Err(e) if crate::kernel::errno::in_chain(&e, libc::ENOLINK) => {
                return Err(Adopt::Dead(format!("bpf_link_update: {e} (the link is detached)")));
            }
            Err(e) => return Err(keep("bpf_link_update", &e)),
        };
        if from == to {
            // Updated in place: the pin already names this link.
            return Ok(());
        }
        let link = self.program().take_link(id).map_err(|e| keep("take link", &e))?;
        let fd = FdLink::try_from(link).map_err(|e| keep("link fd", &e))?;
        fd.pin(to).map_err(|e| keep(&format!("pin at {}", to.display()), &e))?;
        let _ = std::fs::remove_file(from);
        Ok(())
    }

    /// Pins a newly made link so it outlives the agent.
    fn pin_link(&mut self, id: XdpLinkId, path: &Path) -> Result<(), LoadError> {
        let name = self.prog_name;
        let link = self
            .program()
            .take_link(id)
            .map_err(|source| LoadError::Verifier { name, source })?;
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
            if let Err(e) = crate::kernel::pins::remove_layout(&other) {
                warn!(path = %other.display(), error = %e, "could not remove pinned state of another layout");
            }
        }
        for foreign in pins.foreign_entries() {
            warn!(path = %foreign.display(), "pin_dir holds something relay-guard did not create; left alone");
        }
    }
}

/// A failed program load as [`LoadError::Verifier`], or, when the kernel
/// refused the program before its verifier ran (an error and an empty log:
/// a flag, map or helper it does not know), as [`LoadError::Refused`],
/// which says so and names the kernel: never a bare "Invalid argument".
fn refused(name: &'static str, release: &str, source: aya::programs::ProgramError) -> LoadError {
    match &source {
        aya::programs::ProgramError::LoadError { verifier_log, .. } if verifier_log.to_string().trim().is_empty() => {
            LoadError::Refused {
                name,
                release: release.to_string(),
                source,
            }
        }
        _ => LoadError::Verifier { name, source },
    }
}

/// Why a pinned link was not adopted.
enum Adopt {
    /// Provably dead: safe to unpin and attach anew.
    Dead(String),
    /// Anything else: the pin stays (its filter keeps guarding).
    Keep(String),
}

/// What a link pin holds, looked at before touching it.
enum LinkProbe {
    /// Nothing there any more.
    Gone,
    /// An XDP link whose interface is gone (ifindex 0) or is not `ifindex`.
    Dead(String),
    /// An XDP link on this interface.
    Live,
    /// Not something to adopt or delete (not a link, not XDP, unreadable).
    Unusable(String),
}

/// What the pin at `path` holds, for attaching to `ifindex`: the one probe
/// of a pinned link, [`netdev::pinned_link_state`], read for this question.
fn probe_link(path: &Path, ifindex: u32) -> LinkProbe {
    match netdev::pinned_link_state(path) {
        LinkState::Absent => LinkProbe::Gone,
        LinkState::Dead => LinkProbe::Dead("its interface is gone (link ifindex 0)".into()),
        LinkState::Live { ifindex: theirs } if theirs == ifindex => LinkProbe::Live,
        LinkState::Live { ifindex: theirs } => LinkProbe::Dead(format!(
            "it is attached to ifindex {theirs}, and the interface of this name is ifindex {ifindex} now"
        )),
        LinkState::Unknown(why) => LinkProbe::Unusable(why),
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
