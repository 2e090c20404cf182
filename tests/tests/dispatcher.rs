//! Sharing the interface with other XDP programs (SPEC.md, "Sharing the
//! interface with other XDP programs"): libxdp's dispatcher protocol v2,
//! with xdp-filter and xdp-loader from Debian's xdp-tools as the other
//! party. Real agent, real XDP on veth between namespaces, real TCP.
//!
//! Whether a libxdp dispatcher can run at all depends on the kernel: it
//! needs extension (freplace) programs, which some kernels refuse with EPERM
//! (seen on a 6.18 kernel locked down in `confidentiality` mode with the BPF
//! LSM enabled). Then libxdp loads xdp-filter as a single program (no
//! dispatcher), and relay-guard must refuse it by name and leave it working;
//! and `xdp_dispatcher = true` must still guard (directly). Each test checks
//! the branch the kernel allows, and says which one ran.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, METRICS, TempDir},
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, ip, pin_dir},
    net::connect_banner,
    netns::NetNs,
    prober::ALLOWED_TIMEOUT,
    require,
};

/// xdp-filter keeps global state (/sys/fs/bpf/xdp-filter, /run/xdp-filter.lck):
/// the tests of this file use it one at a time.
static XDP_FILTER: Mutex<()> = Mutex::new(());

/// A source relay-guard allows and xdp-filter is told to drop.
const FILTERED_V4: &str = ALLOWED_V4;

fn config_text(iface: &str, pins: &Path, state: &Path, extra: &str) -> String {
    format!(
        r#"interfaces = ["{iface}"]
mode = "enforce"
xdp_mode = "skb"
{extra}
metrics_listen = "{METRICS}"
pin_dir = "{pins}"
state_dir = "{state}"

[[guard]]
name = "relay"
ports = [25]
allow = ["192.0.2.0/25", "2001:db8:a::/48"]
"#,
        pins = pins.display(),
        state = state.display(),
    )
}

fn setup(dir: &TempDir, lab: &Lab, extra: &str) -> (PathBuf, DetachOnDrop) {
    let pins = pin_dir("dispatcher-");
    let state = dir.0.join("state");
    let config = dir.write("relay-guard.toml", &config_text(&lab.server_if, &pins, &state, extra));
    (config.clone(), DetachOnDrop::new(config, pins))
}

/// Runs `args` in `ns`'s network namespace only (nsenter --net: bpffs stays
/// visible, which `ip netns exec` would hide); (success, stdout+stderr).
fn in_ns(ns: &NetNs, args: &[&str]) -> (bool, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .args(args)
        .output()
        .expect("run nsenter");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Unloads xdp-filter from the interface when dropped.
struct XdpFilter<'a> {
    ns: &'a NetNs,
    iface: String,
}

impl<'a> XdpFilter<'a> {
    /// `xdp-filter load -m skb IFACE` and a rule dropping [`FILTERED_V4`].
    fn load(ns: &'a NetNs, iface: &str) -> (XdpFilter<'a>, bool, String) {
        let (ok, text) = in_ns(ns, &["xdp-filter", "load", "-v", "-m", "skb", iface]);
        let f = XdpFilter {
            ns,
            iface: iface.to_string(),
        };
        if ok {
            let (ok, t) = in_ns(ns, &["xdp-filter", "ip", FILTERED_V4, "-m", "src"]);
            assert!(ok, "xdp-filter ip: {t}");
        }
        (f, ok, text)
    }
}

impl Drop for XdpFilter<'_> {
    fn drop(&mut self) {
        let _ = in_ns(self.ns, &["xdp-filter", "unload", "--all", &self.iface]);
    }
}

/// `xdp-loader status IFACE`.
fn loader_status(ns: &NetNs, iface: &str) -> String {
    in_ns(ns, &["xdp-loader", "status", iface]).1
}

/// The id of the XDP program on `iface` (from `ip link`), if any.
fn xdp_prog_id(ns: &NetNs, iface: &str) -> Option<u32> {
    let text = ns.ip(&["-d", "link", "show", "dev", iface]);
    let at = text.find("prog/xdp id ")?;
    text[at + 12..].split_whitespace().next()?.parse().ok()
}

fn connects(lab: &Lab, src: &str) -> bool {
    connect_banner(&lab.client, ip(src), ip(SERVER_V4), 25, ALLOWED_TIMEOUT).is_ok()
}

