//! The agent's side of CrowdSec (SPEC.md "Fleet-wide bans: CrowdSec"):
//! the stream poller and the pusher run as tasks; their results come to
//! the event loop as [`Msg`]s, which write the kernel through the ban
//! runner. So CrowdSec's decisions live in their `[[ban]]` section like
//! any ban: pinned, saved in `state_dir`, restored at start with the time
//! they have left, expired by the kernel, and lifted alone (another
//! section's ban of the same prefix stays).
//!
//! Outages: a failed pull changes nothing in the kernel (no flush); the
//! next successful pull is a full one (`startup=true`), and so is one every
//! [`RESYNC`], so that lost deltas heal. A new `[crowdsec]` section (a
//! reload) restarts the tasks at the next tick.
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use super::bans::BanRunner;
use crate::{
    config::{ban::Ban, crowdsec::Crowdsec},
    crowdsec::{
        Metrics,
        client::{Lapi, LapiError},
        decision::{Decision, StreamReply, Target},
        mapping::Table,
        pusher,
    },
    kernel::bans::{BanMaps, wall_now},
    policy::bans::Allowed,
};

/// A full pull (`startup=true`) at least this often.
pub const RESYNC: Duration = Duration::from_secs(600);
/// The tick: fresh bans to the pusher, the gauges, a changed section.
const TICK: Duration = Duration::from_secs(1);
/// Most ignored decisions logged one by one per pull.
const LOG_IGNORED: usize = 10;

/// What the tasks send the event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// A pull of the stream: `full` when it asked `startup=true`.
    Pulled {
        full: bool,
        result: Result<StreamReply, LapiError>,
    },
    Tick,
}

