//! A continuous prober: from the client namespace it opens TCP connections
//! to a guarded port, over and over, from an allowed and a denied source, and
//! counts what happened. A restart or reload with a gap shows up as an
//! allowed connection that failed or a denied one that got through.
use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{net::connect_banner, netns::NetNs};

/// Shorter than the kernel's initial SYN retransmission timeout (1 s): an
/// allowed connection whose SYN was dropped even once fails the probe.
pub const ALLOWED_TIMEOUT: Duration = Duration::from_millis(800);
const DENIED_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, Default)]
pub struct Tally {
    pub allowed_ok: AtomicU64,
    pub allowed_failed: AtomicU64,
    pub denied_blocked: AtomicU64,
    pub denied_admitted: AtomicU64,
}

impl Tally {
    /// (allowed ok, allowed failed, denied blocked, denied admitted), as
    /// counted so far.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.allowed_ok.load(Ordering::Relaxed),
            self.allowed_failed.load(Ordering::Relaxed),
            self.denied_blocked.load(Ordering::Relaxed),
            self.denied_admitted.load(Ordering::Relaxed),
        )
    }
}

pub struct Prober {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub tally: Arc<Tally>,
    /// Failure descriptions (first few), for the assertion message.
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Prober {
    /// Starts one thread per source; each loops until `stop` (or 10,000 probes).
    pub fn start(client: &NetNs, allowed: IpAddr, denied: IpAddr, dst: IpAddr, port: u16) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (src, is_allowed) in [(allowed, true), (denied, false)] {
            let (stop, tally, errors, ns) = (
                Arc::clone(&stop),
                Arc::clone(&tally),
                Arc::clone(&errors),
                NetNs::borrow(client),
            );
            threads.push(std::thread::spawn(move || {
                for _ in 0..10_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let timeout = if is_allowed { ALLOWED_TIMEOUT } else { DENIED_TIMEOUT };
                    let r = connect_banner(&ns, src, dst, port, timeout);
                    match (is_allowed, r) {
                        (true, Ok(_)) => {
                            tally.allowed_ok.fetch_add(1, Ordering::Relaxed);
                        }
                        (true, Err(e)) => {
                            tally.allowed_failed.fetch_add(1, Ordering::Relaxed);
                            errors.lock().expect("not poisoned").push(format!("allowed {src}: {e}"));
                        }
                        (false, Ok(_)) => {
                            tally.denied_admitted.fetch_add(1, Ordering::Relaxed);
                            errors
                                .lock()
                                .expect("not poisoned")
                                .push(format!("denied {src} admitted"));
                        }
                        (false, Err(_)) => {
                            tally.denied_blocked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        Prober {
            stop,
            threads,
            tally,
            errors,
        }
    }

    /// Stops and joins the threads; returns the tally and the first errors.
    pub fn finish(mut self) -> (Arc<Tally>, Vec<String>) {
        self.halt();
        let errors = self
            .errors
            .lock()
            .expect("not poisoned")
            .iter()
            .take(20)
            .cloned()
            .collect();
        (Arc::clone(&self.tally), errors)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.halt();
    }
}
