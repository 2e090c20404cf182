//! What the agent keeps of its config between reloads, so that a change of a
//! few lines in a large list file is validated and applied as a delta: the
//! bytes of every list file as loaded, and per guard every entry (duplicates
//! included) sorted by network.
//!
//! [`ListIndex::changes`] compares the files on disk with the kept bytes. A
//! changed file is split into a common head, a common tail and the lines in
//! between. A small middle is parsed whole (old and new); a large one (a list
//! regenerated with changes spread over it) has its old and new lines paired
//! by content first, so only lines without a copy on the other side are
//! parsed. An edit of one line in a 1,000,000-line list costs a byte compare,
//! not a re-parse. It returns `None` — the caller then does a full reload —
//! when the config file itself changed, a file cannot be read, or the edit is
//! large.
use std::{collections::BTreeMap, path::Path, sync::Arc};

use ipnet::IpNet;

use super::{
    entry::{Action, ConfigError, ConfigErrors, Entry, Origin, parse_list_from},
    fingerprint::fingerprint_hasher,
};

/// `Indexed::file` of an entry written in the config file itself.
pub const INLINE: u16 = u16::MAX;

/// Above this many changed lines (old plus new) a reload is done in full.
pub const MAX_DELTA_LINES: usize = 100_000;

/// One occurrence of a network in a guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indexed {
    pub net: IpNet,
    /// 1-based line in its file.
    pub line: u32,
    /// Index into [`ListIndex::files`], or [`INLINE`].
    pub file: u16,
    pub action: Action,
}

/// A list file as loaded.
#[derive(Debug)]
pub struct ListFile {
    pub path: Arc<Path>,
    pub guard: usize,
    pub action: Action,
    pub bytes: Vec<u8>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct ListIndex {
    /// The config file's bytes as loaded.
    pub config_text: Vec<u8>,
    /// In the order of `Config::list_files`.
    pub files: Vec<ListFile>,
    /// Per guard: every occurrence, sorted by network (stable: file order).
    pub guards: Vec<Vec<Indexed>>,
    /// Per guard and family (0: IPv4, 1: IPv6): bit l set when some entry
    /// has prefix length l (a superset after removals; it only saves probes).
    pub lens: Vec<[u128; 2]>,
    /// The config file, for origins of inline entries.
    pub config_path: Option<Arc<Path>>,
}

/// A guard's decision on one network changed: (guard, network, before, after).
pub type Change = (usize, IpNet, Option<Action>, Option<Action>);

/// A validated edit of the list files, not yet applied to the index.
#[derive(Debug)]
pub struct Pending {
    files: Vec<FileEdit>,
    /// Per guard decisions that change.
    pub changes: Vec<Change>,
    /// Lines parsed (old and new), for the log.
    pub lines: usize,
}

#[derive(Debug)]
struct FileEdit {
    file: u16,
    /// First line of the edited region (1-based), in old and new.
    first: u32,
    /// Lines of the region before and after.
    old_lines: u32,
    new_lines: u32,
    added: Vec<Indexed>,
    /// The occurrences the region held (to remove).
    removed: Vec<Indexed>,
    /// For a region matched line by line: the new line number of each old
    /// line of the region (`u32::MAX`: gone). None: every old line is gone.
    renumber: Option<Vec<u32>>,
    bytes: Vec<u8>,
}

impl FileEdit {
    fn in_region(&self, e: &Indexed) -> bool {
        e.file == self.file && e.line >= self.first && e.line < self.first + self.old_lines
    }

    fn removes(&self, e: &Indexed) -> bool {
        self.in_region(e)
            && self
                .renumber
                .as_ref()
                .is_none_or(|r| r[(e.line - self.first) as usize] == u32::MAX)
    }
}

/// Start offsets of the lines of `text` (a last line without `\n` counts).
fn line_starts(text: &[u8]) -> Vec<u32> {
    let mut starts = Vec::with_capacity(text.len() / 16 + 1);
    let mut at = 0usize;
    while at < text.len() {
        starts.push(u32::try_from(at).expect("list files are under 4 GiB"));
        at = memchr::memchr(b'\n', &text[at..]).map_or(text.len(), |i| at + i + 1);
    }
    starts
}

fn line_at<'a>(text: &'a [u8], starts: &[u32], k: usize) -> &'a [u8] {
    let end = starts.get(k + 1).map_or(text.len(), |&e| e as usize);
    &text[starts[k] as usize..end]
}

