//! Unit tests of the TOML configuration: SPEC.md's example, defaults, list
//! files, and one test per class of config error (each checking file, line
//! and the quoted value).
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use ipnet::IpNet;

use super::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A scratch directory under the system temp dir, removed on drop (also when
/// the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rg-test-{}-{}", std::process::id(), n));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `rel` (creating parent directories) and returns the full path.
    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("create parent dir");
        }
        fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A config path for tests that read no list files (nothing is read from it).
fn fake_path() -> PathBuf {
    PathBuf::from("/nonexistent/relay-guard-test/relay-guard.toml")
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(&fake_path(), text)
}

/// What the agent reads from a config that fails validation.
fn state_dir_hint(text: &str) -> Option<PathBuf> {
    ConfigFile::parse(&fake_path(), text).state_dir_hint()
}

fn parse_ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("config should be valid, got:\n{e}\n--- config ---\n{text}"),
    }
}

fn parse_err(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(c) => panic!("config should be invalid, parsed as {c:?}\n--- config ---\n{text}"),
        Err(e) => e.0,
    }
}

/// Exactly one error; returns it.
fn one_err(text: &str) -> ConfigError {
    let errs = parse_err(text);
    assert_eq!(errs.len(), 1, "expected exactly one error, got {errs:#?}");
    errs.into_iter().next().expect("one error")
}

/// Asserts the error is in `file` at `line`, quotes every string in `quotes`,
/// and that its Display form starts with `file:line: `.
fn assert_err(e: &ConfigError, file: &Path, line: usize, quotes: &[&str]) {
    assert_eq!(e.file, file, "wrong file in {e:?}");
    assert_eq!(e.line, line, "wrong line in {e:?}");
    for q in quotes {
        assert!(e.what.contains(q), "message {:?} should contain {q:?}", e.what);
    }
    let shown = e.to_string();
    let prefix = format!("{}:{}: ", file.display(), line);
    assert!(
        shown.starts_with(&prefix),
        "display {shown:?} should start with {prefix:?}"
    );
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR parses")
}

/// (net, action) of a guard's entries, in order.
fn nets(g: &Guard) -> Vec<(IpNet, Action)> {
    g.entries.iter().map(|e| (e.net, e.action)).collect()
}

fn entry<'a>(g: &'a Guard, s: &str) -> &'a Entry {
    let n = net(s);
    g.entries
        .iter()
        .find(|e| e.net == n)
        .unwrap_or_else(|| panic!("guard `{}` has no entry {s}", g.name))
}

const MINIMAL: &str = "interfaces = [\"eth0\"]\n[[guard]]\nallow = [\"192.0.2.0/24\"]\n";

// ---------------------------------------------------------------------------
// SPEC.md's example and defaults
// ---------------------------------------------------------------------------

/// SPEC.md's example config, verbatim except that the allow file path is
/// relative (it resolves against the config's directory).
const SPEC_EXAMPLE: &str = r#"
# Values shown for the optional keys are their defaults.
interfaces = ["eth0"]              # required, one or more
mode = "enforce"                   # "enforce": drop; "monitor": count would-drop, pass all
xdp_mode = "auto"                  # "auto" | "native" | "skb"
metrics_listen = "127.0.0.1:10947" # Prometheus endpoint (GET /metrics); "" disables
pin_dir = "/sys/fs/bpf/relay-guard"  # where program, links and maps are pinned

[[guard]]
name = "submission"                # optional; label value in metrics (default: "guard<N>")
ports = [465, 587]
allow = ["192.0.2.0/24", "2001:db8:10::/48", "198.51.100.7"]
allow_files = ["allow.d/office.txt"]  # one address or CIDR a line
deny = ["192.0.2.128/25"]          # optional carve-outs

[[guard]]
name = "relay"
ports = [25]
allow = ["203.0.113.0/24"]

# An MX must take mail from anyone on 25, but can still shed known-bad netblocks:
# [[guard]]
# name = "mx"
# ports = [25]
# allow = ["0.0.0.0/0", "::/0"]
# deny_files = ["/var/lib/relay-guard/spamhaus-drop.txt"]
"#;

const OFFICE_TXT: &str = "# office uplinks\n198.51.100.64/26\n\n2001:db8:20::1  ; VPN concentrator\n";

