//! Per-shard counters, written only by their shard and read only when `/metrics` is scraped,
//! and the Prometheus text exposition (format 0.0.4, written by `prometheus-client`).
//!
//! The counters are atomics with relaxed ordering so a scrape from another shard needs no lock;
//! on x86 a relaxed load or store of an uncontended line costs the same as a plain one. Every
//! per-shard figure is exposed once per shard with a `shard` label and never as a node total
//! beside it, so `sum(connections_active)` in Prometheus is the truth.

use crate::error::Code;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (seconds) of the `publish_to_write_seconds` histogram buckets.
pub(crate) const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// The `Content-Type` of `/metrics`.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Default, Debug)]
pub(crate) struct ShardMetrics {
    /// Open WebSocket connections (`transport="ws"`).
    pub connections_active: AtomicI64,
    /// Open server-sent event streams (`transport="sse"`).
    pub sse_connections_active: AtomicI64,
    pub subscriptions_total: AtomicI64,
    pub messages_sent_total: AtomicU64,
    pub messages_received_total: AtomicU64,
    pub slow_consumers_total: AtomicU64,
    pub write_timeouts_total: AtomicU64,
    pub auth_failures_total: AtomicU64,
    pub rejected_requests_total: [AtomicU64; 9],
    pub accept_errors_total: AtomicU64,
    /// Broadcast frames sent compressed (permessage-deflate): their size uncompressed, and as
    /// written.
    pub compression_bytes_before_total: AtomicU64,
    pub compression_bytes_after_total: AtomicU64,
    /// Channels this shard sequences (owner state held: watchers or live history).
    pub channels_owned: AtomicI64,
    /// Channels with subscribers on this shard.
    pub channels_subscribed: AtomicI64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
    /// Handshakes refused by an anonymous cap: `[node, address]`.
    anonymous_refused_total: [AtomicU64; 2],
    /// Access-proxy calls by kind (`PROXY_KINDS`) and result (`PROXY_RESULTS`).
    proxy_requests_total: [[AtomicU64; PROXY_RESULTS.len()]; PROXY_KINDS.len()],
    proxy_buckets: [[AtomicU64; PROXY_BUCKETS.len() + 1]; PROXY_KINDS.len()],
    proxy_sum_ns: [AtomicU64; PROXY_KINDS.len()],
}

/// `kind` label values of the access-proxy series.
pub(crate) const PROXY_KINDS: [&str; 2] = ["subscribe", "connect"];
/// `result` label values of `proxy_requests_total`.
pub(crate) const PROXY_RESULTS: [&str; 4] = ["allow", "deny", "error", "timeout"];
/// Upper bounds (seconds) of `proxy_request_seconds`: a backend on the same host answers in
/// well under a millisecond, one across a region in tens.
const PROXY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

impl ShardMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed) + n, Relaxed);
    }

    pub(crate) fn gauge(gauge: &AtomicI64, delta: i64) {
        gauge.store(gauge.load(Relaxed) + delta, Relaxed);
    }

    pub(crate) fn rejected(&self, code: Code) {
        let i = Code::ALL.iter().position(|c| *c == code).unwrap_or(0);
        Self::add(&self.rejected_requests_total[i], 1);
    }

    pub(crate) fn anonymous_refused(&self, refused: &crate::admission::Refused) {
        let i = match refused {
            crate::admission::Refused::Node => 0,
            crate::admission::Refused::Address => 1,
        };
        Self::add(&self.anonymous_refused_total[i], 1);
    }

    /// One access-proxy call of `kind` (index in `PROXY_KINDS`) with `result` (one of
    /// `PROXY_RESULTS`), which took `d`.
    pub(crate) fn proxy_call(&self, kind: usize, result: &str, d: Duration) {
        let r = PROXY_RESULTS.iter().position(|x| *x == result).unwrap_or(2);
        Self::add(&self.proxy_requests_total[kind][r], 1);
        let (buckets, sum) = (&self.proxy_buckets[kind], &self.proxy_sum_ns[kind]);
        observe(&PROXY_BUCKETS, buckets, sum, d);
    }

    pub(crate) fn observe_publish_to_write(&self, d: Duration) {
        observe(
            &LATENCY_BUCKETS,
            &self.latency_buckets,
            &self.latency_sum_ns,
            d,
        );
    }
}

