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
            Outcome::Unparsed { .. } => panic!("unparsed: {line}"),
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
        assert_eq!(p.line(line), Outcome::UNPARSED, "{line}");
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

/// The lines of the 2026-12-07 review (C1), as Dovecot 2.3.19.1 wrote them:
/// the user name holds another address; the real one is charged.
#[test]
fn dovecot_user_names_do_not_choose_the_address() {
    let mut p = Parser::new();
    for (line, addr, n) in [
        (
            "Dec 07 14:57:36 imap-login: Info: Disconnected: Aborted login by logging out (auth failed, 5 attempts in 44 secs): user=<x rip=203.0.113.9 y>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, secured, session=<OqyjbwxipKN/AAAB>",
            "127.0.0.1",
            5,
        ),
        (
            "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected: Aborted login by logging out (auth failed, 5 attempts in 44 secs): user=<x rip=192.0.2.1 y>, method=PLAIN, rip=198.51.100.7, lip=192.0.2.2, TLS, session=<OqyjbwxipKN/AAAB>",
            "198.51.100.7",
            5,
        ),
        // The user element closed and the real elements imitated inside it.
        (
            "Dec  7 14:57:36 mx dovecot: pop3-login: Disconnected (auth failed, 2 attempts in 4 secs): user=<a>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.1, session=<x>, method=PLAIN, rip=2001:db8:1::5, lip=2001:db8::1, mpid=0, TLS, session=<AbC+/9>",
            "2001:db8:1::5",
            2,
        ),
        // The mark inside the user name of a line that has its own.
        (
            "Dec  7 14:57:36 mx dovecot: submission-login: Disconnected (auth failed, 1 attempts in 4 secs): user=<(auth failed, 20 attempts in 1 secs): user=<>, rip=203.0.113.9>, method=LOGIN, rip=192.0.2.44, lip=192.0.2.1, session=<x>",
            "192.0.2.44",
            1,
        ),
    ] {
        match p.line(line) {
            Outcome::Failures(f) => {
                assert_eq!((f.addr, f.count), (ip(addr), n), "{line}");
                assert!(f.suspicious, "field-like user name: {line}");
            }
            o => panic!("{line}: {o:?}"),
        }
    }
    // A user name with `, ` but nothing else field-like: charged, suspicious.
    match p.line("Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts in 4 secs): user=<Doe, John>, method=PLAIN, rip=192.0.2.45, lip=192.0.2.1, session=<x>") {
        Outcome::Failures(f) => assert_eq!((f.addr, f.suspicious), (ip("192.0.2.45"), true)),
        o => panic!("{o:?}"),
    }
    match p.line("Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts in 4 secs): user=<alice@example.com>, method=PLAIN, rip=192.0.2.46, lip=192.0.2.1, mpid=0, secured, session=<x>") {
        Outcome::Failures(f) => assert_eq!((f.addr, f.suspicious), (ip("192.0.2.46"), false)),
        o => panic!("{o:?}"),
    }
}

/// Lines that cannot be read unambiguously charge nobody.
#[test]
fn dovecot_lines_of_another_format_charge_nobody() {
    let mut p = Parser::new();
    for (line, suspicious) in [
        // login_log_format_elements without rip (the user's rip= is all there is).
        (
            "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 5 attempts in 4 secs): user=<x>, rip=203.0.113.9, session=<a>, method=PLAIN, lip=192.0.2.1",
            false,
        ),
        (
            "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 5 attempts in 4 secs): user=<x, rip=203.0.113.9, session=<a>, lip=192.0.2.1",
            false,
        ),
        // rip before user: the elements after it are not Dovecot's own.
        (
            "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 5 attempts in 4 secs): rip=192.0.2.9, user=<x>, method=PLAIN, lip=192.0.2.1",
            false,
        ),
        // An element this parser does not know after rip.
        (
            "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 5 attempts in 4 secs): user=<x>, method=PLAIN, rip=192.0.2.9, lip=192.0.2.1, foo=bar, session=<a>",
            false,
        ),
        // No user element at all.
        (
            "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 5 attempts in 4 secs): method=PLAIN, rip=192.0.2.9, lip=192.0.2.1",
            false,
        ),
        // session not last.
        (
            "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 5 attempts in 4 secs): user=<x>, method=PLAIN, rip=192.0.2.9, session=<a>, lip=192.0.2.1",
            false,
        ),
    ] {
        assert_eq!(p.line(line), Outcome::Unparsed { suspicious }, "{line}");
    }
    // The mark only in the user name of a line without its own: not a failure.
    assert_eq!(
        p.line("Dec  7 14:57:36 mx dovecot: imap-login: Login: user=<(auth failed, 5 attempts in 1 secs)>, method=PLAIN, rip=192.0.2.9, lip=192.0.2.1, mpid=7, session=<a>"),
        Outcome::Ignored
    );
}

