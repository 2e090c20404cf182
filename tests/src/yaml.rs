//! YAML documents as JSON, for the Kubernetes manifests (the crate has no
//! YAML parser: PyYAML from kubernetes-validate's own environment reads them).
use std::path::Path;

use crate::{deploy::run_ok, require};

/// The YAML documents of `path` as JSON, parsed by PyYAML from
/// kubernetes-validate's own Python environment.
pub fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let script =
        std::fs::canonicalize(require::which("kubernetes-validate").expect("kubernetes-validate")).expect("resolve");
    let shebang = std::fs::read_to_string(&script).expect("read kubernetes-validate");
    let python = shebang
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .expect("kubernetes-validate is a script")
        .trim();
    let program =
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
    let out = run_ok(python, &["-c", program, path.to_str().expect("utf-8")]);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("JSON from PyYAML")
}
