//! The deployment artefacts, checked by the tools that consume them and
//! against the real agent:
//!
//! - `deploy/relay-guard.service`: `systemd-analyze verify` and `security`; its
//!   capability set runs the real agent in a namespace (and each capability
//!   is shown to be needed); the system calls, socket families and written
//!   paths of a real run (strace) fit its sandbox.
//! - `deploy/prometheus/`: `promtool check rules` and `promtool test rules`.
//! - `deploy/grafana/relay-guard.json`: every query parses (promtool) and
//!   names only metrics and labels the agent exports.
//! - `deploy/kubernetes/`: validated against the Kubernetes schemas
//!   (kubernetes-validate, offline), plus the checks a schema cannot make.
//! - the Debian package (cargo-deb): built, installed with dpkg, run, removed
//!   (the filter is detached) and purged.
//! - `docs/operations.md`: every command, metric and file it names exists.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, METRICS, TempDir, agent_bin, cli},
    lab::{ALLOWED_V4, ALLOWED_V6, DENIED_V4, Lab},
    net::{BANNER, BannerServer, connect_banner, http_get, metric},
    netns::unique,
    require,
};

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Runs a command; returns its output (never panics on a non-zero exit).
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {program} {args:?}: {e}"))
}

fn text(o: &Output) -> String {
    let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
    t.push_str(&String::from_utf8_lossy(&o.stderr));
    t
}

/// Runs a command and panics with its output unless it succeeds.
fn run_ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\n{}",
        o.status,
        text(&o)
    );
    text(&o)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address parses")
}

fn scrape(lab: &Lab, path: &str) -> Option<String> {
    http_get(&lab.server, METRICS.parse::<SocketAddr>().expect("constant"), path)
}

/// A Lab config with one guard on :25 and :587. Returns it with its detach guard.
fn lab_config(lab: &Lab, dir: &TempDir, mode: &str) -> (PathBuf, DetachOnDrop) {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("rg-deploy-")));
    let config = dir.write(
        "relay-guard.toml",
        &format!(
            r#"interfaces = ["{iface}"]
mode = "{mode}"
xdp_mode = "auto"
metrics_listen = "{METRICS}"
pin_dir = "{pins}"

[[guard]]
name = "relay"
ports = [25, 587]
allow = ["192.0.2.0/24", "2001:db8:a::/48"]
"#,
            iface = lab.server_if,
            pins = pin_dir.display(),
        ),
    );
    (config.clone(), DetachOnDrop::new(config, pin_dir))
}

/// Whether an XDP program is attached to the lab's server interface.
fn xdp_attached(lab: &Lab) -> bool {
    lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains("xdp")
}

// ---------------------------------------------------------------------------
// The systemd unit
// ---------------------------------------------------------------------------