/// M5: one line adds at most MAX_FAILURES_PER_LINE.
#[test]
fn one_line_adds_a_bounded_number_of_failures() {
    let mut p = Parser::new();
    for line in [
        "Dec  7 14:57:36 mx dovecot: imap-login: Disconnected (auth failed, 4294967295 attempts in 2 secs): user=<>, method=PLAIN, rip=2001:db8:1::1, lip=192.0.2.1",
        "Dec  7 14:57:36 mx postfix/smtpd[1]: disconnect from unknown[203.0.113.9] ehlo=1 auth=0/4294967295 commands=1/4294967296",
        "Dec  7 14:57:36 mx postfix/smtpd[1]: disconnect from unknown[203.0.113.9] ehlo=1 auth=0/99999999999999999999 commands=1/2",
    ] {
        match p.line(line) {
            Outcome::Failures(f) => assert_eq!(f.count, MAX_FAILURES_PER_LINE, "{line}"),
            o => panic!("{line}: {o:?}"),
        }
    }
}

/// L5: the back-end failure text counts only where Postfix writes the
/// reason, not in the client's sasl_username.
#[test]
fn postfix_back_end_text_in_the_user_name_is_a_failure() {
    let warn = "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[198.51.100.66]: SASL PLAIN authentication failed: , sasl_username=Connection lost to authentication server";
    let disc = "Dec  2 01:02:04 mx postfix/smtpd[5]: disconnect from unknown[198.51.100.66] ehlo=1 auth=0/1 quit=1 commands=2/3";
    assert_eq!(total(&[warn, disc]), 1);
    // The reason itself still exempts.
    let real = "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[198.51.100.66]: SASL PLAIN authentication failed: Connection lost to authentication server, sasl_username=bob";
    assert_eq!(total(&[real, disc]), 0);
}

/// M1: a session that used XCLIENT (its address is what a local client
/// said) charges nobody; a refused XCLIENT changes nothing. The lines of
/// Postfix 3.7 in tests/tests/mail_trust.rs: a granted XCLIENT is logged as
/// `xclient=0/1` too, so the connect line's address tells them apart.
#[test]
fn postfix_xclient_sessions_charge_nobody() {
    let granted = [
        "Dec 08 00:14:45 mail postfix/relaytest/smtpd[6974]: connect from unknown[127.0.0.1]",
        "Dec 08 00:14:45 mail postfix/relaytest/smtpd[6974]: disconnect from unknown[203.0.113.9] ehlo=2 xclient=0/1 auth=0/5 quit=1 commands=3/9",
    ];
    assert_eq!(total(&granted), 0);
    let refused = [
        "Dec 08 00:14:45 mail postfix/smtpd[6981]: connect from unknown[127.0.0.1]",
        "Dec 08 00:14:46 mail postfix/smtpd[6981]: disconnect from unknown[127.0.0.1] ehlo=2 xclient=0/1 auth=0/5 quit=1 commands=3/9",
    ];
    assert_eq!(total(&refused), 5);
    // No connect line seen (the agent started mid-session): nobody.
    assert_eq!(total(&granted[1..]), 0);
    // A listener with SASL: the warnings after XCLIENT carry the spoofed
    // address too.
    let sasl = [
        "Dec 08 00:14:45 mail postfix/smtpd[7000]: connect from localhost[127.0.0.1]",
        "Dec 08 00:14:45 mail postfix/smtpd[7000]: warning: unknown[203.0.113.9]: SASL PLAIN authentication failed: , sasl_username=x",
        "Dec 08 00:14:45 mail postfix/smtpd[7000]: warning: unknown[203.0.113.9]: SASL PLAIN authentication failed: , sasl_username=x",
        "Dec 08 00:14:46 mail postfix/smtpd[7000]: disconnect from unknown[203.0.113.9] ehlo=2 xclient=0/1 auth=0/2 quit=1 commands=3/6",
    ];
    assert_eq!(total(&sasl), 0);
    // The next session of that process is the real client's again.
    let mut p = Parser::new();
    for l in sasl {
        let _ = p.line(l);
    }
    assert_eq!(p.sessions(), 0);
    let _ = p.line("Dec 08 00:14:47 mail postfix/smtpd[7000]: connect from unknown[198.51.100.3]");
    assert!(matches!(
        p.line("Dec 08 00:14:47 mail postfix/smtpd[7000]: warning: unknown[198.51.100.3]: SASL PLAIN authentication failed: "),
        Outcome::Failures(f) if f.addr == ip("198.51.100.3")
    ));
}

