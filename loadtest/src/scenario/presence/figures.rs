//! The `presence` scenario's figures (the `presence` object of the JSON summary), its checks and
//! its rows of the table.

use std::collections::BTreeMap;

use super::settle::MethodCheck;
use super::{Baseline, Phase, Setup};
use crate::hist::{self, Percentiles};
use crate::metrics;
use crate::presence::settle::Settled;
use crate::presence::tracker::{Counts, PresenceAnomalies};
use crate::redis::CommandCalls;
use crate::report::{row, with_pid, Report, Row};

/// The `presence` scenario's own figures.
#[derive(Debug, Default, serde::Serialize)]
pub struct PresenceFigures {
    users: u64,
    workers: u64,
    channels: u64,
    observers: u64,
    /// `--keep-one`: a reconnect storm, every user holding a second connection.
    keep_one: bool,
    /// Cycles (connect, auth, subscribe to every channel, close) completed in the window.
    cycles: u64,
    failed_cycles: u64,
    cycles_per_s: f64,
    /// Joins and leaves over the window, as counted by `joins_from`: `observers` (the first
    /// observer's events), `metrics` (`presence_events_total`) or `cycles` (cycles x channels, an
    /// upper bound: nothing counted them).
    joins: u64,
    leaves: u64,
    joins_from: &'static str,
    joins_per_s: f64,
    /// Joins per (cycle, channel): 1 when every cycle was a first connection in.
    joins_per_cycle_channel: f64,
    server_cpu_us_per_join: Option<f64>,
    server_cpu_us_per_cycle: Option<f64>,
    loadgen_cpu_us_per_cycle: f64,
    /// Connect to the last subscribe result, per cycle, ns.
    setup: Percentiles,
    /// Subscribe results without the presence object (the rule lacks `presence = true`?).
    missing_presence: u64,
    /// Per observer, its events over the window, all channels together.
    observed: BTreeMap<String, Counts>,
    /// Every observer counted the same joins and leaves on every channel.
    observers_agree: bool,
    anomalies: PresenceAnomalies,
    anomaly_examples: Vec<String>,
    /// The servers' own counts over the window (`/metrics`, summed over the REST nodes).
    server_joins: Option<f64>,
    server_leaves: Option<f64>,
    server_reaped: Option<f64>,
    /// The `presence_members` gauge before the run (summed over the REST nodes).
    members_gauge_before: Option<f64>,
    /// `--keep-one`: every user present before the window.
    kept: Option<Settled>,
    /// After the churn: only the observers present.
    settled: Settled,
    /// After the observers closed: nobody present, the gauge back.
    emptied: Settled,
    /// The `presence` method against the observers' tracking.
    method: MethodCheck,
    redis: Option<RedisFigures>,
    baseline: Option<BaselineFigures>,
}

/// What the churn cost Redis (`INFO commandstats` before and after the window).
#[derive(Debug, Default, serde::Serialize)]
struct RedisFigures {
    addr: String,
    /// Commands over the window, all kinds (the readings' own INFO left out; the nodes'
    /// heartbeats included).
    commands: u64,
    per_join: Option<f64>,
    per_cycle: f64,
    by_command: CommandCalls,
}

/// `--baseline`: the same churn on channels without presence.
#[derive(Debug, Default, serde::Serialize)]
struct BaselineFigures {
    cycles: u64,
    failed_cycles: u64,
    cycles_per_s: f64,
    server_cpu_us_per_cycle: Option<f64>,
    setup: Percentiles,
    /// Presence CPU per cycle - baseline CPU per cycle, µs (with `--keep-one`: what a reconnect
    /// of a member still present costs more).
    presence_us_per_cycle: Option<f64>,
    /// The same per join (and its leave): divided by the channels (not with `--keep-one`).
    presence_us_per_join: Option<f64>,
    /// Redis commands per baseline cycle.
    redis_per_cycle: Option<f64>,
    /// Redis commands per presence cycle minus per baseline cycle: what presence asks of Redis
    /// per cycle (with `--keep-one`, per reconnect of a member still present).
    presence_redis_per_cycle: Option<f64>,
    /// The same per command (those that differ by 0.005 per cycle or more).
    redis_added: BTreeMap<String, f64>,
}

