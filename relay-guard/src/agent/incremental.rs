//! Reloads as deltas: when only list files changed, the agent validates and
//! applies just the edited lines instead of re-parsing, re-compiling and
//! re-diffing everything (a one-line edit of a 1,000,000-line list is then
//! a few milliseconds, not seconds).
//!
//! [`Live`] is what the agent keeps after a successful load: the
//! [`ListIndex`] (list bytes and every entry per guard), the compiled
//! [`Policy`], and the [`Shadow`] of the kernel's IPv4 tables. A delta goes:
//! changed lines → per-guard decisions that changed ([`ListIndex::changes`])
//! → policy keys whose mask changed (the changed networks and the stored
//! prefixes inside them, recomputed with the same semantics as
//! [`Policy::compile`]) → [`sync::apply_delta`]. A unit test checks that a
//! delta gives exactly the policy a full compile gives.
use std::{collections::BTreeSet, path::Path};

use ipnet::IpNet;
use relay_guard_common::AllowMask;

use crate::{
    config::{
        Action, Config, ConfigErrors,
        lists::{Change, ListIndex},
    },
    error::SyncError,
    kernel::{
        maps::Maps,
        sync::{self, Shadow, SyncStats},
    },
    policy::Policy,
};

/// What the agent keeps between reloads (see the module documentation).
pub struct Live {
    pub index: ListIndex,
    pub policy: Policy,
    pub shadow: Shadow,
    pub guard_names: Vec<String>,
    /// Per guard: allow entries (IPv4, IPv6), kept up to date by deltas.
    counts: Vec<(usize, usize)>,
    /// Compiled prefixes at the last full sync (when the maps were sized).
    pub sized_for: usize,
}

/// A delta reload that was applied.
#[derive(Debug)]
pub struct Applied {
    pub stats: SyncStats,
    /// Lines parsed (old and new regions of the edited files).
    pub lines: usize,
    /// Guard decisions that changed.
    pub changes: usize,
    /// Per guard: allow entries (IPv4, IPv6) now.
    pub allow_counts: Vec<(usize, usize)>,
}

impl Live {
    /// Tries a delta reload of `config_path`. `Ok(None)`: not applicable
    /// (the config file changed, a file is unreadable, or the edit is
    /// large); do a full reload. `Err(Invalid)`: the edit is invalid, nothing
    /// changed. `Err(Sync)`: the kernel is partly updated and this state is
    /// stale: drop it and do a full reload.
    pub fn reload(&mut self, maps: &mut Maps, config_path: &Path) -> Result<Option<Applied>, DeltaError> {
        let Some(pending) = self
            .index
            .changes(config_path, &self.guard_names)
            .map_err(DeltaError::Invalid)?
        else {
            return Ok(None);
        };
        let lines = pending.lines;
        let changes = pending.changes.clone();
        self.index.commit(pending);
        for &(g, net, before, after) in &changes {
            let (v4, v6) = &mut self.counts[g];
            let n = if net.addr().is_ipv4() { v4 } else { v6 };
            if before == Some(Action::Allow) {
                *n -= 1;
            }
            if after == Some(Action::Allow) {
                *n += 1;
            }
        }
        let (v4, v6) = policy_delta(&self.index, &mut self.policy, &changes);
        let stats = sync::apply_delta(maps, &mut self.shadow, &self.policy, &v4, &v6).map_err(DeltaError::Sync)?;
        Ok(Some(Applied {
            stats,
            lines,
            changes: changes.len(),
            allow_counts: self.counts.clone(),
        }))
    }

    /// Builds the state after a full load and sync.
    pub fn new(cfg: &Config, index: ListIndex, policy: Policy, shadow: Shadow) -> Live {
        Self::with_names(
            cfg.guards.iter().map(|g| g.name.clone()).collect(),
            index,
            policy,
            shadow,
        )
    }

