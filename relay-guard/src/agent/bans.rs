//! The agent's side of bans (SPEC.md "Bans"): failures from the log
//! followers into the engine, the engine's bans into the kernel, the ban
//! list saved in `state_dir` and restored at start, the CLI's bans taken in,
//! and the ban metrics.
//!
//! Persistence: `state_dir/bans.json` holds every ban in force with its
//! wall-clock expiry and how often the prefix was banned; `bans.cmd` holds
//! the CLI's `ban`/`unban` lines not yet taken in (one JSON object a line,
//! appended). The CLI writes the pinned maps itself (the ban holds at once,
//! agent or not) and appends its line; the agent takes the file in on its
//! next tick (and at start), so its engine and `bans.json` agree with the
//! maps, and it never lifts what the CLI put there. At start the agent reads
//! `bans.json`, then `bans.cmd`, then the maps themselves (a pinned ban the
//! files do not know is kept), drops what has expired, and writes the rest
//! back with the time that remains.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    config::{Config, ban::Ban},
    kernel::bans::{BanMaps, boot_expiry, boot_ns, wall_expiry, wall_now},
    policy::bans::{BanEngine, BanRecord, FailureOrigin},
};

/// The ban list in `state_dir`.
pub const STATE_FILE: &str = "bans.json";
/// The CLI's pending `ban`/`unban` lines in `state_dir`.
pub const COMMAND_FILE: &str = "bans.cmd";

/// One failed login for the engine: which `[[ban]]` section's logs it came
/// from, who failed, and where it was logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub ban: usize,
    pub source: IpAddr,
    pub origin: FailureOrigin,
    pub at: SystemTime,
}

/// One saved ban (`bans.json`, and the CLI's `bans --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBan {
    /// The `[[ban]]` section's name.
    pub ban: String,
    #[serde(with = "net_str")]
    pub prefix: IpNet,
    /// Wall-clock expiry, Unix milliseconds.
    pub expires_unix_ms: u64,
    /// Times this prefix was banned by this section (this ban included).
    pub times: u32,
    /// Failures that triggered it (0: manual).
    pub failures: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    bans: Vec<SavedBan>,
}

/// One line of `bans.cmd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command {
    Ban(SavedBan),
    Unban {
        #[serde(with = "net_str")]
        prefix: IpNet,
        /// `None`: every section.
        ban: Option<String>,
    },
}

/// A prefix as its text (`198.51.100.0/24`).
mod net_str {
    use ipnet::IpNet;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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
        }
    }

    fn record(&self, sections: &[Ban]) -> Option<BanRecord> {
        Some(BanRecord {
            section: sections.iter().position(|b| b.name == self.ban)?,
            net: self.prefix.trunc(),
            expires: Duration::from_millis(self.expires_unix_ms),
            times: self.times.max(1),
            failures: self.failures,
        })
    }
}

/// Reads `bans.json` (missing: empty; unreadable: empty, logged).
pub fn load_saved(state_dir: &Path) -> Vec<SavedBan> {
    let path = state_dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
            Ok(s) => s.bans,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "saved ban list unreadable; starting without it");
                Vec::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "saved ban list unreadable; starting without it");
            Vec::new()
        }
    }
}

/// Writes `bans.json` atomically (a temporary file renamed over it).
pub fn save(state_dir: &Path, bans: Vec<SavedBan>) -> std::io::Result<()> {
    fs::create_dir_all(state_dir)?;
    let path = state_dir.join(STATE_FILE);
    let tmp = state_dir.join(format!("{STATE_FILE}.tmp"));
    let bytes = serde_json::to_vec(&StateFile { version: 1, bans }).map_err(std::io::Error::other)?;
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)
}

/// Appends one command line to `bans.cmd` (the CLI).
pub fn append_command(state_dir: &Path, cmd: &Command) -> std::io::Result<()> {
    fs::create_dir_all(state_dir)?;
    let mut line = serde_json::to_vec(cmd).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join(COMMAND_FILE))?;
    // One write of a whole line: appends from two CLIs do not interleave.
    f.write_all(&line)
}

/// Takes the pending commands: renames `bans.cmd` aside, reads it, removes it.
pub fn take_commands(state_dir: &Path) -> Vec<Command> {
    let path = state_dir.join(COMMAND_FILE);
    let taking = state_dir.join(format!("{COMMAND_FILE}.taking"));
    // A leftover from a crash between rename and removal comes first.
    let mut out = read_commands(&taking);
    if fs::rename(&path, &taking).is_ok() {
        out.extend(read_commands(&taking));
    }
    let _ = fs::remove_file(&taking);
    out
}

fn read_commands(path: &Path) -> Vec<Command> {
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "skipping an unreadable ban command line");
                None
            }
        })
        .collect()
}

