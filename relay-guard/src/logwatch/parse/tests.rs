use std::{collections::HashMap, net::IpAddr};

use proptest::prelude::*;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn fail(p: &mut Parser, line: &str) -> (IpAddr, Origin, String, u32) {
    match p.line(line) {
        Outcome::Failures(f) => (f.addr, f.origin, f.service, f.count),
        other => panic!("expected failures from {line:?}, got {other:?}"),
    }
}

/// Sum of failures over lines, per the parser.
fn total(lines: &[&str]) -> u32 {
    let mut p = Parser::new();
    lines
        .iter()
        .map(|l| match p.line(l) {
            Outcome::Failures(f) => f.count,
            _ => 0,
        })
        .sum()
}

#[test]
fn postfix_warning_in_every_framing_and_service() {
    let cases = [
        // Postfix 3.7 (Debian 12) with Dovecot SASL: empty reason.
        (
            "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: ",
            "postfix/submission/smtpd",
            "192.0.2.7",
        ),
        // Postfix 3.9+: reason and sasl_username.
        (
            "Dec  2 01:02:03 mx postfix/smtpd[11]: warning: client.example[198.51.100.9]: SASL LOGIN authentication failed: (reason unavailable), sasl_username=bob@example.com",
            "postfix/smtpd",
            "198.51.100.9",
        ),
        // Cyrus reason text; maillog_file framing (zero-padded day).
        (
            "Dec 02 01:02:03 mx postfix/smtps/smtpd[77]: warning: unknown[2001:db8::5]: SASL LOGIN authentication failed: UGFzc3dvcmQ6",
            "postfix/smtps/smtpd",
            "2001:db8::5",
        ),
        // maillog_file with microseconds.
        (
            "Dec 02 01:02:03.123456 mx postfix/smtpd[77]: warning: unknown[203.0.113.1]: SASL CRAM-MD5 authentication failed: authentication failure",
            "postfix/smtpd",
            "203.0.113.1",
        ),
        // ISO timestamp (rsyslog RSYSLOG_FileFormat).
        (
            "2026-12-02T01:02:03.123456+00:00 mx postfix-out/smtpd[900]: warning: unknown[::ffff:192.0.2.200]: SASL PLAIN authentication failed: ",
            "postfix-out/smtpd",
            "192.0.2.200",
        ),
        (
            "2026-12-02T01:02:03Z mx.example.com postfix/submission/smtpd[1]: warning: host[IPv6:2001:db8:1::2]: SASL LOGIN authentication failed: ",
            "postfix/submission/smtpd",
            "2001:db8:1::2",
        ),
        // smtpd_client_port_logging = yes.
        (
            "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[192.0.2.8]:51234: SASL LOGIN authentication failed: ",
            "postfix/smtpd",
            "192.0.2.8",
        ),
        // RFC 5424.
        (
            "<20>1 2026-12-02T01:02:03.000001+01:00 mx postfix/smtpd 31 - - warning: unknown[192.0.2.9]: SASL PLAIN authentication failed: ",
            "postfix/smtpd",
            "192.0.2.9",
        ),
        (
            "<20>1 2026-12-02T01:02:03Z mx postfix/smtpd 31 - [origin ip=\"192.0.2.1\" x=\"a\\]b\"] warning: unknown[192.0.2.10]: SASL PLAIN authentication failed: ",
            "postfix/smtpd",
            "192.0.2.10",
        ),
        // Year after the time; a custom syslog_name ending in /smtpd.
        (
            "Dec  2 01:02:03 2026 mx mail-in/smtpd[8]: warning: unknown[198.51.100.1]: SASL PLAIN authentication failed: ",
            "mail-in/smtpd",
            "198.51.100.1",
        ),
    ];
    for (line, service, addr) in cases {
        let mut p = Parser::new();
        assert_eq!(
            fail(&mut p, line),
            (ip(addr), Origin::Postfix, service.to_owned(), 1),
            "{line}"
        );
    }
}