/// The CrowdSec tasks and what the loop keeps of them.
pub struct Runner {
    /// The section the tasks run with.
    running: Option<Crowdsec>,
    rx: mpsc::Receiver<Msg>,
    /// Kept so that `rx` waits forever while no task runs.
    tx: mpsc::Sender<Msg>,
    tasks: Vec<JoinHandle<()>>,
    push_tx: Option<mpsc::UnboundedSender<pusher::Item>>,
    table: Table,
    pub metrics: Metrics,
    /// The last pull failed (logged once per outage).
    failing: bool,
    last_gauges: Instant,
    /// Decisions in force, for the usage metrics the poller sends.
    active: Arc<AtomicU64>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Runner {
    /// Starts the tasks for `cfg.crowdsec`, if any. The tick runs always
    /// (it notices a section added by a reload).
    pub fn start(
        cfg: Option<&Crowdsec>,
        sections: &[Ban],
        state_dir: &std::path::Path,
        bans: &mut BanRunner,
    ) -> Runner {
        let (tx, rx) = mpsc::channel(16);
        let mut r = Runner {
            running: None,
            rx,
            tx,
            tasks: Vec::new(),
            push_tx: None,
            table: Table::default(),
            metrics: Metrics::default(),
            failing: false,
            last_gauges: Instant::now(),
            active: Arc::new(AtomicU64::new(0)),
        };
        r.restart(cfg, sections, state_dir, bans);
        r
    }

    /// The next message of a task.
    pub async fn recv(&mut self) -> Msg {
        match self.rx.recv().await {
            Some(m) => m,
            // `self.tx` lives as long as `self`.
            None => std::future::pending().await,
        }
    }

    fn restart(&mut self, cfg: Option<&Crowdsec>, sections: &[Ban], state_dir: &std::path::Path, bans: &mut BanRunner) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.push_tx = None;
        self.table = Table::default();
        self.failing = false;
        self.running = cfg.cloned();
        self.metrics.configured(self.running.is_some());
        let tx = self.tx.clone();
        self.tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tx.send(Msg::Tick).await.is_err() {
                    return;
                }
            }
        }));
        let Some(cs) = self.running.clone() else {
            bans.fresh = None;
            return;
        };
        let lapi = match Lapi::new(&cs.lapi_url) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot set up the CrowdSec client: no decisions pulled, no bans pushed");
                return;
            }
        };
        info!(
            lapi = %cs.lapi_url,
            ban = %sections[cs.ban].name,
            update_frequency = ?cs.update_frequency,
            watcher = cs.watcher.as_ref().map(|w| w.machine_id.as_str()),
            "CrowdSec bouncer started"
        );
        self.tasks.push(tokio::spawn(poll(
            lapi.clone(),
            cs.clone(),
            self.tx.clone(),
            Arc::clone(&self.active),
        )));
        match &cs.watcher {
            Some(w) if !w.push.is_empty() => {
                let (ptx, prx) = mpsc::unbounded_channel();
                let settings = pusher::Settings {
                    lapi,
                    machine_id: w.machine_id.clone(),
                    password: w.password.clone(),
                    state_dir: crate::agent::bans::check_state_dir(state_dir)
                        .ok()
                        .map(|()| state_dir.to_path_buf()),
                };
                self.tasks
                    .push(tokio::spawn(pusher::run(settings, prx, self.metrics.clone())));
                self.push_tx = Some(ptx);
                bans.fresh.get_or_insert_with(Vec::new);
            }
            _ => bans.fresh = None,
        }
    }

    /// A pull's answer: the decisions into the kernel (through `bans`).
    pub fn pulled(
        &mut self,
        full: bool,
        result: Result<StreamReply, LapiError>,
        bans: &mut BanRunner,
        maps: &mut BanMaps,
        allowed: &dyn Allowed,
    ) {
        let Some(cs) = &self.running else {
            return;
        };
        let now = wall_now();
        let t0 = Instant::now();
        let reply = match result {
            Ok(r) => r,
            Err(e) => {
                self.metrics.pulled(false, 0.0);
                if !self.failing {
                    warn!(error = %e, in_force = self.table.len(), "cannot pull CrowdSec's decisions: those in force stay in force until they expire");
                }
                self.failing = true;
                return;
            }
        };
        if self.failing {
            info!(full, "CrowdSec's decision stream answers again");
        }
        self.failing = false;
        self.metrics.pulled(true, now.as_secs_f64());
        let section = cs.ban;
        let Some(sec) = bans.sections().get(section).cloned() else {
            return;
        };
        // Our own pushes coming back: (scenario, section) of each pushed one.
        let own: Vec<(String, usize)> = cs
            .watcher
            .as_ref()
            .map(|w| {
                w.push
                    .iter()
                    .filter_map(|&i| bans.sections().get(i).map(|b| (crate::crowdsec::scenario(&b.name), i)))
                    .collect()
            })
            .unwrap_or_default();
        let mut accept = |d: &Decision, t: &Target| -> Result<(), String> {
            if let Some(&(_, i)) = own.iter().find(|(s, _)| *s == d.scenario)
                && bans.is_active(i, t.net)
            {
                return Err("this gateway's own push, banned here already".into());
            }
            bans.check(section, t.net).map_err(|e| e.to_string())?;
            if allowed.allows(&sec.ports, t.net.addr()) || allowed.allows_within(&sec.ports, &t.net) {
                return Err("a guard allows it (or part of it) explicitly".into());
            }
            Ok(())
        };
        let ch = self
            .table
            .apply(&reply, full, now, (cs.scopes.ip, cs.scopes.range), &mut accept);
        let mut put = 0usize;
        let mut refused = 0usize;
        // Already in force with (about) this expiry: not written again.
        let current: std::collections::HashMap<IpNet, Duration> = bans.active_in(section).into_iter().collect();
        for &(net, _, until) in &ch.put {
            if current
                .get(&net)
                .is_some_and(|&c| c.abs_diff(until) < Duration::from_secs(2))
            {
                continue;
            }
            if bans.put_external(maps, section, net, until) {
                put += 1;
            } else {
                refused += 1;
            }
        }
        let mut lifted = 0usize;
        for &net in &ch.lift {
            lifted += usize::from(bans.lift_external(maps, section, net));
        }
        if ch.full {
            let keep: HashSet<IpNet> = ch.put.iter().map(|p| p.0).collect();
            for (net, _) in current {
                if !keep.contains(&net) {
                    lifted += usize::from(bans.lift_external(maps, section, net));
                }
            }
        }
        self.metrics.decision_event("added", ch.added);
        self.metrics.decision_event("deleted", ch.deleted);
        self.metrics.decision_event("ignored", ch.ignored.len() as u64);
        for (value, why) in ch.ignored.iter().take(LOG_IGNORED) {
            let value: String = value.chars().take(64).collect();
            info!(value = %value, "CrowdSec decision not taken: {why}");
        }
        if ch.ignored.len() > LOG_IGNORED {
            info!(
                more = ch.ignored.len() - LOG_IGNORED,
                "more CrowdSec decisions not taken"
            );
        }
        if full || put > 0 || lifted > 0 || refused > 0 {
            info!(
                full,
                banned = put,
                lifted,
                refused,
                in_force = self.table.len(),
                took_ms = t0.elapsed().as_millis() as u64,
                "CrowdSec decisions applied"
            );
        } else {
            debug!("no CrowdSec decision changed");
        }
        self.refresh_gauges(bans);
    }

    /// The tick: a changed section restarts the tasks; fresh log-fed bans
    /// of the `push` sections go to the pusher; the gauges.
    pub fn tick(
        &mut self,
        cfg: Option<&Crowdsec>,
        sections: &[Ban],
        state_dir: &std::path::Path,
        bans: &mut BanRunner,
    ) {
        if self.running.as_ref() != cfg {
            info!("the [crowdsec] section changed: CrowdSec tasks restarted");
            self.restart(cfg, sections, state_dir, bans);
        }
        let fresh = bans.take_fresh();
        if let (Some(tx), Some(w)) = (&self.push_tx, self.running.as_ref().and_then(|c| c.watcher.as_ref())) {
            for rec in fresh {
                if !w.push.contains(&rec.section) {
                    continue;
                }
                let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                let _ = tx.send(pusher::Item {
                    ban: bans.sections()[rec.section].name.clone(),
                    prefix: rec.net,
                    banned_unix_ms: ms(rec.expires.saturating_sub(rec.length)),
                    expires_unix_ms: ms(rec.expires),
                    uncertain: false,
                });
            }
        }
        // O(decisions): every few seconds, not every tick.
        if self.last_gauges.elapsed() >= Duration::from_secs(5) {
            self.table.expire(wall_now());
            self.refresh_gauges(bans);
        }
    }

    fn refresh_gauges(&mut self, bans: &BanRunner) {
        self.last_gauges = Instant::now();
        let mut n = [[0i64; 2]; 2];
        let mut total = 0u64;
        if let Some(cs) = &self.running {
            for (net, _) in bans.active_in(cs.ban) {
                let range = net.prefix_len() != net.max_prefix_len();
                n[usize::from(range)][usize::from(matches!(net, IpNet::V6(_)))] += 1;
                total += 1;
            }
        }
        self.active.store(total, Ordering::Relaxed);
        for (i, scope) in ["ip", "range"].into_iter().enumerate() {
            for (j, family) in ["ipv4", "ipv6"].into_iter().enumerate() {
                self.metrics
                    .decisions
                    .get_or_create(&vec![("scope", scope.to_string()), ("family", family.to_string())])
                    .set(n[i][j]);
            }
        }
    }
}

