//! The TOML configuration of SPEC.md: parsing, list files and validation.
//!
//! Parsing keeps every value's span (`toml::Spanned`) so that each error can
//! name the file, the line and the offending value. Validation is separate
//! from parsing and reports every problem it finds, not only the first.
//!
//! The bottom layer: it owns reading and validating the files (`file`: the
//! config read and parsed as TOML once, and the lenient view of it that
//! callers use before or without validation; `entry`: list lines and the
//! error type; `lists`: the list files and their line index, for delta
//! reloads; `fingerprint`: hashes of the bytes read). It uses no other
//! module of the crate, makes no bpf syscall and holds no state between
//! loads: what the command line overrides is passed to each load as
//! [`LoadOptions`]. Inside it, `mod.rs` uses `file` and `lists`, and
//! `lists` uses only `entry` and `fingerprint`, so there is no import circle.
pub mod ban;
pub mod crowdsec;
mod entry;
mod file;
mod fingerprint;
pub mod lists;
pub mod relaytest;

pub use entry::{Action, ConfigError, ConfigErrors, Entry, Origin, parse_list, parse_list_from, parse_net};
pub(crate) use file::{ConfigFile, read_text};
pub use fingerprint::fingerprint;

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use entry::MAX_LIST_ERRORS;
pub use entry::prefix_text;
use fingerprint::fingerprint_hasher;
use lists::{ListFile, ListIndex};

/// Where the agent looks for its config unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/relay-guard/relay-guard.toml";
/// Default bpffs directory for pinned program, links and maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/relay-guard";
/// Default directory of the last good config and list files (the agent's
/// fallback at start, SPEC.md "Failing safe": Boot).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/relay-guard";
/// Default Prometheus endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:10947";

/// What the command line sets in place of the file, for one load. The
/// agent takes it from `relay-guard run` and hands the same value to every
/// load it does (start, the saved copy, each reload); other loads use
/// [`LoadOptions::default`]: the file as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `relay-guard run --metrics-listen ADDR:PORT`: the metrics address, in
    /// place of the config's `metrics_listen`. A DaemonSet passes the node's
    /// address this way (the downward API's `status.hostIP`), which one
    /// ConfigMap for every node cannot.
    pub metrics_listen: Option<SocketAddr>,
}

/// Ports a guard covers when it names none: SMTP, SMTPS, submission.
pub const DEFAULT_PORTS: [u16; 3] = [25, 465, 587];
/// Guards are bits of a 64-bit mask in the kernel maps.
pub const MAX_GUARDS: usize = relay_guard_common::MAX_GUARDS;

/// What the filter does with a source that is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop it.
    #[default]
    Enforce,
    /// Pass it, but count it as `would_drop`.
    Monitor,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native if the driver supports it, else generic (logged).
    #[default]
    Auto,
    /// Native (driver) mode only; fail if the driver cannot.
    Native,
    /// Generic (skb) mode: works on any interface, after the skb is built.
    Skb,
}

/// `xdp_priority` when not given: ahead of libxdp's default (50), as
/// xdp-filter's own priority (10) is.
pub const DEFAULT_XDP_PRIORITY: u32 = 10;

/// The file as written, with spans. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Spanned<Vec<Spanned<String>>>,
    mode: Option<Spanned<Mode>>,
    xdp_mode: Option<Spanned<XdpMode>>,
    xdp_priority: Option<Spanned<i64>>,
    xdp_dispatcher: Option<bool>,
    metrics_listen: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    #[serde(default)]
    guard: Vec<Spanned<RawGuard>>,
    relaytest: Option<relaytest::RawRelaytest>,
    #[serde(default)]
    ban: Vec<Spanned<ban::RawBan>>,
    crowdsec: Option<Spanned<crowdsec::RawCrowdsec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    name: Option<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    allow_files: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    deny_files: Vec<Spanned<String>>,
}

