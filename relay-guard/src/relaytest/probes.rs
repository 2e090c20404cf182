//! The 16 relay probes of nmap's `smtp-open-relay.nse` (the `tests` table),
//! in its order and with its address forms; Metasploit's `smtp_relay`
//! (`EXTENDED`) runs the same list, which it cites, except that its probe 4
//! sends to `user@[ip]` where nmap sends to `user@domain`: nmap's form is
//! the one kept, since a relay that takes `user@domain` from
//! `user@[ip]` is the finding that matters.
//!
//! `ip` is the server's address as an address literal (`[203.0.113.1]`,
//! `[IPv6:2001:db8::1]`), `server` the name the server gave in its greeting
//! (or EHLO reply), `from`/`to` the local parts and `from_domain`/`to_domain`
//! the domains. Addresses go on the wire exactly as built here: quoted
//! local parts, `%`, `!`, double `@` and source routes are the point.
use std::net::IpAddr;

use serde::Serialize;

/// One probe: the reverse path and forward path, as sent inside `<>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// 1-based, nmap's order.
    pub number: u8,
    /// What the probe tries, in a few words.
    pub kind: &'static str,
    pub mail_from: String,
    pub rcpt_to: String,
}

/// What the probes are built from.
#[derive(Debug, Clone)]
pub struct Names<'a> {
    pub from: &'a str,
    pub from_domain: &'a str,
    pub to: &'a str,
    pub to_domain: &'a str,
    /// The server's name (greeting or EHLO reply).
    pub server: &'a str,
    /// The server's address.
    pub ip: IpAddr,
}

/// `[203.0.113.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3).
pub fn literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("[{a}]"),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{a}]"),
        },
    }
}

/// The 16 probes for `n`.
pub fn all(n: &Names<'_>) -> Vec<Probe> {
    let (from, fd, to, td, srv) = (n.from, n.from_domain, n.to, n.to_domain, n.server);
    let ip = literal(n.ip);
    let lit_from = format!("{from}@{ip}");
    let list: [(&'static str, String, String); 16] = [
        ("null sender", String::new(), format!("{to}@{td}")),
        ("outside sender", format!("{from}@{fd}"), format!("{to}@{td}")),
        (
            "sender at the server's name",
            format!("{from}@{srv}"),
            format!("{to}@{td}"),
        ),
        (
            "sender at the server's address literal",
            lit_from.clone(),
            format!("{to}@{td}"),
        ),
        (
            "percent hack at the address literal",
            lit_from.clone(),
            format!("{to}%{td}@{ip}"),
        ),
        (
            "percent hack at the server's name",
            lit_from.clone(),
            format!("{to}%{td}@{srv}"),
        ),
        ("quoted local part with @", lit_from.clone(), format!("\"{to}@{td}\"")),
        ("quoted local part with %", lit_from.clone(), format!("\"{to}%{td}\"")),
        (
            "double @ at the address literal",
            lit_from.clone(),
            format!("{to}@{td}@{ip}"),
        ),
        (
            "quoted @ at the address literal",
            lit_from.clone(),
            format!("\"{to}@{td}\"@{ip}"),
        ),
        (
            "double @ at the server's name",
            lit_from.clone(),
            format!("{to}@{td}@{srv}"),
        ),
        (
            "source route via the address literal",
            lit_from.clone(),
            format!("@{ip}:{to}@{td}"),
        ),
        (
            "source route via the server's name",
            lit_from.clone(),
            format!("@{srv}:{to}@{td}"),
        ),
        ("bang path", lit_from.clone(), format!("{td}!{to}")),
        (
            "bang path at the address literal",
            lit_from.clone(),
            format!("{td}!{to}@{ip}"),
        ),
        ("bang path at the server's name", lit_from, format!("{td}!{to}@{srv}")),
    ];
    list.into_iter()
        .zip(1u8..)
        .map(|((kind, mail_from, rcpt_to), number)| Probe {
            number,
            kind,
            mail_from,
            rcpt_to,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list matches nmap's table, written out by hand from
    /// scripts/smtp-open-relay.nse (from="antispam", to="relaytest",
    /// domain="nmap.scanme.org" there).
    #[test]
    fn the_sixteen_probes_of_nmap() {
        let n = Names {
            from: "f",
            from_domain: "fd.example",
            to: "t",
            to_domain: "td.example",
            server: "mx.example",
            ip: "192.0.2.1".parse().expect("ip"),
        };
        let got: Vec<(String, String)> = all(&n).into_iter().map(|p| (p.mail_from, p.rcpt_to)).collect();
        let l = "f@[192.0.2.1]";
        let want = [
            ("", "t@td.example"),
            ("f@fd.example", "t@td.example"),
            ("f@mx.example", "t@td.example"),
            (l, "t@td.example"),
            (l, "t%td.example@[192.0.2.1]"),
            (l, "t%td.example@mx.example"),
            (l, "\"t@td.example\""),
            (l, "\"t%td.example\""),
            (l, "t@td.example@[192.0.2.1]"),
            (l, "\"t@td.example\"@[192.0.2.1]"),
            (l, "t@td.example@mx.example"),
            (l, "@[192.0.2.1]:t@td.example"),
            (l, "@mx.example:t@td.example"),
            (l, "td.example!t"),
            (l, "td.example!t@[192.0.2.1]"),
            (l, "td.example!t@mx.example"),
        ];
        assert_eq!(got.len(), 16);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!((g.0.as_str(), g.1.as_str()), w, "probe {}", i + 1);
        }
        assert_eq!(literal("2001:db8::1".parse().expect("ip")), "[IPv6:2001:db8::1]");
    }
}
