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
mod apply;
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
    collections::{HashMap, HashSet},
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
    config::{Config, ConfigErrors, ConfigFile, LoadOptions, RunConfig, lists::ListIndex},
    error::LoadError,
    kernel::{
        counters,
        loader::{self, Loaded},
        netdev,
        pins::{self, AgentLock, Pins},
        sizes::Sizes,
    },
    policy::Policy,
};
use apply::{ApplyError, Candidate, PolicyState, Prior};
use links::{LinkWatch, Outcome};
use metrics::{AgentMetrics, LabelState};
use reload::Reloaded;
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
    let from_copy = agent.source.started_from_copy;
    if from_copy && crate::config::fingerprint(config_path, &agent.current.list_files) != agent.source.seen {
        agent.reload("file change during start");
    }
    let status = if from_copy && agent.metrics.agent.last_reload_successful.get() == 0 {
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

/// The running agent: the state that lives as long as the process, in the
/// few parts it belongs to.
pub struct Agent {
    /// Where the config comes from, and what was last read of it.
    source: ConfigSource,
    /// The settings in force (the guards' entries live in `policy`).
    current: RunConfig,
    /// What the agent knows of the policy the kernel holds (for deltas and
    /// for undoing a failed sync).
    policy: PolicyState,
    /// The program, its maps and pins, and the interfaces it guards.
    kernel: Kernel,
    /// Everything the loop waits on (see [`Event`]).
    sources: Sources,
    /// The metrics labels, the agent-side series and their server.
    metrics: Metrics,
    /// The scheduled open-relay test (`[relaytest]`).
    relaytest: relaytest::Scheduler,
    /// Bans: the engine, its persistence and metrics.
    bans: bans::BanRunner,
    /// Held until the agent is dropped, after everything above.
    _lock: AgentLock,
}

/// Where the config comes from.
struct ConfigSource {
    path: PathBuf,
    /// What the command line sets in place of the file, at every load.
    options: LoadOptions,
    /// Fingerprint of the files as last loaded or attempted.
    seen: u64,
    /// Whether the start applied the last good copy from `state_dir`
    /// because the config did not load.
    started_from_copy: bool,
}

/// The kernel side and what the agent last reported of it.
struct Kernel {
    loaded: Loaded,
    pins: Pins,
    /// Interface names by ifindex, for the counters' labels: the devices
    /// attached now, and those attached before under a name still configured.
    interfaces: HashMap<u32, String>,
    /// What was last reported for each configured interface that is not
    /// guarded (so a problem is logged when it starts or changes, not at
    /// every check).
    link_problems: HashMap<String, String>,
    /// What was last reported for each interface where a program ahead of
    /// relay-guard in the XDP dispatcher bypasses it (`check_bypass`).
    bypassed: HashMap<String, String>,
    /// Interfaces a resize could not move to the set in force: they still
    /// run the previous program, and are attached again (the program
    /// swapped on their link) at every check until they move.
    unmoved: HashSet<String>,
}

/// The sources of [`Event`]s.
struct Sources {
    signals: Signals,
    files: FileWatch,
    links: LinkWatch,
    /// Failures and unparsed lines from the log followers.
    ban_inputs: bans::Inputs,
    ban_tick: tokio::time::Interval,
    /// CrowdSec's bouncer and watcher (`[crowdsec]`).
    crowdsec: crowdsec::Runner,
    /// The blocked-source logger (watched: if it ends, the log says so).
    blocked_log: Option<JoinHandle<std::io::Result<()>>>,
}

/// The metrics side.
struct Metrics {
    labels: Arc<RwLock<LabelState>>,
    agent: AgentMetrics,
    stop_tx: tokio::sync::watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl Agent {
    /// Loads (or adopts) the program, puts the config in force (the apply
    /// sequence of `agent::apply`), attaches, starts the metrics server and
    /// the blocked-source log, and installs the signal handlers: everything
    /// before the loop.
    // About 80 lines, kept in one piece: the order is the contract (maps
    // filled before attaching, attached before the copy is saved and bans
    // restored, the signal handlers last), and reads best top to bottom.
    pub async fn start(config_path: &Path, options: LoadOptions) -> anyhow::Result<Agent> {
        let boot = load_at_start(config_path, &options)?;
        // A device that cannot be guarded is a config error, found before
        // anything changes (one that does not exist yet is checked when it
        // appears).
        for iface in &boot.config.interfaces {
            netdev::check_ethernet(iface).map_err(|e| anyhow::Error::new(e).context("invalid config"))?;
        }
        // Compiled first: a new set of maps is sized for it.
        let candidate = Candidate::compile(boot.config, boot.index);
        let (mut kernel, lock) = Kernel::open(&candidate.run, &candidate.policy)?;
        // Fill the maps before attaching: the program never runs on empty
        // maps. Adopted maps are synced as a diff, so nothing allowed before
        // and after sees a gap; adopted maps that do not fit the config (or
        // far exceed it) are replaced by a new set, filled, and the links
        // move to it when they are attached below.
        let mut policy = PolicyState::Unknown;
        let mode = candidate.run.xdp_mode;
        let applied =
            apply::apply(&mut kernel.loaded, &mut policy, candidate, Prior::none(), &[], mode).map_err(start_error)?;
        info!(
            written = applied.stats.written,
            removed = applied.stats.removed,
            unchanged = applied.stats.unchanged,
            "maps synced"
        );
        let run = applied.run;
        // Subscribed before attaching: a device that appears from here on
        // is seen.
        let links = LinkWatch::start();
        let attached = kernel.attach_at_start(&run)?;
        // Saved only once applied and attached: what a later boot falls back
        // to has worked here. A start from the copy leaves it as it is.
        if boot.errors.is_none()
            && let PolicyState::Live(live) = &policy
        {
            save_state(&run.state_dir, config_path, &live.index);
        }
        // Never fails: a bad saved ban is dropped and counted, and the
        // guard is attached already.
        let loaded = &mut kernel.loaded;
        let mut ban_runner = bans::BanRunner::start_with(
            &run.bans,
            &run.state_dir,
            &mut loaded.bans,
            loaded.adopted,
            &*policy.allowed(&run.guards),
        );
        let relaytest_metrics = relaytest::Metrics::default();
        // Seen by the watcher: after a start from the copy, the bytes of the
        // real (broken) files, so that a fix of any of them is a reload.
        let from_copy = boot.errors.is_some();
        let seen = if from_copy { boot.attempted } else { run.fingerprint };
        let started = Started {
            from_copy,
            attached: &attached,
        };
        let crowdsec = crowdsec::Runner::start(run.crowdsec.as_ref(), &run.bans, &run.state_dir, &mut ban_runner);
        let metrics = Metrics::start(
            &kernel,
            applied.labels,
            &run,
            (&ban_runner, &crowdsec.metrics),
            &relaytest_metrics,
            &started,
        )?;
        let sources = Sources::start(config_path, &run, links, &mut kernel.loaded, &metrics.agent, crowdsec)?;
        let mut agent = Agent {
            relaytest: relaytest::Scheduler::start(&run.relaytest, relaytest_metrics),
            source: ConfigSource {
                path: config_path.to_path_buf(),
                options,
                seen,
                started_from_copy: from_copy,
            },
            current: run,
            policy,
            kernel,
            sources,
            metrics,
            bans: ban_runner,
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
                Event::AuthFailure(f) => self.auth_failure(&f),
                Event::LogLineUnparsed(section) => self.bans.unparsed(section),
                Event::LogLineSuspicious(section) => self.bans.suspicious(section),
                Event::LogSourceUp { ban, source, up } => self.bans.source_up(ban, source, up),
                Event::BanTick => self.bans.tick(&mut self.kernel.loaded.bans),
                Event::Crowdsec(m) => self.crowdsec(m),
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Waits for the next event from any source.
    async fn next_event(&mut self, shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> Event {
        let s = &mut self.sources;
        tokio::select! {
            _ = s.signals.interrupt.recv() => Event::Stop("SIGINT"),
            _ = s.signals.terminate.recv() => Event::Stop("SIGTERM"),
            _ = s.signals.hangup.recv() => Event::Hangup,
            Some(()) = s.files.events.recv() => Event::FilesChanged,
            () = s.links.changed() => Event::LinksChanged,
            () = shutdown.as_mut() => Event::Stop("shutdown requested"),
            Some(e) = s.ban_inputs.rx.recv() => e,
            _ = s.ban_tick.tick() => Event::BanTick,
            m = s.crowdsec.recv() => Event::Crowdsec(m),
            ended = async { s.blocked_log.as_mut().expect("checked by the branch condition").await }, if s.blocked_log.is_some() => {
                s.blocked_log = None;
                Event::BlockedLogEnded(match ended {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) if e.is_panic() => "it panicked".to_string(),
                    _ => "it ended".to_string(),
                })
            }
        }
    }

    /// A failed login from a `[[ban]]` section's logs, judged with the
    /// guards' explicit allows (when the list index is at hand).
    fn auth_failure(&mut self, f: &bans::AuthFailure) {
        let allowed = self.policy.allowed(&self.current.guards);
        self.bans.failure_with(&mut self.kernel.loaded.bans, f, &*allowed);
    }

    /// A watched directory changed: reloads if the bytes of the config or a
    /// list file did.
    async fn files_changed(&mut self) {
        // Debounce: let a burst of events (write, rename, swap) settle.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        while self.sources.files.events.try_recv().is_ok() {}
        let now = crate::config::fingerprint(&self.source.path, &self.current.list_files);
        if now != self.source.seen {
            self.reload("file change");
        }
    }

    /// Reports each configured interface where relay-guard's slot in a
    /// shared XDP dispatcher is bypassed (see [`Kernel::check_bypass`]).
    fn check_bypass(&mut self) {
        self.kernel.check_bypass(&self.current.interfaces, &self.metrics.agent);
    }

    /// A device came, went or changed: makes every configured interface's
    /// device carry the filter (see `links`), reports those that cannot, and
    /// updates `relay_guard_interface_attached` and the counters' labels.
    fn guard_interfaces(&mut self) {
        let (attached, changed) = self.kernel.guard(&self.current);
        // Labels first: a scrape that sees an interface attached sees its
        // counters under its name.
        if changed {
            let mut labels = self.metrics.write_labels();
            labels.interfaces = self.kernel.interfaces.clone();
            let mut slots = labels.slots.clone();
            let k = &self.kernel;
            match counters::refresh_iface_slots(&k.loaded.maps, &mut slots, k.interfaces.keys().copied()) {
                Ok(()) => labels.slots = slots,
                Err(e) => warn!(error = %e, "failed to read counter slots; metrics labels may lag"),
            }
        }
        self.metrics.agent.interfaces_attached(&attached);
        self.check_bypass();
    }

    /// Reloads the config (as a delta when only list files changed), and on
    /// failure keeps the previous policy.
    fn reload(&mut self, trigger: &'static str) {
        info!(trigger, "reloading config");
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now());
        notify_systemd(&reloading);
        // What a failed attempt saw (taken before it reads): a later change
        // of any of these bytes triggers another attempt.
        let attempted = crate::config::fingerprint(&self.source.path, &self.current.list_files);
        let result = self.try_reload();
        // A full reload of a large list leaves its parse and compile freed
        // but held by the allocator: give it back to the system.
        give_back_heap();
        // Counted when the attempt is over, so a scrape that sees the count
        // move also sees its outcome (the kernel maps are already synced).
        match result {
            Ok(reloaded) => self.reloaded(reloaded),
            Err(e) => self.reload_failed(e, attempted),
        }
    }

    /// A delta when only list files changed, else the full apply.
    fn try_reload(&mut self) -> Result<Reloaded, ApplyError> {
        // A delta leaves ports and interfaces as they were: the counter
        // slots stay, and are not read again (131k map lookups).
        let slots_now = self.metrics.read_labels().slots.clone();
        let k = &mut self.kernel;
        let (path, current) = (self.source.path.as_path(), &self.current);
        match reload::delta_reload(&mut k.loaded, &mut self.policy, current, path, &k.interfaces, slots_now) {
            Some(r) => r,
            None => reload::full_reload(
                &mut k.loaded,
                &mut self.policy,
                current,
                path,
                &self.source.options,
                &mut k.interfaces,
            ),
        }
    }

    /// The bookkeeping of a reload that applied, before it is reported.
    fn reloaded(&mut self, reloaded: Reloaded) {
        let Reloaded {
            run,
            mut labels,
            refresh_slots,
            unmoved,
        } = reloaded;
        // Saved before the success is reported: a scrape that sees it also
        // finds this set in state_dir.
        if let PolicyState::Live(live) = &self.policy {
            save_state(&run.state_dir, &self.source.path, &live.index);
        }
        // A resize loaded a new program, which logs blocked sources to a
        // ring buffer of its own: read that one now.
        if let Some(task) = spawn_blocked_log(&mut self.kernel.loaded, &self.metrics.agent)
            && let Some(old) = self.sources.blocked_log.replace(task)
        {
            old.abort();
        }
        if refresh_slots {
            match counters::slots(&self.kernel.loaded.maps) {
                Ok(slots) => labels.slots = slots,
                Err(e) => warn!(error = %e, "failed to read counter slots; metrics labels may lag"),
            }
        }
        self.bans
            .reconfigure(&run.bans, &run.state_dir, &mut self.kernel.loaded.bans);
        if self.bans.sections() != self.sources.ban_inputs.sections.as_slice() {
            self.sources.ban_inputs = bans::Inputs::start(&run.bans);
        }
        labels.bans = self.bans.labels(&self.kernel.loaded.bans);
        *self.metrics.write_labels() = labels;
        self.source.seen = run.fingerprint;
        self.current = run;
        self.relaytest.update(&self.current.relaytest);
        let files = watched_files(&self.source.path, &self.current);
        if !self.sources.files.covers(&files) {
            self.sources.files = FileWatch::new(&files);
        }
        self.kernel.unmoved.extend(unmoved.into_iter().map(|(iface, _)| iface));
        // Attaches interfaces the reload added (or reports them missing,
        // and attaches them when they appear), and retries those a resize
        // could not move, before the reload is counted.
        self.guard_interfaces();
        self.metrics.agent.reload_succeeded();
        self.metrics.agent.reloads.inc();
        notify_systemd(&[NotifyState::Ready, NotifyState::Status("guarding")]);
    }

    /// A reload that did not apply: the previous policy stays.
    fn reload_failed(&mut self, e: ApplyError, attempted: u64) {
        error!(
            "reload failed, keeping the previous policy: {:#}",
            anyhow::Error::new(e)
        );
        self.metrics.agent.reload_failed();
        self.metrics.agent.reloads.inc();
        self.source.seen = attempted;
        notify_systemd(&[
            NotifyState::Ready,
            NotifyState::Status("guarding with the previous policy: the last reload failed (see the log)"),
        ]);
    }

    /// Stops the background tasks. The pinned links keep the filter
    /// attached: the relay never reopens because the agent stopped.
    async fn stop(mut self) {
        notify_systemd(&[NotifyState::Stopping]);
        self.bans.save_now();
        if let Some(t) = self.sources.blocked_log.take() {
            t.abort();
        }
        let _ = self.metrics.stop_tx.send(true);
        if let Some(t) = self.metrics.server.take() {
            let _ = t.await;
        }
        // `relay-guard detach` removes it.
        info!(pin_dir = %self.current.pin_dir.display(), "exiting; the filter stays attached (use `relay-guard detach` to remove it)");
    }
}

impl Kernel {
    /// Makes sure of the bpffs, takes the pin_dir's lock (held until the
    /// agent exits), and loads or adopts the program with maps sized for
    /// `policy`.
    fn open(run: &RunConfig, policy: &Policy) -> anyhow::Result<(Kernel, AgentLock)> {
        loader::bump_memlock_rlimit();
        pins::ensure_bpffs(&run.pin_dir)?;
        let lock = AgentLock::acquire(&run.pin_dir)?;
        // The resolved path: every spelling of pin_dir names the same state.
        let pins = Pins::new(&lock.path);
        let mut loaded = Loaded::load_pinned_sized(&pins, Sizes::for_policy(policy))
            .map_err(|e| with_hint(e, "failed to load the XDP program"))?;
        loaded.xdp_priority = run.xdp_priority;
        loaded.xdp_dispatcher = run.xdp_dispatcher;
        if loaded.adopted {
            info!(pin_dir = %run.pin_dir.display(), "adopted pinned maps (allowlists and counters kept)");
        }
        let kernel = Kernel {
            loaded,
            pins,
            interfaces: HashMap::new(),
            link_problems: HashMap::new(),
            bypassed: HashMap::new(),
            unmoved: HashSet::new(),
        };
        Ok((kernel, lock))
    }

    /// Attaches every configured interface at start (a pinned link that is
    /// right is adopted: the new program swapped in), detaches what the
    /// config no longer names, and returns what is attached. An interface
    /// that cannot be attached fails the start; one with no device is
    /// reported, and attached when it appears.
    fn attach_at_start(&mut self, run: &RunConfig) -> anyhow::Result<Vec<(String, bool)>> {
        let mut attached = Vec::new();
        for iface in &run.interfaces {
            let outcome = self
                .guard_one(iface, run, true)
                .map_err(|e| with_hint(e, "failed to attach"))?;
            if outcome == Outcome::Missing {
                warn!(interface = %iface, "{MISSING}");
                self.link_problems.insert(iface.clone(), MISSING.to_string());
            }
            attached.push((iface.clone(), outcome != Outcome::Missing));
        }
        self.loaded.prune(&run.interfaces);
        let guarded: Vec<&str> = attached.iter().filter(|a| a.1).map(|a| a.0.as_str()).collect();
        let missing = self.link_problems.len();
        info!(mode = ?run.mode, interfaces = ?guarded, missing, "relay-guard is guarding");
        Ok(attached)
    }

    /// `links::guard_one` for `iface`, its ifindex labels following.
    fn guard_one(&mut self, iface: &str, run: &RunConfig, adopt: bool) -> Result<Outcome, LoadError> {
        let (loaded, labels) = (&mut self.loaded, &mut self.interfaces);
        links::guard_one(loaded, &self.pins, iface, run.xdp_mode, &run.interfaces, labels, adopt)
    }

    /// Makes every configured interface's device carry the filter, retries
    /// those a resize did not move, and reports each problem when it starts
    /// or changes. Returns each interface with whether it is guarded, and
    /// whether any attachment changed (labels and slots to refresh).
    fn guard(&mut self, run: &RunConfig) -> (Vec<(String, bool)>, bool) {
        let mut attached = Vec::new();
        let mut changed = false;
        for iface in &run.interfaces {
            let unmoved = self.unmoved.contains(iface);
            let problem = match self.guard_one(iface, run, unmoved) {
                Ok(Outcome::Guarded { changed: c, .. }) => {
                    changed |= c;
                    self.unmoved.remove(iface);
                    None
                }
                Ok(Outcome::Missing) => Some(MISSING.to_string()),
                Err(e) if unmoved => Some(format!(
                    "{:#}",
                    with_hint(
                        e,
                        "still runs the previous program and policy: moving it to the resized maps failed"
                    )
                )),
                Err(e) => Some(format!("{:#}", with_hint(e, "failed to attach"))),
            };
            attached.push((iface.clone(), problem.is_none()));
            self.report(iface, problem);
        }
        self.link_problems.retain(|name, _| run.interfaces.contains(name));
        self.unmoved.retain(|name| run.interfaces.contains(name));
        (attached, changed)
    }

    /// Logs `problem` of `iface` (or that it is guarded again) when it
    /// differs from what was last reported.
    fn report(&mut self, iface: &str, problem: Option<String>) {
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
                    self.link_problems.insert(iface.to_string(), p);
                }
            }
        }
    }

    /// Reports each of `interfaces` where relay-guard's slot in a shared
    /// XDP dispatcher is bypassed: a program ahead of it that does not
    /// chain on XDP_PASS (SPEC.md, "Sharing the interface"): an error line
    /// when it starts or changes, `relay_guard_interface_bypassed`.
    fn check_bypass(&mut self, interfaces: &[String], metrics: &AgentMetrics) {
        for iface in interfaces {
            let bypass = loader::ifindex(iface)
                .map(|i| crate::kernel::shared::bypasses(&self.pins, i))
                .unwrap_or_default();
            metrics.interface_bypassed(iface, !bypass.is_empty());
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
        self.bypassed.retain(|name, _| interfaces.contains(name));
    }
}

impl Sources {
    /// Starts the blocked-source log of the program `loaded` holds, installs
    /// the signal handlers and watches the config's and lists' files; with
    /// `links` (subscribed before the interfaces were attached) and the
    /// followers of `run`'s `[[ban]]` logs.
    fn start(
        config_path: &Path,
        run: &RunConfig,
        links: LinkWatch,
        loaded: &mut Loaded,
        metrics: &AgentMetrics,
        crowdsec: crowdsec::Runner,
    ) -> anyhow::Result<Sources> {
        Ok(Sources {
            blocked_log: spawn_blocked_log(loaded, metrics),
            signals: Signals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
                hangup: signal(SignalKind::hangup())?,
            },
            files: FileWatch::new(&watched_files(config_path, run)),
            links,
            ban_inputs: bans::Inputs::start(&run.bans),
            ban_tick: tokio::time::interval(bans::TICK),
            crowdsec,
        })
    }
}

