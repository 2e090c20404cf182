//! The kernel matrix of `cargo xtask test`: the kernel-sensitive privileged
//! tests, run again inside throw-away qemu guests that boot the kernels
//! mail gateways run (Debian's own builds, listed in `tests/kernels.txt`).
//!
//! - **Kernels** come from Debian's archive through apt: the newest
//!   `PACKAGE` among a line's suites is resolved on each run, its image
//!   package fetched with `apt-get download` and unpacked with `dpkg-deb`
//!   under `target/vm/kernels/RELEASE` (never installed on the host). The
//!   suites are added, when apt does not know them, in a sources file of the
//!   xtask's own with a pin priority of 50, so the host never upgrades from
//!   them.
//! - **Guests** boot the uncompressed kernel (PVH) under TCG (this machine
//!   kind's /dev/kvm is a software hypervisor, slower than TCG) with a tiny
//!   initramfs: static busybox and the modules that reach the host. Its
//!   /init mounts the host's / read-only over 9p under a tmpfs overlay (the
//!   guest sees the host's tools, the agent and the test binaries), the
//!   kernel's own module tree (so veth and friends autoload), the workspace
//!   read-write at its own path, and a control directory holding the
//!   command, its environment, its output and its exit code. Then it runs
//!   the command and powers off.
//! - **Results** are read as the host's are (libtest's lines and the skip
//!   log) and counted per test binary and kernel (`e2e@5.10`).
//!
//! A failed download or boot is a failure of that kernel line (under CI and
//! outside it), never a silent skip.
use std::{
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::utils::output;

/// `tests/kernels.txt`.
const KERNEL_LIST: &str = include_str!("../../tests/kernels.txt");

/// Bump when the initramfs recipe changes (cached initramfs are rebuilt).
const INITRD_REV: &str = "rg-2";

/// Guest memory (MiB): the program's maps take a few hundred MiB, the
/// guest's /tmp is memory too.
const GUEST_MEM_MIB: u32 = 2048;

/// One line of `tests/kernels.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLine {
    pub name: String,
    pub suites: Vec<String>,
    pub package: String,
    /// (test binary, name filters: empty = every test).
    pub tests: Vec<(String, Vec<String>)>,
}

/// The lines of [`KERNEL_LIST`].
pub fn kernel_lines() -> anyhow::Result<Vec<KernelLine>> {
    parse_kernel_lines(KERNEL_LIST)
}

fn parse_kernel_lines(text: &str) -> anyhow::Result<Vec<KernelLine>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let [name, suites, package, tests] = words[..] else {
            bail!(
                "tests/kernels.txt:{}: want `NAME SUITES PACKAGE TESTS`, got {line:?}",
                n + 1
            );
        };
        let mut list: Vec<(String, Vec<String>)> = Vec::new();
        for t in tests.split(',').filter(|t| !t.is_empty()) {
            let (bin, filter) = match t.split_once('/') {
                Some((b, f)) => (b, Some(f.to_string())),
                None => (t, None),
            };
            match list.iter_mut().find(|(b, _)| b == bin) {
                Some((_, filters)) => filters.extend(filter),
                None => list.push((bin.to_string(), filter.into_iter().collect())),
            }
        }
        out.push(KernelLine {
            name: name.to_string(),
            suites: suites.split(',').map(str::to_string).collect(),
            package: package.to_string(),
            tests: list,
        });
    }
    Ok(out)
}

/// A kernel ready to boot.
pub struct Kernel {
    pub name: String,
    pub release: String,
    dir: PathBuf,
}

fn cache_root() -> PathBuf {
    crate::utils::workspace_root().join("target/vm")
}

/// The suites apt knows (from `apt-cache policy`), and the archive and
/// security mirror URIs it uses for them.
fn apt_suites() -> anyhow::Result<(Vec<String>, Option<String>, Option<String>)> {
    let text = output(Command::new("apt-cache").arg("policy"))?;
    let (mut suites, mut main, mut security) = (Vec::new(), None, None);
    for line in text.lines() {
        // " 500 http://deb.debian.org/debian bookworm/main amd64 Packages"
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 3 || !w[1].contains("://") {
            continue;
        }
        let Some((suite, component)) = w[2].split_once('/') else {
            continue;
        };
        suites.push(suite.to_string());
        if component == "main" {
            if suite.ends_with("-security") {
                security.get_or_insert_with(|| w[1].to_string());
            } else if w[1].contains("debian") {
                main.get_or_insert_with(|| w[1].to_string());
            }
        }
    }
    Ok((suites, main, security))
}

