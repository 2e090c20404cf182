//! "Bounded work for hostile input" of SPEC.md's "Failing safe", against the
//! real agent: idle connections do not keep `/metrics` busy or open, a list
//! file is applied only once fully written, and a FIFO in place of a list
//! is an error, not a hang.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, METRICS, TempDir},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, ip, pin_dir, scrape, wait_metric},
    net::{BannerServer, connect_banner, http_get, metric},
    prober::ALLOWED_TIMEOUT,
    require,
};

/// A config whose relay guard (port 25) reads `relay-allow.txt`.
fn setup(lab: &Lab, dir: &TempDir, allow_list: &str) -> (std::path::PathBuf, DetachOnDrop) {
    dir.write("relay-allow.txt", allow_list);
    TestConfig::new(&lab.server_if, &pin_dir("rg-test-"))
        .guard(&Guard::new("relay", &[25]).allow_files(&["relay-allow.txt"]))
        .write(dir)
}

/// Whether `src` reaches the banner on port 25 (a short timeout for a
/// source expected to be dropped).
fn passes(lab: &Lab, src: &str, expect: bool) -> bool {
    let timeout = if expect {
        ALLOWED_TIMEOUT
    } else {
        Duration::from_millis(400)
    };
    connect_banner(&lab.client, ip(src), ip(SERVER_V4), 25, timeout).is_ok()
}

/// 70 idle connections to /metrics: a scrape still answers at once, and
/// after the 10 s request timeout the server has closed every idle one.
#[test]
fn idle_metrics_connections_neither_block_nor_stay() {
    if !require::privileged("idle_metrics_connections_neither_block_nor_stay") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let (config, _detach) = setup(&lab, &dir, &format!("{ALLOWED_V4}\n"));
    let _agent = Agent::start(&lab.server, config, &dir);
    let addr: SocketAddr = METRICS.parse().expect("constant");
    let opened = Instant::now();
    let idle: Vec<TcpStream> = lab.server.run(move || {
        (0..70)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect"))
            .collect()
    });
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let body = http_get(&lab.server, addr, "/metrics");
    assert!(
        body.is_some_and(|b| b.contains("relay_guard_build_info")),
        "no scrape with 70 idle connections open"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "scrape took {:?}",
        asked.elapsed()
    );
    std::thread::sleep(Duration::from_secs(11).saturating_sub(opened.elapsed()));
    let mut open = 0;
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        let mut b = [0u8; 64];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            _ => open += 1,
        }
    }
    assert_eq!(open, 0, "idle connections still open after {:?}", opened.elapsed());
    assert!(
        http_get(&lab.server, addr, "/metrics").is_some(),
        "the endpoint stopped answering"
    );
}

/// A list rewritten in place over more than a second (truncate, write part,
/// pause, write the rest, close) is applied once, when the writer closes
/// it: never the half-written list, so a source that the old and the new
/// list both allow is never dropped meanwhile.
#[test]
fn a_list_is_applied_only_when_fully_written() {
    if !require::privileged("a_list_is_applied_only_when_fully_written") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, _detach) = setup(&lab, &dir, &format!("{ALLOWED_V4}\n"));
    let agent = Agent::start(&lab.server, config, &dir);
    assert!(passes(&lab, ALLOWED_V4, true));
    assert!(!passes(&lab, DENIED_V4, false));
    let reloads = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);

    let list = dir.0.join("relay-allow.txt");
    let mut f = std::fs::File::create(&list).expect("truncate");
    f.write_all(format!("{DENIED_V4}\n").as_bytes()).expect("write");
    f.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        passes(&lab, ALLOWED_V4, true),
        "a half-written list was applied: a source allowed before and after was dropped"
    );
    assert_eq!(
        metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]),
        reloads,
        "a reload ran while the list was open for writing"
    );
    f.write_all(format!("{ALLOWED_V4}\n").as_bytes()).expect("write");
    drop(f);
    wait_metric(&lab, &agent, "relay_guard_config_reloads_total", reloads + 1.0);
    assert!(passes(&lab, DENIED_V4, true), "the whole list was not applied");
    assert!(passes(&lab, ALLOWED_V4, true));
}

/// A FIFO renamed over a list file: the reload fails at once with the file
/// named (reading never blocks on it), the policy stays, and a real file
/// put back is applied.
#[test]
fn a_fifo_in_place_of_a_list_is_an_error_not_a_hang() {
    if !require::privileged("a_fifo_in_place_of_a_list_is_an_error_not_a_hang") {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let _server = BannerServer::start(&lab.server, &[25]);
    let (config, _detach) = setup(&lab, &dir, &format!("{ALLOWED_V4}\n"));
    let agent = Agent::start(&lab.server, config, &dir);
    let failures = metric(&scrape(&lab), "relay_guard_config_reload_failures_total", &[]);

    let list = dir.0.join("relay-allow.txt");
    let fifo = dir.0.join("fifo.tmp");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    std::fs::rename(&fifo, &list).expect("rename the FIFO into place");
    wait_metric(&lab, &agent, "relay_guard_config_reload_failures_total", failures + 1.0);
    assert!(
        agent.log_text().contains("not a regular file (a FIFO)"),
        "{}",
        agent.log_text()
    );
    assert!(passes(&lab, ALLOWED_V4, true), "the policy changed");
    assert!(!passes(&lab, DENIED_V4, false), "the policy changed");

    let tmp = dir.0.join("relay-allow.new");
    std::fs::write(&tmp, format!("{ALLOWED_V4}\n{DENIED_V4}\n")).expect("write");
    let reloads = metric(&scrape(&lab), "relay_guard_config_reloads_total", &[]);
    std::fs::rename(&tmp, &list).expect("rename");
    let text = wait_metric(&lab, &agent, "relay_guard_config_reloads_total", reloads + 1.0);
    assert_eq!(
        metric(&text, "relay_guard_config_last_reload_successful", &[]),
        1.0,
        "{}",
        agent.log_text()
    );
    assert!(passes(&lab, DENIED_V4, true), "the fixed list was not applied");
}