#[test]
fn spec_example_parses_with_relative_list_file() {
    let dir = TempDir::new();
    let office = dir.write("allow.d/office.txt", OFFICE_TXT);
    let cfg_path = dir.write("relay-guard.toml", SPEC_EXAMPLE);

    let cfg = Config::load(&cfg_path).unwrap_or_else(|e| panic!("SPEC example must load:\n{e}"));
    assert_eq!(cfg.path, cfg_path);
    assert_eq!(cfg.interfaces, vec!["eth0".to_string()]);
    assert_eq!(cfg.mode, Mode::Enforce);
    assert_eq!(cfg.xdp_mode, XdpMode::Auto);
    assert_eq!(
        cfg.metrics_listen,
        Some("127.0.0.1:10947".parse::<SocketAddr>().expect("addr"))
    );
    assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/relay-guard"));
    assert_eq!(cfg.list_files, vec![office.clone()]);
    assert_eq!(cfg.guards.len(), 2);

    let sub = &cfg.guards[0];
    assert_eq!(sub.name, "submission");
    assert_eq!(sub.ports, vec![465, 587]);
    let mut got = nets(sub);
    got.sort();
    let mut want = vec![
        (net("192.0.2.0/24"), Action::Allow),
        (net("2001:db8:10::/48"), Action::Allow),
        (net("198.51.100.7/32"), Action::Allow),
        (net("192.0.2.128/25"), Action::Deny),
        (net("198.51.100.64/26"), Action::Allow),
        (net("2001:db8:20::1/128"), Action::Allow),
    ];
    want.sort();
    assert_eq!(got, want);

    // Origins: inline entries point into the config (line 1 is the empty line
    // that opens SPEC_EXAMPLE), list entries into the list file.
    assert_eq!(
        entry(sub, "192.0.2.0/24").origin,
        Origin {
            file: cfg_path.clone().into(),
            line: 12
        }
    );
    assert_eq!(
        entry(sub, "192.0.2.128/25").origin,
        Origin {
            file: cfg_path.clone().into(),
            line: 14
        }
    );
    assert_eq!(
        entry(sub, "198.51.100.64/26").origin,
        Origin {
            file: office.clone().into(),
            line: 2
        }
    );
    assert_eq!(
        entry(sub, "2001:db8:20::1/128").origin,
        Origin {
            file: office.clone().into(),
            line: 4
        }
    );

    let relay = &cfg.guards[1];
    assert_eq!(relay.name, "relay");
    assert_eq!(relay.ports, vec![25]);
    assert_eq!(nets(relay), vec![(net("203.0.113.0/24"), Action::Allow)]);
}

#[test]
fn spec_mx_example_parses_with_spamhaus_drop_file() {
    let dir = TempDir::new();
    let drop = dir.write(
        "spamhaus-drop.txt",
        "; Spamhaus DROP List 2024/01/01 - (c) 2024 The Spamhaus Project\n\
         ; Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\n\
         1.10.16.0/20 ; SBL256894\n\
         1.19.0.0/16 ; SBL434604\n\
         2001:db8:bad::/48 ; SBL000001\n",
    );
    let text = "interfaces = [\"eth0\"]\n\
                [[guard]]\n\
                name = \"mx\"\n\
                ports = [25]\n\
                allow = [\"0.0.0.0/0\", \"::/0\"]\n\
                deny_files = [\"spamhaus-drop.txt\"]\n";
    let cfg_path = dir.write("relay-guard.toml", text);
    let cfg = Config::load(&cfg_path).unwrap_or_else(|e| panic!("mx example must load:\n{e}"));
    assert_eq!(cfg.list_files, vec![drop.clone()]);
    let mx = &cfg.guards[0];
    assert_eq!(mx.name, "mx");
    assert_eq!(mx.ports, vec![25]);
    let mut got = nets(mx);
    got.sort();
    let mut want = vec![
        (net("0.0.0.0/0"), Action::Allow),
        (net("::/0"), Action::Allow),
        (net("1.10.16.0/20"), Action::Deny),
        (net("1.19.0.0/16"), Action::Deny),
        (net("2001:db8:bad::/48"), Action::Deny),
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        entry(mx, "1.10.16.0/20").origin,
        Origin {
            file: drop.clone().into(),
            line: 3
        }
    );
    assert_eq!(
        entry(mx, "2001:db8:bad::/48").origin,
        Origin {
            file: drop.into(),
            line: 5
        }
    );
}

#[test]
fn list_file_absolute_path_is_used_as_is() {
    let dir = TempDir::new();
    let other = TempDir::new();
    let list = other.write("abs.txt", "192.0.2.7\n");
    let text = format!(
        "interfaces = [\"eth0\"]\n[[guard]]\nallow_files = [{:?}]\n",
        list.display().to_string()
    );
    let cfg_path = dir.write("relay-guard.toml", &text);
    let cfg = Config::load(&cfg_path).unwrap_or_else(|e| panic!("must load:\n{e}"));
    assert_eq!(cfg.list_files, vec![list]);
    assert_eq!(nets(&cfg.guards[0]), vec![(net("192.0.2.7/32"), Action::Allow)]);
}

#[test]
fn defaults_when_optional_keys_are_omitted() {
    let cfg = parse_ok(MINIMAL);
    assert_eq!(cfg.path, fake_path());
    assert_eq!(cfg.mode, Mode::Enforce);
    assert_eq!(cfg.xdp_mode, XdpMode::Auto);
    assert_eq!(cfg.metrics_listen, Some(SocketAddr::from(([127, 0, 0, 1], 10947))));
    assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/relay-guard"));
    assert_eq!(cfg.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/relay-guard"));
    assert_eq!(cfg.guards.len(), 1);
    assert_eq!(cfg.guards[0].name, "guard1");
    assert_eq!(cfg.guards[0].ports, vec![25, 465, 587]);
    assert_eq!(DEFAULT_PORTS, [25, 465, 587]);
    assert!(cfg.list_files.is_empty());
}

#[test]
fn default_guard_names_are_one_based_positions() {
    let cfg = parse_ok(
        "interfaces = [\"eth0\"]\n\
         [[guard]]\nports = [25]\n\
         [[guard]]\nname = \"sub\"\nports = [587]\n\
         [[guard]]\nports = [465]\n",
    );
    let names: Vec<_> = cfg.guards.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["guard1", "sub", "guard3"]);
}

