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

/// The reading state of one followed path.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    current: Option<Reader>,
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
        let mut tail = Tail {
            path: path.to_owned(),
            current: None,
            draining: Vec::new(),
            from_end: true,
        };
        tail.current = Reader::open(path, true).ok();
        tail.from_end = false;
        tail
    }

    /// Whether a file is open (false while it is waited for).
    pub fn is_open(&self) -> bool {
        self.current.is_some()
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
                    self.current = Reader::open(&self.path, self.from_end).ok();
                }
            }
            Err(_) => {
                // Gone, or rotated and not yet re-created: keep reading what
                // is open; the new file is opened when it appears.
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
    if !tail.is_open() {
        tracing::warn!(path = %path.display(), "log file does not exist (yet); waiting for it");
    }
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
