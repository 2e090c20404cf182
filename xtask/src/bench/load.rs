//! Part 2: loading the largest list from cold.
//!
//! - relay-guard: the release agent binary, `relay-guard --config F run`, in
//!   the receiver namespace (attaching natively to its veth), on a config
//!   whose `allow_files` list is the whole list, with no pinned state; timed
//!   from spawn until its metrics endpoint answers. Its peak RSS is `VmHWM`
//!   from /proc/PID/status, read after the reloads below.
//! - A one-line change: the list file is replaced (write + rename, as an
//!   editor does) with one line different and the agent is sent SIGHUP; the
//!   reload is timed from the agent's own `reloading config` log line to its
//!   `config reloaded` line (re-read of the list, compile, map diff), and
//!   from the edit to `config reloaded`.
//! - `ipset restore -f` of the same list as two hash:net sets, and `nft -f`
//!   of an inet table with one interval set per family, in the same namespace.
//!
//! Rounds are interleaved (agent, ipset, nft, agent, ...).
use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;

use super::{
    peers,
    plan::{Lab, Plan},
    prefixes,
    sys::{NetNs, check_stop, median, output, record, show, sleep, vm_hwm_kib, vm_rss_kib},
    testrun::write_config,
};

pub const IPSET_V4: &str = "rgb4";
pub const IPSET_V6: &str = "rgb6";
pub const NFT_TABLE: &str = "rgbench";
const METRICS: &str = "127.0.0.1:10947";

#[derive(Debug, Clone)]
pub struct Reload {
    /// `reloading config` → `config reloaded`.
    pub work: Duration,
    /// List file replaced → `config reloaded`.
    pub edit_to_applied: Duration,
    pub trigger: String,
}

#[derive(Debug, Clone, Default)]
pub struct LoadResults {
    pub size: usize,
    /// Agent spawn → metrics served, per round.
    pub agent_start: Vec<Duration>,
    /// Agent spawn → its `maps synced` log line, per round.
    pub agent_synced: Vec<Duration>,
    pub reloads: Vec<Reload>,
    /// Highest VmHWM over all agent runs, KiB.
    pub agent_hwm_kib: Option<u64>,
    /// VmRSS when idle after start, KiB.
    pub agent_rss_kib: Option<u64>,
    pub ipset: Vec<Duration>,
    pub nft: Vec<Duration>,
    pub ipset_entries: Option<usize>,
    pub notes: Vec<String>,
}

pub fn median_d(v: &[Duration]) -> Option<Duration> {
    (!v.is_empty()).then(|| Duration::from_secs_f64(median(&v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())))
}

