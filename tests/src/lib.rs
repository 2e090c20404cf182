//! Support for relay-guard's privileged tests: network-namespace labs joined
//! by veth, the real agent as a child process, TCP peers, and a privilege
//! gate; and the reference model of the XDP verdict (`model`), which the
//! differential and bypass tests compare the kernel with. Everything that is
//! created is removed in `Drop`, also on failure.
//!
//! Tests panic, never return `Result`, so failures keep their messages and
//! backtraces (aya's test/README.md).
pub mod agent;
pub mod daemon;
pub mod journal;
pub mod lab;
pub mod mail;
pub mod model;
pub mod net;
pub mod netns;
pub mod packet;
pub mod prober;
pub mod prometheus;
pub mod raw;
pub mod require;
pub mod smtp;
