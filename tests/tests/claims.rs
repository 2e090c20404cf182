//! Claims the README and docs make that no other test showed: `xdp_mode =
//! "auto"` falls back to generic XDP where the driver has no native XDP; the
//! program attaches in native mode to a jumbo-MTU interface (`xdp.frags`) and
//! still judges; a blocked source is logged at most once a second; and an
//! upgrade swaps the program into an old layout's pinned link without a gap.
//! Real agent binary, real XDP in network namespaces, real TCP.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, assert_gate, ip, pin_dir},
    net::{BannerServer, connect_banner},
    netns::{NetNs, unique},
    prober::Prober,
    require,
};

fn config(dir: &TempDir, interface: &str, xdp_mode: &str, pin_dir: &Path) -> (PathBuf, DetachOnDrop) {
    TestConfig::new(interface, pin_dir)
        .xdp_mode(xdp_mode)
        .guard(&Guard::new("relay", &[25]).allow(&[ALLOWED_V4]))
        .write(dir)
}

/// `ip -d link show dev IF` inside `ns`.
fn link_details(ns: &NetNs, interface: &str) -> String {
    ns.ip(&["-d", "link", "show", "dev", interface])
}

#[test]
fn auto_mode_falls_back_to_generic_xdp_without_driver_support() {
    if !require::privileged("auto_mode_falls_back_to_generic_xdp_without_driver_support") {
        return;
    }
    // A bridge is an Ethernet device whose driver has no native XDP.
    let ns = NetNs::new("rgd");
    let bridge = unique("rd");
    ns.ip(&["link", "add", &bridge, "type", "bridge"]);
    ns.ip(&["link", "set", &bridge, "up"]);
    let dir = TempDir::new();
    let pins = pin_dir("rg-auto-");
    let (config, _detach) = config(&dir, &bridge, "auto", &pins);

    // Native alone must fail, naming the interface: this is what auto falls back from.
    let mut native = Agent::spawn(
        &ns,
        dir.write(
            "native.toml",
            &std::fs::read_to_string(&config)
                .expect("config")
                .replace("\"auto\"", "\"native\""),
        ),
        &dir,
        &["run"],
    );
    let status = native.wait(Duration::from_secs(20));
    assert!(
        !status.success(),
        "native XDP on a bridge should fail:\n{}",
        native.log_text()
    );
    assert!(
        native.log_text().contains(&bridge),
        "the error names the interface:\n{}",
        native.log_text()
    );

    let agent = Agent::start(&ns, config, &dir);
    let log = agent.log_text();
    assert!(
        log.contains("falling back to generic (skb) mode"),
        "no fallback log line:\n{log}"
    );
    let link = link_details(&ns, &bridge);
    assert!(link.contains("xdpgeneric"), "not attached in generic mode:\n{link}");
}

#[test]
fn jumbo_mtu_interface_is_guarded_in_native_mode() {
    if !require::privileged("jumbo_mtu_interface_is_guarded_in_native_mode") {
        return;
    }
    let lab = Lab::new();
    // Native XDP on veth refuses an MTU above a page unless the program
    // declares multi-buffer support (`xdp.frags`).
    lab.server.ip(&["link", "set", "dev", &lab.server_if, "mtu", "9000"]);
    lab.client.ip(&["link", "set", "dev", &lab.client_if, "mtu", "9000"]);
    let dir = TempDir::new();
    let pins = pin_dir("rg-jumbo-");
    let (config, _detach) = config(&dir, &lab.server_if, "native", &pins);
    let _server = BannerServer::start(&lab.server, &[25]);
    let kernel = relay_guard::kernel::features::get();
    if !kernel.frags {
        // Before 5.18 there is no multi-buffer XDP: the kernel refuses the
        // native attach, and the agent must say why and what to do (never a
        // bare "Numerical result out of range"); `auto` then guards in
        // generic mode, saying so.
        println!("branch: kernel {} has no xdp.frags", kernel.release);
        let mut run = Agent::spawn(&lab.server, config, &dir, &["run"]);
        let exit = run.wait(Duration::from_secs(60));
        let log = run.log_text();
        assert!(
            !exit.success(),
            "native attach at MTU 9000 without frags succeeded?\n{log}"
        );
        for want in ["MTU 9000", "xdp.frags", "5.18", "xdp_mode = \"skb\""] {
            assert!(log.contains(want), "the error must name {want:?}:\n{log}");
        }
        let auto = dir.write(
            "auto.toml",
            &std::fs::read_to_string(dir.0.join("relay-guard.toml"))
                .expect("config")
                .replace("xdp_mode = \"native\"", "xdp_mode = \"auto\""),
        );
        let agent = Agent::start(&lab.server, auto, &dir);
        let log = agent.log_text();
        assert!(
            log.contains("falling back to generic (skb) mode") && log.contains("MTU 9000"),
            "the fallback must say why:\n{log}"
        );
        let link = link_details(&lab.server, &lab.server_if);
        assert!(link.contains("xdpgeneric"), "not attached in generic mode:\n{link}");
        assert_gate(&lab, "jumbo MTU, generic mode");
        return;
    }
    let _agent = Agent::start(&lab.server, config, &dir);
    let link = link_details(&lab.server, &lab.server_if);
    assert!(link.contains("mtu 9000"), "{link}");
    assert!(
        link.contains("xdp ") || link.contains("xdpdrv"),
        "not attached in native mode:\n{link}"
    );
    assert!(!link.contains("xdpgeneric"), "fell back to generic mode:\n{link}");
    assert_gate(&lab, "jumbo MTU");
}