#[test]
fn explicit_values_override_defaults() {
    let cfg = parse_ok(
        "interfaces = [\"eth0\", \"eth1\"]\n\
         mode = \"monitor\"\n\
         xdp_mode = \"skb\"\n\
         metrics_listen = \"[::1]:9100\"\n\
         pin_dir = \"/sys/fs/bpf/rg-other\"\n\
         [[guard]]\nports = [2525, 25, 2525]\n",
    );
    assert_eq!(cfg.interfaces, vec!["eth0".to_string(), "eth1".to_string()]);
    assert_eq!(cfg.mode, Mode::Monitor);
    assert_eq!(cfg.xdp_mode, XdpMode::Skb);
    assert_eq!(cfg.metrics_listen, Some("[::1]:9100".parse().expect("addr")));
    assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/rg-other"));
    // Sorted and deduplicated.
    assert_eq!(cfg.guards[0].ports, vec![25, 2525]);

    let native = parse_ok("interfaces = [\"eth0\"]\nxdp_mode = \"native\"\n[[guard]]\n");
    assert_eq!(native.xdp_mode, XdpMode::Native);
}

#[test]
fn state_dir_is_an_absolute_path() {
    let cfg = parse_ok("interfaces = [\"eth0\"]\nstate_dir = \"/srv/rg-state\"\n[[guard]]\nports = [25]\n");
    assert_eq!(cfg.state_dir, PathBuf::from("/srv/rg-state"));
    let text = "interfaces = [\"eth0\"]\nstate_dir = \"var/lib/rg\"\n[[guard]]\nports = [25]\n";
    assert_err(
        &one_err(text),
        &fake_path(),
        2,
        &["state_dir", "`var/lib/rg`", "absolute"],
    );
    // What the agent looks up when a config fails validation.
    assert_eq!(
        state_dir_hint("interfaces = []\nstate_dir = \"/srv/rg-state\"\n[[guard]]\nports = [0]\n"),
        Some(PathBuf::from("/srv/rg-state"))
    );
    assert_eq!(state_dir_hint(text), None);
    assert_eq!(state_dir_hint("state_dir = [\n"), None);
}

/// `run --metrics-listen` is a value handed to a load, not process state:
/// it replaces the file's address (or its default, or its "") in that load
/// only, and a load without it sees the file again.
#[test]
fn metrics_listen_option_overrides_that_load_only() {
    let node: SocketAddr = "192.0.2.7:10947".parse().expect("addr");
    let options = LoadOptions {
        metrics_listen: Some(node),
    };
    for text in [
        "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\n",
        "interfaces = [\"eth0\"]\nmetrics_listen = \"\"\n[[guard]]\nports = [25]\n",
        "interfaces = [\"eth0\"]\nmetrics_listen = \"[::1]:9100\"\n[[guard]]\nports = [25]\n",
    ] {
        let path = fake_path();
        let file = ConfigFile::parse(&path, text);
        let cfg = file.validate(&options).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(cfg.metrics_listen, Some(node), "{text}");
        let (indexed, _) = file.validate_indexed(&options).expect("valid");
        assert_eq!(indexed.metrics_listen, Some(node), "{text}");
        assert_ne!(
            parse_ok(text).metrics_listen,
            Some(node),
            "{text}: a later load without it"
        );
    }
}

#[test]
fn empty_metrics_listen_disables_metrics() {
    let cfg = parse_ok("interfaces = [\"eth0\"]\nmetrics_listen = \"\"\n[[guard]]\nports = [25]\n");
    assert_eq!(cfg.metrics_listen, None);
}

// ---------------------------------------------------------------------------
// Errors: each names the file, the line and the offending value
// ---------------------------------------------------------------------------

#[test]
fn unknown_top_level_key_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\nbogus_key = 1\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["bogus_key"]);
}

#[test]
fn unknown_guard_key_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallowed = [\"192.0.2.0/24\"]\n");
    assert_err(&e, &fake_path(), 4, &["allowed"]);
}

#[test]
fn bad_cidr_is_an_error() {
    let e =
        one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\"192.0.2.0/24\", \"192.0.2.300/32\"]\n");
    assert_err(&e, &fake_path(), 4, &["`192.0.2.300/32`"]);

    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\ndeny = [\"192.0.2.0/33\"]\n");
    assert_err(&e, &fake_path(), 4, &["`192.0.2.0/33`"]);

    let e = one_err(
        "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\n  \"192.0.2.0/24\",\n  \"mail.example.com\",\n]\n",
    );
    assert_err(&e, &fake_path(), 6, &["`mail.example.com`"]);
}

