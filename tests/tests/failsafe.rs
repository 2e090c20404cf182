//! Failing safe across reloads (SPEC.md "Failing safe": one policy at a
//! time, all or nothing): guards inserted, removed and reordered under a
//! SYN flood; a reload over a kernel limit; an agent killed mid-sync. Real
//! agent binary, real XDP on veth between namespaces, real packets; what
//! reaches the server's stack is counted by nftables behind XDP.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, cli},
    config::TestConfig,
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, ip, pin_dir, scrape, wait_metric},
    net::{BannerServer, NftCounters, PURE_SYNS, SentCounters, connect_banner, metric},
    netns::NetNs,
    prober::ALLOWED_TIMEOUT,
    require,
};

/// 300,000 /24s outside the test's sources (10.0.0.0 up to 14.x), so a
/// full sync takes a while, plus the allowed source.
fn big_list() -> String {
    let mut s: String = (0..300_000u32)
        .map(|i| format!("{}.{}.{}.0/24\n", 10 + (i >> 16), (i >> 8) & 255, i & 255))
        .collect();
    s.push_str(&format!("{ALLOWED_V4}\n"));
    s
}

const RELAY: &str = "[[guard]]\nname = \"relay\"\nports = [25]\nallow_files = [\"relay-allow.txt\"]\n";
/// Allows everyone on another port: if port 25 ever tests its bit, the
/// denied source reaches the server.
const OPEN: &str = "[[guard]]\nname = \"open\"\nports = [587]\nallow = [\"0.0.0.0/0\"]\n";
const OTHER: &str = "[[guard]]\nname = \"other\"\nports = [2525]\nallow = [\"198.18.0.0/15\"]\n";

fn config_text(lab: &Lab, pin_dir: &Path, guards: &[&str]) -> String {
    guards
        .iter()
        .fold(TestConfig::new(&lab.server_if, pin_dir), |c, g| c.table(g))
        .text()
}

fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// nftables counters in the server namespace at prerouting (after XDP):
/// pure SYNs from each source to port 25 that reached the stack.
struct Arrived<'a>(NftCounters<'a>);