/// A validated guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// Label value in metrics; `guard<N>` (1-based) when not given.
    pub name: String,
    /// Sorted, unique.
    pub ports: Vec<u16>,
    /// Every entry of `allow`, `allow_files`, `deny` and `deny_files`, deduplicated.
    pub entries: Vec<Entry>,
}

/// A config that passed validation: what the agent applies. `G` is how it
/// holds its guards: with their entries ([`Guard`]), or, once compiled,
/// without ([`RunConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config<G = Guard> {
    /// The file it came from.
    pub path: PathBuf,
    pub interfaces: Vec<String>,
    pub mode: Mode,
    pub xdp_mode: XdpMode,
    /// Run priority in a libxdp dispatcher shared with other XDP programs
    /// (lower runs first; libxdp's default is 50).
    pub xdp_priority: u32,
    /// Attach through a libxdp dispatcher even when relay-guard is alone on
    /// the interface, so that libxdp programs (xdp-filter, xdp-loader) can
    /// join later. Without it relay-guard attaches directly when alone (and
    /// joins a dispatcher that is there).
    pub xdp_dispatcher: bool,
    /// `None` when `metrics_listen = ""`.
    pub metrics_listen: Option<SocketAddr>,
    pub pin_dir: PathBuf,
    /// Where the agent keeps a copy of the last config and list files it
    /// applied, to start from when they are broken at boot.
    pub state_dir: PathBuf,
    pub guards: Vec<G>,
    /// The `[relaytest]` section (defaults, disabled, when absent).
    pub relaytest: relaytest::Relaytest,
    /// The `[[ban]]` sections (SPEC.md "Bans").
    pub bans: Vec<ban::Ban>,
    /// The `[crowdsec]` section (SPEC.md "Fleet-wide bans: CrowdSec").
    pub crowdsec: Option<crowdsec::Crowdsec>,
    /// Every list file read, so a watcher can follow them.
    pub list_files: Vec<PathBuf>,
    /// Hash of the bytes this config was built from (the config text and
    /// each list file, as read), the same as [`crate::config::fingerprint`]
    /// computes: the watcher compares against what was loaded, not against
    /// a later re-read.
    pub fingerprint: u64,
}

/// A guard as the agent keeps it once its entries are compiled: the name
/// (its metrics label) and the ports (which bans it may exempt from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunGuard {
    pub name: String,
    /// Sorted, unique.
    pub ports: Vec<u16>,
}

/// What the agent runs by once a [`Config`] is compiled ([`Config::into_run`]):
/// every setting, and the guards without their entries. The entries live on
/// in the compiled policy and the list index; keeping them here too would
/// hold a 1M-entry list a second time for as long as the agent runs.
pub type RunConfig = Config<RunGuard>;

impl Config {
    /// Reads, parses and validates the config at `path`, with its list
    /// files, as written (no [`LoadOptions`]: what `check-config` and the
    /// other commands judge).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = read_config_text(path)?;
        ConfigFile::parse(path, &text).validate(&LoadOptions::default())
    }

    /// [`Config::load`], also returning what a later reload needs to apply a
    /// list-file edit as a delta (see [`crate::config::lists`]).
    pub fn load_indexed(path: &Path) -> Result<(Config, ListIndex), ConfigErrors> {
        Self::load_indexed_with(path, &LoadOptions::default())
    }

    /// [`Config::load_indexed`] with `options` in place of what they
    /// override: every load the agent does.
    pub fn load_indexed_with(path: &Path, options: &LoadOptions) -> Result<(Config, ListIndex), ConfigErrors> {
        let text = read_config_text(path)?;
        ConfigFile::parse(path, &text).validate_indexed(options)
    }

    /// The settings the agent runs by, once this config is compiled: the
    /// guards' entries are dropped with it (see [`RunConfig`]).
    pub fn into_run(self) -> RunConfig {
        // Every field named twice: a struct update cannot change `G`
        // (type-changing struct update is not stable Rust).
        let Config {
            path,
            interfaces,
            mode,
            xdp_mode,
            xdp_priority,
            xdp_dispatcher,
            metrics_listen,
            pin_dir,
            state_dir,
            guards,
            relaytest,
            bans,
            crowdsec,
            list_files,
            fingerprint,
        } = self;
        RunConfig {
            path,
            interfaces,
            mode,
            xdp_mode,
            xdp_priority,
            xdp_dispatcher,
            metrics_listen,
            pin_dir,
            state_dir,
            guards: guards
                .into_iter()
                .map(|g| RunGuard {
                    name: g.name,
                    ports: g.ports,
                })
                .collect(),
            relaytest,
            bans,
            crowdsec,
            list_files,
            fingerprint,
        }
    }

    /// Parses and validates `text` as if read from `path` (list files are
    /// resolved relative to the config's directory).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        ConfigFile::parse(path, text).validate(&LoadOptions::default())
    }
}

