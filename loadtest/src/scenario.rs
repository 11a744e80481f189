//! Scenario orchestration: start the receive workers, wait for every subscription, publish, drain,
//! then check and report. Server and load-generator CPU are sampled over the same window.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::checker::Anomalies;
use crate::cli::{
    ChatArgs, Common, FanoutArgs, FloorArgs, IdleArgs, PublishArgs, RecoveryArgs, StormArgs,
};
use crate::client::{self, ClientConfig, Shared, SubSpec, WorkerResult};
use crate::floor::{self, FloorConfig, FloorResult};
use crate::hist;
use crate::net::{self, Node, SourcePlan};
use crate::procstat::{self, ProcSample};
use crate::publisher::{self, PublishResult, PublisherConfig, Via};
use crate::report::Report;

/// A scenario that could not run at all (bad options, server unreachable). A run that ran but found
/// anomalies returns a [`Report`] with `passed == false` instead.
pub type SetupError = String;

pub(crate) struct Env {
    /// The servers' public listeners (one for a single node).
    pub(crate) nodes: Arc<Vec<Node>>,
    /// Where REST requests go, one per node.
    pub(crate) rest_nodes: Vec<Node>,
    pub(crate) token: String,
    pub(crate) api_key: String,
    pub(crate) prefix: String,
    pub(crate) threads: usize,
    pub(crate) nofile: u64,
}

impl Env {
    /// True when every node is on loopback (source addresses can be bound).
    fn all_loopback(&self) -> bool {
        self.nodes.iter().all(|n| n.addr.ip().is_loopback())
    }
}

pub(crate) fn resolve(addr: &str) -> Result<SocketAddr, SetupError> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

/// Resolves a list of HOST:PORT into nodes (the text kept as the Host header).
pub(crate) fn resolve_nodes(list: &[String]) -> Result<Vec<Node>, SetupError> {
    list.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            Ok(Node {
                addr: resolve(s)?,
                host: s.to_string(),
            })
        })
        .collect()
}

pub(crate) fn prepare(
    common: &Common,
    connections: usize,
    need_api_key: bool,
) -> Result<Env, SetupError> {
    let nofile = procstat::raise_nofile();
    // The load generator needs one descriptor per connection plus a few dozen of its own.
    if (connections as u64) + 64 > nofile {
        return Err(format!(
            "{connections} connections need {} open files but the limit is {nofile}: raise `ulimit -n` \
             (hard limit) or use fewer connections",
            connections + 64
        ));
    }
    let nodes = resolve_nodes(&common.server)?;
    if nodes.is_empty() {
        return Err("--server names no address".into());
    }
    if nodes.len() > u16::MAX as usize {
        return Err("too many --server addresses".into());
    }
    let rest_nodes = if common.rest.is_empty() {
        nodes.clone()
    } else {
        resolve_nodes(&common.rest)?
    };
    if rest_nodes.len() != nodes.len() && rest_nodes.len() != 1 {
        return Err(format!(
            "--rest gives {} addresses for {} --server nodes: give one, or one per node in the same order",
            rest_nodes.len(),
            nodes.len()
        ));
    }
    let secret = common
        .secret
        .clone()
        .ok_or("--secret (or BROADCASTER_AUTH_JWT_SECRET) is required to mint client tokens")?;
    let ttl = 24 * 3600;
    let token = crate::token::mint(&secret, "broadcaster-loadtest", ttl)?;
    let api_key = common
        .api_key
        .as_deref()
        .and_then(|k| k.split(',').next())
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    if need_api_key && api_key.is_empty() {
        return Err(
            "--api-key (or BROADCASTER_AUTH_API_KEYS) is required to publish over REST".into(),
        );
    }
    let threads = if common.threads > 0 {
        common.threads
    } else if !common.cpus.is_empty() {
        common.cpus.len()
    } else {
        procstat::available_cpus().saturating_sub(1).max(1)
    };
    let prefix = common.channel_prefix.clone().unwrap_or_else(|| {
        format!(
            "lt-{}-{}",
            std::process::id(),
            crate::schedule::now_unix_ns() % 100_000
        )
    });
    Ok(Env {
        nodes: Arc::new(nodes),
        rest_nodes,
        token,
        api_key,
        prefix,
        threads: threads.min(connections.max(1)),
        nofile,
    })
}

