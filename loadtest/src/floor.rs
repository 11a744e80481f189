//! The kernel floor: what a plain sender pays per frame to push broadcast-sized frames to N loopback
//! sockets with `send()`, one socket after another, while a reader on another thread drains them.
//! Every per-message figure of the server is reported as a ratio to this, measured in the same run
//! on the same machine (issue 4). With k frames per `send()` it gives the floor for coalesced writes.
//!
//! On loopback the sender's CPU also pays the receive side's TCP processing (softirq runs in the
//! sending thread), so the floor here is higher than on a real NIC; the server pays the same.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::{self, SourcePlan};
use crate::procstat;
use crate::ws;

/// The floor run's parameters.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FloorConfig {
    /// Sockets written in turn.
    pub(crate) sockets: usize,
    /// Bytes per frame (header included).
    pub(crate) frame_bytes: usize,
    /// Frames per `send()` to measure (1 is always measured first).
    pub(crate) frames_per_send: Vec<usize>,
    /// Sending time per measurement.
    pub(crate) seconds: f64,
    /// Passes per second; 0: as fast as the reader keeps up.
    pub(crate) passes_per_s: f64,
    /// Sockets written per pass, the next ones each pass (like one publication of a channel
    /// among several); 0: all of them.
    pub(crate) group: usize,
    /// Pin the sender to CPU 0 and the reader to CPU 1.
    pub(crate) pin: bool,
}

/// One measurement.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FloorPoint {
    /// Frames per `send()`.
    pub frames_per_send: usize,
    /// Frames sent.
    pub frames: u64,
    /// `send()` calls.
    pub sends: u64,
    /// Sender thread CPU (user + system), seconds.
    sender_cpu_s: f64,
    /// Reader thread CPU, seconds.
    reader_cpu_s: f64,
    /// Wall time, seconds.
    wall_s: f64,
    /// Sender CPU per frame, µs: the floor.
    pub sender_cpu_us_per_frame: f64,
    /// Reader CPU per frame, µs (a client's cost per message).
    pub reader_cpu_us_per_frame: f64,
}

/// The result of a floor run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FloorResult {
    /// Sockets actually used (capped by the open-files limit).
    pub sockets: usize,
    /// Bytes per frame.
    pub frame_bytes: usize,
    /// Each measurement, frames-per-send 1 first.
    pub points: Vec<FloorPoint>,
}

impl FloorResult {
    /// The floor for `k` frames per send (the nearest measured k at or below, else the first).
    pub(crate) fn us_per_frame(&self, k: usize) -> f64 {
        self.points
            .iter()
            .filter(|p| p.frames_per_send <= k.max(1))
            .max_by_key(|p| p.frames_per_send)
            .or(self.points.first())
            .map(|p| p.sender_cpu_us_per_frame)
            .unwrap_or(0.0)
    }
}

/// Builds one server-style frame of exactly `frame_bytes` bytes (at least 2): a broadcast-shaped
/// JSON text padded to size.
fn sample_frame(frame_bytes: usize) -> Vec<u8> {
    let frame_bytes = frame_bytes.max(16);
    // A 7-bit length covers bodies up to 125 bytes; larger ones take a 16-bit length (4-byte head).
    let body_len = if frame_bytes <= 127 {
        frame_bytes - 2
    } else {
        frame_bytes - 4
    };
    let mut body = br#"{"method":"broadcast","params":{"id":"01J0000000000000000000000","seq":1,"offset":1,"payload":{"pad":""#.to_vec();
    let tail = b"\"}}}";
    let pad = body_len.saturating_sub(body.len() + tail.len());
    body.resize(body.len() + pad, b'x');
    body.extend_from_slice(tail);
    body.truncate(body_len);
    let mut out = Vec::with_capacity(frame_bytes);
    ws::encode_server_frame(&mut out, ws::OP_TEXT, &body);
    out
}

