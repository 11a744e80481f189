//! `proxy`: the latency the access proxy (SPEC 15) adds to one subscribe. The load generator runs
//! the access backend itself ([`crate::backend`]), which allows every call at once (or after
//! `--backend-delay-us`) and counts them. `--connections` connections, each authenticated as a user
//! of its own, make their requests one at a time in rounds of three kinds of subscribe, each
//! followed by its unsubscribe:
//!
//! - **baseline**: a public channel, which no call is made for;
//! - **miss**: a proxy channel never used before, so the server's cache of allow decisions, kept
//!   per (user, channel), cannot know it: one call to the backend;
//! - **hit**: the connection's hit channel, allowed by a warming subscribe earlier, so the server
//!   answers from its cache: no call.
//!
//! The kinds alternate on the same connections (each connection starts the cycle at another kind)
//! so that whatever drifts over a run weighs on all three alike. Only the subscribe's
//! request-to-result round trip is timed. What the proxy adds is each kind's percentile minus the
//! baseline's. The backend's count of calls proves which subscribes were asked: it must equal the
//! misses plus the warm-ups, and the calls on hit channels must equal the warming subscribes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::backend::{Backend, BackendConfig, BackendCounts};
use crate::cli::ProxyArgs;
use crate::extract;
use crate::harness::{prepare, source_plan, window_end, window_start, Env, SetupError, WindowEnd};
use crate::hist::{self, Percentiles};
use crate::metrics;
use crate::net::{Node, SourcePlan};
use crate::publisher::WsConn;
use crate::report::{row, with_pid, Report, Row};

/// The three kinds of subscribe, in the order of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Baseline,
    Miss,
    Hit,
}

const KINDS: [Kind; 3] = [Kind::Baseline, Kind::Miss, Kind::Hit];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::Miss => "miss",
            Kind::Hit => "hit",
        }
    }
}

/// The `proxy` scenario's own figures: `proxy` in the JSON summary.
#[derive(Debug, Default, serde::Serialize)]
pub struct ProxyFigures {
    /// Client connections.
    connections: u64,
    /// The backend's delay before each answer, µs.
    backend_delay_us: u64,
    /// Subscribe round trips (request to result at the client), ns: a public channel.
    baseline: Percentiles,
    /// A proxy channel the server had to ask about.
    miss: Percentiles,
    /// A proxy channel the server had allowed before.
    hit: Percentiles,
    /// Miss minus baseline, µs.
    added_miss: Added,
    /// Hit minus baseline, µs.
    added_hit: Added,
    /// Untimed misses (the warm-up rounds).
    warmup_misses: u64,
    /// Untimed subscribes that warmed a hit channel (one call each).
    hit_warms: u64,
    /// Calls the backend should have had: measured and warm-up misses, and the hit warms.
    expected_backend_calls: u64,
    /// Where the backend listened.
    backend_addr: String,
    /// What the backend counted.
    backend: BackendFigures,
    /// The server's `proxy_requests_total{kind="subscribe",result="allow"}` over the run.
    server_allow_calls: Option<f64>,
    /// The same for the other results (deny, error, timeout), together.
    server_other_calls: Option<f64>,
    /// The server's `proxy_request_seconds{kind="subscribe"}` mean over the run, µs.
    server_call_mean_us: Option<f64>,
}

/// What the backend counted.
#[derive(Debug, Default, serde::Serialize)]
struct BackendFigures {
    calls: u64,
    /// Calls for miss channels.
    miss_channels: u64,
    /// Calls for hit channels (must be the warms only).
    hit_channels: u64,
    /// Calls for any other channel (a baseline channel asked about: the public rule is missing).
    other_channels: u64,
    unauthorized: u64,
    malformed: u64,
    /// TCP connections the server opened to the backend.
    connections: u64,
}

/// What the proxy adds at two percentiles, µs (negative: faster than the baseline).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Added {
    p50_us: f64,
    p99_us: f64,
}