/// Pairs equal lines of `old` and `new` (the k-th copy of a line with the
/// k-th): for each old line the index of its new line, `u32::MAX` if none;
/// and which new lines were paired. Hashes are sorted, not put in a hash
/// map, to keep memory at 16 bytes a line.
fn match_lines(old: &[u8], os: &[u32], new: &[u8], ns: &[u32]) -> (Vec<u32>, Vec<bool>) {
    use std::hash::{BuildHasher as _, Hasher as _};
    let state = foldhash::quality::FixedState::with_seed(0x6c69_6e65);
    let hashed = |text: &[u8], starts: &[u32]| -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = (0..starts.len())
            .map(|k| {
                let mut h = state.build_hasher();
                h.write(line_at(text, starts, k));
                (h.finish(), u32::try_from(k).expect("fits"))
            })
            .collect();
        v.sort_unstable();
        v
    };
    let (ho, hn) = (hashed(old, os), hashed(new, ns));
    let mut to_new = vec![u32::MAX; os.len()];
    let mut paired = vec![false; ns.len()];
    let (mut i, mut j) = (0, 0);
    while i < ho.len() && j < hn.len() {
        match ho[i].0.cmp(&hn[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                let (o, n) = (ho[i].1 as usize, hn[j].1 as usize);
                // Equal hashes of different lines stay unpaired (parsed).
                if line_at(old, os, o) == line_at(new, ns, n) {
                    to_new[o] = u32::try_from(n).expect("fits");
                    paired[n] = true;
                }
                i += 1;
                j += 1;
            }
        }
    }
    (to_new, paired)
}

/// Above this many lines (old plus new) an edited region is matched line by
/// line instead of being parsed whole.
pub const SMALL_REGION: usize = 4096;

fn family_of(net: &IpNet) -> usize {
    usize::from(net.addr().is_ipv6())
}

fn lines_in(bytes: &[u8]) -> u32 {
    u32::try_from(memchr::memchr_iter(b'\n', bytes).count()).unwrap_or(u32::MAX)
}

/// (head, tail) byte lengths common to `old` and `new`, each made of whole
/// lines and not overlapping.
fn common_lines(old: &[u8], new: &[u8]) -> (usize, usize) {
    let max = old.len().min(new.len());
    let mut head = common_prefix(old, new);
    // Back to the start of the line the difference is in.
    if head < old.len() || head < new.len() {
        head = old[..head].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    }
    let room = max - head;
    let mut tail = common_suffix(&old[old.len() - room..], &new[new.len() - room..]);
    // The tail must start at a line start in both.
    while tail > 0 {
        let o = old.len() - tail;
        let n = new.len() - tail;
        let at_start = |buf: &[u8], i: usize| i == head || buf[i - 1] == b'\n';
        if at_start(old, o) && at_start(new, n) {
            break;
        }
        tail -= 1;
    }
    (head, tail)
}

/// Length of the common prefix, compared a block at a time (memcmp).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n].iter().zip(&b[i..n]).take_while(|(x, y)| x == y).count()
}

