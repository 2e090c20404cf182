//! From LAPI's decisions to ban entries: which prefix is banned until when.
//!
//! LAPI may hold several decisions for one value (origins, scenarios); a
//! prefix is banned until the latest of them ends, and lifted only when
//! the last is deleted. A `startup=true` reply is the whole set: it
//! replaces the table, and what the table no longer holds is lifted
//! (a resync heals lost deltas and expiries). Pure: the caller judges
//! each target (`never`, guard allows, prefix limits, its own pushes) and
//! writes the kernel.
use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use ipnet::IpNet;

use super::decision::{Decision, Ignored, Scope, StreamReply, Target};

/// Longest a decision is enforced (the ban sections' own limit).
pub const MAX_LENGTH: Duration = crate::config::ban::MAX_DURATION;

#[derive(Debug, Clone, Default)]
struct Entry {
    scope: Option<Scope>,
    /// Decision id → wall-clock expiry.
    decisions: HashMap<i64, Duration>,
}

impl Entry {
    fn until(&self) -> Option<Duration> {
        self.decisions.values().copied().max()
    }
}

/// The decisions in force, by prefix.
#[derive(Debug, Default)]
pub struct Table {
    by_net: HashMap<IpNet, Entry>,
}

/// What one reply changes.
#[derive(Debug, Default)]
pub struct Changes {
    /// Ban (or re-time) these prefixes until the given wall-clock time.
    pub put: Vec<(IpNet, Scope, Duration)>,
    /// Lift these (their last decision was deleted or has ended).
    pub lift: Vec<IpNet>,
    /// `startup=true`: `put` is everything LAPI holds; whatever else the
    /// CrowdSec section holds is to be lifted.
    pub full: bool,
    pub added: u64,
    pub deleted: u64,
    /// Decisions not taken, with why (value, reason).
    pub ignored: Vec<(String, String)>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.by_net.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_net.is_empty()
    }

    /// Whether `net` is banned by a decision (and until when).
    pub fn until(&self, net: &IpNet) -> Option<Duration> {
        self.by_net.get(net).and_then(Entry::until)
    }

    /// Applies a reply at wall time `now`. `full`: it answered
    /// `startup=true`. `accept` judges a decision that parsed (`Err`: why
    /// it is not taken).
    pub fn apply(
        &mut self,
        reply: &StreamReply,
        full: bool,
        now: Duration,
        scopes: (bool, bool),
        accept: &mut dyn FnMut(&Decision, &Target) -> Result<(), String>,
    ) -> Changes {
        let mut ch = Changes {
            full,
            ..Changes::default()
        };
        let mut touched: BTreeSet<IpNet> = BTreeSet::new();
        if full {
            touched.extend(self.by_net.keys().copied());
            self.by_net.clear();
        } else {
            for d in &reply.deleted {
                // A deleted decision is judged by its value only: its
                // duration is negative, its type and scope as when added.
                let Ok(t) = d.target(scopes.0, scopes.1).or_else(|e| match e {
                    Ignored::Duration(_) => Decision {
                        duration: String::new(),
                        ..d.clone()
                    }
                    .target(scopes.0, scopes.1),
                    e => Err(e),
                }) else {
                    continue;
                };
                if let Some(e) = self.by_net.get_mut(&t.net)
                    && e.decisions.remove(&d.id).is_some()
                {
                    ch.deleted += 1;
                    touched.insert(t.net);
                }
            }
        }
        for d in &reply.new {
            let t = match d.target(scopes.0, scopes.1) {
                Ok(t) => t,
                Err(why) => {
                    ch.ignored.push((d.value.clone(), why.to_string()));
                    continue;
                }
            };
            let Some(left) = t.remaining else {
                ch.ignored.push((d.value.clone(), "its duration is over".into()));
                continue;
            };
            if let Err(why) = accept(d, &t) {
                ch.ignored.push((d.value.clone(), why));
                continue;
            }
            let e = self.by_net.entry(t.net).or_default();
            e.scope.get_or_insert(t.scope);
            e.decisions.insert(d.id, now + left.min(MAX_LENGTH));
            ch.added += 1;
            touched.insert(t.net);
        }
        for net in touched {
            match self.by_net.get(&net) {
                Some(e) if !e.decisions.is_empty() => {
                    let until = e.until().expect("not empty");
                    ch.put.push((net, e.scope.unwrap_or(Scope::Range), until));
                }
                _ => {
                    self.by_net.remove(&net);
                    if !full {
                        ch.lift.push(net);
                    }
                }
            }
        }
        if full {
            ch.lift.clear();
        }
        ch
    }

    /// Drops decisions that ended before `now` (the kernel has stopped
    /// enforcing them already); returns the prefixes with none left.
    pub fn expire(&mut self, now: Duration) -> Vec<IpNet> {
        let mut gone = Vec::new();
        self.by_net.retain(|net, e| {
            e.decisions.retain(|_, &mut until| until > now);
            let keep = !e.decisions.is_empty();
            if !keep {
                gone.push(*net);
            }
            keep
        });
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: i64, scope: &str, value: &str, duration: &str) -> Decision {
        Decision {
            id,
            origin: "cscli".into(),
            kind: "ban".into(),
            scope: scope.into(),
            value: value.into(),
            duration: duration.into(),
            scenario: "manual".into(),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("ok")
    }

    const NOW: Duration = Duration::from_secs(1_000_000);

    fn all(_: &Decision, _: &Target) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn crowdsec_deleted_lifts_only_with_the_last_decision_of_a_prefix() {
        let mut t = Table::default();
        let r = StreamReply {
            new: vec![
                d(1, "Ip", "192.0.2.1", "1h"),
                d(2, "Ip", "192.0.2.1", "2h"),
                d(3, "Range", "2001:db8::/64", "30m"),
            ],
            deleted: vec![],
        };
        let ch = t.apply(&r, true, NOW, (true, true), &mut all);
        assert!(ch.full);
        assert_eq!(ch.added, 3);
        assert_eq!(ch.put.len(), 2);
        assert_eq!(t.until(&net("192.0.2.1/32")), Some(NOW + Duration::from_secs(7200)));
        // The longer one goes: banned until the other ends.
        let r = StreamReply {
            new: vec![],
            deleted: vec![d(2, "Ip", "192.0.2.1", "-1s")],
        };
        let ch = t.apply(&r, false, NOW, (true, true), &mut all);
        assert_eq!(
            ch.put,
            vec![(net("192.0.2.1/32"), Scope::Ip, NOW + Duration::from_secs(3600))]
        );
        assert!(ch.lift.is_empty());
        let r = StreamReply {
            new: vec![],
            deleted: vec![d(1, "Ip", "192.0.2.1", "-1s"), d(99, "Ip", "192.0.2.77", "-1s")],
        };
        let ch = t.apply(&r, false, NOW, (true, true), &mut all);
        assert_eq!(ch.lift, vec![net("192.0.2.1/32")]);
        assert_eq!(ch.deleted, 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn crowdsec_a_resync_replaces_the_table() {
        let mut t = Table::default();
        let r = StreamReply {
            new: vec![d(1, "Ip", "192.0.2.1", "1h"), d(2, "Range", "198.51.100.0/24", "1h")],
            deleted: vec![],
        };
        t.apply(&r, true, NOW, (true, true), &mut all);
        let r = StreamReply {
            new: vec![d(2, "Range", "198.51.100.0/24", "50m")],
            deleted: vec![],
        };
        let ch = t.apply(&r, true, NOW, (true, true), &mut all);
        assert!(ch.full && ch.lift.is_empty());
        assert_eq!(
            ch.put,
            vec![(net("198.51.100.0/24"), Scope::Range, NOW + Duration::from_secs(3000))]
        );
        assert_eq!(t.until(&net("192.0.2.1/32")), None);
    }

    #[test]
    fn crowdsec_refused_and_other_decisions_are_counted_as_ignored() {
        let mut t = Table::default();
        let mut captcha = d(4, "Ip", "192.0.2.4", "1h");
        captcha.kind = "captcha".into();
        let r = StreamReply {
            new: vec![
                d(1, "Ip", "192.0.2.1", "1h"),
                d(2, "Country", "FR", "1h"),
                d(3, "Ip", "192.0.2.3", "-1s"),
                captcha,
                d(5, "Ip", "203.0.113.5", "1h"),
            ],
            deleted: vec![],
        };
        let mut never = |_: &Decision, t: &Target| {
            if t.net == net("203.0.113.5/32") {
                Err("never".to_string())
            } else {
                Ok(())
            }
        };
        let ch = t.apply(&r, false, NOW, (true, true), &mut never);
        assert_eq!(ch.added, 1);
        assert_eq!(ch.ignored.len(), 4, "{:?}", ch.ignored);
        assert_eq!(t.len(), 1);
        assert_eq!(t.expire(NOW + Duration::from_secs(3601)), vec![net("192.0.2.1/32")]);
        assert!(t.is_empty());
    }
}