pub(crate) fn source_plan(common: &Common, env: &Env, connections: usize) -> SourcePlan {
    if common.no_source_bind || !env.all_loopback() {
        return SourcePlan::none();
    }
    // Keep each source address's share of the ephemeral range small: connect()'s search for a free
    // port grows with occupancy. Measured here: 19,000 connections from one address cost the load
    // generator 321 µs of (kernel) CPU per connect and ran at 2,756 connections/s; from 8 addresses,
    // 27 µs and 21,281/s.
    let per_addr = (net::ephemeral_ports() as usize / 8).clamp(1000, 50_000);
    SourcePlan::loopback(connections, per_addr, common.source_ips.max(1))
}

/// Running receive workers.
struct Workers {
    shared: Arc<Shared>,
    handles: Vec<std::thread::JoinHandle<WorkerResult>>,
    /// Which worker and position each subscriber went to, to put results back in order.
    total: usize,
}

fn spawn_workers(env: &Env, common: &Common, cfg: ClientConfig, specs: Vec<SubSpec>) -> Workers {
    let shared = Arc::new(Shared::default());
    let total = specs.len();
    let mut per: Vec<Vec<SubSpec>> = vec![Vec::new(); env.threads];
    for (i, s) in specs.into_iter().enumerate() {
        per[i % env.threads].push(s);
    }
    let handles = per
        .into_iter()
        .enumerate()
        .map(|(t, subs)| {
            let (cfg, shared) = (cfg.clone(), shared.clone());
            let cpu = (!common.cpus.is_empty()).then(|| common.cpus[t % common.cpus.len()]);
            std::thread::Builder::new()
                .name(format!("lt-recv-{t}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        if let Err(e) = procstat::pin_current_thread(c) {
                            eprintln!("pinning a receive thread to CPU {c} failed: {e}");
                        }
                    }
                    client::run_worker(cfg, subs, shared, t as u64 + 1)
                })
                .expect("spawning a thread")
        })
        .collect();
    Workers {
        shared,
        handles,
        total,
    }
}

