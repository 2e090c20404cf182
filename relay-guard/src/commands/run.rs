//! `relay-guard run`: the agent (see [`crate::agent`]) until SIGTERM or
//! SIGINT, which it handles itself; SIGHUP and file changes reload.
use std::path::Path;

pub async fn execute(config_path: &Path) -> anyhow::Result<()> {
    crate::agent::run(config_path, std::future::pending()).await
}
