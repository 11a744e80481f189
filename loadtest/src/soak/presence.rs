//! The soak's presence churn (SPEC 16): `--presence-users` users, each on two of the churning
//! connections, whose tokens are their own (an `info` claim, the presence scope) and whose
//! channels include the presence channel. Their sessions overlap at random, so the server's
//! first-in / last-out counting is what keeps a user's joins and leaves alternating. An observer
//! follows every join and leave for the whole run; at the end, once every worker closed, presence
//! must come back to the observer alone, and to nobody once it closes too (`GET /presence`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::Setup;
use crate::cli::SoakArgs;
use crate::harness::{Env, SetupError};
use crate::net::SourcePlan;
use crate::presence::observer::{Observer, ObserverSpec};
use crate::presence::settle::{self, Place, Settled};
use crate::presence::tracker::{Counts, PresenceAnomalies};
use crate::report::Row;
use crate::token::{mint_user, SUBSCRIBE_PRESENCE};

/// The churn's plan.
pub(super) struct PresencePlan {
    /// The presence channel's name (and its index among the soak's channels: the last).
    pub(super) channel: String,
    /// One token per user.
    tokens: Vec<Arc<str>>,
    observer: ObserverSpec,
}

impl PresencePlan {
    /// The plan for `a`, whose channels are `channels` before the presence one is added.
    pub(super) fn new(
        a: &SoakArgs,
        env: &Env,
        plan: &SourcePlan,
    ) -> Result<Option<PresencePlan>, SetupError> {
        if a.presence_users == 0 {
            return Ok(None);
        }
        if env.api_key.is_empty() {
            return Err(
                "--presence-users needs --api-key (or BROADCASTER_AUTH_API_KEYS): the \
                        end checks GET /presence"
                    .into(),
            );
        }
        let secret = a.common.secret.clone().unwrap_or_default();
        let token = |sub: &str, name: String| {
            let info = serde_json::json!({ "username": name });
            mint_user(&secret, sub, 24 * 3600, SUBSCRIBE_PRESENCE, Some(&info))
        };
        let run = &env.prefix;
        let tokens = (0..a.presence_users)
            .map(|i| token(&format!("{run}-p{i}"), format!("puser{i}")).map(Arc::from))
            .collect::<Result<Vec<Arc<str>>, String>>()?;
        let channel = format!("{}{run}/soak", a.presence_prefix);
        let user = format!("{run}-pobs");
        let observer = ObserverSpec {
            token: token(&user, "presence observer".into())?,
            user,
            node: env.nodes[0].clone(),
            source: plan.for_conn(a.connections + a.publishers.max(1)),
            channels: vec![channel.clone()],
            seed: 0x0B5E,
        };
        Ok(Some(PresencePlan {
            channel,
            tokens,
            observer,
        }))
    }

    /// Connection `i`'s token, if it is a presence user's: users 0..U take connections 0..2U,
    /// two each.
    pub(super) fn token_of(&self, i: usize) -> Option<Arc<str>> {
        (i < 2 * self.tokens.len()).then(|| self.tokens[i % self.tokens.len()].clone())
    }

    /// Starts the observer and waits for its snapshot.
    pub(super) fn start_observer(&self, timeout: Duration) -> Result<Observer, SetupError> {
        let o = Observer::start(self.observer.clone())?;
        o.wait_ready(timeout)?;
        Ok(o)
    }
}

/// What the presence churn came to (`presence` in the soak's JSON object).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct SoakPresence {
    pub(crate) channel: String,
    pub(crate) users: u64,
    /// Connections of presence users (two per user, at most `--connections`).
    pub(crate) connections: u64,
    /// The observer's events over the whole run.
    pub(crate) observed: Counts,
    pub(crate) anomalies: PresenceAnomalies,
    pub(crate) anomaly_examples: Vec<String>,
    /// After every worker closed: the observer alone present.
    pub(crate) alone: Settled,
    /// After the observer closed too: nobody.
    pub(crate) emptied: Settled,
    pub(crate) observer_error: Option<String>,
}

