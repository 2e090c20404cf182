//! The kernel side: everything that touches bpf maps, programs, links and
//! pins. Loading and attaching the XDP program (`loader`), typed handles on
//! its maps (`maps`), the pinned state under `pin_dir` and the agent lock
//! (`pins`), what a device and a pinned link are (`netdev`: Ethernet
//! framing, the device a link guards), writing a compiled policy into the
//! maps (`sync`), how big the sized maps are (`sizes`), reading counters (`counters`) and pinned maps
//! (`inspect`), and the program's blocked-source log records (`events`: created with the program's log
//! ring buffer by `loader`, so it lives here; the agent drains it), and what
//! the running kernel offers (`features`: probed, for 5.10 and newer), and
//! the OS error down an error's chain (`errno`).
//!
//! May use `policy` (what to write) and `config` (its types); never `agent`
//! or `commands`. Holds no long-running state of its own: the agent owns the
//! handles these functions return.
pub mod bans;
pub mod counters;
pub mod dispatcher;
pub mod errno;
pub mod events;
pub mod features;
pub mod inspect;
pub mod loader;
pub mod maps;
pub mod netdev;
pub mod pins;
pub mod shared;
pub mod sizes;
pub mod sync;
