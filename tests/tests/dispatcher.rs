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
    agent::{Agent, DetachOnDrop, TempDir},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, ip, pin_dir, wait_metrics},
    net::connect_banner,
    netns::NetNs,
    prober::{ALLOWED_TIMEOUT, Prober},
    require,
};

/// xdp-filter keeps global state (/sys/fs/bpf/xdp-filter, /run/xdp-filter.lck):
/// the tests of this file use it one at a time.
static XDP_FILTER: Mutex<()> = Mutex::new(());

/// A source relay-guard allows and xdp-filter is told to drop.
const FILTERED_V4: &str = ALLOWED_V4;

/// Generic XDP, the relay guard on port 25, and `extra` top-level keys.
fn setup(dir: &TempDir, lab: &Lab, extra: &str) -> (PathBuf, DetachOnDrop) {
    TestConfig::new(&lab.server_if, &pin_dir("dispatcher-"))
        .xdp_mode("skb")
        .keys(extra)
        .state_dir(&dir.0.join("state"))
        .guard(&Guard::new("relay", &[25]).allow(&["192.0.2.0/25", "2001:db8:a::/48"]))
        .write(dir)
}

/// xdp-tools' commands take a process lock of their own (a PID file under
/// /run, one per tool, shared by every namespace): one started while another
/// creates that file fails with "Unable to read PID from lockfile". The
/// tests of this binary run in parallel threads, so their xdp-tools commands
/// go one at a time. (relay-guard takes no such lock; libxdp's own lock on
/// bpffs waits rather than fails.)
static XDP_TOOLS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `args` in `ns`'s network namespace only (nsenter --net: bpffs stays
/// visible, which `ip netns exec` would hide); (success, stdout+stderr).
fn in_ns(ns: &NetNs, args: &[&str]) -> (bool, String) {
    let _one_at_a_time = args
        .first()
        .filter(|tool| tool.starts_with("xdp-"))
        .map(|_| XDP_TOOLS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .args(args)
        .output()
        .expect("run nsenter");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `relay-guard --config CONFIG COMMAND` in `ns`'s network namespace only
/// (where the interface's dispatcher is found); (success, stdout+stderr).
fn cli_in_ns(ns: &NetNs, config: &Path, command: &str) -> (bool, String) {
    let agent = relay_guard_tests::agent::agent_bin();
    in_ns(
        ns,
        &[
            agent.to_str().expect("utf-8"),
            "--config",
            config.to_str().expect("utf-8"),
            command,
        ],
    )
}

/// `detach` takes relay-guard out of the dispatcher and leaves xdp-filter:
/// the denied source connects again.
fn detach_leaves_xdp_filter(lab: &Lab, config: &Path) {
    let (ok, t) = cli_in_ns(&lab.server, config, "detach");
    assert!(ok, "detach: {t}");
    let status = loader_status(&lab.server, &lab.server_if);
    assert!(
        !status.contains("relay_guard") && status.contains("xdpfilt_"),
        "{status}"
    );
    assert!(connects(lab, DENIED_V4), "relay-guard still filters after detach");
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
        detach_leaves_xdp_filter(&lab, &config);
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
    // The agent either joins (and runs on) or exits refusing.
    let mut run = Agent::spawn(&lab.server, config, &dir, &["run"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15 * u64::from(relay_guard_tests::slowdown()));
    while run.exited().is_none()
        && !run.log_text().contains("joined the XDP dispatcher")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = run.log_text();
    if log.contains("joined the XDP dispatcher") {
        println!("branch: the kernel runs extension programs; relay-guard joined");
        let status = loader_status(&lab.server, &lab.server_if);
        assert!(
            status.contains("relay_guard"),
            "relay-guard's slot is not listed:\n{status}"
        );
        drop(run);
    } else {
        assert!(run.exited().is_some(), "the agent neither joined nor exited:\n{log}");
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

/// A second client address that relay-guard allows and xdp-filter does not
/// drop (the lab's ALLOWED_V4 is xdp-filter's target in these tests).
const OTHER_ALLOWED_V4: &str = "192.0.2.11";

/// Gives the client [`OTHER_ALLOWED_V4`] too.
fn add_other_allowed(lab: &Lab) {
    lab.client
        .ip(&["addr", "add", &format!("{OTHER_ALLOWED_V4}/32"), "dev", &lab.client_if]);
    lab.server.ip(&[
        "neigh",
        "replace",
        OTHER_ALLOWED_V4,
        "lladdr",
        relay_guard_tests::lab::CLIENT_MAC,
        "dev",
        &lab.server_if,
        "nud",
        "permanent",
    ]);
}

/// The prober's figures, asserted gap-free: every allowed probe answered,
/// no denied one admitted, and enough of both to mean something.
fn assert_no_gap(what: &str, prober: Prober, log: &str) {
    let (tally, errors) = prober.finish();
    let (ok, failed, blocked, admitted) = tally.counts();
    println!("{what}: allowed {ok} ok / {failed} failed; denied {blocked} blocked / {admitted} admitted");
    assert!(ok > 0 && blocked > 0, "{what}: the prober ran too little");
    assert_eq!((failed, admitted), (0, 0), "{what}: a gap: {errors:?}\n{log}");
}

/// relay-guard inside a libxdp dispatcher beside xdp-filter, through every
/// change of its own: restarted by SIGTERM and by SIGKILL, upgraded across
/// layouts, detached, started again, and then xdp-filter unloaded. Two
/// continuous probers run throughout: one for relay-guard's verdicts (an
/// allowed and a denied source), one for xdp-filter's (the source it
/// drops). Neither verdict has a gap while its program is meant to be
/// there; `detach` takes out only relay-guard's slot and `xdp-filter
/// unload` only xdp-filter's.
///
/// Where the kernel refuses extension programs (no dispatcher), what it
/// allows: each start of relay-guard is refused by name while xdp-filter
/// keeps filtering under the prober, and after `xdp-filter unload`
/// relay-guard attaches directly and guards.
#[test]
fn restarts_upgrade_detach_and_unload_inside_the_dispatcher() {
    use nix::sys::signal::Signal;
    const TEST: &str = "restarts_upgrade_detach_and_unload_inside_the_dispatcher";
    if !require(TEST) {
        return;
    }
    let _one = XDP_FILTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new();
    add_other_allowed(&lab);
    let _server = relay_guard_tests::net::BannerServer::start(&lab.server, &[25]);
    let dir = TempDir::new();
    let (config, detach) = setup(&dir, &lab, "");
    let pins = detach.pin_dir.clone();
    let (filter, ok, text) = XdpFilter::load(&lab.server, &lab.server_if);
    assert!(ok, "xdp-filter load: {text}");
    let shared = loader_status(&lab.server, &lab.server_if).contains("xdp_dispatcher");
    let rg_prober = || Prober::start(&lab.client, ip(OTHER_ALLOWED_V4), ip(DENIED_V4), ip(SERVER_V4), 25);
    let xf_prober = || Prober::start(&lab.client, ip(OTHER_ALLOWED_V4), ip(FILTERED_V4), ip(SERVER_V4), 25);

    if !shared {
        println!("branch: no dispatcher (the kernel refuses extension programs)");
        let xf = xf_prober();
        for attempt in 0..2 {
            let mut run = Agent::spawn(&lab.server, config.clone(), &dir, &["run"]);
            let exit = run.wait(Duration::from_secs(15));
            let log = run.log_text();
            assert!(
                !exit.success(),
                "start {attempt}: the agent started beside a single program:\n{log}"
            );
            assert!(log.contains("already runs XDP program `xdpfilt_"), "{log}");
        }
        assert_no_gap("xdp-filter while relay-guard was refused", xf, "");
        drop(filter);
        let agent = Agent::start(&lab.server, config, &dir);
        assert!(connects(&lab, OTHER_ALLOWED_V4), "{}", agent.log_text());
        assert!(
            !connects(&lab, DENIED_V4),
            "relay-guard does not guard after xdp-filter unload"
        );
        return;
    }

    println!("branch: libxdp dispatcher (the kernel runs extension programs)");
    let xf = xf_prober();
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    assert!(
        agent.log_text().contains("joined the XDP dispatcher"),
        "{}",
        agent.log_text()
    );
    let rg = rg_prober();
    std::thread::sleep(Duration::from_millis(500));

    // Restart by SIGTERM, then by SIGKILL: the slot stays in the
    // dispatcher while no agent runs, and the new agent replaces it.
    assert!(agent.stop().success(), "{}", agent.log_text());
    std::thread::sleep(Duration::from_millis(500));
    agent = Agent::start(&lab.server, config.clone(), &dir);
    agent.signal(Signal::SIGKILL);
    let _ = agent.wait(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    agent = Agent::start(&lab.server, config.clone(), &dir);

    // Upgrade across layouts: the previous version's state (renamed as
    // claims.rs does) holds the slot; the new agent takes it over.
    assert!(agent.stop().success(), "{}", agent.log_text());
    let ours = format!("layout-{}", relay_guard_common::LAYOUT_VERSION);
    let old = format!("layout-{}", relay_guard_common::LAYOUT_VERSION - 1);
    std::fs::rename(pins.join(&ours), pins.join(&old)).expect("rename the layout directory on bpffs");
    agent = Agent::start(&lab.server, config.clone(), &dir);
    let log = agent.log_text();
    assert!(!pins.join(&old).exists(), "the old layout was left in place:\n{log}");
    std::thread::sleep(Duration::from_millis(500));
    let status = loader_status(&lab.server, &lab.server_if);
    assert_eq!(
        status.matches("relay_guard").count(),
        1,
        "one slot of relay-guard:\n{status}"
    );
    assert_no_gap("relay-guard through restarts and an upgrade", rg, &log);

    // `detach` while xdp-filter stays: its prober keeps running.
    assert!(agent.stop().success(), "{}", agent.log_text());
    detach_leaves_xdp_filter(&lab, &config);
    assert_no_gap("xdp-filter through relay-guard's restarts, upgrade and detach", xf, "");

    // Back in, then `xdp-filter unload`: relay-guard keeps guarding.
    let agent = Agent::start(&lab.server, config, &dir);
    let rg = rg_prober();
    std::thread::sleep(Duration::from_millis(500));
    let (ok, t) = in_ns(&lab.server, &["xdp-filter", "unload", &lab.server_if]);
    assert!(ok, "xdp-filter unload: {t}");
    std::thread::sleep(Duration::from_millis(500));
    let status = loader_status(&lab.server, &lab.server_if);
    assert!(
        status.contains("relay_guard") && !status.contains("xdpfilt_"),
        "{status}"
    );
    assert!(connects(&lab, FILTERED_V4), "xdp-filter's drop outlived its unload");
    assert_no_gap("relay-guard through xdp-filter unload", rg, &agent.log_text());
    drop(agent);
    drop(detach);
}

/// SPEC.md's promise holds only if relay-guard sees the packets: a program
/// that runs ahead of it in the dispatcher (lower priority) and does not
/// chain on XDP_PASS hands what it passes to the stack, past relay-guard.
/// The agent must say so (an error line naming the program, `status`,
/// `relay_guard_interface_bypassed` 1), and take it back when the program
/// goes. Real packets show the bypass. Without extension programs no
/// dispatcher can hold two programs: the metric is there and 0.
#[test]
fn a_program_ahead_that_does_not_chain_on_pass_is_reported_as_a_bypass() {
    const TEST: &str = "a_program_ahead_that_does_not_chain_on_pass_is_reported_as_a_bypass";
    if !require(TEST) {
        return;
    }
    let obj = "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_all.o";
    let _one = XDP_FILTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new();
    let _server = relay_guard_tests::net::BannerServer::start(&lab.server, &[25]);
    let dir = TempDir::new();
    let (config, detach) = setup(&dir, &lab, "xdp_dispatcher = true\nxdp_priority = 10");
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    let bypassed = |text: &str| {
        relay_guard_tests::net::metric(text, "relay_guard_interface_bypassed", &[("interface", &lab.server_if)])
    };
    let bypass_within = Duration::from_secs(20 * u64::from(relay_guard_tests::slowdown()));
    let text = relay_guard_tests::lab::scrape(&lab);
    assert!(
        text.contains("relay_guard_interface_bypassed{"),
        "no bypass metric:\n{text}"
    );
    assert_eq!(
        bypassed(&relay_guard_tests::lab::scrape(&lab)),
        0.0,
        "{}",
        agent.log_text()
    );
    if !agent.log_text().contains("XDP dispatcher in place") {
        println!("branch: the kernel refuses extension programs; nothing can run ahead of relay-guard");
        assert!(!connects(&lab, DENIED_V4), "relay-guard does not guard");
        return;
    }
    println!("branch: relay-guard installed a dispatcher");
    assert!(!connects(&lab, DENIED_V4), "relay-guard does not guard");
    // xdp-filter's allow-all program at priority 5 (ahead of relay-guard's
    // 10), chaining only on XDP_DROP: it passes everything, and ends the
    // chain there.
    let (ok, t) = in_ns(
        &lab.server,
        &[
            "xdp-loader",
            "load",
            "-m",
            "skb",
            "-P",
            "5",
            "-A",
            "XDP_DROP",
            &lab.server_if,
            obj,
        ],
    );
    assert!(ok, "xdp-loader load: {t}");
    let status = loader_status(&lab.server, &lab.server_if);
    let id: u32 = status
        .lines()
        .find(|l| l.contains("xdpfilt_alw_all"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "xdpfilt_alw_all")?;
            w[at + 1..].iter().find_map(|x| x.parse().ok())
        })
        .unwrap_or_else(|| panic!("no id for xdpfilt_alw_all:\n{status}"));
    wait_metrics(
        &lab,
        &agent,
        bypass_within,
        &format!("no bypass reported:\n{status}"),
        |t| bypassed(t) == 1.0,
    );
    assert!(
        connects(&lab, DENIED_V4),
        "the denied source is not passed by the program ahead?\n{status}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("is NOT guarded") && log.contains("`xdpfilt_alw_all` (id") && log.contains("priority 5"),
        "the log must name the program that bypasses relay-guard:\n{log}"
    );
    // `status` in the interface's namespace (the dispatcher is found by ifindex).
    let (ok, text) = cli_in_ns(&lab.server, &config, "status");
    assert!(
        ok && text.contains("BYPASSED") && text.contains("xdpfilt_alw_all"),
        "{text}"
    );

    let (ok, t) = in_ns(
        &lab.server,
        &["xdp-loader", "unload", &lab.server_if, "-i", &id.to_string()],
    );
    assert!(ok, "xdp-loader unload: {t}\n{status}");
    wait_metrics(&lab, &agent, bypass_within, "the bypass stays reported", |t| {
        bypassed(t) == 0.0
    });
    assert!(
        !connects(&lab, DENIED_V4),
        "relay-guard does not guard after the program went"
    );
    drop(agent);
    drop(detach);
}
