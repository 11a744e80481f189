//! The ends of the run: presence brought to what it must be (the observers alone after the
//! churn, nobody once they are gone; [`crate::presence::settle`]), the `presence_members` gauge
//! back to where it was, and the `presence` method asked by each observer against what it
//! tracked.

use std::collections::BTreeSet;
use std::time::Duration;

use super::Setup;
use crate::metrics;
use crate::presence::observer::Observer;
use crate::presence::settle::{self, difference, distinct, Place, Settled};

/// Waits until exactly the `observers` and the `extra` users are present on every channel (by
/// every observer and by `GET /presence` on every REST node), and, when `gauge` is given, the
/// `presence_members` gauge reads it.
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
    let place = Place {
        channels: &s.channels,
        rest_nodes: &s.env.rest_nodes,
        api_key: &s.env.api_key,
    };
    settle::wait_members(&place, observers, &expected, s.settle_timeout, |look| {
        let Some(want) = gauge else { return };
        look.members_gauge = members_gauge(s);
        if look.members_gauge != Some(want) {
            look.pending.push(format!(
                "the presence_members gauge reads {}, expected {want} (its value before the run)",
                look.members_gauge
                    .map_or("nothing".into(), |g| g.to_string())
            ));
        }
    })
}

/// The `presence_members` gauge summed over the REST nodes; None when a node has none.
pub(super) fn members_gauge(s: &Setup<'_>) -> Option<f64> {
    distinct(&s.env.rest_nodes)
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