/// A parsed unit file: (section, key, value) in file order.
struct Unit {
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn parse(text: &str) -> Unit {
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

    fn load() -> Unit {
        Unit::parse(&read("deploy/relay-guard.service"))
    }

    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    fn one(&self, section: &str, key: &str) -> &str {
        match self.values(section, key).as_slice() {
            [v] => v,
            other => panic!("[{section}] {key}= must be set exactly once, found {other:?}"),
        }
    }

    fn words(&self, section: &str, key: &str) -> BTreeSet<String> {
        self.values(section, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_string)
            .collect()
    }

    /// The capabilities the unit grants (its bounding set).
    fn caps(&self) -> Vec<String> {
        self.words("Service", "CapabilityBoundingSet").into_iter().collect()
    }
}

/// Capability numbers (linux/capability.h) of the names these tests use.
fn cap_number(name: &str) -> u32 {
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
fn setpriv(caps: &[String]) -> Vec<String> {
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

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The effective capability mask of a process.
fn cap_eff(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim();
    u64::from_str_radix(hex, 16).expect("CapEff is hex")
}

fn cap_mask(caps: &[String]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << cap_number(c)))
}

/// Whether `systemd-analyze verify` works at all here: it verifies a trivial
/// unit. Err says why not.
fn systemd_analyze_usable(dir: &TempDir) -> Result<(), String> {
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
fn systemd_verify(unit: &Path) {
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

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    if !require::privileged_with("systemd_unit_verifies_and_is_hardened", &["systemd-analyze"]) {
        return;
    }
    let unit = Unit::load();

    // Structure: what the agent needs, and what the brief promises.
    let exec = unit.one("Service", "ExecStart");
    assert!(exec.ends_with(" run"), "ExecStart runs the agent: {exec}");
    let config = relay_guard::config::DEFAULT_CONFIG_PATH;
    assert!(
        exec.contains(&format!("--config {config}")),
        "ExecStart uses the default config path {config}: {exec}"
    );
    // No ExecStartPre=check-config: a config broken at start must reach the
    // agent, which then applies the last good copy in state_dir (SPEC.md
    // "Failing safe": Boot).
    assert!(
        unit.values("Service", "ExecStartPre").is_empty(),
        "an ExecStartPre= that fails on a broken config keeps the agent from its last good copy"
    );
    assert_eq!(unit.one("Service", "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(unit.one("Service", "Restart"), "on-failure");
    // Started means attached: READY=1 comes from the agent after the first
    // sync and attach, so Before= the MTA orders something real.
    assert_eq!(unit.one("Service", "Type"), "notify");
    assert_eq!(unit.one("Service", "NotifyAccess"), "main");
    // Never give up restarting (a filter that stays down is an open relay).
    assert_eq!(unit.one("Unit", "StartLimitIntervalSec"), "0");
    assert!(
        unit.values("Unit", "StartLimitBurst").is_empty(),
        "StartLimitBurst= gives up"
    );
    assert!(
        !unit.one("Service", "RestartSec").is_empty(),
        "RestartSec= paces the retries"
    );
    // state_dir's default is writable under ProtectSystem=strict.
    assert_eq!(unit.one("Service", "StateDirectory"), "relay-guard");
    let state_dir = relay_guard::config::DEFAULT_STATE_DIR;
    assert_eq!(
        state_dir, "/var/lib/relay-guard",
        "StateDirectory=relay-guard is /var/lib/relay-guard"
    );
    assert!(
        unit.words("Service", "ReadWritePaths").contains(state_dir),
        "ReadWritePaths includes state_dir"
    );
    let before = unit.words("Unit", "Before");
    for mta in ["postfix.service", "postfix@-.service", "exim4.service"] {
        assert!(before.contains(mta), "Before= {mta}: {before:?}");
    }
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("LimitMEMLOCK", "infinity"),
        ("SystemCallArchitectures", "native"),
        ("RuntimeDirectory", "relay-guard"),
    ] {
        assert_eq!(unit.one("Service", key), want, "{key}=");
    }
    assert!(
        unit.words("Service", "ReadWritePaths").contains("/sys/fs/bpf"),
        "ReadWritePaths includes bpffs"
    );
    // ProtectKernelTunables=yes mounts /sys/fs/bpf read-only, and under
    // systemd 252 that wins over ReadWritePaths=/sys/fs/bpf: the agent could
    // not pin (tests/tests/systemd.rs runs the unit under systemd). The unit
    // makes /sys read-only itself, minus bpffs; ProcSubset=pid hides /proc/sys.
    assert!(
        unit.values("Service", "ProtectKernelTunables")
            .iter()
            .all(|v| *v != "yes"),
        "ProtectKernelTunables=yes makes /sys/fs/bpf read-only whatever ReadWritePaths= says"
    );
    assert!(
        unit.words("Service", "ReadOnlyPaths").contains("/sys"),
        "ReadOnlyPaths=/sys stands in for ProtectKernelTunables="
    );
    assert_eq!(unit.one("Service", "ProcSubset"), "pid", "ProcSubset=");
    assert_eq!(
        unit.one("Unit", "AssertPathIsMountPoint"),
        "/sys/fs/bpf",
        "bpffs must be mounted by systemd (no CAP_SYS_ADMIN)"
    );
    let caps = unit.caps();
    assert_eq!(
        caps,
        ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"],
        "CapabilityBoundingSet"
    );
    assert_eq!(
        unit.words("Service", "AmbientCapabilities")
            .into_iter()
            .collect::<Vec<_>>(),
        caps,
        "AmbientCapabilities = bounding set"
    );
    assert_eq!(
        unit.words("Service", "RestrictAddressFamilies"),
        ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]
            .map(String::from)
            .into(),
        "RestrictAddressFamilies"
    );
    assert!(
        !unit.values("Service", "SystemCallFilter").is_empty(),
        "SystemCallFilter is set"
    );
    assert_eq!(unit.one("Install", "WantedBy"), "multi-user.target");

    // systemd's own checks, on a copy whose ExecStart names the built agent
    // (verify requires the executables to exist).
    let dir = TempDir::new();
    match systemd_analyze_usable(&dir) {
        Err(why) => require::skip(
            "systemd_unit_verifies_and_is_hardened",
            &format!("{why}; only the structural checks ran, not `systemd-analyze verify` and `security`"),
        ),
        Ok(()) => {
            let copy = dir.write(
                "relay-guard.service",
                &read("deploy/relay-guard.service")
                    .replace("/usr/bin/relay-guard", agent_bin().to_str().expect("utf-8")),
            );
            systemd_verify(&copy);
            let o = run(
                "systemd-analyze",
                &["security", "--offline=yes", copy.to_str().expect("utf-8")],
            );
            let out = text(&o);
            if out.contains("--offline") && !o.status.success() {
                require::skip(
                    "systemd_unit_verifies_and_is_hardened",
                    &format!("systemd-analyze has no `security --offline` (systemd < 250); exposure not scored: {out}"),
                );
            } else {
                let score: f64 = out
                    .lines()
                    .find_map(|l| l.split_once("Overall exposure level for relay-guard.service:"))
                    .and_then(|(_, r)| r.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
                // 0 = locked down, 10 = unprotected; uid 0 with CAP_BPF and
                // the host network cannot get much lower.
                assert!(score <= 3.0, "exposure {score} > 3.0:\n{out}");
                eprintln!("systemd-analyze security: exposure {score}");
            }
        }
    }
}

#[test]
fn unit_capabilities_run_the_agent() {
    if !require::privileged_with("unit_capabilities_run_the_agent", &["setpriv"]) {
        return;
    }
    let caps = Unit::load().caps();
    let wrapper = setpriv(&caps);
    let lab = Lab::new();
    let dir = TempDir::new();
    let server = BannerServer::start(&lab.server, &[25]);
    let (config, _detach) = lab_config(&lab, &dir, "enforce");

    let mut agent = Agent::start_wrapped(&lab.server, config.clone(), &dir, &strs(&wrapper));
    assert_eq!(
        cap_eff(agent.pid()),
        cap_mask(&caps),
        "the agent runs with exactly the unit's capabilities {caps:?}:\n{}",
        agent.log_text()
    );
    assert!(
        xdp_attached(&lab),
        "no XDP program on {} under {caps:?}:\n{}",
        lab.server_if,
        agent.log_text()
    );
    assert_eq!(scrape(&lab, "/healthz").as_deref().map(str::trim), Some("ok"));
    // It filters: allowed sources get the banner, a denied one times out.
    for src in [ALLOWED_V4, ALLOWED_V6] {
        let got = connect_banner(
            &lab.client,
            ip(src),
            Lab::server_addr_for(src),
            25,
            Duration::from_secs(3),
        );
        assert_eq!(
            got.as_deref().ok(),
            Some(BANNER),
            "allowed {src} -> :25 under {caps:?}: {got:?}"
        );
    }
    let denied = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        Lab::server_addr_for(DENIED_V4),
        25,
        Duration::from_millis(1200),
    );
    assert!(denied.is_err(), "denied {DENIED_V4} connected under {caps:?}");
    assert_eq!(server.accepted.load(std::sync::atomic::Ordering::Relaxed), 2);

    // A reload (ExecReload sends SIGHUP) works with these capabilities.
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&lab, "/metrics").expect("metrics");
        if metric(&m, "relay_guard_config_reloads_total", &[]) >= 1.0 {
            assert_eq!(
                metric(&m, "relay_guard_config_last_reload_successful", &[]),
                1.0,
                "{m}\n{}",
                agent.log_text()
            );
            assert_eq!(
                metric(&m, "relay_guard_config_reload_failures_total", &[]),
                0.0,
                "{m}\n{}",
                agent.log_text()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP was not counted as a reload:\n{m}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.stop().success(), "agent exit:\n{}", agent.log_text());
    assert!(xdp_attached(&lab), "the filter stays attached after the agent exits");

    // `systemctl restart` / an upgrade: a new agent with the same capabilities
    // adopts the pinned state and replaces the program on the pinned link.
    let mut again = Agent::start_wrapped(&lab.server, config, &dir, &strs(&wrapper));
    assert!(xdp_attached(&lab));
    let denied = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        Lab::server_addr_for(DENIED_V4),
        25,
        Duration::from_millis(1200),
    );
    assert!(denied.is_err(), "denied {DENIED_V4} connected after the restart");
    assert!(again.stop().success(), "restarted agent exit:\n{}", again.log_text());
    eprintln!("unit capabilities {caps:?}: load, attach, reload and restart (adopt) all work");
}

#[test]
fn unit_capabilities_are_each_needed() {
    if !require::privileged_with("unit_capabilities_are_each_needed", &["setpriv", "unshare"]) {
        return;
    }
    let caps = Unit::load().caps();
    let lab = Lab::new();
    let dir = TempDir::new();
    let (config, _detach) = lab_config(&lab, &dir, "enforce");

    let fails = |wrapper: Vec<String>, what: &str| -> String {
        let mut a = Agent::spawn_wrapped(&lab.server, config.clone(), &dir, &strs(&wrapper), &["run"]);
        let status = a.wait(Duration::from_secs(30));
        let log = a.log_text();
        assert!(!status.success(), "the agent started {what}:\n{log}");
        assert!(
            !xdp_attached(&lab),
            "an XDP program is attached although the agent failed {what}:\n{log}"
        );
        let error = log
            .lines()
            .find(|l| l.starts_with("Error") || l.starts_with("error"))
            .unwrap_or("")
            .to_string();
        assert!(!error.is_empty(), "no error line {what}:\n{log}");
        assert!(
            log.contains("Operation not permitted") || log.contains("Permission denied"),
            "the error {what} does not say it lacks permission:\n{log}"
        );
        eprintln!("{what}: {}", error.chars().take(300).collect::<String>());
        error
    };

    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let error = fails(setpriv(&fewer), &format!("without {missing}"));
        assert!(
            error.contains("failed to load the XDP program") || error.contains("failed to attach"),
            "without {missing}: the error does not name the failing step: {error}"
        );
    }

