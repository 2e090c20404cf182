//! relay-guard's agent as a library, in layers that import only downwards:
//! `commands` (the CLI boundary) → `agent` (the long-running process and its
//! event loop, reloads, metrics) → `kernel` (bpf maps, programs, links,
//! pins) → `policy` (pure compilation) → `config` (files in, validated);
//! `logwatch` (failed logins read from mail logs) sits beside `policy` and
//! `kernel` and uses neither; `relaytest` (the open-relay probe, an SMTP
//! client) sits beside `kernel`, below `agent`, and uses no other module;
//! `crowdsec` (CrowdSec's Local API: the decision stream, the mapping of
//! decisions to prefixes, the pusher) sits below `agent` and uses `config`
//! only.
//! See docs/architecture.md.
#![expect(
    clippy::result_large_err,
    reason = "errors carry aya's error values (verifier logs included); they happen at start-up and reload, never per packet"
)]
pub mod agent;
pub mod cli;
pub mod commands;
pub mod config;
pub mod crowdsec;
pub mod error;
pub mod kernel;
pub mod logwatch;
pub mod policy;
pub mod relaytest;

/// The XDP object built from `relay-guard-ebpf` by `build.rs`. Empty when
/// built with `AYA_BUILD_SKIP=1`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay-guard"));

/// libxdp's multi-program dispatcher (protocol version 2), built from
/// `relay-guard-ebpf/src/bin/xdp-dispatcher.rs` by `build.rs`. Empty when
/// built with `AYA_BUILD_SKIP=1`.
pub static DISPATCHER_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-dispatcher"));

/// The same dispatcher loaded with `BPF_F_XDP_HAS_FRAGS` (every component
/// supports frags).
pub static DISPATCHER_FRAGS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-dispatcher-frags"));

/// Name of the XDP program in [`EBPF_OBJECT`] (multi-buffer: `xdp.frags`).
pub const PROGRAM_NAME: &str = "relay_guard";

/// The same program without `xdp.frags`, loaded on kernels older than 5.18
/// (`kernel::features`).
pub const PROGRAM_NAME_SINGLE_BUFFER: &str = "relay_guard_sb";

/// Version reported by `relay_guard_build_info` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
