//! What a relay test found: per port and per probe, with the server's
//! replies; the human text, and the exit status.
use std::{fmt::Write as _, net::SocketAddr};

use serde::Serialize;

use super::{
    client::{Failure, Reply},
    probes::Probe,
};

/// Exit status: nothing was relayed and every probe got a definite answer.
pub const EXIT_CLEAN: i32 = 0;
/// Exit status: at least one probe was relayed (250 after DATA).
pub const EXIT_RELAYED: i32 = 3;
/// Exit status: nothing was relayed, but some port or probe could not be
/// tested (closed, unreachable, timeout, TLS error, 4xx, XCLIENT refused).
pub const EXIT_UNTESTED: i32 = 4;

/// The whole test.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub host: String,
    pub from_domain: String,
    pub to_domain: String,
    /// The client address given to the server through XCLIENT, if any.
    pub xclient: Option<std::net::IpAddr>,
    pub ports: Vec<PortReport>,
    /// Probes relayed, all ports.
    pub relayed: usize,
    /// `relayed`, `not_relayed` or `could_not_test`.
    pub verdict: &'static str,
    /// Things that make the result less telling (a trusted source address).
    pub warnings: Vec<String>,
}

/// One port.
#[derive(Debug, Clone, Serialize)]
pub struct PortReport {
    pub port: u16,
    pub address: Option<SocketAddr>,
    /// The client's address on the connection.
    pub local_address: Option<SocketAddr>,
    /// `tested` (every probe answered), or why not: `closed`,
    /// `unreachable`, `timeout`, `tls`, `temporary`, `refused`,
    /// `xclient_refused`, `protocol`.
    pub status: &'static str,
    /// What stopped the test, when `status` is not `tested`.
    pub problem: Option<String>,
    pub greeting: Option<Reply>,
    /// The first EHLO reply (before any STARTTLS).
    pub ehlo: Option<Reply>,
    /// Whether the session was encrypted (STARTTLS, or TLS at once on 465).
    pub tls: bool,
    pub implicit_tls: bool,
    pub starttls_offered: bool,
    /// AUTH offered on the unencrypted session (before STARTTLS).
    pub auth_before_starttls: bool,
    /// Whether XCLIENT was accepted (when one was asked for).
    pub xclient_accepted: Option<bool>,
    pub probes: Vec<ProbeResult>,
    pub relayed: usize,
    pub rcpt_accepted: usize,
}

/// How a probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 2xx after the end of DATA: the server took the message.
    Relayed,
    /// 2xx to RCPT, but the message was refused (5xx) at DATA or after it.
    RcptAccepted,
    /// Refused (5xx) at MAIL FROM or RCPT TO.
    Refused,
    /// A 4xx (greylisting, rate limit, temporary failure): not tested.
    Temporary,
    /// No reply to judge: connect, TLS, timeout, broken connection.
    Error,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Relayed => "RELAYED",
            Outcome::RcptAccepted => "rcpt accepted, data refused",
            Outcome::Refused => "refused",
            Outcome::Temporary => "temporary failure (not tested)",
            Outcome::Error => "error (not tested)",
        }
    }
}

/// One exchange of a probe's session.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub command: String,
    pub reply: Option<Reply>,
}

/// One probe's result.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    #[serde(flatten)]
    pub probe: Probe,
    pub outcome: Outcome,
    /// Where it ended: `connect`, `greeting`, `ehlo`, `starttls`,
    /// `xclient`, `mail`, `rcpt`, `data`, `end_of_data`.
    pub stage: &'static str,
    /// The deciding reply, or the failure.
    pub detail: String,
    /// The commands after EHLO and their replies.
    pub transcript: Vec<Step>,
}

/// A port's machine-readable reason for a failure.
pub fn failure_status(f: &Failure) -> &'static str {
    match f {
        Failure::Closed => "closed",
        Failure::Unreachable(_) => "unreachable",
        Failure::Timeout(_) => "timeout",
        Failure::Tls(_) => "tls",
        Failure::Protocol(_) => "protocol",
    }
}

