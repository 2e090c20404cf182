//! Follows the systemd journal through a `journalctl` subprocess:
//!
//! ```text
//! journalctl --follow --output=json --since=now --quiet \
//!     --output-fields=MESSAGE,SYSLOG_IDENTIFIER,_PID,_UID,_EXE,... \
//!     _EXE=/usr/lib/postfix/sbin/smtpd _EXE=/usr/lib/postfix/sbin/postlogd ...
//! ```
//!
//! A subprocess rather than libsystemd bindings: nothing to link, the same
//! journal access rules as the operator's own `journalctl`, and the JSON
//! records carry the identifier, pid and message apart (no syslog framing to
//! guess). If `journalctl` exits, it is restarted from the last record it
//! printed (`--after-cursor`), after a second.
//!
//! Whose records count (SPEC.md "Who may aim a ban"): a record is judged by
//! the fields journald itself sets from the sender's credentials, `_EXE`
//! (`/proc/PID/exe`) and `_UID`, never by `SYSLOG_IDENTIFIER` or `_COMM`,
//! which any local process chooses (`logger -t dovecot`, a copy of `logger`
//! named `smtpd`). The senders trusted ([`trusted`]):
//! - Postfix's `smtpd` in a Postfix daemon directory ([`POSTFIX_DIRS`]),
//!   running as the `postfix` user (`mail_owner`): its messages.
//! - Postfix's `postlogd` there, running as root: when `maillog_file =
//!   /dev/stdout` sends whole log lines to the journal (containers), its
//!   messages are read as log file lines.
//! - Dovecot's `log` process in a Dovecot directory ([`DOVECOT_DIRS`]), and
//!   the `dovecot` master, running as root: the login processes' lines go to
//!   syslog through the log process (identifier `dovecot`, message
//!   `imap-login: ...`).
//!
//! An unprivileged user can run none of these as those users, and cannot
//! name another program's executable. `_SYSTEMD_UNIT` is not required: the
//! test machines, containers and non-systemd hosts have none. The pid is
//! journald's `_PID`.
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

/// Where Postfix's daemons live: Debian and Ubuntu; Red Hat, Fedora, SUSE,
/// Alpine, Arch.
pub const POSTFIX_DIRS: &[&str] = &["/usr/lib/postfix/sbin", "/usr/libexec/postfix"];
/// Where Dovecot's helper processes live (its `log` process among them).
pub const DOVECOT_DIRS: &[&str] = &["/usr/lib/dovecot", "/usr/libexec/dovecot"];
/// Dovecot's master.
pub const DOVECOT_MASTERS: &[&str] = &["/usr/sbin/dovecot", "/usr/bin/dovecot"];
/// The user Postfix's smtpd runs as (`mail_owner`).
pub const POSTFIX_USER: &str = "postfix";

/// Every executable whose records are read: the `_EXE=` matches.
pub fn trusted_exes() -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for d in POSTFIX_DIRS {
        v.push(format!("{d}/smtpd"));
        v.push(format!("{d}/postlogd"));
    }
    for d in DOVECOT_DIRS {
        v.push(format!("{d}/log"));
    }
    v.extend(DOVECOT_MASTERS.iter().map(|s| (*s).to_owned()));
    v
}

/// How a trusted record is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Postfix's smtpd: identifier, pid and message.
    Smtpd,
    /// Postfix's postlogd: the message is a whole log file line.
    Postlogd,
    /// Dovecot (its log process or master): identifier and message.
    Dovecot,
}

/// Whose record this is, by `_EXE` and `_UID`; `None`: not one of the mail
/// daemons (whatever its identifier or `_COMM` claim), not counted.
/// `postfix_uid`: the uid of [`POSTFIX_USER`] (`None` when there is no such
/// user: no smtpd record is trusted).
pub fn trusted(r: &Record, postfix_uid: Option<u32>) -> Option<Sender> {
    let uid = r.uid?;
    let (dir, name) = r.exe.rsplit_once('/')?;
    if POSTFIX_DIRS.contains(&dir) {
        return match name {
            "smtpd" if Some(uid) == postfix_uid => Some(Sender::Smtpd),
            "postlogd" if uid == 0 => Some(Sender::Postlogd),
            _ => None,
        };
    }
    if uid == 0 && ((DOVECOT_DIRS.contains(&dir) && name == "log") || DOVECOT_MASTERS.contains(&r.exe.as_str())) {
        return Some(Sender::Dovecot);
    }
    None
}