/// The release agent, as a child in a namespace, with its log lines
/// timestamped as they arrive. Killed, detached and unpinned on drop.
pub(super) struct Agent {
    child: Option<Child>,
    bin: PathBuf,
    config: PathBuf,
    ns_path: PathBuf,
    pin_dir: PathBuf,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Agent {
    pub(super) fn spawn(bin: &Path, ns: &NetNs, config: &Path, pin_dir: &Path) -> anyhow::Result<Agent> {
        Self::spawn_in(bin, ns, config, pin_dir, None)
    }

    /// [`Agent::spawn`], moved into the cgroup whose `cgroup.procs` is
    /// `procs` (by a shell that then execs it) before it allocates anything.
    pub(super) fn spawn_in(
        bin: &Path,
        ns: &NetNs,
        config: &Path,
        pin_dir: &Path,
        procs: Option<&Path>,
    ) -> anyhow::Result<Agent> {
        let _ = std::fs::remove_dir_all(pin_dir);
        let mut c = match procs {
            Some(procs) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0\" && exec \"$@\"")
                    .arg(procs)
                    .arg("nsenter")
                    .arg(format!("--net={}", ns.path().display()))
                    .arg(bin);
                c
            }
            None => ns.cmd(bin),
        };
        c.arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        record(show(&c));
        let mut child = c.spawn().with_context(|| format!("start {}", show(&c)))?;
        let stderr = child.stderr.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((Instant::now(), line));
            }
        });
        Ok(Agent {
            child: Some(child),
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            ns_path: ns.path(),
            pin_dir: pin_dir.to_path_buf(),
            lines,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub(super) fn log(&self) -> String {
        let l = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        l.iter()
            .rev()
            .take(20)
            .rev()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub(super) fn line_count(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// The first line at or after index `from` containing `pat`.
    fn find(&self, from: usize, pat: &str) -> Option<(usize, Instant, String)> {
        let l = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        l.iter()
            .enumerate()
            .skip(from)
            .find(|(_, (_, s))| s.contains(pat))
            .map(|(i, (t, s))| (i, *t, s.clone()))
    }

    pub(super) fn wait_line(
        &mut self,
        from: usize,
        pat: &str,
        timeout: Duration,
    ) -> anyhow::Result<(usize, Instant, String)> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(hit) = self.find(from, pat) {
                return Ok(hit);
            }
            self.check_alive()?;
            if Instant::now() > end {
                bail!(
                    "the agent did not log `{pat}` within {timeout:?}; its log ends:\n{}",
                    self.log()
                );
            }
            check_stop()?;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.child = None;
            bail!("the agent exited ({status}); its log ends:\n{}", self.log());
        }
        Ok(())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            signal_child(c, sig);
        }
    }

    /// SIGTERM, wait, then `relay-guard detach` (the filter stays attached
    /// after the agent exits, by design) and the pins removed.
    pub(super) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_child(&child, nix::sys::signal::Signal::SIGTERM);
            let end = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path.display()))
            .arg(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("detach")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Signals one child by its pid (never 0 or negative: that would be a
/// process group).
fn signal_child(c: &Child, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(c.id())
        && pid > 0
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls GET /metrics in the namespace until it answers 200.
pub(super) fn wait_metrics(ns: &NetNs, timeout: Duration) -> anyhow::Result<Instant> {
    let addr: SocketAddr = METRICS.parse().expect("constant");
    ns.run(move || -> anyhow::Result<Instant> {
        use std::io::{Read as _, Write as _};
        let end = Instant::now() + timeout;
        loop {
            check_stop()?;
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").is_ok() {
                    let mut head = [0u8; 16];
                    if s.read(&mut head).is_ok_and(|n| n >= 12)
                        && head.starts_with(b"HTTP/1.")
                        && &head[9..12] == b"200"
                    {
                        return Ok(Instant::now());
                    }
                }
            }
            if Instant::now() > end {
                bail!("metrics at {addr} did not answer within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })?
}

pub fn run(plan: &Plan, lab: &Lab, dir: &Path, list: &[IpNet]) -> anyhow::Result<LoadResults> {
    let size = *plan.sizes.last().expect("sizes is not empty");
    let list = &list[..size];
    let mut res = LoadResults {
        size,
        ..LoadResults::default()
    };
    let (config, _) = write_config(dir, "agent", list, &plan.pin_dir)?;
    let agent_list = dir.join("allow-agent.txt");
    let original = std::fs::read(&agent_list)?;
    let mut changed_list = list.to_vec();
    changed_list[size - 1] = prefixes::fresh(list, plan.seed);
    let changed_path = dir.join("allow-agent-changed.txt");
    prefixes::write_list(&changed_path, &changed_list)?;
    let changed = std::fs::read(&changed_path)?;
    let ipset_file = dir.join("ipset.restore");
    prefixes::write_ipset(&ipset_file, list, IPSET_V4, IPSET_V6)?;
    let nft_file = dir.join("allow.nft");
    prefixes::write_nft(&nft_file, NFT_TABLE, list)?;

    for round in 0..plan.load_rounds {
        let last = round + 1 == plan.load_rounds;
        check_stop()?;
        println!(
            "bench: load round {}/{} at {size} prefixes: relay-guard agent",
            round + 1,
            plan.load_rounds
        );
        std::fs::write(&agent_list, &original)?;
        let t0 = Instant::now();
        let mut agent = Agent::spawn(&plan.agent, &lab.rcv, &config, &plan.pin_dir)?;
        let served = wait_metrics(&lab.rcv, Duration::from_secs(300))
            .with_context(|| format!("agent start; log:\n{}", agent.log()))?;
        res.agent_start.push(served - t0);
        if let Some((_, t, _)) = agent.find(0, "maps synced") {
            res.agent_synced.push(t - t0);
        }
        println!(
            "bench:   agent serving metrics after {:.2} s",
            (served - t0).as_secs_f64()
        );
        sleep(Duration::from_millis(300))?;
        if res.agent_rss_kib.is_none() {
            res.agent_rss_kib = vm_rss_kib(agent.pid());
        }
        if last {
            for i in 0..plan.reloads {
                check_stop()?;
                let from = agent.line_count();
                let tmp = dir.join(".allow-agent.txt.tmp");
                std::fs::write(&tmp, if i % 2 == 0 { &changed } else { &original })?;
                std::fs::rename(&tmp, &agent_list)?;
                let edited = Instant::now();
                agent.signal(nix::sys::signal::Signal::SIGHUP);
                let (si, started, line) = agent.wait_line(from, "reloading config", Duration::from_secs(120))?;
                let (_, done, _) = agent.wait_line(si, "config reloaded", Duration::from_secs(300))?;
                let trigger = line
                    .split("trigger=")
                    .nth(1)
                    .unwrap_or("?")
                    .trim_matches('"')
                    .to_string();
                let r = Reload {
                    work: done - started,
                    edit_to_applied: done - edited,
                    trigger,
                };
                println!(
                    "bench:   one-line change: reload {:.0} ms (edit to applied {:.0} ms, trigger {})",
                    r.work.as_secs_f64() * 1000.0,
                    r.edit_to_applied.as_secs_f64() * 1000.0,
                    r.trigger
                );
                res.reloads.push(r);
                // Let the file watcher's event (debounced) and any second
                // reload it starts settle before the next change.
                sleep(Duration::from_millis(800))?;
                let mut from = si + 1;
                while let Some((i2, _, _)) = agent.find(from, "reloading config") {
                    agent.wait_line(i2, "config reloaded", Duration::from_secs(300))?;
                    from = i2 + 1;
                    sleep(Duration::from_millis(800))?;
                }
            }
            record(format!(
                "kill -HUP <agent pid>  (after replacing {} with one line changed)",
                agent_list.display()
            ));
        }
        let hwm = vm_hwm_kib(agent.pid());
        res.agent_hwm_kib = res.agent_hwm_kib.max(hwm);
        agent.check_alive()?;
        drop(agent);

        check_stop()?;
        println!("bench: load round {}/{}: ipset restore", round + 1, plan.load_rounds);
        let _ = lab.rcv.sh(&["ipset", "destroy", IPSET_V4]);
        let _ = lab.rcv.sh(&["ipset", "destroy", IPSET_V6]);
        let d = peers::ipset_restore(&lab.rcv, &ipset_file)?;
        println!("bench:   ipset restore {:.2} s", d.as_secs_f64());
        res.ipset.push(d);
        res.ipset_entries = Some(ipset_entries(&lab.rcv, IPSET_V4)? + ipset_entries(&lab.rcv, IPSET_V6)?);

        check_stop()?;
        println!("bench: load round {}/{}: nft -f", round + 1, plan.load_rounds);
        let _ = lab.rcv.sh(&["nft", "delete", "table", "inet", NFT_TABLE]);
        let d = peers::nft_load(&lab.rcv, &nft_file)?;
        println!("bench:   nft -f {:.2} s", d.as_secs_f64());
        res.nft.push(d);
    }
    Ok(res)
}

fn ipset_entries(ns: &NetNs, set: &str) -> anyhow::Result<usize> {
    let out = output(ns.cmd("ipset").args(["list", "-t", set]))?;
    out.lines()
        .find_map(|l| l.strip_prefix("Number of entries:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("`ipset list -t {set}` shows no entry count"))
}

/// Makes sure the ipset sets and the nft table exist in the receiver
/// namespace (for the end-to-end part when the load part was skipped).
pub fn ensure_peer_sets(lab: &Lab, dir: &Path, list: &[IpNet]) -> anyhow::Result<()> {
    if !lab
        .rcv
        .sh(&["ipset", "list", "-n"])?
        .lines()
        .any(|l| l.trim() == IPSET_V4)
    {
        let f = dir.join("ipset.restore");
        prefixes::write_ipset(&f, list, IPSET_V4, IPSET_V6)?;
        peers::ipset_restore(&lab.rcv, &f)?;
    }
    if !lab
        .rcv
        .sh(&["nft", "list", "tables"])?
        .lines()
        .any(|l| l.trim() == format!("table inet {NFT_TABLE}"))
    {
        let f = dir.join("allow.nft");
        prefixes::write_nft(&f, NFT_TABLE, list)?;
        peers::nft_load(&lab.rcv, &f)?;
    }
    Ok(())
}
