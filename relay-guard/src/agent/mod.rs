//! The long-running process (`relay-guard run`): an [`Agent`] that owns the
//! loaded program and its maps, the live policy, the metrics labels and the
//! file watcher, and one loop that turns every source of work into an
//! [`Event`] and hands it to a method of its own. Around it: reload planning
//! (`reload`, and `incremental` for list-only edits), watching the config and
//! list files (`watch`), keeping configured interfaces attached as devices
//! come and go (`links`), the Prometheus metrics (`metrics`), and the last
//! good config and lists to start from when they are broken at boot
//! (`state`). Under systemd (`Type=notify`) it says READY only once the maps
//! are synced and the interfaces attached.
//!
//! The layer above `kernel`: it reaches bpf maps, programs and pins only
//! through `kernel`, compiles through `policy`, reads files through `config`,
//! and never prints (`commands` is the CLI boundary; the agent logs with
//! `tracing`).
pub mod bans;
pub mod crowdsec;
pub mod incremental;
pub mod links;
pub mod metrics;
pub mod relaytest;
mod reload;
pub mod state;
pub mod watch;

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, ConfigErrors, ConfigFile, LoadOptions, lists::ListIndex},
    error::SyncError,
    kernel::{
        counters,
        loader::{self, Loaded},
        netdev,
        pins::{self, AgentLock, Pins},
        sizes::Sizes,
        sync,
    },
    policy::Policy,
};
use incremental::Live;
use links::{LinkWatch, Outcome};
use metrics::{AgentMetrics, LabelState};
use watch::FileWatch;

/// Runs the agent for the config at `config_path`, every load of it with
/// `options` (what the command line sets in place of the file), until
/// SIGTERM, SIGINT or `shutdown` completes (tokio mini-redis's
/// `server::run` shape: the caller decides what else stops it). The filter
/// stays attached afterwards.
///
/// Under systemd (`Type=notify`, `$NOTIFY_SOCKET` set) READY=1 is sent once
/// the maps are synced and the interfaces attached, never before and never
/// when the start fails, so units ordered after relay-guard (the MTA) start
/// with the filter in place.
pub async fn run(config_path: &Path, options: LoadOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut agent = Agent::start(config_path, options).await?;
    // Started from the copy: files fixed while it synced and attached (before
    // the watcher saw anything) are applied now.
    if agent.started_from_copy && crate::config::fingerprint(config_path, &agent.current.list_files) != agent.seen {
        agent.reload("file change during start");
    }
    let status = if agent.started_from_copy && agent.metrics.last_reload_successful.get() == 0 {
        "guarding with the last good config from state_dir: the config is invalid (see the log)"
    } else {
        "guarding"
    };
    notify_systemd(&[NotifyState::Ready, NotifyState::Status(status)]);
    agent.run(shutdown).await
}

/// One unit of work for the agent's loop. A new source adds a variant here,
/// an arm in `Agent::next_event` and a method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM, SIGINT or the caller's shutdown: stop (the name, for the log).
    Stop(&'static str),
    /// SIGHUP: reload now.
    Hangup,
    /// Something changed in a directory of the config or a list file.
    FilesChanged,
    /// A network device was created, deleted, renamed or changed (or the
    /// periodic check of the attachments is due).
    LinksChanged,
    /// The blocked-source logger task ended (why).
    BlockedLogEnded(String),
    /// A failed login read from a `[[ban]]` section's logs.
    AuthFailure(bans::AuthFailure),
    /// A line of a `[[ban]]` section's logs that did not parse.
    LogLineUnparsed(usize),
    /// A line of a `[[ban]]` section's logs with field-like text in a
    /// client-controlled element.
    LogLineSuspicious(usize),
    /// A `[[ban]]` section's log source (a file's path, `journal`) is read
    /// or not.
    LogSourceUp { ban: usize, source: String, up: bool },
    /// The periodic ban work (`bans::BanRunner::tick`) is due.
    BanTick,
    /// From the CrowdSec tasks (a pull's answer, their tick).
    Crowdsec(crowdsec::Msg),
}

/// The signals the agent handles.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

