//! The OCI image (`cargo xtask image`) run as the Kubernetes DaemonSet runs
//! it: built twice (the same digest), unpacked into an OCI runtime bundle
//! whose `config.json` is derived from `deploy/kubernetes/relay-guard.yaml`
//! (command, environment, capabilities, no new privileges, read-only root,
//! the ConfigMap, bpffs, lock and state mounts; the host network is the lab's
//! server namespace), and run by a real OCI runtime, systemd-nspawn
//! `--oci-bundle`, in a memory cgroup of its own. Shown: it guards the lab's
//! veth (a denied source's SYN dropped, an allowed one answered), answers
//! `/healthz` and `/metrics` on the node's address at the manifest's port,
//! and its memory (agent and maps, which the kernel charges to the cgroup)
//! fits the manifest as measured in this run: the request covers the shipped
//! ConfigMap, the limit the peak of a reload to the documented table maximum.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use relay_guard_tests::{
    agent::TempDir,
    container::{Container, repo, run_ok},
    lab::{ALLOWED_V4, DENIED_V4, Lab, SERVER_V4, ip},
    net::{BannerServer, connect_banner, http_get, metric},
    netns::unique,
    prober::ALLOWED_TIMEOUT,
    require,
};
use serde_json::{Value, json};

/// The documented maximum of IPv4 /24 blocks holding longer prefixes
/// (docs/operations.md, "The kernel tables have fixed limits").
const MAX_LONG_BLOCKS: usize = 524_288;

use relay_guard_tests::yaml::yaml_documents;

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
        .expect("JSON")
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

fn xtask_image(out: &Path) -> String {
    run_ok(
        Command::new("cargo")
            .current_dir(repo())
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["xtask", "image", "--out"])
            .arg(out),
    )
}

/// Parses a Kubernetes memory quantity (`64Mi`, `1Gi`) into bytes.
fn quantity(q: &str) -> u64 {
    for (suffix, unit) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().expect("number") * unit;
        }
    }
    q.parse().expect("bytes")
}

