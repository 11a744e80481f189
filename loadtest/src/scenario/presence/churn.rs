//! The churn: `--workers` threads, each cycling through its share of the users, one connection at
//! a time: connect, upgrade, `auth` and a `subscribe` per channel in one write, every answer read,
//! then the WebSocket closing handshake. A user's cycles run on one worker, one after the other,
//! so each cycle is the user's first connection in and its last out: one join and one leave per
//! channel. With `--keep-one` every user also holds a connection of its own ([`Keepers`]), so a
//! cycle changes nobody's presence.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::extract::{self, Message};
use crate::hist;
use crate::net::{Node, SourcePlan};
use crate::presence::channel_request;
use crate::publisher::WsConn;

/// How long the server has to answer a close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed cycle (no hot loop against a refusing server).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Error messages kept.
const ERRORS_MAX: usize = 20;

/// One user: its `sub`, its token, and the node its connections go to.
#[derive(Debug, Clone)]
pub(super) struct User {
    pub(super) name: String,
    pub(super) token: String,
    pub(super) node: usize,
}

/// What the churn runs.
#[derive(Clone)]
pub(super) struct Churn {
    pub(super) users: Arc<Vec<User>>,
    pub(super) nodes: Arc<Vec<Node>>,
    pub(super) channels: Arc<Vec<String>>,
    pub(super) workers: usize,
    /// Cycles, all workers together (None: until `duration`).
    pub(super) count: Option<u64>,
    pub(super) duration: Duration,
    pub(super) sources: SourcePlan,
    /// Subscribe results must carry a presence object (the presence phase; not the baseline).
    pub(super) expect_presence: bool,
    pub(super) cpus: Vec<usize>,
}

/// What the workers share while they run.
#[derive(Default)]
pub(super) struct Progress {
    /// Cycles started (claimed), for `--count`.
    claimed: AtomicU64,
    /// Cycles completed.
    pub(super) cycles: AtomicU64,
    pub(super) failures: AtomicU64,
    /// Subscribe results without a presence object where one was due.
    pub(super) missing_presence: AtomicU64,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Progress {
    fn error(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < ERRORS_MAX {
                v.push(e);
            }
        }
    }
}

/// The churn's outcome.
pub(super) struct ChurnResult {
    pub(super) cycles: u64,
    pub(super) failures: u64,
    pub(super) missing_presence: u64,
    /// Connect to the last subscribe result, per cycle, ns.
    pub(super) setup: Histogram<u64>,
    pub(super) errors: Vec<String>,
}

