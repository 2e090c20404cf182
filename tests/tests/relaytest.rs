//! `relay-guard relaytest` and the scheduled relay test against a real
//! Postfix (GitHub issue 15). Postfix runs in the server namespace of a
//! lab (tests/src/mail.rs, with Dovecot for SASL: 25 and 587 with optional
//! STARTTLS, 465 with TLS at connect, every transport `discard:`); the
//! one-off command runs in the client namespace (source 203.0.113.2), the
//! agent in the server namespace.
//!
//! - open relay (`mynetworks` takes in the client): probes relayed and
//!   named, exit 3, Postfix logs the message taken; scheduled through
//!   XCLIENT as an outside address that `mynetworks` also takes in:
//!   `relay_guard_relaytest_relayed` > 0;
//! - correctly configured: every probe refused on every port, exit 0;
//!   scheduled through XCLIENT from loopback (which `mynetworks` trusts, so
//!   without XCLIENT it would relay): relayed 0, up 1; XCLIENT refused
//!   (target not in `smtpd_authorized_xclient_hosts`): up 0 and
//!   `untested{reason="xclient_refused"}`, never "closed to relaying";
//! - AUTH before STARTTLS flagged with `smtpd_tls_auth_only = no` on 587
//!   (TLS optional), not with `yes`;
//! - a port relay-guard drops reports "unreachable" (and a port where
//!   nothing listens "closed"), exit 4, never "closed to relaying".
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, agent_bin},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, Lab, SERVER_V4, pin_dir, wait_metrics},
    mail::{MailServer, MailServerBuilder},
    net::metric,
    netns::NetNs,
    require,
};
use serde_json::Value;

/// Probe timeout for the command: short, the lab answers in microseconds.
const TIMEOUT: &str = "3s";
/// The open-relay mistake: `mynetworks` takes in the client's network (and
/// the outside address the scheduled test claims through XCLIENT).
const OPEN_MYNETWORKS: &str = "127.0.0.0/8 192.0.2.0/24 203.0.113.0/24";

/// The ports the test Postfix listens on.
const PORTS: [u16; 3] = [25, 465, 587];

fn gate(test: &str) -> bool {
    require::privileged_with(test, &["postfix", "dovecot", "openssl", "ss", "promtool"])
}

/// Postfix on 25 and 587 (plain smtpd, STARTTLS offered) and 465 (TLS at
/// connect), with SASL through Dovecot, XCLIENT allowed from loopback,
/// `smtpd_tls_auth_only = yes`, then `settings`. Its files go in `dir/name`.
fn mail_server(lab: &Lab, dir: &Path, name: &str, settings: &[(&str, &str)]) -> MailServer {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).expect("mail server dir");
    let mut b = MailServerBuilder::new(&lab.server, &dir)
        .tls()
        .dovecot(&[("user", "secret")])
        .master("465       inet  n       -       n       -       -       smtpd -o smtpd_tls_wrappermode=yes")
        .master("587       inet  n       -       n       -       -       smtpd")
        .main("smtpd_sasl_auth_enable", "yes")
        .main("smtpd_tls_auth_only", "yes")
        .main("smtpd_authorized_xclient_hosts", "127.0.0.0/8");
    for (k, v) in settings {
        b = b.main(k, v);
    }
    b.start()
}

/// `relay-guard relaytest ARGS…` in `ns`: (exit code, stdout, stderr).
fn relaytest(ns: &NetNs, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg(agent_bin())
        .arg("relaytest")
        .args(args)
        .output()
        .expect("run relay-guard relaytest");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON report of `relaytest --json` with `args`, and its exit code.
fn relaytest_json(ns: &NetNs, args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.extend(["--json", "--timeout", TIMEOUT]);
    let (code, out, err) = relaytest(ns, &all);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("relaytest --json: {e}\n{out}\n{err}"));
    (code, v)
}

fn port(report: &Value, n: u16) -> &Value {
    report["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"] == n)
        .unwrap_or_else(|| panic!("no port {n} in {report:#}"))
}

