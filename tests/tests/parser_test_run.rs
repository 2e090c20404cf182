//! Differential test of the XDP parser: the real program, loaded (not
//! attached) with maps filled from a random config, runs thousands of crafted
//! frames through `BPF_PROG_TEST_RUN`; every return action must equal what
//! the plain-Rust reference model (`relay_guard_tests::model`) says, and the kernel
//! counters must equal the sum of the model's counter keys.
//!
//! The seed is random per run and printed; `RG_TEST_SEED=<n>` replays one. A
//! mismatch prints the seed, the frame in hex, the kernel's action and the
//! model's outcome.
//!
//! Frames shorter than 14 bytes are not run: `BPF_PROG_TEST_RUN` rejects an
//! XDP input shorter than an Ethernet header with EINVAL
//! (`bpf_test_init`: `size < ETH_HLEN`), so no real NIC could hand the program
//! one either. For those the model must say "not ours", and that is asserted.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use aya::programs::{TestRun, TestRunOptions};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use relay_guard::{
    config::{Action, Config, Entry, Guard, Mode, Origin, XdpMode},
    kernel::{loader::Loaded, maps::Maps, sync},
    policy::{Lookup, Policy, tables6::V6End},
};
use relay_guard_common::{CounterKey, MAX_GUARDS, family};
use relay_guard_tests::{
    model::{self, Outcome},
    packet::{FrameGen, Ipv6, Targets, Tcp, base_frames, hex, proto, tcp_v6, truncations},
    require,
};

/// Generated frames per test, on top of every truncation of the base frames.
const FRAMES: usize = 12_000;
/// Mismatches printed in full before the test gives up listing them.
const SHOW: usize = 20;

fn seed() -> u64 {
    match std::env::var("RG_TEST_SEED") {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("RG_TEST_SEED={s} is not a u64")),
        Err(_) => rand::rng().random(),
    }
}

/// Prefix lengths drawn around each anchor address; nested ones make the
/// allow /24 → deny /25 → allow /32 carve-outs of SPEC.md.
const V4_LENS: [u8; 10] = [8, 16, 20, 23, 24, 25, 26, 28, 31, 32];
/// IPv6 lengths: level boundaries of the trie (multiples of 4) and lengths
/// between them, expanded over several entries (15: above the top level).
const V6_LENS: [u8; 18] = [
    15, 32, 33, 36, 40, 44, 45, 48, 52, 56, 58, 64, 66, 96, 99, 120, 127, 128,
];

/// Fixed IPv6 entries of the first guard, in 2001:db8:1234::/45, which no
/// anchor reaches, so the trie always has a node path with pushed masks
/// (1234::/48 holds two deeper prefixes, a skip from /48 down to the node at
/// /60 where the /64 ends, then a leaf), a leaf (1235::/48 holds only the
/// /66), an expanded /47 alone (1236::/48 and 1237::/48 are mask entries from
/// it), and two /128s that share all but their last bits (a skip from /48
/// down to the last node: 1238::7 between them is denied).
const FIXED_V6: [(&str, Action); 7] = [
    ("2001:db8:1234::/47", Action::Allow),
    ("2001:db8:1234:5678::/64", Action::Deny),
    ("2001:db8:1234:5678::9/128", Action::Allow),
    ("2001:db8:1235:abcd::/66", Action::Deny),
    ("2001:db8:1236::/47", Action::Allow),
    ("2001:db8:1238::6/128", Action::Allow),
    ("2001:db8:1238::8/128", Action::Allow),
];

fn v4_anchor(rng: &mut StdRng) -> Ipv4Addr {
    let base: [u8; 3] = *[[192, 0, 2], [198, 51, 100], [203, 0, 113], [198, 18, 0], [198, 19, 7]]
        .choose(rng)
        .expect("non-empty");
    Ipv4Addr::new(base[0], base[1], base[2], rng.random())
}

