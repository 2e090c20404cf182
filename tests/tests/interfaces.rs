//! Interfaces that come and go (SPEC.md, "Failing safe" → "Interfaces"):
//! a configured interface missing at start is reported and attached when it
//! appears, a device deleted and created again is guarded again within a
//! second, and a device without Ethernet framing is refused. Real agent,
//! real XDP on veth between namespaces, real TCP.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, ALLOWED_V6, DENIED_V4, DENIED_V6, Lab, SERVER_V4, ip, link_pin, pin_dir, scrape},
    net::{BannerServer, connect_banner, metric},
    netns::{NetNs, unique},
    prober::ALLOWED_TIMEOUT,
    require,
};

/// Re-attaching must take at most this long (SPEC: "within a second").
const WITHIN: Duration = Duration::from_secs(1);

fn config(interfaces: &[&str], pin_dir: &Path) -> TestConfig {
    TestConfig::on(interfaces, pin_dir).guard(&Guard::new("relay", &[25]).allow(&["192.0.2.0/25", "2001:db8:a::/48"]))
}

fn config_text(interfaces: &[&str], pin_dir: &Path) -> String {
    config(interfaces, pin_dir).text()
}

fn setup(dir: &TempDir, interfaces: &[&str]) -> (PathBuf, DetachOnDrop) {
    config(interfaces, &pin_dir("rg-if-")).write(dir)
}

fn attached(lab: &Lab, iface: &str) -> f64 {
    let text = scrape(lab);
    assert!(
        text.contains(&format!("relay_guard_interface_attached{{interface=\"{iface}\"}}")),
        "no relay_guard_interface_attached series for {iface}:\n{text}"
    );
    metric(&text, "relay_guard_interface_attached", &[("interface", iface)])
}

/// Polls until `f` holds (bounded); how long it took.
fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_xdp(ns: &NetNs, iface: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "dev", iface])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("xdp"))
}

/// The allowed source connects and the denied one does not, to `server`.
fn assert_gate(client: &NetNs, allowed: &str, denied: &str, server: &str, what: &str) {
    let ok = connect_banner(client, ip(allowed), ip(server), 25, ALLOWED_TIMEOUT);
    assert!(ok.is_ok(), "{what}: allowed source {allowed} failed: {ok:?}");
    let no = connect_banner(client, ip(denied), ip(server), 25, Duration::from_millis(400));
    assert!(no.is_err(), "{what}: denied source {denied} got through");
}

/// A second veth pair between the lab's namespaces, IPv6 only: the server
/// end is `2001:db8:2::1`; the client sources `2001:db8:a::11` (allowed) and
/// `2001:db8:d::21` (denied) are routed over it.
const SERVER2: &str = "2001:db8:2::1";
const ALLOWED2: &str = "2001:db8:a::11";
const DENIED2: &str = "2001:db8:d::21";

const SERVER2_MAC: &str = "02:72:67:00:01:01";
const CLIENT2_MAC: &str = "02:72:67:00:01:02";

/// Creates the second pair (down, unaddressed).
fn add_second_link(lab: &Lab, server_if: &str, client_if: &str) {
    let (smac, cmac) = (SERVER2_MAC, CLIENT2_MAC);
    lab.server.ip(&[
        "link",
        "add",
        server_if,
        "address",
        smac,
        "type",
        "veth",
        "peer",
        "name",
        client_if,
        "address",
        cmac,
        "netns",
        &lab.client.name,
    ]);
}

