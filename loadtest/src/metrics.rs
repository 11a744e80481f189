//! The server's own gauges, read from `GET /metrics` (Prometheus text): `connections_active` and
//! `subscriptions_total`, which the soak scenario checks against what the load generator holds;
//! and single labelled samples (the `proxy` scenario's `proxy_requests_total`).

use crate::net::Node;

/// The two gauges the soak checks (summed over every shard).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Gauges {
    /// Open WebSocket connections.
    pub(crate) connections_active: i64,
    /// Active subscriptions.
    pub(crate) subscriptions_total: i64,
}

/// The sum of every sample of `name` in a Prometheus text exposition (`name VALUE` and
/// `name{shard="0"} VALUE` alike: the server labels per-shard figures and writes no total
/// beside them); None when there is none. Other metrics sharing the prefix are not it.
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => &labelled[labels_end(labelled)? + 1..],
                None => rest,
            };
            if !rest.starts_with([' ', '\t']) {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .reduce(|a, b| a + b)
}

/// The sum of the samples of `name` whose labels include every pair of `want` (other labels,
/// such as `shard`, are summed over); None when none matches.
pub(crate) fn sample_where(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter_map(|line| {
            let labelled = line.strip_prefix(name)?.strip_prefix('{')?;
            let end = labels_end(labelled)?;
            let labels = &labelled[..end];
            if !want.iter().all(|(k, v)| has_label(labels, k, v)) {
                return None;
            }
            let rest = &labelled[end + 1..];
            if !rest.starts_with([' ', '\t']) {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .reduce(|a, b| a + b)
}

/// Whether the label set `labels` (between the braces) has `k="v"` (a value without quotes or
/// backslashes).
fn has_label(labels: &str, k: &str, v: &str) -> bool {
    let pair = format!("{k}=\"{v}\"");
    labels.match_indices(&pair).any(|(i, _)| {
        let before = i == 0 || labels[..i].ends_with(',');
        let after = labels[i + pair.len()..].trim_start();
        before && (after.is_empty() || after.starts_with(','))
    })
}

/// Where the label set that `labels` starts ends: its `}`, outside quoted values (which may
/// hold `}` and escaped quotes).
fn labels_end(labels: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The soak's gauges from a metrics text.
fn parse_gauges(text: &str) -> Result<Gauges, String> {
    let get = |name: &str| {
        sample(text, name)
            .map(|v| v as i64)
            .ok_or_else(|| format!("/metrics has no `{name}` sample"))
    };
    Ok(Gauges {
        connections_active: get("connections_active")?,
        subscriptions_total: get("subscriptions_total")?,
    })
}

/// Fetches `GET /metrics` from `node` (a fresh connection, closed after the answer).
pub(crate) fn scrape_text(node: &Node) -> Result<String, String> {
    let (status, body) = crate::http::get(node, "/metrics", None)?;
    if status != 200 {
        return Err(format!(
            "GET /metrics on {} answered HTTP {status} (with an admin listener, give it as --rest)",
            node.addr
        ));
    }
    String::from_utf8(body).map_err(|_| "/metrics is not UTF-8".to_string())
}

/// Fetches and parses the gauges.
pub(crate) fn scrape(node: &Node) -> Result<Gauges, String> {
    parse_gauges(&scrape_text(node)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP connections_active Open WebSocket connections.\n\
        # TYPE connections_active gauge\n\
        connections_active{shard=\"0\"} 2\n\
        connections_active{shard=\"1\"} 3\n\
        connections_active_extra 99\n\
        # TYPE subscriptions_total gauge\n\
        subscriptions_total{shard=\"0\"} 7\n\
        subscriptions_total{shard=\"1\",x=\"}\"} 5\n\
        messages_sent_total 1e3\n";

    #[test]
    fn samples_are_summed_over_shards() {
        assert_eq!(sample(TEXT, "connections_active"), Some(5.0));
        assert_eq!(sample(TEXT, "subscriptions_total"), Some(12.0));
        assert_eq!(sample(TEXT, "messages_sent_total"), Some(1000.0));
        assert_eq!(sample(TEXT, "connections"), None, "a prefix is not a name");
        assert_eq!(
            parse_gauges(TEXT),
            Ok(Gauges {
                connections_active: 5,
                subscriptions_total: 12
            })
        );
        assert!(parse_gauges("connections_active 1\n").is_err());
    }

    #[test]
    fn labelled_samples_are_picked_and_summed_over_shards() {
        let text = "proxy_requests_total{shard=\"0\",kind=\"subscribe\",result=\"allow\"} 3\n\
            proxy_requests_total{shard=\"1\",kind=\"subscribe\",result=\"allow\"} 4\n\
            proxy_requests_total{shard=\"0\",kind=\"subscribe\",result=\"deny\"} 9\n\
            proxy_requests_total{shard=\"0\",kind=\"connect\",result=\"allow\"} 5\n\
            proxy_request_seconds_sum{shard=\"0\",kind=\"subscribe\"} 0.5\n\
            proxy_request_seconds_count{shard=\"0\",kind=\"subscribe\"} 10\n";
        let allow = [("kind", "subscribe"), ("result", "allow")];
        assert_eq!(
            sample_where(text, "proxy_requests_total", &allow),
            Some(7.0)
        );
        assert_eq!(
            sample_where(text, "proxy_request_seconds_sum", &[("kind", "subscribe")]),
            Some(0.5)
        );
        assert_eq!(
            sample_where(text, "proxy_request_seconds", &[("kind", "subscribe")]),
            None,
            "a prefix is not a name"
        );
        assert_eq!(
            sample_where(text, "proxy_requests_total", &[("kind", "nope")]),
            None
        );
        assert!(!has_label("xkind=\"a\"", "kind", "a"));
        assert!(!has_label("kind=\"ab\"", "kind", "a"));
        assert!(has_label("shard=\"0\",kind=\"a\"", "kind", "a"));
    }

    #[test]
    fn scrape_reads_an_http_answer() {
        let body = "connections_active 3\nsubscriptions_total 4\n";
        let (node, t) = crate::net::answer_once(body);
        let g = scrape(&node).unwrap();
        let head = t.join().unwrap();
        assert!(head.starts_with("GET /metrics HTTP/1.1\r\n"), "{head}");
        assert_eq!((g.connections_active, g.subscriptions_total), (3, 4));
    }
}
