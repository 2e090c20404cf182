//! Part 3: a bounded SYN flood across a veth pair, and what dropping it
//! costs the receiver.
//!
//! trafgen (netsniff-ng) in the sender namespace sends `flood` SYNs to
//! 203.0.113.1:25 from random sources in 198.51.100.0/24 (documentation
//! addresses, allowed by no list), one process, then exits; it is killed if
//! it runs past its time limit. Each contender in turn guards the receiver's
//! veth with the largest allowlist:
//!
//! - relay-guard: the program and maps of the test-run part, attached in
//!   native (driver) mode to the veth;
//! - nftables: `tcp dport { 25, 465, 587 } ip saddr != @allow4 counter drop`
//!   (and ip6) in a prerouting chain at raw priority (-300);
//! - iptables + ipset: `-t raw -A PREROUTING -p tcp -m multiport --dports
//!   25,465,587 -m set ! --match-set rgb4 src -j DROP` (and ip6tables);
//! - xdp-filter: native mode, the flood's 256 sources and as many list
//!   addresses as fit on its denylist.
//!
//! Receiver CPU is the softirq time of all CPUs from /proc/stat across the
//! flood, minus the background softirq rate measured in an idle window just
//! before each round. On a veth pair the receive path (the veth NAPI poll
//! running XDP, or the backlog running netfilter's hooks) runs in NET_RX
//! softirq, inline after the sender's transmit or in ksoftirqd; the sender's
//! own syscall time is system time and is not counted. Dropped packets come
//! from each contender's own counter (veth `xdp_drops` for the XDP ones).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use relay_guard::kernel::loader::Loaded;

use super::{
    load::{self, IPSET_V4, IPSET_V6, NFT_TABLE},
    peers::{XDP_FILTER_CAPACITY, XdpFilter},
    plan::{Lab, Plan, RCV_IF, SND_IF},
    prefixes,
    sys::{NetNs, check_stop, median, output, record, show, sleep, softirq_ns},
};

pub const CONTENDERS: [&str; 4] = [
    "relay-guard (XDP, native)",
    "nftables set",
    "iptables + ipset",
    "xdp-filter (XDP, native)",
];

#[derive(Debug, Clone)]
pub struct Flood {
    /// 0-based round.
    pub round: usize,
    pub sent: u64,
    pub dropped: u64,
    pub elapsed: Duration,
    pub softirq_ns: u64,
    pub background_ns: f64,
}

impl Flood {
    pub fn per_drop_ns(&self) -> f64 {
        if self.dropped == 0 {
            return f64::NAN;
        }
        ((self.softirq_ns as f64 - self.background_ns).max(0.0)) / self.dropped as f64
    }

    pub fn pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(Debug, Clone, Default)]
pub struct E2eResults {
    pub list_size: usize,
    pub floods: BTreeMap<usize, Vec<Flood>>,
    /// Background softirq, ns per second, per round.
    pub background: Vec<f64>,
    pub notes: Vec<String>,
}

impl E2eResults {
    pub fn per_drop(&self, c: usize) -> Option<f64> {
        let v: Vec<f64> = self
            .floods
            .get(&c)?
            .iter()
            .map(Flood::per_drop_ns)
            .filter(|v| v.is_finite())
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    pub fn complete(&self, c: usize) -> bool {
        self.floods
            .get(&c)
            .is_some_and(|f| !f.is_empty() && f.iter().all(|f| f.dropped as f64 >= 0.99 * f.sent as f64))
    }
}

const TRAFGEN_CONF: &str = "{
  /* Ethernet: to the receiver's veth, from the sender's */
  0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, c16(0x0800),
  /* IPv4: 198.51.100.<random> -> 203.0.113.1, DF, TTL 64, TCP */
  0x45, 0x00, c16(40), drnd(2), c16(0x4000), 64, 6, csumip(14, 33),
  198, 51, 100, drnd(1),
  203, 0, 113, 1,
  /* TCP: random source port -> 25, random sequence, SYN, window 64240 */
  drnd(2), c16(25), drnd(4), c32(0), c16(0x5002), c16(64240), csumtcp(14, 34), c16(0)
}
";

