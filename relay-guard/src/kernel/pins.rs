//! Every bpffs path in one place, the layout version, bpffs mounting, and the
//! lock that keeps two agents off one `pin_dir`.
//!
//! ```text
//! <pin_dir>/layout-<N>/links/<ifname>  one bpf_link per interface
//! <pin_dir>/layout-<N>/maps/<NAME>     the maps every set shares (counters, bans, …)
//! <pin_dir>/layout-<N>/set-<K>/prog    the XDP program of set K
//! <pin_dir>/layout-<N>/set-<K>/<NAME>  set K's maps ([`SET_MAPS`]: the policy's tables)
//! <pin_dir>/layout-<N>/next-<K>/…      set K while it is filled (not in force)
//! ```
//!
//! The layout version is part of the path, so state written by an agent with
//! another map layout is never opened as ours: it is replaced, with a log line.
//!
//! A *set* is the program with the maps sized to a policy. The set in force
//! is the `set-<K>` of the highest K. A resize fills a new set in
//! `next-<K+1>` beside it, then renames that to `set-<K+1>` (one atomic
//! step), so the pins name one complete set at every instant; a `next-`
//! directory, or a `set-` below the highest, is a leftover of a resize cut
//! short, removed by the next agent.
use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use relay_guard_common::{LAYOUT_VERSION, maps};

use crate::error::LoadError;

/// The maps of one set (see the module doc): the policy's tables, with
/// the ports and settings that select them. Every other map is shared by
/// all sets, so counters, interface slots and bans carry over a resize.
pub const SET_MAPS: &[&str] = &[
    maps::PORTS,
    maps::TBL16,
    maps::TBL24,
    maps::LONG24,
    maps::MASKS,
    maps::V6_TOP,
    maps::V6_NODES,
    maps::V6_LEAVES,
    maps::SETTINGS,
];

/// bpffs's `f_type` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the kernel's bpffs is conventionally mounted.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

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

    /// The program of the set in force.
    pub fn prog(&self) -> PathBuf {
        Self::prog_in(&self.set_dir(self.current_set().unwrap_or(0)))
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.state().join("maps")
    }

    /// Map `name` of the state in force: a set map in the set in force,
    /// any other in `maps/`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.map_in(self.current_set().unwrap_or(0), name)
    }

    /// Map `name` as set `set` pins it once published (a shared map: in `maps/`).
    pub fn map_in(&self, set: u32, name: &str) -> PathBuf {
        if SET_MAPS.contains(&name) {
            self.set_dir(set).join(name)
        } else {
            self.maps_dir().join(name)
        }
    }

    /// Set `set`'s pins once published.
    pub fn set_dir(&self, set: u32) -> PathBuf {
        self.state().join(format!("set-{set}"))
    }

    /// Set `set`'s pins while it is being filled.
    pub fn next_dir(&self, set: u32) -> PathBuf {
        self.state().join(format!("next-{set}"))
    }

    /// Map `name` of the set pinned in `set_dir` (a [`Pins::set_dir`] or a
    /// [`Pins::next_dir`]; a shared map: in `maps/`).
    pub fn map_beside(&self, set_dir: &Path, name: &str) -> PathBuf {
        if SET_MAPS.contains(&name) {
            set_dir.join(name)
        } else {
            self.maps_dir().join(name)
        }
    }

    /// The program of the set pinned in `set_dir`.
    pub fn prog_in(set_dir: &Path) -> PathBuf {
        set_dir.join("prog")
    }

    /// The set in force: the published set of the highest number.
    pub fn current_set(&self) -> Option<u32> {
        self.numbered("set-").into_iter().max()
    }

    /// The numbers of the directories named `<prefix><number>`.
    fn numbered(&self, prefix: &str) -> Vec<u32> {
        fs::read_dir(self.state())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A set number no directory uses, above every published one.
    pub fn next_set(&self) -> u32 {
        self.numbered("set-")
            .into_iter()
            .chain(self.numbered("next-"))
            .max()
            .map_or(1, |k| k + 1)
    }

    /// Publishes set `set` (filled in [`Pins::next_dir`]): one rename
    /// makes it `set-<set>`, the highest number, so the set in force is the
    /// old one or the new one at every instant, never a partial one.
    pub fn publish_set(&self, set: u32) -> Result<(), LoadError> {
        let from = self.next_dir(set);
        fs::rename(&from, self.set_dir(set)).map_err(|source| LoadError::Pin {
            op: "rename",
            path: from,
            source,
        })
    }

    /// Removes every set directory but the one in force and `keep`: sets
    /// left unpublished by a resize cut short, and published ones a later
    /// set replaced. Their pins go; the kernel frees the maps once no
    /// program holds them.
    pub fn remove_other_sets(&self, keep: Option<u32>) {
        let current = self.current_set();
        let dirs = self
            .numbered("next-")
            .into_iter()
            .filter(|&k| Some(k) != keep)
            .map(|k| self.next_dir(k))
            .chain(
                self.numbered("set-")
                    .into_iter()
                    .filter(|&k| Some(k) != current && Some(k) != keep)
                    .map(|k| self.set_dir(k)),
            );
        for dir in dirs {
            if let Err(e) = remove_set_dir(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove a set of maps no longer in force");
            }
        }
    }

    pub fn links_dir(&self) -> PathBuf {
        self.state().join("links")
    }

    pub fn link(&self, interface: &str) -> PathBuf {
        self.links_dir().join(interface)
    }

    /// Whether pinned maps of this layout exist (state to adopt).
    pub fn has_state_maps(&self) -> bool {
        maps::ALL.iter().all(|n| self.map(n).exists())
    }

    /// Entries under `pin_dir` that belong to another layout: only
    /// directories of the shape relay-guard creates (see [`is_layout_dir`]).
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        let mine = self.state();
        self.entries()
            .into_iter()
            .filter(|p| *p != mine && is_layout_dir(p))
            .collect()
    }

    /// Where the other layouts ([`Pins::other_layouts`]) pin the link of
    /// `interface`.
    pub fn other_layout_links(&self, interface: &str) -> Vec<PathBuf> {
        self.other_layouts()
            .into_iter()
            .map(|d| d.join("links").join(interface))
            .collect()
    }

    /// Where the other layouts pin their shared map `name`.
    pub fn other_layout_maps(&self, name: &str) -> Vec<PathBuf> {
        self.other_layouts()
            .into_iter()
            .map(|d| d.join("maps").join(name))
            .collect()
    }

    /// Entries under `pin_dir` that relay-guard did not create (anything
    /// but `layout-<N>` directories of the expected shape). relay-guard
    /// never deletes these, and `detach` refuses while they exist.
    pub fn foreign_entries(&self) -> Vec<PathBuf> {
        self.entries().into_iter().filter(|p| !is_layout_dir(p)).collect()
    }

    fn entries(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.root)
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
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