impl Added {
    fn of(kind: &Percentiles, baseline: &Percentiles) -> Added {
        let d = |a: u64, b: u64| (a as f64 - b as f64) / 1e3;
        Added {
            p50_us: d(kind.p50_ns, baseline.p50_ns),
            p99_us: d(kind.p99_ns, baseline.p99_ns),
        }
    }
}

/// What one connection does.
#[derive(Clone)]
struct Plan {
    index: usize,
    node: Node,
    source: Option<Ipv4Addr>,
    token: String,
    /// Measured rounds (with `--count`); None: until the deadline.
    rounds: Option<u64>,
    duration: Option<Duration>,
    warmup: u64,
    rewarm: Duration,
    /// `PUBLIC_PREFIX RUN/c<i>`.
    baseline_channel: String,
    /// `PROXY_PREFIX RUN/m<i>/`: misses append their number.
    miss_prefix: String,
    /// `PROXY_PREFIX RUN/h<i>/`: hit channels append their generation.
    hit_prefix: String,
    cpu: Option<usize>,
}

/// What the connections report as they go (the progress line).
#[derive(Default)]
struct Progress {
    measured: [AtomicU64; 3],
    finished: AtomicUsize,
}

/// One connection's outcome.
struct Outcome {
    hists: [Histogram<u64>; 3],
    /// Miss subscribes sent, warm-up and measured (a failed run may have sent one it did not time).
    misses_sent: u64,
    warmup_misses: u64,
    hit_warms: u64,
    error: Option<String>,
}

/// `proxy`: the access proxy's added latency per subscribe, miss and hit, against a baseline.
pub fn proxy(a: &ProxyArgs) -> Result<Report<ProxyFigures>, SetupError> {
    let common = &a.common;
    let c = a.connections;
    let listen = check_args(a)?;
    let env = prepare(common, c, false)?;
    let plan = source_plan(common, &env, c);
    let run = &env.prefix;
    let miss_class = format!("{}{run}/m", a.proxy_prefix);
    let hit_class = format!("{}{run}/h", a.proxy_prefix);
    let backend = Backend::start(BackendConfig {
        listen,
        delay: Duration::from_micros(a.backend_delay_us),
        secret: a.proxy_secret.clone(),
        classes: vec![miss_class.clone(), hit_class.clone()],
        cpu: common.cpus.first().copied(),
    })?;
    let plans = plans(a, &env, &plan, &miss_class, &hit_class)?;
    let metrics_node = env.rest_nodes[0].clone();
    let before = metrics::scrape_text(&metrics_node);
    let (outcomes, end) = run_connections(a, plans)?;
    let after = metrics::scrape_text(&metrics_node);
    let counts = backend.counts();
    let backend_addr = backend.addr().to_string();
    drop(backend);
    let mut report = env.report("proxy", common, &plan, c, 0, 0);
    end.record(&mut report);
    report.measured_s = end.elapsed.as_secs_f64();
    report.latency_kind = "subscribe_to_result";
    report.deliveries_unchecked = true;
    let figures = conclude(
        a,
        &mut report,
        outcomes,
        (backend_addr, counts),
        before,
        after,
    );
    report.set_figures(figures);
    Ok(report)
}

/// The arguments no run could go with; where the backend listens.
fn check_args(a: &ProxyArgs) -> Result<SocketAddr, SetupError> {
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if a.duration.is_none() && a.count == 0 {
        return Err("--count must be at least 1 (or give --duration)".into());
    }
    if a.rewarm.is_zero() {
        return Err("--rewarm must be above 0".into());
    }
    a.backend_listen
        .parse()
        .map_err(|_| format!("--backend-listen {:?} is not IP:PORT", a.backend_listen))
}

