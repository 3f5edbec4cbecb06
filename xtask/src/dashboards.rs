//! Checks of the Grafana dashboards in `manifests/grafana/` (run by `cargo xtask test` as unit
//! tests): every panel query names only metrics that docs/metrics.md or docs/waypoint.md
//! document, and the panel layout is well formed. A renamed metric breaks the test, not the
//! operator's dashboard.

/// The metric names a PromQL expression refers to (`weft_*`, without the histogram suffixes).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("weft_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let mut name = &expr[start..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base;
            }
        }
        out.push(name.to_string());
        i = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    fn root() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }

    /// Metric names documented in a table row of the docs (`| `name` | ...`).
    fn documented() -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for doc in ["docs/metrics.md", "docs/waypoint.md"] {
            let text = std::fs::read_to_string(root().join(doc)).expect("docs");
            for line in text.lines().filter(|l| l.starts_with("| `weft_")) {
                if let Some(name) = line.split('`').nth(1) {
                    names.insert(name.to_string());
                }
            }
        }
        names
    }

    /// Every `weft_*` metric name the agent, controller and waypoint sources emit
    /// (`counter!("weft_..."`, `histogram!(`, `gauge!(`, and names on their own line).
    fn emitted() -> BTreeSet<String> {
        fn walk(dir: &Path, out: &mut BTreeSet<String>) {
            for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut pending = false;
                    for line in text.lines() {
                        let t = line.trim();
                        let opens = ["counter!(", "histogram!(", "gauge!("]
                            .iter()
                            .any(|m| t.contains(m));
                        let candidate = if opens {
                            t.split("!(").nth(1)
                        } else if pending {
                            Some(t)
                        } else {
                            None
                        };
                        pending = opens && !t.contains("\"weft_");
                        if let Some(rest) = candidate
                            && let Some(name) = rest.trim_start().strip_prefix('"')
                            && name.starts_with("weft_")
                            && let Some(end) = name.find('"')
                        {
                            out.insert(name[..end].to_string());
                        }
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        for dir in ["agent/src", "controller/src", "waypoint/src"] {
            walk(&root().join(dir), &mut out);
        }
        out
    }

    #[test]
    fn every_emitted_metric_is_documented() {
        let emitted = emitted();
        assert!(
            emitted.contains("weft_waypoint_requests_total"),
            "{emitted:?}"
        );
        assert!(
            emitted.contains("weft_tcp_connections_opened_total"),
            "{emitted:?}"
        );
        let documented = documented();
        let missing: Vec<_> = emitted.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "metrics emitted but not in a docs/metrics.md or docs/waypoint.md table: {missing:?}"
        );
    }

    #[test]
    fn names_are_extracted_without_histogram_suffixes() {
        assert_eq!(
            metric_names(
                "sum(rate(weft_a_total[1m])) / histogram_quantile(0.9, weft_b_seconds_bucket)"
            ),
            ["weft_a_total", "weft_b_seconds"]
        );
    }

    #[test]
    fn dashboards_use_only_documented_metrics_and_are_well_formed() {
        let documented = documented();
        assert!(
            documented.contains("weft_waypoint_requests_total"),
            "{documented:?}"
        );
        let dir = root().join("manifests/grafana");
        let mut dashboards = 0;
        for entry in std::fs::read_dir(&dir).expect("manifests/grafana") {
            let path = entry.expect("entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            dashboards += 1;
            let text = std::fs::read_to_string(&path).expect("read");
            let d: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            assert!(
                d["uid"].is_string() && d["title"].is_string(),
                "{}",
                path.display()
            );
            let panels = d["panels"].as_array().expect("panels");
            let mut ids = BTreeSet::new();
            let mut queries = 0;
            for p in panels {
                let title = p["title"].as_str().unwrap_or("?");
                assert!(
                    ids.insert(p["id"].as_u64().expect("id")),
                    "duplicate id: {title}"
                );
                let w = p["gridPos"]["w"].as_u64().expect("gridPos.w");
                let x = p["gridPos"]["x"].as_u64().expect("gridPos.x");
                assert!(x + w <= 24, "panel `{title}` is wider than the grid");
                for t in p["targets"].as_array().into_iter().flatten() {
                    let expr = t["expr"].as_str().expect("expr");
                    queries += 1;
                    for name in metric_names(expr) {
                        assert!(
                            documented.contains(&name),
                            "{}: panel `{title}` queries {name}, which docs/metrics.md and docs/waypoint.md do not document (renamed?)",
                            path.display()
                        );
                    }
                }
            }
            assert!(queries > 0, "{}: no queries", path.display());
        }
        assert!(dashboards > 0, "no dashboards in {}", dir.display());
    }
}
