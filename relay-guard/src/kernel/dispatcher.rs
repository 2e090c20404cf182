//! Sharing an interface with other XDP programs: libxdp's multi-program
//! dispatcher, protocol version 2 (xdp-tools, `lib/libxdp/protocol.org`).
//!
//! A dispatcher is an XDP program named `xdp_dispatcher` with ten global stub
//! functions `prog0`..`prog9` that component programs replace (freplace,
//! `BPF_PROG_TYPE_EXT`), and one read-only map holding its configuration
//! (magic 236, version 2, number of slots in use, per-slot chain-call
//! actions, run priorities and program flags). Components are pinned under
//! `<bpffs>/xdp/dispatch-IFINDEX-DISPID/progN-{prog,link}`, and everything is
//! changed under `flock` on `<bpffs>/xdp`. A dispatcher is never changed in
//! place: a new one is loaded with the new set of components (the existing
//! ones re-attached to it: an freplace program may have several targets),
//! pinned, and swapped in on the interface atomically (netlink,
//! `XDP_FLAGS_REPLACE` with the old program as the expected one), then the
//! old one's pins go. That is the operation libxdp (xdp-loader, xdp-filter)
//! performs too, so either side can add or remove programs.
//!
//! relay-guard's component is its XDP program loaded as an extension; it is
//! recognised by its program name and by the map it shares with the pinned
//! state (`RG_COUNTERS`), so `detach` takes out only the slot of its own
//! `pin_dir`.
use std::{
    fs,
    io::{self, Read as _},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, Map, MapData},
    programs::{Extension, ProgramFd, ProgramInfo, Xdp, links::FdLink, loaded_programs},
};
use tracing::{info, warn};

/// `XDP_DISPATCHER_MAGIC`.
pub const MAGIC: u8 = 236;
/// `XDP_DISPATCHER_VERSION`.
pub const VERSION: u8 = 2;
/// Slots (`MAX_DISPATCHER_ACTIONS`).
pub const SLOTS: usize = 10;
/// What an unreplaced stub returns; every slot chains on it.
const RETVAL: u32 = 31;
/// `BPF_F_XDP_HAS_FRAGS`.
const HAS_FRAGS: u32 = 1 << 5;
/// The program name libxdp looks for.
pub const NAME: &str = "xdp_dispatcher";
/// libxdp's default run priority.
pub const DEFAULT_PRIORITY: u32 = 50;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;

/// `struct xdp_dispatcher_config` (version 2).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    pub magic: u8,
    pub dispatcher_version: u8,
    pub num_progs_enabled: u8,
    pub is_xdp_frags: u8,
    pub chain_call_actions: [u32; SLOTS],
    pub run_prios: [u32; SLOTS],
    pub program_flags: [u32; SLOTS],
}

// SAFETY: repr(C) plain data without padding (4 + 3 * 40 bytes).
unsafe impl Pod for Config {}

/// One component program of a dispatcher.
pub struct Component {
    /// Kernel program name (what `xdp-loader status` shows).
    pub name: String,
    pub id: u32,
    pub priority: u32,
    /// Chain-call actions, without the stub's return value.
    pub chain: u32,
    pub frags: bool,
    /// Where the program is pinned (`progN-prog`).
    pub pin: PathBuf,
    /// IDs of the maps it uses (to tell relay-guard's own slot).
    pub map_ids: Vec<u32>,
}

/// A dispatcher attached to an interface.
pub struct Existing {
    pub id: u32,
    pub config: Config,
    /// `IFLA_XDP_ATTACHED`: 1 native (driver), 2 generic (skb).
    pub attached: u8,
    pub dir: PathBuf,
    pub components: Vec<Component>,
}

/// What is attached to an interface.
pub enum OnInterface {
    Nothing,
    Dispatcher(Existing),
    /// A program that is not a libxdp dispatcher (or one that libxdp could
    /// not extend either: another version, missing pins).
    Foreign {
        name: String,
        id: u32,
        why: String,
    },
}