fn v6_anchor(rng: &mut StdRng) -> Ipv6Addr {
    // 2001:db8:00XX:: with small host parts: clustered like real assignments.
    let site = u128::from(rng.random_range(0u16..0x20)) << 80;
    let subnet = u128::from(rng.random_range(0u16..4)) << 64;
    Ipv6Addr::from((0x2001_0db8u128 << 96) | site | subnet | u128::from(rng.random::<u16>()))
}

fn mask_v4(a: Ipv4Addr, len: u8) -> Ipv4Addr {
    let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    Ipv4Addr::from(u32::from(a) & m)
}

fn mask_v6(a: Ipv6Addr, len: u8) -> Ipv6Addr {
    let m = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    Ipv6Addr::from(u128::from(a) & m)
}

/// A random config: 1–5 guards (sometimes 33–64) over the SMTP ports and a
/// few others, each with nested allow/deny prefixes around shared anchors (so
/// guards disagree about the same prefixes), sometimes an MX-style
/// `0.0.0.0/0` allow with deny carve-outs.
fn random_config(rng: &mut StdRng, mode: Mode) -> Config {
    // Now and then many guards, so allow-mask bits above 31 are exercised.
    let n_guards = if rng.random_bool(0.25) {
        rng.random_range(33..=MAX_GUARDS)
    } else {
        rng.random_range(1..=5)
    };
    let mut owner: Vec<Vec<u16>> = vec![Vec::new(); n_guards];
    let mut used = BTreeSet::new();
    // SMTP ports and neighbours go to random guards (in a big config, most
    // likely a high one); 24 and 26 stay unguarded.
    for p in [25, 465, 587, 2525, 10025] {
        if rng.random_bool(0.9) {
            owner[rng.random_range(0..n_guards)].push(p);
            used.insert(p);
        }
    }
    // Every guard owns at least one port.
    for ports in owner.iter_mut().filter(|o| o.is_empty()) {
        loop {
            let p = rng.random_range(1..u16::MAX);
            if p != 24 && p != 26 && used.insert(p) {
                ports.push(p);
                break;
            }
        }
    }
    let v4_anchors: Vec<Ipv4Addr> = (0..6).map(|_| v4_anchor(rng)).collect();
    let v6_anchors: Vec<Ipv6Addr> = (0..6).map(|_| v6_anchor(rng)).collect();
    let origin = Origin {
        file: PathBuf::from("random.toml").into(),
        line: 1,
    };
    let guards = owner
        .into_iter()
        .enumerate()
        .map(|(gi, mut ports)| {
            ports.sort_unstable();
            // prefix text → action; a BTreeMap keeps one action per prefix
            // (the same prefix as allow and deny is a config error).
            let mut entries: BTreeMap<String, Action> = BTreeMap::new();
            let action = |rng: &mut StdRng| {
                if rng.random_bool(0.55) {
                    Action::Allow
                } else {
                    Action::Deny
                }
            };
            for a in &v4_anchors {
                for _ in 0..rng.random_range(0..4) {
                    let len = *V4_LENS.choose(rng).expect("non-empty");
                    entries.insert(format!("{}/{len}", mask_v4(*a, len)), action(rng));
                }
            }
            for a in &v6_anchors {
                for _ in 0..rng.random_range(0..4) {
                    let len = *V6_LENS.choose(rng).expect("non-empty");
                    entries.insert(format!("{}/{len}", mask_v6(*a, len)), action(rng));
                }
            }
            if rng.random_bool(0.2) {
                entries.insert("0.0.0.0/0".into(), Action::Allow);
                entries.insert("::/0".into(), Action::Allow);
            }
            if gi == 0 {
                for (net, action) in FIXED_V6 {
                    entries.insert(net.into(), action);
                }
            }
            Guard {
                name: format!("g{gi}"),
                ports,
                entries: entries
                    .into_iter()
                    .map(|(net, action)| Entry {
                        net: net.parse().unwrap_or_else(|e| panic!("generated prefix {net}: {e}")),
                        action,
                        origin: origin.clone(),
                    })
                    .collect(),
            }
        })
        .collect();
    Config {
        path: PathBuf::from("random.toml"),
        interfaces: vec!["lo".into()],
        mode,
        xdp_mode: XdpMode::Auto,
        metrics_listen: None,
        pin_dir: PathBuf::from("/sys/fs/bpf/unused"),
        state_dir: PathBuf::from(relay_guard::config::DEFAULT_STATE_DIR),
        guards,
        relaytest: Default::default(),
        bans: Vec::new(),
        crowdsec: None,
        list_files: Vec::new(),
        fingerprint: 0,
        xdp_priority: 10,
        xdp_dispatcher: false,
    }
}

