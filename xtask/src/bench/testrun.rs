//! Part 1: per-packet cost through `BPF_PROG_TEST_RUN`, and the library's
//! cold load and one-line diff sync.
//!
//! For each allowlist size: parse the config (its `allow_files` list),
//! `Policy::compile`, `Loaded::load`, `sync::apply` (each timed), then
//! test-run every packet on the no-op floor, relay-guard and xdp-filter,
//! `runs` times each, interleaved (run-major, then packet, then program), so
//! a burst of noise from the rest of the machine hits all of them alike.
use std::{
    os::fd::AsFd as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::IpNet;
use relay_guard::{
    config::Config,
    kernel::{loader::Loaded, sync},
    policy::Policy,
};

use super::{
    bpf::{self, XDP_DROP, XDP_PASS},
    frames,
    peers::{XDP_FILTER_CAPACITY, XdpFilter},
    plan::{Lab, Plan, RCV_IF},
    prefixes::{self, ALLOWED_V4, BESIDE_V6, DENIED_V4, DENIED_V6, SERVER_V4, SERVER_V6},
    sys::{check_stop, median, record},
};

/// The programs test-run side by side.
pub const PROGS: [&str; 3] = ["no-op XDP (floor)", "relay-guard", "xdp-filter"];
pub const FLOOR: usize = 0;
pub const RG: usize = 1;
pub const XF: usize = 2;

/// The packets, and the verdict each program must return for them.
pub struct Packet {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// Expected verdict per program (floor, relay-guard, xdp-filter).
    pub expect: [u32; 3],
}

pub const DENIED_SYN_V4: usize = 0;
pub const DENIED_SYN_V6: usize = 2;
/// The IPv6 trie's worst case: a source between two /128s that share all
/// but their last bits.
pub const BESIDE_SYN_V6: usize = 4;

pub fn packets() -> Vec<Packet> {
    vec![
        Packet {
            name: "denied IPv4 SYN :25",
            frame: frames::syn_v4(DENIED_V4, SERVER_V4, 25),
            expect: [XDP_PASS, XDP_DROP, XDP_DROP],
        },
        Packet {
            name: "allowed IPv4 SYN :25",
            frame: frames::syn_v4(ALLOWED_V4, SERVER_V4, 25),
            expect: [XDP_PASS, XDP_PASS, XDP_PASS],
        },
        Packet {
            name: "denied IPv6 SYN :25",
            frame: frames::syn_v6(DENIED_V6, SERVER_V6, 25),
            expect: [XDP_PASS, XDP_DROP, XDP_DROP],
        },
        Packet {
            // xdp-filter has no notion of ports: the source is on its list, so it drops.
            name: "IPv4 SYN :443",
            frame: frames::syn_v4(DENIED_V4, SERVER_V4, 443),
            expect: [XDP_PASS, XDP_PASS, XDP_DROP],
        },
        Packet {
            name: "denied IPv6 SYN beside /128s",
            frame: frames::syn_v6(BESIDE_V6, SERVER_V6, 25),
            expect: [XDP_PASS, XDP_DROP, XDP_DROP],
        },
    ]
}

/// Median per-packet cost of one program on one packet.
#[derive(Debug, Clone)]
pub struct Cost {
    pub median_ns: f64,
    pub min_ns: u32,
    pub max_ns: u32,
    pub verdict: u32,
    pub expected: u32,
}

impl Cost {
    pub fn ok(&self) -> bool {
        self.verdict == self.expected
    }
}

/// The library's cold load of one list.
#[derive(Debug, Clone, Default)]
pub struct LibLoad {
    pub parse: Duration,
    pub compile: Duration,
    pub load: Duration,
    pub sync: Duration,
    pub written: usize,
}

impl LibLoad {
    /// Policy::compile + Loaded::load + sync::apply (the config parse is
    /// reported apart).
    pub fn apply_total(&self) -> Duration {
        self.compile + self.load + self.sync
    }
}

#[derive(Debug, Clone)]
pub struct SizeCosts {
    pub size: usize,
    pub v4: usize,
    pub v6: usize,
    pub lib: LibLoad,
    /// Entries in xdp-filter's (IPv4, IPv6) maps during these runs.
    pub xdp_filter_entries: Option<(usize, usize)>,
    /// `cost[program][packet]`.
    pub cost: Vec<Vec<Option<Cost>>>,
}

/// One-line change applied to the loaded largest list.
#[derive(Debug, Clone)]
pub struct DiffSync {
    pub size: usize,
    /// `Live::reload` of the edited list file: what the agent does on a reload.
    pub delta: Vec<Duration>,
    /// Lines it parsed and kernel entries it wrote, removed (last run).
    pub delta_lines: usize,
    pub delta_written: usize,
    pub delta_removed: usize,
    /// A full `sync::apply` of the changed policy, for comparison.
    pub apply: Vec<Duration>,
    pub parse: Duration,
    pub compile: Duration,
    pub written: usize,
    pub removed: usize,
    pub line: String,
}

impl DiffSync {
    pub fn delta_median(&self) -> Duration {
        Duration::from_secs_f64(median(
            &self.delta.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        ))
    }

    pub fn apply_median(&self) -> Duration {
        Duration::from_secs_f64(median(
            &self.apply.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        ))
    }
}

pub struct Output {
    pub sizes: Vec<SizeCosts>,
    pub diff: Option<DiffSync>,
    /// relay-guard loaded with the largest list, for the end-to-end part.
    pub loaded: Option<Loaded>,
    pub notes: Vec<String>,
    pub program_names: [String; 3],
}

/// Writes `<dir>/config-<tag>.toml` naming `<dir>/allow-<tag>.txt` and
/// returns the config's path and text.
pub fn write_config(
    dir: &Path,
    tag: &str,
    list: &[IpNet],
    pin_dir: &Path,
) -> anyhow::Result<(std::path::PathBuf, String)> {
    let list_path = dir.join(format!("allow-{tag}.txt"));
    prefixes::write_list(&list_path, list)?;
    let text = format!(
        "interfaces = [\"{RCV_IF}\"]\nmode = \"enforce\"\nxdp_mode = \"native\"\nmetrics_listen = \"127.0.0.1:10947\"\npin_dir = \"{}\"\n\n[[guard]]\nname = \"relay\"\nports = [25, 465, 587]\nallow_files = [\"allow-{tag}.txt\"]\n",
        pin_dir.display()
    );
    let path = dir.join(format!("config-{tag}.toml"));
    std::fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
    Ok((path, text))
}

fn parse(path: &Path, text: &str) -> anyhow::Result<Config> {
    Config::parse(path, text).map_err(|e| anyhow::anyhow!("bench config is invalid:\n{e}"))
}

pub fn run(plan: &Plan, lab: &Lab, dir: &Path, list: &[IpNet]) -> anyhow::Result<Output> {
    let mut notes = Vec::new();
    let noop = bpf::load_noop().context("loading the no-op XDP program (BPF_PROG_LOAD)")?;
    let xf = match XdpFilter::load(&lab.rcv, RCV_IF) {
        Ok(xf) => {
            // Its denylist always holds the denied test sources.
            xf.add(&[DENIED_V4], &[DENIED_V6, BESIDE_V6])?;
            Some(xf)
        }
        Err(e) => {
            notes.push(format!("xdp-filter not measured: {e:#}"));
            None
        }
    };
    let program_names = [
        "rg_bench_noop".to_string(),
        relay_guard::PROGRAM_NAME.to_string(),
        xf.as_ref().map_or_else(|| "-".to_string(), |x| x.program_name.clone()),
    ];
    record(format!(
        "bpf(BPF_PROG_TEST_RUN, {{ prog_fd, data_in: <74/94-byte SYN frame>, repeat: {} }}) x {} runs per program and packet; median of the kernel's mean ns/run",
        plan.repeat, plan.runs
    ));
    let packets = packets();
    let max = *plan.sizes.last().expect("sizes is not empty");
    let mut sizes = Vec::new();
    let mut keep = None;
    let mut xf_have = (0usize, 0usize);
    for &size in &plan.sizes {
        check_stop()?;
        let sub = &list[..size];
        let (cfg_path, text) = write_config(dir, &size.to_string(), sub, &plan.pin_dir)?;
        println!("bench: test-run at {size} prefixes: loading");
        let mut lib = LibLoad::default();
        let t = Instant::now();
        let cfg = parse(&cfg_path, &text)?;
        lib.parse = t.elapsed();
        let t = Instant::now();
        let policy = Policy::compile(&cfg);
        lib.compile = t.elapsed();
        drop(cfg);
        let t = Instant::now();
        let mut loaded = Loaded::load().context("Loaded::load")?;
        lib.load = t.elapsed();
        let t = Instant::now();
        let stats = sync::apply(&mut loaded.maps, &policy).context("sync::apply")?;
        lib.sync = t.elapsed();
        lib.written = stats.written;
        drop(policy);

        let mut xdp_filter_entries = None;
        if let Some(xf) = &xf {
            // As many of the list's addresses as it holds (one or two slots
            // per family already hold the denied test sources).
            let (v4, v6) = prefixes::exact_addresses(sub, XDP_FILTER_CAPACITY - 2);
            xf.add(&v4[xf_have.0.min(v4.len())..], &v6[xf_have.1.min(v6.len())..])?;
            xf_have = (v4.len(), v6.len());
            xdp_filter_entries = Some(xf.entries()?);
        }

        println!(
            "bench: test-run at {size} prefixes: {} runs x {} packets x {} programs, repeat {}",
            plan.runs,
            packets.len(),
            PROGS.len(),
            plan.repeat
        );
        let rg_fd = loaded
            .program()
            .fd()
            .context("relay-guard program fd")?
            .as_fd()
            .try_clone_to_owned()?;
        let fds = [Some(noop.as_fd()), Some(rg_fd.as_fd()), xf.as_ref().map(XdpFilter::fd)];
        let mut samples: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); packets.len()]; PROGS.len()];
        let mut verdicts: Vec<Vec<Option<u32>>> = vec![vec![None; packets.len()]; PROGS.len()];
        for _ in 0..plan.runs {
            for (pi, p) in packets.iter().enumerate() {
                for (gi, fd) in fds.iter().enumerate() {
                    check_stop()?;
                    let Some(fd) = fd else { continue };
                    let (verdict, ns) = bpf::test_run(*fd, &p.frame, plan.repeat)
                        .with_context(|| format!("BPF_PROG_TEST_RUN of {} on {}", PROGS[gi], p.name))?;
                    if verdicts[gi][pi].is_some_and(|v| v != verdict) {
                        notes.push(format!(
                            "{} returned different verdicts for {} at {size} prefixes",
                            PROGS[gi], p.name
                        ));
                    }
                    verdicts[gi][pi] = Some(verdict);
                    samples[gi][pi].push(ns);
                }
            }
        }
        let cost: Vec<Vec<Option<Cost>>> = (0..PROGS.len())
            .map(|gi| {
                (0..packets.len())
                    .map(|pi| {
                        let s = &samples[gi][pi];
                        let verdict = verdicts[gi][pi]?;
                        Some(Cost {
                            median_ns: median(&s.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()),
                            min_ns: *s.iter().min()?,
                            max_ns: *s.iter().max()?,
                            verdict,
                            expected: packets[pi].expect[gi],
                        })
                    })
                    .collect()
            })
            .collect();
        for (gi, row) in cost.iter().enumerate() {
            for (pi, c) in row.iter().enumerate() {
                if let Some(c) = c.as_ref().filter(|c| !c.ok()) {
                    notes.push(format!(
                        "WRONG VERDICT: {} returned {} for {} at {size} prefixes (expected {})",
                        PROGS[gi],
                        verdict_name(c.verdict),
                        packets[pi].name,
                        verdict_name(c.expected)
                    ));
                }
            }
        }
        let v4 = sub.iter().filter(|n| matches!(n, IpNet::V4(_))).count();
        let sc = SizeCosts {
            size,
            v4,
            v6: size - v4,
            lib,
            xdp_filter_entries,
            cost,
        };
        print_size(&sc, &packets);
        sizes.push(sc);
        if size == max {
            keep = Some(loaded);
        }
    }
    drop(xf);

    let mut diff = None;
    if let Some(loaded) = keep.as_mut() {
        check_stop()?;
        diff = Some(diff_sync(plan, dir, list, loaded)?);
    }
    Ok(Output {
        sizes,
        diff,
        loaded: keep,
        notes,
        program_names,
    })
}