/// The running agent: the state that lives as long as the process.
pub struct Agent {
    config_path: PathBuf,
    /// What the command line sets in place of the file, at every load.
    options: LoadOptions,
    /// The config in force (its entries dropped once compiled).
    current: Config,
    /// Fingerprint of the files as last loaded or attempted.
    seen: u64,
    loaded: Loaded,
    /// Kept for reloads that only edit list files (applied as deltas).
    live: Option<Live>,
    /// The policy in force while `live` is gone (after a failed full reload).
    in_force: Option<Policy>,
    /// Interface names by ifindex, for the counters' labels: the devices
    /// attached now, and those attached before under a name still configured.
    interfaces: HashMap<u32, String>,
    pins: Pins,
    links: LinkWatch,
    /// What was last reported for each configured interface that is not
    /// guarded (so a problem is logged when it starts or changes, not at
    /// every check).
    link_problems: HashMap<String, String>,
    /// What was last reported for each interface where a program ahead of
    /// relay-guard in the XDP dispatcher bypasses it (`check_bypass`).
    bypassed: HashMap<String, String>,
    labels: Arc<RwLock<LabelState>>,
    metrics: AgentMetrics,
    watch: FileWatch,
    signals: Signals,
    stop_tx: tokio::sync::watch::Sender<bool>,
    metrics_task: Option<JoinHandle<()>>,
    logger_task: Option<JoinHandle<std::io::Result<()>>>,
    /// Whether the start applied the last good copy from `state_dir`
    /// because the config did not load.
    started_from_copy: bool,
    /// The scheduled open-relay test (`[relaytest]`).
    relaytest: relaytest::Scheduler,
    /// Bans: the engine, its persistence and metrics.
    bans: bans::BanRunner,
    /// Failures and unparsed lines from the log followers.
    ban_inputs: bans::Inputs,
    ban_tick: tokio::time::Interval,
    /// CrowdSec's bouncer and watcher (`[crowdsec]`).
    crowdsec: crowdsec::Runner,
    /// Held until the agent is dropped, after everything above.
    _lock: AgentLock,
}