fn targets(cfg: &Config) -> Targets {
    let mut t = Targets {
        v4: Vec::new(),
        v6: Vec::new(),
        guarded: cfg.guards.iter().flat_map(|g| g.ports.iter().copied()).collect(),
        dst_v4: Ipv4Addr::new(203, 0, 113, 1),
        dst_v6: "2001:db8:1::1".parse().expect("constant"),
    };
    for e in cfg.guards.iter().flat_map(|g| &g.entries) {
        match e.net.addr() {
            IpAddr::V4(a) => t.v4.push((a, e.net.prefix_len())),
            IpAddr::V6(a) => t.v6.push((a, e.net.prefix_len())),
        }
    }
    t
}

/// Kernel counters summed over CPUs, decoded to label space through the
/// slot maps (as the agent's metrics do).
fn read_counters(maps: &Maps) -> BTreeMap<CounterKey, u64> {
    let slots = relay_guard::kernel::counters::slots(maps).expect("read counter slots");
    relay_guard::kernel::counters::read(&maps.counters, &slots).expect("read counters")
}

fn outcome_name(o: Outcome) -> String {
    let fam = |f| match f {
        family::IPV4 => "v4",
        family::IPV6 => "v6",
        _ => "unknown",
    };
    match o {
        Outcome::NotOurs => "not ours".into(),
        Outcome::Malformed { family } => format!("malformed {}", fam(family)),
        Outcome::Judged { family, allowed, .. } => {
            format!("judged {} {}", fam(family), if allowed { "allowed" } else { "denied" })
        }
    }
}

fn action_name(a: u32) -> String {
    match a {
        model::XDP_DROP => "XDP_DROP".into(),
        model::XDP_PASS => "XDP_PASS".into(),
        other => format!("action {other}"),
    }
}

