//! The watcher: log-fed bans pushed to LAPI as alerts with one decision.
//!
//! Each ban is queued and the queue saved (`state_dir/crowdsec-push.json`,
//! written to a new file and renamed over) before it is sent; an item
//! leaves the queue only once LAPI has stored it, so an outage or a
//! restart loses nothing. A push whose answer never came (a timeout, a
//! connection cut after sending) may have been stored: before it is sent
//! again the watcher asks LAPI for alerts of that scenario and value since
//! it was queued, so nothing is stored twice. Failures back off from 1 s
//! to 5 min.
use std::{
    collections::VecDeque,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    Metrics, ORIGIN,
    client::{Alert, AlertDecision, AlertSource, Lapi, LapiError},
    scenario,
};

/// The queue in `state_dir`.
pub const QUEUE_FILE: &str = "crowdsec-push.json";
/// Most bans queued; the oldest go first when full (logged).
pub const MAX_QUEUE: usize = 100_000;
/// Alerts per request.
const BATCH: usize = 50;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// One ban to push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The `[[ban]]` section's name.
    pub ban: String,
    #[serde(with = "crate::config::prefix_text")]
    pub prefix: IpNet,
    /// When it was banned and until when (wall clock, Unix ms).
    pub banned_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// A push of it was sent and its answer lost: look it up first.
    #[serde(default)]
    pub uncertain: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Item {
    /// The alert LAPI stores for it: the scope, the prefix, what remains of
    /// the ban (in hours, minutes and seconds), `relay-guard/<section>`.
    pub fn alert(&self, machine_id: &str, now_ms: u64) -> Alert {
        let single = self.prefix.prefix_len() == self.prefix.max_prefix_len();
        let (scope, value) = if single {
            ("Ip", self.prefix.addr().to_string())
        } else {
            ("Range", self.prefix.to_string())
        };
        let left = Duration::from_millis(self.expires_unix_ms.saturating_sub(now_ms));
        let scenario = scenario(&self.ban);
        Alert {
            scenario: scenario.clone(),
            scenario_hash: String::new(),
            scenario_version: env!("CARGO_PKG_VERSION").to_string(),
            message: format!("relay-guard on {machine_id}: {value} banned by [[ban]] `{}`", self.ban),
            events_count: 1,
            start_at: rfc3339(self.banned_unix_ms),
            stop_at: rfc3339(now_ms),
            capacity: 0,
            leakspeed: "0s".into(),
            simulated: false,
            events: Vec::new(),
            source: AlertSource {
                scope: scope.into(),
                value: value.clone(),
                ip: single.then(|| value.clone()),
                range: (!single).then(|| value.clone()),
            },
            decisions: vec![AlertDecision {
                origin: ORIGIN.into(),
                kind: "ban".into(),
                scope: scope.into(),
                value,
                duration: super::duration::format(left),
                scenario,
            }],
        }
    }
}

/// Reads the saved queue (a missing file is an empty queue; a bad one is
/// logged and kept aside as `.bad`).
pub fn load(state_dir: &Path) -> VecDeque<Item> {
    let path = state_dir.join(QUEUE_FILE);
    match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<VecDeque<Item>>(&b) {
            Ok(q) => q,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "the CrowdSec push queue does not parse: kept aside as .bad, started empty");
                let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                VecDeque::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the CrowdSec push queue");
            VecDeque::new()
        }
    }
}

/// Saves the queue: a new temporary file, synced, renamed over.
pub fn save(state_dir: &Path, q: &VecDeque<Item>) -> std::io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".crowdsec-push.")
        .tempfile_in(state_dir)?;
    serde_json::to_writer(&mut tmp, q)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(state_dir.join(QUEUE_FILE)).map_err(|e| e.error)?;
    Ok(())
}

