//! The two text formats a scraper may ask for. `prometheus-client` writes OpenMetrics, where a
//! counter's `# HELP`/`# TYPE` name has no `_total` although its samples do; Prometheus asks
//! for OpenMetrics and reads that correctly, but the classic text format (what `curl`,
//! `promtool check metrics` and older scrapers read) names a counter by its samples' name.

use std::collections::HashSet;

/// Content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body and content type to answer a scrape with: OpenMetrics as encoded when the
/// request's `Accept` names it, else the classic format.
pub fn negotiate(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, openmetrics)
    } else {
        (CLASSIC, to_classic(&openmetrics))
    }
}

/// OpenMetrics text to the classic format: counters' metadata take the `_total` name, and the
/// lines the classic format has no place for (`# UNIT`, `# EOF`) go.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta =
            ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: &str = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{s=\"ok\"} 3\n# HELP b_bytes Bytes.\n# TYPE b_bytes gauge\n# UNIT b_bytes bytes\nb_bytes 7\n# HELP c_seconds Latency.\n# TYPE c_seconds histogram\nc_seconds_sum 1.5\nc_seconds_count 2\nc_seconds_bucket{le=\"+Inf\"} 2\n# EOF\n";

    #[test]
    fn counters_take_their_samples_name_and_openmetrics_only_lines_go() {
        let classic = to_classic(OPEN);
        assert_eq!(
            classic,
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{s=\"ok\"} 3\n# HELP b_bytes Bytes.\n# TYPE b_bytes gauge\nb_bytes 7\n# HELP c_seconds Latency.\n# TYPE c_seconds histogram\nc_seconds_sum 1.5\nc_seconds_count 2\nc_seconds_bucket{le=\"+Inf\"} 2\n"
        );
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(OPEN.into(), Some(prometheus)), (OPENMETRICS, OPEN.to_string()));
        for accept in [None, Some("*/*"), Some("text/plain")] {
            let (kind, body) = negotiate(OPEN.into(), accept);
            assert_eq!(kind, CLASSIC, "{accept:?}");
            assert!(body.contains("# TYPE a_requests_total counter") && !body.contains("# EOF"));
        }
    }
}
