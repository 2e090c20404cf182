//! `deploy/grafana/relay-guard.json`: every query parses (promtool) and
//! names only metrics and labels the agent exports, and the dashboard shows
//! what operators need.
use std::collections::BTreeSet;

use relay_guard_tests::{
    agent::TempDir,
    deploy::{read, run, text},
    exported::check_refs,
    require,
};

/// Replaces Grafana's variables with values PromQL accepts.
fn grafana_substitute(expr: &str) -> String {
    let mut s = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    // `$var` and `${var}` are only used inside regex matchers: any value.
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            let braced = chars.peek() == Some(&'{');
            if braced {
                chars.next();
            }
            while chars.peek().is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_') {
                chars.next();
            }
            if braced {
                chars.next();
            }
            out.push_str(".*");
        } else {
            out.push(c);
        }
    }
    s = out;
    s
}

#[test]
fn grafana_dashboard_queries_parse_and_use_exported_metrics() {
    if !require::privileged_with(
        "grafana_dashboard_queries_parse_and_use_exported_metrics",
        &["promtool"],
    ) {
        return;
    }
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/relay-guard.json")).expect("relay-guard.json is JSON");
    assert_eq!(dash["uid"], "relay-guard");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus" && v["name"] == "datasource"),
        "a `datasource` variable of type prometheus, so the dashboard imports anywhere"
    );

    let mut exprs = Vec::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .expect("variable query");
        // label_values(SELECTOR, LABEL)
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .expect("label_values(...)");
        let (selector, label) = inner.rsplit_once(',').expect("label_values(selector, label)");
        exprs.push((
            format!("variable {}", v["name"]),
            format!("group by ({}) ({selector})", label.trim()),
        ));
    }
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id in {title}"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().expect("x") + g["w"].as_u64().expect("w") <= 24,
            "{title} is wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title} uses the datasource variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            exprs.push((
                format!("panel {title:?}"),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }

    // Every query parses: promtool checks them as recording rules.
    let dir = TempDir::new();
    let mut rules = String::from("groups:\n  - name: grafana\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        let e = serde_json::to_string(&grafana_substitute(e)).expect("string");
        rules += &format!("      - record: grafana:query_{i}\n        expr: {e}\n");
    }
    let file = dir.write("grafana.rules.yml", &rules);
    let out = run("promtool", &["check", "rules", file.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "dashboard queries that are not PromQL:\n{}\n{rules}",
        text(&out)
    );

    // Every query names only what the agent exports.
    let mut used = BTreeSet::new();
    for (what, e) in &exprs {
        used.extend(check_refs(what, &grafana_substitute(e), &[]).metrics);
    }
    // And the dashboard shows what the issue asks for.
    let all = exprs.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    for (want, why) in [
        ("sum by (guard, port)", "drops and passes by guard and port"),
        ("verdict=\"dropped\"", "drops"),
        ("verdict=\"passed\"", "passes"),
        ("verdict=\"would_drop\"", "monitor mode's would_drop"),
        (
            "sum by (instance, interface) (rate(relay_guard_malformed_packets_total",
            "malformed by interface",
        ),
        (
            "sum by (guard, family) (relay_guard_allowlist_prefixes",
            "allowlist sizes",
        ),
        ("relay_guard_config_last_reload_successful", "reload status"),
        ("relay_guard_config_reload_failures_total", "reload failures"),
    ] {
        assert!(all.contains(want), "the dashboard shows no {why} (`{want}`)");
    }
    eprintln!("dashboard: {} queries over {used:?}", exprs.len());
}
