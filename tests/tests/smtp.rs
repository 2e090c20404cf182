//! End to end with real mail software (GitHub issue 5, items 1 and 2).
//!
//! The server namespace runs Postfix's `smtp-sink` on 25, 465 and 587, on
//! its IPv4 and its IPv6 address, and the real agent in front of it. The
//! client namespace sends mail with `swaks` and Postfix's `smtp-source`
//! from the allowed and the denied documentation sources.
//!
//! Port 465 is implicit TLS (submissions) in real life; `smtp-sink` speaks
//! plain SMTP on it. That is fine here: the XDP program decides on the TCP
//! header before any TLS byte, and the test is about who gets a handshake.
//!
//! - enforce: allowed sources deliver (the sink holds exactly the messages
//!   sent), denied sources never get a SYN-ACK (both clients fail with a
//!   connect timeout, the sink holds nothing from them, nftables in the
//!   client saw only SYNs leave, and `dropped` equals those SYNs);
//! - monitor: everyone delivers, and `would_drop` equals the denied sources'
//!   packets exactly;
//! - Prometheus: a real Prometheus server scraping the agent holds
//!   `relay_guard_packets_total` series equal to /metrics and to what the
//!   client sent.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, METRICS, TempDir},
    config::{Guard, TestConfig},
    lab::{
        ALLOWED_V4, ALLOWED_V6, DENIED_V4, DENIED_V6, Lab, SERVER_V4, SERVER_V6, SOURCES, family, ip, pin_dir, scrape,
    },
    net::{SentCounters, metric},
    prometheus::{self, Prometheus, Sample, parse_samples},
    require,
    smtp::{SMTP_PORTS, SmtpSink, set_syn_retries, smtp_source, swaks, swaks_speaks_ipv6},
};

const TOOLS: &[&str] = &["smtp-sink", "swaks", "smtp-source", "prometheus"];
/// swaks' connect (and per-reply) timeout, seconds.
const SWAKS_TIMEOUT: u32 = 2;
/// Messages per smtp-source run, over this many parallel sessions.
const SOURCE_MESSAGES: u32 = 4;
const SOURCE_SESSIONS: u32 = 2;
const ALLOWED: [&str; 2] = [ALLOWED_V4, ALLOWED_V6];
const DENIED: [&str; 2] = [DENIED_V4, DENIED_V6];

fn write_config(lab: &Lab, dir: &TempDir, mode: &str) -> (PathBuf, DetachOnDrop) {
    TestConfig::new(&lab.server_if, &pin_dir("rg-smtp-"))
        .mode(mode)
        .guard(
            &Guard::new("submission", &[465, 587])
                .allow(&["192.0.2.0/24", "2001:db8:a::/48"])
                .deny(&["198.51.100.0/24"]),
        )
        .guard(&Guard::new("relay", &[25]).allow(&[ALLOWED_V4, "2001:db8:a::/48"]))
        .write(dir)
}

fn guard_of(port: u16) -> &'static str {
    if port == 25 { "relay" } else { "submission" }
}

fn is_denied(src: &str) -> bool {
    DENIED.contains(&src)
}

/// Starts smtp-sink on both server addresses and the three ports, and makes
/// the client give up a blocked connect after two SYNs (~3 s).
fn sinks(lab: &Lab, dir: &TempDir) -> SmtpSink {
    set_syn_retries(&lab.client, 1);
    SmtpSink::start(&lab.server, &dir.0, &[ip(SERVER_V4), ip(SERVER_V6)], &SMTP_PORTS)
}

/// What one source did on one port.
#[derive(Debug)]
struct Outcome {
    src: &'static str,
    port: u16,
    swaks: relay_guard_tests::smtp::Run,
    source: relay_guard_tests::smtp::Run,
}