/// The pusher's settings.
#[derive(Clone)]
pub struct Settings {
    pub lapi: Lapi,
    pub machine_id: String,
    pub password: crate::config::crowdsec::Secret,
    /// `None`: the queue is kept in memory only (state_dir unusable).
    pub state_dir: Option<PathBuf>,
}

struct Pusher {
    s: Settings,
    queue: VecDeque<Item>,
    token: Option<String>,
    /// The server has `GET /v1/allowlists/check` (None: not asked yet).
    allowlists: Option<bool>,
    metrics: Metrics,
}

impl Pusher {
    fn persist(&self) {
        if let Some(dir) = &self.s.state_dir
            && let Err(e) = save(dir, &self.queue)
        {
            warn!(error = %e, "cannot save the CrowdSec push queue (kept in memory)");
        }
    }

    fn enqueue(&mut self, item: Item) {
        if self
            .queue
            .iter()
            .any(|q| q.ban == item.ban && q.prefix == item.prefix && q.expires_unix_ms >= item.expires_unix_ms)
        {
            return;
        }
        if self.queue.len() >= MAX_QUEUE {
            let old = self.queue.pop_front();
            warn!(dropped = ?old.map(|o| o.prefix.to_string()), "the CrowdSec push queue is full: the oldest ban is not pushed");
        }
        self.queue.push_back(item);
    }

    async fn token(&mut self) -> Result<String, LapiError> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let t = self.s.lapi.login(&self.s.machine_id, self.s.password.expose()).await?;
        self.token = Some(t.token.clone());
        Ok(t.token)
    }

    /// Whether LAPI holds an alert of `item` already (a push whose answer
    /// was lost).
    async fn stored(&self, token: &str, item: &Item) -> Result<bool, LapiError> {
        let since = Duration::from_millis(now_ms().saturating_sub(item.banned_unix_ms)) + Duration::from_secs(60);
        self.s
            .lapi
            .alerts_since(token, &scenario(&item.ban), &item.prefix, since)
            .await
    }

    /// One round: drops what has ended, then pushes up to [`BATCH`] items.
    /// `Err`: nothing more this round (back off).
    async fn round(&mut self) -> Result<(), LapiError> {
        let now = now_ms();
        let before = self.queue.len();
        self.queue.retain(|i| i.expires_unix_ms > now);
        if self.queue.len() != before {
            info!(
                dropped = before - self.queue.len(),
                "bans that ended before LAPI could take them are not pushed"
            );
            self.persist();
        }
        if self.queue.is_empty() {
            return Ok(());
        }
        let token = self.token().await?;
        let n = self.queue.len().min(BATCH);
        let mut batch: Vec<Item> = Vec::with_capacity(n);
        let mut skipped = 0usize;
        for item in self.queue.iter().take(n) {
            if item.uncertain && self.stored(&token, item).await? {
                skipped += 1;
                continue;
            }
            if self.allowlists != Some(false) {
                match self.s.lapi.allowlisted(&token, &item.prefix.addr().to_string()).await? {
                    None => self.allowlists = Some(false),
                    Some(true) => {
                        self.allowlists = Some(true);
                        info!(prefix = %item.prefix, "not pushed: a CrowdSec allowlist holds it");
                        skipped += 1;
                        continue;
                    }
                    Some(false) => self.allowlists = Some(true),
                }
            }
            batch.push(item.clone());
        }
        let alerts: Vec<Alert> = batch.iter().map(|i| i.alert(&self.s.machine_id, now)).collect();
        let result = if alerts.is_empty() {
            Ok(Vec::new())
        } else {
            self.s.lapi.push(&token, &alerts).await
        };
        match result {
            Ok(_) => {
                self.queue.drain(..n);
                self.metrics.pushed("ok", batch.len() as u64);
                if !batch.is_empty() {
                    info!(pushed = batch.len(), skipped, "bans pushed to LAPI");
                }
                self.persist();
                Ok(())
            }
            Err(e) => {
                self.metrics.pushed("failed", batch.len() as u64);
                match &e {
                    // Refused outright: not stored. A lost answer: perhaps.
                    LapiError::Status { status: 401 | 403, .. } => self.token = None,
                    LapiError::Status { .. } => {}
                    LapiError::Unreachable { .. } | LapiError::Decode { .. } => {
                        for i in self.queue.iter_mut().take(n) {
                            i.uncertain = true;
                        }
                        self.persist();
                    }
                }
                Err(e)
            }
        }
    }
}

