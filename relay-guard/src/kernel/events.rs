//! Blocked-source events from the XDP program (aya-log records), logged
//! through `tracing` at most once a second per distinct message.
//!
//! The program rate-limits per CPU; with several CPUs receiving one flood,
//! the same source can arrive from each. This logger drops repeats of the
//! same text (source, port, guard) within a second, so the log carries each
//! blocked source at most once a second.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

const INTERVAL: Duration = Duration::from_secs(1);
/// Bound on remembered messages; older ones are forgotten first.
const MEMORY: usize = 65_536;

#[derive(Default)]
pub struct OncePerSecond {
    seen: Mutex<HashMap<String, Instant>>,
}

impl log::Log for OncePerSecond {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let now = Instant::now();
        {
            let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.get(&text).is_some_and(|&t| now.duration_since(t) < INTERVAL) {
                return;
            }
            if seen.len() >= MEMORY {
                seen.retain(|_, t| now.duration_since(*t) < INTERVAL);
            }
            seen.insert(text.clone(), now);
        }
        tracing::info!(target: "relay_guard::blocked", "{text}");
    }

    fn flush(&self) {}
}
