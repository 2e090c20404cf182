//! Boot (SPEC.md "Failing safe"): pins do not survive a reboot, so a start
//! with a broken config or list file applies the last good copy kept in
//! `state_dir`, and under systemd (`Type=notify`) READY=1 comes only once the
//! filter is attached. Real agent binary, real XDP on veth between
//! namespaces, real TCP; the notify socket is a Unix datagram socket the
//! test binds, as systemd does.
use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, cli},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, ip, pin_dir, scrape, wait_metrics},
    net::{BannerServer, connect_banner, metric},
    prober::ALLOWED_TIMEOUT,
    require,
};

/// A config whose relay guard (port 25) reads `relay-allow.txt`, with its
/// own `pin_dir` and `state_dir`.
fn setup(lab: &Lab, dir: &TempDir) -> (PathBuf, PathBuf, DetachOnDrop) {
    let state_dir = dir.0.join("state");
    dir.write("relay-allow.txt", &format!("{ALLOWED_V4}\n"));
    let (config, detach) = TestConfig::new(&lab.server_if, &pin_dir("rg-boot-"))
        .state_dir(&state_dir)
        .guard(&Guard::new("relay", &[25]).allow_files(&["relay-allow.txt"]))
        .write(dir);
    (config, state_dir, detach)
}

/// Replaces `path` atomically (write + rename), as a list downloader does.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Whether the allowed source gets the banner on port 25 and the denied one
/// does not.
fn gate(lab: &Lab) -> (bool, bool) {
    let allowed = connect_banner(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), 25, ALLOWED_TIMEOUT).is_ok();
    let denied = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        ip(SERVER_V4),
        25,
        Duration::from_millis(400),
    )
    .is_ok();
    (allowed, denied)
}

fn xdp_attached(lab: &Lab) -> bool {
    lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains("xdp")
}

/// The pinned link of `iface` under `pin_dir` (`layout-<N>/links/<iface>`).
fn link_pinned(pins: &Path, iface: &str) -> bool {
    std::fs::read_dir(pins).is_ok_and(|entries| entries.flatten().any(|e| e.path().join("links").join(iface).exists()))
}

#[test]
fn a_broken_list_at_boot_starts_from_the_last_good_copy() {
    if !require::privileged("a_broken_list_at_boot_starts_from_the_last_good_copy") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, state_dir, _detach) = setup(&lab, &dir);
    let list = dir.0.join("relay-allow.txt");

    // A first boot with good files: the agent saves them once attached.
    let mut first = Agent::start(&lab.server, config.clone(), &dir);
    assert_eq!(gate(&lab), (true, false), "first start");
    assert!(
        state_dir.join("current").join("manifest.json").is_file(),
        "nothing saved in state_dir after a good start:\n{}",
        first.log_text()
    );
    let status = first.stop();
    assert!(status.success(), "SIGTERM exit {status}\n{}", first.log_text());

    // The reboot: pins are gone (bpffs is in memory), so nothing guards.
    let (status, out) = cli(&config, &["detach"]);
    assert!(status.success(), "detach: {out}");
    assert!(!xdp_attached(&lab), "still attached after detach");
    assert_eq!(gate(&lab), (true, true), "without the filter the port is open to all");
    // ... and the list download was cut short mid-line.
    std::fs::write(&list, format!("{ALLOWED_V4}\n198.51.10")).expect("break the list");
    let (status, out) = cli(&config, &["check-config"]);
    assert!(!status.success(), "the broken list must not validate: {out}");

    let agent = Agent::start(&lab.server, config.clone(), &dir);
    assert!(xdp_attached(&lab), "not attached:\n{}", agent.log_text());
    assert_eq!(
        gate(&lab),
        (true, false),
        "started from the last good copy: allowed passes, denied is dropped\n{}",
        agent.log_text()
    );
    let m = scrape(&lab);
    assert_eq!(
        metric(&m, "relay_guard_config_last_reload_successful", &[]),
        0.0,
        "the failed load is reported:\n{m}"
    );
    assert!(
        metric(&m, "relay_guard_config_reload_failures_total", &[]) >= 1.0,
        "the failed load is counted:\n{m}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("last good copy") && log.contains(&format!("{}:2", list.display())),
        "the log names the fallback and the broken file and line:\n{log}"
    );

    // The download completes: the real files are applied, the gauge is 1.
    replace(&list, &format!("{ALLOWED_V4}\n{DENIED_V4}\n"));
    wait_metrics(
        &lab,
        &agent,
        Duration::from_secs(10),
        "relay_guard_config_last_reload_successful 1",
        |t| metric(t, "relay_guard_config_last_reload_successful", &[]) == 1.0,
    );
    assert_eq!(
        gate(&lab),
        (true, true),
        "the fixed list (which now allows the other source) is in force\n{}",
        agent.log_text()
    );
    // And it is the new last good copy.
    let saved = std::fs::read_to_string(state_dir.join("current").join("manifest.json")).expect("manifest");
    assert!(saved.contains("relay-allow.txt"), "{saved}");
    let copies: Vec<String> = std::fs::read_dir(state_dir.join("current").join("lists"))
        .expect("lists")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).expect("copy"))
        .collect();
    assert_eq!(copies, [format!("{ALLOWED_V4}\n{DENIED_V4}\n")], "saved list copies");
    let gens = std::fs::read_dir(&state_dir)
        .expect("state_dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
        .count();
    assert_eq!(gens, 1, "only the last good set is kept");
    println!("boot from state_dir: guarded with the saved list, reported 0, then applied the fix and reported 1");
}