/// Errors of this module, each naming what failed (the operator reads
/// them in `LoadError::Share` and in `detach`'s output, so each message
/// carries its cause's text).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory under libxdp's bpffs directory.
    #[error("{op} {}: {error}", path.display())]
    Fs {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    /// A netlink request about an interface's XDP program.
    #[error("{what}: {error}{hint}")]
    Netlink {
        what: String,
        error: io::Error,
        hint: &'static str,
    },
    /// aya refused an operation on a program or a link.
    #[error("{what}: {error}")]
    Program {
        what: String,
        error: aya::programs::ProgramError,
    },
    /// The kernel rejected a program it was asked to load or attach (with
    /// the verifier's log, when there is one).
    #[error("{what}: {error:?}")]
    Rejected {
        what: String,
        error: aya::programs::ProgramError,
    },
    /// Pinning a component's program or link.
    #[error("pin {}: {error}", path.display())]
    Pin { path: PathBuf, error: aya::pin::PinError },
    /// Loading an object (the dispatcher's, or relay-guard's as an extension).
    #[error("{what}: {error}")]
    Object { what: &'static str, error: aya::EbpfError },
    /// Something that must be there is not: a program in an object, a
    /// dispatcher or an extension that vanished under the lock.
    #[error("{0}")]
    Missing(&'static str),
    /// No slot is free in the dispatcher on `ifindex`.
    #[error("the dispatcher on ifindex {ifindex} has all {SLOTS} slots in use")]
    Full { ifindex: u32 },
    /// A component of the dispatcher on `ifindex` has no readable pin.
    #[error("the dispatcher (id {id}) on ifindex {ifindex} has no readable component pin {}: {error}", pin.display())]
    ComponentPin {
        id: u32,
        ifindex: u32,
        pin: PathBuf,
        error: aya::programs::ProgramError,
    },
    /// relay-guard's slot is in a dispatcher attached in another network
    /// namespace.
    #[error(
        "relay-guard's slot is in XDP dispatcher {id} on ifindex {ifindex}, which is not attached in this network namespace: run `relay-guard detach` in the namespace of that interface (nsenter --net=...)"
    )]
    OtherNamespace { id: u32, ifindex: u32 },
    /// The kernel refuses extension (freplace) programs with `EPERM`.
    #[error("{} ({error})", crate::kernel::shared::EXT_REFUSED)]
    ExtensionsRefused { error: aya::programs::ProgramError },
    /// An aya program operation, the message aya's own.
    #[error(transparent)]
    Aya(#[from] aya::programs::ProgramError),
    /// An fd operation, the message the OS's own.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// `<bpffs>/xdp`, where libxdp pins dispatchers and takes its lock
/// (`LIBXDP_BPFFS` overrides `/sys/fs/bpf`, as for libxdp).
pub fn xdp_dir() -> PathBuf {
    let root = std::env::var_os("LIBXDP_BPFFS").map_or_else(|| PathBuf::from("/sys/fs/bpf"), PathBuf::from);
    root.join("xdp")
}

/// `flock(LOCK_EX)` on `<bpffs>/xdp`, held while dispatchers and their pins
/// change (libxdp's `xdp_lock_acquire`).
pub struct Lock {
    _fd: OwnedFd,
}

impl Lock {
    pub fn acquire() -> Result<Lock, Error> {
        let dir = xdp_dir();
        if let Err(e) = fs::create_dir(&dir)
            && e.kind() != io::ErrorKind::AlreadyExists
        {
            return Err(Error::Fs {
                op: "cannot create",
                path: dir,
                error: e,
            });
        }
        let f = fs::File::open(&dir).map_err(|error| Error::Fs {
            op: "cannot open",
            path: dir.clone(),
            error,
        })?;
        let fd: OwnedFd = f.into();
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Fs {
                op: "flock",
                path: dir,
                error: io::Error::last_os_error(),
            });
        }
        Ok(Lock { _fd: fd })
    }
}

// ---- netlink (rtnetlink RTM_GETLINK / RTM_SETLINK with IFLA_XDP) ----

