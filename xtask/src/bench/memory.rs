//! Part 4: memory, in a memory cgroup of the agent's own.
//!
//! The kernel charges BPF maps to the memory cgroup of the process that
//! creates them, so the figure that matters for a DaemonSet or a unit is the
//! cgroup's, not the agent's RSS. Measured:
//!
//! - relay-guard: the release agent on the example config
//!   (deploy/relay-guard.example.toml, its office list in `allow_files`),
//!   started in a fresh memory cgroup (a shell writes its pid to
//!   `cgroup.procs`, then execs the agent); the cgroup's usage sampled
//!   several times once idle; then the office list replaced by 1,000,000
//!   prefixes (the bench's generated mix) and the reload awaited: the usage
//!   after, and the cgroup's peak over the reload (the peak counter reset
//!   first); then the list put back, the reload awaited and the usage
//!   sampled again.
//! - nftables and ipset holding the same lists: `nft -f` (one interval set
//!   per family) and `ipset restore` (one hash:net set per family) run in a
//!   fresh cgroup each; the sets' kernel memory stays charged to it after the
//!   command exits.
//!
//! On cgroup v1 kernel memory is charged to `memory.usage_in_bytes` as well
//! as to `memory.kmem.usage_in_bytes`; the part checks that the first holds
//! the second and says so.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;

use super::{
    load::{Agent, wait_metrics},
    plan::{Lab, Plan, RCV_IF},
    prefixes,
    sys::{check_stop, median, output, record, show, sleep},
};
use crate::utils::workspace_root;

/// The big list's size.
pub const BIG: usize = 1_000_000;
/// Usage samples per idle figure.
const SAMPLES: usize = 7;

#[derive(Debug, Clone, Default)]
pub struct MemoryResults {
    /// Samples on the example config after start, bytes.
    pub small: Vec<u64>,
    /// Usage with the big list applied, and the peak over its reload.
    pub big: u64,
    pub peak: u64,
    /// Samples on the example config again after the big list.
    pub back: Vec<u64>,
    /// Kernel memory of the cgroup on the example config (cgroup v1), and
    /// whether the usage figure includes it.
    pub kmem_small: Option<u64>,
    pub kmem_counted: Option<bool>,
    /// (example lists, big list) for each peer, bytes.
    pub nft: Option<(u64, u64)>,
    pub ipset: Option<(u64, u64)>,
    pub big_prefixes: usize,
    pub reload_big: Duration,
    pub reload_back: Duration,
    pub notes: Vec<String>,
}

impl MemoryResults {
    pub fn small_median(&self) -> f64 {
        median(&self.small.iter().map(|&b| b as f64).collect::<Vec<_>>())
    }

    pub fn back_median(&self) -> f64 {
        median(&self.back.iter().map(|&b| b as f64).collect::<Vec<_>>())
    }
}

