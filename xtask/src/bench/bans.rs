//! Bans (SPEC.md "Bans"): what the ban check adds to the guarded SYN path,
//! how fast the agent applies bans, and how long a start takes to restore
//! saved ones.
//!
//! 1. Per-packet cost (`BPF_PROG_TEST_RUN`): a denied and an allowed IPv4
//!    SYN to :25, where a `[[ban]]` section covers :25 (so every packet
//!    pays the ban check), with 0 and with 100,000 active bans (random
//!    /32s in 198.18.0.0/15 and 100.64.0.0/10, none of them the test
//!    sources); and a banned SYN at 100,000.
//! 2. Bans per second from a burst: 100,000 distinct sources each failing
//!    once (`failures = 1`) through the agent's path (engine, then the
//!    kernel write), timed as a whole.
//! 3. Start-up restore: `BanRunner::start` (what `relay-guard run` calls)
//!    on fresh maps with 100,000 bans saved in `state_dir`.
//! 4. From a failure line to the drop: a Postfix SASL failure line appended
//!    to a log file that `logwatch` follows (inotify), its event handed to
//!    the engine as the agent does, until `BPF_PROG_TEST_RUN` of a SYN from
//!    that source to :587 (banned, not guarded) says XDP_DROP; one new
//!    source per round. The agent's own
//!    event loop adds its scheduling on top (tests/tests/mail_bans.rs times
//!    the whole agent on real packets).
//! 5. The engine's cost per failure with its 2^20 trackers full, new
//!    sources only (each evicts the least recently failed tracker).
//! 6. The log parser's throughput: `logwatch::Parser::line` over a mix of
//!    real Postfix and Dovecot lines (failures, disconnects, lines of other
//!    kinds), best of 5 rounds of [`PARSE_LINES`] lines.
use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd as _,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use relay_guard::{
    agent::bans::{AuthFailure, BanRunner, save},
    config::Config,
    kernel::{loader::Loaded, sync},
    logwatch::{self, LogEvent, Source},
    policy::{Policy, bans::FailureOrigin},
};

use super::{
    bpf::{self, XDP_DROP, XDP_PASS},
    frames,
    plan::Plan,
    prefixes::{ALLOWED_V4, DENIED_V4, SERVER_V4},
    sys::{check_stop, median, record},
};

pub const BANS: usize = 100_000;
/// Rounds of the line-to-drop latency.
pub const LATENCY_ROUNDS: usize = 50;
/// Lines per round of the parser's throughput.
pub const PARSE_LINES: usize = 1_000_000;

/// What part 6 parses, in turn: the lines a busy mail server's log holds.
const PARSE_MIX: &[&str] = &[
    "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=alice@example.com",
    "Dec  2 01:02:04 mx postfix/submission/smtpd[4242]: disconnect from unknown[192.0.2.7] ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5",
    "Dec  2 01:02:03 mx postfix/smtpd[5]: connect from unknown[192.0.2.7]",
    "Dec  2 01:02:03 mx postfix/qmgr[6]: 4F1A2B3C: removed",
    "Dec  2 01:02:03 mx dovecot: imap-login: Disconnected (auth failed, 3 attempts in 14 secs): user=<bob>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, TLS, session=<mD2nLxPyXsDAAAIB>",
    "2026-12-02T01:02:03.123456+00:00 mx postfix/smtpd[900]: warning: unknown[2001:db8::5]: SASL LOGIN authentication failed: ",
    "Dec 02 01:02:03 auth: Info: passwd-file(bob,192.0.2.7): Password mismatch",
    "Dec  2 01:02:03 mx postfix/smtpd[5]: 4F1A2B3C: client=unknown[192.0.2.7], sasl_method=PLAIN, sasl_username=a",
];

/// The figures of this part.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// (packet, bans, median ns/run).
    pub costs: Vec<(&'static str, usize, f64)>,
    pub burst_bans_per_s: f64,
    pub burst: Duration,
    pub restore: Duration,
    /// Failure line written → SYN from that source dropped, per round, sorted.
    pub latency: Vec<Duration>,
    /// The engine's cost per failure with 2^20 trackers (new sources).
    pub tracker_failure: Duration,
    /// Part 6: lines per second through `Parser::line`.
    pub parse_lines_per_s: f64,
}