/// Counts `d` in the bucket of the first upper bound in `bounds` it is within (the last of
/// `buckets`, one more than the bounds, is +Inf) and adds it to the sum.
fn observe(bounds: &[f64], buckets: &[AtomicU64], sum_ns: &AtomicU64, d: Duration) {
    let secs = d.as_secs_f64();
    let i = bounds
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(bounds.len());
    ShardMetrics::add(&buckets[i], 1);
    ShardMetrics::add(sum_ns, d.as_nanos() as u64);
}

/// A histogram as the encoder takes it: each bucket's own count with its bound (the encoder
/// adds them up into the `le` series), the total count and the sum in seconds.
fn histogram(
    bounds: &[f64],
    buckets: &[AtomicU64],
    sum_ns: &AtomicU64,
) -> (Vec<(f64, u64)>, u64, f64) {
    let counts: Vec<(f64, u64)> = bounds
        .iter()
        .chain([f64::INFINITY].iter())
        .zip(buckets)
        .map(|(bound, n)| (*bound, n.load(Relaxed)))
        .collect();
    let count = counts.iter().map(|(_, n)| n).sum();
    (counts, count, sum_ns.load(Relaxed) as f64 / 1e9)
}

/// The Redis bridge's counters (cluster mode), one set per node.
#[derive(Default, Debug)]
pub(crate) struct BridgeMetrics {
    pub up: AtomicBool,
    pub reconnects_total: AtomicU64,
    /// Redis Cluster: shard channels subscribed again after their slot moved.
    pub resubscribes_total: AtomicU64,
    /// Publications read back from history because pub/sub skipped them while a channel was
    /// being subscribed again.
    pub gap_filled_total: AtomicU64,
    pub publications_out_total: AtomicU64,
    pub publications_in_total: AtomicU64,
    pub publish_seconds_sum_ns: AtomicU64,
    pub publish_seconds_count: AtomicU64,
    pub publish_errors_total: AtomicU64,
}

/// Presence on this node (SPEC 16), written by the owner shards (one node) or the Redis bridge
/// (cluster mode) at each join and leave, never per message.
#[derive(Default, Debug)]
pub(crate) struct PresenceMetrics {
    /// One node: members of its channels. Cluster mode: the members this node holds (a
    /// member of one channel with connections on two nodes counts on both).
    pub members: AtomicI64,
    /// Joins and leaves this node made, `[join, leave]`.
    pub events_total: [AtomicU64; 2],
    /// Members of dead nodes this node removed (each also one leave).
    pub reaped_total: AtomicU64,
}

impl PresenceMetrics {
    /// A member joined (`true`) or left.
    pub(crate) fn changed(&self, joined: bool) {
        self.events_total[usize::from(!joined)].fetch_add(1, Relaxed);
        let delta = if joined { 1 } else { -1 };
        self.members.fetch_add(delta, Relaxed);
    }
}

#[derive(Debug)]
struct Presence(Arc<PresenceMetrics>);

impl Collector for Presence {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let members = ConstGauge::new(m.members.load(Relaxed));
        let metric = encoder.encode_descriptor(
            "presence_members",
            "Members present in channels that count them (cluster mode: held by this node).",
            None,
            members.metric_type(),
        )?;
        members.encode(metric)?;
        let mut metric = encoder.encode_descriptor(
            "presence_events",
            "Joins and leaves this node made, by kind.",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in ["join", "leave"].iter().zip(&m.events_total) {
            metric
                .encode_family(&[("kind", *kind)])?
                .encode_counter::<NoLabelSet, _, f64>(&n.load(Relaxed), None)?;
        }
        let reaped = ConstCounter::new(m.reaped_total.load(Relaxed));
        let metric = encoder.encode_descriptor(
            "presence_reaped",
            "Members of nodes that stopped heartbeating, removed by this node.",
            None,
            reaped.metric_type(),
        )?;
        reaped.encode(metric)
    }
}