/// What each connection does: its user, node, source address, channels and share of `--count`.
fn plans(
    a: &ProxyArgs,
    env: &Env,
    plan: &SourcePlan,
    miss_class: &str,
    hit_class: &str,
) -> Result<Vec<Plan>, SetupError> {
    let (common, c, run) = (&a.common, a.connections, &env.prefix);
    let secret = common.secret.clone().unwrap_or_default();
    (0..c)
        .map(|i| {
            let token = crate::token::mint(&secret, &format!("{run}-u{i}"), 24 * 3600)?;
            let rounds = a.duration.is_none().then(|| {
                let (each, extra) = (a.count / c as u64, a.count % c as u64);
                each + u64::from((i as u64) < extra)
            });
            Ok(Plan {
                index: i,
                node: env.nodes[i % env.nodes.len()].clone(),
                source: plan.for_conn(i),
                token,
                rounds,
                duration: a.duration,
                warmup: a.warmup,
                rewarm: a.rewarm,
                baseline_channel: format!("{}{run}/c{i}", a.public_prefix),
                miss_prefix: format!("{miss_class}{i}/"),
                hit_prefix: format!("{hit_class}{i}/"),
                cpu: (!common.cpus.is_empty()).then(|| common.cpus[i % common.cpus.len()]),
            })
        })
        .collect()
}

/// Runs every connection on a thread of its own; their outcomes, and the measuring window.
fn run_connections(
    a: &ProxyArgs,
    plans: Vec<Plan>,
) -> Result<(Vec<Outcome>, WindowEnd), SetupError> {
    let c = a.connections;
    let progress = Arc::new(Progress::default());
    // Every connection, and this thread: measuring starts once all are set up and warm.
    let start = Arc::new(Barrier::new(c + 1));
    let threads = spawn_connections(plans, &progress, &start)?;
    start.wait();
    let window = window_start(&a.common.server_pid);
    watch(a, &progress, c);
    let outcomes: Vec<Outcome> = threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or_else(|_| Outcome {
                hists: [(); 3].map(|_| hist::new_histogram()),
                misses_sent: 0,
                warmup_misses: 0,
                hit_warms: 0,
                error: Some("a connection thread panicked".into()),
            })
        })
        .collect();
    let end = window_end(&window, &a.common.server_pid);
    Ok((outcomes, end))
}

fn spawn_connections(
    plans: Vec<Plan>,
    progress: &Arc<Progress>,
    start: &Arc<Barrier>,
) -> Result<Vec<JoinHandle<Outcome>>, SetupError> {
    plans
        .into_iter()
        .map(|p| {
            let (progress, start) = (progress.clone(), start.clone());
            std::thread::Builder::new()
                .name(format!("proxy-{}", p.index))
                .spawn(move || {
                    let out = connection(&p, &progress, &start);
                    progress.finished.fetch_add(1, Ordering::Relaxed);
                    out
                })
                .map_err(|e| format!("spawning a connection thread: {e}"))
        })
        .collect()
}

/// Prints the progress line once a second until every connection is done.
fn watch(a: &ProxyArgs, progress: &Progress, c: usize) {
    let t0 = Instant::now();
    let mut last = Instant::now();
    while progress.finished.load(Ordering::Relaxed) < c {
        std::thread::sleep(Duration::from_millis(20));
        if a.common.quiet || last.elapsed() < Duration::from_secs(1) {
            continue;
        }
        last = Instant::now();
        let m = |k: usize| progress.measured[k].load(Ordering::Relaxed);
        let goal = match a.duration {
            Some(d) => format!(
                "{:.0} of {:.0} s",
                t0.elapsed().as_secs_f64(),
                d.as_secs_f64()
            ),
            None => format!("of {} each", a.count),
        };
        eprintln!(
            "  measured baseline {} / miss {} / hit {} ({goal})",
            m(0),
            m(1),
            m(2)
        );
    }
}