fn differential(test: &str, mode: Mode) {
    if !require::privileged(test) {
        return;
    }
    let seed = seed();
    println!("{test}: seed {seed} (RG_TEST_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let cfg = random_config(&mut rng, mode);
    let policy = Policy::compile(&cfg);
    println!(
        "{test}: {} guards, {} guarded ports, {} IPv4 and {} IPv6 prefixes in the maps",
        cfg.guards.len(),
        policy.ports.len(),
        policy.v4.len(),
        policy.v6.len()
    );
    let mut loaded = Loaded::load().unwrap_or_else(|e| panic!("{test}: load: {e:?}"));
    sync::apply(&mut loaded.maps, &policy).unwrap_or_else(|e| panic!("{test}: map sync: {e:?}"));
    // Without a context, BPF_PROG_TEST_RUN runs XDP on the calling
    // namespace's loopback receive queue (net/bpf/test_run.c), so that is
    // the ingress_ifindex the program records.
    let ifindex = relay_guard::kernel::loader::ifindex("lo").expect("lo exists");
    loaded.maps.register_iface(ifindex).expect("register lo for counting");
    let before = read_counters(&loaded.maps);

    let targets = targets(&cfg);
    let mut frames: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut gen_ = FrameGen::new(rng.random(), targets.clone());
    // In a kernel-matrix guest (qemu without hardware virtualisation) a
    // share of the mix: the kernel's part is the same program on the same
    // frame kinds; the host runs them all.
    let n = FRAMES / relay_guard_tests::slowdown() as usize;
    frames.extend((0..n).map(|_| gen_.frame()));
    let port = if targets.guarded.contains(&25) {
        25
    } else {
        targets.guarded[0]
    };
    let outside_v4 = Ipv4Addr::new(198, 51, 100, 254);
    let outside_v6: Ipv6Addr = "2001:db8:ff::fe".parse().expect("constant");
    let mut bases = Vec::new();
    for &(a4, a6) in &[(targets.v4.first(), targets.v6.first()), (None, None)] {
        let src4 = a4.map_or(outside_v4, |&(a, _)| a);
        let src6 = a6.map_or(outside_v6, |&(a, _)| a);
        bases.extend(base_frames(src4, src6, &targets, port));
    }
    for (label, base) in &bases {
        frames.extend(truncations(base).map(|t| (*label, t.to_vec())));
    }
    // SYNs from each part of the fixed IPv6 entries' trie: leaves (inside and
    // outside), the expanded /47, masks pushed down from it.
    for src in [
        "2001:db8:1234:5678::9",
        "2001:db8:1234:5678::1",
        "2001:db8:1235:abcd::1",
        "2001:db8:1235::1",
        "2001:db8:1236::1",
        "2001:db8:1237:ffff::1",
        "2001:db8:1234:1::1",
        "2001:db8:1238::6",
        "2001:db8:1238::7",
        "2001:db8:1238:0:1::7",
    ] {
        let ip = Ipv6::new(src.parse().expect("constant"), targets.dst_v6, proto::TCP);
        frames.push(("v6 trie probe", tcp_v6(&[], &ip, &Tcp::syn(40_000, port, 1))));
    }

    // Which parts of the IPv6 trie the judged IPv6 frames exercise, read
    // from the kernel's arrays.
    let mut trie_paths: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, frame) in &frames {
        let Outcome::Judged {
            family: family::IPV6,
            port,
            ..
        } = model::judge(frame, &policy)
        else {
            continue;
        };
        let src = ipv6_source(frame);
        let hit = loaded.maps.v6.lookup(src.octets());
        let decided_by = match policy.lookup(IpAddr::V6(src), port) {
            Lookup::Judged { prefix, .. } => prefix.map(|p| p.prefix_len()),
            Lookup::NotGuarded => None,
        };
        if hit.nodes > 0 {
            *trie_paths.entry("through a node").or_default() += 1;
        }
        if hit.skips > 0 {
            *trie_paths.entry("through a skip").or_default() += 1;
        }
        let kind = match hit.end {
            V6End::LeafInside => "leaf, inside its prefix",
            V6End::LeafOutside => "leaf, outside its prefix",
            V6End::SkipOutside => "skip, outside its prefix",
            V6End::Mask if decided_by.is_some_and(|l| l != hit.len && l > 16) => "expanded or pushed mask entry",
            V6End::Mask => "mask entry",
            V6End::Broken => "broken link",
        };
        *trie_paths.entry(kind).or_default() += 1;
    }
    println!("{test}: judged IPv6 frames by IPv6 trie path: {trie_paths:?}");
    for want in [
        "through a node",
        "leaf, inside its prefix",
        "leaf, outside its prefix",
        "expanded or pushed mask entry",
        "through a skip",
        "skip, outside its prefix",
    ] {
        assert!(
            trie_paths.contains_key(want),
            "{test}: seed {seed}: no judged IPv6 frame hit `{want}` in the trie: {trie_paths:?}"
        );
    }
    assert!(
        !trie_paths.contains_key("broken link"),
        "{test}: seed {seed}: {trie_paths:?}"
    );

    // A kernel without multi-buffer XDP (before 5.18) loads the
    // single-buffer program, and BPF_PROG_TEST_RUN refuses a frame larger
    // than one page for it: the jumbo frames run only where frags exist.
    let frags = loaded.frags();
    let mut jumbo_not_run = 0usize;
    println!(
        "{test}: program `{}` ({})",
        loaded.program_name(),
        if frags {
            "xdp.frags"
        } else {
            "single-buffer: this kernel has no xdp.frags"
        }
    );
    let prog = loaded.program();
    let mut expected: BTreeMap<CounterKey, u64> = BTreeMap::new();
    let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_label: BTreeMap<(&str, String), u64> = BTreeMap::new();
    let mut mismatches = 0usize;
    let mut report = String::new();
    let mut too_short = 0usize;
    let mut run = 0usize;
    for (i, (label, frame)) in frames.iter().enumerate() {
        if !frags && label.ends_with("jumbo") {
            jumbo_not_run += 1;
            continue;
        }
        let outcome = model::judge(frame, &policy);
        *by_outcome.entry(outcome_name(outcome)).or_default() += 1;
        *by_label.entry((label, outcome_name(outcome))).or_default() += 1;
        if frame.len() < 14 {
            assert_eq!(
                outcome,
                Outcome::NotOurs,
                "seed {seed}: a {}-byte frame must be not ours",
                frame.len()
            );
            too_short += 1;
            continue;
        }
        let (want, key) = model::action(outcome, policy.mode, ifindex);
        let got = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| {
                panic!(
                    "seed {seed}: test_run of frame {i} ({label}, {} bytes): {e:?}\n{}",
                    frame.len(),
                    hex(frame)
                )
            })
            .return_value;
        run += 1;
        if let Some(k) = key {
            *expected.entry(k).or_default() += 1;
        }
        if got != want {
            mismatches += 1;
            if mismatches <= SHOW {
                report += &format!(
                    "frame {i} ({label}, {} bytes): kernel {}, model {} for {outcome:?}\n{}\n",
                    frame.len(),
                    action_name(got),
                    action_name(want),
                    hex(frame)
                );
            }
        }
    }

    println!(
        "{test}: {} frames ({run} run, {too_short} shorter than 14 bytes checked on the model only, {jumbo_not_run} jumbo frames not run: no xdp.frags)",
        frames.len()
    );
    assert_eq!(
        jumbo_not_run == 0,
        frags,
        "{test}: jumbo frames run exactly where the program has xdp.frags"
    );
    for (o, n) in &by_outcome {
        println!("  {o:<22} {n:>6}");
    }
    println!("{test}: by generator label:");
    for ((label, o), n) in &by_label {
        println!("  {label:<24} {o:<22} {n:>6}");
    }
    assert!(
        mismatches == 0,
        "{test}: seed {seed}: {mismatches} kernel/model mismatches (first {SHOW}):\n{report}"
    );
    let kinds: BTreeSet<String> = by_outcome.keys().cloned().collect();
    for want in [
        "not ours",
        "malformed unknown",
        "malformed v4",
        "malformed v6",
        "judged v4 denied",
        "judged v6 denied",
    ] {
        assert!(
            kinds.contains(want),
            "{test}: seed {seed}: the mix never produced `{want}`: {by_outcome:?}"
        );
    }

    let after = read_counters(&loaded.maps);
    let delta: BTreeMap<CounterKey, u64> = after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v != 0)
        .collect();
    assert_eq!(
        delta, expected,
        "{test}: seed {seed}: kernel counters (left) differ from the model's counter keys (right)"
    );
}

/// The source of an IPv6 frame the model judged (so well formed): after the
/// Ethernet header and up to two VLAN tags.
fn ipv6_source(frame: &[u8]) -> Ipv6Addr {
    let mut l3 = 14;
    while matches!(u16::from_be_bytes([frame[l3 - 2], frame[l3 - 1]]), 0x8100 | 0x88a8) {
        l3 += 4;
    }
    let src: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().expect("16 bytes");
    Ipv6Addr::from(src)
}

#[test]
fn test_run_matches_model_enforce() {
    differential("test_run_matches_model_enforce", Mode::Enforce);
}

#[test]
fn test_run_matches_model_monitor() {
    differential("test_run_matches_model_monitor", Mode::Monitor);
}
