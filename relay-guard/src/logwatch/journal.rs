//! Follows the systemd journal through a `journalctl` subprocess:
//!
//! ```text
//! journalctl --follow --output=json --since=now --quiet \
//!     --output-fields=MESSAGE,SYSLOG_IDENTIFIER,SYSLOG_PID,_PID,_COMM,... \
//!     _COMM=smtpd + SYSLOG_IDENTIFIER=dovecot + _COMM=postlogd
//! ```
//!
//! A subprocess rather than libsystemd bindings: nothing to link, the same
//! journal access rules as the operator's own `journalctl`, and the JSON
//! records carry the identifier, pid and message apart (no syslog framing to
//! guess). The matches select Postfix's smtpd processes (whatever their
//! `syslog_name`), Dovecot (whose login processes log through its log
//! process as `dovecot`), and Postfix's `postlogd` when `maillog_file =
//! /dev/stdout` sends whole log lines to the journal (containers): those
//! messages are read as log file lines. If `journalctl` exits, it is restarted from the
//! last record it printed (`--after-cursor`), after a second.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use super::{LogwatchError, POLL, Parser, Sink};

/// The program run.
pub const JOURNALCTL: &str = "journalctl";

/// Whether `journalctl` can be run.
pub fn check() -> Result<(), LogwatchError> {
    match Command::new(JOURNALCTL)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(_) => Err(LogwatchError::NoJournalctl),
    }
}

/// The arguments, after `journalctl`.
pub fn args(cursor: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--follow",
        "--output=json",
        "--quiet",
        "--no-pager",
        "--output-fields=MESSAGE,SYSLOG_IDENTIFIER,SYSLOG_PID,_PID,_COMM,__CURSOR,__REALTIME_TIMESTAMP",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    match cursor {
        Some(c) => args.push(format!("--after-cursor={c}")),
        None => args.push("--since=now".to_owned()),
    }
    args.extend(["_COMM=smtpd", "+", "SYSLOG_IDENTIFIER=dovecot", "+", "_COMM=postlogd"].map(str::to_owned));
    args
}

/// One journal record's fields this module reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// `_COMM`: `postlogd` when the message is a whole log line.
    pub comm: String,
    pub ident: String,
    pub pid: Option<u32>,
    pub message: String,
    pub cursor: Option<String>,
    /// `__REALTIME_TIMESTAMP`, microseconds since the epoch.
    pub realtime_us: Option<u64>,
}

/// Reads one line of `journalctl -o json`. `None`: not a JSON object.
pub fn record(line: &str) -> Option<Record> {
    let v: Value = serde_json::from_str(line).ok()?;
    let obj = v.as_object()?;
    let text = |key: &str| -> Option<String> {
        match obj.get(key)? {
            Value::String(s) => Some(s.clone()),
            // Non-UTF-8 fields come as arrays of bytes.
            Value::Array(bytes) => {
                let bytes: Vec<u8> = bytes.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect();
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            _ => None,
        }
    };
    Some(Record {
        comm: text("_COMM").unwrap_or_default(),
        ident: text("SYSLOG_IDENTIFIER").unwrap_or_default(),
        pid: text("SYSLOG_PID").or_else(|| text("_PID")).and_then(|p| p.parse().ok()),
        message: text("MESSAGE")?,
        cursor: text("__CURSOR"),
        realtime_us: text("__REALTIME_TIMESTAMP").and_then(|t| t.parse().ok()),
    })
}

fn start(cursor: Option<&str>) -> std::io::Result<(Child, mpsc::Receiver<String>)> {
    let mut child = Command::new(JOURNALCTL)
        .args(args(cursor))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("logwatch journalctl".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    Ok((child, rx))
}

/// Follows the journal until the sink is done.
pub(crate) fn follow(sink: &Sink) {
    let mut parser = Parser::new();
    let mut cursor: Option<String> = None;
    let mut logged_failure = false;
    while !sink.done() {
        let (mut child, lines) = match start(cursor.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                if !logged_failure {
                    tracing::error!(error = %e, "cannot run journalctl; journal failures are not counted until it runs");
                    logged_failure = true;
                }
                sleep_unless_done(sink, Duration::from_secs(1));
                continue;
            }
        };
        logged_failure = false;
        loop {
            match lines.recv_timeout(POLL) {
                Ok(line) => {
                    let outcome = match record(&line) {
                        Some(r) => {
                            if r.cursor.is_some() {
                                cursor.clone_from(&r.cursor);
                            }
                            let at = r
                                .realtime_us
                                .map_or_else(SystemTime::now, |us| UNIX_EPOCH + Duration::from_micros(us));
                            let outcome = if r.comm == "postlogd" {
                                parser.line(&r.message)
                            } else {
                                parser.record(&r.ident, r.pid, &r.message)
                            };
                            (outcome, at)
                        }
                        None => (super::Outcome::Unparsed, SystemTime::now()),
                    };
                    if !sink.deliver(outcome.0, outcome.1) {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if sink.done() {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    tracing::warn!("journalctl exited; restarting it");
                    break;
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        sleep_unless_done(sink, Duration::from_secs(1));
    }
}

fn sleep_unless_done(sink: &Sink, d: Duration) {
    let until = std::time::Instant::now() + d;
    while !sink.done() && std::time::Instant::now() < until {
        thread::sleep(POLL.min(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_journal_record() {
        let line = r#"{"__CURSOR":"s=abc;i=1","__REALTIME_TIMESTAMP":"1796173323000000","SYSLOG_IDENTIFIER":"postfix/submission/smtpd","SYSLOG_PID":"4242","_PID":"4242","MESSAGE":"warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: "}"#;
        let r = record(line).expect("record");
        assert_eq!(r.ident, "postfix/submission/smtpd");
        assert_eq!(r.pid, Some(4242));
        assert_eq!(r.cursor.as_deref(), Some("s=abc;i=1"));
        assert_eq!(r.realtime_us, Some(1_796_173_323_000_000));
        let mut p = Parser::new();
        assert!(matches!(p.record(&r.ident, r.pid, &r.message), super::super::Outcome::Failures(f) if f.count == 1));
    }

    #[test]
    fn reads_byte_array_messages_and_refuses_non_objects() {
        let line = r#"{"SYSLOG_IDENTIFIER":"dovecot","_PID":"7","MESSAGE":[105,109,97,112]}"#;
        assert_eq!(record(line).expect("record").message, "imap");
        assert_eq!(record("not json"), None);
        assert_eq!(record("[1,2]"), None);
        assert_eq!(record(r#"{"SYSLOG_IDENTIFIER":"x"}"#), None);
    }

    #[test]
    fn postlogd_records_are_whole_lines() {
        let line = r#"{"_COMM":"postlogd","SYSLOG_IDENTIFIER":"postfix","_PID":"9","MESSAGE":"Dec 02 01:19:46 mail postfix/smtps/smtpd[9282]: disconnect from unknown[198.51.100.20] ehlo=1 auth=0/1 quit=1 commands=2/3"}"#;
        let r = record(line).expect("record");
        assert_eq!(r.comm, "postlogd");
        let mut p = Parser::new();
        assert!(matches!(p.line(&r.message), super::super::Outcome::Failures(f) if f.count == 1));
    }

    #[test]
    fn follows_from_now_or_after_the_cursor() {
        assert!(args(None).contains(&"--since=now".to_owned()));
        let a = args(Some("s=1"));
        assert!(a.contains(&"--after-cursor=s=1".to_owned()));
        assert!(!a.contains(&"--since=now".to_owned()));
    }
}
