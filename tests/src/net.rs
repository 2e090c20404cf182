//! TCP peers for the tests: a banner server (an SMTP-like greeting on accept),
//! a client that binds its source before connecting, a tiny HTTP GET, and
//! nftables counters that record what the client really sent.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::NetNs;

pub const BANNER: &str = "220 relay-guard-test ESMTP\r\n";

/// Listens on `[::]:port` (IPv4 and IPv6) for each port, in a namespace,
/// answering every connection with [`BANNER`]. Stopped and joined in `Drop`.
pub struct BannerServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Connections accepted, over all ports.
    pub accepted: Arc<AtomicU64>,
}

impl BannerServer {
    pub fn start(ns: &NetNs, ports: &[u16]) -> BannerServer {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for &port in ports {
            let listener: TcpListener = ns.run(move || {
                let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).expect("socket");
                s.set_only_v6(false).expect("dual stack");
                s.set_reuse_address(true).expect("SO_REUSEADDR");
                s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())
                    .unwrap_or_else(|e| panic!("bind [::]:{port}: {e}"));
                s.listen(128).expect("listen");
                s.set_nonblocking(true).expect("nonblocking");
                s.into()
            });
            let stop = Arc::clone(&stop);
            let accepted = Arc::clone(&accepted);
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.write_all(BANNER.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        BannerServer {
            stop,
            threads,
            accepted,
        }
    }
}

impl Drop for BannerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connects from `src` (bound before connect) to `dst:port` inside `ns` and
/// reads the greeting. Err on timeout, refusal or a short read.
pub fn connect_banner(ns: &NetNs, src: IpAddr, dst: IpAddr, port: u16, timeout: Duration) -> std::io::Result<String> {
    ns.run(move || {
        let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&SocketAddr::new(dst, port).into(), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut stream: std::net::TcpStream = s.into();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        while !buf.ends_with(b"\r\n") {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
}

/// `GET path` over HTTP/1.0 from inside `ns`; the body, or None.
pub fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> Option<String> {
    let path = path.to_string();
    ns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        head.split_whitespace()
            .nth(1)
            .is_some_and(|c| c == "200")
            .then(|| body.to_string())
    })
}

/// Sums the samples of `name` whose labels include every pair in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if let Some(v) = rest.strip_prefix(' ') {
            ("", v)
        } else {
            continue;
        };
        if labels
            .iter()
            .all(|(k, v)| label_part.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// nftables counters in a namespace, in a table of their own: one rule a
/// (source, destination port), so a test counts exactly the TCP segments
/// that passed a hook: those a client sent ([`NftCounters::install`]), or
/// those that got past XDP into a server's stack
/// ([`NftCounters::behind_xdp`]).
pub struct NftCounters<'a> {
    ns: &'a NetNs,
    table: String,
}

/// The counters of what a client sent (the name the tests use for them).
pub type SentCounters<'a> = NftCounters<'a>;

/// Matches pure SYNs only (SYN set, ACK clear).
pub const PURE_SYNS: &str = "tcp flags & (syn | ack) == syn ";

impl<'a> NftCounters<'a> {
    /// Counts every TCP segment sent from `ns` (output hook).
    pub fn install(ns: &'a NetNs, sources: &[&str], ports: &[u16]) -> NftCounters<'a> {
        NftCounters::new(ns, "output", 0, sources, ports, "")
    }

    /// Counts pure SYNs sent from `ns`: when this equals
    /// [`NftCounters::install`]'s count for a source, it never got past the
    /// first handshake step.
    pub fn install_syns(ns: &'a NetNs, sources: &[&str], ports: &[u16]) -> NftCounters<'a> {
        NftCounters::new(ns, "output", 0, sources, ports, PURE_SYNS)
    }

    /// Pure SYNs that got past XDP into the stack of `ns` (input hook, ahead
    /// of any other filter).
    pub fn behind_xdp(ns: &'a NetNs, sources: &[&str], ports: &[u16]) -> NftCounters<'a> {
        NftCounters::new(ns, "input", -500, sources, ports, PURE_SYNS)
    }

    /// Counters on `hook` at `priority` of what `matching` (nft match
    /// expressions, each followed by a space) selects.
    pub fn new(
        ns: &'a NetNs,
        hook: &str,
        priority: i32,
        sources: &[&str],
        ports: &[u16],
        matching: &str,
    ) -> NftCounters<'a> {
        let table = crate::netns::unique("rgnft").replace('-', "_");
        let mut rules = format!(
            "table inet {table} {{\n chain c {{\n  type filter hook {hook} priority {priority}; policy accept;\n"
        );
        for src in sources {
            let fam = if src.contains(':') { "ip6" } else { "ip" };
            for port in ports {
                rules += &format!("  {fam} saddr {src} tcp dport {port} {matching}counter comment \"{src} {port}\"\n");
            }
        }
        rules += " }\n}\n";
        let file = std::env::temp_dir().join(format!("{}.nft", crate::netns::unique("rg-nft")));
        std::fs::write(&file, rules).expect("write nft rules");
        ns.exec(&["nft", "-f", file.to_str().expect("utf-8")]);
        let _ = std::fs::remove_file(&file);
        NftCounters { ns, table }
    }

    /// Packets from `src` to `port` counted so far.
    pub fn packets(&self, src: &str, port: u16) -> u64 {
        let json = self.ns.exec(&["nft", "-j", "list", "table", "inet", &self.table]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("nft -j output is JSON");
        let want = format!("{src} {port}");
        for item in v["nftables"].as_array().expect("nftables array") {
            let rule = &item["rule"];
            if rule["comment"].as_str() == Some(want.as_str()) {
                for e in rule["expr"].as_array().expect("expr array") {
                    if let Some(p) = e["counter"]["packets"].as_u64() {
                        return p;
                    }
                }
            }
        }
        panic!("no nft counter for {want} in table {}", self.table)
    }
}
