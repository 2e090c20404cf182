//! End to end: the real agent in a server namespace, real TCP from a client
//! namespace across veth, for IPv4 and IPv6, native and generic XDP.
//!
//! Shows that an allowed source completes the handshake to :25 and :587 and
//! reads the banner, that a denied source times out, that port 22 stays open
//! to everyone, and that /metrics counts exactly the TCP segments the client
//! sent (measured independently with nftables counters in the client).
use std::{
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, cli},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, ALLOWED_V6, DENIED_V4, DENIED_V6, Lab, SOURCES, family, ip, pin_dir, scrape},
    net::{BANNER, BannerServer, SentCounters, connect_banner, metric},
    require,
};

const GUARDED: [u16; 2] = [25, 587];
const OPEN: u16 = 22;
const DENIED_TIMEOUT: Duration = Duration::from_millis(1200);

fn write_config(lab: &Lab, dir: &TempDir, mode: &str, xdp_mode: &str) -> (PathBuf, DetachOnDrop) {
    // The relay guard reads its allowlist from a file, Spamhaus-style comments
    // included; the submission guard lists its prefixes inline.
    dir.write(
        "relay-allow.txt",
        "# peers\n192.0.2.10 ; office relay\n2001:db8:a::/48\n\n",
    );
    TestConfig::new(&lab.server_if, &pin_dir("rg-test-"))
        .mode(mode)
        .xdp_mode(xdp_mode)
        .guard(
            &Guard::new("submission", &[587])
                .allow(&["192.0.2.0/24", "2001:db8:a::/48"])
                .deny(&["198.51.100.0/24"]),
        )
        .guard(&Guard::new("relay", &[25]).allow_files(&["relay-allow.txt"]))
        .write(dir)
}

fn guard_of(port: u16) -> &'static str {
    if port == 25 { "relay" } else { "submission" }
}

