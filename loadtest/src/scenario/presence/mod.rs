//! `presence`: a join/leave storm (SPEC 16). `--users` users, each with a token of its own (`sub`,
//! an `info` claim, the presence scope), connect, subscribe to `--channels` presence channels and
//! close again, `--workers` connections at a time ([`churn`]), for `--duration` or `--count`
//! cycles. Observers ([`crate::presence::observer`]), members themselves, follow every join and
//! leave and hold the server to SPEC 16's promises: never two joins of a user without a leave
//! between, versions strictly increasing, and at the end nobody left but the observers, then
//! nobody at all (`GET /presence`, and the `presence` method against what they tracked). The
//! figures: joins per second, the server's CPU per join (with `--baseline`, against the same
//! churn on channels without presence), and with `--redis-addr` the Redis commands per join, by
//! command. `--keep-one` makes it a reconnect storm: every user holds a second connection, so a
//! cycle must change nobody's presence and cost Redis nothing.

mod churn;
mod figures;
mod settle;

pub use figures::PresenceFigures;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use churn::{Churn, ChurnResult, Keepers, User};

use crate::cli::PresenceArgs;
use crate::harness::{channel_names, churn_source_plan, prepare, window_end, window_start, Env};
use crate::harness::{SetupError, WindowEnd};
use crate::metrics;
use crate::net::SourcePlan;
use crate::presence::observer::{Observer, ObserverSpec};
use crate::presence::settle::Settled;
use crate::presence::tracker::{Counts, PresenceAnomalies};
use crate::redis::{self, CommandCalls, RedisAddr};
use crate::report::Report;
use crate::token::{mint_user, SUBSCRIBE_PRESENCE};

/// What the run was given.
struct Setup<'a> {
    a: &'a PresenceArgs,
    env: Env,
    plan: SourcePlan,
    users: Arc<Vec<User>>,
    /// The presence channels.
    channels: Arc<Vec<String>>,
    observer_specs: Vec<ObserverSpec>,
    redis: Option<RedisAddr>,
    settle_timeout: Duration,
}

/// `/metrics` of every REST node (or why not).
type Scrapes = Vec<Result<String, String>>;

/// The presence phase's measurements.
struct Phase {
    churn: ChurnResult,
    end: WindowEnd,
    /// Per observer, per channel, its counts at the window's start and end.
    counts: Vec<(BTreeMap<String, Counts>, BTreeMap<String, Counts>)>,
    /// `/metrics` of every REST node at the window's start and end.
    metrics: (Scrapes, Scrapes),
    redis: Option<Result<CommandCalls, String>>,
    /// Presence back to the observers alone after the churn.
    settled: Settled,
    /// `--keep-one`: the keepers' presence in place before the window.
    kept: Option<Settled>,
    keeper_errors: Vec<String>,
}

/// `presence`: the join/leave storm (see the module documentation and `presence --help`).
pub fn presence(a: &PresenceArgs) -> Result<Report<PresenceFigures>, SetupError> {
    let s = setup(a)?;
    let members_before = settle::members_gauge(&s);
    let observers = start_observers(&s)?;
    let baseline = match a.baseline {
        true => Some(baseline_phase(&s)?),
        false => None,
    };
    let phase = presence_phase(&s, &observers)?;
    let method = settle::ask_presence(&observers, &s);
    let mut anomalies = PresenceAnomalies::default();
    let mut examples = Vec::new();
    for o in &observers {
        o.with_tracker(|t| {
            anomalies.add(&t.anomalies());
            examples.extend(
                t.examples()
                    .iter()
                    .map(|e| format!("observer {}: {e}", o.user)),
            );
        });
    }
    let observer_errors = observers.into_iter().filter_map(Observer::close).collect();
    let emptied = settle::wait_members(&s, &[], &[], members_before);
    let ends = figures::Ends {
        method,
        anomalies,
        examples,
        observer_errors,
        emptied,
    };
    Ok(figures::conclude(&s, phase, baseline, ends))
}

fn check_args(a: &PresenceArgs) -> Result<(), SetupError> {
    if a.workers == 0 || a.channels == 0 {
        return Err("--workers and --channels must be at least 1".into());
    }
    if a.users < a.workers {
        return Err(format!(
            "--users {} is fewer than --workers {}: a user's cycles must not overlap, so each \
             worker needs users of its own",
            a.users, a.workers
        ));
    }
    if a.count == Some(0) || (a.count.is_none() && a.duration.is_zero()) {
        return Err("--count or --duration must be above 0".into());
    }
    Ok(())
}