/// What the start did, for the first values of the agent-side series.
struct Started<'a> {
    /// Started from the last good copy: the config's load is counted failed.
    from_copy: bool,
    /// Each configured interface, and whether it is guarded.
    attached: &'a [(String, bool)],
}

impl Metrics {
    /// The labels (`labels` with the interfaces, counter slots and bans of
    /// now) and the agent-side series (their first values from `started`),
    /// served with the kernel's counters, the bans' and the relay test's
    /// metrics on `run`'s `metrics_listen`.
    fn start(
        kernel: &Kernel,
        labels: LabelState,
        run: &RunConfig,
        (bans, crowdsec): (&bans::BanRunner, &crate::crowdsec::Metrics),
        relaytest: &relaytest::Metrics,
        started: &Started<'_>,
    ) -> anyhow::Result<Metrics> {
        let slots = counters::slots(&kernel.loaded.maps).context("failed to read counter slots")?;
        let labels = Arc::new(RwLock::new(LabelState {
            interfaces: kernel.interfaces.clone(),
            slots,
            bans: bans.labels(&kernel.loaded.bans),
            ..labels
        }));
        let agent = AgentMetrics::default();
        if started.from_copy {
            agent.reload_failed();
        } else {
            agent.reload_succeeded();
        }
        agent.interfaces_attached(started.attached);
        let mut registry = metrics::registry(Arc::clone(&kernel.loaded.maps.counters), Arc::clone(&labels), &agent);
        relaytest.register(&mut registry);
        bans.metrics.register(&mut registry);
        crowdsec.register(&mut registry);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = match run.metrics_listen {
            Some(addr) => Some(serve_metrics(addr, Arc::new(registry), stop_rx)?),
            None => None,
        };
        Ok(Metrics {
            labels,
            agent,
            stop_tx,
            server,
        })
    }