impl Workers {
    fn join(self) -> (Arc<Shared>, Vec<WorkerResult>) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let results = self
            .handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .collect();
        (self.shared, results)
    }

    /// Waits until every connection subscribed (or failed), printing progress.
    fn wait_subscribed(&self, common: &Common, what: &str) -> Result<Duration, String> {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(common.setup_timeout);
        let mut next_line = t0 + Duration::from_secs(1);
        loop {
            let sub = self.shared.subscribed.load(Ordering::Relaxed) as usize;
            let failed = self.shared.failed.load(Ordering::Relaxed) as usize;
            if sub + failed >= self.total {
                if failed > 0 {
                    return Err(format!(
                        "{failed} of {} connections failed to {what}",
                        self.total
                    ));
                }
                return Ok(t0.elapsed());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "only {sub} of {} connections subscribed within {:.0} s",
                    self.total, common.setup_timeout
                ));
            }
            if now >= next_line && !common.quiet {
                eprintln!(
                    "[{:6.1}s] setup: upgraded {} subscribed {sub}/{} failed {failed}",
                    t0.elapsed().as_secs_f64(),
                    self.shared.upgraded.load(Ordering::Relaxed),
                    self.total
                );
                next_line += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Per-subscriber results merged.
#[derive(Default)]
struct Merged {
    hist: Option<Histogram<u64>>,
    seq: Anomalies,
    offsets: Anomalies,
    seq_offset_mismatch: u64,
    frames: u64,
    frame_bytes: u64,
    untimed: u64,
    never_subscribed: u64,
}

fn merge(results: Vec<WorkerResult>, last_offsets: &[u64]) -> Merged {
    let mut m = Merged::default();
    let mut h = hist::new_histogram();
    for r in results {
        let _ = h.add(&r.hist);
        m.seq_offset_mismatch += r.seq_offset_mismatch;
        m.frames += r.frames;
        m.frame_bytes += r.frame_bytes;
        m.untimed += r.untimed;
        for s in &r.subs {
            if !s.subscribed {
                m.never_subscribed += 1;
                continue;
            }
            let last = last_offsets.get(s.channel as usize).copied().unwrap_or(0);
            let (seq, off) = s.finish(last);
            m.seq.add(&seq);
            m.offsets.add(&off);
        }
    }
    m.hist = Some(h);
    m
}

pub(crate) struct Window {
    pub(crate) t0: Instant,
    self_cpu0: Duration,
    self_sys0: Duration,
    server0: Option<ProcSample>,
}

pub(crate) fn window_start(pids: &[u32]) -> Window {
    Window {
        t0: Instant::now(),
        self_cpu0: procstat::self_cpu(),
        self_sys0: procstat::self_cpu_user_sys().1,
        server0: procstat::sample_all(pids),
    }
}

pub(crate) struct WindowEnd {
    pub(crate) elapsed: Duration,
    pub(crate) self_cpu: Duration,
    pub(crate) self_sys: Duration,
    pub(crate) server_sys_ns: Option<u64>,
    pub(crate) server_cpu_ns: Option<u64>,
    pub(crate) server_before: Option<ProcSample>,
    pub(crate) server_after: Option<ProcSample>,
}

pub(crate) fn window_end(w: &Window, pids: &[u32]) -> WindowEnd {
    let after = procstat::sample_all(pids);
    WindowEnd {
        elapsed: w.t0.elapsed(),
        self_cpu: procstat::self_cpu().saturating_sub(w.self_cpu0),
        self_sys: procstat::self_cpu_user_sys().1.saturating_sub(w.self_sys0),
        server_sys_ns: match (w.server0, after) {
            (Some(a), Some(b)) => Some(b.sys_ticks_ns.saturating_sub(a.sys_ticks_ns)),
            _ => None,
        },
        server_cpu_ns: match (w.server0, after) {
            (Some(a), Some(b)) => Some(b.cpu_ns().saturating_sub(a.cpu_ns())),
            _ => None,
        },
        server_before: w.server0,
        server_after: after,
    }
}

fn progress_line(
    shared: &Shared,
    t0: Instant,
    last: &mut (Instant, u64),
    expected_subs: usize,
) -> String {
    let now = Instant::now();
    let d = shared.deliveries.load(Ordering::Relaxed);
    let rate = (d - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
    *last = (now, d);
    let max = shared.interval_max_ns.swap(0, Ordering::Relaxed);
    format!(
        "[{:6.1}s] subs {}/{} published {} delivered {} ({:.1}k/s) max latency {} ms anomalies {} failed {} reconnects {}",
        now.duration_since(t0).as_secs_f64(),
        shared.subscribed.load(Ordering::Relaxed),
        expected_subs,
        shared.published.load(Ordering::Relaxed),
        d,
        rate / 1e3,
        hist::ms(max),
        shared.anomalies.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
        shared.reconnects.load(Ordering::Relaxed),
    )
}

struct PubSub<'a> {
    name: &'static str,
    common: &'a Common,
    publish: &'a PublishArgs,
    channels: usize,
    per_channel: usize,
    reconnect_every: Option<Duration>,
}

/// `fanout`: S subscribers on one channel.
pub fn fanout(a: &FanoutArgs) -> Result<Report, SetupError> {
    run_pubsub(PubSub {
        name: "fanout",
        common: &a.common,
        publish: &a.publish,
        channels: 1,
        per_channel: a.subscribers,
        reconnect_every: None,
    })
}

/// `chat`: C channels x K subscribers.
pub fn chat(a: &ChatArgs) -> Result<Report, SetupError> {
    run_pubsub(PubSub {
        name: "chat",
        common: &a.common,
        publish: &a.publish,
        channels: a.channels.max(1),
        per_channel: a.per_channel,
        reconnect_every: None,
    })
}

/// `recovery`: subscribers keep reconnecting with `since`.
pub fn recovery(a: &RecoveryArgs) -> Result<Report, SetupError> {
    run_pubsub(PubSub {
        name: "recovery",
        common: &a.common,
        publish: &a.publish,
        channels: 1,
        per_channel: a.subscribers,
        reconnect_every: Some(Duration::from_secs_f64(a.reconnect_every.max(0.01))),
    })
}

pub(crate) fn channel_names(prefix: &str, name: &str, n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| format!("{prefix}/{name}/{i}")).collect())
}

