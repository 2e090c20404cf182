//! One module per subcommand (bpfman's `cli/` shape). These are the CLI
//! boundary: they print, and return anyhow errors with context.
pub mod check_config;
pub mod run;

use crate::cli::{Cli, Command};

/// Runs the parsed command line; returns the process exit code.
pub async fn execute(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run => run::execute(&cli.config).await.map(|()| 0),
        Command::CheckConfig { json } => Ok(check_config::execute(&cli.config, json)),
    }
}
