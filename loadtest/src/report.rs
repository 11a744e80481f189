//! The run summary: a human table on stdout, a JSON file, the `.hgrm` distribution and an SVG plot.

use hdrhistogram::Histogram;

use crate::checker::Anomalies;
use crate::cli::Common;
use crate::floor::FloorResult;
use crate::hist::{self, Percentiles};
use crate::net::Node;
use crate::publisher::{PublishResult, Via};

/// Everything a run measured. Serialized as the JSON summary (`--json`).
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// `--label`, or the scenario name.
    pub label: String,
    /// The server's public address (several nodes: comma separated).
    pub server: String,
    /// Server nodes the subscribers were spread over.
    pub nodes: u64,
    /// Publications went round robin to every node (otherwise to the first).
    pub publish_all: bool,
    /// Subscriber connections.
    pub connections: u64,
    /// Channels.
    pub channels: u64,
    /// Subscribers per channel.
    pub subscribers_per_channel: u64,
    /// Publication rate asked for (0: max rate).
    pub rate: f64,
    /// How publications were made.
    pub via: Option<Via>,
    /// Max-rate mode window.
    pub window: Option<u64>,
    /// Max-rate mode: publish requests in flight at most.
    pub pipeline: Option<u64>,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// The publisher's results.
    pub publish: Option<PublishResult>,
    /// Broadcasts received.
    pub deliveries: u64,
    /// Broadcasts that should have been received.
    pub expected_deliveries: u64,
    /// Seconds of the measurement window (publish start to last delivery; the hold for idle; the
    /// storm itself).
    pub measured_s: f64,
    /// Deliveries per second of publishing.
    pub deliveries_per_s: f64,
    /// What `latency` measures: `end_to_end` (scheduled send to receipt) or `connect_to_subscribed`.
    pub latency_kind: &'static str,
    /// Latency percentiles, nanoseconds.
    pub latency: Percentiles,
    /// Anomalies by `seq` (per subscription).
    pub seq: Anomalies,
    /// Anomalies by `offset` (per channel, across a subscriber's reconnects).
    pub offsets: Anomalies,
    /// Broadcasts whose offset was not the subscription's base + seq.
    pub seq_offset_mismatch: u64,
    /// Broadcasts without a send time in the payload.
    pub untimed: u64,
    /// Recovery: subscribes with `since` answered `recovered: false`.
    pub unrecovered: u64,
    /// Recovery: reconnects made.
    pub reconnects: u64,
    /// Connections that failed or were dropped.
    pub connection_failures: u64,
    /// Storm: connections that subscribed.
    pub subscribed: Option<u64>,
    /// Storm: connect + auth + subscribe per second.
    pub connections_per_s: Option<f64>,
    /// Mean size of a broadcast frame, header included.
    pub frame_bytes_mean: Option<f64>,
    /// Server CPU (user + system) over the window, seconds.
    pub server_cpu_s: Option<f64>,
    /// Server CPU per delivered message, µs.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Storm: server CPU per connection, µs.
    pub server_cpu_us_per_connection: Option<f64>,
    /// Server RSS before (idle: before connecting), bytes.
    pub server_rss_before_bytes: Option<u64>,
    /// Server RSS after, bytes.
    pub server_rss_after_bytes: Option<u64>,
    /// Idle: server RSS growth per connection, bytes.
    pub server_rss_bytes_per_connection: Option<f64>,
    /// Share of the server's CPU spent in the kernel (system time).
    pub server_cpu_sys_fraction: Option<f64>,
    /// Load generator CPU over the window, seconds.
    pub loadgen_cpu_s: f64,
    /// Share of the load generator's CPU spent in the kernel.
    pub loadgen_cpu_sys_fraction: f64,
    /// Load generator CPU per delivered message, µs.
    pub loadgen_cpu_us_per_delivery: f64,
    /// Storm: load generator CPU per connection, µs.
    pub loadgen_cpu_us_per_connection: Option<f64>,
    /// Load generator RSS, bytes.
    pub loadgen_rss_bytes: u64,
    /// Idle: load generator RSS growth per connection.
    pub loadgen_rss_bytes_per_connection: Option<f64>,
    /// Receive threads.
    pub loadgen_threads: u64,
    /// The open-files limit the load generator ran with.
    pub open_files_limit: u64,
    /// Source addresses used.
    pub source_addresses: u64,
    /// Soak: the churn, recovery, RSS, descriptor and gauge figures.
    pub soak: Option<crate::soak::SoakFigures>,
    /// The kernel floor, when measured (`--floor`).
    pub floor: Option<FloorResult>,
    /// Server CPU per delivery divided by the one-frame-per-send floor.
    pub server_ratio_to_floor_1: Option<f64>,
    /// Server CPU per delivery divided by the k-frames-per-send floor.
    pub server_ratio_to_floor_k: Option<f64>,
    /// Fixed-rate scenarios: the one-frame-per-send floor with the sender pacing its passes
    /// like the scenario (each socket gets `passes_per_s` frames a second), so the reader sleeps
    /// between passes as the subscribers do; the back-to-back floor keeps the reader busy and
    /// saves the sender the wake-ups.
    pub paced_floor: Option<PacedFloor>,
    /// Broadcast frames per socket write on the server (from its `/metrics`: frames queued over
    /// writes that carried them, during the run).
    pub frames_per_write: Option<f64>,
    /// The floor per frame at that coalescing, from the 1- and k-frame floors with a fixed cost
    /// per `send()` plus a cost per frame: `f(c) = a + b / c`.
    pub floor_at_coalescing_us: Option<f64>,
    /// Server CPU per delivery over `floor_at_coalescing_us` (issue 4, target 3).
    pub server_ratio_to_floor_coalesced: Option<f64>,
    /// First error messages.
    pub errors: Vec<String>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    /// True when nothing was lost, duplicated, reordered or refused.
    pub passed: bool,
    /// The merged latency histogram (not serialized).
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &'static str, common: &Common, nodes: &[Node]) -> Self {
        Report {
            scenario,
            label: common.label.clone().unwrap_or_else(|| scenario.to_string()),
            server: nodes
                .iter()
                .map(|n| n.addr.to_string())
                .collect::<Vec<_>>()
                .join(","),
            nodes: nodes.len() as u64,
            latency_kind: "end_to_end",
            payload_bytes: common.payload_bytes,
            ..Default::default()
        }
    }

    /// Records a reason the run failed.
    pub fn fail(&mut self, why: String) {
        self.failures.push(why);
    }

    /// Adds the paced floor and the ratio to it.
    pub fn set_paced_floor(&mut self, passes_per_s: f64, sockets_per_pass: usize, f: &FloorResult) {
        let us = f.us_per_frame(1);
        self.paced_floor = Some(PacedFloor {
            passes_per_s,
            sockets_per_pass,
            us_per_frame: us,
            server_ratio: self
                .server_cpu_us_per_delivery
                .filter(|_| us > 0.0)
                .map(|s| s / us),
        });
    }

    /// Adds the floor and the ratios to it.
    pub fn set_floor(&mut self, f: FloorResult) {
        if let Some(s) = self.server_cpu_us_per_delivery {
            let f1 = f.us_per_frame(1);
            let k = f
                .points
                .iter()
                .map(|p| p.frames_per_send)
                .max()
                .unwrap_or(1);
            let fk = f.us_per_frame(k);
            self.server_ratio_to_floor_1 = (f1 > 0.0).then(|| s / f1);
            self.server_ratio_to_floor_k = (fk > 0.0 && k > 1).then(|| s / fk);
            if let Some(c) = self.frames_per_write.filter(|c| *c >= 1.0 && k > 1) {
                let kf = k as f64;
                let per_send = (f1 - fk) * kf / (kf - 1.0);
                let floor = f1 - per_send + per_send / c;
                self.floor_at_coalescing_us = Some(floor);
                self.server_ratio_to_floor_coalesced = (floor > 0.0).then(|| s / floor);
            }
        }
        self.floor = Some(f);
    }

    /// Checks the counts and sets `passed`.
    pub fn finish(&mut self) {
        let mut why = Vec::new();
        for (name, a) in [("seq", self.seq), ("offset", self.offsets)] {
            if a.lost > 0 {
                why.push(format!("{} messages LOST (by {name})", a.lost));
            }
            if a.duplicated > 0 {
                why.push(format!("{} messages DUPLICATED (by {name})", a.duplicated));
            }
            if a.reordered > 0 {
                why.push(format!("{} messages REORDERED (by {name})", a.reordered));
            }
        }
        if self.seq_offset_mismatch > 0 {
            why.push(format!(
                "{} broadcasts with offset != base + seq",
                self.seq_offset_mismatch
            ));
        }
        if self.unrecovered > 0 {
            why.push(format!(
                "{} resubscribes were not recovered",
                self.unrecovered
            ));
        }
        if self.connection_failures > 0 {
            why.push(format!(
                "{} connections failed or were dropped",
                self.connection_failures
            ));
        }
        if self.deliveries != self.expected_deliveries
            && self.scenario != "storm"
            && self.scenario != "soak"
        {
            why.push(format!(
                "{} deliveries, expected {}",
                self.deliveries, self.expected_deliveries
            ));
        }
        self.failures.extend(why);
        self.passed = self.failures.is_empty();
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "  {k:<34} {v}");
        };
        row("scenario", format!("{} ({})", self.scenario, self.label));
        if self.nodes > 1 {
            row(
                "servers",
                format!(
                    "{} nodes: {} (subscribers round robin, publishing to {})",
                    self.nodes,
                    self.server,
                    if self.publish_all { "all" } else { "the first" }
                ),
            );
        } else {
            row("server", self.server.clone());
        }
        row(
            "connections",
            format!(
                "{} ({} channels x {} subscribers), {} source addresses",
                self.connections,
                self.channels,
                self.subscribers_per_channel,
                self.source_addresses
            ),
        );
        if let Some(p) = &self.publish {
            let mode = match self.window {
                _ if self.scenario == "idle" => "one per channel after the hold".to_string(),
                Some(w) => format!(
                    "max rate, window {w}, {} request(s) in flight",
                    self.pipeline.unwrap_or(1)
                ),
                None => format!("{} msg/s", self.rate),
            };
            row(
                "published",
                format!(
                    "{} ({mode}, via {:?}, {} B payload), {} errors, behind schedule max {:.2} ms, rtt p50 {} µs",
                    p.published,
                    self.via.unwrap_or(Via::Rest),
                    self.payload_bytes,
                    p.errors,
                    p.max_behind_ms,
                    p.rtt_p50_us
                ),
            );
        }
        if self.scenario == "soak" {
            row(
                "deliveries",
                format!(
                    "{} ({} live, the rest replayed by recoveries)",
                    self.deliveries, self.latency.count
                ),
            );
            row("deliveries/s", format!("{:.0}", self.deliveries_per_s));
        } else if self.scenario != "storm" {
            row(
                "deliveries",
                format!(
                    "{} of {} expected",
                    self.deliveries, self.expected_deliveries
                ),
            );
            if self.scenario != "idle" {
                row("deliveries/s", format!("{:.0}", self.deliveries_per_s));
            }
        }
        if let Some(c) = self.connections_per_s {
            row(
                "connections/s",
                format!("{c:.0} ({} subscribed)", self.subscribed.unwrap_or(0)),
            );
        }
        let l = &self.latency;
        row(
            &format!("latency ms ({})", self.latency_kind),
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
                hist::ms(l.p50_ns),
                hist::ms(l.p90_ns),
                hist::ms(l.p99_ns),
                hist::ms(l.p999_ns),
                hist::ms(l.max_ns),
                l.count
            ),
        );
        row(
            "lost / duplicated / reordered",
            format!(
                "{} / {} / {} (seq)   {} / {} / {} (offset)",
                self.seq.lost,
                self.seq.duplicated,
                self.seq.reordered,
                self.offsets.lost,
                self.offsets.duplicated,
                self.offsets.reordered
            ),
        );
        if self.scenario == "recovery" {
            row(
                "reconnects / unrecovered",
                format!("{} / {}", self.reconnects, self.unrecovered),
            );
        }
        if let Some(k) = &self.soak {
            soak_rows(&mut row, k);
        }
        if let Some(f) = self.frame_bytes_mean {
            row("broadcast frame bytes (mean)", format!("{f:.0}"));
        }
        let opt = |v: Option<f64>, unit: &str| {
            v.map(|v| format!("{v:.3} {unit}"))
                .unwrap_or_else(|| "- (no --server-pid)".into())
        };
        if self.scenario != "storm" && self.scenario != "idle" {
            row(
                "CPU per delivered message",
                format!(
                    "server {}   load generator {:.3} µs",
                    opt(self.server_cpu_us_per_delivery, "µs"),
                    self.loadgen_cpu_us_per_delivery
                ),
            );
        }
        if self.scenario == "storm" {
            row(
                "CPU per connection",
                format!(
                    "server {}   load generator {:.3} µs",
                    opt(self.server_cpu_us_per_connection, "µs"),
                    self.loadgen_cpu_us_per_connection.unwrap_or(0.0)
                ),
            );
        }
        row(
            "CPU over the window",
            format!(
                "server {}   load generator {:.3} s over {:.2} s",
                opt(self.server_cpu_s, "s"),
                self.loadgen_cpu_s,
                self.measured_s
            ),
        );
        row(
            "kernel (system) share of CPU",
            format!(
                "server {}   load generator {:.0}%",
                self.server_cpu_sys_fraction
                    .map(|f| format!("{:.0}%", f * 100.0))
                    .unwrap_or_else(|| "-".into()),
                self.loadgen_cpu_sys_fraction * 100.0
            ),
        );
        if let Some(b) = self.server_rss_bytes_per_connection {
            row("server RSS per connection", format!("{b:.0} B"));
        }
        if let (Some(a), Some(b)) = (self.server_rss_before_bytes, self.server_rss_after_bytes) {
            row(
                "server RSS before / after",
                format!(
                    "{:.1} / {:.1} MiB",
                    a as f64 / 1048576.0,
                    b as f64 / 1048576.0
                ),
            );
        }
        if let Some(b) = self.loadgen_rss_bytes_per_connection {
            row("load generator RSS per connection", format!("{b:.0} B"));
        }
        if let Some(f) = &self.floor {
            for p in &f.points {
                row(
                    &format!("kernel floor, {} frame(s)/send", p.frames_per_send),
                    format!(
                        "{:.3} µs per frame ({} sockets, {} B frames)",
                        p.sender_cpu_us_per_frame, f.sockets, f.frame_bytes
                    ),
                );
            }
            if let Some(r) = self.server_ratio_to_floor_1 {
                row("server / floor (1 per send)", format!("{r:.2}x"));
            }
            if let Some(r) = self.server_ratio_to_floor_k {
                row("server / floor (k per send)", format!("{r:.2}x"));
            }
        }
        if let Some(c) = self.frames_per_write {
            row("frames per write (server)", format!("{c:.2}"));
        }
        if let (Some(f), Some(r)) = (
            self.floor_at_coalescing_us,
            self.server_ratio_to_floor_coalesced,
        ) {
            row("floor at that coalescing", format!("{f:.3} µs per frame"));
            row("server / floor at coalescing", format!("{r:.2}x"));
        }
        if let Some(p) = &self.paced_floor {
            row(
                "kernel floor, 1/send, paced",
                format!(
                    "{:.3} µs per frame ({:.0} passes/s of {} sockets, as the scenario)",
                    p.us_per_frame, p.passes_per_s, p.sockets_per_pass
                ),
            );
            if let Some(r) = p.server_ratio {
                row("server / paced floor", format!("{r:.2}x"));
            }
        }
        for e in self.errors.iter().take(5) {
            row("error", e.clone());
        }
        row(
            "result",
            if self.passed {
                "PASS".to_string()
            } else {
                format!("FAIL: {}", self.failures.join("; "))
            },
        );
        s
    }

    /// Writes the files asked for.
    pub fn write_outputs(&self, common: &Common) -> std::io::Result<()> {
        if let Some(p) = &common.json {
            let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
            std::fs::write(p, text + "\n")?;
        }
        let empty = hist::new_histogram();
        let h = self.histogram.as_ref().unwrap_or(&empty);
        if let Some(p) = &common.hgrm {
            std::fs::write(p, hist::hgrm(h))?;
        }
        if let Some(p) = &common.plot {
            let title = format!(
                "{}: {} latency, {} connections",
                self.label, self.latency_kind, self.connections
            );
            std::fs::write(
                p,
                hist::svg_plot(
                    &title,
                    &[hist::Series {
                        label: &self.label,
                        hist: h,
                    }],
                ),
            )?;
        }
        Ok(())
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1}", b as f64 / 1048576.0))
        .unwrap_or_else(|| "-".into())
}