const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_EXPECTED_FD: u16 = 8;
const NLA_F_NESTED: u16 = 1 << 15;
pub const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1;
pub const XDP_FLAGS_SKB_MODE: u32 = 2;
pub const XDP_FLAGS_DRV_MODE: u32 = 4;
pub const XDP_FLAGS_REPLACE: u32 = 16;

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&u16::try_from(len).expect("small").to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Sends one rtnetlink request about `ifindex` (`attrs` after the
/// `ifinfomsg`) and returns the reply's payload after its `nlmsghdr`, or the
/// error the kernel answered with.
fn rtnl(kind: u16, flags: u16, ifindex: u32, attrs: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    // SAFETY: socket has no memory preconditions; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut msg = Vec::with_capacity(64 + attrs.len());
    let len = 16 + 16 + attrs.len();
    msg.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // struct ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&i32::try_from(ifindex).unwrap_or(0).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(attrs);
    // SAFETY: send reads `msg` for its length.
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut file = fs::File::from(sock);
    let n = file.read(&mut buf)?;
    if n < 16 {
        return Err(io::Error::other("short netlink reply"));
    }
    let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
    let msg_len = (u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize).min(n);
    let payload = buf[16..msg_len].to_vec();
    if msg_type == libc::NLMSG_ERROR as u16 {
        let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
    }
    Ok((msg_type, payload))
}

/// Walks the attributes in `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The XDP program attached to `ifindex` and how (`IFLA_XDP_ATTACHED`:
/// 1 native, 2 skb, 3 hw, 4 several), or `None`.
pub fn attached(ifindex: u32) -> io::Result<Option<(u32, u8)>> {
    let (_, payload) = rtnl(libc::RTM_GETLINK, 0, ifindex, &[])?;
    let Some(rest) = payload.get(16..) else {
        return Ok(None);
    };
    let Some((_, xdp)) = attrs(rest).find(|&(k, _)| k == IFLA_XDP) else {
        return Ok(None);
    };
    let (mut mode, mut id) = (0u8, 0u32);
    for (k, v) in attrs(xdp) {
        match k {
            IFLA_XDP_ATTACHED if !v.is_empty() => mode = v[0],
            IFLA_XDP_PROG_ID if v.len() >= 4 => id = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            _ => {}
        }
    }
    Ok((mode != 0 && id != 0).then_some((id, mode)))
}

/// Attaches `prog` to `ifindex` through netlink (as libxdp does, so that
/// libxdp can replace it later); `expected`: the program that must be
/// attached now (atomic replace), or none (only if nothing is attached).
/// `prog` None detaches `expected`.
pub fn netlink_attach(ifindex: u32, prog: Option<RawFd>, expected: Option<RawFd>, mode_flags: u32) -> io::Result<()> {
    let mut inner = Vec::new();
    attr(&mut inner, IFLA_XDP_FD, &prog.unwrap_or(-1).to_ne_bytes());
    let mut flags = mode_flags;
    match expected {
        Some(old) => {
            flags |= XDP_FLAGS_REPLACE;
            attr(&mut inner, IFLA_XDP_EXPECTED_FD, &old.to_ne_bytes());
        }
        None => flags |= XDP_FLAGS_UPDATE_IF_NOEXIST,
    }
    attr(&mut inner, IFLA_XDP_FLAGS, &flags.to_ne_bytes());
    let mut outer = Vec::new();
    attr(&mut outer, IFLA_XDP | NLA_F_NESTED, &inner);
    rtnl(libc::RTM_SETLINK, libc::NLM_F_ACK as u16, ifindex, &outer).map(|_| ())
}

// ---- reading what is there ----

fn program_info(id: u32) -> Option<ProgramInfo> {
    loaded_programs().filter_map(Result::ok).find(|p| p.id() == id)
}

/// The dispatcher's config, read from its single map; `None` when the
/// program is not a version-2 libxdp dispatcher (with why).
fn read_config(info: &ProgramInfo) -> Result<Config, String> {
    if info.name_as_str() != Some(NAME) {
        return Err(format!("its program name is not `{NAME}`"));
    }
    if info.btf_id().is_none() {
        return Err("it has no BTF".into());
    }
    let maps = info.map_ids().ok().flatten().unwrap_or_default();
    let [map_id] = maps[..] else {
        return Err(format!("a dispatcher has one map, this one {}", maps.len()));
    };
    let data = MapData::from_id(map_id).map_err(|e| format!("its config map: {e}"))?;
    let array: Array<MapData, Config> =
        Array::try_from(Map::Array(data)).map_err(|e| format!("its config map has another layout: {e}"))?;
    let config = array.get(&0, 0).map_err(|e| format!("reading its config: {e}"))?;
    if config.magic != MAGIC || config.dispatcher_version != VERSION {
        return Err(format!(
            "it is a dispatcher of another version (magic {}, version {}); this relay-guard speaks version {VERSION}",
            config.magic, config.dispatcher_version
        ));
    }
    if usize::from(config.num_progs_enabled) > SLOTS {
        return Err("its config names more than ten programs".into());
    }
    Ok(config)
}

/// What is attached to `ifindex` (call with the [`Lock`] held).
pub fn inspect(ifindex: u32) -> Result<OnInterface, Error> {
    let Some((id, attached_mode)) = attached(ifindex).map_err(|error| Error::Netlink {
        what: "netlink RTM_GETLINK".into(),
        error,
        hint: "",
    })?
    else {
        return Ok(OnInterface::Nothing);
    };
    let Some(info) = program_info(id) else {
        return Ok(OnInterface::Foreign {
            name: "?".into(),
            id,
            why: "it could not be read".into(),
        });
    };
    let name = info.name_as_str().unwrap_or("?").to_string();
    let config = match read_config(&info) {
        Ok(c) => c,
        Err(why) => return Ok(OnInterface::Foreign { name, id, why }),
    };
    let dir = xdp_dir().join(format!("dispatch-{ifindex}-{id}"));
    let mut components = Vec::new();
    for i in 0..usize::from(config.num_progs_enabled) {
        let pin = dir.join(format!("prog{i}-prog"));
        let p = ProgramInfo::from_pin(&pin).map_err(|error| Error::ComponentPin {
            id,
            ifindex,
            pin: pin.clone(),
            error,
        })?;
        components.push(Component {
            name: p.name_as_str().unwrap_or("?").to_string(),
            id: p.id(),
            priority: config.run_prios[i],
            chain: config.chain_call_actions[i] & !(1 << RETVAL),
            frags: config.program_flags[i] & HAS_FRAGS != 0,
            pin,
            map_ids: p.map_ids().ok().flatten().unwrap_or_default(),
        });
    }
    Ok(OnInterface::Dispatcher(Existing {
        id,
        config,
        attached: attached_mode,
        dir,
        components,
    }))
}

// ---- building a dispatcher ----

/// Loads the extension with its target set (the new dispatcher, slot
/// function name) and returns the `Ebpf` that owns it and its name there.
pub type LoadExtension<'a> = dyn FnMut(ProgramFd, &str) -> Result<(Ebpf, &'static str), Error> + 'a;