#[test]
fn open_sessions_are_bounded() {
    let mut p = Parser::new();
    for i in 0..(MAX_PENDING as u32 + 10) {
        let _ = p.line(&format!(
            "Dec  2 01:02:03 mx postfix/smtpd[{i}]: connect from unknown[192.0.2.7]"
        ));
    }
    assert!(p.sessions() <= MAX_PENDING && p.sessions() > 0);
}

#[test]
fn postfix_client_fields_do_not_choose_the_address() {
    let mut p = Parser::new();
    // Field-like SASL method and user name: the real client, suspicious.
    for line in [
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[192.0.2.7]: SASL x]:unknown[203.0.113.9]: authentication failed: , sasl_username=a",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=unknown[203.0.113.9]: SASL PLAIN authentication failed: ",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: warning: unknown[192.0.2.7]: SASL LOGIN authentication failed: , sasl_username=x, rip=203.0.113.9, y",
    ] {
        match p.line(line) {
            Outcome::Failures(f) => assert_eq!((f.addr, f.count, f.suspicious), (ip("192.0.2.7"), 1, true), "{line}"),
            o => panic!("{line}: {o:?}"),
        }
    }
    // HELO, MAIL FROM, RCPT TO in other lines: nobody.
    for line in [
        "Dec  2 01:02:03 mx postfix/smtpd[5]: NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 554 5.7.1 <a@b>: Relay access denied; from=<unknown[203.0.113.9]: SASL PLAIN authentication failed: > to=<a@b> proto=ESMTP helo=<disconnect from unknown[203.0.113.9] auth=0/5>",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: 4F1A2B3C: client=unknown[192.0.2.7], sasl_method=PLAIN, sasl_username=rip=203.0.113.9",
        "Dec  2 01:02:03 mx postfix/smtpd[5]: lost connection after AUTH from unknown[192.0.2.7]",
    ] {
        assert_eq!(p.line(line), Outcome::Ignored, "{line}");
    }
    // A client name Postfix never writes: unparsed.
    assert_eq!(
        p.line("Dec  2 01:02:03 mx postfix/smtpd[5]: warning: x y[203.0.113.9]: SASL PLAIN authentication failed: "),
        Outcome::UNPARSED
    );
    assert_eq!(
        p.line("Dec  2 01:02:03 mx postfix/smtpd[5]: warning: Illegal address syntax from unknown[192.0.2.7] in MAIL command: <x: SASL y authentication failed>"),
        Outcome::UNPARSED
    );
}

// ---- Property test: every format, every client-controlled field. ----

/// What a client can get into a field: the pieces an attacker would use,
/// joined, plus arbitrary printable text (daemons replace control
/// characters), up to very long.
fn hostile() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "rip=",
        "lip=",
        "rip=203.0.113.9",
        ", rip=203.0.113.9, lip=192.0.2.1",
        ", rip=2001:db8:bad::1",
        ", ",
        "]:",
        "[",
        "]",
        "unknown[203.0.113.9]",
        "unknown[203.0.113.9]: SASL PLAIN authentication failed: ",
        ">",
        "<",
        "=",
        "\"",
        "'",
        "user=<",
        ": user=<",
        ">, method=PLAIN",
        "session=<abc",
        "session=<abc>",
        "(auth failed, 20 attempts in 1 secs)",
        "disconnect from unknown[203.0.113.9] auth=0/9",
        " auth=0/9",
        "xclient=1",
        ", sasl_username=",
        "Connection lost to authentication server",
        "IPv6:",
        "::ffff:203.0.113.9",
        "ü",
        "日本語",
        "\u{202e}",
        " ",
        "x",
    ]);
    prop_oneof![
        4 => prop::collection::vec(atoms, 0..10).prop_map(|v| v.concat()),
        2 => "[^\\x00-\\x1f\\x7f]{0,40}",
        1 => (prop::sample::select(vec!["rip=203.0.113.9, ", "]: ", "a"]), 200usize..3000)
            .prop_map(|(s, n)| s.repeat(n / s.len())),
    ]
}

