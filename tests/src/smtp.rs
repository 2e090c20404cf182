//! Real SMTP software across the lab: Postfix's `smtp-sink` as the server
//! (one process per address and port, each dumping every message it takes
//! to its own directory so the test can count them by client address), and
//! `swaks` and Postfix's `smtp-source` as clients.
//!
//! `swaks` binds its source address itself (`--local-interface`).
//! `smtp-source` cannot, so [`smtp_source`] first points the client's host
//! route to the server at the wanted source (`ip route replace … src …`).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use crate::{
    daemon::{Daemon, listening},
    lab::Lab,
    netns::NetNs,
};

/// The ports relay-guard guards by default: SMTP relay, submissions (465,
/// implicit TLS in real life) and submission (587).
pub const SMTP_PORTS: [u16; 3] = [25, 465, 587];
pub const MAIL_FROM: &str = "sender@example.org";
pub const RCPT_TO: &str = "postmaster@example.com";
pub const HELO: &str = "client.example.net";

/// `203.0.113.1:25` or `[2001:db8:1::1]:25`.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

struct Sink {
    addr: IpAddr,
    port: u16,
    dump: PathBuf,
    daemon: Daemon,
}

/// `smtp-sink` on every (address, port) in a namespace. Killed in `Drop`.
pub struct SmtpSink {
    sinks: Vec<Sink>,
}

impl SmtpSink {
    /// Starts one `smtp-sink` per address and port inside `ns`, keeping dumps
    /// and logs under `dir`, and waits until each one listens.
    pub fn start(ns: &NetNs, dir: &Path, addrs: &[IpAddr], ports: &[u16]) -> SmtpSink {
        let mut sinks = Vec::new();
        for &addr in addrs {
            for &port in ports {
                let fam = if addr.is_ipv6() { "v6" } else { "v4" };
                let dump = dir.join(format!("sink-{fam}-{port}"));
                std::fs::create_dir_all(&dump).expect("create dump dir");
                let ep = endpoint(addr, port);
                // -u root: smtp-sink insists on a user to switch to when it
                // runs as root; -d: one file per message, named msg.<random>.
                let template = format!("{}/msg.", dump.display());
                let daemon = Daemon::spawn(
                    ns,
                    &[
                        "smtp-sink",
                        "-u",
                        "root",
                        "-h",
                        "sink.example.com",
                        "-d",
                        &template,
                        &ep,
                        "64",
                    ],
                    dir.join(format!("sink-{fam}-{port}.log")),
                );
                sinks.push(Sink {
                    addr,
                    port,
                    dump,
                    daemon,
                });
            }
        }
        for s in &mut sinks {
            let ep = endpoint(s.addr, s.port);
            s.daemon
                .wait_until(Duration::from_secs(10), "listening", || listening(ns, &ep));
        }
        SmtpSink { sinks }
    }

    /// Messages the sink on `port` (of `src`'s family) took from `src`,
    /// counted from its dump files' `X-Client-Addr` header.
    pub fn messages(&mut self, port: u16, src: &str) -> u64 {
        let v6 = src.contains(':');
        let want = if v6 {
            format!("X-Client-Addr: ipv6:{src}")
        } else {
            format!("X-Client-Addr: {src}")
        };
        let mut n = 0;
        for s in &mut self.sinks {
            s.daemon.assert_running();
            if s.port != port || s.addr.is_ipv6() != v6 {
                continue;
            }
            for f in dump_files(&s.dump) {
                if std::fs::read_to_string(&f)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l == want)
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Messages taken over all sinks, from anyone.
    pub fn total(&self) -> usize {
        self.sinks.iter().map(|s| dump_files(&s.dump).len()).sum()
    }
}

fn dump_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// A finished client run: exit status and stdout + stderr.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub output: String,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// A finished command's status, and its stdout followed by its stderr.
    pub fn of(out: std::process::Output) -> Run {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Run {
            status: out.status,
            output,
        }
    }
}

fn run_in(ns: &NetNs, args: &[&str]) -> Run {
    Run::of(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {args:?}: {e}")),
    )
}

/// Whether swaks can speak IPv6 (it needs the Perl module IO::Socket::INET6,
/// only a Recommends of the swaks package). Like `require::privileged`: true
/// when it can; otherwise panics under `CI=true`, else prints `skipping`.
#[must_use]
pub fn swaks_speaks_ipv6(test: &str) -> bool {
    let ok = Command::new("perl")
        .args(["-MIO::Socket::INET6", "-e", "1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    crate::require::skip(
        test,
        "swaks cannot speak IPv6: Perl module IO::Socket::INET6 missing (apt-get install libio-socket-inet6-perl)",
    );
    false
}

/// One message with `swaks` from `src` (bound with `--local-interface`) to
/// `dst:port`, inside `ns`. `timeout_s` bounds the connect and every reply.
pub fn swaks(ns: &NetNs, src: &str, dst: IpAddr, port: u16, timeout_s: u32) -> Run {
    let dst = dst.to_string();
    let port = port.to_string();
    let timeout = timeout_s.to_string();
    let subject = format!("relay-guard test from {src} to port {port}");
    run_in(
        ns,
        &[
            "swaks",
            "--server",
            &dst,
            "--port",
            &port,
            "--local-interface",
            src,
            "--timeout",
            &timeout,
            "--helo",
            HELO,
            "--from",
            MAIL_FROM,
            "--to",
            RCPT_TO,
            "--header",
            &format!("Subject: {subject}"),
        ],
    )
}

/// Makes connections from the lab's client to the server address of `src`'s
/// family leave from `src`, for programs that cannot bind a source address:
/// `ip route replace <server>/32|128 dev <client_if> src <src>`. Calls for
/// different sources of one family must not overlap in time.
pub fn prefer_source(lab: &Lab, src: &str) {
    let dst = Lab::server_addr_for(src);
    let (fam, plen) = if dst.is_ipv6() { ("-6", 128) } else { ("-4", 32) };
    lab.client.ip(&[
        fam,
        "route",
        "replace",
        &format!("{dst}/{plen}"),
        "dev",
        &lab.client_if,
        "src",
        src,
    ]);
}

/// `smtp-source -c -m messages -s sessions` from `src` (see
/// [`prefer_source`], with the same caveat) to the server on `port`.
pub fn smtp_source(lab: &Lab, src: &str, port: u16, messages: u32, sessions: u32) -> Run {
    prefer_source(lab, src);
    let target = format!("inet:{}", endpoint(Lab::server_addr_for(src), port));
    run_in(
        &lab.client,
        &[
            "smtp-source",
            "-c",
            "-m",
            &messages.to_string(),
            "-s",
            &sessions.to_string(),
            "-M",
            HELO,
            "-f",
            MAIL_FROM,
            "-t",
            RCPT_TO,
            "-S",
            &format!("relay-guard test from {src} to port {port}"),
            &target,
        ],
    )
}

/// Sets `net.ipv4.tcp_syn_retries` (which IPv6 uses too) in `ns`, so that a
/// connect whose SYNs are dropped fails with ETIMEDOUT after a few seconds
/// instead of two minutes: `smtp-source` has no connect timeout of its own.
pub fn set_syn_retries(ns: &NetNs, retries: u8) {
    ns.exec(&[
        "sh",
        "-c",
        &format!("echo {retries} > /proc/sys/net/ipv4/tcp_syn_retries"),
    ]);
    let now = ns.exec(&["cat", "/proc/sys/net/ipv4/tcp_syn_retries"]);
    assert_eq!(
        now.trim(),
        retries.to_string(),
        "tcp_syn_retries not set in {}",
        ns.name
    );
}