/// Length of the common suffix, compared a block at a time.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = 0;
    while i + BLOCK <= n && a[n - i - BLOCK..n - i] == b[n - i - BLOCK..n - i] {
        i += BLOCK;
    }
    i + a[..n - i]
        .iter()
        .rev()
        .zip(b[..n - i].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

impl ListIndex {
    /// The guard's decision on `net` (its entries for exactly that network),
    /// skipping occurrences `skip` says are gone.
    fn action_in(entries: &[Indexed], net: &IpNet, skip: impl Fn(&Indexed) -> bool) -> Option<Action> {
        let start = entries.partition_point(|e| e.net < *net);
        entries[start..]
            .iter()
            .take_while(|e| e.net == *net)
            .find(|e| !skip(e))
            .map(|e| e.action)
    }

    /// Guard `g`'s own entry for exactly `net`, if any.
    pub fn action(&self, g: usize, net: &IpNet) -> Option<Action> {
        Self::action_in(&self.guards[g], net, |_| false)
    }

    /// Guard `g`'s longest entry containing `net` (itself included).
    pub fn decides(&self, g: usize, net: &IpNet) -> Option<Action> {
        let lens = self.lens[g][family_of(net)];
        (0..=net.prefix_len()).rev().find_map(|l| {
            if lens & (1u128 << l.min(127)) == 0 && l != 128 {
                return None;
            }
            let sup = IpNet::new(net.addr(), l).expect("l <= prefix_len").trunc();
            self.action(g, &sup)
        })
    }

    /// Whether any guard has an entry for exactly `net`.
    pub fn named(&self, net: &IpNet) -> bool {
        (0..self.guards.len()).any(|g| self.action(g, net).is_some())
    }

    fn origin(&self, e: &Indexed) -> Origin {
        let file = if e.file == INLINE {
            self.config_path.clone().unwrap_or_else(|| Arc::from(Path::new("")))
        } else {
            Arc::clone(&self.files[usize::from(e.file)].path)
        };
        Origin {
            file,
            line: e.line as usize,
        }
    }

    /// Compares the config and list files on disk with what was loaded.
    /// `Ok(None)`: take the full path (see the module documentation).
    /// `Err`: the edit is invalid; nothing was changed.
    pub fn changes(&self, config_path: &Path, guard_names: &[String]) -> Result<Option<Pending>, ConfigErrors> {
        self.changes_with(config_path, guard_names, SMALL_REGION)
    }

    /// [`ListIndex::changes`], matching regions of more than `small` lines
    /// line by line (a region regenerated with changes spread over it then
    /// parses only its changed lines).
    pub fn changes_with(
        &self,
        config_path: &Path,
        guard_names: &[String],
        small: usize,
    ) -> Result<Option<Pending>, ConfigErrors> {
        match crate::config::read_bounded(config_path) {
            Ok(text) if text == self.config_text => {}
            _ => return Ok(None),
        }
        let mut edits = Vec::new();
        let mut errors = Vec::new();
        let mut removed: Vec<(u16, Indexed)> = Vec::new();
        let mut lines = 0usize;
        for (i, f) in self.files.iter().enumerate() {
            let Ok(bytes) = crate::config::read_bounded(&f.path) else {
                return Ok(None);
            };
            if bytes == f.bytes {
                continue;
            }
            // Long lines, NUL, non-UTF-8: the full reload reports them by line.
            if !crate::config::list_bytes_errors(&f.path, &bytes).is_empty() {
                return Ok(None);
            }
            let (head, tail) = common_lines(&f.bytes, &bytes);
            let old_mid = &f.bytes[head..f.bytes.len() - tail];
            let new_mid = &bytes[head..bytes.len() - tail];
            let (old_lines, new_lines) = (lines_in(old_mid), lines_in(new_mid));
            let Ok(new_text) = std::str::from_utf8(new_mid) else {
                return Ok(None);
            };
            let old_text = std::str::from_utf8(old_mid).expect("was loaded as UTF-8; cut at line ends");
            let first = lines_in(&f.bytes[..head]) + 1;
            // A region without a final newline is the file's last line.
            let count = |t: &str, n: u32| n + u32::from(!t.is_empty() && !t.ends_with('\n'));
            let (old_count, new_count) = (count(old_text, old_lines), count(new_text, new_lines));
            let file = u16::try_from(i).expect("list files fit u16");
            let (gone, new, errs, renumber) = if (old_count + new_count) as usize <= small {
                lines += (old_count + new_count) as usize;
                let (gone, _) = parse_list_from(&f.path, old_text, f.action, first as usize);
                let (new, errs) = parse_list_from(&f.path, new_text, f.action, first as usize);
                (gone, new, errs, None)
            } else {
                // Matched line by line: only lines without a copy on the
                // other side are parsed.
                let (os, ns) = (line_starts(old_mid), line_starts(new_mid));
                let (to_new, paired) = match_lines(old_mid, &os, new_mid, &ns);
                let (mut gone, mut new, mut errs) = (Vec::new(), Vec::new(), Vec::new());
                let text = |b: &[u8]| std::str::from_utf8(b).expect("cut at line ends of UTF-8").to_string();
                for (k, &n) in to_new.iter().enumerate() {
                    if n == u32::MAX {
                        lines += 1;
                        let line = text(line_at(old_mid, &os, k));
                        gone.extend(parse_list_from(&f.path, &line, f.action, first as usize + k).0);
                    }
                }
                for (k, &p) in paired.iter().enumerate() {
                    if !p {
                        lines += 1;
                        let line = text(line_at(new_mid, &ns, k));
                        let (e, r) = parse_list_from(&f.path, &line, f.action, first as usize + k);
                        new.extend(e);
                        errs.extend(r);
                    }
                }
                let renumber = to_new
                    .into_iter()
                    .map(|n| if n == u32::MAX { n } else { first + n })
                    .collect();
                (gone, new, errs, Some(renumber))
            };
            if lines > MAX_DELTA_LINES {
                return Ok(None);
            }
            errors.extend(errs);
            let gone: Vec<Indexed> = gone.iter().map(|e| to_indexed(e, file)).collect();
            removed.extend(gone.iter().map(|e| (file, *e)));
            edits.push(FileEdit {
                file,
                first,
                old_lines: old_count,
                new_lines: new_count,
                added: new.iter().map(|e| to_indexed(e, file)).collect(),
                removed: gone,
                renumber,
                bytes,
            });
        }
        // Per guard, the networks whose decision may change.
        let mut touched: BTreeMap<(usize, IpNet), ()> = BTreeMap::new();
        for (file, e) in &removed {
            touched.insert((self.files[usize::from(*file)].guard, e.net), ());
        }
        for ed in &edits {
            for e in &ed.added {
                touched.insert((self.files[usize::from(ed.file)].guard, e.net), ());
            }
        }
        let mut changes = Vec::new();
        for &(g, net) in touched.keys() {
            let before = self.action(g, &net);
            let entries = &self.guards[g];
            let start = entries.partition_point(|e| e.net < net);
            let kept = entries[start..]
                .iter()
                .take_while(|e| e.net == net)
                .filter(|e| !edits.iter().any(|ed| ed.removes(e)));
            let added = edits
                .iter()
                .filter(|ed| self.files[usize::from(ed.file)].guard == g)
                .flat_map(|ed| ed.added.iter().filter(|e| e.net == net));
            // Occurrences as a full load would see them: in file order, with
            // the line numbers after the edit.
            let mut all: Vec<Indexed> = kept.map(|e| shifted(e, &edits)).chain(added.copied()).collect();
            all.sort_by_key(rank);
            let after = all.first().map(|e| e.action);
            // As the full load's dedup: each later occurrence whose action
            // differs from the first one is an error, reported where it is.
            if let Some(first) = all.first() {
                for later in all.iter().skip(1).filter(|e| e.action != first.action) {
                    let (a, d) = if first.action == Action::Allow {
                        (first, later)
                    } else {
                        (later, first)
                    };
                    let at = self.origin(later);
                    errors.push(ConfigError {
                        file: at.file.to_path_buf(),
                        line: at.line,
                        what: format!(
                            "guard `{}`: `{net}` is both allowed ({}) and denied ({})",
                            guard_names.get(g).map_or("?", String::as_str),
                            self.origin(a),
                            self.origin(d)
                        ),
                    });
                }
            }
            if before != after {
                changes.push((g, net, before, after));
            }
        }
        if !errors.is_empty() {
            errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            return Err(ConfigErrors(errors));
        }
        Ok(Some(Pending {
            files: edits,
            changes,
            lines,
        }))
    }

    /// Applies a validated edit.
    pub fn commit(&mut self, pending: Pending) {
        for ed in pending.files {
            let g = self.files[usize::from(ed.file)].guard;
            let shift = i64::from(ed.new_lines) - i64::from(ed.old_lines);
            let entries = &mut self.guards[g];
            if ed.removed.len() < 64 {
                // Found by network: no pass over the whole list.
                for r in &ed.removed {
                    let start = entries.partition_point(|x| x.net < r.net);
                    if let Some(off) = entries[start..]
                        .iter()
                        .take_while(|x| x.net == r.net)
                        .position(|x| x.file == r.file && x.line == r.line)
                    {
                        entries.remove(start + off);
                    }
                }
            } else {
                entries.retain(|e| !ed.removes(e));
            }
            if shift != 0 || ed.renumber.is_some() {
                for e in entries.iter_mut() {
                    if e.file == ed.file {
                        *e = shifted(e, std::slice::from_ref(&ed));
                    }
                }
            }
            if ed.renumber.is_some() {
                // Lines moved: restore file order among equal networks.
                entries.sort_by_key(|e| (e.net, rank(e)));
            }
            for e in &ed.added {
                self.lens[g][family_of(&e.net)] |= 1u128 << e.net.prefix_len().min(127);
            }
            if ed.added.len() < 64 {
                for e in ed.added {
                    // Among equal networks, in file order (as a full load).
                    let at = entries.partition_point(|x| (x.net, rank(x)) <= (e.net, rank(&e)));
                    entries.insert(at, e);
                }
            } else {
                entries.extend(ed.added);
                entries.sort_by_key(|e| (e.net, rank(e)));
            }
            self.files[usize::from(ed.file)].bytes = ed.bytes;
        }
    }

    /// [`crate::config::fingerprint`] of the bytes this index holds.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = fingerprint_hasher();
        if let Some(p) = &self.config_path {
            Path::hash(p, &mut h);
        }
        self.config_text.hash(&mut h);
        for f in &self.files {
            Path::hash(&f.path, &mut h);
            f.bytes.hash(&mut h);
        }
        h.finish()
    }

    /// Entries of a guard, for building [`ListIndex::guards`].
    pub(crate) fn push_guard(&mut self, mut entries: Vec<Indexed>) {
        entries.sort_by_key(|e| e.net);
        let mut lens = [0u128; 2];
        for e in &entries {
            lens[family_of(&e.net)] |= 1u128 << e.net.prefix_len().min(127);
        }
        self.guards.push(entries);
        self.lens.push(lens);
    }
}

