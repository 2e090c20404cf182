//! The contenders relay-guard is measured against, each behind a guard that
//! removes what it set up.
//!
//! - xdp-filter (xdp-tools): `--policy allow --features ipv4,ipv6`, the
//!   program `xdpfilt_alw_ip`, which drops packets whose address is in its
//!   per-CPU hash maps (10,000 exact addresses per family). Loaded with
//!   `LIBXDP_SKIP_DISPATCHER=1`, so its program is attached directly and
//!   test-runs without libxdp's dispatcher in front: the strictest
//!   comparison for relay-guard. Its maps are filled through their pins, the
//!   same entries `xdp-filter ip --mode src ADDR` writes (value: the
//!   source-match flag on every CPU), 10,000 addresses in milliseconds
//!   instead of 10,000 processes.
//! - nftables: an `inet` table with one `flags interval; auto-merge` set per
//!   family, and a rule in a prerouting chain at raw priority.
//! - iptables + ipset: `hash:net` sets and a `raw` PREROUTING rule.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::{Map, MapData, PerCpuHashMap, PerCpuValues},
    programs::{ProgramFd, ProgramInfo},
};

use super::sys::{NetNs, output, record, show};

const XDP_FILTER_PINS: &str = "/sys/fs/bpf/xdp-filter";
/// xdp-filter's MAP_FLAG_SRC: match the source address.
const MAP_FLAG_SRC: u64 = 1;
/// Entries per family xdp-filter's maps hold.
pub const XDP_FILTER_CAPACITY: usize = 10_000;

/// xdp-filter loaded on one interface of a namespace; unloaded on drop.
pub struct XdpFilter {
    ns: PathBuf,
    iface: String,
    prog: Option<ProgramFd>,
    pub program_name: String,
}

impl XdpFilter {
    pub fn load(ns: &NetNs, iface: &str) -> anyhow::Result<XdpFilter> {
        if Path::new(XDP_FILTER_PINS).exists() {
            bail!("{XDP_FILTER_PINS} exists: xdp-filter is in use on this machine, so the bench leaves it alone");
        }
        let mut c = ns.cmd("xdp-filter");
        c.args([
            "load",
            "--mode",
            "native",
            "--policy",
            "allow",
            "--features",
            "ipv4,ipv6",
            iface,
        ])
        .env("LIBXDP_SKIP_DISPATCHER", "1");
        record(format!("LIBXDP_SKIP_DISPATCHER=1 {}", show(&c)));
        let mut xf = XdpFilter {
            ns: ns.path(),
            iface: iface.to_string(),
            prog: None,
            program_name: String::new(),
        };
        output(&mut c)?;
        let dir = Path::new(XDP_FILTER_PINS).join("programs").join(iface);
        let pin = std::fs::read_dir(&dir)
            .with_context(|| format!("xdp-filter pinned no program under {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .next()
            .with_context(|| format!("xdp-filter pinned no program under {}", dir.display()))?;
        xf.program_name = pin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info = ProgramInfo::from_pin(&pin).with_context(|| format!("open {}", pin.display()))?;
        xf.prog = Some(info.fd().context("xdp-filter program fd")?);
        Ok(xf)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.prog.as_ref().expect("set in load").as_fd()
    }

    /// Adds source addresses to its maps (what `xdp-filter ip --mode src`
    /// does), skipping any beyond the maps' capacity.
    pub fn add(&self, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let flag = || PerCpuValues::try_from(vec![MAP_FLAG_SRC; cpus]).context("per-CPU value");
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = Path::new(XDP_FILTER_PINS).join(name);
            Ok(Map::PerCpuHashMap(
                MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?,
            ))
        };
        let mut m4: PerCpuHashMap<MapData, [u8; 4], u64> = PerCpuHashMap::try_from(open("filter_ipv4")?)?;
        for a in v4 {
            match m4.insert(a.octets(), flag()?, 0) {
                Ok(()) => {}
                Err(e) if is_full(&e) => break,
                Err(e) => return Err(e).context("xdp-filter filter_ipv4"),
            }
        }
        let mut m6: PerCpuHashMap<MapData, [u8; 16], u64> = PerCpuHashMap::try_from(open("filter_ipv6")?)?;
        for a in v6 {
            match m6.insert(a.octets(), flag()?, 0) {
                Ok(()) => {}
                Err(e) if is_full(&e) => break,
                Err(e) => return Err(e).context("xdp-filter filter_ipv6"),
            }
        }
        Ok(())
    }

    /// Entries in its (IPv4, IPv6) maps.
    pub fn entries(&self) -> anyhow::Result<(usize, usize)> {
        Ok((count::<[u8; 4]>("filter_ipv4")?, count::<[u8; 16]>("filter_ipv6")?))
    }
}

fn count<K: aya::Pod>(name: &str) -> anyhow::Result<usize> {
    let path = Path::new(XDP_FILTER_PINS).join(name);
    let m: PerCpuHashMap<MapData, K, u64> = PerCpuHashMap::try_from(Map::PerCpuHashMap(
        MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?,
    ))?;
    Ok(m.keys().count())
}

fn is_full(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        self.prog = None;
        let _ = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns.display()))
            .args(["xdp-filter", "unload", &self.iface])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        // Unloading the last interface removes the pins; if the interface
        // was already gone, they are still there.
        let _ = std::fs::remove_dir_all(XDP_FILTER_PINS);
    }
}

/// Loads the ipset restore file into a namespace; returns the wall time.
pub fn ipset_restore(ns: &NetNs, file: &Path) -> anyhow::Result<std::time::Duration> {
    let mut c = ns.cmd("ipset");
    c.arg("restore").arg("-f").arg(file);
    record(show(&c));
    let t = std::time::Instant::now();
    output(&mut c)?;
    Ok(t.elapsed())
}

/// Loads an nft file into a namespace; returns the wall time.
pub fn nft_load(ns: &NetNs, file: &Path) -> anyhow::Result<std::time::Duration> {
    let mut c = ns.cmd("nft");
    c.arg("-f").arg(file);
    record(show(&c));
    let t = std::time::Instant::now();
    output(&mut c)?;
    Ok(t.elapsed())
}
