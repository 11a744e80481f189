//! `storm`: connect, upgrade, authenticate and subscribe N connections as fast as possible.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::workers::{fill_common, merge, spawn_workers, specs};
use crate::cli::StormArgs;
use crate::client::ClientConfig;
use crate::harness::{
    channel_names, prepare_any_peer, source_plan, window_end, window_start, SetupError,
};
use crate::report::{row, with_pid, Report};

/// `storm`: connect + auth + subscribe N connections as fast as possible.
pub fn storm(a: &StormArgs) -> Result<Report, SetupError> {
    let common = &a.common;
    let n = a.connections;
    let env = prepare_any_peer(common, n, false)?;
    let plan = source_plan(common, &env, n);
    let channels = channel_names(&env.prefix, "storm", a.channels.max(1));
    let cfg = ClientConfig {
        nodes: env.nodes.clone(),
        token: env.token.clone(),
        anonymous: false,
        channels: channels.clone(),
        concurrency: common.concurrency.max(1),
        reconnect_every: None,
        record_setup_latency: true,
        coalesce: Duration::ZERO,
        compress: common.compress,
        sse: common.sse,
        peer: common.peer,
    };
    let mut report = env.report(
        "storm",
        common,
        &plan,
        n,
        channels.len(),
        n / channels.len(),
    );
    report.latency_kind = "connect_to_subscribed";
    report.deliveries_unchecked = true;
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
    fill_common(&mut report, &shared, merged, &end);
    let ok = shared.subscribed.load(Ordering::Relaxed);
    if let Err(e) = setup {
        report.fail(e);
    }
    report.subscribed = Some(ok);
    let per_s = ok as f64 / end.elapsed.as_secs_f64().max(1e-9);
    report.connections_per_s = Some(per_s);
    if let Some(cpu) = end.server_cpu_ns {
        report.server_cpu_us_per_connection = Some(cpu as f64 / 1e3 / ok.max(1) as f64);
    }
    let loadgen_us = end.self_cpu.as_secs_f64() * 1e6 / ok.max(1) as f64;
    report.loadgen_cpu_us_per_connection = Some(loadgen_us);
    report.rows.delivered = vec![row(
        "connections/s",
        format!("{per_s:.0} ({ok} subscribed)"),
    )];
    report.rows.cost = vec![row(
        "CPU per connection",
        format!(
            "server {}   load generator {loadgen_us:.3} µs",
            with_pid(report.server_cpu_us_per_connection, "µs"),
        ),
    )];
    report.finish();
    Ok(report)
}
