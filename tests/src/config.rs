//! The agent's config file, as every test writes it: [`TestConfig`] holds
//! the top-level keys (interfaces, mode, metrics on [`METRICS`], the test's
//! own `pin_dir`) and the tables after them, [`Guard`] one `[[guard]]`.
//! Other tables (`[[ban]]`, `[relaytest]`) and keys the builder does not
//! name go in as TOML text.
use std::path::{Path, PathBuf};

use crate::agent::{DetachOnDrop, METRICS, TempDir};

/// A config file's text, built key by key.
#[derive(Clone, Debug)]
pub struct TestConfig {
    interfaces: Vec<String>,
    mode: String,
    xdp_mode: Option<String>,
    metrics_listen: String,
    pin_dir: PathBuf,
    state_dir: Option<PathBuf>,
    /// Further top-level `key = value` lines, as written.
    keys: Vec<String>,
    /// The tables, in order, as TOML text.
    tables: Vec<String>,
}

impl TestConfig {
    /// `interfaces = [interface]`, `mode = "enforce"`, metrics on
    /// [`METRICS`], `pin_dir`, and no table yet.
    pub fn new(interface: &str, pin_dir: &Path) -> TestConfig {
        TestConfig::on(&[interface], pin_dir)
    }

    /// As [`TestConfig::new`], guarding each of `interfaces` (none: `[]`).
    pub fn on(interfaces: &[&str], pin_dir: &Path) -> TestConfig {
        TestConfig {
            interfaces: interfaces.iter().map(|i| (*i).to_string()).collect(),
            mode: "enforce".into(),
            xdp_mode: None,
            metrics_listen: METRICS.into(),
            pin_dir: pin_dir.to_path_buf(),
            state_dir: None,
            keys: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// `mode` (`enforce` or `monitor`).
    #[must_use]
    pub fn mode(mut self, mode: &str) -> TestConfig {
        self.mode = mode.into();
        self
    }

    /// `xdp_mode` (`auto`, `native`, `skb`); left out by default.
    #[must_use]
    pub fn xdp_mode(mut self, xdp_mode: &str) -> TestConfig {
        self.xdp_mode = Some(xdp_mode.into());
        self
    }

    /// `metrics_listen`, instead of [`METRICS`].
    #[must_use]
    pub fn metrics_listen(mut self, addr: &str) -> TestConfig {
        self.metrics_listen = addr.into();
        self
    }

    /// `state_dir`; left out by default.
    #[must_use]
    pub fn state_dir(mut self, dir: &Path) -> TestConfig {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    /// Top-level `key = value` lines (one or more) the builder does not
    /// name, as written.
    #[must_use]
    pub fn keys(mut self, lines: &str) -> TestConfig {
        if !lines.is_empty() {
            self.keys.push(lines.trim_end().to_string());
        }
        self
    }

    /// A `[[guard]]` table.
    #[must_use]
    pub fn guard(self, guard: &Guard) -> TestConfig {
        self.table(&guard.text())
    }

    /// A table as TOML text (`[[ban]]`, `[relaytest]`, a guard written by
    /// hand).
    #[must_use]
    pub fn table(mut self, text: &str) -> TestConfig {
        if !text.trim().is_empty() {
            self.tables.push(text.trim().to_string());
        }
        self
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The file's text.
    pub fn text(&self) -> String {
        let mut t = format!("interfaces = {}\n", list(&self.interfaces));
        t += &format!("mode = \"{}\"\n", self.mode);
        if let Some(x) = &self.xdp_mode {
            t += &format!("xdp_mode = \"{x}\"\n");
        }
        t += &format!("metrics_listen = \"{}\"\n", self.metrics_listen);
        t += &format!("pin_dir = \"{}\"\n", self.pin_dir.display());
        if let Some(s) = &self.state_dir {
            t += &format!("state_dir = \"{}\"\n", s.display());
        }
        for k in &self.keys {
            t += k;
            t.push('\n');
        }
        for table in &self.tables {
            t.push('\n');
            t += table;
            t.push('\n');
        }
        t
    }

    /// Writes `relay-guard.toml` into `dir`: the path, and the guard that
    /// detaches its `pin_dir` when dropped.
    pub fn write(&self, dir: &TempDir) -> (PathBuf, DetachOnDrop) {
        self.write_in(&dir.0)
    }

    /// As [`TestConfig::write`], into `dir` (created if missing), say a
    /// directory away from the logs the agent reads: the agent watches its
    /// config's directory.
    pub fn write_in(&self, dir: &Path) -> (PathBuf, DetachOnDrop) {
        std::fs::create_dir_all(dir).expect("create config dir");
        let path = dir.join("relay-guard.toml");
        std::fs::write(&path, self.text()).expect("write config");
        (path.clone(), DetachOnDrop::new(path, self.pin_dir.clone()))
    }
}

/// One `[[guard]]` table.
#[derive(Clone, Debug)]
pub struct Guard {
    name: String,
    ports: Vec<u16>,
    allow: Vec<String>,
    allow_files: Vec<String>,
    deny: Vec<String>,
    deny_files: Vec<String>,
}

impl Guard {
    /// A guard `name` on `ports` that allows nobody yet.
    pub fn new(name: &str, ports: &[u16]) -> Guard {
        Guard {
            name: name.into(),
            ports: ports.to_vec(),
            allow: Vec::new(),
            allow_files: Vec::new(),
            deny: Vec::new(),
            deny_files: Vec::new(),
        }
    }

    /// `allow`: addresses and prefixes.
    #[must_use]
    pub fn allow(mut self, entries: &[&str]) -> Guard {
        self.allow.extend(entries.iter().map(|e| (*e).to_string()));
        self
    }

    /// `allow_files`, relative to the config's directory or absolute.
    #[must_use]
    pub fn allow_files(mut self, files: &[&str]) -> Guard {
        self.allow_files.extend(files.iter().map(|e| (*e).to_string()));
        self
    }

    /// `deny`: addresses and prefixes.
    #[must_use]
    pub fn deny(mut self, entries: &[&str]) -> Guard {
        self.deny.extend(entries.iter().map(|e| (*e).to_string()));
        self
    }

    /// `deny_files`.
    #[must_use]
    pub fn deny_files(mut self, files: &[&str]) -> Guard {
        self.deny_files.extend(files.iter().map(|e| (*e).to_string()));
        self
    }

    /// The table's text.
    pub fn text(&self) -> String {
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let mut t = format!("[[guard]]\nname = \"{}\"\nports = [{}]\n", self.name, ports.join(", "));
        for (key, v) in [
            ("allow", &self.allow),
            ("allow_files", &self.allow_files),
            ("deny", &self.deny),
            ("deny_files", &self.deny_files),
        ] {
            if !v.is_empty() {
                t += &format!("{key} = {}\n", list(v));
            }
        }
        t
    }
}

/// A TOML array of strings: `["a", "b"]`.
pub fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_reads_as_the_agent_reads_it() {
        let text = TestConfig::new("veth0", Path::new("/sys/fs/bpf/t"))
            .xdp_mode("skb")
            .state_dir(Path::new("/tmp/state"))
            .keys("xdp_priority = 10")
            .guard(
                &Guard::new("relay", &[25, 587])
                    .allow(&["192.0.2.0/24", "2001:db8:a::/48"])
                    .deny(&["192.0.2.128/25"]),
            )
            .table("[[ban]]\nname = \"sasl\"\nports = [587]\n")
            .text();
        assert_eq!(
            text,
            "interfaces = [\"veth0\"]\nmode = \"enforce\"\nxdp_mode = \"skb\"\n\
             metrics_listen = \"127.0.0.1:10947\"\npin_dir = \"/sys/fs/bpf/t\"\n\
             state_dir = \"/tmp/state\"\nxdp_priority = 10\n\n\
             [[guard]]\nname = \"relay\"\nports = [25, 587]\n\
             allow = [\"192.0.2.0/24\", \"2001:db8:a::/48\"]\ndeny = [\"192.0.2.128/25\"]\n\n\
             [[ban]]\nname = \"sasl\"\nports = [587]\n"
        );
        let parsed = relay_guard::config::Config::parse(Path::new("/etc/relay-guard/relay-guard.toml"), &text);
        assert!(parsed.is_ok(), "{parsed:?}");
    }
}
