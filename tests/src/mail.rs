//! A real Postfix (and, optionally, Dovecot as its SASL back end) inside a
//! test namespace, everything under one test directory:
//!
//! - Postfix runs from its own `config_directory` (`postfix -c DIR start`),
//!   with a private `queue_directory` and `data_directory`, logging to its own
//!   `maillog_file` (through `postlogd`), no chroot, no DNS, and every message
//!   it accepts thrown away (`default_transport = discard:`). Port 25 is
//!   plain `smtpd`; [`MailServerBuilder::submission`] adds 587 (STARTTLS
//!   required before AUTH) and 465 (implicit TLS) with SASL, using a
//!   self-signed certificate made with `openssl` for the test.
//! - Dovecot (`dovecot -F -c FILE`, its `base_dir` beside FILE's directory,
//!   never the system one) serves Postfix's SASL socket in Postfix's
//!   `private/` (so it starts after Postfix made it) from a passwd-file, and
//!   logs to its own file with `auth_verbose = yes` (the `auth:` lines a busy
//!   server has).
//! - [`MailServerBuilder::main`] and [`MailServerBuilder::master`] override or
//!   add `main.cf` parameters and `master.cf` services, so other tests can
//!   build the Postfix they need.
//!
//! Everything is stopped in `Drop` (`postfix stop`, then `abort` if the master
//! lingers; Dovecot SIGTERM, then SIGKILL).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    netns::NetNs,
    smtp::{HELO, MAIL_FROM, RCPT_TO, Run},
};

/// The host name Postfix announces and its certificate names.
pub const MAIL_HOST: &str = "mail.example.com";
/// What a test of Postfix with Dovecot SASL and swaks over TLS needs.
pub const SUBMISSION_TOOLS: &[&str] = &[
    "postfix",
    "dovecot",
    "openssl",
    "swaks",
    "ss",
    "/usr/share/perl5/IO/Socket/SSL.pm",
];
/// The mailbox the tests' Dovecot knows, and its password.
pub const USER: &str = "alice@example.com";
pub const PASSWORD: &str = "correct horse";

/// Parameters every test Postfix gets (before overrides). `{dir}` is the test
/// directory.
const MAIN_CF: &[(&str, &str)] = &[
    ("compatibility_level", "3.6"),
    ("queue_directory", "{dir}/queue"),
    ("data_directory", "{dir}/data"),
    ("mail_owner", "postfix"),
    ("setgid_group", "postdrop"),
    ("myhostname", MAIL_HOST),
    ("mydomain", "example.com"),
    ("myorigin", "example.com"),
    ("mydestination", ""),
    ("mynetworks", "127.0.0.0/8 [::1]/128"),
    ("inet_interfaces", "all"),
    ("inet_protocols", "all"),
    ("maillog_file", "{dir}/maillog"),
    ("maillog_file_prefixes", "{dir}"),
    ("default_transport", "discard:"),
    ("relay_transport", "discard:"),
    ("local_transport", "discard:"),
    ("local_recipient_maps", ""),
    ("alias_maps", ""),
    ("alias_database", ""),
    ("biff", "no"),
    ("smtputf8_enable", "no"),
    // No DNS in a test namespace: no reverse lookups of clients.
    ("smtpd_peername_lookup", "no"),
    ("disable_dns_lookups", "yes"),
    ("smtp_dns_support_level", "disabled"),
    (
        "smtpd_relay_restrictions",
        "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
    ),
    ("smtpd_recipient_restrictions", ""),
    // Failed AUTHs come fast: no tarpit delay, no error limit in the way.
    ("smtpd_error_sleep_time", "0"),
    ("smtpd_soft_error_limit", "100"),
    ("smtpd_hard_error_limit", "100"),
    ("smtpd_client_connection_rate_limit", "0"),
    ("smtpd_client_auth_rate_limit", "0"),
    ("anvil_rate_time_unit", "60s"),
];