/// [`read_text`], its failure as the one error of a load.
pub(crate) fn read_config_text(path: &Path) -> Result<String, ConfigErrors> {
    read_text(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            what: format!("cannot read config: {e}"),
        }])
    })
}

impl ConfigFile<'_> {
    /// Validates the file, with its list files, and `options` in place of
    /// what they override.
    pub fn validate(&self, options: &LoadOptions) -> Result<Config, ConfigErrors> {
        self.validate_inner(options, false, None).map(|(c, _)| c)
    }

    /// [`ConfigFile::validate`], also returning what a later reload needs
    /// to apply a list-file edit as a delta (see [`crate::config::lists`]).
    pub fn validate_indexed(&self, options: &LoadOptions) -> Result<(Config, ListIndex), ConfigErrors> {
        self.validate_inner(options, true, None)
            .map(|(c, i)| (c, i.expect("indexing was asked for")))
    }

    /// [`ConfigFile::validate_indexed`] of a saved copy: this file's text
    /// stands for the config at its `path`, and each list file it names is
    /// read from its copy in `copies` (original path -> copy). The result
    /// names the original paths (origins, `list_files`, the index), as if
    /// the files there held the saved bytes, so the watcher follows the real
    /// files and a later delta reload compares them with what was applied.
    /// A list file with no copy is an error.
    pub fn validate_saved(
        &self,
        copies: &BTreeMap<PathBuf, PathBuf>,
        options: &LoadOptions,
    ) -> Result<(Config, ListIndex), ConfigErrors> {
        self.validate_inner(options, true, Some(copies))
            .map(|(c, i)| (c, i.expect("indexing was asked for")))
    }

    fn validate_inner(
        &self,
        options: &LoadOptions,
        index: bool,
        copies: Option<&BTreeMap<PathBuf, PathBuf>>,
    ) -> Result<(Config, Option<ListIndex>), ConfigErrors> {
        let (path, text) = (self.path, self.text);
        let mut fp = fingerprint_hasher();
        std::hash::Hash::hash(path, &mut fp);
        std::hash::Hash::hash(text.as_bytes(), &mut fp);
        let mut v = Validator {
            fp,
            path,
            file: std::sync::Arc::from(path),
            text,
            options,
            errors: Vec::new(),
            list_files: Vec::new(),
            copies,
            index: index.then(|| ListIndex {
                config_text: text.as_bytes().to_vec(),
                config_path: Some(std::sync::Arc::from(path)),
                ..ListIndex::default()
            }),
        };
        // The one parse (`ConfigFile`), typed with spans: a syntax error and
        // a value of the wrong type are reported alike.
        let raw = match self.document() {
            Ok(doc) => RawConfig::deserialize(toml::de::Deserializer::from(doc.clone())),
            Err(e) => Err(e.clone()),
        };
        let raw: RawConfig = match raw {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map_or(0, |s| v.line_of(s.start));
                let msg = e.message().trim_end().to_string();
                let what = match e.span() {
                    Some(s) if !text[s.clone()].trim().is_empty() && s.len() < 200 => {
                        format!("{msg}: `{}`", text[s].trim())
                    }
                    _ => msg,
                };
                return Err(ConfigErrors(vec![ConfigError {
                    file: path.to_path_buf(),
                    line,
                    what,
                }]));
            }
        };
        let config = v.validate(raw);
        if v.errors.is_empty() {
            Ok((config, v.index))
        } else {
            v.errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            Err(ConfigErrors(v.errors))
        }
    }
}

