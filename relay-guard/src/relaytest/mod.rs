//! The open-relay test (SPEC.md "Open-relay test"): connect to an SMTP
//! server as an outside client would, run the 16 relay probes of nmap's
//! smtp-open-relay and Metasploit's smtp_relay (`probes`), each carried to
//! the end of DATA, with STARTTLS where offered, and report each outcome
//! with the server's replies (`report`). The SMTP client is `client`.
//!
//! Its own layer, beside `kernel` and below `agent`: `commands::relaytest`
//! runs it once, `agent::relaytest` on a schedule. It uses no other module
//! of the crate.
//!
//! Each probe has its own connection (as Metasploit does): a server that
//! drops the session after a refusal, or limits errors per session, still
//! answers every probe. Port 465 is TLS from the first byte (SMTPS); on the
//! other ports STARTTLS is used when the server offers it. A probe that
//! relays delivers to `to_domain` (default `example.net`, reserved by RFC
//! 2606), so even an open relay sends nothing anywhere that reads it.
pub mod client;
pub mod probes;
pub mod report;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use client::{Client, Failure, Reply};
use probes::{Names, Probe};
use report::{Outcome, PortReport, ProbeResult, Report, Step, failure_status};

/// Default recipient domain: reserved (RFC 2606), so a relay delivers nothing.
pub const DEFAULT_TO_DOMAIN: &str = "example.net";
/// Default sender domain: reserved too.
pub const DEFAULT_FROM_DOMAIN: &str = "example.org";
/// Local part of the senders and recipients.
pub const LOCAL_PART: &str = "relaytest";
/// The SMTPS port: TLS at connect, not STARTTLS.
pub const SMTPS_PORT: u16 = 465;

/// What to test and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Host name or address of the server.
    pub host: String,
    pub ports: Vec<u16>,
    pub from_domain: String,
    pub to_domain: String,
    /// Per step (connect, each reply, the TLS handshake).
    pub timeout: Duration,
    /// Ask the server (Postfix `smtpd_authorized_xclient_hosts`) to treat
    /// the session as coming from this address.
    pub xclient: Option<IpAddr>,
}

/// Runs the test on every port (one after another) and returns the report.
/// Never fails: what could not be done is in the report.
pub async fn run(opts: &Options) -> Report {
    let mut report = Report {
        host: opts.host.clone(),
        from_domain: opts.from_domain.clone(),
        to_domain: opts.to_domain.clone(),
        xclient: opts.xclient,
        ports: Vec::new(),
        relayed: 0,
        verdict: "could_not_test",
        warnings: Vec::new(),
    };
    for &port in &opts.ports {
        let p = test_port(opts, port).await;
        if let Some(w) = trust_warning(opts, &p)
            && !report.warnings.contains(&w)
        {
            report.warnings.push(w);
        }
        report.ports.push(p);
    }
    report.finish();
    report
}

/// Why a test from this source address may prove nothing, if it may.
fn trust_warning(opts: &Options, p: &PortReport) -> Option<String> {
    if let Some(x) = opts.xclient {
        if p.xclient_accepted != Some(true) {
            return None;
        }
        return trusted_kind(x, None).map(|why| {
            format!(
                "the XCLIENT address {x} is {why}: the server likely trusts it (mynetworks), so this is not a test from outside"
            )
        });
    }
    let peer = p.address?;
    let Some(local) = p.local_address else {
        // Not connected: the address the kernel would pick is still the
        // peer's own when it is loopback.
        return canonical(peer.ip()).is_loopback().then(|| {
            format!(
                "{} is a loopback address: a server usually trusts its own host (mynetworks), \
                 so a test from here proves little; test from outside, or through XCLIENT (docs/operations.md)",
                peer.ip()
            )
        });
    };
    trusted_kind(local.ip(), Some(peer.ip())).map(|why| {
        format!(
            "the source address {} is {why}: the server likely trusts it (Postfix's default mynetworks does), \
             so a refusal here proves little; test from outside, or through XCLIENT (docs/operations.md)",
            local.ip()
        )
    })
}

fn trusted_kind(src: IpAddr, peer: Option<IpAddr>) -> Option<&'static str> {
    let src = canonical(src);
    let peer = peer.map(canonical);
    if src.is_loopback() {
        return Some("a loopback address");
    }
    if Some(src) == peer {
        return Some("the server's own address (the test runs on the server)");
    }
    match (src, peer) {
        (IpAddr::V4(s), Some(IpAddr::V4(d))) if s.octets()[..3] == d.octets()[..3] => Some("in the server's subnet"),
        (IpAddr::V6(s), Some(IpAddr::V6(d))) if s.segments()[..4] == d.segments()[..4] => {
            Some("in the server's subnet")
        }
        (IpAddr::V4(s), None) if s.is_private() || s.is_link_local() => Some("a private address"),
        (IpAddr::V6(s), None) if s.is_unique_local() || s.is_unicast_link_local() => Some("a private address"),
        _ => None,
    }
}

fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// What the first session on a port learned.
struct Session {
    client: Client,
    greeting: Reply,
    ehlo: Reply,
    /// The name the server gave.
    server_name: String,
}

/// Where a session setup stopped: the stage and the reply or failure.
struct SetupError {
    stage: &'static str,
    status: &'static str,
    detail: String,
    outcome: Outcome,
    greeting: Option<Reply>,
    ehlo: Option<Reply>,
    local: Option<SocketAddr>,
    xclient_refused: bool,
}

impl SetupError {
    fn failure(stage: &'static str, f: &Failure) -> SetupError {
        SetupError {
            stage,
            status: failure_status(f),
            detail: f.to_string(),
            outcome: Outcome::Error,
            greeting: None,
            ehlo: None,
            local: None,
            xclient_refused: false,
        }
    }

    fn reply(stage: &'static str, what: &str, r: &Reply) -> SetupError {
        SetupError {
            stage,
            status: if r.is_transient() { "temporary" } else { "refused" },
            detail: format!("{what}: {}", r.one_line()),
            outcome: if r.is_transient() {
                Outcome::Temporary
            } else {
                Outcome::Error
            },
            greeting: None,
            ehlo: None,
            local: None,
            xclient_refused: false,
        }
    }
}

/// Facts about the cleartext session, for the port report.
#[derive(Default)]
struct Offers {
    starttls: bool,
    auth_before_starttls: bool,
}

/// Connects, reads the greeting, EHLO, STARTTLS when offered, XCLIENT when
/// asked (then EHLO again): a session ready for MAIL FROM.
async fn open(opts: &Options, addr: SocketAddr, offers: &mut Offers) -> Result<Session, Box<SetupError>> {
    let implicit = addr.port() == SMTPS_PORT;
    let helo = opts.from_domain.as_str();
    let mut c = client::connect(addr, opts.timeout, implicit, &opts.host)
        .await
        .map_err(|f| {
            let stage = if matches!(f, Failure::Tls(_)) { "tls" } else { "connect" };
            Box::new(SetupError::failure(stage, &f))
        })?;
    let local = c.local;
    let with = |mut e: SetupError, g: Option<&Reply>, h: Option<&Reply>| {
        e.local = Some(local);
        e.greeting = g.cloned();
        e.ehlo = h.cloned();
        Box::new(e)
    };
    let greeting = c
        .read_reply("the greeting")
        .await
        .map_err(|f| with(SetupError::failure("greeting", &f), None, None))?;
    if greeting.code != 220 {
        return Err(with(
            SetupError::reply("greeting", "greeting", &greeting),
            Some(&greeting),
            None,
        ));
    }
    let ehlo_line = format!("EHLO {helo}");
    let mut ehlo = c
        .command(&ehlo_line)
        .await
        .map_err(|f| with(SetupError::failure("ehlo", &f), Some(&greeting), None))?;
    if !ehlo.is_positive() {
        return Err(with(
            SetupError::reply("ehlo", "EHLO", &ehlo),
            Some(&greeting),
            Some(&ehlo),
        ));
    }
    let first_ehlo = ehlo.clone();
    if !implicit {
        offers.starttls = ehlo.offers("STARTTLS");
        offers.auth_before_starttls = ehlo.keywords().iter().any(|k| k == "AUTH" || k.starts_with("AUTH="));
    }
    if !implicit && offers.starttls {
        let r = c
            .command("STARTTLS")
            .await
            .map_err(|f| with(SetupError::failure("starttls", &f), Some(&greeting), Some(&first_ehlo)))?;
        if r.code != 220 {
            return Err(with(
                SetupError::reply("starttls", "STARTTLS", &r),
                Some(&greeting),
                Some(&first_ehlo),
            ));
        }
        c.start_tls(&opts.host)
            .await
            .map_err(|f| with(SetupError::failure("starttls", &f), Some(&greeting), Some(&first_ehlo)))?;
        ehlo = c
            .command(&ehlo_line)
            .await
            .map_err(|f| with(SetupError::failure("ehlo", &f), Some(&greeting), Some(&first_ehlo)))?;
        if !ehlo.is_positive() {
            return Err(with(
                SetupError::reply("ehlo", "EHLO after STARTTLS", &ehlo),
                Some(&greeting),
                Some(&first_ehlo),
            ));
        }
    }
    if let Some(x) = opts.xclient {
        let refused = |detail: String| {
            let mut e = SetupError {
                stage: "xclient",
                status: "xclient_refused",
                detail,
                outcome: Outcome::Error,
                greeting: None,
                ehlo: None,
                local: None,
                xclient_refused: true,
            };
            e.local = Some(local);
            e.greeting = Some(greeting.clone());
            e.ehlo = Some(first_ehlo.clone());
            Box::new(e)
        };
        if !ehlo.offers("XCLIENT") {
            return Err(refused(format!(
                "the server does not offer XCLIENT to {} (Postfix: add it to smtpd_authorized_xclient_hosts), \
                 so the test cannot look from outside",
                local.ip()
            )));
        }
        let addr = match canonical(x) {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("IPV6:{a}"),
        };
        let r = c
            .command(&format!("XCLIENT ADDR={addr} NAME=[UNAVAILABLE]"))
            .await
            .map_err(|f| with(SetupError::failure("xclient", &f), Some(&greeting), Some(&first_ehlo)))?;
        if r.code != 220 {
            return Err(refused(format!("XCLIENT refused: {}", r.one_line())));
        }
        ehlo = c
            .command(&ehlo_line)
            .await
            .map_err(|f| with(SetupError::failure("ehlo", &f), Some(&greeting), Some(&first_ehlo)))?;
        if !ehlo.is_positive() {
            return Err(with(
                SetupError::reply("ehlo", "EHLO after XCLIENT", &ehlo),
                Some(&greeting),
                Some(&first_ehlo),
            ));
        }
    }
    let server_name = greeting
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .or_else(|| ehlo.lines.first().and_then(|l| l.split_whitespace().next()))
        .filter(|n| !n.is_empty() && n.chars().all(|ch| ch.is_ascii_alphanumeric() || ".-".contains(ch)))
        .unwrap_or(&opts.host)
        .to_string();
    Ok(Session {
        client: c,
        greeting,
        ehlo: first_ehlo,
        server_name,
    })
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(mut addrs) => addrs.next().ok_or_else(|| format!("{host} has no address")),
        Err(e) => Err(format!("cannot resolve {host}: {e}")),
    }
}