impl<'a> Arrived<'a> {
    fn install(ns: &'a NetNs, sources: &[&str]) -> Arrived<'a> {
        Arrived(NftCounters::new(ns, "prerouting", -400, sources, &[25], PURE_SYNS))
    }

    fn packets(&self, src: &str) -> u64 {
        self.0.packets(src, 25)
    }
}

/// Sends bare SYNs from `src` to `dst:25` (a non-blocking connect, then
/// close: one SYN each), paced, until stopped (at most 400,000).
fn syn_flood(client: &NetNs, src: IpAddr, dst: IpAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let ns = NetNs::borrow(client);
    std::thread::spawn(move || {
        ns.run(move || {
            let mut sent = 0u64;
            let dst = socket2::SockAddr::from(SocketAddr::new(dst, 25));
            let bind = socket2::SockAddr::from(SocketAddr::new(src, 0));
            while !stop.load(Ordering::Relaxed) && sent < 400_000 {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
                s.set_nonblocking(true).expect("nonblocking");
                s.bind(&bind).expect("bind source");
                let _ = s.connect(&dst);
                drop(s);
                sent += 1;
                std::thread::sleep(Duration::from_micros(300));
            }
            sent
        })
    })
}

#[test]
fn guards_inserted_removed_and_reordered_never_cross_wire_ports() {
    if !require::privileged("guards_inserted_removed_and_reordered_never_cross_wire_ports") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let pins = pin_dir("rg-test-");
    dir.write("relay-allow.txt", &big_list());
    let config = dir.write("relay-guard.toml", &config_text(&lab, &pins, &[RELAY]));
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    let sent = SentCounters::install_syns(&lab.client, &[ALLOWED_V4, DENIED_V4], &[25]);
    let arrived = Arrived::install(&lab.server, &[ALLOWED_V4, DENIED_V4]);

    let stop = Arc::new(AtomicBool::new(false));
    let floods = [
        syn_flood(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), Arc::clone(&stop)),
        syn_flood(&lab.client, ip(DENIED_V4), ip(SERVER_V4), Arc::clone(&stop)),
    ];
    // Insert above, remove, reorder, insert two, remove one, back.
    let steps: [&[&str]; 6] = [
        &[OPEN, RELAY],
        &[RELAY],
        &[OPEN, OTHER, RELAY],
        &[RELAY, OTHER, OPEN],
        &[OTHER, RELAY],
        &[RELAY],
    ];
    let started = Instant::now();
    for (i, guards) in steps.iter().enumerate() {
        let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
        replace(&config, &config_text(&lab, &pins, guards));
        let m = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
        assert_eq!(
            metric(&m, "relay_guard_config_reload_failures_total", &[]),
            0.0,
            "reload {i} failed:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<u64> = floods.into_iter().map(|h| h.join().expect("flood thread")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (allowed_sent, denied_sent) = (sent.packets(ALLOWED_V4, 25), sent.packets(DENIED_V4, 25));
    let (allowed_in, denied_in) = (arrived.packets(ALLOWED_V4), arrived.packets(DENIED_V4));
    eprintln!(
        "6 reloads in {:?} (300,001-entry list): flood attempts {counts:?}; allowed SYNs sent {allowed_sent}, reached the server {allowed_in}; denied SYNs sent {denied_sent}, reached the server {denied_in}",
        started.elapsed()
    );
    assert!(denied_sent > 1000 && allowed_sent > 1000, "the flood did not run");
    assert_eq!(denied_in, 0, "denied SYNs reached the server's stack during reloads");
    assert_eq!(allowed_in, allowed_sent, "allowed SYNs were dropped during reloads");
}

/// A reload over a kernel limit is refused before anything is written: the
/// kernel keeps the last good policy (status says it matches), the failure
/// is logged and counted, and `check-config` names the limit.
#[test]
fn reload_over_capacity_is_refused_before_any_write() {
    if !require::privileged("reload_over_capacity_is_refused_before_any_write") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let pins = pin_dir("rg-test-");
    dir.write("relay-allow.txt", &format!("{ALLOWED_V4}\n"));
    let good = config_text(&lab, &pins, &[RELAY]);
    let config = dir.write("relay-guard.toml", &good);
    let good_copy = dir.write("good.toml", &good);
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    let agent = Agent::start(&lab.server, config.clone(), &dir);

    // 128 guarded ports besides 25 (two over), and an allow list that differs, so a
    // partial write would show.
    let ports: Vec<String> = (2000..2128).map(|p| p.to_string()).collect();
    let many = format!(
        "[[guard]]\nname = \"many\"\nports = [{}]\nallow = [\"192.0.2.0/24\"]\n",
        ports.join(", ")
    );
    let bad = config_text(&lab, &pins, &[&many, RELAY]);
    // Guards without a name: valid, with a warning (their names follow their place).
    let unnamed = config_text(
        &lab,
        &pins,
        &[
            "[[guard]]\nports = [25]\nallow = [\"192.0.2.0/24\"]\n",
            "[[guard]]\nports = [587]\n",
        ],
    );
    let (st, out) = cli(&dir.write("unnamed.toml", &unnamed), &["check-config"]);
    assert!(st.success(), "{out}");
    assert!(
        out.contains("2 guards have no `name`"),
        "no warning for unnamed guards:\n{out}"
    );

    let before = metric(&scrape(&lab), "relay_guard_config_reload_failures_total", &[]);
    replace(&config, &bad);
    let m = wait_metric(&lab, &agent, "relay_guard_config_reload_failures_total", before + 1.0);
    assert_eq!(metric(&m, "relay_guard_config_last_reload_successful", &[]), 0.0);
    let log = agent.log_text();
    assert!(
        log.contains("reload failed") && log.contains("127"),
        "failure not logged:\n{log}"
    );
    let (st, out) = cli(&good_copy, &["status"]);
    assert!(st.success(), "status failed:\n{out}");
    assert!(
        out.contains("kernel maps match"),
        "after a refused reload the kernel is not the last good policy:\n{out}"
    );
    let bad_copy = dir.write("bad.toml", &bad);
    let (st, out) = cli(&bad_copy, &["check-config"]);
    assert!(!st.success(), "check-config accepted 129 guarded ports:\n{out}");
    assert!(
        out.contains("guarded ports: 129") && out.contains("127"),
        "check-config does not name the limit:\n{out}"
    );

    let ok = connect_banner(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), 25, ALLOWED_TIMEOUT);
    let denied = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        ip(SERVER_V4),
        25,
        Duration::from_millis(400),
    );
    assert!(denied.is_err(), "denied source got through after a refused reload");
    // No server on 25 here: the allowed source gets a refusal (RST), not a timeout.
    assert!(
        !matches!(&ok, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "allowed source timed out (dropped) after a refused reload: {ok:?}"
    );
}

/// SIGKILL in the middle of a long sync: the filter keeps judging by one
/// policy (the allowed source passes, the denied one never does), and the
/// next agent start makes the kernel match the config. The kills land at
/// fractions of a measured reload, so some hit the table sweep.
#[test]
fn agent_killed_mid_sync_leaves_one_policy() {
    if !require::privileged("agent_killed_mid_sync_leaves_one_policy") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let pins = pin_dir("rg-test-");
    dir.write("relay-allow.txt", &big_list());
    let config = dir.write("relay-guard.toml", &config_text(&lab, &pins, &[RELAY]));
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    let text = |round: usize| {
        let guards: &[&str] = if round.is_multiple_of(2) {
            &[OPEN, RELAY]
        } else {
            &[RELAY]
        };
        config_text(&lab, &pins, guards)
    };
    // How long a reload takes, from SIGHUP to the counted outcome.
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    let mut took = Duration::ZERO;
    for round in 0..2 {
        std::fs::write(&config, text(round)).expect("write");
        let t = Instant::now();
        agent.signal(Signal::SIGHUP);
        wait_metric(&lab, &agent, "relay_guard_config_reloads_total", (round + 1) as f64);
        took = took.max(t.elapsed());
    }
    let mut results = Vec::new();
    for (round, frac) in [0.5f64, 0.7, 0.8, 0.85, 0.9, 0.95].into_iter().enumerate() {
        std::fs::write(&config, text(round)).expect("write");
        agent.signal(Signal::SIGHUP);
        std::thread::sleep(took.mul_f64(frac));
        agent.signal(Signal::SIGKILL);
        let _ = agent.wait(Duration::from_secs(5));
        // No agent: the pinned program judges by what the kernel holds.
        let (mut admitted, mut refused) = (0, 0);
        for _ in 0..3 {
            if connect_banner(
                &lab.client,
                ip(DENIED_V4),
                ip(SERVER_V4),
                25,
                Duration::from_millis(300),
            )
            .is_ok()
            {
                admitted += 1;
            }
            if connect_banner(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), 25, ALLOWED_TIMEOUT).is_err() {
                refused += 1;
            }
        }
        results.push((frac, admitted, refused));
        agent = Agent::start(&lab.server, config.clone(), &dir);
        let (_, out) = cli(&config, &["status"]);
        assert!(out.contains("kernel maps match"), "after a restart: {out}");
    }
    drop(agent);
    eprintln!("reload takes {took:?}; killed at (fraction, denied admitted of 3, allowed refused of 3): {results:?}");
    for (frac, admitted, refused) in results {
        assert_eq!((admitted, refused), (0, 0), "after a kill at {frac} of a reload");
    }
}