/// Subscriber `i` takes channel `i % channels` and, within its channel, the nodes in turn, so every
/// channel's subscribers are spread evenly over the nodes whatever the channel and node counts.
fn specs(plan: &SourcePlan, n: usize, channels: usize, nodes: usize) -> Vec<SubSpec> {
    let channels = channels.max(1);
    (0..n)
        .map(|i| SubSpec {
            channel: (i % channels) as u32,
            node: ((i / channels) % nodes.max(1)) as u16,
            source: plan.for_conn(i),
        })
        .collect()
}

fn run_pubsub(p: PubSub<'_>) -> Result<Report, SetupError> {
    let common = p.common;
    let total = p.channels * p.per_channel;
    let env = prepare(common, total + 1, p.publish.via == Via::Rest)?;
    let plan = source_plan(common, &env, total + 1);
    let channels = channel_names(&env.prefix, p.name, p.channels);
    let cfg = ClientConfig {
        nodes: env.nodes.clone(),
        token: env.token.clone(),
        channels: channels.clone(),
        concurrency: common.concurrency.max(1),
        reconnect_every: p.reconnect_every,
        record_setup_latency: false,
        coalesce: Duration::from_micros(common.coalesce_us),
    };
    let workers = spawn_workers(
        &env,
        common,
        cfg,
        specs(&plan, total, p.channels, env.nodes.len()),
    );
    let mut report = Report::new(p.name, common, &env.nodes);
    report.publish_all = p.publish.publish_all && env.nodes.len() > 1;
    report.connections = total as u64;
    report.channels = p.channels as u64;
    report.subscribers_per_channel = p.per_channel as u64;
    report.loadgen_threads = env.threads as u64;
    report.open_files_limit = env.nofile;
    report.source_addresses = plan.addrs().len() as u64;
    report.rate = p.publish.rate;
    report.via = Some(p.publish.via);
    report.window = (p.publish.rate <= 0.0).then_some(p.publish.window);
    report.pipeline = (p.publish.rate <= 0.0).then_some(p.publish.pipeline.max(1));

    if let Err(e) = workers.wait_subscribed(common, "subscribe") {
        let (shared, _) = workers.join();
        return Err(with_errors(e, &shared));
    }
    let duration = match (p.publish.messages, p.publish.duration) {
        (None, None) => Some(Duration::from_secs(10)),
        (_, d) => d.map(Duration::from_secs_f64),
    };
    let pcfg = PublisherConfig {
        rest_nodes: env.rest_nodes.clone(),
        ws_nodes: env.nodes.to_vec(),
        publish_all: p.publish.publish_all,
        via: p.publish.via,
        api_key: env.api_key.clone(),
        token: env.token.clone(),
        channels: channels.clone(),
        rate: p.publish.rate.max(0.0),
        count: p.publish.messages,
        duration,
        window: p.publish.window.max(1),
        pipeline: p.publish.pipeline.max(1),
        deliveries_per_publication: p.per_channel as u64,
        payload_bytes: common.payload_bytes,
        source: plan.for_conn(total),
    };

    let writes0 = write_counts(&env.rest_nodes);
    let window = window_start(&common.server_pid);
    let shared = workers.shared.clone();
    let pub_cpu = common.cpus.last().copied();
    let publisher = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("lt-publish".into())
            .spawn(move || {
                if let Some(c) = pub_cpu {
                    let _ = procstat::pin_current_thread(c);
                }
                publisher::run(&pcfg, &shared)
            })
            .map_err(|e| e.to_string())?
    };
    let mut last = (Instant::now(), 0u64);
    let mut next_line = window.t0 + Duration::from_secs(1);
    while !publisher.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
        if Instant::now() >= next_line {
            if !common.quiet {
                eprintln!("{}", progress_line(&shared, window.t0, &mut last, total));
            }
            next_line += Duration::from_secs(1);
        }
    }
    let pres: PublishResult = publisher
        .join()
        .map_err(|_| "publisher thread panicked".to_string())?;
    let expected: u64 = pres.counts.iter().map(|c| c * p.per_channel as u64).sum();
    let drain_deadline = Instant::now() + Duration::from_secs_f64(common.drain_timeout);
    while shared.deliveries.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_micros(200));
        if shared.failed.load(Ordering::Relaxed) > 0 && p.reconnect_every.is_none() {
            break;
        }
    }
    let end = window_end(&window, &common.server_pid);
    if let (Some(a), Some(b)) = (writes0, write_counts(&env.rest_nodes)) {
        let (frames, writes) = (b.0 - a.0, b.1 - a.1);
        report.frames_per_write = (writes > 0.0).then(|| frames / writes);
    }
    if !common.quiet {
        eprintln!("{}", progress_line(&shared, window.t0, &mut last, total));
    }
    let (shared, results) = workers.join();
    let merged = merge(results, &pres.last_offsets);
    report.expected_deliveries = expected;
    fill_common(&mut report, &shared, merged, &end, common);
    report.deliveries_per_s = report.deliveries as f64 / pres.elapsed_s.max(1e-9);
    if pres.errors > 0 {
        report.fail(format!("{} publications failed", pres.errors));
    }
    report.publish = Some(pres);
    if let (Some(cpu), d) = (end.server_cpu_ns, report.deliveries) {
        report.server_cpu_us_per_delivery = Some(cpu as f64 / 1e3 / d.max(1) as f64);
    }
    report.loadgen_cpu_us_per_delivery =
        end.self_cpu.as_secs_f64() * 1e6 / report.deliveries.max(1) as f64;
    if common.floor {
        measure_floor(&mut report, common, total);
    }
    report.finish();
    Ok(report)
}

