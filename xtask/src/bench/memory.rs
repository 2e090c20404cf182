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
//! the second and says so. Where the memory is ([`Split`]: anonymous, page
//! cache, kernel) is read on the example config, with the big list, and at
//! the highest of the readings taken every 50 ms during the big reload.
//!
//! [`section`] renders the part for benchmarks.md: the figures, and
//! relay-guard's as ratios of the peers' with the same lists.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
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
    /// Where the memory is: on the example config, with the big list, and
    /// at the highest reading during the big reload (50 ms apart; the
    /// peak counter may be higher than any reading).
    pub split_small: Option<Split>,
    pub split_big: Option<Split>,
    pub split_peak: Option<Split>,
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

/// A cgroup's memory by kind, bytes: `usage` (the figure the targets
/// judge), `anon` (the agent's heap and stacks: v1 `total_rss`, v2
/// `anon`), `file` (page cache: v1 `total_cache`, v2 `file`), `kernel` (BPF
/// maps among it: v1 `memory.kmem.usage_in_bytes`, v2 `kernel`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Split {
    pub usage: u64,
    pub anon: u64,
    pub file: u64,
    pub kernel: u64,
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

    /// Where the memory is now.
    pub fn split(&self) -> anyhow::Result<Split> {
        let f = self.dir.join("memory.stat");
        let stat = std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?;
        let field = |name: &str| -> u64 {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0)
        };
        let usage = self.current()?;
        Ok(if self.v2 {
            Split {
                usage,
                anon: field("anon"),
                file: field("file"),
                kernel: field("kernel"),
            }
        } else {
            Split {
                usage,
                anon: field("total_rss"),
                file: field("total_cache"),
                kernel: self.kmem().unwrap_or(0),
            }
        })
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
        res.split_small = cg.split().ok();
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
        // Readings during the reload, the highest kept with its split.
        let stop = Arc::new(AtomicBool::new(false));
        let highest = std::thread::scope(|sc| {
            let sampler = sc.spawn(|| {
                let mut top: Option<Split> = None;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = cg.split()
                        && top.is_none_or(|t| s.usage > t.usage)
                    {
                        top = Some(s);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                top
            });
            let r = agent.wait_line(from, "config reloaded", Duration::from_secs(600));
            stop.store(true, Ordering::Relaxed);
            (r, sampler.join().ok().flatten())
        });
        let (i, _, _) = highest.0?;
        res.split_peak = highest.1;
        res.reload_big = t.elapsed();
        sleep(Duration::from_secs(2))?;
        res.big = cg.current()?;
        res.peak = cg.peak()?;
        res.split_big = cg.split().ok();
        println!(
            "bench:   {BIG} prefixes: {:.1} MiB, peak {:.1} MiB over the reload ({:.1} s)",
            mib(res.big),
            mib(res.peak),
            res.reload_big.as_secs_f64()
        );
        for (what, sp) in [
            ("example config", res.split_small),
            ("big list", res.split_big),
            ("highest reading of the reload", res.split_peak),
        ] {
            if let Some(sp) = sp {
                println!(
                    "bench:     {what}: {:.1} MiB = anonymous {:.1} + page cache {:.1} + kernel {:.1} MiB",
                    mib(sp.usage),
                    mib(sp.anon),
                    mib(sp.file),
                    mib(sp.kernel)
                );
            }
        }

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

/// The memory part of benchmarks.md: the figures (each idle figure with its
/// samples' spread), relay-guard's as ratios of the peers' with the same
/// lists, and where the memory is.
pub fn section(m: &MemoryResults) -> String {
    use std::fmt::Write as _;
    let mib = |b: f64| b / f64::from(1 << 20);
    let spread = |v: &[u64]| {
        let lo = v.iter().min().copied().unwrap_or(0) as f64;
        let hi = v.iter().max().copied().unwrap_or(0) as f64;
        format!("{:.1}–{:.1}", mib(lo), mib(hi))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "The memory cgroup's usage (`memory.usage_in_bytes` on cgroup v1, `memory.current` on v2), which holds the BPF maps the process creates as well as its own memory. relay-guard: the release agent on `deploy/relay-guard.example.toml` (its office list in `allow_files`), in a cgroup of its own, sampled {SAMPLES} times 300 ms apart once idle; then the office list replaced by {} prefixes (the bench's generated mix) and reloaded, the peak counter reset first; then the list put back and sampled again. nftables and ipset: `nft -f` (one interval set per family) and `ipset restore` (one hash:net set per family) in a cgroup each, read after the command exits (the sets stay charged to it). Kernel memory {}.\n",
        m.big_prefixes,
        match (m.kmem_small, m.kmem_counted) {
            (Some(k), Some(true)) => format!(
                "is included: {:.1} MiB of the example-config figure is kernel memory (`memory.kmem.usage_in_bytes`)",
                mib(k as f64)
            ),
            (Some(k), _) => format!(
                "is NOT included in the usage on this kernel ({:.1} MiB of kernel memory not counted)",
                mib(k as f64)
            ),
            _ => "was not read separately".into(),
        }
    );
    let _ = writeln!(
        s,
        "| | example config | {} prefixes | peak during the reload | back on the example config |\n| --- | ---: | ---: | ---: | ---: |",
        m.big_prefixes
    );
    let (small, back) = (m.small_median(), m.back_median());
    let _ = writeln!(
        s,
        "| relay-guard (agent + maps) | {:.1} MiB ({}) | {:.1} MiB | {:.1} MiB | {:.1} MiB ({}) = {:.2}x the first |",
        mib(small),
        spread(&m.small),
        mib(m.big as f64),
        mib(m.peak as f64),
        mib(back),
        spread(&m.back),
        back / small
    );
    let peers = [("nftables sets", m.nft), ("ipset hash:net", m.ipset)];
    for (name, f) in peers {
        match f {
            Some((a, b)) => {
                let _ = writeln!(
                    s,
                    "| {name} | {:.1} MiB | {:.1} MiB | | |",
                    mib(a as f64),
                    mib(b as f64)
                );
            }
            None => {
                let _ = writeln!(s, "| {name} | not measured | | | |");
            }
        }
    }
    for (name, f) in peers {
        if let Some((a, b)) = f {
            let ratio = |x: f64, y: u64| {
                if y == 0 {
                    "-".into()
                } else {
                    format!("{:.1}x", x / y as f64)
                }
            };
            let _ = writeln!(
                s,
                "| relay-guard ÷ {name} | {} | {} | {} (of the peer's steady figure) | |",
                ratio(small, a),
                ratio(m.big as f64, b),
                ratio(m.peak as f64, b)
            );
        }
    }
    let _ = writeln!(
        s,
        "\nWhere relay-guard's memory is (the cgroup's `memory.stat`; kernel memory holds the BPF maps; the reload's column is the highest of the readings taken every 50 ms, the peak counter can be higher):\n"
    );
    let _ = writeln!(
        s,
        "| | example config | {} prefixes | highest reading during the reload |\n| --- | ---: | ---: | ---: |",
        m.big_prefixes
    );
    let splits = [m.split_small, m.split_big, m.split_peak];
    let cell =
        |sp: Option<Split>, f: fn(&Split) -> u64| sp.map_or("-".into(), |x| format!("{:.1} MiB", mib(f(&x) as f64)));
    for (what, f) in [
        ("usage", (|x: &Split| x.usage) as fn(&Split) -> u64),
        ("anonymous (the agent's heap)", |x: &Split| x.anon),
        ("page cache", |x: &Split| x.file),
        ("kernel (BPF maps among it)", |x: &Split| x.kernel),
    ] {
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {} |",
            cell(splits[0], f),
            cell(splits[1], f),
            cell(splits[2], f)
        );
    }
    let _ = writeln!(
        s,
        "\nReloads: to {} prefixes {:.1} s, back {:.1} s (list replaced to `config reloaded`).\n",
        m.big_prefixes,
        m.reload_big.as_secs_f64(),
        m.reload_back.as_secs_f64()
    );
    s
}
