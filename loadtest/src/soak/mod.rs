//! The `soak` scenario: thousands of connections churn for a long while (`worker.rs`) while
//! publishing goes on; nothing may be lost and the server must leak nothing. [`run`] goes through
//! the phases in order: setup (options, baselines), start (workers and publishers), churn (RSS and
//! descriptor samples), settle (every connection back and caught up), close (gauges and
//! descriptors back to the baselines), verdict.

mod figures;
mod plan;
mod presence;
mod verdict;
mod worker;

pub use figures::SoakFigures;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cli::SoakArgs;
use crate::client::Shared;
use crate::harness::{
    channel_names, prepare, source_plan, window_end, window_start, Env, SetupError, Window,
    WindowEnd,
};
use crate::hist;
use crate::metrics::{self, Gauges};
use crate::net::{Node, SourcePlan};
use crate::presence::observer::Observer;
use crate::procstat;
use crate::publisher::{self, PublishResult, PublisherConfig, Via};
use crate::report::Report;
use plan::{default_warmup, history_fill_time, plan_channels, rss_level, rss_window};
use presence::{PresencePlan, SoakPresence};
use worker::{run_worker, ConnSpec, SoakConfig, SoakShared, SoakWorkerResult};

/// Runs the soak scenario (see the module documentation and `soak --help`).
pub fn run(a: &SoakArgs) -> Result<Report<SoakFigures>, SetupError> {
    let s = setup(a)?;
    let mut run = start(&s)?;
    let trace = churn(&s, &mut run);
    let pres = collect_publishers(&s, std::mem::take(&mut run.publishers))?;
    let settled = settle(&s, &mut run, &pres);
    let closed = close(&s, run);
    Ok(verdict::verdict(&s, closed, trace, settled, pres))
}

/// What the run was given, and the server before the first connection.
struct Setup<'a> {
    a: &'a SoakArgs,
    env: Env,
    plan: SourcePlan,
    /// The published channels: `--channels` of them, and the presence channel last.
    channels: Arc<Vec<String>>,
    /// `--presence-users`: the presence churn.
    presence: Option<PresencePlan>,
    /// The server's pid, for the RSS and descriptor checks.
    pid: Option<u32>,
    metrics_node: Node,
    warmup: Duration,
    settle_timeout: Duration,
    publishers: usize,
    fd_before: Option<u64>,
    rss_before: Option<u64>,
    gauges_before: Gauges,
}

fn check_args(a: &SoakArgs) -> Result<(), SetupError> {
    let common = &a.common;
    if common.server.len() != 1 {
        return Err("soak runs against one server: give one --server".into());
    }
    if common.server_pid.len() > 1 {
        return Err("soak checks one server: give one --server-pid".into());
    }
    if a.connections == 0 || a.channels == 0 {
        return Err("--connections and --channels must be at least 1".into());
    }
    if a.rate <= 0.0 || !a.rate.is_finite() {
        return Err("--rate must be above 0: the soak publishes at a fixed rate".into());
    }
    if a.duration.is_zero() {
        return Err("--duration must be above 0".into());
    }
    Ok(())
}

