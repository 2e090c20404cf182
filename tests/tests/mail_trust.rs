//! Who may aim a ban (SPEC.md "Who may aim a ban", issue 21), with real
//! daemons: a real Postfix with Dovecot SASL on 587 and Dovecot serving IMAP
//! (143) and POP3 (110) in the server namespace, the real agent following
//! Postfix's maillog and Dovecot's log.
//!
//! - A client puts other addresses into every field it controls (IMAP
//!   LOGIN and POP3 USER user names, AUTH PLAIN and LOGIN user names,
//!   HELO/EHLO, MAIL FROM), over IPv4 and IPv6: nobody else is banned, the
//!   injecting client is banned after `failures` failed logins, and an
//!   nftables counter behind XDP in the server namespace shows it (the
//!   victims' SYNs still arrive, the injector's no longer do).
//! - The journal (a real, private journald): `logger -t dovecot` and a copy
//!   of logger named `smtpd`, run by an unprivileged user (setpriv), are not
//!   counted; the real daemons' lines are.
//! - The relay test's XCLIENT listener (docs/operations.md "Testing for open
//!   relay"): a local process that says `XCLIENT ADDR=X` there and fails AUTH
//!   does not get X charged; on the public services XCLIENT is refused.
//!
//! Reverse-DNS names cannot be set in a namespace without DNS: the
//! property tests in relay-guard/src/logwatch/parse/tests.rs cover them.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use relay_guard::logwatch::{self, LogEvent, Source};
use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, cli},
    config::{Guard, TestConfig, list},
    lab::{self, ALLOWED_V4, ALLOWED_V6, DENIED_V4, DENIED_V6, Lab, pin_dir, reaches, scrape},
    mail::{MailServer, MailServerBuilder, PASSWORD, SUBMISSION_TOOLS, USER},
    net::{NftCounters, metric},
    netns::NetNs,
    require,
    smtp::{self, Run},
};
use socket2::{Domain, Protocol, Socket, Type};

/// `failures` of the ban section.
const FAILURES: u32 = 5;
/// The ban's ports: IMAP, POP3, submission.
const BAN_PORTS: [u16; 3] = [110, 143, 587];
/// The port the nft counters and the reach checks use.
const PROBE_PORT: u16 = 143;
/// An address no namespace has: what injected text names besides the
/// lab's other clients.
const NOBODY: &str = "203.0.113.9";

fn tools() -> Vec<&'static str> {
    let mut t = SUBMISSION_TOOLS.to_vec();
    t.extend(["/usr/lib/dovecot/imap", "/usr/lib/dovecot/pop3", "nft"]);
    t
}

fn config(lab: &Lab, dir: &TempDir, logs: &[&Path]) -> (PathBuf, DetachOnDrop) {
    let files: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
    let ports: Vec<String> = BAN_PORTS.iter().map(u16::to_string).collect();
    // Not beside the logs: the agent watches its config's directory.
    TestConfig::new(&lab.server_if, &pin_dir("trust-"))
        .state_dir(&dir.0.join("state"))
        .guard(&Guard::new("mail", &[25, 465, 587]).allow(&["0.0.0.0/0", "::/0"]))
        .table(&format!(
            r#"[[ban]]
name = "sasl"
ports = [{ports}]
log_files = {files}
failures = {FAILURES}
window = "10m"
ban_time = "1h"
ipv6_prefix = 64
"#,
            ports = ports.join(", "),
            files = list(&files),
        ))
        .write_in(&dir.0.join("relay-guard"))
}

/// The line protocols spoken here.
#[derive(Clone, Copy)]
enum Proto {
    Imap,
    Pop3,
    Smtp,
}