/// Once every worker closed: presence back to the observer alone, what it saw, then nobody.
pub(super) fn end(s: &Setup<'_>, p: &PresencePlan, observer: Observer) -> SoakPresence {
    let channels = [p.channel.clone()];
    let place = Place {
        channels: &channels,
        rest_nodes: &s.env.rest_nodes,
        api_key: &s.env.api_key,
    };
    let me = BTreeSet::from([observer.user.clone()]);
    let alone = settle::wait_members(
        &place,
        std::slice::from_ref(&observer),
        &me,
        s.settle_timeout,
        |_| {},
    );
    let (observed, anomalies, anomaly_examples) = observer.with_tracker(|t| {
        let observed = t.counts().get(&p.channel).copied().unwrap_or_default();
        (observed, t.anomalies(), t.examples().to_vec())
    });
    let observer_error = observer.close();
    let emptied = settle::wait_members(&place, &[], &BTreeSet::new(), s.settle_timeout, |_| {});
    SoakPresence {
        channel: p.channel.clone(),
        users: p.tokens.len() as u64,
        connections: (2 * p.tokens.len()).min(s.a.connections) as u64,
        observed,
        anomalies,
        anomaly_examples,
        alone,
        emptied,
        observer_error,
    }
}

/// The verdict on the presence churn: why the run fails, if it does.
pub(super) fn failures(p: &SoakPresence, prefix: &str) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(e) = &p.observer_error {
        why.push(e.clone());
    }
    let x = &p.anomalies;
    if x.total() > 0 {
        why.push(format!(
            "PRESENCE ANOMALIES on {}: {} double joins (a user joined twice without a leave \
             between), {} leaves of absent users, {} version regressions (first: {})",
            p.channel,
            x.double_joins,
            x.orphan_leaves,
            x.version_regressions,
            p.anomaly_examples.first().map_or("-", String::as_str)
        ));
    }
    if p.observed.joins == 0 {
        why.push(format!(
            "no join reached the presence observer: is {:?} a rule with presence = true and \
             join_leave = true?",
            format!("{prefix}*")
        ));
    } else if p.observed.joins != p.observed.leaves {
        why.push(format!(
            "the presence observer saw {} joins but {} leaves once every connection closed",
            p.observed.joins, p.observed.leaves
        ));
    }
    let first = |st: &Settled| st.pending.first().cloned().unwrap_or_default();
    if !p.alone.ok {
        why.push(format!(
            "presence did not come back to the observer alone after every connection closed: {}",
            first(&p.alone)
        ));
    }
    if !p.emptied.ok {
        why.push(format!(
            "presence counts did not return to zero once the observer closed: {}",
            first(&p.emptied)
        ));
    }
    why
}

/// The presence churn's row of the table.
pub(super) fn row(p: &SoakPresence) -> Row {
    let settled = |st: &Settled| match st.ok {
        true => format!("after {:.2} s", st.seconds),
        false => format!("NOT within {:.0} s", st.seconds),
    };
    (
        "presence churn".into(),
        format!(
            "{} users on {} connections ({}): {} joins / {} leaves, {} anomalies; back to the \
             observer {}, to nobody {}",
            p.users,
            p.connections,
            p.channel,
            p.observed.joins,
            p.observed.leaves,
            p.anomalies.total(),
            settled(&p.alone),
            settled(&p.emptied)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_names_what_went_wrong() {
        let ok = Settled {
            ok: true,
            ..Settled::default()
        };
        let mut p = SoakPresence {
            channel: "room/x".into(),
            observed: Counts {
                joins: 5,
                leaves: 5,
                ..Counts::default()
            },
            alone: ok.clone(),
            emptied: ok,
            ..SoakPresence::default()
        };
        assert!(failures(&p, "room/").is_empty());
        p.anomalies.double_joins = 1;
        p.observed.leaves = 4;
        p.emptied.ok = false;
        p.emptied.pending = vec!["GET /presence on n for room/x: count 1".into()];
        let why = failures(&p, "room/");
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].contains("1 double joins"));
        assert!(why[1].contains("5 joins but 4 leaves"));
        assert!(why[2].contains("did not return to zero") && why[2].contains("count 1"));
        p.observed = Counts::default();
        assert!(failures(&p, "room/")[1].contains("join_leave = true"));
    }
}
