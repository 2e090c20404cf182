//! Command line (clap derive): the doc comments are the `--help` text.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

/// relay-guard: closes SMTP ports at the NIC (XDP) to every source that is not
/// on an allowlist, and exports drop counters to Prometheus.
#[derive(Debug, Parser)]
#[command(name = "relay-guard", version)]
pub struct Cli {
    /// Config file (TOML).
    #[arg(long, short = 'c', global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it to every configured interface, keep its
    /// maps in step with the config (SIGHUP reloads), and serve metrics.
    Run {
        /// Serve metrics on ADDR:PORT instead of the config's metrics_listen
        /// (for a DaemonSet: the node's address, `$(NODE_IP):10947`).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Validate the config and its list files; print every error with file and
    /// line. Exit 0 when valid, 1 when not. Needs no privileges.
    CheckConfig {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the XDP program from every interface and delete every pin under
    /// the config's pin_dir. Refuses while an agent runs with that pin_dir.
    Detach,
    /// Show what the kernel holds for this config's pin_dir: attached
    /// interfaces, mode, guarded ports, prefix counts and counters, read from
    /// the pinned maps (works while the agent is down), and whether they match
    /// the config.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain the verdict for a source address and destination port: the
    /// guard and the prefix that decide it, from the config (file and line)
    /// and from the kernel maps. Exits 1 when the two differ.
    Explain {
        /// Source address (IPv4 or IPv6).
        addr: std::net::IpAddr,
        /// Destination TCP port.
        port: u16,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the sources dropped most often (from the kernel's blocked-source map).
    Top {
        /// How many sources to show.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Test an SMTP server for open relay: the 16 probes of nmap's
    /// smtp-open-relay and Metasploit's smtp_relay, each carried to the end
    /// of DATA, with STARTTLS where offered (certificate not verified: this
    /// is a probe). Exit 0: nothing relayed, every probe refused; 3: at least
    /// one probe relayed; 4: nothing relayed but not everything could be
    /// tested (closed, unreachable, timeout, TLS error, 4xx, XCLIENT
    /// refused); 1: bad arguments. Run it from outside the server's
    /// networks: a test from a trusted address proves little.
    Relaytest {
        /// The server: a host name or an IP address.
        host: String,
        /// Port to test (repeat for more). Port 465 is TLS at connect.
        #[arg(long = "port", short = 'p', value_name = "N", default_values_t = crate::config::DEFAULT_PORTS)]
        ports: Vec<u16>,
        /// Domain of the probes' senders.
        #[arg(long, value_name = "D", default_value = crate::relaytest::DEFAULT_FROM_DOMAIN)]
        from_domain: String,
        /// Domain of the probes' recipients (default reserved, RFC 2606: a
        /// relay that accepts delivers nothing).
        #[arg(long, value_name = "D", default_value = crate::relaytest::DEFAULT_TO_DOMAIN)]
        to_domain: String,
        /// Timeout of each step (connect, each reply, TLS handshake), e.g. "10s".
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::config::relaytest::parse_duration)]
        timeout: std::time::Duration,
        /// Ask the server (Postfix smtpd_authorized_xclient_hosts) to judge
        /// each session as coming from this address (XCLIENT).
        #[arg(long, value_name = "ADDR")]
        xclient: Option<std::net::IpAddr>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ban a source (an address, or ADDR/LEN) from a [[ban]] section's ports
    /// now, in the pinned maps (the agent need not run; it takes the ban into
    /// its saved list). Without --for, the section's ban_time, doubled for
    /// each earlier ban of the prefix.
    Ban {
        /// Address or prefix, e.g. 203.0.113.7 or 2001:db8:1:2::/64.
        target: String,
        /// How long, e.g. 90s, 10m, 1h, 1w.
        #[arg(long = "for", value_name = "DURATION")]
        length: Option<String>,
        /// The [[ban]] section (needed when the config has several).
        #[arg(long = "ban", value_name = "NAME")]
        ban: Option<String>,
    },
    /// Lift the ban of exactly this address or prefix (every section, or
    /// --ban's). Exits 1 when it was not banned.
    Unban {
        target: String,
        #[arg(long = "ban", value_name = "NAME")]
        ban: Option<String>,
    },
    /// List the bans in force: prefix, ban section, failures, expiry, times banned.
    Bans {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
