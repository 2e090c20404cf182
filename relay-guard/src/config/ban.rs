//! `[[ban]]` sections (SPEC.md "Bans"): failed logins in the mail logs turn
//! into bans that the XDP program enforces. Parsing and validation only;
//! the engine is `policy::bans`.
use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, parse_net};

/// Most `[[ban]]` sections: each is a slot of a fixed array in the kernel's
/// ban entries ([`relay_guard_common::MAX_BANS`]).
pub const MAX_BANS: usize = relay_guard_common::MAX_BANS;
/// Most distinct ports over all `[[ban]]` sections (the ban counters keep
/// one slot per port; slot 0 is "other").
pub const MAX_BAN_PORTS: usize = relay_guard_common::BAN_PORT_SLOTS as usize - 1;
/// Shortest IPv4 ban prefix (a ban sets `2^(24 - len)` bits of the kernel's
/// pre-filter when shorter than /24).
pub const MIN_IPV4_PREFIX: u8 = relay_guard_common::ban::MIN_V4_LEN;
/// Shortest IPv6 ban prefix (the pre-filter hashes the first 48 bits).
pub const MIN_IPV6_PREFIX: u8 = relay_guard_common::ban::MIN_V6_LEN;
/// Shortest `window`, `ban_time`, `--for`.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
/// Longest `ban_time`/`max_ban_time`: ten years.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A `[[ban]]` section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBan {
    name: Option<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    log_files: Vec<Spanned<String>>,
    journal: Option<Spanned<bool>>,
    failures: Option<Spanned<i64>>,
    window: Option<Spanned<String>>,
    ban_time: Option<Spanned<String>>,
    max_ban_time: Option<Spanned<String>>,
    ipv4_prefix: Option<Spanned<i64>>,
    ipv6_prefix: Option<Spanned<i64>>,
    #[serde(default)]
    never: Vec<Spanned<String>>,
    ban_allowed: Option<Spanned<bool>>,
}

/// A validated `[[ban]]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// Label value in metrics (`guard` of `relay_guard_packets_total`,
    /// `ban` elsewhere); `ban<N>` (1-based) when not given.
    pub name: String,
    /// Sorted, unique: where a banned source is dropped (guarded or not).
    pub ports: Vec<u16>,
    /// Postfix and Dovecot logs to follow (absolute, or relative to the
    /// config file's directory).
    pub log_files: Vec<PathBuf>,
    /// Follow the systemd journal too.
    pub journal: bool,
    /// This many failures from one source within `window` ban it.
    pub failures: u32,
    pub window: Duration,
    /// The first ban; each new ban of the same source doubles it ...
    pub ban_time: Duration,
    /// ... up to this.
    pub max_ban_time: Duration,
    /// The prefix length that makes "one source".
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Never banned, whatever the logs or the CLI say.
    pub never: Vec<IpNet>,
    /// Log-fed bans may hit an address that a guard covering one of
    /// `ports` allows explicitly (an allow entry other than `0.0.0.0/0` or
    /// `::/0`). Off by default: such addresses are never banned from the
    /// logs (manual `relay-guard ban` still bans them).
    pub ban_allowed: bool,
}

impl Ban {
    /// Defaults of SPEC.md "Bans", for a section named `name`.
    pub fn with_defaults(name: &str) -> Ban {
        Ban {
            name: name.to_string(),
            ports: super::DEFAULT_PORTS.to_vec(),
            log_files: Vec::new(),
            journal: false,
            failures: 5,
            window: Duration::from_secs(600),
            ban_time: Duration::from_secs(3600),
            max_ban_time: Duration::from_secs(7 * 86_400),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            never: Vec::new(),
            ban_allowed: false,
        }
    }

    /// Whether `net` lies in or contains a `never` entry.
    pub fn touches_never(&self, net: &IpNet) -> bool {
        self.never.iter().any(|n| n.contains(net) || net.contains(n))
    }
}

/// Parses a duration as `10m`, `1h`, `1w`, `90s`, `1h 30m` (humantime's
/// units); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. \"90s\", \"10m\", \"1h\", \"1d\", \"1w\")"))
}

