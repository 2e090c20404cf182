//! One module per subcommand (bpfman's `cli/` shape). These are the CLI
//! boundary: they print, and return anyhow errors with context.
pub mod check_config;
pub mod detach;
pub mod explain;
pub mod run;
pub mod status;
pub mod top;

use crate::cli::{Cli, Command};

/// Runs the parsed command line; returns the process exit code.
pub async fn execute(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run => run::execute(&cli.config).await.map(|()| 0),
        Command::CheckConfig { json } => Ok(check_config::execute(&cli.config, json)),
        Command::Detach => detach::execute(&cli.config).map(|()| 0),
        Command::Status { json } => status::execute(&cli.config, json).map(|()| 0),
        Command::Explain { addr, port, json } => explain::execute(&cli.config, addr, port, json),
        Command::Top { limit, json } => top::execute(&cli.config, limit, json).map(|()| 0),
    }
}

/// The `pin_dir` a config names. status, explain, top and detach need only
/// this from the config, so they work with a config whose list files are
/// gone, and fall back to the default when the file cannot be read at all.
pub fn pin_dir_of(config_path: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    #[derive(serde::Deserialize)]
    struct PinDirOnly {
        pin_dir: Option<String>,
    }
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("failed to read config {}", config_path.display()))?;
    let v: PinDirOnly = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| t.try_into().ok())
        .unwrap_or(PinDirOnly { pin_dir: None });
    Ok(v.pin_dir
        .map_or_else(|| crate::config::DEFAULT_PIN_DIR.into(), Into::into))
}
