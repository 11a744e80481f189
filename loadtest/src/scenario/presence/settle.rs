//! The ends of the run: waiting for presence to come to what it must be (the observers alone after
//! the churn, nobody once they are gone) as the observers track it, as `GET /presence` on every
//! REST node answers it, and as the `presence_members` gauge says; and the `presence` method
//! asked by each observer against what it tracked.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::Setup;
use crate::metrics;
use crate::net::Node;
use crate::presence::observer::Observer;
use crate::presence::rest_presence;

/// How presence came to what it had to be (or did not, within `--settle-timeout`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Settled {
    pub(crate) ok: bool,
    pub(crate) seconds: f64,
    /// What was still off at the last look (empty when `ok`).
    pub(crate) pending: Vec<String>,
    /// `GET /presence` counts at the last look.
    pub(crate) rest_counts: Vec<RestCount>,
    /// The `presence_members` gauge, summed over the REST nodes, at the last look (when asked).
    pub(crate) members_gauge: Option<f64>,
}

/// One `GET /presence` answer.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct RestCount {
    pub(crate) node: String,
    pub(crate) channel: String,
    pub(crate) count: Option<u64>,
}

/// What was off at most this many places is described.
const PENDING_MAX: usize = 8;

/// Waits until exactly the `observers` and the `extra` users are present on every channel, by
/// every observer's tracker and by `GET /presence` on every REST node, and (when `gauge` is given)
/// the `presence_members` gauge reads it.
pub(super) fn wait_members(
    s: &Setup<'_>,
    observers: &[Observer],
    extra: &[String],
    gauge: Option<f64>,
) -> Settled {
    let expected: BTreeSet<String> = observers
        .iter()
        .map(|o| o.user.clone())
        .chain(extra.iter().cloned())
        .collect();
    let t0 = Instant::now();
    loop {
        let mut look = look(s, observers, &expected, gauge);
        if look.pending.is_empty() || t0.elapsed() >= s.settle_timeout {
            look.ok = look.pending.is_empty();
            look.seconds = t0.elapsed().as_secs_f64();
            look.pending.truncate(PENDING_MAX);
            return look;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One look at the trackers, the REST answers and the gauge.
fn look(
    s: &Setup<'_>,
    observers: &[Observer],
    expected: &BTreeSet<String>,
    gauge: Option<f64>,
) -> Settled {
    let mut pending = Vec::new();
    for o in observers {
        if let Some(e) = o.error() {
            pending.push(e);
            continue;
        }
        o.with_tracker(|t| {
            for ch in s.channels.iter() {
                match t.present(ch) {
                    Some((p, _)) if p == expected => {}
                    Some((p, _)) => pending.push(format!(
                        "observer {} on {ch}: {}",
                        o.user,
                        difference(p, expected)
                    )),
                    None => pending.push(format!("observer {} has no snapshot of {ch}", o.user)),
                }
            }
        });
    }
    let mut rest_counts = Vec::new();
    for node in rest_nodes(s) {
        for ch in s.channels.iter() {
            let r = rest_presence(node, &s.env.api_key, ch);
            rest_counts.push(RestCount {
                node: node.host.clone(),
                channel: ch.clone(),
                count: r.as_ref().ok().map(|p| p.count),
            });
            match r {
                Ok(p) => {
                    let users: BTreeSet<String> = p.users.into_iter().collect();
                    if p.count != expected.len() as u64 || &users != expected {
                        pending.push(format!(
                            "GET /presence on {} for {ch}: count {}, {}",
                            node.host,
                            p.count,
                            difference(&users, expected)
                        ));
                    }
                }
                Err(e) => pending.push(e),
            }
        }
    }
    let members_gauge = gauge.and_then(|_| members_gauge(s));
    if let Some(want) = gauge {
        if members_gauge != Some(want) {
            pending.push(format!(
                "the presence_members gauge reads {}, expected {want} (its value before the run)",
                members_gauge.map_or("nothing".into(), |g| g.to_string())
            ));
        }
    }
    Settled {
        pending,
        rest_counts,
        members_gauge,
        ..Settled::default()
    }
}

/// The distinct REST nodes (`--rest` may name one for every node).
pub(super) fn rest_nodes<'s>(s: &'s Setup<'_>) -> Vec<&'s Node> {
    let mut nodes: Vec<&Node> = Vec::new();
    for n in &s.env.rest_nodes {
        if !nodes.iter().any(|m| m.addr == n.addr) {
            nodes.push(n);
        }
    }
    nodes
}

/// `got` against `want`: who is there and should not be, and who is missing.
fn difference(got: &BTreeSet<String>, want: &BTreeSet<String>) -> String {
    let list = |v: Vec<&String>| {
        let n = v.len();
        let mut s: Vec<&str> = v.into_iter().take(5).map(String::as_str).collect();
        if n > 5 {
            s.push("...");
        }
        format!("{n} ({})", s.join(", "))
    };
    format!(
        "extra {}, missing {}",
        list(got.difference(want).collect()),
        list(want.difference(got).collect())
    )
}

/// The `presence_members` gauge summed over the REST nodes; None when a node has none.
pub(super) fn members_gauge(s: &Setup<'_>) -> Option<f64> {
    rest_nodes(s)
        .into_iter()
        .map(|n| {
            let text = metrics::scrape_text(n).ok()?;
            metrics::sample(&text, "presence_members")
        })
        .sum()
}

/// What the `presence` method answered, against the observers' trackers.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct MethodCheck {
    /// Channels asked, all observers together.
    pub(crate) asked: u64,
    /// Answers that disagreed with the tracker, or errors, described.
    pub(crate) mismatches: Vec<String>,
}

/// Each observer asks the `presence` method about every channel.
pub(super) fn ask_presence(observers: &[Observer], s: &Setup<'_>) -> MethodCheck {
    let mut check = MethodCheck::default();
    for o in observers {
        let answers = o.ask_presence(Duration::from_secs(10));
        check.asked += s.channels.len() as u64;
        if answers.len() < s.channels.len() {
            check.mismatches.push(format!(
                "observer {}: {} of {} presence answers",
                o.user,
                answers.len(),
                s.channels.len()
            ));
        }
        for (ch, answer) in answers {
            let why = o.with_tracker(|t| match (answer, t.present(&ch)) {
                (Err(code), _) => Some(format!("presence on {ch} failed: {code}")),
                (Ok(_), None) => Some(format!("no snapshot of {ch} to compare with")),
                (Ok(p), Some((tracked, version))) => {
                    let users: BTreeSet<String> = p.users.into_iter().collect();
                    if &users != tracked || p.count != tracked.len() as u64 {
                        Some(format!(
                            "presence on {ch} answered count {}: {}",
                            p.count,
                            difference(&users, tracked)
                        ))
                    } else if p.version < version {
                        Some(format!(
                            "presence on {ch} answered version {}, below the {version} of the \
                             last event",
                            p.version
                        ))
                    } else {
                        None
                    }
                }
            });
            if let Some(why) = why {
                check.mismatches.push(format!("observer {}: {why}", o.user));
            }
        }
    }
    check
}
