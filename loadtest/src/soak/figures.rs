//! The soak's own figures: the `soak` object of the JSON summary and its rows of the table.

use super::presence::SoakPresence;
use crate::metrics::Gauges;
use crate::report::Row;

/// The soak's own figures, in the report (`soak` in the JSON summary).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SoakFigures {
    /// Seconds of churn with publishing.
    pub(crate) duration_s: f64,
    /// Seconds after which the RSS reference was taken.
    pub(crate) warmup_s: f64,
    /// Seconds the end took: every connection back, resubscribed and caught up.
    pub(crate) settle_s: f64,
    /// Connections.
    pub(crate) connections: u64,
    /// (connection, channel) pairs, each checked by offset across its whole life.
    pub(crate) subscriptions: u64,
    /// Most channels per connection.
    pub(crate) channels_per_conn_max: u64,
    /// Publisher threads.
    pub(crate) publishers: u64,
    /// Sessions (upgrades), the first of each connection included.
    pub(crate) sessions: u64,
    /// Sessions the load generator ended on purpose, then reconnected: connections cycled.
    pub(crate) cycled: u64,
    /// Of those, ended by a TCP drop with no close frame.
    pub(crate) abrupt_closes: u64,
    /// Unsubscribe + resubscribe cycles within a session.
    pub(crate) resubscribes: u64,
    /// Subscribes with `since` answered `recovered: true`.
    pub(crate) recovered: u64,
    /// Subscribes with `since` answered `recovered: false` where history should have held the gap.
    pub(crate) unrecovered: u64,
    /// `recovered: false` for gaps larger than `history_size` (allowed).
    pub(crate) history_gaps: u64,
    /// Offsets skipped over those gaps.
    pub(crate) history_gap_offsets: u64,
    /// The server history size the run assumed (--history-size).
    pub(crate) history_size: u64,
    /// Deliveries that were replays of missed publications.
    pub(crate) replayed: u64,
    /// Broadcasts for a channel the connection was not subscribed to at the time.
    pub(crate) unexpected_broadcasts: u64,
    /// Connections open, subscribed to all their channels and caught up at the end.
    pub(crate) settled: u64,
    /// Pairs whose subscribe never succeeded.
    pub(crate) never_subscribed: u64,
    /// Pairs not subscribed at the end.
    pub(crate) not_live_at_end: u64,
    /// Server RSS before the run, after the warm-up, at the end of the churn, its peak, and after
    /// every connection closed (bytes).
    pub(crate) rss_before_bytes: Option<u64>,
    /// RSS level after the warm-up: the median of the once-a-second samples over the
    /// `rss_window_s` seconds after it (one allocator step at the wrong second does not decide).
    pub(crate) rss_warm_bytes: Option<u64>,
    /// RSS level at the end of the churn: the median over its last `rss_window_s` seconds.
    pub(crate) rss_end_bytes: Option<u64>,
    /// The two windows' length, seconds (10% of the run, 5 s to 60 s).
    pub(crate) rss_window_s: f64,
    /// The single samples at the end of the warm-up and at the end of the churn.
    pub(crate) rss_warm_instant_bytes: Option<u64>,
    /// See `rss_warm_instant_bytes`.
    pub(crate) rss_end_instant_bytes: Option<u64>,
    /// (end - warm) / warm, percent.
    pub(crate) rss_change_pct: Option<f64>,
    /// The allowed change, percent either way.
    pub(crate) rss_tolerance_pct: f64,
    /// The allowed change in MiB, whatever the percentage.
    pub(crate) rss_slack_mib: f64,
    /// Highest RSS seen (sampled once a second).
    pub(crate) rss_peak_bytes: Option<u64>,
    /// RSS once every connection closed.
    pub(crate) rss_after_close_bytes: Option<u64>,
    /// Server file descriptors before the run.
    pub(crate) fd_before: Option<u64>,
    /// Highest count seen (sampled once a second).
    pub(crate) fd_peak: Option<u64>,
    /// With every connection open at the end.
    pub(crate) fd_open_end: Option<u64>,
    /// After every connection closed (must equal `fd_before`).
    pub(crate) fd_after: Option<u64>,
    /// How far the publishers fell behind their open-loop schedule at worst, seconds (more than
    /// a second: the server or the host is saturated).
    pub(crate) publishers_behind_max_s: f64,
    /// The server's gauges before the run.
    pub(crate) gauges_before: Gauges,
    /// What they should read with the end's connections open (before + what the load generator holds).
    pub(crate) gauges_open_expected: Gauges,
    /// What they read then.
    pub(crate) gauges_open: Option<Gauges>,
    /// What they read after everything closed (must equal `gauges_before`).
    pub(crate) gauges_after_close: Option<Gauges>,
    /// `--presence-users`: the presence churn.
    pub(crate) presence: Option<SoakPresence>,
}