/// Validates every `[[ban]]` section; each problem goes to `errors`, with
/// the line `line_of` gives its span.
pub(super) fn validate_bans(
    raw: &[Spanned<RawBan>],
    config_path: &Path,
    line_of: &dyn Fn(usize) -> usize,
    errors: &mut Vec<ConfigError>,
) -> Vec<Ban> {
    let mut report = Report {
        config_path,
        line_of,
        errors,
    };
    if raw.len() > MAX_BANS {
        report.err(
            &raw[MAX_BANS].span(),
            format!("too many [[ban]] sections: {} (at most {MAX_BANS})", raw.len()),
        );
    }
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut all_ports: Vec<u16> = Vec::new();
    let mut bans = Vec::new();
    for (i, section) in raw.iter().enumerate() {
        let (r, span) = (section.get_ref(), section.span());
        let name = report.name(r, i, &span, &mut names);
        let mut ban = Ban::with_defaults(&name);
        report.ports(r, &span, &mut ban, &mut all_ports);
        report.log_files(r, config_path.parent().unwrap_or(Path::new(".")), &mut ban);
        ban.journal = r.journal.as_ref().is_some_and(|j| *j.get_ref());
        ban.ban_allowed = r.ban_allowed.as_ref().is_some_and(|j| *j.get_ref());
        report.thresholds(r, &span, &mut ban);
        report.never(r, &mut ban);
        bans.push(ban);
    }
    bans
}

/// Where the `[[ban]]` sections' problems go, each with the config's file
/// and the line of its span.
struct Report<'a> {
    config_path: &'a Path,
    line_of: &'a dyn Fn(usize) -> usize,
    errors: &'a mut Vec<ConfigError>,
}

