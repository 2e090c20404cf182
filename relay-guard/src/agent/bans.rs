//! The agent's side of bans (SPEC.md "Bans"): failures from the log
//! followers into the engine, the engine's bans into the kernel, the ban
//! list saved in `state_dir` and restored at start, the CLI's bans taken in,
//! and the ban metrics.
//!
//! Persistence: `state_dir/bans.json` holds, one JSON object a line after a
//! header line (`{"version":2,"saved_unix_ms":...}`), every ban in force
//! (`"state":"in_force"`, with its wall-clock expiry and its own length)
//! and every ban that has ended but still counts for escalation
//! (`"state":"ended"`). Ended bans are history only: they are never put in
//! force again, whatever the clock says. `bans.cmd` holds the CLI's
//! `ban`/`unban` lines not yet taken in (one JSON object a line, appended
//! under an flock; the agent reads and truncates it under the same lock, so
//! no line is lost). The CLI writes the pinned maps itself (the ban holds at
//! once, agent or not) and appends its line; the agent takes the file in on
//! its next tick (and at start), so its engine and `bans.json` agree with
//! the maps, and it never lifts what the CLI put there.
//!
//! At start the agent reads `bans.json`, then `bans.cmd`, then the maps
//! themselves, and checks every entry as the CLI checks its input (known
//! section, the shortest prefix the kernel filter takes, `never`, a sane
//! length); a bad entry is dropped, logged and counted
//! (`relay_guard_ban_state_rejected_total{source}`), the others hold. A ban
//! in force is restored for no longer than it had left when it was saved
//! (so a wall clock behind at boot cannot lengthen it) nor than its own
//! length; when the maps were pinned, the kernel's own expiry decides (an
//! entry the kernel no longer holds was lifted or has expired). A pinned
//! ban the files do not know is kept, if it passes the same checks.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{Read as _, Seek as _, Write as _},
    net::IpAddr,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{
    config::{
        Config, RunGuard,
        ban::{Ban, MAX_DURATION},
        lists::ListIndex,
    },
    kernel::bans::{BanMaps, boot_expiry, boot_ns, is_full, wall_expiry, wall_now},
    policy::bans::{Allowed, BanEngine, BanRecord, BanRefused, FailureOrigin, NoAllowlist, Outcome},
};

/// The ban list in `state_dir`.
pub const STATE_FILE: &str = "bans.json";
/// The CLI's pending `ban`/`unban` lines in `state_dir`.
pub const COMMAND_FILE: &str = "bans.cmd";
/// Where a `bans.json` with refused entries is kept for inspection.
pub const BAD_FILE: &str = "bans.json.bad";
/// Most bytes of `bans.json` or `bans.cmd` read (a bigger file is refused
/// past that point, its first part kept).
const MAX_FILE_BYTES: u64 = 1 << 30;

/// One failed login for the engine: which `[[ban]]` section's logs it came
/// from, who failed, and where it was logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub ban: usize,
    pub source: IpAddr,
    pub origin: FailureOrigin,
    pub at: SystemTime,
}

/// One ban in force (`bans.json`, and a `bans.cmd` ban line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBan {
    /// The `[[ban]]` section's name.
    pub ban: String,
    #[serde(with = "crate::config::prefix_text")]
    pub prefix: IpNet,
    /// Wall-clock expiry, Unix milliseconds.
    pub expires_unix_ms: u64,
    /// Times this prefix was banned by this section (this ban included).
    pub times: u32,
    /// Failures that triggered it (0: manual).
    pub failures: u32,
    /// The ban's own length, milliseconds (absent in files of version 1:
    /// then the section's `max_ban_time` caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_ms: Option<u64>,
}

/// One ended ban (history for escalation only, never a ban again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEnded {
    pub ban: String,
    #[serde(with = "crate::config::prefix_text")]
    pub prefix: IpNet,
    /// When it ended (expired or lifted), Unix milliseconds.
    pub ended_unix_ms: u64,
    pub times: u32,
}

/// A line of `bans.json` after the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum StateLine {
    InForce(SavedBan),
    Ended(SavedEnded),
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    saved_unix_ms: u64,
}

/// Version of the `bans.json` layout written.
pub const STATE_VERSION: u32 = 2;

/// `bans.json` as read.
#[derive(Debug, Default)]
pub struct Saved {
    pub bans: Vec<SavedBan>,
    pub ended: Vec<SavedEnded>,
    /// When it was written (version 2), Unix ms.
    pub saved_unix_ms: Option<u64>,
    /// Version 1 (no ended records, no lengths).
    pub legacy: bool,
    /// Entries that could not be read: (where, why).
    pub rejected: Vec<String>,
}

/// One line of `bans.cmd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command {
    Ban(SavedBan),
    Unban {
        #[serde(with = "crate::config::prefix_text")]
        prefix: IpNet,
        /// `None`: every section.
        ban: Option<String>,
    },
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SavedBan {
    pub fn from_record(r: &BanRecord, sections: &[Ban]) -> SavedBan {
        SavedBan {
            ban: sections.get(r.section).map_or_else(String::new, |b| b.name.clone()),
            prefix: r.net,
            expires_unix_ms: ms(r.expires),
            times: r.times,
            failures: r.failures,
            length_ms: Some(ms(r.length)),
        }
    }

    /// The record to restore at wall time `wall`: its expiry capped so that
    /// it stays in force for no longer than it had left at `saved` (when
    /// known: a clock behind now cannot lengthen it), nor than its own
    /// length, nor (no length saved) than the section's `max_ban_time`.
    /// `Err`: the entry is refused (why).
    fn record(&self, sections: &[Ban], wall: Duration, saved: Option<Duration>) -> Result<BanRecord, String> {
        let section = sections
            .iter()
            .position(|b| b.name == self.ban)
            .ok_or_else(|| format!("no [[ban]] section named `{}`", self.ban))?;
        let expires = Duration::from_millis(self.expires_unix_ms);
        let length = match self.length_ms {
            Some(l) => {
                let l = Duration::from_millis(l);
                if l.is_zero() || l > MAX_DURATION {
                    return Err(format!("a length of {} ms is not between 1 ms and 10 years", ms(l)));
                }
                l
            }
            None => sections[section].max_ban_time,
        };
        let from = saved.map_or(wall, |s| s.max(wall));
        let left = expires.saturating_sub(from).min(length);
        Ok(BanRecord {
            section,
            net: self.prefix,
            expires: wall + left,
            times: self.times.max(1),
            failures: self.failures,
            length,
        })
    }
}

