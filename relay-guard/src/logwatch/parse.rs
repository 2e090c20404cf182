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
//! Who is charged (SPEC.md "Who may aim a ban"): only the address the daemon
//! wrote for the connection, never text a client chose.
//! - Postfix: the `NAME[ADDR]` that opens the message. NAME is Postfix's
//!   validated client name (`unknown` or a host name of letters, digits, `-`,
//!   `_`, `.`), so the first `]` ends the address. Client text (HELO, MAIL
//!   FROM, the SASL method, `sasl_username=`) only ever comes after it.
//! - XCLIENT (Postfix): after a granted `XCLIENT ADDR=X`, smtpd logs the
//!   session's warnings and disconnect line as X's, a local client's choice.
//!   smtpd's `connect from NAME[ADDR]` line names the real peer; a warning or
//!   disconnect line of the same smtpd process (pid) with another address
//!   comes from a session that used XCLIENT, and charges nobody. A disconnect
//!   line with an `xclient=` counter whose connect line was not seen charges
//!   nobody either (Postfix 3.7 logs `xclient=0/1` for a granted XCLIENT as
//!   for a refused one). docs/operations.md "Testing for open relay".
//! - Dovecot: the message is `TEXT: ELEMENTS`, TEXT Dovecot's own and
//!   ELEMENTS its `login_log_format_elements` (default `user=<%u>
//!   method=%m rip=%r lip=%l mpid=%e %c session=<%{session}>`) joined by
//!   `, `. The mark `(auth failed, N attempts` is taken from TEXT only (before
//!   the first `: user=<`). The user name may hold anything printable (`>`,
//!   `, `, `=`, `rip=`), so ELEMENTS is read from its end: the last `, rip=`
//!   must be followed only by Dovecot's own elements (`lip=`, `mpid=`,
//!   `rport=`, `lport=`, `secured`, `TLS...`, `session=<...>`) and preceded by
//!   `user=<...>` and an optional `method=`. Anything else (a changed
//!   `login_log_format_elements`, a missing `rip=`) is [`Outcome::Unparsed`]
//!   and charges nobody.
//! - Field-like text (`=`, `, `, `<`, `>`, `[`, `]`) in a client-controlled
//!   element (Dovecot's user, Postfix's SASL method and `sasl_username`) marks
//!   the line suspicious ([`Failures::suspicious`], `Unparsed { suspicious }`):
//!   counted in `relay_guard_log_lines_suspicious_total`; the real source is
//!   still charged.
//! - One line adds at most [`MAX_FAILURES_PER_LINE`] failures.
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
    /// How many failed logins (1 to [`MAX_FAILURES_PER_LINE`]).
    pub count: u32,
    /// A client-controlled element of the line holds field-like text.
    pub suspicious: bool,
}

/// What one line means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Failures(Failures),
    /// Looks like a line this parser reads (or like no log line at all) but
    /// cannot be read unambiguously: charges nobody. `suspicious`: a
    /// client-controlled element holds field-like text.
    Unparsed {
        suspicious: bool,
    },
    /// Not about failed logins.
    Ignored,
}

impl Outcome {
    /// An unparsed line without field-like text.
    pub const UNPARSED: Outcome = Outcome::Unparsed { suspicious: false };
}

/// Most failed logins one line adds (M5 of the 2026-12-07 review: a count
/// of 4,294,967,295 must not stall a source for an hour). 20 is Postfix's
/// default `smtpd_hard_error_limit` (the most failed AUTHs one smtpd session
/// gets) and more than any sensible `failures`; Dovecot's login processes
/// disconnect long before.
pub const MAX_FAILURES_PER_LINE: u32 = 20;

/// How many smtpd (pid, client) pairs with counted warnings are remembered
/// until their disconnect line. Entries whose disconnect line never comes
/// (smtpd killed, lines lost) would otherwise pile up; past this bound the
/// oldest half is forgotten (their disconnect lines, if they come, may then
/// count a failure twice).
pub const MAX_PENDING: usize = 65_536;