#[test]
fn postfix_disconnect_counts_what_the_warnings_did_not() {
    let warn = "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: ";
    let disc = "Dec  2 01:02:04 mx postfix/submission/smtpd[4242]: disconnect from unknown[192.0.2.7] ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5";
    // Warning then disconnect: one failure.
    assert_eq!(total(&[warn, disc]), 1);
    // Disconnect alone (the warning missing): the disconnect counts it.
    assert_eq!(total(&[disc]), 1);
    // Three failures, three warnings: three.
    let disc3 = "Dec  2 01:02:05 mx postfix/submission/smtpd[4242]: disconnect from unknown[192.0.2.7] ehlo=1 auth=0/3 commands=1/4";
    assert_eq!(total(&[warn, warn, warn, disc3]), 3);
    // Two warnings seen, three failed: the disconnect adds one.
    assert_eq!(total(&[warn, warn, disc3]), 3);
    // auth=1/2: one failure, one success.
    let disc12 = "Dec  2 01:02:05 mx postfix/submission/smtpd[4242]: disconnect from unknown[192.0.2.7] ehlo=1 auth=1/2 mail=1 rcpt=1 data=1 quit=1 commands=6/7";
    assert_eq!(total(&[warn, disc12]), 1);
    assert_eq!(total(&[disc12]), 1);
    // auth=1: all fine.
    let ok = "Dec  2 01:02:05 mx postfix/submission/smtpd[4242]: disconnect from unknown[192.0.2.7] ehlo=1 auth=1 mail=1 quit=1 commands=4";
    assert_eq!(total(&[ok]), 0);
    // No AUTH at all.
    assert_eq!(
        total(&["Dec  2 01:02:05 mx postfix/smtpd[9]: disconnect from unknown[192.0.2.7] ehlo=1 quit=1 commands=2"]),
        0
    );
    // A warning of another pid or client is not subtracted.
    let other_pid = "Dec  2 01:02:03 mx postfix/submission/smtpd[4243]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: ";
    assert_eq!(total(&[other_pid, disc]), 2);
    let other_client = "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[192.0.2.77]: SASL PLAIN authentication failed: ";
    assert_eq!(total(&[other_client, disc]), 2);
    // The disconnect settles: the next session of the same process counts anew.
    assert_eq!(total(&[warn, disc, disc]), 2);
}

/// Lines as Debian 12's Postfix 3.7 with Dovecot SASL (auth_verbose = yes)
/// wrote them in tests/tests/mail_logs.rs: three failed AUTHs on 587 from
/// one client, one smtpd process serving them in turn.
#[test]
fn real_postfix_3_7_and_dovecot_2_3_logs() {
    let maillog = [
        "Dec 02 01:19:32 mail postfix/submission/smtpd[9157]: connect from unknown[198.51.100.20]",
        "Dec 02 01:19:32 mail postfix/submission/smtpd[9157]: warning: unknown[198.51.100.20]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=alice@example.com",
        "Dec 02 01:19:32 mail postfix/submission/smtpd[9157]: disconnect from unknown[198.51.100.20] ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5",
        "Dec 02 01:19:37 mail postfix/submission/smtpd[9157]: connect from unknown[198.51.100.20]",
        "Dec 02 01:19:37 mail postfix/submission/smtpd[9157]: warning: unknown[198.51.100.20]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=alice@example.com",
        "Dec 02 01:19:37 mail postfix/submission/smtpd[9157]: disconnect from unknown[198.51.100.20] ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5",
        "Dec 02 01:19:47 mail postfix/submission/smtpd[9157]: warning: unknown[2001:db8:d::20]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=alice@example.com",
        "Dec 02 01:19:47 mail postfix/submission/smtpd[9157]: disconnect from unknown[2001:db8:d::20] ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5",
        "Dec 02 01:19:46 mail postfix/smtps/smtpd[9282]: warning: unknown[198.51.100.20]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=alice@example.com",
        "Dec 02 01:19:46 mail postfix/smtps/smtpd[9282]: disconnect from unknown[198.51.100.20] ehlo=1 auth=0/1 quit=1 commands=2/3",
    ];
    let dovecot = [
        "Dec 02 01:19:31 master: Info: Dovecot v2.3.19.1 (9b53102964) starting up without any protocols (core dumps disabled)",
        "Dec 02 01:19:31 auth: Info: passwd-file(alice@example.com,198.51.100.20): Password mismatch",
        "Dec 02 01:19:47 auth: Info: passwd-file(alice@example.com,2001:db8:d::20): Password mismatch",
    ];
    let mut p = Parser::new();
    let mut by_addr: HashMap<IpAddr, u32> = HashMap::new();
    for line in maillog.iter().chain(&dovecot) {
        match p.line(line) {
            Outcome::Failures(f) => *by_addr.entry(f.addr).or_default() += f.count,
            Outcome::Ignored => {}
            Outcome::Unparsed => panic!("unparsed: {line}"),
        }
    }
    assert_eq!(
        by_addr,
        HashMap::from([(ip("198.51.100.20"), 3), (ip("2001:db8:d::20"), 1)])
    );
    assert_eq!(p.pending(), 0);
}