async fn test_port(opts: &Options, port: u16) -> PortReport {
    let mut p = PortReport {
        port,
        address: None,
        local_address: None,
        status: "tested",
        problem: None,
        greeting: None,
        ehlo: None,
        tls: false,
        implicit_tls: port == SMTPS_PORT,
        starttls_offered: false,
        auth_before_starttls: false,
        xclient_accepted: None,
        probes: Vec::new(),
        relayed: 0,
        rcpt_accepted: 0,
    };
    let addr = match resolve(&opts.host, port).await {
        Ok(a) => a,
        Err(e) => {
            p.status = "unreachable";
            p.problem = Some(e);
            return p;
        }
    };
    p.address = Some(addr);
    let mut offers = Offers::default();
    let first = open(opts, addr, &mut offers).await;
    p.starttls_offered = offers.starttls;
    p.auth_before_starttls = offers.auth_before_starttls;
    let session = match first {
        Ok(s) => s,
        Err(e) => {
            p.status = e.status;
            p.problem = Some(format!("at {}: {}", e.stage, e.detail));
            p.local_address = e.local;
            p.greeting = e.greeting;
            p.ehlo = e.ehlo;
            if opts.xclient.is_some() && e.xclient_refused {
                p.xclient_accepted = Some(false);
            }
            return p;
        }
    };
    p.local_address = Some(session.client.local);
    p.tls = session.client.tls;
    p.greeting = Some(session.greeting.clone());
    p.ehlo = Some(session.ehlo.clone());
    p.xclient_accepted = opts.xclient.map(|_| true);
    let names = Names {
        from: LOCAL_PART,
        from_domain: &opts.from_domain,
        to: LOCAL_PART,
        to_domain: &opts.to_domain,
        server: &session.server_name,
        ip: addr.ip(),
    };
    let list = probes::all(&names);
    session.client.quit().await;
    for probe in list {
        let r = run_probe(opts, addr, probe).await;
        match r.outcome {
            Outcome::Relayed => p.relayed += 1,
            Outcome::RcptAccepted => p.rcpt_accepted += 1,
            _ => {}
        }
        if matches!(r.outcome, Outcome::Temporary | Outcome::Error) && p.status == "tested" {
            p.status = match r.outcome {
                Outcome::Temporary => "temporary",
                _ => "error",
            };
            p.problem = Some(format!("probe #{} at {}: {}", r.probe.number, r.stage, r.detail));
        }
        p.probes.push(r);
    }
    if p.relayed > 0 {
        // Relayed is a finding whatever else happened.
        p.status = "tested";
    }
    p
}