/// Whether `path` is a directory of the shape relay-guard creates:
/// named `layout-<digits>`, holding at most `prog`, `maps/`, `links/` and
/// `set-<K>/` and `next-<K>/` directories, with only pinned objects (no
/// directories) inside the directories.
pub fn is_layout_dir(path: &Path) -> bool {
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("layout-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let is_dir = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    if !named || !is_dir(path) {
        return false;
    }
    let flat = |p: &Path| {
        is_dir(p)
            && fs::read_dir(p).is_ok_and(|rd| {
                rd.filter_map(Result::ok)
                    .all(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
            })
    };
    let Ok(rd) = fs::read_dir(path) else { return false };
    rd.filter_map(Result::ok).all(|e| {
        let p = e.path();
        match e.file_name().to_str() {
            Some("prog") => !is_dir(&p),
            Some("maps" | "links") => flat(&p),
            Some(n) if is_set_name(n) => flat(&p),
            _ => false,
        }
    })
}

/// `set-<digits>` or `next-<digits>`.
fn is_set_name(name: &str) -> bool {
    name.strip_prefix("set-")
        .or_else(|| name.strip_prefix("next-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes a set directory: its pins, then the directory (`rmdir`).
fn remove_set_dir(dir: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(dir)?.filter_map(Result::ok) {
        if e.file_type()?.is_dir() {
            return Err(std::io::Error::other(format!("{} holds a directory", dir.display())));
        }
        fs::remove_file(e.path())?;
    }
    fs::remove_dir(dir)
}

/// Removes one layout directory (see [`is_layout_dir`]): its link pins
/// first (each unpin detaches a link), then the program, maps and sets,
/// then the directories with `rmdir`, so nothing of another shape is ever
/// deleted. Returns the names of the links it removed.
pub fn remove_layout(dir: &Path) -> std::io::Result<Vec<String>> {
    if !is_layout_dir(dir) {
        return Err(std::io::Error::other(format!(
            "{} is not a relay-guard layout directory",
            dir.display()
        )));
    }
    let mut links = Vec::new();
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.filter_map(Result::ok) {
                fs::remove_file(e.path())?;
                if sub == "links" {
                    links.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            fs::remove_dir(&d)?;
        }
    }
    match fs::remove_file(dir.join("prog")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    for e in fs::read_dir(dir)?.filter_map(Result::ok) {
        if e.file_name().to_str().is_some_and(is_set_name) {
            remove_set_dir(&e.path())?;
        }
    }
    fs::remove_dir(dir)?;
    Ok(links)
}

/// Mounts bpffs at /sys/fs/bpf if `pin_dir` is under it and nothing is
/// mounted there, then checks `pin_dir` (see [`check_pin_dir`]).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoadError> {
    if pin_dir.starts_with(BPFFS_ROOT)
        && Path::new(BPFFS_ROOT).is_dir()
        && fs_type(Path::new(BPFFS_ROOT)) != Some(BPF_FS_MAGIC)
    {
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
    }
    check_pin_dir(pin_dir).map(|_| ())
}

/// `pin_dir` with symlinks resolved: the existing part canonicalized, the
/// rest appended.
fn canonical(pin_dir: &Path) -> std::io::Result<PathBuf> {
    let mut existing = pin_dir.to_path_buf();
    let mut rest = Vec::new();
    while fs::symlink_metadata(&existing).is_err() {
        match (existing.file_name().map(ToOwned::to_owned), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut path = fs::canonicalize(&existing)?;
    path.extend(rest.iter().rev());
    Ok(path)
}

fn dev_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path).ok().map(|m| m.dev())
}

/// Checks `pin_dir` against the real filesystem ("Whose state" in
/// SPEC.md): an absolute path without `..`, that is (or will be created as)
/// a directory on a bpffs, and not the mount root itself (where other
/// tools pin their state). Returns it with symlinks resolved, so every
/// spelling of one directory names the same state.
pub fn check_pin_dir(pin_dir: &Path) -> Result<PathBuf, LoadError> {
    let bad = |why: String| LoadError::BadPinDir {
        path: pin_dir.to_path_buf(),
        why,
    };
    if let Some(why) = crate::config::pin_dir_problem(pin_dir) {
        return Err(bad(why));
    }
    let real = canonical(pin_dir).map_err(|e| bad(format!("cannot resolve it: {e}")))?;
    let mut probe = real.clone();
    while fs::symlink_metadata(&probe).is_err() {
        if !probe.pop() {
            break;
        }
    }
    if fs_type(&probe) != Some(BPF_FS_MAGIC) {
        return Err(LoadError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    if probe == real {
        if !real.is_dir() {
            return Err(bad("it exists and is not a directory".into()));
        }
        let parent = real.parent().unwrap_or(Path::new("/"));
        if real == Path::new("/") || dev_of(&real).is_none() || dev_of(&real) != dev_of(parent) {
            return Err(bad(format!(
                "{} is the root of a bpffs mount, shared with other tools; use a directory of its own under it (e.g. {}/relay-guard)",
                real.display(),
                real.display()
            )));
        }
    }
    Ok(real)
}

/// An exclusive `flock` on the `pin_dir` directory itself, held by the
/// agent for its lifetime and by `detach` while it runs. Keyed by the
/// directory's inode, so every spelling of the path (trailing slash, `//`,
/// a symlink) meets the same lock, and nothing outside bpffs (such as a
/// systemd RuntimeDirectory) can delete it under a running agent.
#[derive(Debug)]
pub struct AgentLock {
    _dir: fs::File,
    pub path: PathBuf,
}

impl AgentLock {
    /// Creates `pin_dir` if needed and takes its lock, or says which
    /// process holds it.
    pub fn acquire(pin_dir: &Path) -> Result<AgentLock, LoadError> {
        let real = check_pin_dir(pin_dir)?;
        fs::create_dir_all(&real).map_err(|source| LoadError::Pin {
            op: "create",
            path: real.clone(),
            source,
        })?;
        // Checked again now that it exists (a mount could hide behind it).
        let real = check_pin_dir(&real)?;
        Self::lock_existing(&real)
    }

    /// Takes the lock of an existing `pin_dir` (as `detach` does).
    pub fn lock_existing(pin_dir: &Path) -> Result<AgentLock, LoadError> {
        let dir = fs::File::open(pin_dir).map_err(|source| LoadError::Pin {
            op: "open",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        // SAFETY: flock on a valid, owned fd.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = Self::holder(pin_dir).unwrap_or_else(|| "unknown".into());
            return Err(LoadError::Locked {
                pin_dir: pin_dir.to_path_buf(),
                holder,
            });
        }
        Ok(AgentLock {
            _dir: dir,
            path: pin_dir.to_path_buf(),
        })
    }

    /// The pid holding the lock of `pin_dir`, if an agent runs. Read from
    /// /proc/locks, without taking the lock (a probe that took it, even
    /// shared, could make a starting agent fail).
    pub fn holder(pin_dir: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        let m = fs::metadata(pin_dir).ok()?;
        let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
        let want = format!("{major:02x}:{minor:02x}:{}", m.ino());
        let locks = fs::read_to_string("/proc/locks").ok()?;
        locks.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; "->" marks a waiter.
            (f.len() >= 6 && f[1] == "FLOCK" && f[3] == "WRITE" && f[5] == want).then(|| f[4].to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rg-pins-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// Only `layout-<N>` directories holding `prog`, `maps/`, `links/` are
    /// relay-guard's; anything else is foreign and never removed.
    #[test]
    fn only_layout_shaped_entries_are_ours() {
        let root = scratch("shape");
        let ours = root.join("layout-4");
        fs::create_dir_all(ours.join("maps")).expect("mkdir");
        fs::create_dir_all(ours.join("links")).expect("mkdir");
        fs::write(ours.join("maps").join("RG_PORTS"), "").expect("write");
        fs::write(ours.join("links").join("eth0"), "").expect("write");
        fs::write(ours.join("prog"), "").expect("write");
        let odd = root.join("layout-3");
        fs::create_dir_all(odd.join("maps").join("nested")).expect("mkdir");
        let extra = root.join("layout-2");
        fs::create_dir_all(extra.join("cilium")).expect("mkdir");
        for name in ["layout-", "layout-x", "tc", "other-tool"] {
            fs::create_dir_all(root.join(name)).expect("mkdir");
        }
        fs::write(root.join("layout-9"), "a file").expect("write");

        let pins = Pins::new(&root);
        let mut others = pins.other_layouts();
        others.sort();
        assert_eq!(others, vec![ours.clone()]);
        let mut foreign: Vec<String> = pins
            .foreign_entries()
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        foreign.sort();
        assert_eq!(
            foreign,
            [
                "layout-",
                "layout-2",
                "layout-3",
                "layout-9",
                "layout-x",
                "other-tool",
                "tc"
            ]
        );

        assert!(remove_layout(&odd).is_err());
        assert!(odd.join("maps").join("nested").exists(), "a foreign shape was touched");
        assert_eq!(remove_layout(&ours).expect("ours"), ["eth0"]);
        assert!(!ours.exists());
        let _ = fs::remove_dir_all(&root);
    }

    /// A plain directory is not a pin_dir, and `..` or a relative path is
    /// refused before the file system is looked at.
    #[test]
    fn check_pin_dir_refuses_non_bpffs_and_bad_spellings() {
        let root = scratch("check");
        if fs_type(&root) == Some(BPF_FS_MAGIC) {
            return;
        }
        assert!(matches!(
            check_pin_dir(&root.join("pins")),
            Err(LoadError::NotBpffs { .. })
        ));
        assert!(matches!(check_pin_dir(&root), Err(LoadError::NotBpffs { .. })));
        for bad in ["relative/pins", "/sys/fs/bpf/../../tmp", "/"] {
            assert!(
                matches!(check_pin_dir(Path::new(bad)), Err(LoadError::BadPinDir { .. })),
                "{bad}"
            );
        }
        let _ = fs::remove_dir_all(&root);
    }

    /// Every spelling of one directory resolves to one path (the lock and
    /// the state are keyed by it).
    #[test]
    fn spellings_resolve_to_one_path() {
        let root = scratch("canon");
        let real = root.join("pins");
        fs::create_dir_all(&real).expect("mkdir");
        let link = root.join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let want = fs::canonicalize(&real).expect("canonical");
        for p in [
            real.clone(),
            PathBuf::from(format!("{}/", real.display())),
            PathBuf::from(format!("/{}", real.display())),
            link.clone(),
        ] {
            assert_eq!(canonical(&p).expect("resolves"), want, "{}", p.display());
        }
        assert_eq!(
            canonical(&link.join("not-yet")).expect("resolves"),
            want.join("not-yet")
        );
        let _ = fs::remove_dir_all(&root);
    }
}