/// The webhook senders' counters (SPEC 18), one set per node, summed over its `[[webhooks]]`.
/// Written by the shards (queueing) and the sender threads (delivery), never per message.
#[derive(Default, Debug)]
pub(crate) struct WebhookMetrics {
    /// Events in acknowledged batches, `[delivered, failed]`; a batch that fails is counted
    /// failed at each attempt.
    pub events_total: [AtomicU64; 2],
    /// Events dropped, oldest first, from a full queue.
    pub dropped_total: AtomicU64,
    /// Events queued and not yet taken by a sender.
    pub queue_depth: AtomicI64,
}

#[derive(Debug)]
struct Webhooks(Arc<WebhookMetrics>);

impl Collector for Webhooks {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let mut metric = encoder.encode_descriptor(
            "webhook_events",
            "Webhook events sent: in acknowledged batches (delivered), in each failed attempt (failed).",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in ["delivered", "failed"].iter().zip(&m.events_total) {
            metric
                .encode_family(&[("result", *result)])?
                .encode_counter::<NoLabelSet, _, f64>(&n.load(Relaxed), None)?;
        }
        let dropped = ConstCounter::new(m.dropped_total.load(Relaxed));
        let metric = encoder.encode_descriptor(
            "webhook_dropped",
            "Webhook events dropped, oldest first, from a full queue (queue_max).",
            None,
            dropped.metric_type(),
        )?;
        dropped.encode(metric)?;
        let depth = ConstGauge::new(m.queue_depth.load(Relaxed));
        let metric = encoder.encode_descriptor(
            "webhook_queue_depth",
            "Webhook events queued and not yet taken by a sender.",
            None,
            depth.metric_type(),
        )?;
        depth.encode(metric)
    }
}

/// How many revocations the node holds (`auth.revocations_max` bounds them), read at scrape.
#[derive(Debug)]
struct Revoked(Arc<crate::revocation::Revocations>);

impl Collector for Revoked {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let held = ConstGauge::new(self.0.len() as i64);
        let metric = encoder.encode_descriptor(
            "revocations_held",
            "Token revocations held (POST /revoke), expired ones until room is needed; at auth.revocations_max more are refused.",
            None,
            held.metric_type(),
        )?;
        held.encode(metric)
    }
}

/// Everything `/metrics` shows, built once at start; `render` reads the atomics at each scrape.
pub(crate) struct Exposition {
    registry: Registry,
}

