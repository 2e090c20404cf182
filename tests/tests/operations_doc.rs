//! `docs/operations.md`: every command, metric and file it names exists.
//!
//! The sections, commands and files are checked from the text and the
//! agent's `--help`, with no privileges; the metrics against what a real
//! agent exports, which needs root (without it that part is counted as
//! skipped).
use std::{collections::BTreeSet, path::Path};

use relay_guard_tests::{agent::cli, container::repo, deploy::read, exported::exported, require};

#[test]
fn operations_doc_names_only_what_exists() {
    let doc = read("docs/operations.md");
    let headings: Vec<String> = doc
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(str::to_lowercase)
        .collect();
    for topic in [
        "install",
        "monitor",
        "metrics",
        "enforce",
        "upgrade",
        "troubleshoot",
        "detach",
    ] {
        assert!(
            headings.iter().any(|h| h.contains(topic)),
            "docs/operations.md has no section on {topic}: {headings:?}"
        );
    }

    // Subcommands: whatever follows `relay-guard [--config X]` in code.
    let help = cli(Path::new(relay_guard::config::DEFAULT_CONFIG_PATH), &["--help"]).1;
    let commands: BTreeSet<String> = help
        .split("Commands:")
        .nth(1)
        .expect("--help lists commands")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let mut code = String::new();
    let mut in_block = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            code.push_str(line);
            code.push('\n');
        } else {
            // Inline code counts when it is a command line (quoted error
            // messages mention "relay-guard" too).
            for (i, span) in line.split('`').enumerate() {
                let first = span.split_whitespace().next().unwrap_or("");
                if i % 2 == 1 && (first == "relay-guard" || first.ends_with("/relay-guard")) {
                    code.push_str(span);
                    code.push('\n');
                }
            }
        }
    }
    let mut used = BTreeSet::new();
    for line in code.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if !(*w == "relay-guard" || w.ends_with("/relay-guard"))
                || w.starts_with("/etc")
                || w.starts_with("/sys")
                || w.starts_with("/run")
            {
                continue;
            }
            let mut j = i + 1;
            while j < words.len() && words[j].starts_with('-') {
                j += if matches!(words[j], "--config" | "-c") { 2 } else { 1 };
            }
            if let Some(sub) = words.get(j) {
                let sub = sub.trim_end_matches([';', ',', ')', '.']);
                if sub.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !sub.is_empty() {
                    assert!(
                        commands.contains(sub),
                        "docs/operations.md uses `relay-guard {sub}`, which --help does not list ({commands:?}):\n{line}"
                    );
                    used.insert(sub.to_string());
                }
            }
        }
    }
    for sub in ["run", "check-config", "status", "explain", "top", "detach"] {
        assert!(used.contains(sub), "docs/operations.md never shows `relay-guard {sub}`");
    }

    // Files it names exist.
    for word in doc.split(|c: char| c.is_whitespace() || "`()[],".contains(c)) {
        let word = word.trim_end_matches(['.', ':']);
        if (word.starts_with("deploy/") || word.starts_with("docs/")) && !word.contains('*') {
            assert!(
                repo().join(word).exists(),
                "docs/operations.md names {word}, which does not exist"
            );
        }
    }

    // Metrics it names exist: what a real agent exports (run as root).
    if !require::privileged_with("operations_doc_names_only_what_exists", &[]) {
        return;
    }
    let exp = exported();
    for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        // (`relay_guard_` alone is the prefix, as in a grep.)
        if word.starts_with("relay_guard_") && !word.ends_with('_') {
            assert!(
                exp.labels.contains_key(word),
                "docs/operations.md names `{word}`, which the agent does not export"
            );
        }
    }
}