fn with_errors(msg: String, shared: &Shared) -> String {
    let errs = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    if errs.is_empty() {
        msg
    } else {
        format!("{msg}; first errors:\n  {}", errs.join("\n  "))
    }
}

fn fill_common(
    report: &mut Report,
    shared: &Shared,
    merged: Merged,
    end: &WindowEnd,
    common: &Common,
) {
    report.deliveries = shared.deliveries.load(Ordering::Relaxed);
    report.measured_s = end.elapsed.as_secs_f64();
    let h = merged.hist.unwrap_or_else(hist::new_histogram);
    report.latency = hist::percentiles(&h);
    report.seq = merged.seq;
    report.offsets = merged.offsets;
    report.seq_offset_mismatch = merged.seq_offset_mismatch;
    report.untimed = merged.untimed;
    report.frame_bytes_mean =
        (merged.frames > 0).then(|| merged.frame_bytes as f64 / merged.frames as f64);
    report.connection_failures = shared.failed.load(Ordering::Relaxed);
    report.reconnects = shared.reconnects.load(Ordering::Relaxed);
    report.unrecovered = shared.unrecovered.load(Ordering::Relaxed);
    report.errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    report.loadgen_cpu_s = end.self_cpu.as_secs_f64();
    report.loadgen_cpu_sys_fraction =
        end.self_sys.as_secs_f64() / end.self_cpu.as_secs_f64().max(1e-9);
    if let (Some(sys), Some(a), Some(b)) = (end.server_sys_ns, end.server_before, end.server_after)
    {
        // Both from /proc/PID/stat ticks, so the fraction is consistent even when schedstat is used
        // for the total.
        let ticks = b.cpu_ticks_ns.saturating_sub(a.cpu_ticks_ns);
        report.server_cpu_sys_fraction = (ticks > 0).then(|| sys as f64 / ticks as f64);
    }
    report.loadgen_rss_bytes = procstat::self_rss();
    if let Some(cpu) = end.server_cpu_ns {
        report.server_cpu_s = Some(cpu as f64 / 1e9);
    }
    report.server_rss_before_bytes = end.server_before.map(|s| s.rss_bytes);
    report.server_rss_after_bytes = end.server_after.map(|s| s.rss_bytes);
    if merged.never_subscribed > 0 {
        report.fail(format!(
            "{} subscribers never subscribed",
            merged.never_subscribed
        ));
    }
    report.histogram = Some(h);
    let _ = common;
}

