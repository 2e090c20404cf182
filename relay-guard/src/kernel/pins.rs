//! Every bpffs path in one place, the layout version, bpffs mounting, and the
//! lock that keeps two agents off one `pin_dir`.
//!
//! ```text
//! <pin_dir>/layout-<N>/prog            the XDP program
//! <pin_dir>/layout-<N>/links/<ifname>  one bpf_link per interface
//! <pin_dir>/layout-<N>/maps/<NAME>     every map (relay_guard_common::maps::ALL)
//! ```
//!
//! The layout version is part of the path, so state written by an agent with
//! another map layout is never opened as ours: it is replaced, with a log line.
use std::{
    fs,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use relay_guard_common::LAYOUT_VERSION;

use crate::error::LoadError;

/// bpffs's `f_type` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the kernel's bpffs is conventionally mounted.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Lock files, one per pin_dir.
const LOCK_DIR: &str = "/run/relay-guard";

/// Paths under one `pin_dir`.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: &Path) -> Pins {
        Pins {
            root: root.to_path_buf(),
        }
    }

    /// The directory of this binary's layout.
    pub fn state(&self) -> PathBuf {
        self.root.join(format!("layout-{LAYOUT_VERSION}"))
    }

    pub fn prog(&self) -> PathBuf {
        self.state().join("prog")
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.state().join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.state().join("links")
    }

    pub fn link(&self, interface: &str) -> PathBuf {
        self.links_dir().join(interface)
    }

    /// Whether pinned maps of this layout exist (state to adopt).
    pub fn has_state_maps(&self) -> bool {
        relay_guard_common::maps::ALL.iter().all(|n| self.map(n).exists())
    }

    /// Entries under `pin_dir` that belong to another layout.
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        let mine = self.state();
        fs::read_dir(&self.root)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| *p != mine)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Interfaces with a pinned link.
    pub fn pinned_links(&self) -> Vec<String> {
        fs::read_dir(self.links_dir())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Creates the directories, mounting bpffs at /sys/fs/bpf first if the
    /// pin_dir is under it and nothing is mounted there.
    pub fn prepare(&self) -> Result<(), LoadError> {
        ensure_bpffs(&self.root)?;
        for dir in [self.maps_dir(), self.links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| LoadError::Pin {
                op: "create",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

fn fs_type(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated, st is valid for writes.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Makes sure `pin_dir` lives on a bpffs.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoadError> {
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if fs_type(&probe) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    if pin_dir.starts_with(BPFFS_ROOT) && fs_type(Path::new(BPFFS_ROOT)) != Some(BPF_FS_MAGIC) {
        tracing::info!("mounting bpffs at {BPFFS_ROOT}");
        nix::mount::mount(
            Some("bpf"),
            BPFFS_ROOT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| LoadError::Pin {
            op: "mount bpffs at",
            path: BPFFS_ROOT.into(),
            source: std::io::Error::from(e),
        })?;
        return Ok(());
    }
    Err(LoadError::NotBpffs {
        path: pin_dir.to_path_buf(),
    })
}

/// An exclusive lock on one `pin_dir`, held for the agent's lifetime.
#[derive(Debug)]
pub struct AgentLock {
    _file: fs::File,
    pub path: PathBuf,
}

/// The lock file for `pin_dir`.
pub fn lock_path(pin_dir: &Path) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new(LOCK_DIR).join(format!("{name}.lock"))
}

impl AgentLock {
    /// Takes the lock, or says which process holds it.
    pub fn acquire(pin_dir: &Path) -> Result<AgentLock, LoadError> {
        let path = lock_path(pin_dir);
        fs::create_dir_all(LOCK_DIR).map_err(|source| LoadError::Pin {
            op: "create",
            path: LOCK_DIR.into(),
            source,
        })?;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| LoadError::Pin {
                op: "open",
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a valid, owned fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = fs::read_to_string(&path).unwrap_or_default().trim().to_string();
            return Err(LoadError::Locked {
                pin_dir: pin_dir.to_path_buf(),
                holder,
            });
        }
        file.set_len(0).ok();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(AgentLock { _file: file, path })
    }

    /// The pid holding the lock for `pin_dir`, if an agent runs.
    pub fn holder(pin_dir: &Path) -> Option<String> {
        let path = lock_path(pin_dir);
        let file = fs::File::open(&path).ok()?;
        // SAFETY: flock on a valid, owned fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return None;
        }
        Some(fs::read_to_string(&path).unwrap_or_default().trim().to_string())
    }
}
