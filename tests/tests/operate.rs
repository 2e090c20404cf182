//! Operating the agent: restarts without a gap, validated hot reload, the
//! operator CLI, metrics that pass promtool, and a clean detach. Real agent
//! binary, real XDP on veth between namespaces, real TCP.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, cli},
    config::{Guard, TestConfig},
    lab::{
        ALLOWED_V4, ALLOWED_V6, DENIED_V4, DENIED_V6, Lab, SERVER_V4, assert_gate, ip, link_pin, pin_dir, scrape,
        wait_metric,
    },
    net::{BannerServer, connect_banner, metric},
    netns::sh,
    prober::{ALLOWED_TIMEOUT, Prober},
    require,
};

/// A config whose relay guard (port 25) reads `relay-allow.txt`.
fn setup(lab: &Lab, dir: &TempDir, allow_list: &str) -> (PathBuf, DetachOnDrop) {
    dir.write("relay-allow.txt", allow_list);
    relay_config(lab, &pin_dir("rg-test-")).write(dir)
}

/// The relay guard on port 25: `relay-allow.txt`, less 192.0.2.128/25.
fn relay_config(lab: &Lab, pin_dir: &Path) -> TestConfig {
    TestConfig::new(&lab.server_if, pin_dir).guard(
        &Guard::new("relay", &[25])
            .allow_files(&["relay-allow.txt"])
            .deny(&["192.0.2.128/25"]),
    )
}