impl Exposition {
    pub(crate) fn new(shards: Arc<[ShardMetrics]>) -> Exposition {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Shards(shards)));
        registry.register_collector(Box::new(Process));
        registry.register_collector(Box::new(BuildInfo));
        Exposition { registry }
    }

    /// Adds the node's anonymous-connection count.
    pub(crate) fn add_anonymous(&mut self, anonymous: Arc<crate::admission::Anonymous>) {
        self.registry
            .register_collector(Box::new(AnonymousOpen(anonymous)));
    }

    /// Adds the presence series.
    pub(crate) fn add_presence(&mut self, presence: Arc<PresenceMetrics>) {
        self.registry
            .register_collector(Box::new(Presence(presence)));
    }

    /// Adds the webhook series.
    pub(crate) fn add_revocations(&mut self, revocations: Arc<crate::revocation::Revocations>) {
        self.registry
            .register_collector(Box::new(Revoked(revocations)));
    }

    pub(crate) fn add_webhooks(&mut self, webhooks: Arc<WebhookMetrics>) {
        self.registry
            .register_collector(Box::new(Webhooks(webhooks)));
    }

    /// Adds the Redis bridge's series (cluster mode).
    pub(crate) fn add_bridge(&mut self, bridge: Arc<BridgeMetrics>) {
        self.registry.register_collector(Box::new(Bridge(bridge)));
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// A metric's name (counters without their `_total`, which the encoder appends), help text,
/// and how to read it from one shard.
type Row<T> = (&'static str, &'static str, fn(&ShardMetrics) -> T);

const GAUGES: [Row<i64>; 3] = [
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

const COUNTERS: [Row<u64>; 8] = [
    ("messages_sent", "Broadcasts written to clients.", |m| {
        m.messages_sent_total.load(Relaxed)
    }),
    (
        "messages_received",
        "Publications received from backends and clients.",
        |m| m.messages_received_total.load(Relaxed),
    ),
    (
        "slow_consumers",
        "Connections closed with 4003 because their send queue overflowed.",
        |m| m.slow_consumers_total.load(Relaxed),
    ),
    (
        "write_timeouts",
        "Connections closed because a write made no progress within write_timeout.",
        |m| m.write_timeouts_total.load(Relaxed),
    ),
    ("auth_failures", "Refused auth requests.", |m| {
        m.auth_failures_total.load(Relaxed)
    }),
    (
        "accept_errors",
        "Failed accepts (such as running out of file descriptors).",
        |m| m.accept_errors_total.load(Relaxed),
    ),
    (
        "compression_bytes_before",
        "Bytes of the broadcast frames sent compressed (permessage-deflate), uncompressed.",
        |m| m.compression_bytes_before_total.load(Relaxed),
    ),
    (
        "compression_bytes_after",
        "Bytes of the broadcast frames sent compressed (permessage-deflate), as written.",
        |m| m.compression_bytes_after_total.load(Relaxed),
    ),
];

/// The shards' series, each labelled `shard`.
#[derive(Debug)]
struct Shards(Arc<[ShardMetrics]>);

impl Collector for Shards {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "connections_active",
            "Open connections, by transport (ws: WebSocket, sse: server-sent events).",
            None,
            MetricType::Gauge,
        )?;
        for (shard, m) in self.0.iter().enumerate() {
            for (transport, gauge) in [
                ("ws", &m.connections_active),
                ("sse", &m.sse_connections_active),
            ] {
                let labels = [
                    ("shard", shard.to_string()),
                    ("transport", transport.into()),
                ];
                metric
                    .encode_family(&labels)?
                    .encode_gauge(&gauge.load(Relaxed))?;
            }
        }
        for (name, help, get) in GAUGES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (shard, m) in self.0.iter().enumerate() {
                metric
                    .encode_family(&[("shard", shard)])?
                    .encode_gauge(&get(m))?;
            }
        }
        for (name, help, get) in COUNTERS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (shard, m) in self.0.iter().enumerate() {
                metric
                    .encode_family(&[("shard", shard)])?
                    .encode_counter::<NoLabelSet, _, f64>(&get(m), None)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "rejected_requests",
            "Requests answered with an error, by code.",
            None,
            MetricType::Counter,
        )?;
        for (shard, m) in self.0.iter().enumerate() {
            for (code, counter) in Code::ALL.iter().zip(&m.rejected_requests_total) {
                let labels = [("shard", shard.to_string()), ("code", code.as_str().into())];
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, f64>(&counter.load(Relaxed), None)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "publish_to_write_seconds",
            "Time from a publication being accepted to its write to a subscriber's socket.",
            None,
            MetricType::Histogram,
        )?;
        for (shard, m) in self.0.iter().enumerate() {
            let (buckets, count, sum) =
                histogram(&LATENCY_BUCKETS, &m.latency_buckets, &m.latency_sum_ns);
            metric
                .encode_family(&[("shard", shard)])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        encode_anonymous(&self.0, &mut encoder)?;
        encode_proxy(&self.0, &mut encoder)
    }
}

fn encode_anonymous(
    shards: &[ShardMetrics],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        "anonymous_refused",
        "WebSocket handshakes answered 503 by an anonymous cap (reason: node, address).",
        None,
        MetricType::Counter,
    )?;
    for (shard, m) in shards.iter().enumerate() {
        for (reason, n) in ["node", "address"].iter().zip(&m.anonymous_refused_total) {
            let labels = [("shard", shard.to_string()), ("reason", reason.to_string())];
            metric
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, f64>(&n.load(Relaxed), None)?;
        }
    }
    Ok(())
}

