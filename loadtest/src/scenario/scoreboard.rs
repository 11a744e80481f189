//! `scoreboard`: N viewers of one public channel, an online judge's public scoreboard (issue 16).
//! Anonymous viewers (`subscribe` with no `auth`, SPEC 14) and authenticated ones (`auth` with a
//! minted token, then `subscribe`) in phases one after the other against the same server, each on
//! a channel of its own: publish what the subscribes will rewind, connect the viewers (each gets
//! the rewound publication at once: the connect window), publish at a fixed rate over REST (the
//! delivery window), close them and let the server count them gone. The two kinds side by side.
//!
//! Phases rather than both kinds at once: the server's CPU is one figure per process, so only a
//! window with one kind of viewer in it says what that kind costs. `--rounds 2` alternates the
//! order (anonymous, authenticated, authenticated, anonymous) so that what drifts over a run (the
//! server's memory warming up, other jobs on the machine) weighs on both kinds alike.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::pubsub::{publish_window, Published};
use super::workers::{fill_common, merge, spawn_workers, specs, Merged};
use crate::cli::ScoreboardArgs;
use crate::client::{ClientConfig, Shared};
use crate::harness::{
    channel_names, prepare, source_plan, window_end, window_start, Env, SetupError, WindowEnd,
};
use crate::hist::{self, Percentiles};
use crate::net::SourcePlan;
use crate::publisher::{self, PublishResult, PublisherConfig, Via};
use crate::report::{row, Report, Row};

/// The two kinds of viewers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `subscribe` alone.
    Anonymous,
    /// `auth`, then `subscribe` (in one write).
    Authenticated,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Anonymous => "anonymous",
            Kind::Authenticated => "authenticated",
        }
    }
}

/// The phases of `rounds` rounds, in order: odd rounds anonymous first, even ones authenticated
/// first.
fn order(rounds: usize) -> Vec<(usize, Kind)> {
    (1..=rounds.max(1))
        .flat_map(|r| {
            let kinds = if r % 2 == 1 {
                [Kind::Anonymous, Kind::Authenticated]
            } else {
                [Kind::Authenticated, Kind::Anonymous]
            };
            kinds.map(|k| (r, k))
        })
        .collect()
}

/// The scoreboard's own figures: `scoreboard` in the JSON summary.
#[derive(Debug, Default, serde::Serialize)]
pub struct ScoreboardFigures {
    /// Viewers per phase.
    viewers: u64,
    /// Publications per second while publishing.
    rate: f64,
    /// Publications each subscribe had to rewind.
    rewind_default: u64,
    /// Each phase, in the order they ran.
    phases: Vec<PhaseFigures>,
    /// The anonymous phases together.
    anonymous: Costs,
    /// The authenticated phases together.
    authenticated: Costs,
    /// Anonymous over authenticated.
    ratio: Ratios,
}

/// One phase.
#[derive(Debug, Default, serde::Serialize)]
struct PhaseFigures {
    kind: &'static str,
    round: u64,
    channel: String,
    #[serde(flatten)]
    costs: Costs,
    /// Broadcast frames per server socket write while publishing.
    frames_per_write: Option<f64>,
    publish: PublishResult,
    passed: bool,
}

/// What one kind of viewer cost, over its phases.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Costs {
    /// Viewers that subscribed.
    connections: u64,
    /// Seconds from the first connect to the last rewound publication received.
    connect_s: f64,
    /// Viewers set up per second (connect, upgrade, auth if any, subscribe, the rewind).
    connections_per_s: f64,
    /// Server CPU per viewer over the connect window, µs.
    server_cpu_us_per_connect: Option<f64>,
    /// Load generator CPU per viewer over the connect window, µs.
    loadgen_cpu_us_per_connect: f64,
    /// `rewound` of the subscribe results, summed.
    rewound: u64,
    /// Rewound publications received.
    replayed: u64,
    /// Live broadcasts received.
    deliveries: u64,
    /// Live broadcasts that should have been received.
    expected_deliveries: u64,
    /// Seconds from the first publication to the last delivery.
    publish_s: f64,
    /// Server CPU per live delivery over the publishing window, µs.
    server_cpu_us_per_delivery: Option<f64>,
    /// Load generator CPU per live delivery, µs.
    loadgen_cpu_us_per_delivery: f64,
    /// End-to-end latency of the live broadcasts (scheduled send to receipt), ns.
    latency: Percentiles,
}