struct Validator<'a> {
    /// Hash of the bytes read so far (see [`Config::fingerprint`]).
    fp: foldhash::quality::FoldHasher<'static>,
    path: &'a Path,
    /// `path`, shared by every inline entry's origin.
    file: std::sync::Arc<Path>,
    text: &'a str,
    /// What the command line sets in place of the file.
    options: &'a LoadOptions,
    errors: Vec<ConfigError>,
    list_files: Vec<PathBuf>,
    /// When loading a saved copy: where each list file's bytes are.
    copies: Option<&'a BTreeMap<PathBuf, PathBuf>>,
    /// Built when a reload will want it.
    index: Option<ListIndex>,
}

impl Validator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn origin(&self, span: &Range<usize>) -> Origin {
        Origin {
            file: std::sync::Arc::clone(&self.file),
            line: self.line_of(span.start),
        }
    }

    fn err(&mut self, span: &Range<usize>, what: String) {
        let line = self.line_of(span.start);
        self.errors.push(ConfigError {
            file: self.path.to_path_buf(),
            line,
            what,
        });
    }

    fn validate(&mut self, raw: RawConfig) -> Config {
        let mut interfaces = Vec::new();
        if raw.interfaces.get_ref().is_empty() {
            self.err(
                &raw.interfaces.span(),
                "interfaces: at least one interface is required".into(),
            );
        }
        for ifname in raw.interfaces.get_ref() {
            let name = ifname.get_ref();
            if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
                self.err(
                    &ifname.span(),
                    format!("interfaces: `{name}` is not a valid interface name"),
                );
            } else if interfaces.contains(name) {
                self.err(&ifname.span(), format!("interfaces: `{name}` is listed twice"));
            } else {
                interfaces.push(name.clone());
            }
        }

        let metrics_listen = match &raw.metrics_listen {
            // `run --metrics-listen` wins over the file, whose value is then
            // neither used nor checked.
            _ if self.options.metrics_listen.is_some() => self.options.metrics_listen,
            None => Some(DEFAULT_METRICS_LISTEN.parse().expect("default address parses")),
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => match s.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.err(
                        &s.span(),
                        format!("metrics_listen: `{}` is not ADDRESS:PORT (e.g. \"127.0.0.1:10947\" or \"[::1]:10947\"), or \"\" to disable", s.get_ref()),
                    );
                    None
                }
            },
        };

        let pin_dir = match &raw.pin_dir {
            None => PathBuf::from(DEFAULT_PIN_DIR),
            Some(p) => {
                let dir = PathBuf::from(p.get_ref());
                if let Some(why) = pin_dir_problem(&dir) {
                    self.err(&p.span(), format!("pin_dir: `{}` {why}", p.get_ref()));
                }
                // One spelling: `/x/`, `//x` and `/x/.` are `/x`.
                dir.components().collect()
            }
        };

        let xdp_priority = match &raw.xdp_priority {
            None => DEFAULT_XDP_PRIORITY,
            Some(p) => u32::try_from(*p.get_ref()).unwrap_or_else(|_| {
                self.err(
                    &p.span(),
                    format!("xdp_priority: {} is not between 0 and {}", p.get_ref(), u32::MAX),
                );
                DEFAULT_XDP_PRIORITY
            }),
        };

        let state_dir = match &raw.state_dir {
            None => PathBuf::from(DEFAULT_STATE_DIR),
            Some(p) => {
                let dir = PathBuf::from(p.get_ref());
                if !dir.is_absolute() {
                    self.err(
                        &p.span(),
                        format!("state_dir: `{}` must be an absolute path", p.get_ref()),
                    );
                }
                dir
            }
        };

        if raw.guard.is_empty() {
            self.errors.push(ConfigError {
                file: self.path.to_path_buf(),
                line: 0,
                what: "no [[guard]] defined: nothing would be guarded".into(),
            });
        }
        if raw.guard.len() > MAX_GUARDS {
            self.err(
                &raw.guard[MAX_GUARDS].span(),
                format!("too many guards: {} (at most {MAX_GUARDS})", raw.guard.len()),
            );
        }

        let mut port_owner: BTreeMap<u16, (String, Origin)> = BTreeMap::new();
        let mut names: BTreeMap<String, Origin> = BTreeMap::new();
        let mut guards = Vec::new();
        for (i, g) in raw.guard.iter().enumerate() {
            let guard = self.guard(i, g.get_ref(), &g.span(), &mut port_owner, &mut names);
            guards.push(guard);
        }

        let relaytest = match raw.relaytest {
            Some(r) => relaytest::validate(r, &mut |span, what| self.err(span, what)),
            None => relaytest::Relaytest::default(),
        };
        let line_of = |offset: usize| self.line_of(offset);
        let mut ban_errors = Vec::new();
        let bans = ban::validate_bans(&raw.ban, self.path, &line_of, &mut ban_errors);
        self.errors.extend(ban_errors);
        let crowdsec = raw.crowdsec.as_ref().and_then(|c| {
            let mut errs = Vec::new();
            let v = crowdsec::validate(c, &bans, &|p| self.resolve(p), &mut |span, what| {
                errs.push((span.clone(), what));
            });
            for (span, what) in errs {
                self.err(&span, what);
            }
            v
        });

        Config {
            path: self.path.to_path_buf(),
            interfaces,
            mode: raw.mode.map(|m| *m.get_ref()).unwrap_or_default(),
            xdp_mode: raw.xdp_mode.map(|m| *m.get_ref()).unwrap_or_default(),
            xdp_priority,
            xdp_dispatcher: raw.xdp_dispatcher.unwrap_or(false),
            metrics_listen,
            pin_dir,
            state_dir,
            guards,
            relaytest,
            bans,
            crowdsec,
            list_files: std::mem::take(&mut self.list_files),
            fingerprint: std::hash::Hasher::finish(&self.fp),
        }
    }

    /// Validates one `[[guard]]` section (the `index`th, at `span`): its
    /// name, its ports (each owned by one guard: `port_owner`), and its
    /// entries, inline and from its list files.
    fn guard(
        &mut self,
        index: usize,
        g: &RawGuard,
        span: &Range<usize>,
        port_owner: &mut BTreeMap<u16, (String, Origin)>,
        names: &mut BTreeMap<String, Origin>,
    ) -> Guard {
        let name = self.guard_name(index, g, span, names);
        let ports = self.guard_ports(&name, g, span, port_owner);
        let read = self.guard_entries(index, &name, g);
        let entries = self.sorted_unique(&name, read);
        Guard { name, ports, entries }
    }

    /// The guard's name (`guard<N>` when not given), unique among `names`.
    fn guard_name(
        &mut self,
        index: usize,
        g: &RawGuard,
        span: &Range<usize>,
        names: &mut BTreeMap<String, Origin>,
    ) -> String {
        let name = match &g.name {
            Some(n) => {
                let name = n.get_ref().clone();
                let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    self.err(
                        &n.span(),
                        format!("guard name `{name}` must be non-empty ASCII letters, digits, `-`, `_` or `.`"),
                    );
                }
                name
            }
            None => format!("guard{}", index + 1),
        };
        let name_origin = self.origin(&g.name.as_ref().map_or(span.clone(), |n| n.span()));
        if let Some(first) = names.get(&name) {
            let what = format!("guard name `{name}` is used twice (first at {first})");
            self.errors.push(ConfigError {
                file: name_origin.file.to_path_buf(),
                line: name_origin.line,
                what,
            });
        } else {
            names.insert(name.clone(), name_origin);
        }
        name
    }

    /// The guard's ports (the SMTP ones when not given), sorted and unique,
    /// each claimed in `port_owner`.
    fn guard_ports(
        &mut self,
        name: &str,
        g: &RawGuard,
        span: &Range<usize>,
        port_owner: &mut BTreeMap<u16, (String, Origin)>,
    ) -> Vec<u16> {
        let mut ports = Vec::new();
        match &g.ports {
            None => ports.extend(DEFAULT_PORTS),
            Some(list) if list.get_ref().is_empty() => {
                self.err(&list.span(), format!("guard `{name}`: ports is empty"));
            }
            Some(list) => {
                for p in list.get_ref() {
                    match u16::try_from(*p.get_ref()) {
                        Ok(port) if port > 0 => ports.push(port),
                        _ => self.err(
                            &p.span(),
                            format!("guard `{name}`: port `{}` is not in 1..=65535", p.get_ref()),
                        ),
                    }
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
        let ports_span = g.ports.as_ref().map_or(span.clone(), |p| p.span());
        for &port in &ports {
            let here = self.origin(&ports_span);
            if let Some((owner, at)) = port_owner.get(&port) {
                let what = format!(
                    "port `{port}` of guard `{name}` already belongs to guard `{owner}` ({at}); a port may belong to one guard only"
                );
                self.errors.push(ConfigError {
                    file: here.file.to_path_buf(),
                    line: here.line,
                    what,
                });
            } else {
                port_owner.insert(port, (name.to_string(), here));
            }
        }
        ports
    }

    /// The guard's entries as written: inline allow and deny, then each
    /// list file (read, fingerprinted, and indexed for delta reloads).
    fn guard_entries(&mut self, index: usize, name: &str, g: &RawGuard) -> ReadEntries {
        let mut entries: Vec<Entry> = Vec::new();
        // For the index: which list file each parsed file's origins stand for.
        let mut file_ids: Vec<(std::sync::Arc<Path>, u16)> = Vec::new();
        // The list files in the order read, to order equal networks.
        let mut file_order: Vec<std::sync::Arc<Path>> = Vec::new();
        for (list, action, key) in [(&g.allow, Action::Allow, "allow"), (&g.deny, Action::Deny, "deny")] {
            for s in list {
                match parse_net(s.get_ref()) {
                    Ok(net) => entries.push(Entry {
                        net,
                        action,
                        origin: self.origin(&s.span()),
                    }),
                    Err(why) => self.err(
                        &s.span(),
                        format!("guard `{name}`: {key} entry `{}`: {why}", s.get_ref()),
                    ),
                }
            }
        }
        for (list, action, key) in [
            (&g.allow_files, Action::Allow, "allow_files"),
            (&g.deny_files, Action::Deny, "deny_files"),
        ] {
            for f in list {
                let file = self.resolve(f.get_ref());
                let read = match self.copies {
                    None => read_bounded(&file),
                    Some(copies) => match copies.get(&file) {
                        Some(copy) => read_bounded(copy),
                        None => Err(std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "the saved state has no copy of it",
                        )),
                    },
                };
                std::hash::Hash::hash(file.as_path(), &mut self.fp);
                match &read {
                    Ok(bytes) => std::hash::Hash::hash(bytes.as_slice(), &mut self.fp),
                    Err(e) => std::hash::Hash::hash(&e.kind(), &mut self.fp),
                }
                let read = read.map(|bytes| {
                    let problems = list_bytes_errors(&file, &bytes);
                    if problems.is_empty() {
                        Ok(String::from_utf8(bytes).expect("checked: every line is UTF-8"))
                    } else {
                        Err(problems)
                    }
                });
                match read {
                    Ok(Err(problems)) => self.errors.extend(problems),
                    Ok(Ok(text)) => {
                        let (parsed, errs) = parse_list(&file, &text, action);
                        if let Some(first) = parsed.first() {
                            file_order.push(std::sync::Arc::clone(&first.origin.file));
                        }
                        if let Some(ix) = &mut self.index {
                            let id = u16::try_from(ix.files.len()).unwrap_or(lists::INLINE);
                            if let Some(first) = parsed.first() {
                                file_ids.push((std::sync::Arc::clone(&first.origin.file), id));
                            }
                            ix.files.push(ListFile {
                                path: std::sync::Arc::from(file.as_path()),
                                guard: index,
                                action,
                                bytes: text.into_bytes(),
                            });
                        }
                        if entries.is_empty() {
                            entries = parsed;
                        } else {
                            entries.extend(parsed);
                        }
                        self.errors.extend(errs);
                    }
                    Err(e) => self.err(
                        &f.span(),
                        format!("guard `{name}`: {key} `{}`: cannot read: {e}", f.get_ref()),
                    ),
                }
                self.list_files.push(file);
            }
        }
        ReadEntries {
            entries,
            file_ids,
            file_order,
        }
    }

    /// The entries sorted by network, each network once (in the index,
    /// every occurrence); a network both allowed and denied is an error.
    fn sorted_unique(&mut self, name: &str, read: ReadEntries) -> Vec<Entry> {
        let ReadEntries {
            mut entries,
            file_ids,
            file_order,
        } = read;
        // Same prefix twice: harmless if the same action, an error if not.
        // Equal networks are ordered as they were written (inline allow,
        // inline deny, then each list file by line), so the first occurrence
        // is kept: what a stable sort gives, from an in-place unstable sort
        // (no 1M-entry scratch copy). The dedup is in place too.
        let place = |e: &Entry| -> (usize, usize) {
            let source = match file_order
                .iter()
                .position(|f| std::sync::Arc::ptr_eq(f, &e.origin.file))
            {
                Some(i) => i + 2,
                None => usize::from(e.action == Action::Deny),
            };
            (source, e.origin.line)
        };
        entries.sort_unstable_by(|a, b| a.net.cmp(&b.net).then_with(|| place(a).cmp(&place(b))));
        if let Some(ix) = &mut self.index {
            let all = entries
                .iter()
                .map(|e| {
                    let id = file_ids
                        .iter()
                        .find(|(f, _)| std::sync::Arc::ptr_eq(f, &e.origin.file))
                        .map_or(lists::INLINE, |&(_, id)| id);
                    lists::to_indexed(e, id)
                })
                .collect();
            ix.push_guard(all);
        }
        let mut conflicts = Vec::new();
        entries.dedup_by(|later, kept| {
            if later.net != kept.net {
                return false;
            }
            if later.action != kept.action {
                let (a, d) = if kept.action == Action::Allow {
                    (&*kept, &*later)
                } else {
                    (&*later, &*kept)
                };
                let what = format!(
                    "guard `{name}`: `{}` is both allowed ({}) and denied ({})",
                    later.net, a.origin, d.origin
                );
                conflicts.push(ConfigError {
                    file: later.origin.file.to_path_buf(),
                    line: later.origin.line,
                    what,
                });
            }
            true
        });
        self.errors.extend(conflicts);
        entries.shrink_to_fit();
        entries
    }

    /// List-file paths are relative to the config file's directory.
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// What is wrong with `pin_dir` as written, if anything ("Whose state" in
/// SPEC.md; the filesystem checks are in `kernel::pins::check_pin_dir`).
pub fn pin_dir_problem(dir: &Path) -> Option<String> {
    use std::path::Component;
    if !dir.is_absolute() {
        return Some(
            "must be an absolute path: a directory of its own on a bpffs (e.g. /sys/fs/bpf/relay-guard)".into(),
        );
    }
    if dir.components().any(|c| c == Component::ParentDir) {
        return Some("must not contain `..`".into());
    }
    let normal = dir.components().filter(|c| matches!(c, Component::Normal(_))).count();
    let plain: PathBuf = dir.components().collect();
    if normal == 0 || plain == Path::new("/sys/fs/bpf") {
        return Some(format!(
            "is the root of a file system: pin_dir must be a directory of its own (e.g. {DEFAULT_PIN_DIR}), as relay-guard deletes its state there"
        ));
    }
    None
}

/// A guard's entries as read, before they are sorted: with, for the list
/// index, the id of each list file's origins, and the list files in the
/// order read (to order equal networks as written).
struct ReadEntries {
    entries: Vec<Entry>,
    file_ids: Vec<(std::sync::Arc<Path>, u16)>,
    file_order: Vec<std::sync::Arc<Path>>,
}

/// Largest list (or config) file read, in bytes: bounds the agent's memory
/// whatever a file holds; real lists are far smaller (1M prefixes: ~16 MiB).
pub const MAX_LIST_BYTES: u64 = 512 << 20;
/// Longest line of a list file, in bytes.
pub const MAX_LINE_BYTES: usize = 4096;
/// Reads a config or list file, bounded ("Bounded work for hostile input"
/// in SPEC.md): a regular file of at most [`MAX_LIST_BYTES`]. A FIFO, a device
/// (`/dev/zero` through a symlink) or a directory is an error, found
/// without blocking (opened `O_NONBLOCK`, then `fstat`).
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::{
        io::Read as _,
        os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        let kind = if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({kind})"),
        ));
    }
    let too_big = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_LIST_BYTES >> 20),
        )
    };
    if meta.len() > MAX_LIST_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    f.take(MAX_LIST_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_LIST_BYTES {
        return Err(too_big());
    }
    Ok(bytes)
}

