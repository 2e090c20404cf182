//! Support for relay-guard's privileged tests: network-namespace labs joined
//! by veth, the real agent as a child process, its config file (`config`)
//! and its metrics (`lab::wait_metrics`), TCP peers, and a privilege gate;
//! the reference model of the XDP verdict (`model`), which the differential and bypass tests compare the kernel with; and, for the tests
//! of the deployment artefacts, readers of what they ship (`systemd_unit`,
//! `promql`, `yaml`), of what the agent does and exports (`strace`,
//! `exported`), and dpkg (`dpkg`), with their shared helpers (`deploy`).
//! Everything that is created is removed in `Drop`, also on failure.
//!
//! Tests panic, never return `Result`, so failures keep their messages and
//! backtraces (aya's test/README.md).
pub mod agent;
pub mod config;
pub mod container;
pub mod crowdsec;
pub mod daemon;
pub mod deploy;
pub mod dpkg;
pub mod exported;
pub mod journal;
pub mod lab;
pub mod mail;
pub mod model;
pub mod net;
pub mod netns;
pub mod packet;
pub mod prober;
pub mod prometheus;
pub mod promql;
pub mod raw;
pub mod require;
pub mod smtp;
pub mod strace;
pub mod systemd_unit;
pub mod yaml;

/// How many times longer than on the host the tests wait for a process to
/// start or end: 1 on the host; 8 in a guest of the kernel matrix (qemu
/// without hardware virtualisation runs CPU work about 7x and process start
/// about 13x slower), which `cargo xtask test` marks with
/// `RELAY_GUARD_GUEST_KERNEL`. Only start-up and exit waits are scaled:
/// verdicts, gaps and counts are asserted as they are.
pub fn slowdown() -> u32 {
    if std::env::var_os("RELAY_GUARD_GUEST_KERNEL").is_some() {
        8
    } else {
        1
    }
}