fn encode_proxy(
    shards: &[ShardMetrics],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        "proxy_requests",
        "Access-proxy calls to the backend, by kind and result.",
        None,
        MetricType::Counter,
    )?;
    for (shard, m) in shards.iter().enumerate() {
        for (kind, row) in PROXY_KINDS.iter().zip(&m.proxy_requests_total) {
            for (result, n) in PROXY_RESULTS.iter().zip(row) {
                let labels = [
                    ("shard", shard.to_string()),
                    ("kind", kind.to_string()),
                    ("result", result.to_string()),
                ];
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, f64>(&n.load(Relaxed), None)?;
            }
        }
    }
    let mut metric = encoder.encode_descriptor(
        "proxy_request_seconds",
        "Time from an access-proxy call's start to the backend's answer (or its failure).",
        None,
        MetricType::Histogram,
    )?;
    for (shard, m) in shards.iter().enumerate() {
        for (k, kind) in PROXY_KINDS.iter().enumerate() {
            let (buckets, count, sum) =
                histogram(&PROXY_BUCKETS, &m.proxy_buckets[k], &m.proxy_sum_ns[k]);
            let labels = [("shard", shard.to_string()), ("kind", kind.to_string())];
            metric
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    Ok(())
}

/// `anonymous_connections`: the node's connections not (yet) authenticated, against
/// `limits.anonymous_connections_max` (a node-wide count, so no `shard` label).
#[derive(Debug)]
struct AnonymousOpen(Arc<crate::admission::Anonymous>);

impl Collector for AnonymousOpen {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(self.0.open() as i64);
        let metric = encoder.encode_descriptor(
            "anonymous_connections",
            "WebSocket connections of this node not (yet) authenticated.",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// `broadcaster_build_info{version}`: 1, so dashboards can show which version runs.
#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "broadcaster_build_info",
            "The running version (always 1).",
            None,
            MetricType::Gauge,
        )?;
        metric
            .encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?
            .encode_gauge(&1i64)
    }
}

/// The `process_*` series every Prometheus exporter has, read from `/proc` at each scrape.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessFigures::read() else {
            return Ok(());
        };
        let counter = ConstCounter::new(p.cpu_seconds);
        let metric = encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds.",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)?;
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Open file descriptors.",
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Most open file descriptors allowed (the soft limit).",
                p.max_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                p.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// The process's own figures, from `/proc/self` (Linux).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

impl ProcessFigures {
    pub(crate) fn read() -> Option<ProcessFigures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name, in parentheses, may hold spaces: fields are counted after it.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        // proc(5) numbers fields from 1 (pid); fields[0] here is field 3 (state).
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks = crate::sys::clock_ticks_per_second() as f64;
        // The boot time does not change: /proc/stat is read at the first scrape only.
        static BOOT_TIME: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let boot_time = (*BOOT_TIME.get_or_init(|| {
            std::fs::read_to_string("/proc/stat")
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
        }))?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Some(ProcessFigures {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            resident_bytes: field(24)? * crate::sys::page_size(),
            virtual_bytes: field(23)?,
            // The directory handle read_dir holds is one of them.
            open_fds: open_fds.saturating_sub(1),
            max_fds: crate::sys::open_files_limit(),
            start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        })
    }
}

/// The Redis bridge's series (cluster mode).
#[derive(Debug)]
struct Bridge(Arc<BridgeMetrics>);