#[test]
fn host_bits_set_is_an_error_that_suggests_the_network() {
    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\"192.0.2.5/24\"]\n");
    assert_err(&e, &fake_path(), 4, &["`192.0.2.5/24`", "`192.0.2.0/24`", "host bits"]);

    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\n\ndeny = [\"2001:db8::1/32\"]\n");
    assert_err(&e, &fake_path(), 5, &["`2001:db8::1/32`", "`2001:db8::/32`"]);

    assert_eq!(
        parse_net("192.0.2.5/24"),
        Err("host bits set; did you mean `192.0.2.0/24`?".to_string())
    );
    assert_eq!(parse_net("192.0.2.0/24"), Ok(net("192.0.2.0/24")));
}

#[test]
fn port_zero_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [0]\n");
    assert_err(&e, &fake_path(), 3, &["`0`"]);
}

#[test]
fn port_70000_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [25, 70000]\n");
    assert_err(&e, &fake_path(), 3, &["`70000`"]);
    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [-25]\n");
    assert_err(&e, &fake_path(), 3, &["`-25`"]);
    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = []\n");
    assert_err(&e, &fake_path(), 3, &["ports"]);
}

#[test]
fn duplicate_port_across_guards_names_both_guards() {
    let text = "interfaces = [\"eth0\"]\n\
                [[guard]]\n\
                name = \"submission\"\n\
                ports = [465, 587]\n\
                [[guard]]\n\
                name = \"relay\"\n\
                ports = [25, 587]\n";
    let e = one_err(text);
    assert_err(&e, &fake_path(), 7, &["`587`", "`submission`", "`relay`"]);
    // And it points at where the first owner declared it.
    assert!(e.what.contains(&format!("{}:4", fake_path().display())), "{}", e.what);
}

#[test]
fn default_ports_collide_with_explicit_ports() {
    // The second guard omits `ports`, so it defaults to 25/465/587 and collides.
    let text = "interfaces = [\"eth0\"]\n[[guard]]\nname = \"a\"\nports = [25]\n\n[[guard]]\nallow = [\"192.0.2.1\"]\n";
    let e = one_err(text);
    assert_err(&e, &fake_path(), 6, &["`25`", "`a`", "`guard2`"]);
}

#[test]
fn same_prefix_allowed_and_denied_is_an_error() {
    let text =
        "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\"192.0.2.0/24\"]\ndeny = [\"192.0.2.0/24\"]\n";
    let e = one_err(text);
    assert_err(&e, &fake_path(), 5, &["`192.0.2.0/24`", "allowed", "denied"]);
    assert!(
        e.what.contains(&format!("{}:4", fake_path().display())),
        "names the allow's origin: {}",
        e.what
    );

    // A bare address and its /32 are the same prefix.
    let e = one_err(
        "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\"192.0.2.1\"]\ndeny = [\"192.0.2.1/32\"]\n",
    );
    assert_err(&e, &fake_path(), 5, &["192.0.2.1/32"]);

    // But the same prefix in two guards is fine.
    parse_ok(
        "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\"192.0.2.0/24\"]\n\
         [[guard]]\nports = [587]\ndeny = [\"192.0.2.0/24\"]\n",
    );
}

#[test]
fn same_prefix_allowed_inline_and_denied_in_list_file_is_an_error() {
    let dir = TempDir::new();
    let list = dir.write("drop.txt", "# header\n198.51.100.0/24\n");
    let text = "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\"198.51.100.0/24\"]\ndeny_files = [\"drop.txt\"]\n";
    let cfg_path = dir.write("rg.toml", text);
    let errs = Config::load(&cfg_path).expect_err("conflict").0;
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_err(&errs[0], &list, 2, &["`198.51.100.0/24`", "allowed", "denied"]);
}

#[test]
fn missing_list_file_is_an_error() {
    let dir = TempDir::new();
    let text = "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow_files = [\n  \"missing.txt\",\n]\n";
    let cfg_path = dir.write("rg.toml", text);
    let errs = Config::load(&cfg_path).expect_err("missing file").0;
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_err(&errs[0], &cfg_path, 5, &["`missing.txt`", "allow_files"]);

    let text = "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\ndeny_files = [\"nope/drop.txt\"]\n";
    let cfg_path = dir.write("rg2.toml", text);
    let errs = Config::load(&cfg_path).expect_err("missing file").0;
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_err(&errs[0], &cfg_path, 4, &["`nope/drop.txt`", "deny_files"]);
}

#[test]
fn unreadable_config_file_is_an_error() {
    let dir = TempDir::new();
    let p = dir.path().join("absent.toml");
    let errs = Config::load(&p).expect_err("absent config").0;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].file, p);
    assert_eq!(errs[0].line, 0);
}

#[test]
fn bad_line_in_list_file_names_the_list_file_and_its_line() {
    let dir = TempDir::new();
    let list = dir.write(
        "allow.txt",
        "# ok\n192.0.2.0/24\n\n192.0.2.77/24 ; host bits\n198.51.100.1\nnot-an-address\n",
    );
    let text = "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow_files = [\"allow.txt\"]\n";
    let cfg_path = dir.write("rg.toml", text);
    let errs = Config::load(&cfg_path).expect_err("bad list").0;
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_err(&errs[0], &list, 4, &["`192.0.2.77/24`", "`192.0.2.0/24`"]);
    assert_err(&errs[1], &list, 6, &["`not-an-address`"]);
}

