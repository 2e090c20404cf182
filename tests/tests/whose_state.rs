//! "Whose state" and "Adoption" of SPEC.md's "Failing safe": relay-guard
//! touches only what it created under a `pin_dir` of its own, one agent
//! holds a `pin_dir` whatever its spelling, a config that does not parse
//! never sends a command to the default `pin_dir`, and a pinned link is
//! discarded only when it is provably dead. Each refusal is checked by a
//! canary beside it that must survive.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use relay_guard_common::LAYOUT_VERSION;
use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, METRICS, TempDir, cli},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, DENIED_V4, Lab, assert_gate, link_pin, pin_dir},
    net::BannerServer,
    netns::{sh, unique},
    require,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The relay guard on port 25 for [`ALLOWED_V4`] on `interfaces`, with
/// `metrics_listen = metrics` (`""`: none).
fn relay_config(interfaces: &[&str], pin_dir: &Path, metrics: &str) -> TestConfig {
    TestConfig::on(interfaces, pin_dir)
        .metrics_listen(metrics)
        .guard(&Guard::new("relay", &[25]).allow(&[&format!("{ALLOWED_V4}/32")]))
}

fn config_text(iface: &str, pin_dir: &Path, metrics: &str) -> String {
    relay_config(&[iface], pin_dir, metrics).text()
}

/// Runs `relay-guard run` in the server namespace and expects it to exit
/// non-zero within 20 s; returns its log.
fn run_must_fail(lab: &Lab, config: PathBuf, dir: &TempDir, what: &str) -> String {
    let mut agent = Agent::spawn(&lab.server, config, dir, &["run"]);
    let status = agent.wait(Duration::from_secs(20));
    let log = agent.log_text();
    assert!(!status.success(), "{what}: the agent ran:\n{log}");
    log
}

fn statfs_type(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path).ok().map(|s| s.filesystem_type().0)
}

/// A bpffs of the test's own, mounted on a temporary directory and
/// unmounted in `Drop`: "pin_dir = the bpffs root" is tried there, never on
/// the host's /sys/fs/bpf.
struct PrivateBpffs(PathBuf);