/// Checks the options, works out the warm-up and takes the baselines.
fn setup(a: &SoakArgs) -> Result<Setup<'_>, SetupError> {
    check_args(a)?;
    let common = &a.common;
    let n = a.connections;
    let publishers = a.publishers.clamp(1, a.channels);
    let env = prepare(common, n + publishers + 9, a.via == Via::Rest)?;
    let plan = source_plan(common, &env, n + publishers + 1);
    let presence = PresencePlan::new(a, &env, &plan)?;
    let mut channels = channel_names(&env.prefix, "soak", a.channels).to_vec();
    channels.extend(presence.as_ref().map(|p| p.channel.clone()));
    let channels = Arc::new(channels);
    let pid = common.server_pid.first().copied();
    let metrics_node = env.rest_nodes[0].clone();
    let per_channel_rate = a.rate / channels.len() as f64;
    let fill = history_fill_time(a.history_size, a.history_ttl, per_channel_rate);
    let warmup = a
        .warmup
        .unwrap_or_else(|| default_warmup(a.duration, fill))
        .min(a.duration);
    if fill > warmup && pid.is_some() && !common.quiet {
        eprintln!(
            "soak: WARNING the server's history (--history-size {}, --history-ttl {} s) fills in {:.0} s, \
             after the {:.0} s warm-up: its growth counts in the RSS check. Run the server with a \
             shorter BROADCASTER_HISTORY_TTL (and --history-ttl), or a longer --duration.",
            a.history_size,
            a.history_ttl.as_secs_f64(),
            fill.as_secs_f64(),
            warmup.as_secs_f64()
        );
    }
    let fd_before = match pid {
        Some(p) => Some(
            procstat::fd_count(p)
                .map_err(|e| format!("reading /proc/{p}/fd (--server-pid): {e}"))?,
        ),
        None => None,
    };
    let rss_before = pid.and_then(|p| procstat::rss(p).ok());
    let gauges_before = metrics::scrape(&metrics_node)
        .map_err(|e| format!("the soak checks the server's gauges, but: {e}"))?;
    let s = Setup {
        a,
        env,
        plan,
        channels,
        presence,
        pid,
        metrics_node,
        warmup,
        settle_timeout: Duration::from_secs_f64(a.settle_timeout.max(1.0)),
        publishers,
        fd_before,
        rss_before,
        gauges_before,
    };
    if !common.quiet {
        announce(&s);
    }
    Ok(s)
}

fn announce(s: &Setup<'_>) {
    let a = s.a;
    if s.pid.is_none() {
        eprintln!("soak: no --server-pid: the RSS and file-descriptor checks are skipped");
    }
    eprintln!(
        "soak: {} connections over {} channels (1-{} each), {} msg/s from {} publishers, \
         sessions ~{} s, pauses up to {} s, for {:.0} s (RSS reference after {:.0} s); \
         server gauges before: {} connections, {} subscriptions",
        a.connections,
        a.channels,
        a.channels_per_conn.clamp(1, a.channels),
        a.rate,
        s.publishers,
        a.session,
        a.pause,
        a.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.gauges_before.connections_active,
        s.gauges_before.subscriptions_total
    );
    if let Some(p) = &s.presence {
        eprintln!(
            "soak: presence churn on {}: {} users on {} connections, an observer",
            p.channel,
            a.presence_users,
            (2 * a.presence_users).min(a.connections)
        );
    }
}

/// A publisher thread: its channels (indices) and, once joined, its results.
type Publisher = JoinHandle<(Vec<usize>, PublishResult)>;

/// The threads of a started run.
struct Running {
    shared: Arc<SoakShared>,
    workers: Vec<JoinHandle<SoakWorkerResult>>,
    publishers: Vec<Publisher>,
    pub_shared: Arc<Shared>,
    window: Window,
    progress: Progress,
    /// The presence churn's observer.
    observer: Option<Observer>,
    /// (connection, channel) pairs.
    pairs: u64,
    threads: usize,
}

/// Plans the connections and starts the workers and the publishers.
fn start(s: &Setup<'_>) -> Result<Running, SetupError> {
    let (a, common) = (s.a, &s.a.common);
    let n = a.connections;
    let seed = crate::schedule::now_unix_ns() ^ std::process::id() as u64;
    let presence_channel = a.channels as u32;
    let specs: Vec<ConnSpec> = plan_channels(n, a.channels, a.channels_per_conn, seed)
        .into_iter()
        .enumerate()
        .map(|(i, mut channels)| {
            let token = s.presence.as_ref().and_then(|p| p.token_of(i));
            if token.is_some() {
                channels.push(presence_channel);
            }
            ConnSpec {
                channels,
                source: s.plan.for_conn(i),
                token,
            }
        })
        .collect();
    let pairs: u64 = specs.iter().map(|c| c.channels.len() as u64).sum();
    let threads = s.env.threads.max(1);
    let shared = Arc::new(SoakShared::new(s.channels.len(), threads));
    let setup_timeout = Duration::from_secs_f64(common.setup_timeout.max(1.0));
    let observer = match &s.presence {
        Some(p) => Some(p.start_observer(setup_timeout)?),
        None => None,
    };
    let mut per: Vec<Vec<ConnSpec>> = vec![Vec::new(); threads];
    for (i, c) in specs.into_iter().enumerate() {
        per[i % threads].push(c);
    }
    let window = window_start(&common.server_pid);
    let workers = spawn_workers(s, per, &shared);
    let pub_shared = Arc::new(Shared::default());
    let publishers = spawn_publishers(s, &pub_shared)?;
    Ok(Running {
        progress: Progress::new(window.t0, n, s.pid),
        shared,
        workers,
        publishers,
        pub_shared,
        window,
        observer,
        pairs,
        threads,
    })
}

