//! Helpers shared by the tests of the deployment artefacts
//! (`tests/tests/{systemd_unit,prometheus_rules,grafana,kubernetes,debian_package,operations_doc}.rs`):
//! reading files of the repository, running the tools that check them, and
//! a lab config for the agent they run.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Output},
};

use crate::{
    agent::{DetachOnDrop, METRICS, TempDir},
    config::{Guard, TestConfig},
    container::repo,
    lab::Lab,
    net::http_get,
};

/// The repository file at `rel`.
pub fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Runs a command; returns its output (never panics on a non-zero exit).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {program} {args:?}: {e}"))
}

/// stdout, then stderr, of a finished command.
pub fn text(o: &Output) -> String {
    let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
    t.push_str(&String::from_utf8_lossy(&o.stderr));
    t
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\n{}",
        o.status,
        text(&o)
    );
    text(&o)
}

/// GET `path` from the agent's metrics endpoint in the lab's server namespace.
pub fn scrape(lab: &Lab, path: &str) -> Option<String> {
    http_get(&lab.server, METRICS.parse::<SocketAddr>().expect("constant"), path)
}

/// A Lab config with one guard on :25 and :587. Returns it with its detach guard.
pub fn lab_config(lab: &Lab, dir: &TempDir, mode: &str) -> (PathBuf, DetachOnDrop) {
    TestConfig::new(&lab.server_if, &crate::lab::pin_dir("rg-deploy-"))
        .mode(mode)
        .xdp_mode("auto")
        .guard(&Guard::new("relay", &[25, 587]).allow(&["192.0.2.0/24", "2001:db8:a::/48"]))
        .write(dir)
}

/// Whether an XDP program is attached to the lab's server interface.
pub fn xdp_attached(lab: &Lab) -> bool {
    lab.server.ip(&["link", "show", "dev", &lab.server_if]).contains("xdp")
}

/// `&str`s of `v`, for argument lists.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