impl PrivateBpffs {
    fn new() -> PrivateBpffs {
        let dir = std::env::temp_dir().join(unique("rg-bpffs-"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        sh(&["mount", "-t", "bpf", "bpf", dir.to_str().expect("utf-8")]);
        assert_eq!(statfs_type(&dir), Some(BPF_FS_MAGIC));
        PrivateBpffs(dir)
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", self.0.to_str().unwrap_or_default()])
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Pins a small BPF array map at `path` (bpf(2) directly: no bpftool
/// needed): an object relay-guard did not create.
fn pin_foreign_map(path: &Path) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut create = [0u8; 72];
    let head = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    // SAFETY: copies a plain repr(C) struct into the (larger) zeroed attr.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&raw const head).cast::<u8>(),
            create.as_mut_ptr(),
            size_of::<MapCreate>(),
        )
    };
    // SAFETY: bpf(2) reads a zeroed bpf_attr of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, create.as_mut_ptr(), create.len()) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd from the kernel, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) };
    let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("no NUL");
    let mut pin = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("fd"),
        file_flags: 0,
    };
    // SAFETY: bpf(2) reads `pin` and the NUL-terminated path.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &raw mut pin, size_of::<ObjPin>()) };
    assert_eq!(
        rc,
        0,
        "BPF_OBJ_PIN {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// pin_dir = the root of a bpffs mount: `run` and `detach` (and `status`,
/// `top`) refuse it, naming why, and another tool's state on that bpffs
/// survives: nothing is attached and nothing of the mount is deleted.
#[test]
fn pin_dir_on_a_bpffs_root_is_refused() {
    if !require::privileged("pin_dir_on_a_bpffs_root_is_refused") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let bpffs = PrivateBpffs::new();
    let canary = bpffs.0.join("other-tool").join("links");
    std::fs::create_dir_all(&canary).expect("mkdir on bpffs");
    pin_foreign_map(&canary.join("eth0"));
    let config = dir.write("relay-guard.toml", &config_text(&lab.server_if, &bpffs.0, ""));
    let _detach = DetachOnDrop::new(config.clone(), bpffs.0.join("never-used"));

    let log = run_must_fail(&lab, config.clone(), &dir, "pin_dir = bpffs root");
    assert!(log.contains("root of a bpffs mount"), "no reason given:\n{log}");
    let (st, out) = cli(&config, &["detach"]);
    assert!(!st.success(), "detach of a bpffs root succeeded:\n{out}");
    assert!(out.contains("root of a bpffs mount"), "{out}");
    for cmd in ["status", "top"] {
        let (st, out) = cli(&config, &[cmd]);
        assert!(!st.success() && out.contains("root of a bpffs mount"), "{cmd}: {out}");
    }
    assert!(canary.join("eth0").exists(), "another tool's pin was deleted");
    assert!(
        !lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains(" xdp"),
        "something was attached"
    );
}

/// pin_dir on a plain directory: `run` and `detach` refuse (a non-zero
/// exit), and its files stay.
#[test]
fn pin_dir_on_a_plain_directory_is_refused() {
    if !require::privileged("pin_dir_on_a_plain_directory_is_refused") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let plain = dir.0.join("not-bpffs");
    let links = plain.join(format!("layout-{LAYOUT_VERSION}")).join("links");
    std::fs::create_dir_all(&links).expect("mkdir");
    std::fs::write(links.join("eth0"), "data").expect("write");
    std::fs::write(plain.join("canary.txt"), "keep me").expect("write");
    let config = dir.write("relay-guard.toml", &config_text(&lab.server_if, &plain, ""));

    let log = run_must_fail(&lab, config.clone(), &dir, "pin_dir on tmp");
    assert!(log.contains("not on a bpffs"), "no reason given:\n{log}");
    let (st, out) = cli(&config, &["detach"]);
    assert!(!st.success(), "detach of a plain directory succeeded:\n{out}");
    assert!(out.contains("not on a bpffs"), "{out}");
    assert_eq!(
        std::fs::read_to_string(plain.join("canary.txt")).ok().as_deref(),
        Some("keep me")
    );
    assert!(links.join("eth0").exists(), "a file of the plain directory was deleted");
}

/// A config that does not parse (or whose pin_dir is not a string):
/// `detach`, `status`, `top` and `explain` fail and name the config; they
/// never fall back to the default pin_dir, which is left alone.
#[test]
fn a_broken_config_never_falls_back_to_the_default_pin_dir() {
    if !require::privileged("a_broken_config_never_falls_back_to_the_default_pin_dir") {
        return;
    }
    let dir = TempDir::new();
    let default = Path::new(relay_guard::config::DEFAULT_PIN_DIR);
    if statfs_type(Path::new("/sys/fs/bpf")) != Some(BPF_FS_MAGIC) {
        sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
    // A stand-in for the production instance: state in the default pin_dir
    // (left as it was if something already lives there).
    let planted = !default.exists();
    let canary = default.join(format!("layout-{LAYOUT_VERSION}")).join("maps");
    if planted {
        std::fs::create_dir_all(&canary).expect("mkdir on bpffs");
    }
    struct Unplant(bool);
    impl Drop for Unplant {
        fn drop(&mut self) {
            if self.0 {
                let d = Path::new(relay_guard::config::DEFAULT_PIN_DIR);
                let l = d.join(format!("layout-{LAYOUT_VERSION}"));
                let _ = std::fs::remove_dir(l.join("maps"));
                let _ = std::fs::remove_dir(&l);
                let _ = std::fs::remove_dir(d);
            }
        }
    }
    let _unplant = Unplant(planted);
    let before: Vec<_> = std::fs::read_dir(default)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();

    for (name, text, why) in [
        (
            "syntax.toml",
            "interfaces = [\"eth0\"\n[[guard]]\nports = [25]\n",
            "does not parse",
        ),
        (
            "type.toml",
            "interfaces = [\"eth0\"]\npin_dir = 7\n[[guard]]\nports = [25]\n",
            "must be a string",
        ),
    ] {
        let config = dir.write(name, text);
        for args in [&["detach"][..], &["status"], &["top"], &["explain", DENIED_V4, "25"]] {
            let (st, out) = cli(&config, args);
            assert!(!st.success(), "{args:?} with {name} succeeded:\n{out}");
            assert!(out.contains(why) && out.contains(name), "{args:?} with {name}: {out}");
        }
    }
    assert!(default.exists(), "the default pin_dir was removed");
    let after: Vec<_> = std::fs::read_dir(default)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(before, after, "the default pin_dir changed");
    if planted {
        assert!(canary.exists());
    }
}

/// One agent per pin_dir whatever the spelling: a second agent on `P/`,
/// `//P` or a symlink to P is refused, `detach` through another spelling
/// refuses while the agent runs, `status` does not disturb it, and the
/// first agent keeps guarding with its pins in place.
#[test]
fn one_agent_per_pin_dir_whatever_the_spelling() {
    if !require::privileged("one_agent_per_pin_dir_whatever_the_spelling") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let pins = pin_dir("rg-test-");
    let config = dir.write("relay-guard.toml", &config_text(&lab.server_if, &pins, METRICS));
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    let agent = Agent::start(&lab.server, config.clone(), &dir);
    assert_gate(&lab, "first agent");
    let link = link_pin(&pins, &lab.server_if);
    assert!(link.exists());

    let symlink = dir.0.join("pins-link");
    std::os::unix::fs::symlink(&pins, &symlink).expect("symlink");
    let spellings = [
        format!("{}/", pins.display()),
        format!("/{}", pins.display()),
        format!("{}/.", pins.display()),
        symlink.display().to_string(),
    ];
    for (i, spelling) in spellings.iter().enumerate() {
        let other = dir.write(
            &format!("other-{i}.toml"),
            &config_text(&lab.server_if, Path::new(spelling), ""),
        );
        let log = run_must_fail(&lab, other.clone(), &dir, &format!("second agent on `{spelling}`"));
        assert!(
            log.contains(&format!("(pid {})", agent.pid())),
            "`{spelling}`: the refusal does not name the running agent:\n{log}"
        );
        let (st, out) = cli(&other, &["detach"]);
        assert!(!st.success(), "detach through `{spelling}` succeeded:\n{out}");
        assert!(out.contains(&format!("(pid {})", agent.pid())), "{out}");
        let (st, out) = cli(&other, &["status", "--json"]);
        assert!(st.success(), "status through `{spelling}`: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["agent_pid"], agent.pid().to_string(), "{out}");
        assert!(link.exists(), "`{spelling}`: the first agent's link pin is gone");
        assert_gate(&lab, &format!("after a second agent on `{spelling}`"));
    }
    drop(agent);
}

/// A link pin that holds something that is not a link (planted by another
/// tool or a mistake): the agent refuses to take it over, says why, and
/// leaves it in place: a pin it cannot adopt is never deleted.
#[test]
fn a_pin_that_is_not_a_link_is_never_deleted() {
    if !require::privileged("a_pin_that_is_not_a_link_is_never_deleted") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let pins = pin_dir("rg-test-");
    let links = pins.join(format!("layout-{LAYOUT_VERSION}")).join("links");
    let config = dir.write("relay-guard.toml", &config_text(&lab.server_if, &pins, METRICS));
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    if statfs_type(Path::new("/sys/fs/bpf")) != Some(BPF_FS_MAGIC) {
        sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
    std::fs::create_dir_all(&links).expect("mkdir on bpffs");
    let planted = links.join(&lab.server_if);
    pin_foreign_map(&planted);

    let log = run_must_fail(&lab, config.clone(), &dir, "a map pinned as the link");
    assert!(
        log.contains("not a bpf_link") && log.contains("left in place"),
        "no reason given:\n{log}"
    );
    assert!(planted.exists(), "the planted pin was deleted");
    std::fs::remove_file(&planted).expect("unpin the planted map");
}

/// A pinned link whose interface was deleted and created again is dead:
/// the next start replaces it and guards the new interface.
#[test]
fn a_dead_link_of_a_recreated_interface_is_replaced() {
    if !require::privileged("a_dead_link_of_a_recreated_interface_is_replaced") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    // A second interface (a veth pair inside the server namespace) that is
    // deleted and created again under the same name.
    let dummy = unique("rgd");
    let peer = unique("rgp");
    let make = || {
        lab.server
            .ip(&["link", "add", &dummy, "type", "veth", "peer", "name", &peer]);
        lab.server.ip(&["link", "set", &dummy, "up"]);
    };
    make();
    let pins = pin_dir("rg-test-");
    let text = relay_config(&[&lab.server_if, &dummy], &pins, METRICS).text();
    let config = dir.write("relay-guard.toml", &text);
    let _detach = DetachOnDrop::new(config.clone(), pins.clone());
    let mut agent = Agent::start(&lab.server, config.clone(), &dir);
    assert!(agent.stop().success());
    lab.server.ip(&["link", "del", &dummy]);
    make();
    assert!(!lab.server.ip(&["link", "show", "dev", &dummy]).contains(" xdp"));

    let agent = Agent::start(&lab.server, config, &dir);
    let log = agent.log_text();
    // Found dead by the adoption path or, first, by the interface watcher.
    assert!(
        log.contains("pinned link is dead") || log.contains("unpinning the dead link"),
        "the dead link was not reported:\n{log}"
    );
    assert!(
        lab.server.ip(&["link", "show", "dev", &dummy]).contains(" xdp"),
        "the re-created interface is not guarded:\n{log}"
    );
    assert_gate(&lab, "after replacing a dead link");
}