#[test]
fn empty_interfaces_is_an_error() {
    let e = one_err("mode = \"monitor\"\ninterfaces = []\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["interfaces"]);
}

#[test]
fn missing_interfaces_is_an_error() {
    let e = one_err("[[guard]]\nports = [25]\n");
    // A missing key has no line of its own: the error points at the top.
    assert_err(&e, &fake_path(), 1, &["interfaces"]);
}

#[test]
fn bad_interface_names_are_errors() {
    let errs = parse_err(
        "interfaces = [\n  \"eth0\",\n  \"eth0\",\n  \"a/b\",\n  \"0123456789abcdef\",\n]\n[[guard]]\nports = [25]\n",
    );
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert_err(&errs[0], &fake_path(), 3, &["`eth0`"]);
    assert_err(&errs[1], &fake_path(), 4, &["`a/b`"]);
    assert_err(&errs[2], &fake_path(), 5, &["`0123456789abcdef`"]);
    // 15 characters is the longest valid name.
    parse_ok("interfaces = [\"0123456789abcde\"]\n[[guard]]\nports = [25]\n");
}

#[test]
fn no_guards_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\n");
    assert_eq!(e.file, fake_path());
    assert_eq!(e.line, 0, "concerns the whole file");
    assert!(e.what.contains("[[guard]]"), "{}", e.what);
}

#[test]
fn too_many_guards_is_an_error() {
    let mut text = String::from("interfaces = [\"eth0\"]\n");
    for i in 0..=MAX_GUARDS {
        text.push_str(&format!("[[guard]]\nports = [{}]\n", 1000 + i));
    }
    let e = one_err(&text);
    // The 65th guard's header: line 1 + 2*64 + 1.
    assert_err(&e, &fake_path(), 2 + 2 * MAX_GUARDS, &["65"]);

    let mut text = String::from("interfaces = [\"eth0\"]\n");
    for i in 0..MAX_GUARDS {
        text.push_str(&format!("[[guard]]\nports = [{}]\n", 1000 + i));
    }
    assert_eq!(parse_ok(&text).guards.len(), MAX_GUARDS);
}