    /// [`Live::new`], with the guards' names (in config order) in place of
    /// the config.
    pub fn with_names(guard_names: Vec<String>, index: ListIndex, policy: Policy, shadow: Shadow) -> Live {
        Live {
            counts: allow_counts(&index),
            sized_for: policy.v4.len() + policy.v6.len(),
            index,
            policy,
            shadow,
            guard_names,
        }
    }
}

/// The allow entries per guard and family (unique networks), as
/// `Policy::allow_counts` counts them on a full load.
pub(crate) fn allow_counts(index: &ListIndex) -> Vec<(usize, usize)> {
    index
        .guards
        .iter()
        .map(|entries| {
            let (mut v4, mut v6) = (0, 0);
            let mut prev: Option<IpNet> = None;
            for e in entries.iter().filter(|e| prev.replace(e.net) != Some(e.net)) {
                if e.action == Action::Allow {
                    if e.net.addr().is_ipv4() {
                        v4 += 1;
                    } else {
                        v6 += 1;
                    }
                }
            }
            (v4, v6)
        })
        .collect()
}

/// Why a delta reload did not apply.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("invalid config:\n{0}")]
    Invalid(ConfigErrors),
    #[error(transparent)]
    Sync(SyncError),
}

type V4Key = (u8, [u8; 4]);
type V6Key = (u8, [u8; 16]);

/// The mask a full compile gives the stored prefix `net`, if it is stored,
/// with guard `g` on bit `bits[g]` (positional when `bits` is shorter).
fn compiled(index: &ListIndex, net: &IpNet, bits: &[u8]) -> Option<AllowMask> {
    if !index.named(net) {
        return None;
    }
    let mut allow = 0u64;
    for g in 0..index.guards.len() {
        if index.decides(g, net) == Some(Action::Allow) {
            let bit = bits.get(g).map_or(g, |&b| usize::from(b));
            allow |= 1 << bit;
        }
    }
    Some(AllowMask { allow })
}

/// Updates `policy` for changed guard decisions; returns the IPv4 keys whose
/// value changed, and the IPv6 keys whose value changed.
pub fn policy_delta(index: &ListIndex, policy: &mut Policy, changes: &[Change]) -> (Vec<V4Key>, Vec<V6Key>) {
    let nets: BTreeSet<IpNet> = changes.iter().map(|c| c.1).collect();
    // A changed network and every stored prefix inside it may change.
    let mut dirty: BTreeSet<IpNet> = BTreeSet::new();
    for net in &nets {
        dirty.insert(*net);
        match net {
            IpNet::V4(n) => {
                let (lo, hi) = (n.network().octets(), n.broadcast().octets());
                for len in n.prefix_len() + 1..=32 {
                    for &(l, a) in policy.v4.range((len, lo)..=(len, hi)).map(|(k, _)| k) {
                        dirty.insert(IpNet::new(a.into(), l).expect("stored lengths are valid"));
                    }
                }
            }
            IpNet::V6(n) => {
                let (lo, hi) = (n.network().octets(), n.broadcast().octets());
                for len in n.prefix_len() + 1..=128 {
                    for &(l, a) in policy.v6.range((len, lo)..=(len, hi)).map(|(k, _)| k) {
                        dirty.insert(IpNet::new(a.into(), l).expect("stored lengths are valid"));
                    }
                }
            }
        }
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for net in dirty {
        let want = compiled(index, &net, &policy.bits);
        match net {
            IpNet::V4(n) => {
                let key = (n.prefix_len(), n.network().octets());
                let have = policy.v4.get(&key).copied();
                if have != want {
                    match want {
                        Some(m) => policy.v4.insert(key, m),
                        None => policy.v4.remove(&key),
                    };
                    v4.push(key);
                }
            }
            IpNet::V6(n) => {
                let key = (n.prefix_len(), n.network().octets());
                let have = policy.v6.get(&key).copied();
                if have != want {
                    match want {
                        Some(m) => policy.v6.insert(key, m),
                        None => policy.v6.remove(&key),
                    };
                    v6.push(key);
                }
            }
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests;