/// Why `state_dir` is not trusted, if it is not: it must be a directory
/// owned by root (or by this process's user) that neither group nor others
/// can write, the way sshd's StrictModes judges a home directory. A missing
/// one is fine (it is created 0700).
pub fn check_state_dir(dir: &Path) -> Result<(), String> {
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("state_dir {}: {e}", dir.display())),
    };
    if !meta.is_dir() {
        return Err(format!("state_dir {} is not a directory", dir.display()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "state_dir {} is owned by uid {}, not by root: refused (another user could plant or swap the ban files); chown root {}",
            dir.display(),
            meta.uid(),
            dir.display()
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(format!(
            "state_dir {} has mode {:04o}, writable by group or others: refused; chmod go-w {} (the systemd unit makes it 0700)",
            dir.display(),
            mode & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// Creates `dir` (0700) when missing, then checks it ([`check_state_dir`]).
pub fn ensure_state_dir(dir: &Path) -> Result<(), String> {
    check_state_dir(dir)?;
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create state_dir {}: {e}", dir.display()))?;
    }
    check_state_dir(dir)
}

/// Opens `path` for reading without following a symlink; `Ok(None)`: it
/// does not exist.
fn open_nofollow(path: &Path) -> std::io::Result<Option<fs::File>> {
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads `bans.json` (missing: empty). Every entry is read on its own: a
/// bad or truncated one is named in [`Saved::rejected`], the others hold.
pub fn load_saved(state_dir: &Path) -> Saved {
    let path = state_dir.join(STATE_FILE);
    let mut out = Saved::default();
    let bytes = match open_nofollow(&path) {
        Ok(None) => return out,
        Ok(Some(f)) => {
            let mut b = Vec::new();
            match f.take(MAX_FILE_BYTES).read_to_end(&mut b) {
                Ok(_) => b,
                Err(e) => {
                    out.rejected.push(format!("{}: unreadable: {e}", path.display()));
                    return out;
                }
            }
        }
        Err(e) => {
            out.rejected.push(format!("{}: unreadable: {e}", path.display()));
            return out;
        }
    };
    parse_saved(&path, &bytes, &mut out);
    out
}

fn parse_saved(path: &Path, bytes: &[u8], out: &mut Saved) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((_, first)) = lines.next() else {
        return;
    };
    if let Ok(h) = serde_json::from_str::<Header>(first)
        && h.version == STATE_VERSION
    {
        out.saved_unix_ms = Some(h.saved_unix_ms);
        for (i, line) in lines {
            match serde_json::from_str::<StateLine>(line) {
                Ok(StateLine::InForce(b)) => out.bans.push(b),
                Ok(StateLine::Ended(e)) => out.ended.push(e),
                Err(e) => out
                    .rejected
                    .push(format!("{}:{}: {e}: {}", path.display(), i + 1, clip(line))),
            }
        }
        return;
    }
    // Version 1: one object, `{"version":1,"bans":[...]}`; each entry on
    // its own.
    out.legacy = true;
    let v: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            out.rejected
                .push(format!("{}: not a ban list ({e}): every entry lost", path.display()));
            return;
        }
    };
    let Some(list) = v.get("bans").and_then(|b| b.as_array()) else {
        out.rejected
            .push(format!("{}: no `bans` list: every entry lost", path.display()));
        return;
    };
    for (i, item) in list.iter().enumerate() {
        match serde_json::from_value::<SavedBan>(item.clone()) {
            Ok(mut b) => {
                // Version 1 has no lengths: the section's cap applies.
                b.length_ms = None;
                out.bans.push(b);
            }
            Err(e) => out.rejected.push(format!(
                "{}: entry {}: {e}: {}",
                path.display(),
                i + 1,
                clip(&item.to_string())
            )),
        }
    }
}

/// At most 200 characters of untrusted text, for a log line.
fn clip(s: &str) -> String {
    let s: String = s
        .chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    s
}

/// Writes `bans.json` atomically: a new temporary file (O_EXCL, never a
/// symlink) in `state_dir`, fsynced, renamed over it.
pub fn save(state_dir: &Path, bans: Vec<SavedBan>) -> std::io::Result<()> {
    save_all(state_dir, &bans, &[], wall_now())
}

/// [`save`] with the ended bans.
pub fn save_all(state_dir: &Path, bans: &[SavedBan], ended: &[SavedEnded], now: Duration) -> std::io::Result<()> {
    if !state_dir.exists() {
        ensure_state_dir(state_dir).map_err(std::io::Error::other)?;
    }
    let mut buf = Vec::with_capacity(64 + 160 * (bans.len() + ended.len()));
    serde_json::to_writer(
        &mut buf,
        &Header {
            version: STATE_VERSION,
            saved_unix_ms: ms(now),
        },
    )
    .map_err(std::io::Error::other)?;
    buf.push(b'\n');
    for b in bans {
        serde_json::to_writer(&mut buf, &StateLine::InForce(b.clone())).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    for e in ended {
        serde_json::to_writer(&mut buf, &StateLine::Ended(e.clone())).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    // tempfile: O_CREAT|O_EXCL (never an existing file or symlink), 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".bans.json.")
        .suffix(".tmp")
        .tempfile_in(state_dir)?;
    tmp.write_all(&buf)?;
    tmp.as_file().sync_all()?;
    tmp.persist(state_dir.join(STATE_FILE)).map_err(|e| e.error)?;
    Ok(())
}

/// Opens `bans.cmd` (never through a symlink; created 0600) and takes its
/// flock.
fn open_commands(state_dir: &Path, create: bool) -> std::io::Result<Option<fs::File>> {
    let r = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(state_dir.join(COMMAND_FILE));
    let f = match r {
        Ok(f) => f,
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a valid fd we own; released when `f` is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A file an older CLI created with the umask (0644): 0600 now.
    if f.metadata()?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(Some(f))
}

/// Appends one command line to `bans.cmd` (the CLI), under its flock.
pub fn append_command(state_dir: &Path, cmd: &Command) -> std::io::Result<()> {
    ensure_state_dir(state_dir).map_err(std::io::Error::other)?;
    let mut line = serde_json::to_vec(cmd).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let Some(mut f) = open_commands(state_dir, true)? else {
        return Err(std::io::Error::other("bans.cmd vanished"));
    };
    // One write of a whole line, under the lock: appends from two CLIs do
    // not interleave, and the agent's read-and-truncate cannot lose it.
    f.write_all(&line)?;
    f.sync_data()
}

/// Takes the pending commands: reads `bans.cmd` and truncates it, under its
/// flock (a CLI appending meanwhile waits, so its line is read now or
/// stays for the next time). Lines that are not commands are returned as
/// rejected: (line, why).
pub fn take_commands(state_dir: &Path) -> (Vec<Command>, Vec<String>) {
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    // A leftover of an older version's rename-aside hand-off.
    let taking = state_dir.join(format!("{COMMAND_FILE}.taking"));
    if let Ok(Some(f)) = open_nofollow(&taking) {
        read_commands(f, &taking, &mut out, &mut rejected);
        let _ = fs::remove_file(&taking);
    }
    match open_commands(state_dir, false) {
        Ok(Some(mut f)) => {
            let path = state_dir.join(COMMAND_FILE);
            let _ = f.rewind();
            read_commands(&f, &path, &mut out, &mut rejected);
            if let Err(e) = f.set_len(0) {
                warn!(path = %path.display(), error = %e, "cannot truncate the ban command file");
            }
        }
        Ok(None) => {}
        Err(e) => rejected.push(format!("{}: {e}", state_dir.join(COMMAND_FILE).display())),
    }
    (out, rejected)
}

fn read_commands(f: impl std::io::Read, path: &Path, out: &mut Vec<Command>, rejected: &mut Vec<String>) {
    let mut bytes = Vec::new();
    if let Err(e) = f.take(MAX_FILE_BYTES).read_to_end(&mut bytes) {
        rejected.push(format!("{}: unreadable: {e}", path.display()));
        return;
    }
    let text = String::from_utf8_lossy(&bytes);
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(c) => out.push(c),
            Err(e) => rejected.push(format!("{}:{}: {e}: {}", path.display(), i + 1, clip(l))),
        }
    }
}

/// The ban metrics.
#[derive(Debug, Clone, Default)]
pub struct BanMetrics {
    pub bans: Family<Vec<(&'static str, String)>, Gauge>,
    pub events: Family<Vec<(&'static str, String)>, Counter>,
    pub auth_failures: Family<Vec<(&'static str, String)>, Counter>,
    pub unparsed: Family<Vec<(&'static str, String)>, Counter>,
    pub rejected: Family<Vec<(&'static str, String)>, Counter>,
    pub refused: Family<Vec<(&'static str, String)>, Counter>,
    pub not_banned: Family<Vec<(&'static str, String)>, Counter>,
    pub trackers_evicted: Counter,
    pub suspicious: Family<Vec<(&'static str, String)>, Counter>,
    pub source_up: Family<Vec<(&'static str, String)>, Gauge>,
}

impl BanMetrics {
    pub fn register(&self, r: &mut Registry) {
        let sub = r.sub_registry_with_prefix("relay_guard");
        sub.register("bans", "Bans in force, by ban section and family", self.bans.clone());
        sub.register(
            "ban_events",
            "Bans put in force (banned), ended on time (expired) and lifted by `unban` (lifted)",
            self.events.clone(),
        );
        sub.register(
            "auth_failures",
            "Failed logins read from the logs, by ban section and source (postfix, dovecot)",
            self.auth_failures.clone(),
        );
        sub.register(
            "log_lines_unparsed",
            "Log lines that looked like Postfix or Dovecot but could not be read, by ban section",
            self.unparsed.clone(),
        );
        sub.register(
            "ban_state_rejected",
            "Saved or pinned ban entries refused (dropped) at start or when taken in, by source (bans.json, bans.cmd, pins, state_dir)",
            self.rejected.clone(),
        );
        sub.register(
            "bans_refused",
            "Bans the kernel did not take, by ban section and reason (full: the ban trie is full; error: another map error); not counted as banned",
            self.refused.clone(),
        );
        sub.register(
            "ban_failures_exempt",
            "Failed logins that count toward no ban, by ban section and reason (allowlisted: a guard allows the source explicitly and the section has no ban_allowed)",
            self.not_banned.clone(),
        );
        sub.register(
            "ban_trackers_evicted",
            "Failure trackers evicted (least recently failed first) to make room for new sources",
            self.trackers_evicted.clone(),
        );
        sub.register(
            "log_lines_suspicious",
            "Log lines with field-like text (rip=, `, `, brackets) in a client-controlled element such as a user name, by ban section; the real source is still charged",
            self.suspicious.clone(),
        );
        sub.register(
            "log_source_up",
            "Whether a ban section's log source is read (1) or not (0: a file missing or unreadable, journalctl not running), by ban section and source (the file's path, or journal)",
            self.source_up.clone(),
        );
    }

    fn event(&self, ban: &str, action: &'static str, n: u64) {
        self.events
            .get_or_create(&vec![("ban", ban.to_string()), ("action", action.to_string())])
            .inc_by(n);
    }

    /// The series alerts watch, at 0 before anything happens (an alert on
    /// `increase()` needs the series to exist first).
    fn preset(&self, sections: &[Ban]) {
        for source in ["bans.json", "bans.cmd", "pins", "state_dir"] {
            let _ = self.rejected.get_or_create(&vec![("source", source.to_string())]);
        }
        for b in sections {
            for reason in ["full", "error"] {
                let _ = self
                    .refused
                    .get_or_create(&vec![("ban", b.name.clone()), ("reason", reason.to_string())]);
            }
            let _ = self
                .not_banned
                .get_or_create(&vec![("ban", b.name.clone()), ("reason", "allowlisted".to_string())]);
            let _ = self.suspicious.get_or_create(&vec![("ban", b.name.clone())]);
            let _ = self.unparsed.get_or_create(&vec![("ban", b.name.clone())]);
        }
    }

    fn reject(&self, source: &'static str, n: u64) {
        self.rejected
            .get_or_create(&vec![("source", source.to_string())])
            .inc_by(n);
    }
}

/// What the guards allow explicitly, from the live list index: an allow
/// entry other than a /0, of a guard covering one of the ban's ports, that
/// decides for an address (a deny inside it wins).
pub struct GuardAllows<'a> {
    pub index: &'a ListIndex,
    pub guards: &'a [RunGuard],
}

impl GuardAllows<'_> {
    fn guards_for<'b>(&'b self, ports: &'b [u16]) -> impl Iterator<Item = usize> + 'b {
        self.guards
            .iter()
            .enumerate()
            .filter(move |(g, guard)| *g < self.index.guards.len() && guard.ports.iter().any(|p| ports.contains(p)))
            .map(|(g, _)| g)
    }
}

impl Allowed for GuardAllows<'_> {
    fn allows(&self, ports: &[u16], addr: IpAddr) -> bool {
        use crate::config::Action;
        let host = IpNet::from(addr);
        let family = usize::from(addr.is_ipv6());
        self.guards_for(ports).any(|g| {
            let lens = self.index.lens.get(g).map_or(u128::MAX, |l| l[family]);
            // The longest entry holding `addr`, /0 excluded.
            (1..=host.max_prefix_len()).rev().find_map(|l| {
                if l != 128 && lens & (1u128 << l) == 0 {
                    return None;
                }
                let sup = IpNet::new(addr, l).ok()?.trunc();
                self.index.action(g, &sup)
            }) == Some(Action::Allow)
        })
    }

    fn allows_within(&self, ports: &[u16], net: &IpNet) -> bool {
        use crate::config::Action;
        self.guards_for(ports).any(|g| {
            let list = &self.index.guards[g];
            let start = list.partition_point(|e| e.net < *net);
            list[start..]
                .iter()
                .take_while(|e| net.contains(&e.net.network()))
                .any(|e| e.action == Action::Allow && e.net.prefix_len() > 0 && net.contains(&e.net))
        })
    }
}

/// What [`restore_saved`] did.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Bans put back in force.
    pub restored: usize,
    /// Bans in force when saved that have ended since (history now).
    pub ended: usize,
    /// Entries refused: what and why.
    pub rejected: Vec<String>,
    /// Every (section, prefix) of the file's bans in force.
    pub seen: std::collections::HashSet<(usize, IpNet)>,
}

/// Takes `bans.json` as read into the engine at wall time `wall` (see the
/// module docs): each entry checked like the CLI's input, a ban in force
/// for no longer than it had left when saved nor than its own length,
/// ended bans as history only. `kernel`: the pinned maps' bans in force,
/// (section, prefix) → CLOCK_BOOTTIME expiry, when they were adopted (the
/// kernel then decides: what it does not hold has ended).
pub fn restore_saved(
    engine: &mut BanEngine,
    saved: &Saved,
    wall: Duration,
    kernel: Option<&HashMap<(usize, IpNet), u64>>,
    allowed: &dyn Allowed,
) -> RestoreReport {
    let bans = engine.sections().to_vec();
    let boot = boot_ns();
    let saved_at = saved.saved_unix_ms.map(Duration::from_millis);
    let mut out = RestoreReport {
        rejected: saved.rejected.clone(),
        ..RestoreReport::default()
    };
    engine.reserve(saved.bans.len());
    for s in &saved.bans {
        if let Some(i) = bans.iter().position(|b| b.name == s.ban) {
            out.seen.insert((i, s.prefix.trunc()));
        }
        let mut rec = match s.record(&bans, wall, saved_at) {
            Ok(rec) => rec,
            Err(why) => {
                out.rejected
                    .push(format!("{} {} ({}): {why}", STATE_FILE, s.prefix, s.ban));
                continue;
            }
        };
        if let Some(k) = kernel {
            // The kernel decides: an entry it no longer holds was lifted
            // (its line perhaps lost) or has expired.
            match k.get(&(rec.section, rec.net.trunc())) {
                Some(&x) => rec.expires = rec.expires.min(wall_expiry(x, wall, boot)),
                None => rec.expires = wall,
            }
        }
        let b = &bans[rec.section];
        if rec.failures > 0
            && !b.ban_allowed
            && rec.expires > wall
            && (allowed.allows(&b.ports, rec.net.addr()) || allowed.allows_within(&b.ports, &rec.net))
        {
            info!(ban = %b.name, prefix = %rec.net, "saved ban ended: a guard allows the prefix explicitly (ban_allowed is off)");
            rec.expires = wall;
        }
        match engine.restore(rec, wall) {
            Ok(true) => out.restored += 1,
            Ok(false) => out.ended += 1,
            Err(why) => out
                .rejected
                .push(format!("{} {} ({}): {why}", STATE_FILE, s.prefix, s.ban)),
        }
    }
    for e in &saved.ended {
        let Some(section) = bans.iter().position(|b| b.name == e.ban) else {
            out.rejected.push(format!(
                "{} {} ({}): no such [[ban]] section",
                STATE_FILE, e.prefix, e.ban
            ));
            continue;
        };
        let at = Duration::from_millis(e.ended_unix_ms);
        if let Err(why) = engine.restore_history(section, e.prefix, e.times, at, wall) {
            out.rejected
                .push(format!("{} {} ({}): {why}", STATE_FILE, e.prefix, e.ban));
        }
    }
    out
}

/// The agent's ban state.
pub struct BanRunner {
    engine: BanEngine,
    state_dir: PathBuf,
    /// `state_dir` passed [`check_state_dir`]: without it nothing is read
    /// from or written to it.
    state_ok: bool,
    /// `bans.json` is behind the engine.
    dirty: bool,
    /// The `relay_guard_bans` gauges are behind the engine (recounted at
    /// the next tick: a count is O(bans), a burst must not pay it per ban).
    gauges_dirty: bool,
    last_save: Instant,
    last_gc: Instant,
    /// Held by the thread writing `bans.json` (one write at a time; the
    /// final save at exit waits for a write in flight).
    saving: Arc<Mutex<()>>,
    pub metrics: BanMetrics,
    /// Counter port slot → port (for the `port` label of banned drops).
    pub port_slots: BTreeMap<u32, u16>,
    /// The port table as last written (a reload writes only what differs).
    ports: BTreeMap<u16, relay_guard_common::ban::BanPort>,
    /// `ports` is what the map holds (else a reload reads it all back).
    ports_known: bool,
    /// Log-fed bans put in force since the last [`Self::take_fresh`], kept
    /// only while `Some` (the CrowdSec watcher pushes them).
    pub fresh: Option<Vec<BanRecord>>,
}

/// How often expired entries are deleted from the tries (the kernel
/// ignores them meanwhile: expiry is its own decision). Entries whose ban
/// the engine saw expire are deleted at the next tick already.
const GC_INTERVAL: Duration = Duration::from_secs(60);
/// `bans.json` is rewritten at most this often.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl BanRunner {
    /// Restores the saved bans, takes in the CLI's pending ones and those
    /// only the pinned maps know, and writes them all to the kernel. Never
    /// fails on what it reads: a bad entry is dropped, logged and counted,
    /// a ban the kernel does not take is counted, and the start goes on
    /// (the guard matters more than any ban).
    ///
    /// `adopted`: the maps were pinned before (else they are new and empty,
    /// and nothing needs reading back).
    pub fn start(cfg: &Config, maps: &mut BanMaps, adopted: bool) -> anyhow::Result<BanRunner> {
        Ok(BanRunner::start_with(
            &cfg.bans,
            &cfg.state_dir,
            maps,
            adopted,
            &NoAllowlist,
        ))
    }

    /// [`Self::start`] with the guards' explicit allows: a restored log-fed
    /// ban of an address a guard allows explicitly is dropped (unless its
    /// section has `ban_allowed`). `bans` and `state_dir` as in the config.
    pub fn start_with(
        bans: &[Ban],
        state_dir: &Path,
        maps: &mut BanMaps,
        adopted: bool,
        allowed: &dyn Allowed,
    ) -> BanRunner {
        let started = Instant::now();
        let state_ok = match ensure_state_dir(state_dir) {
            Ok(()) => true,
            Err(e) => {
                error!("{e}; bans are neither restored from it nor saved there");
                false
            }
        };
        let (port_slots, ports) = match maps.set_ports(bans, adopted) {
            Ok(s) => (s, crate::kernel::bans::port_table(bans).1),
            Err(e) => {
                error!(error = %e, "failed to write the ban ports: bans are not enforced until a reload writes them");
                // Unknown: the next reload reads every port back.
                (BTreeMap::new(), BTreeMap::new())
            }
        };
        let ports_known = !ports.is_empty() || bans.is_empty();
        let mut r = BanRunner {
            engine: BanEngine::new(bans.to_vec()),
            state_dir: state_dir.to_path_buf(),
            state_ok,
            dirty: false,
            gauges_dirty: false,
            last_save: Instant::now(),
            last_gc: Instant::now(),
            saving: Arc::new(Mutex::new(())),
            metrics: BanMetrics::default(),
            port_slots,
            ports,
            ports_known,
            fresh: None,
        };
        r.metrics.preset(bans);
        if !state_ok {
            r.metrics.reject("state_dir", 1);
        } else if let Err(e) = maps.set_lock(state_dir) {
            warn!(error = %e, "cannot open the ban lock file; writes to the ban maps are not serialized with the CLI");
        }
        let (wall, boot) = (wall_now(), boot_ns());
        // What the pinned maps hold, per (section, prefix): their expiry.
        let in_kernel = if adopted {
            match maps.list() {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "cannot read the pinned bans back");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let mut kernel_at: HashMap<(usize, IpNet), u64> = HashMap::new();
        for kb in &in_kernel {
            for (s, &x) in kb.expires_ns.iter().enumerate() {
                if x > boot {
                    kernel_at.insert((s, kb.net), x);
                }
            }
        }
        let saved = if state_ok {
            load_saved(state_dir)
        } else {
            Saved::default()
        };
        let saved_at = saved.saved_unix_ms.map(Duration::from_millis);
        if let Some(at) = saved_at
            && at > wall + Duration::from_secs(60)
        {
            warn!(
                saved = %humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + at),
                "the wall clock is behind the time bans.json was saved: bans in force keep only the time they had left then, ended bans stay ended"
            );
        }
        let report = restore_saved(
            &mut r.engine,
            &saved,
            wall,
            if adopted { Some(&kernel_at) } else { None },
            allowed,
        );
        let (restored, ended, rejected_file, from_file) = (report.restored, report.ended, report.rejected, report.seen);
        if !rejected_file.is_empty() {
            for why in &rejected_file {
                warn!("saved ban entry refused: {why}");
            }
            r.metrics.reject("bans.json", rejected_file.len() as u64);
            let path = state_dir.join(STATE_FILE);
            match fs::copy(&path, state_dir.join(BAD_FILE)) {
                Ok(_) => {
                    warn!(kept = %state_dir.join(BAD_FILE).display(), "a copy of the refused ban list is kept")
                }
                Err(e) => warn!(error = %e, "cannot keep a copy of the refused ban list"),
            }
        }
        if r.state_ok {
            r.take_commands(maps);
        }
        // Bans only the maps hold (a CLI ban whose line was lost): kept
        // when they pass the CLI's checks; the others are deleted.
        let mut refused_pins = 0u64;
        for kb in &in_kernel {
            for (s, &x) in kb.expires_ns.iter().enumerate() {
                if x <= boot || r.engine.is_active(s, kb.net) || from_file.contains(&(s, kb.net)) {
                    continue;
                }
                let left = Duration::from_nanos(x - boot);
                let rec = BanRecord {
                    section: s,
                    net: kb.net,
                    expires: wall + left.min(MAX_DURATION),
                    times: r.engine.times_banned(s, kb.net).saturating_add(1),
                    failures: 0,
                    length: left.min(MAX_DURATION),
                };
                match r.engine.restore(rec, wall) {
                    Ok(_) => {}
                    // A section the config no longer has: its bans go.
                    Err(BanRefused::NoSection(_)) => {
                        info!(prefix = %kb.net, section = s, "pinned ban of a removed [[ban]] section deleted");
                    }
                    Err(why) => {
                        warn!(prefix = %kb.net, section = s, "pinned ban refused and deleted: {why}");
                        refused_pins += 1;
                    }
                }
            }
        }
        if refused_pins > 0 {
            r.metrics.reject("pins", refused_pins);
        }
        // What the engine holds goes to the kernel with the time left; the
        // rest of the maps (expired, lifted, refused, or of sections gone)
        // is cleared.
        let want: HashMap<(usize, IpNet), u64> = r
            .engine
            .active()
            .map(|b| ((b.section, b.net), boot_expiry(b.expires, wall, boot)))
            .collect();
        let mut removed = false;
        for kb in &in_kernel {
            for (s, &x) in kb.expires_ns.iter().enumerate() {
                if x != 0 && !want.contains_key(&(s, kb.net)) {
                    if let Err(e) = maps.unban(kb.net, Some(s), boot) {
                        warn!(prefix = %kb.net, error = %e, "failed to clear a pinned ban");
                    }
                    removed = true;
                }
            }
        }
        let mut refused: Vec<(usize, IpNet, bool)> = Vec::new();
        for (&(s, net), &x) in &want {
            if kernel_at.get(&(s, net)) == Some(&x) {
                continue;
            }
            if let Err(e) = maps.ban(s, net, x) {
                warn!(prefix = %net, error = %e, "the kernel did not take a restored ban");
                refused.push((s, net, is_full(&e)));
            }
        }
        for (s, net, full) in refused {
            r.engine.lift(net, Some(s), wall);
            r.count_refused(s, full);
        }
        if removed && let Err(e) = maps.rebuild_filter() {
            warn!(error = %e, "failed to rebuild the ban filter");
        }
        // Saved at the first tick (a second from now), not before the
        // start completes.
        r.dirty = true;
        r.refresh_gauges();
        info!(
            restored,
            ended,
            rejected = rejected_file.len(),
            rejected_pins = refused_pins,
            in_force = r.engine.active_count(),
            took_ms = started.elapsed().as_millis() as u64,
            "bans restored"
        );
        r
    }

    pub fn sections(&self) -> &[Ban] {
        self.engine.sections()
    }

    /// The log-fed bans put in force since the last call.
    pub fn take_fresh(&mut self) -> Vec<BanRecord> {
        self.fresh.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Whether `net` may be banned in `section` (prefix limits, `never`).
    pub fn check(&self, section: usize, net: IpNet) -> Result<IpNet, BanRefused> {
        self.engine.check(section, net)
    }

    pub fn is_active(&self, section: usize, net: IpNet) -> bool {
        self.engine.is_active(section, net)
    }

    /// The prefixes in force in `section`, with their wall-clock expiry.
    pub fn active_in(&self, section: usize) -> Vec<(IpNet, Duration)> {
        self.engine
            .active()
            .filter(|r| r.section == section)
            .map(|r| (r.net, r.expires))
            .collect()
    }

    /// A ban of another source (CrowdSec's decisions): `net` in `section`
    /// until wall time `until`, exactly (no escalation), saved and expired
    /// like the others. `false`: refused (checks, or the kernel).
    pub fn put_external(&mut self, maps: &mut BanMaps, section: usize, net: IpNet, until: Duration) -> bool {
        let wall = wall_now();
        if until <= wall {
            return false;
        }
        let Ok(rec) = self.engine.manual(section, net, Some(until - wall), wall) else {
            return false;
        };
        let x = boot_expiry(rec.expires, wall, boot_ns());
        if let Err(e) = maps.ban(rec.section, rec.net, x) {
            let full = is_full(&e);
            warn!(prefix = %rec.net, error = %e, full, "the kernel did not take a CrowdSec decision: not banned");
            self.engine.lift(rec.net, Some(rec.section), wall);
            self.count_refused(rec.section, full);
            return false;
        }
        self.metrics
            .event(&self.engine.sections()[section].name.clone(), "banned", 1);
        self.dirty = true;
        self.gauges_dirty = true;
        true
    }

    /// Lifts `net` from `section` only (a deleted CrowdSec decision): a
    /// ban of the same prefix in another section stays.
    pub fn lift_external(&mut self, maps: &mut BanMaps, section: usize, net: IpNet) -> bool {
        let lifted = self.engine.lift(net, Some(section), wall_now());
        if let Err(e) = maps.unban(net, Some(section), boot_ns()) {
            warn!(prefix = %net, error = %e, "failed to lift a CrowdSec decision");
        }
        if lifted.is_empty() {
            return false;
        }
        self.metrics
            .event(&self.engine.sections()[section].name.clone(), "lifted", 1);
        self.dirty = true;
        self.gauges_dirty = true;
        true
    }

    fn count_refused(&self, section: usize, full: bool) {
        if let Some(b) = self.engine.sections().get(section) {
            self.metrics
                .refused
                .get_or_create(&vec![
                    ("ban", b.name.clone()),
                    ("reason", if full { "full" } else { "error" }.to_string()),
                ])
                .inc();
        }
    }

    /// One failed login (no guard allowlist consulted: tests, the bench).
    pub fn failure(&mut self, maps: &mut BanMaps, f: &AuthFailure) {
        self.failure_with(maps, f, &NoAllowlist);
    }

    /// One failed login, judged with the guards' explicit allows.
    pub fn failure_with(&mut self, maps: &mut BanMaps, f: &AuthFailure, allowed: &dyn Allowed) {
        let Some(section) = self.engine.sections().get(f.ban) else {
            return;
        };
        let name = section.name.clone();
        self.metrics
            .auth_failures
            .get_or_create(&vec![("ban", name.clone()), ("source", f.origin.label().to_string())])
            .inc();
        let at =
            f.at.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .min(wall_now());
        let evicted = self.engine.evicted();
        let outcome = self.engine.failure_checked(f.ban, f.source, at, allowed);
        let more = self.engine.evicted() - evicted;
        if more > 0 {
            self.metrics.trackers_evicted.inc_by(more);
        }
        match outcome {
            Outcome::Banned(rec) => {
                if self.apply(maps, &rec) {
                    info!(ban = %name, prefix = %rec.net, failures = rec.failures, times = rec.times, until = %humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + rec.expires), "banned");
                    if let Some(f) = &mut self.fresh {
                        f.push(rec);
                    }
                }
            }
            Outcome::Allowlisted => {
                self.metrics
                    .not_banned
                    .get_or_create(&vec![("ban", name), ("reason", "allowlisted".to_string())])
                    .inc();
            }
            Outcome::Counted | Outcome::Never => {}
        }
    }

    /// A log line of `section`'s logs that did not parse.
    pub fn unparsed(&mut self, section: usize) {
        if let Some(b) = self.engine.sections().get(section) {
            self.metrics
                .unparsed
                .get_or_create(&vec![("ban", b.name.clone())])
                .inc();
        }
    }

    /// A log line of `section`'s logs with field-like text in a
    /// client-controlled element.
    pub fn suspicious(&mut self, section: usize) {
        if let Some(b) = self.engine.sections().get(section) {
            self.metrics
                .suspicious
                .get_or_create(&vec![("ban", b.name.clone())])
                .inc();
        }
    }

    /// Whether a log source of `section` is read.
    pub fn source_up(&mut self, section: usize, source: String, up: bool) {
        if let Some(b) = self.engine.sections().get(section) {
            self.metrics
                .source_up
                .get_or_create(&vec![("ban", b.name.clone()), ("source", source)])
                .set(i64::from(up));
        }
    }

    /// Puts `rec` in the kernel; `false` (counted, logged, and taken out
    /// of the engine) when the kernel refuses it: what the metrics call
    /// banned is what the kernel drops.
    fn apply(&mut self, maps: &mut BanMaps, rec: &BanRecord) -> bool {
        let wall = wall_now();
        let x = boot_expiry(rec.expires, wall, boot_ns());
        let name = self.engine.sections()[rec.section].name.clone();
        if let Err(e) = maps.ban(rec.section, rec.net, x) {
            let full = is_full(&e);
            warn!(ban = %name, prefix = %rec.net, error = %e, full, "the kernel did not take a ban: not banned");
            self.engine.lift(rec.net, Some(rec.section), wall);
            self.count_refused(rec.section, full);
            self.dirty = true;
            self.gauges_dirty = true;
            return false;
        }
        self.metrics.event(&name, "banned", 1);
        self.dirty = true;
        self.gauges_dirty = true;
        true
    }

    /// Takes in the CLI's pending commands (already in the maps), each
    /// checked like the CLI's input; a refused ban line is lifted from the
    /// kernel again (it did not come from a CLI that checked it).
    fn take_commands(&mut self, maps: &mut BanMaps) {
        let wall = wall_now();
        let (cmds, bad) = take_commands(&self.state_dir);
        let mut rejected = bad.len() as u64;
        for why in &bad {
            warn!("ban command refused: {why}");
        }
        for c in cmds {
            match c {
                Command::Ban(s) => {
                    let rec = s
                        .record(self.engine.sections(), wall, None)
                        .and_then(|rec| {
                            self.engine
                                .check(rec.section, rec.net)
                                .map(|_| rec)
                                .map_err(|e| e.to_string())
                        })
                        .and_then(|rec| {
                            if Duration::from_millis(s.expires_unix_ms)
                                > wall + MAX_DURATION + Duration::from_secs(86_400)
                            {
                                Err(format!("expiry {} ms is more than 10 years away", s.expires_unix_ms))
                            } else {
                                Ok(rec)
                            }
                        });
                    match rec {
                        Ok(rec) => {
                            let name = s.ban.clone();
                            let section = rec.section;
                            self.engine.lift(rec.net, Some(section), wall);
                            match self.engine.restore(rec, wall) {
                                Ok(true) => self.metrics.event(&name, "banned", 1),
                                Ok(false) => {}
                                Err(why) => {
                                    warn!("ban command refused: {}: {why}", s.prefix);
                                    rejected += 1;
                                }
                            }
                        }
                        Err(why) => {
                            warn!(prefix = %s.prefix, ban = %s.ban, "ban command refused: {why}");
                            rejected += 1;
                            if let Some(i) = self.engine.section_index(&s.ban)
                                && let Err(e) = maps.unban(s.prefix, Some(i), boot_ns())
                            {
                                warn!(prefix = %s.prefix, error = %e, "failed to lift a refused ban");
                            }
                        }
                    }
                }
                Command::Unban { prefix, ban } => {
                    let section = ban.as_deref().and_then(|n| self.engine.section_index(n));
                    if ban.is_some() && section.is_none() {
                        continue;
                    }
                    for r in self.engine.lift(prefix.trunc(), section, wall) {
                        let name = self.engine.sections()[r.section].name.clone();
                        self.metrics.event(&name, "lifted", 1);
                        // The CLI lifted it in the kernel already; again, in
                        // case the agent's own write raced it.
                        if let Err(e) = maps.unban(r.net, Some(r.section), boot_ns()) {
                            warn!(prefix = %r.net, error = %e, "failed to lift a ban");
                        }
                    }
                }
            }
            self.dirty = true;
            self.gauges_dirty = true;
        }
        if rejected > 0 {
            self.metrics.reject("bans.cmd", rejected);
        }
    }

    /// The periodic work: the CLI's commands, expiry accounting (and the
    /// expired entries deleted from the tries), saving, and now and then
    /// deleting any other expired entries from the maps.
    pub fn tick(&mut self, maps: &mut BanMaps) {
        if self.state_ok {
            self.take_commands(maps);
        }
        let now = wall_now();
        let expired = self.engine.expire(now);
        if !expired.is_empty() {
            let mut by: BTreeMap<String, u64> = BTreeMap::new();
            let boot = boot_ns();
            for r in &expired {
                *by.entry(self.engine.sections()[r.section].name.clone()).or_default() += 1;
                // Out of the trie now (its filter bits go at the next GC),
                // not at the next GC: expired entries do not stack up in
                // front of a ban in the program's walk (MAX_NESTED).
                if let Err(e) = maps.expire_slot(r.net, r.section, boot) {
                    warn!(prefix = %r.net, error = %e, "failed to delete an expired ban");
                }
            }
            for (name, n) in by {
                self.metrics.event(&name, "expired", n);
            }
            self.dirty = true;
            self.gauges_dirty = true;
        }
        if self.gauges_dirty {
            self.refresh_gauges();
        }
        if self.last_gc.elapsed() >= GC_INTERVAL {
            self.last_gc = Instant::now();
            self.engine.prune(now);
            match maps.collect_expired(boot_ns()) {
                Ok(n) if n > 0 => {
                    if let Err(e) = maps.rebuild_filter() {
                        warn!(error = %e, "failed to rebuild the ban filter");
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "failed to delete expired bans from the kernel"),
            }
        }
        if self.dirty && self.last_save.elapsed() >= SAVE_INTERVAL {
            self.save_in_background();
        }
    }

    /// A reload: sections matched by name keep their bans; bans of removed
    /// sections are lifted. Order (SPEC.md "One policy at a time"): first
    /// a port table under which no slot that changes hands covers any port
    /// ([`crate::kernel::bans::transition_table`]), then the entries move,
    /// then the final table. Every map error is logged and counted.
    pub fn reconfigure(&mut self, bans: &[Ban], state_dir: &Path, maps: &mut BanMaps) {
        let old_sections: Vec<Ban> = self.engine.sections().to_vec();
        let mut errors = 0usize;
        let transition = crate::kernel::bans::transition_table(&old_sections, bans);
        let step = if self.ports_known {
            maps.change_ports(&self.ports, &transition)
        } else {
            maps.write_ports(&transition, true)
        };
        match step {
            Ok(()) => {
                self.ports = transition.clone();
                self.ports_known = true;
            }
            Err(e) => {
                warn!(error = %e, "failed to write the ban ports for the move");
                self.ports_known = false;
                errors += 1;
            }
        }
        let old: Vec<String> = old_sections.iter().map(|b| b.name.clone()).collect();
        let (kept, gone) = self.engine.reconfigure(bans.to_vec());
        let boot = boot_ns();
        for r in &gone {
            if let Err(e) = maps.unban(r.net, Some(r.section), boot) {
                warn!(prefix = %r.net, error = %e, "failed to lift a ban of a removed section");
                errors += 1;
            }
        }
        // Section indexes may have moved: rewrite the kept ones under the
        // new index, and clear the old slot (unless another kept ban of the
        // same prefix now lives there: it is written below).
        let wall = wall_now();
        let now_at: std::collections::HashSet<(usize, IpNet)> = kept.iter().map(|r| (r.section, r.net)).collect();
        for r in &kept {
            if let Some(i) = old.iter().position(|n| *n == bans[r.section].name)
                && i != r.section
                && !now_at.contains(&(i, r.net))
                && let Err(e) = maps.unban(r.net, Some(i), boot)
            {
                warn!(prefix = %r.net, error = %e, "failed to clear a moved ban's old slot");
                errors += 1;
            }
        }
        let mut refused = Vec::new();
        for r in &kept {
            if let Err(e) = maps.ban(r.section, r.net, boot_expiry(r.expires, wall, boot)) {
                warn!(prefix = %r.net, error = %e, "failed to write a kept ban");
                errors += 1;
                refused.push((r.section, r.net, is_full(&e)));
            }
        }
        for (s, net, full) in refused {
            self.engine.lift(net, Some(s), wall);
            self.count_refused(s, full);
        }
        // A `never` entry added by the reload wins over a ban in force.
        let now_never: Vec<(usize, IpNet)> = self
            .engine
            .active()
            .filter(|r| bans[r.section].touches_never(&r.net))
            .map(|r| (r.section, r.net))
            .collect();
        for (s, net) in now_never {
            for r in self.engine.lift(net, Some(s), wall) {
                if let Err(e) = maps.unban(r.net, Some(r.section), boot) {
                    warn!(prefix = %r.net, error = %e, "failed to lift a ban");
                    errors += 1;
                }
                self.metrics.event(&bans[s].name, "lifted", 1);
                info!(ban = %bans[s].name, prefix = %r.net, "ban lifted: the prefix is in or covers a `never` entry now");
            }
        }
        let (slots, table) = crate::kernel::bans::port_table(bans);
        let last = if self.ports_known {
            maps.change_ports(&self.ports, &table)
        } else {
            maps.write_ports(&table, true)
        };
        match last {
            Ok(()) => {
                self.port_slots = slots;
                self.ports = table;
                self.ports_known = true;
            }
            Err(e) => {
                warn!(error = %e, "failed to write the ban ports");
                self.ports_known = false;
                errors += 1;
            }
        }
        if errors > 0 {
            error!(errors, "the ban maps were not fully updated by this reload");
        }
        if self.state_dir != state_dir {
            self.state_dir = state_dir.to_path_buf();
            self.state_ok = match ensure_state_dir(state_dir) {
                Ok(()) => true,
                Err(e) => {
                    error!("{e}; bans are not saved there");
                    self.metrics.reject("state_dir", 1);
                    false
                }
            };
        }
        self.dirty = true;
        self.metrics.bans.clear();
        self.metrics.preset(bans);
        self.refresh_gauges();
    }

    fn snapshot(&self) -> (Vec<SavedBan>, Vec<SavedEnded>) {
        let sections = self.engine.sections();
        let list: Vec<SavedBan> = self
            .engine
            .active()
            .map(|r| SavedBan::from_record(r, sections))
            .collect();
        let ended: Vec<SavedEnded> = self
            .engine
            .history()
            .map(|(s, net, times, until)| SavedEnded {
                ban: sections.get(s).map_or_else(String::new, |b| b.name.clone()),
                prefix: net,
                ended_unix_ms: ms(until),
                times,
            })
            .collect();
        (list, ended)
    }

    /// Writes `bans.json` off the event loop (a blocking thread); a write
    /// still in flight is waited for by the next one.
    fn save_in_background(&mut self) {
        if !self.state_ok {
            self.dirty = false;
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.save_now();
            return;
        };
        let (list, ended) = self.snapshot();
        let dir = self.state_dir.clone();
        let lock = Arc::clone(&self.saving);
        self.dirty = false;
        self.last_save = Instant::now();
        rt.spawn_blocking(move || {
            let _g = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = save_all(&dir, &list, &ended, wall_now()) {
                warn!(state_dir = %dir.display(), error = %e, "failed to save the ban list");
            }
        });
    }

    /// Writes `bans.json` now (at exit), after any write in flight.
    pub fn save_now(&mut self) {
        if !self.state_ok {
            return;
        }
        let (list, ended) = self.snapshot();
        let _g = self.saving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match save_all(&self.state_dir, &list, &ended, wall_now()) {
            Ok(()) => self.dirty = false,
            Err(e) => warn!(state_dir = %self.state_dir.display(), error = %e, "failed to save the ban list"),
        }
        self.last_save = Instant::now();
    }

    fn refresh_gauges(&mut self) {
        self.gauges_dirty = false;
        // The engine keeps the counts as bans change: no walk over them.
        for (i, b) in self.engine.sections().iter().enumerate() {
            for (v6, fam) in [(false, "ipv4"), (true, "ipv6")] {
                self.metrics
                    .bans
                    .get_or_create(&vec![("ban", b.name.clone()), ("family", fam.to_string())])
                    .set(self.engine.count(i, v6));
            }
        }
    }
}

/// How often [`BanRunner::tick`] runs: the CLI's commands are taken in and
/// expiries counted within this.
pub const TICK: Duration = Duration::from_secs(1);

/// The log followers of every `[[ban]]` section, feeding one channel of
/// agent events.
pub struct Inputs {
    pub rx: tokio::sync::mpsc::Receiver<super::Event>,
    /// The sections they were started for (a reload that changes them
    /// starts new ones).
    pub sections: Vec<Ban>,
    _watches: Vec<crate::logwatch::Watch>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Inputs {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Inputs {
    /// Starts a follower per log source of each section. A section whose
    /// followers cannot start is logged and left without (its manual bans
    /// still work).
    pub fn start(bans: &[Ban]) -> Inputs {
        use crate::logwatch::{LogEvent, Origin, Source};
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let mut watches = Vec::new();
        let mut tasks = Vec::new();
        for (i, b) in bans.iter().enumerate() {
            let mut sources: Vec<Source> = b.log_files.iter().cloned().map(Source::File).collect();
            if b.journal {
                sources.push(Source::Journal);
            }
            if sources.is_empty() {
                continue;
            }
            let (stx, mut srx) = tokio::sync::mpsc::channel::<LogEvent>(4096);
            match crate::logwatch::spawn(sources, stx) {
                Ok(w) => watches.push(w),
                Err(e) => {
                    warn!(ban = %b.name, error = %e, "cannot follow the logs of this ban section");
                    continue;
                }
            }
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(ev) = srx.recv().await {
                    let e = match ev {
                        LogEvent::Failure(f) => super::Event::AuthFailure(AuthFailure {
                            ban: i,
                            source: f.source,
                            origin: match f.origin {
                                Origin::Postfix => FailureOrigin::Postfix,
                                Origin::Dovecot => FailureOrigin::Dovecot,
                            },
                            at: f.at,
                        }),
                        LogEvent::Unparsed { .. } => super::Event::LogLineUnparsed(i),
                        LogEvent::Suspicious { .. } => super::Event::LogLineSuspicious(i),
                        LogEvent::SourceUp { source, up } => super::Event::LogSourceUp {
                            ban: i,
                            source: match source {
                                Source::File(p) => p.display().to_string(),
                                Source::Journal => "journal".to_owned(),
                            },
                            up,
                        },
                    };
                    if tx.send(e).await.is_err() {
                        break;
                    }
                }
            }));
        }
        Inputs {
            rx,
            sections: bans.to_vec(),
            _watches: watches,
            tasks,
        }
    }
}

impl BanRunner {
    /// What the metrics collector needs for the `banned` packets.
    pub fn labels(&self, maps: &BanMaps) -> super::metrics::BanLabels {
        super::metrics::BanLabels {
            counters: Some(std::sync::Arc::clone(&maps.counters)),
            names: self.engine.sections().iter().map(|b| b.name.clone()).collect(),
            ports: self.port_slots.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::policy::bans::NoAllowlist;

    fn sasl() -> Ban {
        let mut b = Ban::with_defaults("sasl");
        b.max_ban_time = Duration::from_secs(7 * 86_400);
        b.never = vec!["192.0.2.0/24".parse().expect("net")];
        b
    }

    fn tmpdir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        d
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    const H: Duration = Duration::from_secs(3600);

    /// A restart after an unban: the lifted ban is saved as ended, and
    /// restored as history only, at the right clock, a clock a day behind
    /// and a clock a day ahead.
    #[test]
    fn an_unban_is_final_across_a_restart_whatever_the_clock() {
        let dir = tmpdir();
        let wall = Duration::from_secs(1_800_000_000);
        let mut e = BanEngine::new(vec![sasl()]);
        let kept = e.manual(0, net("203.0.113.0/24"), Some(7 * 24 * H), wall).expect("ban");
        let lifted = e
            .manual(0, net("198.51.100.7/32"), Some(7 * 24 * H), wall)
            .expect("ban");
        e.lift(lifted.net, None, wall + H);
        let list: Vec<SavedBan> = e.active().map(|r| SavedBan::from_record(r, e.sections())).collect();
        let ended: Vec<SavedEnded> = e
            .history()
            .map(|(s, n, times, until)| SavedEnded {
                ban: e.sections()[s].name.clone(),
                prefix: n,
                ended_unix_ms: ms(until),
                times,
            })
            .collect();
        assert_eq!(ended.len(), 1);
        save_all(dir.path(), &list, &ended, wall + H).expect("save");
        for (what, at) in [
            ("right clock", wall + H + Duration::from_secs(2)),
            ("clock a day behind", wall + H - 24 * H),
            ("clock a day ahead", wall + 25 * H),
        ] {
            let saved = load_saved(dir.path());
            assert!(saved.rejected.is_empty(), "{:?}", saved.rejected);
            let mut e2 = BanEngine::new(vec![sasl()]);
            let rep = restore_saved(&mut e2, &saved, at, None, &NoAllowlist);
            assert!(!e2.is_active(0, lifted.net), "{what}: the unban was undone");
            assert_eq!(e2.times_banned(0, lifted.net), 1, "{what}: history kept");
            assert!(e2.is_active(0, kept.net), "{what}: the ban in force was lost");
            let r = e2.active().find(|r| r.net == kept.net).expect("kept");
            let left = r.expires.saturating_sub(at);
            // Never more than it had left when saved.
            assert!(left <= kept.expires - (wall + H), "{what}: {left:?} left");
            assert_eq!(rep.restored, 1, "{what}");
        }
    }

    /// A clock far behind at boot: a ban in force keeps only what it had
    /// left when saved; ban history with far-future times stays history.
    #[test]
    fn a_clock_behind_at_boot_neither_lengthens_nor_revives() {
        let dir = tmpdir();
        let real = Duration::from_secs(1_800_000_000);
        let text = format!(
            "{{\"version\":2,\"saved_unix_ms\":{saved}}}\n\
             {{\"state\":\"in_force\",\"ban\":\"sasl\",\"prefix\":\"203.0.113.0/24\",\"expires_unix_ms\":{exp},\"times\":1,\"failures\":5,\"length_ms\":3600000}}\n\
             {{\"state\":\"ended\",\"ban\":\"sasl\",\"prefix\":\"198.51.100.7/32\",\"ended_unix_ms\":{far},\"times\":3}}\n",
            saved = ms(real),
            exp = ms(real + 30 * 60 * Duration::from_secs(1)),
            far = ms(real + 300 * 24 * H),
        );
        fs::write(dir.path().join(STATE_FILE), text).expect("write");
        let saved = load_saved(dir.path());
        let mut e = BanEngine::new(vec![sasl()]);
        let behind = real - 365 * 24 * H;
        restore_saved(&mut e, &saved, behind, None, &NoAllowlist);
        let r = e.active().next().expect("in force");
        assert_eq!(
            r.expires - behind,
            Duration::from_secs(30 * 60),
            "only the half hour it had left"
        );
        assert!(!e.is_active(0, net("198.51.100.7/32")), "history became a ban");
        assert_eq!(e.times_banned(0, net("198.51.100.7/32")), 3);
    }

    /// A hostile or damaged `bans.json`: each bad entry is refused and
    /// named, the good ones hold.
    #[test]
    fn a_hostile_ban_list_keeps_its_good_entries() {
        let dir = tmpdir();
        let wall = Duration::from_secs(1_800_000_000);
        let exp = ms(wall + H);
        let line = |prefix: &str, ban: &str, extra: &str| {
            format!(
                "{{\"state\":\"in_force\",\"ban\":\"{ban}\",\"prefix\":\"{prefix}\",\"expires_unix_ms\":{exp},\"times\":1,\"failures\":0{extra}}}\n"
            )
        };
        let mut text = format!("{{\"version\":2,\"saved_unix_ms\":{}}}\n", ms(wall));
        text += &line("198.51.100.7/32", "sasl", ",\"length_ms\":3600000");
        text += &line("::/0", "sasl", "");
        text += &line("0.0.0.0/0", "sasl", "");
        text += &line("2001::/16", "sasl", "");
        text += &line("192.0.2.0/25", "sasl", "");
        text += &line("203.0.113.5/32", "nosuch", "");
        text += &line("not-a-net", "sasl", "");
        text += &line("203.0.113.6/32", "sasl", ",\"length_ms\":999999999999999");
        text += "{\"state\":\"in_force\",\"ban\":\"sasl\"}\n";
        text += "\u{0}\u{1}garbage\n";
        text += &line("2001:db8:9::/64", "sasl", "");
        // Truncated in the middle of the last line.
        let cut = line("203.0.113.77/32", "sasl", "");
        text += &cut[..cut.len() / 2];
        fs::write(dir.path().join(STATE_FILE), text).expect("write");
        let saved = load_saved(dir.path());
        let mut e = BanEngine::new(vec![sasl()]);
        let rep = restore_saved(&mut e, &saved, wall, None, &NoAllowlist);
        let mut held: Vec<String> = e.active().map(|r| r.net.to_string()).collect();
        held.sort();
        assert_eq!(held, ["198.51.100.7/32", "2001:db8:9::/64"]);
        assert_eq!(rep.rejected.len(), 10, "{:#?}", rep.rejected);
        for needle in [
            "::/0",
            "0.0.0.0/0",
            "2001::/16",
            "192.0.2.0/25",
            "nosuch",
            "not-a-net",
            "203.0.113.6",
        ] {
            assert!(
                rep.rejected.iter().any(|r| r.contains(needle)),
                "{needle}: {:#?}",
                rep.rejected
            );
        }
    }

    /// A version 1 file: read entry by entry (a bad one does not lose the
    /// rest), bans in force capped at the section's max_ban_time.
    #[test]
    fn a_version_1_list_is_read_entry_by_entry_and_capped() {
        let dir = tmpdir();
        let wall = Duration::from_secs(1_800_000_000);
        let far = ms(wall + 3650 * 24 * H);
        let past = ms(wall - H);
        let text = format!(
            "{{\"version\":1,\"bans\":[\
             {{\"ban\":\"sasl\",\"prefix\":\"198.51.100.7/32\",\"expires_unix_ms\":{far},\"times\":2,\"failures\":5}},\
             {{\"ban\":\"sasl\",\"prefix\":\"not-a-net\",\"expires_unix_ms\":{far},\"times\":1,\"failures\":0}},\
             {{\"ban\":\"sasl\",\"prefix\":\"::/0\",\"expires_unix_ms\":{far},\"times\":1,\"failures\":0}},\
             {{\"ban\":\"sasl\",\"prefix\":\"203.0.113.0/24\",\"expires_unix_ms\":{past},\"times\":4,\"failures\":0}}]}}"
        );
        fs::write(dir.path().join(STATE_FILE), text).expect("write");
        let saved = load_saved(dir.path());
        assert!(saved.legacy);
        let mut e = BanEngine::new(vec![sasl()]);
        let rep = restore_saved(&mut e, &saved, wall, None, &NoAllowlist);
        assert_eq!(rep.rejected.len(), 2, "{:#?}", rep.rejected);
        let r = e.active().next().expect("in force");
        assert_eq!(r.net, net("198.51.100.7/32"));
        assert_eq!(r.expires - wall, 7 * 24 * H, "capped at max_ban_time");
        assert_eq!(e.active_count(), 1);
        assert_eq!(e.times_banned(0, net("203.0.113.0/24")), 4, "expired: history");
        // Truncated: nothing to salvage, but no panic and a named reason.
        fs::write(dir.path().join(STATE_FILE), "{\"version\":1,\"bans\":[{\"ban\":\"sa").expect("write");
        let saved = load_saved(dir.path());
        assert_eq!(saved.rejected.len(), 1);
        assert!(saved.bans.is_empty());
    }

    /// The adopted maps decide: a saved ban the kernel no longer holds (an
    /// unban whose line was lost) is not put back.
    #[test]
    fn with_pins_what_the_kernel_dropped_stays_dropped() {
        let dir = tmpdir();
        let wall = wall_now();
        let mut e = BanEngine::new(vec![sasl()]);
        let a = e.manual(0, net("198.51.100.7/32"), Some(H), wall).expect("ban");
        let b = e.manual(0, net("203.0.113.0/24"), Some(H), wall).expect("ban");
        let list: Vec<SavedBan> = e.active().map(|r| SavedBan::from_record(r, e.sections())).collect();
        save_all(dir.path(), &list, &[], wall).expect("save");
        let boot = boot_ns();
        let kernel: HashMap<(usize, IpNet), u64> = [((0, b.net), boot + 600_000_000_000)].into();
        let mut e2 = BanEngine::new(vec![sasl()]);
        restore_saved(&mut e2, &load_saved(dir.path()), wall, Some(&kernel), &NoAllowlist);
        assert!(!e2.is_active(0, a.net));
        let r = e2.active().next().expect("b");
        assert_eq!(r.net, b.net);
        assert!(
            r.expires - wall <= Duration::from_secs(600),
            "the kernel's expiry, not the file's"
        );
    }

    #[test]
    fn state_dir_must_be_roots_and_not_writable_by_others() {
        let dir = tmpdir();
        assert_eq!(check_state_dir(dir.path()), Ok(()));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = check_state_dir(dir.path()).expect_err("0777 refused");
        assert!(e.contains("writable by group or others"), "{e}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o720)).expect("chmod");
        assert!(check_state_dir(dir.path()).is_err());
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(check_state_dir(dir.path()), Ok(()));
        let missing = dir.path().join("new");
        ensure_state_dir(&missing).expect("created");
        assert_eq!(
            fs::metadata(&missing).expect("meta").permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn the_ban_files_never_follow_a_symlink() {
        let dir = tmpdir();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").expect("write");
        std::os::unix::fs::symlink(&victim, dir.path().join(COMMAND_FILE)).expect("symlink");
        let cmd = Command::Unban {
            prefix: net("198.51.100.7/32"),
            ban: None,
        };
        assert!(append_command(dir.path(), &cmd).is_err(), "bans.cmd through a symlink");
        let (taken, bad) = take_commands(dir.path());
        assert!(taken.is_empty() && bad.len() == 1, "{bad:?}");
        std::os::unix::fs::symlink(&victim, dir.path().join(STATE_FILE)).expect("symlink");
        assert!(
            load_saved(dir.path()).rejected.len() == 1,
            "bans.json read through a symlink"
        );
        save_all(dir.path(), &[], &[], wall_now()).expect("save");
        assert_eq!(fs::read_to_string(&victim).expect("read"), "precious");
        assert!(
            !fs::symlink_metadata(dir.path().join(STATE_FILE))
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        fs::remove_file(dir.path().join(COMMAND_FILE)).expect("rm");
        append_command(dir.path(), &cmd).expect("append");
        let mode = fs::metadata(dir.path().join(COMMAND_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// The CLI's appends and the agent's read-and-truncate race: no line is
    /// lost or read twice.
    #[test]
    fn no_command_line_is_lost_in_the_hand_off() {
        let dir = tmpdir();
        let path = dir.path().to_path_buf();
        let n = 2000u32;
        let writer = std::thread::spawn(move || {
            for i in 0..n {
                let a = std::net::Ipv4Addr::from(0xc633_6400 + (i % 256));
                let cmd = Command::Unban {
                    prefix: IpNet::from(IpAddr::V4(a)),
                    ban: Some(format!("b{i}")),
                };
                append_command(&path, &cmd).expect("append");
            }
        });
        let mut seen = Vec::new();
        while !writer.is_finished() {
            let (c, bad) = take_commands(dir.path());
            assert!(bad.is_empty(), "{bad:?}");
            seen.extend(c);
        }
        writer.join().expect("writer");
        seen.extend(take_commands(dir.path()).0);
        let mut names: Vec<u32> = seen
            .iter()
            .map(|c| match c {
                Command::Unban { ban: Some(b), .. } => b[1..].parse().expect("n"),
                other => panic!("{other:?}"),
            })
            .collect();
        names.sort_unstable();
        assert_eq!(names, (0..n).collect::<Vec<_>>());
    }
}