/// The servers' broadcasts queued and socket writes that carried broadcasts (each such write is
/// one `publish_to_write_seconds` observation), summed over the nodes; None if a scrape failed.
fn write_counts(nodes: &[Node]) -> Option<(f64, f64)> {
    let mut sum = (0.0, 0.0);
    for node in nodes {
        let text = crate::metrics::scrape_text(node).ok()?;
        sum.0 += crate::metrics::sample(&text, "messages_sent_total")?;
        sum.1 += crate::metrics::sample(&text, "publish_to_write_seconds_count")?;
    }
    Some(sum)
}

fn measure_floor(report: &mut Report, common: &Common, sockets: usize) {
    let frame_bytes = report
        .frame_bytes_mean
        .map(|b| b.round() as usize)
        .unwrap_or_else(|| {
            floor::estimated_broadcast_frame_bytes(common.payload_bytes, "lt/fanout/0")
        });
    if !common.quiet {
        eprintln!("measuring the kernel floor: {sockets} sockets, {frame_bytes}-byte frames, 1 and {} per send", common.floor_k);
    }
    let cfg = FloorConfig {
        sockets,
        frame_bytes,
        frames_per_send: vec![common.floor_k],
        seconds: 2.0,
        passes_per_s: 0.0,
        group: 0,
        pin: false,
    };
    match floor::run(&cfg) {
        Ok(f) => report.set_floor(f),
        Err(e) => report.errors.push(format!("floor measurement failed: {e}")),
    }
    // At a fixed rate each publication goes to one channel's subscribers: the paced floor
    // writes that many sockets per pass, `rate` passes a second, the next group each pass.
    if report.rate > 0.0 && report.channels > 0 {
        let passes = report.rate;
        let group = sockets.div_ceil(report.channels as usize);
        let cfg = FloorConfig {
            frames_per_send: Vec::new(),
            seconds: 3.0f64.max(50.0 / passes),
            passes_per_s: passes,
            group,
            ..cfg
        };
        match floor::run(&cfg) {
            Ok(f) => report.set_paced_floor(passes, group, &f),
            Err(e) => report.errors.push(format!("paced floor failed: {e}")),
        }
    }
}

