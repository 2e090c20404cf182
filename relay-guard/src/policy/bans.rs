//! The ban engine (SPEC.md "Bans"), pure: failures in, ban orders out.
//!
//! Per (ban section, source prefix) it counts failures in a sliding window;
//! the `failures`-th within `window` bans the prefix for `ban_time`,
//! doubled for each earlier ban of the same prefix (capped at
//! `max_ban_time`). `never` always wins: a failure from a `never` source
//! counts nothing, and a prefix that would cover a `never` entry shrinks to
//! the single failing address. Time is wall-clock time as a [`Duration`]
//! since the Unix epoch, passed in by the caller (tests drive it); the
//! kernel layer turns expiries into its own clock.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;
use lru::LruCache;

use crate::config::ban::Ban;

/// Where a failure was logged (a label of `relay_guard_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureOrigin {
    Postfix,
    Dovecot,
}

impl FailureOrigin {
    pub fn label(self) -> &'static str {
        match self {
            FailureOrigin::Postfix => "postfix",
            FailureOrigin::Dovecot => "dovecot",
        }
    }
}

/// One ban in force (or to be put in force), as the kernel and the state
/// file need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanRecord {
    /// Index of the `[[ban]]` section.
    pub section: usize,
    /// The banned prefix (host bits clear).
    pub net: IpNet,
    /// Wall-clock expiry, since the Unix epoch.
    pub expires: Duration,
    /// How many times this prefix has been banned by this section, this
    /// ban included.
    pub times: u32,
    /// Failures counted when it was banned (0 for a manual ban).
    pub failures: u32,
    /// The ban's own length (what it was given when put in force): a
    /// restore never keeps it in force for longer than this.
    pub length: Duration,
}

/// Why a manual ban was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BanRefused {
    #[error("`{net}` is in or covers a `never` entry of ban `{ban}`")]
    Never { net: IpNet, ban: String },
    #[error("`{net}` is shorter than /{min}, the shortest ban the kernel filter takes")]
    TooShort { net: IpNet, min: u8 },
    #[error("no ban section number {0}")]
    NoSection(usize),
    #[error("`{net}`: a ban of {secs} s is longer than the longest a ban may last ({max} s)")]
    TooLong { net: IpNet, secs: u64, max: u64 },
}

/// What a guard allows explicitly, for log-fed bans (SPEC.md "Who may aim
/// a ban"): an allow entry other than `0.0.0.0/0` or `::/0` of a guard that
/// covers one of the ban section's ports.
pub trait Allowed {
    /// Whether such an entry decides for `addr` (its longest match is an
    /// allow entry that is not a /0).
    fn allows(&self, ports: &[u16], addr: IpAddr) -> bool;
    /// Whether such an allow entry lies inside `net` (banning `net` would
    /// shut it out).
    fn allows_within(&self, ports: &[u16], net: &IpNet) -> bool;
}

/// No guard allows anything (tests, the CLI, the bench).
pub struct NoAllowlist;

impl Allowed for NoAllowlist {
    fn allows(&self, _: &[u16], _: IpAddr) -> bool {
        false
    }
    fn allows_within(&self, _: &[u16], _: &IpNet) -> bool {
        false
    }
}

/// What a failure came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Counted; no ban (yet), or already banned.
    Counted,
    /// The source is in `never`: nothing counted.
    Never,
    /// A guard allows the source explicitly and the section has no
    /// `ban_allowed`: nothing counted.
    Allowlisted,
    /// The failure bans this.
    Banned(BanRecord),
}