#[test]
fn postfix_disconnect_lines() {
    let mut p = Parser::new();
    assert_eq!(
        fail(
            &mut p,
            "2026-12-02T01:02:03.5+00:00 mx postfix/smtps/smtpd[3]: disconnect from unknown[2001:db8::99] auth=0/2 quit=1 commands=1/3"
        ),
        (ip("2001:db8::99"), Origin::Postfix, "postfix/smtps/smtpd".into(), 2)
    );
    assert_eq!(
        fail(
            &mut p,
            "Dec  2 01:02:03 mx postfix/smtpd[3]: disconnect from mail.example.org[198.51.100.20]:4567 ehlo=1 auth=0/1 rset=1 quit=1 commands=3/4"
        ),
        (ip("198.51.100.20"), Origin::Postfix, "postfix/smtpd".into(), 1)
    );
}

#[test]
fn postfix_back_end_failures_are_not_the_clients() {
    let warn = "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[192.0.2.7]: SASL LOGIN authentication failed: Connection lost to authentication server";
    let disc =
        "Dec  2 01:02:04 mx postfix/smtpd[5]: disconnect from unknown[192.0.2.7] ehlo=1 auth=0/1 quit=1 commands=2/3";
    assert_eq!(total(&[warn, disc]), 0);
}

#[test]
fn postfix_lines_that_are_not_failures() {
    let mut p = Parser::new();
    for line in [
        "Dec  2 01:02:03 mx postfix/smtpd[5]: connect from unknown[192.0.2.7]",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: lost connection after AUTH from unknown[192.0.2.7]",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[192.0.2.7]: SASL LOGIN authentication aborted",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: SASL authentication failure: Password verification failed",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: hostname x.example does not resolve to address 192.0.2.7",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: 4F1A2B3C: client=unknown[192.0.2.7], sasl_method=PLAIN, sasl_username=a",
        "Dec  2 01:02:03 mx postfix/qmgr[6]: 4F1A2B3C: removed",
        "Dec  2 01:02:03 mx postfix/postscreen[6]: DISCONNECT [192.0.2.7]:1234",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: disconnect from unknown[unknown] commands=0/0",
        "Dec  2 01:02:03 mx sshd[6]: Failed password for root from 192.0.2.7 port 22 ssh2",
        "Dec  2 01:02:03 mx kernel: [ 12.345] eth0: link up",
        "",
        "   ",
    ] {
        assert_eq!(p.line(line), Outcome::Ignored, "{line}");
    }
}

