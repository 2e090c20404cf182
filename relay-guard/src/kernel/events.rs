//! Blocked-source events from the XDP program (aya-log records), logged
//! through `tracing`, bounded in total.
//!
//! The program emits at most one event per cache slot per CPU per second and,
//! whatever the number of sources, at most [`EVENTS_PER_SECOND`] per CPU
//! (a token bucket in `RG_EVENTS`, which also counts what it suppressed). With
//! several CPUs receiving one flood, the same source can arrive from each and
//! the CPUs together can send more than the spec's bound, so this logger:
//!
//! - drops repeats of the same text (source, port, guard) within a second;
//! - writes at most [`LINES_PER_SECOND`] blocked-source lines a second in
//!   total, whatever the number of distinct sources;
//! - once a second, when anything was held back (here or by the kernel's
//!   bucket), writes one line "N more blocked-source events suppressed in the
//!   last second" and adds N to `relay_guard_blocked_events_suppressed_total`.
//!
//! Only texts that were written are remembered, so the de-duplication set
//! holds at most two seconds' worth of lines (about 20 entries): no scan per
//! insert, no growth under a random-source flood.
use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use aya_log::EbpfLogger;
use prometheus_client::metrics::counter::Counter;
use relay_guard_common::{EVENTS_PER_SECOND, EventBudget};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{error, info, warn};

const INTERVAL: Duration = Duration::from_secs(1);
/// Blocked-source lines per second, all sources together (SPEC.md, "Failing
/// safe"): the kernel's per-CPU bucket allows this much per CPU.
pub const LINES_PER_SECOND: usize = EVENTS_PER_SECOND as usize;
/// Hard bound on remembered texts. Only written lines are remembered, at most
/// [`LINES_PER_SECOND`] a window, and a window's purge drops those older
/// than a second, so this is never reached; it only makes the bound obvious.
const MEMORY: usize = 4 * LINES_PER_SECOND;

/// What [`OncePerSecond::admit`] decided about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it.
    Log,
    /// The same text was written less than a second ago (another CPU's copy).
    Repeat,
    /// Over this second's line budget: counted, not written.
    Suppressed,
}

#[derive(Default)]
struct Window {
    /// Texts written recently, with when.
    seen: HashMap<String, Instant>,
    /// Lines written in this window.
    lines: usize,
    /// Events held back in this window.
    suppressed: u64,
}

/// The agent's side of the bound: de-duplication and a total line budget per
/// one-second window. Cheap to clone (shared state): one clone is the
/// aya-log sink, another ends the windows.
#[derive(Clone, Default)]
pub struct OncePerSecond {
    window: Arc<Mutex<Window>>,
    suppressed_total: Counter,
}

impl OncePerSecond {
    /// Decides about one event at `now`.
    pub fn admit(&self, text: &str, now: Instant) -> Admit {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if w.seen.get(text).is_some_and(|&t| now.duration_since(t) < INTERVAL) {
            return Admit::Repeat;
        }
        if w.lines >= LINES_PER_SECOND || w.seen.len() >= MEMORY {
            w.suppressed += 1;
            return Admit::Suppressed;
        }
        w.lines += 1;
        w.seen.insert(text.to_string(), now);
        Admit::Log
    }

    /// Ends the current window at `now`: forgets texts written more than a
    /// second ago and returns how many events were held back in it, the
    /// kernel's `kernel_suppressed` included (also added to the metric).
    pub fn end_window(&self, now: Instant, kernel_suppressed: u64) -> u64 {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        // At most MEMORY entries: this scan is bounded, and once a second.
        w.seen.retain(|_, t| now.duration_since(*t) < INTERVAL);
        let n = std::mem::take(&mut w.suppressed) + kernel_suppressed;
        w.lines = 0;
        drop(w);
        self.suppressed_total.inc_by(n);
        n
    }

    /// `relay_guard_blocked_events_suppressed_total`, for the registry.
    pub fn suppressed_total(&self) -> Counter {
        self.suppressed_total.clone()
    }
}

impl log::Log for OncePerSecond {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        if self.admit(&text, Instant::now()) == Admit::Log {
            tracing::info!(target: "relay_guard::blocked", "{text}");
        }
    }

    fn flush(&self) {}
}

/// The reader of the program's event ring buffer, its line budget, and the
/// kernel bucket's per-CPU suppressed counts.
pub struct BlockedLog {
    reader: EbpfLogger<OncePerSecond>,
    limiter: OncePerSecond,
    kernel: Option<PerCpuArray<MapData, EventBudget>>,
}

impl BlockedLog {
    /// Takes the program's `AYA_LOGS` ring buffer and (when the object has
    /// it) the `RG_EVENTS` bucket map out of `ebpf`.
    pub fn new(ebpf: &mut aya::Ebpf) -> Result<BlockedLog, aya_log::Error> {
        let limiter = OncePerSecond::default();
        let reader = EbpfLogger::init_with_logger(ebpf, limiter.clone())?;
        let kernel = ebpf
            .take_map(relay_guard_common::maps::EVENTS)
            .and_then(|m| PerCpuArray::try_from(m).ok());
        if kernel.is_none() {
            warn!("no kernel event bucket map; suppressed counts cover the agent only");
        }
        Ok(BlockedLog {
            reader,
            limiter,
            kernel,
        })
    }

