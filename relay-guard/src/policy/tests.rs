//! Unit tests of policy compilation: fixed cases from SPEC.md's "Semantics",
//! then property tests that check [`Policy::lookup`] (what the kernel computes
//! from the compiled maps) against [`model_allows`] (the obvious reading).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use proptest::prelude::*;
use relay_guard_common::{AllowMask, GuardedPort, mode};

use super::{Lookup, Policy, model_allows};
use crate::config::{Action, Config, DEFAULT_PIN_DIR, Entry, Guard, Mode, Origin, XdpMode, parse_net};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn entry(s: &str, action: Action) -> Entry {
    Entry {
        net: parse_net(s).unwrap_or_else(|e| panic!("test entry {s}: {e}")),
        action,
        origin: Origin {
            file: PathBuf::from("test.toml").into(),
            line: 1,
        },
    }
}

fn guard(name: &str, ports: &[u16], allow: &[&str], deny: &[&str]) -> Guard {
    let mut entries: Vec<Entry> = allow.iter().map(|s| entry(s, Action::Allow)).collect();
    entries.extend(deny.iter().map(|s| entry(s, Action::Deny)));
    Guard {
        name: name.to_string(),
        ports: ports.to_vec(),
        entries,
    }
}

fn config(mode: Mode, guards: Vec<Guard>) -> Config {
    Config {
        path: PathBuf::from("test.toml"),
        interfaces: vec!["eth0".to_string()],
        mode,
        xdp_mode: XdpMode::Auto,
        xdp_priority: crate::config::DEFAULT_XDP_PRIORITY,
        xdp_dispatcher: false,
        metrics_listen: None,
        pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
        state_dir: PathBuf::from(crate::config::DEFAULT_STATE_DIR),
        guards,
        relaytest: Default::default(),
        bans: Vec::new(),
        crowdsec: None,
        list_files: Vec::new(),
        fingerprint: 0,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("test address {s}: {e}"))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("test CIDR {s}: {e}"))
}

/// The verdict for a guarded port; panics if the port is not guarded.
fn allowed(p: &Policy, addr: &str, port: u16) -> bool {
    match p.lookup(ip(addr), port) {
        Lookup::Judged { allowed, .. } => allowed,
        Lookup::NotGuarded => panic!("port {port} should be guarded"),
    }
}

