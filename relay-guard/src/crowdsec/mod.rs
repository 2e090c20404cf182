//! CrowdSec (SPEC.md "Fleet-wide bans: CrowdSec"): relay-guard as a
//! bouncer of a Local API (its decisions enforced at the NIC, as prefixes,
//! on the ports of one `[[ban]]` section) and as a watcher (its own log-fed
//! bans pushed as alerts, so that every gateway drops them).
//!
//! Below the agent: [`client`] speaks HTTP to LAPI, [`decision`] types
//! what the stream says, [`mapping`] turns decisions into prefixes and
//! expiries, [`pusher`] queues and pushes bans with retry and backoff (the
//! queue is saved in `state_dir`, so neither a restart nor an outage loses
//! a push, and a push whose answer was lost is looked up before it is sent
//! again). The agent (`agent::crowdsec`) runs the tasks and writes the
//! kernel through its ban runner, so that decisions persist and expire
//! like every other ban.
pub mod client;
pub mod decision;
pub mod duration;
pub mod mapping;
pub mod pusher;

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// The scenario of a pushed ban: `relay-guard/<ban section>`.
pub fn scenario(ban: &str) -> String {
    format!("relay-guard/{ban}")
}

/// The origin of pushed decisions.
pub const ORIGIN: &str = "relay-guard";

/// A counter whose samples carry the family's name as it is
/// (`..._total`), typed unknown (the metrics server types it `counter` in
/// the text format 0.0.4: `agent::metrics::openmetrics_to_text_004`).
#[derive(Debug, Clone, Default)]
pub struct TotalCounter(Counter);

impl TotalCounter {
    pub fn inc_by(&self, n: u64) {
        self.0.inc_by(n);
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl prometheus_client::metrics::TypedMetric for TotalCounter {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Unknown;
}

impl prometheus_client::encoding::EncodeMetric for TotalCounter {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Unknown
    }
}

/// The CrowdSec metrics (names of SPEC.md).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Both without labels, present only while `[crowdsec]` is
    /// configured (so that hosts without it raise no alert).
    pub up: Family<Vec<(&'static str, String)>, Gauge>,
    pub last_pull_success: Family<Vec<(&'static str, String)>, Gauge<f64, AtomicU64>>,
    pub decisions: Family<Vec<(&'static str, String)>, Gauge>,
    /// A counter exported as `..._decisions_total` of type unknown: as a
    /// counter family it would be named `relay_guard_crowdsec_decisions`,
    /// the gauge's name (SPEC.md names both).
    pub decisions_total: Family<Vec<(&'static str, String)>, TotalCounter>,
    pub pushed_total: Family<Vec<(&'static str, String)>, Counter>,
}

impl Metrics {
    /// Registers them, every series present from the start.
    pub fn register(&self, r: &mut Registry) {
        for action in ["added", "deleted", "ignored"] {
            self.decision_event(action, 0);
        }
        for result in ["ok", "failed"] {
            self.pushed(result, 0);
        }
        for scope in ["ip", "range"] {
            for family in ["ipv4", "ipv6"] {
                self.decisions
                    .get_or_create(&vec![("scope", scope.to_string()), ("family", family.to_string())])
                    .set(0);
            }
        }
        let sub = r.sub_registry_with_prefix("relay_guard_crowdsec");
        sub.register(
            "up",
            "Whether the last pull of CrowdSec's decision stream succeeded (1) or not (0: LAPI unreachable or answering errors; decisions in force stay in force)",
            self.up.clone(),
        );
        sub.register(
            "last_pull_success_timestamp_seconds",
            "When the decision stream was last pulled successfully (Unix time)",
            self.last_pull_success.clone(),
        );
        sub.register(
            "decisions",
            "CrowdSec decisions in force in the kernel, by scope (ip, range) and family",
            self.decisions.clone(),
        );
        sub.register(
            "decisions_total",
            "CrowdSec decisions taken from the stream: added, deleted, or ignored (another type or scope, never, an explicit guard allow, a gateway's own push, unparsable)",
            self.decisions_total.clone(),
        );
        sub.register(
            "pushed",
            "Log-fed bans pushed to LAPI as alerts (ok), and failed push attempts (failed; retried with backoff)",
            self.pushed_total.clone(),
        );
    }

    /// `[crowdsec]` is configured (the `up` series exist) or not.
    pub fn configured(&self, on: bool) {
        if on {
            let _ = self.up.get_or_create(&Vec::new()).get();
            let _ = self.last_pull_success.get_or_create(&Vec::new()).get();
        } else {
            self.up.remove(&Vec::new());
            self.last_pull_success.remove(&Vec::new());
        }
    }

    /// A pull succeeded (`at`: Unix seconds) or failed.
    pub fn pulled(&self, ok: bool, at: f64) {
        self.up.get_or_create(&Vec::new()).set(i64::from(ok));
        if ok {
            self.last_pull_success.get_or_create(&Vec::new()).set(at);
        }
    }

    pub fn decision_event(&self, action: &'static str, n: u64) {
        self.decisions_total
            .get_or_create(&vec![("action", action.to_string())])
            .inc_by(n);
    }

    pub fn pushed(&self, result: &'static str, n: u64) {
        self.pushed_total
            .get_or_create(&vec![("result", result.to_string())])
            .inc_by(n);
    }
}
