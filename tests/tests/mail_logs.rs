//! relay_guard::logwatch against the logs real mail software writes: a real
//! Postfix with Dovecot SASL (tests/src/mail.rs) takes failed AUTHs from
//! swaks on 587 (STARTTLS) and 465 (implicit TLS), from IPv4 and IPv6
//! clients; logwatch, following Postfix's maillog and Dovecot's log, must
//! count each failed login exactly once although Postfix logs it twice (the
//! warning, then `auth=0/1` in the disconnect line) and Dovecot once more.
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use relay_guard::logwatch::{self, LogEvent, Origin, Source};
use relay_guard_tests::{
    agent::TempDir,
    lab::{self, DENIED_V4, DENIED_V6, Lab},
    mail::{MailServer, MailServerBuilder, Tls, swaks_auth},
    require, smtp,
};

const TOOLS: &[&str] = &[
    "postfix",
    "dovecot",
    "openssl",
    "swaks",
    "ss",
    "/usr/share/perl5/IO/Socket/SSL.pm",
];
const USER: &str = "alice@example.com";
const PASSWORD: &str = "correct horse";

fn mail_server(lab: &Lab, dir: &TempDir) -> MailServer {
    MailServerBuilder::new(&lab.server, &dir.0)
        .dovecot(&[(USER, PASSWORD)])
        .submission()
        .start()
}

/// Events until none came for `quiet`, or `limit` passed.
fn drain(rx: &mut tokio::sync::mpsc::Receiver<LogEvent>, quiet: Duration, limit: Duration) -> Vec<LogEvent> {
    let (start, mut last) = (Instant::now(), Instant::now());
    let mut out = Vec::new();
    while start.elapsed() < limit && last.elapsed() < quiet {
        match rx.try_recv() {
            Ok(e) => {
                out.push(e);
                last = Instant::now();
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    out
}

#[test]
fn each_failed_auth_through_postfix_and_dovecot_counts_once() {
    let test = "each_failed_auth_through_postfix_and_dovecot_counts_once";
    if !require::privileged_with(test, TOOLS) || !smtp::swaks_speaks_ipv6(test) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let server = mail_server(&lab, &dir);
    let dovecot_log = server.dovecot.as_ref().expect("dovecot").log.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watch = logwatch::spawn(
        vec![
            Source::File(server.postfix.maillog.clone()),
            Source::File(dovecot_log.clone()),
        ],
        tx,
    )
    .expect("logwatch starts");
    // Let the followers open the files (and start at their ends).
    std::thread::sleep(Duration::from_millis(500));

    // (source, port, tls, failed AUTHs)
    let plan: [(&str, u16, Tls, u32); 4] = [
        (DENIED_V4, 587, Tls::StartTls, 3),
        (DENIED_V4, 465, Tls::Implicit, 2),
        (DENIED_V6, 587, Tls::StartTls, 2),
        (DENIED_V6, 465, Tls::Implicit, 1),
    ];
    let mut expected: HashMap<IpAddr, u32> = HashMap::new();
    for (src, port, tls, n) in plan {
        let dst = Lab::server_addr_for(src);
        for i in 0..n {
            let run = swaks_auth(&lab.client, src, dst, port, tls, USER, "wrong password");
            assert!(
                !run.success() && run.output.contains("535"),
                "swaks {i} from {src} to {port} should fail AUTH with 535:\n{}\n{}",
                run.output,
                server.postfix.log_text()
            );
        }
        *expected.entry(lab::ip(src)).or_default() += n;
    }
    // A good login from another source: no failure.
    let good = swaks_auth(
        &lab.client,
        lab::ALLOWED_V4,
        Lab::server_addr_for(lab::ALLOWED_V4),
        587,
        Tls::StartTls,
        USER,
        PASSWORD,
    );
    assert!(
        good.success(),
        "the right password should authenticate and send:\n{}",
        good.output
    );

    let events = drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30));
    drop(watch);
    let mut counted: HashMap<IpAddr, u32> = HashMap::new();
    let mut unparsed = 0;
    for e in &events {
        match e {
            LogEvent::Failure(f) => {
                assert_eq!(f.origin, Origin::Postfix, "{f:?}");
                assert!(
                    f.service == "postfix/submission/smtpd" || f.service == "postfix/smtps/smtpd",
                    "{f:?}"
                );
                *counted.entry(f.source).or_default() += 1;
            }
            LogEvent::Unparsed { .. } => unparsed += 1,
        }
    }
    let maillog = server.postfix.log_text();
    let dovecot = std::fs::read_to_string(&dovecot_log).unwrap_or_default();
    let context = format!("events: {events:?}\n--- maillog:\n{maillog}\n--- dovecot.log:\n{dovecot}");
    assert_eq!(counted, expected, "failures per source\n{context}");
    assert_eq!(unparsed, 0, "{context}");
    // The logs really hold each failure more than once: the dedup was needed.
    let total: u32 = expected.values().sum();
    let warnings = maillog.matches("authentication failed").count();
    let disconnects = maillog.matches(" auth=0/1 ").count();
    let mismatches = dovecot.matches("Password mismatch").count();
    eprintln!(
        "{total} failed AUTHs: {warnings} warnings, {disconnects} auth=0/1 disconnects, {mismatches} Dovecot mismatches"
    );
    assert_eq!(disconnects as u32, total, "{context}");
    assert!(warnings as u32 + mismatches as u32 >= total, "{context}");
}