    fn read_labels(&self) -> std::sync::RwLockReadGuard<'_, LabelState> {
        self.labels.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_labels(&self) -> std::sync::RwLockWriteGuard<'_, LabelState> {
        self.labels.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts reading the blocked-source events of the program `loaded` holds,
/// if it has not been read yet (at start, and after a resize loaded a new
/// program), its suppressed events counted in the series already served.
fn spawn_blocked_log(loaded: &mut Loaded, metrics: &AgentMetrics) -> Option<JoinHandle<std::io::Result<()>>> {
    let mut log = loaded.logger.take()?;
    log.count_suppressed_in(metrics.blocked_events_suppressed.clone());
    Some(tokio::spawn(log.run()))
}

/// A failed start's error from the apply sequence.
fn start_error(e: ApplyError) -> anyhow::Error {
    match e {
        ApplyError::Publish(e) => with_hint(e, "failed to pin the maps"),
        e => anyhow::Error::new(e).context("failed to fill the maps"),
    }
}

/// The config a start applies (see [`load_at_start`]).
struct Boot {
    config: Config,
    index: ListIndex,
    /// Why the config at the path did not load, when this is the saved copy.
    errors: Option<ConfigErrors>,
    /// The fingerprint of the files at the path as read.
    attempted: u64,
}

/// The config to start with: the one at `config_path` or, when it or a list
/// file is invalid or unreadable, the last good copy saved in `state_dir`
/// (then also the errors, logged here, and the fingerprint of the real
/// files as they were read right after the failure). With no usable copy
/// either, the error names both reasons.
fn load_at_start(config_path: &Path, options: &LoadOptions) -> anyhow::Result<Boot> {
    // Read and parsed once: a config that does not validate may still name
    // the state_dir of its last good copy.
    let (errors, state_dir) = match crate::config::read_config_text(config_path) {
        Ok(text) => {
            let file = ConfigFile::parse(config_path, &text);
            match file.validate_indexed(options) {
                Ok((config, index)) => {
                    let attempted = config.fingerprint;
                    return Ok(Boot {
                        config,
                        index,
                        errors: None,
                        attempted,
                    });
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
            Ok(Boot {
                config: restored.config,
                index: restored.index,
                errors: Some(errors),
                attempted,
            })
        }
        Err(why) => Err(anyhow::anyhow!(
            "invalid config:\n{errors}\nand no last good config to start from instead: {why}"
        )),
    }
}

/// Saves what was just applied as the last good set; a failure is logged
/// (the filter is in place, only a later broken boot would miss the copy).
fn save_state(state_dir: &Path, config_path: &Path, index: &ListIndex) {
    match state::save(state_dir, config_path, index) {
        Ok(dir) => tracing::debug!(dir = %dir.display(), "saved the last good config"),
        Err(e) => warn!(
            state_dir = %state_dir.display(),
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
fn watched_files(config_path: &Path, c: &RunConfig) -> Vec<PathBuf> {
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

/// Adds `what` and, when the kernel said EPERM somewhere down the chain,
/// which privileges the agent needs.
fn with_hint(e: crate::error::LoadError, what: &str) -> anyhow::Error {
    let hint = if crate::kernel::errno::denied(&e) {
        " (permission denied: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root; see deploy/relay-guard.service)"
    } else {
        ""
    };
    anyhow::Error::new(e).context(format!("{what}{hint}"))
}