/// Reads the lines of one source, in order. Keeps, per smtpd process and
/// client, the failures its warnings counted, so the disconnect line adds only
/// the rest; and per smtpd process, the peer its `connect from` line named.
#[derive(Debug, Default)]
pub struct Parser {
    /// (identifier, pid, client) → (failures warned and not yet settled by a
    /// disconnect line, sequence number for eviction).
    warned: HashMap<(String, u32, IpAddr), (u32, u64)>,
    /// pid → (identifier, the peer of its open session, sequence number):
    /// the peer from `connect from` until `disconnect from` (then `None`,
    /// kept for the process's next session). A pid is one process at a time
    /// and keeps its identifier. At most [`MAX_PENDING`].
    connected: HashMap<u32, (String, Option<IpAddr>, u64), foldhash::fast::RandomState>,
    seq: u64,
}

/// Forgets the older half of `map` (by sequence number) when it holds
/// [`MAX_PENDING`] entries.
fn bound<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(map: &mut HashMap<K, V, S>, seq: impl Fn(&V) -> u64) {
    if map.len() >= MAX_PENDING {
        let mut seqs: Vec<u64> = map.values().map(&seq).collect();
        seqs.sort_unstable();
        let cut = seqs[seqs.len() / 2];
        map.retain(|_, v| seq(v) >= cut);
    }
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
            None => Outcome::UNPARSED,
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
        if let Some(rest) = message.strip_prefix("connect from ") {
            if let Some((addr, _)) = client(rest) {
                bound(&mut self.connected, |&(_, _, s)| s);
                self.seq += 1;
                let seq = self.seq;
                match self.connected.entry(pid) {
                    // The same process's next session: no new allocation.
                    std::collections::hash_map::Entry::Occupied(mut e) if e.get().0 == ident => {
                        let v = e.get_mut();
                        (v.1, v.2) = (Some(addr), seq);
                    }
                    e => {
                        let _ = e.insert_entry((ident.to_owned(), Some(addr), seq));
                    }
                }
            }
            return Outcome::Ignored;
        }
        if let Some(rest) = message.strip_prefix("warning: ") {
            let Some((addr, after)) = client(rest) else {
                // Not a client's warning, or one whose client element does
                // not read.
                if rest.contains(": SASL ") && rest.contains(" authentication failed") {
                    return Outcome::UNPARSED;
                }
                return Outcome::Ignored;
            };
            let Some(after) = after.strip_prefix(": SASL ") else {
                return Outcome::Ignored;
            };
            // `METHOD authentication failed: REASON[, sasl_username=USER]`.
            // The method is the client's AUTH argument (no spaces: Postfix
            // splits commands on them); the user name comes last.
            let Some((method, reason)) = after.split_once(' ') else {
                return Outcome::UNPARSED;
            };
            if !reason.starts_with("authentication failed") {
                // `authentication aborted` and the like: no guess.
                return Outcome::Ignored;
            }
            let (reason, user) = match find(reason, ", sasl_username=") {
                Some(at) => (&reason[..at], Some(&reason[at + ", sasl_username=".len()..])),
                None => (reason, None),
            };
            let suspicious = method.is_empty() || !method.bytes().all(is_mech_char) || user.is_some_and(field_like);
            if method.is_empty() {
                return Outcome::Unparsed { suspicious };
            }
            if self.xclient(ident, pid, addr) == Some(true) {
                // A session that used XCLIENT: the address is a local
                // client's choice.
                return Outcome::Ignored;
            }
            // The AUTH command failed, so the disconnect line counts it: note
            // it either way. A failure of Postfix's own SASL back end is no
            // guess by the client and is not counted (L5: only the reason
            // before the client's user name is looked at).
            self.note_warning(ident, pid, addr);
            if find(reason, "Connection lost to authentication server").is_some() {
                return Outcome::Ignored;
            }
            return Outcome::Failures(Failures {
                addr,
                origin: Origin::Postfix,
                service: ident.to_owned(),
                count: 1,
                suspicious,
            });
        }
        if let Some(rest) = message.strip_prefix("disconnect from ") {
            let Some((addr, stats)) = client(rest) else {
                // `unknown[unknown]` (a client gone before Postfix knew it)
                // sent no AUTH: not ours unless the line says otherwise.
                if !rest.contains(" auth=") {
                    return Outcome::Ignored;
                }
                return Outcome::UNPARSED;
            };
            let mut auth = None;
            let mut xclient = false;
            // The counters are Postfix's own (`name=N` or `name=N/M`).
            for token in stats.split_ascii_whitespace() {
                if let Some(v) = token.strip_prefix("auth=") {
                    auth = counts(v);
                    if auth.is_none() {
                        self.settle(ident, pid, addr);
                        return Outcome::UNPARSED;
                    }
                } else if token.starts_with("xclient=") {
                    // Granted or refused: Postfix 3.7 logs both as 0/1.
                    xclient = true;
                }
            }
            let warned = self.settle(ident, pid, addr);
            let spoofed = self.xclient(ident, pid, addr);
            if let Some(v) = self.connected.get_mut(&pid) {
                v.1 = None;
            }
            let Some((ok, total)) = auth else {
                return Outcome::Ignored;
            };
            if spoofed.unwrap_or(xclient) {
                // The address is what a local client told smtpd through
                // XCLIENT (or, with no connect line seen, may be): nobody is
                // charged.
                return Outcome::Ignored;
            }
            let failed = total.saturating_sub(ok);
            let count = failed.saturating_sub(warned).min(MAX_FAILURES_PER_LINE);
            if count == 0 {
                return Outcome::Ignored;
            }
            return Outcome::Failures(Failures {
                addr,
                origin: Origin::Postfix,
                service: ident.to_owned(),
                count,
                suspicious: false,
            });
        }
        Outcome::Ignored
    }

    /// Whether the session of this smtpd process logs another address than
    /// its connect line named (`None`: no connect line seen).
    fn xclient(&self, ident: &str, pid: u32, addr: IpAddr) -> Option<bool> {
        if self.connected.is_empty() {
            return None;
        }
        self.connected
            .get(&pid)
            .filter(|(id, _, _)| id == ident)
            .and_then(|&(_, peer, _)| peer)
            .map(|peer| peer != addr)
    }

    fn note_warning(&mut self, ident: &str, pid: u32, addr: IpAddr) {
        bound(&mut self.warned, |&(_, s)| s);
        self.seq += 1;
        let seq = self.seq;
        let entry = self.warned.entry((ident.to_owned(), pid, addr)).or_insert((0, seq));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = seq;
    }

    /// Forgets and returns the warned failures of this smtpd and client.
    fn settle(&mut self, ident: &str, pid: u32, addr: IpAddr) -> u32 {
        if self.warned.is_empty() {
            return 0;
        }
        self.warned.remove(&(ident.to_owned(), pid, addr)).map_or(0, |(n, _)| n)
    }

    /// (identifier, pid, client) pairs waiting for their disconnect line.
    pub fn pending(&self) -> usize {
        self.warned.len()
    }

    /// smtpd processes whose session is open (a connect line, no disconnect
    /// line yet).
    pub fn sessions(&self) -> usize {
        self.connected.values().filter(|v| v.1.is_some()).count()
    }
}

