//! Reload triggers besides SIGHUP: changes to the config file or any list
//! file, watched through their directories (notify/inotify), so an editor's
//! write-and-rename and a Kubernetes ConfigMap's `..data` symlink swap are
//! both seen. Events are debounced and compared by content: a reload is
//! attempted only when the bytes of the config or a list file changed.
use std::{collections::BTreeSet, path::PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::warn;

/// Watches the directories of a config and its list files.
pub struct FileWatch {
    _watcher: Option<RecommendedWatcher>,
    pub events: mpsc::UnboundedReceiver<()>,
    dirs: BTreeSet<PathBuf>,
}

/// Directories to watch for `files`: each file's directory, and the
/// directory of the file a symlink resolves to.
fn dirs_of(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for f in files {
        if let Some(d) = f.parent() {
            dirs.insert(if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            });
        }
        if let Ok(real) = std::fs::canonicalize(f)
            && let Some(d) = real.parent()
        {
            dirs.insert(d.to_path_buf());
        }
    }
    dirs
}

impl FileWatch {
    /// Starts watching. A directory that cannot be watched is logged; SIGHUP
    /// still works.
    pub fn new(files: &[PathBuf]) -> FileWatch {
        let (tx, events) = mpsc::unbounded_channel();
        let dirs = dirs_of(files);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !ev.kind.is_access()
            {
                let _ = tx.send(());
            }
        });
        let watcher = match watcher {
            Ok(mut w) => {
                for d in &dirs {
                    if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                        warn!(dir = %d.display(), error = %e, "cannot watch for config changes (SIGHUP still reloads)");
                    }
                }
                Some(w)
            }
            Err(e) => {
                warn!(error = %e, "file watching unavailable (SIGHUP still reloads)");
                None
            }
        };
        FileWatch {
            _watcher: watcher,
            events,
            dirs,
        }
    }

    /// Whether the watched directories for `files` differ from these.
    pub fn covers(&self, files: &[PathBuf]) -> bool {
        dirs_of(files) == self.dirs
    }
}