/// What the end of the run found, after the presence phase.
pub(super) struct Ends {
    /// The `presence` method against the trackers.
    pub(super) method: MethodCheck,
    /// Every observer's anomalies, and the first few described.
    pub(super) anomalies: PresenceAnomalies,
    pub(super) examples: Vec<String>,
    pub(super) observer_errors: Vec<String>,
    /// Nobody present once the observers closed.
    pub(super) emptied: Settled,
}

/// The figures, the checks and the rows.
pub(super) fn conclude(
    s: &Setup<'_>,
    phase: Phase,
    baseline: Option<Baseline>,
    ends: Ends,
) -> Report<PresenceFigures> {
    let (a, common) = (s.a, &s.a.common);
    let observers = s.observer_specs.len();
    let mut report = s.env.report(
        "presence",
        common,
        &s.plan,
        a.workers,
        a.channels,
        a.workers + observers,
    );
    phase.end.record(&mut report);
    report.measured_s = phase.end.elapsed.as_secs_f64();
    report.latency_kind = "connect_to_subscribed";
    report.deliveries_unchecked = true;
    report.latency = hist::percentiles(&phase.churn.setup);
    report.connection_failures = phase.churn.failures;
    report.errors.extend(phase.churn.errors.iter().cloned());
    report.errors.extend(phase.keeper_errors.iter().cloned());
    if let Some(Err(e)) = &phase.redis {
        report.errors.push(e.clone());
    }
    let mut f = figures(s, &phase, &report);
    if let Some(b) = &baseline {
        report.errors.extend(b.keeper_errors.iter().cloned());
        if let Some(Err(e)) = &b.redis {
            report.errors.push(e.clone());
        }
    }
    f.baseline = baseline.map(|b| baseline_figures(&b, &f, a.channels));
    f.anomalies = ends.anomalies;
    f.anomaly_examples = ends.examples;
    f.method = ends.method;
    f.emptied = ends.emptied;
    f.members_gauge_before = f.emptied.members_gauge.filter(|_| f.emptied.ok);
    check(s, &mut report, &f, &ends.observer_errors);
    report.errors.extend(ends.observer_errors);
    report.rows.delivered = delivered_rows(&f);
    report.rows.checks = check_rows(&f);
    report.rows.cost = cost_rows(&f, &report);
    report.histogram = Some(phase.churn.setup);
    report.finish();
    report.set_figures(f);
    report
}

/// The figures of the presence phase.
fn figures(s: &Setup<'_>, phase: &Phase, report: &Report<PresenceFigures>) -> PresenceFigures {
    let a = s.a;
    let c = &phase.churn;
    let secs = phase.end.elapsed.as_secs_f64().max(1e-9);
    let (observed, observers_agree) = observed(s, phase);
    let (server_joins, server_leaves, server_reaped) = server_counts(phase);
    let first = observed.values().next().copied();
    let (joins, leaves, joins_from) = match (first, server_joins, server_leaves) {
        (Some(o), _, _) => (o.joins, o.leaves, "observers"),
        (None, Some(j), Some(l)) => (j as u64, l as u64, "metrics"),
        _ => (
            c.cycles * a.channels as u64,
            c.cycles * a.channels as u64,
            "cycles",
        ),
    };
    let per_join = |v: Option<f64>| v.filter(|_| joins > 0).map(|v| v / joins as f64);
    let server_cpu_us = report.server_cpu_s.map(|s| s * 1e6);
    PresenceFigures {
        users: a.users as u64,
        workers: a.workers as u64,
        channels: a.channels as u64,
        observers: s.observer_specs.len() as u64,
        keep_one: a.keep_one,
        cycles: c.cycles,
        failed_cycles: c.failures,
        cycles_per_s: c.cycles as f64 / secs,
        joins,
        leaves,
        joins_from,
        joins_per_s: joins as f64 / secs,
        joins_per_cycle_channel: joins as f64 / (c.cycles * a.channels as u64).max(1) as f64,
        server_cpu_us_per_join: per_join(server_cpu_us),
        server_cpu_us_per_cycle: server_cpu_us.map(|u| u / c.cycles.max(1) as f64),
        loadgen_cpu_us_per_cycle: report.loadgen_cpu_s * 1e6 / c.cycles.max(1) as f64,
        setup: hist::percentiles(&c.setup),
        missing_presence: c.missing_presence,
        observed,
        observers_agree,
        server_joins,
        server_leaves,
        server_reaped,
        kept: phase.kept.clone(),
        settled: phase.settled.clone(),
        redis: redis_figures(s, phase, joins),
        ..PresenceFigures::default()
    }
}

