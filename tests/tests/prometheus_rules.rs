//! `deploy/prometheus/`: `promtool check rules` and `promtool test rules`,
//! every alert has a unit test, and every rule names only metrics and
//! labels the agent exports.
use std::{collections::BTreeSet, process::Command};

use relay_guard_tests::{
    container::repo,
    deploy::{read, text},
    exported::check_refs,
    require,
};

/// (alert name, expr) of a rules file, by reading its YAML lines (the crate
/// has no YAML parser; promtool checks the file for real).
fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        let indent = line.len() - t.len();
        let t = t.strip_prefix("- ").unwrap_or(t);
        if let Some(n) = t.strip_prefix("alert:").or_else(|| t.strip_prefix("record:")) {
            name = n.trim().to_string();
        } else if let Some(rest) = t.strip_prefix("expr:") {
            let rest = rest.trim();
            let expr = if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                block.join("\n")
            } else {
                rest.trim_matches(|c| c == '\'' || c == '"').to_string()
            };
            out.push((name.clone(), expr));
        }
        i += 1;
    }
    out
}

const ALERTS: [&str; 14] = [
    "RelayGuardBansRefused",
    "RelayGuardBanStateRejected",
    "RelayGuardBanTrackersFull",
    "RelayGuardLogSourceDown",
    "RelayGuardOpenRelay",
    "RelayGuardRelayTestFailing",
    "RelayGuardDropsSpiking",
    "RelayGuardConfigReloadFailed",
    "RelayGuardConfigLastReloadUnsuccessful",
    "RelayGuardAgentDown",
    "RelayGuardMalformedPacketsSurging",
    "RelayGuardInterfaceNotAttached",
    "RelayGuardCrowdsecDown",
    "RelayGuardCrowdsecPushFailing",
];

#[test]
fn prometheus_rules_check_and_pass_their_unit_tests() {
    if !require::privileged_with("prometheus_rules_check_and_pass_their_unit_tests", &["promtool"]) {
        return;
    }
    let dir = repo().join("deploy/prometheus");
    let out = Command::new("promtool")
        .current_dir(&dir)
        .args(["check", "rules", "relay-guard.rules.yml"])
        .output()
        .expect("promtool");
    assert!(
        out.status.success() && text(&out).contains("SUCCESS"),
        "promtool check rules:\n{}",
        text(&out)
    );
    let out = Command::new("promtool")
        .current_dir(&dir)
        .args(["test", "rules", "relay-guard.rules.test.yml"])
        .output()
        .expect("promtool");
    assert!(
        out.status.success() && text(&out).contains("SUCCESS"),
        "promtool test rules:\n{}",
        text(&out)
    );

    let rules = read("deploy/prometheus/relay-guard.rules.yml");
    let tests = read("deploy/prometheus/relay-guard.rules.test.yml");
    let exprs = rule_exprs(&rules);
    let names: BTreeSet<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
    for a in ALERTS {
        assert!(names.contains(a), "no alert {a} in relay-guard.rules.yml");
    }
    assert!(
        exprs.iter().any(|(_, e)| e.contains("absent(relay_guard_build_info)")),
        "no alert on absent(relay_guard_build_info)"
    );
    for (name, expr) in &exprs {
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "alert {name} has no unit test in relay-guard.rules.test.yml"
        );
        check_refs(&format!("alert {name}"), expr, &["up"]);
    }
}
