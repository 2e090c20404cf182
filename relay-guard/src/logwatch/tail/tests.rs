use std::{fs, io::Write};

use super::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relay-guard-tail-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("temp dir");
    d
}

fn append(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

fn poll(t: &mut Tail) -> Vec<String> {
    let mut v = Vec::new();
    t.poll(&mut |l| v.push(l.to_owned()));
    v
}

#[test]
fn starts_at_the_end_and_holds_partial_lines() {
    let d = dir("partial");
    let p = d.join("mail.log");
    append(&p, "old 1\nold 2\n");
    let mut t = Tail::new(&p);
    assert!(poll(&mut t).is_empty());
    append(&p, "new 1\nnew ");
    assert_eq!(poll(&mut t), ["new 1"]);
    assert!(poll(&mut t).is_empty());
    append(&p, "2\n");
    assert_eq!(poll(&mut t), ["new 2"]);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn waits_for_a_missing_file_and_reads_it_from_the_start() {
    let d = dir("missing");
    let p = d.join("mail.log");
    let mut t = Tail::new(&p);
    assert!(!t.is_open());
    assert!(poll(&mut t).is_empty());
    append(&p, "a\nb\n");
    assert_eq!(poll(&mut t), ["a", "b"]);
    // Gone: nothing, no error; back: read from its start.
    fs::remove_file(&p).expect("remove");
    assert!(poll(&mut t).is_empty());
    append(&p, "c\n");
    assert_eq!(poll(&mut t), ["c"]);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn rename_rotation_loses_and_repeats_nothing() {
    let d = dir("rename");
    let p = d.join("mail.log");
    append(&p, "");
    let mut t = Tail::new(&p);
    append(&p, "1\n2\n");
    assert_eq!(poll(&mut t), ["1", "2"]);
    // Written before the rotation and not yet read.
    append(&p, "3\n4");
    fs::rename(&p, d.join("mail.log.1")).expect("rename");
    // A writer that has not reopened yet still writes to the old file.
    append(&d.join("mail.log.1"), "\n5\n");
    append(&p, "6\n");
    assert_eq!(poll(&mut t), ["3", "4", "5", "6"]);
    append(&d.join("mail.log.1"), "late\n");
    append(&p, "7\n");
    assert_eq!(poll(&mut t), ["late", "7"]);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn copytruncate_reads_from_the_start_again() {
    let d = dir("copytruncate");
    let p = d.join("mail.log");
    append(&p, "before\n");
    let mut t = Tail::new(&p);
    append(&p, "1\n2\n");
    assert_eq!(poll(&mut t), ["1", "2"]);
    append(&p, "3\n");
    // logrotate copytruncate: copy, then truncate in place.
    fs::copy(&p, d.join("mail.log.1")).expect("copy");
    assert_eq!(poll(&mut t), ["3"]);
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    append(&p, "4\n");
    assert_eq!(poll(&mut t), ["4"]);
    append(&p, "5\n");
    assert_eq!(poll(&mut t), ["5"]);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn overlong_lines_are_cut_and_the_next_line_is_whole() {
    let d = dir("long");
    let p = d.join("mail.log");
    append(&p, "");
    let mut t = Tail::new(&p);
    append(&p, &"x".repeat(MAX_LINE * 3));
    append(&p, "\nnext\n");
    let lines = poll(&mut t);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].len(), MAX_LINE);
    assert_eq!(lines[1], "next");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn a_file_that_cannot_be_opened_is_unreadable_not_missing() {
    let d = dir("unreadable");
    let p = d.join("mail.log");
    let mut t = Tail::new(&p);
    assert_eq!(t.state(), &FileState::Missing);
    // A socket is there but cannot be opened (ENXIO), as a file the agent
    // may not read is (EACCES: root in the unit tests passes every mode).
    let sock = std::os::unix::net::UnixListener::bind(&p).expect("bind a socket at the path");
    assert!(poll(&mut t).is_empty());
    assert!(matches!(t.state(), FileState::Unreadable(_)), "{:?}", t.state());
    assert!(!t.is_open());
    drop(sock);
    fs::remove_file(&p).expect("remove the socket");
    assert!(poll(&mut t).is_empty());
    assert_eq!(t.state(), &FileState::Missing);
    append(&p, "line 1\n");
    assert_eq!(poll(&mut t), ["line 1"], "a file that appears is read from its start");
    assert_eq!(t.state(), &FileState::Open);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn write_risk_names_group_and_other_writers_and_foreign_owners() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = dir("risk");
    let p = d.join("mail.log");
    append(&p, "");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(write_risk(&p), None);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o662)).expect("chmod");
    let risk = write_risk(&p).expect("world-writable is a risk");
    assert!(risk.contains("0662"), "{risk}");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o620)).expect("chmod");
    assert!(write_risk(&p).is_some(), "group-writable is a risk");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod");
    // Owned by nobody (65534): not root, not a daemon user.
    if nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).is_ok() {
        let risk = write_risk(&p).expect("a foreign owner is a risk");
        assert!(risk.contains("uid 65534"), "{risk}");
    }
    assert_eq!(write_risk(&d.join("missing")), None);
    let _ = fs::remove_dir_all(&d);
}
