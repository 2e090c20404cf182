//! A delta must give exactly what a full load and compile of the edited
//! files give: the same policy, the same allow counts, the same errors.
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("rg-incr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        Dir(d)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CONFIG: &str = r#"interfaces = ["eth0"]
[[guard]]
name = "mx"
ports = [25]
allow = ["192.0.2.0/24"]
allow_files = ["a.txt"]
deny_files = ["d.txt"]
[[guard]]
name = "submission"
ports = [587]
allow_files = ["b.txt"]
"#;

/// Loads `dir`'s config in full: (policy, allow counts) or the errors.
fn full(config: &Path) -> Result<(Policy, Vec<(usize, usize)>), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let counts = cfg.guards.iter().map(Policy::allow_counts).collect();
    Ok((Policy::compile(&cfg), counts))
}

/// Applies what the files now say to `index` and `policy` as a delta
/// (edited regions of more than `small` lines matched line by line).
fn delta(
    index: &mut ListIndex,
    policy: &mut Policy,
    config: &Path,
    names: &[String],
    small: usize,
) -> Result<bool, String> {
    match index.changes_with(config, names, small) {
        Ok(Some(p)) => {
            let changes = p.changes.clone();
            index.commit(p);
            policy_delta(index, policy, &changes);
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Lines drawn from a small pool, so edits nest, collide and conflict.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..4, prop::sample::select(vec![8u8, 16, 20, 24, 25, 28, 32]), 0u8..3).prop_map(|(b, len, c)| {
            let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(198, 51, 96 + b, c * 64), len)
                .expect("len <= 32")
                .trunc();
            net.to_string()
        }),
        (0u16..3, prop::sample::select(vec![32u8, 48, 64, 128])).prop_map(|(x, len)| {
            let a = std::net::Ipv6Addr::new(0x2001, 0xdb8, x, 0, 0, 0, 0, u16::from(len == 128));
            ipnet::Ipv6Net::new(a, len).expect("len <= 128").trunc().to_string()
        }),
        Just("# comment".to_string()),
        Just(String::new()),
        Just("not-an-address".to_string()),
    ]
}

/// An edit of one file: replace lines [at, at + del) with `ins`.
fn edit() -> impl Strategy<Value = (usize, usize, usize, Vec<String>)> {
    (0usize..3, 0usize..12, 0usize..3, prop::collection::vec(line(), 0..3))
}

fn splice(text: &str, at: usize, del: usize, ins: &[String]) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    let at = at.min(lines.len());
    let del = del.min(lines.len() - at);
    lines.splice(at..at + del, ins.iter().map(String::as_str));
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn delta_equals_full_compile(
        start in prop::collection::vec(prop::collection::vec(line(), 0..10), 3),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let dir = Dir::new("prop");
        let names = ["a.txt", "d.txt", "b.txt"];
        // Start from a valid state: bad lines become comments.
        let mut texts: Vec<String> = start
            .iter()
            .map(|ls| {
                let ls: Vec<String> = ls.iter().map(|l| if l.starts_with("not") { format!("# {l}") } else { l.clone() }).collect();
                splice("", 0, 0, &ls)
            })
            .collect();
        // Allowed and denied in one guard is an error: keep a.txt and d.txt apart.
        texts[1] = texts[1].lines().map(|l| if texts[0].lines().any(|a| a == l) { format!("# {l}\n") } else { format!("{l}\n") }).collect();
        for (n, t) in names.iter().zip(&texts) {
            dir.write(n, t);
        }
        let config = dir.write("relay-guard.toml", CONFIG);
        let (cfg, mut index) = Config::load_indexed(&config).expect("the start is valid");
        let names_g: Vec<String> = cfg.guards.iter().map(|g| g.name.clone()).collect();
        let mut policy = Policy::compile(&cfg);
        // The same edits, with every edited region matched line by line.
        let (_, mut index_m) = Config::load_indexed(&config).expect("the start is valid");
        let mut policy_m = policy.clone();
        for (file, at, del, ins) in edits {
            let before = texts[file].clone();
            texts[file] = splice(&texts[file], at, del, &ins);
            dir.write(names[file], &texts[file]);
            let want = full(&config);
            let got = delta(&mut index, &mut policy, &config, &names_g, crate::config::lists::SMALL_REGION);
            let got_m = delta(&mut index_m, &mut policy_m, &config, &names_g, 0);
            match (want, got, got_m) {
                (Ok((p, c)), Ok(true), Ok(true)) => {
                    prop_assert_eq!(&policy, &p, "policy after editing {}", names[file]);
                    prop_assert_eq!(allow_counts(&index), c.clone());
                    prop_assert_eq!(&policy_m, &p, "policy after editing {} (matched lines)", names[file]);
                    prop_assert_eq!(allow_counts(&index_m), c);
                    // Every occurrence, its line and its order: as a fresh load.
                    let (_, fresh) = Config::load_indexed(&config).expect("valid");
                    prop_assert_eq!(&index.guards, &fresh.guards, "index after editing {}", names[file]);
                    prop_assert_eq!(&index_m.guards, &fresh.guards, "index after editing {} (matched lines)", names[file]);
                }
                (Err(w), Err(g), Err(gm)) => {
                    prop_assert_eq!(&w, &g, "same errors");
                    prop_assert_eq!(&w, &gm, "same errors (matched lines)");
                    // Invalid: nothing applied; go back to the valid text.
                    texts[file] = before;
                    dir.write(names[file], &texts[file]);
                }
                (w, g, gm) => prop_assert!(false, "full {:?} but delta {:?} / matched {:?}", w.map(|_| ()), g, gm),
            }
        }
    }
}