/// Replaces `path` atomically (write + rename), as editors and config
/// management do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn restarts_without_a_gap_and_with_counters_kept() {
    if !require::privileged("restarts_without_a_gap_and_with_counters_kept") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, _detach) = setup(&lab, &dir, "192.0.2.10\n");
    let first = Agent::start(&lab.server, config.clone(), &dir);
    assert_gate(&lab, "first start");
    let dropped_before = metric(&scrape(&lab), "relay_guard_packets_total", &[("verdict", "dropped")]);
    assert!(dropped_before >= 1.0);
    drop(first);

    // A second agent on the same pin_dir refuses, clearly.
    let mut a = Agent::start(&lab.server, config.clone(), &dir);
    let mut second = Agent::spawn(&lab.server, config.clone(), &dir, &["run"]);
    let status = second.wait(Duration::from_secs(10));
    assert!(!status.success(), "a second agent on one pin_dir must refuse");
    assert!(
        second.log_text().contains("another relay-guard agent"),
        "{}",
        second.log_text()
    );

    let prober = Prober::start(&lab.client, ip(ALLOWED_V4), ip(DENIED_V4), ip(SERVER_V4), 25);
    // In a kernel-matrix guest an agent start takes 20-40 s: one restart
    // of each kind there, ten of each on the host.
    let restarts = if relay_guard_tests::slowdown() > 1 { 2 } else { 20 };
    for i in 0..restarts {
        std::thread::sleep(Duration::from_millis(150));
        if i % 2 == 0 {
            a.signal(Signal::SIGKILL);
            a.wait(Duration::from_secs(5));
        } else {
            let status = a.stop();
            assert!(status.success(), "restart {i}: SIGTERM exit {status}\n{}", a.log_text());
        }
        // While no agent runs, the pinned filter keeps guarding.
        std::thread::sleep(Duration::from_millis(100));
        a = Agent::start(&lab.server, config.clone(), &dir);
        assert!(
            a.log_text().contains("adopted pinned maps"),
            "restart {i} did not adopt:\n{}",
            a.log_text()
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let (tally, errors) = prober.finish();
    let (ok, failed, blocked, admitted) = tally.counts();
    println!(
        "20 restarts (10 SIGKILL): allowed {ok} ok / {failed} failed; denied {blocked} blocked / {admitted} admitted"
    );
    assert!(
        ok > 20 && blocked > 20,
        "the prober ran too little: {ok} allowed, {blocked} denied"
    );
    assert_eq!((failed, admitted), (0, 0), "gap during restarts: {errors:?}");
    // Counters survived every restart (maps adopted, never recreated).
    let dropped_after = metric(&scrape(&lab), "relay_guard_packets_total", &[("verdict", "dropped")]);
    assert!(
        dropped_after >= dropped_before + blocked as f64,
        "counters were reset: {dropped_before} -> {dropped_after}"
    );
}

#[test]
fn reload_under_traffic_has_no_gap_and_touches_only_changed_entries() {
    if !require::privileged("reload_under_traffic_has_no_gap_and_touches_only_changed_entries") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    // A large list: 10,000 /32s in 10.x (never used as sources) plus the one that matters.
    let mut big: String = (0..10_000u32)
        .map(|i| format!("10.{}.{}.{} ; filler\n", i >> 16 & 255, i >> 8 & 255, i & 255))
        .collect();
    big.push_str("192.0.2.10\n");
    let (config, _detach) = setup(&lab, &dir, &big);
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    let list = dir.0.join("relay-allow.txt");

    let prober = Prober::start(&lab.client, ip(ALLOWED_V4), ip(DENIED_V4), ip(SERVER_V4), 25);
    // The reload that carries a change may be the second of two triggers
    // (watcher and SIGHUP), so poll the verdict (bounded) rather than
    // assume the first reload seen is the one.
    let v6_probe = |what: &str, want_ok: bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = connect_banner(
                &lab.client,
                ip(ALLOWED_V6),
                "2001:db8:1::1".parse().expect("addr"),
                25,
                ALLOWED_TIMEOUT,
            );
            if r.is_ok() == want_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {ALLOWED_V6} -> :25 gave {r:?}\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    v6_probe("before reloads", false);
    for i in 1..=6 {
        // Alternate: add and remove the IPv6 source (and a carve-out), keeping 192.0.2.10.
        let mut text = big.clone();
        if i % 2 == 1 {
            text.push_str("2001:db8:a::/48\n192.0.2.0/24\n");
        }
        let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
        if i % 3 == 0 {
            agent_sighup_after_write(&agent, &list, &text);
        } else {
            replace(&list, &text);
        }
        let m = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
        // A write may fire the watcher as well as SIGHUP: let a second reload of the same content settle.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            metric(&m, "relay_guard_config_reload_failures_total", &[]),
            0.0,
            "{}",
            agent.log_text()
        );
        assert_eq!(metric(&m, "relay_guard_config_last_reload_successful", &[]), 1.0);
        v6_probe(&format!("after reload {i}"), i % 2 == 1);
    }
    let (tally, errors) = prober.finish();
    let (ok, failed, blocked, admitted) = tally.counts();
    println!(
        "6 reloads of a 10,001-entry list: allowed {ok} ok / {failed} failed; denied {blocked} blocked / {admitted} admitted"
    );
    assert!(ok > 5 && blocked > 5, "the prober ran too little");
    assert_eq!((failed, admitted), (0, 0), "gap during reloads: {errors:?}");

    // A one-line change to the large list touches only that entry.
    let mut one = big.clone();
    one.push_str("198.51.100.99\n");
    let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
    replace(&list, &one);
    wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
    // Kernel entries touched by the last reload: the new host's long block
    // and its /24 entry (plus a mask, at most) — not the 10,000 others.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (written, removed) = loop {
        let log = agent.log_text();
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("config reloaded"))
            .unwrap_or("")
            .to_string();
        let field = |name: &str| {
            last.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse::<usize>().ok())
        };
        if let (Some(w), Some(r)) = (field("written"), field("removed"))
            && (w > 0 || Instant::now() > deadline)
        {
            break (w, r);
        }
        assert!(Instant::now() < deadline, "no reload line in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("one-line change to a 10,001-entry list: {written} kernel entries written, {removed} removed");
    assert!(
        (1..=3).contains(&written) && removed == 0,
        "a one-line change touched {written} written / {removed} removed entries:\n{}",
        agent.log_text()
    );
    let status = agent.stop();
    assert!(status.success());
}

fn agent_sighup_after_write(agent: &Agent, list: &Path, text: &str) {
    // Write in place (no rename) and signal: the watcher may also fire; the
    // second trigger finds nothing changed and is skipped, or reloads the same.
    std::fs::write(list, text).expect("write");
    agent.signal(Signal::SIGHUP);
}

