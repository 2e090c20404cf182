//! Bans fed by real mail software (issue 14): a real Postfix with Dovecot
//! SASL (tests/src/mail.rs) on 25, 465 and 587 in the server namespace, the
//! real agent following Postfix's maillog, swaks failing AUTH from the client
//! namespace. After `failures` failed logins the source's SYNs to the ban's
//! ports are dropped by the XDP program, across `postfix logrotate` (rename)
//! and copytruncate, for IPv4 and IPv6 (/64); port 25 (not a ban port) still
//! answers; another client still authenticates and sends; a `never` source
//! is never banned; garbage lines are counted, not fatal.
use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, cli},
    config::{Guard, TestConfig},
    lab::{self, ALLOWED_V4, ALLOWED_V6, DENIED_V4, DENIED_V6, Lab, pin_dir, reaches, scrape},
    mail::{MailServer, MailServerBuilder, Tls, swaks_auth},
    net::{BannerServer, metric},
    require,
};
use socket2::{Domain, Protocol, Socket, Type};

use relay_guard_tests::mail::{PASSWORD, SUBMISSION_TOOLS as TOOLS, USER};
/// A port only the ban covers (no guard): a plain listener answers there.
const FREE_PORT: u16 = 2525;
/// Another address of DENIED_V6's /64.
const SAME_64: &str = "2001:db8:d::99";

fn config(lab: &Lab, dir: &TempDir, maillog: &Path, failures: u32) -> (std::path::PathBuf, DetachOnDrop) {
    let source = format!("log_files = [\"{}\"]", maillog.display());
    config_with(lab, dir, &source, failures)
}

/// As [`config`], with `source` (`log_files = [...]` or `journal = true`).
fn config_with(lab: &Lab, dir: &TempDir, source: &str, failures: u32) -> (std::path::PathBuf, DetachOnDrop) {
    // Not beside the logs: the agent watches its config's directory, and
    // every log write there would make it look for a config change.
    TestConfig::new(&lab.server_if, &pin_dir("bans-logs-"))
        .state_dir(&dir.0.join("state"))
        .guard(&Guard::new("mail", &[25, 465, 587]).allow(&["0.0.0.0/0", "::/0"]))
        .table(&format!(
            r#"[[ban]]
name = "sasl"
ports = [465, 587, {FREE_PORT}]
{source}
failures = {failures}
window = "10m"
ban_time = "1h"
ipv6_prefix = 64
never = ["{ALLOWED_V6}/128"]
"#
        ))
        .write_in(&dir.0.join("relay-guard"))
}

fn mail_server(lab: &Lab, dir: &TempDir) -> MailServer {
    MailServerBuilder::new(&lab.server, &dir.0)
        .dovecot(&[(USER, PASSWORD)])
        .submission()
        .start()
}

fn fail(lab: &Lab, src: &str, port: u16) {
    let tls = if port == 465 { Tls::Implicit } else { Tls::StartTls };
    let run = swaks_auth(
        &lab.client,
        src,
        Lab::server_addr_for(src),
        port,
        tls,
        USER,
        "wrong password",
    );
    assert!(
        !run.success() && run.output.contains("535"),
        "swaks from {src} to {port} should fail AUTH with 535:\n{}",
        run.output
    );
}

