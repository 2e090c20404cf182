//! What an `strace -f` log shows a process doing: its system calls, socket
//! families and written paths, and the calls a systemd sandbox refuses
//! (for the unit-sandbox test).
use std::{collections::BTreeSet, path::Path};

/// What a strace log shows a process doing.
#[derive(Debug, Default)]
pub struct Trace {
    /// Names of the system calls made.
    pub syscalls: BTreeSet<String>,
    /// Address families of the sockets opened.
    pub families: BTreeSet<String>,
    /// Paths created, opened for writing, removed, renamed or pinned.
    pub writes: BTreeSet<String>,
    /// /proc paths outside the process's own /proc/PID (ProcSubset=pid hides them).
    pub proc_reads: BTreeSet<String>,
    /// Calls that MemoryDenyWriteExecute=, RestrictNamespaces=,
    /// LockPersonality= or RestrictRealtime= would refuse.
    pub refused: Vec<String>,
}

/// The double-quoted arguments of a strace line, unescaped only as far as
/// finding their ends.
fn quoted_args(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(start) = rest.find('"') {
        let after = &rest[start + 1..];
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        out.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    out
}

/// Parses `strace -f` output from the line where `exe` is exec'd on.
pub fn parse_trace(log: &str, exe: &Path) -> Trace {
    let exec_marker = format!("execve(\"{}\"", exe.display());
    let mut started = false;
    let mut t = Trace::default();
    for line in log.lines() {
        if !started {
            started = line.contains(&exec_marker) && line.trim_end().ends_with("= 0");
            continue;
        }
        // "PID name(args) = ret", "PID <... name resumed>…", "PID --- SIG… ---", "PID +++ exited +++".
        let body = line
            .split_once(char::is_whitespace)
            .map_or(line, |(_, b)| b)
            .trim_start();
        let (name, call) = if let Some(r) = body.strip_prefix("<... ") {
            (r.split_whitespace().next().unwrap_or(""), "")
        } else {
            (body.split('(').next().unwrap_or(""), body)
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        t.syscalls.insert(name.to_string());
        let args = quoted_args(call);
        match name {
            "socket" | "socketpair" => {
                if let Some(f) = call.split(['(', ',']).nth(1) {
                    t.families.insert(f.trim().to_string());
                }
            }
            "open" | "openat" | "openat2" | "creat" => {
                let flags_write = ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                    .iter()
                    .any(|f| call.contains(f));
                if let Some(p) = args.first() {
                    if flags_write || name == "creat" {
                        t.writes.insert(p.clone());
                    }
                    if let Some(rest) = p.strip_prefix("/proc/") {
                        let first = rest.split('/').next().unwrap_or("");
                        if !(first == "self" || first == "thread-self" || first.chars().all(|c| c.is_ascii_digit())) {
                            t.proc_reads.insert(p.clone());
                        }
                    }
                }
            }
            "mkdir" | "mkdirat" | "unlink" | "unlinkat" | "rmdir" | "truncate" | "mknod" | "mknodat" | "chmod"
            | "fchmodat" | "chown" | "fchownat" | "lchown" | "utimensat" | "setxattr" | "lsetxattr" => {
                t.writes.extend(args.into_iter().take(1));
            }
            "rename" | "renameat" | "renameat2" | "link" | "linkat" => {
                t.writes.extend(args.into_iter().take(2));
            }
            // symlink(target, linkpath): the target is the link's content.
            "symlink" | "symlinkat" => {
                t.writes.extend(args.into_iter().nth(1));
            }
            "mmap" | "mprotect" | "pkey_mprotect" if call.contains("PROT_WRITE") && call.contains("PROT_EXEC") => {
                t.refused.push(format!("MemoryDenyWriteExecute: {call}"));
            }
            "mprotect" | "pkey_mprotect" if call.contains("PROT_EXEC") => {
                t.refused
                    .push(format!("MemoryDenyWriteExecute (exec added to a mapping): {call}"));
            }
            "clone" | "clone3" | "unshare" | "setns" if call.contains("CLONE_NEW") || name == "setns" => {
                t.refused.push(format!("RestrictNamespaces: {call}"));
            }
            "personality" if !call.contains("0xffffffff") => t.refused.push(format!("LockPersonality: {call}")),
            "sched_setscheduler" | "sched_setattr" if call.contains("SCHED_FIFO") || call.contains("SCHED_RR") => {
                t.refused.push(format!("RestrictRealtime: {call}"));
            }
            "bpf" if call.contains("BPF_OBJ_PIN") => {
                if let Some(p) = call.split("pathname=\"").nth(1).and_then(|r| r.split('"').next()) {
                    t.writes.insert(p.to_string());
                }
            }
            _ => {}
        }
    }
    assert!(started, "the trace never shows {exec_marker}");
    t
}
