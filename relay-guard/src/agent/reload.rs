//! Reload planning: a reload that only edited list files is applied as a
//! delta ([`Live`]); anything else is validated, compiled and put in force
//! by the one apply sequence of `agent::apply`. Either way the config is
//! validated before anything in the kernel changes, and a failure keeps the
//! previous policy.
use std::{collections::HashMap, path::Path};

use tracing::{error, info, warn};

use crate::{
    agent::{
        apply::{self, Applied, ApplyError, Candidate, PolicyState},
        incremental::DeltaError,
        metrics::LabelState,
    },
    config::{Config, LoadOptions, RunConfig},
    kernel::{counters, loader::Loaded, netdev, sizes::Sizes},
    policy::Policy,
};

/// A reload that was applied: the settings now in force and the labels
/// (interfaces and counter slots included; the bans' are the caller's).
pub(super) struct Reloaded {
    pub run: RunConfig,
    pub labels: LabelState,
    /// Whether the counter slots are to be read again (ports or
    /// interfaces may have changed).
    pub refresh_slots: bool,
    /// Interfaces a resize could not move (see [`apply::Outcome`]).
    pub unmoved: Vec<(String, crate::error::LoadError)>,
}

/// A reload that only edited list files, applied as a delta (see
/// [`crate::agent::incremental`]). `None`: take the full path.
pub(super) fn delta_reload(
    loaded: &mut Loaded,
    state: &mut PolicyState,
    current: &RunConfig,
    path: &Path,
    interfaces: &HashMap<u32, String>,
    slots: counters::Slots,
) -> Option<Result<Reloaded, ApplyError>> {
    let PolicyState::Live(live) = state else {
        return None;
    };
    match live.reload(&mut loaded.maps, path) {
        Ok(None) => None,
        Ok(Some(_))
            if shrank(&live.policy, live.sized_for) && Sizes::resize_for(&loaded.maps, &live.policy).is_some() =>
        {
            // Applied; a full reload now moves to smaller maps.
            info!("the lists shrank to under a quarter: reloading in full to give the maps' memory back");
            let PolicyState::Live(live) = std::mem::replace(state, PolicyState::Unknown) else {
                unreachable!("matched above")
            };
            *state = PolicyState::InForce(live.policy);
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
            let mut run = current.clone();
            run.fingerprint = live.index.fingerprint();
            let labels = LabelState {
                guards: live.policy.names_by_bit(&live.guard_names),
                allow_counts: live
                    .guard_names
                    .iter()
                    .zip(&applied.allow_counts)
                    .map(|(n, &(v4, v6))| (n.clone(), v4, v6))
                    .collect(),
                interfaces: interfaces.clone(),
                slots,
                bans: super::metrics::BanLabels::default(),
            };
            Some(Ok(Reloaded {
                run,
                labels,
                refresh_slots: false,
                unmoved: Vec::new(),
            }))
        }
        Err(DeltaError::Invalid(e)) => Some(Err(ApplyError::Invalid(e))),
        Err(DeltaError::Sync(e)) => {
            // The kernel is partly updated: a full reload diffs against it.
            error!(error = %e, "applying the list change failed; reloading in full");
            *state = PolicyState::Unknown;
            None
        }
    }
}

/// Whether `policy` holds under a quarter of the prefixes the maps were
/// sized for (cheap: the sizes are only computed then).
fn shrank(policy: &Policy, sized_for: usize) -> bool {
    (policy.v4.len() + policy.v6.len()).saturating_mul(4) < sized_for
}

/// Validates the config at `path` and, only if it is valid, puts it in
/// force with [`apply::apply`]. `interfaces` (ifindex → name) loses the
/// interfaces the config drops, which are detached here; those it adds are
/// attached by the caller once the maps hold the new policy.
pub(super) fn full_reload(
    loaded: &mut Loaded,
    state: &mut PolicyState,
    current: &RunConfig,
    path: &Path,
    options: &LoadOptions,
    interfaces: &mut HashMap<u32, String>,
) -> Result<Reloaded, ApplyError> {
    // The old state is rebuilt: its index is dropped first so a large list
    // is not held twice (keeping the masks it left for the next sync to
    // clear). The policy in force is kept: guards that change ports keep
    // their old verdicts until the switch (see `kernel::sync`), and a
    // failed sync is undone with it.
    let prior = state.take_prior();
    let candidate = match validate(current, path, options) {
        Ok(c) => c,
        Err(e) => {
            *state = prior.restore();
            return Err(e);
        }
    };
    let moving: Vec<String> = interfaces
        .values()
        .filter(|name| current.interfaces.contains(name) && candidate.run.interfaces.contains(name))
        .cloned()
        .collect();
    let Applied {
        run,
        labels,
        stats,
        outcome,
    } = apply::apply(loaded, state, candidate, prior, &moving, current.xdp_mode)?;
    info!(
        written = stats.written,
        removed = stats.removed,
        unchanged = stats.unchanged,
        "config reloaded"
    );
    interfaces.retain(|_, name| run.interfaces.contains(name));
    loaded.prune(&run.interfaces);
    let labels = LabelState {
        interfaces: interfaces.clone(),
        ..labels
    };
    Ok(Reloaded {
        run,
        labels,
        refresh_slots: true,
        unmoved: outcome.unmoved(),
    })
}

/// Loads and validates the config at `path`, checks the devices it adds,
/// and compiles it (nothing in the kernel changes).
fn validate(current: &RunConfig, path: &Path, options: &LoadOptions) -> Result<Candidate, ApplyError> {
    let (new, index) = Config::load_indexed_with(path, options).map_err(ApplyError::Invalid)?;
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
        netdev::check_ethernet(iface).map_err(ApplyError::Device)?;
    }
    Ok(Candidate::compile(new, index))
}