    // The unit's capabilities cannot mount bpffs: that is why it asserts that
    // systemd has mounted /sys/fs/bpf instead of granting CAP_SYS_ADMIN.
    let mut wrapper: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "umount -l /sys/fs/bpf && exec \"$@\"",
        "sh",
    ]
    .map(String::from)
    .to_vec();
    wrapper.extend(setpriv(&caps));
    let error = fails(wrapper, "with the unit's capabilities and no bpffs at /sys/fs/bpf");
    assert!(error.contains("bpffs"), "the error does not mention bpffs: {error}");
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
fn allowed_syscalls(unit: &Unit) -> BTreeSet<String> {
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

/// What a strace log shows a process doing.
#[derive(Debug, Default)]
struct Trace {
    syscalls: BTreeSet<String>,
    families: BTreeSet<String>,
    /// Paths created, opened for writing, removed, renamed or pinned.
    writes: BTreeSet<String>,
    /// /proc paths outside the process's own /proc/PID (ProcSubset=pid hides them).
    proc_reads: BTreeSet<String>,
    /// Calls that MemoryDenyWriteExecute=, RestrictNamespaces=,
    /// LockPersonality= or RestrictRealtime= would refuse.
    refused: Vec<String>,
}

fn quoted_args(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(start) = rest.find('"') {
        let after = &rest[start + 1..];
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        out.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    out
}

/// Parses `strace -f` output from the line where `exe` is exec'd on.
fn parse_trace(log: &str, exe: &Path) -> Trace {
    let exec_marker = format!("execve(\"{}\"", exe.display());
    let mut started = false;
    let mut t = Trace::default();
    for line in log.lines() {
        if !started {
            started = line.contains(&exec_marker) && line.trim_end().ends_with("= 0");
            continue;
        }
        // "PID name(args) = ret", "PID <... name resumed>…", "PID --- SIG… ---", "PID +++ exited +++".
        let body = line
            .split_once(char::is_whitespace)
            .map_or(line, |(_, b)| b)
            .trim_start();
        let (name, call) = if let Some(r) = body.strip_prefix("<... ") {
            (r.split_whitespace().next().unwrap_or(""), "")
        } else {
            (body.split('(').next().unwrap_or(""), body)
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        t.syscalls.insert(name.to_string());
        let args = quoted_args(call);
        match name {
            "socket" | "socketpair" => {
                if let Some(f) = call.split(['(', ',']).nth(1) {
                    t.families.insert(f.trim().to_string());
                }
            }
            "open" | "openat" | "openat2" | "creat" => {
                let flags_write = ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                    .iter()
                    .any(|f| call.contains(f));
                if let Some(p) = args.first() {
                    if flags_write || name == "creat" {
                        t.writes.insert(p.clone());
                    }
                    if let Some(rest) = p.strip_prefix("/proc/") {
                        let first = rest.split('/').next().unwrap_or("");
                        if !(first == "self" || first == "thread-self" || first.chars().all(|c| c.is_ascii_digit())) {
                            t.proc_reads.insert(p.clone());
                        }
                    }
                }
            }
            "mkdir" | "mkdirat" | "unlink" | "unlinkat" | "rmdir" | "truncate" | "mknod" | "mknodat" | "chmod"
            | "fchmodat" | "chown" | "fchownat" | "lchown" | "utimensat" | "setxattr" | "lsetxattr" => {
                t.writes.extend(args.into_iter().take(1));
            }
            "rename" | "renameat" | "renameat2" | "link" | "linkat" => {
                t.writes.extend(args.into_iter().take(2));
            }
            // symlink(target, linkpath): the target is the link's content.
            "symlink" | "symlinkat" => {
                t.writes.extend(args.into_iter().nth(1));
            }
            "mmap" | "mprotect" | "pkey_mprotect" if call.contains("PROT_WRITE") && call.contains("PROT_EXEC") => {
                t.refused.push(format!("MemoryDenyWriteExecute: {call}"));
            }
            "mprotect" | "pkey_mprotect" if call.contains("PROT_EXEC") => {
                t.refused
                    .push(format!("MemoryDenyWriteExecute (exec added to a mapping): {call}"));
            }
            "clone" | "clone3" | "unshare" | "setns" if call.contains("CLONE_NEW") || name == "setns" => {
                t.refused.push(format!("RestrictNamespaces: {call}"));
            }
            "personality" if !call.contains("0xffffffff") => t.refused.push(format!("LockPersonality: {call}")),
            "sched_setscheduler" | "sched_setattr" if call.contains("SCHED_FIFO") || call.contains("SCHED_RR") => {
                t.refused.push(format!("RestrictRealtime: {call}"));
            }
            "bpf" if call.contains("BPF_OBJ_PIN") => {
                if let Some(p) = call.split("pathname=\"").nth(1).and_then(|r| r.split('"').next()) {
                    t.writes.insert(p.to_string());
                }
            }
            _ => {}
        }
    }
    assert!(started, "the trace never shows {exec_marker}");
    t
}

/// Children of a process (`/proc/PID/task/PID/children`).
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The MTA drop-ins shipped in deploy/systemd/: the MTA starts after the
/// filter is attached (After= a Type=notify unit), and a stop or restart of
/// relay-guard never stops or restarts the MTA (Wants=, no Requires=,
/// BindsTo=, PartOf=, Requisite=).
#[test]
fn mta_drop_ins_order_without_binding() {
    if !require::privileged_with("mta_drop_ins_order_without_binding", &["systemd-analyze"]) {
        return;
    }
    let mut found = Vec::new();
    for mta in ["postfix.service", "postfix@.service", "exim4.service"] {
        let rel = format!("deploy/systemd/{mta}.d/relay-guard.conf");
        let unit = Unit::parse(&read(&rel));
        assert_eq!(unit.one("Unit", "After"), "relay-guard.service", "{rel}: After=");
        assert_eq!(unit.one("Unit", "Wants"), "relay-guard.service", "{rel}: Wants=");
        for binding in [
            "Requires",
            "Requisite",
            "BindsTo",
            "PartOf",
            "Upholds",
            "PropagatesStopTo",
        ] {
            assert!(
                unit.values("Unit", binding).is_empty(),
                "{rel}: {binding}= would stop or restart the MTA with relay-guard"
            );
        }
        assert!(
            unit.entries.iter().all(|(section, _, _)| section == "Unit"),
            "{rel} changes only ordering: {:?}",
            unit.entries
        );
        found.push(rel);
    }
    // systemd reads it as a drop-in: a stand-in MTA unit with the drop-in
    // and relay-guard.service beside it verifies (a Wants= of a unit systemd
    // cannot load would be a complaint naming relay-guard).
    let dir = TempDir::new();
    if let Err(why) = systemd_analyze_usable(&dir) {
        require::skip(
            "mta_drop_ins_order_without_binding",
            &format!("{why}; only the structural checks ran"),
        );
        return;
    }
    let units = dir.0.join("units");
    std::fs::create_dir_all(units.join("postfix.service.d")).expect("mkdir");
    std::fs::write(
        units.join("postfix.service"),
        "[Unit]\nDescription=stand-in MTA\n[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .expect("write unit");
    std::fs::copy(
        repo().join("deploy/systemd/postfix.service.d/relay-guard.conf"),
        units.join("postfix.service.d/relay-guard.conf"),
    )
    .expect("copy drop-in");
    std::fs::write(
        units.join("relay-guard.service"),
        read("deploy/relay-guard.service").replace("/usr/bin/relay-guard", agent_bin().to_str().expect("utf-8")),
    )
    .expect("write unit");
    systemd_verify(&units.join("postfix.service"));
    eprintln!("MTA drop-ins checked: {found:?}");
}

#[test]
fn unit_sandbox_fits_what_the_agent_does() {
    if !require::privileged_with(
        "unit_sandbox_fits_what_the_agent_does",
        &["systemd-analyze", "setpriv", "strace"],
    ) {
        return;
    }
    let unit = Unit::load();
    let lab = Lab::new();
    let dir = TempDir::new();
    let (config, _detach) = lab_config(&lab, &dir, "monitor");
    let trace_file = dir.0.join("agent.strace");
    let mut wrapper: Vec<String> = [
        "strace",
        "-f",
        "-qq",
        "-s",
        "256",
        "-o",
        trace_file.to_str().expect("utf-8"),
    ]
    .map(String::from)
    .to_vec();
    wrapper.extend(setpriv(&unit.caps()));

    // A whole life: start, serve scrapes, a SIGHUP reload, SIGTERM.
    let mut agent = Agent::start_wrapped(&lab.server, config, &dir, &strs(&wrapper));
    let exe = std::fs::canonicalize(agent_bin()).expect("agent binary");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let found = children(agent.pid())
            .into_iter()
            .find(|c| std::fs::read_link(format!("/proc/{c}/exe")).is_ok_and(|p| p == exe));
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no traced agent process under strace pid {}",
            agent.pid()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        Lab::server_addr_for(DENIED_V4),
        25,
        Duration::from_millis(300),
    );
    assert!(scrape(&lab, "/metrics").is_some_and(|m| m.contains("relay_guard_build_info")));
    assert!(scrape(&lab, "/healthz").is_some());
    let signal = |s| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s).expect("signal the agent");
    signal(nix::sys::signal::Signal::SIGHUP);
    // Generous: under strace every one of the sync's map reads is a traced
    // system call, and the single-threaded agent serves no scrape meanwhile.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !scrape(&lab, "/metrics").is_some_and(|m| metric(&m, "relay_guard_config_reloads_total", &[]) >= 1.0) {
        assert!(
            Instant::now() < deadline,
            "the reload was not counted:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "agent under strace exited {status}:\n{}",
        agent.log_text()
    );

    let log = std::fs::read_to_string(&trace_file).expect("read the trace");
    let t = parse_trace(&log, &agent_bin());

    let allowed = allowed_syscalls(&unit);
    let denied: Vec<&String> = t.syscalls.difference(&allowed).collect();
    assert!(
        denied.is_empty(),
        "system calls the unit's SystemCallFilter= would refuse: {denied:?} (used: {:?})",
        t.syscalls
    );

    let families = unit.words("Service", "RestrictAddressFamilies");
    let refused: Vec<&String> = t.families.difference(&families).collect();
    assert!(
        refused.is_empty(),
        "socket families outside RestrictAddressFamilies=: {refused:?}"
    );

    // ProtectSystem=strict: writes only where the unit makes room.
    let mut writable: Vec<String> = unit
        .words("Service", "ReadWritePaths")
        .into_iter()
        .map(|p| p.trim_start_matches(['-', '+']).to_string())
        .collect();
    writable.push(format!("/run/{}", unit.one("Service", "RuntimeDirectory")));
    writable.extend(["/tmp".into(), "/var/tmp".into(), "/dev/null".into()]);
    let outside: Vec<&String> = t
        .writes
        .iter()
        .filter(|p| !writable.iter().any(|w| Path::new(p.as_str()).starts_with(w)))
        .collect();
    assert!(
        outside.is_empty(),
        "paths written outside {writable:?} (read-only under ProtectSystem=strict): {outside:?}"
    );
    assert!(
        t.writes.iter().any(|p| p.starts_with("/sys/fs/bpf/")),
        "the trace shows no pins: {:?}",
        t.writes
    );

    // ProcSubset=pid hides the rest of /proc. aya reads /proc/version_signature
    // where it exists (Ubuntu) and falls back to uname(2) otherwise.
    let hidden: Vec<&String> = t
        .proc_reads
        .iter()
        .filter(|p| p.as_str() != "/proc/version_signature")
        .collect();
    assert!(hidden.is_empty(), "/proc paths that ProcSubset=pid hides: {hidden:?}");
    assert!(
        t.refused.is_empty(),
        "calls the unit's sandbox refuses:\n{}",
        t.refused.join("\n")
    );
    assert!(
        !t.syscalls.contains("mount"),
        "the agent mounted something: the unit has no CAP_SYS_ADMIN"
    );
    eprintln!("agent system calls ({}): {:?}", t.syscalls.len(), t.syscalls);
    eprintln!("socket families: {:?}; paths written: {}", t.families, t.writes.len());
}

// ---------------------------------------------------------------------------
// What the agent exports, and what PromQL refers to
// ---------------------------------------------------------------------------

/// Metric names and each one's label names, from a real scrape.
#[derive(Debug)]
struct Exported {
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// The metrics SPEC.md promises.
const SPEC_METRICS: [&str; 9] = [
    "relay_guard_packets_total",
    "relay_guard_malformed_packets_total",
    "relay_guard_allowlist_prefixes",
    "relay_guard_config_reloads_total",
    "relay_guard_config_reload_failures_total",
    "relay_guard_config_last_reload_successful",
    "relay_guard_config_last_reload_success_timestamp_seconds",
    "relay_guard_build_info",
    "relay_guard_scrape_errors_total",
];

/// Runs the agent once (monitor mode, with traffic from an allowed and a
/// denied source, so every packet label appears) and records what it exports.
fn exported() -> &'static Exported {
    static EXPORTED: OnceLock<Exported> = OnceLock::new();
    EXPORTED.get_or_init(|| {
        let lab = Lab::new();
        let dir = TempDir::new();
        let _server = BannerServer::start(&lab.server, &[25]);
        let (config, _detach) = lab_config(&lab, &dir, "monitor");
        // The scheduled relay test too, so its series (and their `port`
        // label) are there: nothing listens on loopback, so it finds port
        // 25 closed at once.
        let mut text = std::fs::read_to_string(&config).expect("config");
        text.push_str("\n[relaytest]\nenabled = true\nports = [25]\ntarget = \"127.0.0.1\"\ntimeout = \"1s\"\n");
        // And a [[ban]] section fed one failed login, so the ban series
        // (and their `ban` and `source` labels) are there. Its own
        // state_dir, so the ban list it saves is nobody else's.
        let state = dir.0.join("state");
        let log = dir.0.join("logs").join("mail.log");
        text = text.replacen("pin_dir = ", &format!("state_dir = \"{}\"\npin_dir = ", state.display()), 1);
        text.push_str(&format!(
            "\n[[ban]]\nname = \"sasl\"\nports = [587]\nlog_files = [\"{}\"]\nfailures = 1\nban_time = \"1m\"\n",
            log.display()
        ));
        std::fs::write(&config, text).expect("config");
        let mut agent = Agent::start(&lab.server, config, &dir);
        std::fs::create_dir_all(log.parent().expect("dir")).expect("mkdir logs");
        std::fs::write(
            &log,
            "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[198.51.100.77]: SASL PLAIN authentication failed: \n\
             garbage, not a log line\n",
        )
        .expect("write log");
        for src in [ALLOWED_V4, DENIED_V4] {
            let _ = connect_banner(
                &lab.client,
                ip(src),
                Lab::server_addr_for(src),
                25,
                Duration::from_secs(3),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let body = loop {
            let m = scrape(&lab, "/metrics").expect("metrics");
            if metric(&m, "relay_guard_packets_total", &[("verdict", "would_drop")]) > 0.0
                && metric(&m, "relay_guard_relaytest_last_run_timestamp_seconds", &[]) > 0.0
                && metric(&m, "relay_guard_auth_failures_total", &[]) > 0.0
                && metric(&m, "relay_guard_bans", &[]) > 0.0
                && metric(&m, "relay_guard_log_lines_unparsed_total", &[]) > 0.0
            {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "no would_drop packets, relay test, failed login or ban counted:\n{m}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = agent.stop();
        let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split_whitespace();
                let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                    continue;
                };
                let sample = match kind {
                    "counter" if !name.ends_with("_total") => format!("{name}_total"),
                    "info" => format!("{name}_info"),
                    _ => name.to_string(),
                };
                labels.entry(sample).or_default();
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let name: String = line
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let set = labels.entry(name).or_default();
                if let Some(l) = line
                    .split_once('{')
                    .and_then(|(_, r)| r.split_once('}'))
                    .map(|(l, _)| l)
                {
                    set.extend(quoteless_label_names(l));
                }
            }
        }
        for m in SPEC_METRICS {
            assert!(
                labels.contains_key(m),
                "the agent does not export {m} (SPEC.md):\n{body}"
            );
        }
        Exported { labels }
    })
}

/// Label names of a `k="v",k2="v2"` list.
fn quoteless_label_names(list: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = list;
    while let Some((k, after)) = rest.split_once("=\"") {
        names.push(k.trim().trim_start_matches(',').trim().to_string());
        // skip the value
        let mut escaped = false;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = after.get(end + 1..).unwrap_or("");
    }
    names
}

/// Metric and label names a PromQL expression refers to.
#[derive(Debug, Default)]
struct Refs {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut r = Refs::default();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_string = |mut i: usize| -> usize {
        let q = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != q {
            if chars[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c == '{' {
            // Label matchers: names before =, !=, =~, !~.
            i += 1;
            let mut name = String::new();
            while i < chars.len() && chars[i] != '}' {
                let c = chars[i];
                if c == '"' || c == '\'' || c == '`' {
                    i = skip_string(i);
                    continue;
                }
                if is_part(c) {
                    name.push(c);
                } else if (c == '=' || c == '!') && !name.is_empty() {
                    r.labels.insert(std::mem::take(&mut name));
                } else if c == ',' || c.is_whitespace() {
                    // a name is only kept when an operator follows
                }
                i += 1;
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let paren = chars.get(j) == Some(&'(');
            if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                if paren {
                    let end = (j..chars.len()).find(|&k| chars[k] == ')').unwrap_or(chars.len());
                    let list: String = chars[j + 1..end].iter().collect();
                    r.labels
                        .extend(list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
                    i = end + 1;
                }
            } else if !paren && !PROMQL_KEYWORDS.contains(&word.as_str()) {
                r.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    r
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Panics unless `expr` names only exported metrics (or `extra`) and labels
/// those metrics carry.
fn check_refs(what: &str, expr: &str, extra: &[&str]) -> Refs {
    let exp = exported();
    let refs = promql_refs(expr);
    assert!(!refs.metrics.is_empty(), "{what}: no metric in `{expr}`");
    let mut known_labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    for m in &refs.metrics {
        if extra.contains(&m.as_str()) {
            continue;
        }
        let labels = exp.labels.get(m).unwrap_or_else(|| {
            panic!(
                "{what}: `{m}` is not a metric the agent exports (in `{expr}`); it exports {:?}",
                exp.labels.keys()
            )
        });
        known_labels.extend(labels.iter().cloned());
    }
    let unknown: Vec<&String> = refs.labels.difference(&known_labels).collect();
    assert!(
        unknown.is_empty(),
        "{what}: labels {unknown:?} are on none of {:?} (in `{expr}`)",
        refs.metrics
    );
    refs
}

#[test]
fn promql_refs_finds_metrics_and_labels() {
    // Pure parsing, no privileges: the checker itself must be right.
    let r = promql_refs(
        r#"sum by (guard, port) (rate(relay_guard_packets_total{verdict=~"dropped|x{y}",interface!="a"}[5m] offset 1h)) > 4 * on(instance) group_left(version) relay_guard_build_info unless absent(up{job="relay-guard"})"#,
    );
    assert_eq!(
        r.metrics,
        ["relay_guard_packets_total", "relay_guard_build_info", "up"]
            .map(String::from)
            .into(),
        "{r:?}"
    );
    assert_eq!(
        r.labels,
        ["guard", "port", "verdict", "interface", "instance", "version", "job"]
            .map(String::from)
            .into(),
        "{r:?}"
    );
}

// ---------------------------------------------------------------------------
// Prometheus alert rules
// ---------------------------------------------------------------------------

/// (alert name, expr) of a rules file, by reading its YAML lines (the crate
/// has no YAML parser; promtool checks the file for real).
fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        let indent = line.len() - t.len();
        let t = t.strip_prefix("- ").unwrap_or(t);
        if let Some(n) = t.strip_prefix("alert:").or_else(|| t.strip_prefix("record:")) {
            name = n.trim().to_string();
        } else if let Some(rest) = t.strip_prefix("expr:") {
            let rest = rest.trim();
            let expr = if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                block.join("\n")
            } else {
                rest.trim_matches(|c| c == '\'' || c == '"').to_string()
            };
            out.push((name.clone(), expr));
        }
        i += 1;
    }
    out
}

const ALERTS: [&str; 11] = [
    "RelayGuardBansRefused",
    "RelayGuardBanStateRejected",
    "RelayGuardBanTrackersFull",
    "RelayGuardOpenRelay",
    "RelayGuardRelayTestFailing",
    "RelayGuardDropsSpiking",
    "RelayGuardConfigReloadFailed",
    "RelayGuardConfigLastReloadUnsuccessful",
    "RelayGuardAgentDown",
    "RelayGuardMalformedPacketsSurging",
    "RelayGuardInterfaceNotAttached",
];

#[test]
fn prometheus_rules_check_and_pass_their_unit_tests() {
    if !require::privileged_with("prometheus_rules_check_and_pass_their_unit_tests", &["promtool"]) {
        return;
    }
    let dir = repo().join("deploy/prometheus");
    let out = Command::new("promtool")
        .current_dir(&dir)
        .args(["check", "rules", "relay-guard.rules.yml"])
        .output()
        .expect("promtool");
    assert!(
        out.status.success() && text(&out).contains("SUCCESS"),
        "promtool check rules:\n{}",
        text(&out)
    );
    let out = Command::new("promtool")
        .current_dir(&dir)
        .args(["test", "rules", "relay-guard.rules.test.yml"])
        .output()
        .expect("promtool");
    assert!(
        out.status.success() && text(&out).contains("SUCCESS"),
        "promtool test rules:\n{}",
        text(&out)
    );

    let rules = read("deploy/prometheus/relay-guard.rules.yml");
    let tests = read("deploy/prometheus/relay-guard.rules.test.yml");
    let exprs = rule_exprs(&rules);
    let names: BTreeSet<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
    for a in ALERTS {
        assert!(names.contains(a), "no alert {a} in relay-guard.rules.yml");
    }
    assert!(
        exprs.iter().any(|(_, e)| e.contains("absent(relay_guard_build_info)")),
        "no alert on absent(relay_guard_build_info)"
    );
    for (name, expr) in &exprs {
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "alert {name} has no unit test in relay-guard.rules.test.yml"
        );
        check_refs(&format!("alert {name}"), expr, &["up"]);
    }
}

// ---------------------------------------------------------------------------
// Grafana dashboard
// ---------------------------------------------------------------------------

/// Replaces Grafana's variables with values PromQL accepts.
fn grafana_substitute(expr: &str) -> String {
    let mut s = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    // `$var` and `${var}` are only used inside regex matchers: any value.
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            let braced = chars.peek() == Some(&'{');
            if braced {
                chars.next();
            }
            while chars.peek().is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_') {
                chars.next();
            }
            if braced {
                chars.next();
            }
            out.push_str(".*");
        } else {
            out.push(c);
        }
    }
    s = out;
    s
}

#[test]
fn grafana_dashboard_queries_parse_and_use_exported_metrics() {
    if !require::privileged_with(
        "grafana_dashboard_queries_parse_and_use_exported_metrics",
        &["promtool"],
    ) {
        return;
    }
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/relay-guard.json")).expect("relay-guard.json is JSON");
    assert_eq!(dash["uid"], "relay-guard");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus" && v["name"] == "datasource"),
        "a `datasource` variable of type prometheus, so the dashboard imports anywhere"
    );

    let mut exprs = Vec::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .expect("variable query");
        // label_values(SELECTOR, LABEL)
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .expect("label_values(...)");
        let (selector, label) = inner.rsplit_once(',').expect("label_values(selector, label)");
        exprs.push((
            format!("variable {}", v["name"]),
            format!("group by ({}) ({selector})", label.trim()),
        ));
    }
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id in {title}"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().expect("x") + g["w"].as_u64().expect("w") <= 24,
            "{title} is wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title} uses the datasource variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            exprs.push((
                format!("panel {title:?}"),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }

    // Every query parses: promtool checks them as recording rules.
    let dir = TempDir::new();
    let mut rules = String::from("groups:\n  - name: grafana\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        let e = serde_json::to_string(&grafana_substitute(e)).expect("string");
        rules += &format!("      - record: grafana:query_{i}\n        expr: {e}\n");
    }
    let file = dir.write("grafana.rules.yml", &rules);
    let out = run("promtool", &["check", "rules", file.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "dashboard queries that are not PromQL:\n{}\n{rules}",
        text(&out)
    );

    // Every query names only what the agent exports.
    let mut used = BTreeSet::new();
    for (what, e) in &exprs {
        used.extend(check_refs(what, &grafana_substitute(e), &[]).metrics);
    }
    // And the dashboard shows what the issue asks for.
    let all = exprs.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    for (want, why) in [
        ("sum by (guard, port)", "drops and passes by guard and port"),
        ("verdict=\"dropped\"", "drops"),
        ("verdict=\"passed\"", "passes"),
        ("verdict=\"would_drop\"", "monitor mode's would_drop"),
        (
            "sum by (instance, interface) (rate(relay_guard_malformed_packets_total",
            "malformed by interface",
        ),
        (
            "sum by (guard, family) (relay_guard_allowlist_prefixes",
            "allowlist sizes",
        ),
        ("relay_guard_config_last_reload_successful", "reload status"),
        ("relay_guard_config_reload_failures_total", "reload failures"),
    ] {
        assert!(all.contains(want), "the dashboard shows no {why} (`{want}`)");
    }
    eprintln!("dashboard: {} queries over {used:?}", exprs.len());
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

/// The YAML documents of `path` as JSON, parsed by PyYAML from
/// kubernetes-validate's own Python environment.
fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let script =
        std::fs::canonicalize(require::which("kubernetes-validate").expect("kubernetes-validate")).expect("resolve");
    let shebang = std::fs::read_to_string(&script).expect("read kubernetes-validate");
    let python = shebang
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .expect("kubernetes-validate is a script")
        .trim();
    let program =
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
    let out = run_ok(python, &["-c", program, path.to_str().expect("utf-8")]);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("JSON from PyYAML")
}

#[test]
fn kubernetes_manifests_validate() {
    if !require::privileged_with("kubernetes_manifests_validate", &["kubernetes-validate"]) {
        return;
    }
    let manifest = repo().join("deploy/kubernetes/relay-guard.yaml");
    let m = manifest.to_str().expect("utf-8");
    // Strict (no unknown fields), against the newest schemas it ships and the
    // oldest Kubernetes it covers.
    for version in [None, Some("1.25.0")] {
        let mut args = vec!["--strict"];
        if let Some(v) = version {
            args.extend(["-k", v]);
        }
        args.push(m);
        let out = run_ok("kubernetes-validate", &args);
        assert_eq!(
            out.matches("passed for resource").count(),
            5,
            "kubernetes-validate {args:?}:\n{out}"
        );
        assert!(
            !out.contains("WARN") && !out.contains("ERROR"),
            "kubernetes-validate {args:?}:\n{out}"
        );
    }

    let docs = yaml_documents(&manifest);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().expect("kind")).collect();
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"]
    );
    let get = |kind: &str| docs.iter().find(|d| d["kind"] == kind).expect("kind present");
    let cm = get("ConfigMap");
    let ds = get("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&ds["spec"]["selector"]["matchLabels"], pod_labels);
    assert_eq!(pod["hostNetwork"], true, "XDP attaches to the node's interfaces");
    assert!(
        pod["nodeSelector"].as_object().is_some_and(|o| o.len() > 1),
        "a nodeSelector for mail gateways"
    );
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| !t.is_empty()),
        "tolerations for tainted gateways"
    );
    let c = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "relay-guard")
        .expect("container");
    let sc = &c["securityContext"];
    let unit_caps: BTreeSet<String> = Unit::load()
        .caps()
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    let added: BTreeSet<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("add")
        .iter()
        .map(|v| v.as_str().expect("cap").to_string())
        .collect();
    assert_eq!(added, unit_caps, "the pod gets the systemd unit's capabilities");
    assert!(
        sc["capabilities"]["drop"]
            .as_array()
            .expect("drop")
            .iter()
            .any(|v| v == "ALL")
    );
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    let cmd: Vec<&str> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().expect("arg"))
        .collect();
    let config_path = relay_guard::config::DEFAULT_CONFIG_PATH;
    assert_eq!(
        cmd,
        [
            "/usr/bin/relay-guard",
            "--config",
            config_path,
            "run",
            "--metrics-listen",
            "$(NODE_IP):10947"
        ]
    );
    // $(NODE_IP) is the node's address, from the downward API.
    let node_ip = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NODE_IP")
        .expect("NODE_IP in env");
    assert_eq!(node_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");

    let port = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("metrics port");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|v| v["mountPath"] == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    let volume = |name: &serde_json::Value| volumes.iter().find(|v| &v["name"] == name).expect("volume");
    let bpffs = volume(&mount_of("/sys/fs/bpf")["name"]);
    assert_eq!(bpffs["hostPath"]["path"], "/sys/fs/bpf", "bpffs is the host's");
    let lock = volume(&mount_of("/run/relay-guard")["name"]);
    assert_eq!(
        lock["hostPath"]["path"], "/run/relay-guard",
        "the lock directory is the host's"
    );
    // state_dir survives a pod restart and a node reboot, and a config
    // broken at start reaches the agent (no init container refuses it).
    let state = volume(&mount_of(relay_guard::config::DEFAULT_STATE_DIR)["name"]);
    assert_eq!(
        state["hostPath"]["path"],
        relay_guard::config::DEFAULT_STATE_DIR,
        "state_dir is the host's"
    );
    assert!(
        pod.get("initContainers")
            .and_then(|i| i.as_array())
            .is_none_or(|i| i.iter().all(|c| !c.to_string().contains("check-config"))),
        "an init container that runs check-config keeps the agent from its last good copy"
    );
    let config_dir = Path::new(config_path).parent().expect("dir").to_str().expect("utf-8");
    let cfg_mount = mount_of(config_dir);
    assert!(
        cfg_mount.get("subPath").is_none(),
        "the config is mounted as a directory (subPath defeats the symlink swap)"
    );
    assert_eq!(volume(&cfg_mount["name"])["configMap"]["name"], cm["metadata"]["name"]);
    assert!(mounts.iter().all(|m| m.get("subPath").is_none()));

    // The ConfigMap's config is valid, and agrees with the pod.
    let dir = TempDir::new();
    let data = cm["data"].as_object().expect("data");
    let toml = data["relay-guard.toml"].as_str().expect("relay-guard.toml");
    let base = dir.0.to_str().expect("utf-8");
    for (k, v) in data {
        dir.write(
            k,
            &v.as_str()
                .expect("string")
                .replace(&format!("{config_dir}/"), &format!("{base}/")),
        );
    }
    let (status, out) = cli(&dir.0.join("relay-guard.toml"), &["check-config"]);
    assert!(status.success(), "the ConfigMap's relay-guard.toml is invalid:\n{out}");
    assert_eq!(port["containerPort"], 10947, "the port --metrics-listen names");
    assert!(
        toml.lines().any(|l| l.starts_with("metrics_listen = \"127.0.0.1:")),
        "the ConfigMap's own metrics_listen stays on loopback (the command line gives the node address; 0.0.0.0 would serve every address of the host)"
    );
    assert!(
        toml.contains("pin_dir = \"/sys/fs/bpf/"),
        "pin_dir is on the mounted bpffs"
    );

    let svc = get("Service");
    assert_eq!(&svc["spec"]["selector"], pod_labels);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");

    // The PodMonitor is a CRD (no schema offline): its wiring is checked here.
    let pm = &yaml_documents(&repo().join("deploy/kubernetes/relay-guard-podmonitor.yaml"))[0];
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    assert_eq!(&pm["spec"]["selector"]["matchLabels"], pod_labels);
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
}

