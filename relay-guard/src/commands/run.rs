//! `relay-guard run`: load, sync, attach, serve metrics, reload on SIGHUP.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    counters,
    error::SyncError,
    incremental::{DeltaError, Live},
    loader::{self, Loaded},
    metrics::{self, AgentMetrics, LabelState},
    pins::{self, AgentLock, Pins},
    policy::Policy,
    reload::{self, FileWatch},
    sync,
};

pub async fn execute(config_path: &Path) -> anyhow::Result<()> {
    let (cfg, index) = Config::load_indexed(config_path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    loader::bump_memlock_rlimit();
    let pins = Pins::new(&cfg.pin_dir);
    pins::ensure_bpffs(&cfg.pin_dir)?;
    let _lock = AgentLock::acquire(&cfg.pin_dir)?;
    let mut loaded = Loaded::load_pinned(&pins).map_err(|e| with_hint(e, "failed to load the XDP program"))?;
    if loaded.adopted {
        info!(pin_dir = %cfg.pin_dir.display(), "adopted pinned maps (allowlists and counters kept)");
    }

    // Fill the maps before attaching: the program never runs on empty maps.
    // Adopted maps are synced as a diff, so nothing allowed before and after
    // sees a gap.
    let mut cfg = cfg;
    let policy = Policy::compile(&cfg);
    let mut base_labels = LabelState::new(&cfg, HashMap::new(), counters::Slots::default());
    strip_entries(&mut cfg);
    let (stats, shadow, policy) =
        sync::apply_full(&mut loaded.maps, &policy, None, &[]).context("failed to fill the maps")?;
    base_labels.guards = policy.names_by_bit(&base_labels.guards);
    // Kept for reloads that only edit list files (applied as deltas).
    let mut live = Some(Live::new(&cfg, index, policy, shadow));
    // The policy in force while `live` is gone (after a failed full reload).
    let mut in_force: Option<Policy> = None;
    info!(
        written = stats.written,
        removed = stats.removed,
        unchanged = stats.unchanged,
        "maps synced"
    );

    let mut interfaces = HashMap::new();
    for iface in &cfg.interfaces {
        let a = loaded
            .attach(iface, cfg.xdp_mode)
            .map_err(|e| with_hint(e, "failed to attach"))?;
        interfaces.insert(a.ifindex, a.interface.clone());
    }
    loaded.prune(&cfg.interfaces);
    info!(mode = ?cfg.mode, interfaces = ?cfg.interfaces, "relay-guard is guarding");

    let slots = counters::slots(&loaded.maps).context("failed to read counter slots")?;
    let labels = Arc::new(RwLock::new(LabelState {
        interfaces: interfaces.clone(),
        slots,
        ..base_labels
    }));
    let agent = AgentMetrics::default();
    agent.reload_succeeded();
    let registry = Arc::new(metrics::registry(
        Arc::clone(&loaded.maps.counters),
        Arc::clone(&labels),
        &agent,
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut metrics_task = None;
    if let Some(addr) = cfg.metrics_listen {
        let mut rx = stop_rx.clone();
        let listener_registry = Arc::clone(&registry);
        let shutdown = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // Bind now so a taken port is a start-up error, not a silent loss.
        let std_listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("failed to listen on {addr} (metrics_listen)"))?;
        drop(std_listener);
        metrics_task = Some(tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, listener_registry, shutdown).await {
                error!(%addr, error = %e, "metrics server failed");
            }
        }));
    }

    // Blocked-source events from the program (rate-limited there).
    let logger_task = loaded.logger.take().and_then(|logger| {
        // SAFETY: the logger owns its ring-buffer fd and lives inside the
        // AsyncFd, so the fd stays open for as long as it is registered.
        match unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(mut fd) => Some(tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else { break };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            })),
            Err(e) => {
                warn!(error = %e, "cannot read blocked-source events");
                None
            }
        }
    });

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut current = cfg;
    let watched_files = |c: &Config| -> Vec<std::path::PathBuf> {
        std::iter::once(config_path.to_path_buf())
            .chain(c.list_files.iter().cloned())
            .collect()
    };
    let mut watch = FileWatch::new(&watched_files(&current));
    let mut seen = current.fingerprint;
    loop {
        let trigger = tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sighup.recv() => "SIGHUP",
            Some(()) = watch.events.recv() => {
                // Debounce: let a burst of events (write, rename, swap) settle.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                while watch.events.try_recv().is_ok() {}
                let now = reload::fingerprint(config_path, &current.list_files);
                if now == seen {
                    continue;
                }
                "file change"
            }
        };
        info!(trigger, "reloading config");
        // What a failed attempt saw (taken before it reads): a later change
        // of any of these bytes triggers another attempt.
        let attempted = reload::fingerprint(config_path, &current.list_files);
        // A delta leaves ports and interfaces as they were: the counter
        // slots stay, and are not read again (131k map lookups).
        let slots_now = labels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .slots
            .clone();
        let outcome = match delta_reload(&mut loaded, &mut live, &current, config_path, &interfaces, slots_now) {
            Some(outcome) => outcome.map(|(new, labels)| (new, labels, false)),
            None => {
                // The old state is rebuilt by the full reload: drop its index
                // first so a large list is not held twice (keeping the masks
                // it left for the next sync to clear). The policy in force is
                // kept: guards that change ports keep their old verdicts
                // until the switch (see `sync`), and a failed sync is undone
                // with it.
                let (stale, old) = match live.take() {
                    Some(l) => (l.shadow.stale, Some(l.policy)),
                    None => (Vec::new(), in_force.take()),
                };
                let r = reload(
                    &mut loaded,
                    &current,
                    config_path,
                    &mut interfaces,
                    &stale,
                    old.as_ref(),
                );
                match r {
                    Ok((new, labels, fresh)) => {
                        live = fresh;
                        Ok((new, labels, true))
                    }
                    Err(e) => {
                        if let Some(old) = &old
                            && matches!(e.downcast_ref::<SyncError>(), Some(SyncError::Map { .. }))
                        {
                            // Written part-way: back to the policy in force.
                            match sync::apply_full(&mut loaded.maps, old, None, &[]) {
                                Ok(_) => warn!("the failed sync was undone: the kernel holds the previous policy"),
                                Err(e2) => error!("undoing the failed sync failed too: {e2:#}"),
                            }
                        }
                        in_force = old;
                        Err(e)
                    }
                }
            }
        };
        // Counted when the attempt is over, so a scrape that sees the count
        // move also sees its outcome (the kernel maps are already synced).
        match outcome {
            Ok((new, mut new_labels, refresh_slots)) => {
                if refresh_slots {
                    match counters::slots(&loaded.maps) {
                        Ok(slots) => new_labels.slots = slots,
                        Err(e) => warn!(error = %e, "failed to read counter slots; metrics labels may lag"),
                    }
                }
                *labels.write().unwrap_or_else(std::sync::PoisonError::into_inner) = new_labels;
                agent.reload_succeeded();
                agent.reloads.inc();
                seen = new.fingerprint;
                current = new;
                if !watch.covers(&watched_files(&current)) {
                    watch = FileWatch::new(&watched_files(&current));
                }
            }
            Err(e) => {
                error!("reload failed, keeping the previous policy: {e:#}");
                agent.reload_failed();
                agent.reloads.inc();
                seen = attempted;
            }
        }
    }
    if let Some(t) = logger_task {
        t.abort();
    }
    let _ = stop_tx.send(true);
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    // The pinned links keep the filter attached: the relay never reopens
    // because the agent stopped. `relay-guard detach` removes it.
    info!(pin_dir = %current.pin_dir.display(), "exiting; the filter stays attached (use `relay-guard detach` to remove it)");
    Ok(())
}

