//! Unit and property tests of the ban engine.
use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;
use proptest::prelude::*;

use super::*;
use crate::config::ban::Ban;

fn section() -> Ban {
    let mut b = Ban::with_defaults("sasl");
    b.failures = 3;
    b.window = Duration::from_secs(60);
    b.ban_time = Duration::from_secs(100);
    b.max_ban_time = Duration::from_secs(350);
    b.never = vec![
        "192.0.2.0/24".parse().expect("net"),
        "2001:db8:1::5/128".parse().expect("net"),
    ];
    b
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test net")
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn third_failure_in_window_bans_the_prefix() {
    let mut e = BanEngine::new(vec![section()]);
    assert_eq!(e.failure(0, ip("198.51.100.7"), secs(1000)), None);
    assert_eq!(e.failure(0, ip("198.51.100.7"), secs(1010)), None);
    let r = e.failure(0, ip("198.51.100.7"), secs(1020)).expect("banned");
    assert_eq!(r.net, net("198.51.100.7/32"));
    assert_eq!(r.expires, secs(1120));
    assert_eq!((r.times, r.failures), (1, 3));
    // Banned: further lines count nothing.
    assert_eq!(e.failure(0, ip("198.51.100.7"), secs(1021)), None);
}

#[test]
fn failures_outside_the_window_do_not_add_up() {
    let mut e = BanEngine::new(vec![section()]);
    for t in [0, 60, 120, 180] {
        assert_eq!(e.failure(0, ip("198.51.100.7"), secs(t)), None, "at {t}");
    }
    assert!(e.failure(0, ip("198.51.100.7"), secs(181)).is_none());
    assert!(e.failure(0, ip("198.51.100.7"), secs(182)).is_some());
}

#[test]
fn ipv6_counts_per_64() {
    let mut e = BanEngine::new(vec![section()]);
    assert_eq!(e.failure(0, ip("2001:db8:2::1"), secs(0)), None);
    assert_eq!(e.failure(0, ip("2001:db8:2::2"), secs(1)), None);
    let r = e.failure(0, ip("2001:db8:2::ffff:3"), secs(2)).expect("banned");
    assert_eq!(r.net, net("2001:db8:2::/64"));
}

#[test]
fn never_wins() {
    let mut e = BanEngine::new(vec![section()]);
    for t in 0..10 {
        assert_eq!(e.failure(0, ip("192.0.2.9"), secs(t)), None);
    }
    // The /64 holds a never host: the failing address alone is banned.
    for t in 0..2 {
        assert_eq!(e.failure(0, ip("2001:db8:1::9"), secs(t)), None);
    }
    let r = e.failure(0, ip("2001:db8:1::9"), secs(3)).expect("banned");
    assert_eq!(r.net, net("2001:db8:1::9/128"));
    assert!(matches!(
        e.manual(0, net("192.0.2.0/25"), None, secs(0)),
        Err(BanRefused::Never { .. })
    ));
    assert!(matches!(
        e.manual(0, net("192.0.0.0/16"), None, secs(0)),
        Err(BanRefused::Never { .. })
    ));
    assert!(e.manual(0, net("198.51.100.0/24"), None, secs(0)).is_ok());
}

#[test]
fn each_new_ban_doubles_up_to_the_cap() {
    let mut e = BanEngine::new(vec![section()]);
    let mut now = 0;
    let mut lengths = Vec::new();
    for _ in 0..4 {
        let mut r = None;
        for _ in 0..3 {
            r = e.failure(0, ip("203.0.113.5"), secs(now));
            now += 1;
        }
        let r = r.expect("banned");
        lengths.push(r.expires.as_secs() - (now - 1));
        assert_eq!(e.expire(r.expires).len(), 1);
        now = r.expires.as_secs() + 1;
    }
    assert_eq!(lengths, [100, 200, 350, 350]);
    assert_eq!(e.times_banned(0, net("203.0.113.5/32")), 4);
}

#[test]
fn manual_ban_escalates_too_and_lift_keeps_history() {
    let mut e = BanEngine::new(vec![section()]);
    let a = e.manual(0, net("203.0.113.0/24"), None, secs(0)).expect("ban");
    assert_eq!(a.expires, secs(100));
    assert_eq!(e.count(0, false), 1);
    assert_eq!(e.lift(net("203.0.113.0/24"), None, secs(5)).len(), 1);
    assert_eq!(e.active_count(), 0);
    assert_eq!(e.count(0, false), 0);
    let b = e.manual(0, net("203.0.113.0/24"), None, secs(10)).expect("ban");
    assert_eq!(b.expires, secs(210));
    let c = e
        .manual(0, net("203.0.113.0/24"), Some(secs(5)), secs(10))
        .expect("ban");
    assert_eq!((c.expires, c.times), (secs(15), 3));
    assert!(matches!(
        e.manual(0, net("10.0.0.0/7"), None, secs(0)),
        Err(BanRefused::TooShort { .. })
    ));
}

#[test]
fn restore_keeps_the_time_left_and_drops_expired() {
    let mut e = BanEngine::new(vec![section()]);
    let r = BanRecord {
        section: 0,
        net: net("198.51.100.0/24"),
        expires: secs(500),
        times: 2,
        failures: 3,
        length: secs(200),
    };
    assert_eq!(e.restore(r.clone(), secs(500)), Ok(false));
    assert_eq!(e.restore(r.clone(), secs(400)), Ok(true));
    // The next ban of it is the third.
    e.lift(r.net, None, secs(400));
    assert_eq!(e.manual(0, r.net, None, secs(600)).expect("ban").times, 3);
}

#[test]
fn restore_is_checked_like_the_cli() {
    let mut e = BanEngine::new(vec![section()]);
    let rec = |n: &str, section: usize| BanRecord {
        section,
        net: net(n),
        expires: secs(500),
        times: 1,
        failures: 0,
        length: secs(100),
    };
    for (n, s) in [("0.0.0.0/0", 0), ("::/0", 0), ("2001::/16", 0), ("10.0.0.0/7", 0)] {
        assert!(
            matches!(e.restore(rec(n, s), secs(400)), Err(BanRefused::TooShort { .. })),
            "{n}"
        );
    }
    assert!(matches!(
        e.restore(rec("192.0.2.0/25", 0), secs(400)),
        Err(BanRefused::Never { .. })
    ));
    assert!(matches!(
        e.restore(rec("198.51.100.0/24", 3), secs(400)),
        Err(BanRefused::NoSection(3))
    ));
    let mut long = rec("198.51.100.0/24", 0);
    long.length = secs(20 * 365 * 86_400);
    assert!(matches!(e.restore(long, secs(400)), Err(BanRefused::TooLong { .. })));
    assert!(matches!(
        e.restore_history(0, net("::/0"), 3, secs(100), secs(400)),
        Err(BanRefused::TooShort { .. })
    ));
    assert_eq!(e.active_count(), 0);
    assert_eq!(e.restore(rec("198.51.100.0/24", 0), secs(400)), Ok(true));
}

#[test]
fn a_lifted_ban_is_history_that_ended_when_it_was_lifted() {
    let mut e = BanEngine::new(vec![section()]);
    let a = e
        .manual(0, net("203.0.113.0/24"), Some(secs(300)), secs(0))
        .expect("ban");
    assert_eq!(a.expires, secs(300));
    assert_eq!(e.lift(a.net, None, secs(10)).len(), 1);
    let h: Vec<_> = e.history().collect();
    assert_eq!(h, [(0, a.net, 1, secs(10))], "ended at the lift, not at the old expiry");
    // History never becomes a ban, even with an end in the future.
    let mut e2 = BanEngine::new(vec![section()]);
    e2.restore_history(0, a.net, 1, secs(300), secs(10)).expect("history");
    assert_eq!(e2.active_count(), 0);
    assert!(e2.failure(0, ip("203.0.113.1"), secs(11)).is_none());
    assert_eq!(e2.times_banned(0, a.net), 1);
    // An end in the future is taken as now: pruned max_ban_time later.
    e2.prune(secs(10 + 349));
    assert_eq!(e2.times_banned(0, a.net), 1);
    e2.prune(secs(10 + 351));
    assert_eq!(e2.times_banned(0, a.net), 0);
}

struct Allows(Vec<IpNet>);

impl Allowed for Allows {
    fn allows(&self, ports: &[u16], addr: IpAddr) -> bool {
        ports.contains(&587) && self.0.iter().any(|n| n.contains(&addr))
    }
    fn allows_within(&self, ports: &[u16], n: &IpNet) -> bool {
        ports.contains(&587) && self.0.iter().any(|a| n.contains(a))
    }
}

#[test]
fn allowlisted_sources_are_not_banned_from_the_logs_unless_ban_allowed() {
    let allows = Allows(vec![net("203.0.113.10/32"), net("2001:db8:7::10/128")]);
    let mut e = BanEngine::new(vec![section()]);
    for t in 0..10 {
        assert_eq!(
            e.failure_checked(0, ip("203.0.113.10"), secs(t), &allows),
            Outcome::Allowlisted
        );
    }
    assert_eq!(e.tracker_count(), 0, "an allowlisted source takes no tracker");
    // A neighbour in the same /64 as an allowed host: only itself.
    let mut last = Outcome::Counted;
    for t in 0..3 {
        last = e.failure_checked(0, ip("2001:db8:7::99"), secs(t), &allows);
    }
    let Outcome::Banned(r) = last else { panic!("{last:?}") };
    assert_eq!(r.net, net("2001:db8:7::99/128"));
    // A manual ban still works on it.
    assert!(e.manual(0, net("203.0.113.10/32"), None, secs(20)).is_ok());
    // ban_allowed = true: banned like anyone.
    let mut b = section();
    b.ban_allowed = true;
    let mut e = BanEngine::new(vec![b]);
    let mut last = Outcome::Counted;
    for t in 0..3 {
        last = e.failure_checked(0, ip("203.0.113.10"), secs(t), &allows);
    }
    assert!(
        matches!(last, Outcome::Banned(ref r) if r.net == net("203.0.113.10/32")),
        "{last:?}"
    );
}

#[test]
fn at_the_tracker_cap_the_oldest_tracker_goes_and_new_sources_are_banned() {
    let mut e = BanEngine::with_tracker_cap(vec![section()], 4);
    for i in 1..=4u8 {
        e.failure(0, IpAddr::from([198, 51, 100, i]), secs(0));
    }
    // .1 fails again: it is now the most recent; .2 is the oldest.
    e.failure(0, ip("198.51.100.1"), secs(1));
    assert_eq!(e.failure(0, ip("203.0.113.9"), secs(2)), None);
    assert_eq!(e.tracker_count(), 4);
    assert_eq!(e.evicted(), 1);
    assert_eq!(e.failure(0, ip("203.0.113.9"), secs(3)), None);
    assert!(
        e.failure(0, ip("203.0.113.9"), secs(4)).is_some(),
        "a new source at the cap is banned"
    );
    // .1 kept both failures; .2 was evicted and starts over.
    assert!(e.failure(0, ip("198.51.100.1"), secs(5)).is_some());
    assert_eq!(e.failure(0, ip("198.51.100.2"), secs(5)), None);
}

/// The cost of a failure at the real cap (2^20 trackers, all fresh): a new
/// source is tracked and banned, and each failure costs O(1) (printed; the
/// figure belongs in the bench, the test asserts only the behaviour).
#[test]
fn a_million_trackers_still_ban_a_new_source() {
    let mut e = BanEngine::new(vec![section()]);
    for i in 0..MAX_TRACKERS as u32 {
        let a = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        e.failure(0, IpAddr::V4(a), secs(1000));
    }
    assert_eq!(e.tracker_count(), MAX_TRACKERS);
    let started = std::time::Instant::now();
    let n = 30_000u32;
    let mut banned = 0;
    for i in 0..n {
        // 10,000 new sources failing 3 times each, at the cap.
        let a = std::net::Ipv4Addr::from(0x0c00_0000 + i / 3);
        if e.failure(0, IpAddr::V4(a), secs(1001)).is_some() {
            banned += 1;
        }
    }
    let per = started.elapsed() / n;
    assert_eq!(banned, n / 3, "every new source is banned at the cap");
    // Each ban frees its tracker; the cap holds.
    assert!(e.tracker_count() >= MAX_TRACKERS - 1 && e.tracker_count() <= MAX_TRACKERS);
    eprintln!("per failure at {MAX_TRACKERS} trackers: {per:?}");
}

#[test]
fn mapped_ipv4_counts_as_ipv4() {
    let mut e = BanEngine::new(vec![section()]);
    e.failure(0, ip("::ffff:198.51.100.1"), secs(0));
    e.failure(0, ip("198.51.100.1"), secs(0));
    let r = e.failure(0, ip("::ffff:198.51.100.1"), secs(0)).expect("banned");
    assert_eq!(r.net, net("198.51.100.1/32"));
}

#[test]
fn reconfigure_maps_sections_by_name() {
    let mut other = section();
    other.name = "imap".into();
    let mut e = BanEngine::new(vec![section(), other.clone()]);
    e.manual(0, net("198.51.100.0/24"), None, secs(0)).expect("ban");
    e.manual(1, net("203.0.113.0/24"), None, secs(0)).expect("ban");
    let (kept, gone) = e.reconfigure(vec![other]);
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].section, 0);
    assert_eq!(kept[0].net, net("203.0.113.0/24"));
    assert_eq!(gone.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Against a reference: a ban happens exactly when `failures` failures
    /// of one prefix fall within `window` since the last ban (or start), and
    /// never for a `never` source.
    #[test]
    fn bans_match_a_sliding_window_reference(
        events in proptest::collection::vec((0u8..6, 0u64..40), 1..200),
    ) {
        let mut b = section();
        b.window = secs(30);
        let mut e = BanEngine::new(vec![b.clone()]);
        let sources = ["198.51.100.1", "198.51.100.2", "192.0.2.1", "2001:db8:5::1", "2001:db8:5::2", "2001:db8:6::1"];
        let mut now = 0u64;
        let mut window: std::collections::HashMap<IpNet, Vec<u64>> = Default::default();
        let mut banned_until: std::collections::HashMap<IpNet, u64> = Default::default();
        let mut count: std::collections::HashMap<IpNet, u32> = Default::default();
        for (s, dt) in events {
            now += dt;
            let src = ip(sources[usize::from(s)]);
            let got = e.failure(0, src, secs(now));
            e.expire(secs(now));
            // The gauges' counts follow the bans in force.
            let v4 = e.active().filter(|r| r.net.addr().is_ipv4()).count() as i64;
            prop_assert_eq!((e.count(0, false), e.count(0, true)), (v4, e.active_count() as i64 - v4));
            if b.never.iter().any(|n| n.contains(&src)) {
                prop_assert!(got.is_none());
                continue;
            }
            let p = match src { IpAddr::V4(_) => IpNet::new(src, 32), IpAddr::V6(_) => IpNet::new(src, 64) }
                .expect("len").trunc();
            if banned_until.get(&p).is_some_and(|&u| u > now) {
                prop_assert!(got.is_none());
                continue;
            }
            let w = window.entry(p).or_default();
            w.retain(|&t| now - t < 30);
            w.push(now);
            if w.len() >= 3 {
                w.clear();
                let n = count.entry(p).or_default();
                let len = escalated(b.ban_time, b.max_ban_time, *n).as_secs();
                *n += 1;
                banned_until.insert(p, now + len);
                let r = got.expect("reference bans");
                prop_assert_eq!(r.net, p);
                prop_assert_eq!(r.expires, secs(now + len));
                prop_assert!(len <= 350);
            } else {
                prop_assert!(got.is_none());
            }
        }
    }
}
