//! The scheduled open-relay test of `relay-guard run` (`[relaytest]`): a
//! task that tests the host's own listeners at start and then every
//! `interval` (plus a random part of `jitter`), logs what it found and
//! keeps the relaytest metrics. A reload that changes the section runs the
//! test again at once with the new settings.
//!
//! The test looks from outside through XCLIENT (`xclient_addr`): a session
//! from the host itself is trusted by most MTAs (Postfix's default
//! `mynetworks`), so its refusals prove nothing, and its acceptances are no
//! finding. When XCLIENT is refused, the port is reported untested (up 0,
//! `untested{reason="xclient_refused"}`), never as closed to relaying.
use std::{
    collections::BTreeSet,
    hash::{BuildHasher as _, Hasher as _},
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    config::relaytest::Relaytest,
    relaytest::{self, Options, report::Report},
};

type PortLabel = [(&'static str, String); 1];
type ReasonLabels = [(&'static str, String); 2];

/// The relaytest metrics (SPEC.md "Open-relay test").
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `relay_guard_relaytest_relayed{port}`: probes relayed in the last run.
    relayed: Family<PortLabel, Gauge>,
    /// `relay_guard_relaytest_up{port}`: 1 when the last run tested the port
    /// (every probe answered), 0 when it could not.
    up: Family<PortLabel, Gauge>,
    /// `relay_guard_relaytest_untested{port,reason}`: 1 for the reason a
    /// port could not be tested in the last run.
    untested: Family<ReasonLabels, Gauge>,
    /// `relay_guard_relaytest_auth_before_starttls{port}`.
    auth_before_starttls: Family<PortLabel, Gauge>,
    /// `relay_guard_relaytest_last_run_timestamp_seconds`.
    last_run: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("relay_guard");
        sub.register(
            "relaytest_relayed",
            "Open-relay probes the port accepted to the end of DATA in the last scheduled relay test (0: none)",
            self.relayed.clone(),
        );
        sub.register(
            "relaytest_up",
            "Whether the last scheduled relay test could test the port (1) or not (0: see relaytest_untested)",
            self.up.clone(),
        );
        sub.register(
            "relaytest_untested",
            "Why the last scheduled relay test could not test the port (1 for the reason)",
            self.untested.clone(),
        );
        sub.register(
            "relaytest_auth_before_starttls",
            "Whether the port offered AUTH before STARTTLS in the last scheduled relay test",
            self.auth_before_starttls.clone(),
        );
        sub.register(
            "relaytest_last_run_timestamp_seconds",
            "Unix time the last scheduled relay test finished",
            self.last_run.clone(),
        );
    }

    fn clear_untested(&self, previous: &mut BTreeSet<(u16, &'static str)>) {
        for &(port, reason) in previous.iter() {
            self.untested
                .remove(&[("port", port.to_string()), ("reason", reason.to_string())]);
        }
        previous.clear();
    }

    fn record(&self, report: &Report, previous: &mut BTreeSet<(u16, &'static str)>) {
        self.clear_untested(previous);
        for p in &report.ports {
            let port = [("port", p.port.to_string())];
            self.relayed
                .get_or_create(&port)
                .set(i64::try_from(p.relayed).unwrap_or(i64::MAX));
            self.auth_before_starttls
                .get_or_create(&port)
                .set(i64::from(p.auth_before_starttls));
            // Relayed is a finding: the port was tested, whatever else failed.
            let up = p.status == "tested";
            self.up.get_or_create(&port).set(i64::from(up));
            if !up {
                self.untested
                    .get_or_create(&[("port", p.port.to_string()), ("reason", p.status.to_string())])
                    .set(1);
                previous.insert((p.port, p.status));
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_run.set(now);
    }

    fn forget_ports(&self, ports: &[u16]) {
        for port in ports {
            let l = [("port", port.to_string())];
            self.relayed.remove(&l);
            self.up.remove(&l);
            self.auth_before_starttls.remove(&l);
        }
    }
}

/// The running schedule. Dropping it stops the task.
pub struct Scheduler {
    config: watch::Sender<Relaytest>,
    task: JoinHandle<()>,
}

impl Scheduler {
    pub fn start(config: &Relaytest, metrics: Metrics) -> Scheduler {
        let (tx, rx) = watch::channel(config.clone());
        let task = tokio::spawn(schedule(rx, metrics));
        Scheduler { config: tx, task }
    }

    /// A reload's `[relaytest]`: when it differs, the test runs again now.
    pub fn update(&self, config: &Relaytest) {
        self.config.send_if_modified(|c| {
            if c == config {
                false
            } else {
                *c = config.clone();
                true
            }
        });
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A random duration in `0..=max` (the jitter).
fn jitter(max: Duration) -> Duration {
    let r = std::hash::RandomState::new().build_hasher().finish();
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(if ms == 0 { 0 } else { r % (ms + 1) })
}

async fn schedule(mut rx: watch::Receiver<Relaytest>, metrics: Metrics) {
    let mut untested = BTreeSet::new();
    let mut ports: Vec<u16> = Vec::new();
    loop {
        let cfg = rx.borrow_and_update().clone();
        let stale: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !cfg.enabled || !cfg.ports.contains(p))
            .collect();
        metrics.forget_ports(&stale);
        if cfg.enabled {
            ports.clone_from(&cfg.ports);
            let report = relaytest::run(&options(&cfg)).await;
            log_report(&cfg, &report);
            metrics.record(&report, &mut untested);
        } else {
            // Disabled: no series but the last run's time (0 if none).
            ports.clear();
            metrics.clear_untested(&mut untested);
        }
        let wait = cfg.interval + jitter(cfg.jitter);
        tokio::select! {
            () = tokio::time::sleep(wait), if cfg.enabled => {}
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

fn options(cfg: &Relaytest) -> Options {
    Options {
        host: cfg.target.to_string(),
        ports: cfg.ports.clone(),
        from_domain: cfg.from_domain.clone(),
        to_domain: cfg.to_domain.clone(),
        timeout: cfg.timeout,
        xclient: cfg.xclient_addr,
    }
}

fn log_report(cfg: &Relaytest, report: &Report) {
    let vantage = match cfg.xclient_addr {
        Some(a) => format!("as {a} through XCLIENT"),
        None => "from this host itself, without XCLIENT: the server likely trusts it, so a clean result proves little"
            .into(),
    };
    for w in &report.warnings {
        warn!("relay test: {w}");
    }
    for p in &report.ports {
        if p.relayed > 0 {
            let which: Vec<String> = p
                .probes
                .iter()
                .filter(|r| r.outcome == relaytest::report::Outcome::Relayed)
                .map(|r| format!("#{} <{}> -> <{}>", r.probe.number, r.probe.mail_from, r.probe.rcpt_to))
                .collect();
            error!(port = p.port, relayed = p.relayed, probes = %which.join(", "), "OPEN RELAY: the relay test ({vantage}) had probes relayed");
        } else if p.status == "tested" {
            info!(
                port = p.port,
                refused = p.probes.len() - p.rcpt_accepted,
                rcpt_accepted = p.rcpt_accepted,
                "relay test ({vantage}): closed to relaying"
            );
        } else {
            warn!(
                port = p.port,
                reason = p.status,
                "relay test ({vantage}) could not test this port, so it is not known to be closed to relaying: {}",
                p.problem.as_deref().unwrap_or("")
            );
        }
        if p.auth_before_starttls {
            warn!(
                port = p.port,
                "relay test: AUTH is offered before STARTTLS (passwords can be sent in cleartext)"
            );
        }
    }
}