/// Anonymous over authenticated.
#[derive(Debug, Default, serde::Serialize)]
struct Ratios {
    server_cpu_per_connect: Option<f64>,
    server_cpu_per_delivery: Option<f64>,
    latency_p50: Option<f64>,
    latency_p99: Option<f64>,
}

/// The raw sums behind [`Costs`], which add up over phases.
#[derive(Default)]
struct Tally {
    /// Phases added up.
    phases: u64,
    connections: u64,
    connect_s: f64,
    connect_server_ns: Option<u64>,
    connect_loadgen_s: f64,
    rewound: u64,
    replayed: u64,
    deliveries: u64,
    expected: u64,
    publish_s: f64,
    publish_server_ns: Option<u64>,
    publish_loadgen_s: f64,
    hist: Option<Histogram<u64>>,
}

impl Tally {
    /// The connect window's figures.
    fn connect(&mut self, end: &WindowEnd) {
        self.connect_s = end.elapsed.as_secs_f64();
        self.connect_server_ns = end.server_cpu_ns;
        self.connect_loadgen_s = end.self_cpu.as_secs_f64();
    }

    /// The publishing window's figures.
    fn publish(&mut self, end: &WindowEnd) {
        self.publish_s = end.elapsed.as_secs_f64();
        self.publish_server_ns = end.server_cpu_ns;
        self.publish_loadgen_s = end.self_cpu.as_secs_f64();
    }

    /// Adds `o`'s sums to these (the server's CPU only while every phase has it).
    fn add(&mut self, o: &Tally) {
        let first = self.phases == 0;
        self.phases += o.phases.max(1);
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            _ if first => b,
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.connections += o.connections;
        self.connect_s += o.connect_s;
        self.connect_server_ns = sum(self.connect_server_ns, o.connect_server_ns);
        self.connect_loadgen_s += o.connect_loadgen_s;
        self.rewound += o.rewound;
        self.replayed += o.replayed;
        self.deliveries += o.deliveries;
        self.expected += o.expected;
        self.publish_s += o.publish_s;
        self.publish_server_ns = sum(self.publish_server_ns, o.publish_server_ns);
        self.publish_loadgen_s += o.publish_loadgen_s;
        match (&mut self.hist, &o.hist) {
            (Some(h), Some(oh)) => {
                let _ = h.add(oh);
            }
            (h @ None, Some(oh)) => *h = Some(oh.clone()),
            _ => {}
        }
    }

    fn costs(&self) -> Costs {
        let per = |ns: Option<u64>, n: u64| ns.map(|ns| ns as f64 / 1e3 / n.max(1) as f64);
        Costs {
            connections: self.connections,
            connect_s: self.connect_s,
            connections_per_s: self.connections as f64 / self.connect_s.max(1e-9),
            server_cpu_us_per_connect: per(self.connect_server_ns, self.connections),
            loadgen_cpu_us_per_connect: self.connect_loadgen_s * 1e6
                / self.connections.max(1) as f64,
            rewound: self.rewound,
            replayed: self.replayed,
            deliveries: self.deliveries,
            expected_deliveries: self.expected,
            publish_s: self.publish_s,
            server_cpu_us_per_delivery: per(self.publish_server_ns, self.deliveries),
            loadgen_cpu_us_per_delivery: self.publish_loadgen_s * 1e6
                / self.deliveries.max(1) as f64,
            latency: self
                .hist
                .as_ref()
                .map(hist::percentiles)
                .unwrap_or_default(),
        }
    }
}

/// What every phase of the run shares.
struct Setup<'a> {
    a: &'a ScoreboardArgs,
    env: Env,
    plan: SourcePlan,
}

/// One phase's outcome: its own report (checks, errors, latency), and its sums.
struct Phase {
    round: usize,
    kind: Kind,
    channel: String,
    report: Report,
    tally: Tally,
    publish: PublishResult,
}