// ---------------------------------------------------------------------------
// Debian package
// ---------------------------------------------------------------------------

fn dpkg_installed(pkg: &str) -> bool {
    let o = run("dpkg-query", &["-W", "-f=${Status}", pkg]);
    o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
}

/// dpkg ARGS, retried while another dpkg/apt holds the lock (bounded).
fn dpkg(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run dpkg");
        let out = text(&o);
        if o.status.success() {
            return out;
        }
        assert!(
            out.contains("lock") && Instant::now() < deadline,
            "dpkg {args:?} failed ({}):\n{out}",
            o.status
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Written before the test installs the package, removed after it purged it:
/// a marker left behind means a killed run left the package installed.
const DEB_TEST_MARKER: &str = "/var/tmp/relay-guard-deb-test.installed";

/// Purges the package if a failed test left it installed.
struct PurgeOnDrop;

impl PurgeOnDrop {
    fn arm() -> PurgeOnDrop {
        std::fs::write(DEB_TEST_MARKER, "relay-guard's deb test installed the package\n").expect("write marker");
        PurgeOnDrop
    }
}

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if dpkg_installed("relay-guard") || Path::new("/etc/relay-guard").exists() {
            let _ = Command::new("dpkg").args(["--purge", "relay-guard"]).status();
        }
        let _ = std::fs::remove_file(DEB_TEST_MARKER);
    }
}