fn wait_log(agent: &Agent, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = agent.log_text();
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn invalid_reloads_change_nothing_and_are_reported() {
    if !require::privileged("invalid_reloads_change_nothing_and_are_reported") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, detach) = setup(&lab, &dir, "192.0.2.10\n");
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    let good = std::fs::read_to_string(&config).expect("read config");
    let pin_dir = detach.pin_dir.clone();

    // (variant, via SIGHUP?, text that must appear in the log)
    let bad_cidr = good.replace(r#"deny = ["192.0.2.128/25"]"#, r#"deny = ["192.0.2.300/25"]"#);
    let unknown_key = relay_config(&lab, &pin_dir).keys("colour = \"blue\"").text();
    let dup_port = format!("{good}\n[[guard]]\nname = \"again\"\nports = [25]\nallow = [\"203.0.113.0/24\"]\n");
    let missing = good.replace("relay-allow.txt", "gone.txt");
    let cases = [
        (
            "bad CIDR",
            bad_cidr,
            false,
            "relay-guard.toml:10: guard `relay`: deny entry `192.0.2.300/25`",
        ),
        (
            "unknown key",
            unknown_key,
            true,
            "relay-guard.toml:5: unknown field `colour`",
        ),
        (
            "duplicate port",
            dup_port,
            false,
            "port `25` of guard `again` already belongs to guard `relay`",
        ),
        ("missing file", missing, true, "allow_files `gone.txt`: cannot read"),
    ];
    for (what, text, sighup, needle) in cases {
        let before = metric(&scrape(&lab), "relay_guard_config_reload_failures_total", &[]);
        replace(&config, &text);
        if sighup {
            agent.signal(Signal::SIGHUP);
        }
        // Every attempt counts: the file change and the SIGHUP may both be one.
        let m = wait_metric(&lab, &agent, "relay_guard_config_reload_failures_total", before + 1.0);
        assert_eq!(
            metric(&m, "relay_guard_config_last_reload_successful", &[]),
            0.0,
            "{what}"
        );
        let log = wait_log(&agent, needle);
        assert!(
            log.contains(needle),
            "{what}: the log does not name the problem ({needle}):\n{log}"
        );
        assert_gate(&lab, what);
        // The kernel still holds the last good policy.
        let (_, out) = cli(&config, &["explain", ALLOWED_V4, "25"]);
        assert!(
            out.contains("kernel: port 25 -> guard") && out.contains("ALLOW") && out.contains("is invalid"),
            "{what}: {out}"
        );
    }
    replace(&config, &good);
    let m = wait_metric(&lab, &agent, "relay_guard_config_last_reload_successful", 1.0);
    assert!(metric(&m, "relay_guard_config_reload_failures_total", &[]) >= 4.0);
    assert_gate(&lab, "after the good config is back");
}

#[test]
fn operator_cli_reads_the_pinned_maps() {
    if !require::privileged_with("operator_cli_reads_the_pinned_maps", &["promtool", "bpftool"]) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, detach) = setup(&lab, &dir, "192.0.2.10\n2001:db8:a::/48\n");
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    assert_gate(&lab, "start");
    let _ = connect_banner(
        &lab.client,
        ip(DENIED_V6),
        "2001:db8:1::1".parse().expect("addr"),
        25,
        Duration::from_millis(300),
    );

    // Metrics pass promtool.
    let text = scrape(&lab);
    relay_guard_tests::prometheus::assert_promtool_accepts(&dir, &text);

    // Rate-limited blocked-source events reach the log.
    let log = wait_log(&agent, "198.51.100.20 -> port 25");
    assert!(
        log.contains("dropped 198.51.100.20 -> port 25"),
        "no blocked-source event in the log:\n{log}"
    );

    let status = agent.stop();
    assert!(status.success());

    // With the agent down, status, explain and top read the pinned maps.
    let (st, out) = cli(&config, &["status", "--json"]);
    assert!(st.success(), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(v["mode"], "enforce");
    assert_eq!(v["interfaces"][0], lab.server_if.as_str());
    assert_eq!(v["guarded_ports"][0], 25);
    assert_eq!(v["config_matches_kernel"], true);
    assert!(v["agent_pid"].is_null());
    assert!(
        v["counters"]
            .as_array()
            .expect("array")
            .iter()
            .any(|c| c["verdict"] == "dropped" && c["packets"].as_u64() > Some(0))
    );

    let (st, out) = cli(&config, &["explain", DENIED_V4, "25"]);
    assert!(st.success(), "{out}");
    assert!(out.contains("no entry matches") && out.contains("DENY"), "{out}");
    let (st, out) = cli(&config, &["explain", "192.0.2.200", "25", "--json"]);
    assert!(st.success(), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["config"]["prefix"], "192.0.2.128/25");
    assert_eq!(v["config"]["entry"]["line"], 10);
    assert_eq!(v["kernel"]["verdict"], "deny");
    assert_eq!(v["agree"], true);
    let (_, out) = cli(&config, &["explain", ALLOWED_V6, "22"]);
    assert!(out.contains("in no guard"), "{out}");

    // A config edited but not applied: explain flags the difference (exit 1).
    std::fs::write(dir.0.join("relay-allow.txt"), "192.0.2.0/24\n").expect("write");
    let (st, out) = cli(&config, &["explain", "192.0.2.11", "25"]);
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(out.contains("DIFFERENCE"), "{out}");

    let (st, out) = cli(&config, &["top", "--json"]);
    assert!(st.success(), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let sources: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["source"].as_str())
        .collect();
    assert!(sources.contains(&DENIED_V4) && sources.contains(&DENIED_V6), "{out}");
    assert!(
        !sources.contains(&ALLOWED_V4),
        "an allowed source is listed as blocked: {out}"
    );

    // Detach leaves no program, link or pin behind.
    let link = lab.server.ip(&["-j", "link", "show", "dev", &lab.server_if]);
    let v: serde_json::Value = serde_json::from_str(&link).expect("ip -j");
    let prog_id = v[0]["xdp"]["prog"]["id"]
        .as_u64()
        .expect("an XDP program is attached while detached agent is down");
    let (st, out) = cli(&config, &["detach"]);
    assert!(st.success(), "{out}");
    assert!(!detach.pin_dir.exists());
    assert!(!lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains(" xdp"));
    let shown = std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &prog_id.to_string()])
        .output()
        .expect("bpftool");
    assert!(
        !shown.status.success(),
        "program {prog_id} is still loaded after detach: {}",
        String::from_utf8_lossy(&shown.stdout)
    );
}