#[test]
fn bad_metrics_listen_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\nmetrics_listen = \"localhost\"\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["`localhost`", "metrics_listen"]);
    let e = one_err("interfaces = [\"eth0\"]\nmetrics_listen = \"127.0.0.1\"\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["`127.0.0.1`"]);
    let e = one_err("interfaces = [\"eth0\"]\nmetrics_listen = \"127.0.0.1:99999\"\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["`127.0.0.1:99999`"]);
}

#[test]
fn wrong_type_for_mode_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\n\nmode = 5\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 3, &["5"]);

    let e = one_err("interfaces = [\"eth0\"]\nmode = \"drop\"\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["drop"]);

    let e = one_err("interfaces = [\"eth0\"]\nxdp_mode = \"generic\"\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["generic"]);

    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [\"25\"]\n");
    assert_err(&e, &fake_path(), 3, &["25"]);
}

#[test]
fn relative_pin_dir_is_an_error() {
    let e = one_err("interfaces = [\"eth0\"]\npin_dir = \"relay-guard\"\n[[guard]]\nports = [25]\n");
    assert_err(&e, &fake_path(), 2, &["`relay-guard`"]);
}

/// "Whose state": a pin_dir that is a file system root, or that climbs
/// with `..`, is refused before anything touches it; spellings of one
/// directory become one path.
#[test]
fn pin_dir_must_be_a_directory_of_its_own() {
    for (dir, quote) in [
        ("/sys/fs/bpf", "root of a file system"),
        ("/sys/fs/bpf/", "root of a file system"),
        ("//sys//fs/bpf/.", "root of a file system"),
        ("/", "root of a file system"),
        ("/sys/fs/bpf/../bpf", "`..`"),
        ("/sys/fs/bpf/rg/..", "`..`"),
    ] {
        let e = one_err(&format!(
            "interfaces = [\"eth0\"]\npin_dir = \"{dir}\"\n[[guard]]\nports = [25]\n"
        ));
        assert_err(&e, &fake_path(), 2, &[&format!("`{dir}`"), quote]);
    }
    for dir in ["/sys/fs/bpf/rg/", "//sys/fs/bpf//rg", "/sys/fs/bpf/./rg"] {
        let cfg = parse_ok(&format!(
            "interfaces = [\"eth0\"]\npin_dir = \"{dir}\"\n[[guard]]\nports = [25]\n"
        ));
        assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/rg"), "{dir}");
    }
}

#[test]
fn bad_and_duplicate_guard_names_are_errors() {
    let errs = parse_err(
        "interfaces = [\"eth0\"]\n\
         [[guard]]\nname = \"has space\"\nports = [25]\n\
         [[guard]]\nname = \"x\"\nports = [465]\n\
         [[guard]]\nname = \"x\"\nports = [587]\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_err(&errs[0], &fake_path(), 3, &["`has space`"]);
    assert_err(&errs[1], &fake_path(), 9, &["`x`", "twice"]);
}

#[test]
fn toml_syntax_error_names_the_line() {
    let e = one_err("interfaces = [\"eth0\"]\n[[guard]]\nports = [25\n");
    assert_eq!(e.file, fake_path());
    assert_err(&e, &fake_path(), 3, &["unclosed array"]);
}

/// check-config reports every problem at once, in file order, with exact lines.
#[test]
fn validation_reports_every_error_with_exact_lines() {
    let text = "\
interfaces = []
metrics_listen = \"nowhere\"
[[guard]]
name = \"a\"
ports = [25, 0]
allow = [\"192.0.2.5/24\", \"198.51.100.0/24\"]
deny = [\"198.51.100.0/24\"]

[[guard]]
name = \"b\"
ports = [25, 70000]
allow = [\"bogus\"]
";
    let errs = parse_err(text);
    let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(got, vec![1, 2, 5, 6, 7, 11, 11, 12], "{errs:#?}");
    assert!(errs.iter().all(|e| e.file == fake_path()));
    assert!(errs[0].what.contains("interfaces"));
    assert!(errs[1].what.contains("`nowhere`"));
    assert!(errs[2].what.contains("`0`"));
    assert!(errs[3].what.contains("`192.0.2.5/24`") && errs[3].what.contains("`192.0.2.0/24`"));
    assert!(errs[4].what.contains("`198.51.100.0/24`"));
    let line11: Vec<&str> = errs[5..7].iter().map(|e| e.what.as_str()).collect();
    assert!(line11.iter().any(|w| w.contains("`70000`")), "{line11:?}");
    assert!(
        line11
            .iter()
            .any(|w| w.contains("`25`") && w.contains("`a`") && w.contains("`b`")),
        "{line11:?}"
    );
    assert!(errs[7].what.contains("`bogus`"));

    // The Display of the whole set is one line per error.
    let shown = ConfigErrors(errs.clone()).to_string();
    assert_eq!(shown.lines().count(), errs.len());
    assert!(
        shown
            .lines()
            .next()
            .is_some_and(|l| l.starts_with(&format!("{}:1: ", fake_path().display())))
    );
}

#[test]
fn validation_reports_errors_from_config_and_list_files_together() {
    let dir = TempDir::new();
    let bad_list = dir.write("bad.txt", "192.0.2.0/24\nfoo\n");
    let text = "interfaces = [\"eth0\"]\n[[guard]]\nports = [0]\nallow_files = [\"bad.txt\", \"absent.txt\"]\n";
    let cfg_path = dir.write("rg.toml", text);
    let errs = Config::load(&cfg_path).expect_err("invalid").0;
    assert_eq!(errs.len(), 3, "{errs:#?}");
    let find = |file: &Path, line: usize| errs.iter().find(|e| e.file == file && e.line == line);
    assert!(find(&cfg_path, 3).is_some_and(|e| e.what.contains("`0`")), "{errs:#?}");
    assert!(
        find(&cfg_path, 4).is_some_and(|e| e.what.contains("`absent.txt`")),
        "{errs:#?}"
    );
    assert!(
        find(&bad_list, 2).is_some_and(|e| e.what.contains("`foo`")),
        "{errs:#?}"
    );
}

// ---------------------------------------------------------------------------
// List files
// ---------------------------------------------------------------------------

#[test]
fn list_file_comments_blank_lines_and_bare_addresses() {
    let file = PathBuf::from("/lists/drop.txt");
    let text = "\
; Spamhaus DROP List
# hash comment

1.10.16.0/20 ; SBL256894
   1.19.0.0/16;SBL434604   
192.0.2.1
192.0.2.2 # trailing hash comment
\t
2001:db8::/32
2001:db8::1 ; single v6 host
2001:DB8:0:1::/64\r
;
#
";
    let (entries, errors) = parse_list(&file, text, Action::Deny);
    assert!(errors.is_empty(), "{errors:#?}");
    let got: Vec<(IpNet, usize)> = entries.iter().map(|e| (e.net, e.origin.line)).collect();
    assert_eq!(
        got,
        vec![
            (net("1.10.16.0/20"), 4),
            (net("1.19.0.0/16"), 5),
            (net("192.0.2.1/32"), 6),
            (net("192.0.2.2/32"), 7),
            (net("2001:db8::/32"), 9),
            (net("2001:db8::1/128"), 10),
            (net("2001:db8:0:1::/64"), 11),
        ]
    );
    assert!(
        entries
            .iter()
            .all(|e| e.action == Action::Deny && *e.origin.file == *file)
    );
    // Bare addresses are host routes.
    assert_eq!(entries[2].net.prefix_len(), 32);
    assert_eq!(entries[5].net.prefix_len(), 128);
}

#[test]
fn list_file_errors_name_file_line_and_value() {
    let file = PathBuf::from("/lists/allow.txt");
    let (entries, errors) = parse_list(
        &file,
        "192.0.2.0/24\n\n10.0.0.1/8 ; host bits\n2001:db8::/129\n1.2.3.4 5.6.7.8\n",
        Action::Allow,
    );
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].net, net("192.0.2.0/24"));
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert_err(&errors[0], &file, 3, &["`10.0.0.1/8`", "`10.0.0.0/8`"]);
    assert_err(&errors[1], &file, 4, &["`2001:db8::/129`"]);
    assert_err(&errors[2], &file, 5, &["`1.2.3.4 5.6.7.8`"]);
}

#[test]
fn bare_addresses_are_host_prefixes() {
    assert_eq!(parse_net("198.51.100.7"), Ok(net("198.51.100.7/32")));
    assert_eq!(parse_net(" 2001:db8::7 "), Ok(net("2001:db8::7/128")));
    assert_eq!(parse_net("0.0.0.0/0"), Ok(net("0.0.0.0/0")));
    assert_eq!(parse_net("::/0"), Ok(net("::/0")));
    assert!(parse_net("").is_err());
    assert!(parse_net("192.0.2.0/").is_err());

    let cfg = parse_ok("interfaces = [\"eth0\"]\n[[guard]]\nallow = [\"198.51.100.7\", \"2001:db8::7\"]\n");
    assert_eq!(
        nets(&cfg.guards[0]),
        vec![
            (net("198.51.100.7/32"), Action::Allow),
            (net("2001:db8::7/128"), Action::Allow)
        ]
    );
}

// ---------------------------------------------------------------------------
// Duplicates
// ---------------------------------------------------------------------------

#[test]
fn duplicate_entry_with_same_action_is_kept_once() {
    let cfg = parse_ok(
        "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\n\
         allow = [\"192.0.2.0/24\", \"192.0.2.0/24\", \"198.51.100.7\", \"198.51.100.7/32\"]\n\
         deny = [\"192.0.2.128/25\", \"192.0.2.128/25\"]\n",
    );
    // Entries come back in prefix order, once each.
    let mut want = vec![
        (net("192.0.2.0/24"), Action::Allow),
        (net("198.51.100.7/32"), Action::Allow),
        (net("192.0.2.128/25"), Action::Deny),
    ];
    want.sort();
    assert_eq!(nets(&cfg.guards[0]), want);
}

#[test]
fn duplicate_entry_across_inline_and_list_file_is_kept_once() {
    let dir = TempDir::new();
    dir.write("a.txt", "192.0.2.0/24\n192.0.2.0/24\n");
    dir.write("b.txt", "192.0.2.0/24 ; again\n2001:db8::/32\n");
    let text = "interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow = [\"192.0.2.0/24\"]\nallow_files = [\"a.txt\", \"b.txt\"]\n";
    let cfg_path = dir.write("rg.toml", text);
    let cfg = Config::load(&cfg_path).unwrap_or_else(|e| panic!("must load:\n{e}"));
    let g = &cfg.guards[0];
    assert_eq!(
        nets(g),
        vec![
            (net("192.0.2.0/24"), Action::Allow),
            (net("2001:db8::/32"), Action::Allow)
        ]
    );
    // The first occurrence (inline, line 4) is the one kept.
    assert_eq!(
        g.entries[0].origin,
        Origin {
            file: cfg_path.clone().into(),
            line: 4
        }
    );
    assert_eq!(cfg.list_files, vec![dir.path().join("a.txt"), dir.path().join("b.txt")]);
}

/// The fast path of `parse_net` agrees with the general parser on every
/// input it accepts, and leaves the rest to it.
#[test]
fn fast_net_parser_agrees_with_ipnet() {
    for s in [
        "192.0.2.0/24",
        "192.0.2.5/24",
        "192.0.2.0/024",
        "192.0.2.0/+24",
        "192.0.2.0/33",
        "192.0.2.0/",
        "/24",
        "192.0.2.0/2 4",
        "0.0.0.0/0",
        "2001:db8::/32",
        "2001:db8::1/128",
        "2001:db8::/129",
        "::/0",
        "::ffff:192.0.2.1/128",
        "192.0.2.1",
        "2001:db8::7",
        "192.0.2.0/24/8",
        "192.0.2",
        "1.2.3.4/0",
        "01.2.3.4/8",
        "2001:db8::%eth0/64",
    ] {
        let general = match s.parse::<std::net::IpAddr>() {
            Ok(a) => Ok(IpNet::from(a)),
            Err(_) => s.parse::<IpNet>().map_err(|_| ()),
        };
        if let Some(fast) = super::entry::parse_net_fast(s) {
            assert_eq!(Ok(fast), general, "`{s}`");
        }
    }
}

// ---------------------------------------------------------------------------
// Hostile list files ("Bounded work for hostile input")
// ---------------------------------------------------------------------------

/// Loads a config whose guard reads `list` (relative to `dir`).
fn load_with_list(dir: &TempDir, list: &str) -> Result<Config, ConfigErrors> {
    let config = dir.write(
        "relay-guard.toml",
        &format!("interfaces = [\"eth0\"]\n[[guard]]\nports = [25]\nallow_files = [\"{list}\"]\n"),
    );
    Config::load(&config)
}

/// A FIFO, a device behind a symlink and a directory are refused at once
/// (no hang, no endless read), with the file's name.
#[test]
fn list_files_that_are_not_regular_files_are_errors() {
    let dir = TempDir::new();
    let fifo = dir.path().join("fifo.txt");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.txt")).expect("symlink");
    fs::create_dir_all(dir.path().join("dir.txt")).expect("mkdir");
    for (name, kind) in [
        ("fifo.txt", "a FIFO"),
        ("zero.txt", "a device"),
        ("dir.txt", "a directory"),
    ] {
        let started = std::time::Instant::now();
        let errs = load_with_list(&dir, name).expect_err(name).0;
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{name}: took {:?}",
            started.elapsed()
        );
        assert_eq!(errs.len(), 1, "{name}: {errs:#?}");
        assert!(
            errs[0].what.contains(&format!("`{name}`")) && errs[0].what.contains(kind),
            "{name}: {}",
            errs[0]
        );
    }
}

/// Long lines, NUL bytes and bytes that are not UTF-8 are errors that name
/// the file and the line; the rest of the file is not taken.
#[test]
fn list_lines_too_long_nul_or_not_utf8_are_errors_with_line() {
    let dir = TempDir::new();
    let mut bytes = b"192.0.2.0/24\n".to_vec();
    bytes.extend_from_slice(&vec![b'1'; 5000]);
    bytes.extend_from_slice(b"\n198.51.100.0/24\n203.0.113.0/24\0\n# caf\xe9 au lait\n2001:db8::/32\n");
    let list = dir.path().join("bad.txt");
    fs::write(&list, &bytes).expect("write");
    let errs = load_with_list(&dir, "bad.txt").expect_err("bad bytes").0;
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.what.as_str())).collect();
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs.iter().all(|e| e.file == list), "{errs:#?}");
    assert!(got[0].0 == 2 && got[0].1.contains("5000 bytes"), "{got:?}");
    assert!(got[1].0 == 4 && got[1].1.contains("NUL byte at column 15"), "{got:?}");
    assert!(
        got[2].0 == 5 && got[2].1.contains("not UTF-8") && got[2].1.contains("0xe9"),
        "{got:?}"
    );

    // CRLF lines of the maximum length are fine.
    let ok = format!("{}\r\n192.0.2.0/24\r\n", "#".repeat(MAX_LINE_BYTES));
    fs::write(dir.path().join("crlf.txt"), ok).expect("write");
    load_with_list(&dir, "crlf.txt").expect("CRLF list with a 4 KiB comment");
    // One byte over, with or without a CR.
    for (name, end) in [("over.txt", "\n"), ("over-crlf.txt", "\r\n")] {
        fs::write(dir.path().join(name), format!("#{}{end}", "x".repeat(MAX_LINE_BYTES))).expect("write");
        let errs = load_with_list(&dir, name).expect_err(name).0;
        assert!(
            errs.len() == 1 && errs[0].line == 1 && errs[0].what.contains("4097 bytes"),
            "{errs:#?}"
        );
    }
}