/// Checks the options, mints the tokens and plans the connections.
fn setup(a: &PresenceArgs) -> Result<Setup<'_>, SetupError> {
    check_args(a)?;
    let common = &a.common;
    let observers = a.observers.unwrap_or(common.server.len());
    let held = a.workers + observers + if a.keep_one { a.users } else { 0 };
    let env = prepare(common, held + 16, true)?;
    let plan = churn_source_plan(common, &env, held);
    let secret = common.secret.clone().unwrap_or_default();
    let run = &env.prefix;
    let token = |sub: &str, info: serde_json::Value| {
        mint_user(&secret, sub, 24 * 3600, SUBSCRIBE_PRESENCE, Some(&info))
    };
    let users = (0..a.users)
        .map(|i| {
            let name = format!("{run}-u{i}");
            Ok(User {
                token: token(&name, serde_json::json!({ "username": format!("user{i}") }))?,
                name,
                node: i % env.nodes.len(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let channels: Vec<String> = (0..a.channels)
        .map(|i| format!("{}{run}/{i}", a.presence_prefix))
        .collect();
    let observer_specs = (0..observers)
        .map(|j| {
            let user = format!("{run}-obs{j}");
            Ok(ObserverSpec {
                token: token(
                    &user,
                    serde_json::json!({ "username": format!("observer{j}") }),
                )?,
                user,
                node: env.nodes[j % env.nodes.len()].clone(),
                source: plan.for_conn(j),
                channels: channels.clone(),
                seed: j as u64 + 1,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let redis = a.redis_addr.as_deref().map(RedisAddr::parse).transpose()?;
    Ok(Setup {
        a,
        plan,
        users: Arc::new(users),
        channels: Arc::new(channels),
        observer_specs,
        redis,
        settle_timeout: Duration::from_secs_f64(a.settle_timeout.max(1.0)),
        env,
    })
}

/// Starts the observers and waits for their subscribe results.
fn start_observers(s: &Setup<'_>) -> Result<Vec<Observer>, SetupError> {
    let observers = s
        .observer_specs
        .iter()
        .map(|spec| Observer::start(spec.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_secs_f64(s.a.common.setup_timeout.max(1.0));
    for o in &observers {
        o.wait_ready(timeout)?;
    }
    Ok(observers)
}

/// The churn over `channels`.
fn churn_of(s: &Setup<'_>, channels: Arc<Vec<String>>, expect_presence: bool) -> Churn {
    Churn {
        users: s.users.clone(),
        nodes: s.env.nodes.clone(),
        channels,
        workers: s.a.workers,
        count: s.a.count,
        duration: s.a.duration,
        sources: s.plan.clone(),
        expect_presence,
        cpus: s.a.common.cpus.clone(),
    }
}

/// `--baseline`'s measurements.
struct Baseline {
    churn: ChurnResult,
    end: WindowEnd,
    redis: Option<Result<CommandCalls, String>>,
    keeper_errors: Vec<String>,
}

/// `--baseline`: the same churn (with `--keep-one`, the same keepers) on channels no presence
/// rule matches.
fn baseline_phase(s: &Setup<'_>) -> Result<Baseline, SetupError> {
    let plain = channel_names(&s.env.prefix, "plain", s.a.channels);
    let c = churn_of(s, plain, false);
    let keepers = s.a.keep_one.then(|| Keepers::open(&c)).transpose()?;
    let pids = &s.a.common.server_pid;
    let redis0 = redis_reading(s);
    let window = window_start(pids);
    let churn = churn::run(&c, s.a.common.quiet, "baseline")?;
    let end = window_end(&window, pids);
    let redis = redis_delta(s, redis0);
    let keeper_errors = keepers.map(Keepers::close).unwrap_or_default();
    Ok(Baseline {
        churn,
        end,
        redis,
        keeper_errors,
    })
}

/// `INFO commandstats` now, with `--redis-addr`.
fn redis_reading(s: &Setup<'_>) -> Option<Result<CommandCalls, String>> {
    s.redis.as_ref().map(redis::commandstats)
}

/// The commands since `before` was read.
fn redis_delta(
    s: &Setup<'_>,
    before: Option<Result<CommandCalls, String>>,
) -> Option<Result<CommandCalls, String>> {
    let addr = s.redis.as_ref()?;
    Some(before?.and_then(|b| redis::commandstats(addr).map(|a| redis::delta(addr, &b, &a))))
}

/// The presence churn, measured: from the first cycle to the last leave (with `--keep-one`, to
/// the last cycle: the keepers' own leaves come after).
fn presence_phase(s: &Setup<'_>, observers: &[Observer]) -> Result<Phase, SetupError> {
    let c = churn_of(s, s.channels.clone(), true);
    let (keepers, kept) = match s.a.keep_one {
        true => {
            let k = Keepers::open(&c)?;
            let everyone: Vec<String> = s.users.iter().map(|u| u.name.clone()).collect();
            (
                Some(k),
                Some(settle::wait_members(s, observers, &everyone, None)),
            )
        }
        false => (None, None),
    };
    let pids = &s.a.common.server_pid;
    let counts0 = all_counts(observers);
    let metrics0 = scrape_all(s);
    let redis0 = redis_reading(s);
    let window = window_start(pids);
    let churn = churn::run(&c, s.a.common.quiet, "presence")?;
    let measure = || {
        let end = window_end(&window, pids);
        let redis = redis_delta(s, redis0);
        (end, redis, all_counts(observers), scrape_all(s))
    };
    let (measured, keeper_errors, settled) = match keepers {
        Some(k) => {
            let m = measure();
            let errors = k.close();
            (m, errors, settle::wait_members(s, observers, &[], None))
        }
        None => {
            let settled = settle::wait_members(s, observers, &[], None);
            (measure(), Vec::new(), settled)
        }
    };
    let (end, redis, counts1, metrics1) = measured;
    Ok(Phase {
        churn,
        end,
        counts: counts0.into_iter().zip(counts1).collect(),
        metrics: (metrics0, metrics1),
        redis,
        settled,
        kept,
        keeper_errors,
    })
}

fn all_counts(observers: &[Observer]) -> Vec<BTreeMap<String, Counts>> {
    observers
        .iter()
        .map(|o| o.with_tracker(|t| t.counts()))
        .collect()
}

/// `/metrics` of every REST node.
fn scrape_all(s: &Setup<'_>) -> Scrapes {
    s.env.rest_nodes.iter().map(metrics::scrape_text).collect()
}
