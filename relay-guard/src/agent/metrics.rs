//! Prometheus metrics of SPEC.md, with the prometheus-client crate.
//!
//! Kernel counters are read by a [`Collector`] at scrape time and summed over
//! CPUs (ebpf_exporter's shape): no polling loop, never stale. A failed map
//! read is logged and counted in `relay_guard_scrape_errors_total`; it never
//! fails the scrape. Agent-side metrics (reloads, build info) are ordinary
//! registered metrics.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    http::{HeaderMap, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};
use relay_guard_common::{family, verdict};
use tracing::{info, warn};

use crate::{config::Config, kernel::maps::Counters, policy::Policy};

/// Names the collector needs to turn kernel keys into labels. Replaced on
/// every successful reload.
#[derive(Debug, Default, Clone)]
pub struct LabelState {
    /// Guard names by the kernel's `guard` field (a guard's bit, see
    /// `Policy::names_by_bit`).
    pub guards: Vec<String>,
    /// Interface names by ifindex.
    pub interfaces: HashMap<u32, String>,
    /// (guard, v4 allow entries, v6 allow entries).
    pub allow_counts: Vec<(String, usize, usize)>,
    /// What each counter slot stands for (refreshed after every sync).
    pub slots: crate::kernel::counters::Slots,
    /// The ban drop counters and their labels (`agent::bans`).
    pub bans: BanLabels,
}

/// What the collector needs for the `banned` packets: the ban counter map,
/// the ban sections' names and the counter port slots.
#[derive(Default, Clone)]
pub struct BanLabels {
    pub counters: Option<crate::kernel::bans::BanCounters>,
    pub names: Vec<String>,
    pub ports: BTreeMap<u32, u16>,
}

impl fmt::Debug for BanLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BanLabels")
            .field("names", &self.names)
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

impl LabelState {
    pub fn new(cfg: &Config, interfaces: HashMap<u32, String>, slots: crate::kernel::counters::Slots) -> LabelState {
        LabelState {
            slots,
            guards: cfg.guards.iter().map(|g| g.name.clone()).collect(),
            interfaces,
            allow_counts: cfg
                .guards
                .iter()
                .map(|g| {
                    let (v4, v6) = Policy::allow_counts(g);
                    (g.name.clone(), v4, v6)
                })
                .collect(),
            bans: BanLabels::default(),
        }
    }
}

/// Agent-side metrics, updated by the run loop.
#[derive(Debug, Default, Clone)]
pub struct AgentMetrics {
    pub reloads: Counter,
    pub reload_failures: Counter,
    pub last_reload_successful: Gauge,
    pub last_reload_success_timestamp: Gauge<f64, AtomicU64>,
    /// `relay_guard_interface_attached{interface}`: 1 while the device of
    /// that name carries the filter, 0 while it is missing or refused.
    pub interface_attached: Family<[(&'static str, String); 1], Gauge>,
    /// The interfaces `interface_attached` has a series for.
    pub interface_names: Arc<Mutex<Vec<String>>>,
    /// `relay_guard_interface_bypassed{interface}`: 1 while a program that
    /// runs ahead of relay-guard in the interface's XDP dispatcher ends the
    /// chain on XDP_PASS (what it passes is not filtered), else 0.
    pub interface_bypassed: Family<[(&'static str, String); 1], Gauge>,
    /// Blocked-source log events held back by the bound (kernel and agent).
    pub blocked_events_suppressed: Counter,
}

impl AgentMetrics {
    pub fn reload_succeeded(&self) {
        self.last_reload_successful.set(1);
        // (The timestamp follows; tests and alerts key on the gauge.)
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload_success_timestamp.set(now);
    }

    /// Sets `relay_guard_interface_attached` for every configured interface
    /// and drops the series of interfaces no longer configured.
    pub fn interfaces_attached(&self, status: &[(String, bool)]) {
        let mut names = self
            .interface_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, attached) in status {
            self.interface_attached
                .get_or_create(&[("interface", name.clone())])
                .set(i64::from(*attached));
        }
        for gone in names.iter().filter(|n| !status.iter().any(|(s, _)| s == *n)) {
            self.interface_attached.remove(&[("interface", gone.clone())]);
        }
        for gone in names.iter().filter(|n| !status.iter().any(|(s, _)| s == *n)) {
            self.interface_bypassed.remove(&[("interface", gone.clone())]);
        }
        *names = status.iter().map(|(n, _)| n.clone()).collect();
    }

    /// Sets `relay_guard_interface_bypassed` of `interface`.
    pub fn interface_bypassed(&self, interface: &str, bypassed: bool) {
        self.interface_bypassed
            .get_or_create(&[("interface", interface.to_string())])
            .set(i64::from(bypassed));
    }

    pub fn reload_failed(&self) {
        // Gauge first: a scrape that sees the failure count move sees the 0.
        self.last_reload_successful.set(0);
        self.reload_failures.inc();
    }
}

/// Reads the kernel counter map on each scrape.
struct KernelCollector {
    counters: Counters,
    labels: Arc<RwLock<LabelState>>,
    scrape_errors: Arc<AtomicU64>,
}

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelCollector").finish_non_exhaustive()
    }
}

fn family_name(f: u8) -> &'static str {
    match f {
        family::IPV4 => "ipv4",
        family::IPV6 => "ipv6",
        _ => "unknown",
    }
}