fn spawn_workers(
    s: &Setup<'_>,
    per: Vec<Vec<ConnSpec>>,
    shared: &Arc<SoakShared>,
) -> Vec<JoinHandle<SoakWorkerResult>> {
    let (a, common) = (s.a, &s.a.common);
    let cfg = SoakConfig {
        node: s.env.nodes[0].clone(),
        token: s.env.token.clone(),
        channels: s.channels.clone(),
        concurrency: common.concurrency.max(1),
        session: Duration::from_secs_f64(a.session.max(0.01)),
        pause: Duration::from_secs_f64(a.pause.max(0.0)),
        resubscribe: a.resubscribe.clamp(0.0, 1.0),
        abrupt: a.abrupt.clamp(0.0, 1.0),
        history_size: a.history_size,
        history_ttl: a.history_ttl,
    };
    per.into_iter()
        .enumerate()
        .map(|(t, specs)| {
            let (cfg, shared) = (cfg.clone(), shared.clone());
            let cpu = (!common.cpus.is_empty()).then(|| common.cpus[t % common.cpus.len()]);
            std::thread::Builder::new()
                .name(format!("lt-soak-{t}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        let _ = procstat::pin_current_thread(c);
                    }
                    run_worker(cfg, specs, shared, t)
                })
                .expect("spawning a thread")
        })
        .collect()
}

