//! The systemd unit as the deployment tests read it: a parser of unit files
//! (`deploy/relay-guard.service` and the MTA drop-ins), the capability sets
//! it grants (as `setpriv` arguments and masks), `systemd-analyze verify`,
//! and the system calls its `SystemCallFilter=` allows.
use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use crate::{
    agent::TempDir,
    deploy::{read, run, run_ok, text},
};

/// A parsed unit file: (section, key, value) in file order.
pub struct Unit {
    /// (section, key, value), in file order.
    pub entries: Vec<(String, String, String)>,
}

impl Unit {
    pub fn parse(text: &str) -> Unit {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            let full = format!("{pending}{line}");
            pending.clear();
            if let Some(name) = full.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let (k, v) = full
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line without `=`: {full}"));
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
        Unit { entries }
    }

    /// `deploy/relay-guard.service`.
    pub fn load() -> Unit {
        Unit::parse(&read("deploy/relay-guard.service"))
    }

    /// Every value of `key` in `[section]`, in file order.
    pub fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in `[section]`; panics unless set exactly once.
    pub fn one(&self, section: &str, key: &str) -> &str {
        match self.values(section, key).as_slice() {
            [v] => v,
            other => panic!("[{section}] {key}= must be set exactly once, found {other:?}"),
        }
    }

    /// The whitespace-separated words of every value of `key` in `[section]`.
    pub fn words(&self, section: &str, key: &str) -> BTreeSet<String> {
        self.values(section, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_string)
            .collect()
    }

    /// The capabilities the unit grants (its bounding set).
    pub fn caps(&self) -> Vec<String> {
        self.words("Service", "CapabilityBoundingSet").into_iter().collect()
    }
}

/// Capability numbers (linux/capability.h) of the names these tests use.
pub fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_IPC_LOCK" => 14,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("cap_number: add {other}"),
    }
}

/// `setpriv` arguments that give the next command exactly `caps` as uid 0,
/// as systemd does for the unit (bounding, inheritable and ambient sets, no
/// new privileges).
pub fn setpriv(caps: &[String]) -> Vec<String> {
    let list: String = std::iter::once("-all".to_string())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        "--reuid=0".into(),
        "--regid=0".into(),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
    ]
}

/// The effective capability mask of a process.
pub fn cap_eff(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim();
    u64::from_str_radix(hex, 16).expect("CapEff is hex")
}

/// The capability mask of `caps` (names as in the unit).
pub fn cap_mask(caps: &[String]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << cap_number(c)))
}

/// Whether `systemd-analyze verify` works at all here: it verifies a trivial
/// unit. Err says why not.
pub fn systemd_analyze_usable(dir: &TempDir) -> Result<(), String> {
    let probe = dir.write(
        "rg-probe.service",
        "[Unit]\nDescription=probe\n[Service]\nType=oneshot\nExecStart=/bin/true\n",
    );
    let o = run(
        "systemd-analyze",
        &["verify", "--man=no", probe.to_str().expect("utf-8")],
    );
    if o.status.success() && text(&o).trim().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "`systemd-analyze verify` fails even on a trivial unit ({}): {}",
            o.status,
            text(&o).trim()
        ))
    }
}

/// `systemd-analyze verify` on `unit`; panics on any complaint about it.
pub fn systemd_verify(unit: &Path) {
    let o = run(
        "systemd-analyze",
        &["verify", "--man=no", unit.to_str().expect("utf-8")],
    );
    let out = text(&o);
    let name = unit.file_name().expect("file").to_string_lossy().into_owned();
    let ours: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(&name) || l.contains("relay-guard"))
        .collect();
    assert!(
        o.status.success() && ours.is_empty(),
        "systemd-analyze verify {} ({}):\n{out}",
        unit.display(),
        o.status
    );
    if !out.trim().is_empty() {
        eprintln!("systemd-analyze verify: notes about other units (ignored):\n{out}");
    }
}

/// Expands a systemd syscall group (recursively) with `systemd-analyze syscall-filter`.
fn syscall_group(name: &str, cache: &mut HashMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if !name.starts_with('@') {
        return BTreeSet::from([name.to_string()]);
    }
    if let Some(s) = cache.get(name) {
        return s.clone();
    }
    let out = run_ok("systemd-analyze", &["syscall-filter", name]);
    let mut set = BTreeSet::new();
    for line in out.lines().skip(1) {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        set.extend(syscall_group(l, cache));
    }
    assert!(!set.is_empty(), "systemd-analyze knows no syscall group {name}");
    cache.insert(name.to_string(), set.clone());
    set
}

/// The system calls the unit's SystemCallFilter= lines allow, applied in
/// order as systemd does (an allow list starts from @default).
pub fn allowed_syscalls(unit: &Unit) -> BTreeSet<String> {
    let mut cache = HashMap::new();
    let lines = unit.values("Service", "SystemCallFilter");
    assert!(
        lines.first().is_some_and(|l| !l.starts_with('~')),
        "SystemCallFilter= starts with an allow list"
    );
    let mut allowed = syscall_group("@default", &mut cache);
    for line in lines {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        for word in list.split_whitespace() {
            let name = word.split(':').next().expect("split yields one");
            for s in syscall_group(name, &mut cache) {
                if deny {
                    allowed.remove(&s);
                } else {
                    allowed.insert(s);
                }
            }
        }
    }
    allowed
}
