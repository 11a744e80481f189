//! Waiting for presence to come to what it must be: exactly the expected users on every channel,
//! as every observer's tracker has it and as `GET /presence` on every REST node answers it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::observer::Observer;
use super::rest_presence;
use crate::net::Node;

/// Where presence is looked at.
pub(crate) struct Place<'a> {
    pub(crate) channels: &'a [String],
    /// The REST nodes, each asked (`--rest` may name one address for every node: asked once).
    pub(crate) rest_nodes: &'a [Node],
    pub(crate) api_key: &'a str,
}

/// How presence came to what it had to be (or did not, in time).
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

/// Waits until exactly `expected` are present on every channel, by every observer's tracker and
/// by `GET /presence` on every REST node, and `extra` (which may add to `pending`) is content.
pub(crate) fn wait_members(
    place: &Place<'_>,
    observers: &[Observer],
    expected: &BTreeSet<String>,
    timeout: Duration,
    mut extra: impl FnMut(&mut Settled),
) -> Settled {
    let t0 = Instant::now();
    loop {
        let mut look = look(place, observers, expected);
        extra(&mut look);
        if look.pending.is_empty() || t0.elapsed() >= timeout {
            look.ok = look.pending.is_empty();
            look.seconds = t0.elapsed().as_secs_f64();
            look.pending.truncate(PENDING_MAX);
            return look;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One look at the trackers and the REST answers.
fn look(place: &Place<'_>, observers: &[Observer], expected: &BTreeSet<String>) -> Settled {
    let mut pending = Vec::new();
    for o in observers {
        if let Some(e) = o.error() {
            pending.push(e);
            continue;
        }
        o.with_tracker(|t| {
            for ch in place.channels {
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
    for node in distinct(place.rest_nodes) {
        for ch in place.channels {
            let r = rest_presence(node, place.api_key, ch);
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
    Settled {
        pending,
        rest_counts,
        ..Settled::default()
    }
}

/// The distinct nodes of `nodes` (by address).
pub(crate) fn distinct(nodes: &[Node]) -> Vec<&Node> {
    let mut out: Vec<&Node> = Vec::new();
    for n in nodes {
        if !out.iter().any(|m| m.addr == n.addr) {
            out.push(n);
        }
    }
    out
}

/// `got` against `want`: who is there and should not be, and who is missing.
pub(crate) fn difference(got: &BTreeSet<String>, want: &BTreeSet<String>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_extra_and_missing_users() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            difference(&set(&["a", "b", "x"]), &set(&["a", "b", "c"])),
            "extra 1 (x), missing 1 (c)"
        );
        let many: Vec<String> = (0..7).map(|i| format!("u{i}")).collect();
        let many: BTreeSet<String> = many.into_iter().collect();
        assert_eq!(
            difference(&many, &BTreeSet::new()),
            "extra 7 (u0, u1, u2, u3, u4, ...), missing 0 ()"
        );
    }

    #[test]
    fn nodes_are_asked_once_each() {
        let n = |port: u16| Node {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            host: format!("h{port}"),
        };
        let nodes = [n(1), n(2), n(1)];
        let d = distinct(&nodes);
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].host, "h2");
    }

    #[test]
    fn nobody_expected_and_nowhere_asked_settles_at_once() {
        let place = Place {
            channels: &[],
            rest_nodes: &[],
            api_key: "",
        };
        let s = wait_members(&place, &[], &BTreeSet::new(), Duration::ZERO, |_| {});
        assert!(s.ok && s.pending.is_empty(), "{s:?}");
        let s = wait_members(&place, &[], &BTreeSet::new(), Duration::ZERO, |s| {
            s.pending.push("gauge".into())
        });
        assert!(!s.ok);
        assert_eq!(s.pending, ["gauge"]);
    }
}
