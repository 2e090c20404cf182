//! What the agent exports: metric names and each one's label names, from a
//! real scrape of the real agent, and the check that a PromQL expression
//! (an alert rule, a dashboard query) names only those.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, TempDir},
    deploy::{lab_config, scrape},
    lab::{ALLOWED_V4, DENIED_V4, Lab, ip},
    net::{BannerServer, connect_banner, metric},
    promql::{Refs, promql_refs},
};

/// Metric names and each one's label names, from a real scrape.
#[derive(Debug)]
pub struct Exported {
    /// Metric name (as sampled: `_total`, `_info`) -> its label names.
    pub labels: BTreeMap<String, BTreeSet<String>>,
}

/// The metrics SPEC.md promises.
pub const SPEC_METRICS: [&str; 9] = [
    "relay_guard_packets_total",
    "relay_guard_malformed_packets_total",
    "relay_guard_allowlist_prefixes",
    "relay_guard_config_reloads_total",
    "relay_guard_config_reload_failures_total",
    "relay_guard_config_last_reload_successful",
    "relay_guard_config_last_reload_success_timestamp_seconds",
    "relay_guard_build_info",
    "relay_guard_scrape_errors_total",
];

/// Runs the agent once (monitor mode, with traffic from an allowed and a
/// denied source, so every packet label appears) and records what it exports.
pub fn exported() -> &'static Exported {
    static EXPORTED: OnceLock<Exported> = OnceLock::new();
    EXPORTED.get_or_init(|| {
        let lab = Lab::new();
        let dir = TempDir::new();
        let _server = BannerServer::start(&lab.server, &[25]);
        let (config, _detach) = lab_config(&lab, &dir, "monitor");
        // The scheduled relay test too, so its series (and their `port`
        // label) are there: nothing listens on loopback, so it finds port
        // 25 closed at once.
        let mut text = std::fs::read_to_string(&config).expect("config");
        text.push_str("\n[relaytest]\nenabled = true\nports = [25]\ntarget = \"127.0.0.1\"\ntimeout = \"1s\"\n");
        // And a [[ban]] section fed one failed login, so the ban series
        // (and their `ban` and `source` labels) are there. Its own
        // state_dir, so the ban list it saves is nobody else's.
        let state = dir.0.join("state");
        let log = dir.0.join("logs").join("mail.log");
        text = text.replacen("pin_dir = ", &format!("state_dir = \"{}\"\npin_dir = ", state.display()), 1);
        text.push_str(&format!(
            "\n[[ban]]\nname = \"sasl\"\nports = [587]\nlog_files = [\"{}\"]\nfailures = 1\nban_time = \"1m\"\n",
            log.display()
        ));
        // And [crowdsec], so its series are there: a bouncer key, a LAPI
        // that does not answer (relay_guard_crowdsec_up 0).
        let key = dir.0.join("crowdsec.key");
        crate::crowdsec::write_secret(&key, &crate::crowdsec::key_for("exported"));
        text.push_str(&format!(
            "\n[[ban]]\nname = \"crowdsec\"\nports = [587]\n\n[crowdsec]\nlapi_url = \"http://127.0.0.1:9\"\napi_key_file = \"{}\"\nban = \"crowdsec\"\n",
            key.display()
        ));
        std::fs::write(&config, text).expect("config");
        let mut agent = Agent::start(&lab.server, config, &dir);
        std::fs::create_dir_all(log.parent().expect("dir")).expect("mkdir logs");
        std::fs::write(
            &log,
            "Dec  2 01:02:03 mx postfix/submission/smtpd[4242]: warning: unknown[198.51.100.77]: SASL PLAIN authentication failed: \n\
             garbage, not a log line\n",
        )
        .expect("write log");
        for src in [ALLOWED_V4, DENIED_V4] {
            let _ = connect_banner(
                &lab.client,
                ip(src),
                Lab::server_addr_for(src),
                25,
                Duration::from_secs(3),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let body = loop {
            let m = scrape(&lab, "/metrics").expect("metrics");
            if metric(&m, "relay_guard_packets_total", &[("verdict", "would_drop")]) > 0.0
                && metric(&m, "relay_guard_relaytest_last_run_timestamp_seconds", &[]) > 0.0
                && metric(&m, "relay_guard_auth_failures_total", &[]) > 0.0
                && metric(&m, "relay_guard_bans", &[]) > 0.0
                && metric(&m, "relay_guard_log_lines_unparsed_total", &[]) > 0.0
            {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "no would_drop packets, relay test, failed login or ban counted:\n{m}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = agent.stop();
        let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split_whitespace();
                let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                    continue;
                };
                let sample = match kind {
                    "counter" if !name.ends_with("_total") => format!("{name}_total"),
                    "info" => format!("{name}_info"),
                    _ => name.to_string(),
                };
                labels.entry(sample).or_default();
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let name: String = line
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let set = labels.entry(name).or_default();
                if let Some(l) = line
                    .split_once('{')
                    .and_then(|(_, r)| r.split_once('}'))
                    .map(|(l, _)| l)
                {
                    set.extend(quoteless_label_names(l));
                }
            }
        }
        for m in SPEC_METRICS {
            assert!(
                labels.contains_key(m),
                "the agent does not export {m} (SPEC.md):\n{body}"
            );
        }
        Exported { labels }
    })
}

/// Label names of a `k="v",k2="v2"` list.
fn quoteless_label_names(list: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = list;
    while let Some((k, after)) = rest.split_once("=\"") {
        names.push(k.trim().trim_start_matches(',').trim().to_string());
        // skip the value
        let mut escaped = false;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = after.get(end + 1..).unwrap_or("");
    }
    names
}

/// Labels Prometheus adds to every scraped series.
pub const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Panics unless `expr` names only exported metrics (or `extra`) and labels
/// those metrics carry.
pub fn check_refs(what: &str, expr: &str, extra: &[&str]) -> Refs {
    let exp = exported();
    let refs = promql_refs(expr);
    assert!(!refs.metrics.is_empty(), "{what}: no metric in `{expr}`");
    let mut known_labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    for m in &refs.metrics {
        if extra.contains(&m.as_str()) {
            continue;
        }
        let labels = exp.labels.get(m).unwrap_or_else(|| {
            panic!(
                "{what}: `{m}` is not a metric the agent exports (in `{expr}`); it exports {:?}",
                exp.labels.keys()
            )
        });
        known_labels.extend(labels.iter().cloned());
    }
    let unknown: Vec<&String> = refs.labels.difference(&known_labels).collect();
    assert!(
        unknown.is_empty(),
        "{what}: labels {unknown:?} are on none of {:?} (in `{expr}`)",
        refs.metrics
    );
    refs
}