/// Runs the pusher until `rx` closes: items in, rounds with backoff.
pub async fn run(s: Settings, mut rx: mpsc::UnboundedReceiver<Item>, metrics: Metrics) {
    let queue = s.state_dir.as_deref().map(load).unwrap_or_default();
    let mut p = Pusher {
        s,
        queue,
        token: None,
        allowlists: None,
        metrics,
    };
    let mut backoff = Duration::ZERO;
    let mut failing = false;
    loop {
        if p.queue.is_empty() || !backoff.is_zero() {
            let wait = if p.queue.is_empty() {
                Duration::from_secs(3600)
            } else {
                backoff
            };
            tokio::select! {
                item = rx.recv() => match item {
                    Some(i) => {
                        p.enqueue(i);
                        while let Ok(i) = rx.try_recv() {
                            p.enqueue(i);
                        }
                        p.persist();
                        if !backoff.is_zero() {
                            continue;
                        }
                    }
                    None => return,
                },
                () = tokio::time::sleep(wait) => {}
            }
        }
        while let Ok(i) = rx.try_recv() {
            p.enqueue(i);
        }
        match p.round().await {
            Ok(()) => {
                if failing {
                    info!("LAPI takes pushes again");
                }
                failing = false;
                backoff = Duration::ZERO;
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, queued = p.queue.len(), "cannot push bans to LAPI: kept and retried with backoff");
                }
                failing = true;
                backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crowdsec_alerts_carry_one_decision_of_the_banned_prefix() {
        let i = Item {
            ban: "sasl".into(),
            prefix: "2001:db8:5::/64".parse().expect("ok"),
            banned_unix_ms: 1_000_000,
            expires_unix_ms: 1_000_000 + 3_600_000,
            uncertain: false,
        };
        let a = i.alert("gw1", 1_000_000);
        assert_eq!(a.scenario, "relay-guard/sasl");
        assert_eq!(a.decisions.len(), 1);
        let d = &a.decisions[0];
        assert_eq!(
            (d.scope.as_str(), d.value.as_str(), d.duration.as_str()),
            ("Range", "2001:db8:5::/64", "1h0m0s")
        );
        assert_eq!(a.source.range.as_deref(), Some("2001:db8:5::/64"));
        let i = Item {
            prefix: "192.0.2.9/32".parse().expect("ok"),
            ..i
        };
        let a = i.alert("gw1", 1_000_000 + 1_800_000);
        assert_eq!(
            (a.decisions[0].scope.as_str(), a.decisions[0].value.as_str()),
            ("Ip", "192.0.2.9")
        );
        assert_eq!(a.decisions[0].duration, "0h30m0s");
        assert_eq!(a.source.ip.as_deref(), Some("192.0.2.9"));
    }

    #[test]
    fn crowdsec_the_push_queue_survives_a_restart() {
        let dir = tempfile::tempdir().expect("ok");
        let mut q = VecDeque::new();
        q.push_back(Item {
            ban: "sasl".into(),
            prefix: "192.0.2.9/32".parse().expect("ok"),
            banned_unix_ms: 1,
            expires_unix_ms: 2,
            uncertain: true,
        });
        save(dir.path(), &q).expect("ok");
        assert_eq!(load(dir.path()), q);
        std::fs::write(dir.path().join(QUEUE_FILE), "{").expect("ok");
        assert!(load(dir.path()).is_empty());
        assert!(dir.path().join("crowdsec-push.json.bad").exists());
    }
}
