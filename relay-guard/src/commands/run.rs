//! `relay-guard run`: the agent (see [`crate::agent`]) until SIGTERM or
//! SIGINT, which it handles itself; SIGHUP and file changes reload.
use std::{net::SocketAddr, path::Path};

pub async fn execute(config_path: &Path, metrics_listen: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = metrics_listen {
        let _ = crate::config::METRICS_LISTEN_OVERRIDE.set(addr);
    }
    crate::agent::run(config_path, std::future::pending()).await
}
