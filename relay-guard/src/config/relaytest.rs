//! The `[relaytest]` section: `relay-guard run` tests the host's own SMTP
//! listeners for open relay on a schedule (SPEC.md "Open-relay test").
//!
//! ```toml
//! [relaytest]
//! enabled = true
//! interval = "6h"          # plus a random 0..jitter each time
//! jitter = "30m"
//! ports = [25, 465, 587]
//! target = "127.0.0.1"     # where the listeners are
//! xclient_addr = "192.0.2.25"  # the outside address the server is asked to see ("" = none)
//! from_domain = "example.org"
//! to_domain = "example.net"
//! timeout = "10s"
//! ```
use std::{net::IpAddr, ops::Range, time::Duration};

use serde::Deserialize;
use toml::Spanned;

/// Default `xclient_addr`: a documentation address (RFC 5737), which no
/// sane `mynetworks` contains, so the server judges it as it would a stranger.
pub const DEFAULT_XCLIENT_ADDR: &str = "192.0.2.25";

/// The section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelaytest {
    enabled: Option<Spanned<bool>>,
    interval: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    target: Option<Spanned<String>>,
    xclient_addr: Option<Spanned<String>>,
    from_domain: Option<Spanned<String>>,
    to_domain: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

/// The validated section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relaytest {
    /// Whether `relay-guard run` runs the test at all.
    pub enabled: bool,
    /// Time between runs (the first runs at start).
    pub interval: Duration,
    /// A random delay of up to this is added to each interval, so that many
    /// hosts do not test at the same moment.
    pub jitter: Duration,
    pub ports: Vec<u16>,
    /// The address the listeners are reached at (usually loopback; the
    /// server is asked through XCLIENT to judge the session as from outside).
    pub target: IpAddr,
    /// `None`: no XCLIENT, the test speaks from the host's own address (and
    /// says the result proves little).
    pub xclient_addr: Option<IpAddr>,
    pub from_domain: String,
    pub to_domain: String,
    /// Per step of a session.
    pub timeout: Duration,
}

