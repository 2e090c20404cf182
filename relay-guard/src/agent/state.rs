//! The last good config and list files, kept in `state_dir` (SPEC.md
//! "Failing safe": Boot). Pins live in memory and do not survive a reboot;
//! if the config or a list file is broken when the agent starts (a
//! half-downloaded list at boot), it starts from this copy instead of
//! leaving the SMTP ports open.
//!
//! Layout: one generation directory per save and a symlink naming the one in
//! force, so a save is atomic (the symlink is replaced with a rename) and a
//! crash leaves the old set or the new one, never a mix:
//!
//! ```text
//! <state_dir>/current -> gen-<N>
//! <state_dir>/gen-<N>/manifest.json   the config's path and, per list file,
//!                                     its original path and its copy
//! <state_dir>/gen-<N>/config.toml     the config text as applied
//! <state_dir>/gen-<N>/lists/<i>       each list file as applied
//! ```
//!
//! The bytes saved are the ones the agent applied (from the list index), not
//! a re-read of the files, which may have changed since. Only the set in
//! force is kept: a save removes every other generation.
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigErrors, ConfigFile, DEFAULT_STATE_DIR, LoadOptions, lists::ListIndex};

/// The symlink naming the generation in force.
const CURRENT: &str = "current";
const MANIFEST: &str = "manifest.json";
const CONFIG: &str = "config.toml";
const LISTS: &str = "lists";
const GEN_PREFIX: &str = "gen-";

/// What `manifest.json` says.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// The config path the set was applied from, as the agent was given it.
    config: PathBuf,
    /// Unix time of the save, for the log of a start from this copy.
    saved_at: u64,
    lists: Vec<SavedList>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedList {
    /// The list file's path as the config resolves it.
    path: PathBuf,
    /// Its copy, relative to the generation directory.
    copy: PathBuf,
}