/// Per observer its window's events (all channels), and whether they all agree channel by
/// channel.
fn observed(s: &Setup<'_>, phase: &Phase) -> (BTreeMap<String, Counts>, bool) {
    let mut per_observer = BTreeMap::new();
    let mut per_channel: Vec<BTreeMap<String, (u64, u64)>> = Vec::new();
    for (spec, (before, after)) in s.observer_specs.iter().zip(&phase.counts) {
        let mut sum = Counts::default();
        let mut channels = BTreeMap::new();
        for (ch, c) in after {
            let d = c.since(&before.get(ch).copied().unwrap_or_default());
            sum.add(&d);
            channels.insert(ch.clone(), (d.joins, d.leaves));
        }
        per_observer.insert(spec.user.clone(), sum);
        per_channel.push(channels);
    }
    let agree = per_channel.windows(2).all(|w| w[0] == w[1]);
    (per_observer, agree)
}

/// `presence_events_total{kind="join"|"leave"}` and `presence_reaped_total` over the window,
/// summed over the REST nodes (None when a node has none).
fn server_counts(phase: &Phase) -> (Option<f64>, Option<f64>, Option<f64>) {
    let (before, after) = &phase.metrics;
    let delta = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| {
                let (b, a) = (b.as_ref().ok()?, a.as_ref().ok()?);
                let get = |t: &str| match labels {
                    [] => metrics::sample(t, name),
                    _ => metrics::sample_where(t, name, labels),
                };
                Some(get(a)? - get(b).unwrap_or(0.0))
            })
            .sum()
    };
    (
        delta("presence_events_total", &[("kind", "join")]),
        delta("presence_events_total", &[("kind", "leave")]),
        delta("presence_reaped_total", &[]),
    )
}

fn redis_figures(s: &Setup<'_>, phase: &Phase, joins: u64) -> Option<RedisFigures> {
    let addr = s.redis.as_ref()?;
    let by_command = phase.redis.as_ref()?.as_ref().ok()?.clone();
    let commands: u64 = by_command.values().sum();
    Some(RedisFigures {
        addr: addr.host_port.clone(),
        commands,
        per_join: (joins > 0).then(|| commands as f64 / joins as f64),
        per_cycle: commands as f64 / phase.churn.cycles.max(1) as f64,
        by_command,
    })
}

fn baseline_figures(b: &Baseline, f: &PresenceFigures, channels: usize) -> BaselineFigures {
    let cycles = b.churn.cycles.max(1) as f64;
    let per_cycle = b.end.server_cpu_ns.map(|ns| ns as f64 / 1e3 / cycles);
    let added = f.server_cpu_us_per_cycle.zip(per_cycle).map(|(p, b)| p - b);
    let redis = b.redis.as_ref().and_then(|r| r.as_ref().ok());
    let redis_per_cycle = redis.map(|r| r.values().sum::<u64>() as f64 / cycles);
    let presence_cycles = f.cycles.max(1) as f64;
    // Per command, what a presence cycle asked of Redis beyond a baseline cycle.
    let redis_added = match (redis, &f.redis) {
        (Some(base), Some(p)) => {
            let names = base.keys().chain(p.by_command.keys());
            names
                .map(|k| {
                    let per = |m: &CommandCalls, n: f64| m.get(k).copied().unwrap_or(0) as f64 / n;
                    (
                        k.clone(),
                        per(&p.by_command, presence_cycles) - per(base, cycles),
                    )
                })
                .filter(|(_, d)| d.abs() >= 0.005)
                .collect()
        }
        _ => BTreeMap::new(),
    };
    BaselineFigures {
        cycles: b.churn.cycles,
        failed_cycles: b.churn.failures,
        cycles_per_s: b.churn.cycles as f64 / b.end.elapsed.as_secs_f64().max(1e-9),
        server_cpu_us_per_cycle: per_cycle,
        setup: hist::percentiles(&b.churn.setup),
        presence_us_per_cycle: added,
        presence_us_per_join: added.filter(|_| !f.keep_one).map(|d| d / channels as f64),
        redis_per_cycle,
        presence_redis_per_cycle: match (&f.redis, redis_per_cycle) {
            (Some(p), Some(b)) => Some(p.per_cycle - b),
            _ => None,
        },
        redis_added,
    }
}