/// No white space (SMTP arguments: Postfix splits commands on it).
fn word() -> impl Strategy<Value = String> {
    hostile().prop_map(|s| s.split_whitespace().collect::<Vec<_>>().concat())
}

/// A client name as Postfix writes it: `unknown` or a validated host name
/// (the reverse-DNS name, letters, digits, `-`, `_`, `.`).
fn client_name() -> impl Strategy<Value = String> {
    prop_oneof![Just("unknown".to_owned()), "[A-Za-z0-9_.-]{1,60}"]
}

/// The true client: documentation addresses, never 203.0.113.9 (the
/// address the hostile text names).
fn true_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..=255).prop_map(|x| IpAddr::from([198, 51, 100, x])),
        (0u16..=0xffff).prop_map(|x| IpAddr::from([0x2001, 0xdb8, 0xa, 0, 0, 0, 0, x])),
    ]
}

/// How Postfix and Dovecot write an address.
fn postfix_addr(a: IpAddr, v6_prefix: bool) -> String {
    match a {
        IpAddr::V6(a) if v6_prefix => format!("IPv6:{a}"),
        a => a.to_string(),
    }
}

/// One framing of `ident[pid]: message` (index picks it).
fn framed(framing: usize, ident: &str, pid: u32, message: &str) -> String {
    match framing % 5 {
        0 => format!("Dec  2 01:02:03 mx {ident}[{pid}]: {message}"),
        1 => format!("Dec 02 01:02:03.123456 mx {ident}[{pid}]: {message}"),
        2 => format!("2026-12-02T01:02:03.123456+00:00 mx.example.com {ident}[{pid}]: {message}"),
        3 => format!("<22>1 2026-12-02T01:02:03Z mx {ident} {pid} - - {message}"),
        _ => format!("<22>1 2026-12-02T01:02:03Z mx {ident} {pid} - [meta x=\"]\"] {message}"),
    }
}

/// Feeds `line` (or, with `journal`, the record) and adds its failures;
/// panics if any is charged to another address.
fn charged(p: &mut Parser, journal: Option<(&str, u32, &str)>, line: &str, truth: IpAddr) -> (u32, bool) {
    let outcome = match journal {
        Some((ident, pid, message)) => p.record(ident, Some(pid), message),
        None => p.line(line),
    };
    match outcome {
        Outcome::Failures(f) => {
            assert_eq!(f.addr, truth, "charged the wrong address: {line}");
            assert!(f.count >= 1 && f.count <= MAX_FAILURES_PER_LINE, "{line}");
            (f.count, f.suspicious)
        }
        Outcome::Unparsed { suspicious } => (0, suspicious),
        Outcome::Ignored => (0, false),
    }
}