/// The poller: a full pull first, then deltas every `update_frequency`;
/// a full one again after a failure and every [`RESYNC`].
async fn poll(lapi: Lapi, cs: Crowdsec, tx: mpsc::Sender<Msg>, active: Arc<AtomicU64>) {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // `POST /v1/usage-metrics` (LAPI 1.6.3+): after the first good pull,
    // then every USAGE_WINDOW; a 404 (an older LAPI) ends them.
    let mut usage: Option<Instant> = None;
    let mut usage_supported = true;
    let scopes = match (cs.scopes.ip, cs.scopes.range) {
        (true, true) => "ip,range",
        (true, false) => "ip",
        _ => "range",
    };
    let mut full = true;
    let mut last_full = Instant::now();
    let mut tick = tokio::time::interval(cs.update_frequency);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = lapi.stream(cs.api_key.expose(), full, scopes).await;
        let ok = result.is_ok();
        let was_full = full;
        if tx.send(Msg::Pulled { full, result }).await.is_err() {
            return;
        }
        if ok && was_full {
            last_full = Instant::now();
        }
        if ok && usage_supported && usage.is_none_or(|t| t.elapsed() >= USAGE_WINDOW) {
            let window = usage.map_or(0, |t| t.elapsed().as_secs());
            usage = Some(Instant::now());
            let body = usage_metrics(started, window, active.load(Ordering::Relaxed));
            match lapi.usage_metrics(cs.api_key.expose(), &body).await {
                Ok(true) => debug!("usage metrics sent to LAPI"),
                Ok(false) => {
                    info!("LAPI takes no usage metrics (before 1.6.3): none sent");
                    usage_supported = false;
                }
                Err(e) => debug!(error = %e, "usage metrics not taken"),
            }
        }
        full = !ok || last_full.elapsed() >= RESYNC;
    }
}

/// How often usage metrics are sent.
const USAGE_WINDOW: Duration = Duration::from_secs(1800);

/// The usage metrics of a remediation component (LAPI's
/// `POST /v1/usage-metrics`): what relay-guard is, and the decisions it
/// enforces.
fn usage_metrics(started: u64, window: u64, active: u64) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    serde_json::json!({
        "remediation_components": [{
            "name": "relay-guard",
            "type": "relay-guard",
            "version": env!("CARGO_PKG_VERSION"),
            "feature_flags": [],
            "utc_startup_timestamp": started,
            "os": {"name": "linux", "version": crate::kernel::features::release()},
            "metrics": [{
                "meta": {"window_size_seconds": window, "utc_now_timestamp": now},
                "items": [{"name": "active_decisions", "value": active, "unit": "ip", "labels": {}}]
            }]
        }]
    })
}

impl super::Agent {
    /// A CrowdSec task's message.
    pub(super) fn crowdsec(&mut self, m: Msg) {
        let cs = &mut self.sources.crowdsec;
        match m {
            Msg::Tick => cs.tick(
                self.current.crowdsec.as_ref(),
                &self.current.bans,
                &self.current.state_dir,
                &mut self.bans,
            ),
            Msg::Pulled { full, result } => {
                let allowed = self.policy.allowed(&self.current.guards);
                cs.pulled(full, result, &mut self.bans, &mut self.kernel.loaded.bans, &*allowed);
            }
        }
    }
}
