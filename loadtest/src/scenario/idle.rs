//! `idle`: hold N subscribed connections, then prove them alive: server RSS per connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::workers::{
    fill_common, merge, progress_line, spawn_workers, specs, with_errors, Workers,
};
use crate::cli::{Common, IdleArgs};
use crate::client::ClientConfig;
use crate::harness::{
    channel_names, prepare_any_peer, source_plan, window_end, window_start, Env, SetupError,
    WindowEnd,
};
use crate::net::SourcePlan;
use crate::procstat;
use crate::publisher::{self, PublishResult, PublisherConfig, Via};
use crate::report::Report;

/// `idle`: hold N subscribed connections; RSS per connection.
pub fn idle(a: &IdleArgs) -> Result<Report, SetupError> {
    let common = &a.common;
    let n = a.connections;
    let env = prepare_any_peer(common, n + 1, true)?;
    let plan = source_plan(common, &env, n + 1);
    let channels = channel_names(&env.prefix, "idle", a.channels.max(1));
    let before = procstat::sample_all(&common.server_pid);
    let cfg = ClientConfig {
        nodes: env.nodes.clone(),
        token: env.token.clone(),
        anonymous: false,
        channels: channels.clone(),
        concurrency: common.concurrency.max(1),
        reconnect_every: None,
        record_setup_latency: false,
        coalesce: Duration::from_micros(common.coalesce_us),
        compress: common.compress,
        sse: common.sse,
        peer: common.peer,
    };
    let mut report = env.report("idle", common, &plan, n, channels.len(), n / channels.len());
    report.publish_pace = Some("one per channel after the hold");
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
    let held = hold(a, &workers);
    let self_rss1 = procstat::self_rss();
    let pres = prove_alive(&env, &plan, &channels, common, &workers);
    let (shared, results) = workers.join();
    let merged = merge(results, &pres.last_offsets);
    report.expected_deliveries = n as u64;
    fill_common(&mut report, &shared, merged, &held);
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
    report.rows.delivered = vec![report.deliveries_row()];
    report.finish();
    Ok(report)
}

/// Holds the connections for `--hold` seconds: the measurement window.
fn hold(a: &IdleArgs, workers: &Workers) -> WindowEnd {
    let common = &a.common;
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
                progress_line(&workers.shared, window.t0, &mut last, a.connections)
            );
        }
    }
    window_end(&window, &common.server_pid)
}

/// One publication per channel proves every held connection is still alive and subscribed.
fn prove_alive(
    env: &Env,
    plan: &SourcePlan,
    channels: &Arc<Vec<String>>,
    common: &Common,
    workers: &Workers,
) -> PublishResult {
    let n = workers.total();
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
        payload_shape: common.payload_shape,
        source: plan.for_conn(n),
        peer: common.peer,
    };
    let pres = publisher::run(&pcfg, &workers.shared);
    let deadline = Instant::now() + Duration::from_secs_f64(common.drain_timeout);
    while workers.shared.deliveries.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    pres
}
