//! The publish-and-receive run that `fanout`, `chat` and `recovery` share: subscribers on C
//! channels, one publisher, the measurement window from the first publication to the last
//! delivery ([`publish_window`], which `scoreboard` uses too), then the checks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::floor::measure_floor;
use super::workers::{
    fill_common, merge, progress_line, spawn_workers, specs, with_errors, Workers,
};
use crate::cli::{Common, Peer, PublishArgs};
use crate::client::ClientConfig;
use crate::harness::{
    channel_names, prepare, prepare_any_peer, source_plan, window_end, window_start, Env,
    SetupError, WindowEnd,
};
use crate::net::{Node, SourcePlan};
use crate::procstat;
use crate::publisher::{self, PublishResult, PublisherConfig, Via};
use crate::report::Report;

/// What differs between the scenarios of this shape.
pub(super) struct PubSub<'a> {
    pub(super) name: &'static str,
    pub(super) common: &'a Common,
    pub(super) publish: &'a PublishArgs,
    pub(super) channels: usize,
    pub(super) per_channel: usize,
    /// Recovery: mean time between a subscriber's reconnects.
    pub(super) reconnect_every: Option<Duration>,
}

impl PubSub<'_> {
    fn subscribers(&self) -> usize {
        self.channels * self.per_channel
    }
}

/// A run whose subscribers are all subscribed.
struct Subscribed {
    env: Env,
    plan: SourcePlan,
    channels: Arc<Vec<String>>,
    workers: Workers,
    report: Report,
}

/// What publishing left for the verdict.
pub(super) struct Published {
    pub(super) pres: PublishResult,
    /// Deliveries the publications accepted should cause.
    pub(super) expected: u64,
    pub(super) end: WindowEnd,
    /// Broadcast frames per server socket write over the window (from `/metrics`), when scraped.
    pub(super) frames_per_write: Option<f64>,
    /// The broker's CPU over the window (`--broker-pid`) above its idle rate, ns.
    pub(super) broker_cpu_ns: Option<u64>,
}

/// Runs the scenario `p` describes.
pub(super) fn run_pubsub(p: PubSub<'_>) -> Result<Report, SetupError> {
    let mut run = subscribe(&p)?;
    let published = publish(&p, &mut run)?;
    Ok(conclude(&p, run, published))
}

/// Starts the subscribers and waits until every one subscribed.
fn subscribe(p: &PubSub<'_>) -> Result<Subscribed, SetupError> {
    let common = p.common;
    let total = p.subscribers();
    let need_api_key = p.publish.via == Via::Rest;
    let env = if p.reconnect_every.is_some() {
        // Recovery resubscribes with `since`, which Nchan has no counterpart for.
        prepare(common, total + 1, need_api_key)?
    } else {
        if common.peer == Peer::Nchan && p.publish.via != Via::Rest {
            return Err(
                "--via ws needs --peer broadcaster: Nchan is published to over HTTP \
                        only (POST /pub/<channel>)"
                    .into(),
            );
        }
        prepare_any_peer(common, total + 1, need_api_key)?
    };
    let plan = source_plan(common, &env, total + 1);
    let channels = channel_names(&env.prefix, p.name, p.channels);
    let cfg = ClientConfig {
        nodes: env.nodes.clone(),
        token: env.token.clone(),
        anonymous: false,
        channels: channels.clone(),
        concurrency: common.concurrency.max(1),
        reconnect_every: p.reconnect_every,
        record_setup_latency: false,
        coalesce: Duration::from_micros(common.coalesce_us),
        compress: common.compress,
        sse: common.sse,
        peer: common.peer,
    };
    let workers = spawn_workers(
        &env,
        common,
        cfg,
        specs(&plan, total, p.channels, env.nodes.len()),
    );
    let mut report = env.report(p.name, common, &plan, total, p.channels, p.per_channel);
    report.publish_all = p.publish.publish_all && env.nodes.len() > 1;
    report.rate = p.publish.rate;
    report.via = Some(p.publish.via);
    report.window = (p.publish.rate <= 0.0).then_some(p.publish.window);
    report.pipeline = (p.publish.rate <= 0.0).then_some(p.publish.pipeline.max(1));

    if let Err(e) = workers.wait_subscribed(common, "subscribe") {
        let (shared, _) = workers.join();
        return Err(with_errors(e, &shared));
    }
    Ok(Subscribed {
        env,
        plan,
        channels,
        workers,
        report,
    })
}