const SERVICES: &[&str] = &[
    "postfix/smtpd",
    "postfix/submission/smtpd",
    "postfix/smtps/smtpd",
    "postfix-out/smtpd",
    "postfix-out/submission/smtpd",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Postfix: SASL warnings with a hostile method and sasl_username, and
    /// disconnect lines, with a hostile reverse-DNS name; HELO, MAIL FROM
    /// and RCPT TO in the lines that carry them. The true client is charged
    /// exactly the failed AUTHs, once each.
    #[test]
    fn postfix_charges_the_true_client_exactly(
        truth in true_addr(),
        v6_prefix in any::<bool>(),
        port in prop::option::of(1u16..),
        name in client_name(),
        method in word(),
        users in prop::collection::vec(hostile(), 1..4),
        helo in hostile(),
        mail_from in hostile(),
        warned in 0usize..4,
        extra in 0u32..3,
        framing in 0usize..5,
        service in prop::sample::select(SERVICES),
        journal in any::<bool>(),
        pid in 1u32..100_000,
        via_xclient in any::<bool>(),
    ) {
        let mut p = Parser::new();
        let addr = postfix_addr(truth, v6_prefix);
        let port = port.map(|p| format!(":{p}")).unwrap_or_default();
        let client = format!("{name}[{addr}]{port}");
        // Through XCLIENT, the session's lines name `truth`, which a local
        // client chose: nobody is charged.
        let connect = if via_xclient { "localhost[127.0.0.1]".to_owned() } else { client.clone() };
        let xclient = if via_xclient { " xclient=0/1" } else { "" };
        let mut messages = vec![
            format!("connect from {connect}"),
            format!("NOQUEUE: reject: RCPT from {client}: 554 5.7.1 <{mail_from}>: Relay access denied; from=<{mail_from}> to=<{mail_from}> proto=ESMTP helo=<{helo}>"),
            format!("warning: Illegal address syntax from {client} in MAIL command: <{mail_from}>"),
        ];
        let method_ok = !method.is_empty();
        let warned = if method_ok { warned.min(users.len()) } else { 0 };
        for user in users.iter().take(warned) {
            messages.push(format!("warning: {client}: SASL {method} authentication failed: (reason unavailable), sasl_username={user}"));
        }
        let attempts = warned as u32 + extra;
        messages.push(format!("disconnect from {client} ehlo=1{xclient} auth=0/{attempts} rset=1 quit=1 commands=3/{}", attempts + 3));
        let mut total = 0;
        let mut suspicious = false;
        for m in &messages {
            let line = framed(framing, service, pid, m);
            let (n, s) = charged(&mut p, journal.then_some((service, pid, m.as_str())), &line, truth);
            total += n;
            suspicious |= s;
        }
        prop_assert_eq!(total, if via_xclient { 0 } else { attempts });
        prop_assert_eq!(p.pending(), 0);
        prop_assert_eq!(p.sessions(), 0);
        if warned > 0 && !via_xclient && (users.iter().take(warned).any(|u| u.contains("rip=") || u.contains('[')) || method.contains('[')) {
            prop_assert!(suspicious);
        }
    }

    /// Dovecot login processes: a hostile user name (IMAP LOGIN, POP3 USER,
    /// AUTH PLAIN/LOGIN), every framing and variant of the elements: the
    /// true rip is charged N attempts (capped).
    #[test]
    fn dovecot_charges_the_true_rip_exactly(
        truth in true_addr(),
        mapped in any::<bool>(),
        user in hostile(),
        attempts in 1u32..40,
        process in prop::sample::select(vec!["imap-login", "pop3-login", "submission-login", "managesieve-login"]),
        text in prop::sample::select(vec![
            "Disconnected",
            "Disconnected: Aborted login by logging out",
            "Disconnected: Connection closed",
            "Aborted login",
            "Login aborted: Connection closed",
        ]),
        v24 in any::<bool>(),
        method in prop::sample::select(vec!["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]),
        mpid in any::<bool>(),
        secured in prop::sample::select(vec!["", ", secured", ", TLS", ", TLS handshaking"]),
        session in prop::option::of("[A-Za-z0-9+/]{0,16}"),
        framing in 0usize..4,
        pid in 1u32..100_000,
    ) {
        let rip = match truth {
            IpAddr::V4(a) if mapped => format!("::ffff:{a}"),
            a => a.to_string(),
        };
        let reason = if v24 { " (auth_failed)" } else { "" };
        let mpid = if mpid { ", mpid=0" } else { "" };
        let session = session.map(|s| format!(", session=<{s}>")).unwrap_or_default();
        let message = format!(
            "{text} (auth failed, {attempts} attempts in 4 secs){reason}: user=<{user}>, method={method}, rip={rip}, lip=192.0.2.1{mpid}{secured}{session}"
        );
        let mut p = Parser::new();
        let syslog = format!("{process}: {message}");
        let (line, journal) = match framing {
            0 => (format!("Dec  2 01:02:03 mx dovecot: {syslog}"), None),
            1 => (format!("2026-12-02T01:02:03.5+00:00 mx dovecot[{pid}]: {syslog}"), None),
            2 => (format!("Dec 02 01:02:03 {process}: Info: {message}"), None),
            _ => (String::new(), Some(("dovecot", pid, syslog.as_str()))),
        };
        let (n, suspicious) = charged(&mut p, journal, &line, truth);
        prop_assert_eq!(n, attempts.min(MAX_FAILURES_PER_LINE));
        if user.contains("rip=") || user.contains('>') {
            prop_assert!(suspicious);
        }
        // The same user name in lines that are not failures: nobody.
        for other in [
            format!("Dec  2 01:02:03 mx dovecot: {process}: Login: user=<{user}>, method={method}, rip={rip}, lip=192.0.2.1, mpid=7, TLS"),
            format!("Dec  2 01:02:03 mx dovecot: auth: passwd-file({user},{rip}): Password mismatch"),
            format!("Dec 02 01:02:03 auth: Info: passwd-file({user},{rip},<abc>): unknown user"),
        ] {
            prop_assert_eq!(charged(&mut p, None, &other, truth).0, 0);
        }
    }
}