/// Reads notify datagrams until one contains `want` (bounded), returning
/// everything received up to and including it.
fn recv_until(sock: &UnixDatagram, want: &str, agent: &Agent) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            got.push(msg);
            if done {
                return got;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {want} within 30 s (got {got:?}):\n{}",
            agent.log_text()
        );
    }
}

#[test]
fn ready_is_sent_only_once_the_filter_is_attached() {
    if !require::privileged("ready_is_sent_only_once_the_filter_is_attached") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, _state, detach) = setup(&lab, &dir);
    let sock_path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    let env = format!("NOTIFY_SOCKET={}", sock_path.display());

    let mut agent = Agent::spawn_wrapped(&lab.server, config.clone(), &dir, &["env", &env], &["run"]);
    let got = recv_until(&sock, "READY=1", &agent);
    // At the moment READY=1 arrives the filter is in place.
    let pinned = link_pinned(&detach.pin_dir, &lab.server_if);
    let attached = xdp_attached(&lab);
    assert!(
        pinned && attached,
        "READY=1 before the filter was attached (link pinned {pinned}, xdp {attached}):\n{}",
        agent.log_text()
    );
    assert_eq!(gate(&lab), (true, false), "guarding at READY=1");
    assert_eq!(got.len(), 1, "one message up to READY: {got:?}");

    // A reload is RELOADING=1 ... READY=1; the exit is STOPPING=1.
    agent.signal(Signal::SIGHUP);
    let reload = recv_until(&sock, "READY=1", &agent);
    assert!(
        reload[0].lines().any(|l| l == "RELOADING=1") && reload[0].contains("MONOTONIC_USEC="),
        "a reload starts with RELOADING=1: {reload:?}"
    );
    agent.signal(Signal::SIGTERM);
    recv_until(&sock, "STOPPING=1", &agent);
    let status = agent.wait(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM exit {status}\n{}", agent.log_text());

    // A start that fails (broken list, no saved copy: a fresh state_dir)
    // exits non-zero with the reasons and never says READY.
    let (status, out) = cli(&config, &["detach"]);
    assert!(status.success(), "detach: {out}");
    let text = std::fs::read_to_string(&config).expect("config");
    let fresh_state = dir.0.join("fresh-state");
    std::fs::write(
        &config,
        text.replace(
            &format!("state_dir = \"{}\"", dir.0.join("state").display()),
            &format!("state_dir = \"{}\"", fresh_state.display()),
        ),
    )
    .expect("write config");
    std::fs::write(dir.0.join("relay-allow.txt"), "not-an-address\n").expect("break the list");
    let mut failing = Agent::spawn_wrapped(&lab.server, config, &dir, &["env", &env], &["run"]);
    let status = failing.wait(Duration::from_secs(30));
    assert!(!status.success(), "a start with nothing valid must fail");
    let log = failing.log_text();
    assert!(
        log.contains("relay-allow.txt") && log.contains("no last good config"),
        "the reasons are logged:\n{log}"
    );
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    let mut after = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        after.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        !after.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 from a failed start: {after:?}"
    );
    assert!(!xdp_attached(&lab), "a failed start attached something");
    println!(
        "READY=1 came with the link pinned and XDP attached; RELOADING/READY on SIGHUP; STOPPING on exit; none from a failed start"
    );
}