/// The figures, the checks and the table rows, from what the connections and the backend saw.
fn conclude(
    a: &ProxyArgs,
    report: &mut Report<ProxyFigures>,
    outcomes: Vec<Outcome>,
    (backend_addr, counts): (String, BackendCounts),
    before: Result<String, String>,
    after: Result<String, String>,
) -> ProxyFigures {
    let mut hists = [(); 3].map(|_| hist::new_histogram());
    let mut all = hist::new_histogram();
    let (mut misses_sent, mut warmup_misses, mut hit_warms) = (0, 0, 0);
    for o in &outcomes {
        for (h, oh) in hists.iter_mut().zip(&o.hists) {
            let _ = h.add(oh);
            let _ = all.add(oh);
        }
        misses_sent += o.misses_sent;
        warmup_misses += o.warmup_misses;
        hit_warms += o.hit_warms;
        if let Some(e) = &o.error {
            report.connection_failures += 1;
            report.errors.push(e.clone());
        }
    }
    let [baseline, miss, hit] = hists.each_ref().map(hist::percentiles);
    // Every miss sent, timed or not (one that failed later in its round was asked all the same).
    let expected = misses_sent + hit_warms;
    // Channels used: one public per connection, every miss, every hit generation.
    report.channels = a.connections as u64 + expected;
    report.subscribers_per_channel = 1;
    let mut f = ProxyFigures {
        connections: a.connections as u64,
        backend_delay_us: a.backend_delay_us,
        baseline,
        miss,
        hit,
        added_miss: Added::of(&miss, &baseline),
        added_hit: Added::of(&hit, &baseline),
        warmup_misses,
        hit_warms,
        expected_backend_calls: expected,
        backend_addr,
        backend: BackendFigures {
            calls: counts.calls,
            miss_channels: counts.by_class.first().copied().unwrap_or(0),
            hit_channels: counts.by_class.get(1).copied().unwrap_or(0),
            other_channels: counts.other,
            unauthorized: counts.unauthorized,
            malformed: counts.malformed,
            connections: counts.connections,
        },
        ..ProxyFigures::default()
    };
    server_figures(&mut f, report, before, after);
    check(a, report, &f);
    report.latency = hist::percentiles(&all);
    report.histogram = Some(all);
    report.rows.delivered = latency_rows(&f);
    report.rows.checks = check_rows(&f);
    report.rows.cost = cost_rows(report, &f);
    report.finish();
    f
}

/// The server's own count of calls and their mean duration over the run, from `/metrics`.
fn server_figures(
    f: &mut ProxyFigures,
    report: &mut Report<ProxyFigures>,
    before: Result<String, String>,
    after: Result<String, String>,
) {
    let (before, after) = match (before, after) {
        (Ok(b), Ok(a)) => (b, a),
        (Err(e), _) | (_, Err(e)) => {
            report.errors.push(format!("no server proxy figures: {e}"));
            return;
        }
    };
    let delta = |name: &str, labels: &[(&str, &str)]| {
        let b = metrics::sample_where(&before, name, labels).unwrap_or(0.0);
        metrics::sample_where(&after, name, labels).map(|a| a - b)
    };
    let sub = ("kind", "subscribe");
    f.server_allow_calls = delta("proxy_requests_total", &[sub, ("result", "allow")]);
    f.server_other_calls = ["deny", "error", "timeout"]
        .iter()
        .map(|r| delta("proxy_requests_total", &[sub, ("result", r)]))
        .sum();
    let sum = delta("proxy_request_seconds_sum", &[sub]);
    let count = delta("proxy_request_seconds_count", &[sub]);
    f.server_call_mean_us = match (sum, count) {
        (Some(s), Some(n)) if n > 0.0 => Some(s / n * 1e6),
        _ => None,
    };
    if f.server_allow_calls.is_none() {
        report.errors.push(
            "the server's /metrics has no proxy_requests_total: a server without the access proxy?"
                .into(),
        );
    }
}