/// What makes the bytes of a list file unusable, by line: lines longer
/// than [`MAX_LINE_BYTES`], NUL bytes, bytes that are not UTF-8. Empty when
/// the file can be parsed.
pub fn list_bytes_errors(file: &Path, bytes: &[u8]) -> Vec<ConfigError> {
    // The common case, fast (a delta reload checks the whole new file):
    // no NUL, valid UTF-8, and no two newlines further apart than a line
    // may be long (a line with a CR at the limit takes the slow path).
    let mut start = 0;
    let short = memchr::memchr_iter(b'\n', bytes)
        .chain(std::iter::once(bytes.len()))
        .all(|end| {
            let ok = end - start <= MAX_LINE_BYTES;
            start = end + 1;
            ok
        });
    if short && memchr::memchr(0, bytes).is_none() && std::str::from_utf8(bytes).is_ok() {
        return Vec::new();
    }
    let mut errors = Vec::new();
    let mut more = 0usize;
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let what = if line.len() > MAX_LINE_BYTES {
            format!("line is {} bytes long (at most {MAX_LINE_BYTES})", line.len())
        } else if let Some(col) = memchr::memchr(0, line) {
            format!("NUL byte at column {}", col + 1)
        } else if let Err(e) = std::str::from_utf8(line) {
            let at = e.valid_up_to();
            format!("not UTF-8: byte {:#04x} at column {}", line[at], at + 1)
        } else {
            continue;
        };
        if errors.len() >= MAX_LIST_ERRORS {
            more += 1;
            continue;
        }
        errors.push(ConfigError {
            file: file.to_path_buf(),
            line: i + 1,
            what,
        });
    }
    if more > 0 {
        errors.push(ConfigError {
            file: file.to_path_buf(),
            line: 0,
            what: format!("... and {more} more such lines (is this a list file?)"),
        });
    }
    errors
}

#[cfg(test)]
mod tests;