/// Kernel counters summed over CPUs, keyed by label values.
#[derive(Debug, Default)]
pub struct CounterSnapshot {
    /// (interface, guard, port, family, verdict) → packets.
    pub packets: BTreeMap<(String, String, u16, &'static str, &'static str), u64>,
    /// interface → malformed packets.
    pub malformed: BTreeMap<String, u64>,
}

/// Sums the per-CPU counters into label space.
pub fn snapshot(counters: &Counters, labels: &LabelState) -> Result<CounterSnapshot, crate::error::SyncError> {
    let mut snap = CounterSnapshot::default();
    for (k, total) in crate::kernel::counters::read(counters, &labels.slots)? {
        let iface = match labels.interfaces.get(&k.ifindex) {
            Some(name) => name.clone(),
            None if k.ifindex == 0 => "unknown".to_string(),
            None => format!("if{}", k.ifindex),
        };
        let verdict = match k.verdict {
            verdict::PASSED => "passed",
            verdict::DROPPED => "dropped",
            verdict::WOULD_DROP => "would_drop",
            verdict::MALFORMED_DROPPED | verdict::MALFORMED_PASSED => {
                *snap.malformed.entry(iface).or_default() += total;
                continue;
            }
            _ => continue,
        };
        let guard = labels
            .guards
            .get(usize::from(k.guard))
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| format!("guard{}", k.guard + 1));
        *snap
            .packets
            .entry((iface, guard, k.port, family_name(k.family), verdict))
            .or_default() += total;
    }
    if let Some(c) = &labels.bans.counters {
        let islots: Vec<u32> = labels.slots.ifaces.keys().copied().collect();
        for b in crate::kernel::bans::read_counters(c, &islots, &labels.bans.ports, labels.bans.names.len())? {
            let iface = match labels.slots.ifaces.get(&b.iface_slot) {
                Some(ifindex) => labels
                    .interfaces
                    .get(ifindex)
                    .cloned()
                    .unwrap_or_else(|| format!("if{ifindex}")),
                None => "unknown".to_string(),
            };
            let verdict = if b.would_drop { "would_drop" } else { "banned" };
            let fam = if b.v6 { "ipv6" } else { "ipv4" };
            let name = labels.bans.names.get(b.ban).cloned().unwrap_or_default();
            *snap.packets.entry((iface, name, b.port, fam, verdict)).or_default() += b.packets;
        }
    }
    Ok(snap)
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let labels = self
            .labels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let snap = match snapshot(&self.counters, &labels) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "failed to read kernel counters for a scrape");
                self.scrape_errors.fetch_add(1, Ordering::Relaxed);
                CounterSnapshot::default()
            }
        };

        let mut m = encoder.encode_descriptor(
            "relay_guard_packets",
            "TCP packets to guarded ports, by interface, guard, port, family and verdict.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for ((interface, guard, port, fam, verdict), v) in &snap.packets {
            let l = [
                ("interface", interface.clone()),
                ("guard", guard.clone()),
                ("port", port.to_string()),
                ("family", (*fam).to_string()),
                ("verdict", (*verdict).to_string()),
            ];
            ConstCounter::new(*v).encode(m.encode_family(&l)?)?;
        }

        let mut m = encoder.encode_descriptor(
            "relay_guard_malformed_packets",
            "Packets claiming IP/TCP that were truncated or could not be parsed (dropped in enforce mode, passed in monitor mode).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        // Every attached interface appears, at zero until something arrives.
        let mut malformed = snap.malformed.clone();
        for name in labels.interfaces.values() {
            malformed.entry(name.clone()).or_default();
        }
        for (interface, v) in &malformed {
            ConstCounter::new(*v).encode(m.encode_family(&[("interface", interface.clone())])?)?;
        }

        let mut m = encoder.encode_descriptor(
            "relay_guard_allowlist_prefixes",
            "Allow entries (addresses and CIDRs) per guard and family.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (guard, v4, v6) in &labels.allow_counts {
            for (fam, n) in [("ipv4", v4), ("ipv6", v6)] {
                let l = [("guard", guard.clone()), ("family", fam.to_string())];
                ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX)).encode(m.encode_family(&l)?)?;
            }
        }

        let m = encoder.encode_descriptor(
            "relay_guard_scrape_errors",
            "Scrapes that could not read the kernel counter map.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(self.scrape_errors.load(Ordering::Relaxed)).encode(m)?;
        Ok(())
    }
}