/// The ban metrics.
#[derive(Debug, Clone, Default)]
pub struct BanMetrics {
    pub bans: Family<Vec<(&'static str, String)>, Gauge>,
    pub events: Family<Vec<(&'static str, String)>, Counter>,
    pub auth_failures: Family<Vec<(&'static str, String)>, Counter>,
    pub unparsed: Family<Vec<(&'static str, String)>, Counter>,
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
}

/// The agent's ban state.
pub struct BanRunner {
    engine: BanEngine,
    state_dir: PathBuf,
    /// `bans.json` is behind the engine.
    dirty: bool,
    /// The `relay_guard_bans` gauges are behind the engine (recounted at
    /// the next tick: a count is O(bans), a burst must not pay it per ban).
    gauges_dirty: bool,
    last_save: Instant,
    last_gc: Instant,
    pub metrics: BanMetrics,
    /// Counter port slot → port (for the `port` label of banned drops).
    pub port_slots: BTreeMap<u32, u16>,
}

/// How often expired entries are deleted from the tries (the kernel
/// ignores them meanwhile: expiry is its own decision).
const GC_INTERVAL: Duration = Duration::from_secs(60);
/// `bans.json` is rewritten at most this often.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl BanRunner {
    /// Restores the saved bans, takes in the CLI's pending ones and those
    /// only the pinned maps know, and writes them all to the kernel.
    ///
    /// `adopted`: the maps were pinned before (else they are new and empty,
    /// and nothing needs reading back).
    pub fn start(cfg: &Config, maps: &mut BanMaps, adopted: bool) -> anyhow::Result<BanRunner> {
        let started = Instant::now();
        let mut r = BanRunner {
            engine: BanEngine::new(cfg.bans.clone()),
            state_dir: cfg.state_dir.clone(),
            dirty: false,
            gauges_dirty: false,
            last_save: Instant::now(),
            last_gc: Instant::now(),
            metrics: BanMetrics::default(),
            port_slots: maps.set_ports(&cfg.bans, adopted)?,
        };
        let (wall, boot) = (wall_now(), boot_ns());
        let saved = load_saved(&cfg.state_dir);
        let mut restored = 0usize;
        let mut dropped = 0usize;
        r.engine.reserve(saved.len());
        for s in &saved {
            if s.record(&cfg.bans).is_some_and(|rec| r.engine.restore(rec, wall)) {
                restored += 1;
            } else {
                dropped += 1;
            }
        }
        r.take_commands(maps);
        // Bans only the maps hold (a CLI ban whose line was lost): kept.
        let in_kernel = if adopted { maps.list()? } else { Vec::new() };
        for kb in &in_kernel {
            for (s, &x) in kb.expires_ns.iter().enumerate() {
                if x > boot && s < cfg.bans.len() && r.engine.times_banned(s, kb.net) == 0 {
                    let rec = BanRecord {
                        section: s,
                        net: kb.net,
                        expires: wall_expiry(x, wall, boot),
                        times: 1,
                        failures: 0,
                    };
                    r.engine.restore(rec, wall);
                }
            }
        }
        // What the engine holds goes to the kernel with the time left; the
        // rest of the maps (expired, or of sections gone) is cleared.
        let want: HashMap<(usize, IpNet), u64> = r
            .engine
            .active()
            .map(|b| ((b.section, b.net), boot_expiry(b.expires, wall, boot)))
            .collect();
        let mut removed = false;
        for kb in &in_kernel {
            for (s, &x) in kb.expires_ns.iter().enumerate() {
                if x != 0 && !want.contains_key(&(s, kb.net)) {
                    maps.unban(kb.net, Some(s), boot)?;
                    removed = true;
                }
            }
        }
        for ((s, net), x) in &want {
            maps.ban(*s, *net, *x)?;
        }
        if removed {
            maps.rebuild_filter()?;
        }
        // Saved at the first tick (a second from now), not before the
        // start completes: the file already holds every ban restored.
        r.dirty = true;
        r.refresh_gauges();
        info!(
            restored,
            dropped_expired = dropped,
            in_force = r.engine.active_count(),
            took_ms = started.elapsed().as_millis() as u64,
            "bans restored"
        );
        Ok(r)
    }

    pub fn sections(&self) -> &[Ban] {
        self.engine.sections()
    }

    /// One failed login.
    pub fn failure(&mut self, maps: &mut BanMaps, f: &AuthFailure) {
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
        if let Some(rec) = self.engine.failure(f.ban, f.source, at) {
            self.apply(maps, &rec);
            info!(ban = %name, prefix = %rec.net, failures = rec.failures, times = rec.times, until = %humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + rec.expires), "banned");
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

    fn apply(&mut self, maps: &mut BanMaps, rec: &BanRecord) {
        let x = boot_expiry(rec.expires, wall_now(), boot_ns());
        if let Err(e) = maps.ban(rec.section, rec.net, x) {
            warn!(prefix = %rec.net, error = %e, "failed to write a ban to the kernel");
        }
        let name = self.engine.sections()[rec.section].name.clone();
        self.metrics.event(&name, "banned", 1);
        self.dirty = true;
        self.gauges_dirty = true;
    }

    /// Takes in the CLI's pending commands (already in the maps).
    fn take_commands(&mut self, maps: &mut BanMaps) {
        let wall = wall_now();
        for c in take_commands(&self.state_dir) {
            match c {
                Command::Ban(s) => {
                    if let Some(rec) = s.record(self.engine.sections()) {
                        let name = s.ban.clone();
                        self.engine.lift(rec.net, Some(rec.section));
                        if self.engine.restore(rec, wall) {
                            self.metrics.event(&name, "banned", 1);
                        }
                    }
                }
                Command::Unban { prefix, ban } => {
                    let section = ban.as_deref().and_then(|n| self.engine.section_index(n));
                    if ban.is_some() && section.is_none() {
                        continue;
                    }
                    for r in self.engine.lift(prefix.trunc(), section) {
                        let name = self.engine.sections()[r.section].name.clone();
                        self.metrics.event(&name, "lifted", 1);
                        // The CLI lifted it in the kernel already; again, in
                        // case the agent's own write raced it.
                        let _ = maps.unban(r.net, Some(r.section), boot_ns());
                    }
                }
            }
            self.dirty = true;
            self.gauges_dirty = true;
        }
    }

    /// The periodic work: the CLI's commands, expiry accounting, saving,
    /// and now and then deleting expired entries from the maps.
    pub fn tick(&mut self, maps: &mut BanMaps) {
        self.take_commands(maps);
        let now = wall_now();
        let expired = self.engine.expire(now);
        if !expired.is_empty() {
            let mut by: BTreeMap<String, u64> = BTreeMap::new();
            for r in &expired {
                *by.entry(self.engine.sections()[r.section].name.clone()).or_default() += 1;
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
            self.save_now();
        }
    }

    /// A reload: sections matched by name keep their bans; bans of removed
    /// sections are lifted.
    pub fn reconfigure(&mut self, cfg: &Config, maps: &mut BanMaps) {
        let old: Vec<String> = self.engine.sections().iter().map(|b| b.name.clone()).collect();
        let (kept, gone) = self.engine.reconfigure(cfg.bans.clone());
        let boot = boot_ns();
        for r in &gone {
            let _ = maps.unban(r.net, Some(r.section), boot);
        }
        // Section indexes may have moved: rewrite the kept ones under the
        // new index (the old slot is cleared by the lift below).
        let wall = wall_now();
        for r in &kept {
            if let Some(i) = old.iter().position(|n| *n == cfg.bans[r.section].name)
                && i != r.section
            {
                let _ = maps.unban(r.net, Some(i), boot);
            }
            let _ = maps.ban(r.section, r.net, boot_expiry(r.expires, wall, boot));
        }
        // A `never` entry added by the reload wins over a ban in force.
        let now_never: Vec<(usize, IpNet)> = self
            .engine
            .active()
            .filter(|r| cfg.bans[r.section].touches_never(&r.net))
            .map(|r| (r.section, r.net))
            .collect();
        for (s, net) in now_never {
            for r in self.engine.lift(net, Some(s)) {
                let _ = maps.unban(r.net, Some(r.section), boot);
                self.metrics.event(&cfg.bans[s].name, "lifted", 1);
                info!(ban = %cfg.bans[s].name, prefix = %r.net, "ban lifted: the prefix is in or covers a `never` entry now");
            }
        }
        match maps.set_ports(&cfg.bans, true) {
            Ok(slots) => self.port_slots = slots,
            Err(e) => warn!(error = %e, "failed to write the ban ports"),
        }
        self.state_dir = cfg.state_dir.clone();
        self.dirty = true;
        self.metrics.bans.clear();
        self.refresh_gauges();
    }

    pub fn save_now(&mut self) {
        let sections = self.engine.sections().to_vec();
        let mut list: Vec<SavedBan> = self
            .engine
            .active()
            .map(|r| SavedBan::from_record(r, &sections))
            .collect();
        // Ended bans too, for escalation across restarts (pruned after
        // max_ban_time by the engine).
        list.extend(self.engine.history().map(|(s, net, times, until)| SavedBan {
            ban: sections.get(s).map_or_else(String::new, |b| b.name.clone()),
            prefix: net,
            expires_unix_ms: ms(until),
            times,
            failures: 0,
        }));
        match save(&self.state_dir, list) {
            Ok(()) => self.dirty = false,
            Err(e) => warn!(state_dir = %self.state_dir.display(), error = %e, "failed to save the ban list"),
        }
        self.last_save = Instant::now();
    }

    fn refresh_gauges(&mut self) {
        self.gauges_dirty = false;
        let mut counts: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for b in self.engine.sections() {
            counts.insert((b.name.clone(), "ipv4"), 0);
            counts.insert((b.name.clone(), "ipv6"), 0);
        }
        for r in self.engine.active() {
            let fam = if r.net.addr().is_ipv4() { "ipv4" } else { "ipv6" };
            *counts
                .entry((self.engine.sections()[r.section].name.clone(), fam))
                .or_default() += 1;
        }
        for ((ban, fam), n) in counts {
            self.metrics
                .bans
                .get_or_create(&vec![("ban", ban), ("family", fam.to_string())])
                .set(n);
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
    pub fn start(cfg: &Config) -> Inputs {
        use crate::logwatch::{LogEvent, Origin, Source};
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let mut watches = Vec::new();
        let mut tasks = Vec::new();
        for (i, b) in cfg.bans.iter().enumerate() {
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
            sections: cfg.bans.clone(),
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