/// One session from `src` (bound, when given) to `dst` inside `ns`: reads
/// the greeting, then sends each command after the whole reply to the
/// previous one. Returns the transcript.
fn session(ns: &NetNs, src: Option<IpAddr>, dst: SocketAddr, proto: Proto, commands: Vec<String>) -> String {
    ns.run(move || {
        let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        if let Some(src) = src {
            s.bind(&SocketAddr::new(src, 0).into()).expect("bind");
        }
        s.connect_timeout(&dst.into(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
        // Longer than Dovecot's auth penalty (up to 15 s after failures).
        s.set_read_timeout(Some(Duration::from_secs(40))).expect("timeout");
        let stream: std::net::TcpStream = s.into();
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        let mut transcript = String::new();
        // The reply to `tag`'s command is complete.
        let done = |line: &str, tag: &str| match proto {
            Proto::Imap => line.starts_with(tag) || (tag.is_empty() && line.starts_with("* ")),
            Proto::Pop3 => line.starts_with("+OK") || line.starts_with("-ERR"),
            Proto::Smtp => line.len() >= 4 && line.as_bytes()[3] == b' ',
        };
        let mut read_reply = |tag: &str, transcript: &mut String| loop {
            let mut line = String::new();
            let n = r.read_line(&mut line).unwrap_or(0);
            transcript.push_str(&line);
            if n == 0 || done(&line, tag) {
                return;
            }
        };
        read_reply("", &mut transcript);
        for cmd in commands {
            let tag = match proto {
                Proto::Imap => format!("{} ", cmd.split(' ').next().unwrap_or("")),
                _ => String::new(),
            };
            transcript.push_str(&format!(">>> {cmd}\n"));
            write!(w, "{cmd}\r\n").expect("send");
            read_reply(&tag, &mut transcript);
        }
        transcript
    })
}

/// An IMAP string for `s` (quoted, `\` and `"` escaped).
fn imap_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// swaks from `src` with these extra arguments; the run.
fn swaks(lab: &Lab, src: &str, port: u16, args: &[&str]) -> Run {
    let dst = Lab::server_addr_for(src);
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.client.name, "swaks", "--server"])
        .arg(dst.to_string())
        // Dovecot's auth penalty delays a source's logins after failures
        // (up to 15 s): wait longer than that.
        .args(["--port", &port.to_string(), "--local-interface", src, "--timeout", "40"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run swaks: {e}"));
    Run::of(out)
}

/// Every way a client gets text into a log line, aimed at `victims`:
/// returns the failed logins it made (`FAILURES` - 1 in `before_last`, then
/// the last one in `last`).
struct Injection<'a> {
    lab: &'a Lab,
    src: &'a str,
    victims: Vec<String>,
    /// Dovecot's log, for failure messages.
    dovecot_log: PathBuf,
}

impl Injection<'_> {
    fn imap(&self) -> u32 {
        let dst = SocketAddr::new(Lab::server_addr_for(self.src), 143);
        let v = &self.victims;
        let users = [
            format!("x rip={} y", v[0]),
            format!("x>, method=PLAIN, rip={}, lip=203.0.113.1, session=<a", v[1]),
        ];
        let mut cmds: Vec<String> = users
            .iter()
            .enumerate()
            .map(|(i, u)| format!("a{i} LOGIN {} wrong", imap_quote(u)))
            .collect();
        cmds.push("z LOGOUT".into());
        let t = session(&self.lab.client, Some(lab::ip(self.src)), dst, Proto::Imap, cmds);
        assert_eq!(t.matches(" NO ").count(), users.len(), "IMAP LOGINs should fail:\n{t}");
        users.len() as u32
    }

    fn pop3(&self) -> u32 {
        let dst = SocketAddr::new(Lab::server_addr_for(self.src), 110);
        let cmds = vec![
            format!(
                "USER unknown[{}], rip={}, lip=203.0.113.1",
                self.victims[0], self.victims[1]
            ),
            "PASS wrong".into(),
            "QUIT".into(),
        ];
        let t = session(&self.lab.client, Some(lab::ip(self.src)), dst, Proto::Pop3, cmds);
        assert!(t.contains("-ERR"), "POP3 PASS should fail:\n{t}");
        1
    }

    /// HELO/EHLO and MAIL FROM on 25 (no AUTH there): a rejected relay
    /// attempt whose reject line carries both; no failure.
    fn helo_and_mail_from(&self) -> u32 {
        let v = &self.victims;
        let helo = format!("unknown[{}]:rip={}", v[0], v[1]);
        // A sender Postfix refuses as bad syntax (it logs "Illegal address
        // syntax from NAME[ADDR] in MAIL command: <...>"), then a quoted
        // local part it takes, in the reject line of a relay attempt.
        let bad = format!("unknown[{}]:rip={}@example.org", v[1], v[0]);
        let quoted = format!(
            "\"unknown[{}]: SASL PLAIN authentication failed: , rip={}\"@example.org",
            v[1], v[0]
        );
        for (from, reply) in [(bad, "501"), (quoted, "554")] {
            let run = swaks(
                self.lab,
                self.src,
                25,
                &["--helo", &helo, "--from", &from, "--to", "someone@example.net"],
            );
            assert!(
                run.output.contains(reply),
                "MAIL FROM {from}: {reply} expected:\n{}",
                run.output
            );
        }
        0
    }

    /// AUTH on 587 (STARTTLS) with a hostile user name and EHLO name.
    fn auth(&self, mech: &str) -> u32 {
        let v = &self.victims;
        let user = format!("unknown[{}]: SASL {mech} authentication failed: , rip={}", v[0], v[1]);
        let helo = format!("unknown[{}]", v[1]);
        let run = swaks(
            self.lab,
            self.src,
            587,
            &[
                "--tls",
                "--helo",
                &helo,
                "--from",
                "a@example.org",
                "--to",
                "b@example.com",
                "--auth",
                mech,
                "--auth-user",
                &user,
                "--auth-password",
                "wrong",
            ],
        );
        assert!(
            !run.success() && run.output.contains("535"),
            "AUTH {mech} should fail:\n{}\n--- dovecot.log:\n{}",
            run.output,
            std::fs::read_to_string(&self.dovecot_log).unwrap_or_default()
        );
        1
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} after {limit:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn injected_addresses_ban_nobody_but_the_injector() {
    let test = "injected_addresses_ban_nobody_but_the_injector";
    if !require::privileged_with(test, &tools()) || !smtp::swaks_speaks_ipv6(test) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let server = MailServerBuilder::new(&lab.server, &dir.0)
        .dovecot(&[(USER, PASSWORD)])
        .submission()
        .imap()
        .pop3()
        .start();
    let maillog = server.postfix.maillog.clone();
    let dovecot_log = server.dovecot.as_ref().expect("dovecot").log.clone();
    let (config, _detach) = config(&lab, &dir, &[&maillog, &dovecot_log]);
    let behind = NftCounters::behind_xdp(
        &lab.server,
        &[DENIED_V4, DENIED_V6, ALLOWED_V4, ALLOWED_V6],
        &[PROBE_PORT],
    );
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    // The followers start at the files' ends: let them open them.
    std::thread::sleep(Duration::from_secs(1));
    let context = |agent: &Agent, server: &MailServer| {
        format!(
            "--- agent:\n{}\n--- maillog:\n{}\n--- dovecot.log:\n{}",
            agent.log_text(),
            server.postfix.log_text(),
            server.dovecot.as_ref().map(|d| d.log_text()).unwrap_or_default()
        )
    };

    // Each injector names the other family's injector, the victims and an
    // address nobody has.
    for (src, victims) in [
        (DENIED_V4, [ALLOWED_V4, ALLOWED_V6, NOBODY]),
        (DENIED_V6, [ALLOWED_V6, ALLOWED_V4, DENIED_V4]),
    ] {
        let inj = Injection {
            lab: &lab,
            src,
            victims: victims.iter().map(|v| (*v).to_owned()).collect(),
            dovecot_log: dovecot_log.clone(),
        };
        // Postfix's AUTHs first: after a source's failures Dovecot's auth
        // penalty slows its next logins, which the login processes wait
        // out but Postfix's SASL client does not.
        let mut failed = inj.auth("PLAIN");
        failed += inj.auth("LOGIN");
        failed += inj.helo_and_mail_from();
        failed += inj.imap();
        assert_eq!(failed, FAILURES - 1);
        // Not yet: the agent has read them (wait for the count), no ban.
        let want = f64::from(if src == DENIED_V4 {
            FAILURES - 1
        } else {
            2 * FAILURES - 1
        });
        wait_until(
            "the failures are not all counted",
            Duration::from_secs(10),
            || {
                let t = scrape(&lab);
                metric(&t, "relay_guard_auth_failures_total", &[("ban", "sasl")]) >= want
            },
            || format!("{}\n{}", scrape(&lab), context(&agent, &server)),
        );
        assert!(
            reaches(&lab, src, PROBE_PORT),
            "{} failures do not ban {src}",
            FAILURES - 1
        );
        // The last one.
        inj.pop3();
        wait_until(
            &format!("{src} still reaches {PROBE_PORT}"),
            Duration::from_secs(10),
            || !reaches(&lab, src, PROBE_PORT),
            || context(&agent, &server),
        );
    }

    // Behind XDP: the injectors' SYNs no longer arrive, the victims' do.
    let before: HashMap<&str, u64> = [DENIED_V4, DENIED_V6, ALLOWED_V4, ALLOWED_V6]
        .iter()
        .map(|s| (*s, behind.packets(s, PROBE_PORT)))
        .collect();
    for src in [ALLOWED_V4, ALLOWED_V6] {
        assert!(
            reaches(&lab, src, PROBE_PORT),
            "{src} was named by the injectors and must not be banned"
        );
        for port in BAN_PORTS {
            assert!(reaches(&lab, src, port), "{src} must reach {port}");
        }
    }
    for src in [DENIED_V4, DENIED_V6] {
        assert!(
            !reaches(&lab, src, PROBE_PORT),
            "{src} injected and failed {FAILURES} times"
        );
    }
    for src in [ALLOWED_V4, ALLOWED_V6] {
        assert!(
            behind.packets(src, PROBE_PORT) > before[src],
            "{src}'s SYNs must arrive behind XDP"
        );
    }
    for src in [DENIED_V4, DENIED_V6] {
        assert_eq!(
            behind.packets(src, PROBE_PORT),
            before[src],
            "{src}'s SYNs must be dropped at XDP"
        );
    }
    // The victims still log in.
    let good = swaks(
        &lab,
        ALLOWED_V4,
        587,
        &[
            "--tls",
            "--from",
            "a@example.org",
            "--to",
            "b@example.com",
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
        ],
    );
    assert!(good.success(), "a victim must still send:\n{}", good.output);

    let (status, bans) = cli(&config, &["bans", "--json"]);
    assert!(status.success(), "{bans}");
    let list: serde_json::Value = serde_json::from_str(&bans).expect("bans --json is JSON");
    let mut prefixes: Vec<String> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| b["prefix"].as_str().unwrap_or_default().to_owned())
        .collect();
    prefixes.sort();
    assert_eq!(
        prefixes,
        ["198.51.100.20/32", "2001:db8:d::/64"],
        "only the injectors are banned\n{}",
        context(&agent, &server)
    );
    let text = scrape(&lab);
    let ctx = format!("{text}\n{}", context(&agent, &server));
    for (source, n) in [("postfix", 4.0), ("dovecot", 6.0)] {
        assert_eq!(
            metric(
                &text,
                "relay_guard_auth_failures_total",
                &[("ban", "sasl"), ("source", source)]
            ),
            n,
            "{source}: {ctx}"
        );
    }
    // Every injected user name is field-like: at least Dovecot's IMAP and
    // POP3 lines (one a session, two each injector); Postfix's warnings too
    // when it logs sasl_username.
    let suspicious = metric(&text, "relay_guard_log_lines_suspicious_total", &[("ban", "sasl")]);
    eprintln!("suspicious lines: {suspicious}");
    assert!(suspicious >= 4.0, "{ctx}");
    assert_eq!(
        metric(&text, "relay_guard_log_lines_unparsed_total", &[("ban", "sasl")]),
        0.0,
        "{ctx}"
    );
    for f in [&maillog, &dovecot_log] {
        assert_eq!(
            metric(
                &text,
                "relay_guard_log_source_up",
                &[("ban", "sasl"), ("source", &f.display().to_string())]
            ),
            1.0,
            "{ctx}"
        );
    }
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

fn failures(events: &[LogEvent]) -> HashMap<IpAddr, usize> {
    let mut m = HashMap::new();
    for e in events {
        if let LogEvent::Failure(f) = e {
            *m.entry(f.source).or_default() += 1;
        }
    }
    m
}

/// `args` run in the server namespace as nobody (setpriv), a local
/// unprivileged user.
fn as_nobody(ns: &NetNs, args: &[&str]) -> Run {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run setpriv {args:?}: {e}"));
    Run::of(out)
}

/// `journal = true`: a real journald (tests/src/journal.rs) with Postfix and
/// Dovecot logging through syslog(3). An unprivileged user's `logger -t
/// dovecot`, a copy of logger named `smtpd` and one named `postlogd`, and
/// root's `logger -t postfix/smtpd`, each naming 203.0.113.9, are in the
/// journal but not counted; the real daemons' failures are.
#[test]
fn journal_counts_the_daemons_not_logger() {
    let test = "journal_counts_the_daemons_not_logger";
    let mut t = tools();
    t.extend(["journalctl", relay_guard_tests::journal::JOURNALD, "logger", "setpriv"]);
    if !require::privileged_with(test, &t) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let (events, journal_text) = std::thread::scope(|s| {
        s.spawn(|| {
            let journal = relay_guard_tests::journal::PrivateJournal::start(&dir.0);
            let server = MailServerBuilder::new(&lab.server, &dir.0)
                .syslog()
                .dovecot(&[(USER, PASSWORD)])
                .submission()
                .imap()
                .start();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let watch = logwatch::spawn(vec![Source::Journal], tx).expect("logwatch starts");
            std::thread::sleep(Duration::from_secs(1));
            // Forgeries: an unprivileged user, then root's logger.
            let copies = dir.0.join("bin");
            std::fs::create_dir_all(&copies).expect("create bin dir");
            for name in ["smtpd", "postlogd"] {
                std::fs::copy("/usr/bin/logger", copies.join(name)).expect("copy logger");
            }
            Command::new("chmod")
                .args(["-R", "a+rx"])
                .arg(&dir.0)
                .status()
                .expect("chmod");
            let smtpd = copies.join("smtpd").display().to_string();
            let postlogd = copies.join("postlogd").display().to_string();
            let dovecot_line = format!(
                "imap-login: Disconnected (auth failed, 5 attempts in 2 secs): user=<>, method=PLAIN, rip={NOBODY}, lip=192.0.2.1"
            );
            let smtpd_line = format!("disconnect from unknown[{NOBODY}] ehlo=1 auth=0/5 quit=1 commands=2/7");
            let warn_line = format!("warning: unknown[{NOBODY}]: SASL LOGIN authentication failed: x");
            let whole_line = format!("Dec 02 01:19:46 mail postfix/smtps/smtpd[9282]: {smtpd_line}");
            for args in [
                vec!["logger", "-t", "dovecot", dovecot_line.as_str()],
                vec![smtpd.as_str(), "-t", "postfix/smtpd", smtpd_line.as_str()],
                vec![smtpd.as_str(), "-t", "postfix/submission/smtpd", warn_line.as_str()],
                vec![postlogd.as_str(), "-t", "postfix", whole_line.as_str()],
            ] {
                let run = as_nobody(&lab.server, &args);
                assert!(run.success(), "{args:?}: {}", run.output);
            }
            let root = Command::new("logger")
                .args(["-t", "postfix/smtpd", &warn_line])
                .status()
                .expect("logger");
            assert!(root.success());
            // The real daemons: Postfix on 465 (twice), Dovecot IMAP.
            for _ in 0..2 {
                let run = relay_guard_tests::mail::swaks_auth(
                    &lab.client,
                    DENIED_V4,
                    Lab::server_addr_for(DENIED_V4),
                    465,
                    relay_guard_tests::mail::Tls::Implicit,
                    USER,
                    "wrong",
                );
                assert!(run.output.contains("535"), "{}", run.output);
            }
            let dst = SocketAddr::new(Lab::server_addr_for(DENIED_V6), 143);
            let t = session(
                &lab.client,
                Some(lab::ip(DENIED_V6)),
                dst,
                Proto::Imap,
                vec![format!("a LOGIN {} wrong", imap_quote(&format!("x rip={NOBODY}"))), "z LOGOUT".into()],
            );
            assert!(t.contains("a NO"), "{t}");
            let events = drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30));
            drop(watch);
            let text = Command::new("journalctl")
                .args(["--no-pager", "-o", "verbose"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            drop(server);
            drop(journal);
            (events, text)
        })
        .join()
        .expect("journal thread")
    });
    let ctx = format!("events: {events:?}\n--- journal:\n{journal_text}");
    // The forgeries are in the journal, under the names they claim.
    assert!(journal_text.contains(&format!("rip={NOBODY}, lip=192.0.2.1")), "{ctx}");
    // (Their _EXE may be missing: journald reads /proc/PID/exe, and logger
    // may be gone by then. Not trusted either way.)
    assert!(journal_text.contains("SYSLOG_IDENTIFIER=dovecot"), "{ctx}");
    assert!(
        journal_text.contains(&format!("disconnect from unknown[{NOBODY}] ehlo=1 auth=0/5")),
        "{ctx}"
    );
    assert!(
        journal_text.contains(&format!("warning: unknown[{NOBODY}]: SASL LOGIN authentication failed")),
        "{ctx}"
    );
    let counted = failures(&events);
    assert_eq!(
        counted,
        HashMap::from([(lab::ip(DENIED_V4), 2), (lab::ip(DENIED_V6), 1)]),
        "only the daemons' failures count: {ctx}"
    );
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::Suspicious { .. })),
        "the IMAP user name is field-like: {ctx}"
    );
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::SourceUp { up: true, .. })),
        "{ctx}"
    );
}