/// `idle`: hold N subscribed connections; RSS per connection.
pub fn idle(a: &IdleArgs) -> Result<Report, SetupError> {
    let common = &a.common;
    let n = a.connections;
    let env = prepare(common, n + 1, true)?;
    let plan = source_plan(common, &env, n + 1);
    let channels = channel_names(&env.prefix, "idle", a.channels.max(1));
    let before = procstat::sample_all(&common.server_pid);
    let cfg = ClientConfig {
        nodes: env.nodes.clone(),
        token: env.token.clone(),
        channels: channels.clone(),
        concurrency: common.concurrency.max(1),
        reconnect_every: None,
        record_setup_latency: false,
        coalesce: Duration::from_micros(common.coalesce_us),
    };
    let mut report = Report::new("idle", common, &env.nodes);
    report.connections = n as u64;
    report.channels = channels.len() as u64;
    report.subscribers_per_channel = (n / channels.len()) as u64;
    report.loadgen_threads = env.threads as u64;
    report.open_files_limit = env.nofile;
    report.source_addresses = plan.addrs().len() as u64;
    let self_rss0 = procstat::self_rss();
    let workers = spawn_workers(
        &env,
        common,
        cfg,
        specs(&plan, n, channels.len(), env.nodes.len()),
    );
    if let Err(e) = workers.wait_subscribed(common, "subscribe") {
        let (shared, _) = workers.join();
        return Err(with_errors(e, &shared));
    }
    let window = window_start(&common.server_pid);
    let hold = Duration::from_secs_f64(a.hold);
    let mut last = (Instant::now(), 0u64);
    while window.t0.elapsed() < hold {
        std::thread::sleep(Duration::from_secs(1).min(hold.saturating_sub(window.t0.elapsed())));
        if !common.quiet {
            let rss = procstat::sample_all(&common.server_pid)
                .map(|s| format!(" server RSS {:.1} MiB", s.rss_bytes as f64 / 1048576.0))
                .unwrap_or_default();
            eprintln!(
                "{}{rss}",
                progress_line(&workers.shared, window.t0, &mut last, n)
            );
        }
    }
    let held = window_end(&window, &common.server_pid);
    let self_rss1 = procstat::self_rss();
    // One publication per channel proves every held connection is still alive and subscribed.
    let pcfg = PublisherConfig {
        rest_nodes: env.rest_nodes.clone(),
        ws_nodes: env.nodes.to_vec(),
        publish_all: false,
        via: Via::Rest,
        api_key: env.api_key.clone(),
        token: env.token.clone(),
        channels: channels.clone(),
        rate: 0.0,
        count: Some(channels.len() as u64),
        duration: None,
        window: u64::MAX / 4,
        pipeline: 1,
        deliveries_per_publication: 1,
        payload_bytes: common.payload_bytes,
        source: plan.for_conn(n),
    };
    let pres = publisher::run(&pcfg, &workers.shared);
    let expected = n as u64;
    let deadline = Instant::now() + Duration::from_secs_f64(common.drain_timeout);
    while workers.shared.deliveries.load(Ordering::Relaxed) < expected && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (shared, results) = workers.join();
    let merged = merge(results, &pres.last_offsets);
    report.expected_deliveries = expected;
    fill_common(&mut report, &shared, merged, &held, common);
    report.measured_s = held.elapsed.as_secs_f64();
    if pres.errors > 0 {
        report.fail(format!("{} publications failed", pres.errors));
    }
    report.publish = Some(pres);
    report.server_rss_before_bytes = before.map(|s| s.rss_bytes);
    if let (Some(b), Some(a)) = (before, held.server_after) {
        report.server_rss_bytes_per_connection =
            Some((a.rss_bytes as f64 - b.rss_bytes as f64) / n.max(1) as f64);
    }
    report.server_cpu_s = held.server_cpu_ns.map(|c| c as f64 / 1e9);
    report.loadgen_rss_bytes_per_connection =
        Some((self_rss1 as f64 - self_rss0 as f64) / n.max(1) as f64);
    report.finish();
    Ok(report)
}

