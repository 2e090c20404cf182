//! Bans (SPEC.md "Bans"), enforced by the real XDP program on veth between
//! namespaces: `relay-guard ban`/`unban`/`bans` against the pinned maps,
//! port scope (guarded and unguarded ports), IPv6 prefixes, `never`, kernel
//! expiry with the agent down, escalation, SIGKILL and a simulated reboot,
//! monitor mode, a ban from failures in a log file; and the trust rules
//! (SPEC.md "Who may aim a ban"): an unban is final across a restart, a
//! reboot and a clock behind at boot, a hostile `bans.json`/`bans.cmd`
//! never stops the start nor bans what the CLI would refuse, and an
//! allowlisted client is not banned from the logs unless `ban_allowed`.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir, cli},
    config::{Guard, TestConfig},
    lab::{
        ALLOWED_V4, ALLOWED_V6, CLIENT_MAC, DENIED_V6, Lab, SERVER_V4, SERVER_V6, ip, pin_dir, scrape, wait_metrics,
    },
    net::{BannerServer, NftCounters, connect_banner, metric},
    require,
};

/// Ports: 25 guarded (relay) and not banned; 587 guarded and banned; 2525
/// not guarded but banned.
const NOT_BANNED: u16 = 25;
const BANNED_GUARDED: u16 = 587;
const BANNED_FREE: u16 = 2525;
/// Another address of ALLOWED_V6's /64, and one outside it.
const SAME_64: &str = "2001:db8:a::99";
/// A client address that no guard allows and no `never` covers: it
/// reaches the unguarded ban port only.
const OTHER_V4: &str = "192.0.2.77";

fn config_text(lab: &Lab, pins: &Path, state: &Path, mode: &str, ban_extra: &str) -> String {
    let allow = [
        &format!("{ALLOWED_V4}/32") as &str,
        "2001:db8:a::/48",
        "2001:db8:d::/48",
    ];
    TestConfig::new(&lab.server_if, pins)
        .mode(mode)
        .state_dir(state)
        .guard(&Guard::new("relay", &[25]).allow(&allow))
        .guard(&Guard::new("submission", &[587]).allow(&allow))
        .table(&format!(
            r#"[[ban]]
name = "sasl"
ports = [587, 2525]
{ban_time}
max_ban_time = "1h"
ipv6_prefix = 64
never = ["198.51.100.0/24"]
{ban_extra}"#,
            ban_time = if ban_extra.contains("ban_time") {
                ""
            } else {
                "ban_time = \"3s\""
            },
        ))
        .text()
}

/// Postfix's line for the `n`-th failed SASL login of `src` (n < 60).
fn failure_line(src: &str, n: u32) -> String {
    format!(
        "Dec  2 01:00:{n:02} mx postfix/submission/smtpd[{}]: warning: unknown[{src}]: SASL LOGIN authentication failed: authentication failure\n",
        100 + n
    )
}

/// Appends `text` to the log file `log`, as a daemon writes it.
fn append_to(log: &Path, text: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().append(true).open(log).expect("open log");
    f.write_all(text.as_bytes()).expect("append");
}

struct Setup {
    // Drop order: agent first (declared by the caller after this), then
    // the detach, then the server.
    _detach: DetachOnDrop,
    _server: BannerServer,
    config: PathBuf,
    state: PathBuf,
    pins: PathBuf,
}

fn setup(lab: &Lab, dir: &TempDir, mode: &str, ban_extra: &str) -> Setup {
    let pins = pin_dir("bans-");
    let state = dir.0.join("state");
    let config = dir.write("relay-guard.toml", &config_text(lab, &pins, &state, mode, ban_extra));
    // A second address of the /64 on the client, reachable from the server.
    for (a, len) in [(SAME_64, 128), (OTHER_V4, 32)] {
        lab.client
            .ip(&["addr", "add", &format!("{a}/{len}"), "dev", &lab.client_if, "nodad"]);
        lab.server.ip(&[
            "neigh",
            "replace",
            a,
            "lladdr",
            CLIENT_MAC,
            "dev",
            &lab.server_if,
            "nud",
            "permanent",
        ]);
    }
    Setup {
        _server: BannerServer::start(&lab.server, &[NOT_BANNED, BANNED_GUARDED, BANNED_FREE]),
        _detach: DetachOnDrop::new(config.clone(), pins.clone()),
        config,
        state,
        pins,
    }
}

