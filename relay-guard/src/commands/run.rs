//! `relay-guard run`: the agent (see [`crate::agent`]) until SIGTERM or
//! SIGINT, which it handles itself; SIGHUP and file changes reload.
use std::{net::SocketAddr, path::Path};

pub async fn execute(config_path: &Path, metrics_listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let options = crate::config::LoadOptions { metrics_listen };
    crate::agent::run(config_path, options, std::future::pending()).await
}
