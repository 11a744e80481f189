//! Criterion benchmarks of the hot paths. Run: `cargo bench --bench hot_paths`.
//! Each group's first line says what it measures.

use broadcaster::channel::Asked;
use broadcaster::channel::Channels;
use broadcaster::config::Config;
use broadcaster::connection::Conn;
use broadcaster::node::Node;
use broadcaster::shard::Shard;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A payload that makes a broadcast frame of about 180 bytes, the size the performance issue uses.
const PAYLOAD: &[u8] = br#"{"t":1732222222000000000,"n":12345,"pad":"xxxxxxxxxxxxxxxx"}"#;

fn publication() -> Arc<broadcaster::channel::Publication> {
    let rules = broadcaster::rules::Rules::new(&[], 0, Duration::from_secs(1));
    let mut c = Channels::new(std::sync::Arc::new(rules));
    let p = broadcaster::wire::request::PublishParams {
        channel: "contest/annual-2024".into(),
        event: "run_update".into(),
        payload: PAYLOAD.to_vec(),
        from: None,
    };
    c.publish(
        &p,
        "0a1b2c3d-0-1",
        "2026-11-21T22:00:00.000Z",
        Instant::now(),
    )
    .0
}

/// Measures: one subscriber's broadcast frame: header + shared prefix + spliced seq + suffix.
fn frame_encode(c: &mut Criterion) {
    let p = publication();
    let mut out = Vec::with_capacity(4096);
    let mut g = c.benchmark_group("frame_encode_seq_splice");
    g.throughput(Throughput::Elements(1));
    g.bench_function("180B", |b| {
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            out.clear();
            broadcaster::wire::broadcast::write_broadcast_frame(
                &mut out, &p.prefix, seq, &p.suffix,
            );
            black_box(out.len())
        })
    });
    g.finish();
}

/// Measures: simd-json parse of a publish request, raw payload span included.
fn request_parse(c: &mut Criterion) {
    let text = br#"{"id":42,"method":"publish","params":{"channel":"contest/annual-2024","event":"run_update","payload":{"run_id":12345,"verdict":"AC","score":1.0}}}"#;
    let mut scratch = broadcaster::wire::json::Scratch::default();
    let mut g = c.benchmark_group("request_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish", |b| {
        b.iter(|| {
            let r = broadcaster::wire::request::parse_request(black_box(text), &mut scratch, 65536);
            black_box(r.is_ok())
        })
    });
    g.finish();
}

/// Measures: httparse of a browser's WebSocket upgrade head into the fields we use.
fn http_head_parse(c: &mut Criterion) {
    let head = b"GET /ws HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://example.com\r\nAccept-Language: en\r\n\r\n";
    let mut g = c.benchmark_group("http_head_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("upgrade", |b| {
        b.iter(|| black_box(broadcaster::wire::http::parse_head(black_box(head), 8192).is_ok()))
    });
    g.finish();
}

/// Measures: verifying a client's JWT at `auth` (signature, header and claims), with the claims
/// the load generator's tokens carry.
fn jwt_verify(c: &mut Criterion) {
    let secret = "bench-secret-0123456789abcdef";
    let token = broadcaster::auth::mint(
        secret,
        "user-12345",
        &["contest/annual-2024/*".to_string()],
        &["subscribe".to_string(), "publish".to_string()],
        Duration::from_secs(3600),
    )
    .expect("a token");
    let verifier = broadcaster::auth::Verifier::new(secret, Duration::from_secs(0));
    let mut g = c.benchmark_group("jwt_verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hs256", |b| {
        b.iter(|| black_box(verifier.verify_issued(black_box(&token)).is_ok()))
    });
    g.finish();
}

/// Measures: fan-out of one publication to 10,000 subscribers of one shard (per-subscriber cost =
/// time / 10,000): seq splice and send-queue append, writers excluded.
fn fanout(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 10_000;
    let mut config = Config::default();
    config.auth.jwt_secret = Some("bench".into());
    let shard = Shard::new(0, Arc::new(Node::new(config, 1).expect("shared state")));
    let conns: Vec<_> = (0..SUBSCRIBERS)
        .map(|i| Conn::new(i as u64, 1 << 20))
        .collect();
    for conn in &conns {
        drop(shard.subscribe(conn, None, "contest/annual-2024", Asked::live()));
        conn.discard_queued();
    }
    shard.flusher().discard();
    let p = publication();
    // What the flush pass does after sending: empty queues and arena, buffers back to the pool.
    let reset = || {
        for conn in &conns {
            conn.discard_queued();
        }
        shard.flusher().discard();
    };
    let mut g = c.benchmark_group("fanout_one_shard");
    g.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    g.bench_function("10k_subscribers", |b| {
        b.iter_batched(reset, |_| shard.deliver(&p), BatchSize::SmallInput)
    });
    g.finish();
    // As in the server between ticks: the kernel's sends have evicted every subscription and
    // connection from the caches (64 MiB written over between iterations, untimed), so each
    // subscriber starts with cache misses; this is what prefetching in `deliver` is for.
    let mut evict = vec![0u8; 64 << 20];
    let mut g = c.benchmark_group("fanout_one_shard_cold");
    g.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    // Each iteration writes 64 MiB first: few samples, or the run takes minutes.
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(2));
    g.bench_function("10k_subscribers", |b| {
        b.iter_batched(
            || {
                reset();
                for (i, x) in evict.iter_mut().step_by(64).enumerate() {
                    *x = i as u8;
                }
                black_box(&evict);
            },
            |_| shard.deliver(&p),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Measures: the cross-shard ring, `Arc<Publication>` pushed on one pinned executor and drained on
/// another (per-message cost, wakeups included).
fn ring(c: &mut Criterion) {
    use glommio::channels::shared_channel;
    use glommio::{LocalExecutorBuilder, Placement};
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let p = publication();
    let mut g = c.benchmark_group("cross_shard_ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_drain", |b| {
        b.iter_custom(|iters| {
            let (tx, rx) = shared_channel::new_bounded(4096);
            let p = p.clone();
            let producer = LocalExecutorBuilder::new(Placement::Fixed(0))
                .io_memory(64 * 1024)
                .spawn(move || async move {
                    let tx = tx.connect().await;
                    for _ in 0..iters {
                        if tx.send(p.clone()).await.is_err() {
                            break;
                        }
                    }
                })
                .expect("producer executor");
            let consumer = LocalExecutorBuilder::new(Placement::Fixed(1 % cpus))
                .io_memory(64 * 1024)
                .spawn(move || async move {
                    let rx = rx.connect().await;
                    let mut start = None;
                    for _ in 0..iters {
                        match rx.recv().await {
                            Some(m) => {
                                start.get_or_insert_with(Instant::now);
                                black_box(m);
                            }
                            None => break,
                        }
                    }
                    start.map(|s| s.elapsed()).unwrap_or_default()
                })
                .expect("consumer executor");
            producer.join().expect("producer");
            consumer.join().expect("consumer")
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    frame_encode,
    request_parse,
    http_head_parse,
    jwt_verify,
    fanout,
    ring
);
criterion_main!(benches);