#[test]
fn state_of_another_layout_is_replaced_not_misread() {
    if !require::privileged_with("state_of_another_layout_is_replaced_not_misread", &["bpftool"]) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, detach) = setup(&lab, &dir, "192.0.2.10\n");
    // An old layout's map, pinned where a v0 agent would have put it, with
    // a different value size than ours.
    let old = detach.pin_dir.join("layout-0").join("maps");
    std::fs::create_dir_all(&old).expect("mkdir on bpffs");
    let old_map = old.join("RG_PORTS");
    sh(&[
        "bpftool",
        "map",
        "create",
        old_map.to_str().expect("utf-8"),
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "4",
        "name",
        "RG_PORTS",
    ]);
    let agent = Agent::start(&lab.server, config, &dir);
    let log = agent.log_text();
    assert!(
        log.contains("another layout"),
        "no log line about replacing the old layout:\n{log}"
    );
    assert!(!detach.pin_dir.join("layout-0").exists(), "old layout left in place");
    assert_gate(&lab, "after replacing an old layout");
}

#[test]
fn kubernetes_configmap_symlink_swap_reloads() {
    if !require::privileged("kubernetes_configmap_symlink_swap_reloads") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let pin_dir = pin_dir("rg-test-");
    // The layout kubelet makes for a ConfigMap volume: files are symlinks
    // through `..data`, which is swapped atomically to a new timestamped dir.
    let mount = dir.0.join("configmap");
    let write_version = |name: &str, allow: &str| {
        let v = mount.join(name);
        std::fs::create_dir_all(&v).expect("mkdir");
        std::fs::write(v.join("relay-guard.toml"), relay_config(&lab, &pin_dir).text()).expect("write");
        std::fs::write(v.join("relay-allow.txt"), allow).expect("write");
    };
    write_version("..2026_11_27_v1", "192.0.2.10\n");
    std::os::unix::fs::symlink("..2026_11_27_v1", mount.join("..data")).expect("symlink");
    for f in ["relay-guard.toml", "relay-allow.txt"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), mount.join(f)).expect("symlink");
    }
    let config = mount.join("relay-guard.toml");
    let _detach = DetachOnDrop::new(config.clone(), pin_dir.clone());
    let agent = Agent::start(&lab.server, config, &dir);
    let v6 = |want_ok: bool, what: &str| {
        let r = connect_banner(
            &lab.client,
            ip(ALLOWED_V6),
            "2001:db8:1::1".parse().expect("addr"),
            25,
            ALLOWED_TIMEOUT,
        );
        assert_eq!(r.is_ok(), want_ok, "{what}: {r:?}");
    };
    v6(false, "before the swap");

    write_version("..2026_11_27_v2", "192.0.2.10\n2001:db8:a::/48\n");
    let tmp = mount.join("..data_tmp");
    std::os::unix::fs::symlink("..2026_11_27_v2", &tmp).expect("symlink");
    std::fs::rename(&tmp, mount.join("..data")).expect("swap ..data");
    let m = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", 1.0);
    assert_eq!(metric(&m, "relay_guard_config_last_reload_successful", &[]), 1.0);
    v6(true, "after the swap");
    assert_gate(&lab, "after the swap");

    // kubelet then removes the old version; a second swap is seen too.
    std::fs::remove_dir_all(mount.join("..2026_11_27_v1")).expect("rm old");
    write_version("..2026_11_27_v3", "192.0.2.10\n");
    std::os::unix::fs::symlink("..2026_11_27_v3", &tmp).expect("symlink");
    std::fs::rename(&tmp, mount.join("..data")).expect("swap ..data");
    wait_metric(&lab, &agent, "relay_guard_config_reloads_total", 2.0);
    v6(false, "after the second swap");
}