/// The size of the frame the server sends for a `payload_bytes` payload on channel `channel`, as
/// estimated from the protocol (used when no broadcast was observed).
pub(crate) fn estimated_broadcast_frame_bytes(payload_bytes: usize, channel: &str) -> usize {
    let body = format!(
        r#"{{"method":"broadcast","params":{{"id":"01J0000000000000000000000","seq":1,"offset":1,"createTime":"2025-01-01T00:00:00.000Z","channel":"{channel}","event":"m","payload":}}}}"#
    )
    .len()
        + payload_bytes.max(40);
    body + if body < 126 { 2 } else { 4 }
}

/// Runs the floor measurement.
pub(crate) fn run(cfg: &FloorConfig) -> Result<FloorResult, String> {
    let (mut senders, receivers) = socket_pairs(cfg.sockets)?;
    let sockets = senders.len();
    let reader = Reader {
        stop: Arc::new(AtomicBool::new(false)),
        received: Arc::new(AtomicU64::new(0)),
        cpu: Arc::new(AtomicU64::new(0)),
    };
    let reader_thread = {
        let (r, pin) = (reader.clone(), cfg.pin);
        std::thread::Builder::new()
            .name("floor-reader".into())
            .spawn(move || reader_loop(receivers, r, pin))
            .map_err(|e| e.to_string())?
    };
    if cfg.pin {
        if let Err(e) = procstat::pin_current_thread(0) {
            eprintln!("floor: pinning the sender to CPU 0 failed: {e}");
        }
    }

    crate::schedule::precise_timers();
    let frame = sample_frame(cfg.frame_bytes);
    let mut ks = vec![1usize];
    ks.extend(cfg.frames_per_send.iter().copied().filter(|&k| k > 1));
    ks.dedup();
    let mut points = Vec::new();
    for &k in &ks {
        points.push(measure(cfg, &mut senders, &frame, k, &reader)?);
    }
    reader.stop.store(true, Ordering::Relaxed);
    drop(senders);
    let _ = reader_thread.join();
    Ok(FloorResult {
        sockets,
        frame_bytes: frame.len(),
        points,
    })
}

/// Up to `sockets` connected loopback pairs (capped by the open-files limit): the blocking
/// senders, and the non-blocking receiving ends.
fn socket_pairs(
    sockets: usize,
) -> Result<(Vec<std::net::TcpStream>, Vec<mio::net::TcpStream>), String> {
    let nofile = procstat::raise_nofile() as usize;
    // Each socket pair costs two descriptors; keep 64 for everything else.
    let n = sockets.min(nofile.saturating_sub(64) / 2).max(1);
    if n < sockets {
        eprintln!("floor: open-files limit {nofile} allows {n} socket pairs, not {sockets}");
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let plan = SourcePlan::loopback(n, 20_000, 1);
    let mut senders = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for i in 0..n {
        let s = net::connect_blocking(addr, plan.for_conn(i))
            .map_err(|e| format!("connect {i}: {e}"))?;
        let (r, _) = listener.accept().map_err(|e| format!("accept {i}: {e}"))?;
        r.set_nonblocking(true).map_err(|e| e.to_string())?;
        senders.push(s);
        receivers.push(mio::net::TcpStream::from_std(r));
    }
    Ok((senders, receivers))
}

/// What the reader thread reports, and how it is stopped.
#[derive(Clone)]
struct Reader {
    stop: Arc<AtomicBool>,
    /// Bytes read so far.
    received: Arc<AtomicU64>,
    /// The reader thread's CPU so far, ns.
    cpu: Arc<AtomicU64>,
}

/// One measurement: `k` frames per `send()` for `cfg.seconds`.
fn measure(
    cfg: &FloorConfig,
    senders: &mut [std::net::TcpStream],
    frame: &[u8],
    k: usize,
    reader: &Reader,
) -> Result<FloorPoint, String> {
    let buf: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * k)
        .collect();
    // Warm up: one pass so every socket has sent once (slow start, first-touch costs).
    for s in senders.iter_mut() {
        s.write_all(&buf).map_err(|e| format!("send: {e}"))?;
    }
    let bytes_before = reader.received.load(Ordering::Relaxed);
    let rc0 = reader.cpu.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let c0 = procstat::thread_cpu_ns();
    let sends = send_passes(cfg, senders, &buf, t0)?;
    let sender_cpu = procstat::thread_cpu_ns() - c0;
    let wall = t0.elapsed();
    // Let the reader drain what was sent before reading its CPU.
    let expect = bytes_before + sends * buf.len() as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while reader.received.load(Ordering::Relaxed) < expect && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(30));
    let rc1 = reader.cpu.load(Ordering::Relaxed);
    let frames = sends * k as u64;
    Ok(FloorPoint {
        frames_per_send: k,
        frames,
        sends,
        sender_cpu_s: sender_cpu as f64 / 1e9,
        reader_cpu_s: (rc1 - rc0) as f64 / 1e9,
        wall_s: wall.as_secs_f64(),
        sender_cpu_us_per_frame: sender_cpu as f64 / 1e3 / frames.max(1) as f64,
        reader_cpu_us_per_frame: (rc1 - rc0) as f64 / 1e3 / frames.max(1) as f64,
    })
}