/// Ports that move to other guards, across an agent restart (the agent has
/// no memory of the old policy: the kernel's tables are read back) and a
/// reload back, under a SYN flood: nothing denied reaches the server,
/// nothing allowed is dropped.
#[test]
fn ports_moved_between_guards_across_a_restart_never_cross_wire() {
    if !require::privileged("ports_moved_between_guards_across_a_restart_never_cross_wire") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let pins = pin_dir("rg-test-");
    dir.write("relay-allow.txt", &big_list());
    let both = "[[guard]]\nname = \"relay\"\nports = [25, 587]\nallow_files = [\"relay-allow.txt\"]\n";
    let split = "[[guard]]\nname = \"relay2\"\nports = [25]\nallow_files = [\"relay-allow.txt\"]\n";
    let a = config_text(&lab, &pins, &[both]);
    let b = config_text(&lab, &pins, &[OPEN, split]);
    let config = dir.write("relay-guard.toml", &a);
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    let sent = SentCounters::install_syns(&lab.client, &[ALLOWED_V4, DENIED_V4], &[25]);
    let arrived = Arrived::install(&lab.server, &[ALLOWED_V4, DENIED_V4]);
    let stop = Arc::new(AtomicBool::new(false));
    let floods = [
        syn_flood(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), Arc::clone(&stop)),
        syn_flood(&lab.client, ip(DENIED_V4), ip(SERVER_V4), Arc::clone(&stop)),
    ];
    std::thread::sleep(Duration::from_millis(300));
    // Down, config changed, up: port 25 moves to `relay2`, 587 to `open`.
    agent.signal(Signal::SIGTERM);
    let _ = agent.wait(Duration::from_secs(10));
    replace(&config, &b);
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    std::thread::sleep(Duration::from_millis(300));
    // And back by a reload.
    let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
    replace(&config, &a);
    let m = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
    assert_eq!(metric(&m, "relay_guard_config_reload_failures_total", &[]), 0.0);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.join().expect("flood thread");
    }
    std::thread::sleep(Duration::from_millis(200));
    let (allowed_sent, denied_sent) = (sent.packets(ALLOWED_V4, 25), sent.packets(DENIED_V4, 25));
    let (allowed_in, denied_in) = (arrived.packets(ALLOWED_V4), arrived.packets(DENIED_V4));
    eprintln!(
        "restart and reload moving ports: allowed SYNs sent {allowed_sent}, reached the server {allowed_in}; denied SYNs sent {denied_sent}, reached the server {denied_in}"
    );
    let (_, out) = cli(&config, &["status"]);
    assert!(out.contains("kernel maps match"), "{out}");
    assert!(denied_sent > 500 && allowed_sent > 500, "the flood did not run");
    assert_eq!(denied_in, 0, "denied SYNs reached the server's stack");
    assert_eq!(allowed_in, allowed_sent, "allowed SYNs were dropped");
}

