//! A config file read and parsed as TOML once, before validation: the raw
//! view that every reader of the file shares.
//!
//! Validation ([`ConfigFile::validate`]) is all or nothing, but some callers
//! need one field of a config that does not validate, or need a field that
//! validation drops: the agent looks for the last good copy in the
//! `state_dir` a broken config names; `status`, `explain`, `top` and
//! `detach` read `pin_dir` from a config whose list files are gone; and
//! `check-config` counts the guards written without a `name`. They read it
//! here, leniently (a value of the wrong type is "not told", for the caller
//! to judge), from the same parse that validation uses, so no code parses
//! the TOML again to get one field.
use std::path::{Path, PathBuf};

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

/// Reads the text of the config at `path`: bounded (see
/// [`super::read_bounded`]), and UTF-8.
pub(crate) fn read_text(path: &Path) -> std::io::Result<String> {
    let bytes = super::read_bounded(path)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8"))
}

/// The config file at `path` with its text: its TOML document, not
/// validated.
pub(crate) struct ConfigFile<'a> {
    /// The file it came from (or stands for: a saved copy names the original).
    pub path: &'a Path,
    /// The text as read.
    pub text: &'a str,
    /// The document, or the first TOML syntax error in `text`.
    doc: Result<Spanned<DeTable<'a>>, toml::de::Error>,
}

impl<'a> ConfigFile<'a> {
    /// Parses `text` as the config at `path` (list files are resolved
    /// relative to the config's directory). A TOML error is kept for the
    /// readers to report.
    pub fn parse(path: &'a Path, text: &'a str) -> ConfigFile<'a> {
        ConfigFile {
            path,
            text,
            doc: DeTable::parse(text),
        }
    }

    /// The document, or the TOML syntax error that stops it.
    pub(super) fn document(&self) -> Result<&Spanned<DeTable<'a>>, &toml::de::Error> {
        self.doc.as_ref()
    }

    /// The top-level value of `key` as written: `Ok(None)` when the file
    /// does not set it, `Err` when the file is not TOML.
    pub fn value(&self, key: &str) -> Result<Option<&DeValue<'a>>, &toml::de::Error> {
        Ok(self.document()?.get_ref().get(key).map(Spanned::get_ref))
    }

    /// The `state_dir` the file names, when it can be told: the TOML
    /// parses and `state_dir` is an absolute path. `None`: use
    /// [`super::DEFAULT_STATE_DIR`]. The agent needs this to find the last
    /// good copy of a config that fails validation.
    pub fn state_dir_hint(&self) -> Option<PathBuf> {
        let dir = PathBuf::from(self.value("state_dir").ok()??.as_str()?);
        dir.is_absolute().then_some(dir)
    }

    /// Guards written without a `name` (their default `guard<N>` follows
    /// their place in the file).
    pub fn unnamed_guards(&self) -> usize {
        let Ok(Some(DeValue::Array(guards))) = self.value("guard") else {
            return 0;
        };
        guards.iter().filter(|g| g.get_ref().get("name").is_none()).count()
    }
}