impl Agent {
    /// Loads (or adopts) the program, fills the maps, attaches, starts the
    /// metrics server and the blocked-source log, and installs the signal
    /// handlers: everything before the loop.
    pub async fn start(config_path: &Path, options: LoadOptions) -> anyhow::Result<Agent> {
        let (cfg, index, boot_errors, attempted) = load_at_start(config_path, &options)?;
        // A device that cannot be guarded is a config error, found before
        // anything changes (one that does not exist yet is checked when it
        // appears).
        for iface in &cfg.interfaces {
            netdev::check_ethernet(iface).map_err(|e| anyhow::Error::new(e).context("invalid config"))?;
        }
        loader::bump_memlock_rlimit();
        pins::ensure_bpffs(&cfg.pin_dir)?;
        // Held until the agent exits.
        let lock = AgentLock::acquire(&cfg.pin_dir)?;
        // The resolved path: every spelling of pin_dir names the same state.
        let pins = Pins::new(&lock.path);
        // Compiled first: a new set of maps is sized for it.
        let mut cfg = cfg;
        let policy = Policy::compile(&cfg);
        let mut loaded = Loaded::load_pinned_sized(&pins, Sizes::for_policy(&policy))
            .map_err(|e| with_hint(e, "failed to load the XDP program"))?;
        loaded.xdp_priority = cfg.xdp_priority;
        loaded.xdp_dispatcher = cfg.xdp_dispatcher;
        if loaded.adopted {
            info!(pin_dir = %cfg.pin_dir.display(), "adopted pinned maps (allowlists and counters kept)");
        }

        // Fill the maps before attaching: the program never runs on empty maps.
        // Adopted maps are synced as a diff, so nothing allowed before and after
        // sees a gap; adopted maps that do not fit the config (or far
        // exceed it) are replaced by a new set, filled, and the links move
        // to it when they are attached below.
        let mut base_labels = LabelState::new(&cfg, HashMap::new(), counters::Slots::default());
        reload::strip_entries(&mut cfg);
        let (stats, shadow, policy) = reload::sync_sized(&mut loaded, &policy, None, &[], &[], cfg.xdp_mode)
            .context("failed to fill the maps")?;
        // The pins name the set only now that it is filled.
        loaded.publish().map_err(|e| with_hint(e, "failed to pin the maps"))?;
        base_labels.guards = policy.names_by_bit(&base_labels.guards);
        let live = Some(Live::new(&cfg, index, policy, shadow));
        info!(
            written = stats.written,
            removed = stats.removed,
            unchanged = stats.unchanged,
            "maps synced"
        );

        // Subscribed before attaching: a device that appears from here on
        // is seen.
        let link_watch = LinkWatch::start();
        let mut interfaces = HashMap::new();
        let mut attached = Vec::new();
        let mut link_problems = HashMap::new();
        for iface in &cfg.interfaces {
            let outcome = links::guard_one(
                &mut loaded,
                &pins,
                iface,
                cfg.xdp_mode,
                &cfg.interfaces,
                &mut interfaces,
                true,
            )
            .map_err(|e| with_hint(e, "failed to attach"))?;
            if outcome == Outcome::Missing {
                warn!(interface = %iface, "{MISSING}");
                link_problems.insert(iface.clone(), MISSING.to_string());
            }
            attached.push((iface.clone(), outcome != Outcome::Missing));
        }
        loaded.prune(&cfg.interfaces);
        let guarded: Vec<&str> = attached.iter().filter(|a| a.1).map(|a| a.0.as_str()).collect();
        info!(mode = ?cfg.mode, interfaces = ?guarded, missing = link_problems.len(), "relay-guard is guarding");
        // Saved only once applied and attached: what a later boot falls back
        // to has worked here. A start from the copy leaves it as it is.
        if boot_errors.is_none()
            && let Some(live) = &live
        {
            save_state(&cfg, config_path, &live.index);
        }

        // Never fails: a bad saved ban is dropped and counted, and the
        // guard is attached already.
        let mut ban_runner = match &live {
            Some(l) => {
                let allows = bans::GuardAllows {
                    index: &l.index,
                    guards: &cfg.guards,
                };
                bans::BanRunner::start_with(&cfg, &mut loaded.bans, loaded.adopted, &allows)
            }
            None => bans::BanRunner::start_with(
                &cfg,
                &mut loaded.bans,
                loaded.adopted,
                &crate::policy::bans::NoAllowlist,
            ),
        };
        let ban_inputs = bans::Inputs::start(&cfg);
        let slots = counters::slots(&loaded.maps).context("failed to read counter slots")?;
        let labels = Arc::new(RwLock::new(LabelState {
            interfaces: interfaces.clone(),
            slots,
            bans: ban_runner.labels(&loaded.bans),
            ..base_labels
        }));
        let agent_metrics = AgentMetrics {
            blocked_events_suppressed: loaded
                .logger
                .as_ref()
                .map(crate::kernel::events::BlockedLog::suppressed_total)
                .unwrap_or_default(),
            ..AgentMetrics::default()
        };
        // Seen by the watcher: after a start from the copy, the bytes of the
        // real (broken) files, so that a fix of any of them is a reload.
        let seen = if boot_errors.is_some() {
            agent_metrics.reload_failed();
            attempted
        } else {
            agent_metrics.reload_succeeded();
            cfg.fingerprint
        };
        agent_metrics.interfaces_attached(&attached);
        let mut registry = metrics::registry(Arc::clone(&loaded.maps.counters), Arc::clone(&labels), &agent_metrics);
        let relaytest_metrics = relaytest::Metrics::default();
        relaytest_metrics.register(&mut registry);
        ban_runner.metrics.register(&mut registry);
        let crowdsec = crowdsec::Runner::start(&cfg, &mut ban_runner);
        crowdsec.metrics.register(&mut registry);
        let registry = Arc::new(registry);

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics_task = match cfg.metrics_listen {
            Some(addr) => Some(serve_metrics(addr, registry, stop_rx)?),
            None => None,
        };
        // Blocked-source events from the program, bounded there and in
        // `kernel::events`. The task is watched: if it ends, the log says so.
        let logger_task = loaded.logger.take().map(|log| tokio::spawn(log.run()));

        let signals = Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        };
        let watch = FileWatch::new(&watched_files(config_path, &cfg));
        let relaytest = relaytest::Scheduler::start(&cfg.relaytest, relaytest_metrics);
        let mut agent = Agent {
            relaytest,
            config_path: config_path.to_path_buf(),
            options,
            seen,
            current: cfg,
            loaded,
            live,
            in_force: None,
            interfaces,
            pins,
            links: link_watch,
            link_problems,
            bypassed: HashMap::new(),
            labels,
            metrics: agent_metrics,
            watch,
            signals,
            stop_tx,
            metrics_task,
            logger_task,
            started_from_copy: boot_errors.is_some(),
            bans: ban_runner,
            ban_inputs,
            ban_tick: tokio::time::interval(bans::TICK),
            crowdsec,
            _lock: lock,
        };
        agent.check_bypass();
        Ok(agent)
    }

    /// The loop: one event at a time, each to its handler, until a stop.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            match self.next_event(&mut shutdown).await {
                Event::Stop(why) => {
                    info!("{why}: shutting down");
                    break;
                }
                Event::Hangup => self.reload("SIGHUP"),
                Event::FilesChanged => self.files_changed().await,
                Event::LinksChanged => self.guard_interfaces(),
                Event::BlockedLogEnded(why) => {
                    error!(reason = %why, "the blocked-source logger stopped: blocked sources are no longer logged (the counters and `relay-guard top` still count them)");
                }
                Event::AuthFailure(f) => match &self.live {
                    Some(l) => {
                        let allows = bans::GuardAllows {
                            index: &l.index,
                            guards: &self.current.guards,
                        };
                        self.bans.failure_with(&mut self.loaded.bans, &f, &allows);
                    }
                    None => self.bans.failure(&mut self.loaded.bans, &f),
                },
                Event::LogLineUnparsed(section) => self.bans.unparsed(section),
                Event::LogLineSuspicious(section) => self.bans.suspicious(section),
                Event::LogSourceUp { ban, source, up } => self.bans.source_up(ban, source, up),
                Event::BanTick => self.bans.tick(&mut self.loaded.bans),
                Event::Crowdsec(m) => self.crowdsec(m),
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Waits for the next event from any source.
    async fn next_event(&mut self, shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> Event {
        tokio::select! {
            _ = self.signals.interrupt.recv() => Event::Stop("SIGINT"),
            _ = self.signals.terminate.recv() => Event::Stop("SIGTERM"),
            _ = self.signals.hangup.recv() => Event::Hangup,
            Some(()) = self.watch.events.recv() => Event::FilesChanged,
            () = self.links.changed() => Event::LinksChanged,
            () = shutdown.as_mut() => Event::Stop("shutdown requested"),
            Some(e) = self.ban_inputs.rx.recv() => e,
            _ = self.ban_tick.tick() => Event::BanTick,
            m = self.crowdsec.recv() => Event::Crowdsec(m),
            ended = async { self.logger_task.as_mut().expect("checked by the branch condition").await }, if self.logger_task.is_some() => {
                self.logger_task = None;
                Event::BlockedLogEnded(match ended {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) if e.is_panic() => "it panicked".to_string(),
                    _ => "it ended".to_string(),
                })
            }
        }
    }

    /// A watched directory changed: reloads if the bytes of the config or a
    /// list file did.
    async fn files_changed(&mut self) {
        // Debounce: let a burst of events (write, rename, swap) settle.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        while self.watch.events.try_recv().is_ok() {}
        let now = crate::config::fingerprint(&self.config_path, &self.current.list_files);
        if now != self.seen {
            self.reload("file change");
        }
    }

    /// Reports each configured interface where relay-guard's slot in a
    /// shared XDP dispatcher is bypassed: a program ahead of it that does
    /// not chain on XDP_PASS (SPEC.md, "Sharing the interface"): an error
    /// line when it starts or changes, `relay_guard_interface_bypassed`.
    fn check_bypass(&mut self) {
        for iface in &self.current.interfaces {
            let bypass = crate::kernel::loader::ifindex(iface)
                .map(|i| crate::kernel::shared::bypasses(&self.pins, i))
                .unwrap_or_default();
            self.metrics.interface_bypassed(iface, !bypass.is_empty());
            if bypass.is_empty() {
                if self.bypassed.remove(iface).is_some() {
                    info!(interface = %iface, "no program ahead of relay-guard in the XDP dispatcher bypasses it any more");
                }
                continue;
            }
            let text = crate::kernel::shared::bypass_text(iface, &bypass);
            if self.bypassed.get(iface) != Some(&text) {
                error!(interface = %iface, "{text}");
                self.bypassed.insert(iface.clone(), text);
            }
        }
        self.bypassed.retain(|name, _| self.current.interfaces.contains(name));
    }

    /// A device came, went or changed: makes every configured interface's
    /// device carry the filter (see `links`), reports those that cannot, and
    /// updates `relay_guard_interface_attached` and the counters' labels.
    fn guard_interfaces(&mut self) {
        let mut attached = Vec::new();
        let mut changed = false;
        for iface in &self.current.interfaces {
            let problem = match links::guard_one(
                &mut self.loaded,
                &self.pins,
                iface,
                self.current.xdp_mode,
                &self.current.interfaces,
                &mut self.interfaces,
                false,
            ) {
                Ok(Outcome::Guarded { changed: c, .. }) => {
                    changed |= c;
                    None
                }
                Ok(Outcome::Missing) => Some(MISSING.to_string()),
                Err(e) => Some(format!("{:#}", with_hint(e, "failed to attach"))),
            };
            attached.push((iface.clone(), problem.is_none()));
            match problem {
                None => {
                    if self.link_problems.remove(iface).is_some() {
                        info!(interface = %iface, "interface guarded again");
                    }
                }
                Some(p) => {
                    if self.link_problems.get(iface) != Some(&p) {
                        if p == MISSING {
                            warn!(interface = %iface, "{p}");
                        } else {
                            error!(interface = %iface, "interface not guarded: {p}");
                        }
                        self.link_problems.insert(iface.clone(), p);
                    }
                }
            }
        }
        self.link_problems
            .retain(|name, _| self.current.interfaces.contains(name));
        // Labels first: a scrape that sees an interface attached sees its
        // counters under its name.
        if changed {
            let mut labels = self.labels.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            labels.interfaces = self.interfaces.clone();
            let mut slots = labels.slots.clone();
            match counters::refresh_iface_slots(&self.loaded.maps, &mut slots, self.interfaces.keys().copied()) {
                Ok(()) => labels.slots = slots,
                Err(e) => warn!(error = %e, "failed to read counter slots; metrics labels may lag"),
            }
        }
        self.metrics.interfaces_attached(&attached);
        self.check_bypass();
    }

    /// Reloads the config (as a delta when only list files changed), and on
    /// failure keeps the previous policy.
    fn reload(&mut self, trigger: &'static str) {
        info!(trigger, "reloading config");
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now());
        notify_systemd(&reloading);
        let config_path = self.config_path.as_path();
        // What a failed attempt saw (taken before it reads): a later change
        // of any of these bytes triggers another attempt.
        let attempted = crate::config::fingerprint(config_path, &self.current.list_files);
        // A delta leaves ports and interfaces as they were: the counter
        // slots stay, and are not read again (131k map lookups).
        let slots_now = self
            .labels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .slots
            .clone();
        let outcome = match reload::delta_reload(
            &mut self.loaded,
            &mut self.live,
            &self.current,
            config_path,
            &self.interfaces,
            slots_now,
        ) {
            Some(outcome) => outcome.map(|(new, labels)| (new, labels, false)),
            None => {
                // The old state is rebuilt by the full reload: drop its index
                // first so a large list is not held twice (keeping the masks
                // it left for the next sync to clear). The policy in force is
                // kept: guards that change ports keep their old verdicts
                // until the switch (see `kernel::sync`), and a failed sync is
                // undone with it.
                let (stale, old) = match self.live.take() {
                    Some(l) => (l.shadow.stale, Some(l.policy)),
                    None => (Vec::new(), self.in_force.take()),
                };
                let r = reload::full_reload(
                    &mut self.loaded,
                    &self.current,
                    config_path,
                    &self.options,
                    &mut self.interfaces,
                    &stale,
                    old.as_ref(),
                );
                match r {
                    Ok((new, labels, fresh)) => {
                        self.live = fresh;
                        Ok((new, labels, true))
                    }
                    Err(e) => {
                        if let Some(old) = &old
                            && matches!(e.downcast_ref::<SyncError>(), Some(SyncError::Map { .. }))
                        {
                            // Written part-way: back to the policy in force.
                            match sync::apply_full(&mut self.loaded.maps, old, None, &[]) {
                                Ok(_) => warn!("the failed sync was undone: the kernel holds the previous policy"),
                                Err(e2) => error!("undoing the failed sync failed too: {e2:#}"),
                            }
                        }
                        self.in_force = old;
                        Err(e)
                    }
                }
            }
        };
        // A full reload of a large list leaves its parse and compile freed
        // but held by the allocator: give it back to the system.
        give_back_heap();
        // Counted when the attempt is over, so a scrape that sees the count
        // move also sees its outcome (the kernel maps are already synced).
        match outcome {
            Ok((new, mut new_labels, refresh_slots)) => {
                // Saved before the success is reported: a scrape that sees
                // it also finds this set in state_dir.
                if let Some(live) = &self.live {
                    save_state(&new, &self.config_path, &live.index);
                }
                // A resize loaded a new program, which logs blocked
                // sources to a ring buffer of its own: read that one now.
                if let Some(log) = self.loaded.logger.take() {
                    if let Some(t) = self.logger_task.take() {
                        t.abort();
                    }
                    self.logger_task = Some(tokio::spawn(log.run()));
                }
                if refresh_slots {
                    match counters::slots(&self.loaded.maps) {
                        Ok(slots) => new_labels.slots = slots,
                        Err(e) => warn!(error = %e, "failed to read counter slots; metrics labels may lag"),
                    }
                }
                self.bans.reconfigure(&new, &mut self.loaded.bans);
                if self.bans.sections() != self.ban_inputs.sections.as_slice() {
                    self.ban_inputs = bans::Inputs::start(&new);
                }
                new_labels.bans = self.bans.labels(&self.loaded.bans);
                *self.labels.write().unwrap_or_else(std::sync::PoisonError::into_inner) = new_labels;
                self.seen = new.fingerprint;
                self.current = new;
                self.relaytest.update(&self.current.relaytest);
                let files = watched_files(&self.config_path, &self.current);
                if !self.watch.covers(&files) {
                    self.watch = FileWatch::new(&files);
                }
                // Attaches interfaces the reload added (or reports them
                // missing, and attaches them when they appear), before the
                // reload is counted.
                self.guard_interfaces();
                self.metrics.reload_succeeded();
                self.metrics.reloads.inc();
                notify_systemd(&[NotifyState::Ready, NotifyState::Status("guarding")]);
            }
            Err(e) => {
                error!("reload failed, keeping the previous policy: {e:#}");
                self.metrics.reload_failed();
                self.metrics.reloads.inc();
                self.seen = attempted;
                notify_systemd(&[
                    NotifyState::Ready,
                    NotifyState::Status("guarding with the previous policy: the last reload failed (see the log)"),
                ]);
            }
        }
    }

    /// Stops the background tasks. The pinned links keep the filter
    /// attached: the relay never reopens because the agent stopped.
    async fn stop(mut self) {
        notify_systemd(&[NotifyState::Stopping]);
        self.bans.save_now();
        if let Some(t) = self.logger_task.take() {
            t.abort();
        }
        let _ = self.stop_tx.send(true);
        if let Some(t) = self.metrics_task.take() {
            let _ = t.await;
        }
        // `relay-guard detach` removes it.
        info!(pin_dir = %self.current.pin_dir.display(), "exiting; the filter stays attached (use `relay-guard detach` to remove it)");
    }
}

