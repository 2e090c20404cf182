//! Typed errors of the agent's subsystems. Messages are lowercase and name the
//! object; `main.rs` adds context with anyhow.
use std::path::PathBuf;

/// Loading the program or attaching it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this binary was built without its XDP program (AYA_BUILD_SKIP); rebuild with `cargo xtask build-ebpf`")]
    NoObject,
    #[error("failed to load the eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error("program `{name}` not found in the eBPF object")]
    NoProgram { name: &'static str },
    #[error("map `{name}` not found in the eBPF object")]
    NoMap { name: &'static str },
    #[error("map `{name}` has an unexpected type or layout")]
    MapType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map `{name}` has an unexpected layout: {what}")]
    MapLayout { name: &'static str, what: String },
    #[error(
        "kernel {release} lacks {feature}, which relay-guard needs: the first kernel with it is Linux {since} (relay-guard supports Linux 5.10 and newer)"
    )]
    Kernel {
        release: String,
        feature: &'static str,
        since: &'static str,
    },
    #[error(
        "kernel {release} refused program `{name}` before verifying it (no verifier log): it lacks a BPF feature relay-guard does not probe for; relay-guard supports Linux 5.10 and newer - report this with `uname -r` and the error below"
    )]
    Refused {
        name: &'static str,
        release: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the kernel rejected program `{name}` (verifier log follows)")]
    Verifier {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface `{interface}` does not exist")]
    NoInterface { interface: String },
    #[error(
        "interface `{interface}` has no Ethernet framing (device type {arphrd}, {kind}): the program reads an Ethernet header, so it cannot guard it; guard the Ethernet device the traffic arrives on"
    )]
    NotEthernet {
        interface: String,
        arphrd: u16,
        kind: &'static str,
    },
    #[error("failed to attach to `{interface}` in {mode} mode{hint}")]
    Attach {
        interface: String,
        mode: &'static str,
        hint: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot take over the link pinned at `{}` for `{interface}`: {why}; left in place (a filter it holds keeps guarding) - remove it by hand if it is not relay-guard's", pin.display())]
    Adopt {
        interface: String,
        pin: PathBuf,
        why: String,
    },
    #[error(
        "interface `{interface}` already runs XDP program `{name}` (id {id}), which is not a libxdp dispatcher ({why}); relay-guard never replaces a program it does not own: load `{name}` through libxdp (e.g. `xdp-loader load`) so both share the interface, or remove it (`ip link set dev {interface} xdp off`), then start relay-guard again"
    )]
    Foreign {
        interface: String,
        name: String,
        id: u32,
        why: String,
    },
    #[error("cannot share interface `{interface}` through the XDP dispatcher: {why}")]
    Share { interface: String, why: String },
    #[error("nothing is pinned at `{}` for this version: is the agent installed with this config's pin_dir, and has it run?", pin_dir.display())]
    NotPinned { pin_dir: PathBuf },
    #[error("pin_dir `{}` is not on a bpffs (mount one, or use a path under /sys/fs/bpf)", path.display())]
    NotBpffs { path: PathBuf },
    #[error("pin_dir `{}` refused: {why}", path.display())]
    BadPinDir { path: PathBuf, why: String },
    #[error("another relay-guard agent (pid {holder}) is running with pin_dir `{}` (or a detach is in progress); stop it first", pin_dir.display())]
    Locked { pin_dir: PathBuf, holder: String },
    #[error("pinned map `{name}` at `{}` does not match this build's layout", path.display())]
    PinnedMapMismatch { name: &'static str, path: PathBuf },
    #[error("failed to pin {what} at `{}`", path.display())]
    PinObject {
        what: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("failed to {op} `{}`", path.display())]
    Pin {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writing map contents.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("failed to {op} {what} in map `{map}`")]
    Map {
        op: &'static str,
        map: &'static str,
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the policy does not fit the kernel tables: {what}")]
    Capacity { what: String },
}