/// Asserts lookup and the reference model agree for every (addr, guard port).
fn assert_agrees_with_model(cfg: &Config, p: &Policy, addrs: &[&str]) {
    for (gi, g) in cfg.guards.iter().enumerate() {
        for &port in &g.ports {
            for a in addrs {
                let want = model_allows(g, ip(a)).0;
                match p.lookup(ip(a), port) {
                    Lookup::Judged { guard, allowed, .. } => {
                        assert_eq!(usize::from(guard), gi, "{a} port {port}");
                        assert_eq!(allowed, want, "{a} port {port} guard {}", g.name);
                    }
                    Lookup::NotGuarded => panic!("port {port} should be guarded"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Fixed cases
// ---------------------------------------------------------------------------

#[test]
fn compile_ports_map_holds_guard_indices() {
    let cfg = config(
        Mode::Enforce,
        vec![
            guard("submission", &[465, 587], &["192.0.2.0/24"], &[]),
            guard("relay", &[25], &["203.0.113.0/24"], &[]),
        ],
    );
    let p = Policy::compile(&cfg);
    let want: BTreeMap<u16, GuardedPort> = [
        (
            25,
            GuardedPort {
                active: 1,
                guard: 1,
                slot: 0,
            },
        ),
        (
            465,
            GuardedPort {
                active: 1,
                guard: 0,
                slot: 0,
            },
        ),
        (
            587,
            GuardedPort {
                active: 1,
                guard: 0,
                slot: 0,
            },
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(p.ports, want);
    assert!(matches!(
        p.lookup(ip("203.0.113.9"), 25),
        Lookup::Judged {
            guard: 1,
            allowed: true,
            ..
        }
    ));
    assert!(matches!(
        p.lookup(ip("192.0.2.9"), 587),
        Lookup::Judged {
            guard: 0,
            allowed: true,
            ..
        }
    ));
}

#[test]
fn compile_mode_value() {
    let g = || vec![guard("g", &[25], &["192.0.2.0/24"], &[])];
    assert_eq!(Policy::compile(&config(Mode::Enforce, g())).mode, mode::ENFORCE);
    assert_eq!(Policy::compile(&config(Mode::Monitor, g())).mode, mode::MONITOR);
    // The zeroed default fails closed.
    assert_eq!(Policy::default().mode, mode::ENFORCE);
}

/// SPEC.md: "a deny /25 inside an allow /24 denies, and an allow /32 inside
/// that deny /25 allows".
#[test]
fn nested_deny_in_allow_and_allow_in_deny() {
    let cfg = config(
        Mode::Enforce,
        vec![guard("g", &[25], &["192.0.2.0/24", "192.0.2.129"], &["192.0.2.128/25"])],
    );
    let p = Policy::compile(&cfg);

    let want: BTreeMap<(u8, [u8; 4]), AllowMask> = [
        ((24, [192, 0, 2, 0]), AllowMask { allow: 1 }),
        ((25, [192, 0, 2, 128]), AllowMask { allow: 0 }),
        ((32, [192, 0, 2, 129]), AllowMask { allow: 1 }),
    ]
    .into_iter()
    .collect();
    assert_eq!(p.v4, want);
    assert!(p.v6.is_empty());

    assert!(!allowed(&p, "192.0.2.200", 25), "inside the deny /25");
    assert!(!allowed(&p, "192.0.2.128", 25));
    assert!(!allowed(&p, "192.0.2.255", 25));
    assert!(!allowed(&p, "192.0.2.130", 25));
    assert!(allowed(&p, "192.0.2.10", 25), "inside the allow /24, outside the /25");
    assert!(allowed(&p, "192.0.2.0", 25));
    assert!(allowed(&p, "192.0.2.127", 25));
    assert!(allowed(&p, "192.0.2.129", 25), "the allow /32 inside the deny /25");

    // The reported prefix is the longest stored one.
    assert_eq!(
        p.lookup(ip("192.0.2.200"), 25),
        Lookup::Judged {
            guard: 0,
            allowed: false,
            prefix: Some(net("192.0.2.128/25"))
        }
    );
    assert_eq!(
        p.lookup(ip("192.0.2.129"), 25),
        Lookup::Judged {
            guard: 0,
            allowed: true,
            prefix: Some(net("192.0.2.129/32"))
        }
    );
    assert_eq!(
        p.lookup(ip("192.0.2.10"), 25),
        Lookup::Judged {
            guard: 0,
            allowed: true,
            prefix: Some(net("192.0.2.0/24"))
        }
    );
    assert_agrees_with_model(&cfg, &p, &["192.0.2.200", "192.0.2.10", "192.0.2.129", "192.0.3.1"]);
}

#[test]
fn nested_ipv6_deny_in_allow_and_allow_in_deny() {
    let cfg = config(
        Mode::Enforce,
        vec![guard(
            "g",
            &[587],
            &["2001:db8:10::/48", "2001:db8:10:8000::1"],
            &["2001:db8:10:8000::/49"],
        )],
    );
    let p = Policy::compile(&cfg);
    assert!(p.v4.is_empty());
    assert_eq!(p.v6.len(), 3);
    assert_eq!(
        p.v6.get(&(49, ip6("2001:db8:10:8000::").octets())),
        Some(&AllowMask { allow: 0 })
    );
    assert_eq!(
        p.v6.get(&(128, ip6("2001:db8:10:8000::1").octets())),
        Some(&AllowMask { allow: 1 })
    );
    assert!(allowed(&p, "2001:db8:10::5", 587));
    assert!(!allowed(&p, "2001:db8:10:8000::2", 587));
    assert!(!allowed(&p, "2001:db8:10:ffff::", 587));
    assert!(allowed(&p, "2001:db8:10:8000::1", 587));
    assert!(!allowed(&p, "2001:db8:11::1", 587));
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or_else(|e| panic!("test address {s}: {e}"))
}

#[test]
fn masks_of_two_guards_sharing_prefixes() {
    // Guard 0 as in SPEC.md; guard 1 allows only the /25 that guard 0 denies.
    let cfg = config(
        Mode::Enforce,
        vec![
            guard("a", &[587], &["192.0.2.0/24", "192.0.2.129"], &["192.0.2.128/25"]),
            guard("b", &[25], &["192.0.2.128/25"], &[]),
        ],
    );
    let p = Policy::compile(&cfg);
    let want: BTreeMap<(u8, [u8; 4]), AllowMask> = [
        ((24, [192, 0, 2, 0]), AllowMask { allow: 0b01 }),
        ((25, [192, 0, 2, 128]), AllowMask { allow: 0b10 }),
        ((32, [192, 0, 2, 129]), AllowMask { allow: 0b11 }),
    ]
    .into_iter()
    .collect();
    assert_eq!(p.v4, want);
    assert!(allowed(&p, "192.0.2.10", 587));
    assert!(!allowed(&p, "192.0.2.10", 25));
    assert!(!allowed(&p, "192.0.2.200", 587));
    assert!(allowed(&p, "192.0.2.200", 25));
    assert!(allowed(&p, "192.0.2.129", 587));
    assert!(allowed(&p, "192.0.2.129", 25));
}

#[test]
fn ipv4_entries_never_match_ipv6_and_vice_versa() {
    let cfg = config(
        Mode::Enforce,
        vec![
            guard("v4", &[25], &["0.0.0.0/0"], &[]),
            guard("v6", &[587], &["::/0"], &[]),
            guard("both", &[465], &["192.0.2.0/24", "2001:db8::/32"], &[]),
        ],
    );
    let p = Policy::compile(&cfg);
    assert_eq!(
        p.v4.keys().copied().collect::<Vec<_>>(),
        vec![(0, [0; 4]), (24, [192, 0, 2, 0])]
    );
    assert_eq!(p.v6.len(), 2);
    assert!(p.v6.contains_key(&(0, [0; 16])));

    // Allow-all IPv4 says nothing about IPv6.
    assert!(allowed(&p, "198.51.100.1", 25));
    assert!(!allowed(&p, "2001:db8::1", 25));
    assert!(!allowed(&p, "::ffff:198.51.100.1", 25), "v4-mapped is an IPv6 address");
    assert!(!allowed(&p, "::", 25));
    // And the other way round.
    assert!(allowed(&p, "2001:db8::1", 587));
    assert!(allowed(&p, "::ffff:198.51.100.1", 587));
    assert!(!allowed(&p, "198.51.100.1", 587));
    assert!(!allowed(&p, "0.0.0.0", 587));
    // Same numeric value, other family: 192.0.2.0/24 does not cover ::ffff:192.0.2.1 or ::c000:201.
    assert!(allowed(&p, "192.0.2.1", 465));
    assert!(!allowed(&p, "::ffff:192.0.2.1", 465));
    assert!(!allowed(&p, "::192.0.2.1", 465));
    assert!(allowed(&p, "2001:db8::1", 465));
    // 2001:db8::/32 as a 32-bit number is 32.1.13.184: no IPv4 match.
    assert!(!allowed(&p, "32.1.13.184", 465));
    assert_agrees_with_model(
        &cfg,
        &p,
        &[
            "198.51.100.1",
            "2001:db8::1",
            "::ffff:198.51.100.1",
            "192.0.2.1",
            "::ffff:192.0.2.1",
            "32.1.13.184",
        ],
    );
}

#[test]
fn no_match_denies() {
    let cfg = config(
        Mode::Enforce,
        vec![
            guard("g", &[25], &["192.0.2.0/24", "2001:db8::/32"], &[]),
            guard("empty", &[587], &[], &[]),
        ],
    );
    let p = Policy::compile(&cfg);
    assert_eq!(
        p.lookup(ip("198.51.100.1"), 25),
        Lookup::Judged {
            guard: 0,
            allowed: false,
            prefix: None
        }
    );
    assert_eq!(
        p.lookup(ip("2001:db9::1"), 25),
        Lookup::Judged {
            guard: 0,
            allowed: false,
            prefix: None
        }
    );
    // A guard with no entries denies everything, even where another guard's prefix matches.
    assert_eq!(
        p.lookup(ip("192.0.2.1"), 587),
        Lookup::Judged {
            guard: 1,
            allowed: false,
            prefix: Some(net("192.0.2.0/24"))
        }
    );
    assert!(!allowed(&p, "198.51.100.1", 587));
    assert!(!allowed(&p, "2001:db8::1", 587));
    // An empty config compiles to empty maps.
    let empty = Policy::compile(&config(Mode::Enforce, Vec::new()));
    assert!(empty.ports.is_empty() && empty.v4.is_empty() && empty.v6.is_empty());
}

#[test]
fn unguarded_port_is_not_guarded() {
    let cfg = config(
        Mode::Enforce,
        vec![guard("g", &[25, 465, 587], &["0.0.0.0/0", "::/0"], &[])],
    );
    let mut p = Policy::compile(&cfg);
    for port in [0, 24, 26, 80, 443, 2525, 65535] {
        assert_eq!(p.lookup(ip("192.0.2.1"), port), Lookup::NotGuarded, "port {port}");
        assert_eq!(p.lookup(ip("2001:db8::1"), port), Lookup::NotGuarded, "port {port}");
    }
    assert!(allowed(&p, "192.0.2.1", 25));
    // A slot that is present but inactive is not guarded either.
    p.ports.insert(
        2525,
        GuardedPort {
            active: 0,
            guard: 0,
            slot: 0,
        },
    );
    assert_eq!(p.lookup(ip("192.0.2.1"), 2525), Lookup::NotGuarded);
}

#[test]
fn guards_on_different_ports_are_judged_independently() {
    let cfg = config(
        Mode::Enforce,
        vec![
            guard(
                "submission",
                &[465, 587],
                &["192.0.2.0/24", "2001:db8:10::/48"],
                &["192.0.2.128/25"],
            ),
            guard("relay", &[25], &["203.0.113.0/24", "192.0.2.128/25"], &["203.0.113.7"]),
        ],
    );
    let p = Policy::compile(&cfg);
    for port in [465, 587] {
        assert!(allowed(&p, "192.0.2.1", port));
        assert!(!allowed(&p, "192.0.2.200", port));
        assert!(
            !allowed(&p, "203.0.113.1", port),
            "relay's allow does not leak into submission"
        );
        assert!(allowed(&p, "2001:db8:10::1", port));
    }
    assert!(
        !allowed(&p, "192.0.2.1", 25),
        "submission's allow does not leak into relay"
    );
    assert!(allowed(&p, "192.0.2.200", 25));
    assert!(allowed(&p, "203.0.113.1", 25));
    assert!(!allowed(&p, "203.0.113.7", 25));
    assert!(!allowed(&p, "2001:db8:10::1", 25));
    assert_agrees_with_model(
        &cfg,
        &p,
        &[
            "192.0.2.1",
            "192.0.2.200",
            "203.0.113.1",
            "203.0.113.7",
            "2001:db8:10::1",
            "198.51.100.1",
        ],
    );
}

#[test]
fn allow_all_with_deny_carve_out() {
    let cfg = config(
        Mode::Monitor,
        vec![guard(
            "mx",
            &[25],
            &["0.0.0.0/0", "::/0", "1.10.16.77"],
            &["1.10.16.0/20", "1.19.0.0/16", "2001:db8:bad::/48"],
        )],
    );
    let p = Policy::compile(&cfg);
    assert_eq!(p.v4.get(&(0, [0; 4])), Some(&AllowMask { allow: 1 }));
    assert_eq!(p.v4.get(&(20, [1, 10, 16, 0])), Some(&AllowMask { allow: 0 }));
    assert_eq!(p.v6.get(&(0, [0; 16])), Some(&AllowMask { allow: 1 }));
    assert_eq!(
        p.v6.get(&(48, ip6("2001:db8:bad::").octets())),
        Some(&AllowMask { allow: 0 })
    );

    for a in [
        "0.0.0.0",
        "255.255.255.255",
        "198.51.100.1",
        "1.10.32.0",
        "1.10.15.255",
        "1.20.0.0",
        "1.10.16.77",
    ] {
        assert!(allowed(&p, a, 25), "{a}");
    }
    for a in ["1.10.16.0", "1.10.31.255", "1.10.16.78", "1.19.200.1"] {
        assert!(!allowed(&p, a, 25), "{a}");
    }
    for a in ["::", "::1", "2001:db8::1", "2001:db8:bae::1", "ffff::"] {
        assert!(allowed(&p, a, 25), "{a}");
    }
    for a in ["2001:db8:bad::", "2001:db8:bad:ffff:ffff:ffff:ffff:ffff"] {
        assert!(!allowed(&p, a, 25), "{a}");
    }
}

/// Guard 63 is the top bit of the 64-bit mask: no shift overflow, no sign trouble.
#[test]
fn sixty_four_guards_use_every_bit() {
    let guards: Vec<Guard> = (0..64u16)
        .map(|i| {
            let allow = format!("192.0.2.{i}");
            guard(&format!("g{i}"), &[1000 + i], &[allow.as_str(), "198.51.100.0/24"], &[])
        })
        .collect();
    let cfg = config(Mode::Enforce, guards);
    let p = Policy::compile(&cfg);
    assert_eq!(p.ports.len(), 64);
    assert_eq!(p.ports.get(&1063).map(|gp| gp.guard), Some(63));
    assert_eq!(p.v4.get(&(24, [198, 51, 100, 0])), Some(&AllowMask { allow: u64::MAX }));
    assert_eq!(p.v4.get(&(32, [192, 0, 2, 63])), Some(&AllowMask { allow: 1 << 63 }));
    for i in 0..64u16 {
        for j in [0u16, 31, 62, 63] {
            let a = format!("192.0.2.{j}");
            assert_eq!(allowed(&p, &a, 1000 + i), i == j, "guard {i} address {a}");
        }
        assert!(allowed(&p, "198.51.100.9", 1000 + i));
    }
}

#[test]
fn allow_counts_per_family() {
    let g = guard(
        "g",
        &[25],
        &["192.0.2.0/24", "198.51.100.7", "2001:db8::/32"],
        &["192.0.2.128/25", "2001:db8:1::/48"],
    );
    assert_eq!(Policy::allow_counts(&g), (2, 1));
    assert_eq!(Policy::allow_counts(&guard("e", &[25], &[], &["0.0.0.0/0"])), (0, 0));
}

#[test]
fn model_allows_reference_cases() {
    let g = guard("g", &[25], &["192.0.2.0/24", "192.0.2.129"], &["192.0.2.128/25"]);
    assert_eq!(model_allows(&g, ip("192.0.2.10")), (true, Some(net("192.0.2.0/24"))));
    assert_eq!(
        model_allows(&g, ip("192.0.2.200")),
        (false, Some(net("192.0.2.128/25")))
    );
    assert_eq!(model_allows(&g, ip("192.0.2.129")), (true, Some(net("192.0.2.129/32"))));
    assert_eq!(model_allows(&g, ip("198.51.100.1")), (false, None));
    assert_eq!(model_allows(&g, ip("::ffff:192.0.2.10")), (false, None));
}

#[test]
fn compiles_a_parsed_config() {
    let text = "interfaces = [\"eth0\"]\n\
                [[guard]]\nname = \"submission\"\nports = [465, 587]\n\
                allow = [\"192.0.2.0/24\", \"2001:db8:10::/48\", \"198.51.100.7\"]\n\
                deny = [\"192.0.2.128/25\"]\n\
                [[guard]]\nname = \"relay\"\nports = [25]\nallow = [\"203.0.113.0/24\"]\n";
    let cfg = Config::parse(Path::new("/nonexistent/rg.toml"), text).unwrap_or_else(|e| panic!("{e}"));
    let p = Policy::compile(&cfg);
    assert_eq!(p.ports.keys().copied().collect::<Vec<_>>(), vec![25, 465, 587]);
    assert!(allowed(&p, "198.51.100.7", 587));
    assert!(!allowed(&p, "198.51.100.8", 587));
    assert!(!allowed(&p, "192.0.2.200", 465));
    assert!(allowed(&p, "2001:db8:10:ffff::1", 465));
    assert!(allowed(&p, "203.0.113.200", 25));
    assert!(!allowed(&p, "198.51.100.7", 25));
}

// ---------------------------------------------------------------------------
// Property tests: Policy::lookup == model_allows
// ---------------------------------------------------------------------------

/// Number of address bits that vary inside a test case. Everything else is
/// the case's base address, so prefixes cluster and nest often.
const VAR_BITS: u32 = 8;
/// A port no generated guard uses.
const UNGUARDED: u16 = 9;

#[derive(Debug, Clone, Copy)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn bits(self) -> u32 {
        match self {
            Fam::V4 => 32,
            Fam::V6 => 128,
        }
    }

    fn width_mask(self) -> u128 {
        match self {
            Fam::V4 => u128::from(u32::MAX),
            Fam::V6 => u128::MAX,
        }
    }

    fn addr(self, a: u128) -> IpAddr {
        match self {
            Fam::V4 => IpAddr::V4(Ipv4Addr::from(
                u32::try_from(a & self.width_mask()).expect("masked to 32 bits"),
            )),
            Fam::V6 => IpAddr::V6(Ipv6Addr::from(a)),
        }
    }

    fn num(addr: IpAddr) -> u128 {
        match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }
}

#[derive(Debug, Clone)]
struct RawEntry {
    r: u128,
    len_sel: u8,
    len_val: u8,
    allow: bool,
}

/// One family's share of a random config, before it is turned into prefixes.
#[derive(Debug, Clone)]
struct RawCase {
    base: u128,
    shift: u32,
    guards: Vec<Vec<RawEntry>>,
    /// (selector, bits): 3 in 4 clustered, the rest anywhere.
    addrs: Vec<(u8, u128)>,
}

fn raw_entry() -> impl Strategy<Value = RawEntry> {
    (any::<u128>(), any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(r, len_sel, len_val, allow)| RawEntry {
        r,
        len_sel,
        len_val,
        allow,
    })
}

fn raw_case(fam: Fam, guards: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = RawCase> {
    (
        any::<u128>(),
        0..=fam.bits() - VAR_BITS,
        prop::collection::vec(prop::collection::vec(raw_entry(), 0..=20), guards),
        prop::collection::vec((any::<u8>(), any::<u128>()), 1..=32),
    )
        .prop_map(|(base, shift, guards, addrs)| RawCase {
            base,
            shift,
            guards,
            addrs,
        })
}

impl RawCase {
    fn cluster(&self, fam: Fam, r: u128) -> u128 {
        (self.base ^ ((r & ((1 << VAR_BITS) - 1)) << self.shift)) & fam.width_mask()
    }

    /// 1 in 5: any length; otherwise one that cuts through (or just past)
    /// the varying bits.
    fn len(&self, fam: Fam, e: &RawEntry) -> u8 {
        let bits = fam.bits();
        let len = if e.len_sel.is_multiple_of(5) {
            u32::from(e.len_val) % (bits + 1)
        } else {
            let lo = bits - self.shift - VAR_BITS;
            (lo + u32::from(e.len_val) % (VAR_BITS + 3)).min(bits)
        };
        u8::try_from(len).expect("len <= 128")
    }

    /// Per guard: unique prefixes with their action. A prefix drawn twice
    /// keeps its first action, so no prefix is both allowed and denied.
    fn entries(&self, fam: Fam) -> Vec<Vec<(IpNet, Action)>> {
        self.guards
            .iter()
            .map(|raw| {
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                for e in raw {
                    let n = IpNet::new(fam.addr(self.cluster(fam, e.r)), self.len(fam, e))
                        .expect("valid len")
                        .trunc();
                    if seen.insert(n) {
                        out.push((n, if e.allow { Action::Allow } else { Action::Deny }));
                    }
                }
                out
            })
            .collect()
    }

    /// Random addresses, plus the edges of every prefix (first, last, and
    /// the neighbours just outside).
    fn addrs(&self, fam: Fam, entries: &[Vec<(IpNet, Action)>]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .addrs
            .iter()
            .map(|&(sel, r)| fam.addr(if sel.is_multiple_of(4) { r } else { self.cluster(fam, r) }))
            .collect();
        for (n, _) in entries.iter().flatten() {
            let first = Fam::num(n.network());
            let last = Fam::num(n.broadcast());
            out.push(n.network());
            out.push(n.broadcast());
            out.push(fam.addr(first.wrapping_sub(1)));
            out.push(fam.addr(last.wrapping_add(1)));
        }
        out
    }
}

/// Guard `i` gets 1–3 ports of its own: distinct across guards by construction.
fn ports_of(i: usize, n: u8) -> Vec<u16> {
    let i = u16::try_from(i).expect("few guards");
    (0..u16::from(n % 3 + 1)).map(|k| 1000 * (i + 1) + 7 * k).collect()
}

fn build_config(entries: &[Vec<(IpNet, Action)>], nports: &[u8]) -> Config {
    let guards = entries
        .iter()
        .enumerate()
        .map(|(i, es)| Guard {
            name: format!("guard{}", i + 1),
            ports: ports_of(i, nports[i % nports.len()]),
            entries: es
                .iter()
                .map(|&(net, action)| Entry {
                    net,
                    action,
                    origin: Origin {
                        file: PathBuf::from("prop.toml").into(),
                        line: 1,
                    },
                })
                .collect(),
        })
        .collect();
    config(Mode::Enforce, guards)
}

/// The property: for every guard port and address, the compiled maps give
/// the reference verdict; the stored prefixes are exactly the entries' ones.
fn check_policy(cfg: &Config, addrs: &[IpAddr]) -> Result<(), TestCaseError> {
    let p = Policy::compile(cfg);

    let mut want_v4 = BTreeSet::new();
    let mut want_v6 = BTreeSet::new();
    for e in cfg.guards.iter().flat_map(|g| &g.entries) {
        match e.net {
            IpNet::V4(n) => want_v4.insert((n.prefix_len(), n.network().octets())),
            IpNet::V6(n) => want_v6.insert((n.prefix_len(), n.network().octets())),
        };
    }
    prop_assert_eq!(p.v4.keys().copied().collect::<BTreeSet<_>>(), want_v4);
    prop_assert_eq!(p.v6.keys().copied().collect::<BTreeSet<_>>(), want_v6);

    for (gi, g) in cfg.guards.iter().enumerate() {
        for &port in &g.ports {
            for &addr in addrs {
                let (want, decider) = model_allows(g, addr);
                match p.lookup(addr, port) {
                    Lookup::Judged { guard, allowed, prefix } => {
                        prop_assert_eq!(usize::from(guard), gi);
                        prop_assert_eq!(
                            allowed,
                            want,
                            "guard {} port {} addr {}: model decided by {:?}, lookup hit {:?}",
                            g.name,
                            port,
                            addr,
                            decider,
                            prefix
                        );
                        if let Some(hit) = prefix {
                            prop_assert!(hit.contains(&addr), "{} does not contain {}", hit, addr);
                        }
                        if let Some(d) = decider {
                            prop_assert!(
                                prefix.is_some_and(|hit| hit.prefix_len() >= d.prefix_len()),
                                "lookup hit {:?} is shorter than the deciding entry {}",
                                prefix,
                                d
                            );
                        }
                    }
                    Lookup::NotGuarded => prop_assert!(false, "port {} of guard {} not guarded", port, g.name),
                }
            }
        }
    }
    if let Some(&a) = addrs.first() {
        prop_assert_eq!(p.lookup(a, UNGUARDED), Lookup::NotGuarded);
    }
    Ok(())
}

/// A TOML config for the same guards (bare addresses for host prefixes), to
/// drive the property through `Config::parse` too.
fn toml_of(entries: &[Vec<(IpNet, Action)>], nports: &[u8]) -> String {
    let quote = |n: &IpNet| {
        if n.prefix_len() == n.max_prefix_len() {
            format!("\"{}\"", n.addr())
        } else {
            format!("\"{n}\"")
        }
    };
    let mut s = String::from("interfaces = [\"eth0\"]\nmetrics_listen = \"\"\n");
    for (i, es) in entries.iter().enumerate() {
        let list = |action| {
            es.iter()
                .filter(|(_, a)| *a == action)
                .map(|(n, _)| quote(n))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ports = ports_of(i, nports[i % nports.len()]);
        s.push_str(&format!(
            "\n[[guard]]\nports = {ports:?}\nallow = [{}]\ndeny = [{}]\n",
            list(Action::Allow),
            list(Action::Deny)
        ));
    }
    s
}

fn prop_config() -> ProptestConfig {
    // No regression files: this crate's source tree is not the place for them.
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(prop_config())]

    #[test]
    fn lookup_matches_model_v4(case in raw_case(Fam::V4, 1..=4), nports in prop::collection::vec(any::<u8>(), 4)) {
        let entries = case.entries(Fam::V4);
        let cfg = build_config(&entries, &nports);
        check_policy(&cfg, &case.addrs(Fam::V4, &entries))?;
    }

    #[test]
    fn lookup_matches_model_v6(case in raw_case(Fam::V6, 1..=4), nports in prop::collection::vec(any::<u8>(), 4)) {
        let entries = case.entries(Fam::V6);
        let cfg = build_config(&entries, &nports);
        check_policy(&cfg, &case.addrs(Fam::V6, &entries))?;
    }

    /// Both families in every guard, through TOML and `Config::parse`.
    #[test]
    fn lookup_matches_model_mixed_via_toml(
        (v4, v6) in (1usize..=4).prop_flat_map(|n| (raw_case(Fam::V4, n..=n), raw_case(Fam::V6, n..=n))),
        nports in prop::collection::vec(any::<u8>(), 4),
    ) {
        let e4 = v4.entries(Fam::V4);
        let e6 = v6.entries(Fam::V6);
        let entries: Vec<Vec<(IpNet, Action)>> =
            e4.iter().zip(&e6).map(|(a, b)| a.iter().chain(b).copied().collect()).collect();
        let text = toml_of(&entries, &nports);
        let cfg = match Config::parse(Path::new("/nonexistent/prop.toml"), &text) {
            Ok(cfg) => cfg,
            Err(e) => return Err(TestCaseError::fail(format!("generated config rejected:\n{e}\n{text}"))),
        };
        // Parsing keeps every generated prefix with its action.
        for (g, want) in cfg.guards.iter().zip(&entries) {
            let got: BTreeSet<(IpNet, Action)> = g.entries.iter().map(|e| (e.net, e.action)).collect();
            prop_assert_eq!(got, want.iter().copied().collect::<BTreeSet<_>>());
        }
        let mut addrs = v4.addrs(Fam::V4, &e4);
        addrs.extend(v6.addrs(Fam::V6, &e6));
        check_policy(&cfg, &addrs)?;
    }
}

/// The masks an address gets from `p` (longest stored prefix), by family.
fn mask_at(p: &Policy, addr: IpAddr) -> u64 {
    match addr {
        IpAddr::V4(a) => {
            let a = u32::from(a);
            (0..=32u8)
                .rev()
                .find_map(|l| p.v4.get(&(l, super::mask_u32(a, l).to_be_bytes())))
                .map_or(0, |m| m.allow)
        }
        IpAddr::V6(a) => {
            let a = u128::from(a);
            (0..=128u8)
                .rev()
                .find_map(|l| p.v6.get(&(l, super::mask_u128(a, l).to_be_bytes())))
                .map_or(0, |m| m.allow)
        }
    }
}

proptest! {
    #![proptest_config(prop_config())]

    /// The tables of a transition answer like the old policy for the kept
    /// bits and like the new one for the new policy's bits, at every address.
    #[test]
    fn union_answers_old_for_kept_bits_and_new_for_new_bits(
        old in raw_case(Fam::V4, 1..=3),
        new in raw_case(Fam::V4, 1..=3),
        nports in prop::collection::vec(any::<u8>(), 4),
    ) {
        let (eo, en) = (old.entries(Fam::V4), new.entries(Fam::V4));
        let po = Policy::compile(&build_config(&eo, &nports));
        // The new guards on bits 8.. so they are disjoint from the old ones.
        let pn = Policy::compile(&build_config(&en, &nports));
        let bits: Vec<u8> = (0..pn.bits.len()).map(|g| u8::try_from(g + 8).expect("small")).collect();
        let pn = pn.with_bits(&bits);
        let keep: u64 = po.bits.iter().fold(0, |k, &b| k | 1 << b);
        let u = Policy::union(&po, keep, &pn);
        let mut addrs = old.addrs(Fam::V4, &eo);
        addrs.extend(new.addrs(Fam::V4, &en));
        for a in addrs {
            let (mu, mo, mn) = (mask_at(&u, a), mask_at(&po, a), mask_at(&pn, a));
            prop_assert_eq!(mu & keep, mo & keep, "kept bits at {}", a);
            prop_assert_eq!(mu & !keep, mn, "new bits at {}", a);
        }
    }
}

#[test]
fn with_bits_moves_masks_and_port_owners_alike() {
    let cfg = config(
        Mode::Enforce,
        vec![
            guard("a", &[25], &["192.0.2.0/24"], &[]),
            guard("b", &[587], &["192.0.2.0/25", "2001:db8::/32"], &[]),
        ],
    );
    let p = Policy::compile(&cfg);
    let q = p.with_bits(&[5, 2]);
    assert_eq!(q.bits, vec![5, 2]);
    assert_eq!(q.ports[&25].guard, 5);
    assert_eq!(q.ports[&587].guard, 2);
    assert_eq!(q.v4[&(25, [192, 0, 2, 0])].allow, (1 << 5) | (1 << 2));
    assert_eq!(q.v4[&(24, [192, 0, 2, 0])].allow, 1 << 5);
    for a in ["192.0.2.1", "192.0.2.200", "2001:db8::1", "198.51.100.1"] {
        for port in [25, 587] {
            assert_eq!(allowed(&p, a, port), allowed(&q, a, port), "{a}:{port}");
        }
    }
    let names = q.names_by_bit(&["a".to_string(), "b".to_string()]);
    assert_eq!(
        (names[5].as_str(), names[2].as_str(), names[0].as_str()),
        ("a", "b", "")
    );
}

#[test]
fn limits_report_count_and_limit() {
    let ports: Vec<u16> = (2000..2128).collect();
    let cfg = config(Mode::Enforce, vec![guard("many", &ports, &["192.0.2.0/24"], &[])]);
    let over = Policy::compile(&cfg).limits();
    assert_eq!(over.len(), 1, "{over:?}");
    assert_eq!((over[0].count, over[0].limit), (128, 127));
    assert!(over[0].to_string().contains("guarded ports: 128 (the limit is 127)"));
    let ok = config(Mode::Enforce, vec![guard("few", &ports[..127], &["192.0.2.0/24"], &[])]);
    assert!(Policy::compile(&ok).limits().is_empty());
    // Long blocks: one over the limit, counted without building tables.
    let mut p = Policy::compile(&ok);
    for b in 0..=relay_guard_common::MAX_LONG_BLOCKS {
        let [_, x, y, z] = b.to_be_bytes();
        p.v4.insert((32, [x, y, z, 1]), AllowMask { allow: 1 });
    }
    let over = p.limits();
    assert_eq!(over.len(), 1, "{over:?}");
    assert_eq!(
        (over[0].count, over[0].limit),
        (
            relay_guard_common::MAX_LONG_BLOCKS as usize + 1,
            relay_guard_common::MAX_LONG_BLOCKS as usize
        )
    );
    // Their /28s: within the /24s' limit, /25s give 8 each.
    let mut p = Policy::compile(&ok);
    let n = relay_guard_common::MAX_LONG_SUBBLOCKS / 8 + 1;
    for b in 0..n {
        let [_, x, y, z] = b.to_be_bytes();
        p.v4.insert((25, [x, y, z, 0]), AllowMask { allow: 1 });
    }
    let over = p.limits();
    assert_eq!(over.len(), 1, "{over:?}");
    assert_eq!(
        (over[0].count, over[0].limit),
        (n as usize * 8, relay_guard_common::MAX_LONG_SUBBLOCKS as usize)
    );
    assert!(over[0].to_string().contains("/28s"), "{}", over[0]);
}
