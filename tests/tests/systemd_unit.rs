//! `deploy/relay-guard.service` and the MTA drop-ins in `deploy/systemd/`,
//! checked by the tools that consume them and against the real agent:
//! `systemd-analyze verify` and `security`; its capability set runs the
//! real agent in a namespace (and each capability is shown to be needed);
//! the system calls, socket families and written paths of a real run
//! (strace) fit its sandbox; the drop-ins order the MTA after relay-guard
//! without binding it.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, TempDir, agent_bin},
    container::{children, repo},
    deploy::{lab_config, read, run, scrape, strs, text, xdp_attached},
    lab::{ALLOWED_V4, ALLOWED_V6, DENIED_V4, Lab, ip},
    net::{BANNER, BannerServer, connect_banner, metric},
    require,
    strace::parse_trace,
    systemd_unit::{Unit, allowed_syscalls, cap_eff, cap_mask, setpriv, systemd_analyze_usable, systemd_verify},
};

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
