//! relay_guard::logwatch against the logs real mail software writes: a real
//! Postfix with Dovecot SASL (tests/src/mail.rs) takes failed AUTHs from
//! swaks on 587 (STARTTLS) and 465 (implicit TLS), from IPv4 and IPv6
//! clients; logwatch, following Postfix's maillog and Dovecot's log, must
//! count each failed login exactly once although Postfix logs it twice (the
//! warning, then `auth=0/1` in the disconnect line) and Dovecot once more.
use std::{
    collections::HashMap,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use relay_guard::logwatch::{self, LogEvent, Origin, Source};
use relay_guard_tests::{
    agent::TempDir,
    lab::{self, DENIED_V4, DENIED_V6, Lab},
    mail::{MailServer, MailServerBuilder, Tls, swaks_auth},
    require, smtp,
};

use relay_guard_tests::mail::{PASSWORD, SUBMISSION_TOOLS as TOOLS, USER};

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
            LogEvent::Suspicious { .. } | LogEvent::SourceUp { .. } => {}
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

/// Failed AUTHs on 465 from `src`, one swaks session each.
fn fail_auths(lab: &Lab, src: &str, n: u32) {
    let dst = Lab::server_addr_for(src);
    for i in 0..n {
        let run = swaks_auth(&lab.client, src, dst, 465, Tls::Implicit, USER, "wrong password");
        assert!(
            !run.success() && run.output.contains("535"),
            "swaks {i} from {src} should fail AUTH with 535:\n{}",
            run.output
        );
    }
}

fn failures_of(events: &[LogEvent], src: &str) -> usize {
    let src = lab::ip(src);
    events
        .iter()
        .filter(|e| matches!(e, LogEvent::Failure(f) if f.source == src))
        .count()
}

fn unparsed(events: &[LogEvent]) -> usize {
    events.iter().filter(|e| matches!(e, LogEvent::Unparsed { .. })).count()
}

/// `postfix logrotate` (rename, HUP, gzip of the old file) while failures are
/// being logged, then logrotate's copytruncate, then garbage lines: every
/// failure is counted once, every garbage line is counted as unparsed, and
/// following goes on.
#[test]
fn rotation_mid_stream_loses_no_failure_and_garbage_is_counted() {
    let test = "rotation_mid_stream_loses_no_failure_and_garbage_is_counted";
    if !require::privileged_with(test, TOOLS) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let server = mail_server(&lab, &dir);
    let maillog = server.postfix.maillog.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watch = logwatch::spawn(vec![Source::File(maillog.clone())], tx).expect("logwatch starts");
    std::thread::sleep(Duration::from_millis(500));
    let mut events = Vec::new();

    // Rename rotation while a client keeps failing.
    const DURING_RENAME: u32 = 6;
    std::thread::scope(|s| {
        let client = s.spawn(|| fail_auths(&lab, DENIED_V4, DURING_RENAME));
        // Rotate once the first failures are in, with more to come.
        let deadline = Instant::now() + Duration::from_secs(60);
        while failures_of(&events, DENIED_V4) < 2 && Instant::now() < deadline {
            events.extend(drain(&mut rx, Duration::from_millis(200), Duration::from_secs(1)));
        }
        let rotated = server.postfix.command("logrotate");
        assert!(rotated.success(), "postfix logrotate: {}", rotated.output);
        client.join().expect("client thread");
    });
    events.extend(drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30)));
    let rotated_files: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("read test dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("maillog."))
        .collect();
    assert!(!rotated_files.is_empty(), "postfix logrotate left no rotated file");
    assert_eq!(
        failures_of(&events, DENIED_V4),
        DURING_RENAME as usize,
        "failures across `postfix logrotate` ({rotated_files:?}): {events:?}\n{}",
        server.postfix.log_text()
    );

    // copytruncate: copy, truncate in place; Postfix goes on appending.
    fail_auths(&lab, DENIED_V6, 2);
    std::fs::copy(&maillog, dir.0.join("maillog.copy")).expect("copy maillog");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&maillog)
        .expect("open maillog")
        .set_len(0)
        .expect("truncate maillog");
    fail_auths(&lab, DENIED_V6, 2);
    events.extend(drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30)));
    assert_eq!(
        failures_of(&events, DENIED_V6),
        4,
        "failures across copytruncate: {events:?}\n{}",
        server.postfix.log_text()
    );

    // Garbage: counted, not fatal; the next failure still counts.
    let before = unparsed(&events);
    assert_eq!(before, 0, "{events:?}");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&maillog)
            .expect("open maillog");
        f.write_all(b"\x00\xff\xfe binary garbage\nnot a log line at all\nDec 02 01:02:03 mail postfix/smtpd[1]: warning: unknown[999.1.2.3]: SASL PLAIN authentication failed: x\n")
            .expect("append garbage");
    }
    fail_auths(&lab, DENIED_V4, 1);
    events.extend(drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30)));
    drop(watch);
    assert_eq!(unparsed(&events), 3, "{events:?}");
    assert_eq!(
        failures_of(&events, DENIED_V4),
        DURING_RENAME as usize + 1,
        "{events:?}"
    );
}