/// From every source to every port: one message with swaks, then
/// SOURCE_MESSAGES with smtp-source. Allowed sources one after the other,
/// then the denied ones (whose attempts wait for timeouts) in parallel, one
/// thread per (source, port); smtp-source's route-based source selection is
/// per family, and within the denied phase every thread of a family wants
/// the same source.
fn send_everything(lab: &Lab) -> Vec<Outcome> {
    let one = |src: &'static str, port: u16| Outcome {
        src,
        port,
        swaks: swaks(&lab.client, src, Lab::server_addr_for(src), port, SWAKS_TIMEOUT),
        source: smtp_source(lab, src, port, SOURCE_MESSAGES, SOURCE_SESSIONS),
    };
    let mut out = Vec::new();
    for src in ALLOWED {
        for port in SMTP_PORTS {
            out.push(one(src, port));
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = DENIED
            .iter()
            .flat_map(|&src| SMTP_PORTS.map(|port| s.spawn(move || one(src, port))))
            .collect();
        for h in handles {
            out.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
    });
    out
}

/// Asserts how each client run ended: delivered, or (when `blocked`) a
/// connect timeout from both clients.
fn assert_outcomes(outcomes: &[Outcome], blocked: impl Fn(&str) -> bool, agent: &Agent) {
    for o in outcomes {
        let (src, port) = (o.src, o.port);
        if blocked(src) {
            // swaks exits 2 on a connect error; IO::Socket::INET6 says "timeout".
            assert_eq!(
                o.swaks.status.code(),
                Some(2),
                "swaks {src} -> :{port} should fail to connect:\n{}",
                o.swaks.output
            );
            assert!(
                o.swaks.output.contains("connect: timeout"),
                "swaks {src} -> :{port}: want a connect timeout:\n{}",
                o.swaks.output
            );
            assert!(
                !o.source.success(),
                "smtp-source {src} -> :{port} should fail:\n{}",
                o.source.output
            );
            assert!(
                o.source.output.contains("connect: Connection timed out"),
                "smtp-source {src} -> :{port}: want a connect timeout (dropped SYNs), not a refusal:\n{}",
                o.source.output
            );
        } else {
            assert!(
                o.swaks.success(),
                "swaks {src} -> :{port} failed ({}):\n{}\n{}",
                o.swaks.status,
                o.swaks.output,
                agent.log_text()
            );
            assert!(
                o.swaks.output.contains(" -> .\n<-  250 2.0.0 Ok\n"),
                "swaks {src} -> :{port}: no 250 after DATA:\n{}",
                o.swaks.output
            );
            assert!(
                o.source.success(),
                "smtp-source {src} -> :{port} failed ({}):\n{}",
                o.source.status,
                o.source.output
            );
        }
    }
}