/// Addresses, routes, neighbours of the second pair, and up.
fn configure_second_link(lab: &Lab, server_if: &str, client_if: &str) {
    let (smac, cmac) = (SERVER2_MAC, CLIENT2_MAC);
    lab.server
        .ip(&["addr", "add", "2001:db8:2::1/64", "dev", server_if, "nodad"]);
    lab.server.ip(&["link", "set", server_if, "up"]);
    lab.client
        .ip(&["addr", "add", "2001:db8:2::2/64", "dev", client_if, "nodad"]);
    for src in [ALLOWED2, DENIED2] {
        lab.client
            .ip(&["addr", "add", &format!("{src}/128"), "dev", client_if, "nodad"]);
        lab.server
            .ip(&["route", "add", &format!("{src}/128"), "dev", server_if]);
        lab.server.ip(&[
            "neigh",
            "replace",
            src,
            "lladdr",
            cmac,
            "dev",
            server_if,
            "nud",
            "permanent",
        ]);
    }
    lab.client.ip(&["link", "set", client_if, "up"]);
    lab.client.ip(&[
        "neigh",
        "replace",
        SERVER2,
        "lladdr",
        smac,
        "dev",
        client_if,
        "nud",
        "permanent",
    ]);
}

#[test]
fn an_interface_missing_at_start_is_attached_when_it_appears() {
    if !require::privileged("an_interface_missing_at_start_is_attached_when_it_appears") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let later = unique("rl");
    let later_peer = unique("rp");
    let (config, _detach) = setup(&dir, &[&lab.server_if, &later]);

    // It starts, guards the lab interface, and reports the missing one.
    let agent = Agent::start(&lab.server, config, &dir);
    assert_gate(&lab.client, ALLOWED_V4, DENIED_V4, SERVER_V4, "at start");
    assert_eq!(attached(&lab, &lab.server_if), 1.0);
    assert_eq!(attached(&lab, &later), 0.0, "the missing interface must read 0");
    let log = agent.log_text();
    assert!(
        log.contains(&later) && log.contains("does not exist (yet)"),
        "the log does not report {later}:\n{log}"
    );

    // Created: attached within a second, and it filters.
    let created = Instant::now();
    add_second_link(&lab, &later, &later_peer);
    until(&format!("xdp on {later}"), Duration::from_secs(5), || {
        has_xdp(&lab.server, &later)
    });
    let took = created.elapsed();
    configure_second_link(&lab, &later, &later_peer);
    println!("{later} attached {took:?} after it was created");
    assert!(took <= WITHIN, "{later} attached only after {took:?}");
    until("metric 1", Duration::from_secs(5), || attached(&lab, &later) == 1.0);
    assert_gate(&lab.client, ALLOWED2, DENIED2, SERVER2, "via the new interface");
    let dropped = metric(
        &scrape(&lab),
        "relay_guard_packets_total",
        &[("interface", &later), ("verdict", "dropped")],
    );
    assert!(
        dropped >= 1.0,
        "no drop counted on {later}:\n{}\n{}",
        scrape(&lab),
        agent.log_text()
    );
    assert_gate(&lab.client, ALLOWED_V4, DENIED_V4, SERVER_V4, "the lab interface still");
}

