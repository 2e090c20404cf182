//! The one sequence that puts a config in force, at start and at every full
//! reload (a list-only edit takes the delta path first, `reload`):
//!
//! 1. **compile** ([`Candidate::compile`]): the policy, the metrics labels
//!    and the settings the agent runs by ([`RunConfig`]); the kernel is not
//!    touched, and the config's entries are dropped with it (the policy and
//!    the list index hold them).
//! 2. **limits**: whether the set of maps in force can hold the policy
//!    beside the old one (`Sizes::resize_for`, then `kernel::sync`'s own
//!    limits and dry run), else a new set sized for it.
//! 3. **sync**: written into the set in force as a diff, or into the new
//!    set while the old one guards.
//! 4. **attach**: a new set takes over the interfaces attached now
//!    (`Loaded::take_over`); one that does not move is named in the
//!    [`Outcome`] for the caller to retry and report. The caller
//!    then attaches what the config adds (`Agent::guard_interfaces`).
//! 5. **commit**: the pins name the set, and the state for later deltas
//!    becomes [`PolicyState::Live`].
//!
//! A failure is an [`ApplyError`], which says whether the set in force may
//! have been written ([`ApplyError::written`]); only then is the previous
//! policy written back (undo), and the state says what the kernel holds.
use tracing::{error, info, warn};

use crate::{
    agent::{incremental::Live, metrics::LabelState},
    config::{Config, ConfigErrors, RunConfig, XdpMode, lists::ListIndex},
    error::{LoadError, SyncError},
    kernel::{
        counters,
        loader::Loaded,
        sizes::Sizes,
        sync::{self, Shadow, SyncStats},
    },
    policy::{Policy, bans::Allowed},
};

/// What the agent knows of the policy the kernel holds.
pub enum PolicyState {
    /// Applied in full or by deltas: the list index, the compiled policy and
    /// the kernel's tables, so the next list-only edit is a delta.
    Live(Box<Live>),
    /// The policy the kernel holds, without its index: a full apply failed
    /// (and was undone to it). The next reload is a full one.
    InForce(Policy),
    /// Not known: before the first apply, or after a delta that failed
    /// part-way. The next apply diffs against what the kernel holds.
    Unknown,
}

/// What a full apply keeps of the state before it: the policy in force and
/// the masks its sync left to clear. The rest (the list index) is dropped
/// before the new config is read, so a large list is not held twice.
pub struct Prior {
    pub policy: Option<Policy>,
    pub stale: Vec<u16>,
}

impl PolicyState {
    /// Takes what a full apply needs ([`Prior`]); the state is
    /// [`PolicyState::Unknown`] until [`Prior::restore`] or a commit.
    pub fn take_prior(&mut self) -> Prior {
        match std::mem::replace(self, PolicyState::Unknown) {
            PolicyState::Live(l) => Prior {
                policy: Some(l.policy),
                stale: l.shadow.stale,
            },
            PolicyState::InForce(p) => Prior {
                policy: Some(p),
                stale: Vec::new(),
            },
            PolicyState::Unknown => Prior {
                policy: None,
                stale: Vec::new(),
            },
        }
    }

    /// The guards' explicit allows, for ban exemptions; `None` without a
    /// list index (then nothing is exempt, as `policy::bans::NoAllowlist`).
    pub fn allows<'a>(&'a self, guards: &'a [crate::config::RunGuard]) -> Option<super::bans::GuardAllows<'a>> {
        match self {
            PolicyState::Live(l) => Some(super::bans::GuardAllows {
                index: &l.index,
                guards,
            }),
            _ => None,
        }
    }

    /// [`Self::allows`], or nothing allowed.
    pub fn allowed<'a>(&'a self, guards: &'a [crate::config::RunGuard]) -> Box<dyn Allowed + 'a> {
        match self.allows(guards) {
            Some(a) => Box::new(a),
            None => Box::new(crate::policy::bans::NoAllowlist),
        }
    }
}

impl Prior {
    /// Nothing in force yet (the start).
    pub fn none() -> Prior {
        Prior {
            policy: None,
            stale: Vec::new(),
        }
    }

    /// The state when nothing new was applied: the policy in force, if known.
    pub fn restore(self) -> PolicyState {
        self.policy.map_or(PolicyState::Unknown, PolicyState::InForce)
    }
}

/// A validated config, compiled: step 1, before the kernel is touched.
pub struct Candidate {
    pub run: RunConfig,
    pub index: ListIndex,
    pub policy: Policy,
    /// Guard names (config order) and allow counts, for the labels.
    labels: LabelState,
}

impl Candidate {
    /// Compiles `cfg`; its entries are dropped here.
    pub fn compile(cfg: Config, index: ListIndex) -> Candidate {
        let policy = Policy::compile(&cfg);
        let labels = LabelState::new(&cfg, Default::default(), counters::Slots::default());
        Candidate {
            run: cfg.into_run(),
            index,
            policy,
            labels,
        }
    }
}

/// A config in force.
pub struct Applied {
    pub run: RunConfig,
    /// The guards on their kernel bits and the allow counts; the caller adds
    /// interfaces, counter slots and bans.
    pub labels: LabelState,
    pub stats: SyncStats,
    pub outcome: Outcome,
}

/// Where the policy was written.
pub enum Outcome {
    /// Into the set of maps in force.
    InPlace,
    /// Into a new set of maps sized for the policy, which the pins name now.
    Resized {
        /// Interfaces that could not be moved to it: they still run the
        /// previous program (and policy) until attached again.
        unmoved: Vec<(String, LoadError)>,
    },
}