/// The registry with every metric of SPEC.md.
pub fn registry(counters: Counters, labels: Arc<RwLock<LabelState>>, agent: &AgentMetrics) -> Registry {
    let mut r = Registry::default();
    let p = "relay_guard";
    let sub = r.sub_registry_with_prefix(p);
    sub.register(
        "config_reloads",
        "Config reload attempts (SIGHUP or file change)",
        agent.reloads.clone(),
    );
    sub.register(
        "config_reload_failures",
        "Config reload attempts that failed validation or sync",
        agent.reload_failures.clone(),
    );
    sub.register(
        "config_last_reload_successful",
        "Whether the last config load or reload succeeded (1) or not (0)",
        agent.last_reload_successful.clone(),
    );
    sub.register(
        "config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful config load or reload",
        agent.last_reload_success_timestamp.clone(),
    );
    sub.register(
        "interface_attached",
        "Whether the configured interface of that name carries the filter (1) or not (0: missing, refused or failed to attach)",
        agent.interface_attached.clone(),
    );
    sub.register(
        "interface_bypassed",
        "Whether a program that runs ahead of relay-guard in the interface's XDP dispatcher ends the chain on XDP_PASS, so what it passes is not filtered (1) or not (0)",
        agent.interface_bypassed.clone(),
    );
    sub.register(
        "blocked_events_suppressed",
        "Blocked-source log events held back by the bound of 10 lines a second (kernel bucket or agent)",
        agent.blocked_events_suppressed.clone(),
    );
    let build_info = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    build_info.get_or_create(&[("version", crate::VERSION)]).set(1);
    sub.register("build_info", "relay-guard build information (always 1)", build_info);
    r.register_collector(Box::new(KernelCollector {
        counters,
        labels,
        scrape_errors: Arc::default(),
    }));
    r
}

/// Renders the registry in the OpenMetrics text format (prometheus-client's
/// own encoding).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// The same exposition in the classic Prometheus text format 0.0.4, for
/// scrapers and tools that do not negotiate OpenMetrics (`promtool check
/// metrics`, older Prometheus, curl). The two differ only in framing: in
/// 0.0.4 a counter family is named with its `_total` suffix in `# HELP` and
/// `# TYPE`, and there is no `# UNIT` or `# EOF` line. OpenMetrics' type
/// `unknown` is 0.0.4's `untyped`, except for a family whose name already
/// ends in `_total`: that is a counter exported untyped in OpenMetrics only
/// because its name without the suffix is taken by a gauge
/// (`relay_guard_crowdsec_decisions_total` beside
/// `relay_guard_crowdsec_decisions`), and in 0.0.4, where the two names
/// do not collide, it is typed `counter`. Samples are unchanged.
pub fn openmetrics_to_text_004(om: &str) -> String {
    let lines: Vec<&str> = om.lines().collect();
    let mut counters = std::collections::HashSet::new();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(om.len());
    for l in lines {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = l.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        let retyped = l
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" unknown"))
            .map(|name| {
                let ty = if name.ends_with("_total") { "counter" } else { "untyped" };
                format!("# TYPE {name} {ty}")
            });
        match renamed.or(retyped) {
            Some(r) => out.push_str(r.trim_end()),
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod text_004_tests {
    use super::openmetrics_to_text_004;

    #[test]
    fn counters_are_named_with_total_and_unknown_is_retyped() {
        let om = "# HELP a_x A counter.\n# TYPE a_x counter\na_x_total 1\n\
                  # HELP b_total A counter whose short name a gauge holds.\n# TYPE b_total unknown\nb_total 2\n\
                  # HELP c Something untyped.\n# TYPE c unknown\nc 3\n# EOF\n";
        let text = openmetrics_to_text_004(om);
        assert_eq!(
            text,
            "# HELP a_x_total A counter.\n# TYPE a_x_total counter\na_x_total 1\n\
             # HELP b_total A counter whose short name a gauge holds.\n# TYPE b_total counter\nb_total 2\n\
             # HELP c Something untyped.\n# TYPE c untyped\nc 3\n"
        );
    }
}

/// How long a client may take to send a whole request head (the first,
/// or the next on a kept-alive connection) before it is closed.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections served at once. When all are taken, a new connection closes
/// the oldest one that is not in the middle of a request (an idle or
/// silent client), or waits for one to end.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves `GET /metrics` (and `/healthz`) on `addr` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving metrics at /metrics");
    serve_on(listener, router(registry), shutdown).await
}