fn config(dir: &Path, pin_dir: &Path, state: &Path) -> anyhow::Result<Config> {
    let text = format!(
        r#"interfaces = ["lo"]
pin_dir = "{pins}"
state_dir = "{state}"
metrics_listen = ""
[[guard]]
name = "relay"
ports = [25]
allow = ["{ALLOWED_V4}/32"]
[[ban]]
name = "sasl"
ports = [25, 587]
failures = 1
ban_time = "1h"
"#,
        pins = pin_dir.display(),
        state = state.display()
    );
    let path = dir.join("bans-bench.toml");
    std::fs::write(&path, &text)?;
    Config::parse(&path, &text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The `n`-th banned source: spread over 198.18.0.0/15 and 100.64.0.0/10.
fn source(n: usize) -> Ipv4Addr {
    let n = n as u32;
    if n % 2 == 0 {
        Ipv4Addr::from(0xC612_0000 | ((n / 2).wrapping_mul(2_654_435_761) & 0x1_ffff))
    } else {
        Ipv4Addr::from(0x6440_0000 | ((n / 2).wrapping_mul(2_654_435_761) & 0x3f_ffff))
    }
}

fn cost(plan: &Plan, loaded: &mut Loaded, frame: &[u8], expect: u32) -> anyhow::Result<f64> {
    let fd = loaded.program().fd()?.as_fd().try_clone_to_owned()?;
    let mut s = Vec::new();
    for _ in 0..plan.runs {
        check_stop()?;
        let (v, ns) = bpf::test_run(fd.as_fd(), frame, plan.repeat)?;
        anyhow::ensure!(v == expect, "verdict {v}, expected {expect}");
        s.push(f64::from(ns));
    }
    Ok(median(&s))
}

pub fn run(plan: &Plan, dir: &Path) -> anyhow::Result<Output> {
    let mut out = Output::default();
    let state = dir.join("bans-state");
    let cfg = config(dir, &plan.pin_dir, &state)?;
    let mut loaded = Loaded::load().context("Loaded::load")?;
    sync::apply(&mut loaded.maps, &Policy::compile(&cfg)).context("sync::apply")?;
    let _ = std::fs::remove_dir_all(&state);
    let mut runner = BanRunner::start(&cfg, &mut loaded.bans, false)?;
    record(format!(
        "bans: BPF_PROG_TEST_RUN x {} runs (repeat {}), :25 covered by a [[ban]]; 0 and {BANS} bans",
        plan.runs, plan.repeat
    ));
    let denied = frames::syn_v4(DENIED_V4, SERVER_V4, 25);
    let allowed = frames::syn_v4(ALLOWED_V4, SERVER_V4, 25);
    println!("bench: bans: per-packet cost at 0 bans");
    out.costs
        .push(("denied IPv4 SYN :25", 0, cost(plan, &mut loaded, &denied, XDP_DROP)?));
    out.costs
        .push(("allowed IPv4 SYN :25", 0, cost(plan, &mut loaded, &allowed, XDP_PASS)?));

    println!("bench: bans: {BANS} failures from distinct sources (failures = 1)");
    let at = SystemTime::now();
    let t = Instant::now();
    for n in 0..BANS {
        let f = AuthFailure {
            ban: 0,
            source: IpAddr::V4(source(n)),
            origin: FailureOrigin::Postfix,
            at,
        };
        runner.failure(&mut loaded.bans, &f);
    }
    out.burst = t.elapsed();
    out.burst_bans_per_s = BANS as f64 / out.burst.as_secs_f64();
    runner.save_now();

    println!("bench: bans: per-packet cost at {BANS} bans");
    out.costs
        .push(("denied IPv4 SYN :25", BANS, cost(plan, &mut loaded, &denied, XDP_DROP)?));
    out.costs.push((
        "allowed IPv4 SYN :25",
        BANS,
        cost(plan, &mut loaded, &allowed, XDP_PASS)?,
    ));
    let banned = frames::syn_v4(source(7), SERVER_V4, 25);
    out.costs
        .push(("banned IPv4 SYN :25", BANS, cost(plan, &mut loaded, &banned, XDP_DROP)?));
    drop(runner);
    drop(loaded);

    // Restore: fresh maps, the saved list as the agent wrote it.
    let saved = relay_guard::agent::bans::load_saved(&state).bans;
    anyhow::ensure!(saved.len() >= BANS, "saved {} bans", saved.len());
    save(&state, saved)?;
    let mut fresh = Loaded::load().context("Loaded::load")?;
    println!("bench: bans: restoring {BANS} saved bans");
    let t = Instant::now();
    let runner = BanRunner::start(&cfg, &mut fresh.bans, false)?;
    out.restore = t.elapsed();
    let mut runner = runner;
    let banned_frame = frames::syn_v4(source(11), SERVER_V4, 25);
    let (v, _) = bpf::test_run(fresh.program().fd()?.as_fd(), &banned_frame, 1)?;
    anyhow::ensure!(v == XDP_DROP, "a restored ban does not drop (verdict {v})");

    println!("bench: bans: failure line to drop, {LATENCY_ROUNDS} rounds");
    out.latency = latency(&mut runner, &mut fresh, dir)?;
    drop(runner);
    println!("bench: bans: log parser, {PARSE_LINES} lines x 5 rounds");
    out.parse_lines_per_s = parse_rate()?;
    let _ = std::fs::remove_dir_all(&state);
    println!(
        "bench: bans: failures at {} trackers",
        relay_guard::policy::bans::MAX_TRACKERS
    );
    out.tracker_failure = trackers(&cfg);
    print(&out);
    Ok(out)
}

/// Part 5: the engine's cost per failure with its tracker table full
/// (2^20 fresh sources, one failure each): new sources failing `failures`
/// times each (here 1: every failure is a new source and a ban), so each
/// failure evicts the least recently failed tracker.
fn trackers(cfg: &Config) -> Duration {
    use relay_guard::policy::bans::{BanEngine, MAX_TRACKERS};
    let mut sections = cfg.bans.clone();
    sections[0].failures = 3;
    let mut e = BanEngine::new(sections);
    let at = Duration::from_secs(1_800_000_000);
    for i in 0..MAX_TRACKERS as u32 {
        e.failure(0, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), at);
    }
    let n = 300_000u32;
    let t = Instant::now();
    for i in 0..n {
        e.failure(0, IpAddr::V4(Ipv4Addr::from(0x0c00_0000 + i / 3)), at);
    }
    t.elapsed() / n
}

/// Part 4: see the module comment.
fn latency(runner: &mut BanRunner, loaded: &mut Loaded, dir: &Path) -> anyhow::Result<Vec<Duration>> {
    let log = dir.join("bans-latency.log");
    std::fs::write(&log, "")?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let _watch = logwatch::spawn(vec![Source::File(log.clone())], tx).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The follower starts at the end of the (empty) file.
    std::thread::sleep(Duration::from_millis(300));
    let fd = loaded.program().fd()?.as_fd().try_clone_to_owned()?;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log)?;
    let mut samples = Vec::with_capacity(LATENCY_ROUNDS);
    for r in 0..LATENCY_ROUNDS {
        check_stop()?;
        // Sources no earlier part banned (those are in 198.18.0.0/15 and
        // 100.64.0.0/10): 198.51.100.128 and up.
        let src = Ipv4Addr::new(198, 51, 100, 128 + r as u8);
        // :587, which the ban covers and no guard does: passed until the ban.
        let frame = frames::syn_v4(src, SERVER_V4, 587);
        let (v, _) = bpf::test_run(fd.as_fd(), &frame, 1)?;
        anyhow::ensure!(v != XDP_DROP, "{src} dropped before its failure");
        let t = Instant::now();
        writeln!(
            f,
            "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[{src}]: SASL PLAIN authentication failed: "
        )?;
        let deadline = t + Duration::from_secs(2);
        loop {
            match rx.try_recv() {
                Ok(LogEvent::Failure(af)) => {
                    let failure = AuthFailure {
                        ban: 0,
                        source: af.source,
                        origin: FailureOrigin::Postfix,
                        at: af.at,
                    };
                    runner.failure(&mut loaded.bans, &failure);
                    let (v, _) = bpf::test_run(fd.as_fd(), &frame, 1)?;
                    if v == XDP_DROP {
                        break;
                    }
                }
                Ok(LogEvent::Unparsed { .. } | LogEvent::Suspicious { .. }) => {
                    anyhow::bail!("the failure line for {src} did not parse")
                }
                Ok(LogEvent::SourceUp { .. }) => {}
                Err(_) => {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "{src}: no drop within 2 s of its failure line"
                    );
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// Part 6: see the module comment.
pub fn parse_rate() -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        check_stop()?;
        let mut p = logwatch::Parser::new();
        let mut failures = 0u64;
        let t = Instant::now();
        for i in 0..PARSE_LINES {
            if let logwatch::Outcome::Failures(f) = p.line(std::hint::black_box(PARSE_MIX[i % PARSE_MIX.len()])) {
                failures += u64::from(f.count);
            }
        }
        best = best.min(t.elapsed().as_secs_f64());
        anyhow::ensure!(failures > 0, "the parser counted no failure");
    }
    Ok(PARSE_LINES as f64 / best)
}

pub fn print(o: &Output) {
    println!("\nbans: per-packet cost (median ns per BPF_PROG_TEST_RUN run)");
    for (name, n, ns) in &o.costs {
        println!("  {name:<24} {n:>7} bans  {ns:>6.1} ns");
    }
    println!(
        "bans: burst of {BANS} failures -> {BANS} bans in {:.1} ms: {:.0} bans/s",
        o.burst.as_secs_f64() * 1e3,
        o.burst_bans_per_s
    );
    println!(
        "bans: start-up restore of {BANS} saved bans: {:.1} ms",
        o.restore.as_secs_f64() * 1e3
    );
    if let (Some(min), Some(max)) = (o.latency.first(), o.latency.last()) {
        println!(
            "bans: failure line to drop: median {:.2} ms (min {:.2}, max {:.2}) over {} rounds; target < 50 ms",
            o.latency[o.latency.len() / 2].as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            o.latency.len()
        );
    }
    println!(
        "bans: {:.2} us per failure at {} trackers (the table full: each new source evicts the oldest)",
        o.tracker_failure.as_secs_f64() * 1e6,
        relay_guard::policy::bans::MAX_TRACKERS
    );
    println!(
        "bans: log parser: {:.0} lines/s over a mix of {} real Postfix and Dovecot lines",
        o.parse_lines_per_s,
        PARSE_MIX.len()
    );
}
