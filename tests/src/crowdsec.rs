//! A private, real CrowdSec Local API (Debian's `crowdsec`, LAPI only:
//! `-no-cs -no-capi`, SQLite) inside a test namespace, and its `cscli`.
//! The system's /etc/crowdsec is copied to the test's directory, every path
//! pointed there, the API on a loopback port of the namespace: nothing is
//! shared with the host's own CrowdSec, nothing leaves the namespace.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{daemon::Daemon, net::http_get, netns::NetNs};

/// Bouncer keys are 32+ characters.
pub fn key_for(name: &str) -> String {
    format!("{name}-key-0123456789abcdef0123456789abcdef")
}

pub struct Lapi {
    daemon: Option<Daemon>,
    ns: NetNs,
    pub dir: PathBuf,
    /// Where it listens (in its namespace).
    pub addr: SocketAddr,
}

impl Lapi {
    /// A new instance in `dir` (created), on 127.0.0.1:`port` of `ns`,
    /// running and answering `/health`, with a machine for cscli.
    pub fn start(ns: &NetNs, dir: &Path, port: u16) -> Lapi {
        Lapi::start_at(ns, dir, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// As [`Lapi::start`], listening on `addr` (an address of `ns`).
    pub fn start_at(ns: &NetNs, dir: &Path, addr: SocketAddr) -> Lapi {
        std::fs::create_dir_all(dir.join("data")).expect("mkdir lapi");
        // Its parsers, scenarios and profiles as installed (links kept).
        let cp = std::process::Command::new("cp")
            .args(["-a", "/etc/crowdsec/."])
            .arg(dir)
            .status()
            .expect("run cp");
        assert!(cp.success(), "copy /etc/crowdsec to {}", dir.display());
        std::fs::write(dir.join("online_api_credentials.yaml"), "# offline\n").expect("write");
        std::fs::write(dir.join("local_api_credentials.yaml"), "").expect("write");
        let d = dir.display();
        let mut cfg = std::fs::read_to_string(dir.join("config.yaml")).expect("read config.yaml");
        cfg = cfg.replace("/etc/crowdsec/", &format!("{d}/"));
        let mut out = String::new();
        for line in cfg.lines() {
            let t = line.trim_start();
            let indent = &line[..line.len() - t.len()];
            let l = if t.starts_with("db_path:") {
                format!("{indent}db_path: {d}/crowdsec.db")
            } else if t.starts_with("log_dir:") {
                format!("{indent}log_dir: {d}/")
            } else if t.starts_with("data_dir:") {
                format!("{indent}data_dir: {d}/data/")
            } else if t.starts_with("listen_uri:") {
                format!("{indent}listen_uri: {addr}")
            } else if t.starts_with("daemonize:") {
                format!("{indent}daemonize: false")
            } else if t.starts_with("log_media:") {
                format!("{indent}log_media: stdout")
            } else {
                line.to_string()
            };
            out.push_str(&l);
            out.push('\n');
        }
        // No Prometheus endpoint of its own (its port would be shared).
        out = out.replace("prometheus:\n  enabled: true", "prometheus:\n  enabled: false");
        std::fs::write(dir.join("config.yaml"), out).expect("write config.yaml");
        let mut l = Lapi {
            daemon: None,
            ns: NetNs::borrow(ns),
            dir: dir.to_path_buf(),
            addr,
        };
        l.restart();
        l.cscli(&[
            "machines",
            "add",
            "cscli-test",
            "-a",
            "-f",
            &format!("{d}/local_api_credentials.yaml"),
            "--force",
        ]);
        l
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether `/health` answers.
    pub fn healthy(&self) -> bool {
        http_get(&self.ns, self.addr, "/health").is_some_and(|b| b.contains("up"))
    }

    /// Starts it (again, on the same database) and waits for `/health`.
    pub fn restart(&mut self) {
        self.stop();
        let cfg = self.dir.join("config.yaml");
        let mut d = Daemon::spawn(
            &self.ns,
            &["crowdsec", "-c", cfg.to_str().expect("utf-8"), "-no-cs", "-no-capi"],
            self.dir.join("crowdsec.out"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            d.assert_running();
            assert!(Instant::now() < deadline, "LAPI not up after 30 s:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        self.daemon = Some(d);
    }

    /// Stops it (the database stays).
    pub fn stop(&mut self) {
        self.daemon = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.healthy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `cscli -c CONFIG ARGS` in the namespace: its output (panics when it
    /// fails).
    pub fn cscli(&self, args: &[&str]) -> String {
        let cfg = self.dir.join("config.yaml");
        let mut v = vec!["cscli", "-c", cfg.to_str().expect("utf-8")];
        v.extend_from_slice(args);
        self.ns.exec(&v)
    }

    /// A bouncer `name`; its key written to `file` (mode 0600).
    pub fn add_bouncer(&self, name: &str, file: &Path) -> String {
        let key = key_for(name);
        self.cscli(&["bouncers", "add", name, "-k", &key]);
        write_secret(file, &key);
        key
    }

    /// A watcher `name`; its password written to `file` (mode 0600).
    pub fn add_machine(&self, name: &str, file: &Path) {
        let password = format!("{name}-password-0123456789");
        self.cscli(&[
            "machines",
            "add",
            name,
            "--password",
            &password,
            "-f",
            "/dev/null",
            "--force",
        ]);
        write_secret(file, &password);
    }

    /// `cscli decisions list --all -o json` (`--all`: other origins than
    /// crowdsec and cscli too): every decision's (scope, value, origin, scenario).
    pub fn decisions(&self) -> Vec<(String, String, String, String)> {
        let out = self.cscli(&["decisions", "list", "--all", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
        let mut all = Vec::new();
        for alert in v.as_array().into_iter().flatten() {
            for d in alert["decisions"].as_array().into_iter().flatten() {
                let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
                all.push((s("scope"), s("value"), s("origin"), s("scenario")));
            }
        }
        all
    }
}

/// Writes a secret file, mode 0600 before anything is in it.
pub fn write_secret(file: &Path, text: &str) {
    let _ = std::fs::remove_file(file);
    std::fs::write(file, "").expect("create secret");
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(file, format!("{text}\n")).expect("write secret");
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.daemon = None;
    }
}

/// What a [`FakeLapi`] serves and has seen.
#[derive(Default)]
pub struct FakeState {
    /// Decisions (JSON objects) a `startup=true` pull returns.
    pub startup: Vec<serde_json::Value>,
    /// Has the endpoints of LAPI 1.6.3+ (usage metrics) and 1.6.6+
    /// (allowlist checks); without them they answer 404, as 1.4.6 does.
    pub newer: bool,
    /// Addresses its allowlist check calls allowlisted.
    pub allowlisted: Vec<String>,
    /// Bodies of `POST /v1/usage-metrics` taken.
    pub usage_metrics: Vec<serde_json::Value>,
    /// Alerts of `POST /v1/alerts` taken.
    pub alerts: Vec<serde_json::Value>,
    /// Values asked at the allowlist check.
    pub checked: Vec<String>,
    /// Pulls: (startup, when).
    pub pulls: Vec<(bool, Instant)>,
}

/// A small LAPI for what Debian's 1.4.6 lacks (usage metrics, allowlist
/// checks) and for what a test must control exactly (a 100,000-decision
/// startup stream): the decision stream, the watcher's login and alerts,
/// `POST /v1/usage-metrics` and `GET /v1/allowlists/check/{ip}`. Served by
/// axum on a thread of its own, from a socket made inside the namespace.
pub struct FakeLapi {
    pub addr: SocketAddr,
    pub state: std::sync::Arc<std::sync::Mutex<FakeState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeLapi {
    pub fn start(ns: &NetNs, port: u16, state: FakeState) -> FakeLapi {
        use axum::{
            Router,
            extract::{Path as UrlPath, RawQuery, State},
            http::{StatusCode, header},
            routing::{get, post},
        };
        type Shared = std::sync::Arc<std::sync::Mutex<FakeState>>;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = ns.run(move || {
            let l = std::net::TcpListener::bind(addr).expect("bind fake LAPI");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let state: Shared = std::sync::Arc::new(std::sync::Mutex::new(state));
        let json = |v: serde_json::Value| ([(header::CONTENT_TYPE, "application/json")], v.to_string());
        let app = Router::new()
            .route(
                "/v1/decisions/stream",
                get(move |State(s): State<Shared>, RawQuery(q): RawQuery| async move {
                    let startup = q.unwrap_or_default().contains("startup=true");
                    let mut s = s.lock().expect("state");
                    s.pulls.push((startup, Instant::now()));
                    let new = if startup {
                        serde_json::Value::from(s.startup.clone())
                    } else {
                        serde_json::Value::Null
                    };
                    json(serde_json::json!({"new": new, "deleted": null}))
                }),
            )
            .route(
                "/v1/watchers/login",
                post(move || async move {
                    json(serde_json::json!({"code": 200, "token": "fake-token", "expire": "2099-01-01T00:00:00Z"}))
                }),
            )
            .route(
                "/v1/alerts",
                post(move |State(s): State<Shared>, body: axum::body::Bytes| async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let mut s = s.lock().expect("state");
                    let mut ids = Vec::new();
                    for a in v.as_array().into_iter().flatten() {
                        s.alerts.push(a.clone());
                        ids.push(serde_json::Value::from(s.alerts.len().to_string()));
                    }
                    json(serde_json::Value::from(ids))
                })
                .get(move || async move { json(serde_json::Value::Null) }),
            )
            .route(
                "/v1/usage-metrics",
                post(move |State(s): State<Shared>, body: axum::body::Bytes| async move {
                    let mut s = s.lock().expect("state");
                    if !s.newer {
                        return (StatusCode::NOT_FOUND, String::from("404 page not found"));
                    }
                    s.usage_metrics.push(serde_json::from_slice(&body).unwrap_or_default());
                    (StatusCode::CREATED, String::new())
                }),
            )
            .route(
                "/v1/allowlists/check/{ip}",
                get(
                    move |State(s): State<Shared>, UrlPath(ip): UrlPath<String>| async move {
                        let mut s = s.lock().expect("state");
                        if !s.newer {
                            return (StatusCode::NOT_FOUND, String::from("404 page not found"));
                        }
                        s.checked.push(ip.clone());
                        let listed = s.allowlisted.contains(&ip);
                        (StatusCode::OK, serde_json::json!({"allowlisted": listed}).to_string())
                    },
                ),
            )
            .with_state(std::sync::Arc::clone(&state));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        FakeLapi {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeLapi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `n` Ip decisions of distinct addresses of 198.18.0.0/15 (the
/// benchmarking range), one hour each, ids from `first_id`.
pub fn many_decisions(n: u32, first_id: i64) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1)) + i);
            serde_json::json!({
                "id": first_id + i64::from(i), "origin": "crowdsec", "scenario": "crowdsecurity/ssh-bf",
                "scope": "Ip", "type": "ban", "value": a.to_string(), "duration": "59m59.5s"
            })
        })
        .collect()
}