/// The component to put in (relay-guard's own).
pub struct Joining<'a> {
    pub load: &'a mut LoadExtension<'a>,
    /// Receives the `Ebpf` that owns the extension once it is attached (its
    /// log ring buffer is read from there).
    pub owner: &'a mut Option<Ebpf>,
    pub priority: u32,
    pub frags: bool,
}

enum Slot<'a> {
    Theirs(&'a Component),
    Ours,
}

/// Replaces the dispatcher on `ifindex` (or installs one) with a new one
/// holding `old`'s components minus those `remove` selects, plus `join` if
/// given; when nothing is left, detaches the dispatcher. Atomic on the
/// interface. `mode_flags` apply when nothing is attached yet.
// Long on purpose (about 150 lines): every step from loading the new
// dispatcher to swapping it in shares its fd, the old one's and the pins
// made so far, and a failure at any step removes exactly those pins (the
// `result` closure and what follows it); split up, that state would be
// passed through each piece.
pub fn rebuild(
    ifindex: u32,
    old: Option<&Existing>,
    remove: &dyn Fn(&Component) -> bool,
    join: Option<Joining<'_>>,
    mode_flags: u32,
) -> Result<u8, Error> {
    let mut slots: Vec<(u32, String, Slot<'_>)> = old
        .map(|o| o.components.iter().filter(|c| !remove(c)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|c| (c.priority, c.name.clone(), Slot::Theirs(c)))
        .collect();
    let (priority, our_frags) = join.as_ref().map_or((0, true), |j| (j.priority, j.frags));
    let mut join = join;
    if join.is_some() {
        slots.push((priority, crate::PROGRAM_NAME.to_string(), Slot::Ours));
    }
    if slots.len() > SLOTS {
        return Err(Error::Full { ifindex });
    }
    // libxdp's order: run priority, then name (stable for the rest).
    run_order(&mut slots);
    let old_fd = match old {
        Some(o) => Some(
            program_info(o.id)
                .ok_or(Error::Missing("the old dispatcher vanished"))?
                .fd()
                .map_err(|error| Error::Program {
                    what: "old dispatcher fd".into(),
                    error,
                })?,
        ),
        None => None,
    };
    if slots.is_empty() {
        if let (Some(o), Some(fd)) = (old, &old_fd) {
            netlink_attach(ifindex, None, Some(fd.as_fd().as_raw_fd()), mode_of(o.attached)).map_err(|error| {
                Error::Netlink {
                    what: format!("detaching the dispatcher from ifindex {ifindex}"),
                    error,
                    hint: "",
                }
            })?;
            remove_dir(&o.dir);
        }
        return Ok(0);
    }
    let entries: Vec<Entry> = slots
        .iter()
        .map(|(prio, _, s)| match s {
            Slot::Theirs(c) => Entry {
                priority: *prio,
                chain: c.chain,
                frags: c.frags,
            },
            Slot::Ours => Entry {
                priority: *prio,
                chain: 1 << XDP_PASS,
                frags: our_frags,
            },
        })
        .collect();
    let (config, frags) = config_for(&entries);
    let (ebpf, disp_fd) = load_dispatcher(&config, frags)?;
    let new_id = program_id(&ebpf)?;
    let dir = xdp_dir().join(format!("dispatch-{ifindex}-{new_id}"));
    let result = (|| -> Result<(), Error> {
        fs::create_dir(&dir).map_err(|error| Error::Fs {
            op: "mkdir",
            path: dir.clone(),
            error,
        })?;
        for (i, (_, name, s)) in slots.iter().enumerate() {
            let func = format!("prog{i}");
            let prog_pin = dir.join(format!("prog{i}-prog"));
            let link_pin = dir.join(format!("prog{i}-link"));
            let link: FdLink = match s {
                Slot::Theirs(c) => {
                    let mut ext = Extension::from_pin(&c.pin).map_err(|error| Error::Program {
                        what: format!("component `{name}` ({})", c.pin.display()),
                        error,
                    })?;
                    let id = ext
                        .attach_to_program(&disp_fd, &func)
                        .map_err(|error| Error::Rejected {
                            what: format!("re-attaching `{name}` to the new dispatcher"),
                            error,
                        })?;
                    pin_component(&mut ext, id, &prog_pin)?
                }
                Slot::Ours => {
                    let j = join.as_mut().expect("ours only when joining");
                    let target = disp_fd.try_clone()?;
                    let (mut owner, pname) = (j.load)(target, &func)?;
                    let ext: &mut Extension = owner
                        .program_mut(pname)
                        .ok_or(Error::Missing("extension vanished"))?
                        .try_into()?;
                    let id = ext.attach().map_err(|error| Error::Rejected {
                        what: "attaching relay-guard to the dispatcher".into(),
                        error,
                    })?;
                    let link = pin_component(ext, id, &prog_pin)?;
                    *j.owner = Some(owner);
                    link
                }
            };
            link.pin(&link_pin).map_err(|error| Error::Pin {
                path: link_pin.clone(),
                error,
            })?;
        }
        let attach = |flags: u32| {
            netlink_attach(
                ifindex,
                Some(disp_fd.as_fd().as_raw_fd()),
                old_fd.as_ref().map(|f| f.as_fd().as_raw_fd()),
                flags,
            )
        };
        match old {
            Some(o) => attach(mode_of(o.attached)),
            None if mode_flags == 0 => attach(XDP_FLAGS_DRV_MODE).or_else(|e| {
                warn!(ifindex, error = %e, "native XDP not available for the dispatcher, using generic (skb) mode");
                attach(XDP_FLAGS_SKB_MODE)
            }),
            None => attach(mode_flags),
        }
        .map_err(|error| Error::Netlink {
            what: format!("attaching the new dispatcher to ifindex {ifindex}"),
            hint: if error.raw_os_error() == Some(libc::EBUSY) {
                " (a bpf_link holds the interface)"
            } else {
                ""
            },
            error,
        })
    })();
    if let Err(e) = result {
        remove_dir(&dir);
        return Err(e);
    }
    if let Some(o) = old {
        remove_dir(&o.dir);
    }
    drop(ebpf);
    let mode = attached(ifindex).ok().flatten().map_or(0, |(_, m)| m);
    info!(
        ifindex,
        dispatcher = new_id,
        programs = slots.len(),
        frags,
        "XDP dispatcher in place"
    );
    Ok(mode)
}

/// One slot of a dispatcher to build, in run order.
#[derive(Debug, Clone, Copy)]
struct Entry {
    priority: u32,
    chain: u32,
    frags: bool,
}

/// The configuration of a dispatcher running `entries` in this order, and
/// whether it is frags-capable (only if every component is). Every slot
/// also chains on the stub's return value, so a detached slot is skipped.
fn config_for(entries: &[Entry]) -> (Config, bool) {
    let frags = entries.iter().all(|e| e.frags);
    let mut config = Config {
        magic: MAGIC,
        dispatcher_version: VERSION,
        num_progs_enabled: u8::try_from(entries.len().min(SLOTS)).expect("<= 10"),
        is_xdp_frags: u8::from(frags),
        ..Config::default()
    };
    for (i, e) in entries.iter().take(SLOTS).enumerate() {
        config.chain_call_actions[i] = e.chain | (1 << RETVAL);
        config.run_prios[i] = e.priority;
        config.program_flags[i] = if e.frags { HAS_FRAGS } else { 0 };
    }
    (config, frags)
}

/// libxdp's run order: priority, then program name.
fn run_order<T>(slots: &mut [(u32, String, T)]) {
    slots.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
}

/// Pins the component `ext` (attached to the new dispatcher as link `id`)
/// at `prog_pin` and takes its link, for pinning beside it.
fn pin_component(
    ext: &mut Extension,
    id: aya::programs::extension::ExtensionLinkId,
    prog_pin: &Path,
) -> Result<FdLink, Error> {
    ext.pin(prog_pin).map_err(|error| Error::Pin {
        path: prog_pin.to_path_buf(),
        error,
    })?;
    Ok(ext.take_link(id)?.into())
}

/// Loads the dispatcher object (the frags variant when `frags`) with
/// `config`; returns its owner and its program fd.
pub fn load_dispatcher(config: &Config, frags: bool) -> Result<(Ebpf, ProgramFd), Error> {
    let object = if frags {
        crate::DISPATCHER_FRAGS_OBJECT
    } else {
        crate::DISPATCHER_OBJECT
    };
    if object.is_empty() {
        return Err(Error::Missing(
            "this binary was built without the dispatcher (AYA_BUILD_SKIP)",
        ));
    }
    crate::kernel::loader::bump_memlock_rlimit();
    let mut ebpf = EbpfLoader::new()
        .override_global("conf", config, true)
        .load(object)
        .map_err(|error| Error::Object {
            what: "loading the dispatcher object",
            error,
        })?;
    let prog: &mut Xdp = ebpf
        .program_mut(NAME)
        .ok_or(Error::Missing("no xdp_dispatcher in the dispatcher object"))?
        .try_into()
        .map_err(|error| Error::Program {
            what: "xdp_dispatcher".into(),
            error,
        })?;
    prog.load().map_err(|error| Error::Rejected {
        what: "the kernel rejected the dispatcher".into(),
        error,
    })?;
    let fd = prog.fd()?.try_clone()?;
    Ok((ebpf, fd))
}

/// The kernel ID of the dispatcher program in `ebpf`.
pub fn program_id(ebpf: &Ebpf) -> Result<u32, Error> {
    let prog: &Xdp = ebpf
        .program(NAME)
        .ok_or(Error::Missing("no xdp_dispatcher"))?
        .try_into()?;
    Ok(prog.info()?.id())
}

/// A dispatcher holding only relay-guard's component (slot 0, chain on
/// `XDP_PASS`), attached to no interface: for `BPF_PROG_TEST_RUN` (the
/// bench's "through the dispatcher" cost). Dropping it unloads everything.
pub struct Standalone {
    pub dispatcher: ProgramFd,
    _owners: (Ebpf, Ebpf),
    _link: FdLink,
}

/// Builds a [`Standalone`] dispatcher around the extension `load` returns.
pub fn standalone(load: &mut LoadExtension<'_>) -> Result<Standalone, Error> {
    let frags = crate::kernel::features::get().frags;
    let (config, _) = config_for(&[Entry {
        priority: DEFAULT_PRIORITY,
        chain: 1 << XDP_PASS,
        frags,
    }]);
    let (disp, fd) = load_dispatcher(&config, frags)?;
    let (mut owner, name) = load(fd.try_clone()?, "prog0")?;
    let ext: &mut Extension = owner
        .program_mut(name)
        .ok_or(Error::Missing("extension vanished"))?
        .try_into()?;
    let id = ext.attach().map_err(|error| Error::Rejected {
        what: "attaching to the dispatcher".into(),
        error,
    })?;
    let link: FdLink = ext.take_link(id)?.into();
    Ok(Standalone {
        dispatcher: fd,
        _owners: (disp, owner),
        _link: link,
    })
}

/// The netlink mode flag for an `IFLA_XDP_ATTACHED` value.
fn mode_of(attached: u8) -> u32 {
    match attached {
        2 => XDP_FLAGS_SKB_MODE,
        1 => XDP_FLAGS_DRV_MODE,
        _ => 0,
    }
}

/// Unpins a dispatcher's directory (its links detach from it).
pub fn remove_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// The dispatchers (ifindex, dispatcher program id) pinned under
/// `<bpffs>/xdp` that hold a component using map `map_id` (relay-guard's
/// pinned `RG_COUNTERS`). The ifindex is that of the namespace the
/// dispatcher was attached in.
pub fn slots_of(map_id: u32) -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir(xdp_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((ifindex, id)) = name
            .strip_prefix("dispatch-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(i, d)| Some((i.parse::<u32>().ok()?, d.parse::<u32>().ok()?)))
        else {
            continue;
        };
        let ours = fs::read_dir(e.path()).into_iter().flatten().flatten().any(|f| {
            f.file_name().to_string_lossy().ends_with("-prog")
                && ProgramInfo::from_pin(f.path())
                    .ok()
                    .and_then(|p| p.map_ids().ok().flatten())
                    .is_some_and(|ids| ids.contains(&map_id))
        });
        if ours && !out.contains(&(ifindex, id)) {
            out.push((ifindex, id));
        }
    }
    out
}

/// The kernel ID of the map pinned at `path`.
pub fn pinned_map_id(path: &Path) -> Option<u32> {
    MapData::from_pin(path).ok()?.info().ok().map(|i| i.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_matches_libxdp_layout() {
        // struct xdp_dispatcher_config v2: 4 bytes, then three u32[10].
        assert_eq!(size_of::<Config>(), 124);
        assert_eq!(std::mem::offset_of!(Config, chain_call_actions), 4);
        assert_eq!(std::mem::offset_of!(Config, run_prios), 44);
        assert_eq!(std::mem::offset_of!(Config, program_flags), 84);
    }

    #[test]
    fn config_follows_libxdp() {
        let e = |priority, chain, frags| Entry { priority, chain, frags };
        let (c, frags) = config_for(&[e(10, 1 << XDP_PASS, true), e(50, (1 << XDP_PASS) | (1 << 1), true)]);
        assert!(frags);
        assert_eq!(
            (c.magic, c.dispatcher_version, c.num_progs_enabled, c.is_xdp_frags),
            (236, 2, 2, 1)
        );
        assert_eq!(c.chain_call_actions[0], (1 << 2) | (1 << 31));
        assert_eq!(c.chain_call_actions[1], (1 << 2) | (1 << 1) | (1 << 31));
        assert_eq!(c.run_prios[..3], [10, 50, 0]);
        assert_eq!(c.program_flags[..3], [HAS_FRAGS, HAS_FRAGS, 0]);
        // One component without frags: the dispatcher has none.
        let (c, frags) = config_for(&[e(10, 4, true), e(50, 4, false)]);
        assert!(!frags);
        assert_eq!(c.is_xdp_frags, 0);
        assert_eq!(c.program_flags[..2], [HAS_FRAGS, 0]);
    }

    #[test]
    fn run_order_is_priority_then_name() {
        let mut s = vec![
            (50, "xdp_pass".to_string(), ()),
            (10, "xdpfilt_alw_all".to_string(), ()),
            (10, "relay_guard".to_string(), ()),
        ];
        run_order(&mut s);
        let names: Vec<&str> = s.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(names, ["relay_guard", "xdpfilt_alw_all", "xdp_pass"]);
    }

    #[test]
    fn netlink_attributes_walk() {
        let mut b = Vec::new();
        attr(&mut b, 1, &[7]);
        attr(&mut b, IFLA_XDP_PROG_ID, &42u32.to_ne_bytes());
        let got: Vec<(u16, Vec<u8>)> = attrs(&b).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(
            got,
            vec![(1, vec![7]), (IFLA_XDP_PROG_ID, 42u32.to_ne_bytes().to_vec())]
        );
    }

    #[test]
    fn loopback_has_no_xdp_program_by_default_or_an_answer() {
        // Reads only: the query itself must work (CAP_NET_ADMIN not needed).
        assert!(attached(1).is_ok());
    }
}