#[test]
fn debian_package_builds_installs_runs_and_purges() {
    let name = "debian_package_builds_installs_runs_and_purges";
    if !require::privileged_with(
        name,
        &[
            "cargo",
            "cargo-deb",
            "dpkg",
            "dpkg-deb",
            "dpkg-query",
            "setpriv",
            "systemd-analyze",
        ],
    ) {
        return;
    }
    if Path::new(DEB_TEST_MARKER).exists() {
        eprintln!("{name}: an interrupted earlier run left the package installed; purging it first");
        drop(PurgeOnDrop);
    }
    assert!(
        !dpkg_installed("relay-guard") && !Path::new("/etc/relay-guard").exists(),
        "{name}: relay-guard is installed (or /etc/relay-guard exists) on this machine; this test installs and purges the \
         package for real, so remove it first (dpkg --purge relay-guard)"
    );
    let dir = TempDir::new();

    // Build (release; cargo-deb runs `cargo build --release`, a no-op when fresh).
    let out = Command::new("cargo")
        .current_dir(repo())
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["deb", "--package", "relay-guard", "--output"])
        .arg(&dir.0)
        .output()
        .expect("run cargo deb");
    assert!(out.status.success(), "cargo deb failed:\n{}", text(&out));
    let deb = std::fs::read_dir(&dir.0)
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let deb_s = deb.to_str().expect("utf-8");

    // Its metadata and contents.
    let fields = run_ok(
        "dpkg-deb",
        &["-f", deb_s, "Package", "Version", "Architecture", "Depends", "Section"],
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        fields.contains("Package: relay-guard") && fields.contains(&format!("Version: {version}")),
        "{fields}"
    );
    let contents = run_ok("dpkg-deb", &["-c", deb_s]);
    let unit_path = [
        "./usr/lib/systemd/system/relay-guard.service",
        "./lib/systemd/system/relay-guard.service",
    ]
    .into_iter()
    .find(|p| contents.contains(p))
    .unwrap_or_else(|| panic!("no systemd unit in the package:\n{contents}"))
    .trim_start_matches('.');
    for f in [
        "./usr/bin/relay-guard",
        "./etc/relay-guard/relay-guard.toml",
        "./usr/share/doc/relay-guard/operations.md",
        "./usr/share/doc/relay-guard/README.md",
        "./usr/share/doc/relay-guard/copyright",
        "./usr/share/doc/relay-guard/examples/prometheus/relay-guard.rules.yml",
        "./usr/share/doc/relay-guard/examples/grafana/relay-guard.json",
        "./usr/lib/systemd/system/postfix.service.d/relay-guard.conf",
        "./usr/lib/systemd/system/postfix@.service.d/relay-guard.conf",
        "./usr/lib/systemd/system/exim4.service.d/relay-guard.conf",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(f)),
            "{f} is not in the package:\n{contents}"
        );
    }
    let ctl = dir.0.join("control");
    run_ok("dpkg-deb", &["-e", deb_s, ctl.to_str().expect("utf-8")]);
    let conffiles = std::fs::read_to_string(ctl.join("conffiles")).expect("conffiles");
    assert!(
        conffiles.lines().any(|l| l == relay_guard::config::DEFAULT_CONFIG_PATH),
        "conffiles: {conffiles}"
    );

    // Install for real.
    let _purge = PurgeOnDrop::arm();
    let out = dpkg(&["-i", deb_s]);
    assert!(dpkg_installed("relay-guard"), "not installed:\n{out}");
    assert!(
        out.contains("relay-guard check-config"),
        "postinst tells what to do next:\n{out}"
    );
    let bin = Path::new("/usr/bin/relay-guard");
    let v = run_ok("/usr/bin/relay-guard", &["--version"]);
    assert!(v.contains(version), "relay-guard --version: {v}");
    // The installed config is the example, valid, and the default path.
    assert_eq!(
        std::fs::read_to_string(relay_guard::config::DEFAULT_CONFIG_PATH).expect("installed config"),
        read("deploy/relay-guard.example.toml")
    );
    let o = run("/usr/bin/relay-guard", &["check-config"]);
    assert!(
        o.status.success(),
        "check-config on the installed config:\n{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(unit_path).expect("installed unit"),
        read("deploy/relay-guard.service")
    );
    let listed = run_ok("dpkg-query", &["-W", "-f=${Conffiles}", "relay-guard"]);
    assert!(
        listed.contains(relay_guard::config::DEFAULT_CONFIG_PATH),
        "dpkg conffiles: {listed}"
    );
    let probe_dir = TempDir::new();
    match systemd_analyze_usable(&probe_dir) {
        Ok(()) => systemd_verify(Path::new(unit_path)),
        Err(why) => require::skip(name, &format!("{why}; the installed unit was not verified")),
    }

    // Run the installed agent on a lab interface, with the unit's capabilities,
    // from the installed config edited as an operator would.
    let lab = Lab::new();
    let pin_dir = format!("/sys/fs/bpf/{}", unique("rg-deb-"));
    let example = read("deploy/relay-guard.example.toml");
    let edited = example
        .replace(
            "interfaces = [\"eth0\"]",
            &format!("interfaces = [\"{}\"]", lab.server_if),
        )
        .replace(
            "pin_dir = \"/sys/fs/bpf/relay-guard\"",
            &format!("pin_dir = \"{pin_dir}\""),
        )
        .replace(
            "metrics_listen = \"127.0.0.1:10947\"",
            &format!("metrics_listen = \"{METRICS}\""),
        );
    assert!(
        edited.contains(&lab.server_if) && edited.contains(&pin_dir),
        "the example config changed shape; update this test"
    );
    let installed_config = PathBuf::from(relay_guard::config::DEFAULT_CONFIG_PATH);
    std::fs::write(&installed_config, &edited).expect("edit the installed config");
    let _detach = DetachOnDrop::new(dir.write("copy.toml", &edited), PathBuf::from(&pin_dir));
    let _server = BannerServer::start(&lab.server, &[25]);
    let caps = Unit::load().caps();
    let mut agent = Agent::start_program(&lab.server, bin, installed_config, &dir, &strs(&setpriv(&caps)));
    let m = scrape(&lab, "/metrics").expect("metrics");
    assert_eq!(
        metric(&m, "relay_guard_build_info", &[("version", version)]),
        1.0,
        "{m}"
    );
    // Monitor mode (the shipped default): a source outside the allowlist connects, and is counted.
    let got = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        Lab::server_addr_for(DENIED_V4),
        25,
        Duration::from_secs(3),
    );
    assert_eq!(
        got.as_deref().ok(),
        Some(BANNER),
        "monitor mode passes everything: {got:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(
        &scrape(&lab, "/metrics").expect("metrics"),
        "relay_guard_packets_total",
        &[("verdict", "would_drop")],
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "would_drop not counted:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.stop().success(), "installed agent exit:\n{}", agent.log_text());
    assert!(
        xdp_attached(&lab) && Path::new(&pin_dir).exists(),
        "the filter stays attached after the agent stops"
    );

    // Removal detaches the filter (prerm), keeps the conffile; purge removes it.
    let out = dpkg(&["-r", "relay-guard"]);
    assert!(out.contains("detach"), "prerm says it detaches:\n{out}");
    assert!(
        !xdp_attached(&lab),
        "the filter is still attached after dpkg -r:\n{out}"
    );
    assert!(!Path::new(&pin_dir).exists(), "pins left after dpkg -r:\n{out}");
    assert!(!bin.exists(), "/usr/bin/relay-guard left after dpkg -r");
    assert!(
        Path::new(relay_guard::config::DEFAULT_CONFIG_PATH).exists(),
        "dpkg -r keeps the conffile"
    );
    dpkg(&["--purge", "relay-guard"]);
    assert!(
        !Path::new("/etc/relay-guard").exists(),
        "/etc/relay-guard left after purge"
    );
    assert!(!dpkg_installed("relay-guard"));
}