/// Publishers: each takes every `publishers`-th channel and its share of the rate.
fn spawn_publishers(s: &Setup<'_>, pub_shared: &Arc<Shared>) -> Result<Vec<Publisher>, SetupError> {
    let (a, common) = (s.a, &s.a.common);
    let mut handles = Vec::new();
    let channels = s.channels.len();
    for p in 0..s.publishers {
        let idxs: Vec<usize> = (p..channels).step_by(s.publishers).collect();
        let pcfg = PublisherConfig {
            rest_nodes: s.env.rest_nodes.clone(),
            ws_nodes: s.env.nodes.to_vec(),
            publish_all: false,
            via: a.via,
            api_key: s.env.api_key.clone(),
            token: s.env.token.clone(),
            channels: Arc::new(idxs.iter().map(|&i| s.channels[i].clone()).collect()),
            rate: a.rate * idxs.len() as f64 / channels as f64,
            count: None,
            duration: Some(a.duration),
            window: 1,
            pipeline: 1,
            deliveries_per_publication: 1,
            payload_bytes: common.payload_bytes,
            payload_shape: common.payload_shape,
            source: s.plan.for_conn(a.connections + p),
            peer: a.common.peer,
        };
        let ps = pub_shared.clone();
        let pin = common.cpus.last().copied();
        handles.push(
            std::thread::Builder::new()
                .name(format!("lt-publish-{p}"))
                .spawn(move || {
                    if let Some(c) = pin {
                        let _ = procstat::pin_current_thread(c);
                    }
                    (idxs, publisher::run(&pcfg, &ps))
                })
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(handles)
}

/// The server's RSS and descriptors over the churn.
struct Trace {
    /// RSS levels (window medians) after the warm-up and at the end of the churn.
    rss_warm: Option<u64>,
    rss_end: Option<u64>,
    /// The single samples at those two points.
    rss_warm_instant: Option<u64>,
    rss_end_instant: Option<u64>,
    rss_window: Duration,
    rss_peak: Option<u64>,
    fd_peak: Option<u64>,
}

/// The churn: until `--duration`, sample the server once a second and print progress.
fn churn(s: &Setup<'_>, run: &mut Running) -> Trace {
    let t0 = run.window.t0;
    let end_at = t0 + s.a.duration;
    let warm_at = t0 + s.warmup;
    let mut rss_warm = None;
    let mut samples = Samples::new(s, t0);
    let mut next_line = t0 + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if now >= end_at {
            break;
        }
        if rss_warm.is_none() && now >= warm_at {
            rss_warm = s.pid.and_then(|p| procstat::rss(p).ok());
            match rss_warm {
                Some(r) if !s.a.common.quiet => eprintln!(
                    "soak: warm-up over, server RSS {:.1} MiB (the reference is the median of \
                     the next {:.0} s)",
                    r as f64 / 1048576.0,
                    rss_window(s.a.duration).as_secs_f64()
                ),
                _ => {}
            }
        }
        if now >= next_line {
            samples.take();
            if !s.a.common.quiet {
                eprintln!("{}", run.progress.line(&run.shared));
            }
            next_line += Duration::from_secs(1);
        }
        std::thread::sleep(
            Duration::from_millis(50).min(end_at.saturating_duration_since(Instant::now())),
        );
    }
    samples.take();
    samples.trace(s, rss_warm)
}

/// Once-a-second samples of the server's RSS and descriptors.
struct Samples {
    pid: Option<u32>,
    t0: Instant,
    /// (seconds into the run, RSS bytes).
    rss: Vec<(f64, u64)>,
    rss_peak: Option<u64>,
    fd_peak: Option<u64>,
}

impl Samples {
    fn new(s: &Setup<'_>, t0: Instant) -> Self {
        Samples {
            pid: s.pid,
            t0,
            rss: Vec::new(),
            rss_peak: s.rss_before,
            fd_peak: s.fd_before,
        }
    }

    fn take(&mut self) {
        let Some(p) = self.pid else { return };
        if let Ok(r) = procstat::rss(p) {
            self.rss_peak = Some(self.rss_peak.unwrap_or(0).max(r));
            self.rss.push((self.t0.elapsed().as_secs_f64(), r));
        }
        if let Ok(f) = procstat::fd_count(p) {
            self.fd_peak = Some(self.fd_peak.unwrap_or(0).max(f));
        }
    }

    /// The RSS levels, from `rss_warm`, the single sample at the end of the warm-up.
    fn trace(self, s: &Setup<'_>, rss_warm: Option<u64>) -> Trace {
        let rss_end_instant = self.rss.last().map(|&(_, r)| r);
        let rss_warm_instant = rss_warm.or(rss_end_instant);
        // Levels, not single samples: the allocator moves RSS in ~2 MiB steps at any second.
        let rss_win = rss_window(s.a.duration);
        let (w0, d) = (s.warmup.as_secs_f64(), s.a.duration.as_secs_f64());
        let w = rss_win.as_secs_f64();
        Trace {
            rss_warm: rss_level(&self.rss, w0, (w0 + w).min(d)).or(rss_warm_instant),
            rss_end: rss_level(&self.rss, (d - w).max(w0), d + 1.0).or(rss_end_instant),
            rss_warm_instant,
            rss_end_instant,
            rss_window: rss_win,
            rss_peak: self.rss_peak,
            fd_peak: self.fd_peak,
        }
    }
}

/// Publishing ends on its own schedule; collects the last offsets per channel.
fn collect_publishers(s: &Setup<'_>, handles: Vec<Publisher>) -> Result<PublishResult, SetupError> {
    let channels = s.channels.len();
    let mut pres = PublishResult {
        last_offsets: vec![0; channels],
        counts: vec![0; channels],
        ..Default::default()
    };
    for h in handles {
        let (idxs, r) = h
            .join()
            .map_err(|_| "a publisher thread panicked".to_string())?;
        pres.published += r.published;
        pres.errors += r.errors;
        for (j, &i) in idxs.iter().enumerate() {
            pres.last_offsets[i] = r.last_offsets.get(j).copied().unwrap_or(0);
            pres.counts[i] = r.counts.get(j).copied().unwrap_or(0);
        }
        pres.elapsed_s = pres.elapsed_s.max(r.elapsed_s);
        pres.max_behind_ms = pres.max_behind_ms.max(r.max_behind_ms);
        pres.rtt_p50_us = pres.rtt_p50_us.max(r.rtt_p50_us);
        pres.rtt_max_us = pres.rtt_max_us.max(r.rtt_max_us);
    }
    Ok(pres)
}

/// How the settle went.
struct Settled {
    settle_s: f64,
    /// Connections back, subscribed and caught up.
    settled: u64,
    end: WindowEnd,
}

/// Settle: everyone back, resubscribed, caught up to the last offsets.
fn settle(s: &Setup<'_>, run: &mut Running, pres: &PublishResult) -> Settled {
    let n = s.a.connections;
    let shared = &run.shared;
    for (i, o) in pres.last_offsets.iter().enumerate() {
        shared.final_offsets[i].store(*o, Ordering::Relaxed);
    }
    shared.settle.store(true, Ordering::Relaxed);
    let settle_t0 = Instant::now();
    let mut next_line = settle_t0 + Duration::from_secs(1);
    while (shared.settled_total() as usize) < n && settle_t0.elapsed() < s.settle_timeout {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next_line && !s.a.common.quiet {
            eprintln!(
                "{} | settling: {}/{n} caught up",
                run.progress.line(shared),
                shared.settled_total()
            );
            next_line += Duration::from_secs(1);
        }
    }
    let settle_s = settle_t0.elapsed().as_secs_f64();
    let settled = shared.settled_total();
    let end = window_end(&run.window, &s.a.common.server_pid);
    if !s.a.common.quiet {
        eprintln!("{}", run.progress.line(shared));
    }
    Settled {
        settle_s,
        settled,
        end,
    }
}

/// The server's gauges and descriptors with everything open, then after everything closed.
struct Closed {
    shared: Arc<SoakShared>,
    pub_shared: Arc<Shared>,
    results: Vec<SoakWorkerResult>,
    pairs: u64,
    threads: usize,
    gauges_open: Option<Gauges>,
    gauges_open_ok: bool,
    /// What the gauges should read with the end's connections open.
    expected_open: Gauges,
    fd_open_end: Option<u64>,
    gauges_after: Option<Gauges>,
    gauges_after_ok: bool,
    fd_after: Option<u64>,
    fd_ok: bool,
    rss_after_close: Option<u64>,
    presence: Option<SoakPresence>,
}

/// Checks the gauges with everything open, closes everything, and checks that the gauges and the
/// descriptors come back to the baselines.
fn close(s: &Setup<'_>, run: Running) -> Closed {
    let shared = run.shared;
    let gauges_before = s.gauges_before;
    // The presence observer is one connection and one subscription more.
    let observer = i64::from(run.observer.is_some());
    let (gauges_open, gauges_open_ok, expected_open) = gauges_open(s, &shared, observer);
    let fd_open_end = s.pid.and_then(|p| procstat::fd_count(p).ok());

    shared.stop.store(true, Ordering::Relaxed);
    let results: Vec<SoakWorkerResult> = run
        .workers
        .into_iter()
        .filter_map(|h| h.join().ok())
        .collect();
    // Before the gauges and descriptors are judged: the observer closes here.
    let presence = match (&s.presence, run.observer) {
        (Some(p), Some(o)) => Some(presence::end(s, p, o)),
        _ => None,
    };
    let (gauges_after, gauges_after_ok) =
        poll_until(s.settle_timeout, || gauges_probe(s, &shared, gauges_before));
    let (fd_after, fd_ok) = match (s.pid, s.fd_before) {
        (Some(p), Some(before)) => poll_until(s.settle_timeout, || {
            let f = procstat::fd_count(p).ok();
            (f, f == Some(before))
        }),
        _ => (None, true),
    };
    let rss_after_close = s.pid.and_then(|p| procstat::rss(p).ok());
    if !s.a.common.quiet {
        eprintln!(
            "soak: closed; server gauges {} connections {} subscriptions{}",
            gauges_after.map(|g| g.connections_active).unwrap_or(-1),
            gauges_after.map(|g| g.subscriptions_total).unwrap_or(-1),
            fd_after.map(|f| format!(", {f} fds")).unwrap_or_default()
        );
    }
    Closed {
        shared,
        pub_shared: run.pub_shared,
        results,
        pairs: run.pairs,
        threads: run.threads,
        gauges_open,
        gauges_open_ok,
        expected_open,
        fd_open_end,
        gauges_after,
        gauges_after_ok,
        fd_after,
        fd_ok,
        rss_after_close,
        presence,
    }
}

/// With everything open, the server's gauges must count exactly what we hold (and `extra`
/// connections with a subscription each): what they read, whether they matched in time, and
/// what they should have read.
fn gauges_open(s: &Setup<'_>, shared: &SoakShared, extra: i64) -> (Option<Gauges>, bool, Gauges) {
    let before = s.gauges_before;
    let timeout = s.settle_timeout.min(Duration::from_secs(15));
    let mut expected = before;
    let (g, ok) = poll_until(timeout, || {
        expected = Gauges {
            connections_active: before.connections_active
                + shared.open.load(Ordering::Relaxed)
                + extra,
            subscriptions_total: before.subscriptions_total
                + shared.live_subs.load(Ordering::Relaxed)
                + extra,
        };
        gauges_probe(s, shared, expected)
    });
    (g, ok, expected)
}

/// One probe for [`poll_until`]: the gauges, and whether they read `expected`.
fn gauges_probe(s: &Setup<'_>, shared: &SoakShared, expected: Gauges) -> (Option<Gauges>, bool) {
    match metrics::scrape(&s.metrics_node) {
        Ok(g) => (Some(g), g == expected),
        Err(e) => {
            shared.error(format!("/metrics: {e}"));
            (None, false)
        }
    }
}

/// Polls `probe` every 100 ms until it returns `Ok(true)` or `timeout` passes; returns the last
/// value seen and whether it matched.
fn poll_until<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> (Option<T>, bool),
) -> (Option<T>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let (v, ok) = probe();
        if ok || Instant::now() >= deadline {
            return (v, ok);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The once-a-second progress line.
struct Progress {
    t0: Instant,
    /// When the last line was printed, and the deliveries then.
    last: (Instant, u64),
    connections: usize,
    pid: Option<u32>,
}

impl Progress {
    fn new(t0: Instant, connections: usize, pid: Option<u32>) -> Self {
        Progress {
            t0,
            last: (t0, 0),
            connections,
            pid,
        }
    }

    fn line(&mut self, shared: &SoakShared) -> String {
        let now = Instant::now();
        let d = shared.deliveries.load(Ordering::Relaxed);
        let rate =
            (d - self.last.1) as f64 / now.duration_since(self.last.0).as_secs_f64().max(1e-9);
        self.last = (now, d);
        let max = shared.interval_max_ns.swap(0, Ordering::Relaxed);
        let server = self.pid.map(server_figures).unwrap_or_default();
        format!(
            "[{:7.1}s] open {}/{} subs {} cycled {} resubs {} delivered {} ({:.1}k/s, replayed {}) max {} ms | anomalies {} failures {} unrecovered {} gaps {}{server}",
            now.duration_since(self.t0).as_secs_f64(),
            shared.open.load(Ordering::Relaxed),
            self.connections,
            shared.live_subs.load(Ordering::Relaxed),
            shared.cycled.load(Ordering::Relaxed),
            shared.resubscribes.load(Ordering::Relaxed),
            d,
            rate / 1e3,
            shared.replayed.load(Ordering::Relaxed),
            hist::ms(max),
            shared.anomalies.load(Ordering::Relaxed),
            shared.failures.load(Ordering::Relaxed),
            shared.unrecovered.load(Ordering::Relaxed),
            shared.history_gaps.load(Ordering::Relaxed),
        )
    }
}

/// ` | server RSS X MiB fds N` for the progress line.
fn server_figures(pid: u32) -> String {
    format!(
        " | server RSS {} fds {}",
        procstat::rss(pid)
            .map(|r| format!("{:.1} MiB", r as f64 / 1048576.0))
            .unwrap_or_else(|_| "?".into()),
        procstat::fd_count(pid)
            .map(|f| f.to_string())
            .unwrap_or_else(|_| "?".into())
    )
}