/// `scoreboard`: anonymous and authenticated viewers of one public channel, side by side.
pub fn scoreboard(a: &ScoreboardArgs) -> Result<Report<ScoreboardFigures>, SetupError> {
    let common = &a.common;
    if a.viewers == 0 {
        return Err("--viewers must be at least 1".into());
    }
    if a.rate <= 0.0 || !a.rate.is_finite() {
        return Err("--rate must be above 0 (publications per second)".into());
    }
    let env = prepare(common, a.viewers + 1, true)?;
    let plan = source_plan(common, &env, a.viewers + 1);
    let s = Setup { a, env, plan };
    let whole = window_start(&common.server_pid);
    let mut phases = Vec::new();
    for (round, kind) in order(a.rounds) {
        if !common.quiet {
            eprintln!("== round {round}: {} {} viewers ==", a.viewers, kind.name());
        }
        phases.push(phase(&s, round, kind)?);
    }
    let end = window_end(&whole, &common.server_pid);
    Ok(conclude(&s, phases, &end))
}

/// One phase: rewind publications, viewers, publishing, checks, then the viewers closed.
fn phase(s: &Setup<'_>, round: usize, kind: Kind) -> Result<Phase, SetupError> {
    let (a, env) = (s.a, &s.env);
    let prefix = format!("{}{}", a.public_prefix, env.prefix);
    let channels = channel_names(&prefix, &format!("{}-{round}", kind.name()), 1);
    let baseline = open_connections(env);
    publish_rewound(s, &channels)?;
    let viewing = view(s, kind, &channels)?;
    let (mut report, tally, publish) = judge(s, viewing);
    if let Some(note) = settle(env, baseline, a.settle_timeout) {
        report.errors.push(note);
    }
    Ok(Phase {
        round,
        kind,
        channel: channels[0].clone(),
        report,
        tally,
        publish,
    })
}

/// What a phase's viewers saw, before any check.
struct Viewing {
    /// Whether every viewer subscribed.
    setup: Result<Duration, String>,
    connect: WindowEnd,
    /// The publishing window; None when the viewers could not all subscribe.
    published: Option<Published>,
    shared: Arc<Shared>,
    merged: Merged,
}

/// A phase's two windows: the viewers connect, then the publications they must all receive.
fn view(s: &Setup<'_>, kind: Kind, channels: &Arc<Vec<String>>) -> Result<Viewing, SetupError> {
    let (common, env) = (&s.a.common, &s.env);
    let n = s.a.viewers;
    let what = match kind {
        Kind::Anonymous => "connect and subscribe (anonymous)",
        Kind::Authenticated => "connect, auth and subscribe",
    };
    let cfg = client_config(s, kind, channels);
    // The connect window: from the first connect to the last rewound publication received.
    let window = window_start(&common.server_pid);
    let workers = spawn_workers(env, common, cfg, specs(&s.plan, n, 1, env.nodes.len()));
    let setup = workers.wait_subscribed(common, what);
    if setup.is_ok() {
        wait_replayed(&workers.shared, common.drain_timeout);
    }
    let connect = window_end(&window, &common.server_pid);
    // The publishing window, unless the viewers could not all subscribe.
    let published = match &setup {
        Ok(_) => Some(publish_window(
            common,
            publisher_config(s, channels, PublishPace::Rate),
            &workers,
            n,
            false,
        )?),
        Err(_) => None,
    };
    let (shared, results) = workers.join();
    let last_offsets = published
        .as_ref()
        .map(|p| p.pres.last_offsets.clone())
        .unwrap_or_else(|| vec![0]);
    let merged = merge(results, &last_offsets);
    Ok(Viewing {
        setup,
        connect,
        published,
        shared,
        merged,
    })
}

fn client_config(s: &Setup<'_>, kind: Kind, channels: &Arc<Vec<String>>) -> ClientConfig {
    ClientConfig {
        nodes: s.env.nodes.clone(),
        token: s.env.token.clone(),
        anonymous: kind == Kind::Anonymous,
        channels: channels.clone(),
        concurrency: s.a.common.concurrency.max(1),
        reconnect_every: None,
        record_setup_latency: false,
        coalesce: Duration::from_micros(s.a.common.coalesce_us),
        compress: s.a.common.compress,
        sse: s.a.common.sse,
        peer: s.a.common.peer,
    }
}

