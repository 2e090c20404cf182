//! Hostile input: a 10-second flood of TCP SYNs to a guarded port from
//! 100,000 distinct spoofed sources (198.18.0.0/15, the benchmark range,
//! inside the test's own namespaces), all denied by the config. Crafted
//! frames go onto the client end of the veth through an AF_PACKET socket.
//!
//! SPEC.md, "Failing safe": blocked-source log lines are bounded in total
//! (at most 10 a second whatever the number of distinct sources, plus a
//! count of what was suppressed), the agent's memory stays flat, and
//! `/metrics` keeps answering. The test also checks that the frames really
//! reached the filter (the dropped counter), so a quiet log means a bound,
//! not a flood that never arrived.
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, METRICS, TempDir, agent_bin},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, Lab, SERVER_V4, pin_dir, scrape},
    net::{http_get, metric},
    netns::NetNs,
    packet::{Ipv4, Tcp, proto, tcp_v4},
    raw::{packet_socket, send_frame},
    require,
};

const PORT: u16 = 25;
const SOURCES: u32 = 100_000;
const FLOOD: Duration = Duration::from_secs(10);
/// The spec's bound on blocked-source lines per second.
const LINES_PER_SECOND: f64 = 10.0;
/// Growth of the agent's resident memory that still counts as flat.
const RSS_SLACK_KIB: u64 = 20 * 1024;

fn config(dir: &TempDir, interface: &str) -> (std::path::PathBuf, DetachOnDrop) {
    TestConfig::new(interface, &pin_dir("rg-flood-"))
        .xdp_mode("native")
        .guard(&Guard::new("relay", &[PORT]).allow(&[ALLOWED_V4]))
        .write(dir)
}

/// The `i`-th spoofed source: 198.18.0.0/15 holds 131,072 addresses.
fn spoofed(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i % (1 << 17)))
}

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn dropped(text: &str) -> f64 {
    metric(
        text,
        "relay_guard_packets_total",
        &[("port", "25"), ("family", "ipv4"), ("verdict", "dropped")],
    )
}

/// Scrapes `/metrics` every 500 ms until `stop`; returns the slowest answer
/// and the number of scrapes that failed or took longer than 2 s.
fn scrape_throughout(ns: NetNs, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, usize, Duration)> {
    std::thread::spawn(move || {
        let addr: SocketAddr = METRICS.parse().expect("constant");
        let (mut scrapes, mut bad, mut slowest) = (0, 0, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ok = http_get(&ns, addr, "/metrics").is_some_and(|b| b.contains("relay_guard_packets_total"));
            let took = t.elapsed();
            scrapes += 1;
            slowest = slowest.max(took);
            if !ok || took > Duration::from_secs(2) {
                bad += 1;
                eprintln!("scrape {scrapes}: ok={ok} in {took:?}");
            }
            std::thread::sleep(Duration::from_millis(500).saturating_sub(took));
        }
        (scrapes, bad, slowest)
    })
}