#[test]
fn config_change_or_large_edit_takes_the_full_path() {
    let dir = Dir::new("full");
    dir.write("a.txt", "192.0.2.1\n");
    dir.write("d.txt", "");
    dir.write("b.txt", "");
    let config = dir.write("relay-guard.toml", CONFIG);
    let (cfg, index) = Config::load_indexed(&config).expect("valid");
    let names: Vec<String> = cfg.guards.iter().map(|g| g.name.clone()).collect();
    dir.write("relay-guard.toml", &CONFIG.replace("587", "465"));
    assert!(matches!(index.changes(&config, &names), Ok(None)));
    dir.write("relay-guard.toml", CONFIG);
    let big: String = (0..crate::config::lists::MAX_DELTA_LINES + 1)
        .map(|i| format!("10.{}.{}.0/24\n", i >> 8 & 255, i & 255))
        .collect();
    dir.write("b.txt", &big);
    assert!(matches!(index.changes(&config, &names), Ok(None)));
    std::fs::remove_file(dir.0.join("b.txt")).expect("rm");
    assert!(
        matches!(index.changes(&config, &names), Ok(None)),
        "unreadable: the full path reports it"
    );
}

#[test]
fn a_one_line_edit_of_a_large_list_parses_one_line() {
    let dir = Dir::new("one");
    let list: String = (0..50_000u32)
        .map(|i| format!("10.{}.{}.0/24\n", i >> 8 & 255, i & 255))
        .collect();
    dir.write("a.txt", &list);
    dir.write("d.txt", "");
    dir.write("b.txt", "");
    let config = dir.write("relay-guard.toml", CONFIG);
    let (cfg, mut index) = Config::load_indexed(&config).expect("valid");
    let names: Vec<String> = cfg.guards.iter().map(|g| g.name.clone()).collect();
    let mut policy = Policy::compile(&cfg);
    let edited = list.replacen("10.0.7.0/24\n", "203.0.113.7\n", 1);
    dir.write("a.txt", &edited);
    let p = index.changes(&config, &names).expect("valid").expect("a delta");
    assert_eq!(p.lines, 2, "one old line and one new line parsed");
    assert_eq!(p.changes.len(), 2);
    let changes = p.changes.clone();
    index.commit(p);
    let (v4, v6) = policy_delta(&index, &mut policy, &changes);
    assert_eq!((v4.len(), v6.len()), (2, 0));
    assert_eq!(policy, full(&config).expect("valid").0);
    // An error names the file and the line, as a full load does.
    dir.write("a.txt", &edited.replacen("10.0.9.0/24\n", "10.0.9.1/24\n", 1));
    let err = index.changes(&config, &names).expect_err("host bits set").to_string();
    assert_eq!(err, Config::load(&config).expect_err("invalid").to_string());
    assert!(err.contains("a.txt:10:"), "{err}");
}