fn num(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn gauges(g: Option<crate::metrics::Gauges>) -> String {
    g.map(|g| format!("{} / {}", g.connections_active, g.subscriptions_total))
        .unwrap_or_else(|| "?".into())
}

/// The soak's rows of the table.
fn soak_rows(row: &mut impl FnMut(&str, String), k: &crate::soak::SoakFigures) {
    row(
        "soak duration",
        format!(
            "{:.0} s churning (RSS reference after {:.0} s), {:.1} s to settle",
            k.duration_s, k.warmup_s, k.settle_s
        ),
    );
    row(
        "connections cycled",
        format!(
            "{} sessions ended and reconnected ({} by TCP drop), {} sessions in all, {} unsubscribe/resubscribe",
            k.cycled, k.abrupt_closes, k.sessions, k.resubscribes
        ),
    );
    row(
        "subscriptions checked",
        format!(
            "{} (connection, channel) pairs, 1-{} channels per connection; {} caught up at the end of {}",
            k.subscriptions, k.channels_per_conn_max, k.settled, k.connections
        ),
    );
    row(
        "recovery (since)",
        format!(
            "{} recovered, {} NOT recovered, {} gaps over --history-size {} ({} offsets), {} replayed deliveries",
            k.recovered,
            k.unrecovered,
            k.history_gaps,
            k.history_size,
            k.history_gap_offsets,
            k.replayed
        ),
    );
    if k.unexpected_broadcasts > 0 || k.never_subscribed > 0 {
        row(
            "unexpected",
            format!(
                "{} broadcasts while not subscribed, {} pairs never subscribed",
                k.unexpected_broadcasts, k.never_subscribed
            ),
        );
    }
    if k.publishers_behind_max_s > 1.0 {
        row(
            "WARNING",
            format!(
                "the publishers fell {:.1} s behind their schedule: the server or this host could not \
                 keep up, so latencies, and the RSS of queues under overload, are not steady-state \
                 figures (lower --rate or --connections, or raise --session)",
                k.publishers_behind_max_s
            ),
        );
    }
    let change = k
        .rss_change_pct
        .map(|c| {
            format!(
                "{c:+.2}% (limit ±{}% or ±{} MiB)",
                k.rss_tolerance_pct, k.rss_slack_mib
            )
        })
        .unwrap_or_else(|| "- (no --server-pid)".into());
    row(
        "server RSS MiB",
        format!(
            "start {} / after warm-up {} / end {} (medians over {:.0} s): {change}",
            mib(k.rss_before_bytes),
            mib(k.rss_warm_bytes),
            mib(k.rss_end_bytes),
            k.rss_window_s
        ),
    );
    row(
        "server RSS MiB, single samples",
        format!(
            "end of warm-up {} / end of churn {} / peak {} / after close {}",
            mib(k.rss_warm_instant_bytes),
            mib(k.rss_end_instant_bytes),
            mib(k.rss_peak_bytes),
            mib(k.rss_after_close_bytes)
        ),
    );
    row(
        "server file descriptors",
        format!(
            "start {} / peak {} / all open at the end {} / after close {}",
            num(k.fd_before),
            num(k.fd_peak),
            num(k.fd_open_end),
            num(k.fd_after)
        ),
    );
    row(
        "gauges conns / subs",
        format!(
            "before {}; at the end {} (expected {}); after close {}",
            gauges(Some(k.gauges_before)),
            gauges(k.gauges_open),
            gauges(Some(k.gauges_open_expected)),
            gauges(k.gauges_after_close)
        ),
    );
}

/// The one-frame-per-send floor measured at the scenario's pace.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PacedFloor {
    pub passes_per_s: f64,
    pub sockets_per_pass: usize,
    pub us_per_frame: f64,
    pub server_ratio: Option<f64>,
}
