//! Follows a log file across rotation, line by line: no line lost or read
//! twice while the follower keeps up.
//!
//! - Rename rotation (logrotate's default, `postfix logrotate`): when the path
//!   names a new file, the old one is read to its end, and read on for
//!   [`DRAIN`] more (a writer may not have reopened yet); the new file is
//!   read from its start.
//! - copytruncate: a file shorter than the position read is read again from
//!   its start. (Lines written between logrotate's copy and its truncate are
//!   lost to every reader: that is copytruncate's own race.)
//! - A file missing at start, or gone (deleted, renamed away), is waited for,
//!   and read from its start when it appears. A file present at start is read
//!   from its end: what was logged before the agent started is not counted.
//! - A file that is there but cannot be opened (permissions) is an error,
//!   not "not there yet": logged, and the source is down
//!   (`relay_guard_log_source_up` 0) until it opens. It is tried again at
//!   every poll.
//! - A file that others than root and its daemon could write (group or
//!   other write bits, or a non-root owner that is no mail or syslog daemon
//!   user) is warned about once per follow ([`write_risk`]): any line in it
//!   would be believed.
//! - A last line without its newline is held until the newline comes. A line
//!   longer than [`MAX_LINE`] is passed on cut (and will not parse).
//!
//! [`follow`] wakes on inotify events of the file's directory (the `notify`
//! crate) and at least every [`super::POLL`]; [`Tail::poll`] does the
//! reading and is what the tests drive.
use std::{
    fs::File,
    io::{ErrorKind, Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use notify::Watcher;

use super::{POLL, Parser, Sink};

/// How long a rotated-away file is still read after the path names a new
/// file.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Longest line passed on whole.
pub const MAX_LINE: usize = 16 * 1024;

/// One open file and how far it was read.
#[derive(Debug)]
struct Reader {
    file: File,
    dev: u64,
    ino: u64,
    pos: u64,
    /// The last line read so far, its newline not yet written.
    partial: Vec<u8>,
    /// The current line went over [`MAX_LINE`]: skip to its newline.
    skipping: bool,
}

impl Reader {
    fn open(path: &Path, from_end: bool) -> std::io::Result<Reader> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Reader {
            pos: if from_end { meta.len() } else { 0 },
            dev: meta.dev(),
            ino: meta.ino(),
            file,
            partial: Vec::new(),
            skipping: false,
        })
    }

    /// Reads what was added since the last call, handing out whole lines.
    fn read(&mut self, lines: &mut dyn FnMut(&str)) {
        let Ok(meta) = self.file.metadata() else { return };
        if meta.len() < self.pos {
            // Truncated (copytruncate): start over.
            self.pos = 0;
            self.partial.clear();
            self.skipping = false;
        }
        if meta.len() == self.pos {
            return;
        }
        if self.file.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            self.pos += n as u64;
            let mut chunk = &buf[..n];
            while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
                if self.skipping {
                    self.skipping = false;
                } else {
                    self.partial.extend_from_slice(&chunk[..nl]);
                    emit(&self.partial[..self.partial.len().min(MAX_LINE)], lines);
                }
                self.partial.clear();
                chunk = &chunk[nl + 1..];
            }
            if !self.skipping {
                self.partial.extend_from_slice(chunk);
                if self.partial.len() > MAX_LINE {
                    emit(&self.partial[..MAX_LINE], lines);
                    self.partial.clear();
                    self.skipping = true;
                }
            }
        }
    }

    /// Hands out a last line that never got its newline.
    fn flush(&mut self, lines: &mut dyn FnMut(&str)) {
        if !self.partial.is_empty() && !self.skipping {
            emit(&self.partial, lines);
        }
        self.partial.clear();
    }
}

fn emit(bytes: &[u8], lines: &mut dyn FnMut(&str)) {
    // A writer without O_APPEND after copytruncate leaves NULs before its
    // next line.
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    lines(&String::from_utf8_lossy(&bytes[start..]));
}

/// Whether the followed path is being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// The file the path names is open.
    Open,
    /// No file there (yet, or any more): waited for.
    Missing,
    /// There, but opening it failed (the error).
    Unreadable(String),
}

impl FileState {
    fn of(result: &std::io::Result<Reader>) -> FileState {
        match result {
            Ok(_) => FileState::Open,
            Err(e) if e.kind() == ErrorKind::NotFound => FileState::Missing,
            Err(e) => FileState::Unreadable(e.to_string()),
        }
    }
}

/// The owners a log file may have besides root: the users mail daemons and
/// syslog daemons write as (Postfix's `mail_owner`, Dovecot, rsyslog on
/// Ubuntu).
pub const TRUSTED_OWNERS: &[&str] = &["postfix", "dovecot", "dovenull", "syslog"];

