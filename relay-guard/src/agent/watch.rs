//! Reload triggers besides SIGHUP: changes to the config file or any list
//! file, watched through their directories (notify/inotify), so an editor's
//! write-and-rename and a Kubernetes ConfigMap's `..data` symlink swap are
//! both seen. Events are debounced and compared by content: a reload is
//! attempted only when the bytes of the config or a list file changed.
use std::{
    collections::BTreeSet,
    ffi::OsString,
    path::{Path, PathBuf},
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::warn;

/// Watches the directories of a config and its list files.
pub struct FileWatch {
    _watcher: Option<RecommendedWatcher>,
    pub events: mpsc::UnboundedReceiver<()>,
    dirs: BTreeSet<PathBuf>,
    names: BTreeSet<OsString>,
}

/// The names that matter in the watched directories: each file's name and
/// the name of the file a symlink resolves to. Other files there (a log, the
/// ban list in `state_dir`, an editor's swap file) are not the config's, and
/// their writes must not make the agent stop to re-read it.
fn names_of(files: &[PathBuf]) -> BTreeSet<OsString> {
    let mut names = BTreeSet::new();
    for f in files {
        if let Some(n) = f.file_name() {
            names.insert(n.to_os_string());
        }
        if let Ok(real) = std::fs::canonicalize(f)
            && let Some(n) = real.file_name()
        {
            names.insert(n.to_os_string());
        }
    }
    names
}

/// Whether an event on `path` can change the config or a list: the path is
/// one of `names`, or a Kubernetes ConfigMap's `..data` / `..<timestamp>`
/// entry, whose swap replaces every file at once.
fn concerns(path: &Path, names: &BTreeSet<OsString>) -> bool {
    match path.file_name() {
        Some(n) => names.contains(n) || n.as_encoded_bytes().starts_with(b".."),
        None => true,
    }
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
        let names = names_of(files);
        let concerned = names.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && completes_a_change(&ev)
                && (ev.paths.is_empty() || ev.paths.iter().any(|p| concerns(p, &concerned)))
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
            names,
        }
    }

    /// Whether these watched directories and names are the ones `files` need.
    pub fn covers(&self, files: &[PathBuf]) -> bool {
        dirs_of(files) == self.dirs && names_of(files) == self.names
    }
}

/// Whether `ev` ends a change of a file, so that its content is whole:
/// a writer closed it (`IN_CLOSE_WRITE`), a file was renamed into place
/// (`IN_MOVED_TO`: write to a temporary file, then rename), removed or
/// renamed away, or a symlink was made (a ConfigMap's `..data` swap is a
/// rename). Opening, truncating and each `write` (`IN_MODIFY`) do not
/// count: a list is never applied half-written.
fn completes_a_change(ev: &notify::Event) -> bool {
    use notify::{
        EventKind,
        event::{AccessKind, AccessMode, ModifyKind},
    };
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => true,
        EventKind::Create(_) => ev
            .paths
            .iter()
            .any(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list file being written is not a change until it is closed (or
    /// renamed into place): the watcher stays quiet through open, truncate
    /// and writes, and speaks once the writer closes it.
    #[test]
    fn watcher_waits_for_a_file_to_be_fully_written() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("rg-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let list = dir.join("drop.txt");
        std::fs::write(&list, "192.0.2.0/24\n").expect("write");
        let mut watch = FileWatch::new(std::slice::from_ref(&list));
        let quiet = |w: &mut FileWatch| {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let mut n = 0;
            while w.events.try_recv().is_ok() {
                n += 1;
            }
            n
        };
        assert_eq!(quiet(&mut watch), 0, "no event before any change");
        let mut f = std::fs::File::create(&list).expect("truncate");
        f.write_all(b"198.51.100.0/24\n").expect("write");
        f.flush().expect("flush");
        assert_eq!(
            quiet(&mut watch),
            0,
            "an event while the file is still open for writing"
        );
        f.write_all(b"203.0.113.0/24\n").expect("write");
        drop(f);
        assert!(quiet(&mut watch) > 0, "no event after the writer closed the file");

        // Write to a temporary name, then rename: one change, at the rename.
        let tmp = dir.join(".drop.txt.tmp");
        std::fs::write(&tmp, "192.0.2.0/24\n").expect("write tmp");
        let _ = quiet(&mut watch);
        std::fs::rename(&tmp, &list).expect("rename");
        assert!(quiet(&mut watch) > 0, "no event after the rename into place");

        // Another file in the same directory (a log, state_dir's ban list)
        // is none of the config's business: written, renamed, removed.
        let log = dir.join("mail.log");
        std::fs::write(&log, "a line\n").expect("write log");
        std::fs::rename(&log, dir.join("mail.log.1")).expect("rotate log");
        std::fs::remove_file(dir.join("mail.log.1")).expect("remove log");
        assert_eq!(quiet(&mut watch), 0, "an unrelated file's writes woke the config watch");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