fn server_for(src: &str) -> IpAddr {
    ip(if src.contains(':') { SERVER_V6 } else { SERVER_V4 })
}

/// Whether `src` gets the banner on `port` (within 400 ms when it does not).
fn reaches(lab: &Lab, src: &str, port: u16) -> bool {
    connect_banner(&lab.client, ip(src), server_for(src), port, Duration::from_millis(400)).is_ok()
}

fn ban(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["ban"];
    all.extend_from_slice(args);
    let (status, out) = cli(config, &all);
    assert!(status.success(), "relay-guard {all:?} failed: {out}");
    out
}

fn bans_json(config: &Path) -> Vec<serde_json::Value> {
    let (status, out) = cli(config, &["bans", "--json"]);
    assert!(status.success(), "bans --json: {out}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap_or_else(|e| panic!("bans --json is not JSON ({e}): {out}"))
        .as_array()
        .expect("an array")
        .clone()
}

fn ban_of<'a>(list: &'a [serde_json::Value], prefix: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|b| b["prefix"] == prefix)
}

/// A CLI ban drops the source's SYNs to the ban's ports (a guarded one it
/// was allowed on, and an unguarded one) and to no other port; nothing
/// leaks past XDP; the drops are counted as `banned` under the ban's name;
/// `bans`, `explain` show it; `unban` lifts it; `never` cannot be banned.
#[test]
fn cli_ban_drops_the_ban_ports_only() {
    if !require::privileged("cli_ban_drops_the_ban_ports_only") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let s = setup(&lab, &dir, "enforce", "");
    let _agent = Agent::start(&lab.server, s.config.clone(), &dir);
    for port in [NOT_BANNED, BANNED_GUARDED, BANNED_FREE] {
        assert!(reaches(&lab, ALLOWED_V4, port), "before the ban, port {port}");
    }
    let behind = NftCounters::behind_xdp(&lab.server, &[ALLOWED_V4], &[BANNED_GUARDED, BANNED_FREE]);
    let before = (
        behind.packets(ALLOWED_V4, BANNED_GUARDED),
        behind.packets(ALLOWED_V4, BANNED_FREE),
    );

    let out = ban(&s.config, &[ALLOWED_V4, "--for", "1h"]);
    assert!(out.contains("banned 192.0.2.10/32"), "{out}");
    for _ in 0..3 {
        assert!(
            !reaches(&lab, ALLOWED_V4, BANNED_GUARDED),
            "banned source reached {BANNED_GUARDED}"
        );
        assert!(
            !reaches(&lab, ALLOWED_V4, BANNED_FREE),
            "banned source reached {BANNED_FREE}"
        );
    }
    assert!(
        reaches(&lab, ALLOWED_V4, NOT_BANNED),
        "port {NOT_BANNED} is not a ban port"
    );
    assert!(
        reaches(&lab, ALLOWED_V6, BANNED_GUARDED),
        "another source is not banned"
    );
    assert_eq!(
        (
            behind.packets(ALLOWED_V4, BANNED_GUARDED),
            behind.packets(ALLOWED_V4, BANNED_FREE)
        ),
        before,
        "SYNs of the banned source got past XDP"
    );
    let text = scrape(&lab);
    let dropped = metric(
        &text,
        "relay_guard_packets_total",
        &[
            ("guard", "sasl"),
            ("port", "2525"),
            ("verdict", "banned"),
            ("family", "ipv4"),
        ],
    );
    assert!(dropped >= 3.0, "banned drops counted: {dropped}\n{text}");

    let list = bans_json(&s.config);
    let b = ban_of(&list, "192.0.2.10/32").unwrap_or_else(|| panic!("bans lists it: {list:?}"));
    assert_eq!(b["ban"], "sasl");
    let left = b["expires_in_seconds"].as_u64().expect("expires_in_seconds");
    assert!((3500..=3600).contains(&left), "{b}");
    let (_, explain) = cli(&s.config, &["explain", ALLOWED_V4, "587"]);
    assert!(explain.contains("banned from port 587 by ban `sasl`"), "{explain}");

    // The agent takes the CLI's ban in (bans.json) and does not undo it.
    wait_saved(&s.state, "the CLI's ban (192.0.2.10/32)", |t| {
        t.contains("192.0.2.10/32")
    });
    assert!(
        !reaches(&lab, ALLOWED_V4, BANNED_GUARDED),
        "still banned after the agent's tick"
    );

    let (status, out) = cli(&s.config, &["unban", ALLOWED_V4]);
    assert!(status.success(), "unban: {out}");
    assert!(reaches(&lab, ALLOWED_V4, BANNED_GUARDED), "unbanned source reaches 587");
    let (status, out) = cli(&s.config, &["unban", ALLOWED_V4]);
    assert_eq!(status.code(), Some(1), "a second unban finds nothing: {out}");

    // never always wins.
    let (status, out) = cli(&s.config, &["ban", "198.51.100.0/24"]);
    assert!(!status.success() && out.contains("never"), "{out}");
    let (status, out) = cli(&s.config, &["ban", "198.51.0.0/16"]);
    assert!(!status.success() && out.contains("never"), "{out}");
}

