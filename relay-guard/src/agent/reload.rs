//! Reload planning: a reload that only edited list files is applied as a
//! delta ([`Live`]); anything else recompiles the whole config and syncs it
//! as a diff against the kernel. Either way the config is validated before
//! anything in the kernel changes, and a failure keeps the previous policy.
use std::{collections::HashMap, path::Path};

use anyhow::Context as _;
use tracing::{error, info, warn};

use crate::{
    agent::{
        incremental::{DeltaError, Live},
        metrics::LabelState,
    },
    config::{Config, LoadOptions},
    error::SyncError,
    kernel::{counters, loader::Loaded, netdev, sizes::Sizes, sync},
    policy::Policy,
};

/// A reload that only edited list files, applied as a delta (see
/// [`crate::agent::incremental`]). `None`: take the full path.
pub(super) fn delta_reload(
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
        Ok(Some(_))
            if shrank(&state.policy, state.sized_for) && Sizes::resize_for(&loaded.maps, &state.policy).is_some() =>
        {
            // Applied; a full reload now moves to smaller maps.
            info!("the lists shrank to under a quarter: reloading in full to give the maps' memory back");
            *live = None;
            None
        }
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
                bans: super::metrics::BanLabels::default(),
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

/// Whether `policy` holds under a quarter of the prefixes the maps were
/// sized for (cheap: the sizes are only computed then).
fn shrank(policy: &Policy, sized_for: usize) -> bool {
    (policy.v4.len() + policy.v6.len()).saturating_mul(4) < sized_for
}

/// Validates the config at `path` and, only if it is valid, syncs the maps.
/// Also returns the state for later delta reloads.
pub(super) fn full_reload(
    loaded: &mut Loaded,
    current: &Config,
    path: &Path,
    options: &LoadOptions,
    interfaces: &mut HashMap<u32, String>,
    stale: &[u16],
    old: Option<&Policy>,
) -> anyhow::Result<(Config, LabelState, Option<Live>)> {
    let (mut new, index) =
        Config::load_indexed_with(path, options).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    for (what, changed) in [
        ("xdp_mode", new.xdp_mode != current.xdp_mode),
        ("xdp_priority", new.xdp_priority != current.xdp_priority),
        ("xdp_dispatcher", new.xdp_dispatcher != current.xdp_dispatcher),
        ("metrics_listen", new.metrics_listen != current.metrics_listen),
        ("pin_dir", new.pin_dir != current.pin_dir),
    ] {
        if changed {
            warn!("{what} changed: takes effect on restart");
        }
    }
    // Interfaces are part of validation: a device that cannot be guarded
    // (no Ethernet framing) fails the reload before anything in the kernel
    // changes. A name with no device is not an error, as at start: it is
    // reported, and attached when it appears.
    for iface in new.interfaces.iter().filter(|i| !current.interfaces.contains(i)) {
        netdev::check_ethernet(iface).context("invalid config")?;
    }
    let policy = Policy::compile(&new);
    let mut labels = LabelState::new(&new, interfaces.clone(), counters::Slots::default());
    strip_entries(&mut new);
    let attached: Vec<String> = interfaces
        .values()
        .filter(|name| current.interfaces.contains(name) && new.interfaces.contains(name))
        .cloned()
        .collect();
    let (stats, shadow, policy) = sync_sized(loaded, &policy, old, stale, &attached, current.xdp_mode)?;
    labels.guards = policy.names_by_bit(&labels.guards);
    let live = Live::new(&new, index, policy, shadow);
    info!(
        written = stats.written,
        removed = stats.removed,
        unchanged = stats.unchanged,
        "config reloaded"
    );
    // Removed interfaces are detached (their pinned links unpinned); new ones
    // are attached by the caller once the maps hold the new policy
    // (`Agent::guard_interfaces`).
    interfaces.retain(|_, name| new.interfaces.contains(name));
    loaded.prune(&new.interfaces);
    let labels = LabelState {
        interfaces: interfaces.clone(),
        ..labels
    };
    Ok((new, labels, Some(live)))
}

/// Makes the kernel hold `policy`: in place when the maps of the set in
/// force fit it, else in a new set sized for it, filled while the old one
/// guards, then handed the `attached` interfaces (see
/// `Loaded::take_over`). A set far larger than the policy needs is
/// replaced the same way, so a config that shrank gives the memory back.
/// Either way all or nothing: a failure before the hand-over leaves the
/// set in force as it was.
pub(super) fn sync_sized(
    loaded: &mut Loaded,
    policy: &Policy,
    old: Option<&Policy>,
    stale: &[u16],
    attached: &[String],
    mode: crate::config::XdpMode,
) -> anyhow::Result<(sync::SyncStats, sync::Shadow, Policy)> {
    let have = Sizes::of(&loaded.maps);
    let sizes = match Sizes::resize_for(&loaded.maps, policy) {
        Some(s) => s,
        None => match sync::apply_full(&mut loaded.maps, policy, old, stale) {
            // The old and the new policy do not fit side by side: a new set
            // twice as large, where only the new one is written.
            Err(SyncError::Capacity { what }) if have != Sizes::MAX => {
                info!(reason = %what, "the maps are too small for an update in place");
                have.doubled().max(Sizes::for_policy(policy))
            }
            r => return Ok(r?),
        },
    };
    info!(from = %have, to = %sizes, "resizing the maps: filling a new set beside the one in force");
    let mut new = loaded.new_set(sizes).context("failed to load a new set of maps")?;
    let filled = match sync::apply_full(&mut new.maps, policy, None, &[]) {
        Ok(r) => r,
        Err(e) => {
            drop(new);
            loaded.discard_unpublished();
            return Err(e.into());
        }
    };
    for (iface, e) in loaded.take_over(new, attached, mode) {
        error!(interface = %iface, error = %e, "could not move the interface to the resized maps: it keeps the previous policy until the next reload or restart");
    }
    info!(sizes = %sizes, "maps resized: the new set is in force");
    Ok(filled)
}

/// Drops the per-entry data of a config once it is compiled: the run loop
/// keeps only what it needs to reload and label (a 1M-entry list would
/// otherwise be held twice during a reload).
pub(super) fn strip_entries(cfg: &mut Config) {
    for g in &mut cfg.guards {
        g.entries = Vec::new();
    }
}
