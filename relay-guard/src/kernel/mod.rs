//! The kernel side: everything that touches bpf maps, programs, links and
//! pins. Loading and attaching the XDP program (`loader`), the pinned state
//! under `pin_dir` and the agent lock (`pins`), writing a compiled policy
//! into the maps (`sync`), reading counters (`counters`) and pinned maps
//! (`inspect`), and the program's blocked-source log records (`events`).
//!
//! May use `policy` (what to write) and `config` (its types); never `agent`
//! or `commands`. Holds no long-running state of its own: the agent owns the
//! handles these functions return.
pub mod counters;
pub mod events;
pub mod inspect;
pub mod loader;
pub mod pins;
pub mod sync;
