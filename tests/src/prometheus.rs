//! A real Prometheus server (Debian's `prometheus`) inside a namespace,
//! scraping the agent every second, queried over its HTTP API; and a parser
//! that turns the agent's own /metrics text into the same shape of samples.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use crate::{
    agent::TempDir,
    daemon::Daemon,
    net::http_get,
    netns::{NetNs, unique},
};

/// Where Prometheus listens inside the namespace it runs in.
pub const LISTEN: &str = "127.0.0.1:19090";
/// The scrape job's name (the `job` label of every scraped series).
pub const JOB: &str = "relay-guard";

/// One series: its labels (without the metric name) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub struct Prometheus<'a> {
    ns: &'a NetNs,
    pub daemon: Daemon,
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `ns` on [`LISTEN`], with its TSDB and config under
    /// `dir`, scraping `target` (host:port, /metrics) every second, and waits
    /// until it reports ready.
    pub fn start(ns: &'a NetNs, dir: &TempDir, target: &str) -> Prometheus<'a> {
        let config = dir.write(
            &format!("{}.yml", unique("prometheus")),
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        );
        let tsdb = dir.0.join(unique("prometheus-tsdb"));
        let mut daemon = Daemon::spawn(
            ns,
            &[
                "prometheus",
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", tsdb.display()),
                &format!("--web.listen-address={LISTEN}"),
            ],
            dir.0.join(format!("{}.log", unique("prometheus"))),
        );
        let addr: SocketAddr = LISTEN.parse().expect("constant");
        daemon.wait_until(Duration::from_secs(30), "ready", || {
            http_get(ns, addr, "/-/ready").is_some()
        });
        Prometheus { ns, daemon }
    }

    /// An instant query; the samples of the vector it returns. Panics when
    /// the API does not answer with `status: success` and a vector.
    pub fn query(&mut self, promql: &str) -> Vec<Sample> {
        self.daemon.assert_running();
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let addr: SocketAddr = LISTEN.parse().expect("constant");
        let body = http_get(self.ns, addr, &path)
            .unwrap_or_else(|| panic!("Prometheus did not answer {path}:\n{}", self.daemon.log_text()));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        assert_eq!(v["data"]["resultType"], "vector", "{path}: {body}");
        v["data"]["result"]
            .as_array()
            .expect("result array")
            .iter()
            .map(|r| {
                let mut labels: BTreeMap<String, String> = r["metric"]
                    .as_object()
                    .expect("metric object")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                labels.remove("__name__");
                let value = r["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
                Sample { labels, value }
            })
            .collect()
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// The samples of metric `name` in Prometheus text exposition format (label
/// values without escaped quotes, which is all relay-guard emits).
pub fn parse_samples(text: &str, name: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once("} ") {
                Some(lv) => lv,
                None => continue,
            }
        } else if let Some(v) = rest.strip_prefix(' ') {
            ("", v)
        } else {
            continue;
        };
        let labels = label_part
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
            .collect();
        // A sample may carry a timestamp after the value.
        let value = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        out.push(Sample { labels, value });
    }
    out
}

/// `promtool check metrics` accepts `text` (a scrape of the agent), which is
/// written to `dir` for it.
pub fn assert_promtool_accepts(dir: &TempDir, text: &str) {
    let file = dir.write("metrics.txt", text);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