#[test]
fn dovecot_login_processes() {
    let cases = [
        // Dovecot 2.3 via syslog.
        (
            "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (auth failed, 3 attempts in 14 secs): user=<bob>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, TLS, session=<mD2nLxPyXsDAAAIB>",
            "imap-login",
            "192.0.2.7",
            3,
        ),
        (
            "Dec  2 01:02:03 mx dovecot: pop3-login: Aborted login (auth failed, 1 attempts in 2 secs): user=<a@example.com>, method=PLAIN, rip=2001:db8::7, lip=2001:db8::1, session=<x>",
            "pop3-login",
            "2001:db8::7",
            1,
        ),
        // Dovecot 2.3.10+.
        (
            "2026-12-02T01:02:03.004+00:00 mx dovecot: submission-login: Disconnected: Connection closed (auth failed, 2 attempts in 4 secs): user=<x>, method=LOGIN, rip=::ffff:198.51.100.3, lip=::ffff:198.51.100.1, TLS, session=<y>",
            "submission-login",
            "198.51.100.3",
            2,
        ),
        // Dovecot 2.4.
        (
            "Dec  2 01:02:03 mx dovecot: imap-login: Login aborted: Connection closed (auth failed, 5 attempts in 20 secs) (auth_failed): user=<x>, method=PLAIN, rip=203.0.113.5, lip=203.0.113.1, TLS, session=<z>",
            "imap-login",
            "203.0.113.5",
            5,
        ),
        // Dovecot 2.3.19 (Debian 12), its own log_path file, as written in
        // tests/tests/mail_logs.rs.
        (
            "Dec 02 01:55:25 imap-login: Info: Disconnected: Aborted login by logging out (auth failed, 3 attempts in 9 secs): user=<alice@example.com>, method=PLAIN, rip=198.51.100.20, lip=203.0.113.1, session=<ffs075xhv+nGM2QU>",
            "imap-login",
            "198.51.100.20",
            3,
        ),
        // Dovecot's own log_path file.
        (
            "Dec 02 01:02:03 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<x>, method=PLAIN, rip=192.0.2.55, lip=192.0.2.1, session=<q>",
            "imap-login",
            "192.0.2.55",
            1,
        ),
    ];
    for (line, service, addr, n) in cases {
        let mut p = Parser::new();
        assert_eq!(
            fail(&mut p, line),
            (ip(addr), Origin::Dovecot, service.to_owned(), n),
            "{line}"
        );
    }
}

#[test]
fn dovecot_lines_that_are_not_counted() {
    let mut p = Parser::new();
    for line in [
        // The auth worker repeats what Postfix or the login process logs.
        "Dec  2 01:02:03 mx dovecot: auth: passwd-file(bob,192.0.2.7): Password mismatch",
        "Dec  2 01:02:03 mx dovecot: auth: passwd-file(eve,192.0.2.7,<abc>): unknown user",
        "Dec  2 01:02:03 mx dovecot: auth-worker(123): pam(bob,192.0.2.7): pam_authenticate() failed",
        "Dec 02 01:02:03 auth: Info: passwd-file(bob,192.0.2.7): Password mismatch",
        "Dec 02 01:55:16 auth: Info: passwd-file(alice@example.com,198.51.100.20,<ffs075xhv+nGM2QU>): Password mismatch",
        "Dec  2 01:02:03 mx dovecot: imap-login: Login: user=<bob>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1",
        "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (no auth attempts in 0 secs): user=<>, rip=192.0.2.7, lip=192.0.2.1",
        "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (tried to use disallowed plaintext auth): user=<>, rip=192.0.2.7",
        "Dec  2 01:02:03 mx dovecot: imap(bob)<1><x>: Disconnected: Logged out in=1 out=2",
        "Dec  2 01:02:03 mx dovecot: master: Dovecot v2.3.19.1 starting up for imap",
        "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (auth failed, 0 attempts in 1 secs): user=<>, rip=192.0.2.7",
    ] {
        assert_eq!(p.line(line), Outcome::Ignored, "{line}");
    }
}

#[test]
fn one_failed_login_through_postfix_and_dovecot_counts_once() {
    // Postfix with Dovecot SASL: smtpd's warning, Dovecot's auth line, the
    // disconnect line: one failure.
    let lines = [
        "Dec  2 01:02:03 mx dovecot: auth: passwd-file(bob,192.0.2.7): Password mismatch",
        "Dec  2 01:02:03 mx postfix/submission/smtpd[50]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: ",
        "Dec  2 01:02:03 mx postfix/submission/smtpd[50]: disconnect from unknown[192.0.2.7] ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5",
    ];
    assert_eq!(total(&lines), 1);
}