#[test]
fn a_blocked_source_is_logged_at_most_once_a_second() {
    if !require::privileged("a_blocked_source_is_logged_at_most_once_a_second") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let pins = pin_dir("rg-log-");
    let (config, _detach) = config(&dir, &lab.server_if, "native", &pins);
    let _server = BannerServer::start(&lab.server, &[25]);
    let agent = Agent::start(&lab.server, config, &dir);

    // SYNs from one denied source for a bounded 3.5 s, each connect a new
    // source port: about 100 dropped SYNs.
    let start = Instant::now();
    let mut attempts = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        let r = connect_banner(&lab.client, ip(DENIED_V4), ip(SERVER_V4), 25, Duration::from_millis(30));
        assert!(r.is_err(), "the denied source got through");
        attempts += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    // Let the last events reach the log.
    std::thread::sleep(Duration::from_millis(1500));
    let log = agent.log_text();
    let needle = format!("{DENIED_V4} -> port 25");
    let lines = log.lines().filter(|l| l.contains(&needle)).count();
    println!("{attempts} connection attempts from {DENIED_V4} in {secs:.1} s: {lines} log lines");
    assert!(attempts >= 30, "too few attempts to show a limit: {attempts}");
    assert!(
        lines >= 2,
        "the blocked source was logged {lines} times in {secs:.1} s:\n{log}"
    );
    // At most once a second: a window of `secs` holds at most ceil(secs) + 1
    // once-a-second lines (the sleep after it adds at most one more).
    let bound = secs.ceil() as usize + 2;
    assert!(
        lines <= bound,
        "{lines} log lines for one source in {secs:.1} s (bound {bound}):\n{log}"
    );
}

#[test]
fn an_old_layouts_pinned_link_is_swapped_without_a_gap() {
    if !require::privileged("an_old_layouts_pinned_link_is_swapped_without_a_gap") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let pins = pin_dir("rg-layout-");
    let (config, _detach) = config(&dir, &lab.server_if, "native", &pins);
    let _server = BannerServer::start(&lab.server, &[25]);
    let ours = format!("layout-{}", relay_guard_common::LAYOUT_VERSION);
    let old = format!("layout-{}", relay_guard_common::LAYOUT_VERSION - 1);

    // An agent of "the previous version": its state, with a live pinned
    // link, under the previous layout's name (bpffs renames directories).
    let mut first = Agent::start(&lab.server, config.clone(), &dir);
    assert!(first.stop().success(), "{}", first.log_text());
    std::fs::rename(pins.join(&ours), pins.join(&old)).expect("rename the layout directory on bpffs");
    assert!(pins.join(&old).join("links").join(&lab.server_if).exists());
    assert_gate(&lab, "old layout's link, no agent");

    let prober = Prober::start(&lab.client, ip(ALLOWED_V4), ip(DENIED_V4), ip(SERVER_V4), 25);
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(&lab.server, config, &dir);
    std::thread::sleep(Duration::from_millis(500));
    let (tally, errors) = prober.finish();
    let log = agent.log_text();
    assert!(
        log.contains("another layout"),
        "no log line about the old layout:\n{log}"
    );
    assert!(!pins.join(&old).exists(), "the old layout was left in place:\n{log}");
    assert!(
        pins.join(&ours).join("links").join(&lab.server_if).exists(),
        "the link is not pinned under {ours}"
    );
    let link = link_details(&lab.server, &lab.server_if);
    assert_eq!(link.matches("prog/xdp id").count(), 1, "one program attached:\n{link}");
    let (ok, failed, blocked, admitted) = tally.counts();
    println!("layout swap: allowed {ok} ok / {failed} failed; denied {blocked} blocked / {admitted} admitted");
    assert!(ok > 0 && blocked > 0, "the prober ran too little");
    assert_eq!(
        (failed, admitted),
        (0, 0),
        "gap during the layout swap: {errors:?}\n{log}"
    );
    assert_gate(&lab, "after the layout swap");
}