/// `storm`: connect + auth + subscribe N connections as fast as possible.
pub fn storm(a: &StormArgs) -> Result<Report, SetupError> {
    let common = &a.common;
    let n = a.connections;
    let env = prepare(common, n, false)?;
    let plan = source_plan(common, &env, n);
    let channels = channel_names(&env.prefix, "storm", a.channels.max(1));
    let cfg = ClientConfig {
        nodes: env.nodes.clone(),
        token: env.token.clone(),
        channels: channels.clone(),
        concurrency: common.concurrency.max(1),
        reconnect_every: None,
        record_setup_latency: true,
        coalesce: Duration::ZERO,
    };
    let mut report = Report::new("storm", common, &env.nodes);
    report.connections = n as u64;
    report.channels = channels.len() as u64;
    report.subscribers_per_channel = (n / channels.len()) as u64;
    report.loadgen_threads = env.threads as u64;
    report.open_files_limit = env.nofile;
    report.source_addresses = plan.addrs().len() as u64;
    report.latency_kind = "connect_to_subscribed";
    let window = window_start(&common.server_pid);
    let workers = spawn_workers(
        &env,
        common,
        cfg,
        specs(&plan, n, channels.len(), env.nodes.len()),
    );
    let setup = workers.wait_subscribed(common, "connect, auth and subscribe");
    let end = window_end(&window, &common.server_pid);
    let (shared, results) = workers.join();
    let merged = merge(results, &vec![0; channels.len()]);
    fill_common(&mut report, &shared, merged, &end, common);
    let ok = shared.subscribed.load(Ordering::Relaxed);
    if let Err(e) = setup {
        report.fail(e);
    }
    report.subscribed = Some(ok);
    report.connections_per_s = Some(ok as f64 / end.elapsed.as_secs_f64().max(1e-9));
    if let Some(cpu) = end.server_cpu_ns {
        report.server_cpu_us_per_connection = Some(cpu as f64 / 1e3 / ok.max(1) as f64);
    }
    report.loadgen_cpu_us_per_connection =
        Some(end.self_cpu.as_secs_f64() * 1e6 / ok.max(1) as f64);
    report.finish();
    Ok(report)
}

/// `soak`: connections churn for a long while; nothing lost, nothing leaked (see [`crate::soak`]).
pub fn soak(a: &crate::cli::SoakArgs) -> Result<Report, SetupError> {
    crate::soak::run(a)
}

/// `floor`: the kernel floor alone.
pub fn floor_only(a: &FloorArgs) -> Result<FloorResult, SetupError> {
    let frame_bytes = a
        .frame_bytes
        .unwrap_or_else(|| floor::estimated_broadcast_frame_bytes(a.payload_bytes, "lt/fanout/0"));
    floor::run(&FloorConfig {
        sockets: a.sockets,
        frame_bytes,
        frames_per_send: a.frames_per_send.clone(),
        seconds: a.seconds,
        passes_per_s: a.passes_per_s,
        group: a.group,
        pin: a.pin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_alternate_nodes_within_each_channel() {
        // 2 channels x 4 subscribers over 2 nodes: every channel gets 2 subscribers on each node,
        // which `i % nodes` alone would not do (channel 0 would be all on node 0).
        let s = specs(&SourcePlan::none(), 8, 2, 2);
        for ch in 0..2u32 {
            let nodes: Vec<u16> = s
                .iter()
                .filter(|x| x.channel == ch)
                .map(|x| x.node)
                .collect();
            assert_eq!(nodes, [0, 1, 0, 1], "channel {ch}");
        }
        // One channel: plain round robin; one node: always node 0.
        let s = specs(&SourcePlan::none(), 5, 1, 2);
        assert_eq!(
            s.iter().map(|x| x.node).collect::<Vec<_>>(),
            [0, 1, 0, 1, 0]
        );
        assert!(specs(&SourcePlan::none(), 5, 3, 1)
            .iter()
            .all(|x| x.node == 0));
    }

    #[test]
    fn nodes_resolve_in_order() {
        let n = resolve_nodes(&["127.0.0.1:1".into(), " 127.0.0.1:2 ".into(), "".into()]).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].addr, "127.0.0.1:2".parse().unwrap());
        assert_eq!(n[1].host, "127.0.0.1:2");
        assert!(resolve_nodes(&["no-such-host.invalid:1".into()]).is_err());
    }
}