#[derive(Debug, Default)]
struct Tracker {
    /// Times of the failures still inside the window, oldest first.
    times: VecDeque<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct History {
    times: u32,
    /// When the last ban ends (or ended: lifted, or expired).
    until: Duration,
}

/// The engine: every section's trackers, bans in force, and ban history.
pub struct BanEngine {
    sections: Vec<Ban>,
    /// Least recently failed first: at [`MAX_TRACKERS`] the oldest goes, at
    /// O(1) per failure.
    trackers: LruCache<(usize, IpNet), Tracker>,
    active: HashMap<(usize, IpNet), BanRecord>,
    history: HashMap<(usize, IpNet), History>,
    /// Trackers evicted to make room (a counter for the metrics).
    evicted: u64,
    max_trackers: usize,
    /// No ban in force ends before this: [`Self::expire`] scans nothing
    /// until then (a second's tick with a million bans costs nothing).
    next_expiry: Duration,
    /// Bans in force per (section, IPv6), kept as they change (the gauges
    /// read it without a count over every ban).
    counts: HashMap<(usize, bool), i64>,
}

impl std::fmt::Debug for BanEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BanEngine")
            .field("sections", &self.sections)
            .field("trackers", &self.trackers.len())
            .field("active", &self.active.len())
            .field("history", &self.history.len())
            .finish()
    }
}

/// Most failure trackers kept at once (bounded memory under a spray of
/// sources); past it, the least recently failed tracker is evicted.
pub const MAX_TRACKERS: usize = 1 << 20;

impl BanEngine {
    pub fn new(sections: Vec<Ban>) -> BanEngine {
        BanEngine::with_tracker_cap(sections, MAX_TRACKERS)
    }

    /// An engine that keeps at most `cap` trackers (tests).
    pub fn with_tracker_cap(sections: Vec<Ban>, cap: usize) -> BanEngine {
        BanEngine {
            sections,
            // Unbounded as a cache (it would allocate its whole capacity up
            // front); the cap is enforced in `failure`.
            trackers: LruCache::unbounded(),
            active: HashMap::new(),
            history: HashMap::new(),
            evicted: 0,
            max_trackers: cap.max(1),
            next_expiry: Duration::MAX,
            counts: HashMap::new(),
        }
    }

    fn insert_active(&mut self, key: (usize, IpNet), r: BanRecord) {
        if self.active.insert(key, r).is_none() {
            *self.counts.entry((key.0, key.1.addr().is_ipv6())).or_default() += 1;
        }
    }

    fn remove_active(&mut self, key: &(usize, IpNet)) -> Option<BanRecord> {
        let r = self.active.remove(key)?;
        *self.counts.entry((key.0, key.1.addr().is_ipv6())).or_default() -= 1;
        Some(r)
    }

    /// Bans in force of `section` in one family.
    pub fn count(&self, section: usize, v6: bool) -> i64 {
        self.counts.get(&(section, v6)).copied().unwrap_or(0)
    }