impl Collector for Bridge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let up = ConstGauge::new(m.up.load(Relaxed) as i64);
        let metric = encoder.encode_descriptor(
            "redis_up",
            "1 while the Redis bridge is connected.",
            None,
            up.metric_type(),
        )?;
        up.encode(metric)?;
        let counters: [(&str, &str, &AtomicU64); 6] = [
            (
                "redis_gap_filled",
                "Publications read back from history because pub/sub skipped them while a \
                 channel was being subscribed again.",
                &m.gap_filled_total,
            ),
            (
                "redis_reconnects",
                "Reconnections to Redis after a loss.",
                &m.reconnects_total,
            ),
            (
                "redis_resubscribes",
                "Redis Cluster: shard channels subscribed again after their slot moved.",
                &m.resubscribes_total,
            ),
            (
                "redis_publications_out",
                "Publications written to Redis by this node.",
                &m.publications_out_total,
            ),
            (
                "redis_publications_in",
                "Publications received from Redis by this node.",
                &m.publications_in_total,
            ),
            (
                "redis_publish_errors",
                "Publishes that failed or timed out at Redis.",
                &m.publish_errors_total,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value.load(Relaxed));
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        // A histogram with only the +Inf bucket: the round trip's sum and count.
        let mut metric = encoder.encode_descriptor(
            "redis_publish_seconds",
            "Round trip of the publish script to Redis.",
            None,
            MetricType::Histogram,
        )?;
        let count = m.publish_seconds_count.load(Relaxed);
        let sum = m.publish_seconds_sum_ns.load(Relaxed) as f64 / 1e9;
        metric.encode_histogram::<NoLabelSet>(sum, count, &[], None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_shard_once_with_its_label() {
        let shards: Arc<[ShardMetrics]> = (0..2).map(|_| ShardMetrics::default()).collect();
        ShardMetrics::gauge(&shards[0].connections_active, 2);
        ShardMetrics::gauge(&shards[1].connections_active, 3);
        ShardMetrics::gauge(&shards[1].sse_connections_active, 4);
        shards[1].observe_publish_to_write(Duration::from_micros(300));
        shards[1].rejected(Code::ResourceExhausted);
        ShardMetrics::add(&shards[0].messages_sent_total, 7);
        let text = Exposition::new(shards).render();
        assert!(
            text.contains("\nconnections_active{shard=\"0\",transport=\"ws\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("\nconnections_active{shard=\"1\",transport=\"ws\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("\nconnections_active{shard=\"1\",transport=\"sse\"} 4\n"),
            "{text}"
        );
        assert!(
            !text.contains("\nconnections_active "),
            "no unlabelled total: {text}"
        );
        assert!(
            text.contains("\nmessages_sent_total{shard=\"0\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE messages_sent_total counter\n"),
            "{text}"
        );
        assert!(text.contains("publish_to_write_seconds_bucket{shard=\"1\",le=\"0.00025\"} 0"));
        assert!(text.contains("publish_to_write_seconds_bucket{shard=\"1\",le=\"0.0005\"} 1"));
        assert!(text.contains("publish_to_write_seconds_bucket{shard=\"1\",le=\"+Inf\"} 1"));
        assert!(
            text.contains("publish_to_write_seconds_count{shard=\"1\"} 1"),
            "{text}"
        );
        assert!(text.contains("rejected_requests_total{shard=\"1\",code=\"ResourceExhausted\"} 1"));
        assert!(text.contains("broadcaster_build_info{version=\""), "{text}");
        assert!(text.contains("\nprocess_open_fds "), "{text}");
    }

    #[test]
    fn renders_the_webhook_series() {
        let shards: Arc<[ShardMetrics]> = (0..1).map(|_| ShardMetrics::default()).collect();
        let mut exposition = Exposition::new(shards);
        let webhooks = Arc::new(WebhookMetrics::default());
        exposition.add_webhooks(webhooks.clone());
        webhooks.events_total[0].fetch_add(3, Relaxed);
        webhooks.events_total[1].fetch_add(2, Relaxed);
        webhooks.dropped_total.fetch_add(1, Relaxed);
        webhooks.queue_depth.fetch_add(4, Relaxed);
        let text = exposition.render();
        for line in [
            "\nwebhook_events_total{result=\"delivered\"} 3\n",
            "\nwebhook_events_total{result=\"failed\"} 2\n",
            "\nwebhook_dropped_total 1\n",
            "\nwebhook_queue_depth 4\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
    }

    #[test]
    fn process_figures_follow_the_process() {
        let before = ProcessFigures::read().unwrap();
        let files: Vec<_> = (0..200)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let during = ProcessFigures::read().unwrap();
        drop(files);
        // Other tests of this process open and close files meanwhile: a lower bound only.
        assert!(during.open_fds >= 200, "{before:?} {during:?}");
        assert!(before.resident_bytes > 1 << 20 && before.virtual_bytes >= before.resident_bytes);
        assert!(before.max_fds >= during.open_fds);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(before.start_time_seconds <= now + 1.0);
        assert!(
            before.start_time_seconds > now - 24.0 * 3600.0,
            "{before:?}"
        );
        assert!(before.cpu_seconds >= 0.0);
    }
}
