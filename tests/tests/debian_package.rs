//! The Debian package (cargo-deb): built, installed with dpkg, run,
//! removed (the filter is detached) and purged.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, METRICS, TempDir},
    container::repo,
    deploy::{read, run, run_ok, scrape, strs, text, xdp_attached},
    dpkg::{DEB_TEST_MARKER, PurgeOnDrop, dpkg, dpkg_installed},
    lab::{DENIED_V4, Lab, ip},
    net::{BANNER, BannerServer, connect_banner, metric},
    netns::unique,
    require,
    systemd_unit::{Unit, setpriv, systemd_analyze_usable, systemd_verify},
};

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