/// 20,000 /24s, each in a /16 of its own (11.0.7.0 up to 110.199.7.0),
/// plus the allowed source: far more IPv4 blocks than a small config's set
/// holds, so the reload to it resizes the maps.
fn wide_list() -> String {
    let mut s: String = (0..20_000u32)
        .map(|i| format!("{}.{}.7.0/24\n", 11 + i / 200, i % 200))
        .collect();
    s.push_str(&format!("{ALLOWED_V4}\n"));
    s
}

/// The set directories under the layout (published `set-<K>` and
/// unpublished `next-<K>`), and the one in force (the highest `set-<K>`).
fn sets(pins: &Path) -> (Vec<String>, String) {
    let layout = pins.join(format!("layout-{}", relay_guard_common::LAYOUT_VERSION));
    let mut dirs: Vec<String> = std::fs::read_dir(&layout)
        .expect("layout directory")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("set-") || n.starts_with("next-"))
        .collect();
    dirs.sort();
    let current = dirs
        .iter()
        .filter_map(|n| n.strip_prefix("set-")?.parse::<u32>().ok())
        .max()
        .map(|k| format!("set-{k}"))
        .expect("a published set");
    (dirs, current)
}

/// A reload that needs more IPv4 blocks than the set in force holds moves
/// to a new, larger set of maps, and one back to a small list to a small
/// set again, under a SYN flood: nothing denied reaches the server, nothing
/// allowed is dropped, and the pins name one complete set throughout. Then
/// the agent is killed at points of such a resize: the pinned program
/// still judges by one complete policy, and a new agent comes up on it.
#[test]
fn maps_resized_by_reloads_keep_one_policy_through_floods_and_kills() {
    if !require::privileged("maps_resized_by_reloads_keep_one_policy_through_floods_and_kills") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let pins = pin_dir("rg-test-");
    let small = format!("{ALLOWED_V4}\n");
    let list = dir.write("relay-allow.txt", &small);
    let config = dir.write("relay-guard.toml", &config_text(&lab, &pins, &[RELAY]));
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    let (first_sets, first) = sets(&pins);
    assert_eq!(first_sets, [first.clone()], "one set after the start");

    let sent = SentCounters::install_syns(&lab.client, &[ALLOWED_V4, DENIED_V4], &[25]);
    let arrived = Arrived::install(&lab.server, &[ALLOWED_V4, DENIED_V4]);
    let stop = Arc::new(AtomicBool::new(false));
    let floods = [
        syn_flood(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), Arc::clone(&stop)),
        syn_flood(&lab.client, ip(DENIED_V4), ip(SERVER_V4), Arc::clone(&stop)),
    ];
    std::thread::sleep(Duration::from_millis(300));
    let mut took = Duration::ZERO;
    for (round, text) in [wide_list(), small.clone()].iter().enumerate() {
        let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
        let t = Instant::now();
        replace(&list, text);
        let m = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
        took = took.max(t.elapsed());
        assert_eq!(
            metric(&m, "relay_guard_config_reload_failures_total", &[]),
            0.0,
            "{}",
            agent.log_text()
        );
        let log = agent.log_text();
        assert_eq!(
            log.matches("maps resized").count(),
            round + 1,
            "round {round}: no resize logged:\n{log}"
        );
        let (dirs, current) = sets(&pins);
        assert_eq!(dirs, [current.clone()], "round {round}: the old set's pins were left");
        assert_ne!(current, first, "round {round}: the set in force did not change");
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.join().expect("flood thread");
    }
    std::thread::sleep(Duration::from_millis(200));
    let (allowed_sent, denied_sent) = (sent.packets(ALLOWED_V4, 25), sent.packets(DENIED_V4, 25));
    let (allowed_in, denied_in) = (arrived.packets(ALLOWED_V4), arrived.packets(DENIED_V4));
    eprintln!(
        "resizes under a flood: allowed SYNs sent {allowed_sent}, reached the server {allowed_in}; denied SYNs sent {denied_sent}, reached the server {denied_in}; a resizing reload took up to {took:?}"
    );
    let (_, out) = cli(&config, &["status"]);
    assert!(out.contains("kernel maps match"), "{out}");
    assert!(denied_sent > 500 && allowed_sent > 500, "the flood did not run");
    assert_eq!(denied_in, 0, "denied SYNs reached the server's stack");
    assert_eq!(allowed_in, allowed_sent, "allowed SYNs were dropped");

    // SIGKILL at points of a resizing reload (grow, then shrink).
    let mut results = Vec::new();
    let wide = wide_list();
    for (round, frac) in [0.1f64, 0.4, 0.7, 0.9].into_iter().enumerate() {
        replace(&list, if round % 2 == 0 { &wide } else { &small });
        std::thread::sleep(took.mul_f64(frac));
        agent.signal(Signal::SIGKILL);
        let _ = agent.wait(Duration::from_secs(5));
        let (dirs, current) = sets(&pins);
        assert!(
            dirs.contains(&current),
            "after a kill at {frac}: the symlink names {current}, sets {dirs:?}"
        );
        let (mut admitted, mut refused) = (0, 0);
        for _ in 0..3 {
            if connect_banner(
                &lab.client,
                ip(DENIED_V4),
                ip(SERVER_V4),
                25,
                Duration::from_millis(300),
            )
            .is_ok()
            {
                admitted += 1;
            }
            if connect_banner(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), 25, ALLOWED_TIMEOUT).is_err() {
                refused += 1;
            }
        }
        results.push((frac, admitted, refused, dirs.len()));
        agent = Agent::start(&lab.server, config.clone(), &dir);
        let (_, out) = cli(&config, &["status"]);
        assert!(out.contains("kernel maps match"), "after a restart: {out}");
        let (dirs, current) = sets(&pins);
        assert_eq!(dirs, [current], "after the restart: sets left behind");
    }
    drop(agent);
    eprintln!("killed at (fraction, denied admitted of 3, allowed refused of 3, set dirs): {results:?}");
    for (frac, admitted, refused, _) in results {
        assert_eq!(
            (admitted, refused),
            (0, 0),
            "after a kill at {frac} of a resizing reload"
        );
    }
}
