//! Failed logins out of Postfix and Dovecot log lines. Pure: no I/O, no clock.
//!
//! A [`Parser`] reads one source's lines in order and says, per line, how many
//! failed logins it adds for which client address ([`Outcome::Failures`]),
//! that it looked like a line it reads but did not parse
//! ([`Outcome::Unparsed`]), or that it is not about failed logins
//! ([`Outcome::Ignored`]).
//!
//! Lines read:
//! - Postfix smtpd (any syslog name ending in `/smtpd`: `postfix/smtpd`,
//!   `postfix/submission/smtpd`, `postfix-out/smtpd`, ...):
//!   `warning: NAME[ADDR]: SASL METHOD authentication failed: ...` and
//!   `disconnect from NAME[ADDR] ... auth=S/T ...` (T attempts, S successes).
//! - Dovecot login processes (`imap-login`, `pop3-login`,
//!   `submission-login`, any `*-login`): `... (auth failed, N attempts ...):
//!   ..., rip=ADDR, ...`, whatever words come before the parenthesis
//!   (`Disconnected`, `Disconnected: Connection closed`, `Aborted login`,
//!   `Login aborted: ...`).
//!
//! One failed login counts once. Postfix logs a failed AUTH twice: a warning
//! when it happens and `auth=0/1` in the disconnect line. Warnings count as
//! they come; the disconnect line of the same smtpd process (pid) and client
//! adds only the failures that its warnings did not already count (after
//! STARTTLS on 587 the warning can be missing: then the disconnect line is the
//! only trace). Dovecot's `auth:` worker lines (`passwd-file(user,ADDR):
//! Password mismatch`) repeat what Postfix or a login process already logs
//! and are never counted.
//!
//! Framings read: classic syslog (`Dec  2 01:02:03 host ident[pid]: msg`),
//! Postfix's own `maillog_file` (`Dec 02 01:02:03 host ident[pid]: msg`),
//! ISO timestamps (`2026-12-02T01:02:03.123456+00:00 host ident[pid]: msg`),
//! RFC 5424 (`<13>1 2026-12-02T01:02:03Z host ident pid - - msg`), Dovecot's
//! own `log_path` file (`Dec 02 01:02:03 imap-login: Info: msg`), and journal
//! records (identifier, pid and message given apart: [`Parser::record`]).
//! The timestamp is skipped: the caller knows when it read the line.
use std::{collections::HashMap, net::IpAddr};

/// Which program logged the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    Postfix,
    Dovecot,
}

impl Origin {
    /// The `source` label of `relay_guard_auth_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Postfix => "postfix",
            Origin::Dovecot => "dovecot",
        }
    }
}

/// Failed logins one line adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failures {
    /// The client, IPv4-mapped IPv6 addresses given as IPv4.
    pub addr: IpAddr,
    pub origin: Origin,
    /// The syslog identifier (`postfix/submission/smtpd`) or Dovecot login
    /// process (`imap-login`).
    pub service: String,
    /// How many failed logins (at least 1).
    pub count: u32,
}

/// What one line means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Failures(Failures),
    /// Looks like a line this parser reads (or like no log line at all) but
    /// does not parse.
    Unparsed,
    /// Not about failed logins.
    Ignored,
}

/// How many smtpd (pid, client) pairs with counted warnings are remembered
/// until their disconnect line. Entries whose disconnect line never comes
/// (smtpd killed, lines lost) would otherwise pile up; past this bound the
/// oldest half is forgotten (their disconnect lines, if they come, may then
/// count a failure twice).
pub const MAX_PENDING: usize = 65_536;