/// The arguments, after `journalctl`.
pub fn args(cursor: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--follow",
        "--output=json",
        "--quiet",
        "--no-pager",
        "--output-fields=MESSAGE,SYSLOG_IDENTIFIER,_PID,_UID,_EXE,_SYSTEMD_UNIT,__CURSOR,__REALTIME_TIMESTAMP",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    match cursor {
        Some(c) => args.push(format!("--after-cursor={c}")),
        None => args.push("--since=now".to_owned()),
    }
    // Matches of one field are ORed.
    args.extend(trusted_exes().into_iter().map(|e| format!("_EXE={e}")));
    args
}

/// One journal record's fields this module reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// `_EXE`, set by journald: the sender's executable.
    pub exe: String,
    /// `_UID`, set by journald: the sender's user.
    pub uid: Option<u32>,
    /// `SYSLOG_IDENTIFIER` (the sender's choice: read only once the sender is
    /// trusted).
    pub ident: String,
    /// `_PID`, set by journald.
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
        exe: text("_EXE").unwrap_or_default(),
        uid: text("_UID").and_then(|u| u.parse().ok()),
        ident: text("SYSLOG_IDENTIFIER").unwrap_or_default(),
        pid: text("_PID").and_then(|p| p.parse().ok()),
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
    // Bounded: while the follower waits on the agent (a flood), journalctl
    // waits on its pipe, not on a queue growing in memory.
    let (tx, rx) = mpsc::sync_channel(QUEUE);
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

/// Lines of `journalctl` output queued between its reader and the follower.
pub const QUEUE: usize = 1024;