/// The services every test Postfix runs (no chroot: the test directory is
/// not inside one). Name and type are the key [`MailServerBuilder::master`]
/// replaces by.
const MASTER_CF: &[&str] = &[
    "smtp      inet  n       -       n       -       -       smtpd",
    "pickup    unix  n       -       n       60      1       pickup",
    "cleanup   unix  n       -       n       -       0       cleanup",
    "qmgr      unix  n       -       n       300     1       qmgr",
    "tlsmgr    unix  -       -       n       1000?   1       tlsmgr",
    "rewrite   unix  -       -       n       -       -       trivial-rewrite",
    "bounce    unix  -       -       n       -       0       bounce",
    "defer     unix  -       -       n       -       0       bounce",
    "trace     unix  -       -       n       -       0       bounce",
    "verify    unix  -       -       n       -       1       verify",
    "flush     unix  n       -       n       1000?   0       flush",
    "proxymap  unix  -       -       n       -       -       proxymap",
    "proxywrite unix -       -       n       -       1       proxymap",
    "smtp      unix  -       -       n       -       -       smtp",
    "relay     unix  -       -       n       -       -       smtp",
    "showq     unix  n       -       n       -       -       showq",
    "error     unix  -       -       n       -       -       error",
    "retry     unix  -       -       n       -       -       error",
    "discard   unix  -       -       n       -       -       discard",
    "local     unix  -       n       n       -       -       local",
    "anvil     unix  -       -       n       -       1       anvil",
    "scache    unix  -       -       n       -       1       scache",
    "postlog   unix-dgram n  -       n       -       1       postlogd",
];

/// 587 (STARTTLS, then AUTH) and 465 (implicit TLS), both with SASL.
const SUBMISSION_CF: &[&str] = &[
    "587       inet  n       -       n       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_auth_only=yes
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
    "465       inet  n       -       n       -       -       smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
];

/// What to build; see the module docs.
pub struct MailServerBuilder {
    ns: String,
    dir: PathBuf,
    main: BTreeMap<String, String>,
    master: Vec<String>,
    users: Option<Vec<(String, String)>>,
    tls: bool,
    syslog: bool,
    imap: bool,
    pop3: bool,
}