/// The routes: `/metrics` and `/healthz`.
fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let registry = Arc::clone(&registry);
                async move {
                    // OpenMetrics when the scraper asks for it (Prometheus
                    // does), else the classic text format.
                    let wants_om = headers
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|a| a.contains("application/openmetrics-text"));
                    if wants_om {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            render(&registry),
                        )
                            .into_response()
                    } else {
                        (
                            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                            openmetrics_to_text_004(&render(&registry)),
                        )
                            .into_response()
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// A connection being served.
struct Conn {
    /// True while a request is being answered: such a connection is never
    /// closed to make room.
    busy: Arc<std::sync::atomic::AtomicBool>,
    abort: tokio::task::AbortHandle,
}

/// Serves `app` on `listener` with the limits above ("Bounded work for
/// hostile input" in SPEC.md): hyper with a timer, so the request-head
/// timeout applies, and at most [`MAX_CONNECTIONS`] connections.
async fn serve_on(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let conns: Arc<std::sync::Mutex<BTreeMap<u64, Conn>>> = Arc::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let permit = if let Ok(p) = Arc::clone(&permits).try_acquire_owned() {
            p
        } else {
            // Full: close the oldest connection that is not answering a request.
            {
                let mut map = conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let idle = map
                    .iter()
                    .find(|(_, c)| !c.busy.load(Ordering::Acquire))
                    .map(|(&id, _)| id);
                if let Some(c) = idle.and_then(|id| map.remove(&id)) {
                    c.abort.abort();
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            }
        };
        let id = next_id;
        next_id += 1;
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&busy);
        let tower = hyper_util::service::TowerToHyperService::new(app.clone());
        let svc = hyper::service::service_fn(move |req| {
            flag.store(true, Ordering::Release);
            let call = hyper::service::Service::call(&tower, req);
            let flag = Arc::clone(&flag);
            async move {
                let r = call.await;
                flag.store(false, Ordering::Release);
                r
            }
        });
        let registered = Arc::clone(&conns);
        // Registered under the lock, so the task's own removal comes after.
        let mut map = conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let abort = tasks.spawn(async move {
            let _permit = permit;
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection closed");
            }
            registered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        });
        map.insert(id, Conn { busy, abort });
        drop(map);
    }
    tasks.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod serve_tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::{Duration, Instant},
    };

    use super::*;

    /// "Bounded work for hostile input": 70 idle connections neither keep
    /// a scrape from being answered at once nor stay open past the request
    /// timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_bounded_and_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, router(Arc::new(Registry::default())), async {
            let _ = stopped.await;
        }));
        let result = tokio::task::spawn_blocking(move || {
            let opened = Instant::now();
            let idle: Vec<TcpStream> = (0..70)
                .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect"))
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            let asked = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("a normal scrape is answered");
            assert!(out.starts_with("HTTP/1.0 200"), "{out}");
            assert!(
                asked.elapsed() < Duration::from_secs(3),
                "answered after {:?}",
                asked.elapsed()
            );
            let wait = (REQUEST_TIMEOUT + Duration::from_secs(1)).saturating_sub(opened.elapsed());
            std::thread::sleep(wait);
            let mut open = 0;
            for mut c in idle {
                c.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
                let mut b = [0u8; 64];
                match c.read(&mut b) {
                    Ok(0) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    _ => open += 1,
                }
            }
            assert_eq!(open, 0, "idle connections still open after {:?}", opened.elapsed());
        })
        .await;
        let _ = stop.send(());
        let _ = server.await;
        if let Err(e) = result {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}