/// Sum of the veth's per-queue `xdp_drops` (`ethtool -S`).
fn xdp_drops(ns: &NetNs) -> anyhow::Result<u64> {
    let out = ns.sh(&["ethtool", "-S", RCV_IF])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.ends_with("xdp_drops"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

fn nft_drops(ns: &NetNs) -> anyhow::Result<u64> {
    let out = ns.sh(&["nft", "list", "chain", "inet", NFT_TABLE, "pre"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split("counter packets ").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

fn iptables_drops(ns: &NetNs) -> anyhow::Result<u64> {
    let mut n = 0;
    for tool in ["iptables", "ip6tables"] {
        let out = ns.sh(&[tool, "-t", "raw", "-L", "PREROUTING", "-n", "-v", "-x"])?;
        n += out
            .lines()
            .skip(2)
            .filter(|l| l.contains("DROP"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(n)
}

fn nft_rules(on: bool) -> Vec<Vec<String>> {
    let t = NFT_TABLE;
    if on {
        vec![
            vec![
                "add".into(),
                "chain".into(),
                "inet".into(),
                t.into(),
                "pre".into(),
                "{ type filter hook prerouting priority -300; policy accept; }".into(),
            ],
            [
                "add",
                "rule",
                "inet",
                t,
                "pre",
                "tcp",
                "dport",
                "{ 25, 465, 587 }",
                "ip",
                "saddr",
                "!=",
                "@allow4",
                "counter",
                "drop",
            ]
            .map(String::from)
            .to_vec(),
            [
                "add",
                "rule",
                "inet",
                t,
                "pre",
                "tcp",
                "dport",
                "{ 25, 465, 587 }",
                "ip6",
                "saddr",
                "!=",
                "@allow6",
                "counter",
                "drop",
            ]
            .map(String::from)
            .to_vec(),
        ]
    } else {
        vec![
            ["flush", "chain", "inet", t, "pre"].map(String::from).to_vec(),
            ["delete", "chain", "inet", t, "pre"].map(String::from).to_vec(),
        ]
    }
}

fn iptables_rules(op: &str) -> Vec<Vec<String>> {
    [("iptables", IPSET_V4), ("ip6tables", IPSET_V6)]
        .iter()
        .map(|(tool, set)| {
            [
                *tool,
                "-t",
                "raw",
                op,
                "PREROUTING",
                "-p",
                "tcp",
                "-m",
                "multiport",
                "--dports",
                "25,465,587",
                "-m",
                "set",
                "!",
                "--match-set",
                set,
                "src",
                "-j",
                "DROP",
            ]
            .map(String::from)
            .to_vec()
        })
        .collect()
}

fn run_all(ns: &NetNs, cmds: &[Vec<String>], prefix: Option<&str>, rec: bool) -> anyhow::Result<()> {
    for c in cmds {
        let mut cmd = match prefix {
            Some(p) => {
                let mut cmd = ns.cmd(p);
                cmd.args(c);
                cmd
            }
            None => {
                let mut cmd = ns.cmd(&c[0]);
                cmd.args(&c[1..]);
                cmd
            }
        };
        if rec {
            record(show(&cmd));
        }
        output(&mut cmd)?;
    }
    Ok(())
}

/// The guard a contender leaves while it floods; removed on drop.
enum Active<'a> {
    RelayGuard(&'a mut Loaded, Option<aya::programs::xdp::XdpLinkId>),
    Nft(&'a NetNs),
    Iptables(&'a NetNs),
    /// Held until the flood ends; unloads on drop.
    XdpFilter(#[expect(dead_code, reason = "held for its Drop")] XdpFilter),
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        match self {
            Active::RelayGuard(loaded, id) => {
                if let Some(id) = id.take() {
                    let _ = loaded.program().detach(id);
                }
            }
            Active::Nft(ns) => {
                let _ = run_all(ns, &nft_rules(false), Some("nft"), false);
            }
            Active::Iptables(ns) => {
                let _ = run_all(ns, &iptables_rules("-D"), None, false);
            }
            Active::XdpFilter(_) => {}
        }
    }
}

fn activate<'a>(
    c: usize,
    lab: &'a Lab,
    loaded: &'a mut Loaded,
    list: &[IpNet],
    first: bool,
) -> anyhow::Result<Active<'a>> {
    Ok(match c {
        0 => {
            let id = lab
                .rcv
                .run(|| loaded.program().attach(RCV_IF, aya::programs::XdpMode::Driver))??;
            if first {
                record(format!(
                    "Loaded::load() + sync::apply(<{} prefixes>) + program().attach(\"{RCV_IF}\", XdpMode::Driver)",
                    list.len()
                ));
            }
            Active::RelayGuard(loaded, Some(id))
        }
        1 => {
            let a = Active::Nft(&lab.rcv);
            run_all(&lab.rcv, &nft_rules(true), Some("nft"), first)?;
            a
        }
        2 => {
            let a = Active::Iptables(&lab.rcv);
            run_all(&lab.rcv, &iptables_rules("-A"), None, first)?;
            a
        }
        _ => {
            let xf = XdpFilter::load(&lab.rcv, RCV_IF)?;
            let flood_sources: Vec<Ipv4Addr> = (0..=255).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect();
            xf.add(&flood_sources, &[])?;
            let (v4, v6) = prefixes::exact_addresses(list, XDP_FILTER_CAPACITY);
            xf.add(&v4, &v6)?;
            Active::XdpFilter(xf)
        }
    })
}

fn drops(c: usize, ns: &NetNs) -> anyhow::Result<u64> {
    match c {
        0 | 3 => xdp_drops(ns),
        1 => nft_drops(ns),
        _ => iptables_drops(ns),
    }
}

fn flood(plan: &Plan, lab: &Lab, conf: &Path, first: bool) -> anyhow::Result<(u64, Duration, u64)> {
    let mut c = lab.snd.cmd("trafgen");
    c.args(["--dev", SND_IF, "--conf"])
        .arg(conf)
        .args([
            "--num",
            &plan.flood.to_string(),
            "--cpus",
            "1",
            "--no-sock-mem",
            "--notouch-irq",
            "--no-cpu-stats",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if first {
        record(show(&c));
    }
    let s0 = softirq_ns()?;
    let t0 = Instant::now();
    let mut child = c.spawn().with_context(|| format!("start {}", show(&c)))?;
    let limit = plan.flood_timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > limit || check_stop().is_err() {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Let the receive queues drain.
    std::thread::sleep(Duration::from_millis(50));
    let elapsed = t0.elapsed();
    let s1 = softirq_ns()?;
    check_stop()?;
    match status {
        Some(s) if s.success() => {}
        Some(s) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut err);
            }
            bail!("trafgen failed ({s}): {}", err.trim());
        }
        None => bail!(
            "trafgen did not finish {} packets within {limit:?} (killed)",
            plan.flood
        ),
    }
    Ok((plan.flood, elapsed, s1.saturating_sub(s0)))
}

pub fn run(plan: &Plan, lab: &Lab, dir: &Path, list: &[IpNet], loaded: &mut Loaded) -> anyhow::Result<E2eResults> {
    let size = *plan.sizes.last().expect("sizes is not empty");
    let list = &list[..size];
    let mut res = E2eResults {
        list_size: size,
        ..E2eResults::default()
    };
    load::ensure_peer_sets(lab, dir, list)?;
    let conf = dir.join("syn-flood.trafgen");
    std::fs::write(&conf, TRAFGEN_CONF)?;
    for round in 0..plan.rounds {
        check_stop()?;
        let idle = plan.idle_window;
        let s0 = softirq_ns()?;
        let t0 = Instant::now();
        sleep(idle)?;
        let bg = (softirq_ns()?.saturating_sub(s0)) as f64 / t0.elapsed().as_secs_f64();
        res.background.push(bg);
        println!(
            "bench: flood round {}/{} ({} SYNs each; background softirq {:.1} ms/s)",
            round + 1,
            plan.rounds,
            plan.flood,
            bg / 1e6
        );
        for k in 0..CONTENDERS.len() {
            check_stop()?;
            let c = (k + round) % CONTENDERS.len();
            let outcome = (|| -> anyhow::Result<Flood> {
                let active = activate(c, lab, loaded, list, round == 0)?;
                let d0 = drops(c, &lab.rcv)?;
                let (sent, elapsed, softirq) = flood(plan, lab, &conf, round == 0 && k == 0)?;
                let d1 = drops(c, &lab.rcv)?;
                drop(active);
                Ok(Flood {
                    round,
                    sent,
                    dropped: d1.saturating_sub(d0),
                    elapsed,
                    softirq_ns: softirq,
                    background_ns: bg * elapsed.as_secs_f64(),
                })
            })();
            match outcome {
                Ok(f) => {
                    println!(
                        "bench:   {:<28} {:>9} dropped of {}, {:>5.2} Mpps, receiver softirq {:>7.1} ns per dropped SYN",
                        CONTENDERS[c],
                        f.dropped,
                        f.sent,
                        f.pps() / 1e6,
                        f.per_drop_ns()
                    );
                    if (f.dropped as f64) < 0.99 * f.sent as f64 {
                        res.notes.push(format!(
                            "{}: dropped {} of {} SYNs in round {}",
                            CONTENDERS[c],
                            f.dropped,
                            f.sent,
                            round + 1
                        ));
                    }
                    res.floods.entry(c).or_default().push(f);
                }
                Err(e) => {
                    check_stop()?;
                    println!("bench:   {:<28} not measured: {e:#}", CONTENDERS[c]);
                    res.notes
                        .push(format!("{} not measured in round {}: {e:#}", CONTENDERS[c], round + 1));
                }
            }
        }
    }
    Ok(res)
}
