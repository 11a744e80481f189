//! Per-shard counters, written only by their shard and read (merged) only when `/metrics` is
//! scraped. They are atomics with relaxed ordering so a scrape from another shard needs no lock;
//! on x86 a relaxed load or store of an uncontended line costs the same as a plain one.

use crate::protocol::Code;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the `publish_to_write_seconds` histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

#[derive(Default)]
pub struct ShardMetrics {
    pub connections_active: AtomicI64,
    pub subscriptions_total: AtomicI64,
    pub messages_sent_total: AtomicU64,
    pub messages_received_total: AtomicU64,
    pub slow_consumers_total: AtomicU64,
    pub write_timeouts_total: AtomicU64,
    pub auth_failures_total: AtomicU64,
    pub rejected_requests_total: [AtomicU64; 9],
    pub accept_errors_total: AtomicU64,
    /// Channels this shard sequences (owner state held: watchers or live history).
    pub channels_owned: AtomicI64,
    /// Channels with subscribers on this shard.
    pub channels_subscribed: AtomicI64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
}

impl ShardMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed) + n, Relaxed);
    }

    pub fn gauge(gauge: &AtomicI64, delta: i64) {
        gauge.store(gauge.load(Relaxed) + delta, Relaxed);
    }

    pub fn rejected(&self, code: Code) {
        let i = Code::ALL.iter().position(|c| *c == code).unwrap_or(0);
        Self::add(&self.rejected_requests_total[i], 1);
    }

    pub fn observe_publish_to_write(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        Self::add(&self.latency_buckets[i], 1);
        Self::add(&self.latency_sum_ns, d.as_nanos() as u64);
    }
}

/// A metric's name, help text, and how to read it from one shard.
type Metric<T> = (&'static str, &'static str, fn(&ShardMetrics) -> T);

/// Renders every shard's metrics in the Prometheus text format, per shard and summed.
pub fn render(shards: &[ShardMetrics]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(4096);
    let gauges: [Metric<i64>; 4] = [
        ("connections_active", "Open WebSocket connections.", |m| {
            m.connections_active.load(Relaxed)
        }),
        ("subscriptions_total", "Active subscriptions.", |m| {
            m.subscriptions_total.load(Relaxed)
        }),
        (
            "channels_owned",
            "Channels whose offsets and history this shard keeps (updated every second).",
            |m| m.channels_owned.load(Relaxed),
        ),
        (
            "channels_subscribed",
            "Channels with subscribers on this shard (updated every second).",
            |m| m.channels_subscribed.load(Relaxed),
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        let total: i64 = shards.iter().map(get).sum();
        let _ = writeln!(out, "{name} {total}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(m));
        }
    }
    let counters: [Metric<u64>; 6] = [
        (
            "messages_sent_total",
            "Broadcasts written to clients.",
            |m| m.messages_sent_total.load(Relaxed),
        ),
        (
            "messages_received_total",
            "Publications received from backends and clients.",
            |m| m.messages_received_total.load(Relaxed),
        ),
        (
            "slow_consumers_total",
            "Connections closed with 4003 because their send queue overflowed.",
            |m| m.slow_consumers_total.load(Relaxed),
        ),
        (
            "write_timeouts_total",
            "Connections closed because a write made no progress within write_timeout.",
            |m| m.write_timeouts_total.load(Relaxed),
        ),
        ("auth_failures_total", "Refused auth requests.", |m| {
            m.auth_failures_total.load(Relaxed)
        }),
        (
            "accept_errors_total",
            "Failed accepts (such as running out of file descriptors).",
            |m| m.accept_errors_total.load(Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let total: u64 = shards.iter().map(get).sum();
        let _ = writeln!(out, "{name} {total}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(m));
        }
    }
    let name = "rejected_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} Requests answered with an error, by code.\n# TYPE {name} counter"
    );
    for (c, code) in Code::ALL.iter().enumerate() {
        let total: u64 = shards
            .iter()
            .map(|m| m.rejected_requests_total[c].load(Relaxed))
            .sum();
        let _ = writeln!(out, "{name}{{code=\"{}\"}} {total}", code.as_str());
    }
    let name = "publish_to_write_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a publication being accepted to its write to a subscriber's socket.\n# TYPE {name} histogram"
    );
    let mut cumulative = 0u64;
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += shards
            .iter()
            .map(|m| m.latency_buckets[i].load(Relaxed))
            .sum::<u64>();
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += shards
        .iter()
        .map(|m| m.latency_buckets[LATENCY_BUCKETS.len()].load(Relaxed))
        .sum::<u64>();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let sum_ns: u64 = shards.iter().map(|m| m.latency_sum_ns.load(Relaxed)).sum();
    let _ = writeln!(out, "{name}_sum {}", sum_ns as f64 / 1e9);
    let _ = writeln!(out, "{name}_count {cumulative}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sums_and_buckets() {
        let shards = [ShardMetrics::default(), ShardMetrics::default()];
        ShardMetrics::gauge(&shards[0].connections_active, 2);
        ShardMetrics::gauge(&shards[1].connections_active, 3);
        shards[1].observe_publish_to_write(Duration::from_micros(300));
        shards[1].rejected(Code::ResourceExhausted);
        let text = render(&shards);
        assert!(text.contains("\nconnections_active 5\n"), "{text}");
        assert!(text.contains("connections_active{shard=\"1\"} 3"));
        assert!(text.contains("publish_to_write_seconds_bucket{le=\"0.00025\"} 0"));
        assert!(text.contains("publish_to_write_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("rejected_requests_total{code=\"ResourceExhausted\"} 1"));
    }
}