/// Reads the lines of one source, in order. Keeps, per smtpd process and
/// client, the failures its warnings counted, so the disconnect line adds only
/// the rest.
#[derive(Debug, Default)]
pub struct Parser {
    /// (identifier, pid, client) → (failures warned and not yet settled by a
    /// disconnect line, sequence number for eviction).
    warned: HashMap<(String, u32, IpAddr), (u32, u64)>,
    seq: u64,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// One log file line (without its newline).
    pub fn line(&mut self, line: &str) -> Outcome {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return Outcome::Ignored;
        }
        match split_header(line) {
            Some((ident, pid, message)) => self.record(ident, pid, message),
            None => Outcome::Unparsed,
        }
    }

    /// One record whose identifier (`SYSLOG_IDENTIFIER`), pid (`SYSLOG_PID`
    /// or `_PID`) and message (`MESSAGE`) come apart, as the journal gives
    /// them.
    pub fn record(&mut self, ident: &str, pid: Option<u32>, message: &str) -> Outcome {
        if ident == "smtpd" || ident.ends_with("/smtpd") {
            return self.postfix(ident, pid.unwrap_or(0), message);
        }
        // Syslog and journal: identifier `dovecot`, message `imap-login: ...`.
        // Dovecot's own log file: tag `imap-login:`, message `Info: ...`.
        let (process, rest) = if ident == "dovecot" {
            match message.split_once(": ") {
                Some((process, rest)) => (process, rest),
                None => return Outcome::Ignored,
            }
        } else {
            (ident, message)
        };
        if process.ends_with("-login") && !process.contains(' ') {
            return dovecot_login(process, strip_level(rest));
        }
        Outcome::Ignored
    }

    fn postfix(&mut self, ident: &str, pid: u32, message: &str) -> Outcome {
        if let Some(rest) = message.strip_prefix("warning: ") {
            if !(rest.contains("SASL ") && rest.contains(" authentication failed")) {
                return Outcome::Ignored;
            }
            let Some((addr, after)) = client(rest) else {
                return Outcome::Unparsed;
            };
            let Some(after) = after.strip_prefix(": SASL ") else {
                return Outcome::Unparsed;
            };
            let Some((method, reason)) = after.split_once(' ') else {
                return Outcome::Unparsed;
            };
            if method.is_empty() || !reason.starts_with("authentication failed") {
                return Outcome::Unparsed;
            }
            // The AUTH command failed, so the disconnect line counts it: note
            // it either way. A failure of Postfix's own SASL back end is no
            // guess by the client and is not counted.
            self.note_warning(ident, pid, addr);
            if reason.contains("Connection lost to authentication server") {
                return Outcome::Ignored;
            }
            return Outcome::Failures(Failures {
                addr,
                origin: Origin::Postfix,
                service: ident.to_owned(),
                count: 1,
            });
        }
        if let Some(rest) = message.strip_prefix("disconnect from ") {
            let Some((addr, stats)) = client(rest) else {
                // `unknown[unknown]` (a client gone before Postfix knew it)
                // sent no AUTH: not ours unless the line says otherwise.
                if !rest.contains(" auth=") {
                    return Outcome::Ignored;
                }
                return Outcome::Unparsed;
            };
            let Some(auth) = stats.split_ascii_whitespace().find_map(|t| t.strip_prefix("auth=")) else {
                self.settle(ident, pid, addr);
                return Outcome::Ignored;
            };
            let (ok, total) = match auth.split_once('/') {
                Some((ok, total)) => (ok.parse::<u32>(), total.parse::<u32>()),
                None => (auth.parse::<u32>(), auth.parse::<u32>()),
            };
            let (Ok(ok), Ok(total)) = (ok, total) else {
                self.settle(ident, pid, addr);
                return Outcome::Unparsed;
            };
            let failed = total.saturating_sub(ok);
            let count = failed.saturating_sub(self.settle(ident, pid, addr));
            if count == 0 {
                return Outcome::Ignored;
            }
            return Outcome::Failures(Failures {
                addr,
                origin: Origin::Postfix,
                service: ident.to_owned(),
                count,
            });
        }
        Outcome::Ignored
    }

    fn note_warning(&mut self, ident: &str, pid: u32, addr: IpAddr) {
        if self.warned.len() >= MAX_PENDING {
            let mut seqs: Vec<u64> = self.warned.values().map(|&(_, s)| s).collect();
            seqs.sort_unstable();
            let cut = seqs[seqs.len() / 2];
            self.warned.retain(|_, &mut (_, s)| s >= cut);
        }
        self.seq += 1;
        let seq = self.seq;
        let entry = self.warned.entry((ident.to_owned(), pid, addr)).or_insert((0, seq));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = seq;
    }

    /// Forgets and returns the warned failures of this smtpd and client.
    fn settle(&mut self, ident: &str, pid: u32, addr: IpAddr) -> u32 {
        self.warned.remove(&(ident.to_owned(), pid, addr)).map_or(0, |(n, _)| n)
    }

    /// (identifier, pid, client) pairs waiting for their disconnect line.
    pub fn pending(&self) -> usize {
        self.warned.len()
    }
}

/// `Info: ` and the like, which Dovecot's own log file puts before messages.
fn strip_level(message: &str) -> &str {
    for level in ["Info: ", "Warning: ", "Error: ", "Debug: "] {
        if let Some(rest) = message.strip_prefix(level) {
            return rest;
        }
    }
    message
}

fn dovecot_login(process: &str, message: &str) -> Outcome {
    const MARK: &str = "(auth failed, ";
    let Some(at) = message.find(MARK) else {
        return Outcome::Ignored;
    };
    let after = &message[at + MARK.len()..];
    let Some(count) = after
        .split_once(' ')
        .filter(|(_, rest)| rest.starts_with("attempts"))
        .and_then(|(n, _)| n.parse::<u32>().ok())
    else {
        return Outcome::Unparsed;
    };
    let Some(addr) = message
        .split([',', ' '])
        .find_map(|field| field.strip_prefix("rip="))
        .and_then(parse_addr)
    else {
        return Outcome::Unparsed;
    };
    if count == 0 {
        return Outcome::Ignored;
    }
    Outcome::Failures(Failures {
        addr,
        origin: Origin::Dovecot,
        service: process.to_owned(),
        count,
    })
}