/// The run's checks: every request answered, and the backend asked exactly for the misses and
/// the warm-ups.
fn check(a: &ProxyArgs, report: &mut Report<ProxyFigures>, f: &ProxyFigures) {
    let b = &f.backend;
    let proxy_rule = format!("{}*", a.proxy_prefix);
    if b.calls != f.expected_backend_calls {
        report.fail(format!(
            "the backend got {} calls, expected {} ({} misses + {} warm-up misses + {} \
             hit-channel warm-ups){}",
            b.calls,
            f.expected_backend_calls,
            f.expected_backend_calls - f.warmup_misses - f.hit_warms,
            f.warmup_misses,
            f.hit_warms,
            if b.calls == 0 && b.unauthorized == 0 && b.malformed == 0 {
                format!(
                    ": is {proxy_rule:?} a rule with access = \"proxy\", and the server's \
                     proxy.subscribe_url on --backend-listen {}?",
                    a.backend_listen
                )
            } else {
                String::new()
            }
        ));
    }
    if b.hit_channels > f.hit_warms {
        report.fail(format!(
            "{} HITS WERE ASKED: the backend got {} calls on hit channels for {} warming \
             subscribes (is the server's proxy.subscribe_cache_ttl above --rewarm {:?}?)",
            b.hit_channels - f.hit_warms,
            b.hit_channels,
            f.hit_warms,
            a.rewarm
        ));
    }
    if b.other_channels > 0 {
        report.fail(format!(
            "the backend was asked {} times about channels of neither kind: is {:?} a rule with \
             access = \"public\"?",
            b.other_channels,
            format!("{}*", a.public_prefix)
        ));
    }
    if b.unauthorized > 0 {
        report.fail(format!(
            "{} calls without the --proxy-secret as bearer token",
            b.unauthorized
        ));
    }
    if b.malformed > 0 {
        report.fail(format!("{} malformed calls to the backend", b.malformed));
    }
    if let Some(n) = f.server_allow_calls {
        if n as u64 != b.calls {
            report.fail(format!(
                "the server counted {n} allowed subscribe calls (proxy_requests_total), the \
                 backend answered {}",
                b.calls
            ));
        }
    }
    if let Some(e) = report.errors.first() {
        let hint = hint(e);
        if !hint.is_empty() {
            report.errors.push(hint);
        }
    }
}

/// What an error most likely means.
fn hint(error: &str) -> String {
    if error.contains("ResourceExhausted") {
        "hint: the server's per-connection request rate limit (100/s by default): start it with \
         BROADCASTER_LIMITS_REQUESTS_PER_SECOND=1000000 BROADCASTER_LIMITS_REQUEST_BURST=1000000"
            .into()
    } else if error.contains("Unavailable") {
        "hint: the server could not reach the backend: its proxy.subscribe_url must point at \
         --backend-listen"
            .into()
    } else if error.contains("503") {
        "hint: the server's cap on anonymous connections per address: \
         BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000"
            .into()
    } else {
        String::new()
    }
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e3)
}

fn latency_rows(f: &ProxyFigures) -> Vec<Row> {
    let line = |p: &Percentiles| {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
            us(p.p50_ns),
            us(p.p90_ns),
            us(p.p99_ns),
            us(p.p999_ns),
            us(p.max_ns),
            p.count
        )
    };
    let added = |a: &Added| format!("p50 {:+.1}  p99 {:+.1}", a.p50_us, a.p99_us);
    vec![
        row("subscribe µs, baseline (public)", line(&f.baseline)),
        row("subscribe µs, proxy miss", line(&f.miss)),
        row("subscribe µs, proxy hit", line(&f.hit)),
        row("added by the proxy µs, miss", added(&f.added_miss)),
        row("added by the proxy µs, hit", added(&f.added_hit)),
    ]
}

