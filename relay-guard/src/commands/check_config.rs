//! `relay-guard check-config`: validate without touching the kernel,
//! including every kernel limit a sync checks before it writes (with the
//! count and the limit).
use std::path::Path;

use crate::{
    config::{Config, ConfigFile, LoadOptions, read_config_text},
    kernel::netdev,
    policy::Policy,
};

/// Prints the verdict; returns the exit code (0 valid, 1 invalid).
pub fn execute(path: &Path, json: bool) -> i32 {
    // Read and parsed once, for the verdict and for the warning below.
    let (loaded, unnamed) = match read_config_text(path) {
        Ok(text) => {
            let file = ConfigFile::parse(path, &text);
            (file.validate(&LoadOptions::default()), file.unnamed_guards())
        }
        Err(e) => (Err(e), 0),
    };
    match loaded {
        Ok(cfg) if refused(&cfg).is_empty() => {
            let policy = Policy::compile(&cfg);
            let over = policy.limits();
            if !over.is_empty() {
                if json {
                    let errs: Vec<_> = over
                        .iter()
                        .map(|l| serde_json::json!({"limit": l.what, "count": l.count, "max": l.limit, "error": l.to_string()}))
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"valid": false, "config": path, "errors": errs})
                    );
                } else {
                    for l in &over {
                        eprintln!("{}: does not fit the kernel tables: {l}", path.display());
                    }
                    eprintln!("{}: {} error(s)", path.display(), over.len());
                }
                return 1;
            }
            // A log file others can write: any line there is believed
            // (SPEC.md "Who may aim a ban").
            for b in &cfg.bans {
                for f in &b.log_files {
                    if let Some(risk) = crate::logwatch::tail::write_risk(f) {
                        eprintln!("{}: warning: ban `{}`: {risk}", path.display(), b.name);
                    }
                }
            }
            if unnamed > 1 {
                eprintln!(
                    "{}: warning: {unnamed} guards have no `name`: their default names (guard<N>) follow their place in the file, so inserting, removing or reordering guards renames them (metrics labels); give each guard a name",
                    path.display()
                );
            }
            // The agent guards with a state_dir it refuses, but neither
            // restores nor saves bans there (agent::bans::check_state_dir).
            if let Err(e) = crate::agent::bans::check_state_dir(&cfg.state_dir) {
                eprintln!("{}: warning: {e}", path.display());
            }
            if json {
                let guards: Vec<_> = cfg
                    .guards
                    .iter()
                    .map(|g| {
                        let (v4, v6) = Policy::allow_counts(g);
                        serde_json::json!({"name": g.name, "ports": g.ports, "entries": g.entries.len(), "allow_v4": v4, "allow_v6": v6})
                    })
                    .collect();
                let out = serde_json::json!({
                    "valid": true, "config": path, "guards": guards,
                    "prefixes_v4": policy.v4.len(), "prefixes_v6": policy.v6.len(),
                });
                println!("{out}");
            } else {
                println!(
                    "{}: OK: {} guard(s), {} guarded port(s), {} IPv4 and {} IPv6 prefixes",
                    path.display(),
                    cfg.guards.len(),
                    policy.ports.len(),
                    policy.v4.len(),
                    policy.v6.len()
                );
            }
            0
        }
        Ok(cfg) => {
            // Devices present here that cannot be guarded (no Ethernet
            // framing). One that does not exist here is not checked: the
            // agent checks it when it appears.
            let refused = refused(&cfg);
            if json {
                let errs: Vec<_> = refused
                    .iter()
                    .map(|e| serde_json::json!({"file": path, "line": null, "error": e}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "config": path, "errors": errs})
                );
            } else {
                for e in &refused {
                    eprintln!("{}: {e}", path.display());
                }
                eprintln!("{}: {} error(s)", path.display(), refused.len());
            }
            1
        }
        Err(errors) => {
            if json {
                let errs: Vec<_> = errors
                    .0
                    .iter()
                    .map(|e| serde_json::json!({"file": e.file, "line": e.line, "error": e.what}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "config": path, "errors": errs})
                );
            } else {
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            }
            1
        }
    }
}

/// Why each configured interface that exists here cannot be guarded.
fn refused(cfg: &Config) -> Vec<String> {
    cfg.interfaces
        .iter()
        .filter_map(|i| netdev::check_ethernet(i).err())
        .map(|e| e.to_string())
        .collect()
}