fn wait_banned(lab: &Lab, src: &str, port: u16, server: &MailServer, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while reaches(lab, src, port) {
        assert!(
            Instant::now() < deadline,
            "{src} still reaches {port} 5 s after its last failed AUTH\n--- agent:\n{}\n--- maillog:\n{}",
            agent.log_text(),
            server.postfix.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn append(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

#[test]
fn failed_auths_on_real_postfix_ban_the_source_at_the_nic() {
    let test = "failed_auths_on_real_postfix_ban_the_source_at_the_nic";
    if !require::privileged_with(test, TOOLS) {
        return;
    }
    let lab = Lab::new();
    lab.client
        .ip(&["addr", "add", &format!("{SAME_64}/128"), "dev", &lab.client_if, "nodad"]);
    lab.server.ip(&[
        "neigh",
        "replace",
        SAME_64,
        "lladdr",
        lab::CLIENT_MAC,
        "dev",
        &lab.server_if,
        "nud",
        "permanent",
    ]);
    let dir = TempDir::new();
    let server = mail_server(&lab, &dir);
    let _free = BannerServer::start(&lab.server, &[FREE_PORT]);
    let maillog = server.postfix.maillog.clone();
    let (config, _detach) = config(&lab, &dir, &maillog, 3);
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    // The follower reads from the end of the file: let it open it.
    std::thread::sleep(Duration::from_secs(1));

    // IPv4: two failures, `postfix logrotate` (rename), the third.
    fail(&lab, DENIED_V4, 587);
    fail(&lab, DENIED_V4, 465);
    let rotated = server.postfix.command("logrotate");
    assert!(rotated.success(), "postfix logrotate: {}", rotated.output);
    assert!(reaches(&lab, DENIED_V4, 587), "two failures do not ban");
    fail(&lab, DENIED_V4, 587);
    wait_banned(&lab, DENIED_V4, 587, &server, &agent);
    assert!(!reaches(&lab, DENIED_V4, 465), "465 is a ban port");
    assert!(!reaches(&lab, DENIED_V4, FREE_PORT), "{FREE_PORT} is a ban port");
    assert!(
        reaches(&lab, DENIED_V4, 25),
        "25 is not a ban port: Postfix must answer"
    );
    // Another client still authenticates and sends on 587.
    let good = swaks_auth(
        &lab.client,
        ALLOWED_V4,
        Lab::server_addr_for(ALLOWED_V4),
        587,
        Tls::StartTls,
        USER,
        PASSWORD,
    );
    assert!(good.success(), "another client must still send:\n{}", good.output);

    // IPv6: one failure, copytruncate, two more: the /64 is banned.
    fail(&lab, DENIED_V6, 465);
    std::fs::copy(&maillog, dir.0.join("maillog.copy")).expect("copy maillog");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&maillog)
        .and_then(|f| f.set_len(0))
        .expect("truncate maillog");
    fail(&lab, DENIED_V6, 465);
    fail(&lab, DENIED_V6, 587);
    wait_banned(&lab, DENIED_V6, 587, &server, &agent);
    assert!(!reaches(&lab, SAME_64, 587), "another address of the /64 is banned too");
    assert!(reaches(&lab, DENIED_V6, 25), "25 is not a ban port");

    // `never`: failures count, no ban.
    for _ in 0..4 {
        fail(&lab, ALLOWED_V6, 465);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(reaches(&lab, ALLOWED_V6, 587), "a `never` source must never be banned");

    // Garbage: counted, not fatal; the next failure still counts.
    append(
        &maillog,
        "\u{1}\u{2} garbage\nDec 02 01:02:03 mail postfix/smtpd[1]: disconnect from unknown[300.1.1.1] auth=0/1\n",
    );
    fail(&lab, ALLOWED_V4, 465);
    let failures = |text: &str| {
        metric(
            text,
            "relay_guard_auth_failures_total",
            &[("ban", "sasl"), ("source", "postfix")],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = scrape(&lab);
        if failures(&text) >= 11.0 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let ctx = format!("{text}\n--- agent:\n{}", agent.log_text());
    assert_eq!(
        failures(&text),
        11.0,
        "3 + 3 + 4 + 1 failed AUTHs, each counted once: {ctx}"
    );
    assert_eq!(
        metric(&text, "relay_guard_log_lines_unparsed_total", &[("ban", "sasl")]),
        2.0,
        "{ctx}"
    );
    assert_eq!(
        metric(
            &text,
            "relay_guard_ban_events_total",
            &[("ban", "sasl"), ("action", "banned")]
        ),
        2.0,
        "{ctx}"
    );
    assert!(
        metric(
            &text,
            "relay_guard_packets_total",
            &[("guard", "sasl"), ("verdict", "banned")]
        ) > 0.0,
        "the drops are counted as banned: {ctx}"
    );
    let (status, bans) = cli(&config, &["bans"]);
    assert!(status.success(), "{bans}");
    assert!(bans.contains(&format!("{DENIED_V4}/32")), "{bans}");
    assert!(bans.contains("2001:db8:d::/64"), "{bans}");
    assert!(!bans.contains(ALLOWED_V6), "{bans}");
}

/// Time from a failure line written to the followed log to the source's
/// SYNs being dropped (issue 14's target: under 50 ms). A plain listener on
/// a ban port answers until then; the probe connects with a 3 ms timeout in a
/// loop paced at 1 ms, so the resolution is a few ms. Printed, not asserted beyond 2 s.
#[test]
fn ban_latency_from_log_line_to_drop() {
    let test = "ban_latency_from_log_line_to_drop";
    if !require::privileged(test) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let maillog = dir.write("maillog", "");
    let _free = BannerServer::start(&lab.server, &[FREE_PORT]);
    let (config, _detach) = config(&lab, &dir, &maillog, 1);
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    std::thread::sleep(Duration::from_secs(1));
    let mut samples = Vec::new();
    let src: IpAddr = lab::ip(DENIED_V4);
    let dst = SocketAddr::new(Lab::server_addr_for(DENIED_V4), FREE_PORT);
    for i in 0..10 {
        let log = maillog.clone();
        let took = lab.client.run(move || {
            let line = format!(
                "Dec 02 01:02:03 mail postfix/submission/smtpd[{}]: warning: unknown[{src}]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=x\n",
                1000 + i
            );
            let t0 = Instant::now();
            append(&log, &line);
            loop {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
                s.bind(&SocketAddr::new(src, 0).into()).expect("bind");
                if s.connect_timeout(&dst.into(), Duration::from_millis(3)).is_err() {
                    let t = t0.elapsed();
                    // A slow answer is not a drop: confirm.
                    let c = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
                    c.bind(&SocketAddr::new(src, 0).into()).expect("bind");
                    if c.connect_timeout(&dst.into(), Duration::from_millis(300)).is_err() {
                        return Some(t);
                    }
                }
                if t0.elapsed() > Duration::from_secs(2) {
                    return None;
                }
                // Paced, so the listener's accept backlog never fills (a
                // full backlog drops SYNs too).
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let took = took.unwrap_or_else(|| panic!("no drop 2 s after the failure line:\n{}", agent.log_text()));
        samples.push(took);
        let (status, out) = cli(&config, &["unban", &src.to_string()]);
        assert!(status.success(), "unban: {out}\n--- agent:\n{}", agent.log_text());
        let deadline = Instant::now() + Duration::from_secs(2);
        while !reaches(&lab, DENIED_V4, FREE_PORT) {
            assert!(Instant::now() < deadline, "unban did not lift the ban");
        }
        // The agent learns of the CLI's unban at its next tick; until then a
        // failure of a source it holds banned counts for nothing.
        std::thread::sleep(Duration::from_millis(1500));
    }
    samples.sort();
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    eprintln!(
        "log line to drop: median {:.1} ms, min {:.1} ms, max {:.1} ms over {} bans ({ms:.1?})",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1],
        ms.len()
    );
}

/// `journal = true` (no rsyslog): Postfix and Dovecot log through syslog(3)
/// to a real journald (a private one, tests/src/journal.rs); the agent reads
/// it with journalctl and bans after `failures` failed AUTHs.
#[test]
fn journal_failures_ban_the_source() {
    let test = "journal_failures_ban_the_source";
    let mut tools = TOOLS.to_vec();
    tools.extend(["journalctl", relay_guard_tests::journal::JOURNALD]);
    if !require::privileged_with(test, &tools) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    // The journal, Postfix, Dovecot and the agent (so its journalctl) live in
    // this thread's mount namespace; the lab's namespaces outside it.
    std::thread::scope(|s| {
        s.spawn(|| {
            let _journal = relay_guard_tests::journal::PrivateJournal::start(&dir.0);
            let server = MailServerBuilder::new(&lab.server, &dir.0)
                .syslog()
                .dovecot(&[(USER, PASSWORD)])
                .submission()
                .start();
            let (config, _detach) = config_with(&lab, &dir, "journal = true", 2);
            let agent = Agent::start(&lab.server, config, &dir);
            // journalctl follows from "now": let it start.
            std::thread::sleep(Duration::from_secs(1));
            fail(&lab, DENIED_V4, 465);
            std::thread::sleep(Duration::from_millis(500));
            assert!(reaches(&lab, DENIED_V4, 587), "one failure does not ban");
            fail(&lab, DENIED_V4, 465);
            wait_banned(&lab, DENIED_V4, 587, &server, &agent);
            assert!(reaches(&lab, DENIED_V4, 25), "25 is not a ban port");
            let text = scrape(&lab);
            assert_eq!(
                metric(
                    &text,
                    "relay_guard_auth_failures_total",
                    &[("ban", "sasl"), ("source", "postfix")]
                ),
                2.0,
                "{text}\n--- agent:\n{}",
                agent.log_text()
            );
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
}