/// `N` or `N/M` of a disconnect line's counters: (successes, total).
fn counts(value: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match value.split_once('/') {
        Some((ok, total)) if digits(ok) && digits(total) => {
            Some((ok.parse().unwrap_or(u32::MAX), total.parse().unwrap_or(u32::MAX)))
        }
        None if digits(value) => {
            let n = value.parse().unwrap_or(u32::MAX);
            Some((n, n))
        }
        _ => None,
    }
}

/// A SASL mechanism name's characters (RFC 4422: upper-case letters, digits,
/// `-`, `_`; Postfix logs what the client sent, so lower case too).
fn is_mech_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Text that looks like a log element: what a client writes into its user
/// name or similar to be read as another address.
fn field_like(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter()
        .enumerate()
        .any(|(i, &c)| matches!(c, b'=' | b'<' | b'>' | b'[' | b']') || (c == b',' && b.get(i + 1) == Some(&b' ')))
}

/// Where `needle` (not empty) first occurs in `hay`. The needles here start
/// with a byte that is rare in log lines (`,`, `:`, `(`), so a scan for it
/// with memchr and a compare beats building a substring searcher per call
/// (this runs on every line).
fn find(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    let mut from = 0;
    while let Some(p) = memchr::memchr(n[0], &h[from..]) {
        let at = from + p;
        if h[at..].starts_with(n) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Where `needle` (not empty) last occurs in `hay`.
fn rfind(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    let mut to = h.len();
    while let Some(at) = memchr::memrchr(n[0], &h[..to]) {
        if h[at..].starts_with(n) {
            return Some(at);
        }
        to = at;
    }
    None
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

/// A Dovecot login process's line: `TEXT: user=<USER>, method=M, rip=ADDR,
/// DOVECOT'S OWN ELEMENTS` (see the module docs).
fn dovecot_login(process: &str, message: &str) -> Outcome {
    const MARK: &str = "(auth failed, ";
    const USER: &str = ": user=<";
    // TEXT is Dovecot's own: the first `: user=<` ends it (the user element
    // comes after it, so nothing a client wrote can come before).
    let (text, elements) = match find(message, USER) {
        Some(at) => (&message[..at], Some(&message[at + USER.len()..])),
        None => (message, None),
    };
    let Some(at) = find(text, MARK) else {
        // Not a failed login; or its mark only in a client's user name.
        return Outcome::Ignored;
    };
    let after = &text[at + MARK.len()..];
    let Some(count) = after
        .split_once(' ')
        .filter(|(_, rest)| rest.starts_with("attempts"))
        .and_then(|(n, _)| n.parse::<u32>().ok())
    else {
        return Outcome::UNPARSED;
    };
    if count == 0 {
        return Outcome::Ignored;
    }
    let Some(elements) = elements else {
        return Outcome::UNPARSED;
    };
    match dovecot_rip(elements) {
        Ok((addr, suspicious)) => Outcome::Failures(Failures {
            addr,
            origin: Origin::Dovecot,
            service: process.to_owned(),
            count: count.min(MAX_FAILURES_PER_LINE),
            suspicious,
        }),
        Err(suspicious) => Outcome::Unparsed { suspicious },
    }
}

/// From `USER>, method=M, rip=ADDR, lip=..., session=<...>` (what follows
/// `user=<`): Dovecot's own `rip=` and whether the user name looks like
/// elements. `Err(suspicious)`: not readable unambiguously.
fn dovecot_rip(elements: &str) -> Result<(IpAddr, bool), bool> {
    const RIP: &str = ", rip=";
    // Everything after the real `rip=` is Dovecot's own, so the last one is
    // it: a `rip=` in the user name comes before.
    let Some(at) = rfind(elements, RIP) else {
        return Err(find(elements, "rip=").is_some());
    };
    let (head, tail) = (&elements[..at], &elements[at + RIP.len()..]);
    // The head: `USER>` or `USER>, method=MECH`.
    const METHOD: &str = ">, method=";
    let user = match rfind(head, METHOD).map(|at| (&head[..at], &head[at + METHOD.len()..])) {
        Some((user, mech)) if !mech.is_empty() && mech.bytes().all(is_mech_char) => user,
        _ => match head.strip_suffix('>') {
            Some(user) => user,
            None => return Err(field_like(head)),
        },
    };
    let suspicious = field_like(user);
    let (rip, mut rest) = match find(tail, ", ") {
        Some(at) => (&tail[..at], Some(&tail[at + 2..])),
        None => (tail, None),
    };
    let addr = parse_addr(rip).ok_or(suspicious)?;
    while let Some(r) = rest {
        let (part, next) = match find(r, ", ") {
            Some(at) => (&r[..at], Some(&r[at + 2..])),
            None => (r, None),
        };
        rest = next;
        let last = next.is_none();
        let own = match part.split_once('=') {
            // An address's characters (not parsed: it charges nobody).
            Some(("lip", v)) => !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':'),
            Some(("mpid" | "rport" | "lport", v)) => !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()),
            // Always Dovecot's last element: a `session=<` in a user name
            // would take the user element's closing `>`.
            Some(("session", v)) => {
                last && v
                    .strip_prefix('<')
                    .and_then(|v| v.strip_suffix('>'))
                    .is_some_and(|id| id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'))
            }
            Some(_) => false,
            None => part == "secured" || part.starts_with("TLS"),
        };
        if !own {
            return Err(suspicious);
        }
    }
    Ok((addr, suspicious))
}

/// `NAME[ADDR]` (optionally `:PORT`, with `smtpd_client_port_logging`) at
/// the start of `s`: the address and what follows. NAME must be what Postfix
/// writes there: `unknown` or a host name (letters, digits, `-`, `_`, `.`).
fn client(s: &str) -> Option<(IpAddr, &str)> {
    let open = s.find('[')?;
    let name = &s[..open];
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
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