/// A phase's report, checked and finished, and its sums.
fn judge(s: &Setup<'_>, v: Viewing) -> (Report, Tally, PublishResult) {
    let (common, n) = (&s.a.common, s.a.viewers);
    let Viewing {
        setup,
        connect,
        published,
        shared,
        merged,
    } = v;
    let mut tally = Tally::default();
    tally.connect(&connect);
    let mut report: Report = s.env.report("scoreboard", common, &s.plan, n, 1, n);
    let end = published.as_ref().map(|p| &p.end).unwrap_or(&connect);
    fill_common(&mut report, &shared, merged, end);
    if let Err(e) = setup {
        report.fail(format!("{e}{}", setup_hint(&report.errors)));
    }
    tally.connections = shared.subscribed.load(Ordering::Relaxed);
    check_rewind(&mut report, &mut tally, &shared, s.a.rewind_default);
    let mut publish = PublishResult::default();
    if let Some(p) = published {
        tally.publish(&p.end);
        tally.expected = p.expected;
        report.expected_deliveries = p.expected;
        report.frames_per_write = p.frames_per_write;
        if p.pres.errors > 0 {
            report.fail(format!("{} publications failed", p.pres.errors));
        }
        publish = p.pres;
    }
    tally.deliveries = report.deliveries;
    tally.hist = report.histogram.clone();
    report.finish();
    (report, tally, publish)
}

/// How a publisher of the run publishes.
enum PublishPace {
    /// The publications the subscribes will rewind, as fast as the answers come.
    Rewound,
    /// `--rate` for `--duration`.
    Rate,
}

fn publisher_config(s: &Setup<'_>, channels: &[String], pace: PublishPace) -> PublisherConfig {
    let (rate, count, duration, per) = match pace {
        // Max-rate mode, with a window that never closes: nobody is subscribed yet.
        PublishPace::Rewound => (0.0, Some(s.a.rewind_default), None, 1),
        PublishPace::Rate => (
            s.a.rate,
            None,
            Some(Duration::from_secs_f64(s.a.duration.max(0.0))),
            s.a.viewers as u64,
        ),
    };
    PublisherConfig {
        rest_nodes: s.env.rest_nodes.clone(),
        ws_nodes: s.env.nodes.to_vec(),
        publish_all: false,
        via: Via::Rest,
        api_key: s.env.api_key.clone(),
        token: s.env.token.clone(),
        channels: std::sync::Arc::new(channels.to_vec()),
        rate,
        count,
        duration,
        window: u64::MAX / 4,
        pipeline: 1,
        deliveries_per_publication: per,
        payload_bytes: s.a.common.payload_bytes,
        payload_shape: s.a.common.payload_shape,
        source: s.plan.for_conn(s.a.viewers),
        peer: s.a.common.peer,
    }
}

/// Publishes the publications the viewers' subscribes will rewind, before any viewer comes.
fn publish_rewound(s: &Setup<'_>, channels: &[String]) -> Result<(), SetupError> {
    let k = s.a.rewind_default;
    if k == 0 {
        return Ok(());
    }
    let shared = Shared::default();
    let pres = publisher::run(
        &publisher_config(s, channels, PublishPace::Rewound),
        &shared,
    );
    if pres.errors > 0 || pres.published != k {
        let errs = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
        return Err(format!(
            "publishing the {k} publication(s) to rewind on {} failed ({} of {k} accepted): {}",
            channels[0],
            pres.published,
            errs.join("; ")
        ));
    }
    Ok(())
}

