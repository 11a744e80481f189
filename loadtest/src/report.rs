//! The run summary: a human table on stdout, a JSON file, the `.hgrm` distribution and an SVG plot.
//! A scenario hands in its own rows of the table as (label, value) pairs ([`ScenarioRows`]), and
//! its own figures, if any, as a serializable value; so this module knows no scenario.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::checker::Anomalies;
use crate::cli::{Common, Peer};
use crate::floor::FloorResult;
use crate::hist::{self, Percentiles};
use crate::net::Node;
use crate::publisher::{PublishResult, Via};

/// One row of the table: label, value.
pub(crate) type Row = (String, String);

/// A row from a label and a value.
pub(crate) fn row(label: &str, value: String) -> Row {
    (label.to_string(), value)
}

/// The rows a scenario adds to the common table, in the three places where what is worth saying
/// differs by scenario.
#[derive(Debug, Default)]
pub(crate) struct ScenarioRows {
    /// After `published`: what arrived (deliveries, or the connections a storm set up).
    pub(crate) delivered: Vec<Row>,
    /// After the loss counts: the scenario's own checks (reconnects, the soak's churn and leaks).
    pub(crate) checks: Vec<Row>,
    /// Before the CPU totals: the CPU per unit of work (a delivered message, a connection).
    pub(crate) cost: Vec<Row>,
}