/// Validates the config at `path` and, only if it is valid, syncs the maps.
/// A reload that only edited list files, applied as a delta (see
/// [`crate::incremental`]). `None`: take the full path.
fn delta_reload(
    loaded: &mut Loaded,
    live: &mut Option<Live>,
    current: &Config,
    path: &Path,
    interfaces: &HashMap<u32, String>,
    slots: counters::Slots,
) -> Option<anyhow::Result<(Config, LabelState)>> {
    let state = live.as_mut()?;
    match state.reload(&mut loaded.maps, path) {
        Ok(None) => None,
        Ok(Some(applied)) => {
            info!(
                written = applied.stats.written,
                removed = applied.stats.removed,
                lines_parsed = applied.lines,
                decisions_changed = applied.changes,
                "config reloaded"
            );
            let mut new = current.clone();
            new.fingerprint = state.index.fingerprint();
            let labels = LabelState {
                guards: state.policy.names_by_bit(&state.guard_names),
                allow_counts: state
                    .guard_names
                    .iter()
                    .zip(&applied.allow_counts)
                    .map(|(n, &(v4, v6))| (n.clone(), v4, v6))
                    .collect(),
                interfaces: interfaces.clone(),
                slots,
            };
            Some(Ok((new, labels)))
        }
        Err(DeltaError::Invalid(e)) => Some(Err(anyhow::anyhow!("invalid config:\n{e}"))),
        Err(DeltaError::Sync(e)) => {
            // The kernel is partly updated: a full reload diffs against it.
            error!(error = %e, "applying the list change failed; reloading in full");
            *live = None;
            None
        }
    }
}