    /// Trackers evicted so far to make room for new sources.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    pub fn tracker_count(&self) -> usize {
        self.trackers.len()
    }

    /// Room for `n` more bans (a restore of many).
    pub fn reserve(&mut self, n: usize) {
        self.active.reserve(n);
        self.history.reserve(n);
    }

    pub fn sections(&self) -> &[Ban] {
        &self.sections
    }

    /// The section named `name`.
    pub fn section_index(&self, name: &str) -> Option<usize> {
        self.sections.iter().position(|b| b.name == name)
    }

    /// Replaces the sections (a reload). Bans of sections that keep their
    /// name keep their index mapping; the caller re-applies the returned
    /// records (bans of removed sections are dropped from the engine and
    /// returned separately so the kernel can lift them).
    pub fn reconfigure(&mut self, sections: Vec<Ban>) -> (Vec<BanRecord>, Vec<BanRecord>) {
        let map: Vec<Option<usize>> = self
            .sections
            .iter()
            .map(|old| sections.iter().position(|b| b.name == old.name))
            .collect();
        self.sections = sections;
        let mut kept = Vec::new();
        let mut gone = Vec::new();
        self.counts.clear();
        for ((s, net), mut r) in std::mem::take(&mut self.active) {
            match map.get(s).copied().flatten() {
                Some(n) => {
                    r.section = n;
                    self.insert_active((n, net), r.clone());
                    kept.push(r);
                }
                None => gone.push(r),
            }
        }
        let mut trackers = LruCache::unbounded();
        // Oldest first, so the new cache keeps the order.
        while let Some(((s, net), t)) = self.trackers.pop_lru() {
            if let Some(n) = map.get(s).copied().flatten() {
                trackers.push((n, net), t);
            }
        }
        self.trackers = trackers;
        self.history = std::mem::take(&mut self.history)
            .into_iter()
            .filter_map(|((s, net), h)| map.get(s).copied().flatten().map(|n| ((n, net), h)))
            .collect();
        (kept, gone)
    }

    /// The prefix that stands for `source` in `section`: its /ipv4_prefix
    /// or /ipv6_prefix, or the address alone when that prefix would cover a
    /// `never` entry. `None`: the source is in `never`.
    pub fn prefix_of(&self, section: usize, source: IpAddr) -> Option<IpNet> {
        self.prefix_checked(section, source, &NoAllowlist).ok()
    }

    /// [`Self::prefix_of`], and for a section without `ban_allowed`: the
    /// source is refused when a guard allows it explicitly, and the prefix
    /// shrinks to the address alone when it would cover such an entry.
    fn prefix_checked(&self, section: usize, source: IpAddr, allowed: &dyn Allowed) -> Result<IpNet, Outcome> {
        let ban = self.sections.get(section).ok_or(Outcome::Never)?;
        let source = canonical(source);
        let host = IpNet::from(source);
        if ban.never.iter().any(|n| n.contains(&source)) {
            return Err(Outcome::Never);
        }
        if !ban.ban_allowed && allowed.allows(&ban.ports, source) {
            return Err(Outcome::Allowlisted);
        }
        let len = match source {
            IpAddr::V4(_) => ban.ipv4_prefix,
            IpAddr::V6(_) => ban.ipv6_prefix,
        };
        let net = IpNet::new(source, len).expect("validated prefix length").trunc();
        if net == host {
            return Ok(net);
        }
        let shared = ban.touches_never(&net) || (!ban.ban_allowed && allowed.allows_within(&ban.ports, &net));
        Ok(if shared { host } else { net })
    }

    /// One failed login from `source` at `now`, counted by `section`.
    /// Returns the ban it triggers, if it does.
    pub fn failure(&mut self, section: usize, source: IpAddr, now: Duration) -> Option<BanRecord> {
        match self.failure_checked(section, source, now, &NoAllowlist) {
            Outcome::Banned(r) => Some(r),
            _ => None,
        }
    }

    /// One failed login, with the guards' explicit allows (SPEC.md "Who may
    /// aim a ban").
    pub fn failure_checked(&mut self, section: usize, source: IpAddr, now: Duration, allowed: &dyn Allowed) -> Outcome {
        let net = match self.prefix_checked(section, source, allowed) {
            Ok(net) => net,
            Err(o) => return o,
        };
        let key = (section, net);
        if self.active.get(&key).is_some_and(|r| r.expires > now) {
            // Already banned: lines written before the ban took hold.
            return Outcome::Counted;
        }
        let window = self.sections[section].window;
        let needed = self.sections[section].failures as usize;
        // `get_mut` marks it the most recently failed; a new source at the
        // cap takes the place of the least recently failed one.
        if self.trackers.get_mut(&key).is_none() {
            while self.trackers.len() >= self.max_trackers {
                if self.trackers.pop_lru().is_none() {
                    break;
                }
                self.evicted += 1;
            }
            self.trackers.push(key, Tracker::default());
        }
        let Some(t) = self.trackers.get_mut(&key) else {
            return Outcome::Counted;
        };
        while t.times.front().is_some_and(|&f| now.saturating_sub(f) >= window) {
            t.times.pop_front();
        }
        t.times.push_back(now);
        if t.times.len() < needed {
            return Outcome::Counted;
        }
        let failures = t.times.len() as u32;
        self.trackers.pop(&key);
        Outcome::Banned(self.put(section, net, None, now, failures))
    }

    /// Whether `net` may be banned by `section` at all (what the CLI
    /// refuses, and what a restore refuses): the section exists, `net` is
    /// no shorter than the kernel filter takes, and it neither lies in nor
    /// covers a `never` entry. Returns `net` with host bits cleared.
    pub fn check(&self, section: usize, net: IpNet) -> Result<IpNet, BanRefused> {
        let ban = self.sections.get(section).ok_or(BanRefused::NoSection(section))?;
        let net = net.trunc();
        let min = match net {
            IpNet::V4(_) => crate::config::ban::MIN_IPV4_PREFIX,
            IpNet::V6(_) => crate::config::ban::MIN_IPV6_PREFIX,
        };
        if net.prefix_len() < min {
            return Err(BanRefused::TooShort { net, min });
        }
        if ban.touches_never(&net) {
            return Err(BanRefused::Never {
                net,
                ban: ban.name.clone(),
            });
        }
        Ok(net)
    }

    /// A manual ban (`relay-guard ban`): `net` for `length` (default: the
    /// section's escalated ban time).
    pub fn manual(
        &mut self,
        section: usize,
        net: IpNet,
        length: Option<Duration>,
        now: Duration,
    ) -> Result<BanRecord, BanRefused> {
        let net = self.check(section, net)?;
        if let Some(l) = length
            && l > crate::config::ban::MAX_DURATION
        {
            return Err(BanRefused::TooLong {
                net,
                secs: l.as_secs(),
                max: crate::config::ban::MAX_DURATION.as_secs(),
            });
        }
        Ok(self.put(section, net, length, now, 0))
    }

    fn put(&mut self, section: usize, net: IpNet, length: Option<Duration>, now: Duration, failures: u32) -> BanRecord {
        let ban = &self.sections[section];
        let key = (section, net);
        let earlier = self.history.get(&key).map_or(0, |h| h.times);
        let length = length.unwrap_or_else(|| escalated(ban.ban_time, ban.max_ban_time, earlier));
        let times = earlier.saturating_add(1);
        let record = BanRecord {
            section,
            net,
            expires: now + length,
            times,
            failures,
            length,
        };
        self.history.insert(
            key,
            History {
                times,
                until: record.expires,
            },
        );
        self.next_expiry = self.next_expiry.min(record.expires);
        self.insert_active(key, record.clone());
        record
    }

    /// Lifts every ban of `net` (exact prefix), in every section or in
    /// `section` only; returns what was lifted. History stays, so the next
    /// ban still escalates, but it records the ban as ended `now`: a lifted
    /// ban is over, whatever its original expiry said.
    pub fn lift(&mut self, net: IpNet, section: Option<usize>, now: Duration) -> Vec<BanRecord> {
        let keys: Vec<_> = self
            .active
            .keys()
            .filter(|(s, n)| *n == net && section.is_none_or(|x| x == *s))
            .copied()
            .collect();
        let mut out = Vec::new();
        for k in keys {
            if let Some(r) = self.remove_active(&k) {
                if let Some(h) = self.history.get_mut(&k) {
                    h.until = h.until.min(now);
                }
                out.push(r);
            }
        }
        out
    }

    /// Bans whose time is up at `now`, removed from the active set (a scan
    /// only when one is due).
    pub fn expire(&mut self, now: Duration) -> Vec<BanRecord> {
        if now < self.next_expiry {
            return Vec::new();
        }
        let done: Vec<_> = self
            .active
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        let out: Vec<BanRecord> = done.into_iter().filter_map(|k| self.remove_active(&k)).collect();
        self.next_expiry = self.active.values().map(|r| r.expires).min().unwrap_or(Duration::MAX);
        out
    }

    /// Forgets trackers whose failures all left the window and histories of
    /// bans that ended more than `max_ban_time` ago (escalation then starts
    /// over). Trackers are visited least recently failed first, and only
    /// until one is still fresh.
    pub fn prune(&mut self, now: Duration) {
        let sections = &self.sections;
        while let Some(((s, _), t)) = self.trackers.peek_lru() {
            let fresh = t
                .times
                .back()
                .is_some_and(|&last| now.saturating_sub(last) < sections[*s].window);
            if fresh {
                break;
            }
            self.trackers.pop_lru();
        }
        self.history
            .retain(|(s, _), h| now.saturating_sub(h.until) < sections[*s].max_ban_time);
    }

    /// Takes a ban in force back in (restored from `state_dir`, or read
    /// back from the kernel after the CLI put it there), checked like the
    /// CLI's input ([`Self::check`]). The caller has capped `expires`
    /// (never later than the ban's own length allows). `Ok(false)`: it has
    /// ended (it only adds to the prefix's history).
    pub fn restore(&mut self, record: BanRecord, now: Duration) -> Result<bool, BanRefused> {
        let net = self.check(record.section, record.net)?;
        let record = BanRecord { net, ..record };
        if record.length > crate::config::ban::MAX_DURATION {
            return Err(BanRefused::TooLong {
                net,
                secs: record.length.as_secs(),
                max: crate::config::ban::MAX_DURATION.as_secs(),
            });
        }
        let key = (record.section, net);
        if record.expires <= now {
            self.restore_history(record.section, net, record.times, record.expires, now)?;
            return Ok(false);
        }
        let h = self.history.entry(key).or_insert(History {
            times: 0,
            until: record.expires,
        });
        h.times = h.times.max(record.times);
        h.until = record.expires;
        self.next_expiry = self.next_expiry.min(record.expires);
        self.insert_active(key, record);
        Ok(true)
    }

    /// Takes an ended ban back in: history only (the next ban of the prefix
    /// escalates), never a ban, whatever the clock says.
    pub fn restore_history(
        &mut self,
        section: usize,
        net: IpNet,
        times: u32,
        ended: Duration,
        now: Duration,
    ) -> Result<(), BanRefused> {
        let net = self.check(section, net)?;
        let ban = &self.sections[section];
        // An end in the future (a clock behind now, or a hostile file) is
        // taken as now: history is not a ban.
        let ended = ended.min(now);
        if now.saturating_sub(ended) >= ban.max_ban_time {
            return Ok(());
        }
        let h = self
            .history
            .entry((section, net))
            .or_insert(History { times: 0, until: ended });
        h.times = h.times.max(times);
        if !self.active.contains_key(&(section, net)) {
            h.until = h.until.max(ended).min(now);
        }
        Ok(())
    }

    /// Every prefix with a ban history but no ban in force: (section,
    /// prefix, times banned, when the last ban ended), for saving.
    pub fn history(&self) -> impl Iterator<Item = (usize, IpNet, u32, Duration)> + '_ {
        self.history
            .iter()
            .filter(|(k, _)| !self.active.contains_key(k))
            .map(|(&(s, n), h)| (s, n, h.times, h.until))
    }

    /// The bans in force, in no particular order.
    pub fn active(&self) -> impl Iterator<Item = &BanRecord> {
        self.active.values()
    }

    /// Whether `section` bans exactly `net` now.
    pub fn is_active(&self, section: usize, net: IpNet) -> bool {
        self.active.contains_key(&(section, net))
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Times `net` has been banned by `section` (0: never, or forgotten).
    pub fn times_banned(&self, section: usize, net: IpNet) -> u32 {
        self.history.get(&(section, net)).map_or(0, |h| h.times)
    }
}

/// `ban_time * 2^earlier`, capped at `max`.
pub fn escalated(ban_time: Duration, max: Duration, earlier: u32) -> Duration {
    let factor = 1u32.checked_shl(earlier.min(31)).unwrap_or(u32::MAX);
    ban_time.checked_mul(factor).map_or(max, |d| d.min(max))
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as a dual-stack daemon
/// logs an IPv4 client) stand for the IPv4 address.
pub fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests;