/// Applies a list that differs from the loaded one in its last line, then
/// the original again, alternately; each `sync::apply` is one added and one
/// removed prefix. Ends with the original list loaded.
fn diff_sync(plan: &Plan, dir: &Path, list: &[IpNet], loaded: &mut Loaded) -> anyhow::Result<DiffSync> {
    let max = *plan.sizes.last().expect("sizes is not empty");
    let original = &list[..max];
    let mut changed = original.to_vec();
    let fresh = prefixes::fresh(original, plan.seed);
    let line = format!("{} -> {fresh}", changed[max - 1]);
    changed[max - 1] = fresh;
    println!(
        "bench: one-line change at {max} prefixes ({line}): {} diff syncs",
        plan.diff_runs
    );
    let (p0, t0) = write_config(dir, &format!("{max}"), original, &plan.pin_dir)?;
    let (p1, t1) = write_config(dir, &format!("{max}-changed"), &changed, &plan.pin_dir)?;
    let policy0 = Policy::compile(&parse(&p0, &t0)?);
    let t = Instant::now();
    let cfg1 = parse(&p1, &t1)?;
    let parse_time = t.elapsed();
    let t = Instant::now();
    let policy1 = Policy::compile(&cfg1);
    let compile = t.elapsed();
    drop(cfg1);
    let mut apply = Vec::new();
    let (mut written, mut removed) = (0, 0);
    for i in 0..plan.diff_runs {
        check_stop()?;
        let p = if i % 2 == 0 { &policy1 } else { &policy0 };
        let t = Instant::now();
        let stats = sync::apply(&mut loaded.maps, p).context("sync::apply (one-line change)")?;
        apply.push(t.elapsed());
        written = written.max(stats.written);
        removed = removed.max(stats.removed);
    }
    if plan.diff_runs % 2 == 1 {
        sync::apply(&mut loaded.maps, &policy0).context("sync::apply (back to the original list)")?;
    }
    drop((policy0, policy1));

    // The agent's path: the list file edited in place, `Live::reload`.
    let (cfg0, index) = Config::load_indexed(&p0).map_err(|e| anyhow::anyhow!("bench config is invalid:\n{e}"))?;
    let policy = Policy::compile(&cfg0);
    drop(cfg0);
    let (_, shadow, _) = sync::apply_full(&mut loaded.maps, &policy, None, &[]).context("sync::apply_full")?;
    let cfg0 = Config::parse(&p0, &t0).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut live = relay_guard::agent::incremental::Live::new(&cfg0, index, policy, shadow);
    drop(cfg0);
    let list0 = dir.join(format!("allow-{max}.txt"));
    let mut delta = Vec::new();
    let (mut delta_lines, mut delta_written, mut delta_removed) = (0, 0, 0);
    for i in 0..plan.diff_runs.max(2) {
        check_stop()?;
        prefixes::write_list(&list0, if i % 2 == 0 { &changed } else { original })?;
        let t = Instant::now();
        let applied = live
            .reload(&mut loaded.maps, &p0)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .context("a one-line edit must be applied as a delta")?;
        delta.push(t.elapsed());
        delta_lines = applied.lines;
        delta_written = applied.stats.written;
        delta_removed = applied.stats.removed;
    }
    if plan.diff_runs.max(2) % 2 == 1 {
        prefixes::write_list(&list0, original)?;
        live.reload(&mut loaded.maps, &p0).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    drop(live);
    let d = DiffSync {
        size: max,
        delta,
        delta_lines,
        delta_written,
        delta_removed,
        apply,
        parse: parse_time,
        compile,
        written,
        removed,
        line,
    };
    println!(
        "bench:   delta reload median {:.1} ms ({} lines parsed, written {}, removed {}); full sync::apply median {:.1} ms (written {}, removed {}); re-parse {:.0} ms, compile {:.0} ms",
        ms(d.delta_median()),
        d.delta_lines,
        d.delta_written,
        d.delta_removed,
        ms(d.apply_median()),
        d.written,
        d.removed,
        ms(d.parse),
        ms(d.compile)
    );
    Ok(d)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn verdict_name(v: u32) -> &'static str {
    match v {
        0 => "ABORTED",
        1 => "DROP",
        2 => "PASS",
        3 => "TX",
        4 => "REDIRECT",
        _ => "?",
    }
}

fn print_size(sc: &SizeCosts, packets: &[Packet]) {
    println!(
        "bench:   {} prefixes ({} IPv4, {} IPv6): parse {:.0} ms, compile {:.0} ms, load {:.0} ms, sync {:.0} ms",
        sc.size,
        sc.v4,
        sc.v6,
        ms(sc.lib.parse),
        ms(sc.lib.compile),
        ms(sc.lib.load),
        ms(sc.lib.sync)
    );
    for (pi, p) in packets.iter().enumerate() {
        let cell = |gi: usize| match &sc.cost[gi][pi] {
            Some(c) => format!("{:>6.1} ns {:<4}", c.median_ns, verdict_name(c.verdict)),
            None => format!("{:>12}", "-"),
        };
        println!(
            "bench:   {:<22} floor {}  relay-guard {}  xdp-filter {}",
            p.name,
            cell(FLOOR),
            cell(RG),
            cell(XF)
        );
    }
}