/// `NAME[ADDR]` (optionally `:PORT`, with `smtpd_client_port_logging`) at
/// the start of `s`: the address and what follows.
fn client(s: &str) -> Option<(IpAddr, &str)> {
    let open = s.find('[')?;
    if s[..open].contains(' ') {
        return None;
    }
    let close = open + s[open..].find(']')?;
    let addr = parse_addr(&s[open + 1..close])?;
    let mut rest = &s[close + 1..];
    if let Some(port) = rest.strip_prefix(':') {
        let digits = port.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            rest = &port[digits..];
        }
    }
    Some((addr, rest))
}

/// An address as Postfix and Dovecot write it; IPv4-mapped IPv6 becomes IPv4.
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.strip_prefix("IPv6:").unwrap_or(s);
    let s = s.split('%').next().unwrap_or(s);
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Splits a syslog-framed line into (identifier, pid, message), skipping the
/// timestamp and host. `None`: no framing this parser knows.
fn split_header(line: &str) -> Option<(&str, Option<u32>, &str)> {
    let mut rest = line;
    // `<PRI>` (RFC 3164 on the wire, RFC 5424).
    if let Some(r) = rest.strip_prefix('<') {
        let close = r.find('>')?;
        if close == 0 || close > 3 || !r[..close].bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        rest = &r[close + 1..];
        if let Some(r5424) = rest.strip_prefix("1 ") {
            return split_5424(r5424);
        }
    }
    rest = skip_timestamp(rest)?;
    let rest = rest.trim_start_matches(' ');
    let (first, after) = rest.split_once(' ')?;
    let (tag, message) = if first.ends_with(':') {
        // No host: Dovecot's own log file.
        (first, after)
    } else {
        let (tag, message) = after.split_once(' ').unwrap_or((after, ""));
        (tag, message)
    };
    let tag = tag.strip_suffix(':')?;
    let (ident, pid) = split_tag(tag)?;
    Some((ident, pid, message))
}

/// `ident[pid]` or `ident`.
fn split_tag(tag: &str) -> Option<(&str, Option<u32>)> {
    if tag.is_empty() {
        return None;
    }
    match tag.strip_suffix(']').and_then(|t| t.split_once('[')) {
        Some((ident, pid)) => Some((ident, Some(pid.parse().ok()?))),
        None if tag.contains(['[', ']']) => None,
        None => Some((tag, None)),
    }
}

/// `TIMESTAMP HOST APP PROCID MSGID SD MSG` (after `<PRI>1 `).
fn split_5424(rest: &str) -> Option<(&str, Option<u32>, &str)> {
    let mut parts = rest.splitn(6, ' ');
    let _timestamp = parts.next()?;
    let _host = parts.next()?;
    let app = parts.next()?;
    let procid = parts.next()?;
    let _msgid = parts.next()?;
    let mut sd_msg = parts.next().unwrap_or("");
    if let Some(r) = sd_msg.strip_prefix("- ") {
        sd_msg = r;
    } else if sd_msg == "-" {
        sd_msg = "";
    } else if sd_msg.starts_with('[') {
        // Structured data: `[id k="v"]...`, values may hold escaped `]`.
        let bytes = sd_msg.as_bytes();
        let (mut i, mut in_quotes, mut depth) = (0, false, 0);
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_quotes => i += 1,
                b'"' => in_quotes = !in_quotes,
                b'[' if !in_quotes => depth += 1,
                b']' if !in_quotes => {
                    depth -= 1;
                    if depth == 0 && bytes.get(i + 1) != Some(&b'[') {
                        i += 1;
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        sd_msg = sd_msg.get(i..)?.trim_start_matches(' ');
    } else {
        return None;
    }
    // A UTF-8 byte order mark may open MSG.
    let msg = sd_msg.trim_start_matches('\u{feff}');
    if app == "-" {
        return None;
    }
    let pid = if procid == "-" { None } else { procid.parse().ok() };
    Some((app, pid, msg))
}

/// Skips `Mmm dd HH:MM:SS[.frac] ` or an ISO 8601 timestamp
/// (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM) `) and returns what follows.
fn skip_timestamp(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    if b.len() > 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' {
        let (_, rest) = line.split_once(' ')?;
        return Some(rest);
    }
    let month = line.get(..3)?;
    if !MONTHS.contains(&month) {
        return None;
    }
    let rest = line[3..].trim_start_matches(' ');
    let (day, rest) = rest.split_once(' ')?;
    if !matches!(day.parse::<u8>(), Ok(1..=31)) || day.starts_with('+') {
        return None;
    }
    let (time, rest) = rest.split_once(' ')?;
    let hms = time.split('.').next()?;
    let tb = hms.as_bytes();
    if tb.len() != 8 || tb[2] != b':' || tb[5] != b':' {
        return None;
    }
    // Some rsyslog templates put the year after the time.
    let rest = match rest.split_once(' ') {
        Some((year, after)) if year.len() == 4 && year.bytes().all(|c| c.is_ascii_digit()) => after,
        _ => rest,
    };
    Some(rest)
}

#[cfg(test)]
mod tests;
