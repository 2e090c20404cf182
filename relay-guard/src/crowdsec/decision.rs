//! LAPI's decisions, typed: what `GET /v1/decisions/stream` answers, and
//! what relay-guard takes from it (type `ban`, scopes `Ip` and `Range`, as
//! prefixes: a range is never one address).

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;

use super::duration;

/// One decision as LAPI sends it. Unknown fields are ignored (newer
/// servers add some); missing strings read as empty and are judged below.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Decision {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub origin: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub duration: String,
    #[serde(default)]
    pub scenario: String,
}

/// The stream's answer; LAPI writes an empty list as `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StreamReply {
    #[serde(default, deserialize_with = "null_is_empty")]
    pub new: Vec<Decision>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub deleted: Vec<Decision>,
}

fn null_is_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Decision>, D::Error> {
    Ok(Option::<Vec<Decision>>::deserialize(d)?.unwrap_or_default())
}

/// A decision's scope, as taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Ip,
    Range,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::Range => "range",
        }
    }
}

/// Why a decision is not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// Not `ban` (captcha, throttle, ...).
    Type(String),
    /// Not a scope relay-guard takes, or not one the config takes.
    Scope(String),
    /// The value does not parse for its scope.
    Value(String),
    /// The duration does not parse.
    Duration(String),
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clip = |s: &str| s.chars().take(64).collect::<String>();
        match self {
            Ignored::Type(t) => write!(f, "type `{}` is not ban", clip(t)),
            Ignored::Scope(s) => write!(f, "scope `{}` is not taken", clip(s)),
            Ignored::Value(v) => write!(f, "value `{}` is not an address or prefix of its scope", clip(v)),
            Ignored::Duration(why) => write!(f, "{why}"),
        }
    }
}

/// What a `new` decision asks: ban `net` for `remaining`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub id: i64,
    pub scope: Scope,
    pub net: IpNet,
    /// `None`: over already (zero or negative).
    pub remaining: Option<Duration>,
}

/// IPv4-mapped IPv6 addresses are IPv4 (as the XDP program sees them).
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

impl Decision {
    /// The prefix this decision names, and what remains of it. `scopes`:
    /// which of `Ip`, `Range` the config takes.
    pub fn target(&self, ip: bool, range: bool) -> Result<Target, Ignored> {
        if !self.kind.eq_ignore_ascii_case("ban") {
            return Err(Ignored::Type(self.kind.clone()));
        }
        let scope = if self.scope.eq_ignore_ascii_case("ip") && ip {
            Scope::Ip
        } else if self.scope.eq_ignore_ascii_case("range") && range {
            Scope::Range
        } else {
            return Err(Ignored::Scope(self.scope.clone()));
        };
        let value = self.value.trim();
        let net = match scope {
            Scope::Ip => {
                let a: IpAddr = value.parse().map_err(|_| Ignored::Value(self.value.clone()))?;
                IpNet::from(canonical(a))
            }
            Scope::Range => {
                let n: IpNet = value.parse().map_err(|_| Ignored::Value(self.value.clone()))?;
                match (n, canonical(n.addr())) {
                    (IpNet::V6(v6), IpAddr::V4(a)) if v6.prefix_len() >= 96 => {
                        IpNet::new(IpAddr::V4(a), v6.prefix_len() - 96)
                            .map_err(|_| Ignored::Value(self.value.clone()))?
                    }
                    _ => n,
                }
                .trunc()
            }
        };
        let remaining = if self.duration.is_empty() {
            None
        } else {
            duration::parse(&self.duration).map_err(Ignored::Duration)?.remaining()
        };
        Ok(Target {
            id: self.id,
            scope,
            net,
            remaining,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(kind: &str, scope: &str, value: &str, duration: &str) -> Decision {
        Decision {
            id: 7,
            origin: "cscli".into(),
            kind: kind.into(),
            scope: scope.into(),
            value: value.into(),
            duration: duration.into(),
            scenario: "manual".into(),
        }
    }

    #[test]
    fn crowdsec_stream_replies_parse_with_null_lists() {
        let r: StreamReply = serde_json::from_str(r#"{"new":null,"deleted":null}"#).expect("ok");
        assert_eq!(r, StreamReply::default());
        let r: StreamReply = serde_json::from_str(
            r#"{"deleted":null,"new":[{"duration":"3h59m59.548710872s","id":1,"origin":"cscli","scenario":"manual 'ban' from 'x'","scope":"Ip","type":"ban","value":"192.0.2.20","uuid":"ignored"}]}"#,
        )
        .expect("ok");
        assert_eq!(r.new.len(), 1);
        assert_eq!(r.new[0].id, 1);
        let t = r.new[0].target(true, true).expect("ok");
        assert_eq!(t.net, "192.0.2.20/32".parse::<IpNet>().expect("ok"));
        assert_eq!(t.remaining.expect("ok").as_secs(), 4 * 3600 - 1);
        assert!(serde_json::from_str::<StreamReply>("{\"new\": 5}").is_err());
    }

    #[test]
    fn crowdsec_scopes_and_values() {
        let t = d("ban", "Range", "2001:db8:1:2::/64", "1h")
            .target(true, true)
            .expect("ok");
        assert_eq!(
            (t.scope, t.net),
            (Scope::Range, "2001:db8:1:2::/64".parse().expect("ok"))
        );
        // A range is a prefix, host bits cleared: never one address.
        let t = d("ban", "range", "198.51.100.77/24", "1h")
            .target(true, true)
            .expect("ok");
        assert_eq!(t.net, "198.51.100.0/24".parse::<IpNet>().expect("ok"));
        let t = d("ban", "Ip", "2001:db8::1", "1h").target(true, true).expect("ok");
        assert_eq!(t.net, "2001:db8::1/128".parse::<IpNet>().expect("ok"));
        let t = d("ban", "Ip", "::ffff:192.0.2.9", "1h").target(true, true).expect("ok");
        assert_eq!(t.net, "192.0.2.9/32".parse::<IpNet>().expect("ok"));
        let t = d("ban", "Range", "::ffff:192.0.2.0/120", "1h")
            .target(true, true)
            .expect("ok");
        assert_eq!(t.net, "192.0.2.0/24".parse::<IpNet>().expect("ok"));
        assert_eq!(
            d("ban", "Ip", "192.0.2.1", "-2s")
                .target(true, true)
                .expect("ok")
                .remaining,
            None
        );
        assert!(matches!(
            d("captcha", "Ip", "192.0.2.1", "1h").target(true, true),
            Err(Ignored::Type(_))
        ));
        assert!(matches!(
            d("ban", "Country", "FR", "1h").target(true, true),
            Err(Ignored::Scope(_))
        ));
        assert!(matches!(
            d("ban", "Range", "192.0.2.0/24", "1h").target(true, false),
            Err(Ignored::Scope(_))
        ));
        assert!(matches!(
            d("ban", "Ip", "192.0.2.0/24", "1h").target(true, true),
            Err(Ignored::Value(_))
        ));
        assert!(matches!(
            d("ban", "Ip", "example.org", "1h").target(true, true),
            Err(Ignored::Value(_))
        ));
        assert!(matches!(
            d("ban", "Ip", "192.0.2.1", "4d").target(true, true),
            Err(Ignored::Duration(_))
        ));
    }
}