fn require(test: &str) -> bool {
    require::privileged_with(test, &["xdp-filter", "xdp-loader"])
}

/// xdp-filter first, then relay-guard. With a dispatcher (the kernel runs
/// extension programs): relay-guard joins it, `xdp-loader status` lists
/// both, and both verdicts hold. Without (libxdp fell back to a single
/// program): relay-guard refuses, naming xdp-filter's program and its id,
/// and xdp-filter stays attached and filtering.
#[test]
fn xdp_filter_first_then_relay_guard() {
    if !require("xdp_filter_first_then_relay_guard") {
        return;
    }
    let _one = XDP_FILTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new();
    let _server = relay_guard_tests::net::BannerServer::start(&lab.server, &[25]);
    let dir = TempDir::new();
    let (config, _detach) = setup(&dir, &lab, "");
    let (_filter, ok, text) = XdpFilter::load(&lab.server, &lab.server_if);
    assert!(ok, "xdp-filter load: {text}");
    let before = xdp_prog_id(&lab.server, &lab.server_if).expect("xdp-filter attached");
    let status = loader_status(&lab.server, &lab.server_if);
    assert!(!connects(&lab, FILTERED_V4), "xdp-filter does not drop {FILTERED_V4}");
    assert!(connects(&lab, DENIED_V4), "nothing should drop {DENIED_V4} yet");

    if status.contains("xdp_dispatcher") {
        println!("branch: libxdp dispatcher (the kernel runs extension programs)");
        let agent = Agent::start(&lab.server, config, &dir);
        let status = loader_status(&lab.server, &lab.server_if);
        let rg = status.find("relay_guard").unwrap_or_else(|| panic!("{status}"));
        let xf = status.find("xdpfilt_").unwrap_or_else(|| panic!("{status}"));
        assert!(
            rg < xf,
            "relay_guard (priority 10, name first) runs before xdp-filter:\n{status}"
        );
        assert!(!connects(&lab, FILTERED_V4), "xdp-filter's verdict lost");
        assert!(!connects(&lab, DENIED_V4), "relay-guard's verdict missing");
        drop(agent);
    } else {
        println!("branch: no dispatcher (libxdp loaded xdp-filter as a single program):\n{text}");
        let name = status
            .lines()
            .find(|l| l.contains("xdpfilt_"))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("xdpfilt_")))
            .expect("xdp-loader status names xdp-filter's program")
            .to_string();
        let mut run = Agent::spawn(&lab.server, config, &dir, &["run"]);
        let exit = run.wait(Duration::from_secs(15));
        let log = run.log_text();
        assert!(!exit.success(), "the agent started beside a foreign program:\n{log}");
        assert!(
            log.contains(&format!("already runs XDP program `{name}` (id {before})")),
            "the error must name the program and its id:\n{log}"
        );
        assert!(log.contains("xdp-loader load"), "the error says what to do:\n{log}");
        assert_eq!(
            xdp_prog_id(&lab.server, &lab.server_if),
            Some(before),
            "xdp-filter was replaced"
        );
        assert!(!connects(&lab, FILTERED_V4), "xdp-filter stopped filtering");
        assert!(connects(&lab, DENIED_V4), "something else took over the interface");
    }
}