/// Why a line in `path` might not come from its daemon: it is writable by
/// group or others, or owned by a user that is neither root nor one of
/// [`TRUSTED_OWNERS`]. `None`: only root and the daemon can write it (or it
/// is not there to judge).
pub fn write_risk(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!(
            "{} is writable by its group or by others (mode {mode:04o}): any line written there is believed; make it 0640 or stricter",
            path.display()
        ));
    }
    let uid = meta.uid();
    if uid != 0 {
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        if !name.as_deref().is_some_and(|n| TRUSTED_OWNERS.contains(&n)) {
            return Some(format!(
                "{} is owned by {} (uid {uid}), neither root nor a mail or syslog daemon user ({}): that user can write any line there, and it is believed",
                path.display(),
                name.as_deref().unwrap_or("an unknown user"),
                TRUSTED_OWNERS.join(", ")
            ));
        }
    }
    None
}

/// The reading state of one followed path.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    current: Option<Reader>,
    state: FileState,
    /// Files rotated away, read until their deadline.
    draining: Vec<(Reader, Instant)>,
    /// The next open is the first and found the file there at start: read
    /// from its end.
    from_end: bool,
}

impl Tail {
    /// Starts following `path`: from its end if it exists now, else from the
    /// start of the file that appears there.
    pub fn new(path: &Path) -> Tail {
        let opened = Reader::open(path, true);
        Tail {
            path: path.to_owned(),
            state: FileState::of(&opened),
            current: opened.ok(),
            draining: Vec::new(),
            from_end: false,
        }
        .unreadable_reads_from_end()
    }

    /// A file that was there but unreadable holds history: once readable,
    /// it is read from its end, like a file there at start.
    fn unreadable_reads_from_end(mut self) -> Tail {
        self.from_end = matches!(self.state, FileState::Unreadable(_));
        self
    }

    /// Whether a file is open (false while it is waited for).
    pub fn is_open(&self) -> bool {
        self.current.is_some()
    }

    /// Whether the path's file is being read, as of the last poll.
    pub fn state(&self) -> &FileState {
        &self.state
    }

    /// Reads every line added since the last call, in order: first the rest
    /// of rotated-away files, then the file the path names.
    pub fn poll(&mut self, lines: &mut dyn FnMut(&str)) {
        let now = Instant::now();
        for (reader, _) in &mut self.draining {
            reader.read(lines);
        }
        self.draining.retain_mut(|(reader, deadline)| {
            if *deadline > now {
                return true;
            }
            reader.flush(lines);
            false
        });
        match std::fs::metadata(&self.path) {
            Ok(meta) => {
                let same = self
                    .current
                    .as_ref()
                    .is_some_and(|r| r.dev == meta.dev() && r.ino == meta.ino());
                if !same {
                    if let Some(mut old) = self.current.take() {
                        old.read(lines);
                        self.draining.push((old, now + DRAIN));
                    }
                    let opened = Reader::open(&self.path, self.from_end);
                    self.state = FileState::of(&opened);
                    self.current = opened.ok();
                    self.from_end = matches!(self.state, FileState::Unreadable(_));
                }
            }
            Err(e) => {
                // Gone, or rotated and not yet re-created: keep reading what
                // is open; the new file is opened when it appears.
                self.state = if e.kind() == ErrorKind::NotFound {
                    // What appears next is a new file: read from its start.
                    self.from_end = false;
                    FileState::Missing
                } else {
                    FileState::Unreadable(e.to_string())
                };
            }
        }
        if let Some(reader) = &mut self.current {
            reader.read(lines);
        }
    }
}

/// Follows `path` until the sink is done.
pub(crate) fn follow(path: &Path, sink: &Sink) {
    let (wake_tx, wake_rx) = mpsc::channel::<()>();
    // inotify on the directory: sees writes, creates and renames of the file
    // (watching the file itself would lose it at rotation). Without it (no
    // directory yet, inotify limits), polling alone still works.
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = wake_tx.send(());
    })
    .ok();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let mut watching = false;
    let mut tail = Tail::new(path);
    let mut reported: Option<FileState> = None;
    let mut risk_warned = false;
    let mut parser = Parser::new();
    loop {
        if !watching && let Some(w) = watcher.as_mut() {
            watching = w.watch(&dir, notify::RecursiveMode::NonRecursive).is_ok();
        }
        let mut alive = true;
        tail.poll(&mut |line| {
            if alive {
                alive = sink.deliver(parser.line(line), SystemTime::now());
            }
        });
        if reported.as_ref() != Some(tail.state()) {
            let state = tail.state().clone();
            match &state {
                FileState::Open => tracing::info!(path = %path.display(), "following the log file"),
                FileState::Missing => {
                    tracing::warn!(path = %path.display(), "log file does not exist (yet); waiting for it");
                }
                FileState::Unreadable(e) => tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "cannot read the log file: its failed logins are not counted until it can be read (the agent needs read permission on it)"
                ),
            }
            let up = state == FileState::Open;
            alive = alive && sink.up(up);
            if up && !risk_warned {
                if let Some(risk) = write_risk(path) {
                    tracing::warn!(path = %path.display(), "{risk}");
                }
                risk_warned = true;
            }
            reported = Some(state);
        }
        if !alive || sink.done() {
            return;
        }
        match wake_rx.recv_timeout(POLL) {
            Ok(()) => while wake_rx.try_recv().is_ok() {},
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(POLL);
            }
        }
    }
}

#[cfg(test)]
mod tests;