impl MailServerBuilder {
    /// A Postfix with port 25 only, in namespace `ns`, under `dir` (which must
    /// exist and stay until the server is dropped).
    pub fn new(ns: &NetNs, dir: &Path) -> MailServerBuilder {
        let d = dir.display().to_string();
        MailServerBuilder {
            ns: ns.name.clone(),
            dir: dir.to_owned(),
            main: MAIN_CF
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.replace("{dir}", &d)))
                .collect(),
            master: MASTER_CF.iter().map(|s| (*s).to_owned()).collect(),
            users: None,
            tls: false,
            syslog: false,
            imap: false,
            pop3: false,
        }
    }

    /// Sets (or adds) a `main.cf` parameter.
    pub fn main(mut self, key: &str, value: &str) -> Self {
        self.main.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds a `master.cf` service, replacing the one of the same name and
    /// type. Continuation lines start with white space, as in `master.cf`.
    pub fn master(mut self, entry: &str) -> Self {
        let key = |e: &str| e.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let k = key(entry);
        self.master.retain(|e| key(e) != k);
        self.master.push(entry.to_owned());
        self
    }

    /// TLS for smtpd with a self-signed certificate for [`MAIL_HOST`]
    /// (`smtpd_tls_security_level = may` on port 25).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Postfix and Dovecot log through syslog(3) (`/dev/log`) instead of
    /// their own files: for a test that reads the journal
    /// (tests/src/journal.rs).
    pub fn syslog(mut self) -> Self {
        self.syslog = true;
        self.main.insert("maillog_file".into(), String::new());
        self
    }

    /// Dovecot as the SASL back end, with these users and passwords.
    pub fn dovecot(mut self, users: &[(&str, &str)]) -> Self {
        self.users = Some(users.iter().map(|(u, p)| ((*u).to_owned(), (*p).to_owned())).collect());
        self
    }

    /// Dovecot also serves IMAP on 143 (plaintext LOGIN allowed, no TLS), so
    /// its `imap-login` process logs failed logins. Implies a Dovecot user
    /// list ([`Self::dovecot`] sets it).
    pub fn imap(mut self) -> Self {
        self.imap = true;
        self
    }

    /// Dovecot also serves POP3 on 110 (plaintext USER/PASS allowed, no
    /// TLS), so its `pop3-login` process logs failed logins. Needs
    /// [`Self::dovecot`].
    pub fn pop3(mut self) -> Self {
        self.pop3 = true;
        self
    }

    /// 587 and 465 with SASL: implies [`Self::tls`]; needs [`Self::dovecot`].
    pub fn submission(mut self) -> Self {
        self.tls = true;
        for s in SUBMISSION_CF {
            self = self.master(s);
        }
        self
    }

    /// Writes the configuration, starts Postfix, then Dovecot, and waits
    /// until every inet service listens. Panics with the logs on failure.
    pub fn start(mut self) -> MailServer {
        let dir = self.dir.clone();
        let d = dir.display().to_string();
        let config_dir = dir.join("postfix");
        std::fs::create_dir_all(&config_dir).expect("create postfix config dir");
        // postfix start makes the queue's subdirectories, not the queue
        // directory itself; the data directory belongs to mail_owner.
        std::fs::create_dir_all(dir.join("queue")).expect("create queue dir");
        std::fs::create_dir_all(dir.join("data")).expect("create data dir");
        let chown = Command::new("chown")
            .args(["postfix:postfix"])
            .arg(dir.join("data"))
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown postfix data dir");
        if self.tls {
            let (cert, key) = self_signed(&dir);
            self.main
                .entry("smtpd_tls_cert_file".into())
                .or_insert(cert.display().to_string());
            self.main
                .entry("smtpd_tls_key_file".into())
                .or_insert(key.display().to_string());
            self.main
                .entry("smtpd_tls_security_level".into())
                .or_insert("may".into());
        }
        if self.users.is_some() {
            self.main.entry("smtpd_sasl_type".into()).or_insert("dovecot".into());
            self.main
                .entry("smtpd_sasl_path".into())
                .or_insert(format!("{d}/queue/private/auth"));
        }
        let main_cf: String = self.main.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        std::fs::write(config_dir.join("main.cf"), main_cf).expect("write main.cf");
        let master_cf: String = self.master.iter().map(|e| format!("{e}\n")).collect();
        std::fs::write(config_dir.join("master.cf"), master_cf).expect("write master.cf");
        let ports: Vec<u16> = self
            .master
            .iter()
            .filter(|e| e.split_whitespace().nth(1) == Some("inet"))
            .filter_map(|e| {
                let name = e.split_whitespace().next()?;
                let port = name.rsplit(':').next()?;
                match port {
                    "smtp" => Some(25),
                    p => p.parse().ok(),
                }
            })
            .collect();
        let mut server = MailServer {
            dovecot: None,
            postfix: Postfix {
                ns: self.ns.clone(),
                config_dir,
                maillog: dir.join("maillog"),
                started: false,
            },
            dir: dir.clone(),
            ns: self.ns.clone(),
        };
        let out = postfix_cmd(&self.ns, &server.postfix.config_dir, "start");
        assert!(
            out.status.success(),
            "postfix start failed:\n{}\n{}",
            out.output,
            server.postfix.log_text()
        );
        server.postfix.started = true;
        if let Some(users) = &self.users {
            server.dovecot = Some(Dovecot::start(&self.ns, &dir, users, self.syslog, self.imap, self.pop3));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut ports = ports;
        if self.imap && self.users.is_some() {
            ports.push(143);
        }
        if self.pop3 && self.users.is_some() {
            ports.push(110);
        }
        for port in ports {
            loop {
                if listening_on(&self.ns, port) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "port {port} not listening after 20 s:\n{}\n--- dovecot:\n{}",
                    server.postfix.log_text(),
                    server.dovecot.as_ref().map(Dovecot::log_text).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Some(dc) = &mut server.dovecot {
            let socket = dir.join("queue/private/auth");
            let deadline = Instant::now() + Duration::from_secs(20);
            while !socket.exists() {
                dc.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "dovecot: no auth socket at {} after 20 s:\n{}",
                    socket.display(),
                    dc.log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        server
    }
}

/// Whether something listens on TCP `port` (any address) in namespace `ns`.
fn listening_on(ns: &str, port: u16) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Hltn"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let suffix = format!(":{port}");
    out.lines()
        .any(|l| l.split_whitespace().nth(3).is_some_and(|a| a.ends_with(&suffix)))
}

fn postfix_cmd(ns: &str, config_dir: &Path, verb: &str) -> Run {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "postfix", "-c"])
        .arg(config_dir)
        .arg(verb)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run postfix {verb}: {e}"));
    Run::of(out)
}

/// A self-signed certificate and key for [`MAIL_HOST`] under `dir`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={MAIL_HOST}"),
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

pub struct Postfix {
    ns: String,
    pub config_dir: PathBuf,
    /// Postfix's `maillog_file`.
    pub maillog: PathBuf,
    started: bool,
}

impl Postfix {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// `postfix -c DIR VERB` (`reload`, `logrotate`, ...).
    pub fn command(&self, verb: &str) -> Run {
        postfix_cmd(&self.ns, &self.config_dir, verb)
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if !self.started {
            return;
        }
        let _ = postfix_cmd(&self.ns, &self.config_dir, "stop");
        let pidfile = self.config_dir.parent().map(|d| d.join("queue/pid/master.pid"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(pid) = pidfile
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill with signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 || Instant::now() > deadline {
                if Instant::now() > deadline {
                    let _ = postfix_cmd(&self.ns, &self.config_dir, "abort");
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub struct Dovecot {
    child: Option<Child>,
    /// Dovecot's `log_path`.
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Dovecot {
    fn start(ns: &str, dir: &Path, users: &[(String, String)], syslog: bool, imap: bool, pop3: bool) -> Dovecot {
        let conf_dir = dir.join("dovecot-conf");
        let base_dir = dir.join("dovecot-run");
        std::fs::create_dir_all(&conf_dir).expect("create dovecot conf dir");
        std::fs::create_dir_all(&base_dir).expect("create dovecot base dir");
        let users_file = conf_dir.join("users");
        let users_text: String = users.iter().map(|(u, p)| format!("{u}:{{PLAIN}}{p}::::::\n")).collect();
        std::fs::write(&users_file, users_text).expect("write dovecot users");
        let log = dir.join("dovecot.log");
        let log_path = if syslog {
            "syslog".to_owned()
        } else {
            log.display().to_string()
        };
        let socket = dir.join("queue/private/auth");
        let config = conf_dir.join("dovecot.conf");
        let served: Vec<&str> = [(imap, "imap"), (pop3, "pop3")]
            .into_iter()
            .filter_map(|(on, p)| on.then_some(p))
            .collect();
        let protocols = if served.is_empty() {
            "protocols =\n".to_owned()
        } else {
            format!(
                "protocols = {}\nlisten = *, ::\nmail_location = maildir:{}/mail/%u\n",
                served.join(" "),
                dir.display()
            )
        };
        let text = format!(
            r#"# relay-guard test Dovecot: SASL for Postfix (and IMAP on 143, POP3 on 110).
{protocols}base_dir = {base}
state_dir = {base}/state
log_path = {log_path}
info_log_path = {log_path}
auth_verbose = yes
# Answer failed logins at once (default: after 2 s), so tests run quickly.
auth_failure_delay = 0
auth_mechanisms = plain login
disable_plaintext_auth = no
ssl = no
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {socket} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
  unix_listener auth-userdb {{
    mode = 0600
  }}
}}
service anvil {{
  chroot =
}}
"#,
            base = base_dir.display(),
            users = users_file.display(),
            socket = socket.display(),
        );
        std::fs::write(&config, text).expect("write dovecot.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "dovecot", "-F", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn dovecot: {e}"));
        Dovecot {
            child: Some(child),
            log,
            config,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait().expect("try_wait")
        {
            let check = Command::new("dovecot")
                .args(["-n", "-c"])
                .arg(&self.config)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            panic!("dovecot exited ({status}):\n{check}\n{}", self.log_text());
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: a signal to our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.wait();
        }
    }
}

/// A running Postfix (+ Dovecot); stopped in `Drop` (Dovecot first).
pub struct MailServer {
    pub dovecot: Option<Dovecot>,
    pub postfix: Postfix,
    pub dir: PathBuf,
    ns: String,
}

impl MailServer {
    /// The namespace it runs in.
    pub fn ns_name(&self) -> &str {
        &self.ns
    }
}

/// How a client starts TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// None.
    Plain,
    /// STARTTLS (587).
    StartTls,
    /// TLS on connect (465).
    Implicit,
}

/// One `swaks` session from `src` to `dst:port` that authenticates (PLAIN)
/// as `user` with `password` and, if that works, sends one message. A wrong
/// password is one failed AUTH; swaks then quits.
pub fn swaks_auth(ns: &NetNs, src: &str, dst: IpAddr, port: u16, tls: Tls, user: &str, password: &str) -> Run {
    let mut args: Vec<String> = [
        "swaks",
        "--server",
        &dst.to_string(),
        "--port",
        &port.to_string(),
        "--local-interface",
        src,
        "--timeout",
        "10",
        "--helo",
        HELO,
        "--from",
        MAIL_FROM,
        "--to",
        RCPT_TO,
        "--auth",
        "PLAIN",
        "--auth-user",
        user,
        "--auth-password",
        password,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    match tls {
        Tls::Plain => {}
        Tls::StartTls => args.push("--tls".into()),
        Tls::Implicit => args.push("--tls-on-connect".into()),
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run swaks: {e}"));
    Run::of(out)
}