/// Why the saved copy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no last good copy in {dir} ({source})")]
    Missing {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a manifest of relay-guard: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the copy in {dir} is of config {saved}, not of {asked}")]
    OtherConfig {
        dir: PathBuf,
        saved: PathBuf,
        asked: PathBuf,
    },
    #[error("the copy in {dir} is invalid too:\n{errors}")]
    Invalid { dir: PathBuf, errors: ConfigErrors },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A config loaded from the saved copy.
pub struct Restored {
    pub config: Config,
    pub index: ListIndex,
    /// The generation directory it came from, for the log.
    pub dir: PathBuf,
    /// Unix time of the save.
    pub saved_at: u64,
}

/// The `state_dir` to look in for a config that does not load (`None`: it
/// could not be read): the one it names if it can still be told (see
/// [`ConfigFile::state_dir_hint`]), else the default.
pub(crate) fn state_dir_for(file: Option<&ConfigFile>) -> PathBuf {
    file.and_then(ConfigFile::state_dir_hint)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// Loads the last good copy saved for `config_path` in `state_dir`, with
/// the same `options` as a load of the config itself.
pub fn load(state_dir: &Path, config_path: &Path, options: &LoadOptions) -> Result<Restored, StateError> {
    let current = state_dir.join(CURRENT);
    let target = fs::read_link(&current).map_err(|source| StateError::Missing {
        dir: state_dir.to_path_buf(),
        source,
    })?;
    let dir = state_dir.join(target);
    let manifest_path = dir.join(MANIFEST);
    let bytes = fs::read(&manifest_path).map_err(|source| StateError::Read {
        path: manifest_path.clone(),
        source,
    })?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|source| StateError::Manifest {
        path: manifest_path,
        source,
    })?;
    if absolute(&manifest.config) != absolute(config_path) {
        return Err(StateError::OtherConfig {
            dir,
            saved: manifest.config,
            asked: config_path.to_path_buf(),
        });
    }
    let config_copy = dir.join(CONFIG);
    let text = fs::read_to_string(&config_copy).map_err(|source| StateError::Read {
        path: config_copy,
        source,
    })?;
    let copies: BTreeMap<PathBuf, PathBuf> = manifest.lists.into_iter().map(|l| (l.path, dir.join(l.copy))).collect();
    let (config, index) = ConfigFile::parse(config_path, &text)
        .validate_saved(&copies, options)
        .map_err(|errors| StateError::Invalid {
            dir: dir.clone(),
            errors,
        })?;
    Ok(Restored {
        config,
        index,
        dir,
        saved_at: manifest.saved_at,
    })
}

/// Saves the config text and list files of `index` (what was just applied
/// from `config_path`) as the last good set in `state_dir`, and removes the
/// older sets.
pub fn save(state_dir: &Path, config_path: &Path, index: &ListIndex) -> Result<PathBuf, StateError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Write { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .create(state_dir)
        .map_err(write_err(state_dir))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let name = format!("{GEN_PREFIX}{}-{}", now.as_nanos(), std::process::id());
    let dir = state_dir.join(&name);
    let lists_dir = dir.join(LISTS);
    fs::create_dir_all(&lists_dir).map_err(write_err(&lists_dir))?;
    let previous = previous_copies(state_dir);
    let result = (|| {
        write_synced(&dir.join(CONFIG), &index.config_text)?;
        let mut lists: Vec<SavedList> = Vec::new();
        for file in &index.files {
            // A file named twice (two guards) is saved once.
            if lists.iter().any(|l| l.path.as_path() == &*file.path) {
                continue;
            }
            let copy = Path::new(LISTS).join(lists.len().to_string());
            // An unchanged list (a 1M-line list beside an edited small one)
            // is linked to its copy in the set in force, not written again.
            let same = previous.get(&*file.path).filter(|old| same_bytes(old, &file.bytes));
            let linked = same.is_some_and(|old| fs::hard_link(old, dir.join(&copy)).is_ok());
            if !linked {
                write_synced(&dir.join(&copy), &file.bytes)?;
            }
            lists.push(SavedList {
                path: file.path.to_path_buf(),
                copy,
            });
        }
        let manifest = Manifest {
            config: config_path.to_path_buf(),
            saved_at: now.as_secs(),
            lists,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| StateError::Write {
            path: dir.join(MANIFEST),
            source: std::io::Error::other(e),
        })?;
        write_synced(&dir.join(MANIFEST), &json)?;
        sync_dir(&lists_dir)?;
        sync_dir(&dir)?;
        // The switch: a new symlink renamed over the old one.
        let tmp = state_dir.join(format!(".{CURRENT}.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).map_err(write_err(&tmp))?;
        fs::rename(&tmp, state_dir.join(CURRENT)).map_err(write_err(&tmp))?;
        sync_dir(state_dir)
    })();
    if let Err(e) = result {
        remove_generation(&dir);
        return Err(e);
    }
    // Bounded: only the set in force stays (older ones, and those a crash
    // left half-written).
    if let Ok(entries) = fs::read_dir(state_dir) {
        for entry in entries.flatten() {
            let n = entry.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(GEN_PREFIX) && n != name {
                remove_generation(&entry.path());
            }
        }
    }
    Ok(dir)
}

/// The list copies of the set in force (original path -> copy), if any.
fn previous_copies(state_dir: &Path) -> BTreeMap<PathBuf, PathBuf> {
    let Ok(target) = fs::read_link(state_dir.join(CURRENT)) else {
        return BTreeMap::new();
    };
    let dir = state_dir.join(target);
    fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
        .map(|m| m.lists.into_iter().map(|l| (l.path, dir.join(l.copy))).collect())
        .unwrap_or_default()
}

/// Whether the file at `path` holds exactly `bytes`.
fn same_bytes(path: &Path, bytes: &[u8]) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() == bytes.len() as u64) && fs::read(path).is_ok_and(|b| b == bytes)
}

/// Removes a generation directory: its files, `lists/` and itself. Only
/// that layout (nothing is followed or recursed into further), and by full
/// paths, so the unit's sandbox check sees where it writes.
fn remove_generation(dir: &Path) {
    let lists = dir.join(LISTS);
    for d in [lists.as_path(), dir] {
        if let Ok(entries) = fs::read_dir(d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| !t.is_dir()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    let _ = fs::remove_dir(&lists);
    let _ = fs::remove_dir(dir);
}

/// Writes `bytes` to a new file at `path` and flushes it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    // The copy is read only at a restart: its pages, clean once synced, need
    // not stay in the page cache charged to the agent's memory cgroup (a
    // 1M-line list is about 17 MiB). Advice: an error changes nothing.
    // SAFETY: a valid open fd; no pointers.
    let _ = unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// Flushes a directory's entries (new names, a rename) to disk.
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StateError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// `p` made absolute against the working directory (no symlinks resolved:
/// the file may be missing).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rg-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("state test setup");
        d
    }

    #[test]
    fn saved_copy_loads_when_the_real_files_are_broken() {
        let root = tempdir("roundtrip");
        let etc = root.join("etc");
        fs::create_dir_all(&etc).expect("state test setup");
        let cfg = etc.join("relay-guard.toml");
        let state = root.join("state");
        fs::write(
            &cfg,
            format!(
                "interfaces = [\"lo\"]\nstate_dir = \"{}\"\n[[guard]]\nname = \"relay\"\nports = [25]\nallow = [\"192.0.2.1\"]\nallow_files = [\"peers.txt\"]\n[[guard]]\nname = \"sub\"\nports = [587]\nallow_files = [\"peers.txt\"]\n",
                state.display()
            ),
        )
        .expect("state test setup");
        fs::write(etc.join("peers.txt"), "198.51.100.0/24\n").expect("state test setup");
        let (good, index) = Config::load_indexed(&cfg).expect("state test setup");
        use std::os::unix::fs::MetadataExt as _;
        let list_copy = state.join(CURRENT).join(LISTS).join("0");
        save(&state, &cfg, &index).expect("state test setup");
        let first = fs::metadata(&list_copy).expect("copy").ino();
        save(&state, &cfg, &index).expect("state test setup");
        // The second save linked the unchanged list instead of writing it,
        // and removing the older set left the copy in place.
        let meta = fs::metadata(&list_copy).expect("copy");
        assert_eq!(
            (meta.ino(), meta.nlink()),
            (first, 1),
            "unchanged list linked, not rewritten"
        );
        assert_eq!(fs::read(&list_copy).expect("copy"), b"198.51.100.0/24\n");
        let gens = fs::read_dir(&state)
            .expect("state test setup")
            .filter(|e| {
                e.as_ref()
                    .expect("state test setup")
                    .file_name()
                    .to_string_lossy()
                    .starts_with(GEN_PREFIX)
            })
            .count();
        assert_eq!(gens, 1, "only the last set is kept");

        // Break the list and the config: the copy still loads, under the
        // original paths.
        fs::write(etc.join("peers.txt"), "198.51.100.0/24\nnot-an-address\n").expect("state test setup");
        assert!(Config::load(&cfg).is_err());
        let text = fs::read_to_string(&cfg).expect("state test setup");
        assert_eq!(state_dir_for(Some(&ConfigFile::parse(&cfg, &text))), state);
        let restored = load(&state, &cfg, &LoadOptions::default()).expect("state test setup");
        assert_eq!(restored.config, good);
        assert_eq!(restored.index.files[0].bytes, b"198.51.100.0/24\n");
        assert_eq!(&*restored.index.files[0].path, etc.join("peers.txt"));
        fs::write(&cfg, "interfaces = [").expect("state test setup");
        assert_eq!(
            state_dir_for(Some(&ConfigFile::parse(&cfg, "interfaces = ["))),
            PathBuf::from(DEFAULT_STATE_DIR)
        );
        assert_eq!(state_dir_for(None), PathBuf::from(DEFAULT_STATE_DIR));
        assert!(load(&state, &cfg, &LoadOptions::default()).is_ok());

        // A copy of another config is not used.
        let other = etc.join("other.toml");
        assert!(matches!(
            load(&state, &other, &LoadOptions::default()),
            Err(StateError::OtherConfig { .. })
        ));
        // Nothing saved: the reason says where it looked.
        let err = load(&root.join("nothing"), &cfg, &LoadOptions::default())
            .err()
            .expect("no copy there");
        assert!(err.to_string().contains("no last good copy"), "{err}");
        fs::remove_dir_all(&root).expect("state test setup");
    }
}