/// The run's checks (besides the failed cycles, which `Report::finish` counts).
fn check(
    s: &Setup<'_>,
    report: &mut Report<PresenceFigures>,
    f: &PresenceFigures,
    observer_errors: &[String],
) {
    let mut fail = |why: String| report.fail(why);
    for e in observer_errors {
        fail(e.clone());
    }
    if f.cycles == 0 {
        fail("no cycle completed".into());
    }
    if f.missing_presence > 0 {
        fail(format!(
            "{} subscribe results had no presence object: is {:?} a rule with presence = true?",
            f.missing_presence,
            format!("{}*", s.a.presence_prefix)
        ));
    }
    let x = &f.anomalies;
    if x.total() > 0 {
        fail(format!(
            "PRESENCE ANOMALIES: {} double joins, {} leaves of absent users, {} version \
             regressions, {} events on other channels (first: {})",
            x.double_joins,
            x.orphan_leaves,
            x.version_regressions,
            x.unexpected_channel,
            f.anomaly_examples.first().map_or("-", String::as_str)
        ));
    }
    if !f.observers_agree {
        fail(format!(
            "the observers counted different events: {:?}",
            f.observed
        ));
    }
    check_counts(s, report, f);
    check_settled(s, report, f);
}

/// The events against the churn: a join and a leave per cycle and channel, or none at all with
/// `--keep-one`; the server's own count agreeing on one node.
fn check_counts(s: &Setup<'_>, report: &mut Report<PresenceFigures>, f: &PresenceFigures) {
    let mut fail = |why: String| report.fail(why);
    if f.joins_from != "observers" {
        return;
    }
    if f.keep_one {
        if f.joins + f.leaves > 0 {
            fail(format!(
                "{} joins and {} leaves during a --keep-one churn: a reconnect of a member \
                 still present was announced",
                f.joins, f.leaves
            ));
        }
        return;
    }
    if f.joins == 0 && f.cycles > 0 {
        fail(format!(
            "no join reached the observers: is {:?} a rule with join_leave = true?",
            format!("{}*", s.a.presence_prefix)
        ));
    }
    if f.joins != f.leaves {
        fail(format!(
            "the observers saw {} joins but {} leaves over the churn",
            f.joins, f.leaves
        ));
    }
    if let (1, Some(j)) = (s.env.nodes.len(), f.server_joins) {
        if j as u64 != f.joins {
            fail(format!(
                "the server counted {j} joins (presence_events_total), the observers {}",
                f.joins
            ));
        }
    }
}

/// Presence came back to the observers after the churn, then to nobody; the method agreed.
fn check_settled(s: &Setup<'_>, report: &mut Report<PresenceFigures>, f: &PresenceFigures) {
    let mut fail = |why: String| report.fail(why);
    let t = s.settle_timeout.as_secs_f64();
    let first = |st: &Settled| st.pending.first().cloned().unwrap_or_default();
    if let Some(k) = f.kept.as_ref().filter(|k| !k.ok) {
        fail(format!(
            "the --keep-one connections were not all present within {t:.0} s: {}",
            first(k)
        ));
    }
    if !f.settled.ok {
        fail(format!(
            "presence did not come back to the {} observers within {t:.0} s of the churn's \
             end: {}",
            f.observers,
            first(&f.settled)
        ));
    }
    if !f.emptied.ok {
        fail(format!(
            "presence did not come back to nobody within {t:.0} s of the observers closing: {}",
            first(&f.emptied)
        ));
    }
    if let Some(m) = f.method.mismatches.first() {
        fail(format!(
            "{} presence method answers disagreed with the observers: {m}",
            f.method.mismatches.len()
        ));
    }
}

fn opt(v: Option<f64>, d: usize) -> String {
    v.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "-".into())
}

