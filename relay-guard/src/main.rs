//! The `relay-guard` binary: parse the command line, install tracing, dispatch.
use clap::Parser as _;
use relay_guard::{cli::Cli, commands};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Two workers: a reload (which can take seconds on a large list) runs on
    // one while /metrics keeps answering on the other.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: failed to start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(commands::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