impl Report<'_> {
    fn err(&mut self, span: &Range<usize>, what: String) {
        self.errors.push(ConfigError {
            file: self.config_path.to_path_buf(),
            line: (self.line_of)(span.start),
            what,
        });
    }

    /// The section's name (`ban<N>` when not given), unique among `names`.
    fn name(&mut self, r: &RawBan, i: usize, span: &Range<usize>, names: &mut BTreeMap<String, usize>) -> String {
        let name = match &r.name {
            Some(n) => {
                let name = n.get_ref().clone();
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    self.err(
                        &n.span(),
                        format!("ban name `{name}` must be 1 to 64 ASCII letters, digits, `-`, `_` or `.`"),
                    );
                }
                name
            }
            None => format!("ban{}", i + 1),
        };
        let name_span = r.name.as_ref().map_or(span.clone(), |n| n.span());
        if let Some(first) = names.get(&name) {
            self.err(
                &name_span,
                format!("ban name `{name}` is used twice (first at line {first})"),
            );
        } else {
            names.insert(name.clone(), (self.line_of)(name_span.start));
        }
        name
    }

    /// The section's ports, sorted and unique; at most [`MAX_BAN_PORTS`]
    /// over every section (`all_ports`).
    fn ports(&mut self, r: &RawBan, span: &Range<usize>, ban: &mut Ban, all_ports: &mut Vec<u16>) {
        let name = ban.name.clone();
        if let Some(list) = &r.ports {
            ban.ports.clear();
            if list.get_ref().is_empty() {
                self.err(&list.span(), format!("ban `{name}`: ports is empty"));
            }
            for p in list.get_ref() {
                match u16::try_from(*p.get_ref()) {
                    Ok(port) if port > 0 => ban.ports.push(port),
                    _ => self.err(
                        &p.span(),
                        format!("ban `{name}`: port `{}` is not in 1..=65535", p.get_ref()),
                    ),
                }
            }
            ban.ports.sort_unstable();
            ban.ports.dedup();
        }
        for &p in &ban.ports {
            if !all_ports.contains(&p) {
                all_ports.push(p);
                if all_ports.len() == MAX_BAN_PORTS + 1 {
                    let span = r.ports.as_ref().map_or(span.clone(), |p| p.span());
                    self.err(
                        &span,
                        format!("ban `{name}`: more than {MAX_BAN_PORTS} distinct ports over all [[ban]] sections"),
                    );
                }
            }
        }
    }

    /// The section's log files, relative to `base` (the config's
    /// directory), each once.
    fn log_files(&mut self, r: &RawBan, base: &Path, ban: &mut Ban) {
        let name = ban.name.clone();
        for f in &r.log_files {
            if f.get_ref().trim().is_empty() {
                self.err(&f.span(), format!("ban `{name}`: log_files entry is empty"));
                continue;
            }
            let p = Path::new(f.get_ref());
            let p = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
            if ban.log_files.contains(&p) {
                self.err(
                    &f.span(),
                    format!("ban `{name}`: log file `{}` is listed twice", f.get_ref()),
                );
            } else {
                ban.log_files.push(p);
            }
        }
    }

    /// `failures`, the durations (`window`, `ban_time`, `max_ban_time`)
    /// and the prefix lengths a ban covers.
    fn thresholds(&mut self, r: &RawBan, span: &Range<usize>, ban: &mut Ban) {
        let name = ban.name.clone();
        if let Some(f) = &r.failures {
            match u32::try_from(*f.get_ref()) {
                Ok(n) if (1..=1_000_000).contains(&n) => ban.failures = n,
                _ => self.err(
                    &f.span(),
                    format!("ban `{name}`: failures `{}` is not in 1..=1000000", f.get_ref()),
                ),
            }
        }
        self.duration(&name, "window", &r.window, &mut ban.window);
        let a = self.duration(&name, "ban_time", &r.ban_time, &mut ban.ban_time);
        let b = self.duration(&name, "max_ban_time", &r.max_ban_time, &mut ban.max_ban_time);
        if a && b && r.max_ban_time.is_none() && ban.ban_time > ban.max_ban_time {
            // Only ban_time given, longer than the default cap: the cap follows.
            ban.max_ban_time = ban.ban_time;
        } else if a && b && ban.ban_time > ban.max_ban_time {
            let at = r.ban_time.as_ref().map_or(span.clone(), |v| v.span());
            self.err(
                &at,
                format!(
                    "ban `{name}`: ban_time ({}) is longer than max_ban_time ({})",
                    humantime::format_duration(ban.ban_time),
                    humantime::format_duration(ban.max_ban_time)
                ),
            );
        }
        for (key, v, min, max, into) in [
            (
                "ipv4_prefix",
                &r.ipv4_prefix,
                MIN_IPV4_PREFIX,
                32u8,
                &mut ban.ipv4_prefix,
            ),
            (
                "ipv6_prefix",
                &r.ipv6_prefix,
                MIN_IPV6_PREFIX,
                128u8,
                &mut ban.ipv6_prefix,
            ),
        ] {
            if let Some(v) = v {
                match u8::try_from(*v.get_ref()) {
                    Ok(n) if (min..=max).contains(&n) => *into = n,
                    _ => self.err(
                        &v.span(),
                        format!("ban `{name}`: {key} `{}` is not in {min}..={max}", v.get_ref()),
                    ),
                }
            }
        }
    }

    /// Reads duration `key` (`v`, when given) into `into`; false when it is
    /// given and invalid.
    fn duration(&mut self, name: &str, key: &str, v: &Option<Spanned<String>>, into: &mut Duration) -> bool {
        let Some(v) = v else { return true };
        match parse_duration(v.get_ref()) {
            Ok(d) if (MIN_DURATION..=MAX_DURATION).contains(&d) => {
                *into = d;
                true
            }
            Ok(_) => {
                self.err(
                    &v.span(),
                    format!("ban `{name}`: {key} `{}` is not between 1s and 10 years", v.get_ref()),
                );
                false
            }
            Err(why) => {
                self.err(
                    &v.span(),
                    format!("ban `{name}`: {key} `{}` is not a duration: {why}", v.get_ref()),
                );
                false
            }
        }
    }

    /// The section's `never` entries, each once.
    fn never(&mut self, r: &RawBan, ban: &mut Ban) {
        for s in &r.never {
            match parse_net(s.get_ref()) {
                Ok(net) => {
                    if !ban.never.contains(&net) {
                        ban.never.push(net);
                    }
                }
                Err(why) => self.err(
                    &s.span(),
                    format!("ban `{}`: never entry `{}`: {why}", ban.name, s.get_ref()),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Config;

    const HEAD: &str = "interfaces = [\"eth0\"]\n[[guard]]\nallow = [\"192.0.2.0/24\"]\n";

    fn parse(ban: &str) -> Result<Config, crate::config::ConfigErrors> {
        Config::parse(
            &PathBuf::from("/nonexistent/rg-ban/relay-guard.toml"),
            &format!("{HEAD}{ban}"),
        )
    }

    #[test]
    fn spec_example_parses() {
        let c = parse(
            "[[ban]]\nname = \"sasl\"\nports = [25, 465, 587, 993]\nlog_files = [\"/var/log/mail.log\"]\njournal = false\nfailures = 5\nwindow = \"10m\"\nban_time = \"1h\"\nmax_ban_time = \"1w\"\nipv4_prefix = 32\nipv6_prefix = 64\nnever = [\"192.0.2.0/24\"]\n",
        )
        .expect("valid");
        let b = &c.bans[0];
        assert_eq!(b.name, "sasl");
        assert_eq!(b.ports, [25, 465, 587, 993]);
        assert_eq!(b.window, Duration::from_secs(600));
        assert_eq!(b.ban_time, Duration::from_secs(3600));
        assert_eq!(b.max_ban_time, Duration::from_secs(7 * 86_400));
        assert_eq!(b.never, ["192.0.2.0/24".parse::<IpNet>().expect("net")]);
        assert_eq!(b.log_files, [PathBuf::from("/var/log/mail.log")]);
        assert!(!b.ban_allowed, "ban_allowed is off by default");
        let c = parse("[[ban]]\nban_allowed = true\n").expect("valid");
        assert!(c.bans[0].ban_allowed);
        let e = errors("[[ban]]\nban_allowed = \"yes\"\n");
        assert!(
            e.iter().any(|(l, w)| *l == 5 && w.contains("expected a boolean")),
            "{e:?}"
        );
    }

    #[test]
    fn defaults_and_relative_log_files() {
        let c = parse("[[ban]]\nlog_files = [\"mail.log\"]\n").expect("valid");
        let b = &c.bans[0];
        assert_eq!(b.name, "ban1");
        assert_eq!(b.ports, [25, 465, 587]);
        assert_eq!((b.failures, b.ipv4_prefix, b.ipv6_prefix), (5, 32, 64));
        assert_eq!(b.log_files, [PathBuf::from("/nonexistent/rg-ban/mail.log")]);
    }

    fn errors(ban: &str) -> Vec<(usize, String)> {
        parse(ban)
            .expect_err("invalid")
            .0
            .into_iter()
            .map(|e| (e.line, e.what))
            .collect()
    }

    #[test]
    fn each_bad_value_is_named_with_its_line() {
        let e = errors(
            "[[ban]]\nname = \"a b\"\nfailures = 0\nwindow = \"10 parsecs\"\nipv4_prefix = 33\nipv6_prefix = 16\nnever = [\"192.0.2.1/24\"]\nports = [0]\n",
        );
        let has = |line: usize, needle: &str| e.iter().any(|(l, w)| *l == line && w.contains(needle));
        assert!(has(5, "ban name `a b`"), "{e:?}");
        assert!(has(6, "failures `0`"), "{e:?}");
        assert!(has(7, "window `10 parsecs` is not a duration"), "{e:?}");
        assert!(has(8, "ipv4_prefix `33` is not in 8..=32"), "{e:?}");
        assert!(has(9, "ipv6_prefix `16` is not in 32..=128"), "{e:?}");
        assert!(has(10, "never entry `192.0.2.1/24`: host bits set"), "{e:?}");
        assert!(has(11, "port `0`"), "{e:?}");
    }

    #[test]
    fn ban_time_longer_than_max_and_duplicate_names() {
        let e = errors("[[ban]]\nname = \"x\"\nban_time = \"2w\"\nmax_ban_time = \"1w\"\n[[ban]]\nname = \"x\"\n");
        assert!(
            e.iter()
                .any(|(l, w)| *l == 6 && w.contains("ban_time (14days) is longer than max_ban_time (7days)")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|(l, w)| *l == 9 && w.contains("ban name `x` is used twice (first at line 5)")),
            "{e:?}"
        );
        // Only ban_time given: the cap follows it.
        let c = parse("[[ban]]\nban_time = \"2w\"\n").expect("valid");
        assert_eq!(c.bans[0].max_ban_time, Duration::from_secs(14 * 86_400));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