/// Waits (up to 10 s) until every sink holds `want(src)` messages from each
/// source on each port; asserts equality.
fn assert_sink_counts(sink: &mut SmtpSink, want: impl Fn(&str) -> u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut mismatches = Vec::new();
        for src in SOURCES {
            for port in SMTP_PORTS {
                let got = sink.messages(port, src);
                if got != want(src) {
                    mismatches.push(format!("{src} -> :{port}: sent {}, the sink holds {got}", want(src)));
                }
            }
        }
        if mismatches.is_empty() {
            let total: u64 = SOURCES.iter().map(|&s| want(s) * SMTP_PORTS.len() as u64).sum();
            assert_eq!(
                sink.total() as u64,
                total,
                "the sinks hold messages from somewhere else"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sink counts wrong:\n{}",
            mismatches.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (up to 10 s) until /metrics counts, for every port, family and
/// verdict, what nftables saw leave the client from the sources of that
/// family judged `verdict_of(src)` (zero for a verdict no source gets).
/// Returns the final scrape.
fn assert_counts_match(lab: &Lab, sent: &SentCounters<'_>, verdict_of: impl Fn(&str) -> &'static str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(lab);
        let mut mismatches = Vec::new();
        for port in SMTP_PORTS {
            for src in SOURCES {
                assert!(
                    sent.packets(src, port) > 0,
                    "the test sent nothing from {src} to :{port}"
                );
            }
            for fam in ["ipv4", "ipv6"] {
                for verdict in ["passed", "dropped", "would_drop"] {
                    let want: u64 = SOURCES
                        .iter()
                        .filter(|&&s| family(s) == fam && verdict_of(s) == verdict)
                        .map(|&s| sent.packets(s, port))
                        .sum();
                    let port_s = port.to_string();
                    let labels = [
                        ("interface", lab.server_if.as_str()),
                        ("guard", guard_of(port)),
                        ("port", port_s.as_str()),
                        ("family", fam),
                        ("verdict", verdict),
                    ];
                    let got = metric(&text, "relay_guard_packets_total", &labels);
                    #[expect(clippy::cast_precision_loss, reason = "test counts are small")]
                    if got != want as f64 {
                        mismatches.push(format!(":{port} {fam} {verdict}: sent {want}, counted {got}"));
                    }
                }
            }
        }
        if mismatches.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "counters do not match what was sent:\n{}\n{text}",
            mismatches.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_numbers(
    mode: &str,
    sink: &mut SmtpSink,
    sent: &SentCounters<'_>,
    syns: &SentCounters<'_>,
    text: &str,
    lab: &Lab,
) {
    for src in SOURCES {
        for port in SMTP_PORTS {
            let counted: Vec<String> = ["passed", "dropped", "would_drop"]
                .iter()
                .map(|v| {
                    let port_s = port.to_string();
                    let labels = [
                        ("interface", lab.server_if.as_str()),
                        ("port", port_s.as_str()),
                        ("family", family(src)),
                        ("verdict", v),
                    ];
                    format!("{v}={}", metric(text, "relay_guard_packets_total", &labels))
                })
                .collect();
            println!(
                "{mode}: {src:>15} -> :{port:<3} sink={} nft_sent={} nft_syn={} metrics[{}]: {}",
                sink.messages(port, src),
                sent.packets(src, port),
                syns.packets(src, port),
                family(src),
                counted.join(" ")
            );
        }
    }
}

fn smtp_end_to_end(test: &str, mode: &str) {
    if !require::privileged_with(test, TOOLS) || !swaks_speaks_ipv6(test) {
        return;
    }
    let enforce = mode == "enforce";
    let lab = Lab::new();
    let dir = TempDir::new();
    let mut sink = sinks(&lab, &dir);
    let sent = SentCounters::install(&lab.client, &SOURCES, &SMTP_PORTS);
    let syns = SentCounters::install_syns(&lab.client, &SOURCES, &SMTP_PORTS);
    let (config, _detach) = write_config(&lab, &dir, mode);
    let agent = Agent::start(&lab.server, config, &dir);

    let outcomes = send_everything(&lab);
    assert_outcomes(&outcomes, |src| enforce && is_denied(src), &agent);

    let per_source = u64::from(1 + SOURCE_MESSAGES);
    assert_sink_counts(&mut sink, |src| if enforce && is_denied(src) { 0 } else { per_source });
    let verdict_of = |src: &str| match (is_denied(src), enforce) {
        (false, _) => "passed",
        (true, true) => "dropped",
        (true, false) => "would_drop",
    };
    let text = assert_counts_match(&lab, &sent, verdict_of);
    print_numbers(mode, &mut sink, &sent, &syns, &text, &lab);

    for src in SOURCES {
        for port in SMTP_PORTS {
            let (all, syn) = (sent.packets(src, port), syns.packets(src, port));
            if enforce && is_denied(src) {
                // Never past the first step of the handshake: every packet
                // the client sent was a bare SYN (first try plus retries),
                // and the agent dropped each of them.
                assert_eq!(syn, all, "{src} -> :{port}: a denied source sent more than SYNs");
                assert!(
                    syn >= 2,
                    "{src} -> :{port}: two clients, at least one SYN each; saw {syn}"
                );
            } else {
                // A real SMTP conversation: far more than the SYNs.
                assert!(all > 2 * syn, "{src} -> :{port}: {all} packets, {syn} of them SYNs");
            }
        }
    }
}

#[test]
fn smtp_enforce_allowed_deliver_denied_time_out() {
    smtp_end_to_end("smtp_enforce_allowed_deliver_denied_time_out", "enforce");
}

#[test]
fn smtp_monitor_everyone_delivers_would_drop_counted() {
    smtp_end_to_end("smtp_monitor_everyone_delivers_would_drop_counted", "monitor");
}

/// Drops Prometheus' own target labels, so its series compare with /metrics.
fn without_target_labels(samples: Vec<Sample>) -> BTreeMap<BTreeMap<String, String>, f64> {
    samples
        .into_iter()
        .map(|mut s| {
            s.labels.remove("job");
            s.labels.remove("instance");
            (s.labels, s.value)
        })
        .collect()
}

#[test]
fn prometheus_scrapes_packet_counters() {
    if !require::privileged_with("prometheus_scrapes_packet_counters", TOOLS)
        || !swaks_speaks_ipv6("prometheus_scrapes_packet_counters")
    {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let mut sink = sinks(&lab, &dir);
    let sent = SentCounters::install(&lab.client, &SOURCES, &SMTP_PORTS);
    let syns = SentCounters::install_syns(&lab.client, &SOURCES, &SMTP_PORTS);
    let (config, _detach) = write_config(&lab, &dir, "enforce");
    let agent = Agent::start(&lab.server, config, &dir);
    let mut prom = Prometheus::start(&lab.server, &dir, METRICS);

    // The first scrape succeeds: the target is up.
    let up = format!("up{{job=\"{}\"}}", prometheus::JOB);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = prom.query(&up);
        if r.len() == 1 && r[0].value == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the agent successfully: {r:?}\n{}",
            prom.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let outcomes = send_everything(&lab);
    assert_outcomes(&outcomes, is_denied, &agent);
    assert_sink_counts(&mut sink, |src| {
        if is_denied(src) {
            0
        } else {
            u64::from(1 + SOURCE_MESSAGES)
        }
    });
    let verdict_of = |src: &str| if is_denied(src) { "dropped" } else { "passed" };
    // Traffic is over and /metrics matches the client's nft counters; from
    // here on the agent's counters stand still.
    let text = assert_counts_match(&lab, &sent, verdict_of);
    print_numbers("prometheus", &mut sink, &sent, &syns, &text, &lab);
    let agent_series = without_target_labels(parse_samples(&text, "relay_guard_packets_total"));
    assert!(
        !agent_series.is_empty(),
        "no relay_guard_packets_total in /metrics:\n{text}"
    );

    // Prometheus catches up within a few scrapes and then holds exactly the
    // agent's series, label for label.
    let query = format!(
        "relay_guard_packets_total{{job=\"{}\",interface=\"{}\"}}",
        prometheus::JOB,
        lab.server_if
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let prom_series = loop {
        let got = without_target_labels(prom.query(&query));
        if got == agent_series {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus' {query} never matched /metrics:\nPrometheus: {got:#?}\n/metrics: {agent_series:#?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };

    // And those values are what the client sent, per port, family and verdict.
    for src in SOURCES {
        for port in SMTP_PORTS {
            let mut labels: BTreeMap<String, String> = [
                ("interface", lab.server_if.as_str()),
                ("guard", guard_of(port)),
                ("port", &port.to_string()),
                ("family", family(src)),
                ("verdict", verdict_of(src)),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
            let sent_n = sent.packets(src, port);
            let got = prom_series.get(&labels).copied();
            #[expect(clippy::cast_precision_loss, reason = "test counts are small")]
            let want = Some(sent_n as f64);
            assert_eq!(got, want, "Prometheus {labels:?}: want what nft saw the client send");
            println!(
                "prometheus: {labels:?} = {} (nft sent {sent_n})",
                got.unwrap_or(f64::NAN)
            );
            // Query one series by its full label set, as an operator would.
            labels.insert("job".into(), prometheus::JOB.into());
            let selector: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let one = prom.query(&format!("relay_guard_packets_total{{{}}}", selector.join(",")));
            assert_eq!(one.len(), 1, "{selector:?}: {one:?}");
            assert_eq!(Some(one[0].value), want, "{selector:?}");
        }
    }
}