/// A file of garbage reports at most 100 lines and says how many more; a
/// long value is quoted shortened.
#[test]
fn list_errors_are_bounded() {
    let dir = TempDir::new();
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!("<html>{i}</html>\n"));
    }
    text.push_str(&"x".repeat(4000));
    text.push('\n');
    dir.write("page.txt", &text);
    let errs = load_with_list(&dir, "page.txt").expect_err("garbage").0;
    assert_eq!(errs.len(), 101, "{:#?}", &errs[..3]);
    assert!(errs.iter().any(|e| e.what.contains("901 more")), "{:#?}", errs.last());
    assert!(errs.iter().all(|e| e.what.len() < 200), "an error quotes too much");
}

/// The capacity reserved for entries follows the lines that can hold one:
/// a list of comments reserves nothing.
#[test]
fn comment_lines_reserve_nothing() {
    let text = "# comment\n".repeat(100_000);
    let (entries, errors) = parse_list(Path::new("c.txt"), &text, Action::Allow);
    assert!(errors.is_empty());
    assert_eq!(entries.capacity(), 0);
}

#[test]
fn xdp_priority_and_dispatcher() {
    let cfg = parse_ok("interfaces = [\"eth0\"]\n[[guard]]\n");
    assert_eq!(cfg.xdp_priority, 10);
    assert!(!cfg.xdp_dispatcher);
    let cfg = parse_ok("interfaces = [\"eth0\"]\nxdp_priority = 50\nxdp_dispatcher = true\n[[guard]]\n");
    assert_eq!(cfg.xdp_priority, 50);
    assert!(cfg.xdp_dispatcher);
    let e = one_err("interfaces = [\"eth0\"]\nxdp_priority = -1\n[[guard]]\n");
    assert_eq!(e.line, 2);
    assert!(e.what.contains("xdp_priority: -1"), "{}", e.what);
}