    /// The suppressed-events counter, for the metrics registry.
    pub fn suppressed_total(&self) -> Counter {
        self.limiter.suppressed_total()
    }

    /// Counts what this reader suppresses into `total`, the counter the
    /// registry already serves: a program loaded by a resize has a reader
    /// of its own, and its counts go on in the same series.
    pub fn count_suppressed_in(&mut self, total: Counter) {
        self.limiter.suppressed_total = total;
    }

    /// Reads events until the ring buffer fails; never returns otherwise.
    ///
    /// Each wake-up drains the ring (at most its 128 KiB of records plus
    /// what arrives meanwhile, which the kernel's bucket keeps to a few a
    /// second) and then yields, so a flood cannot pin a runtime worker. A
    /// panic while decoding a record (aya-log unwraps) costs that record
    /// only: it is caught and logged, and reading goes on.
    pub async fn run(self) -> std::io::Result<()> {
        let BlockedLog {
            reader,
            limiter,
            kernel,
        } = self;
        let this_kernel = BlockedLog::kernel_reader(kernel);
        // SAFETY: the logger owns its ring-buffer fd and lives inside the
        // AsyncFd, so the fd stays open for as long as it is registered.
        let mut fd = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }?;
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Counts already in adopted pinned maps are not this run's.
        let mut kernel_before = this_kernel();
        loop {
            tokio::select! {
                ready = fd.readable_mut() => {
                    let mut guard = ready?;
                    let drained = std::panic::catch_unwind(AssertUnwindSafe(|| guard.get_inner_mut().flush()));
                    if drained.is_ok() {
                        guard.clear_ready();
                    } else {
                        // The bad record is consumed; the rest is read on the next turn.
                        error!("a blocked-source event could not be decoded and was skipped");
                    }
                }
                _ = tick.tick() => {
                    let kernel_now = this_kernel();
                    let kernel = match (kernel_before, kernel_now) {
                        (Some(b), Some(n)) => n.saturating_sub(b),
                        _ => 0,
                    };
                    kernel_before = kernel_now.or(kernel_before);
                    let n = limiter.end_window(Instant::now(), kernel);
                    if n > 0 {
                        info!(target: "relay_guard::blocked", suppressed = n, "{n} more blocked-source events suppressed in the last second");
                    }
                }
            }
            tokio::task::yield_now().await;
        }
    }

    fn kernel_reader(kernel: Option<PerCpuArray<MapData, EventBudget>>) -> impl Fn() -> Option<u64> {
        move || {
            let values = kernel.as_ref()?.get(&0, 0).ok()?;
            Some(values.iter().map(|b| b.suppressed).sum())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_distinct_sources_make_ten_lines_and_a_count() {
        let l = OncePerSecond::default();
        let t0 = Instant::now();
        let admitted = (0..1000)
            .filter(|i| l.admit(&format!("dropped 198.18.0.{i} -> port 25 (guard 0)"), t0) == Admit::Log)
            .count();
        assert_eq!(admitted, LINES_PER_SECOND);
        assert_eq!(l.end_window(t0 + INTERVAL, 7), 1000 - LINES_PER_SECOND as u64 + 7);
        assert_eq!(l.suppressed_total().get(), 1000 - LINES_PER_SECOND as u64 + 7);
        // A new window, a new budget; nothing held back, nothing to say.
        assert_eq!(
            l.admit("dropped 198.18.9.9 -> port 25 (guard 0)", t0 + INTERVAL),
            Admit::Log
        );
        assert_eq!(l.end_window(t0 + 2 * INTERVAL, 0), 0);
    }

    #[test]
    fn a_repeat_within_a_second_is_dropped_not_counted() {
        let l = OncePerSecond::default();
        let t0 = Instant::now();
        let text = "dropped 198.51.100.20 -> port 25 (guard 0)";
        assert_eq!(l.admit(text, t0), Admit::Log);
        assert_eq!(l.admit(text, t0 + Duration::from_millis(10)), Admit::Repeat);
        assert_eq!(l.end_window(t0 + Duration::from_millis(500), 0), 0);
        // A window ended, but the text is not a second old yet.
        assert_eq!(l.admit(text, t0 + Duration::from_millis(900)), Admit::Repeat);
        assert_eq!(l.admit(text, t0 + INTERVAL), Admit::Log);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let l = OncePerSecond::default();
        let t0 = Instant::now();
        for s in 0..100u32 {
            let now = t0 + Duration::from_millis(u64::from(s) * 100);
            for i in 0..1000 {
                let _ = l.admit(&format!("dropped 198.18.{s}.{i} -> port 25 (guard 0)"), now);
            }
            if s % 10 == 9 {
                let _ = l.end_window(now, 0);
            }
            let len = l.window.lock().expect("not poisoned").seen.len();
            assert!(len <= MEMORY, "{len} remembered texts");
        }
    }
}