/// An IPv6 ban of a /64 covers every address of it and nothing outside.
#[test]
fn ipv6_ban_covers_the_64() {
    if !require::privileged("ipv6_ban_covers_the_64") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let s = setup(&lab, &dir, "enforce", "");
    let _agent = Agent::start(&lab.server, s.config.clone(), &dir);
    for src in [ALLOWED_V6, SAME_64, DENIED_V6] {
        assert!(reaches(&lab, src, BANNED_FREE), "{src} before the ban");
    }
    ban(&s.config, &["2001:db8:a::/64", "--for", "10m"]);
    assert!(
        !reaches(&lab, ALLOWED_V6, BANNED_FREE),
        "{ALLOWED_V6} is in the banned /64"
    );
    assert!(
        !reaches(&lab, SAME_64, BANNED_GUARDED),
        "{SAME_64} is in the banned /64"
    );
    assert!(reaches(&lab, DENIED_V6, BANNED_FREE), "{DENIED_V6} is outside the /64");
    assert!(reaches(&lab, SAME_64, NOT_BANNED), "port 25 is not a ban port");
}

/// Bans are the kernel's: they hold through SIGKILL of the agent, expire on
/// time with the agent down, a second ban of the same source lasts twice as
/// long, and after a simulated reboot (detach: program and pins gone) the
/// agent restores them from state_dir with the time left.
#[test]
fn bans_survive_sigkill_and_reboot_and_expire_in_the_kernel() {
    if !require::privileged("bans_survive_sigkill_and_reboot_and_expire_in_the_kernel") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let s = setup(&lab, &dir, "enforce", "");
    let mut agent = Agent::start(&lab.server, s.config.clone(), &dir);
    // Long: 2001:db8:a::/64 for 1h. Short: ALLOWED_V4 for ban_time (3s).
    ban(&s.config, &["2001:db8:a::/64", "--for", "1h"]);
    let out = ban(&s.config, &[ALLOWED_V4]);
    let banned_at = Instant::now();
    assert!(out.contains("for 3s"), "{out}");
    // Let the agent take both in and save them.
    wait_saved(&s.state, "the bans (2001:db8:a::/64)", |t| {
        t.contains("2001:db8:a::/64")
    });
    agent.signal(Signal::SIGKILL);
    agent.wait(Duration::from_secs(5));
    assert!(
        !reaches(&lab, ALLOWED_V4, BANNED_GUARDED),
        "short ban holds after SIGKILL"
    );
    assert!(
        !reaches(&lab, ALLOWED_V6, BANNED_GUARDED),
        "long ban holds after SIGKILL"
    );

    // Expires in the kernel, agent down.
    std::thread::sleep(Duration::from_millis(3300).saturating_sub(banned_at.elapsed()));
    let deadline = Instant::now() + Duration::from_secs(2);
    while !reaches(&lab, ALLOWED_V4, BANNED_GUARDED) {
        assert!(
            Instant::now() < deadline,
            "the 3 s ban did not lift with the agent down"
        );
    }
    let lifted_after = banned_at.elapsed();
    assert!(lifted_after >= Duration::from_secs(3), "lifted early: {lifted_after:?}");
    assert!(!reaches(&lab, ALLOWED_V6, BANNED_GUARDED), "the 1h ban still holds");

    // The second ban of the same source: twice as long (6 s). It is made
    // between `second_at` and `written` (a CLI run: seconds in a
    // kernel-matrix guest), so it must hold until second_at + 6 s and lift
    // by written + 8 s.
    let second_at = Instant::now();
    let out = ban(&s.config, &[ALLOWED_V4]);
    let written = Instant::now();
    assert!(out.contains("for 6s") && out.contains("ban number 2"), "{out}");
    assert!(
        !reaches(&lab, ALLOWED_V4, BANNED_GUARDED),
        "the second ban does not hold"
    );
    let list = bans_json(&s.config);
    let b = ban_of(&list, "192.0.2.10/32").unwrap_or_else(|| panic!("{list:?}"));
    assert_eq!(b["times_banned"], 2, "{b}");
    let deadline = written + Duration::from_secs(8);
    while !reaches(&lab, ALLOWED_V4, BANNED_GUARDED) {
        assert!(Instant::now() < deadline, "the 6 s ban did not lift");
    }
    assert!(second_at.elapsed() >= Duration::from_secs(6), "second ban lifted early");

    // Simulated reboot: program, links and pins gone; start from state_dir.
    let (status, out) = cli(&s.config, &["detach"]);
    assert!(status.success(), "detach: {out}");
    assert!(reaches(&lab, ALLOWED_V6, BANNED_GUARDED), "no filter after detach");
    let _agent = Agent::start(&lab.server, s.config.clone(), &dir);
    assert!(
        !reaches(&lab, ALLOWED_V6, BANNED_GUARDED),
        "the 1h ban is restored after the reboot"
    );
    assert!(
        reaches(&lab, ALLOWED_V4, BANNED_GUARDED),
        "the expired ban is not restored"
    );
    let list = bans_json(&s.config);
    let b = ban_of(&list, "2001:db8:a::/64").unwrap_or_else(|| panic!("{list:?}"));
    let left = b["expires_in_seconds"].as_u64().expect("seconds");
    assert!((3500..3600).contains(&left), "restored with the time left: {b}");
    assert!(ban_of(&list, "192.0.2.10/32").is_none(), "{list:?}");
}