/// A memory cgroup (v2 or v1) under the test's own, removed on drop.
struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    fn new() -> MemCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let name = unique("deploy-real-img-");
        let v1 = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
        let (dir, v2) = match v1 {
            Some(p) => (PathBuf::from(format!("/sys/fs/cgroup/memory{p}")).join(name), false),
            None => {
                let p = own.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2 path");
                (PathBuf::from(format!("/sys/fs/cgroup{p}")).join(name), true)
            }
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create the cgroup {}: {e}", dir.display()));
        MemCgroup { dir, v2 }
    }

    fn read(&self, v2: &str, v1: &str) -> u64 {
        let f = self.dir.join(if self.v2 { v2 } else { v1 });
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("read {}: {e}", f.display()))
            .trim()
            .parse()
            .expect("a number")
    }

    fn current(&self) -> u64 {
        self.read("memory.current", "memory.usage_in_bytes")
    }

    fn peak(&self) -> u64 {
        self.read("memory.peak", "memory.max_usage_in_bytes")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn oci_image_is_reproducible_and_runs_as_the_daemonset() {
    let name = "oci_image_is_reproducible_and_runs_as_the_daemonset";
    if !require::privileged_with(name, &["cargo", "systemd-nspawn", "tar", "kubernetes-validate"]) {
        return;
    }
    let dir = TempDir::new();

    // Built twice: the same digest.
    let (a, b) = (dir.0.join("image-a"), dir.0.join("image-b"));
    let out = xtask_image(&a);
    xtask_image(&b);
    let index = read_json(&a.join("index.json"));
    assert_eq!(
        std::fs::read_to_string(a.join("index.json")).expect("index"),
        std::fs::read_to_string(b.join("index.json")).expect("index"),
        "two builds gave different images"
    );
    let desc = &index["manifests"][0];
    let digest = desc["digest"].as_str().expect("digest").to_string();
    assert!(out.contains(&digest), "xtask prints the digest:\n{out}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(desc["annotations"]["org.opencontainers.image.ref.name"], version);
    let manifest = read_json(&blob(&a, &digest));
    let config = read_json(&blob(&a, manifest["config"]["digest"].as_str().expect("config")));
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version);
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://"))
    );
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .is_some_and(|s| s.len() == 40)
    );
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer on an empty base");
    let layer = blob(&a, layers[0]["digest"].as_str().expect("layer digest"));
    let listing = run_ok(Command::new("tar").arg("-tvzf").arg(&layer));
    let files: Vec<&str> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(
        files,
        ["etc/relay-guard/relay-guard.toml", "usr/bin/relay-guard"],
        "the image holds the agent and the example config, nothing else (no shell):\n{listing}"
    );

    // The DaemonSet.
    let docs = yaml_documents(&repo().join("deploy/kubernetes/relay-guard.yaml"));
    let get = |kind: &str| docs.iter().find(|d| d["kind"] == kind).expect("kind present");
    let ds = get("DaemonSet");
    let cm = get("ConfigMap");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let image = c["image"].as_str().expect("image");
    let (repo_tag, pinned) = image.split_once("@sha256:").expect("the image is referenced by digest");
    assert!(
        repo_tag.ends_with(&format!("/relay-guard:{version}")),
        "the manifest's image tag is the package version: {image}"
    );
    assert_eq!(pinned.len(), 64, "a sha256 digest (placeholder): {image}");
    let sc = &c["securityContext"];
    let caps: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("add")
        .iter()
        .map(|v| format!("CAP_{}", v.as_str().expect("cap")))
        .collect();
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    // The environment as the kubelet makes it: plain values, and the node's
    // address from the downward API (`status.hostIP`: here the lab's server
    // address); `$(VAR)` in the command is expanded from it.
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("name").to_string();
        let value = match e["value"].as_str() {
            Some(v) => v.to_string(),
            None => {
                assert_eq!(
                    e["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP",
                    "env {name}: only status.hostIP is known to this test"
                );
                SERVER_V4.to_string()
            }
        };
        vars.push((name, value));
    }
    let args: Vec<String> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| {
            let mut a = v.as_str().expect("arg").to_string();
            for (k, val) in &vars {
                a = a.replace(&format!("$({k})"), val);
            }
            a
        })
        .collect();
    let mut env = vec!["PATH=/usr/bin".to_string()];
    env.extend(vars.iter().map(|(k, v)| format!("{k}={v}")));
    let port = c["ports"][0]["containerPort"].as_u64().expect("containerPort");
    let readiness = &c["readinessProbe"]["httpGet"];
    assert_eq!(readiness["port"], c["ports"][0]["name"]);
    let probe_path = readiness["path"].as_str().expect("probe path").to_string();
    let memory_request = quantity(c["resources"]["requests"]["memory"].as_str().expect("memory request"));
    let memory_limit = quantity(c["resources"]["limits"]["memory"].as_str().expect("memory limit"));

    // The bundle: the layer as rootfs, the pod spec as config.json.
    let lab = Lab::new();
    let pins = PathBuf::from(format!("/sys/fs/bpf/{}", unique("deploy-real-img-")));
    let _pins = PinsOnDrop(pins.clone());
    let bundle = dir.0.join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("mkdir rootfs");
    run_ok(Command::new("tar").arg("-C").arg(&rootfs).arg("-xzf").arg(&layer));
    // The ConfigMap, as the kubelet mounts it; the node's interface and a
    // pin_dir of this test's own, enforce mode, and the office list grown to
    // the documented maximum of /24 blocks (the memory measurement).
    let cm_dir = dir.0.join("configmap");
    std::fs::create_dir_all(&cm_dir).expect("mkdir configmap");
    let mut edited = 0;
    for (k, v) in cm["data"].as_object().expect("data") {
        let mut text = v.as_str().expect("string").to_string();
        if k == "relay-guard.toml" {
            let before = text.clone();
            text = text
                .replace(
                    "interfaces = [\"eth0\"]",
                    &format!("interfaces = [\"{}\"]", lab.server_if),
                )
                .replace("mode = \"monitor\"", "mode = \"enforce\"")
                .replace(
                    "pin_dir = \"/sys/fs/bpf/relay-guard\"",
                    &format!("pin_dir = \"{}\"", pins.display()),
                );
            assert_ne!(text, before);
            edited += 1;
        }
        if k == "office.txt" {
            edited += 1;
        }
        std::fs::write(cm_dir.join(k), text).expect("write configmap file");
    }
    assert_eq!(edited, 2, "the ConfigMap changed shape; update this test");
    let listen = args
        .iter()
        .position(|a| a == "--metrics-listen")
        .map(|i| args[i + 1].clone())
        .expect("the pod's command names --metrics-listen");
    let listen_port: u64 = listen.rsplit_once(':').expect("host:port").1.parse().expect("port");
    assert_eq!(listen_port, port, "--metrics-listen is on the containerPort");
    assert_eq!(
        listen,
        format!("{SERVER_V4}:{port}"),
        "--metrics-listen is the node's address"
    );
    let (lock, state) = (dir.0.join("run-relay-guard"), dir.0.join("var-lib-relay-guard"));
    std::fs::create_dir_all(&lock).expect("mkdir");
    std::fs::create_dir_all(&state).expect("mkdir");
    let mounts_by_path: std::collections::BTreeMap<&str, &str> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().expect("path"),
                m["name"].as_str().expect("name"),
            )
        })
        .collect();
    let source = |path: &str| -> PathBuf {
        match path {
            "/etc/relay-guard" => cm_dir.clone(),
            "/sys/fs/bpf" => PathBuf::from("/sys/fs/bpf"),
            "/run/relay-guard" => lock.clone(),
            "/var/lib/relay-guard" => state.clone(),
            other => panic!("the DaemonSet mounts {other}; add it to this test"),
        }
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        // Unprivileged containers get /sys read-only.
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}),
    ];
    for m in c["volumeMounts"].as_array().expect("mounts") {
        let path = m["mountPath"].as_str().expect("path");
        let mut options = vec!["rbind"];
        if m["readOnly"] == true {
            options.push("ro");
        }
        if m["mountPropagation"] == "HostToContainer" {
            options.push("rslave");
        }
        mounts.push(json!({"destination": path, "type": "none", "source": source(path), "options": options}));
    }
    assert_eq!(mounts_by_path.len(), 4);
    let spec = json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": sc["runAsUser"], "gid": sc["runAsGroup"]},
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": sc["allowPrivilegeEscalation"] == false,
        },
        "root": {"path": "rootfs", "readonly": sc["readOnlyRootFilesystem"] == true},
        "hostname": "relay-guard",
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                // hostNetwork: the node's namespace, here the lab's server side.
                {"type": "network", "path": lab.server.path()},
            ],
        },
    });
    assert_eq!(pod["hostNetwork"], true);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec).expect("json"),
    )
    .expect("write spec");

    // Run it, in a memory cgroup of its own (the pod's).
    let _server = BannerServer::start(&lab.server, &[587]);
    let cg = MemCgroup::new();
    let procs = cg.dir.join("cgroup.procs");
    let started = Instant::now();
    // systemd-nspawn 252 applies neither the bundle's noNewPrivileges nor
    // root.readonly (the checks below caught both): say them on the
    // command line too.
    let no_new_privs = format!("--no-new-privileges={}", sc["allowPrivilegeEscalation"] == false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let container = Container::spawn_in(
        &[
            &format!("--oci-bundle={}", bundle.display()),
            &no_new_privs,
            "--read-only",
        ],
        dir.0.join("nspawn.log"),
        &procs,
    );
    // Readiness: the probe's endpoint answers once the filter is attached.
    let node = SocketAddr::new(ip(SERVER_V4), u16::try_from(port).expect("port"));
    let deadline = Instant::now() + Duration::from_secs(300);
    let health = loop {
        if let Some(h) = http_get(&lab.server, node, &probe_path) {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "{probe_path} did not answer on {node}:\n{}",
            container.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let ready_after = started.elapsed();
    // The runtime applied the security context: the agent (the container's
    // PID 1) holds exactly the added capabilities, cannot gain more, and its
    // root file system is read-only.
    let status = std::fs::read_to_string(format!("/proc/{}/status", container.init)).expect("agent status");
    assert!(
        status.contains("Name:\trelay-guard"),
        "the container's PID 1 is not the agent:\n{status}"
    );
    let want = (1u64 << 12) | (1 << 38) | (1 << 39); // NET_ADMIN, PERFMON, BPF
    assert_eq!(caps, ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let got = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"));
        assert_eq!(got, Some(want), "{field} of the agent in the container");
    }
    assert!(
        status.contains("NoNewPrivs:\t1"),
        "allowPrivilegeEscalation: false not applied"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", container.init)).expect("mountinfo");
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert!(
        root.split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|f| f == "ro")),
        "the root file system is writable: {root}"
    );
    assert!(health.contains("ok"), "{probe_path}: {health}");
    assert!(
        lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains("xdp"),
        "ready but not attached"
    );
    let m = http_get(&lab.server, node, "/metrics").expect("/metrics on the node address");
    // Only there: not on the node's other addresses (loopback here), as
    // 0.0.0.0 would be.
    let elsewhere = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), node.port());
    assert!(
        http_get(&lab.server, elsewhere, "/metrics").is_none(),
        "/metrics also answers on {elsewhere}: not bound to the node address alone"
    );
    assert!(m.contains("relay_guard_build_info"), "{m}");
    assert_eq!(metric(&m, "relay_guard_config_last_reload_successful", &[]), 1.0);

    // Guarding: on submission (587) the allowed source is answered, the
    // denied one's SYN dropped (counted).
    let allowed = connect_banner(&lab.client, ip(ALLOWED_V4), ip(SERVER_V4), 587, ALLOWED_TIMEOUT);
    assert!(allowed.is_ok(), "allowed source: {allowed:?}");
    let denied = connect_banner(
        &lab.client,
        ip(DENIED_V4),
        ip(SERVER_V4),
        587,
        Duration::from_millis(500),
    );
    assert!(denied.is_err(), "the denied source got through");
    let m = http_get(&lab.server, node, "/metrics").expect("metrics");
    let drops: f64 = m
        .lines()
        .filter(|l| l.starts_with("relay_guard_packets_total{") && l.contains("verdict=\"dropped\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(drops >= 1.0, "no drop counted:\n{m}");

    // Memory: the agent and its maps, charged to the container's cgroup;
    // first with the ConfigMap as shipped (the maps' fixed part)...
    std::thread::sleep(Duration::from_secs(2));
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    // Sampled, so the figure is this run's range, not one reading's noise.
    let samples: Vec<u64> = (0..7)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(300));
            cg.current()
        })
        .collect();
    let baseline = *samples.iter().max().expect("samples");
    let spread = baseline - *samples.iter().min().expect("samples");
    // ...then with the office list grown, by a reload as the kubelet's
    // ConfigMap update triggers it, to the documented maximum of /24 blocks
    // holding longer prefixes (less the one the list has, which old and new
    // share during the reload).
    let office = cm_dir.join("office.txt");
    let mut list = std::fs::read_to_string(&office).expect("office.txt");
    for i in 0..MAX_LONG_BLOCKS - 2 {
        list.push_str(&format!("{}.{}.{}.1\n", 16 + (i >> 16), (i >> 8) & 255, i & 255));
    }
    std::fs::write(cm_dir.join(".office.txt.tmp"), list).expect("write the grown list");
    std::fs::rename(cm_dir.join(".office.txt.tmp"), &office).expect("replace office.txt");
    let grown = Instant::now();
    let deadline = grown + Duration::from_secs(300);
    loop {
        let m = http_get(&lab.server, node, "/metrics").unwrap_or_default();
        let prefixes = metric(
            &m,
            "relay_guard_allowlist_prefixes",
            &[("guard", "submission"), ("family", "ipv4")],
        );
        if prefixes >= (MAX_LONG_BLOCKS - 1) as f64 {
            assert_eq!(metric(&m, "relay_guard_config_last_reload_successful", &[]), 1.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the grown list was not applied ({prefixes} prefixes):\n{}",
            container.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let reload_took = grown.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (current, peak) = (cg.current(), cg.peak());
    eprintln!(
        "image: ready after {ready_after:.1?}; cgroup memory with the shipped ConfigMap {:.1} MiB (highest of {} samples, \
         spread {:.1} MiB); with {} /24 blocks (reload took {reload_took:.1?}) {:.1} MiB, peak {:.1} MiB; manifest \
         request {:.0} MiB, limit {:.0} MiB",
        mib(baseline),
        samples.len(),
        mib(spread),
        MAX_LONG_BLOCKS - 1,
        mib(current),
        mib(peak),
        mib(memory_request),
        mib(memory_limit)
    );
    // What the pod needs is what this run measured: the request must cover
    // every sample of the shipped ConfigMap's figure, the limit the reload's
    // peak. The headroom is this run's own: a fixed percentage over a figure
    // that moves from machine to machine would fail on noise alone.
    assert!(
        memory_request >= baseline,
        "the memory request ({:.0} MiB) is below what the pod uses with the shipped ConfigMap ({:.1} MiB, the highest \
         of {:?} MiB)",
        mib(memory_request),
        mib(baseline),
        samples
            .iter()
            .map(|&b| (mib(b) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    assert!(
        memory_limit >= peak,
        "the memory limit ({:.0} MiB) is below the peak of a reload to the table maximum ({:.1} MiB)",
        mib(memory_limit),
        mib(peak)
    );
    drop(container);
}

/// Removes the test's pins on drop (the container is gone by then).
struct PinsOnDrop(PathBuf);

impl Drop for PinsOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
