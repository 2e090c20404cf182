//! Fingerprints of the config and its list files: a hash of their bytes, so
//! a reload is attempted only when something really changed. `Config` and
//! `ListIndex` carry the fingerprint of what they were loaded from; the agent
//! compares it with [`fingerprint`] of the files now.
use std::{
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
};

/// The hasher of every fingerprint: fixed-seeded foldhash, several times
/// faster than SipHash on a list of tens of megabytes (collision resistance
/// against an attacker is not needed: only the operator writes these files).
pub fn fingerprint_hasher() -> foldhash::quality::FoldHasher<'static> {
    use std::hash::BuildHasher as _;
    foldhash::quality::FixedState::with_seed(0x7265_6c61_7967_7561).build_hasher()
}

/// A hash of the bytes of the config and its list files (a missing or
/// unreadable file hashes its error), to tell real changes from noise.
pub fn fingerprint(config: &Path, list_files: &[PathBuf]) -> u64 {
    let mut h = fingerprint_hasher();
    for f in std::iter::once(config).chain(list_files.iter().map(PathBuf::as_path)) {
        f.hash(&mut h);
        match crate::config::read_bounded(f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher compares `fingerprint` with `Config::fingerprint`: the two
    /// must hash the same bytes the same way, or every event would reload
    /// (or none would).
    #[test]
    fn config_fingerprint_matches_watcher_fingerprint() {
        let dir = std::env::temp_dir().join(format!("rg-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("a.txt"), "192.0.2.0/24\n").expect("write");
        std::fs::write(dir.join("b.txt"), "198.51.100.7 ; x\n").expect("write");
        let config = dir.join("relay-guard.toml");
        let text =
            "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow_files = [\"a.txt\"]\ndeny_files = [\"b.txt\"]\n";
        std::fs::write(&config, text).expect("write");
        let cfg = crate::config::Config::load(&config).expect("valid");
        assert_eq!(cfg.fingerprint, fingerprint(&config, &cfg.list_files));
        let (_, index) = crate::config::Config::load_indexed(&config).expect("valid");
        assert_eq!(index.fingerprint(), cfg.fingerprint, "a delta reload's fingerprint");
        std::fs::write(dir.join("b.txt"), "198.51.100.8\n").expect("write");
        assert_ne!(
            cfg.fingerprint,
            fingerprint(&config, &cfg.list_files),
            "a changed list file must change it"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
