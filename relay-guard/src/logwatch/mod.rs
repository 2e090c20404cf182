//! Failed logins read from Postfix and Dovecot logs, as events for the ban
//! engine.
//!
//! [`spawn`] follows each [`Source`] (a log file, rotation-safe: `tail.rs`;
//! or the systemd journal: `journal.rs`) on its own thread, parses each line
//! (`parse.rs`) and sends one [`LogEvent::Failure`] per failed login and one
//! [`LogEvent::Unparsed`] per line it could not read. Dropping the returned
//! [`Watch`] stops the threads (within [`POLL`]); so does dropping the
//! receiver.
//!
//! A layer beside `policy` and `kernel`: it uses no other module of this
//! crate, and the agent wires it to `[[ban]]` sections.
pub mod journal;
pub mod parse;
pub mod tail;

use std::{
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, SystemTime},
};

pub use parse::{Origin, Outcome, Parser};
use tokio::sync::mpsc;

/// How often a follower looks at its source when no change was signalled,
/// and how soon it notices that it should stop.
pub const POLL: Duration = Duration::from_millis(250);

/// Where lines come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A log file, followed across rename and copytruncate rotation.
    File(PathBuf),
    /// The systemd journal (`journalctl -f -o json`).
    Journal,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Journal => f.write_str("the systemd journal"),
        }
    }
}

/// One failed login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// The client that failed (IPv4-mapped IPv6 given as IPv4).
    pub source: IpAddr,
    pub origin: Origin,
    /// `postfix/submission/smtpd`, `imap-login`, ...
    pub service: String,
    /// When the line was read (files) or logged (journal).
    pub at: SystemTime,
}

/// What the followers send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    Failure(AuthFailure),
    /// A line that looked like Postfix or Dovecot (or like no log line at
    /// all) but did not parse; `relay_guard_log_lines_unparsed_total`.
    Unparsed {
        source: Source,
    },
    /// A line with field-like text in a client-controlled element (a user
    /// name holding `rip=`, ...): `relay_guard_log_lines_suspicious_total`.
    /// Sent before the line's failures (charged to the real source) or its
    /// `Unparsed`.
    Suspicious {
        source: Source,
    },
    /// Whether the source is being read: a file open (false while missing
    /// or unreadable), `journalctl` running. Sent at start and on each
    /// change; `relay_guard_log_source_up`.
    SourceUp {
        source: Source,
        up: bool,
    },
}

/// Starting a follower failed.
#[derive(Debug, thiserror::Error)]
pub enum LogwatchError {
    #[error(
        "`journal = true` needs journalctl, which is not installed or not on PATH (Debian: apt-get install systemd)"
    )]
    NoJournalctl,
    #[error("failed to start a thread to follow {source_name}")]
    Thread {
        source_name: String,
        #[source]
        source: std::io::Error,
    },
}

/// The running followers; dropping it stops them.
#[derive(Debug)]
pub struct Watch {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Watch {
    /// Stops the followers and waits for their threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Follows every source, each on its own thread, sending events to `tx`.
/// Files are read from their current end (from the start for a file that
/// appears later); the journal from now on.
pub fn spawn(sources: Vec<Source>, tx: mpsc::Sender<LogEvent>) -> Result<Watch, LogwatchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut watch = Watch {
        stop: stop.clone(),
        threads: Vec::new(),
    };
    if sources.contains(&Source::Journal) {
        journal::check()?;
    }
    for source in sources {
        let (stop, tx) = (stop.clone(), tx.clone());
        let name = format!("logwatch {source}");
        let source_name = source.to_string();
        let thread = thread::Builder::new().name(name).spawn(move || {
            let sink = Sink { source, tx, stop };
            match sink.source.clone() {
                Source::File(path) => tail::follow(&path, &sink),
                Source::Journal => journal::follow(&sink),
            }
        });
        match thread {
            Ok(t) => watch.threads.push(t),
            Err(source) => return Err(LogwatchError::Thread { source_name, source }),
        }
    }
    Ok(watch)
}

/// Where a follower delivers its lines: parses them and sends the events.
pub(crate) struct Sink {
    pub(crate) source: Source,
    tx: mpsc::Sender<LogEvent>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    /// The follower should end: stopped, or nobody listens any more.
    pub(crate) fn done(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    /// Sends `up` for this source; false once nobody listens.
    pub(crate) fn up(&self, up: bool) -> bool {
        self.tx
            .blocking_send(LogEvent::SourceUp {
                source: self.source.clone(),
                up,
            })
            .is_ok()
    }

    /// Sends what `outcome` means; false once nobody listens.
    pub(crate) fn deliver(&self, outcome: Outcome, at: SystemTime) -> bool {
        let suspicious = match &outcome {
            Outcome::Failures(f) => f.suspicious,
            Outcome::Unparsed { suspicious } => *suspicious,
            Outcome::Ignored => false,
        };
        if suspicious
            && self
                .tx
                .blocking_send(LogEvent::Suspicious {
                    source: self.source.clone(),
                })
                .is_err()
        {
            return false;
        }
        match outcome {
            Outcome::Ignored => true,
            Outcome::Unparsed { .. } => self
                .tx
                .blocking_send(LogEvent::Unparsed {
                    source: self.source.clone(),
                })
                .is_ok(),
            Outcome::Failures(f) => {
                // At most parse::MAX_FAILURES_PER_LINE: the parser caps it.
                for _ in 0..f.count.min(parse::MAX_FAILURES_PER_LINE) {
                    let event = LogEvent::Failure(AuthFailure {
                        source: f.addr,
                        origin: f.origin,
                        service: f.service.clone(),
                        at,
                    });
                    if self.tx.blocking_send(event).is_err() {
                        return false;
                    }
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn spawn_follows_a_file_and_stops_when_dropped() {
        let dir = std::env::temp_dir().join(format!("relay-guard-logwatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        // Missing at start: waited for, then read from its start.
        let path = dir.join("mail.log");
        let (tx, mut rx) = mpsc::channel(16);
        let watch = spawn(vec![Source::File(path.clone())], tx).expect("spawn");
        std::thread::sleep(Duration::from_millis(100));
        let mut f = std::fs::File::create(&path).expect("create log");
        f.write_all(
            b"Dec  2 01:02:03 mx postfix/smtps/smtpd[7]: disconnect from unknown[192.0.2.1] ehlo=1 auth=0/2 commands=1/3\n\
              garbage\n\
              Dec  2 01:02:03 mx postfix/smtps/smtpd[7]: connect from unknown[192.0.2.1]\n",
        )
        .expect("write");
        let mut got = Vec::new();
        let mut ups = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (got.len() < 3 || ups.len() < 2) && std::time::Instant::now() < deadline {
            match rx.try_recv() {
                Ok(LogEvent::SourceUp { up, .. }) => ups.push(up),
                Ok(e) => got.push(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Missing at start (down), then open (up).
        assert_eq!(ups, [false, true]);
        let failure = |e: &LogEvent| match e {
            LogEvent::Failure(f) => Some((f.source, f.origin, f.service.clone())),
            _ => None,
        };
        let addr: IpAddr = "192.0.2.1".parse().expect("addr");
        let want = Some((addr, Origin::Postfix, "postfix/smtps/smtpd".to_owned()));
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(failure(&got[0]), want);
        assert_eq!(failure(&got[1]), want);
        assert_eq!(
            got[2],
            LogEvent::Unparsed {
                source: Source::File(path.clone())
            }
        );
        watch.stop();
        // Stopped: the sender is gone with the thread.
        assert!(rx.blocking_recv().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