/// `journal = true` without rsyslog: Postfix and Dovecot log through
/// syslog(3) to a real (private) journald, and logwatch reads them with
/// journalctl: each failed AUTH counts once, as from the files.
#[test]
fn journal_records_count_each_failed_auth_once() {
    let test = "journal_records_count_each_failed_auth_once";
    let mut tools = TOOLS.to_vec();
    tools.extend(["journalctl", relay_guard_tests::journal::JOURNALD]);
    if !require::privileged_with(test, &tools) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    // The journal, Postfix and Dovecot live in this thread's mount namespace;
    // the lab's namespaces are made and removed outside it.
    let (events, context) = std::thread::scope(|s| {
        s.spawn(|| {
            let journal = relay_guard_tests::journal::PrivateJournal::start(&dir.0);
            let server = MailServerBuilder::new(&lab.server, &dir.0)
                .syslog()
                .dovecot(&[(USER, PASSWORD)])
                .submission()
                .start();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let watch = logwatch::spawn(vec![Source::Journal], tx).expect("logwatch starts");
            // journalctl --since=now: let it start before the failures.
            std::thread::sleep(Duration::from_secs(1));
            fail_auths(&lab, DENIED_V4, 2);
            fail_auths(&lab, DENIED_V6, 1);
            let events = drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30));
            drop(watch);
            let journal_text = Command::new("journalctl")
                .args(["--no-pager", "-o", "short-iso"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            drop(server);
            drop(journal);
            (events, journal_text)
        })
        .join()
        .expect("journal thread")
    });
    let context = format!("events: {events:?}\n--- journal:\n{context}");
    assert_eq!(failures_of(&events, DENIED_V4), 2, "{context}");
    assert_eq!(failures_of(&events, DENIED_V6), 1, "{context}");
    assert_eq!(unparsed(&events), 0, "{context}");
    assert!(
        context.contains("Password mismatch"),
        "Dovecot's auth lines reach the journal: {context}"
    );
}

/// One IMAP session from `src` to the server on 143: `attempts` LOGINs with
/// a wrong password, then LOGOUT. Returns the server's lines.
fn imap_failed_logins(lab: &Lab, src: &str, attempts: u32) -> String {
    use std::io::{BufRead, BufReader, Write};

    use socket2::{Domain, Protocol, Socket, Type};
    let src_ip = lab::ip(src);
    let dst = std::net::SocketAddr::new(Lab::server_addr_for(src), 143);
    lab.client.run(move || {
        let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        s.bind(&std::net::SocketAddr::new(src_ip, 0).into()).expect("bind");
        s.connect_timeout(&dst.into(), Duration::from_secs(5))
            .expect("connect to 143");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let stream: std::net::TcpStream = s.into();
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        let mut transcript = String::new();
        let mut read_until = |tag: &str, transcript: &mut String| loop {
            let mut line = String::new();
            let n = r.read_line(&mut line).expect("read IMAP reply");
            transcript.push_str(&line);
            if n == 0 || line.starts_with(tag) {
                return line;
            }
        };
        read_until("* OK", &mut transcript);
        for i in 0..attempts {
            write!(w, "a{i} LOGIN {USER} wrong\r\n").expect("send LOGIN");
            let reply = read_until(&format!("a{i} "), &mut transcript);
            assert!(
                reply.starts_with(&format!("a{i} NO")),
                "LOGIN should fail: {transcript}"
            );
        }
        write!(w, "z LOGOUT\r\n").expect("send LOGOUT");
        read_until("z ", &mut transcript);
        transcript
    })
}

/// Dovecot's own log (log_path) with IMAP: the imap-login process's
/// `Disconnected (auth failed, N attempts ...)` line counts N for `rip`, and
/// Dovecot's `auth:` lines for the same logins count nothing.
#[test]
fn dovecot_imap_login_failures_count_once() {
    let test = "dovecot_imap_login_failures_count_once";
    let mut tools = TOOLS.to_vec();
    tools.push("/usr/lib/dovecot/imap");
    if !require::privileged_with(test, &tools) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let server = MailServerBuilder::new(&lab.server, &dir.0)
        .dovecot(&[(USER, PASSWORD)])
        .imap()
        .start();
    let dovecot_log = server.dovecot.as_ref().expect("dovecot").log.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watch = logwatch::spawn(vec![Source::File(dovecot_log.clone())], tx).expect("logwatch starts");
    std::thread::sleep(Duration::from_millis(500));
    imap_failed_logins(&lab, DENIED_V4, 3);
    imap_failed_logins(&lab, DENIED_V6, 2);
    let events = drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30));
    drop(watch);
    let log = std::fs::read_to_string(&dovecot_log).unwrap_or_default();
    let context = format!("events: {events:?}\n--- dovecot.log:\n{log}");
    assert_eq!(failures_of(&events, DENIED_V4), 3, "{context}");
    assert_eq!(failures_of(&events, DENIED_V6), 2, "{context}");
    assert_eq!(unparsed(&events), 0, "{context}");
    for e in &events {
        if let LogEvent::Failure(f) = e {
            assert_eq!(
                (f.origin, f.service.as_str()),
                (Origin::Dovecot, "imap-login"),
                "{context}"
            );
        }
    }
    assert!(log.contains("Password mismatch"), "{context}");
}