/// Everything a run measured. Serialized as the JSON summary (`--json`). `F` is the scenario's own
/// figures (the soak's, the scoreboard's), `()` for the scenarios without any.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report<F = ()> {
    /// Scenario name.
    pub(crate) scenario: &'static str,
    /// `--label`, or the scenario name.
    pub(crate) label: String,
    /// What was driven: `broadcaster`, or `nchan` (the peer, its protocol spoken instead).
    pub(crate) peer: Peer,
    /// The server's public address (several nodes: comma separated).
    pub(crate) server: String,
    /// Server nodes the subscribers were spread over.
    pub(crate) nodes: u64,
    /// Publications went round robin to every node (otherwise to the first).
    pub(crate) publish_all: bool,
    /// Subscriber connections.
    pub(crate) connections: u64,
    /// Channels.
    pub(crate) channels: u64,
    /// Subscribers per channel.
    pub(crate) subscribers_per_channel: u64,
    /// Publication rate asked for (0: max rate).
    pub(crate) rate: f64,
    /// How publications were made.
    pub(crate) via: Option<Via>,
    /// Max-rate mode window.
    pub(crate) window: Option<u64>,
    /// Max-rate mode: publish requests in flight at most.
    pub(crate) pipeline: Option<u64>,
    /// Payload bytes.
    pub(crate) payload_bytes: usize,
    /// The publisher's results.
    pub(crate) publish: Option<PublishResult>,
    /// Broadcasts received.
    pub(crate) deliveries: u64,
    /// Broadcasts that should have been received.
    pub(crate) expected_deliveries: u64,
    /// Seconds of the measurement window (publish start to last delivery; the hold for idle; the
    /// storm itself).
    pub(crate) measured_s: f64,
    /// Deliveries per second of publishing.
    pub(crate) deliveries_per_s: f64,
    /// What `latency` measures: `end_to_end` (scheduled send to receipt) or `connect_to_subscribed`.
    pub(crate) latency_kind: &'static str,
    /// Latency percentiles, nanoseconds.
    pub(crate) latency: Percentiles,
    /// Anomalies by `seq` (per subscription).
    pub(crate) seq: Anomalies,
    /// Anomalies by `offset` (per channel, across a subscriber's reconnects).
    pub(crate) offsets: Anomalies,
    /// Broadcasts whose offset was not the subscription's base + seq.
    pub(crate) seq_offset_mismatch: u64,
    /// Broadcasts without a send time in the payload.
    pub(crate) untimed: u64,
    /// Recovery: subscribes with `since` answered `recovered: false`.
    pub(crate) unrecovered: u64,
    /// Recovery: reconnects made.
    pub(crate) reconnects: u64,
    /// Connections that failed or were dropped.
    pub(crate) connection_failures: u64,
    /// Storm: connections that subscribed.
    pub(crate) subscribed: Option<u64>,
    /// Storm: connect + auth + subscribe per second.
    pub(crate) connections_per_s: Option<f64>,
    /// Mean size of a broadcast frame, header included.
    pub(crate) frame_bytes_mean: Option<f64>,
    /// Server CPU (user + system) over the window, seconds.
    pub(crate) server_cpu_s: Option<f64>,
    /// The broker's CPU (`--broker-pid`) over the window above its idle rate, seconds.
    pub(crate) broker_cpu_s: Option<f64>,
    /// The broker's CPU (above idle) per publication accepted, µs.
    pub(crate) broker_cpu_us_per_publication: Option<f64>,
    /// Server CPU per delivered message, µs.
    pub(crate) server_cpu_us_per_delivery: Option<f64>,
    /// Storm: server CPU per connection, µs.
    pub(crate) server_cpu_us_per_connection: Option<f64>,
    /// Server RSS before (idle: before connecting), bytes.
    pub(crate) server_rss_before_bytes: Option<u64>,
    /// Server RSS after, bytes.
    pub(crate) server_rss_after_bytes: Option<u64>,
    /// Idle: server RSS growth per connection, bytes.
    pub(crate) server_rss_bytes_per_connection: Option<f64>,
    /// Share of the server's CPU spent in the kernel (system time).
    pub(crate) server_cpu_sys_fraction: Option<f64>,
    /// Load generator CPU over the window, seconds.
    pub(crate) loadgen_cpu_s: f64,
    /// Share of the load generator's CPU spent in the kernel.
    pub(crate) loadgen_cpu_sys_fraction: f64,
    /// Load generator CPU per delivered message, µs.
    pub(crate) loadgen_cpu_us_per_delivery: f64,
    /// Storm: load generator CPU per connection, µs.
    pub(crate) loadgen_cpu_us_per_connection: Option<f64>,
    /// Load generator RSS, bytes.
    pub(crate) loadgen_rss_bytes: u64,
    /// Idle: load generator RSS growth per connection.
    pub(crate) loadgen_rss_bytes_per_connection: Option<f64>,
    /// Receive threads.
    pub(crate) loadgen_threads: u64,
    /// The open-files limit the load generator ran with.
    pub(crate) open_files_limit: u64,
    /// Source addresses used.
    pub(crate) source_addresses: u64,
    /// The scenario's own figures (the soak's churn, recovery, RSS, descriptor and gauge
    /// figures; the scoreboard's two kinds of viewers), set with [`Report::set_figures`]: under
    /// the scenario's name in the JSON summary (`soak`, `scoreboard`); absent for the scenarios
    /// without any.
    #[serde(flatten)]
    figures: Option<Named<F>>,
    /// The kernel floor, when measured (`--floor`).
    pub(crate) floor: Option<FloorResult>,
    /// Server CPU per delivery divided by the one-frame-per-send floor.
    server_ratio_to_floor_1: Option<f64>,
    /// Server CPU per delivery divided by the k-frames-per-send floor.
    server_ratio_to_floor_k: Option<f64>,
    /// Fixed-rate scenarios: the one-frame-per-send floor with the sender pacing its passes
    /// like the scenario (each socket gets `passes_per_s` frames a second), so the reader sleeps
    /// between passes as the subscribers do; the back-to-back floor keeps the reader busy and
    /// saves the sender the wake-ups.
    paced_floor: Option<PacedFloor>,
    /// Broadcast frames per socket write on the server (from its `/metrics`: frames queued over
    /// writes that carried them, during the run).
    pub(crate) frames_per_write: Option<f64>,
    /// The floor per frame at that coalescing, from the 1- and k-frame floors with a fixed cost
    /// per `send()` plus a cost per frame: `f(c) = a + b / c`.
    floor_at_coalescing_us: Option<f64>,
    /// Server CPU per delivery over `floor_at_coalescing_us` (issue 4, target 3).
    server_ratio_to_floor_coalesced: Option<f64>,
    /// First error messages.
    pub errors: Vec<String>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    /// True when nothing was lost, duplicated, reordered or refused.
    pub passed: bool,
    /// The merged latency histogram (not serialized).
    #[serde(skip)]
    pub(crate) histogram: Option<Histogram<u64>>,
    /// The scenario's rows of the table (not serialized: their figures are fields above).
    #[serde(skip)]
    pub(crate) rows: ScenarioRows,
    /// How publications were paced when neither a rate nor a window says (idle: one per channel
    /// after the hold).
    #[serde(skip)]
    pub(crate) publish_pace: Option<&'static str>,
    /// The run expects no particular number of deliveries (a storm publishes nothing; what the
    /// soak's connections receive depends on the churn).
    #[serde(skip)]
    pub(crate) deliveries_unchecked: bool,
}

