//! Bypass attempts end to end: the real agent guards :25 on the server side
//! of a lab; the client writes crafted frames straight onto its veth with an
//! AF_PACKET socket (no client IP stack in the way), hiding the TCP header
//! behind VLAN tags, IPv4 options, first fragments and IPv6 extension-header
//! chains, from a denied source and, as controls, from an allowed one.
//!
//! A second AF_PACKET socket on the server interface sees exactly the frames
//! XDP passed (packet taps run after XDP, native or generic). Each frame
//! carries a unique marker in its TCP payload. The test asserts that no denied
//! variant (and no malformed one, whatever its source) shows up there, that
//! every allowed control does (so the capture demonstrably works), and that
//! /metrics counts each denied variant as dropped or malformed.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use relay_guard::{config::Config, policy::Policy};
use relay_guard_common::family;
use relay_guard_tests::{
    agent::{Agent, DetachOnDrop, TempDir},
    config::{Guard, TestConfig},
    lab::{ALLOWED_V4, ALLOWED_V6, DENIED_V4, DENIED_V6, Lab, SERVER_V4, SERVER_V6, pin_dir, scrape},
    model,
    net::metric,
    packet::{Ext, Ipv4, Ipv6, Tcp, Vlan, ipv4_options, proto, tcp_flags, tcp_v4, tcp_v6},
    raw::{ETH_P_ALL, packet_socket, send_frame, socklen},
    require,
};

const PORT: u16 = 25;
/// `PACKET_OUTGOING` in `sockaddr_ll.sll_pkttype`: a frame the host sent.
const PACKET_OUTGOING: u8 = 4;
/// Prefix of the per-frame marker in the TCP payload; a u32 id follows.
const MARKER: &[u8; 12] = b"rg-bypass-id";

fn write_config(lab: &Lab, dir: &TempDir, xdp_mode: &str) -> (PathBuf, DetachOnDrop) {
    TestConfig::new(&lab.server_if, &pin_dir("rg-test-"))
        .xdp_mode(xdp_mode)
        .guard(&Guard::new("relay", &[PORT]).allow(&["192.0.2.0/24", "2001:db8:a::/48"]))
        .write(dir)
}

// ---- AF_PACKET capture ----

fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).expect("small"),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: tv is a valid timeval and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            socklen(size_of::<libc::timeval>()),
        )
    };
    assert!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}

/// One received frame that the server side did not send itself, or None on
/// timeout.
fn recv_incoming(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: as in sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = socklen(size_of::<libc::sockaddr_ll>());
        // SAFETY: buf, sll and len are valid for the sizes given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut sll).cast(),
                &raw mut len,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => return None,
                std::io::ErrorKind::Interrupted => continue,
                _ => panic!("recvfrom AF_PACKET: {e}"),
            }
        };
        if sll.sll_pkttype != PACKET_OUTGOING {
            return Some(n);
        }
    }
}

/// The marker ids found in a captured frame.
fn marker_ids(frame: &[u8]) -> impl Iterator<Item = u32> + '_ {
    frame
        .windows(MARKER.len() + 4)
        .filter(|w| w.starts_with(MARKER))
        .map(|w| u32::from_be_bytes(w[MARKER.len()..].try_into().expect("4 bytes")))
}

// ---- The variants ----

/// One crafted frame.
struct Variant {
    id: u32,
    name: String,
    src: &'static str,
    frame: Vec<u8>,
    /// What the reference model says (and so what /metrics must count).
    outcome: model::Outcome,
}

fn segment(id: u32) -> Tcp {
    let mut t = Tcp::syn(
        40_000 + u16::try_from(id % 20_000).expect("small"),
        PORT,
        0x5247_0000 | id,
    );
    t.flags = tcp_flags::SYN;
    t.payload = [MARKER.as_slice(), &id.to_be_bytes()].concat();
    t
}