#[test]
fn reload_attaches_new_interfaces_and_detaches_removed_ones() {
    if !require::privileged("reload_attaches_new_interfaces_and_detaches_removed_ones") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, detach) = setup(&lab, &dir, "192.0.2.10\n");
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    let good = std::fs::read_to_string(&config).expect("read config");
    let xdp_on_lo = || lab.server.ip(&["link", "show", "dev", "lo"]).contains("xdp");
    assert!(!xdp_on_lo());

    // An interface that does not exist: as at start, the reload succeeds,
    // reports it (metric 0, a log line) and waits for it to appear.
    let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
    let missing = good.replacen(
        &format!("[\"{}\"]", lab.server_if),
        &format!("[\"{}\", \"rg-nope0\"]", lab.server_if),
        1,
    );
    replace(&config, &missing);
    let m = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
    assert_eq!(metric(&m, "relay_guard_config_last_reload_successful", &[]), 1.0, "{m}");
    assert_eq!(
        metric(&m, "relay_guard_interface_attached", &[("interface", "rg-nope0")]),
        0.0,
        "{m}"
    );
    assert!(
        m.contains("relay_guard_interface_attached{interface=\"rg-nope0\"} 0"),
        "{m}"
    );
    assert!(
        wait_log(&agent, "does not exist (yet)").contains("does not exist (yet)"),
        "{}",
        agent.log_text()
    );
    assert_gate(&lab, "with a missing interface configured");

    // Adding `lo` attaches to it on reload; removing it detaches.
    let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
    let with_lo = good.replacen(
        &format!("[\"{}\"]", lab.server_if),
        &format!("[\"{}\", \"lo\"]", lab.server_if),
        1,
    );
    replace(&config, &with_lo);
    wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
    assert!(
        xdp_on_lo(),
        "lo not attached after a reload that added it:\n{}",
        agent.log_text()
    );
    let lo_link = link_pin(&detach.pin_dir, "lo");
    assert!(
        lo_link.exists(),
        "no pinned link {} after lo was added",
        lo_link.display()
    );
    assert_gate(&lab, "with lo added");

    let before = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
    replace(&config, &good);
    wait_metric(&lab, &agent, "relay_guard_config_reloads_total", before + 1.0);
    assert!(
        !xdp_on_lo(),
        "lo still attached after a reload that removed it:\n{}",
        agent.log_text()
    );
    assert_gate(&lab, "with lo removed");
}