fn check_rows(f: &ProxyFigures) -> Vec<Row> {
    let b = &f.backend;
    let opt =
        |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "-".into());
    vec![
        row(
            "backend calls",
            format!(
                "{} (expected {} = {} misses + {} warm-up misses + {} hit-channel warm-ups; \
                 {} on hit channels, {} other), {} connections from the server to {}",
                b.calls,
                f.expected_backend_calls,
                f.expected_backend_calls - f.warmup_misses - f.hit_warms,
                f.warmup_misses,
                f.hit_warms,
                b.hit_channels,
                b.other_channels,
                b.connections,
                f.backend_addr
            ),
        ),
        row(
            "server proxy_requests_total",
            format!(
                "subscribe allow +{}, other results +{}",
                opt(f.server_allow_calls, 0),
                opt(f.server_other_calls, 0)
            ),
        ),
        row(
            "server proxy_request_seconds",
            format!("mean {} µs", opt(f.server_call_mean_us, 1)),
        ),
    ]
}

fn cost_rows(report: &Report<ProxyFigures>, f: &ProxyFigures) -> Vec<Row> {
    // Each measured subscribe went with an unsubscribe; the warm-ups are outside the window.
    let requests = 2 * (f.baseline.count + f.miss.count + f.hit.count);
    let server = report
        .server_cpu_s
        .map(|s| s * 1e6 / requests.max(1) as f64);
    vec![row(
        "CPU per request (sub or unsub)",
        format!(
            "server {}   load generator {:.3} µs (all kinds together; backend included)",
            with_pid(server, "µs"),
            report.loadgen_cpu_s * 1e6 / requests.max(1) as f64
        ),
    )]
}

/// One connection: connect and auth, warm its hit channel, the warm-up rounds, then (once every
/// connection is there) the measured rounds.
fn connection(p: &Plan, progress: &Progress, start: &Barrier) -> Outcome {
    if let Some(cpu) = p.cpu {
        let _ = crate::procstat::pin_current_thread(cpu);
    }
    let mut c = Conn {
        p,
        ws: None,
        hists: [(); 3].map(|_| hist::new_histogram()),
        misses: 0,
        hit_gen: 0,
        hit_warmed: Instant::now(),
        warmup_misses: 0,
        hit_warms: 0,
    };
    let ready = c.setup();
    start.wait();
    let result = ready.and_then(|()| c.measure(progress));
    Outcome {
        hists: c.hists,
        misses_sent: c.misses,
        warmup_misses: c.warmup_misses,
        hit_warms: c.hit_warms,
        error: result.err().map(|e| format!("connection {}: {e}", p.index)),
    }
}

/// One connection's state.
struct Conn<'a> {
    p: &'a Plan,
    ws: Option<WsConn>,
    hists: [Histogram<u64>; 3],
    /// Miss channels used so far (the next one's number).
    misses: u64,
    /// The hit channel's generation, and when it was warmed.
    hit_gen: u64,
    hit_warmed: Instant,
    warmup_misses: u64,
    hit_warms: u64,
}

