//! The `[crowdsec]` section (SPEC.md "Fleet-wide bans: CrowdSec"): the
//! agent enforces the decisions of a CrowdSec Local API (bouncer) and
//! pushes its own log-fed bans there (watcher).
//!
//! ```toml
//! [crowdsec]
//! lapi_url = "http://127.0.0.1:8080"
//! api_key_file = "/etc/relay-guard/crowdsec.key"
//! ban = "crowdsec"
//! update_frequency = "10s"
//! scopes = ["ip", "range"]
//! machine_id = "gw1"
//! machine_password_file = "/etc/relay-guard/crowdsec-machine.pass"
//! push = ["sasl"]
//! ```
//!
//! The `ban` section holds LAPI's decisions only: it takes no log sources,
//! is not pushed, and `relay-guard ban` does not add to it, so a deleted
//! decision never lifts a ban of another source. The secrets are read here,
//! from files that only their owner may read, and never shown
//! ([`Secret`]'s `Debug` is redacted).
use std::{
    fmt,
    ops::Range,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::ban::Ban;

/// Default `update_frequency` (cs-firewall-bouncer's default too).
pub const DEFAULT_UPDATE_FREQUENCY: Duration = Duration::from_secs(10);
/// Most bytes of a secret file.
const MAX_SECRET: u64 = 4096;

/// The section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrowdsec {
    lapi_url: Option<Spanned<String>>,
    api_key_file: Option<Spanned<String>>,
    ban: Option<Spanned<String>>,
    update_frequency: Option<Spanned<String>>,
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    machine_id: Option<Spanned<String>>,
    machine_password_file: Option<Spanned<String>>,
    #[serde(default)]
    push: Vec<Spanned<String>>,
}

/// A secret read from a file: compared, cloned, never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the request that needs it (never a log).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Decision scopes taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes {
    pub ip: bool,
    pub range: bool,
}

/// The watcher's login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    pub machine_id: String,
    pub password: Secret,
    pub password_file: PathBuf,
    /// Indexes into `Config::bans` of the sections whose log-fed bans are
    /// pushed.
    pub push: Vec<usize>,
}

/// The validated section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crowdsec {
    /// Without a trailing `/`.
    pub lapi_url: String,
    pub api_key: Secret,
    pub api_key_file: PathBuf,
    /// Index into `Config::bans` of the section that holds the decisions.
    pub ban: usize,
    pub update_frequency: Duration,
    pub scopes: Scopes,
    /// `None`: bouncer only.
    pub watcher: Option<Watcher>,
}

/// Reads a secret file: a regular file, that neither group nor others may
/// read or write, holding one line of printable ASCII. The error names the
/// file, never what it holds.
pub fn read_secret(path: &Path) -> Result<Secret, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("`{}` is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "`{}` is accessible by group or others (mode {:04o}): chmod 600 it",
            path.display(),
            mode & 0o7777
        ));
    }
    if meta.len() > MAX_SECRET {
        return Err(format!("`{}` is larger than {MAX_SECRET} bytes", path.display()));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("`{}` is not UTF-8 text", path.display()))?;
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("`{}` is empty", path.display()));
    }
    if !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "`{}` must hold one line of printable ASCII (no spaces)",
            path.display()
        ));
    }
    Ok(Secret(s.to_string()))
}

