//! A real Postfix (Debian's package) in a test namespace: its own config
//! directory, queue and data directories and log file under the test's
//! temporary directory (`postfix -c DIR start`), so instances in parallel
//! tests never share state. Nothing is delivered: every transport is
//! `discard:`. SMTP on 25 and 587 (STARTTLS offered, self-signed
//! certificate) and 465 (TLS at connect); AUTH through Cyrus SASL
//! (`sasldb`, PLAIN and LOGIN: enough for Postfix to offer AUTH; no user
//! needs to exist). Stopped in `Drop`.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{daemon::listening, netns::NetNs};

/// The ports the instance listens on.
pub const PORTS: [u16; 3] = [25, 465, 587];
/// `myhostname`.
pub const HOSTNAME: &str = "mx.relaytest.example";

/// The tools [`Postfix::start`] runs.
pub const TOOLS: &[&str] = &["postfix", "postconf", "openssl", "ss"];

pub struct Postfix {
    /// The config directory (`postfix -c`), also holding the queue.
    pub dir: PathBuf,
    /// `maillog_file`.
    pub maillog: PathBuf,
    ns: String,
}

impl Postfix {
    /// Starts Postfix in `ns` with its files under `parent`, `main.cf` set
    /// up as described in the module docs and then `settings` (`name =
    /// value` lines, later ones win), and waits until every port listens.
    pub fn start(ns: &NetNs, parent: &Path, settings: &[(&str, &str)]) -> Postfix {
        let dir = parent.join("postfix");
        for sub in ["queue", "data", "sasl"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create postfix dirs");
        }
        // The master's lock and the TLS session cache live in data_directory,
        // which Postfix wants owned by mail_owner.
        let st = Command::new("chown")
            .args(["postfix"])
            .arg(dir.join("data"))
            .status()
            .expect("run chown");
        assert!(st.success(), "chown postfix data directory");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN={HOSTNAME}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            dir.join("sasl/smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {}\nmech_list: PLAIN LOGIN\n",
                dir.join("sasldb2").display()
            ),
        )
        .expect("write smtpd.conf");
        let d = dir.display();
        let mut main = format!(
            "compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
myhostname = {HOSTNAME}
mydomain = relaytest.example
mydestination = $myhostname
inet_interfaces = all
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated reject_unauth_destination
default_transport = discard:
relay_transport = discard:
local_transport = discard:
alias_maps =
alias_database =
local_recipient_maps =
biff = no
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
smtpd_tls_cert_file = {d}/cert.pem
smtpd_tls_key_file = {d}/key.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {d}/sasl
smtpd_authorized_xclient_hosts = 127.0.0.0/8
"
        );
        for (k, v) in settings {
            main.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(dir.join("main.cf"), main).expect("write main.cf");
        std::fs::write(dir.join("master.cf"), MASTER_CF).expect("write master.cf");
        let pf = Postfix {
            maillog: dir.join("maillog"),
            dir,
            ns: ns.name.clone(),
        };
        pf.postfix(&["start"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !PORTS.iter().all(|p| listening(ns, &format!("0.0.0.0:{p}"))) {
            assert!(
                Instant::now() < deadline,
                "postfix does not listen on {PORTS:?} after 20 s:\n{}",
                pf.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pf
    }

    /// `postfix -c DIR ARGS…` inside the namespace; panics with the log on failure.
    pub fn postfix(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "postfix", "-c"])
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run postfix");
        assert!(
            out.status.success(),
            "postfix {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
    }

    /// Sets `name = value` in main.cf and reloads (new smtpd processes use it).
    pub fn set(&self, name: &str, value: &str) {
        let out = Command::new("postconf")
            .arg("-c")
            .arg(&self.dir)
            .arg("-e")
            .arg(format!("{name} = {value}"))
            .output()
            .expect("run postconf");
        assert!(
            out.status.success(),
            "postconf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.postfix(&["reload"]);
        // `reload` returns before the smtpd processes that took the old
        // settings have exited; new connections go to new ones after the
        // master has re-read main.cf (it logs this).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains("reload -- version") {
            assert!(
                Instant::now() < deadline,
                "postfix did not reload:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.maillog).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "postfix", "-c"])
            .arg(&self.dir)
            .arg("abort")
            .status();
        // `abort` signals the master; give it a moment to exit so the
        // namespace and directory can go.
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// master.cf: smtpd on 25, 465 (TLS at connect) and 587, and the services
/// a queue with only `discard:` transports needs. Nothing is chrooted.
const MASTER_CF: &str = "\
25        inet  n       -       n       -       -       smtpd
465       inet  n       -       n       -       -       smtpd -o smtpd_tls_wrappermode=yes
587       inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";