/// Order of occurrences of one network in a full load: the config's own
/// entries, then the list files in order, each by line.
fn rank(e: &Indexed) -> (u32, u32) {
    let file = if e.file == INLINE { 0 } else { u32::from(e.file) + 1 };
    (file, e.line)
}

/// `e` with its line number after `edits` (lines below an edited region move).
fn shifted(e: &Indexed, edits: &[FileEdit]) -> Indexed {
    let mut e = *e;
    if let Some(ed) = edits.iter().find(|ed| ed.file == e.file) {
        if e.line >= ed.first + ed.old_lines {
            e.line =
                u32::try_from(i64::from(e.line) + i64::from(ed.new_lines) - i64::from(ed.old_lines)).expect("positive");
        } else if let Some(r) = &ed.renumber
            && ed.in_region(&e)
        {
            // Kept lines of a region matched line by line move where their copy is.
            e.line = r[(e.line - ed.first) as usize];
        }
    }
    e
}

/// An [`Indexed`] for a parsed entry of file `file`.
pub(crate) fn to_indexed(e: &Entry, file: u16) -> Indexed {
    Indexed {
        net: e.net,
        line: u32::try_from(e.origin.line).unwrap_or(u32::MAX),
        file,
        action: e.action,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_lines_cut_at_line_boundaries() {
        assert_eq!(common_lines(b"a\nb\nc\n", b"a\nb\nc\n"), (6, 0));
        assert_eq!(common_lines(b"a\nb\nc\n", b"a\nx\nc\n"), (2, 2));
        assert_eq!(common_lines(b"a\nbb\nc\n", b"a\nb\nc\n"), (2, 2));
        assert_eq!(common_lines(b"a\nb\n", b"a\nb\nc\n"), (4, 0));
        assert_eq!(common_lines(b"a\nb\nc\n", b"a\nc\n"), (2, 2));
        assert_eq!(common_lines(b"1.2.3.4\n", b"11.2.3.4\n"), (0, 0));
        assert_eq!(common_lines(b"x\n1.2.3.4", b"x\n1.2.3.45"), (2, 0));
        assert_eq!(common_lines(b"", b"a\n"), (0, 0));
    }
}