/// Checks a `lapi_url`: `http://` or `https://`, a host, no credentials,
/// query or fragment. Returns it without a trailing `/`.
pub fn check_url(s: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{s}`: the scheme must be http or https"));
    }
    if url.host().is_none() {
        return Err(format!("`{s}` names no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{s}`: no credentials in the URL (use api_key_file)"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{s}`: no query or fragment"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// Validates the section against the `[[ban]]` sections; problems go to
/// `err(span, message)`. `resolve` makes a relative path absolute (against
/// the config file's directory).
pub(super) fn validate(
    raw: &Spanned<RawCrowdsec>,
    bans: &[Ban],
    resolve: &dyn Fn(&str) -> PathBuf,
    err: &mut dyn FnMut(&Range<usize>, String),
) -> Option<Crowdsec> {
    let span = raw.span();
    let r = raw.get_ref();
    let mut problems: Vec<(Range<usize>, String)> = Vec::new();
    let mut ok = true;
    let mut fail = |span: &Range<usize>, what: String| {
        problems.push((span.clone(), what));
        false
    };
    let lapi_url = match &r.lapi_url {
        None => {
            ok = fail(&span, "lapi_url is required (e.g. \"http://127.0.0.1:8080\")".into());
            String::new()
        }
        Some(u) => check_url(u.get_ref()).unwrap_or_else(|why| {
            ok = fail(&u.span(), format!("lapi_url: {why}"));
            String::new()
        }),
    };
    let secret = |key: &str,
                  v: &Spanned<String>,
                  ok: &mut bool,
                  fail: &mut dyn FnMut(&Range<usize>, String) -> bool|
     -> (Secret, PathBuf) {
        let path = resolve(v.get_ref());
        match read_secret(&path) {
            Ok(s) => (s, path),
            Err(why) => {
                *ok = fail(&v.span(), format!("{key}: {why}"));
                (Secret(String::new()), path)
            }
        }
    };
    let (api_key, api_key_file) = match &r.api_key_file {
        None => {
            ok = fail(
                &span,
                "api_key_file is required (a file holding the key of `cscli bouncers add`)".into(),
            );
            (Secret(String::new()), PathBuf::new())
        }
        Some(f) => secret("api_key_file", f, &mut ok, &mut fail),
    };
    let position = |name: &str| bans.iter().position(|b| b.name == name);
    let ban = match &r.ban {
        None => {
            ok = fail(
                &span,
                "ban is required: the [[ban]] section whose ports and never the decisions use".into(),
            );
            0
        }
        Some(b) => match position(b.get_ref()) {
            None => {
                ok = fail(&b.span(), format!("ban: no [[ban]] section named `{}`", b.get_ref()));
                0
            }
            Some(i) => {
                let sec = &bans[i];
                if !sec.log_files.is_empty() || sec.journal {
                    ok = fail(
                        &b.span(),
                        format!(
                            "ban: section `{}` follows logs; CrowdSec's decisions need a [[ban]] section of their own (no log_files, no journal)",
                            sec.name
                        ),
                    );
                }
                i
            }
        },
    };
    let update_frequency = match &r.update_frequency {
        None => DEFAULT_UPDATE_FREQUENCY,
        Some(s) => match super::ban::parse_duration(s.get_ref()) {
            Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(3600) => d,
            Ok(_) => {
                ok = fail(
                    &s.span(),
                    format!("update_frequency: `{}` is not between 1s and 1h", s.get_ref()),
                );
                DEFAULT_UPDATE_FREQUENCY
            }
            Err(why) => {
                ok = fail(&s.span(), format!("update_frequency: `{}`: {why}", s.get_ref()));
                DEFAULT_UPDATE_FREQUENCY
            }
        },
    };
    let scopes = match &r.scopes {
        None => Scopes { ip: true, range: true },
        Some(list) => {
            let mut s = Scopes {
                ip: false,
                range: false,
            };
            if list.get_ref().is_empty() {
                ok = fail(&list.span(), "scopes is empty (take \"ip\", \"range\" or both)".into());
            }
            for v in list.get_ref() {
                match v.get_ref().to_ascii_lowercase().as_str() {
                    "ip" => s.ip = true,
                    "range" => s.range = true,
                    other => {
                        ok = fail(
                            &v.span(),
                            format!("scopes: `{other}` is not a scope relay-guard takes (\"ip\", \"range\")"),
                        )
                    }
                }
            }
            s
        }
    };
    let watcher = match (&r.machine_id, &r.machine_password_file) {
        (None, None) => {
            if let Some(p) = r.push.first() {
                ok = fail(
                    &p.span(),
                    "push needs machine_id and machine_password_file (the watcher's login)".into(),
                );
            }
            None
        }
        (Some(id), None) => {
            ok = fail(&id.span(), "machine_id needs machine_password_file".into());
            None
        }
        (None, Some(f)) => {
            ok = fail(&f.span(), "machine_password_file needs machine_id".into());
            None
        }
        (Some(id), Some(f)) => {
            let name = id.get_ref();
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                ok = fail(
                    &id.span(),
                    format!("machine_id `{name}` must be 1 to 64 ASCII letters, digits, `-`, `_` or `.`"),
                );
            }
            let (password, password_file) = secret("machine_password_file", f, &mut ok, &mut fail);
            let mut push = Vec::new();
            for p in &r.push {
                match position(p.get_ref()) {
                    None => ok = fail(&p.span(), format!("push: no [[ban]] section named `{}`", p.get_ref())),
                    Some(i) if r.ban.is_some() && i == ban => {
                        ok = fail(
                            &p.span(),
                            format!(
                                "push: `{}` holds CrowdSec's own decisions, which are not pushed back",
                                p.get_ref()
                            ),
                        )
                    }
                    Some(i) if push.contains(&i) => {
                        ok = fail(&p.span(), format!("push: `{}` is listed twice", p.get_ref()))
                    }
                    Some(i) => push.push(i),
                }
            }
            Some(Watcher {
                machine_id: name.clone(),
                password,
                password_file,
                push,
            })
        }
    };
    for (span, what) in problems {
        err(&span, format!("crowdsec: {what}"));
    }
    ok.then_some(Crowdsec {
        lapi_url,
        api_key,
        api_key_file,
        ban,
        update_frequency,
        scopes,
        watcher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("ok");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("ok");
        p
    }

    #[test]
    fn crowdsec_secret_files_readable_by_others_are_refused_without_showing_them() {
        let dir = tempfile::tempdir().expect("ok");
        let p = key_file(dir.path(), "k", "s3cr3t-key-value-0123456789abcdef\n", 0o644);
        let e = read_secret(&p).expect_err("an error");
        assert!(e.contains("group or others") && e.contains("0644"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        let p = key_file(dir.path(), "k2", "s3cr3t-key-value-0123456789abcdef\n", 0o600);
        let s = read_secret(&p).expect("ok");
        assert_eq!(s.expose(), "s3cr3t-key-value-0123456789abcdef");
        assert!(!format!("{s:?}").contains("s3cr3t"));
        let p = key_file(dir.path(), "k3", "two words\n", 0o600);
        assert!(read_secret(&p).expect_err("an error").contains("printable"));
        let p = key_file(dir.path(), "k4", "\n", 0o600);
        assert!(read_secret(&p).expect_err("an error").contains("empty"));
    }

    #[test]
    fn crowdsec_urls() {
        assert_eq!(
            check_url("http://127.0.0.1:8080/").expect("ok"),
            "http://127.0.0.1:8080"
        );
        assert!(check_url("ftp://x").is_err());
        assert!(
            check_url("http://u:p@127.0.0.1:8080")
                .expect_err("an error")
                .contains("credentials")
        );
        assert!(check_url("127.0.0.1:8080").is_err());
    }
}