/// The relay test's set-up (docs/operations.md "Testing for open relay"):
/// XCLIENT only on a loopback listener without SASL. A local process that
/// says `XCLIENT ADDR=203.0.113.9` there and sends AUTH five times gets
/// nobody charged; on port 25 XCLIENT is refused and the AUTHs are charged
/// to the address that really connected; a failed AUTH on 587 likewise.
#[test]
fn xclient_of_the_relay_test_listener_charges_nobody() {
    let test = "xclient_of_the_relay_test_listener_charges_nobody";
    if !require::privileged_with(test, &tools()) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let server = MailServerBuilder::new(&lab.server, &dir.0)
        .dovecot(&[(USER, PASSWORD)])
        .submission()
        .master(
            "127.0.0.1:10025 inet n - n - - smtpd
  -o syslog_name=postfix/relaytest
  -o smtpd_authorized_xclient_hosts=127.0.0.0/8
  -o smtpd_sasl_auth_enable=no",
        )
        .start();
    let maillog = server.postfix.maillog.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watch = logwatch::spawn(vec![Source::File(maillog.clone())], tx).expect("logwatch starts");
    std::thread::sleep(Duration::from_millis(500));
    let auths: Vec<String> = (0..5).map(|_| "AUTH PLAIN AHgAd3Jvbmc=".to_owned()).collect();
    let xclient_session = |port: u16| {
        let mut cmds = vec![
            "EHLO local.example".to_owned(),
            format!("XCLIENT NAME=[UNAVAILABLE] ADDR={NOBODY}"),
            "EHLO local.example".into(),
        ];
        cmds.extend(auths.iter().cloned());
        cmds.push("QUIT".into());
        session(
            &lab.server,
            None,
            SocketAddr::new("127.0.0.1".parse().expect("addr"), port),
            Proto::Smtp,
            cmds,
        )
    };
    let listener = xclient_session(10025);
    assert!(
        listener.contains(&format!(">>> XCLIENT NAME=[UNAVAILABLE] ADDR={NOBODY}\n220")),
        "XCLIENT is granted on the relay test's listener:\n{listener}"
    );
    let public = xclient_session(25);
    assert!(
        public.contains("insufficient authorization"),
        "XCLIENT is refused on port 25:\n{public}"
    );
    let submission = relay_guard_tests::mail::swaks_auth(
        &lab.server,
        "127.0.0.1",
        "127.0.0.1".parse().expect("addr"),
        587,
        relay_guard_tests::mail::Tls::StartTls,
        USER,
        "wrong",
    );
    assert!(submission.output.contains("535"), "{}", submission.output);
    let events = drain(&mut rx, Duration::from_secs(3), Duration::from_secs(30));
    drop(watch);
    let log = server.postfix.log_text();
    let ctx = format!("events: {events:?}\n--- maillog:\n{log}\n--- sessions:\n{listener}\n{public}");
    // The listener's disconnect line names the spoofed address, with its
    // refused AUTHs (Postfix 3.7 counts the granted XCLIENT as 0/1).
    assert!(
        log.contains(&format!(
            "disconnect from unknown[{NOBODY}] ehlo=2 xclient=0/1 auth=0/5"
        )),
        "{ctx}"
    );
    let counted = failures(&events);
    assert_eq!(counted.get(&lab::ip(NOBODY)), None, "{ctx}");
    assert_eq!(
        counted.get(&lab::ip("127.0.0.1")),
        Some(&6),
        "port 25's five refused AUTHs and 587's failed one, charged to the real address: {ctx}"
    );
}