impl<F> Report<F> {
    /// An empty report for `scenario`.
    pub(crate) fn new(scenario: &'static str, common: &Common, nodes: &[Node]) -> Self
    where
        F: Default,
    {
        Report {
            scenario,
            label: common.label.clone().unwrap_or_else(|| scenario.to_string()),
            server: nodes
                .iter()
                .map(|n| n.addr.to_string())
                .collect::<Vec<_>>()
                .join(","),
            nodes: nodes.len() as u64,
            peer: common.peer,
            latency_kind: "end_to_end",
            payload_bytes: common.payload_bytes,
            ..Default::default()
        }
    }

    /// Sets the scenario's own figures (the JSON summary's object named after the scenario).
    pub(crate) fn set_figures(&mut self, figures: F) {
        self.figures = Some(Named {
            name: self.scenario,
            figures,
        });
    }

    /// Records a reason the run failed.
    pub(crate) fn fail(&mut self, why: String) {
        self.failures.push(why);
    }

    /// Adds the paced floor and the ratio to it.
    pub(crate) fn set_paced_floor(
        &mut self,
        passes_per_s: f64,
        sockets_per_pass: usize,
        f: &FloorResult,
    ) {
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
    pub(crate) fn set_floor(&mut self, f: FloorResult) {
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
    pub(crate) fn finish(&mut self) {
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
        if self.deliveries != self.expected_deliveries && !self.deliveries_unchecked {
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
        let mut s = String::new();
        for (k, v) in self.table_rows() {
            let _ = writeln!(s, "  {k:<34} {v}");
        }
        s
    }

    /// Every row of the table: the common ones, and the scenario's in their places.
    fn table_rows(&self) -> Vec<Row> {
        let mut rows = self.setup_rows();
        rows.extend(self.rows.delivered.iter().cloned());
        rows.extend(self.quality_rows());
        rows.extend(self.rows.checks.iter().cloned());
        if let Some(f) = self.frame_bytes_mean {
            rows.push(row("broadcast frame bytes (mean)", format!("{f:.0}")));
        }
        rows.extend(self.rows.cost.iter().cloned());
        rows.extend(self.cpu_rows());
        rows.extend(self.memory_rows());
        rows.extend(self.floor_rows());
        for e in self.errors.iter().take(5) {
            rows.push(row("error", e.clone()));
        }
        let result = if self.passed {
            "PASS".to_string()
        } else {
            format!("FAIL: {}", self.failures.join("; "))
        };
        rows.push(row("result", result));
        rows
    }

    /// What ran against what: the scenario, the servers, the connections, the publishing.
    fn setup_rows(&self) -> Vec<Row> {
        let mut rows = vec![row(
            "scenario",
            format!("{} ({})", self.scenario, self.label),
        )];
        if self.nodes > 1 {
            rows.push(row(
                "servers",
                format!(
                    "{} nodes: {} (subscribers round robin, publishing to {})",
                    self.nodes,
                    self.server,
                    if self.publish_all { "all" } else { "the first" }
                ),
            ));
        } else if self.peer == Peer::Nchan {
            rows.push(row("server", format!("{} (Nchan)", self.server)));
        } else {
            rows.push(row("server", self.server.clone()));
        }
        rows.push(row(
            "connections",
            format!(
                "{} ({} channels x {} subscribers), {} source addresses",
                self.connections,
                self.channels,
                self.subscribers_per_channel,
                self.source_addresses
            ),
        ));
        if let Some(p) = &self.publish {
            let mode = match (self.publish_pace, self.window) {
                (Some(pace), _) => pace.to_string(),
                (None, Some(w)) => format!(
                    "max rate, window {w}, {} request(s) in flight",
                    self.pipeline.unwrap_or(1)
                ),
                (None, None) => format!("{} msg/s", self.rate),
            };
            rows.push(row(
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
            ));
        }
        rows
    }

    /// How fast and how faithfully messages arrived.
    fn quality_rows(&self) -> Vec<Row> {
        let l = &self.latency;
        vec![
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
            ),
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
            ),
        ]
    }

    /// CPU over the measurement window, and the kernel's share of it.
    fn cpu_rows(&self) -> Vec<Row> {
        let mut rows = vec![
            row(
                "CPU over the window",
                format!(
                    "server {}   load generator {:.3} s over {:.2} s",
                    with_pid(self.server_cpu_s, "s"),
                    self.loadgen_cpu_s,
                    self.measured_s
                ),
            ),
            row(
                "kernel (system) share of CPU",
                format!(
                    "server {}   load generator {:.0}%",
                    self.server_cpu_sys_fraction
                        .map(|f| format!("{:.0}%", f * 100.0))
                        .unwrap_or_else(|| "-".into()),
                    self.loadgen_cpu_sys_fraction * 100.0
                ),
            ),
        ];
        if let (Some(s), Some(per)) = (self.broker_cpu_s, self.broker_cpu_us_per_publication) {
            rows.push(row(
                "broker (redis) CPU above idle",
                format!("{s:.3} s, {per:.2} µs per publication"),
            ));
        }
        rows
    }

    /// Server and load-generator RSS, where measured.
    fn memory_rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(b) = self.server_rss_bytes_per_connection {
            rows.push(row("server RSS per connection", format!("{b:.0} B")));
        }
        if let (Some(a), Some(b)) = (self.server_rss_before_bytes, self.server_rss_after_bytes) {
            rows.push(row(
                "server RSS before / after",
                format!(
                    "{:.1} / {:.1} MiB",
                    a as f64 / 1048576.0,
                    b as f64 / 1048576.0
                ),
            ));
        }
        if let Some(b) = self.loadgen_rss_bytes_per_connection {
            rows.push(row(
                "load generator RSS per connection",
                format!("{b:.0} B"),
            ));
        }
        rows
    }

    /// The kernel floor and the server's ratios to it, where measured.
    fn floor_rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(f) = &self.floor {
            for p in &f.points {
                rows.push(row(
                    &format!("kernel floor, {} frame(s)/send", p.frames_per_send),
                    format!(
                        "{:.3} µs per frame ({} sockets, {} B frames)",
                        p.sender_cpu_us_per_frame, f.sockets, f.frame_bytes
                    ),
                ));
            }
            if let Some(r) = self.server_ratio_to_floor_1 {
                rows.push(row("server / floor (1 per send)", format!("{r:.2}x")));
            }
            if let Some(r) = self.server_ratio_to_floor_k {
                rows.push(row("server / floor (k per send)", format!("{r:.2}x")));
            }
        }
        if let Some(c) = self.frames_per_write {
            rows.push(row("frames per write (server)", format!("{c:.2}")));
        }
        if let (Some(f), Some(r)) = (
            self.floor_at_coalescing_us,
            self.server_ratio_to_floor_coalesced,
        ) {
            rows.push(row(
                "floor at that coalescing",
                format!("{f:.3} µs per frame"),
            ));
            rows.push(row("server / floor at coalescing", format!("{r:.2}x")));
        }
        if let Some(p) = &self.paced_floor {
            rows.push(row(
                "kernel floor, 1/send, paced",
                format!(
                    "{:.3} µs per frame ({:.0} passes/s of {} sockets, as the scenario)",
                    p.us_per_frame, p.passes_per_s, p.sockets_per_pass
                ),
            ));
            if let Some(r) = p.server_ratio {
                rows.push(row("server / paced floor", format!("{r:.2}x")));
            }
        }
        rows
    }