fn delivered_rows(f: &PresenceFigures) -> Vec<Row> {
    let mut rows = vec![
        row(
            "cycles",
            format!(
                "{} ({:.0}/s; connect, auth, subscribe to {} channel(s), close), {} failed; {} \
                 at a time over {} users{}",
                f.cycles,
                f.cycles_per_s,
                f.channels,
                f.failed_cycles,
                f.workers,
                f.users,
                if f.keep_one {
                    ", each also holding a connection (--keep-one)"
                } else {
                    ""
                }
            ),
        ),
        row(
            "joins / leaves",
            format!(
                "{} / {} (by the {}), {:.0} joins/s, {:.3} per cycle and channel",
                f.joins, f.leaves, f.joins_from, f.joins_per_s, f.joins_per_cycle_channel
            ),
        ),
        row(
            "server presence_events_total",
            format!(
                "join +{}  leave +{}  (presence_reaped_total +{})",
                opt(f.server_joins, 0),
                opt(f.server_leaves, 0),
                opt(f.server_reaped, 0)
            ),
        ),
    ];
    if let Some(b) = &f.baseline {
        rows.push(row(
            "baseline cycles (no presence)",
            format!(
                "{} ({:.0}/s), {} failed",
                b.cycles, b.cycles_per_s, b.failed_cycles
            ),
        ));
    }
    rows
}

fn check_rows(f: &PresenceFigures) -> Vec<Row> {
    let x = &f.anomalies;
    let mut total = Counts::default();
    for c in f.observed.values() {
        total.add(c);
    }
    let settled = |st: &Settled| match st.ok {
        true => format!("after {:.2} s", st.seconds),
        false => format!("NOT within {:.0} s", st.seconds),
    };
    vec![
        row(
            "observers",
            format!(
                "{}: {} double joins, {} leaves of absent users, {} version regressions; {} \
                 stale events ignored; {}",
                f.observers,
                x.double_joins,
                x.orphan_leaves,
                x.version_regressions,
                total.stale,
                if f.observers_agree {
                    "all agree"
                } else {
                    "DISAGREE"
                }
            ),
        ),
        row(
            "presence back to",
            format!(
                "the observers {}; nobody {} (GET /presence on every node{})",
                settled(&f.settled),
                settled(&f.emptied),
                if f.emptied.members_gauge.is_some() {
                    ", presence_members gauge"
                } else {
                    ""
                }
            ),
        ),
        row(
            "presence method",
            format!(
                "{} answers, {} disagreed with the observers",
                f.method.asked,
                f.method.mismatches.len()
            ),
        ),
    ]
}

fn cost_rows(f: &PresenceFigures, report: &Report<PresenceFigures>) -> Vec<Row> {
    let mut rows = vec![row(
        "CPU per cycle",
        format!(
            "server {}   load generator {:.3} µs",
            with_pid(f.server_cpu_us_per_cycle, "µs"),
            f.loadgen_cpu_us_per_cycle
        ),
    )];
    if !f.keep_one {
        rows.push(row(
            "server CPU per join (and its leave)",
            with_pid(f.server_cpu_us_per_join, "µs"),
        ));
    }
    if let Some(b) = &f.baseline {
        rows.push(row(
            "baseline server CPU per cycle",
            format!(
                "{}; presence adds {} µs per cycle{}",
                with_pid(b.server_cpu_us_per_cycle, "µs"),
                opt(b.presence_us_per_cycle, 3),
                b.presence_us_per_join
                    .map(|j| format!(", {j:.3} µs per join"))
                    .unwrap_or_default()
            ),
        ));
    }
    rows.extend(redis_rows(f, report));
    rows
}

/// The Redis commands over the window, by command; with `--baseline`, what presence added.
fn redis_rows(f: &PresenceFigures, report: &Report<PresenceFigures>) -> Vec<Row> {
    let mut rows = Vec::new();
    if let Some(r) = &f.redis {
        let by: Vec<String> = r
            .by_command
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        rows.push(row(
            "Redis commands",
            format!(
                "{} ({} per join, {:.3} per cycle): {}",
                r.commands,
                opt(r.per_join, 3),
                r.per_cycle,
                if by.is_empty() {
                    "none".into()
                } else {
                    by.join(", ")
                }
            ),
        ));
    } else if let Some(e) = report.errors.iter().find(|e| e.contains("Redis")) {
        rows.push(row("Redis commands", format!("- ({e})")));
    }
    if let Some(b) = f.baseline.as_ref().filter(|b| b.redis_per_cycle.is_some()) {
        let added: Vec<String> = b
            .redis_added
            .iter()
            .map(|(k, v)| format!("{k} {v:+.3}"))
            .collect();
        rows.push(row(
            "Redis commands added by presence",
            format!(
                "{} per cycle (baseline {} per cycle): {}",
                opt(b.presence_redis_per_cycle, 3),
                opt(b.redis_per_cycle, 3),
                if added.is_empty() {
                    "none".into()
                } else {
                    added.join(", ")
                }
            ),
        ));
    }
    rows
}