fn outcomes(p: &Value) -> Vec<String> {
    p["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .map(|r| r["outcome"].as_str().expect("outcome").to_string())
        .collect()
}

fn agent_config(
    dir: &TempDir,
    lab: &Lab,
    allow: &str,
    guard_ports: &[u16],
    relaytest: &str,
) -> (PathBuf, DetachOnDrop) {
    TestConfig::new(&lab.server_if, &pin_dir("relaytest-"))
        .state_dir(&dir.0.join("state"))
        .guard(&Guard::new("smtp", guard_ports).allow(&[allow]))
        .table(relaytest)
        .write(dir)
}

fn scheduled(target: &str, ports: &str) -> String {
    format!(
        r#"
[relaytest]
enabled = true
interval = "1h"
jitter = "0s"
ports = {ports}
target = "{target}"
xclient_addr = "192.0.2.25"
timeout = "{TIMEOUT}"
"#
    )
}

/// How long a scheduled relay test may take to show in /metrics.
const RUN_WITHIN: Duration = Duration::from_secs(60);

#[test]
fn open_relay_is_reported_and_exported() {
    if !gate("open_relay_is_reported_and_exported") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let mail = mail_server(&lab, &dir.0, "mail", &[("mynetworks", OPEN_MYNETWORKS)]);
    let pf = &mail.postfix;

    let (code, report) = relaytest_json(&lab.client, &[SERVER_V4]);
    assert_eq!(code, 3, "exit status of an open relay: {report:#}");
    assert_eq!(report["verdict"], "relayed");
    for n in PORTS {
        let p = port(&report, n);
        let o = outcomes(p);
        assert_eq!(o.len(), 16, "port {n}: {p:#}");
        // The plain one: an outside sender to an outside recipient.
        assert_eq!(o[1], "relayed", "port {n}, probe 2: {p:#}");
        assert!(p["relayed"].as_u64().expect("relayed") >= 1, "{p:#}");
        assert_eq!(p["status"], "tested");
        assert_eq!(p["tls"], true, "port {n} used TLS: {p:#}");
        eprintln!("port {n}: {} of 16 probes relayed: {o:?}", p["relayed"]);
    }
    // Postfix took the message and handed it to discard.
    let log = pf.log_text();
    assert!(
        log.contains("to=<relaytest@example.net>") && log.contains("status=sent"),
        "{}:\n{log}",
        pf.maillog.display()
    );
    // The human report names the probes.
    let (code, text, _) = relaytest(&lab.client, &[SERVER_V4, "-p", "25", "--timeout", TIMEOUT]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("OPEN RELAY"), "{text}");
    assert!(
        text.contains("#2  RELAYED   <relaytest@example.org> -> <relaytest@example.net>"),
        "{text}"
    );

    // Scheduled, from the server itself, through XCLIENT as 192.0.2.25.
    let (config, _detach) = agent_config(
        &dir,
        &lab,
        "203.0.113.0/24",
        &[25, 465, 587],
        &scheduled("127.0.0.1", "[25, 465, 587]"),
    );
    let agent = Agent::start(&lab.server, config, &dir);
    let text = wait_metrics(&lab, &agent, RUN_WITHIN, "a relay test run", |t| {
        metric(t, "relay_guard_relaytest_last_run_timestamp_seconds", &[]) > 0.0
    });
    for n in PORTS {
        let p = n.to_string();
        let relayed = metric(&text, "relay_guard_relaytest_relayed", &[("port", &p)]);
        assert!(
            relayed >= 1.0,
            "port {n}: relayed {relayed}:\n{text}\n{}",
            agent.log_text()
        );
        assert_eq!(
            metric(&text, "relay_guard_relaytest_up", &[("port", &p)]),
            1.0,
            "{text}"
        );
    }
    assert!(agent.log_text().contains("OPEN RELAY"), "{}", agent.log_text());
    // The relaytest series pass promtool's lint.
    relay_guard_tests::prometheus::assert_promtool_accepts(&dir, &text);
}

#[test]
fn correct_config_is_clean_and_xclient_refusal_is_not() {
    if !gate("correct_config_is_clean_and_xclient_refusal_is_not") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let mail = mail_server(&lab, &dir.0, "mail", &[]);
    let pf = &mail.postfix;

    let (code, report) = relaytest_json(&lab.client, &[SERVER_V4]);
    assert_eq!(code, 0, "exit status of a closed relay: {report:#}");
    assert_eq!(report["verdict"], "not_relayed");
    assert_eq!(report["relayed"], 0);
    for n in PORTS {
        let p = port(&report, n);
        assert_eq!(outcomes(p), vec!["refused"; 16], "port {n}: {p:#}");
        assert_eq!(p["status"], "tested");
    }
    assert!(!pf.log_text().contains("status=sent"), "{}", pf.log_text());

    // Scheduled from loopback, which mynetworks trusts: only XCLIENT makes
    // it a test from outside (without it, every probe would relay).
    let (config, _detach) = agent_config(
        &dir,
        &lab,
        "203.0.113.0/24",
        &[25, 465, 587],
        &scheduled("127.0.0.1", "[25, 587]"),
    );
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    let text = wait_metrics(&lab, &agent, RUN_WITHIN, "a relay test run", |t| {
        metric(t, "relay_guard_relaytest_last_run_timestamp_seconds", &[]) > 0.0
    });
    for p in ["25", "587"] {
        assert!(
            text.contains(&format!("relay_guard_relaytest_relayed{{port=\"{p}\"}} 0")),
            "{text}"
        );
        assert_eq!(metric(&text, "relay_guard_relaytest_up", &[("port", p)]), 1.0, "{text}");
    }
    // Without XCLIENT the same session relays (the honest-vantage point).
    let (code, _) = relaytest_json(&lab.server, &["127.0.0.1", "-p", "25"]);
    assert_eq!(code, 3, "from loopback without XCLIENT Postfix relays (mynetworks)");

    // XCLIENT refused: the server address is not an authorized XCLIENT host.
    dir.write(
        "relay-guard.toml",
        &std::fs::read_to_string(&config)
            .expect("config")
            .replace("target = \"127.0.0.1\"", &format!("target = \"{SERVER_V4}\"")),
    );
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let text = wait_metrics(&lab, &agent, RUN_WITHIN, "up 0 for XCLIENT refused", |t| {
        metric(
            t,
            "relay_guard_relaytest_untested",
            &[("port", "25"), ("reason", "xclient_refused")],
        ) == 1.0
    });
    assert_eq!(
        metric(&text, "relay_guard_relaytest_up", &[("port", "25")]),
        0.0,
        "{text}"
    );
    assert!(
        agent.log_text().contains("could not test this port"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn auth_before_starttls_is_flagged() {
    if !gate("auth_before_starttls_is_flagged") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let mail = mail_server(&lab, &dir.0, "auth-any", &[("smtpd_tls_auth_only", "no")]);
    let (code, report) = relaytest_json(&lab.client, &[SERVER_V4, "-p", "587"]);
    assert_eq!(code, 0, "{report:#}");
    let p = port(&report, 587);
    assert_eq!(p["starttls_offered"], true, "{p:#}");
    assert_eq!(p["auth_before_starttls"], true, "smtpd_tls_auth_only = no: {p:#}");
    let (_, text, _) = relaytest(&lab.client, &[SERVER_V4, "-p", "587", "--timeout", TIMEOUT]);
    assert!(text.contains("AUTH OFFERED BEFORE STARTTLS"), "{text}");

    drop(mail);
    let _mail = mail_server(&lab, &dir.0, "auth-tls-only", &[]);
    let (code, report) = relaytest_json(&lab.client, &[SERVER_V4, "-p", "587"]);
    assert_eq!(code, 0, "{report:#}");
    let p = port(&report, 587);
    assert_eq!(p["auth_before_starttls"], false, "smtpd_tls_auth_only = yes: {p:#}");
    assert_eq!(p["tls"], true, "{p:#}");
    let (_, text, _) = relaytest(&lab.client, &[SERVER_V4, "-p", "587", "--timeout", TIMEOUT]);
    assert!(text.contains("AUTH not offered before STARTTLS"), "{text}");
}

#[test]
fn a_port_relay_guard_drops_is_unreachable_not_closed() {
    if !gate("a_port_relay_guard_drops_is_unreachable_not_closed") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _mail = mail_server(&lab, &dir.0, "mail", &[]);
    // Port 25 allows only ALLOWED_V4; the client speaks from 203.0.113.2.
    let (config, _detach) = agent_config(&dir, &lab, ALLOWED_V4, &[25], "");
    let _agent = Agent::start(&lab.server, config, &dir);
    // 2526: nothing listens, nothing filters: RST.
    let (code, report) = relaytest_json(&lab.client, &[SERVER_V4, "-p", "25", "-p", "2526"]);
    assert_eq!(code, 4, "exit status when nothing could be tested: {report:#}");
    assert_eq!(report["verdict"], "could_not_test");
    let p25 = port(&report, 25);
    assert_eq!(p25["status"], "unreachable", "{p25:#}");
    assert_eq!(p25["probes"].as_array().map(Vec::len), Some(0));
    assert_eq!(port(&report, 2526)["status"], "closed", "{report:#}");
    let (code, text, _) = relaytest(&lab.client, &[SERVER_V4, "-p", "25", "--timeout", TIMEOUT]);
    assert_eq!(code, 4);
    assert!(text.contains("NOT TESTED (unreachable)"), "{text}");
    assert!(!text.contains("closed to relaying"), "{text}");
}
