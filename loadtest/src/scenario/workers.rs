//! The subscribers' receive workers as the scenarios drive them: spread the subscribers over the
//! threads and the nodes, wait until every one subscribed, merge their results into the report.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::checker::Anomalies;
use crate::cli::Common;
use crate::client::{self, ClientConfig, Shared, SubSpec, WorkerResult};
use crate::harness::{Env, WindowEnd};
use crate::hist;
use crate::net::SourcePlan;
use crate::procstat;
use crate::report::Report;

/// Running receive workers.
pub(super) struct Workers {
    pub(super) shared: Arc<Shared>,
    handles: Vec<std::thread::JoinHandle<WorkerResult>>,
    /// Subscribers over all the workers.
    total: usize,
}

/// Starts `env.threads` receive workers, the subscribers dealt round robin.
pub(super) fn spawn_workers(
    env: &Env,
    common: &Common,
    cfg: ClientConfig,
    specs: Vec<SubSpec>,
) -> Workers {
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
    /// Subscribers over all the workers.
    pub(super) fn total(&self) -> usize {
        self.total
    }

    /// Stops the workers and collects their results.
    pub(super) fn join(self) -> (Arc<Shared>, Vec<WorkerResult>) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let results = self
            .handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .collect();
        (self.shared, results)
    }

    /// Waits until every connection subscribed (or failed), printing progress.
    pub(super) fn wait_subscribed(&self, common: &Common, what: &str) -> Result<Duration, String> {
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
pub(super) struct Merged {
    hist: Option<Histogram<u64>>,
    seq: Anomalies,
    offsets: Anomalies,
    seq_offset_mismatch: u64,
    frames: u64,
    frame_bytes: u64,
    untimed: u64,
    never_subscribed: u64,
}

/// Merges the workers' results; each subscriber's tail is checked up to its channel's last offset.
pub(super) fn merge(results: Vec<WorkerResult>, last_offsets: &[u64]) -> Merged {
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

/// The figures every receive-worker scenario reports, from the workers' results and the window.
pub(super) fn fill_common(report: &mut Report, shared: &Shared, merged: Merged, end: &WindowEnd) {
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
    end.record(report);
    report.server_rss_before_bytes = end.server_before.map(|s| s.rss_bytes);
    report.server_rss_after_bytes = end.server_after.map(|s| s.rss_bytes);
    if merged.never_subscribed > 0 {
        report.fail(format!(
            "{} subscribers never subscribed",
            merged.never_subscribed
        ));
    }
    report.histogram = Some(h);
}

/// `msg`, with the first connection errors.
pub(super) fn with_errors(msg: String, shared: &Shared) -> String {
    let errs = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    if errs.is_empty() {
        msg
    } else {
        format!("{msg}; first errors:\n  {}", errs.join("\n  "))
    }
}

/// The once-a-second progress line.
pub(super) fn progress_line(
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

/// Subscriber `i` takes channel `i % channels` and, within its channel, the nodes in turn, so every
/// channel's subscribers are spread evenly over the nodes whatever the channel and node counts.
pub(super) fn specs(plan: &SourcePlan, n: usize, channels: usize, nodes: usize) -> Vec<SubSpec> {
    let channels = channels.max(1);
    (0..n)
        .map(|i| SubSpec {
            channel: (i % channels) as u32,
            node: ((i / channels) % nodes.max(1)) as u16,
            source: plan.for_conn(i),
        })
        .collect()
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
}