/// Monitor mode: a banned source passes, counted as would_drop.
#[test]
fn monitor_mode_counts_would_drop() {
    if !require::privileged("monitor_mode_counts_would_drop") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let s = setup(&lab, &dir, "monitor", "");
    let _agent = Agent::start(&lab.server, s.config.clone(), &dir);
    ban(&s.config, &[ALLOWED_V4, "--for", "1h"]);
    assert!(
        reaches(&lab, ALLOWED_V4, BANNED_FREE),
        "monitor mode passes a banned source"
    );
    let text = scrape(&lab);
    let would = metric(
        &text,
        "relay_guard_packets_total",
        &[("guard", "sasl"), ("port", "2525"), ("verdict", "would_drop")],
    );
    assert!(would >= 1.0, "would_drop counted: {would}\n{text}");
    assert_eq!(
        metric(
            &text,
            "relay_guard_packets_total",
            &[("guard", "sasl"), ("verdict", "banned")]
        ),
        0.0
    );
}

/// Failed logins written to a followed log ban the source after `failures`
/// of them; a `never` source is not banned however often it fails; the
/// metrics count both.
#[test]
fn log_failures_ban_the_source() {
    if !require::privileged_with("log_failures_ban_the_source", &["promtool"]) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let log = dir.write("mail.log", "");
    // ALLOWED_V4 is allowlisted on 587: only `ban_allowed` lets the logs
    // ban it (allowlisted_clients_are_not_banned_from_the_logs).
    let extra = format!(
        "log_files = [\"{}\"]\nfailures = 3\nwindow = \"1m\"\nban_time = \"10m\"\nban_allowed = true",
        log.display()
    );
    let s = setup(&lab, &dir, "enforce", &extra);
    let agent = Agent::start(&lab.server, s.config.clone(), &dir);
    let append = |text: &str| append_to(&log, text);
    // The follower reads from the end: give it time to open the file.
    std::thread::sleep(Duration::from_millis(800));
    for n in 0..5 {
        append(&failure_line("198.51.100.20", n));
    }
    append("this is not a mail log line\n");
    for n in 0..2 {
        append(&failure_line(ALLOWED_V4, n));
    }
    std::thread::sleep(Duration::from_millis(800));
    assert!(reaches(&lab, ALLOWED_V4, BANNED_GUARDED), "two failures do not ban");
    append(&failure_line(ALLOWED_V4, 3));
    let deadline = Instant::now() + Duration::from_secs(3);
    while reaches(&lab, ALLOWED_V4, BANNED_GUARDED) {
        assert!(Instant::now() < deadline, "the third failure did not ban the source");
    }
    assert!(reaches(&lab, ALLOWED_V4, NOT_BANNED), "port 25 is not a ban port");
    let text = scrape(&lab);
    assert_eq!(
        metric(
            &text,
            "relay_guard_auth_failures_total",
            &[("ban", "sasl"), ("source", "postfix")]
        ),
        8.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "relay_guard_ban_events_total",
            &[("ban", "sasl"), ("action", "banned")]
        ),
        1.0,
        "only the non-never source is banned: {text}"
    );
    // The gauge is recounted at the agent's next tick.
    let text = wait_metrics(&lab, &agent, Duration::from_secs(3), "relay_guard_bans", |t| {
        metric(t, "relay_guard_bans", &[("ban", "sasl"), ("family", "ipv4")]) == 1.0
    });
    relay_guard_tests::prometheus::assert_promtool_accepts(&dir, &text);
    // `bans --json` takes failures from the agent's saved list (written
    // within a second of the ban).
    wait_saved(&s.state, "the ban (192.0.2.10/32)", |t| t.contains("192.0.2.10/32"));
    let list = bans_json(&s.config);
    assert!(
        ban_of(&list, "198.51.100.20/32").is_none(),
        "never source banned: {list:?}"
    );
    let b = ban_of(&list, "192.0.2.10/32").unwrap_or_else(|| panic!("{list:?}"));
    assert_eq!(
        b["failures"],
        3,
        "{b}\n{}\n{}",
        std::fs::read_to_string(s.state.join("bans.json")).unwrap_or_default(),
        agent.log_text()
    );
}