/// One probe on its own connection.
async fn run_probe(opts: &Options, addr: SocketAddr, probe: Probe) -> ProbeResult {
    let mut result = ProbeResult {
        probe,
        outcome: Outcome::Error,
        stage: "connect",
        detail: String::new(),
        transcript: Vec::new(),
    };
    let mut offers = Offers::default();
    let mut c = match open(opts, addr, &mut offers).await {
        Ok(s) => s.client,
        Err(e) => {
            result.outcome = e.outcome;
            result.stage = e.stage;
            result.detail = e.detail;
            return result;
        }
    };
    let mail = format!("MAIL FROM:<{}>", result.probe.mail_from);
    let rcpt = format!("RCPT TO:<{}>", result.probe.rcpt_to);
    let body = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: relay-guard relaytest probe {n}\r\n\r\n\
         An open-relay test by relay-guard (probe {n}: {kind}).\r\n\
         A server that accepts this relays for anyone; the recipient domain is reserved.\r\n",
        from = result.probe.mail_from,
        to = result.probe.rcpt_to,
        n = result.probe.number,
        kind = result.probe.kind,
    );
    let steps: [(&'static str, String); 4] = [
        ("mail", mail),
        ("rcpt", rcpt),
        ("data", "DATA".to_string()),
        ("end_of_data", String::new()),
    ];
    let mut rcpt_ok = false;
    for (stage, line) in steps {
        result.stage = stage;
        let reply = if stage == "end_of_data" {
            c.data_body(&body).await
        } else {
            c.command(&line).await
        };
        let shown = if stage == "end_of_data" {
            "<message>\r\n.".to_string()
        } else {
            line
        };
        let reply = match reply {
            Ok(r) => r,
            Err(f) => {
                result.transcript.push(Step {
                    command: shown,
                    reply: None,
                });
                // No answer (even after the whole message) is not "refused".
                result.outcome = Outcome::Error;
                result.detail = f.to_string();
                return result;
            }
        };
        result.transcript.push(Step {
            command: shown,
            reply: Some(reply.clone()),
        });
        result.detail = reply.one_line();
        let go_on = match stage {
            "data" => reply.code == 354,
            _ => reply.is_positive(),
        };
        if stage == "rcpt" && reply.is_positive() {
            rcpt_ok = true;
        }
        if stage == "end_of_data" && reply.is_positive() {
            result.outcome = Outcome::Relayed;
            c.quit().await;
            return result;
        }
        if !go_on {
            result.outcome = if reply.is_transient() {
                Outcome::Temporary
            } else if rcpt_ok {
                Outcome::RcptAccepted
            } else if reply.code >= 500 {
                Outcome::Refused
            } else {
                // A 2xx/3xx where another code was due: not a refusal.
                Outcome::Error
            };
            c.quit().await;
            return result;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn trusted_sources_are_named() {
        assert_eq!(
            trusted_kind(ip("127.0.0.1"), Some(ip("127.0.0.1"))),
            Some("a loopback address")
        );
        assert_eq!(trusted_kind(ip("::ffff:127.0.0.1"), None), Some("a loopback address"));
        assert!(trusted_kind(ip("203.0.113.1"), Some(ip("203.0.113.1"))).is_some_and(|w| w.contains("own")));
        assert_eq!(
            trusted_kind(ip("203.0.113.2"), Some(ip("203.0.113.1"))),
            Some("in the server's subnet")
        );
        assert_eq!(trusted_kind(ip("198.51.100.7"), Some(ip("203.0.113.1"))), None);
        // An XCLIENT address (no peer to compare with).
        assert_eq!(trusted_kind(ip("10.1.2.3"), None), Some("a private address"));
        assert_eq!(trusted_kind(ip("192.0.2.25"), None), None);
    }

    fn port(status: &'static str, relayed: usize) -> PortReport {
        PortReport {
            port: 25,
            address: None,
            local_address: None,
            status,
            problem: None,
            greeting: None,
            ehlo: None,
            tls: false,
            implicit_tls: false,
            starttls_offered: false,
            auth_before_starttls: false,
            xclient_accepted: None,
            probes: Vec::new(),
            relayed,
            rcpt_accepted: 0,
        }
    }

    /// Relayed wins over could-not-test; a clean exit needs every port tested.
    #[test]
    fn exit_codes() {
        let code = |ports: Vec<PortReport>| {
            let mut r = Report {
                host: "h".into(),
                from_domain: "f".into(),
                to_domain: "t".into(),
                xclient: None,
                ports,
                relayed: 0,
                verdict: "",
                warnings: Vec::new(),
            };
            r.finish();
            r.exit_code()
        };
        assert_eq!(code(vec![port("tested", 0)]), report::EXIT_CLEAN);
        assert_eq!(
            code(vec![port("tested", 2), port("unreachable", 0)]),
            report::EXIT_RELAYED
        );
        assert_eq!(code(vec![port("tested", 0), port("closed", 0)]), report::EXIT_UNTESTED);
        assert_eq!(code(vec![port("temporary", 0)]), report::EXIT_UNTESTED);
        assert_eq!(code(vec![]), report::EXIT_UNTESTED);
    }
}
