//! The soak's verdict: the workers' results merged, the report filled, and every check judged:
//! publishing, settling, the broadcasts, the server's gauges, descriptors and RSS.

use std::sync::atomic::{AtomicU64, Ordering};

use super::figures::SoakFigures;
use super::plan::{rss_change_pct, rss_within};
use super::{Closed, Settled, Setup, Trace};
use crate::checker::Anomalies;
use crate::harness::WindowEnd;
use crate::hist;
use crate::metrics::Gauges;
use crate::publisher::PublishResult;
use crate::report::{row, Report};

/// The workers' results merged.
#[derive(Default)]
struct Merged {
    seq: Anomalies,
    offsets: Anomalies,
    mismatch: u64,
    unexpected: u64,
    never_subscribed: u64,
    not_live: u64,
}

/// Merges the results, fills the report and judges the run.
pub(super) fn verdict(
    s: &Setup<'_>,
    closed: Closed,
    trace: Trace,
    settled: Settled,
    pres: PublishResult,
) -> Report<SoakFigures> {
    let mut report: Report<SoakFigures> = Report::new("soak", &s.a.common, &s.env.nodes);
    let mut h = hist::new_histogram();
    let mut m = Merged::default();
    for r in &closed.results {
        let _ = h.add(&r.hist);
        m.seq.add(&r.seq);
        m.offsets.add(&r.offsets);
        m.mismatch += r.seq_offset_mismatch;
        m.unexpected += r.unexpected;
        m.never_subscribed += r.never_subscribed;
        m.not_live += r.not_live_at_end;
    }
    report.latency = hist::percentiles(&h);
    report.histogram = Some(h);
    fill_report(s, &mut report, &closed, &settled.end, &m);
    report.server_rss_before_bytes = trace.rss_warm;
    report.server_rss_after_bytes = trace.rss_end;
    let rss_change = match (trace.rss_warm, trace.rss_end) {
        (Some(w), Some(e)) => Some(rss_change_pct(w, e)),
        _ => None,
    };
    judge(s, &mut report, &settled, &pres, &m);
    judge_leaks(s, &mut report, &closed);
    if let Some(p) = &closed.presence {
        for why in super::presence::failures(p, &s.a.presence_prefix) {
            report.fail(why);
        }
    }
    judge_rss(s, &mut report, &trace, rss_change);
    let figures = figures(s, &closed, &trace, &settled, &pres, &m, rss_change);
    report.publish = Some(pres);
    report.rows.delivered = vec![
        row(
            "deliveries",
            format!(
                "{} ({} live, the rest replayed by recoveries)",
                report.deliveries, report.latency.count
            ),
        ),
        report.delivery_rate_row(),
    ];
    report.rows.checks = figures.rows();
    if let Some(p) = &closed.presence {
        report.rows.checks.push(super::presence::row(p));
    }
    report.rows.cost = vec![report.cpu_per_delivery_row()];
    report.set_figures(figures);
    report.finish();
    report
}

/// The figures every scenario reports.
fn fill_report(
    s: &Setup<'_>,
    report: &mut Report<SoakFigures>,
    closed: &Closed,
    end: &WindowEnd,
    m: &Merged,
) {
    let (a, shared) = (s.a, &closed.shared);
    report.connections = a.connections as u64;
    report.channels = s.channels.len() as u64;
    report.subscribers_per_channel = closed.pairs / s.channels.len() as u64;
    report.loadgen_threads = closed.threads as u64;
    report.open_files_limit = s.env.nofile;
    report.source_addresses = s.plan.addrs().len() as u64;
    report.rate = a.rate;
    report.via = Some(a.via);
    report.deliveries_unchecked = true;
    report.deliveries = shared.deliveries.load(Ordering::Relaxed);
    report.expected_deliveries = report.deliveries;
    report.measured_s = end.elapsed.as_secs_f64();
    report.deliveries_per_s = report.deliveries as f64 / end.elapsed.as_secs_f64().max(1e-9);
    report.seq = m.seq;
    report.offsets = m.offsets;
    report.seq_offset_mismatch = m.mismatch;
    report.unrecovered = shared.unrecovered.load(Ordering::Relaxed);
    report.reconnects = shared.cycled.load(Ordering::Relaxed);
    report.connection_failures = shared.failures.load(Ordering::Relaxed);
    let mut errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    let pub_errors = closed.pub_shared.errors.lock().map(|e| e.clone());
    errors.extend(pub_errors.unwrap_or_default());
    report.errors = errors;
    end.record(report);
    report.loadgen_cpu_us_per_delivery =
        end.self_cpu.as_secs_f64() * 1e6 / report.deliveries.max(1) as f64;
    if let Some(cpu) = end.server_cpu_ns {
        report.server_cpu_us_per_delivery =
            Some(cpu as f64 / 1e3 / report.deliveries.max(1) as f64);
    }
}

/// The soak's own failures: publishing, settling, the broadcasts.
fn judge(
    s: &Setup<'_>,
    report: &mut Report<SoakFigures>,
    settled: &Settled,
    pres: &PublishResult,
    m: &Merged,
) {
    let n = s.a.connections;
    let delivered = report.deliveries;
    let mut fail = |why: String| report.fail(why);
    if pres.errors > 0 {
        fail(format!("{} publications failed", pres.errors));
    }
    if pres.published == 0 {
        fail("nothing was published".into());
    } else if delivered == 0 {
        fail("nothing was delivered".into());
    }
    if (settled.settled as usize) < n {
        fail(format!(
            "only {} of {n} connections were back, subscribed and caught up {:.0} s after publishing ended",
            settled.settled,
            s.settle_timeout.as_secs_f64()
        ));
    }
    if m.unexpected > 0 {
        fail(format!(
            "{} broadcasts arrived for a channel the connection was not subscribed to",
            m.unexpected
        ));
    }
    if m.never_subscribed > 0 {
        fail(format!(
            "{} (connection, channel) pairs never subscribed",
            m.never_subscribed
        ));
    }
}