/// Waits until `bans.json` satisfies `ok` (the agent saves within a second).
fn wait_saved(state: &Path, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(state.join("bans.json")).unwrap_or_default();
        if ok(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "bans.json never showed {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The line of `prefix` in a bans.json (version 2: one record a line).
fn saved_line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.contains(&format!("\"prefix\":\"{prefix}\"")))
}

/// SPEC.md "An unban or an expired ban is final": an unbanned source's
/// SYNs cross XDP (nft counter behind it) after a restart with the pins
/// kept (SIGTERM), after a reboot (detach, start from state_dir), and after
/// a start whose wall clock is far behind the time bans.json was written
/// (a file whose records claim far-future times); the ban in force beside
/// it holds each time, never for longer than it had left.
#[test]
fn an_unban_is_final_across_restart_reboot_and_a_clock_behind() {
    if !require::privileged("an_unban_is_final_across_restart_reboot_and_a_clock_behind") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let s = setup(&lab, &dir, "enforce", "");
    let mut agent = Agent::start(&lab.server, s.config.clone(), &dir);
    let behind = NftCounters::behind_xdp(&lab.server, &[OTHER_V4, ALLOWED_V6], &[BANNED_FREE]);
    let passes = |why: &str| {
        let before = behind.packets(OTHER_V4, BANNED_FREE);
        assert!(
            reaches(&lab, OTHER_V4, BANNED_FREE),
            "{why}: the unbanned source is dropped"
        );
        assert!(
            behind.packets(OTHER_V4, BANNED_FREE) > before,
            "{why}: its SYN did not cross XDP"
        );
    };
    let held = |why: &str| {
        let before = behind.packets(ALLOWED_V6, BANNED_FREE);
        assert!(
            !reaches(&lab, ALLOWED_V6, BANNED_FREE),
            "{why}: the ban in force was lost"
        );
        assert_eq!(
            behind.packets(ALLOWED_V6, BANNED_FREE),
            before,
            "{why}: a banned SYN crossed XDP"
        );
    };
    ban(&s.config, &[OTHER_V4, "--for", "1w"]);
    ban(&s.config, &["2001:db8:a::/64", "--for", "1h"]);
    assert!(!reaches(&lab, OTHER_V4, BANNED_FREE), "banned");
    wait_saved(&s.state, "both bans", |t| {
        t.contains("192.0.2.77/32") && t.contains("2001:db8:a::/64")
    });
    let (status, out) = cli(&s.config, &["unban", OTHER_V4]);
    assert!(status.success(), "unban: {out}");
    passes("after the unban");
    wait_saved(&s.state, "the unban as an ended ban", |t| {
        saved_line(t, "192.0.2.77/32").is_some_and(|l| l.contains("\"state\":\"ended\""))
    });

    // Restart, pins kept.
    let st = agent.stop();
    assert!(st.success(), "SIGTERM: {st}\n{}", agent.log_text());
    let mut agent = Agent::start(&lab.server, s.config.clone(), &dir);
    passes("after a restart");
    held("after a restart");
    assert!(ban_of(&bans_json(&s.config), "192.0.2.77/32").is_none());

    // Reboot: program and pins gone, start from state_dir.
    agent.stop();
    let (status, out) = cli(&s.config, &["detach"]);
    assert!(status.success(), "detach: {out}");
    let mut agent = Agent::start(&lab.server, s.config.clone(), &dir);
    passes("after a reboot");
    held("after a reboot");
    let list = bans_json(&s.config);
    assert!(ban_of(&list, "192.0.2.77/32").is_none(), "{list:?}");
    let left = ban_of(&list, "2001:db8:a::/64").expect("kept")["expires_in_seconds"]
        .as_u64()
        .expect("seconds");
    assert!((3300..3600).contains(&left), "the time it had left: {left}");

    // A clock a year behind at boot, in effect: the file was saved a year
    // from now, its ended ban ended then, and its ban in force ends 60 s
    // after that. The ended ban stays ended; the ban in force keeps the 60 s
    // it had left, not a year and 60 s.
    agent.stop();
    let (status, out) = cli(&s.config, &["detach"]);
    assert!(status.success(), "detach: {out}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let year = 365 * 86_400_000u64;
    std::fs::write(
        s.state.join("bans.json"),
        format!(
            "{{\"version\":2,\"saved_unix_ms\":{saved}}}\n\
             {{\"state\":\"ended\",\"ban\":\"sasl\",\"prefix\":\"192.0.2.77/32\",\"ended_unix_ms\":{saved},\"times\":1}}\n\
             {{\"state\":\"in_force\",\"ban\":\"sasl\",\"prefix\":\"2001:db8:a::/64\",\"expires_unix_ms\":{exp},\"times\":1,\"failures\":0,\"length_ms\":3600000}}\n",
            saved = now_ms + year,
            exp = now_ms + year + 60_000,
        ),
    )
    .expect("write bans.json");
    let agent = Agent::start(&lab.server, s.config.clone(), &dir);
    passes("with the clock behind");
    held("with the clock behind");
    let list = bans_json(&s.config);
    assert!(
        ban_of(&list, "192.0.2.77/32").is_none(),
        "history became a ban: {list:?}"
    );
    let left = ban_of(&list, "2001:db8:a::/64").expect("kept")["expires_in_seconds"]
        .as_u64()
        .expect("seconds");
    assert!(left <= 60, "a clock behind lengthened the ban: {left} s left");
    assert!(
        agent.log_text().contains("wall clock is behind"),
        "the start says so:\n{}",
        agent.log_text()
    );
}

/// SPEC.md "bans.json, bans.cmd and the pinned maps are checked like the
/// CLI's input": a start from a hostile `bans.json` (after a reboot: no
/// pins) and a hostile `bans.cmd` line starts, guards, keeps the good
/// bans, bans nothing the CLI would refuse (`::/0`, `0.0.0.0/0`, `never`),
/// and counts what it dropped; so does a restart that finds a hostile
/// pinned trie entry (planted with bpftool).
#[test]
fn a_hostile_ban_state_starts_guards_and_keeps_the_good_bans() {
    if !require::privileged_with(
        "a_hostile_ban_state_starts_guards_and_keeps_the_good_bans",
        &["bpftool"],
    ) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let s = setup(&lab, &dir, "enforce", "");
    std::fs::create_dir_all(&s.state).expect("state_dir");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let exp = now_ms + 3_600_000;
    let rec = |prefix: &str, ban: &str| {
        format!(
            "{{\"state\":\"in_force\",\"ban\":\"{ban}\",\"prefix\":\"{prefix}\",\"expires_unix_ms\":{exp},\"times\":1,\"failures\":0,\"length_ms\":3600000}}\n"
        )
    };
    let mut text = format!("{{\"version\":2,\"saved_unix_ms\":{now_ms}}}\n");
    text += &rec("2001:db8:a::/64", "sasl");
    for bad in ["::/0", "0.0.0.0/0", "2001::/16", "198.51.100.0/24", "not-a-net"] {
        text += &rec(bad, "sasl");
    }
    text += &rec("192.0.2.77/32", "no-such-section");
    text += "{\"state\":\"in_force\",\"ban\":\"sasl\",\"prefix\":\"192.0.2.7";
    std::fs::write(s.state.join("bans.json"), &text).expect("write bans.json");
    std::fs::write(
        s.state.join("bans.cmd"),
        format!(
            "{{\"op\":\"ban\",\"ban\":\"sasl\",\"prefix\":\"::/0\",\"expires_unix_ms\":{exp},\"times\":1,\"failures\":0}}\nnot json\n"
        ),
    )
    .expect("write bans.cmd");
    let agent = Agent::start(&lab.server, s.config.clone(), &dir);
    let behind = NftCounters::behind_xdp(&lab.server, &[OTHER_V4, DENIED_V6, ALLOWED_V6], &[BANNED_FREE]);
    // It guards: the allowlist holds on 25.
    assert!(reaches(&lab, ALLOWED_V4, NOT_BANNED), "allowed source on 25");
    assert!(!reaches(&lab, OTHER_V4, NOT_BANNED), "a source no guard allows on 25");
    // The good ban holds.
    assert!(!reaches(&lab, ALLOWED_V6, BANNED_FREE), "the good saved ban");
    assert_eq!(behind.packets(ALLOWED_V6, BANNED_FREE), 0);
    // Nothing else is banned: no ::/0, no 0.0.0.0/0.
    for src in [OTHER_V4, DENIED_V6] {
        assert!(reaches(&lab, src, BANNED_FREE), "{src} was banned by a hostile entry");
        assert!(behind.packets(src, BANNED_FREE) >= 1, "{src}: SYN did not cross XDP");
    }
    let list = bans_json(&s.config);
    let prefixes: Vec<&str> = list.iter().filter_map(|b| b["prefix"].as_str()).collect();
    assert_eq!(prefixes, ["2001:db8:a::/64"], "{list:?}");
    let text = scrape(&lab);
    assert_eq!(
        metric(
            &text,
            "relay_guard_ban_state_rejected_total",
            &[("source", "bans.json")]
        ),
        7.0,
        "{text}\n{}",
        agent.log_text()
    );
    assert_eq!(
        metric(&text, "relay_guard_ban_state_rejected_total", &[("source", "bans.cmd")]),
        2.0,
        "{text}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("::/0") && log.contains("no-such-section"),
        "named in the log:\n{log}"
    );
    assert!(s.state.join("bans.json.bad").exists(), "the refused file is kept");
    // The CLI refuses a state_dir others can write, before touching the kernel.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&s.state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (status, out) = cli(&s.config, &["ban", OTHER_V4]);
    std::fs::set_permissions(&s.state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(
        !status.success() && out.contains("writable by group or others"),
        "{out}"
    );
    assert!(reaches(&lab, OTHER_V4, BANNED_FREE), "the refused ban was not written");

    // A pinned trie entry the CLI would refuse (0.0.0.0/0, section 0, far
    // future), planted while the agent is down: the next start deletes it.
    let mut agent = agent;
    let st = agent.stop();
    assert!(st.success(), "SIGTERM: {st}");
    let trie = std::fs::read_dir(&s.pins)
        .expect("pin_dir")
        .filter_map(Result::ok)
        .map(|e| e.path().join("maps").join("RG_BAN_V4"))
        .find(|p| p.exists())
        .expect("pinned RG_BAN_V4");
    let mut value = vec!["00"; 72];
    for b in value.iter_mut().take(8).skip(1) {
        *b = "7f";
    }
    let mut args = vec!["map", "update", "pinned", trie.to_str().expect("utf-8"), "key", "hex"];
    args.extend(["00"; 8]);
    args.extend(["value", "hex"]);
    args.extend(value.iter().copied());
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = bans_json(&s.config);
    assert!(ban_of(&list, "0.0.0.0/0").is_some(), "planted: {list:?}");
    let agent = Agent::start(&lab.server, s.config.clone(), &dir);
    let list = bans_json(&s.config);
    assert!(
        ban_of(&list, "0.0.0.0/0").is_none(),
        "the hostile pinned entry stays: {list:?}"
    );
    assert!(
        ban_of(&list, "2001:db8:a::/64").is_some(),
        "the good ban went: {list:?}"
    );
    let text = scrape(&lab);
    assert_eq!(
        metric(&text, "relay_guard_ban_state_rejected_total", &[("source", "pins")]),
        1.0,
        "{text}\n{}",
        agent.log_text()
    );
    assert!(reaches(&lab, OTHER_V4, BANNED_FREE), "0.0.0.0/0 banned OTHER_V4");
}

/// SPEC.md "an address that a guard allows explicitly is never banned by a
/// log-fed ban": ALLOWED_V4 (allowed on 587 by the `submission` guard)
/// fails logins well past `failures` and still gets through (nft counter),
/// while OTHER_V4 (allowed nowhere) is banned by the same log; manual bans
/// still reach the allowlisted one. `ban_allowed = true` lifts the
/// exemption (log_failures_ban_the_source).
#[test]
fn allowlisted_clients_are_not_banned_from_the_logs() {
    if !require::privileged("allowlisted_clients_are_not_banned_from_the_logs") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let log = dir.write("mail.log", "");
    let extra = format!(
        "log_files = [\"{}\"]\nfailures = 3\nwindow = \"1m\"\nban_time = \"10m\"",
        log.display()
    );
    let s = setup(&lab, &dir, "enforce", &extra);
    let agent = Agent::start(&lab.server, s.config.clone(), &dir);
    let behind = NftCounters::behind_xdp(&lab.server, &[ALLOWED_V4], &[BANNED_GUARDED]);
    let append = |text: &str| append_to(&log, text);
    std::thread::sleep(Duration::from_millis(800));
    for n in 0..6 {
        append(&failure_line(ALLOWED_V4, n));
    }
    for n in 0..3 {
        append(&failure_line(OTHER_V4, n));
    }
    // OTHER_V4's ban is the sign that every line was read.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reaches(&lab, OTHER_V4, BANNED_FREE) {
        assert!(
            Instant::now() < deadline,
            "the other source was not banned:\n{}",
            agent.log_text()
        );
    }
    let before = behind.packets(ALLOWED_V4, BANNED_GUARDED);
    assert!(
        reaches(&lab, ALLOWED_V4, BANNED_GUARDED),
        "the allowlisted client was banned"
    );
    assert!(
        behind.packets(ALLOWED_V4, BANNED_GUARDED) > before,
        "its SYN did not cross XDP"
    );
    let text = scrape(&lab);
    assert_eq!(
        metric(
            &text,
            "relay_guard_ban_failures_exempt_total",
            &[("ban", "sasl"), ("reason", "allowlisted")]
        ),
        6.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "relay_guard_ban_events_total",
            &[("ban", "sasl"), ("action", "banned")]
        ),
        1.0,
        "{text}"
    );
    // A manual ban still works on it.
    ban(&s.config, &[ALLOWED_V4, "--for", "1m"]);
    assert!(
        !reaches(&lab, ALLOWED_V4, BANNED_GUARDED),
        "a manual ban of an allowlisted client"
    );
}