/// Edits of list files are applied as deltas (only the edited lines are
/// parsed, only the touched blocks written). After a seeded series of random
/// edits — nested prefixes, carve-outs in a deny file, a second guard, IPv6,
/// invalid lines — the kernel must hold exactly what a full compile of the
/// files gives (`status` diffs the two) and the gate must still hold.
#[test]
fn delta_reloads_keep_the_kernel_equal_to_a_full_compile() {
    use rand::{Rng as _, SeedableRng as _};
    if !require::privileged("delta_reloads_keep_the_kernel_equal_to_a_full_compile") {
        return;
    }
    let seed: u64 = std::env::var("RG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (RG_TEST_SEED replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let pin_dir = pin_dir("rg-test-");
    // Allow entries use lengths 8/16/24/32 (and IPv6 /48, /64, /128), deny
    // entries 12/20/28 (and /56): nested, never the same network in both.
    let v4 = |rng: &mut rand::rngs::StdRng, lens: &[u8]| {
        let len = lens[rng.random_range(0..lens.len())];
        let a = u32::from_be_bytes([
            10,
            rng.random_range(0..2),
            rng.random_range(0..32),
            rng.random_range(0..32) * 8,
        ]);
        let net = if len == 0 {
            0
        } else {
            a & (u32::MAX << (32 - u32::from(len)))
        };
        format!("{}/{len}", std::net::Ipv4Addr::from(net))
    };
    let v6 = |rng: &mut rand::rngs::StdRng, lens: &[u8]| {
        let len = lens[rng.random_range(0..lens.len())];
        let a = u128::from(std::net::Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xa0,
            rng.random_range(0..4),
            rng.random_range(0..4),
            0,
            0,
            rng.random_range(0..3),
        ));
        let net = a & (u128::MAX << (128 - u32::from(len)));
        format!("{}/{len}", std::net::Ipv6Addr::from(net))
    };
    let line = |rng: &mut rand::rngs::StdRng, deny: bool| -> String {
        match (rng.random_range(0..10), deny) {
            (0..=6, false) => v4(rng, &[8, 16, 24, 32]),
            (0..=6, true) => v4(rng, &[12, 20, 28]),
            (_, false) => v6(rng, &[48, 64, 128]),
            (_, true) => v6(rng, &[56]),
        }
    };
    let files = ["relay-allow.txt", "relay-deny.txt", "sub-allow.txt"];
    let mut texts: Vec<Vec<String>> = files
        .iter()
        .map(|f| {
            let deny = f.contains("deny");
            (0..150).map(|_| line(&mut rng, deny)).collect()
        })
        .collect();
    // The lab's allowed source stays allowed throughout.
    texts[0].push("192.0.2.10".into());
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    for (f, t) in files.iter().zip(&texts) {
        dir.write(f, &join(t));
    }
    let (config, _detach) = TestConfig::new(&lab.server_if, &pin_dir)
        .guard(
            &Guard::new("relay", &[25])
                .allow_files(&["relay-allow.txt"])
                .deny_files(&["relay-deny.txt"])
                .deny(&["192.0.2.128/25"]),
        )
        .guard(&Guard::new("submission", &[587]).allow_files(&["sub-allow.txt"]))
        .write(&dir);
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    let mut failures = 0.0;
    let rounds = 30;
    for round in 1..=rounds {
        let f = rng.random_range(0..files.len());
        let deny = files[f].contains("deny");
        let before = texts[f].clone();
        // A few splices spread over the file: the edited region spans them.
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..texts[f].len());
            let del = rng.random_range(0..3usize).min(texts[f].len() - at);
            let ins: Vec<String> = (0..rng.random_range(0..3)).map(|_| line(&mut rng, deny)).collect();
            // Never remove the lab's source.
            if !texts[f][at..at + del].iter().any(|l| l == "192.0.2.10") {
                texts[f].splice(at..at + del, ins);
            }
        }
        let invalid = round % 7 == 0;
        if invalid {
            let at = rng.random_range(0..texts[f].len());
            texts[f].insert(at, "10.0.0.1/8".into());
        }
        let reloads = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
        replace(&dir.0.join(files[f]), &join(&texts[f]));
        agent.signal(Signal::SIGHUP);
        let m = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", reloads + 1.0);
        // The watcher may reload the same bytes a second time: let it settle.
        std::thread::sleep(Duration::from_millis(300));
        let m = if invalid {
            wait_metric(&lab, &agent, "relay_guard_config_reload_failures_total", failures + 1.0)
        } else {
            m
        };
        let failed = metric(&m, "relay_guard_config_reload_failures_total", &[]);
        if invalid {
            assert!(
                failed > failures,
                "round {round}: an invalid edit was accepted\n{}",
                agent.log_text()
            );
            failures = failed;
            texts[f] = before;
            let reloads = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
            replace(&dir.0.join(files[f]), &join(&texts[f]));
            agent.signal(Signal::SIGHUP);
            wait_metric(&lab, &agent, "relay_guard_config_reloads_total", reloads + 1.0);
            std::thread::sleep(Duration::from_millis(300));
        } else {
            assert_eq!(
                failed,
                failures,
                "round {round}: a valid edit failed\n{}",
                agent.log_text()
            );
        }
        if round % 5 == 0 || round == rounds {
            let (st, out) = cli(&config, &["status", "--json"]);
            assert!(st.success(), "{out}");
            let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
            assert_eq!(
                v["config_matches_kernel"],
                true,
                "round {round} (seed {seed}): the kernel differs from a full compile\n{out}\n{}",
                agent.log_text()
            );
        }
    }
    let log = agent.log_text();
    let deltas = log
        .lines()
        .filter(|l| l.contains("config reloaded") && l.contains("lines_parsed="))
        .count();
    println!(
        "{rounds} rounds of edits: {deltas} delta reloads, {failures} failed reload attempts (invalid edits); kernel equals a full compile"
    );
    assert!(
        deltas >= rounds / 2,
        "edits of list files should be applied as deltas:\n{log}"
    );

    // A large list edited all over (a regenerated list): its lines are
    // matched by content, kept ones renumbered, only changed ones parsed.
    let sub = dir.0.join(files[2]);
    let mut big: Vec<String> = (0..6000).map(|_| line(&mut rng, false)).collect();
    let apply = |text: &[String]| {
        let reloads = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
        replace(&sub, &join(text));
        agent.signal(Signal::SIGHUP);
        wait_metric(&lab, &agent, "relay_guard_config_reloads_total", reloads + 1.0);
        std::thread::sleep(Duration::from_millis(300));
    };
    apply(&big);
    for _ in 0..40 {
        let at = rng.random_range(0..big.len());
        if rng.random_bool(0.5) {
            big.remove(at);
        } else {
            big.insert(at, line(&mut rng, false));
        }
    }
    let from = agent.log_text().len();
    apply(&big);
    let (st, out) = cli(&config, &["status", "--json"]);
    assert!(st.success(), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(
        v["config_matches_kernel"], true,
        "after edits spread over a 6,000-line list (seed {seed}): the kernel differs from a full compile\n{out}"
    );
    // The reload that carried the edit (a second trigger of the same bytes parses nothing).
    let log = agent.log_text();
    let parsed = log[from..]
        .lines()
        .filter(|l| l.contains("config reloaded"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("lines_parsed="))
                .and_then(|v| v.parse::<usize>().ok())
        })
        .max();
    println!("40 edits spread over a 6,000-line list: {parsed:?} lines parsed");
    assert!(
        matches!(parsed, Some(1..=200)),
        "spread edits should be a delta parsing only the changed lines:\n{}",
        &log[from..]
    );
    assert_eq!(
        metric(&scrape(&lab), "relay_guard_config_reload_failures_total", &[]),
        failures
    );
    assert_gate(&lab, "after the edits");
    let status = agent.stop();
    assert!(status.success());
}
