//! What the kernel says about a network device and about the pinned XDP
//! link that guards it: whether a device can be guarded at all (Ethernet
//! framing), and whether a pinned link still guards a device, and which.
//!
//! Both are read in the calling thread's network namespace (an ioctl and the
//! bpf syscall), not from `/sys/class/net`, which shows the namespace that
//! mounted sysfs.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use crate::error::LoadError;

/// `ARPHRD_ETHER` (include/uapi/linux/if_arp.h).
pub const ARPHRD_ETHER: u16 = 1;
/// `ARPHRD_LOOPBACK`: `lo` frames with an Ethernet header too
/// (`loopback_setup`: `hard_header_len = ETH_HLEN`, `eth_header_ops`).
pub const ARPHRD_LOOPBACK: u16 = 772;

/// A readable name for a device type that has no Ethernet header.
fn arphrd_name(t: u16) -> &'static str {
    match t {
        0xfffe => "none: a layer-3 device such as wireguard or tun",
        512 => "ppp",
        768 => "ipip tunnel",
        769 => "ip6tnl tunnel",
        776 => "sit tunnel",
        778 => "gre tunnel",
        823 => "ip6gre tunnel",
        _ => "not Ethernet",
    }
}

/// The device type (`ARPHRD_*`) of `interface`, from `SIOCGIFHWADDR`.
/// `Ok(None)`: no such device in this namespace.
pub fn device_type(interface: &str) -> io::Result<Option<u16>> {
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Ok(None);
    }
    // SAFETY: socket has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened and own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    // The request's type is c_ulong in glibc and c_int in musl (the static
    // build of `cargo xtask image`): libc::Ioctl is whichever it is.
    #[allow(clippy::unnecessary_cast)]
    let request = libc::SIOCGIFHWADDR as libc::Ioctl;
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr of a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut ifr) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODEV) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: on success the kernel filled ifru_hwaddr.
    Ok(Some(unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family }))
}

/// Refuses a device the program cannot parse: it reads an Ethernet header
/// first, so on a device without one (wireguard, tun, ppp, ipip, gre, sit)
/// generic XDP would hand it the IP header, and nearly everything would
/// pass. A device that does not exist passes (it is attached when it
/// appears, and checked then).
pub fn check_ethernet(interface: &str) -> Result<(), LoadError> {
    match device_type(interface) {
        Ok(Some(ARPHRD_ETHER | ARPHRD_LOOPBACK) | None) => Ok(()),
        Ok(Some(t)) => Err(LoadError::NotEthernet {
            interface: interface.to_string(),
            arphrd: t,
            kind: arphrd_name(t),
        }),
        Err(source) => Err(LoadError::Pin {
            op: "read the device type (SIOCGIFHWADDR) of",
            path: interface.into(),
            source,
        }),
    }
}

/// What a pinned XDP link guards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Nothing is pinned there.
    Absent,
    /// The link's device is gone (the kernel reports ifindex 0): the filter
    /// guards nothing, and the pin can go.
    Dead,
    /// The link is attached to device `ifindex` (in the namespace it was
    /// made in).
    Live { ifindex: u32 },
    /// Something is pinned there that is not an XDP link, or could not be
    /// read: never touched.
    Unknown(String),
}

/// `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_TYPE_XDP`.
const BPF_LINK_TYPE_XDP: u32 = 6;

/// The `BPF_OBJ_*` part of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `info` part of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to its XDP member: three `u32`, then a union
/// aligned to 8 whose `xdp` member is `{ __u32 ifindex; }`; room for the
/// rest of the union (the kernel copies at most `info_len` bytes).
#[repr(C, align(8))]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    _rest: [u32; 27],
}

/// Reads what the link pinned at `path` guards. Only reads: never changes
/// the link.
pub fn pinned_link_state(path: &Path) -> LinkState {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return LinkState::Absent,
        Err(e) => return LinkState::Unknown(e.to_string()),
        Ok(_) => {}
    }
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return LinkState::Unknown("path has a NUL byte".into());
    };
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET reads a path through a valid pointer and returns a
    // new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return LinkState::Unknown(format!("BPF_OBJ_GET: {}", io::Error::last_os_error()));
    }
    let Ok(raw) = i32::try_from(fd) else {
        return LinkState::Unknown("BPF_OBJ_GET returned no fd".into());
    };
    // SAFETY: the syscall returned a new fd that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // A program or map pinned there answers BPF_OBJ_GET_INFO_BY_FD with its
    // own info (an XDP program's type is 6 too): tell the kind from the fd.
    let kind = std::fs::read_link(format!("/proc/self/fd/{raw}")).unwrap_or_default();
    if kind != Path::new("anon_inode:bpf-link") {
        return LinkState::Unknown(format!("not a bpf_link ({})", kind.display()));
    }
    // SAFETY: LinkInfo is plain data; all-zero is valid.
    let mut info: LinkInfo = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
        info_len: u32::try_from(std::mem::size_of::<LinkInfo>()).expect("small"),
        info: (&raw mut info) as u64,
    };
    // SAFETY: the kernel writes at most info_len bytes into info.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc != 0 {
        // A pinned program or map answers too, with other info: EINVAL only
        // for what has no info at all.
        return LinkState::Unknown(format!("BPF_OBJ_GET_INFO_BY_FD: {}", io::Error::last_os_error()));
    }
    if info.type_ != BPF_LINK_TYPE_XDP || info.id == 0 {
        return LinkState::Unknown(format!("not an XDP link (bpf_link type {})", info.type_));
    }
    match info.ifindex {
        0 => LinkState::Dead,
        ifindex => LinkState::Live { ifindex },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_info_matches_the_kernel_layout() {
        // type, id, prog_id, then the union at offset 16 (8-aligned).
        assert_eq!(std::mem::offset_of!(LinkInfo, ifindex), 16);
        assert_eq!(std::mem::size_of::<InfoAttr>(), 16);
        assert_eq!(std::mem::size_of::<ObjGetAttr>(), 16);
    }

    #[test]
    fn nothing_pinned_is_absent() {
        assert_eq!(
            pinned_link_state(Path::new("/nonexistent/relay-guard/link")),
            LinkState::Absent
        );
    }

    #[test]
    fn a_device_that_does_not_exist_has_no_type() {
        assert_eq!(device_type("rg-no-such0").expect("ioctl"), None);
        assert!(check_ethernet("rg-no-such0").is_ok());
    }

    #[test]
    fn loopback_frames_with_ethernet() {
        assert_eq!(device_type("lo").expect("ioctl"), Some(ARPHRD_LOOPBACK));
        assert!(check_ethernet("lo").is_ok());
    }
}