/// relay-guard first (`xdp_dispatcher = true`), then xdp-filter. With
/// extension programs: relay-guard installs a libxdp-compatible
/// dispatcher, xdp-filter joins it, both verdicts hold, and `detach` leaves
/// xdp-filter in place. Without: relay-guard says why and guards directly
/// (never unguarded), and xdp-filter's failed load leaves it guarding.
#[test]
fn relay_guard_first_then_xdp_filter() {
    if !require("relay_guard_first_then_xdp_filter") {
        return;
    }
    let _one = XDP_FILTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new();
    let _server = relay_guard_tests::net::BannerServer::start(&lab.server, &[25]);
    let dir = TempDir::new();
    let (config, detach) = setup(&dir, &lab, "xdp_dispatcher = true\nxdp_priority = 10");
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    let log = agent.log_text();
    assert!(connects(&lab, ALLOWED_V4), "allowed source refused:\n{log}");
    assert!(!connects(&lab, DENIED_V4), "denied source admitted:\n{log}");
    let status = loader_status(&lab.server, &lab.server_if);

    if log.contains("XDP dispatcher in place") {
        println!("branch: relay-guard installed a dispatcher");
        assert!(
            status.contains("xdp_dispatcher") && status.contains("relay_guard"),
            "{status}"
        );
        let (_filter, ok, text) = XdpFilter::load(&lab.server, &lab.server_if);
        assert!(ok, "xdp-filter could not join relay-guard's dispatcher: {text}");
        let status = loader_status(&lab.server, &lab.server_if);
        assert!(
            status.contains("relay_guard") && status.contains("xdpfilt_"),
            "{status}"
        );
        assert!(!connects(&lab, FILTERED_V4), "xdp-filter's verdict missing");
        assert!(!connects(&lab, DENIED_V4), "relay-guard's verdict lost");
        drop(agent);
        let (ok, t) = in_ns(
            &lab.server,
            &[
                relay_guard_tests::agent::agent_bin().to_str().expect("utf-8"),
                "--config",
                config.to_str().expect("utf-8"),
                "detach",
            ],
        );
        assert!(ok, "detach: {t}");
        let status = loader_status(&lab.server, &lab.server_if);
        assert!(
            !status.contains("relay_guard") && status.contains("xdpfilt_"),
            "{status}"
        );
        assert!(connects(&lab, DENIED_V4), "relay-guard still filters after detach");
        assert!(!connects(&lab, FILTERED_V4), "detach took xdp-filter out");
    } else {
        println!("branch: the kernel refuses extension programs; relay-guard attached directly");
        assert!(
            log.contains("the kernel refuses extension programs") && log.contains("attaching directly"),
            "the fallback must say why:\n{log}"
        );
        assert!(!status.contains("xdp_dispatcher"), "{status}");
        let ours = xdp_prog_id(&lab.server, &lab.server_if).expect("relay-guard attached");
        let (_filter, ok, text) = XdpFilter::load(&lab.server, &lab.server_if);
        assert!(!ok, "xdp-filter replaced relay-guard's direct attachment: {text}");
        assert_eq!(xdp_prog_id(&lab.server, &lab.server_if), Some(ours));
        assert!(
            connects(&lab, ALLOWED_V4),
            "allowed source refused after xdp-filter's attempt"
        );
        assert!(!connects(&lab, DENIED_V4), "relay-guard stopped guarding");
        drop(agent);
    }
    drop(detach);
}

/// A foreign program that is not a dispatcher, attached with `ip link set
/// dev X xdpgeneric obj ...` (libxdp's own dispatcher object, loaded without
/// its configuration, so not a usable dispatcher): relay-guard refuses with
/// its name and id, and the program stays attached.
#[test]
fn foreign_program_is_refused_by_name() {
    if !require("foreign_program_is_refused_by_name") {
        return;
    }
    let obj = "/usr/lib/x86_64-linux-gnu/bpf/xdp-dispatcher.o";
    if !Path::new(obj).exists() {
        require::skip(
            "foreign_program_is_refused_by_name",
            &format!("{obj} (xdp-tools) not found"),
        );
        return;
    }
    // iproute2 makes its pinning directories on bpffs when it loads an
    // object: remove them afterwards when this test made them (empty).
    struct IprouteDirs(bool);
    impl Drop for IprouteDirs {
        fn drop(&mut self) {
            if self.0 {
                for d in ["/sys/fs/bpf/tc/globals", "/sys/fs/bpf/xdp/globals", "/sys/fs/bpf/tc"] {
                    let _ = std::fs::remove_dir(d);
                }
                let _ = std::fs::remove_file("/sys/fs/bpf/ip");
            }
        }
    }
    let _iproute = IprouteDirs(!Path::new("/sys/fs/bpf/tc").exists());
    let lab = Lab::new();
    let dir = TempDir::new();
    let (config, _detach) = setup(&dir, &lab, "");
    lab.server.ip(&[
        "link",
        "set",
        "dev",
        &lab.server_if,
        "xdpgeneric",
        "obj",
        obj,
        "sec",
        "xdp",
    ]);
    let id = xdp_prog_id(&lab.server, &lab.server_if).expect("foreign program attached");
    let mut run = Agent::spawn(&lab.server, config, &dir, &["run"]);
    let exit = run.wait(Duration::from_secs(15));
    let log = run.log_text();
    assert!(!exit.success(), "the agent started beside a foreign program:\n{log}");
    assert!(
        log.contains(&format!("already runs XDP program `xdp_dispatcher` (id {id})"))
            && log.contains("another version (magic 0"),
        "the error must name the program, its id and why it is not a usable dispatcher:\n{log}"
    );
    assert_eq!(
        xdp_prog_id(&lab.server, &lab.server_if),
        Some(id),
        "the foreign program was replaced"
    );
}