/// The config to start with: the one at `config_path` or, when it or a list
/// file is invalid or unreadable, the last good copy saved in `state_dir`
/// (then also the errors, logged here, and the fingerprint of the real
/// files as they were read right after the failure). With no usable copy
/// either, the error names both reasons.
fn load_at_start(
    config_path: &Path,
    options: &LoadOptions,
) -> anyhow::Result<(Config, ListIndex, Option<ConfigErrors>, u64)> {
    // Read and parsed once: a config that does not validate may still name
    // the state_dir of its last good copy.
    let (errors, state_dir) = match crate::config::read_config_text(config_path) {
        Ok(text) => {
            let file = ConfigFile::parse(config_path, &text);
            match file.validate_indexed(options) {
                Ok((cfg, index)) => {
                    let fp = cfg.fingerprint;
                    return Ok((cfg, index, None, fp));
                }
                Err(errors) => (errors, state::state_dir_for(Some(&file))),
            }
        }
        Err(errors) => (errors, state::state_dir_for(None)),
    };
    match state::load(&state_dir, config_path, options) {
        Ok(restored) => {
            let attempted = crate::config::fingerprint(config_path, &restored.config.list_files);
            error!(
                copy = %restored.dir.display(),
                saved_at = restored.saved_at,
                "invalid config at start; starting from the last good copy in state_dir, \
                 and watching for a fixed config (relay_guard_config_last_reload_successful is 0 until then):\n{errors}"
            );
            Ok((restored.config, restored.index, Some(errors), attempted))
        }
        Err(why) => Err(anyhow::anyhow!(
            "invalid config:\n{errors}\nand no last good config to start from instead: {why}"
        )),
    }
}

