//! What the running kernel offers relay-guard, probed by asking the kernel
//! (a tiny program or map of each kind), never guessed from its version.
//!
//! relay-guard runs from Linux 5.10 (SPEC.md, "Kernels"). What it needs:
//! BPF ring buffers and `bpf_ktime_get_boot_ns` (5.8: the blocked-source
//! log and the bans' kernel-side expiry) and bpf_link for XDP (5.9: the
//! pinned link that keeps guarding while the agent is down). A kernel
//! without one of these is refused with an error that names the kernel, the
//! feature and the first kernel that has it ([`require`]). What it does
//! without: multi-buffer XDP (`xdp.frags`, 5.18). Without it the program is
//! loaded from its single-buffer entry point, and a jumbo-MTU interface can
//! be guarded in generic (skb) mode only (see [`jumbo_hint`]).
use std::sync::LazyLock;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};

/// What the kernel has, probed once per process.
#[derive(Debug, Clone)]
pub struct Features {
    /// `uname -r`.
    pub release: String,
    /// XDP programs may declare multi-buffer support (`BPF_F_XDP_HAS_FRAGS`).
    pub frags: bool,
    /// Features relay-guard cannot do without that the kernel lacks:
    /// (feature, first Linux version with it).
    pub missing: Vec<(&'static str, &'static str)>,
}

/// `BPF_F_XDP_HAS_FRAGS`.
const XDP_HAS_FRAGS: u32 = 1 << 5;

static FEATURES: LazyLock<Features> = LazyLock::new(probe);

/// The running kernel's features (probed on first use).
pub fn get() -> &'static Features {
    &FEATURES
}

/// Refuses a kernel that lacks something relay-guard cannot do without,
/// naming the kernel, the feature and the first kernel that has it.
pub fn require() -> Result<&'static Features, crate::error::LoadError> {
    let f = get();
    match f.missing.first() {
        None => Ok(f),
        Some(&(feature, since)) => Err(crate::error::LoadError::Kernel {
            release: f.release.clone(),
            feature,
            since,
        }),
    }
}

/// The kernel release (`uname -r`).
pub fn release() -> String {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid utsname.
    if unsafe { libc::uname(&raw mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: on success `release` is NUL-terminated.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn probe() -> Features {
    super::loader::bump_memlock_rlimit();
    // Without the right to use bpf(2) (no CAP_BPF, a seccomp filter) every
    // probe fails alike: that says nothing of the kernel, so nothing is
    // reported missing and the program load itself reports the permission
    // error (the unit's capability test relies on that wording).
    if let Err(e) = load_tiny_xdp(0)
        && matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
    {
        return Features {
            release: release(),
            frags: true,
            missing: Vec::new(),
        };
    }
    let mut missing = Vec::new();
    // An error (rather than a "no") from a probe is not evidence of absence.
    if matches!(is_map_supported(MapType::RingBuf), Ok(false)) {
        missing.push(("BPF ring buffers (BPF_MAP_TYPE_RINGBUF)", "5.8"));
    }
    if matches!(
        is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_ktime_get_boot_ns),
        Ok(false)
    ) {
        missing.push(("the bpf_ktime_get_boot_ns helper in XDP programs", "5.8"));
    }
    if !xdp_link_supported() {
        missing.push(("bpf_link for XDP (BPF_LINK_CREATE with BPF_XDP)", "5.9"));
    }
    Features {
        release: release(),
        frags: frags_supported(),
        missing,
    }
}

/// `union bpf_attr`, as bytes, large enough for every command used here.
type Attr = [u64; 16];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: bpf(2) reads (and for some commands writes) `attr`, which is
    // valid for its size; the pointers in it point to live buffers.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<Attr>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads `r0 = XDP_PASS; exit` as an XDP program with `flags`; its fd.
fn load_tiny_xdp(flags: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_XDP: u64 = 6;
    // mov64 r0, 2 ; exit
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut attr: Attr = [0; 16];
    // prog_type (u32) | insn_cnt (u32)
    attr[0] = BPF_PROG_TYPE_XDP | (2 << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // log_level, log_size (u32 each) = 0; log_buf = 0;
    // kern_version (u32) | prog_flags (u32)
    attr[5] = u64::from(flags) << 32;
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Whether an XDP program may be loaded with `BPF_F_XDP_HAS_FRAGS` (5.18;
/// older kernels refuse the unknown flag with EINVAL before verifying).
fn frags_supported() -> bool {
    load_tiny_xdp(XDP_HAS_FRAGS).is_ok()
}

/// Whether the kernel makes bpf_links for XDP (5.9). `BPF_LINK_CREATE`
/// with `BPF_XDP` and no program (fd -1): a kernel that knows the attach
/// type looks the program up and answers EBADF; an older one refuses the
/// attach type first, with EINVAL. Nothing is made either way.
fn xdp_link_supported() -> bool {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u64 = 37;
    let mut attr: Attr = [0; 16];
    // prog_fd (u32) = -1 | target_ifindex (u32) = 1
    attr[0] = u64::from(u32::MAX) | (1 << 32);
    // attach_type (u32) | flags (u32)
    attr[1] = BPF_XDP;
    match bpf(BPF_LINK_CREATE, &mut attr) {
        Ok(fd) => {
            // Cannot happen (no program); close what was made.
            // SAFETY: the kernel returned this fd.
            unsafe { libc::close(fd as i32) };
            true
        }
        Err(e) => e.raw_os_error() == Some(libc::EBADF),
    }
}

/// The MTU of `interface` in this process's network namespace
/// (`SIOCGIFMTU`: /sys/class/net may be another namespace's).
fn mtu(interface: &str) -> Option<u32> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // The request's type is c_ulong on glibc and c_int on musl (the image).
    #[allow(clippy::unnecessary_cast, reason = "a no-op on glibc, needed on musl")]
    let request = libc::SIOCGIFMTU as libc::Ioctl;
    // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu of `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &raw mut req) } != 0 {
        return None;
    }
    // SAFETY: on success the kernel wrote ifru_mtu.
    u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).ok()
}

/// What to tell the operator when a native attach of the single-buffer
/// program fails on an interface whose MTU is above what one buffer holds:
/// the kernel refuses it (veth: "MTU too large"), and multi-buffer XDP
/// needs Linux 5.18.
pub fn jumbo_hint(interface: &str) -> Option<String> {
    let f = get();
    if f.frags {
        return None;
    }
    let mtu = mtu(interface)?;
    // Without frags a driver takes XDP only when a frame fits one page with
    // XDP's headroom and the skb_shared_info (veth: MTU 3504 at most).
    (mtu > 1500).then(|| {
        format!(
            " - interface `{interface}` has MTU {mtu}, and kernel {} has no multi-buffer XDP (xdp.frags, Linux 5.18 or newer), so native XDP takes only frames that fit one page (on veth MTU 3504 at most): use xdp_mode = \"skb\" (generic XDP takes any MTU), lower the MTU, or upgrade to 5.18 or newer",
            f.release
        )
    })
}