    /// `deliveries`: how many of those expected arrived.
    pub(crate) fn deliveries_row(&self) -> Row {
        row(
            "deliveries",
            format!(
                "{} of {} expected",
                self.deliveries, self.expected_deliveries
            ),
        )
    }

    /// `deliveries/s`.
    pub(crate) fn delivery_rate_row(&self) -> Row {
        row("deliveries/s", format!("{:.0}", self.deliveries_per_s))
    }

    /// `CPU per delivered message`, server and load generator.
    pub(crate) fn cpu_per_delivery_row(&self) -> Row {
        row(
            "CPU per delivered message",
            format!(
                "server {}   load generator {:.3} µs",
                with_pid(self.server_cpu_us_per_delivery, "µs"),
                self.loadgen_cpu_us_per_delivery
            ),
        )
    }
}

impl<F: serde::Serialize> Report<F> {
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

/// A scenario's own figures under its name: one entry, `{"<name>": {...}}`, flattened into the
/// JSON summary.
#[derive(Debug)]
struct Named<F> {
    name: &'static str,
    figures: F,
}

impl<F: serde::Serialize> serde::Serialize for Named<F> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.name, &self.figures)?;
        m.end()
    }
}

/// A server figure, or why there is none.
pub(crate) fn with_pid(v: Option<f64>, unit: &str) -> String {
    v.map(|v| format!("{v:.3} {unit}"))
        .unwrap_or_else(|| "- (no --server-pid)".into())
}

/// The one-frame-per-send floor measured at the scenario's pace.
#[derive(Debug, Clone, serde::Serialize)]
struct PacedFloor {
    passes_per_s: f64,
    sockets_per_pass: usize,
    us_per_frame: f64,
    server_ratio: Option<f64>,
}