/// Saves what was just applied as the last good set; a failure is logged
/// (the filter is in place, only a later broken boot would miss the copy).
fn save_state(cfg: &Config, config_path: &Path, index: &ListIndex) {
    match state::save(&cfg.state_dir, config_path, index) {
        Ok(dir) => tracing::debug!(dir = %dir.display(), "saved the last good config"),
        Err(e) => warn!(
            state_dir = %cfg.state_dir.display(),
            "cannot save the last good config (a start with a broken config would find no copy): {e}"
        ),
    }
}

/// Tells systemd (`Type=notify`) about the agent's state; without
/// `$NOTIFY_SOCKET` this does nothing.
fn notify_systemd(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

/// What is reported for a configured interface with no device.
const MISSING: &str =
    "interface does not exist (yet): reported as relay_guard_interface_attached 0, attached as soon as it appears";

/// The files whose changes trigger a reload: the config and its list files.
fn watched_files(config_path: &Path, c: &Config) -> Vec<PathBuf> {
    std::iter::once(config_path.to_path_buf())
        .chain(c.list_files.iter().cloned())
        .collect()
}

/// Starts `GET /metrics` on `addr` until `stop` turns true.
fn serve_metrics(
    addr: std::net::SocketAddr,
    registry: Arc<prometheus_client::registry::Registry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    // Bind now so a taken port is a start-up error, not a silent loss.
    let std_listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("failed to listen on {addr} (metrics_listen)"))?;
    drop(std_listener);
    Ok(tokio::spawn(async move {
        if let Err(e) = metrics::serve(addr, registry, shutdown).await {
            error!(%addr, error = %e, "metrics server failed");
        }
    }))
}

/// Adds `what` and, when the kernel said EPERM somewhere down the chain,
/// which privileges the agent needs.
/// Returns the allocator's free memory to the system (glibc keeps freed
/// heap for reuse; after a reload of a 1M-entry list that is hundreds of
/// MiB). musl's allocator gives memory back by itself.
fn give_back_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn with_hint(e: crate::error::LoadError, what: &str) -> anyhow::Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut denied = false;
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            denied = true;
        }
        denied |= err.to_string().contains("Operation not permitted") || err.to_string().contains("Permission denied");
        source = err.source();
    }
    let hint = if denied {
        " (permission denied: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root; see deploy/relay-guard.service)"
    } else {
        ""
    };
    anyhow::Error::new(e).context(format!("{what}{hint}"))
}