/// A named IPv4 variant: its VLAN tags and how it changes a plain header.
type ShapeV4 = (&'static str, Vec<Vlan>, Box<dyn Fn(Ipv4) -> Ipv4>);

/// Header shapes that hide the TCP header somewhere the parser must still
/// find it (or, past its documented limits, fail closed).
fn shapes_v4() -> Vec<ShapeV4> {
    vec![
        ("v4 plain", vec![], Box::new(|ip| ip)),
        ("v4 802.1Q tag", vec![Vlan::q(10)], Box::new(|ip| ip)),
        ("v4 QinQ tags", vec![Vlan::ad(20), Vlan::q(10)], Box::new(|ip| ip)),
        (
            "v4 options (IHL 6)",
            vec![],
            Box::new(|ip| Ipv4 {
                options: ipv4_options(1),
                ..ip
            }),
        ),
        (
            "v4 options (IHL 15)",
            vec![],
            Box::new(|ip| Ipv4 {
                options: ipv4_options(10),
                ..ip
            }),
        ),
        (
            "v4 first fragment",
            vec![],
            Box::new(|ip| Ipv4 {
                more_fragments: true,
                ..ip
            }),
        ),
        (
            "v4 first fragment + options + QinQ",
            vec![Vlan::ad(20), Vlan::q(10)],
            Box::new(|ip| Ipv4 {
                more_fragments: true,
                options: ipv4_options(5),
                ..ip
            }),
        ),
        (
            "v4 3 VLAN tags (malformed)",
            vec![Vlan::ad(20), Vlan::q(10), Vlan::q(11)],
            Box::new(|ip| ip),
        ),
    ]
}

/// `n` extension headers of every kind the walk follows, fragment (offset 0)
/// included, in RFC 8200 4.1 order and then repeated.
fn ext_chain(n: usize) -> Vec<Ext> {
    let cycle = [
        Ext::HopByHop { len: 0 },
        Ext::DestOpts { len: 1 },
        Ext::Routing { len: 0 },
        Ext::Fragment {
            offset: 0,
            more: true,
            id: 0x5247,
        },
        Ext::Ah { len: 4, spi: 0x100 },
        Ext::DestOpts { len: 0 },
    ];
    (0..n).map(|i| cycle[i % cycle.len()].clone()).collect()
}

fn shapes_v6() -> Vec<(String, Vec<Vlan>, Vec<Ext>)> {
    let mut v = vec![
        ("v6 plain".to_string(), vec![], vec![]),
        ("v6 802.1Q tag".to_string(), vec![Vlan::q(10)], vec![]),
        (
            "v6 QinQ tags".to_string(),
            vec![Vlan::ad(20), Vlan::q(10)],
            ext_chain(2),
        ),
        (
            "v6 first fragment".to_string(),
            vec![],
            vec![Ext::Fragment {
                offset: 0,
                more: true,
                id: 7,
            }],
        ),
    ];
    for n in 1..=8 {
        v.push((format!("v6 {n} extension headers"), vec![], ext_chain(n)));
    }
    v.push(("v6 9 extension headers (malformed)".to_string(), vec![], ext_chain(9)));
    v.push((
        "v6 3 VLAN tags (malformed)".to_string(),
        vec![Vlan::ad(20), Vlan::q(10), Vlan::q(11)],
        vec![],
    ));
    v
}

fn variants(policy: &Policy) -> Vec<Variant> {
    let mut out = Vec::new();
    let mut id = 1u32;
    let server_v4: Ipv4Addr = SERVER_V4.parse().expect("constant");
    let server_v6: Ipv6Addr = SERVER_V6.parse().expect("constant");
    for src in [DENIED_V4, ALLOWED_V4] {
        for (name, vlans, shape) in shapes_v4() {
            let mut ip = shape(Ipv4::new(src.parse().expect("constant"), server_v4, proto::TCP));
            ip.id = u16::try_from(id).expect("few variants");
            let frame = tcp_v4(&vlans, &ip, &segment(id));
            out.push(Variant {
                id,
                name: name.to_string(),
                src,
                outcome: model::judge(&frame, policy),
                frame,
            });
            id += 1;
        }
    }
    for src in [DENIED_V6, ALLOWED_V6] {
        for (name, vlans, ext) in shapes_v6() {
            let ip = Ipv6 {
                flow_label: id,
                ..Ipv6::new(src.parse().expect("constant"), server_v6, proto::TCP)
            }
            .with_ext(ext);
            let frame = tcp_v6(&vlans, &ip, &segment(id));
            out.push(Variant {
                id,
                name,
                src,
                outcome: model::judge(&frame, policy),
                frame,
            });
            id += 1;
        }
    }
    out
}

fn bypass(xdp_mode: &str, test: &str) {
    if !require::privileged(test) {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new();
    let (config, _detach) = write_config(&lab, &dir, xdp_mode);
    let agent = Agent::start(&lab.server, config.clone(), &dir);

    // The model's verdict for every variant, from the same config the agent
    // runs: the expectations below must hold for what the test itself claims.
    let policy = Policy::compile(&Config::load(&config).unwrap_or_else(|e| panic!("test config: {e}")));
    let variants = variants(&policy);
    let is_control = |v: &Variant| matches!(v.outcome, model::Outcome::Judged { allowed: true, .. });
    for v in &variants {
        let allowed_src = v.src == ALLOWED_V4 || v.src == ALLOWED_V6;
        let malformed = v.name.contains("(malformed)");
        assert_eq!(
            is_control(v),
            allowed_src && !malformed,
            "variant `{}` from {}: the model says {:?}; the test's expectation is wrong",
            v.name,
            v.src,
            v.outcome
        );
    }

    let (capture, _) = packet_socket(&lab.server, &lab.server_if, ETH_P_ALL);
    set_recv_timeout(&capture, Duration::from_millis(100));
    let (sender, client_ifindex) = packet_socket(&lab.client, &lab.client_if, 0);
    // Denied and malformed first, controls last: once every control has
    // arrived, the frames before them have been through XDP too.
    let (controls, blocked): (Vec<&Variant>, Vec<&Variant>) = variants.iter().partition(|v| is_control(v));
    for v in blocked.iter().chain(&controls) {
        send_frame(&sender, client_ifindex, &v.frame);
    }

    let mut seen = BTreeSet::new();
    let mut buf = vec![0u8; 65_536];
    let want: BTreeSet<u32> = controls.iter().map(|v| v.id).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !want.is_subset(&seen) && Instant::now() < deadline {
        if let Some(n) = recv_incoming(&capture, &mut buf) {
            seen.extend(marker_ids(&buf[..n]));
        }
    }

    // /metrics: every blocked variant counted as the model says, every
    // control as passed. Bounded wait: counters are read at scrape time.
    let count = |pred: &dyn Fn(&model::Outcome) -> bool| variants.iter().filter(|v| pred(&v.outcome)).count();
    let dropped_v4 = count(&|o| {
        matches!(
            o,
            model::Outcome::Judged {
                allowed: false,
                family: family::IPV4,
                ..
            }
        )
    });
    let dropped_v6 = count(&|o| {
        matches!(
            o,
            model::Outcome::Judged {
                allowed: false,
                family: family::IPV6,
                ..
            }
        )
    });
    let passed_v4 = count(&|o| {
        matches!(
            o,
            model::Outcome::Judged {
                allowed: true,
                family: family::IPV4,
                ..
            }
        )
    });
    let passed_v6 = count(&|o| {
        matches!(
            o,
            model::Outcome::Judged {
                allowed: true,
                family: family::IPV6,
                ..
            }
        )
    });
    let malformed = count(&|o| matches!(o, model::Outcome::Malformed { .. }));
    assert!(
        dropped_v4 >= 7 && dropped_v6 >= 12 && malformed == 6,
        "the variants are not what the test means to send"
    );
    let labels = |fam: &'static str, verdict: &'static str| {
        [
            ("interface", lab.server_if.clone()),
            ("guard", "relay".into()),
            ("port", PORT.to_string()),
            ("family", fam.into()),
            ("verdict", verdict.into()),
        ]
    };
    let expected = [
        (labels("ipv4", "dropped"), dropped_v4),
        (labels("ipv6", "dropped"), dropped_v6),
        (labels("ipv4", "passed"), passed_v4),
        (labels("ipv6", "passed"), passed_v6),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&lab);
        let ok = expected.iter().all(|(l, n)| {
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            #[expect(clippy::cast_precision_loss, reason = "test counts are small")]
            let n = *n as f64;
            metric(&text, "relay_guard_packets_total", &l) == n
        }) && metric(
            &text,
            "relay_guard_malformed_packets_total",
            &[("interface", lab.server_if.as_str())],
        ) == f64::from(u32::try_from(malformed).expect("small"));
        if ok || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    // Whatever else is still queued on the capture socket.
    while let Some(n) = recv_incoming(&capture, &mut buf) {
        seen.extend(marker_ids(&buf[..n]));
    }

    let leaked: Vec<String> = blocked
        .iter()
        .filter(|v| seen.contains(&v.id))
        .map(|v| format!("  {} from {} ({:?})", v.name, v.src, v.outcome))
        .collect();
    assert!(
        leaked.is_empty(),
        "{test}: frames that XDP must drop reached {}:\n{}",
        lab.server_if,
        leaked.join("\n")
    );
    let missing: Vec<String> = controls
        .iter()
        .filter(|v| !seen.contains(&v.id))
        .map(|v| format!("  {} from {}", v.name, v.src))
        .collect();
    assert!(
        missing.is_empty(),
        "{test}: allowed controls never seen on {} (capture broken, or XDP dropped them):\n{}\n{}",
        lab.server_if,
        missing.join("\n"),
        agent.log_text()
    );
    for (l, n) in &expected {
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        #[expect(clippy::cast_precision_loss, reason = "test counts are small")]
        let n = *n as f64;
        assert_eq!(
            metric(&text, "relay_guard_packets_total", &l),
            n,
            "{test}: relay_guard_packets_total{l:?}\n{text}"
        );
    }
    assert_eq!(
        metric(
            &text,
            "relay_guard_malformed_packets_total",
            &[("interface", lab.server_if.as_str())]
        ),
        f64::from(u32::try_from(malformed).expect("small")),
        "{test}: relay_guard_malformed_packets_total\n{text}"
    );
    println!(
        "{test}: sent {} frames: {} blocked ({dropped_v4} v4 and {dropped_v6} v6 dropped, {malformed} malformed), {} controls passed and seen",
        variants.len(),
        blocked.len(),
        controls.len()
    );
}

#[test]
fn hidden_headers_native_xdp() {
    bypass("native", "hidden_headers_native_xdp");
}

#[test]
fn hidden_headers_generic_xdp() {
    bypass("skb", "hidden_headers_generic_xdp");
}