#[test]
fn lines_of_ours_that_do_not_parse_are_unparsed() {
    let mut p = Parser::new();
    for line in [
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[192.0.2.300]: SASL PLAIN authentication failed: ",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown 192.0.2.3: SASL PLAIN authentication failed: ",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: disconnect from unknown[not-an-address] auth=0/1",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: disconnect from unknown[192.0.2.3] auth=x/1",
        "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (auth failed, many attempts in 2 secs): rip=192.0.2.7",
        "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (auth failed, 2 attempts in 2 secs): user=<x>",
        "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (auth failed, 2 attempts in 2 secs): rip=999.1.1.1",
        // No syslog framing at all.
        "garbage \u{1}\u{2} not a log line",
        "Dec 99 01:02:03 mx postfix/smtpd[5]: disconnect",
        "Dec  2 01:02:03 mx postfix/smtpd[x]: disconnect",
        "<999999>1 - - - -",
    ] {
        assert_eq!(p.line(line), Outcome::Unparsed, "{line}");
    }
}

#[test]
fn journal_records() {
    let mut p = Parser::new();
    match p.record(
        "postfix/submission/smtpd",
        Some(10),
        "warning: unknown[2001:db8::1]: SASL PLAIN authentication failed: ",
    ) {
        Outcome::Failures(f) => assert_eq!((f.addr, f.count), (ip("2001:db8::1"), 1)),
        o => panic!("{o:?}"),
    }
    assert_eq!(
        p.record(
            "postfix/submission/smtpd",
            Some(10),
            "disconnect from unknown[2001:db8::1] ehlo=1 auth=0/1 commands=1/2"
        ),
        Outcome::Ignored
    );
    assert_eq!(p.pending(), 0);
    match p.record(
        "dovecot",
        Some(11),
        "imap-login: Disconnected (auth failed, 2 attempts in 3 secs): user=<a>, method=PLAIN, rip=192.0.2.4, lip=192.0.2.1",
    ) {
        Outcome::Failures(f) => assert_eq!((f.addr, f.origin, f.count), (ip("192.0.2.4"), Origin::Dovecot, 2)),
        o => panic!("{o:?}"),
    }
    assert_eq!(
        p.record("dovecot", Some(12), "auth: passwd-file(a,192.0.2.4): Password mismatch"),
        Outcome::Ignored
    );
}

#[test]
fn pending_warnings_are_bounded() {
    let mut p = Parser::new();
    for i in 0..(MAX_PENDING as u32 + 10) {
        let line = format!(
            "Dec  2 01:02:03 mx postfix/smtpd[{i}]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: "
        );
        assert!(matches!(p.line(&line), Outcome::Failures(_)));
    }
    assert!(p.pending() <= MAX_PENDING);
}

proptest! {
    #[test]
    fn no_line_panics(line in ".{0,300}") {
        let mut p = Parser::new();
        let _ = p.line(&line);
        let _ = p.record("dovecot", None, &line);
        let _ = p.record("postfix/smtpd", Some(1), &line);
    }

    #[test]
    fn no_mutated_real_line_panics(
        base in prop::sample::select(vec![
            "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: ",
            "Dec  2 01:02:04 mx postfix/submission/smtpd[4242]: disconnect from unknown[192.0.2.7] ehlo=2 auth=0/1 commands=4/5",
            "<20>1 2026-12-02T01:02:03Z mx postfix/smtpd 31 [a b=\"c\"] warning: unknown[192.0.2.9]: SASL PLAIN authentication failed: ",
            "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (auth failed, 3 attempts in 14 secs): user=<bob>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1",
        ]),
        cut in 0usize..200,
        insert in ".{0,8}",
    ) {
        let mut line = base.to_owned();
        let at = (0..=cut.min(line.len())).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
        line.insert_str(at, &insert);
        let mut p = Parser::new();
        let _ = p.line(&line);
        let _ = p.line(&line[..at]);
    }
}
