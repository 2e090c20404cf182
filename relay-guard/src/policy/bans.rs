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
}

#[derive(Debug, Default)]
struct Tracker {
    /// Times of the failures still inside the window, oldest first.
    times: VecDeque<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct History {
    times: u32,
    /// When the last ban ends (or ended).
    until: Duration,
}

/// The engine: every section's trackers, bans in force, and ban history.
#[derive(Debug)]
pub struct BanEngine {
    sections: Vec<Ban>,
    trackers: HashMap<(usize, IpNet), Tracker>,
    active: HashMap<(usize, IpNet), BanRecord>,
    history: HashMap<(usize, IpNet), History>,
}

/// Most failure trackers kept at once (bounded memory under a spray of
/// sources); past it, trackers whose last failure left the window go first.
pub const MAX_TRACKERS: usize = 1 << 20;

impl BanEngine {
    pub fn new(sections: Vec<Ban>) -> BanEngine {
        BanEngine {
            sections,
            trackers: HashMap::new(),
            active: HashMap::new(),
            history: HashMap::new(),
        }
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
        for ((s, net), mut r) in std::mem::take(&mut self.active) {
            match map.get(s).copied().flatten() {
                Some(n) => {
                    r.section = n;
                    self.active.insert((n, net), r.clone());
                    kept.push(r);
                }
                None => gone.push(r),
            }
        }
        self.trackers = std::mem::take(&mut self.trackers)
            .into_iter()
            .filter_map(|((s, net), t)| map.get(s).copied().flatten().map(|n| ((n, net), t)))
            .collect();
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
        let ban = self.sections.get(section)?;
        let source = canonical(source);
        let host = IpNet::from(source);
        if ban.never.iter().any(|n| n.contains(&source)) {
            return None;
        }
        let len = match source {
            IpAddr::V4(_) => ban.ipv4_prefix,
            IpAddr::V6(_) => ban.ipv6_prefix,
        };
        let net = IpNet::new(source, len).expect("validated prefix length").trunc();
        Some(if ban.touches_never(&net) { host } else { net })
    }

    /// One failed login from `source` at `now`, counted by `section`.
    /// Returns the ban it triggers, if it does.
    pub fn failure(&mut self, section: usize, source: IpAddr, now: Duration) -> Option<BanRecord> {
        let net = self.prefix_of(section, source)?;
        let key = (section, net);
        if self.active.get(&key).is_some_and(|r| r.expires > now) {
            // Already banned: lines written before the ban took hold.
            return None;
        }
        if self.trackers.len() >= MAX_TRACKERS && !self.trackers.contains_key(&key) {
            self.prune(now);
            if self.trackers.len() >= MAX_TRACKERS {
                return None;
            }
        }
        let window = self.sections[section].window;
        let needed = self.sections[section].failures as usize;
        let t = self.trackers.entry(key).or_default();
        while t.times.front().is_some_and(|&f| now.saturating_sub(f) >= window) {
            t.times.pop_front();
        }
        t.times.push_back(now);
        if t.times.len() < needed {
            return None;
        }
        let failures = t.times.len() as u32;
        self.trackers.remove(&key);
        Some(self.put(section, net, None, now, failures))
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
        let ban = self.sections.get(section).ok_or(BanRefused::NoSection(section))?;
        let net = net.trunc();
        if ban.touches_never(&net) {
            return Err(BanRefused::Never {
                net,
                ban: ban.name.clone(),
            });
        }
        let min = match net {
            IpNet::V4(_) => crate::config::ban::MIN_IPV4_PREFIX,
            IpNet::V6(_) => crate::config::ban::MIN_IPV6_PREFIX,
        };
        if net.prefix_len() < min {
            return Err(BanRefused::TooShort { net, min });
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
        };
        self.history.insert(
            key,
            History {
                times,
                until: record.expires,
            },
        );
        self.active.insert(key, record.clone());
        record
    }

    /// Lifts every ban of `net` (exact prefix), in every section or in
    /// `section` only; returns what was lifted. History stays, so the next
    /// ban still escalates.
    pub fn lift(&mut self, net: IpNet, section: Option<usize>) -> Vec<BanRecord> {
        let keys: Vec<_> = self
            .active
            .keys()
            .filter(|(s, n)| *n == net && section.is_none_or(|x| x == *s))
            .copied()
            .collect();
        keys.into_iter().filter_map(|k| self.active.remove(&k)).collect()
    }

    /// Bans whose time is up at `now`, removed from the active set.
    pub fn expire(&mut self, now: Duration) -> Vec<BanRecord> {
        let done: Vec<_> = self
            .active
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        done.into_iter().filter_map(|k| self.active.remove(&k)).collect()
    }

    /// Forgets trackers whose failures all left the window and histories of
    /// bans that ended more than `max_ban_time` ago (escalation then starts
    /// over).
    pub fn prune(&mut self, now: Duration) {
        let sections = &self.sections;
        self.trackers.retain(|(s, _), t| {
            t.times
                .back()
                .is_some_and(|&last| now.saturating_sub(last) < sections[*s].window)
        });
        self.history
            .retain(|(s, _), h| now.saturating_sub(h.until) < sections[*s].max_ban_time);
    }

    /// Takes a ban back in (restored from `state_dir`, or read back from the
    /// kernel after the CLI put it there). Returns whether it is in force;
    /// an expired one only adds to the prefix's history (so the next ban
    /// still escalates), unless that is older than `max_ban_time`.
    pub fn restore(&mut self, record: BanRecord, now: Duration) -> bool {
        let Some(ban) = self.sections.get(record.section) else {
            return false;
        };
        if ban.touches_never(&record.net) {
            return false;
        }
        let key = (record.section, record.net);
        if record.expires <= now {
            if now.saturating_sub(record.expires) < ban.max_ban_time {
                let h = self.history.entry(key).or_insert(History {
                    times: 0,
                    until: record.expires,
                });
                h.times = h.times.max(record.times);
                h.until = h.until.max(record.expires);
            }
            return false;
        }
        let h = self.history.entry(key).or_insert(History {
            times: 0,
            until: record.expires,
        });
        h.times = h.times.max(record.times);
        h.until = h.until.max(record.expires);
        self.active.insert(key, record);
        true
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