/// Writes `buf` to the sockets in passes (paced when `cfg.passes_per_s` is set) for
/// `cfg.seconds` from `t0`; returns the `send()` calls made.
fn send_passes(
    cfg: &FloorConfig,
    senders: &mut [std::net::TcpStream],
    buf: &[u8],
    t0: Instant,
) -> Result<u64, String> {
    let run_for = Duration::from_secs_f64(cfg.seconds.max(0.1));
    let pass_interval =
        (cfg.passes_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.passes_per_s));
    let mut sends = 0u64;
    let mut pass = 0u64;
    while t0.elapsed() < run_for {
        if let Some(iv) = pass_interval {
            crate::schedule::sleep_until(t0 + iv * pass as u32);
        }
        let n = senders.len();
        let group = if cfg.group == 0 { n } else { cfg.group.min(n) };
        let start = (pass as usize).wrapping_mul(group) % n;
        for i in 0..group {
            senders[(start + i) % n]
                .write_all(buf)
                .map_err(|e| format!("send: {e}"))?;
        }
        sends += group as u64;
        pass += 1;
    }
    Ok(sends)
}

fn reader_loop(mut socks: Vec<mio::net::TcpStream>, r: Reader, pin: bool) {
    if pin {
        if let Err(e) = procstat::pin_current_thread(1) {
            eprintln!("floor: pinning the reader to CPU 1 failed: {e}");
        }
    }
    let c0 = procstat::thread_cpu_ns();
    let Ok(mut poll) = mio::Poll::new() else {
        return;
    };
    for (i, s) in socks.iter_mut().enumerate() {
        let _ = poll
            .registry()
            .register(s, mio::Token(i), mio::Interest::READABLE);
    }
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while !r.stop.load(Ordering::Relaxed) {
        if poll
            .poll(&mut events, Some(Duration::from_millis(10)))
            .is_err()
        {
            continue;
        }
        for ev in events.iter() {
            let Some(s) = socks.get_mut(ev.token().0) else {
                continue;
            };
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n as u64;
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        r.received.store(total, Ordering::Relaxed);
        r.cpu
            .store(procstat::thread_cpu_ns() - c0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_frames_have_the_asked_size_and_decode() {
        for n in [60usize, 127, 130, 180, 400] {
            let f = sample_frame(n);
            assert_eq!(f.len(), n, "size {n}");
            let d = ws::decode_server_frame(&f).unwrap().unwrap();
            assert_eq!(d.end, n);
        }
        let est = estimated_broadcast_frame_bytes(64, "lt/fanout");
        assert!((150..260).contains(&est), "{est}");
    }

    #[test]
    fn a_tiny_floor_run_measures_something() {
        let r = run(&FloorConfig {
            sockets: 8,
            frame_bytes: 180,
            frames_per_send: vec![4],
            seconds: 0.1,
            passes_per_s: 0.0,
            group: 0,
            pin: false,
        })
        .unwrap();
        assert_eq!(r.points.len(), 2);
        assert!(r
            .points
            .iter()
            .all(|p| p.frames > 0 && p.sender_cpu_us_per_frame > 0.0));
        assert!(r.us_per_frame(4) > 0.0);
        assert_eq!(r.us_per_frame(1), r.points[0].sender_cpu_us_per_frame);
    }
}
