//! The metric and label names a PromQL expression refers to, for checking
//! alert rules and dashboard queries against what the agent exports
//! (`crate::exported`). A reader of names, not a PromQL parser: promtool
//! checks that the expressions parse.
use std::collections::BTreeSet;

/// Metric and label names a PromQL expression refers to.
#[derive(Debug, Default)]
pub struct Refs {
    pub metrics: BTreeSet<String>,
    pub labels: BTreeSet<String>,
}

/// Words of PromQL that are not metric names (operators, aggregations,
/// modifiers and the number literals).
const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metrics and labels `expr` names.
pub fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut r = Refs::default();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_string = |mut i: usize| -> usize {
        let q = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != q {
            if chars[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c == '{' {
            // Label matchers: names before =, !=, =~, !~.
            i += 1;
            let mut name = String::new();
            while i < chars.len() && chars[i] != '}' {
                let c = chars[i];
                if c == '"' || c == '\'' || c == '`' {
                    i = skip_string(i);
                    continue;
                }
                if is_part(c) {
                    name.push(c);
                } else if (c == '=' || c == '!') && !name.is_empty() {
                    r.labels.insert(std::mem::take(&mut name));
                } else if c == ',' || c.is_whitespace() {
                    // a name is only kept when an operator follows
                }
                i += 1;
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let paren = chars.get(j) == Some(&'(');
            if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                if paren {
                    let end = (j..chars.len()).find(|&k| chars[k] == ')').unwrap_or(chars.len());
                    let list: String = chars[j + 1..end].iter().collect();
                    r.labels
                        .extend(list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
                    i = end + 1;
                }
            } else if !paren && !PROMQL_KEYWORDS.contains(&word.as_str()) {
                r.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::promql_refs;

    #[test]
    fn promql_refs_finds_metrics_and_labels() {
        // Pure parsing, no privileges: the checker itself must be right.
        let r = promql_refs(
            r#"sum by (guard, port) (rate(relay_guard_packets_total{verdict=~"dropped|x{y}",interface!="a"}[5m] offset 1h)) > 4 * on(instance) group_left(version) relay_guard_build_info unless absent(up{job="relay-guard"})"#,
        );
        assert_eq!(
            r.metrics,
            ["relay_guard_packets_total", "relay_guard_build_info", "up"]
                .map(String::from)
                .into(),
            "{r:?}"
        );
        assert_eq!(
            r.labels,
            ["guard", "port", "verdict", "interface", "instance", "version", "job"]
                .map(String::from)
                .into(),
            "{r:?}"
        );
    }
}
