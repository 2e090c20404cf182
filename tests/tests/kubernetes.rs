//! `deploy/kubernetes/`: validated against the Kubernetes schemas
//! (kubernetes-validate, offline), plus the checks a schema cannot make.
use std::{collections::BTreeSet, path::Path};

use relay_guard_tests::{
    agent::{TempDir, cli},
    container::repo,
    deploy::run_ok,
    require,
    systemd_unit::Unit,
    yaml::yaml_documents,
};

#[test]
fn kubernetes_manifests_validate() {
    if !require::privileged_with("kubernetes_manifests_validate", &["kubernetes-validate"]) {
        return;
    }
    let manifest = repo().join("deploy/kubernetes/relay-guard.yaml");
    let m = manifest.to_str().expect("utf-8");
    // Strict (no unknown fields), against the newest schemas it ships and the
    // oldest Kubernetes it covers.
    for version in [None, Some("1.25.0")] {
        let mut args = vec!["--strict"];
        if let Some(v) = version {
            args.extend(["-k", v]);
        }
        args.push(m);
        let out = run_ok("kubernetes-validate", &args);
        assert_eq!(
            out.matches("passed for resource").count(),
            5,
            "kubernetes-validate {args:?}:\n{out}"
        );
        assert!(
            !out.contains("WARN") && !out.contains("ERROR"),
            "kubernetes-validate {args:?}:\n{out}"
        );
    }

    let docs = yaml_documents(&manifest);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().expect("kind")).collect();
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"]
    );
    let get = |kind: &str| docs.iter().find(|d| d["kind"] == kind).expect("kind present");
    let cm = get("ConfigMap");
    let ds = get("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&ds["spec"]["selector"]["matchLabels"], pod_labels);
    assert_eq!(pod["hostNetwork"], true, "XDP attaches to the node's interfaces");
    assert!(
        pod["nodeSelector"].as_object().is_some_and(|o| o.len() > 1),
        "a nodeSelector for mail gateways"
    );
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| !t.is_empty()),
        "tolerations for tainted gateways"
    );
    let c = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "relay-guard")
        .expect("container");
    let sc = &c["securityContext"];
    let unit_caps: BTreeSet<String> = Unit::load()
        .caps()
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    let added: BTreeSet<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("add")
        .iter()
        .map(|v| v.as_str().expect("cap").to_string())
        .collect();
    assert_eq!(added, unit_caps, "the pod gets the systemd unit's capabilities");
    assert!(
        sc["capabilities"]["drop"]
            .as_array()
            .expect("drop")
            .iter()
            .any(|v| v == "ALL")
    );
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    let cmd: Vec<&str> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().expect("arg"))
        .collect();
    let config_path = relay_guard::config::DEFAULT_CONFIG_PATH;
    assert_eq!(
        cmd,
        [
            "/usr/bin/relay-guard",
            "--config",
            config_path,
            "run",
            "--metrics-listen",
            "$(NODE_IP):10947"
        ]
    );
    // $(NODE_IP) is the node's address, from the downward API.
    let node_ip = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NODE_IP")
        .expect("NODE_IP in env");
    assert_eq!(node_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");

    let port = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("metrics port");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|v| v["mountPath"] == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    let volume = |name: &serde_json::Value| volumes.iter().find(|v| &v["name"] == name).expect("volume");
    let bpffs = volume(&mount_of("/sys/fs/bpf")["name"]);
    assert_eq!(bpffs["hostPath"]["path"], "/sys/fs/bpf", "bpffs is the host's");
    let lock = volume(&mount_of("/run/relay-guard")["name"]);
    assert_eq!(
        lock["hostPath"]["path"], "/run/relay-guard",
        "the lock directory is the host's"
    );
    // state_dir survives a pod restart and a node reboot, and a config
    // broken at start reaches the agent (no init container refuses it).
    let state = volume(&mount_of(relay_guard::config::DEFAULT_STATE_DIR)["name"]);
    assert_eq!(
        state["hostPath"]["path"],
        relay_guard::config::DEFAULT_STATE_DIR,
        "state_dir is the host's"
    );
    assert!(
        pod.get("initContainers")
            .and_then(|i| i.as_array())
            .is_none_or(|i| i.iter().all(|c| !c.to_string().contains("check-config"))),
        "an init container that runs check-config keeps the agent from its last good copy"
    );
    let config_dir = Path::new(config_path).parent().expect("dir").to_str().expect("utf-8");
    let cfg_mount = mount_of(config_dir);
    assert!(
        cfg_mount.get("subPath").is_none(),
        "the config is mounted as a directory (subPath defeats the symlink swap)"
    );
    assert_eq!(volume(&cfg_mount["name"])["configMap"]["name"], cm["metadata"]["name"]);
    assert!(mounts.iter().all(|m| m.get("subPath").is_none()));

    // The ConfigMap's config is valid, and agrees with the pod.
    let dir = TempDir::new();
    let data = cm["data"].as_object().expect("data");
    let toml = data["relay-guard.toml"].as_str().expect("relay-guard.toml");
    let base = dir.0.to_str().expect("utf-8");
    for (k, v) in data {
        dir.write(
            k,
            &v.as_str()
                .expect("string")
                .replace(&format!("{config_dir}/"), &format!("{base}/")),
        );
    }
    let (status, out) = cli(&dir.0.join("relay-guard.toml"), &["check-config"]);
    assert!(status.success(), "the ConfigMap's relay-guard.toml is invalid:\n{out}");
    assert_eq!(port["containerPort"], 10947, "the port --metrics-listen names");
    assert!(
        toml.lines().any(|l| l.starts_with("metrics_listen = \"127.0.0.1:")),
        "the ConfigMap's own metrics_listen stays on loopback (the command line gives the node address; 0.0.0.0 would serve every address of the host)"
    );
    assert!(
        toml.contains("pin_dir = \"/sys/fs/bpf/"),
        "pin_dir is on the mounted bpffs"
    );

    let svc = get("Service");
    assert_eq!(&svc["spec"]["selector"], pod_labels);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");

    // The PodMonitor is a CRD (no schema offline): its wiring is checked here.
    let pm = &yaml_documents(&repo().join("deploy/kubernetes/relay-guard-podmonitor.yaml"))[0];
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    assert_eq!(&pm["spec"]["selector"]["matchLabels"], pod_labels);
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
}