/// A memory cgroup (v1 or v2) of its own beside the bench's, removed on drop.
pub struct MemCgroup {
    pub dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    pub fn new(name: &str) -> anyhow::Result<MemCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
        let v1 = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
        let (dir, v2) = match v1 {
            Some(p) => (PathBuf::from(format!("/sys/fs/cgroup/memory{p}")).join(name), false),
            None => {
                let p = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .context("no memory cgroup (neither v1's memory controller nor v2)")?;
                (PathBuf::from(format!("/sys/fs/cgroup{p}")).join(name), true)
            }
        };
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).with_context(|| format!("create the cgroup {}", dir.display()))?;
        record(format!("mkdir {}", dir.display()));
        Ok(MemCgroup { dir, v2 })
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn read(&self, v2: &str, v1: &str) -> anyhow::Result<u64> {
        let f = self.dir.join(if self.v2 { v2 } else { v1 });
        let s = std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?;
        s.trim()
            .parse()
            .with_context(|| format!("{}: not a number", f.display()))
    }

    pub fn current(&self) -> anyhow::Result<u64> {
        self.read("memory.current", "memory.usage_in_bytes")
    }

    pub fn peak(&self) -> anyhow::Result<u64> {
        self.read("memory.peak", "memory.max_usage_in_bytes")
    }

    /// Kernel memory (v1's `memory.kmem.usage_in_bytes`; v2: `kernel` of memory.stat).
    pub fn kmem(&self) -> Option<u64> {
        if self.v2 {
            let s = std::fs::read_to_string(self.dir.join("memory.stat")).ok()?;
            s.lines().find_map(|l| l.strip_prefix("kernel ")?.trim().parse().ok())
        } else {
            self.read("", "memory.kmem.usage_in_bytes").ok()
        }
    }

    /// Resets the peak to the usage now.
    pub fn reset_peak(&self) -> anyhow::Result<()> {
        let f = self.dir.join(if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        });
        std::fs::write(&f, if self.v2 { "reset" } else { "0" }).with_context(|| format!("reset {}", f.display()))
    }

    /// `SAMPLES` readings of the usage, 300 ms apart.
    fn samples(&self) -> anyhow::Result<Vec<u64>> {
        let mut v = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            check_stop()?;
            v.push(self.current()?);
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(v)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The example config, guarding the bench's receiver interface, its office
/// list (`198.51.100.7`) moved into `allow_files` at `office`.
fn example_config(dir: &Path, office: &Path, pin_dir: &Path) -> anyhow::Result<PathBuf> {
    let example = workspace_root().join("deploy").join("relay-guard.example.toml");
    let text = std::fs::read_to_string(&example).with_context(|| format!("read {}", example.display()))?;
    let state = dir.join("mem-state");
    let mut out = String::new();
    let mut replaced = 0;
    for line in text.lines() {
        let l = if line.starts_with("interfaces = ") {
            replaced += 1;
            format!("interfaces = [\"{RCV_IF}\"]")
        } else if line.starts_with("pin_dir = ") {
            replaced += 1;
            format!("pin_dir = \"{}\"", pin_dir.display())
        } else if line.starts_with("state_dir = ") {
            replaced += 1;
            format!("state_dir = \"{}\"", state.display())
        } else if line.starts_with("# allow_files = ") {
            replaced += 1;
            format!("allow_files = [\"{}\"]", office.display())
        } else if line.starts_with("allow = [") && line.contains("\"198.51.100.7\"") {
            line.replace(", \"198.51.100.7\"", "")
        } else {
            line.to_string()
        };
        out.push_str(&l);
        out.push('\n');
    }
    if replaced != 4 {
        bail!(
            "{}: expected interfaces, pin_dir, state_dir and a commented allow_files line",
            example.display()
        );
    }
    let path = dir.join("config-memory.toml");
    std::fs::write(&path, out).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// The office list as the example config has it.
const OFFICE: &str = "198.51.100.7\n";

/// Replaces `path` as an editor does (write, rename).
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

pub fn run(plan: &Plan, lab: &Lab, dir: &Path) -> anyhow::Result<MemoryResults> {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let mut res = MemoryResults {
        big_prefixes: BIG,
        ..MemoryResults::default()
    };
    println!("bench: memory: generating {BIG} prefixes (seed {})", plan.seed);
    let big = prefixes::generate(BIG, plan.seed);
    let big_path = dir.join("memory-big.txt");
    prefixes::write_list(&big_path, &big)?;
    let big_bytes = std::fs::read(&big_path)?;
    let office = dir.join("memory-office.txt");
    std::fs::write(&office, OFFICE)?;
    let config = example_config(dir, &office, &plan.pin_dir)?;

    {
        let cg = MemCgroup::new(&format!("rg-bench-mem-{}", std::process::id()))?;
        println!("bench: memory: the agent on the example config in {}", cg.dir.display());
        let mut agent = Agent::spawn_in(&plan.agent, &lab.rcv, &config, &plan.pin_dir, Some(&cg.procs()))?;
        wait_metrics(&lab.rcv, Duration::from_secs(120))
            .with_context(|| format!("agent start; log:\n{}", agent.log()))?;
        sleep(Duration::from_secs(2))?;
        res.small = cg.samples()?;
        res.kmem_small = cg.kmem();
        res.kmem_counted = res.kmem_small.map(|k| res.small.iter().all(|&u| u >= k));
        println!(
            "bench:   example config: {:.1} MiB (samples {}), kernel memory {}",
            mib(res.small_median() as u64),
            res.small
                .iter()
                .map(|&b| format!("{:.1}", mib(b)))
                .collect::<Vec<_>>()
                .join(", "),
            res.kmem_small.map_or("-".into(), |k| format!("{:.1} MiB", mib(k)))
        );

        cg.reset_peak()?;
        let from = agent.line_count();
        let t = Instant::now();
        replace(&office, &big_bytes)?;
        let (i, _, _) = agent.wait_line(from, "config reloaded", Duration::from_secs(600))?;
        res.reload_big = t.elapsed();
        sleep(Duration::from_secs(2))?;
        res.big = cg.current()?;
        res.peak = cg.peak()?;
        println!(
            "bench:   {BIG} prefixes: {:.1} MiB, peak {:.1} MiB over the reload ({:.1} s)",
            mib(res.big),
            mib(res.peak),
            res.reload_big.as_secs_f64()
        );

        let t = Instant::now();
        replace(&office, OFFICE.as_bytes())?;
        agent.wait_line(i + 1, "config reloaded", Duration::from_secs(600))?;
        res.reload_back = t.elapsed();
        sleep(Duration::from_secs(2))?;
        res.back = cg.samples()?;
        println!(
            "bench:   back on the example config: {:.1} MiB (samples {})",
            mib(res.back_median() as u64),
            res.back
                .iter()
                .map(|&b| format!("{:.1}", mib(b)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        agent.stop();
        drop(agent);
    }

    // The peers, each in a cgroup of its own, with the example's lists and
    // then the big one.
    let example: Vec<IpNet> = [
        "127.0.0.0/8",
        "::1/128",
        "192.0.2.0/24",
        "2001:db8:10::/48",
        "198.51.100.7/32",
        "203.0.113.0/24",
    ]
    .iter()
    .map(|s| s.parse().expect("constant"))
    .collect();
    for peer in ["nft", "ipset"] {
        check_stop()?;
        let mut figures = [0u64; 2];
        for (k, list) in [&example[..], &big[..]].into_iter().enumerate() {
            let file = dir.join(format!("memory-{peer}-{k}"));
            let (cmd, undo): (Vec<String>, Vec<Vec<&str>>) = match peer {
                "nft" => {
                    prefixes::write_nft(&file, super::load::NFT_TABLE, list)?;
                    (
                        vec!["nft".into(), "-f".into(), file.display().to_string()],
                        vec![vec!["nft", "delete", "table", "inet", super::load::NFT_TABLE]],
                    )
                }
                _ => {
                    prefixes::write_ipset(&file, list, super::load::IPSET_V4, super::load::IPSET_V6)?;
                    (
                        vec![
                            "ipset".into(),
                            "restore".into(),
                            "-f".into(),
                            file.display().to_string(),
                        ],
                        vec![
                            vec!["ipset", "destroy", super::load::IPSET_V4],
                            vec!["ipset", "destroy", super::load::IPSET_V6],
                        ],
                    )
                }
            };
            let cg = MemCgroup::new(&format!("rg-bench-mem-{peer}-{}", std::process::id()))?;
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("echo $$ > \"$0\" && exec \"$@\"")
                .arg(cg.procs())
                .arg("nsenter")
                .arg(format!("--net={}", lab.rcv.path().display()))
                .args(&cmd);
            record(show(&c));
            let r = output(&mut c);
            sleep(Duration::from_millis(500))?;
            let used = cg.current();
            for u in undo {
                let _ = lab.rcv.sh(&u);
            }
            r.with_context(|| format!("{peer} with {} prefixes", list.len()))?;
            figures[k] = used?;
        }
        println!(
            "bench:   {peer}: {:.1} MiB with the example's lists, {:.1} MiB with {BIG} prefixes",
            mib(figures[0]),
            mib(figures[1])
        );
        match peer {
            "nft" => res.nft = Some((figures[0], figures[1])),
            _ => res.ipset = Some((figures[0], figures[1])),
        }
    }
    res.notes.push(
        "xdp-filter: not measured (its maps hold exact addresses only, 10,000 per family in the per-packet part; a list of prefixes does not fit them)".into(),
    );
    Ok(res)
}