impl Default for Relaytest {
    fn default() -> Self {
        Relaytest {
            enabled: false,
            interval: Duration::from_secs(6 * 3600),
            jitter: Duration::from_secs(30 * 60),
            ports: super::DEFAULT_PORTS.to_vec(),
            target: IpAddr::from([127, 0, 0, 1]),
            xclient_addr: DEFAULT_XCLIENT_ADDR.parse().ok(),
            from_domain: "example.org".into(),
            to_domain: "example.net".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// `"90s"`, `"10m"`, `"6h"`, `"1d"`, `"500ms"` (a whole number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (a whole number and a unit: ms, s, m, h, d; e.g. \"6h\")"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d; e.g. \"6h\")"
            ));
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// A domain for the probe addresses: letters, digits, `-` and `.`.
fn domain_ok(d: &str) -> bool {
    !d.is_empty() && d.len() < 254 && d.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
}

/// Validates the section; each problem goes to `err` (span, message).
pub(super) fn validate(raw: RawRelaytest, err: &mut dyn FnMut(&Range<usize>, String)) -> Relaytest {
    let mut r = Relaytest {
        enabled: raw.enabled.as_ref().is_some_and(|e| *e.get_ref()),
        ..Relaytest::default()
    };
    let mut duration = |v: &Option<Spanned<String>>, key: &str, min: Duration, into: &mut Duration| {
        if let Some(v) = v {
            match parse_duration(v.get_ref()) {
                Ok(d) if d >= min => *into = d,
                Ok(_) => err(
                    &v.span(),
                    format!("relaytest.{key}: `{}` is shorter than {min:?}", v.get_ref()),
                ),
                Err(e) => err(&v.span(), format!("relaytest.{key}: {e}")),
            }
        }
    };
    duration(&raw.interval, "interval", Duration::from_secs(60), &mut r.interval);
    duration(&raw.jitter, "jitter", Duration::ZERO, &mut r.jitter);
    duration(&raw.timeout, "timeout", Duration::from_millis(100), &mut r.timeout);
    if let Some(ports) = &raw.ports {
        let mut list = Vec::new();
        if ports.get_ref().is_empty() {
            err(&ports.span(), "relaytest.ports: at least one port is required".into());
        }
        for p in ports.get_ref() {
            match u16::try_from(*p.get_ref()) {
                Ok(n) if n > 0 => {
                    if !list.contains(&n) {
                        list.push(n);
                    }
                }
                _ => err(
                    &p.span(),
                    format!("relaytest.ports: `{}` is not a TCP port (1-65535)", p.get_ref()),
                ),
            }
        }
        r.ports = list;
    }
    if let Some(t) = &raw.target {
        match t.get_ref().parse::<IpAddr>() {
            Ok(a) => r.target = a,
            Err(_) => err(
                &t.span(),
                format!("relaytest.target: `{}` is not an IP address", t.get_ref()),
            ),
        }
    }
    if let Some(x) = &raw.xclient_addr {
        r.xclient_addr = match x.get_ref().as_str() {
            "" => None,
            s => match s.parse::<IpAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    err(
                        &x.span(),
                        format!("relaytest.xclient_addr: `{s}` is not an IP address (or \"\" for no XCLIENT)"),
                    );
                    None
                }
            },
        };
    }
    for (v, key, into) in [
        (&raw.from_domain, "from_domain", &mut r.from_domain),
        (&raw.to_domain, "to_domain", &mut r.to_domain),
    ] {
        if let Some(v) = v {
            if domain_ok(v.get_ref()) {
                *into = v.get_ref().clone();
            } else {
                err(
                    &v.span(),
                    format!("relaytest.{key}: `{}` is not a domain name", v.get_ref()),
                );
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    const BASE: &str = "interfaces = [\"eth0\"]\n[[guard]]\nallow = [\"192.0.2.1\"]\n";

    fn parse(section: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
        crate::config::Config::parse(
            std::path::Path::new("/nonexistent/rg.toml"),
            &format!("{BASE}{section}"),
        )
    }

    #[test]
    fn section_defaults_and_values() {
        let c = parse("").expect("valid");
        assert!(!c.relaytest.enabled);
        assert_eq!(c.relaytest.ports, vec![25, 465, 587]);
        assert_eq!(c.relaytest.xclient_addr, Some("192.0.2.25".parse().expect("ip")));
        let c = parse("[relaytest]\nenabled = true\ninterval = \"2h\"\nports = [587]\nxclient_addr = \"\"\n")
            .expect("valid");
        assert!(c.relaytest.enabled);
        assert_eq!(c.relaytest.interval, std::time::Duration::from_secs(7200));
        assert_eq!(c.relaytest.ports, vec![587]);
        assert_eq!(c.relaytest.xclient_addr, None);
    }

    /// Every bad value is reported, each with its line and value.
    #[test]
    fn section_errors_name_line_and_value() {
        let e = parse(
            "[relaytest]\ninterval = \"6x\"\nports = [0]\ntarget = \"localhost\"\nxclient_addr = \"outside\"\nto_domain = \"a b\"\n",
        )
        .expect_err("invalid")
        .0;
        let got: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.what.as_str())).collect();
        assert_eq!(got.len(), 5, "{got:#?}");
        for (line, what) in [
            (5, "relaytest.interval: `6x`"),
            (6, "relaytest.ports: `0`"),
            (7, "relaytest.target: `localhost`"),
            (8, "relaytest.xclient_addr: `outside`"),
            (9, "relaytest.to_domain: `a b`"),
        ] {
            assert!(
                got.iter().any(|(l, w)| *l == line && w.contains(what)),
                "{what} at line {line}: {got:#?}"
            );
        }
        assert!(parse("[relaytest]\nbogus = 1\n").is_err(), "unknown keys are errors");
        assert!(
            parse("[relaytest]\ninterval = \"10s\"\n").is_err(),
            "an interval under a minute"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("6h"), Ok(std::time::Duration::from_secs(21600)));
        assert_eq!(parse_duration("90s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(std::time::Duration::from_millis(500)));
        assert!(parse_duration("6").expect_err("no unit").contains("unknown unit"));
        assert!(parse_duration("h").expect_err("no number").contains("not a duration"));
        assert!(parse_duration("-1h").is_err());
    }
}