/// Follows the journal until the sink is done.
pub(crate) fn follow(sink: &Sink) {
    let mut parser = Parser::new();
    let mut cursor: Option<String> = None;
    let mut logged_failure = false;
    let postfix_uid = nix::unistd::User::from_name(POSTFIX_USER)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw());
    if postfix_uid.is_none() {
        tracing::warn!(
            user = POSTFIX_USER,
            "no such user: Postfix smtpd records in the journal are not counted"
        );
    }
    let mut up: Option<bool> = None;
    while !sink.done() {
        let (mut child, lines) = match start(cursor.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                if !logged_failure {
                    tracing::error!(error = %e, "cannot run journalctl; journal failures are not counted until it runs");
                    logged_failure = true;
                }
                if up != Some(false) && !sink.up(false) {
                    return;
                }
                up = Some(false);
                sleep_unless_done(sink, Duration::from_secs(1));
                continue;
            }
        };
        logged_failure = false;
        if up != Some(true) && !sink.up(true) {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        up = Some(true);
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
                            let outcome = match trusted(&r, postfix_uid) {
                                Some(Sender::Postlogd) => parser.line(&r.message),
                                Some(Sender::Smtpd | Sender::Dovecot) => parser.record(&r.ident, r.pid, &r.message),
                                None => super::Outcome::Ignored,
                            };
                            (outcome, at)
                        }
                        None => (super::Outcome::UNPARSED, SystemTime::now()),
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
                    if !sink.up(false) {
                        break;
                    }
                    up = Some(false);
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
        let line = r#"{"__CURSOR":"s=abc;i=1","__REALTIME_TIMESTAMP":"1796173323000000","SYSLOG_IDENTIFIER":"postfix/submission/smtpd","SYSLOG_PID":"1","_PID":"4242","_UID":"102","_EXE":"/usr/lib/postfix/sbin/smtpd","MESSAGE":"warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: "}"#;
        let r = record(line).expect("record");
        assert_eq!(r.ident, "postfix/submission/smtpd");
        assert_eq!(r.pid, Some(4242), "journald's _PID, not the sender's SYSLOG_PID");
        assert_eq!(trusted(&r, Some(102)), Some(Sender::Smtpd));
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
    fn only_the_mail_daemons_own_records_are_trusted() {
        let rec = |exe: &str, uid: u32, ident: &str| Record {
            exe: exe.to_owned(),
            uid: Some(uid),
            ident: ident.to_owned(),
            ..Record::default()
        };
        let pf = Some(102);
        // The daemons.
        assert_eq!(
            trusted(&rec("/usr/lib/postfix/sbin/smtpd", 102, "postfix/smtpd"), pf),
            Some(Sender::Smtpd)
        );
        assert_eq!(
            trusted(&rec("/usr/libexec/postfix/smtpd", 102, "x"), pf),
            Some(Sender::Smtpd)
        );
        assert_eq!(
            trusted(&rec("/usr/lib/postfix/sbin/postlogd", 0, "postfix"), pf),
            Some(Sender::Postlogd)
        );
        assert_eq!(
            trusted(&rec("/usr/lib/dovecot/log", 0, "dovecot"), pf),
            Some(Sender::Dovecot)
        );
        assert_eq!(
            trusted(&rec("/usr/sbin/dovecot", 0, "dovecot"), pf),
            Some(Sender::Dovecot)
        );
        // `logger -t dovecot`, as root or not; a copy of logger named smtpd;
        // smtpd run by another user; Dovecot's log run by a user.
        for r in [
            rec("/usr/bin/logger", 1000, "dovecot"),
            rec("/usr/bin/logger", 0, "postfix/smtpd"),
            rec("/tmp/smtpd", 1000, "postfix/smtpd"),
            rec("/tmp/postfix/sbin/smtpd", 102, "postfix/smtpd"),
            rec("/usr/lib/postfix/sbin/smtpd", 1000, "postfix/smtpd"),
            rec("/usr/lib/postfix/sbin/smtpd", 0, "postfix/smtpd"),
            rec("/usr/lib/postfix/sbin/postlogd", 1000, "postfix"),
            rec("/usr/lib/postfix/sbin/qmgr", 102, "postfix/qmgr"),
            rec("/usr/lib/dovecot/log", 1000, "dovecot"),
            rec("/usr/lib/dovecot/imap-login", 0, "dovecot"),
            rec("", 0, "dovecot"),
        ] {
            assert_eq!(trusted(&r, pf), None, "{r:?}");
        }
        // No _UID: not trusted. No postfix user: no smtpd trusted.
        let mut no_uid = rec("/usr/lib/postfix/sbin/smtpd", 102, "postfix/smtpd");
        no_uid.uid = None;
        assert_eq!(trusted(&no_uid, pf), None);
        assert_eq!(
            trusted(&rec("/usr/lib/postfix/sbin/smtpd", 102, "postfix/smtpd"), None),
            None
        );
        // The matches name the executables, never an identifier or _COMM.
        let a = args(None);
        assert!(a.contains(&"_EXE=/usr/lib/postfix/sbin/smtpd".to_owned()), "{a:?}");
        assert!(
            !a.iter()
                .any(|x| x.starts_with("_COMM=") || x.starts_with("SYSLOG_IDENTIFIER=")),
            "{a:?}"
        );
    }

    #[test]
    fn postlogd_records_are_whole_lines() {
        let line = r#"{"_EXE":"/usr/lib/postfix/sbin/postlogd","_UID":"0","SYSLOG_IDENTIFIER":"postfix","_PID":"9","MESSAGE":"Dec 02 01:19:46 mail postfix/smtps/smtpd[9282]: disconnect from unknown[198.51.100.20] ehlo=1 auth=0/1 quit=1 commands=2/3"}"#;
        let r = record(line).expect("record");
        assert_eq!(trusted(&r, Some(102)), Some(Sender::Postlogd));
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