impl Report {
    /// The exit status (module constants).
    pub fn exit_code(&self) -> i32 {
        match self.verdict {
            "relayed" => EXIT_RELAYED,
            "not_relayed" => EXIT_CLEAN,
            _ => EXIT_UNTESTED,
        }
    }

    /// Sets `relayed` and `verdict` from the ports.
    pub fn finish(&mut self) {
        self.relayed = self.ports.iter().map(|p| p.relayed).sum();
        self.verdict = if self.relayed > 0 {
            "relayed"
        } else if self.ports.iter().all(|p| p.status == "tested") && !self.ports.is_empty() {
            "not_relayed"
        } else {
            "could_not_test"
        };
    }

    /// The human report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "relay test of {} (senders @{}, recipients @{}{})",
            self.host,
            self.from_domain,
            self.to_domain,
            self.xclient
                .map(|a| format!(", as client {a} through XCLIENT"))
                .unwrap_or_default()
        );
        for w in &self.warnings {
            let _ = writeln!(out, "WARNING: {w}");
        }
        for p in &self.ports {
            let _ = writeln!(out);
            let addr = p.address.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
            let from = p.local_address.map(|a| format!(" from {}", a.ip())).unwrap_or_default();
            let _ = writeln!(out, "port {} ({addr}{from}): {}", p.port, port_summary(p));
            if let Some(g) = &p.greeting {
                let _ = writeln!(out, "  greeting: {}", g.one_line());
            }
            if p.status != "closed" && p.status != "unreachable" {
                let tls = if p.implicit_tls {
                    "TLS at connect (certificate not verified)".to_string()
                } else if p.tls {
                    "STARTTLS used (certificate not verified)".to_string()
                } else if p.starttls_offered {
                    "STARTTLS offered but not used".to_string()
                } else {
                    "no STARTTLS offered: probes sent in cleartext".to_string()
                };
                let _ = writeln!(out, "  {tls}");
                if p.auth_before_starttls {
                    let _ = writeln!(
                        out,
                        "  AUTH OFFERED BEFORE STARTTLS: passwords can be sent in cleartext (Postfix: smtpd_tls_auth_only = yes)"
                    );
                } else if !p.implicit_tls && p.ehlo.is_some() {
                    let _ = writeln!(out, "  AUTH not offered before STARTTLS");
                }
            }
            for r in &p.probes {
                let _ = writeln!(
                    out,
                    "  #{:<2} {:<9} <{}> -> <{}>  {} at {}: {}",
                    r.probe.number,
                    match r.outcome {
                        Outcome::Relayed => "RELAYED",
                        Outcome::RcptAccepted => "RCPT-OK",
                        Outcome::Refused => "refused",
                        Outcome::Temporary => "TEMPFAIL",
                        Outcome::Error => "ERROR",
                    },
                    r.probe.mail_from,
                    r.probe.rcpt_to,
                    r.probe.kind,
                    r.stage,
                    r.detail
                );
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{}",
            match self.verdict {
                "relayed" => format!("OPEN RELAY: {} probe(s) relayed (exit {EXIT_RELAYED})", self.relayed),
                "not_relayed" => format!("not relayed: every probe refused on every port (exit {EXIT_CLEAN})"),
                _ => format!(
                    "COULD NOT TEST every port: nothing relayed, but this is not a clean result (exit {EXIT_UNTESTED})"
                ),
            }
        );
        out
    }
}

fn port_summary(p: &PortReport) -> String {
    let counts = || {
        let refused = p.probes.iter().filter(|r| r.outcome == Outcome::Refused).count();
        format!(
            "{} of {} relayed, {} RCPT accepted, {refused} refused",
            p.relayed,
            p.probes.len(),
            p.rcpt_accepted
        )
    };
    match (p.status, &p.problem) {
        ("tested", _) if p.relayed > 0 => format!("OPEN RELAY: {}", counts()),
        ("tested", _) => format!("closed to relaying: {}", counts()),
        (status, Some(why)) if p.probes.is_empty() => format!("NOT TESTED ({status}): {why}"),
        (status, why) => format!(
            "NOT FULLY TESTED ({status}{}): {}",
            why.as_ref().map(|w| format!(": {w}")).unwrap_or_default(),
            counts()
        ),
    }
}
