//! Processes, namespaces, scratch files and /proc readings for the bench,
//! each cleaned up by a `Drop` guard (also when a step fails or the user
//! presses Ctrl-C: the handler only sets a flag, so the guards still run).
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

static STOP: AtomicBool = AtomicBool::new(false);
static RECORDED: Mutex<Vec<String>> = Mutex::new(Vec::new());

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag that [`check_stop`] turns into an error, so the
/// bench unwinds through its guards instead of dying with namespaces left.
pub fn install_signal_handlers() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

pub fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early (with an error) when interrupted.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        check_stop()?;
        std::thread::sleep((end - std::time::Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// Notes a command for the report's "exact commands" list (once each).
pub fn record(cmd: impl Into<String>) {
    let cmd = cmd.into();
    let mut v = RECORDED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !v.contains(&cmd) {
        v.push(cmd);
    }
}

pub fn recorded() -> Vec<String> {
    RECORDED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

pub fn show(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| {
            let s = a.to_string_lossy();
            if s.contains([' ', '{', '}', '"']) {
                format!("'{s}'")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `c`, returning its stdout; an error carries its stderr.
pub fn output(c: &mut Command) -> anyhow::Result<String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start {}", show(c)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            show(c),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    output(Command::new(args[0]).args(&args[1..]))
}

/// A network namespace made with `ip netns add`, deleted on drop (which also
/// removes its interfaces, XDP attachments, nft tables, ipsets and iptables
/// rules).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> anyhow::Result<NetNs> {
        if Path::new("/run/netns").join(name).exists() {
            // Left by an interrupted run of the same pid: not ours to keep.
            let _ = sh(&["ip", "netns", "del", name]);
        }
        sh(&["ip", "netns", "add", name])?;
        let ns = NetNs { name: name.to_string() };
        ns.sh(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `nsenter --net=<ns> PROGRAM`: the network namespace only, so
    /// /sys/fs/bpf stays the host's bpffs (`ip netns exec` would remount /sys).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg(program);
        c
    }

    pub fn sh(&self, args: &[&str]) -> anyhow::Result<String> {
        output(self.cmd(args[0]).args(&args[1..]))
    }

    /// Runs `f` on a thread that has entered this namespace (interface
    /// indexes, XDP attach and sockets are per namespace).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || -> anyhow::Result<T> {
                let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
                setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {}", path.display()))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> anyhow::Result<TempDir> {
        let d = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        Ok(TempDir(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Softirq time of all CPUs so far (from /proc/stat, in nanoseconds). The
/// kernel samples it per tick (CONFIG_TICK_CPU_ACCOUNTING) unless it has
/// CONFIG_IRQ_TIME_ACCOUNTING; ksoftirqd's time running softirqs counts too.
pub fn softirq_ns() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    // cpu user nice system idle iowait irq softirq steal ...
    let ticks: u64 = line
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .context("/proc/stat: no softirq field")?;
    Ok(ticks * 1_000_000_000 / clock_ticks())
}

pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Whether the kernel accounts softirq time precisely or by tick sampling.
pub fn irq_time_accounting() -> Option<bool> {
    let mut text = String::new();
    if let Ok(out) = Command::new("zcat").arg("/proc/config.gz").output() {
        text = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    if text.is_empty() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        text = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    }
    Some(text.lines().any(|l| l == "CONFIG_IRQ_TIME_ACCOUNTING=y"))
}

/// `VmHWM` (peak resident set) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The machine line of the report.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub mem_gib: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(std::num::NonZero::get)
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores,
        kernel,
        mem_gib: mem_kib / 1024.0 / 1024.0,
    }
}

/// First line of a tool's version output (for the report).
pub fn version(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}