/// Validates the config at `path` and, only if it is valid, syncs the maps.
/// Also returns the state for later delta reloads.
fn reload(
    loaded: &mut Loaded,
    current: &Config,
    path: &Path,
    interfaces: &mut HashMap<u32, String>,
    stale: &[u16],
    old: Option<&Policy>,
) -> anyhow::Result<(Config, LabelState, Option<Live>)> {
    let (mut new, index) = Config::load_indexed(path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    for (what, changed) in [
        ("xdp_mode", new.xdp_mode != current.xdp_mode),
        ("metrics_listen", new.metrics_listen != current.metrics_listen),
        ("pin_dir", new.pin_dir != current.pin_dir),
    ] {
        if changed {
            warn!("{what} changed: takes effect on restart");
        }
    }
    // Interfaces are part of validation: a name that does not exist fails the
    // reload before anything in the kernel changes.
    for iface in new.interfaces.iter().filter(|i| !current.interfaces.contains(i)) {
        loader::ifindex(iface)?;
    }
    let policy = Policy::compile(&new);
    let mut labels = LabelState::new(&new, interfaces.clone(), counters::Slots::default());
    strip_entries(&mut new);
    let (stats, shadow, policy) = sync::apply_full(&mut loaded.maps, &policy, old, stale)?;
    labels.guards = policy.names_by_bit(&labels.guards);
    let live = Live::new(&new, index, policy, shadow);
    info!(
        written = stats.written,
        removed = stats.removed,
        unchanged = stats.unchanged,
        "config reloaded"
    );
    // New interfaces are attached once the maps hold the new policy; removed
    // ones are detached (their pinned links unpinned).
    for iface in new.interfaces.iter().filter(|i| !current.interfaces.contains(i)) {
        let a = loaded
            .attach(iface, new.xdp_mode)
            .with_context(|| format!("policy applied, but attaching to new interface `{iface}` failed"))?;
        interfaces.insert(a.ifindex, a.interface.clone());
    }
    interfaces.retain(|_, name| new.interfaces.contains(name));
    loaded.prune(&new.interfaces);
    let labels = LabelState {
        interfaces: interfaces.clone(),
        ..labels
    };
    Ok((new, labels, Some(live)))
}

/// Adds `what` and, when the kernel said EPERM somewhere down the chain,
/// which privileges the agent needs.
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

/// Drops the per-entry data of a config once it is compiled: the run loop
/// keeps only what it needs to reload and label (a 1M-entry list would
/// otherwise be held twice during a reload).
fn strip_entries(cfg: &mut Config) {
    for g in &mut cfg.guards {
        g.entries = Vec::new();
    }
}
