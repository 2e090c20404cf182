//! One entry of an allow or deny list (a prefix, its action and where it was
//! written), parsing list lines into entries, and the error every config
//! problem is reported as. The leaf of `config`: it uses no other part of it.
use std::{
    fmt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

/// One config problem: where it is, what the value was, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {what}", file.display())]
pub struct ConfigError {
    /// The config file or the list file the problem is in.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem concerns the whole file.
    pub line: usize,
    /// The message, quoting the offending value.
    pub what: String,
}

/// All problems found in one config, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Whether an entry allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// Where an entry was written, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Shared by every entry of one file (a 1M-line list holds one copy).
    pub file: std::sync::Arc<Path>,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One allow or deny entry of a guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub net: IpNet,
    pub action: Action,
    pub origin: Origin,
}

/// Parses an address or CIDR. A bare address is a /32 or /128. Host bits set
/// is an error that suggests the network form.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Some(net) = parse_net_fast(s) {
        return if net.addr() == net.network() {
            Ok(net)
        } else {
            Err(format!("host bits set; did you mean `{}`?", net.trunc()))
        };
    }
    if let Ok(addr) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    match s.parse::<IpNet>() {
        Ok(net) if net.addr() != net.network() => Err(format!("host bits set; did you mean `{}`?", net.trunc())),
        Ok(net) => Ok(net),
        Err(_) => Err("not an IP address or CIDR".into()),
    }
}

/// The common forms, `ADDR` and `ADDR/LEN` with LEN plain decimal, without
/// ipnet's slower general parser (a 1M-line list spends most of its load
/// time here). `None`: anything else, left to the general parser.
pub(super) fn parse_net_fast(s: &str) -> Option<IpNet> {
    let (addr, len) = match s.split_once('/') {
        None => return s.parse::<std::net::IpAddr>().ok().map(IpNet::from),
        Some(parts) => parts,
    };
    let plain = !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit());
    if !plain || (len.len() > 1 && len.starts_with('0')) {
        return None;
    }
    let addr = addr.parse::<std::net::IpAddr>().ok()?;
    IpNet::new(addr, len.parse().ok()?).ok()
}

/// Parses a list file: one address or CIDR a line; `#` and `;` start
/// comments (so Spamhaus DROP lines like `1.10.16.0/20 ; SBL256894` load).
pub fn parse_list(file: &Path, text: &str, action: Action) -> (Vec<Entry>, Vec<ConfigError>) {
    parse_list_from(file, text, action, 1)
}

/// [`parse_list`] of a part of a file whose first line is line `first`.
pub fn parse_list_from(file: &Path, text: &str, action: Action, first: usize) -> (Vec<Entry>, Vec<ConfigError>) {
    let shared: std::sync::Arc<Path> = std::sync::Arc::from(file);
    // Sized up front (a 1M-line list must not pass through a doubled Vec),
    // from the lines that can hold an entry, and bounded: a file of comments
    // or blank lines reserves nothing, a huge one grows as it parses.
    let candidates = text
        .lines()
        .filter(|l| l.bytes().next().is_some_and(|b| b.is_ascii_hexdigit() || b == b':'))
        .count();
    let mut entries = Vec::with_capacity(candidates.min(4 << 20));
    let mut errors = Vec::new();
    let mut more = 0usize;
    for (i, line) in text.lines().enumerate() {
        let content = line.split(['#', ';']).next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let origin = Origin {
            file: std::sync::Arc::clone(&shared),
            line: i + first,
        };
        match parse_net(content) {
            Ok(net) => entries.push(Entry { net, action, origin }),
            Err(_) if errors.len() >= MAX_LIST_ERRORS => more += 1,
            Err(why) => errors.push(ConfigError {
                file: origin.file.to_path_buf(),
                line: origin.line,
                what: format!("`{}`: {why}", quoted(content)),
            }),
        }
    }
    if more > 0 {
        errors.push(ConfigError {
            file: file.to_path_buf(),
            line: 0,
            what: format!("... and {more} more lines that are not addresses (is this a list file?)"),
        });
    }
    (entries, errors)
}

/// Errors reported per list file; the rest are counted.
pub(crate) const MAX_LIST_ERRORS: usize = 100;

/// At most 80 characters of `s`, for quoting in an error.
fn quoted(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// A prefix as its text (`198.51.100.0/24`) in serde (`#[serde(with =
/// "crate::config::prefix_text")]`): the ban files and CrowdSec's push queue.
pub mod prefix_text {
    use ipnet::IpNet;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