/// Adds the suites of `lines` that apt does not know, in a sources file of
/// the xtask's own, pinned at priority 50 (never an upgrade source for the
/// host), and runs `apt-get update`.
fn ensure_suites(lines: &[KernelLine]) -> anyhow::Result<()> {
    let (known, main, security) = apt_suites()?;
    let mut wanted: Vec<&str> = lines.iter().flat_map(|l| l.suites.iter().map(String::as_str)).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let missing: Vec<&str> = wanted.into_iter().filter(|s| !known.iter().any(|k| k == s)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::utils::is_root() {
        bail!(
            "apt does not know the Debian suites {missing:?} the kernel matrix fetches kernels from, and only root can add them"
        );
    }
    let (Some(main), Some(security)) = (main, security) else {
        bail!("cannot find Debian's archive and security mirrors in apt's configuration (apt-cache policy)");
    };
    let (sec, archive): (Vec<&str>, Vec<&str>) = missing.iter().partition(|s| s.ends_with("-security"));
    let mut sources = String::from(
        "# Added by `cargo xtask test` (relay-guard): Debian suites to fetch the\n# kernels of its test matrix from (tests/kernels.txt); pinned at 50 in\n# /etc/apt/preferences.d/relay-guard-test-kernels, so nothing on this host\n# is upgraded from them.\n",
    );
    for (uri, suites) in [(&main, &archive), (&security, &sec)] {
        if !suites.is_empty() {
            sources.push_str(&format!(
                "\nTypes: deb\nURIs: {uri}\nSuites: {}\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                suites.join(" ")
            ));
        }
    }
    let mut prefs =
        String::from("# Added by `cargo xtask test` (relay-guard): see relay-guard-test-kernels.sources.\n");
    for s in &missing {
        prefs.push_str(&format!("\nPackage: *\nPin: release n={s}\nPin-Priority: 50\n"));
    }
    println!(
        "xtask: adding the Debian suites {} to apt (/etc/apt/sources.list.d/relay-guard-test-kernels.sources, pinned at priority 50) to fetch the test kernels",
        missing.join(" ")
    );
    std::fs::write("/etc/apt/preferences.d/relay-guard-test-kernels", prefs)?;
    std::fs::write("/etc/apt/sources.list.d/relay-guard-test-kernels.sources", sources)?;
    crate::toolchain::run(Command::new("apt-get").args(["update", "-qq"]))
}

/// Whether Debian version `a` is newer than `b` (`dpkg --compare-versions`).
fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

/// The kernel release `line`'s newest `PACKAGE` depends on.
fn resolve(line: &KernelLine) -> anyhow::Result<String> {
    let text = output(Command::new("apt-cache").args(["madison", &line.package]))?;
    let mut best: Option<String> = None;
    for l in text.lines() {
        // "linux-image-amd64 | 6.1.158-1 | http://... bookworm-security/main amd64 Packages"
        let f: Vec<&str> = l.split('|').map(str::trim).collect();
        let [_, version, source] = f[..] else { continue };
        let suite = source
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or("");
        if line.suites.iter().any(|s| s == suite) && best.as_deref().is_none_or(|b| newer(version, b)) {
            best = Some(version.to_string());
        }
    }
    let Some(version) = best else {
        bail!(
            "apt knows no {} in the suites {} (apt-get update?)",
            line.package,
            line.suites.join(", ")
        );
    };
    let deps = output(Command::new("apt-cache").args(["depends", &format!("{}={version}", line.package)]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .find(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{}={version} depends on no linux-image-RELEASE", line.package))
}

/// Makes sure the kernels of `lines` are downloaded and unpacked, with an
/// initramfs; returns them in order. Any failure is an error.
pub fn prepare(lines: &[KernelLine]) -> anyhow::Result<Vec<Kernel>> {
    ensure_suites(lines)?;
    let mut out = Vec::new();
    for line in lines {
        let alias = cache_root().join("kernels").join(format!("{}.release", line.name));
        let release = match resolve(line) {
            Ok(r) => r,
            Err(e) => match std::fs::read_to_string(&alias) {
                // Offline: the kernel this line resolved to before.
                Ok(r) if !crate::utils::in_ci() => {
                    println!(
                        "xtask: cannot resolve kernel {} ({e:#}); using {} from the cache",
                        line.name,
                        r.trim()
                    );
                    r.trim().to_string()
                }
                _ => return Err(e.context(format!("kernel line {}", line.name))),
            },
        };
        let dir = cache_root().join("kernels").join(&release);
        if !dir.join("ready").exists() {
            fetch(&release, &dir).with_context(|| format!("preparing kernel {release} ({})", line.name))?;
        }
        if std::fs::read_to_string(dir.join("initrd.rev")).unwrap_or_default() != INITRD_REV {
            build_initrd(&release, &dir).with_context(|| format!("the initramfs for {release}"))?;
        }
        std::fs::write(&alias, &release)?;
        out.push(Kernel {
            name: line.name.clone(),
            release,
            dir,
        });
    }
    Ok(out)
}

/// Downloads `linux-image-RELEASE` and unpacks its kernel and modules into
/// `dir` (with modules.dep: Debian's packages ship none).
fn fetch(release: &str, dir: &Path) -> anyhow::Result<()> {
    println!("xtask: fetching kernel {release} (apt-get download linux-image-{release})");
    let _ = std::fs::remove_dir_all(dir);
    let dl = dir.with_extension("download");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    crate::toolchain::run(
        Command::new("apt-get")
            .current_dir(&dl)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("linux-image-{release}")),
    )?;
    let deb = std::fs::read_dir(&dl)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let x = dl.join("x");
    crate::toolchain::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let mods = [
        x.join("lib/modules").join(release),
        x.join("usr/lib/modules").join(release),
    ]
    .into_iter()
    .find(|p| p.is_dir())
    .context("no modules in the kernel package")?;
    let root_mods = dir.join("root/lib/modules");
    std::fs::create_dir_all(&root_mods)?;
    std::fs::rename(&mods, root_mods.join(release))?;
    let vmlinuz = x.join("boot").join(format!("vmlinuz-{release}"));
    std::fs::rename(&vmlinuz, dir.join("vmlinuz")).context("no /boot/vmlinuz in the kernel package")?;
    crate::toolchain::run(Command::new("depmod").arg("-b").arg(dir.join("root")).arg(release))?;
    match extract_vmlinux(&dir.join("vmlinuz")) {
        Some(elf) => std::fs::write(dir.join("vmlinux"), elf)?,
        None => println!("xtask: no ELF kernel found inside {release}'s bzImage; booting the bzImage (slower)"),
    }
    std::fs::remove_dir_all(&dl)?;
    std::fs::write(dir.join("ready"), "")?;
    Ok(())
}

/// The ELF kernel compressed inside a bzImage (booted directly through PVH,
/// skipping the in-guest decompressor, which is slow under TCG).
fn extract_vmlinux(bzimage: &Path) -> Option<Vec<u8>> {
    let data = std::fs::read(bzimage).ok()?;
    let formats: [(&[u8], &str); 3] = [
        (&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0x1f, 0x8b, 0x08], "gzip"),
    ];
    for (magic, tool) in formats {
        let mut from = 0;
        for _ in 0..5 {
            let Some(at) = data[from..].windows(magic.len()).position(|w| w == magic) else {
                break;
            };
            let start = from + at;
            from = start + 1;
            let Ok(mut child) = Command::new(tool)
                .arg("-dc")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            else {
                break;
            };
            let mut stdin = child.stdin.take().expect("piped");
            let payload = data[start..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let mut out = Vec::new();
            let _ = child.stdout.take().expect("piped").read_to_end(&mut out);
            let _ = child.wait();
            let _ = writer.join();
            if out.starts_with(b"\x7fELF") {
                return Some(out);
            }
        }
    }
    None
}

/// Whether the ELF file at `path` is statically linked (no PT_INTERP).
fn is_static_elf(path: &Path) -> bool {
    let Ok(d) = std::fs::read(path) else { return false };
    if d.len() < 64 || !d.starts_with(b"\x7fELF") || d[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([d[o], d[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(d[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= d.len() && u32::from_le_bytes(d[o..o + 4].try_into().expect("4 bytes")) != 3
    })
}

/// A `newc` cpio archive (what the kernel unpacks as an initramfs).
#[derive(Default)]
struct Cpio(Vec<u8>, u32);

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.1 += 1;
        let fields = [
            self.1,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).expect("small file"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("short name"),
            0,
        ];
        self.0.extend_from_slice(b"070701");
        for f in fields {
            self.0.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }
    fn file(&mut self, name: &str, data: &[u8], exec: bool) {
        self.entry(name, if exec { 0o100_755 } else { 0o100_644 }, data);
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.0
    }
}

/// The guest's /init (busybox sh): mounts what the module comment says,
/// then hands over to [`STAGE2`] in the new root.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
die() { echo "rg-init: $*"; echo 125 >/newroot/run/ctl/rc 2>/dev/null; $B sync; echo o >/proc/sysrq-trigger; $B sleep 30; }
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.order); do $B insmod /m/$m || echo "rg-init: insmod $m failed"; done
O=trans=virtio,version=9p2000.L,msize=262144
$B mount -t 9p -o $O,ro,cache=loose hostroot /lower || die "cannot mount the host's root"
$B mount -t tmpfs -o mode=0755 tmpfs /rw
$B mkdir -p /rw/upper /rw/work
$B mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || die "overlay failed"
$B mount -t tmpfs -o mode=0755 tmpfs /newroot/run
$B mkdir -p /newroot/run/ctl
$B mount -t 9p -o $O,cache=none ctl /newroot/run/ctl || die "cannot mount the control share"
K=$($B uname -r)
MD=/newroot/usr/lib/modules; [ -L /newroot/lib ] || MD=/newroot/lib/modules
$B mkdir -p $MD 2>/dev/null; $B mount -t tmpfs -o mode=0755 tmpfs $MD && $B mkdir -p $MD/$K && $B mount -t 9p -o $O,ro,cache=loose kmods $MD/$K || die "cannot mount the module tree"
W=$($B cat /newroot/run/ctl/workdir)
$B mount -t 9p -o $O,cache=mmap work "/newroot$W" || die "cannot mount the workspace $W"
$B mount --move /dev /newroot/dev
$B mount --move /sys /newroot/sys
$B mount --move /proc /newroot/proc
N=/newroot
mnt() { $B mkdir -p "$N$3" 2>/dev/null; $B mount -t "$1" "$2" "$N$3" 2>/dev/null; }
mnt devpts devpts /dev/pts
mnt tmpfs tmpfs /dev/shm
mnt securityfs securityfs /sys/kernel/security
mnt bpf bpf /sys/fs/bpf
mnt tracefs tracefs /sys/kernel/tracing
mnt debugfs debugfs /sys/kernel/debug
mnt cgroup2 cgroup2 /sys/fs/cgroup
$B mount -t tmpfs -o mode=1777 tmpfs $N/tmp
$B ln -sfn /proc/self/fd $N/dev/fd
$B hostname rg-guest
$B ip link set lo up
$B mkdir -p $N/run/.rg
$B cp /bin/busybox /stage2 $N/run/.rg/
exec $B switch_root /newroot /run/.rg/busybox sh /run/.rg/stage2
"#;

/// PID 1 after switch_root: runs the command, records its exit code, powers
/// off.
const STAGE2: &str = r#"B=/run/.rg/busybox
C=/run/ctl
/bin/bash $C/cmd </dev/null >$C/output 2>&1
echo $? >$C/rc.tmp
$B mv $C/rc.tmp $C/rc
$B sync
$B poweroff -f
echo o >/proc/sysrq-trigger
$B sleep 60
"#;

/// Builds `dir/initrd.img`: busybox, the modules that reach the host
/// (virtio PCI and RNG, 9p, overlay; with what they depend on), /init.
fn build_initrd(release: &str, dir: &Path) -> anyhow::Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !is_static_elf(busybox) {
        bail!("/bin/busybox is missing or not static: install busybox-static");
    }
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "lower", "rw", "newroot", "m"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", &std::fs::read(busybox)?, true);
    let mut order = String::new();
    let mut seen: Vec<String> = Vec::new();
    for m in ["virtio_pci", "virtio_rng", "9pnet_virtio", "9p", "overlay"] {
        let text =
            output(
                Command::new("modprobe")
                    .arg("-d")
                    .arg(dir.join("root"))
                    .args(["-S", release, "--show-depends", m]),
            )
            .with_context(|| format!("module {m} of {release}"))?;
        for l in text.lines() {
            let Some(path) = l.strip_prefix("insmod ").and_then(|r| r.split_whitespace().next()) else {
                continue;
            };
            let file = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or("");
            let base = file.split(".ko").next().unwrap_or(file).to_string();
            if seen.contains(&base) {
                continue;
            }
            seen.push(base.clone());
            let name = format!("{:02}-{base}.ko", seen.len());
            let tool = if path.ends_with(".xz") {
                Some("xz")
            } else if path.ends_with(".zst") {
                Some("zstd")
            } else if path.ends_with(".gz") {
                Some("gzip")
            } else {
                None
            };
            let data = match tool {
                Some(t) => {
                    let out = Command::new(t).args(["-dcq", path]).output()?;
                    if !out.status.success() {
                        bail!("{t} -dc {path} failed");
                    }
                    out.stdout
                }
                None => std::fs::read(path)?,
            };
            cpio.file(&format!("m/{name}"), &data, false);
            order.push_str(&name);
            order.push('\n');
        }
    }
    cpio.file("modules.order", order.as_bytes(), false);
    cpio.file("init", INIT.as_bytes(), true);
    cpio.file("stage2", STAGE2.as_bytes(), false);
    let tmp = dir.join("initrd.img.tmp");
    std::fs::write(&tmp, cpio.finish())?;
    std::fs::rename(&tmp, dir.join("initrd.img"))?;
    std::fs::write(dir.join("initrd.rev"), INITRD_REV)?;
    Ok(())
}

/// Shell-quotes `s` (single quotes).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How a guest run ended.
pub struct Outcome {
    /// The command's exit code; None when the guest gave none (boot
    /// failure, crash, timeout).
    pub rc: Option<i32>,
    /// Why there is no exit code, with the end of the guest's console.
    pub failure: Option<String>,
    /// The skip log the tests wrote in the guest.
    pub skips: String,
}

/// Boots `kernel` and runs `argv` as root in the workspace with `env`,
/// calling `on_line` with each line of its output (stdout and stderr) as it
/// comes. The guest is killed after `timeout`.
pub fn run(
    kernel: &Kernel,
    argv: &[String],
    env: &[(&str, String)],
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> anyhow::Result<Outcome> {
    let ctl = cache_root()
        .join("runs")
        .join(format!("{}-{}", kernel.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&ctl);
    std::fs::create_dir_all(&ctl)?;
    let work = crate::utils::workspace_root().canonicalize()?;
    let work_s = work.to_str().context("workspace path is not UTF-8")?;
    if work_s.contains(',') || ctl.to_string_lossy().contains(',') {
        bail!("the workspace path must not contain a comma (qemu's -virtfs): {work_s}");
    }
    std::fs::write(ctl.join("workdir"), work_s)?;
    let skip_log = ctl.join("skips.log");
    let mut envs = String::new();
    for (k, v) in env {
        envs.push_str(&format!("export {k}={}\n", quote(v)));
    }
    envs.push_str(&format!(
        "export RELAY_GUARD_SKIP_LOG={}\nexport RELAY_GUARD_GUEST_KERNEL={}\n",
        quote(&skip_log.to_string_lossy()),
        quote(&kernel.name)
    ));
    std::fs::write(ctl.join("env"), envs)?;
    let mut cmd = format!(
        ". {}\ncd {}\nexec",
        quote(&ctl.join("env").to_string_lossy()),
        quote(work_s)
    );
    for a in argv {
        cmd.push(' ');
        cmd.push_str(&quote(a));
    }
    cmd.push('\n');
    std::fs::write(ctl.join("cmd"), cmd)?;
    std::fs::write(ctl.join("output"), "")?;

    let image = if kernel.dir.join("vmlinux").exists() {
        kernel.dir.join("vmlinux")
    } else {
        kernel.dir.join("vmlinuz")
    };
    let virtfs = |path: &Path, tag: &str, ro: bool| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    // The control share sits inside the workspace (target/vm): the guest
    // mounts it on its own path too, so the skip log path is the same.
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .arg("-m")
        .arg(GUEST_MEM_MIB.to_string())
        .arg("-kernel")
        .arg(&image)
        .arg("-initrd")
        .arg(kernel.dir.join("initrd.img"))
        .args(["-append", "console=ttyS0 quiet panic=-1 oops=panic"])
        .arg("-serial")
        .arg(format!("file:{}", ctl.join("console.log").display()))
        .args(["-device", "virtio-rng-pci"])
        .arg("-virtfs")
        .arg(virtfs(Path::new("/"), "hostroot", true))
        .arg("-virtfs")
        .arg(virtfs(&ctl, "ctl", false))
        .arg("-virtfs")
        .arg(virtfs(
            &kernel.dir.join("root/lib/modules").join(&kernel.release),
            "kmods",
            true,
        ))
        .arg("-virtfs")
        .arg(virtfs(&work, "work", false))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(ctl.join("qemu.log"))?);
    let mut child = qemu.spawn().context("failed to start qemu-system-x86_64")?;
    let start = Instant::now();
    let mut out = std::fs::File::open(ctl.join("output"))?;
    let mut pending = String::new();
    let mut buf = Vec::new();
    let mut timed_out = false;
    let status = loop {
        let done = child.try_wait()?;
        buf.clear();
        out.read_to_end(&mut buf)?;
        pending.push_str(&String::from_utf8_lossy(&buf));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            on_line(line.trim_end_matches('\n'));
        }
        if let Some(s) = done {
            break s;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !pending.is_empty() {
        on_line(&pending);
    }
    let _ = out.seek(std::io::SeekFrom::Start(0));
    let rc = std::fs::read_to_string(ctl.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let failure = if rc.is_some() && rc != Some(125) {
        None
    } else {
        let tail = |f: &str, n: usize| {
            let t = std::fs::read_to_string(ctl.join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        Some(format!(
            "{} (qemu {status}, kernel {})\n---- qemu ----\n{}\n---- guest console (last 40 lines) ----\n{}",
            if timed_out {
                format!("the guest timed out after {} s", timeout.as_secs())
            } else {
                "the guest ended without an exit code".to_string()
            },
            kernel.release,
            tail("qemu.log", 20),
            tail("console.log", 40)
        ))
    };
    if failure.is_none() {
        let _ = std::fs::remove_dir_all(&ctl);
    }
    Ok(Outcome { rc, failure, skips })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_list_parses_with_5_10_first() {
        let lines = kernel_lines().expect("tests/kernels.txt parses");
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["5.10", "6.1", "6.12"]);
        for l in &lines {
            assert_eq!(l.package, "linux-image-amd64");
            // Every line runs the parser through BPF_PROG_TEST_RUN; the
            // lines with freplace (6.1 on) run every dispatcher test.
            assert!(l.tests.iter().any(|(b, _)| b == "parser_test_run"), "{l:?}");
            if l.name != "5.10" {
                assert!(l.tests.iter().any(|(b, f)| b == "dispatcher" && f.is_empty()), "{l:?}");
            }
        }
    }

    #[test]
    fn filters_of_one_binary_are_merged() {
        let l = parse_kernel_lines("x a,b pkg e2e,operate/one,operate/two,bans\n").expect("parses");
        assert_eq!(
            l[0].tests,
            [
                ("e2e".to_string(), vec![]),
                ("operate".to_string(), vec!["one".to_string(), "two".to_string()]),
                ("bans".to_string(), vec![]),
            ]
        );
        assert!(parse_kernel_lines("x a pkg\n").is_err());
    }

    #[test]
    fn a_cpio_entry_is_newc() {
        let mut c = Cpio::default();
        c.file("init", b"hi", true);
        let a = c.finish();
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn this_busybox_check_tells_static_from_dynamic() {
        // The test runner itself is dynamically linked.
        assert!(!is_static_elf(&std::env::current_exe().expect("exe")));
    }
}