#[test]
fn a_recreated_interface_is_guarded_again_within_a_second() {
    if !require::privileged("a_recreated_interface_is_guarded_again_within_a_second") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, detach) = setup(&dir, &[&lab.server_if]);
    let agent = Agent::start(&lab.server, config, &dir);
    assert_gate(&lab.client, ALLOWED_V4, DENIED_V4, SERVER_V4, "at start");
    let link_pin = link_pin(&detach.pin_dir, &lab.server_if);

    for round in 0..3 {
        lab.server.ip(&["link", "del", &lab.server_if]);
        until(&format!("round {round}: metric 0"), Duration::from_secs(5), || {
            attached(&lab, &lab.server_if) == 0.0
        });
        // The dead link's pin is gone, nothing else changed.
        until(
            &format!("round {round}: dead pin removed"),
            Duration::from_secs(5),
            || !link_pin.exists(),
        );
        let dropped_before = metric(
            &scrape(&lab),
            "relay_guard_packets_total",
            &[("interface", &lab.server_if), ("verdict", "dropped")],
        );

        let created = Instant::now();
        lab.add_link();
        until(&format!("round {round}: xdp again"), Duration::from_secs(5), || {
            has_xdp(&lab.server, &lab.server_if)
        });
        let took = created.elapsed();
        println!(
            "round {round}: re-created {} guarded again after {took:?}",
            lab.server_if
        );
        assert!(took <= WITHIN, "round {round}: guarded again only after {took:?}");
        lab.configure_link();
        until(&format!("round {round}: metric 1"), Duration::from_secs(5), || {
            attached(&lab, &lab.server_if) == 1.0
        });
        assert!(link_pin.exists(), "round {round}: no pinned link for the new device");
        for (allowed, denied) in [(ALLOWED_V4, DENIED_V4), (ALLOWED_V6, DENIED_V6)] {
            assert_gate(
                &lab.client,
                allowed,
                denied,
                &Lab::server_addr_for(allowed).to_string(),
                &format!("round {round}: re-created"),
            );
        }
        // Counted on under the same name (the counter slot moved with it).
        let dropped_after = metric(
            &scrape(&lab),
            "relay_guard_packets_total",
            &[("interface", &lab.server_if), ("verdict", "dropped")],
        );
        assert!(
            dropped_after >= dropped_before + 2.0,
            "round {round}: drops on the new device not counted under its name ({dropped_before} -> {dropped_after})"
        );
    }
    let log = agent.log_text();
    assert!(log.contains("unpinning the dead link"), "{log}");
}

/// A device without Ethernet framing in the server namespace: ipip, else
/// gre, else tun (this kernel may lack the tunnel modules).
fn add_l3_device(ns: &NetNs, name: &str) -> &'static str {
    for (kind, args) in [
        (
            "ipip",
            vec![
                "link",
                "add",
                name,
                "type",
                "ipip",
                "local",
                "203.0.113.1",
                "remote",
                "203.0.113.9",
            ],
        ),
        (
            "gre",
            vec![
                "link",
                "add",
                name,
                "type",
                "gre",
                "local",
                "203.0.113.1",
                "remote",
                "203.0.113.9",
            ],
        ),
        ("tun", vec!["tuntap", "add", "dev", name, "mode", "tun"]),
    ] {
        let ok = std::process::Command::new("ip")
            .args(["-n", &ns.name])
            .args(&args)
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return kind;
        }
    }
    panic!("cannot create an ipip, gre or tun device");
}

#[test]
fn devices_without_ethernet_framing_are_refused() {
    if !require::privileged("devices_without_ethernet_framing_are_refused") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let l3 = unique("rt");
    let kind = add_l3_device(&lab.server, &l3);
    println!("the device without Ethernet framing is a {kind} device");
    let needle = format!("interface `{l3}` has no Ethernet framing (device type");
    let (config, detach) = setup(&dir, &[&lab.server_if, &l3]);

    // check-config, in the namespace where the device exists.
    let mut check = Agent::spawn(&lab.server, config.clone(), &dir, &["check-config"]);
    let status = check.wait(Duration::from_secs(10));
    assert!(!status.success(), "check-config accepted a {kind} device");
    assert!(check.log_text().contains(&needle), "{}", check.log_text());

    // run: refused at start, nothing attached.
    let mut run = Agent::spawn(&lab.server, config.clone(), &dir, &["run"]);
    let status = run.wait(Duration::from_secs(10));
    assert!(!status.success(), "the agent started with a {kind} device");
    assert!(run.log_text().contains(&needle), "{}", run.log_text());
    assert!(!has_xdp(&lab.server, &l3));

    // A reload that adds it fails and keeps the previous policy.
    let pins = detach.pin_dir.clone();
    let only_lab = config_text(&[&lab.server_if], &pins);
    std::fs::write(&config, &only_lab).expect("write config");
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    std::fs::write(&config, config_text(&[&lab.server_if, &l3], &pins)).expect("write config");
    until("reload failure counted", Duration::from_secs(10), || {
        metric(&scrape(&lab), "relay_guard_config_reload_failures_total", &[]) >= 1.0
    });
    until("refusal logged", Duration::from_secs(5), || {
        agent.log_text().contains(&needle)
    });
    assert!(!has_xdp(&lab.server, &l3));
    assert_gate(
        &lab.client,
        ALLOWED_V4,
        DENIED_V4,
        SERVER_V4,
        "after the refused reload",
    );
    drop(agent);

    // Configured before it exists: refused when it appears, reported as 0.
    let later = unique("rt");
    std::fs::write(&config, config_text(&[&lab.server_if, &later], &pins)).expect("write config");
    let agent = Agent::start(&lab.server, config, &dir);
    add_l3_device(&lab.server, &later);
    let later_needle = format!("interface `{later}` has no Ethernet framing");
    until("refusal logged", Duration::from_secs(5), || {
        agent.log_text().contains(&later_needle)
    });
    assert!(!has_xdp(&lab.server, &later));
    assert_eq!(attached(&lab, &later), 0.0);
    assert_eq!(attached(&lab, &lab.server_if), 1.0);
    let _ = std::process::Command::new("ip")
        .args(["-n", &lab.server.name, "link", "del", &later])
        .status();
}