/// libxdp recognises relay-guard's Rust dispatcher as a version-2
/// dispatcher it can operate on (program name, its single read-only config
/// map of 124 bytes, magic, version, the pins directory), and relay-guard
/// recognises it back: an empty dispatcher of relay-guard's build attached
/// by netlink as libxdp attaches its own is reported by `xdp-loader status`
/// as a multiprog, relay-guard's `run` treats it as a dispatcher to join
/// (never replaces it), and `xdp-loader unload --all` removes it.
#[test]
fn libxdp_recognises_the_rust_dispatcher() {
    use relay_guard::kernel::dispatcher::{self, Config};
    if !require("libxdp_recognises_the_rust_dispatcher") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let (config, _detach) = setup(&dir, &lab, "");
    let cfg = Config {
        magic: dispatcher::MAGIC,
        dispatcher_version: dispatcher::VERSION,
        ..Config::default()
    };
    let (ebpf, fd) = dispatcher::load_dispatcher(&cfg, false).expect("load relay-guard's dispatcher");
    let id = dispatcher::program_id(&ebpf).expect("its id");
    let ifindex: u32 = lab
        .server
        .exec(&["cat", &format!("/sys/class/net/{}/ifindex", lab.server_if)])
        .trim()
        .parse()
        .unwrap_or(0);
    // /sys/class/net in `ip netns exec` is the namespace's own.
    assert!(ifindex > 0);
    let pins = dispatcher::xdp_dir().join(format!("dispatch-{ifindex}-{id}"));
    std::fs::create_dir_all(&pins).expect("mkdir dispatcher pins");
    struct Unpin(PathBuf);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unpin = Unpin(pins.clone());
    let raw = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&fd));
    lab.server
        .run(move || dispatcher::netlink_attach(ifindex, Some(raw), None, dispatcher::XDP_FLAGS_SKB_MODE))
        .expect("attach the dispatcher by netlink");
    drop(ebpf);
    assert_eq!(xdp_prog_id(&lab.server, &lab.server_if), Some(id));

    let (_, verbose) = in_ns(&lab.server, &["xdp-loader", "status", "-vv", &lab.server_if]);
    assert!(
        verbose.contains(&format!("Found multiprog with id {id} and 0 component progs")),
        "libxdp does not take relay-guard's dispatcher for a multiprog:\n{verbose}"
    );
    assert!(verbose.contains("Verified XDP dispatcher version 2"), "{verbose}");

    // relay-guard takes it for a dispatcher: it tries to join (on a kernel
    // that refuses extension programs the join fails, saying why), and it
    // never replaces it.
    let mut run = Agent::spawn(&lab.server, config, &dir, &["run"]);
    let exit = run.wait(Duration::from_secs(15));
    let log = run.log_text();
    if exit.success() || log.contains("joined the XDP dispatcher") {
        println!("branch: the kernel runs extension programs; relay-guard joined");
        assert!(log.contains("joined the XDP dispatcher"), "{log}");
    } else {
        println!("branch: the kernel refuses extension programs");
        assert!(
            log.contains("cannot share interface") && log.contains("refuses extension"),
            "relay-guard did not take it for a dispatcher to join:\n{log}"
        );
        assert!(!log.contains("which is not a libxdp dispatcher"), "{log}");
        assert_eq!(
            xdp_prog_id(&lab.server, &lab.server_if),
            Some(id),
            "the dispatcher was replaced"
        );
    }

    let (ok, text) = in_ns(&lab.server, &["xdp-loader", "unload", "--all", &lab.server_if]);
    assert!(ok, "xdp-loader could not unload relay-guard's dispatcher: {text}");
    assert_eq!(
        xdp_prog_id(&lab.server, &lab.server_if),
        None,
        "still attached after xdp-loader unload"
    );
}