/// Runs the churn to its end (`count` or `duration`), printing progress once a second.
pub(super) fn run(c: &Churn, quiet: bool, label: &str) -> Result<ChurnResult, String> {
    let progress = Arc::new(Progress::default());
    let handles = (0..c.workers)
        .map(|w| {
            let (c2, p) = (c.clone(), progress.clone());
            std::thread::Builder::new()
                .name(format!("lt-presence-{w}"))
                .spawn(move || worker(&c2, w, &p))
                .map_err(|e| format!("spawning a churn thread: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let t0 = Instant::now();
    let deadline = t0 + c.duration;
    watch(c, &progress, &handles, deadline, quiet, label);
    let mut setup = hist::new_histogram();
    for h in handles {
        match h.join() {
            Ok(w) => {
                let _ = setup.add(&w);
            }
            Err(_) => {
                progress.failures.fetch_add(1, Ordering::Relaxed);
                progress.error("a churn thread panicked".into());
            }
        }
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(ChurnResult {
        cycles: load(&progress.cycles),
        failures: load(&progress.failures),
        missing_presence: load(&progress.missing_presence),
        setup,
        errors: progress
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default(),
    })
}

/// Waits for the workers, stopping them at the deadline (without `--count`).
fn watch(
    c: &Churn,
    progress: &Progress,
    handles: &[JoinHandle<Histogram<u64>>],
    deadline: Instant,
    quiet: bool,
    label: &str,
) {
    let t0 = Instant::now();
    let mut next_line = t0 + Duration::from_secs(1);
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
        let now = Instant::now();
        if c.count.is_none() && now >= deadline {
            progress.stop.store(true, Ordering::Relaxed);
        }
        if !quiet && now >= next_line {
            next_line += Duration::from_secs(1);
            eprintln!(
                "  {label}: [{:5.1}s] cycles {} failures {}",
                now.duration_since(t0).as_secs_f64(),
                progress.cycles.load(Ordering::Relaxed),
                progress.failures.load(Ordering::Relaxed)
            );
        }
    }
}

/// One worker: users `w`, `w + workers`, ... in turn, until the count or the stop.
fn worker(c: &Churn, w: usize, p: &Progress) -> Histogram<u64> {
    if !c.cpus.is_empty() {
        let _ = crate::procstat::pin_current_thread(c.cpus[w % c.cpus.len()]);
    }
    let mine: Vec<&User> = c.users.iter().skip(w).step_by(c.workers).collect();
    let mut h = hist::new_histogram();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((w as u64) << 32);
    for turn in 0u64.. {
        if p.stop.load(Ordering::Relaxed) {
            break;
        }
        let k = p.claimed.fetch_add(1, Ordering::Relaxed);
        if c.count.is_some_and(|n| k >= n) {
            break;
        }
        let user = mine[(turn % mine.len() as u64) as usize];
        seed = seed.wrapping_add(1);
        match cycle(c, user, c.sources.for_conn(k as usize), seed) {
            Ok((setup, missing)) => {
                hist::record(&mut h, setup.as_nanos() as u64);
                p.missing_presence.fetch_add(missing, Ordering::Relaxed);
                p.cycles.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                p.failures.fetch_add(1, Ordering::Relaxed);
                p.error(format!("{}: {e}{}", user.name, hint(&e)));
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
    h
}

/// One cycle of `user`: the time from connect to the last subscribe result, and how many of
/// those results lacked the presence object they were due.
fn cycle(
    c: &Churn,
    user: &User,
    source: Option<Ipv4Addr>,
    seed: u64,
) -> Result<(Duration, u64), String> {
    let t0 = Instant::now();
    let mut ws = WsConn::upgrade(&c.nodes[user.node], source, seed)?;
    let missing = auth_and_subscribe(&mut ws, &user.token, &c.channels, c.expect_presence)?;
    let setup = t0.elapsed();
    ws.close(CLOSE_TIMEOUT)?;
    Ok((setup, missing))
}

/// `auth` (id 1) and a `subscribe` per channel (ids 2..) in one write, then every answer; the
/// subscribe results without a presence object when `expect_presence`.
pub(super) fn auth_and_subscribe(
    ws: &mut WsConn,
    token: &str,
    channels: &[String],
    expect_presence: bool,
) -> Result<u64, String> {
    let mut auth = b"{\"id\":1,\"method\":\"auth\",\"params\":{\"token\":".to_vec();
    extract::push_json_str(&mut auth, token);
    auth.extend_from_slice(b"}}");
    let mut reqs = vec![auth];
    reqs.extend(
        channels
            .iter()
            .enumerate()
            .map(|(i, ch)| channel_request(i as u64 + 2, "subscribe", ch)),
    );
    let refs: Vec<&[u8]> = reqs.iter().map(Vec::as_slice).collect();
    ws.send_texts(&refs)?;
    let (mut answered, mut missing) = (0, 0);
    while answered < reqs.len() {
        let text = ws.next_text()?.ok_or("no answer within 10 s")?;
        let Message::Response(r) = extract::parse_message(&text) else {
            continue;
        };
        let Some(id) = r
            .request_id
            .filter(|&id| id >= 1 && id <= reqs.len() as u64)
        else {
            continue;
        };
        if let Some(code) = r.error_code {
            return Err(match id {
                1 => format!("auth failed: {code} (check --secret)"),
                _ => format!("subscribe to {} failed: {code}", channels[id as usize - 2]),
            });
        }
        answered += 1;
        if id >= 2 && expect_presence && crate::ws::find(&text, b"\"presence\":").is_none() {
            missing += 1;
        }
    }
    Ok(missing)
}

/// What an error most likely means.
fn hint(error: &str) -> &'static str {
    if error.contains("subscribe") && error.contains("ResourceExhausted") {
        " (the rule's presence_members_max, 1000 by default, counts the users, the observers \
         and with --keep-one every user at once: raise it, or use fewer --users)"
    } else if error.contains("503") {
        " (the server's cap on anonymous connections per address: \
         BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000)"
    } else {
        ""
    }
}

/// `--keep-one`: a connection per user, subscribed to every channel on the user's node, held
/// while the churn runs; a thread answers their pings.
pub(super) struct Keepers {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<WsConn>>>,
}

impl Keepers {
    /// Opens them all (one after the other: this is before the measurement).
    pub(super) fn open(c: &Churn) -> Result<Keepers, String> {
        let mut conns = Vec::with_capacity(c.users.len());
        for (i, u) in c.users.iter().enumerate() {
            let seed = 0xC0FF_EE00 ^ i as u64;
            let mut ws = WsConn::upgrade(&c.nodes[u.node], c.sources.for_conn(i), seed)
                .map_err(|e| format!("--keep-one connection of {}: {e}", u.name))?;
            auth_and_subscribe(&mut ws, &u.token, &c.channels, false)
                .map_err(|e| format!("--keep-one connection of {}: {e}{}", u.name, hint(&e)))?;
            ws.set_nonblocking(true)?;
            conns.push(ws);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("lt-keepers".into())
            .spawn(move || {
                // Reading keeps their buffers drained and their pings answered.
                while !s.load(Ordering::Relaxed) {
                    for ws in &mut conns {
                        while let Ok(Some(_)) = ws.next_text() {}
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                conns
            })
            .map_err(|e| format!("spawning the keepers' thread: {e}"))?;
        Ok(Keepers {
            stop,
            handle: Some(handle),
        })
    }

    /// Closes them all (the closing handshake each).
    pub(super) fn close(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let Some(conns) = self.handle.take().and_then(|h| h.join().ok()) else {
            return vec!["the keepers' thread panicked".into()];
        };
        conns
            .into_iter()
            .filter_map(|mut ws| {
                let _ = ws.set_nonblocking(false);
                ws.close(CLOSE_TIMEOUT).err()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_setting() {
        assert!(
            hint("subscribe to room/x failed: ResourceExhausted").contains("presence_members_max")
        );
        assert!(hint("upgrade refused: HTTP/1.1 503").contains("PER_IP_MAX"));
        assert_eq!(hint("read: timed out"), "");
    }
}