// ---------------------------------------------------------------------------
// docs/operations.md
// ---------------------------------------------------------------------------

#[test]
fn operations_doc_names_only_what_exists() {
    if !require::privileged_with("operations_doc_names_only_what_exists", &[]) {
        return;
    }
    let doc = read("docs/operations.md");
    let headings: Vec<String> = doc
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(str::to_lowercase)
        .collect();
    for topic in [
        "install",
        "monitor",
        "metrics",
        "enforce",
        "upgrade",
        "troubleshoot",
        "detach",
    ] {
        assert!(
            headings.iter().any(|h| h.contains(topic)),
            "docs/operations.md has no section on {topic}: {headings:?}"
        );
    }

    // Subcommands: whatever follows `relay-guard [--config X]` in code.
    let help = cli(Path::new(relay_guard::config::DEFAULT_CONFIG_PATH), &["--help"]).1;
    let commands: BTreeSet<String> = help
        .split("Commands:")
        .nth(1)
        .expect("--help lists commands")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let mut code = String::new();
    let mut in_block = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            code.push_str(line);
            code.push('\n');
        } else {
            // Inline code counts when it is a command line (quoted error
            // messages mention "relay-guard" too).
            for (i, span) in line.split('`').enumerate() {
                let first = span.split_whitespace().next().unwrap_or("");
                if i % 2 == 1 && (first == "relay-guard" || first.ends_with("/relay-guard")) {
                    code.push_str(span);
                    code.push('\n');
                }
            }
        }
    }
    let mut used = BTreeSet::new();
    for line in code.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if !(*w == "relay-guard" || w.ends_with("/relay-guard"))
                || w.starts_with("/etc")
                || w.starts_with("/sys")
                || w.starts_with("/run")
            {
                continue;
            }
            let mut j = i + 1;
            while j < words.len() && words[j].starts_with('-') {
                j += if matches!(words[j], "--config" | "-c") { 2 } else { 1 };
            }
            if let Some(sub) = words.get(j) {
                let sub = sub.trim_end_matches([';', ',', ')', '.']);
                if sub.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !sub.is_empty() {
                    assert!(
                        commands.contains(sub),
                        "docs/operations.md uses `relay-guard {sub}`, which --help does not list ({commands:?}):\n{line}"
                    );
                    used.insert(sub.to_string());
                }
            }
        }
    }
    for sub in ["run", "check-config", "status", "explain", "top", "detach"] {
        assert!(used.contains(sub), "docs/operations.md never shows `relay-guard {sub}`");
    }

    // Metrics it names exist.
    let exp = exported();
    for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        // (`relay_guard_` alone is the prefix, as in a grep.)
        if word.starts_with("relay_guard_") && !word.ends_with('_') {
            assert!(
                exp.labels.contains_key(word),
                "docs/operations.md names `{word}`, which the agent does not export"
            );
        }
    }
    // Files it names exist.
    for word in doc.split(|c: char| c.is_whitespace() || "`()[],".contains(c)) {
        let word = word.trim_end_matches(['.', ':']);
        if (word.starts_with("deploy/") || word.starts_with("docs/")) && !word.contains('*') {
            assert!(
                repo().join(word).exists(),
                "docs/operations.md names {word}, which does not exist"
            );
        }
    }
}
