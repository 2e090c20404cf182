//! The Debian package under a real init: a Debian bookworm root file system
//! with systemd and Postfix (mmdebstrap), the project's own .deb (cargo-deb)
//! installed in it, booted by systemd-nspawn with systemd as PID 1 in the
//! lab's server namespace, guarding the lab's veth. From the client
//! namespace a prober connects to Postfix on port 25 throughout.
//!
//! Shown under systemd, not only by `systemd-analyze`: the unit reaches
//! active only once the program is attached (READY=1), Postfix starts after
//! it; `systemctl restart` and SIGKILL of the agent never restart Postfix nor
//! let a denied client in; the sandbox holds (capabilities, read-only /etc,
//! /usr and /sys, writable bpffs and state_dir); a list file broken at boot
//! is survived from state_dir and reported; `systemctl stop` leaves the
//! filter attached; `dpkg --purge` detaches it and removes its state.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{METRICS, TempDir},
    config::{Guard, TestConfig},
    container::{Container, build_deb, debian_rootfs, status_field, unpack},
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, assert_gate, ip},
    net::{connect_banner, http_get, metric},
    netns::unique,
    prober::Prober,
    require,
};

const PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus", "iproute2", "postfix"];
const UNIT: &str = "relay-guard.service";
/// Debian's Postfix daemon (postfix.service is only its umbrella).
const POSTFIX: &str = "postfix@-.service";

/// Removes the test's pins on drop: the container is gone by then, so this
/// detaches the filter (nothing else holds the links).
struct PinsOnDrop(PathBuf);

impl Drop for PinsOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn boot(root: &Path, lab: &Lab, dir: &TempDir, name: &str) -> Container {
    let c = Container::spawn(
        &[
            "-D",
            root.to_str().expect("utf-8"),
            "-b",
            &format!("--network-namespace-path={}", lab.server.path()),
            "--bind=/sys/fs/bpf",
            "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
        ],
        dir.0.join(format!("{name}.log")),
    );
    let state = c.wait_booted(Duration::from_secs(120));
    eprintln!("{name}: booted ({state})");
    c
}

fn xdp_attached(lab: &Lab) -> bool {
    lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains("xdp")
}

fn mono(c: &Container, unit: &str, prop: &str) -> u64 {
    let v = c.prop(unit, prop);
    v.parse().unwrap_or_else(|_| panic!("{unit} {prop}={v:?}"))
}

fn journal(c: &Container) -> String {
    String::from_utf8_lossy(&c.exec(&["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"]).stdout).into_owned()
}

