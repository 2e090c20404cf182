//! A two-host lab: a server namespace and a client namespace joined by a veth
//! pair, with documentation addresses and static neighbours (no ARP/NDP
//! flakiness, as xdp-tools' test runner does).
//!
//! Server: 203.0.113.1/24 and 2001:db8:1::1/64 on `server_if`.
//! Client: 203.0.113.2/24 and 2001:db8:1::2/64, plus the source addresses
//! below, each usable by binding before connect.
use std::net::IpAddr;

use crate::netns::{NetNs, unique};

pub const SERVER_V4: &str = "203.0.113.1";
pub const SERVER_V6: &str = "2001:db8:1::1";
/// Client sources the tests allow or deny in their configs.
pub const ALLOWED_V4: &str = "192.0.2.10";
pub const DENIED_V4: &str = "198.51.100.20";
pub const ALLOWED_V6: &str = "2001:db8:a::10";
pub const DENIED_V6: &str = "2001:db8:d::20";
pub const SOURCES: [&str; 4] = [ALLOWED_V4, DENIED_V4, ALLOWED_V6, DENIED_V6];

pub const SERVER_MAC: &str = "02:72:67:00:00:01";
pub const CLIENT_MAC: &str = "02:72:67:00:00:02";

pub struct Lab {
    // Field order is drop order: client and server namespaces go last.
    pub server_if: String,
    pub client_if: String,
    pub client: NetNs,
    pub server: NetNs,
}

impl Lab {
    pub fn new() -> Lab {
        let server = NetNs::new("rgs");
        let client = NetNs::new("rgc");
        let lab = Lab {
            server_if: unique("rs"),
            client_if: unique("rc"),
            client,
            server,
        };
        lab.add_link();
        lab.configure_link();
        lab
    }

    /// Creates the veth pair (down, unaddressed): the server end appears in
    /// the server namespace, the client end in the client namespace.
    pub fn add_link(&self) {
        let (server, client) = (&self.server, &self.client);
        let (server_if, client_if) = (&self.server_if, &self.client_if);
        server.ip(&[
            "link",
            "add",
            server_if,
            "address",
            SERVER_MAC,
            "type",
            "veth",
            "peer",
            "name",
            client_if,
            "address",
            CLIENT_MAC,
            "netns",
            &client.name,
        ]);
    }

    /// Addresses, routes and static neighbours of the pair, and up: what
    /// [`Lab::new`] does after [`Lab::add_link`] (again after a test deleted
    /// and re-created the pair).
    pub fn configure_link(&self) {
        let (server, client) = (&self.server, &self.client);
        let (server_if, client_if) = (&self.server_if, &self.client_if);
        server.ip(&["addr", "add", "203.0.113.1/24", "dev", server_if]);
        server.ip(&["addr", "add", "2001:db8:1::1/64", "dev", server_if, "nodad"]);
        server.ip(&["link", "set", server_if, "up"]);
        client.ip(&["addr", "add", "203.0.113.2/24", "dev", client_if]);
        client.ip(&["addr", "add", "2001:db8:1::2/64", "dev", client_if, "nodad"]);
        for src in SOURCES {
            let plen = if src.contains(':') { "128" } else { "32" };
            client.ip(&["addr", "add", &format!("{src}/{plen}"), "dev", client_if, "nodad"]);
        }
        client.ip(&["link", "set", client_if, "up"]);
        for net in ["192.0.2.0/24", "198.51.100.0/24", "2001:db8:a::/48", "2001:db8:d::/48"] {
            server.ip(&["route", "add", net, "dev", server_if]);
        }
        for src in SOURCES.iter().chain(&["203.0.113.2", "2001:db8:1::2"]) {
            server.ip(&[
                "neigh",
                "replace",
                src,
                "lladdr",
                CLIENT_MAC,
                "dev",
                server_if,
                "nud",
                "permanent",
            ]);
        }
        for dst in [SERVER_V4, SERVER_V6] {
            client.ip(&[
                "neigh",
                "replace",
                dst,
                "lladdr",
                SERVER_MAC,
                "dev",
                client_if,
                "nud",
                "permanent",
            ]);
        }
    }

    /// The server address of `src`'s family.
    pub fn server_addr_for(src: &str) -> IpAddr {
        let s = if src.contains(':') { SERVER_V6 } else { SERVER_V4 };
        s.parse().expect("constant parses")
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

/// A test address, parsed.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address parses")
}

/// The `family` label value of a source address.
pub fn family(src: &str) -> &'static str {
    if src.contains(':') { "ipv6" } else { "ipv4" }
}

/// The agent's /metrics, scraped inside the server namespace.
pub fn scrape(lab: &Lab) -> String {
    let addr = crate::agent::METRICS.parse().expect("constant");
    crate::net::http_get(&lab.server, addr, "/metrics").expect("metrics endpoint answers")
}

/// Scrapes the agent's /metrics every 50 ms until `done` holds on the
/// text, and returns that text. After `within` it panics naming `what`,
/// with the last scrape and the agent's log.
pub fn wait_metrics(
    lab: &Lab,
    agent: &crate::agent::Agent,
    within: std::time::Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let text = scrape(lab);
        if done(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}:\n{text}\n--- agent log ---\n{}",
            agent.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// [`wait_metrics`] until the sum of `name`'s series is at least `want`
/// (30 s at most).
pub fn wait_metric(lab: &Lab, agent: &crate::agent::Agent, name: &str, want: f64) -> String {
    wait_metrics(
        lab,
        agent,
        std::time::Duration::from_secs(30),
        &format!("{name} >= {want}"),
        |t| crate::net::metric(t, name, &[]) >= want,
    )
}

/// A pin_dir of its own for one test (`/sys/fs/bpf/<prefix><pid>-<n>`).
pub fn pin_dir(prefix: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique(prefix)))
}

/// Whether `src` gets a greeting on `port` of the server address of its
/// family (given up after 600 ms when it does not).
pub fn reaches(lab: &Lab, src: &str, port: u16) -> bool {
    crate::net::connect_banner(
        &lab.client,
        ip(src),
        Lab::server_addr_for(src),
        port,
        std::time::Duration::from_millis(600),
    )
    .is_ok()
}

/// Where the agent pins the XDP link of `iface` under `pin_dir`
/// (`layout-<LAYOUT_VERSION>/links/<iface>`).
pub fn link_pin(pin_dir: &std::path::Path, iface: &str) -> std::path::PathBuf {
    pin_dir
        .join(format!("layout-{}", relay_guard_common::LAYOUT_VERSION))
        .join("links")
        .join(iface)
}

/// The gate on port 25 of a lab whose config allows [`ALLOWED_V4`] and
/// denies [`DENIED_V4`]: the allowed source gets the banner, the denied one
/// does not (within 400 ms).
pub fn assert_gate(lab: &Lab, what: &str) {
    let ok = crate::net::connect_banner(
        &lab.client,
        ip(ALLOWED_V4),
        ip(SERVER_V4),
        25,
        crate::prober::ALLOWED_TIMEOUT,
    );
    assert!(ok.is_ok(), "{what}: allowed source failed: {ok:?}");
    let denied = crate::net::connect_banner(
        &lab.client,
        ip(DENIED_V4),
        ip(SERVER_V4),
        25,
        std::time::Duration::from_millis(400),
    );
    assert!(denied.is_err(), "{what}: denied source got through");
}