/// Waits up to `timeout` seconds for every rewound publication the subscribe results announced.
fn wait_replayed(shared: &Shared, timeout: f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    while shared.replayed.load(Ordering::Relaxed) < shared.rewound.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Every subscribe must have said `rewound: k` and every rewound publication must have come
/// (that each came first, seq 1.., with the offsets before the live ones, the seq and offset
/// checks see).
fn check_rewind(report: &mut Report, tally: &mut Tally, shared: &Shared, k: u64) {
    tally.rewound = shared.rewound.load(Ordering::Relaxed);
    tally.replayed = shared.replayed.load(Ordering::Relaxed);
    let want = tally.connections * k;
    if tally.rewound != want {
        report.fail(format!(
            "the subscribe results said {} publications rewound in all, expected {want} ({k} for \
             each of {} viewers): does the server's rule for the channel say rewind_default = {k}?",
            tally.rewound, tally.connections
        ));
    }
    if tally.replayed != tally.rewound {
        report.fail(format!(
            "{} rewound publications received, {} announced",
            tally.replayed, tally.rewound
        ));
    }
}

/// Why viewers could not set up, when the errors say.
fn setup_hint(errors: &[String]) -> &'static str {
    if errors.iter().any(|e| e.contains(" 503")) {
        " (503 at the handshake: every connection counts against the server's anonymous caps \
         until its auth; start it with BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000)"
    } else {
        ""
    }
}

/// The servers' open WebSocket connections (`/metrics`), None when a scrape fails.
fn open_connections(env: &Env) -> Option<i64> {
    env.rest_nodes
        .iter()
        .map(|n| crate::metrics::scrape(n).ok().map(|g| g.connections_active))
        .sum()
}

