//! The long-running process (`relay-guard run`): its event loop, reload
//! planning (full, or a delta of the list files: `incremental`), watching the
//! config and list files (`watch`), and the Prometheus metrics (`metrics`).
//!
//! Owns the state that lives as long as the process. Reaches the kernel only
//! through `kernel`, and never prints: `commands` is the CLI boundary.
pub mod incremental;
pub mod metrics;
pub mod watch;