/// Waits until `unit` is active with a main PID other than `old`; its PID.
fn wait_active_new_pid(c: &Container, old: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let state = c.prop(UNIT, "ActiveState");
        let pid = c.prop(UNIT, "MainPID");
        if state == "active" && pid != old && pid != "0" {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{UNIT} not active again ({state}, MainPID {pid}):\n{}",
            journal(c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until Postfix answers the allowed source: its first
/// smtpd after a boot may take longer than the gate's timeout.
fn wait_for_postfix(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while connect_banner(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), 25, Duration::from_secs(3)).is_err() {
        assert!(Instant::now() < deadline, "Postfix never answered the allowed source");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Postfix's master process and when its unit became active: both change
/// when Postfix is restarted. (Debian's postfix@-.service is Type=forking
/// without a PIDFile=, so systemd's MainPID is 0.)
fn postfix_master(c: &Container) -> String {
    let pid = c.sh(&["cat", "/var/spool/postfix/pid/master.pid"]).trim().to_string();
    assert!(pid.parse::<u32>().is_ok_and(|p| p > 0), "master.pid: {pid:?}");
    format!(
        "master pid {pid}, active since {} µs",
        c.prop(POSTFIX, "ActiveEnterTimestampMonotonic")
    )
}

/// The in-container /proc/PID/status of the agent.
fn agent_status(c: &Container) -> (String, String) {
    let pid = c.prop(UNIT, "MainPID");
    (pid.clone(), c.sh(&["cat", &format!("/proc/{pid}/status")]))
}

#[test]
fn deb_under_systemd_orders_postfix_survives_restarts_and_purges() {
    let name = "deb_under_systemd_orders_postfix_survives_restarts_and_purges";
    if !require::privileged_with(name, &["mmdebstrap", "systemd-nspawn", "tar", "cargo", "cargo-deb"]) {
        return;
    }
    let dir = TempDir::new();
    let deb = build_deb(&dir.0);
    let tarball = debian_rootfs(PACKAGES);
    let root = dir.0.join("root");
    unpack(&tarball, &root);
    std::fs::copy(&deb, root.join("root/relay-guard.deb")).expect("copy the .deb in");

    let lab = Lab::new();
    let pins = PathBuf::from(format!("/sys/fs/bpf/{}", unique("deploy-real-sd-")));
    let _pins = PinsOnDrop(pins.clone());
    let config = TestConfig::new(&lab.server_if, &pins)
        .xdp_mode("auto")
        .state_dir(Path::new("/var/lib/relay-guard"))
        .guard(
            &Guard::new("relay", &[25])
                .allow(&["127.0.0.0/8"])
                .allow_files(&["/etc/relay-guard/relay-allow.txt"]),
        )
        .text();

    // Boot 1: install as an operator does, on a running system.
    {
        let mut c = boot(&root, &lab, &dir, "boot1");
        let out = c.sh(&["dpkg", "-i", "/root/relay-guard.deb"]);
        assert!(out.contains("relay-guard check-config"), "postinst:\n{out}");
        assert_eq!(c.prop(UNIT, "LoadState"), "loaded");
        assert_eq!(
            c.prop(UNIT, "UnitFileState"),
            "disabled",
            "installed, not enabled (the example config names eth0)"
        );
        std::fs::write(root.join("etc/relay-guard/relay-guard.toml"), &config).expect("write config");
        std::fs::write(root.join("etc/relay-guard/relay-allow.txt"), format!("{ALLOWED_V4}\n")).expect("write list");
        c.sh(&["relay-guard", "check-config"]);
        c.sh(&["systemctl", "enable", UNIT]);
        // Observe the moment between READY=1 and active: ExecStartPost= runs
        // after the agent's READY=1 and before systemd counts the unit as
        // started (test-only drop-in; it records, it never fails the unit).
        let dropin = root.join("etc/systemd/system/relay-guard.service.d");
        std::fs::create_dir_all(&dropin).expect("mkdir drop-in");
        std::fs::write(
            dropin.join("zz-test-observe.conf"),
            format!(
                "[Service]\nExecStartPost=-/bin/sh -c 'ip -o link show dev {} > /run/relay-guard/at-ready; ls {}/*/links >> /run/relay-guard/at-ready'\n",
                lab.server_if,
                pins.display()
            ),
        )
        .expect("write drop-in");
        assert!(c.poweroff(), "boot 1 did not power off:\n{}", c.log_text());
    }
    assert!(!xdp_attached(&lab), "nothing attached before the enabled unit ran");

    // Boot 2: enabled at boot. The prober runs from before the boot.
    let prober = Prober::start(&lab.client, ip(ALLOWED_V4), ip(DENIED_V4), ip(SERVER_V4), 25);
    {
        let mut c = boot(&root, &lab, &dir, "boot2");
        let at_ready = c.exec(&["cat", "/run/relay-guard/at-ready"]);
        let at_ready = format!(
            "{}{}",
            String::from_utf8_lossy(&at_ready.stdout),
            String::from_utf8_lossy(&at_ready.stderr)
        );
        assert!(
            at_ready.contains(" xdp") && at_ready.contains(&lab.server_if),
            "the program was not attached when the agent said READY=1:\n{at_ready}\n{}\n{}",
            String::from_utf8_lossy(
                &c.exec(&["systemctl", "status", "--no-pager", "-l", UNIT, POSTFIX])
                    .stdout
            ),
            journal(&c)
        );
        let rg_start = mono(&c, UNIT, "InactiveExitTimestampMonotonic");
        let rg_active = mono(&c, UNIT, "ActiveEnterTimestampMonotonic");
        let pf_start = mono(&c, POSTFIX, "InactiveExitTimestampMonotonic");
        let pf_main = mono(&c, POSTFIX, "ActiveEnterTimestampMonotonic");
        eprintln!(
            "boot 2: relay-guard starting {rg_start} µs, active {rg_active} µs (+{} ms); postfix@- starting {pf_start} µs, \
             active {pf_main} µs (+{} ms after relay-guard active)",
            (i128::from(rg_active) - i128::from(rg_start)) / 1000,
            (i128::from(pf_main) - i128::from(rg_active)) / 1000
        );
        assert!(rg_start < rg_active, "{UNIT}: {rg_start} !< {rg_active}");
        assert!(
            rg_active <= pf_start && pf_start <= pf_main,
            "Postfix started before relay-guard was active: relay-guard active at {rg_active} µs, postfix@- started \
             at {pf_start} µs"
        );
        assert_eq!(c.prop(POSTFIX, "ActiveState"), "active");
        let denied_before_up = prober.tally.denied_admitted.load(Ordering::Relaxed);
        assert_eq!(denied_before_up, 0, "a denied client reached port 25 during boot");
        wait_for_postfix(&lab);
        let failed_at_boot = prober.tally.allowed_failed.load(Ordering::Relaxed);
        assert_gate(&lab, "boot 2");

        // The sandbox, as systemd applied it to the running agent.
        let (pid, status) = agent_status(&c);
        let want = (1u64 << 12) | (1 << 38) | (1 << 39); // NET_ADMIN, PERFMON, BPF
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            let got = u64::from_str_radix(&status_field(&status, field), 16).expect("hex");
            assert_eq!(got, want, "{field} of the agent is {got:#x}, want {want:#x}");
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
        assert_eq!(status_field(&status, "Seccomp"), "2", "SystemCallFilter= applied");
        let host = c.host_pid(pid.parse().expect("pid")).to_string();
        let in_agent_mounts = |args: &[&str]| {
            let mut v = vec!["nsenter", "-t", &host, "-m", "--"];
            v.extend_from_slice(args);
            std::process::Command::new(v[0])
                .args(&v[1..])
                .output()
                .expect("nsenter")
        };
        for path in [
            "/etc/deploy-real-probe",
            "/usr/deploy-real-probe",
            "/var/lib/deploy-real-probe",
        ] {
            let o = in_agent_mounts(&["touch", path]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains("Read-only file system"),
                "{path} is writable in the agent's mount namespace: {err}"
            );
        }
        let o = in_agent_mounts(&["sh", "-c", "echo 1500 > /sys/class/net/lo/mtu"]);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("Read-only file system"),
            "/sys is writable for the agent: {o:?}"
        );
        let probe = format!("{}/deploy-real-probe", pins.display());
        assert!(
            in_agent_mounts(&["mkdir", &probe]).status.success(),
            "bpffs is read-only for the agent"
        );
        assert!(in_agent_mounts(&["rmdir", &probe]).status.success());
        assert!(
            in_agent_mounts(&["touch", "/var/lib/relay-guard/deploy-real-probe"])
                .status
                .success(),
            "state_dir is read-only for the agent"
        );
        in_agent_mounts(&["rm", "/var/lib/relay-guard/deploy-real-probe"]);

        // restart and SIGKILL: Postfix stays, the gate stays closed.
        let postfix_pid = postfix_master(&c);
        c.sh(&["systemctl", "restart", UNIT]);
        let pid2 = wait_active_new_pid(&c, &pid, Duration::from_secs(30));
        assert!(xdp_attached(&lab));
        c.sh(&["systemctl", "kill", "--signal=KILL", UNIT]);
        let killed_at = Instant::now();
        let pid3 = wait_active_new_pid(&c, &pid2, Duration::from_secs(60));
        eprintln!(
            "SIGKILL: systemd restarted the agent after {:.1?} (RestartSec=5s); NRestarts={}",
            killed_at.elapsed(),
            c.prop(UNIT, "NRestarts")
        );
        assert_eq!(c.prop(UNIT, "NRestarts"), "1", "systemd restarted the killed agent");
        assert_ne!(pid3, pid2);
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            postfix_master(&c),
            postfix_pid,
            "Postfix was restarted with relay-guard"
        );
        assert_eq!(c.prop(POSTFIX, "NRestarts"), "0");
        let (tally, errors) = prober.finish();
        let (ok, failed, blocked, admitted) = tally.counts();
        eprintln!(
            "prober, boot through restart and SIGKILL: allowed {ok} ok / {failed} failed ({failed_at_boot} before \
             Postfix was up), denied {blocked} blocked / {admitted} admitted"
        );
        assert_eq!(admitted, 0, "a denied client got through: {errors:?}");
        assert!(blocked > 10 && ok > 10, "the prober ran: {ok} ok, {blocked} blocked");
        assert_eq!(
            failed, failed_at_boot,
            "an allowed client failed after boot (restart or SIGKILL closed port 25): {errors:?}"
        );
        assert!(c.poweroff(), "boot 2 did not power off:\n{}", c.log_text());
    }

    // A reboot loses the pins (bpffs is memory): remove them, as a reboot would.
    std::fs::remove_dir_all(&pins).expect("remove pins");
    assert!(!xdp_attached(&lab), "the filter outlived its pins");
    // Boot 3: the list file is broken at boot (a half-downloaded list).
    std::fs::write(
        root.join("etc/relay-guard/relay-allow.txt"),
        "192.0.2.10\nthis is not an address\n",
    )
    .expect("break list");
    {
        let c = boot(&root, &lab, &dir, "boot3");
        assert_eq!(
            c.prop(UNIT, "ActiveState"),
            "active",
            "the unit did not start from state_dir:\n{}",
            journal(&c)
        );
        assert!(xdp_attached(&lab));
        wait_for_postfix(&lab);
        assert_gate(&lab, "boot 3, broken list, guarding from state_dir");
        let m = http_get(
            &lab.server,
            METRICS.parse::<SocketAddr>().expect("constant"),
            "/metrics",
        )
        .expect("metrics answer");
        assert_eq!(metric(&m, "relay_guard_config_last_reload_successful", &[]), 0.0);
        let log = journal(&c);
        assert!(
            log.contains("relay-allow.txt") && log.contains("this is not an address"),
            "the journal does not name the broken list and line:\n{log}"
        );

        // stop leaves the filter attached.
        let postfix_pid = postfix_master(&c);
        c.sh(&["systemctl", "stop", UNIT]);
        assert_eq!(c.prop(UNIT, "ActiveState"), "inactive");
        assert!(
            xdp_attached(&lab) && pins.exists(),
            "systemctl stop detached the filter"
        );
        assert_gate(&lab, "after systemctl stop");
        assert_eq!(postfix_master(&c), postfix_pid, "stop restarted Postfix");

        // purge detaches and removes the state.
        assert!(
            root.join("var/lib/relay-guard/current").exists(),
            "no last good copy in state_dir"
        );
        let out = c.sh(&["dpkg", "--purge", "relay-guard"]);
        assert!(out.contains("detach"), "prerm says it detaches:\n{out}");
        assert!(!xdp_attached(&lab), "still attached after purge:\n{out}");
        assert!(!pins.exists(), "pins left after purge");
        for gone in ["var/lib/relay-guard", "etc/relay-guard", "usr/bin/relay-guard"] {
            assert!(!root.join(gone).exists(), "/{gone} left after purge");
        }
        // The port is open again: the detach was real.
        let got = connect_banner(&lab.client, ip(DENIED_V4), ip(SERVER_V4), 25, Duration::from_secs(3));
        assert!(
            got.is_ok_and(|b| b.starts_with("220 ")),
            "Postfix answers everyone after purge"
        );
    }
}