impl Conn<'_> {
    fn setup(&mut self) -> Result<(), String> {
        let seed = 0x9E37_79B9_7F4A_7C15 ^ self.p.index as u64;
        let ws = WsConn::open(&self.p.node, self.p.source, &self.p.token, seed)?
            .map_err(|code| format!("auth failed: {code} (check --secret)"))?;
        self.ws = Some(ws);
        self.warm_hit()?;
        for _ in 0..self.p.warmup {
            self.round(false)?;
        }
        Ok(())
    }

    fn measure(&mut self, progress: &Progress) -> Result<(), String> {
        let deadline = self.p.duration.map(|d| Instant::now() + d);
        let mut done = 0u64;
        loop {
            match (self.p.rounds, deadline) {
                (Some(n), _) if done >= n => return Ok(()),
                (None, Some(t)) if Instant::now() >= t => return Ok(()),
                _ => {}
            }
            self.round(true)?;
            done += 1;
            for m in &progress.measured {
                m.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One subscribe of each kind, starting the cycle at this connection's own kind.
    fn round(&mut self, timed: bool) -> Result<(), String> {
        for j in 0..KINDS.len() {
            let kind = KINDS[(self.p.index + j) % KINDS.len()];
            let channel = match kind {
                Kind::Baseline => self.p.baseline_channel.clone(),
                Kind::Miss => {
                    self.misses += 1;
                    if !timed {
                        self.warmup_misses += 1;
                    }
                    format!("{}{}", self.p.miss_prefix, self.misses)
                }
                Kind::Hit => {
                    if self.hit_warmed.elapsed() >= self.p.rewarm {
                        self.hit_gen += 1;
                        self.warm_hit()?;
                    }
                    self.hit_channel()
                }
            };
            let rtt = self.subscribe_unsubscribe(&channel, kind.name())?;
            if timed {
                hist::record(&mut self.hists[kind as usize], rtt.as_nanos() as u64);
            }
        }
        Ok(())
    }

    fn hit_channel(&self) -> String {
        format!("{}{}", self.p.hit_prefix, self.hit_gen)
    }

    /// The warming subscribe of the current hit channel: the backend's one call for it.
    fn warm_hit(&mut self) -> Result<(), String> {
        let channel = self.hit_channel();
        self.hit_warms += 1;
        self.subscribe_unsubscribe(&channel, "hit warm-up")?;
        self.hit_warmed = Instant::now();
        Ok(())
    }

    /// Subscribes to `channel`, then unsubscribes; the subscribe's round trip.
    fn subscribe_unsubscribe(&mut self, channel: &str, what: &str) -> Result<Duration, String> {
        let ws = self.ws.as_mut().ok_or("not connected")?;
        let mut req = Vec::with_capacity(128);
        let mut call = |method: &[u8], req: &mut Vec<u8>| {
            let id = ws.next_id();
            req.clear();
            req.extend_from_slice(b"{\"id\":");
            extract::push_u64(req, id);
            req.extend_from_slice(b",\"method\":\"");
            req.extend_from_slice(method);
            req.extend_from_slice(b"\",\"params\":{\"channel\":");
            extract::push_json_str(req, channel);
            req.extend_from_slice(b"}}");
            let t0 = Instant::now();
            let r = ws.request(req, id);
            let rtt = t0.elapsed();
            let name = String::from_utf8_lossy(method);
            match r {
                Ok(r) => match r.error_code {
                    None => Ok(rtt),
                    Some(code) => Err(format!("{what} {name} {channel}: {code}")),
                },
                Err(e) => Err(format!("{what} {name} {channel}: {e}")),
            }
        };
        let rtt = call(b"subscribe", &mut req)?;
        call(b"unsubscribe", &mut req)?;
        Ok(rtt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_latency_is_kind_minus_baseline_in_microseconds() {
        let mut b = hist::new_histogram();
        let mut m = hist::new_histogram();
        for i in 1..=100u64 {
            hist::record(&mut b, 40_000 + i * 100);
            hist::record(&mut m, 90_000 + i * 1_000);
        }
        let (b, m) = (hist::percentiles(&b), hist::percentiles(&m));
        let a = Added::of(&m, &b);
        assert!((a.p50_us - (140.0 - 45.0)).abs() < 0.5, "{a:?}");
        assert!((a.p99_us - (189.0 - 49.9)).abs() < 0.5, "{a:?}");
        assert!(Added::of(&b, &m).p50_us < 0.0);
    }

    #[test]
    fn hints_name_the_setting() {
        assert!(hint("subscribe x: ResourceExhausted").contains("REQUESTS_PER_SECOND"));
        assert!(hint("miss subscribe x: Unavailable").contains("subscribe_url"));
        assert!(hint("upgrade refused: HTTP/1.1 503").contains("PER_IP_MAX"));
        assert!(hint("anything else").is_empty());
    }
}
