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
    assert_eq!(e.lift(net("203.0.113.0/24"), None).len(), 1);
    assert_eq!(e.active_count(), 0);
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
    };
    assert!(!e.restore(r.clone(), secs(500)));
    assert!(e.restore(r.clone(), secs(400)));
    // The next ban of it is the third.
    e.lift(r.net, None);
    assert_eq!(e.manual(0, r.net, None, secs(600)).expect("ban").times, 3);
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