impl SoakFigures {
    /// The soak's rows of the table, after the loss counts.
    pub(crate) fn rows(&self) -> Vec<Row> {
        let mut rows = self.churn_rows();
        rows.extend(self.leak_rows());
        rows
    }

    /// What the connections did: sessions, subscriptions, recoveries.
    fn churn_rows(&self) -> Vec<Row> {
        let k = self;
        let mut rows = vec![
            (
                "soak duration".into(),
                format!(
                    "{:.0} s churning (RSS reference after {:.0} s), {:.1} s to settle",
                    k.duration_s, k.warmup_s, k.settle_s
                ),
            ),
            (
                "connections cycled".into(),
                format!(
                    "{} sessions ended and reconnected ({} by TCP drop), {} sessions in all, {} unsubscribe/resubscribe",
                    k.cycled, k.abrupt_closes, k.sessions, k.resubscribes
                ),
            ),
            (
                "subscriptions checked".into(),
                format!(
                    "{} (connection, channel) pairs, 1-{} channels per connection; {} caught up at the end of {}",
                    k.subscriptions, k.channels_per_conn_max, k.settled, k.connections
                ),
            ),
            (
                "recovery (since)".into(),
                format!(
                    "{} recovered, {} NOT recovered, {} gaps over --history-size {} ({} offsets), {} replayed deliveries",
                    k.recovered,
                    k.unrecovered,
                    k.history_gaps,
                    k.history_size,
                    k.history_gap_offsets,
                    k.replayed
                ),
            ),
        ];
        if k.unexpected_broadcasts > 0 || k.never_subscribed > 0 {
            rows.push((
                "unexpected".into(),
                format!(
                    "{} broadcasts while not subscribed, {} pairs never subscribed",
                    k.unexpected_broadcasts, k.never_subscribed
                ),
            ));
        }
        if k.publishers_behind_max_s > 1.0 {
            rows.push((
                "WARNING".into(),
                format!(
                    "the publishers fell {:.1} s behind their schedule: the server or this host could not \
                     keep up, so latencies, and the RSS of queues under overload, are not steady-state \
                     figures (lower --rate or --connections, or raise --session)",
                    k.publishers_behind_max_s
                ),
            ));
        }
        rows
    }

    /// What the server held: RSS, descriptors, gauges.
    fn leak_rows(&self) -> Vec<Row> {
        let k = self;
        let change = k
            .rss_change_pct
            .map(|c| {
                format!(
                    "{c:+.2}% (limit ±{}% or ±{} MiB)",
                    k.rss_tolerance_pct, k.rss_slack_mib
                )
            })
            .unwrap_or_else(|| "- (no --server-pid)".into());
        vec![
            (
                "server RSS MiB".into(),
                format!(
                    "start {} / after warm-up {} / end {} (medians over {:.0} s): {change}",
                    mib(k.rss_before_bytes),
                    mib(k.rss_warm_bytes),
                    mib(k.rss_end_bytes),
                    k.rss_window_s
                ),
            ),
            (
                "server RSS MiB, single samples".into(),
                format!(
                    "end of warm-up {} / end of churn {} / peak {} / after close {}",
                    mib(k.rss_warm_instant_bytes),
                    mib(k.rss_end_instant_bytes),
                    mib(k.rss_peak_bytes),
                    mib(k.rss_after_close_bytes)
                ),
            ),
            (
                "server file descriptors".into(),
                format!(
                    "start {} / peak {} / all open at the end {} / after close {}",
                    num(k.fd_before),
                    num(k.fd_peak),
                    num(k.fd_open_end),
                    num(k.fd_after)
                ),
            ),
            (
                "gauges conns / subs".into(),
                format!(
                    "before {}; at the end {} (expected {}); after close {}",
                    gauges(Some(k.gauges_before)),
                    gauges(k.gauges_open),
                    gauges(Some(k.gauges_open_expected)),
                    gauges(k.gauges_after_close)
                ),
            ),
        ]
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1}", b as f64 / 1048576.0))
        .unwrap_or_else(|| "-".into())
}

fn num(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn gauges(g: Option<Gauges>) -> String {
    g.map(|g| format!("{} / {}", g.connections_active, g.subscriptions_total))
        .unwrap_or_else(|| "?".into())
}