fn publisher_config(p: &PubSub<'_>, run: &Subscribed) -> PublisherConfig {
    let duration = match (p.publish.messages, p.publish.duration) {
        (None, None) => Some(Duration::from_secs(10)),
        (_, d) => d.map(Duration::from_secs_f64),
    };
    PublisherConfig {
        rest_nodes: run.env.rest_nodes.clone(),
        ws_nodes: run.env.nodes.to_vec(),
        publish_all: p.publish.publish_all,
        via: p.publish.via,
        api_key: run.env.api_key.clone(),
        token: run.env.token.clone(),
        channels: run.channels.clone(),
        rate: p.publish.rate.max(0.0),
        count: p.publish.messages,
        duration,
        window: p.publish.window.max(1),
        pipeline: p.publish.pipeline.max(1),
        deliveries_per_publication: p.per_channel as u64,
        payload_bytes: p.common.payload_bytes,
        payload_shape: p.common.payload_shape,
        source: run.plan.for_conn(p.subscribers()),
        peer: p.common.peer,
    }
}

/// Publishes, then waits for the deliveries: the measurement window.
fn publish(p: &PubSub<'_>, run: &mut Subscribed) -> Result<Published, SetupError> {
    let pcfg = publisher_config(p, run);
    let reconnecting = p.reconnect_every.is_some();
    let published = publish_window(p.common, pcfg, &run.workers, p.per_channel, reconnecting)?;
    run.report.frames_per_write = published.frames_per_write;
    if let Some(ns) = published.broker_cpu_ns {
        run.report.broker_cpu_s = Some(ns as f64 / 1e9);
        let n = published.pres.published.max(1) as f64;
        run.report.broker_cpu_us_per_publication = Some(ns as f64 / 1e3 / n);
    }
    Ok(published)
}

/// Publishes with `pcfg` (the publisher's thread on the last `--cpus` entry) while `workers`
/// receive, then waits up to `--drain-timeout` for every delivery, `per_channel` per publication:
/// the measurement window, from the first publication to the last delivery. A failed connection
/// cuts the wait short unless the subscribers are `reconnecting`.
pub(super) fn publish_window(
    common: &Common,
    pcfg: PublisherConfig,
    workers: &Workers,
    per_channel: usize,
    reconnecting: bool,
) -> Result<Published, SetupError> {
    let total = workers.total();
    // Nchan has no /metrics to count its writes from.
    let rest_nodes = match pcfg.peer {
        Peer::Broadcaster => pcfg.rest_nodes.clone(),
        Peer::Nchan => Vec::new(),
    };
    let writes0 = write_counts(&rest_nodes);
    let idle = broker_idle_ns_per_s(&common.broker_pid);
    let window = window_start(&common.server_pid);
    let broker0 = procstat::sample_all(&common.broker_pid);
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
    let expected: u64 = pres.counts.iter().map(|c| c * per_channel as u64).sum();
    let drain_deadline = Instant::now() + Duration::from_secs_f64(common.drain_timeout);
    while shared.deliveries.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_micros(200));
        if shared.failed.load(Ordering::Relaxed) > 0 && !reconnecting {
            break;
        }
    }
    let end = window_end(&window, &common.server_pid);
    let broker_cpu_ns = match (broker0, procstat::sample_all(&common.broker_pid), idle) {
        (Some(a), Some(b), Some(idle)) => {
            let background = idle * end.elapsed.as_secs_f64();
            Some((b.cpu_ns().saturating_sub(a.cpu_ns()) as f64 - background).max(0.0) as u64)
        }
        _ => None,
    };
    let frames_per_write = match (writes0, write_counts(&rest_nodes)) {
        (Some(a), Some(b)) => {
            let (frames, writes) = (b.0 - a.0, b.1 - a.1);
            (writes > 0.0).then(|| frames / writes)
        }
        _ => None,
    };
    if !common.quiet {
        eprintln!("{}", progress_line(&shared, window.t0, &mut last, total));
    }
    Ok(Published {
        pres,
        expected,
        end,
        frames_per_write,
        broker_cpu_ns,
    })
}

/// The broker's CPU while nothing is published (its timers, a cluster's bus, the nodes'
/// liveness checks), ns per second over one second, so that what a publication costs it is not
/// drowned in what it costs anyway.
fn broker_idle_ns_per_s(pids: &[u32]) -> Option<f64> {
    let t0 = Instant::now();
    let a = procstat::sample_all(pids)?;
    std::thread::sleep(Duration::from_secs(1));
    let b = procstat::sample_all(pids)?;
    Some(b.cpu_ns().saturating_sub(a.cpu_ns()) as f64 / t0.elapsed().as_secs_f64())
}

/// Stops the subscribers, checks what they received and fills the report.
fn conclude(p: &PubSub<'_>, run: Subscribed, published: Published) -> Report {
    let Subscribed {
        workers,
        mut report,
        ..
    } = run;
    let Published {
        pres,
        expected,
        end,
        ..
    } = published;
    let (shared, results) = workers.join();
    let merged = merge(results, &pres.last_offsets);
    report.expected_deliveries = expected;
    fill_common(&mut report, &shared, merged, &end);
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
    if p.common.floor {
        measure_floor(&mut report, p.common, p.subscribers());
    }
    report.rows.delivered = vec![report.deliveries_row(), report.delivery_rate_row()];
    report.rows.cost = vec![report.cpu_per_delivery_row()];
    report.finish();
    report
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