/// Waits until every (source, port) count in /metrics equals what nftables
/// saw leave the client, then asserts equality (with both sides in the
/// message when it never converges).
fn assert_counts_match(lab: &Lab, sent: &SentCounters<'_>, verdict_of: impl Fn(&str) -> &'static str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(lab);
        let mut mismatches = Vec::new();
        for port in GUARDED {
            for src in SOURCES {
                let want = sent.packets(src, port);
                let labels = [
                    ("interface", lab.server_if.as_str()),
                    ("guard", guard_of(port)),
                    ("port", &port.to_string()),
                    ("family", family(src)),
                    ("verdict", verdict_of(src)),
                ];
                let got = metric(&text, "relay_guard_packets_total", &labels);
                #[expect(clippy::cast_precision_loss, reason = "test counts are small")]
                if got != want as f64 {
                    mismatches.push(format!(
                        "{src} -> :{port} {}: sent {want}, counted {got}",
                        verdict_of(src)
                    ));
                }
                assert!(want > 0, "the test sent nothing from {src} to :{port}");
            }
        }
        if mismatches.is_empty() {
            // metric() reads a missing series as 0, so look for the series
            // itself: a guarded port has one, the unguarded port none.
            let series = |port: u16| {
                text.lines()
                    .filter(|l| l.starts_with("relay_guard_packets_total{") && l.contains(&format!("port=\"{port}\"")))
                    .count()
            };
            assert!(
                series(25) > 0,
                "no relay_guard_packets_total series for port 25:\n{text}"
            );
            assert_eq!(
                series(OPEN),
                0,
                "port {OPEN} is in no guard and must not be counted:\n{text}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counters do not match what was sent:\n{}\n{text}",
            mismatches.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn enforce(xdp_mode: &str, test: &str) {
    if !require::privileged(test) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let server = BannerServer::start(&lab.server, &[25, 587, OPEN]);
    let sent = SentCounters::install(&lab.client, &SOURCES, &GUARDED);
    let (config, detach) = write_config(&lab, &dir, "enforce", xdp_mode);
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);

    let mut admitted = 0;
    for src in SOURCES {
        let dst = Lab::server_addr_for(src);
        let allowed = src == ALLOWED_V4 || src == ALLOWED_V6;
        for port in GUARDED {
            let r = connect_banner(&lab.client, ip(src), dst, port, DENIED_TIMEOUT);
            if allowed {
                let banner =
                    r.unwrap_or_else(|e| panic!("allowed {src} -> {dst}:{port} failed: {e}\n{}", agent.log_text()));
                assert_eq!(banner, BANNER, "allowed {src} -> :{port} read a wrong banner");
                admitted += 1;
            } else {
                let e = r.expect_err(&format!("denied {src} -> {dst}:{port} connected"));
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut,
                    "denied {src} -> :{port}: want a timeout (dropped SYN), got {e}"
                );
            }
        }
        let banner = connect_banner(&lab.client, ip(src), dst, OPEN, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{src} -> {dst}:{OPEN} (unguarded) failed: {e}"));
        assert_eq!(banner, BANNER);
        admitted += 1;
    }
    assert_eq!(
        server.accepted.load(Ordering::Relaxed),
        admitted,
        "the server accepted a connection it should not have"
    );
    assert_counts_match(&lab, &sent, |src| {
        if src == DENIED_V4 || src == DENIED_V6 {
            "dropped"
        } else {
            "passed"
        }
    });

    let text = scrape(&lab);
    assert_eq!(
        metric(
            &text,
            "relay_guard_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "relay_guard_allowlist_prefixes",
            &[("guard", "relay"), ("family", "ipv4")]
        ),
        1.0,
        "{text}"
    );
    let log = agent.log_text();
    assert!(
        log.contains(&format!(
            "mode=\"{}\"",
            if xdp_mode == "skb" { "skb" } else { "native" }
        )),
        "{log}"
    );
    let status = agent.stop();
    assert!(
        status.success(),
        "agent did not exit cleanly on SIGTERM: {status}\n{}",
        agent.log_text()
    );

    // The filter outlives the agent: the relay does not reopen.
    let r = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        ip(relay_guard_tests::lab::SERVER_V4),
        25,
        DENIED_TIMEOUT,
    );
    assert!(
        r.is_err(),
        "a denied source connected after the agent exited: the filter must stay attached"
    );
    assert!(
        lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains(" xdp"),
        "XDP gone after agent exit"
    );

    // `detach` removes program, link and pins; the port opens again.
    let (status, out) = cli(&config, &["detach"]);
    assert!(status.success(), "detach failed: {out}");
    assert!(
        !detach.pin_dir.exists(),
        "detach left {} behind",
        detach.pin_dir.display()
    );
    // The link goes when its last fd closes: another process that happens to
    // hold it for an instant (a `bpftool link` listing) may delay that.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains(" xdp")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains(" xdp"),
        "XDP still attached 3 s after detach"
    );
    let banner = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        ip(relay_guard_tests::lab::SERVER_V4),
        25,
        Duration::from_secs(3),
    )
    .expect("after detach every source connects");
    assert_eq!(banner, BANNER);
}

#[test]
fn enforce_native_xdp_v4_v6() {
    enforce("native", "enforce_native_xdp_v4_v6");
}

#[test]
fn enforce_generic_xdp_v4_v6() {
    enforce("skb", "enforce_generic_xdp_v4_v6");
}

#[test]
fn monitor_mode_passes_everything_and_counts_would_drop() {
    if !require::privileged("monitor_mode_passes_everything_and_counts_would_drop") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25, 587, OPEN]);
    let sent = SentCounters::install(&lab.client, &SOURCES, &GUARDED);
    let (config, _detach) = write_config(&lab, &dir, "monitor", "auto");
    let _agent = Agent::start(&lab.server, config, &dir);
    for src in SOURCES {
        for port in GUARDED {
            let banner = connect_banner(
                &lab.client,
                ip(src),
                Lab::server_addr_for(src),
                port,
                Duration::from_secs(3),
            )
            .unwrap_or_else(|e| panic!("monitor mode: {src} -> :{port} failed: {e}"));
            assert_eq!(banner, BANNER);
        }
    }
    assert_counts_match(&lab, &sent, |src| {
        if src == DENIED_V4 || src == DENIED_V6 {
            "would_drop"
        } else {
            "passed"
        }
    });
}