#[test]
fn a_random_source_flood_keeps_the_log_bounded_memory_flat_and_metrics_answering() {
    if !require::privileged("a_random_source_flood_keeps_the_log_bounded_memory_flat_and_metrics_answering") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let (config, _detach) = config(&dir, &lab.server_if);
    let mut agent = Agent::start(&lab.server, config, &dir);
    let pid = agent.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("agent's /proc/PID/exe");
    assert_eq!(
        exe.canonicalize().ok(),
        agent_bin().canonicalize().ok(),
        "pid {pid} is not the agent (nsenter should exec it in place)"
    );

    // Every frame built before the clock starts: 100,000 SYNs, one per source.
    let server: Ipv4Addr = SERVER_V4.parse().expect("constant");
    let frames: Vec<Vec<u8>> = (0..SOURCES)
        .map(|i| {
            let ip = Ipv4::new(spoofed(i), server, proto::TCP);
            let sport = 1024 + u16::try_from(i % 60_000).expect("small");
            tcp_v4(&[], &ip, &Tcp::syn(sport, PORT, 0x5247_0000 ^ i))
        })
        .collect();
    let (sender, ifindex) = packet_socket(&lab.client, &lab.client_if, 0);

    std::thread::sleep(Duration::from_millis(500));
    let lines_before = agent.log_text().lines().count();
    let rss_before = rss_kib(pid);
    let dropped_before = dropped(&scrape(&lab));
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = scrape_throughout(NetNs::borrow(&lab.server), Arc::clone(&stop));

    // Paced: a batch every 10 ms, so the sources are spread over the 10 s.
    let start = Instant::now();
    let batches = u32::try_from(FLOOD.as_millis() / 10).expect("small");
    let per_batch = SOURCES.div_ceil(batches) as usize;
    let mut rss_peak = rss_before;
    for (n, batch) in frames.chunks(per_batch).enumerate() {
        for f in batch {
            send_frame(&sender, ifindex, f);
        }
        if n % 50 == 0 {
            rss_peak = rss_peak.max(rss_kib(pid));
        }
        let due = Duration::from_millis(10 * (u64::try_from(n).expect("small") + 1));
        std::thread::sleep(due.saturating_sub(start.elapsed()));
    }
    let sent_secs = start.elapsed().as_secs_f64();
    // Let the last events drain and the last suppressed count be written.
    std::thread::sleep(Duration::from_secs(2));
    rss_peak = rss_peak.max(rss_kib(pid));
    stop.store(true, Ordering::Relaxed);
    let (scrapes, bad_scrapes, slowest) = scraper.join().expect("scraper thread");
    let window = start.elapsed().as_secs_f64();

    let log = agent.log_text();
    let new_lines: Vec<&str> = log.lines().skip(lines_before).collect();
    let blocked = new_lines.iter().filter(|l| l.contains("-> port 25")).count();
    let summaries: Vec<&&str> = new_lines.iter().filter(|l| l.contains("suppressed")).collect();
    let last = scrape(&lab);
    let dropped_now = dropped(&last);
    let suppressed_metric = metric(&last, "relay_guard_blocked_events_suppressed_total", &[]);
    let arrived = dropped_now - dropped_before;
    println!(
        "{SOURCES} spoofed SYNs sent in {sent_secs:.1} s; {arrived} counted as dropped; \
         log +{} lines in {window:.1} s ({blocked} blocked-source, {} suppressed-count, \
         {suppressed_metric} events counted as suppressed); \
         RSS {rss_before} KiB -> peak {rss_peak} KiB; {scrapes} scrapes, {bad_scrapes} failed or slow, slowest {slowest:?}",
        new_lines.len(),
        summaries.len(),
    );
    let _ = agent.stop();

    assert!(
        arrived >= 0.9 * f64::from(SOURCES),
        "only {arrived} of {SOURCES} frames were counted as dropped: the flood did not reach the filter"
    );
    // 10 lines a second, one suppressed-count line a second, and slack for
    // the window's edges.
    let bound = ((LINES_PER_SECOND + 1.0) * window.ceil()) as usize + 20;
    assert!(
        new_lines.len() <= bound,
        "the agent's log grew by {} lines ({blocked} blocked-source) in {window:.1} s; bound {bound}. First lines:\n{}",
        new_lines.len(),
        new_lines.iter().take(20).copied().collect::<Vec<_>>().join("\n")
    );
    assert!(
        blocked >= 1,
        "no blocked-source line at all during the flood:\n{}",
        new_lines.join("\n")
    );
    assert!(
        !summaries.is_empty(),
        "no line says how many blocked-source events were suppressed:\n{}",
        new_lines.join("\n")
    );
    assert!(
        suppressed_metric > 0.0,
        "relay_guard_blocked_events_suppressed_total is {suppressed_metric} after the flood"
    );
    assert!(
        rss_peak <= rss_before + RSS_SLACK_KIB,
        "the agent's RSS grew from {rss_before} KiB to {rss_peak} KiB during the flood"
    );
    assert!(
        scrapes >= 15 && bad_scrapes == 0,
        "/metrics: {bad_scrapes} of {scrapes} scrapes failed or took over 2 s (slowest {slowest:?})"
    );
}
