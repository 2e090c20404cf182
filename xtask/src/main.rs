//! `cargo xtask`: set-up, build, run, test and bench for relay-guard.
//!
//! Every command first makes sure the machine has what it needs (nightly
//! `rust-src`, bpf-linker, and for tests the Debian tools), installing what is
//! missing and saying so; a second run does no extra work.
mod bench;
mod build_ebpf;
mod image;
mod run;
mod test;
mod toolchain;
mod utils;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "relay-guard's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (nightly rust-src, bpf-linker), then build the
    /// XDP program and the agent that embeds it.
    BuildEbpf(build_ebpf::Options),
    /// Build, then run the agent as root on an interface.
    Run(run::Options),
    /// Install what is missing, then run every test: unit tests, then the
    /// privileged ones (real XDP in network namespaces) as root.
    Test(test::Options),
    /// Install the peers (xdp-filter, nftables, ipset, trafgen, ...), then
    /// measure relay-guard against them and write docs/benchmarks.{md,png}.
    Bench(bench::Options),
    /// Build the OCI image the Kubernetes DaemonSet runs (static agent on an
    /// empty base, reproducible) as an OCI layout directory.
    Image(image::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildEbpf(o) => build_ebpf::build(&o).map(|_| ()),
        Command::Run(o) => run::run(&o),
        Command::Test(o) => test::test(&o),
        Command::Bench(o) => bench::bench(&o),
        Command::Image(o) => image::image(&o),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