impl Outcome {
    /// The interfaces a resize could not move.
    pub fn unmoved(self) -> Vec<(String, LoadError)> {
        match self {
            Outcome::InPlace => Vec::new(),
            Outcome::Resized { unmoved, .. } => unmoved,
        }
    }
}

/// Why an apply did not put the config in force.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The config did not validate: nothing was written.
    #[error("invalid config:\n{0}")]
    Invalid(ConfigErrors),
    /// A device the config adds cannot be guarded: nothing was written.
    #[error("invalid config")]
    Device(#[source] LoadError),
    /// Syncing the set in force failed. It may hold part of the new policy
    /// when a map operation failed ([`ApplyError::written`]); a policy over
    /// the limits is refused before anything is written.
    #[error(transparent)]
    Sync(SyncError),
    /// A new set of maps (a resize) could not be loaded: the set in force
    /// was not written.
    #[error("failed to load a new set of maps")]
    NewSet(#[source] LoadError),
    /// Filling a new set failed: it is discarded, the set in force was not
    /// written.
    #[error(transparent)]
    Fill(SyncError),
    /// The filled set could not be named by the pins (at start).
    #[error("failed to pin the maps")]
    Publish(#[source] LoadError),
}

impl ApplyError {
    /// Whether the set in force may hold part of the new policy (then the
    /// previous one is written back). Counted conservatively: a failed map
    /// read before the first write counts too, and the undo then writes
    /// nothing.
    pub fn written(&self) -> bool {
        matches!(self, ApplyError::Sync(SyncError::Map { .. }))
    }
}

/// Steps 2 to 5 for `candidate` (see the module documentation), over the
/// `prior` policy in force. `moving`: the interfaces attached now that stay
/// configured (a new set takes them over); `mode` as they were attached.
/// On failure `state` says what the kernel holds.
pub fn apply(
    loaded: &mut Loaded,
    state: &mut PolicyState,
    candidate: Candidate,
    prior: Prior,
    moving: &[String],
    mode: XdpMode,
) -> Result<Applied, ApplyError> {
    let Candidate {
        run,
        index,
        policy,
        mut labels,
    } = candidate;
    let synced = match sync_sized(loaded, &policy, &prior, moving, mode) {
        Ok(s) => s,
        Err(e) => {
            if e.written()
                && let Some(old) = &prior.policy
            {
                // Written part-way: back to the policy in force.
                match sync::apply_full(&mut loaded.maps, old, None, &[]) {
                    Ok(_) => warn!("the failed sync was undone: the kernel holds the previous policy"),
                    Err(e2) => error!("undoing the failed sync failed too: {e2:#}"),
                }
            }
            *state = prior.restore();
            return Err(e);
        }
    };
    drop(prior);
    loaded.publish().map_err(ApplyError::Publish)?;
    let Synced {
        stats,
        shadow,
        policy,
        outcome,
    } = synced;
    labels.guards = policy.names_by_bit(&labels.guards);
    let names = run.guards.iter().map(|g| g.name.clone()).collect();
    *state = PolicyState::Live(Box::new(Live::with_names(names, index, policy, shadow)));
    Ok(Applied {
        run,
        labels,
        stats,
        outcome,
    })
}

/// What steps 2 to 4 did.
struct Synced {
    stats: SyncStats,
    shadow: Shadow,
    /// As written (guards on their kernel bits).
    policy: Policy,
    outcome: Outcome,
}

/// Makes the kernel hold `policy`: in place when the maps of the set in
/// force fit it, else in a new set sized for it, filled while the old one
/// guards, then handed the `moving` interfaces (see `Loaded::take_over`).
/// A set far larger than the policy needs is replaced the same way, so a
/// config that shrank gives the memory back. Either way all or nothing: a
/// failure before the hand-over leaves the set in force as it was.
fn sync_sized(
    loaded: &mut Loaded,
    policy: &Policy,
    prior: &Prior,
    moving: &[String],
    mode: XdpMode,
) -> Result<Synced, ApplyError> {
    let have = Sizes::of(&loaded.maps);
    let sizes = match Sizes::resize_for(&loaded.maps, policy) {
        Some(s) => s,
        None => match sync::apply_full(&mut loaded.maps, policy, prior.policy.as_ref(), &prior.stale) {
            // The old and the new policy do not fit side by side: a new set
            // twice as large, where only the new one is written.
            Err(SyncError::Capacity { what }) if have != Sizes::MAX => {
                info!(reason = %what, "the maps are too small for an update in place");
                have.doubled().max(Sizes::for_policy(policy))
            }
            r => {
                let (stats, shadow, policy) = r.map_err(ApplyError::Sync)?;
                return Ok(Synced {
                    stats,
                    shadow,
                    policy,
                    outcome: Outcome::InPlace,
                });
            }
        },
    };
    info!(from = %have, to = %sizes, "resizing the maps: filling a new set beside the one in force");
    let mut new = loaded.new_set(sizes).map_err(ApplyError::NewSet)?;
    let (stats, shadow, policy) = match sync::apply_full(&mut new.maps, policy, None, &[]) {
        Ok(r) => r,
        Err(e) => {
            drop(new);
            loaded.discard_unpublished();
            return Err(ApplyError::Fill(e));
        }
    };
    let unmoved = loaded.take_over(new, moving, mode);
    for (iface, e) in &unmoved {
        error!(interface = %iface, error = %e, "could not move the interface to the resized maps: it keeps the previous policy; attached again at the next check of the interfaces");
    }
    info!(sizes = %sizes, "maps resized: the new set is in force");
    Ok(Synced {
        stats,
        shadow,
        policy,
        outcome: Outcome::Resized { unmoved },
    })
}