/// After a phase, waits up to `timeout` seconds for the servers to count its viewers gone, so
/// the next phase's windows see none of their closing; a note when they do not (or, without
/// `/metrics`, a second's pause).
fn settle(env: &Env, baseline: Option<i64>, timeout: f64) -> Option<String> {
    let Some(base) = baseline else {
        std::thread::sleep(Duration::from_secs(1));
        return None;
    };
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    loop {
        let open = open_connections(env);
        if open.is_some_and(|o| o <= base) {
            return None;
        }
        if Instant::now() >= deadline {
            return Some(format!(
                "the server still counted {} connections open {timeout} s after the phase, {base} \
                 before it",
                open.map_or("?".into(), |o| o.to_string())
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The run's report: the phases' checks, and the two kinds side by side.
fn conclude(s: &Setup<'_>, phases: Vec<Phase>, whole: &WindowEnd) -> Report<ScoreboardFigures> {
    let (a, common) = (s.a, &s.a.common);
    let n = a.viewers;
    let mut report: Report<ScoreboardFigures> =
        s.env.report("scoreboard", common, &s.plan, n, 1, n);
    report.rate = a.rate;
    report.via = Some(Via::Rest);
    report.latency_kind = "end_to_end";
    let all = add_phases(&mut report, &phases);
    // CPU, RSS: over the whole run (every phase, and the pauses between them).
    whole.record(&mut report);
    report.measured_s = whole.elapsed.as_secs_f64();
    report.server_rss_before_bytes = whole.server_before.map(|s| s.rss_bytes);
    report.server_rss_after_bytes = whole.server_after.map(|s| s.rss_bytes);
    let figures = figures(a, &phases);
    report.rows.delivered = vec![
        row(
            "deliveries",
            format!(
                "{} of {} expected (live), {} rewound",
                report.deliveries, report.expected_deliveries, all.replayed
            ),
        ),
        row("phases", phase_order(&phases)),
    ];
    report.rows.checks = phase_rows(&phases, a.rewind_default);
    report.rows.cost = side_by_side(&figures);
    report.set_figures(figures);
    // Every phase judged its own counts (Report::finish): their failures, named, are the run's.
    report.passed = report.failures.is_empty();
    report
}

/// The phases' counts, latency and publisher figures added up into the run's report; the sums.
fn add_phases(report: &mut Report<ScoreboardFigures>, phases: &[Phase]) -> Tally {
    let mut all = Tally::default();
    let mut publish = PublishResult::default();
    let mut frames = (0u64, 0.0);
    for p in phases {
        let r = &p.report;
        all.add(&p.tally);
        add_phase_report(report, p);
        if let Some(b) = r.frame_bytes_mean {
            frames = (frames.0 + r.deliveries, frames.1 + b * r.deliveries as f64);
        }
        merge_publish(&mut publish, &p.publish);
    }
    report.deliveries = all.deliveries;
    report.expected_deliveries = all.expected;
    report.deliveries_per_s = all.deliveries as f64 / all.publish_s.max(1e-9);
    report.frame_bytes_mean = (frames.0 > 0).then(|| frames.1 / frames.0 as f64);
    let h = all.hist.take().unwrap_or_else(hist::new_histogram);
    report.latency = hist::percentiles(&h);
    report.histogram = Some(h);
    report.publish = Some(publish);
    all
}

/// A phase's checks into the run's report, its errors and failures named by the phase.
fn add_phase_report(report: &mut Report<ScoreboardFigures>, p: &Phase) {
    let r = &p.report;
    let at = format!("{} viewers, round {}", p.kind.name(), p.round);
    report.seq.add(&r.seq);
    report.offsets.add(&r.offsets);
    report.seq_offset_mismatch += r.seq_offset_mismatch;
    report.untimed += r.untimed;
    report.connection_failures += r.connection_failures;
    for e in &r.errors {
        if report.errors.len() < 20 {
            report.errors.push(format!("{at}: {e}"));
        }
    }
    report
        .failures
        .extend(r.failures.iter().map(|f| format!("{at}: {f}")));
}

/// Each phase's costs, each kind's over its phases, and the ratio of the two kinds.
fn figures(a: &ScoreboardArgs, phases: &[Phase]) -> ScoreboardFigures {
    let (mut anon, mut auth) = (Tally::default(), Tally::default());
    let mut figures = ScoreboardFigures {
        viewers: a.viewers as u64,
        rate: a.rate,
        rewind_default: a.rewind_default,
        ..Default::default()
    };
    for p in phases {
        match p.kind {
            Kind::Anonymous => anon.add(&p.tally),
            Kind::Authenticated => auth.add(&p.tally),
        }
        figures.phases.push(PhaseFigures {
            kind: p.kind.name(),
            round: p.round as u64,
            channel: p.channel.clone(),
            costs: p.tally.costs(),
            frames_per_write: p.report.frames_per_write,
            publish: p.publish.clone(),
            passed: p.report.passed,
        });
    }
    figures.anonymous = anon.costs();
    figures.authenticated = auth.costs();
    figures.ratio = ratios(&figures.anonymous, &figures.authenticated);
    figures
}

/// Adds a phase's publisher figures to the run's.
fn merge_publish(to: &mut PublishResult, p: &PublishResult) {
    to.published += p.published;
    to.errors += p.errors;
    to.elapsed_s += p.elapsed_s;
    to.max_behind_ms = to.max_behind_ms.max(p.max_behind_ms);
    // The run's "p50" is the largest of the phases' p50s.
    to.rtt_p50_us = to.rtt_p50_us.max(p.rtt_p50_us);
    to.rtt_max_us = to.rtt_max_us.max(p.rtt_max_us);
}

fn phase_order(phases: &[Phase]) -> String {
    phases
        .iter()
        .map(|p| format!("{} (round {})", p.kind.name(), p.round))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One row per phase: its checks and its figures.
fn phase_rows(phases: &[Phase], k: u64) -> Vec<Row> {
    phases
        .iter()
        .map(|p| {
            let c = p.tally.costs();
            row(
                &format!("{} (round {})", p.kind.name(), p.round),
                format!(
                    "{}; rewound {} / replayed {} of {} ({k} each); {} of {} delivered; connect {} µs, delivery {} µs, p50 {} / p99 {} ms",
                    if p.report.passed { "ok" } else { "FAILED" },
                    c.rewound,
                    c.replayed,
                    c.connections * k,
                    c.deliveries,
                    c.expected_deliveries,
                    us(c.server_cpu_us_per_connect),
                    us(c.server_cpu_us_per_delivery),
                    hist::ms(c.latency.p50_ns),
                    hist::ms(c.latency.p99_ns),
                ),
            )
        })
        .collect()
}

fn ratios(an: &Costs, au: &Costs) -> Ratios {
    let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ns = |v: u64| (v > 0).then_some(v as f64);
    Ratios {
        server_cpu_per_connect: r(an.server_cpu_us_per_connect, au.server_cpu_us_per_connect),
        server_cpu_per_delivery: r(an.server_cpu_us_per_delivery, au.server_cpu_us_per_delivery),
        latency_p50: r(ns(an.latency.p50_ns), ns(au.latency.p50_ns)),
        latency_p99: r(ns(an.latency.p99_ns), ns(au.latency.p99_ns)),
    }
}

/// A server figure in µs, or `-` without `--server-pid`.
fn us(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn times(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}x"))
}

/// The two kinds side by side, and their ratio.
fn side_by_side(f: &ScoreboardFigures) -> Vec<Row> {
    let (an, au, r) = (&f.anonymous, &f.authenticated, &f.ratio);
    let line = |a: String, b: String, ratio: String| format!("{a:<18} {b:<18} {ratio}");
    let ms = |p: &Percentiles| format!("{} / {}", hist::ms(p.p50_ns), hist::ms(p.p99_ns));
    vec![
        row(
            "viewers (per kind)",
            line(
                "anonymous".into(),
                "authenticated".into(),
                "anon / auth".into(),
            ),
        ),
        row(
            "server CPU µs per connect",
            line(
                us(an.server_cpu_us_per_connect),
                us(au.server_cpu_us_per_connect),
                times(r.server_cpu_per_connect),
            ),
        ),
        row(
            "server CPU µs per delivery",
            line(
                us(an.server_cpu_us_per_delivery),
                us(au.server_cpu_us_per_delivery),
                times(r.server_cpu_per_delivery),
            ),
        ),
        row(
            "latency ms p50 / p99",
            line(
                ms(&an.latency),
                ms(&au.latency),
                format!("{} / {}", times(r.latency_p50), times(r.latency_p99)),
            ),
        ),
        row(
            "connections/s",
            line(
                format!("{:.0}", an.connections_per_s),
                format!("{:.0}", au.connections_per_s),
                String::new(),
            ),
        ),
        row(
            "load generator CPU µs per connect",
            line(
                format!("{:.3}", an.loadgen_cpu_us_per_connect),
                format!("{:.3}", au.loadgen_cpu_us_per_connect),
                String::new(),
            ),
        ),
        row(
            "load generator CPU µs per delivery",
            line(
                format!("{:.3}", an.loadgen_cpu_us_per_delivery),
                format!("{:.3}", au.loadgen_cpu_us_per_delivery),
                String::new(),
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_which_kind_goes_first() {
        let names = |r| {
            order(r)
                .into_iter()
                .map(|(round, k)| format!("{round}{}", &k.name()[..2]))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(0), ["1an", "1au"]);
        assert_eq!(names(1), ["1an", "1au"]);
        assert_eq!(names(3), ["1an", "1au", "2au", "2an", "3an", "3au"]);
    }

    #[test]
    fn tallies_add_up_and_the_server_cpu_only_when_every_phase_has_it() {
        let one = |cpu: Option<u64>| Tally {
            connections: 10,
            connect_s: 0.5,
            connect_server_ns: cpu,
            deliveries: 100,
            expected: 100,
            publish_s: 1.0,
            publish_server_ns: cpu.map(|c| c * 2),
            ..Default::default()
        };
        let mut t = Tally::default();
        t.add(&one(Some(30_000)));
        t.add(&one(Some(10_000)));
        let c = t.costs();
        assert_eq!((c.connections, c.deliveries), (20, 200));
        assert_eq!(c.server_cpu_us_per_connect, Some(2.0));
        assert_eq!(c.server_cpu_us_per_delivery, Some(0.4));
        assert_eq!(c.connections_per_s, 20.0);
        t.add(&one(None));
        assert_eq!(t.costs().server_cpu_us_per_connect, None);
        let r = ratios(&one(Some(20_000)).costs(), &one(Some(40_000)).costs());
        assert_eq!(r.server_cpu_per_connect, Some(0.5));
        assert_eq!(r.latency_p50, None, "no latency recorded");
    }
}