/// The leak checks: the server's gauges with everything open and after everything closed, and
/// its descriptors back to the pre-run count.
fn judge_leaks(s: &Setup<'_>, report: &mut Report<SoakFigures>, closed: &Closed) {
    let (before, open) = (s.gauges_before, closed.expected_open);
    let gauge = |g: Option<Gauges>, f: fn(Gauges) -> i64| {
        g.map(|g| f(g).to_string()).unwrap_or_else(|| "?".into())
    };
    let mut fail = |why: String| report.fail(why);
    if !closed.gauges_open_ok {
        fail(format!(
            "server gauges with {} connections open: connections_active / subscriptions_total {} / {}, expected {} / {}",
            open.connections_active - before.connections_active,
            gauge(closed.gauges_open, |g| g.connections_active),
            gauge(closed.gauges_open, |g| g.subscriptions_total),
            open.connections_active,
            open.subscriptions_total
        ));
    }
    if !closed.gauges_after_ok {
        fail(format!(
            "server gauges after every connection closed: connections_active / subscriptions_total {} / {}, expected {} / {} (the pre-run values) within {:.0} s",
            gauge(closed.gauges_after, |g| g.connections_active),
            gauge(closed.gauges_after, |g| g.subscriptions_total),
            before.connections_active,
            before.subscriptions_total,
            s.settle_timeout.as_secs_f64()
        ));
    }
    if !closed.fd_ok {
        fail(format!(
            "server file descriptors LEAKED: {} before the run, {} after every connection closed",
            s.fd_before.unwrap_or(0),
            closed
                .fd_after
                .map(|f| f.to_string())
                .unwrap_or_else(|| "?".into())
        ));
    }
}

/// The RSS check: the level at the end of the churn against the level after the warm-up.
fn judge_rss(
    s: &Setup<'_>,
    report: &mut Report<SoakFigures>,
    trace: &Trace,
    rss_change: Option<f64>,
) {
    let a = s.a;
    if let (Some(c), Some(w), Some(e)) = (rss_change, trace.rss_warm, trace.rss_end) {
        if !rss_within(w, e, a.rss_tolerance, a.rss_slack_mib) {
            report.fail(format!(
                "server RSS moved {c:+.1}% from the warm-up ({:.1} MiB) to the end ({:.1} MiB), \
                 more than ±{}% and more than {} MiB",
                w as f64 / 1048576.0,
                e as f64 / 1048576.0,
                a.rss_tolerance,
                a.rss_slack_mib
            ));
        }
    }
}

fn figures(
    s: &Setup<'_>,
    closed: &Closed,
    trace: &Trace,
    settled: &Settled,
    pres: &PublishResult,
    m: &Merged,
    rss_change: Option<f64>,
) -> SoakFigures {
    let (a, shared) = (s.a, &closed.shared);
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let fd_peak = match (trace.fd_peak, closed.fd_open_end) {
        (p, Some(f)) => Some(p.unwrap_or(0).max(f)),
        (p, None) => p,
    };
    SoakFigures {
        publishers_behind_max_s: pres.max_behind_ms / 1e3,
        duration_s: a.duration.as_secs_f64(),
        warmup_s: s.warmup.as_secs_f64(),
        settle_s: settled.settle_s,
        connections: a.connections as u64,
        subscriptions: closed.pairs,
        channels_per_conn_max: a.channels_per_conn.clamp(1, a.channels) as u64,
        publishers: s.publishers as u64,
        sessions: count(&shared.sessions),
        cycled: count(&shared.cycled),
        abrupt_closes: count(&shared.abrupt),
        resubscribes: count(&shared.resubscribes),
        recovered: count(&shared.recovered),
        unrecovered: count(&shared.unrecovered),
        history_gaps: count(&shared.history_gaps),
        history_gap_offsets: count(&shared.history_gap_offsets),
        history_size: a.history_size,
        replayed: count(&shared.replayed),
        unexpected_broadcasts: m.unexpected,
        settled: settled.settled,
        never_subscribed: m.never_subscribed,
        not_live_at_end: m.not_live,
        rss_before_bytes: s.rss_before,
        rss_warm_bytes: trace.rss_warm,
        rss_end_bytes: trace.rss_end,
        rss_window_s: trace.rss_window.as_secs_f64(),
        rss_warm_instant_bytes: trace.rss_warm_instant,
        rss_end_instant_bytes: trace.rss_end_instant,
        rss_change_pct: rss_change,
        rss_tolerance_pct: a.rss_tolerance,
        rss_slack_mib: a.rss_slack_mib,
        rss_peak_bytes: trace.rss_peak,
        rss_after_close_bytes: closed.rss_after_close,
        fd_before: s.fd_before,
        fd_peak,
        fd_open_end: closed.fd_open_end,
        fd_after: closed.fd_after,
        gauges_before: s.gauges_before,
        gauges_open_expected: closed.expected_open,
        gauges_open: closed.gauges_open,
        gauges_after_close: closed.gauges_after,
        presence: closed.presence.clone(),
    }
}