/// `ip -n NS link set dev FROM down name TO up`. Down drops the device's
/// IPv4 routes and neighbours (and IPv6 addresses): [`rewire_v4`] puts the
/// IPv4 ones back.
fn rename(ns: &NetNs, from: &str, to: &str) {
    ns.ip(&["link", "set", "dev", from, "down"]);
    ns.ip(&["link", "set", "dev", from, "name", to]);
    ns.ip(&["link", "set", "dev", to, "up"]);
}

fn rewire_v4(lab: &Lab) {
    let dev = lab.server_if.as_str();
    lab.server.ip(&["addr", "replace", "203.0.113.1/24", "dev", dev]);
    for net in ["192.0.2.0/24", "198.51.100.0/24"] {
        lab.server.ip(&["route", "replace", net, "dev", dev]);
    }
    for src in [ALLOWED_V4, DENIED_V4, "203.0.113.2"] {
        lab.server.ip(&[
            "neigh",
            "replace",
            src,
            "lladdr",
            relay_guard_tests::lab::CLIENT_MAC,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
}

/// A pinned link stands for the device of its name: renamed away (to a name
/// the config does not hold), the device is no longer guarded under the old
/// name (metric 0, pin gone, filter detached from it); a device that takes
/// the name again is guarded within a second.
#[test]
fn a_renamed_interface_is_followed_by_name() {
    if !require::privileged("a_renamed_interface_is_followed_by_name") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, detach) = setup(&dir, &[&lab.server_if]);
    let agent = Agent::start(&lab.server, config, &dir);
    assert_gate(&lab.client, ALLOWED_V4, DENIED_V4, SERVER_V4, "at start");
    let link_pin = link_pin(&detach.pin_dir, &lab.server_if);
    let other = unique("rn");

    rename(&lab.server, &lab.server_if, &other);
    until("renamed away: metric 0", WITHIN, || {
        attached(&lab, &lab.server_if) == 0.0
    });
    until("renamed away: pin gone", WITHIN, || !link_pin.exists());
    until("renamed away: detached", WITHIN, || !has_xdp(&lab.server, &other));
    let log = agent.log_text();
    assert!(log.contains("is no longer called"), "{log}");

    let renamed_back = Instant::now();
    rename(&lab.server, &other, &lab.server_if);
    until("renamed back: xdp", Duration::from_secs(5), || {
        has_xdp(&lab.server, &lab.server_if)
    });
    let took = renamed_back.elapsed();
    println!("renamed back: guarded again after {took:?}");
    assert!(took <= WITHIN, "guarded again only after {took:?}");
    until("renamed back: metric 1", WITHIN, || {
        attached(&lab, &lab.server_if) == 1.0
    });
    assert!(link_pin.exists());
    rewire_v4(&lab);
    assert_gate(&lab.client, ALLOWED_V4, DENIED_V4, SERVER_V4, "renamed back");
}
