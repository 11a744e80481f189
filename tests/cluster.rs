//! Cluster mode (SPEC sections 5, 8 and 13.18-13.20; issue 8): real `redis-server` processes on
//! free loopback ports and several broadcaster nodes (`--shards 2` each) sharing one Redis.
//!
//! `redis-server` must be installed (Debian package `redis-server`; `.ci/run` installs it): the
//! tests fail, they do not skip, when it is missing. `REDIS_SERVER` may name another binary.
//!
//! Every wait is bounded, so a broken bridge fails a test instead of hanging it.

mod common;
mod hook_receiver;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// redis-server processes
// ---------------------------------------------------------------------------------------------

/// How long a fresh `redis-server` may take to answer PING.
const REDIS_START: Duration = Duration::from_secs(10);

/// A `redis-server` child on a loopback port, with no persistence (a restart loses every key).
/// Killed on drop, and by the kernel if the test process dies first.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn redis_bin() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A raw `PING\r\n` answered with `+PONG\r\n`.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = Vec::new();
        let mut tmp = [0u8; 64];
        while find(&buf, b"\r\n").is_none() {
            let n = s.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        Some(buf.starts_with(b"+PONG\r\n"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

impl Redis {
    /// Starts one on a free port (a few ports are tried in case another process takes one).
    async fn start() -> Redis {
        let mut last = String::new();
        for _ in 0..5 {
            match Redis::start_on(free_port()).await {
                Ok(r) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    async fn start_on(port: u16) -> Result<Redis, String> {
        let dir = temp_path(&format!("-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("create the redis directory");
        let log = dir.join("redis.log");
        let mut cmd = Command::new(redis_bin());
        cmd.arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).expect("redis stderr file"),
            ));
        kill_with_parent(&mut cmd);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot run {:?} ({e}): the cluster tests need redis-server \
                 (Debian package redis-server; set REDIS_SERVER to use another binary)",
                redis_bin()
            ),
        };
        let mut redis = Redis {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + REDIS_START;
        loop {
            if ping(port).await {
                return Ok(redis);
            }
            let exited = redis.child.as_mut().unwrap().try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let why = format!(
                    "redis-server on port {port} ({exited:?}) did not answer PING; log: {} {}",
                    last_chars(
                        &std::fs::read_to_string(redis.dir.join("stderr.log")).unwrap_or_default(),
                        1000
                    ),
                    last_chars(&std::fs::read_to_string(&log).unwrap_or_default(), 2000)
                );
                redis.kill();
                return Err(why);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis vanishes with every key (no persistence).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("redis is running").id() as i32;
        // SAFETY: a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// A fresh, empty redis-server on the same port.
    async fn restart(&mut self) {
        self.kill();
        let fresh = Redis::start_on(self.port)
            .await
            .unwrap_or_else(|e| panic!("redis restart on the same port: {e}"));
        *self = fresh;
    }

    async fn cmd(&self, args: &[&str]) -> Resp {
        redis_cmd(self.port, args).await
    }

    /// The Redis pub/sub channels whose name contains `channel`, with their subscriber counts.
    async fn pubsub_for(&self, channel: &str) -> Vec<(String, i64)> {
        let Resp::Array(names) = self.cmd(&["PUBSUB", "CHANNELS"]).await else {
            panic!("PUBSUB CHANNELS did not answer an array");
        };
        let mut out = Vec::new();
        for n in names {
            let Resp::Bulk(Some(name)) = n else { continue };
            if !name.contains(channel) {
                continue;
            }
            let count = match self.cmd(&["PUBSUB", "NUMSUB", &name]).await {
                Resp::Array(v) => match v.get(1) {
                    Some(Resp::Int(i)) => *i,
                    other => panic!("PUBSUB NUMSUB answered {other:?}"),
                },
                other => panic!("PUBSUB NUMSUB answered {other:?}"),
            };
            out.push((name, count));
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RESP reply, just enough for PUBSUB and friends.
#[derive(Debug, Clone, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Vec<Resp>),
}

fn parse_resp(b: &[u8]) -> Option<(Resp, usize)> {
    let end = find(b, b"\r\n")?;
    let line = String::from_utf8_lossy(&b[1..end]).into_owned();
    let rest = end + 2;
    match b[0] {
        b'+' => Some((Resp::Simple(line), rest)),
        b'-' => Some((Resp::Error(line), rest)),
        b':' => Some((Resp::Int(line.parse().expect("RESP integer")), rest)),
        b'$' => {
            let n: i64 = line.parse().expect("RESP bulk length");
            if n < 0 {
                return Some((Resp::Bulk(None), rest));
            }
            let n = n as usize;
            if b.len() < rest + n + 2 {
                return None;
            }
            let s = String::from_utf8_lossy(&b[rest..rest + n]).into_owned();
            Some((Resp::Bulk(Some(s)), rest + n + 2))
        }
        b'*' => {
            let n: i64 = line.parse().expect("RESP array length");
            let mut items = Vec::new();
            let mut pos = rest;
            for _ in 0..n.max(0) {
                let (v, used) = parse_resp(&b[pos..])?;
                items.push(v);
                pos += used;
            }
            Some((Resp::Array(items), pos))
        }
        other => panic!("unexpected RESP type byte {other:?}"),
    }
}

/// One command on a fresh connection (the test's own view of Redis; the server uses a client
/// crate).
async fn redis_cmd(port: u16, args: &[&str]) -> Resp {
    within(T, &format!("redis {args:?}"), async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await.expect("write to redis");
        let mut buf = Vec::new();
        let mut tmp = vec![0u8; 16384];
        loop {
            if !buf.is_empty() {
                if let Some((v, _)) = parse_resp(&buf) {
                    return v;
                }
            }
            let n = s.read(&mut tmp).await.expect("read from redis");
            assert!(n > 0, "redis closed the connection");
            buf.extend_from_slice(&tmp[..n]);
        }
    })
    .await
}

/// A TCP proxy to Redis on a slow link: every byte from the node to Redis is delayed by `delay`
/// (order kept, the delay is not cumulative); Redis's answers and pushed messages pass at once.
/// It widens the window in which a node could answer a subscribe before Redis has its SUBSCRIBE.
struct SlowLink {
    port: u16,
    accept: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    async fn start(upstream_port: u16, delay: Duration) -> SlowLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (mut from_node, mut to_node) = client.into_split();
                    let (mut from_redis, mut to_redis) = upstream.into_split();
                    let (tx, mut rx) =
                        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                    let forward = tokio::spawn(async move {
                        while let Some((due, bytes)) = rx.recv().await {
                            tokio::time::sleep_until(due).await;
                            if to_redis.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    });
                    let read = tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n @ 1..) = from_node.read(&mut buf).await {
                            let due = tokio::time::Instant::now() + delay;
                            if tx.send((due, buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    });
                    let _ = tokio::io::copy(&mut from_redis, &mut to_node).await;
                    read.abort();
                    forward.abort();
                });
            }
        });
        SlowLink { port, accept }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// A node joined to `redis` with `--redis URL`.
fn node(redis: &Redis) -> Server {
    node_url(&redis.url())
}

fn node_url(url: &str) -> Server {
    Server::start(ServerOpts {
        shards: 2,
        args: vec!["--redis".into(), url.into()],
        ..Default::default()
    })
}

/// A node joined to `redis` through `BROADCASTER_REDIS_URL` (plus any extra environment).
fn node_env(redis: &Redis, env: &[(&str, &str)]) -> Server {
    let mut opts = ServerOpts::shards(2).env("BROADCASTER_REDIS_URL", &redis.url());
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    Server::start(opts)
}

/// The `/health` status string (the status code must be 200 in cluster mode, SPEC 13.18).
async fn health(s: &Server) -> String {
    let r = http_get(s.public, "/health").await;
    assert_eq!(r.status, 200, "/health answered {}: {}", r.status, r.text());
    r.json()["status"]
        .as_str()
        .unwrap_or_else(|| panic!("no status in /health: {}", r.text()))
        .to_string()
}

/// Polls `/health` until it says `want`.
async fn wait_health(s: &Server, want: &str, d: Duration) {
    let deadline = Instant::now() + d;
    loop {
        let got = health(s).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/health still {got:?}, not {want:?}, after {d:?}; stderr: {}",
            last_chars(&s.stderr(), 2000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the node has reconnected to Redis at least `n` times in all and says "ok".
async fn wait_reconnected(s: &Server, n: f64, d: Duration) {
    let deadline = Instant::now() + d;
    while metric(s, "redis_reconnects_total").await < n {
        assert!(
            Instant::now() < deadline,
            "no reconnection to Redis within {d:?}; stderr: {}",
            last_chars(&s.stderr(), 2000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_health(s, "ok", deadline.saturating_duration_since(Instant::now())).await;
}

/// Redis and `n` nodes (the first with `--redis`, the others with the environment variable),
/// every node connected.
async fn cluster(n: usize) -> (Redis, Vec<Server>) {
    let redis = Redis::start().await;
    let nodes: Vec<Server> = (0..n)
        .map(|i| {
            if i == 0 {
                node(&redis)
            } else {
                node_env(&redis, &[])
            }
        })
        .collect();
    for s in &nodes {
        wait_health(s, "ok", Duration::from_secs(10)).await;
    }
    (redis, nodes)
}

async fn metric(s: &Server, name: &str) -> f64 {
    let r = http_get(s.backend(), "/metrics").await;
    assert_eq!(r.status, 200, "/metrics: {}", r.text());
    metric_sum(&r.text(), name).unwrap_or_else(|| panic!("metric {name} missing:\n{}", r.text()))
}

// ---------------------------------------------------------------------------------------------
// Publishing and receiving
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Note {
    id: String,
    seq: u64,
    offset: u64,
    channel: String,
    event: String,
    create_time: String,
    payload: Value,
    raw: String,
}

fn parse_note(raw: String) -> Note {
    let v: Value =
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("bad broadcast {raw:?}: {e}"));
    assert_eq!(v["method"], json!("broadcast"), "{raw}");
    let p = &v["params"];
    let s = |k: &str| {
        p[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {raw}"))
            .to_string()
    };
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {raw}"));
    Note {
        id: s("id"),
        seq: n("seq"),
        offset: n("offset"),
        channel: s("channel"),
        event: s("event"),
        create_time: s("createTime"),
        payload: p["payload"].clone(),
        raw,
    }
}

/// Exactly `n` broadcasts, within `d` in all.
async fn take(ws: &mut Ws, n: usize, d: Duration) -> Vec<Note> {
    within(d, &format!("{n} broadcasts"), async {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(parse_note(ws.recv_broadcast_raw().await));
        }
        out
    })
    .await
}

fn offsets(notes: &[Note]) -> Vec<u64> {
    notes.iter().map(|n| n.offset).collect()
}

fn seqs(notes: &[Note]) -> Vec<u64> {
    notes.iter().map(|n| n.seq).collect()
}

fn ids(notes: &[Note]) -> Vec<String> {
    notes.iter().map(|n| n.id.clone()).collect()
}

/// A publish acknowledgement (REST or WebSocket): `{"id","createTime","offset"}`.
#[derive(Debug, Clone)]
struct Ack {
    id: String,
    create_time: String,
    offset: u64,
}

fn ack(v: &Value) -> Ack {
    Ack {
        id: v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("id in {v}"))
            .into(),
        create_time: v["createTime"]
            .as_str()
            .unwrap_or_else(|| panic!("createTime in {v}"))
            .into(),
        offset: v["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("offset in {v}")),
    }
}

async fn rest_publish(addr: SocketAddr, channel: &str, event: &str, payload: &str) -> HttpResponse {
    http_post_key(
        addr,
        "/publish",
        API_KEY,
        &publish_body(channel, event, payload),
    )
    .await
}

async fn rest_publish_ok(addr: SocketAddr, channel: &str, event: &str, payload: &str) -> Ack {
    let r = rest_publish(addr, channel, event, payload).await;
    assert_eq!(
        r.status,
        200,
        "REST publish answered {}: {}",
        r.status,
        r.text()
    );
    ack(&r.json())
}

/// A WebSocket publish with the payload as raw JSON text (sent as is, not re-encoded).
async fn ws_publish_ok(ws: &mut Ws, channel: &str, event: &str, payload: &str) -> Ack {
    let id = format!("pub-{:08x}", rand::random::<u32>());
    let text = format!(
        r#"{{"id":{},"method":"publish","params":{}}}"#,
        json!(id),
        publish_body(channel, event, payload)
    );
    let r = ws.request_raw(&text).await;
    ack(&ok_result(&r, &json!(id)))
}

async fn subscribe_since(ws: &mut Ws, channel: &str, offset: u64, epoch: &str) -> Value {
    ws.call(
        "subscribe",
        json!({"channel": channel, "since": {"offset": offset, "epoch": epoch}}),
    )
    .await
}

fn epoch_of(r: &Value) -> String {
    let e = r["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("epoch in {r}"));
    assert!(!e.is_empty(), "epoch must be a non-empty string: {r}");
    e.to_string()
}

async fn history(s: &Server, query: &str) -> Value {
    let r = http_get_key(s.backend(), &format!("/history?{query}"), API_KEY).await;
    assert_eq!(r.status, 200, "/history?{query}: {}", r.text());
    r.json()
}

/// A unique channel name, so that tests sharing nothing also share no Redis keys by accident.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// SPEC 8, 4, 13.1-13.2: a publication on node A (REST and WebSocket) reaches subscribers on B
/// and C, and A's own subscribed publisher, in the same order, offsets and seqs 1..N, ids and
/// createTimes as acknowledged, event and raw payload intact through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_on_one_node_reaches_every_node_in_order() {
    let (_redis, nodes) = cluster(3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let ch = unique("fanout");

    let mut subs = Vec::new();
    let mut epochs = HashSet::new();
    for s in [b, b, b, c, c, c] {
        let mut ws = s.ws_authed("sub").await;
        let r = ws.subscribe(&ch).await;
        assert_eq!(r["offset"], json!(0), "fresh channel: {r}");
        epochs.insert(epoch_of(&r));
        subs.push(ws);
    }
    let mut publisher = a.ws_authed("pub").await;
    let r = publisher.subscribe(&ch).await;
    epochs.insert(epoch_of(&r));
    assert_eq!(epochs.len(), 1, "one epoch on every node: {epochs:?}");

    const N: usize = 40;
    let mut sent = Vec::new();
    for i in 1..=N {
        // Spaces, multi-byte text and odd JSON spacing: the event and the raw payload must cross
        // Redis intact.
        let event = format!("ev {i} é");
        let payload = format!(r#"{{"i": {i},  "t":"a b" , "l":[1, 2]}}"#);
        let a_ack = if i % 2 == 0 {
            rest_publish_ok(a.backend(), &ch, &event, &payload).await
        } else {
            ws_publish_ok(&mut publisher, &ch, &event, &payload).await
        };
        assert_eq!(a_ack.offset, i as u64, "acknowledged offset {a_ack:?}");
        sent.push((a_ack, event, payload));
    }
    subs.push(publisher);

    let mut tasks = Vec::new();
    for mut ws in subs {
        tasks.push(tokio::spawn(async move {
            let notes = take(&mut ws, N, Duration::from_secs(10)).await;
            (ws, notes)
        }));
    }
    let mut back = Vec::new();
    for t in tasks {
        let (ws, notes) = t.await.expect("subscriber task");
        let expected: Vec<u64> = (1..=N as u64).collect();
        assert_eq!(offsets(&notes), expected, "offsets");
        assert_eq!(seqs(&notes), expected, "seqs");
        for (n, (a_ack, event, payload)) in notes.iter().zip(&sent) {
            assert_eq!(n.id, a_ack.id, "{}", n.raw);
            assert_eq!(n.create_time, a_ack.create_time, "{}", n.raw);
            assert!(is_rfc3339_utc(&n.create_time), "{}", n.raw);
            assert_eq!(n.channel, ch);
            assert_eq!(&n.event, event);
            assert!(
                n.raw.contains(&format!("\"payload\":{payload}")),
                "payload relayed byte for byte: {}",
                n.raw
            );
            assert_eq!(n.payload, serde_json::from_str::<Value>(payload).unwrap());
        }
        back.push(ws);
    }
    // No duplicate or stray delivery: the next broadcast everybody sees is the next offset.
    let next = rest_publish_ok(b.backend(), &ch, "last", "null").await;
    assert_eq!(next.offset, N as u64 + 1);
    for ws in &mut back {
        let n = take(ws, 1, T).await;
        assert_eq!((n[0].offset, n[0].seq), (N as u64 + 1, N as u64 + 1));
        assert_eq!(n[0].id, next.id);
    }
}

/// SPEC 4 and 8: concurrent publications from all three nodes (WebSocket and REST) interleave
/// identically for every subscriber on every node, with contiguous offsets and seqs, and every
/// acknowledged offset is the one subscribers see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publications_from_three_nodes_interleave_identically() {
    let (_redis, nodes) = cluster(3).await;
    let ch = unique("interleave");
    const WS_PUBLISHERS: usize = 2;
    const WS_EACH: usize = 35;
    const REST_EACH: usize = 30;
    const TOTAL: usize = 3 * (WS_PUBLISHERS * WS_EACH + REST_EACH);

    let mut collectors = Vec::new();
    for (ni, s) in nodes.iter().enumerate() {
        for _ in 0..4 {
            let mut ws = s.ws_authed("sub").await;
            let r = ws.subscribe(&ch).await;
            assert_eq!(r["offset"], json!(0), "{r}");
            collectors.push(tokio::spawn(async move {
                (ni, take(&mut ws, TOTAL, Duration::from_secs(30)).await)
            }));
        }
    }

    let mut publishers = Vec::new();
    for (ni, s) in nodes.iter().enumerate() {
        for p in 0..WS_PUBLISHERS {
            let mut ws = s.ws_authed("pub").await;
            let ch = ch.clone();
            publishers.push(tokio::spawn(async move {
                let mut acks = Vec::new();
                for i in 0..WS_EACH {
                    let payload = format!(r#"{{"node":{ni},"ws":{p},"i":{i}}}"#);
                    acks.push(ws_publish_ok(&mut ws, &ch, "ws", &payload).await);
                }
                acks
            }));
        }
        let addr = s.backend();
        let ch = ch.clone();
        publishers.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..REST_EACH {
                let payload = format!(r#"{{"node":{ni},"rest":true,"i":{i}}}"#);
                acks.push(rest_publish_ok(addr, &ch, "rest", &payload).await);
            }
            acks
        }));
    }

    let mut acks = Vec::new();
    for p in publishers {
        let mine = p.await.expect("publisher task");
        // One publisher's sequential publishes are ordered.
        assert!(
            mine.windows(2).all(|w| w[0].offset < w[1].offset),
            "one publisher's offsets increase: {mine:?}"
        );
        acks.extend(mine);
    }
    assert_eq!(acks.len(), TOTAL);
    let mut by_offset: Vec<Option<&Ack>> = vec![None; TOTAL + 1];
    for a in &acks {
        assert!(
            (1..=TOTAL as u64).contains(&a.offset),
            "acknowledged offset out of 1..={TOTAL}: {a:?}"
        );
        assert!(
            by_offset[a.offset as usize].replace(a).is_none(),
            "offset {} acknowledged twice",
            a.offset
        );
    }
    let expected_ids: Vec<String> = by_offset[1..]
        .iter()
        .map(|a| a.unwrap().id.clone())
        .collect();
    assert_eq!(
        expected_ids.iter().collect::<HashSet<_>>().len(),
        TOTAL,
        "ids unique across the cluster"
    );

    let expected: Vec<u64> = (1..=TOTAL as u64).collect();
    for c in collectors {
        let (ni, notes) = c.await.expect("collector task");
        assert_eq!(offsets(&notes), expected, "offsets on node {ni}");
        assert_eq!(seqs(&notes), expected, "seqs on node {ni}");
        assert_eq!(
            ids(&notes),
            expected_ids,
            "the same interleaving for a subscriber on node {ni}"
        );
    }
}

/// SPEC 5 and 8, 13.20: a client moves from node A to node B and recovers exactly what it missed,
/// in order, before live publications that race with its subscribe; a wrong epoch or an offset
/// above the top is `recovered: false`; GET /history answers the same on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_on_another_node_and_history_everywhere() {
    let (_redis, nodes) = cluster(3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let ch = unique("recover");

    let mut c1 = a.ws_authed("mover").await;
    let r = c1.subscribe(&ch).await;
    assert_eq!(r["offset"], json!(0));
    let epoch = epoch_of(&r);
    let mut acks = Vec::new();
    for i in 1..=3 {
        acks.push(rest_publish_ok(c.backend(), &ch, "ev", &format!(r#"{{"i": {i}}}"#)).await);
    }
    let seen = take(&mut c1, 3, T).await;
    assert_eq!(offsets(&seen), vec![1, 2, 3]);
    let last = seen[2].offset;
    drop(c1);

    // Missed while disconnected.
    for i in 4..=8 {
        acks.push(rest_publish_ok(c.backend(), &ch, "ev", &format!(r#"{{"i": {i}}}"#)).await);
    }

    // Every node answers the same history, from Redis.
    let q = format!("channel={ch}");
    let h = history(a, &q).await;
    assert_eq!(h["epoch"], json!(epoch), "{h}");
    assert_eq!(h["offset"], json!(8), "{h}");
    let pubs = h["publications"].as_array().expect("publications");
    assert_eq!(pubs.len(), 8, "{h}");
    for (i, (p, a_ack)) in pubs.iter().zip(&acks).enumerate() {
        assert_eq!(p["offset"], json!(i + 1), "oldest first: {h}");
        assert_eq!(p["id"], json!(a_ack.id));
        assert_eq!(p["createTime"], json!(a_ack.create_time));
        assert_eq!(p["event"], json!("ev"));
        assert_eq!(p["payload"], json!({"i": i + 1}));
    }
    assert_eq!(history(b, &q).await, h, "node B's history");
    assert_eq!(history(c, &q).await, h, "node C's history");
    let never = format!("channel={}", unique("never"));
    for s in &nodes {
        let v = history(s, &never).await;
        assert_eq!(v["publications"], json!([]), "{v}");
    }

    // Reconnect to node B with `since` while node A keeps publishing.
    let a_addr = a.backend();
    let ch2 = ch.clone();
    let live = tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 9..=18 {
            acks.push(rest_publish_ok(a_addr, &ch2, "live", &format!(r#"{{"i": {i}}}"#)).await);
        }
        acks
    });
    let mut c2 = b.ws_authed("mover").await;
    let r = subscribe_since(&mut c2, &ch, last, &epoch).await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    assert_eq!(r["epoch"], json!(epoch), "{r}");
    let top = r["offset"].as_u64().expect("offset");
    assert!((8..=18).contains(&top), "top offset when subscribing: {r}");
    acks.extend(live.await.expect("live publisher"));
    let got = take(&mut c2, 15, Duration::from_secs(10)).await;
    assert_eq!(
        offsets(&got),
        (4..=18).collect::<Vec<u64>>(),
        "missed ones, then live ones, no gap, no duplicate"
    );
    assert_eq!(seqs(&got), (1..=15).collect::<Vec<u64>>());
    assert_eq!(
        ids(&got),
        acks[3..].iter().map(|a| a.id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(got[0].payload, json!({"i": 4}));

    // Wrong epoch, offset above the top: not recovered, no replay. Exactly at the top: recovered
    // with nothing to replay.
    let mut c3 = c.ws_authed("x").await;
    let r = subscribe_since(&mut c3, &ch, 3, &format!("not-{epoch}")).await;
    assert_eq!(r["recovered"], json!(false), "wrong epoch: {r}");
    assert_eq!(r["epoch"], json!(epoch), "{r}");
    assert_eq!(r["offset"], json!(18), "{r}");
    let mut c4 = a.ws_authed("x").await;
    let r = subscribe_since(&mut c4, &ch, 50, &epoch).await;
    assert_eq!(r["recovered"], json!(false), "offset above the top: {r}");
    let mut c5 = b.ws_authed("x").await;
    let r = subscribe_since(&mut c5, &ch, 18, &epoch).await;
    assert_eq!(r["recovered"], json!(true), "nothing missed: {r}");
    assert_eq!(r["offset"], json!(18), "{r}");

    let next = rest_publish_ok(b.backend(), &ch, "next", "19").await;
    assert_eq!(next.offset, 19);
    let n = take(&mut c2, 1, T).await;
    assert_eq!((n[0].offset, n[0].seq), (19, 16));
    for ws in [&mut c3, &mut c4, &mut c5] {
        let n = take(ws, 1, T).await;
        assert_eq!(
            (n[0].offset, n[0].seq, n[0].id.as_str()),
            (19, 1, next.id.as_str()),
            "no replay before the live publication: {}",
            n[0].raw
        );
    }

    let q = format!("channel={ch}&limit=2");
    let h = history(c, &q).await;
    let tail: Vec<&Value> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["offset"])
        .collect();
    assert_eq!(tail, vec![&json!(18), &json!(19)], "{h}");
    assert_eq!(history(a, &q).await, h);
    assert_eq!(history(b, &q).await, h);
}

/// Issue 14, SPEC 4 and 8: every valid JSON payload crosses Redis byte for byte: published on
/// node A (REST and WebSocket), delivered on B, in B's history, and recovered on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_payloads_cross_redis_byte_for_byte() {
    let (_redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = unique("payloads");
    let mut sub = b.ws_authed("sub").await;
    let epoch = epoch_of(&sub.subscribe(&ch).await);
    let mut publisher = a.ws_authed("pub").await;
    let payloads = hard_payloads();
    for p in &payloads {
        rest_publish_ok(a.backend(), &ch, "rest", p).await;
        assert_eq!(raw_payload(&sub.recv_broadcast_raw().await), p, "REST on A");
        ws_publish_ok(&mut publisher, &ch, "ws", p).await;
        assert_eq!(
            raw_payload(&sub.recv_broadcast_raw().await),
            p,
            "WebSocket on A"
        );
    }
    let r = http_get_key(b.backend(), &format!("/history?channel={ch}"), API_KEY).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    for p in &payloads {
        assert!(
            text.contains(&format!(r#","payload":{p}}}"#)),
            "B's history lacks {p:.60}"
        );
    }
    let mut late = b.ws_authed("late").await;
    let r = subscribe_since(&mut late, &ch, 0, &epoch).await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    for p in &payloads {
        for how in ["REST", "WebSocket"] {
            let raw = late.recv_broadcast_raw().await;
            assert_eq!(raw_payload(&raw), p, "recovered {how}");
        }
    }
}

/// Issue 14: every series the shipped Grafana dashboard (`tuning/grafana-dashboard.json`)
/// queries exists in `/metrics` of a cluster node, read with a PromQL parser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_series_the_server_exposes() {
    use promql_parser::parser::{Expr, VectorSelector};
    use promql_parser::util::{walk_expr, ExprVisitor};
    struct Names(Vec<String>);
    impl ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, ()> {
            let vs: Option<&VectorSelector> = match e {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(m) => Some(&m.vs),
                _ => None,
            };
            if let Some(name) = vs.and_then(|vs| vs.name.clone()) {
                self.0.push(name);
            }
            Ok(true)
        }
    }

    let (_redis, nodes) = cluster(1).await;
    let s = &nodes[0];
    rest_publish_ok(s.backend(), &unique("dash"), "e", "1").await;
    let text = http_get(s.backend(), "/metrics").await.text();
    let mut exposed = HashSet::new();
    for sample in parse_metrics(&text).samples {
        if matches!(sample.value, prometheus_parse::Value::Histogram(_)) {
            exposed.insert(format!("{}_bucket", sample.metric));
        }
        exposed.insert(sample.metric);
    }

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/grafana-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard file"))
            .expect("the dashboard is JSON");
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            // Grafana's own variables, as Grafana substitutes them.
            let expr = expr.replace("$__rate_interval", "1m");
            let parsed = promql_parser::parser::parse(&expr)
                .unwrap_or_else(|e| panic!("panel {}: {expr}: {e}", panel["title"]));
            let mut names = Names(Vec::new());
            walk_expr(&mut names, &parsed).unwrap();
            assert!(!names.0.is_empty(), "{expr} queries no series");
            queried.extend(names.0);
        }
    }
    let missing: Vec<_> = queried.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried but not exposed: {missing:?}\n{text}"
    );
    for name in [
        "connections_active",
        "subscriptions_total",
        "messages_sent_total",
        "publish_to_write_seconds_bucket",
        "slow_consumers_total",
        "redis_up",
    ] {
        assert!(
            queried.iter().any(|q| q == name),
            "the dashboard lacks {name}"
        );
    }
}

/// SPEC 5: recovery needs every missed publication still held; `history.size` caps the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_beyond_the_history_size_is_not_recovered() {
    let redis = Redis::start().await;
    let small = [("BROADCASTER_HISTORY_SIZE", "5")];
    let a = node_env(&redis, &small);
    let b = node_env(&redis, &small);
    wait_health(&a, "ok", Duration::from_secs(10)).await;
    wait_health(&b, "ok", Duration::from_secs(10)).await;
    let ch = unique("small");
    let mut ws = a.ws_authed("u").await;
    let epoch = epoch_of(&ws.subscribe(&ch).await);
    drop(ws);
    for i in 1..=8 {
        rest_publish_ok(a.backend(), &ch, "e", &i.to_string()).await;
    }
    let h = history(&b, &format!("channel={ch}")).await;
    let held: Vec<u64> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        held,
        vec![4, 5, 6, 7, 8],
        "the stream holds the last 5: {h}"
    );
    assert_eq!(h["offset"], json!(8), "{h}");
    let mut ws = b.ws_authed("u").await;
    let r = subscribe_since(&mut ws, &ch, 1, &epoch).await;
    assert_eq!(r["recovered"], json!(false), "offsets 2-3 are gone: {r}");
    let mut ws2 = b.ws_authed("u").await;
    let r = subscribe_since(&mut ws2, &ch, 3, &epoch).await;
    assert_eq!(r["recovered"], json!(true), "offsets 4-8 are held: {r}");
    let got = take(&mut ws2, 5, T).await;
    assert_eq!(offsets(&got), vec![4, 5, 6, 7, 8]);
    rest_publish_ok(a.backend(), &ch, "e", "9").await;
    let n = take(&mut ws, 1, T).await;
    assert_eq!((n[0].offset, n[0].seq), (9, 1), "not recovered: live only");
}

/// SPEC 13.19: the subscribe result is sent only once the node is subscribed in Redis, so a
/// publication made on another node right after the result is never missed. Fresh channels each
/// round (each subscribe is a new Redis SUBSCRIBE), and a quick unsubscribe/resubscribe every
/// third round (the UNSUBSCRIBE must not overtake the new SUBSCRIBE). Node B talks to Redis over
/// a slow link (100 ms each way in), so answering before Redis has the SUBSCRIBE would lose the
/// publication nodes A and C make over their direct links right after the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_result_means_subscribed_in_redis() {
    let redis = Redis::start().await;
    let slow = SlowLink::start(redis.port, Duration::from_millis(100)).await;
    let a = node(&redis);
    let b = node_url(&slow.url());
    let c = node_env(&redis, &[]);
    for s in [&a, &b, &c] {
        wait_health(s, "ok", Duration::from_secs(10)).await;
    }
    let mut on_a = a.ws_authed("pub").await;
    let mut on_c = c.ws_authed("pub").await;
    let base = unique("race");
    for round in 0..30 {
        let ch = format!("{base}-{round}");
        // Rounds 0..12: subscribe on the slow node B; then subscribe on A, publish from C.
        let (sub_node, publisher) = if round < 12 {
            (&b, if round % 2 == 0 { &mut on_a } else { &mut on_c })
        } else {
            (&a, &mut on_c)
        };
        let mut sub = sub_node.ws_authed("sub").await;
        if round % 3 == 0 {
            sub.subscribe(&ch).await;
            sub.call("unsubscribe", json!({"channel": ch})).await;
        }
        let r = sub.subscribe(&ch).await;
        assert_eq!(r["offset"], json!(0), "{r}");
        let p = ws_publish_ok(publisher, &ch, "e", &round.to_string()).await;
        assert_eq!(p.offset, 1);
        let n = within(
            Duration::from_secs(3),
            &format!("round {round}: the publication made right after the result"),
            async { parse_note(sub.recv_broadcast_raw().await) },
        )
        .await;
        assert_eq!((n.offset, n.seq, n.id.as_str()), (1, 1, p.id.as_str()));
    }
}

/// SPEC 8 and 13.18: Redis killed: publishes answer Unavailable (REST 503, WebSocket error) within
/// 5 s, connections stay open, /health stays 200 "degraded", subscribes fail rather than promise
/// what they cannot (13.19). Redis restarted empty on the same port: the nodes reconnect,
/// delivery resumes, and the lost history has a new epoch, so the old one is never recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_then_restart_with_data_loss() {
    let mut redis = Redis::start().await;
    let a = node(&redis);
    let b = node_env(&redis, &[]);
    for s in [&a, &b] {
        wait_health(s, "ok", Duration::from_secs(10)).await;
    }
    let ch = unique("outage");
    let mut sub = b.ws_authed("sub").await;
    let old_epoch = epoch_of(&sub.subscribe(&ch).await);
    let mut publisher = a.ws_authed("pub").await;
    for i in 1..=3 {
        ws_publish_ok(&mut publisher, &ch, "before", &i.to_string()).await;
    }
    assert_eq!(offsets(&take(&mut sub, 3, T).await), vec![1, 2, 3]);

    redis.kill();
    let killed = Instant::now();
    let five = Duration::from_secs(5);
    for s in [&a, &b] {
        let r = within(
            five.saturating_sub(killed.elapsed()),
            "REST publish with Redis down",
            rest_publish(s.backend(), &ch, "during", "0"),
        )
        .await;
        r.assert_error(503, "Unavailable");
    }
    let r = within(
        five.saturating_sub(killed.elapsed()),
        "WebSocket publish with Redis down",
        publisher.request(
            "publish",
            json!({"channel": ch, "event": "during", "payload": 0}),
        ),
    )
    .await;
    assert_eq!(r["error"]["code"], json!("Unavailable"), "{r}");
    for s in [&a, &b] {
        wait_health(s, "degraded", five.saturating_sub(killed.elapsed())).await;
        assert_eq!(metric(s, "redis_up").await, 0.0);
    }
    // Existing connections are kept and answered.
    sub.heartbeat_ok().await;
    publisher.heartbeat_ok().await;
    // A subscribe cannot be confirmed without Redis.
    let mut late = b.ws_authed("late").await;
    let r = late
        .request("subscribe", json!({"channel": unique("new")}))
        .await;
    assert_eq!(r["error"]["code"], json!("Unavailable"), "{r}");
    // History lives in Redis: no answer is better than a wrong one.
    let r = http_get_key(a.backend(), &format!("/history?channel={ch}"), API_KEY).await;
    r.assert_error(503, "Unavailable");
    // Nothing refused was delivered.
    sub.expect_no_broadcast(Duration::from_millis(200)).await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().await;
    for s in [&a, &b] {
        wait_reconnected(s, 1.0, Duration::from_secs(10)).await;
        assert_eq!(metric(s, "redis_up").await, 1.0);
    }
    sub.heartbeat_ok().await;

    // The history was lost with Redis: a new epoch, the old one is not recovered.
    let mut fresh = b.ws_authed("fresh").await;
    let r = subscribe_since(&mut fresh, &ch, 3, &old_epoch).await;
    assert_eq!(
        r["recovered"],
        json!(false),
        "old epoch after data loss: {r}"
    );
    let new_epoch = epoch_of(&r);
    assert_ne!(new_epoch, old_epoch, "the epoch must change: {r}");
    assert_eq!(r["offset"], json!(0), "{r}");

    let a1 = ws_publish_ok(&mut publisher, &ch, "after", "1").await;
    let a2 = rest_publish_ok(b.backend(), &ch, "after", "2").await;
    assert_eq!((a1.offset, a2.offset), (1, 2), "offsets of the new epoch");
    let got = take(&mut fresh, 2, T).await;
    assert_eq!(ids(&got), vec![a1.id.clone(), a2.id.clone()]);
    assert_eq!(seqs(&got), vec![1, 2]);
    // The subscription that lived through the outage was resubscribed: it gets them too.
    let got = take(&mut sub, 2, T).await;
    assert_eq!(ids(&got), vec![a1.id, a2.id]);
    assert_eq!(seqs(&got), vec![4, 5], "its seq continues without a gap");

    let h = history(&a, &format!("channel={ch}")).await;
    assert_eq!(h["epoch"], json!(new_epoch), "{h}");
    assert_eq!(h["offset"], json!(2), "{h}");
    assert_eq!(history(&b, &format!("channel={ch}")).await, h);
}

/// SPEC 4 and 8: a subscription that started at offset K keeps receiving every publication after
/// Redis lost its data, the new epoch's offsets 1..K included (they are new publications, not
/// ones it already had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_living_through_redis_data_loss_miss_nothing() {
    let mut redis = Redis::start().await;
    let a = node(&redis);
    let b = node(&redis);
    for s in [&a, &b] {
        wait_health(s, "ok", Duration::from_secs(10)).await;
    }
    let ch = unique("loss");
    for i in 1..=5 {
        rest_publish_ok(a.backend(), &ch, "old", &i.to_string()).await;
    }
    let mut sub = b.ws_authed("sub").await;
    let r = sub.subscribe(&ch).await;
    assert_eq!(r["offset"], json!(5), "{r}");

    redis.restart().await;
    for s in [&a, &b] {
        wait_reconnected(s, 1.0, Duration::from_secs(10)).await;
    }
    // Node B (the only one with a subscriber) is subscribed again before anything is published.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.pubsub_for(&ch).await.iter().all(|(_, n)| *n == 0) {
        assert!(
            Instant::now() < deadline,
            "node B did not resubscribe {ch} after the Redis restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut acks = Vec::new();
    for i in 1..=3 {
        acks.push(rest_publish_ok(a.backend(), &ch, "new", &i.to_string()).await);
    }
    assert_eq!(
        acks.iter().map(|a| a.offset).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "the new epoch's offsets"
    );
    let got = within(
        Duration::from_secs(3),
        "publications after the data loss",
        take(&mut sub, 3, T),
    )
    .await;
    assert_eq!(
        ids(&got),
        acks.iter().map(|a| a.id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&got), vec![1, 2, 3]);
}

/// SPEC 8: Redis keeps its data but a node's pub/sub connection drops: the node resubscribes,
/// existing subscriptions keep receiving with offsets continuing in the same epoch, and a client
/// recovers with `since` as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_connection_loss_resubscribes_and_offsets_continue() {
    let (redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = unique("drop");
    let mut sub = b.ws_authed("sub").await;
    let epoch = epoch_of(&sub.subscribe(&ch).await);
    for i in 1..=3 {
        rest_publish_ok(a.backend(), &ch, "e", &i.to_string()).await;
    }
    assert_eq!(offsets(&take(&mut sub, 3, T).await), vec![1, 2, 3]);

    let killed = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(
        matches!(killed, Resp::Int(n) if n >= 1),
        "CLIENT KILL answered {killed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.pubsub_for(&ch).await.iter().all(|(_, n)| *n == 0) {
        assert!(
            Instant::now() < deadline,
            "no node resubscribed {ch}; B stderr: {}",
            last_chars(&b.stderr(), 2000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only node B's connection was in pub/sub mode (A subscribes to nothing), so only B lost one.
    wait_reconnected(b, 1.0, Duration::from_secs(10)).await;
    assert_eq!(health(a).await, "ok");
    let next = rest_publish_ok(a.backend(), &ch, "e", "4").await;
    assert_eq!(next.offset, 4, "same history, offsets continue");
    let n = take(&mut sub, 1, T).await;
    assert_eq!((n[0].offset, n[0].seq), (4, 4));
    let mut back = a.ws_authed("back").await;
    let r = subscribe_since(&mut back, &ch, 1, &epoch).await;
    assert_eq!(r["recovered"], json!(true), "same epoch: {r}");
    assert_eq!(offsets(&take(&mut back, 3, T).await), vec![2, 3, 4]);
}

/// Publications made while a node's pub/sub connection is down (it reconnects and resubscribes
/// within its backoff) reach its subscribers anyway, in order: the first one after the gap has
/// the skipped offsets read back from the channel's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_made_while_a_node_resubscribes_are_not_skipped() {
    let (redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = unique("gap");
    let mut sub = b.ws_authed("sub").await;
    sub.subscribe(&ch).await;
    rest_publish_ok(a.backend(), &ch, "e", "1").await;
    assert_eq!(offsets(&take(&mut sub, 1, T).await), vec![1]);

    // Only B's pub/sub connection: it alone holds two subscriptions (control and `ch`), and A
    // must stay connected to publish.
    let Resp::Bulk(Some(list)) = redis.cmd(&["CLIENT", "LIST", "TYPE", "pubsub"]).await else {
        panic!("CLIENT LIST")
    };
    let id = list
        .lines()
        .find(|l| l.contains(" sub=2 "))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("B's pub/sub connection in {list}"))
        .to_string();
    let killed = redis.cmd(&["CLIENT", "KILL", "ID", &id]).await;
    assert!(matches!(killed, Resp::Int(1)), "{killed:?}");
    // Published before B subscribed again (its first retry waits 100 ms).
    for i in 2..=6 {
        rest_publish_ok(a.backend(), &ch, "e", &i.to_string()).await;
    }
    wait_reconnected(b, 1.0, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.pubsub_for(&ch).await.iter().all(|(_, n)| *n == 0) {
        assert!(Instant::now() < deadline, "B never resubscribed {ch}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rest_publish_ok(a.backend(), &ch, "e", "7").await;
    let notes = take(&mut sub, 6, T).await;
    assert_eq!(offsets(&notes), vec![2, 3, 4, 5, 6, 7]);
    assert_eq!(seqs(&notes), vec![2, 3, 4, 5, 6, 7]);
    assert!(metric(b, "redis_gap_filled_total").await >= 5.0);
}

/// SPEC 8: a node killed with SIGKILL takes only its own connections down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_others_serving() {
    let (_redis, mut nodes) = cluster(3).await;
    let ch = unique("survive");
    let mut on_b = nodes[1].ws_authed("b").await;
    on_b.subscribe(&ch).await;
    let mut on_c = Vec::new();
    for _ in 0..3 {
        let mut ws = nodes[2].ws_authed("c").await;
        ws.subscribe(&ch).await;
        on_c.push(ws);
    }
    let mut publisher = nodes[0].ws_authed("pub").await;
    for i in 1..=5 {
        ws_publish_ok(&mut publisher, &ch, "e", &i.to_string()).await;
    }
    assert_eq!(offsets(&take(&mut on_b, 5, T).await), vec![1, 2, 3, 4, 5]);
    for ws in &mut on_c {
        assert_eq!(offsets(&take(ws, 5, T).await), vec![1, 2, 3, 4, 5]);
    }

    nodes[1].signal(libc::SIGKILL);
    nodes[1].wait_exit(T).await;
    assert!(
        matches!(on_b.ended(T).await, Ended::Dropped(_)),
        "B's client loses its connection"
    );

    for i in 6..=25 {
        if i % 2 == 0 {
            ws_publish_ok(&mut publisher, &ch, "e", &i.to_string()).await;
        } else {
            rest_publish_ok(nodes[0].backend(), &ch, "e", &i.to_string()).await;
        }
    }
    for ws in &mut on_c {
        let got = take(ws, 20, T).await;
        assert_eq!(offsets(&got), (6..=25).collect::<Vec<u64>>());
        assert_eq!(seqs(&got), (6..=25).collect::<Vec<u64>>());
    }
    // And the other way round, from C to A.
    let mut on_a = nodes[0].ws_authed("a").await;
    on_a.subscribe(&ch).await;
    let last = rest_publish_ok(nodes[2].backend(), &ch, "e", "26").await;
    let n = take(&mut on_a, 1, T).await;
    assert_eq!((n[0].offset, n[0].id.as_str()), (26, last.id.as_str()));
    for i in [0, 2] {
        assert_eq!(health(&nodes[i]).await, "ok");
    }
}

/// Issue 8 items 4 and 6, SPEC 8: the bridge metrics move; each publication crosses Redis once
/// per node, not once per subscriber, and only to nodes with local subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_metrics_count_each_publication_once_per_node() {
    let (_redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = unique("metrics");
    for s in [a, b] {
        assert_eq!(metric(s, "redis_up").await, 1.0);
    }
    // Four subscribers on node B (both shards, most likely), none on node A.
    let mut subs = Vec::new();
    for _ in 0..4 {
        let mut ws = b.ws_authed("sub").await;
        ws.subscribe(&ch).await;
        subs.push(ws);
    }
    let out_a = metric(a, "redis_publications_out_total").await;
    let in_a = metric(a, "redis_publications_in_total").await;
    let out_b = metric(b, "redis_publications_out_total").await;
    let in_b = metric(b, "redis_publications_in_total").await;
    const K: usize = 7;
    for i in 0..K {
        rest_publish_ok(a.backend(), &ch, "e", &i.to_string()).await;
    }
    for ws in &mut subs {
        take(ws, K, T).await;
    }
    let k = K as f64;
    assert_eq!(metric(a, "redis_publications_out_total").await - out_a, k);
    assert_eq!(metric(b, "redis_publications_out_total").await - out_b, 0.0);
    assert_eq!(
        metric(b, "redis_publications_in_total").await - in_b,
        k,
        "once per node, not once per subscriber"
    );
    assert_eq!(
        metric(a, "redis_publications_in_total").await - in_a,
        0.0,
        "node A has no subscriber of the channel"
    );
    assert!(metric(a, "redis_publish_seconds_count").await >= k);
}

/// Issue 8 item 3, SPEC 8: a node holds one Redis subscription per channel while it has local
/// subscribers (however many, on whichever shards) and drops it after the last one leaves, by
/// unsubscribe or by closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_subscriptions_follow_local_subscribers() {
    let (redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let wait_count = |ch: String, want: i64| {
        let redis = &redis;
        async move {
            let deadline = Instant::now() + T;
            loop {
                let now = redis.pubsub_for(&ch).await;
                assert!(now.len() <= 1, "one Redis channel per channel: {now:?}");
                let n = now.first().map_or(0, |c| c.1);
                if n == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "Redis subscriptions for {ch}: {now:?}, want {want} node(s)"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // One subscriber, gone by unsubscribe; then by closing.
    for close in [false, true] {
        let ch = unique("one");
        let mut ws = b.ws_authed("sub").await;
        ws.subscribe(&ch).await;
        wait_count(ch.clone(), 1).await;
        if close {
            drop(ws);
        } else {
            ws.call("unsubscribe", json!({"channel": ch})).await;
        }
        wait_count(ch, 0).await;
    }

    // Several subscribers on a node: still one Redis subscription; dropped after the last.
    let ch = unique("many");
    assert!(redis.pubsub_for(&ch).await.is_empty());
    let mut subs = Vec::new();
    for _ in 0..4 {
        let mut ws = b.ws_authed("sub").await;
        ws.subscribe(&ch).await;
        subs.push(ws);
    }
    wait_count(ch.clone(), 1).await;
    let mut on_a = a.ws_authed("a").await;
    on_a.subscribe(&ch).await;
    wait_count(ch.clone(), 2).await;
    subs[0].call("unsubscribe", json!({"channel": ch})).await;
    subs[1].call("unsubscribe", json!({"channel": ch})).await;
    subs.truncate(2);
    // Two of B's four left by closing, two by unsubscribing (and those connections stay open).
    wait_count(ch.clone(), 1).await;
    on_a.call("unsubscribe", json!({"channel": ch})).await;
    wait_count(ch.clone(), 0).await;
    for ws in &mut subs {
        ws.heartbeat_ok().await;
    }
}

/// SPEC 13.18: Redis hung (a network partition looks the same: no reset, no answer) is
/// unreachable too: publishes answer Unavailable within 5 s and /health says "degraded" (200),
/// connections stay open; once Redis answers again the node is "ok" and delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_is_unavailable_and_degraded() {
    let (redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = unique("hung");
    let mut sub = b.ws_authed("sub").await;
    sub.subscribe(&ch).await;
    let mut publisher = a.ws_authed("pub").await;

    redis.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let five = Duration::from_secs(5);
    let r = within(
        five,
        "REST publish with Redis hung",
        rest_publish(a.backend(), &ch, "e", "0"),
    )
    .await;
    r.assert_error(503, "Unavailable");
    let r = within(
        five.saturating_sub(stopped.elapsed()),
        "WebSocket publish with Redis hung",
        publisher.request(
            "publish",
            json!({"channel": ch, "event": "e", "payload": 0}),
        ),
    )
    .await;
    assert_eq!(r["error"]["code"], json!("Unavailable"), "{r}");
    let d = five.saturating_sub(stopped.elapsed());
    for s in [a, b] {
        wait_health(s, "degraded", d).await;
    }
    sub.heartbeat_ok().await;
    publisher.heartbeat_ok().await;

    redis.signal(libc::SIGCONT);
    for s in [a, b] {
        wait_health(s, "ok", Duration::from_secs(10)).await;
    }
    let next = ws_publish_ok(&mut publisher, &ch, "e", "1").await;
    let n = take(&mut sub, 1, T).await;
    assert_eq!(n[0].id, next.id, "{}", n[0].raw);
}

/// SPEC 14 in cluster mode: rules agree across nodes (same hash), a rule's history size is the
/// Redis stream's cap, anonymous viewers and rewind work on a node other than the publisher's,
/// rewind is ordered under concurrent publishing, and after a node is killed and Redis restarts
/// empty, rewind answers what Redis holds (nothing) and the channel goes on from offset 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_channels_and_rewind_across_nodes_through_redis() {
    const RULES: &str = "[[channels]]\npattern = \"scoreboard/*\"\naccess = \"public\"\nhistory_size = 2\nrewind_default = 1\n";
    let mut redis = Redis::start().await;
    let rules_node = || {
        Server::start(ServerOpts {
            shards: 2,
            args: vec!["--redis".into(), redis.url()],
            config_toml: Some(RULES.into()),
            ..Default::default()
        })
    };
    let (a, b) = (rules_node(), rules_node());
    for s in [&a, &b] {
        wait_health(s, "ok", Duration::from_secs(10)).await;
    }
    let hash = |s: &Server| {
        let s = s.public;
        async move { http_get(s, "/health").await.json()["rules"].clone() }
    };
    assert!(hash(&a).await.is_string());
    assert_eq!(hash(&a).await, hash(&b).await);

    let board = unique("scoreboard/c");
    for i in 1..=5 {
        rest_publish_ok(a.backend(), &board, "board", &i.to_string()).await;
    }
    let stream = format!("bc:{{{board}}}:h");
    assert_eq!(
        redis.cmd(&["XLEN", &stream]).await,
        Resp::Int(2),
        "history_size 2 caps the stream"
    );
    let mut viewer = Ws::connect(b.public).await;
    let r = viewer.subscribe(&board).await;
    assert_eq!(r["rewound"], json!(1), "{r}");
    let first = take(&mut viewer, 1, T).await;
    assert_eq!((offsets(&first), seqs(&first)), (vec![5], vec![1]));

    // rewind on B while A publishes: the replayed ones, then every newer one, once each.
    let news = unique("news");
    for i in 1..=6 {
        rest_publish_ok(a.backend(), &news, "e", &i.to_string()).await;
    }
    let publisher = {
        let addr = a.backend();
        let news = news.clone();
        tokio::spawn(async move {
            for i in 7..=30 {
                rest_publish_ok(addr, &news, "e", &i.to_string()).await;
            }
        })
    };
    let mut sub = b.ws_authed("u").await;
    let r = sub
        .call("subscribe", json!({"channel": news, "rewind": 4}))
        .await;
    assert_eq!(r["rewound"], json!(4), "{r}");
    let at = r["offset"].as_u64().unwrap();
    publisher.await.unwrap();
    let got = take(&mut sub, (30 - at + 4) as usize, T).await;
    assert_eq!(offsets(&got), (at - 3..=30).collect::<Vec<u64>>());
    assert_eq!(seqs(&got), (1..=(30 - at + 4)).collect::<Vec<u64>>());

    // A killed, Redis restarted empty: B reconnects; rewind finds nothing, offsets restart.
    a.signal(libc::SIGKILL);
    redis.restart().await;
    wait_reconnected(&b, 1.0, Duration::from_secs(15)).await;
    let mut late = Ws::connect(b.public).await;
    let r = late.subscribe(&board).await;
    assert_eq!(r["rewound"], json!(0), "{r}");
    let ack = rest_publish_ok(b.backend(), &board, "board", "6").await;
    assert_eq!(ack.offset, 1);
    let n = take(&mut late, 1, T).await;
    assert_eq!((offsets(&n), seqs(&n)), (vec![1], vec![1]));
}

// ---------------------------------------------------------------------------------------------
// Presence across nodes (SPEC 16)
// ---------------------------------------------------------------------------------------------

const PRESENCE_RULES: &str =
    "[[channels]]\npattern = \"room/*\"\naccess = \"public\"\npresence = true\njoin_leave = true\n\
     [[channels]]\npattern = \"pair/*\"\npresence = true\npresence_members_max = 2\n";

/// A node with the presence rule; a node silent for 3 s is reaped.
fn presence_node(redis: &Redis) -> Server {
    Server::start(
        ServerOpts {
            shards: 2,
            args: vec!["--redis".into(), redis.url()],
            config_toml: Some(PRESENCE_RULES.into()),
            ..Default::default()
        }
        .env("BROADCASTER_PRESENCE_NODE_TIMEOUT", "3s"),
    )
}

async fn presence_nodes(redis: &Redis, n: usize) -> Vec<Server> {
    let nodes: Vec<Server> = (0..n).map(|_| presence_node(redis)).collect();
    for s in &nodes {
        wait_health(s, "ok", Duration::from_secs(10)).await;
    }
    nodes
}

/// A connection of `sub` on `s` (info `{"name": sub}`, presence scope).
async fn presence_member(s: &Server, sub: &str) -> Ws {
    let token = TokenSpec::new(&s.secret, sub)
        .scope(&["subscribe", "publish", "presence"])
        .info(json!({"name": sub}))
        .mint();
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&token).await;
    ws
}

/// The next join or leave, as `(method, user, version)`.
async fn presence_event(ws: &mut Ws, d: Duration) -> (String, String, u64) {
    let n = ws.recv_note(d).await;
    let method = n["method"].as_str().unwrap_or_default().to_string();
    assert!(method == "join" || method == "leave", "{n}");
    let p = &n["params"];
    let user = p["user"].as_str().unwrap().to_string();
    (method, user, p["version"].as_u64().unwrap())
}

async fn presence_of(s: &Server, channel: &str) -> Value {
    let path = format!("/presence?channel={channel}");
    let r = http_get_key(s.backend(), &path, &s.api_key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Polls `GET /presence` on `s` until its count is `n`.
async fn wait_count(s: &Server, channel: &str, n: u64, d: Duration) -> Value {
    let deadline = Instant::now() + d;
    loop {
        let p = presence_of(s, channel).await;
        if p["count"] == json!(n) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "presence count not {n} within {d:?}: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_member_on_one_node_is_seen_once_from_every_node() {
    let redis = Redis::start().await;
    let nodes = presence_nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let room = unique("room/x");
    let mut watcher = Ws::connect(b.public).await;
    watcher.subscribe(&room).await;

    let mut alice_a = presence_member(a, "alice").await;
    alice_a.subscribe(&room).await;
    let (kind, user, joined) = presence_event(&mut watcher, T).await;
    assert_eq!((kind.as_str(), user.as_str()), ("join", "alice"));
    let mut carol = presence_member(b, "carol").await;
    let r = carol.subscribe(&room).await;
    let snapshot = &r["presence"];
    assert_eq!(
        snapshot["members"],
        json!([{"user": "alice", "info": {"name": "alice"}}, {"user": "carol", "info": {"name": "carol"}}])
    );
    let (_, _, carol_joined) = presence_event(&mut watcher, T).await;
    assert!(carol_joined > joined);
    assert_eq!(
        snapshot["version"],
        json!(carol_joined),
        "B's snapshot is as of carol's join"
    );
    assert_eq!(&presence_of(a, &room).await, snapshot);
    assert_eq!(&presence_of(b, &room).await, snapshot);

    // alice on B too: no second join; alice gone from A: no leave; from both: one.
    let mut alice_b = presence_member(b, "alice").await;
    alice_b.subscribe(&room).await;
    drop(alice_a);
    watcher.expect_no_note(Duration::from_millis(700)).await;
    drop(alice_b);
    let (kind, user, left) = presence_event(&mut watcher, T).await;
    assert_eq!((kind.as_str(), user.as_str()), ("leave", "alice"));
    assert!(left > carol_joined);
    watcher.expect_no_note(Duration::from_millis(500)).await;
    let p = presence_of(a, &room).await;
    assert_eq!(
        (p["count"].clone(), p["version"].clone()),
        (json!(1), json!(left))
    );
    let channels = http_get_key(b.backend(), "/channels", &b.api_key)
        .await
        .json();
    assert!(
        channels
            .to_string()
            .contains(&format!(r#""channel":"{room}","subscribers":2,"users":1"#)),
        "{channels}"
    );
}

#[tokio::test]
async fn a_killed_nodes_members_leave_once_within_the_node_timeout() {
    let redis = Redis::start().await;
    let mut nodes = presence_nodes(&redis, 3).await;
    let room = unique("room/k");
    let mut watchers = Vec::new();
    for s in &nodes[1..] {
        let mut w = Ws::connect(s.public).await;
        w.subscribe(&room).await;
        watchers.push(w);
    }
    let mut held = Vec::new();
    for user in ["ann", "ben"] {
        let mut ws = presence_member(&nodes[0], user).await;
        ws.subscribe(&room).await;
        held.push(ws);
    }
    for w in &mut watchers {
        for _ in 0..2 {
            assert_eq!(presence_event(w, T).await.0, "join");
        }
    }
    let killed = Instant::now();
    nodes[0].signal(libc::SIGKILL);
    for w in &mut watchers {
        let mut left = Vec::new();
        for _ in 0..2 {
            let (kind, user, _) = presence_event(w, Duration::from_secs(6)).await;
            assert_eq!(kind, "leave");
            left.push(user);
        }
        left.sort();
        assert_eq!(left, ["ann", "ben"]);
    }
    let took = killed.elapsed();
    eprintln!("SIGKILL to the survivors' leaves: {took:?} (presence.node_timeout 3s)");
    assert!(took <= Duration::from_secs(3), "leaves after {took:?}");
    for w in &mut watchers {
        w.expect_no_note(Duration::from_secs(2)).await;
    }
    let survivors = nodes.split_off(1);
    let mut reaped = 0.0;
    for s in &survivors {
        reaped += metric(s, "presence_reaped_total").await;
        assert_eq!(presence_of(s, &room).await["count"], json!(0));
    }
    assert_eq!(reaped, 2.0, "each member reaped once over both survivors");
    assert_eq!(
        redis.cmd(&["ZCARD", "bc:nodes"]).await,
        Resp::Int(2),
        "the dead node is gone"
    );
}

#[tokio::test]
async fn after_redis_loses_its_data_members_come_back_without_joins() {
    let mut redis = Redis::start().await;
    let nodes = presence_nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let room = unique("room/r");
    let mut watcher = Ws::connect(b.public).await;
    watcher.subscribe(&room).await;
    let mut alice = presence_member(a, "alice").await;
    alice.subscribe(&room).await;
    let mut bob = presence_member(b, "bob").await;
    bob.subscribe(&room).await;
    let mut last = 0;
    for _ in 0..2 {
        let (kind, _, v) = presence_event(&mut watcher, T).await;
        assert_eq!(kind, "join");
        last = v;
    }

    redis.restart().await;
    for s in [a, b] {
        wait_reconnected(s, 1.0, Duration::from_secs(15)).await;
    }
    let p = wait_count(a, &room, 2, Duration::from_secs(10)).await;
    assert_eq!(p, presence_of(b, &room).await);
    assert!(
        p["version"].as_u64().unwrap() > last,
        "versions keep growing: {p}"
    );
    watcher.expect_no_note(Duration::from_secs(2)).await;

    // Presence works on as before: one join for a newcomer, one leave for a member gone.
    let mut dave = presence_member(a, "dave").await;
    dave.subscribe(&room).await;
    let (kind, user, v) = presence_event(&mut watcher, T).await;
    assert_eq!((kind.as_str(), user.as_str()), ("join", "dave"));
    assert!(v > p["version"].as_u64().unwrap());
    drop(alice);
    let (kind, user, _) = presence_event(&mut watcher, T).await;
    assert_eq!((kind.as_str(), user.as_str()), ("leave", "alice"));
    watcher.expect_no_note(Duration::from_millis(500)).await;
    assert_eq!(wait_count(b, &room, 2, T).await["count"], json!(2));
}

#[tokio::test]
async fn the_member_cap_holds_across_nodes() {
    let redis = Redis::start().await;
    let nodes = presence_nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let pair = unique("pair/x");
    let mut ann = presence_member(a, "ann").await;
    ann.subscribe(&pair).await;
    let mut ben = presence_member(b, "ben").await;
    ben.subscribe(&pair).await;
    let mut cid = presence_member(b, "cid").await;
    cid.call_err("subscribe", json!({"channel": pair}), "ResourceExhausted")
        .await;
    // A member already there, from another node, is no new member.
    let mut ann_b = presence_member(b, "ann").await;
    ann_b.subscribe(&pair).await;
    let p = presence_of(a, &pair).await;
    assert_eq!(p["count"], json!(2), "{p}");
    assert_eq!(
        metric(b, "presence_members").await,
        2.0,
        "ben and ann held on B"
    );
    assert_eq!(metric(a, "presence_members").await, 1.0, "ann held on A");
    drop(ben);
    let deadline = Instant::now() + T;
    let _cid = loop {
        let mut cid = presence_member(a, "cid").await;
        if cid
            .request("subscribe", json!({"channel": pair}))
            .await
            .get("result")
            .is_some()
        {
            break cid;
        }
        assert!(Instant::now() < deadline, "ben's leave freed no room");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let users: Vec<_> = presence_of(b, &pair).await["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(users, ["ann", "cid"]);
}

// ---------------------------------------------------------------------------------------------
// The backend's disconnect and unsubscribe across nodes (SPEC 17)
// ---------------------------------------------------------------------------------------------

async fn post_control(s: &Server, path: &str, body: Value) -> HttpResponse {
    http_post_key(s.backend(), path, &s.api_key, &body.to_string()).await
}

#[tokio::test]
async fn disconnect_and_unsubscribe_reach_every_node_and_apply_here_without_redis() {
    let (mut redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let channel = unique("ctl");
    let mut alice = b.ws_authed("alice").await;
    alice.subscribe(&channel).await;
    let mut bob = b.ws_authed("bob").await;
    bob.subscribe(&channel).await;

    let asked = Instant::now();
    let r = post_control(a, "/disconnect", json!({"user": "alice"})).await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"connections": 0})),
        "A's own count"
    );
    alice.expect_close(4006, T).await;
    eprintln!("/disconnect on A to the close on B: {:?}", asked.elapsed());
    bob.heartbeat_ok().await;

    let r = post_control(
        a,
        "/unsubscribe",
        json!({"user": "bob", "channel": channel}),
    )
    .await;
    assert_eq!(r.json(), json!({"subscriptions": 0}));
    let n = bob.recv_note(T).await;
    assert_eq!(n["params"], json!({"channel": channel, "reason": "server"}));
    rest_publish_ok(a.backend(), &channel, "e", "1").await;
    bob.expect_no_broadcast(Duration::from_millis(300)).await;

    // Redis gone: the call still ends the user's connections on this node, and says 503.
    let mut carol = a.ws_authed("carol").await;
    redis.kill();
    wait_health(a, "degraded", Duration::from_secs(10)).await;
    let r = post_control(a, "/disconnect", json!({"user": "carol"})).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], json!("Unavailable"));
    carol.expect_close(4006, T).await;
}

/// Polls `auth` with `token` on a fresh connection to `s` until it is refused (a node learns
/// the revocations Redis holds just after it connects).
async fn wait_refused(s: &Server, token: &str) {
    let deadline = Instant::now() + T;
    loop {
        let mut ws = Ws::connect(s.public).await;
        let r = ws.request("auth", json!({"token": token})).await;
        if r["error"]["code"] == json!("Unauthenticated") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked token still works: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `unsubscribed` (reason `revoked`) for `channel`, then close 4007.
async fn expect_revoked(ws: &mut Ws, channel: &str) {
    let n = ws.recv_note(T).await;
    assert_eq!(
        n["params"],
        json!({"channel": channel, "reason": "revoked"}),
        "{n}"
    );
    ws.expect_close(4007, T).await;
}

#[tokio::test]
async fn revocations_reach_every_node_outlive_restarts_and_apply_here_without_redis() {
    let (mut redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let channel = unique("rev");
    let stolen = TokenSpec::new(&a.secret, "mallory")
        .jti(&unique("jti"))
        .mint();
    let mut on_b = Ws::connect(b.public).await;
    on_b.auth_ok(&stolen).await;
    on_b.subscribe(&channel).await;
    let jti = decode_token(&stolen, &a.secret).unwrap()["jti"].clone();

    let asked = Instant::now();
    let r = post_control(a, "/revoke", json!({ "jti": jti })).await;
    assert_eq!((r.status, r.json()), (200, json!({"revoked": true})));
    expect_revoked(&mut on_b, &channel).await;
    eprintln!("/revoke on A to the close on B: {:?}", asked.elapsed());
    wait_refused(b, &stolen).await;

    // A node started after the revocation refuses the token.
    let late = node(&redis);
    wait_health(&late, "ok", T).await;
    wait_refused(&late, &stolen).await;
    drop(late);

    // Redis restarted empty: the nodes put their revocations back.
    redis.restart().await;
    wait_reconnected(a, 1.0, Duration::from_secs(15)).await;
    let deadline = Instant::now() + T;
    while !matches!(redis.cmd(&["HLEN", "bc:{bc}:revoked"]).await, Resp::Int(1)) {
        assert!(Instant::now() < deadline, "the revocation was not put back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let later = node(&redis);
    wait_health(&later, "ok", T).await;
    wait_refused(&later, &stolen).await;

    // Redis gone: a revocation still applies on this node, which answers 503.
    let old = TokenSpec::new(&a.secret, "carol")
        .issued_at(now_secs() - 60)
        .mint();
    let mut carol = Ws::connect(a.public).await;
    carol.auth_ok(&old).await;
    carol.subscribe(&channel).await;
    redis.kill();
    wait_health(a, "degraded", Duration::from_secs(10)).await;
    let cutoff = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let body = json!({"user": "carol", "issuedBefore": cutoff});
    let r = post_control(a, "/revoke", body).await;
    assert_eq!(r.status, 503, "{}", r.text());
    expect_revoked(&mut carol, &channel).await;
    wait_refused(a, &old).await;
}

/// A node of `redis` whose one hook posts to `receiver`; `room/*` lists members.
fn hooked_node(redis: &Redis, receiver: &hook_receiver::Receiver) -> Server {
    let mut opts = ServerOpts::shards(2).env("BROADCASTER_REDIS_URL", &redis.url());
    opts.config_toml = Some(format!(
        r#"
[presence]
node_timeout = "3s"

[[channels]]
pattern = "room/*"
presence = true

[[webhooks]]
url = "{}"
secret = "s"
batch_delay = "10ms"
vacated_delay = "200ms"
"#,
        receiver.url()
    ));
    Server::start(opts)
}

/// `name channel user` of each event.
fn hook_names(events: &[Value]) -> Vec<String> {
    let name = |e: &Value| {
        let user = e.get("user").and_then(Value::as_str).unwrap_or("-");
        format!("{} {user}", e["name"].as_str().unwrap())
    };
    events.iter().map(name).collect()
}

#[tokio::test]
async fn webhook_events_are_sent_once_across_nodes_and_for_a_dead_node() {
    let receiver = hook_receiver::Receiver::start().await;
    let redis = Redis::start().await;
    let mut a = hooked_node(&redis, &receiver);
    let b = hooked_node(&redis, &receiver);
    for s in [&a, &b] {
        wait_health(s, "ok", T).await;
    }
    let channel = unique("room/");
    // alice on both nodes, bob on B: one occupied, one added each.
    let mut alice_a = a.ws_authed("alice").await;
    alice_a.subscribe(&channel).await;
    let mut alice_b = b.ws_authed("alice").await;
    alice_b.subscribe(&channel).await;
    let mut bob = b.ws_authed("bob").await;
    bob.subscribe(&channel).await;
    receiver.wait_events(3, T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut seen = hook_names(&receiver.events());
    seen.sort();
    assert_eq!(
        seen,
        [
            "channel_occupied -",
            "member_added alice",
            "member_added bob"
        ]
    );
    assert!(receiver
        .events()
        .iter()
        .all(|e| e["channel"] == json!(channel)));

    // alice leaves A but stays on B: nothing. bob leaves: removed once.
    drop(alice_a);
    bob.call("unsubscribe", json!({"channel": channel})).await;
    let events = receiver.wait_events(4, T).await;
    assert_eq!(hook_names(&events[3..]), ["member_removed bob"]);

    // Node B dies holding alice and the last subscriber: A reaps it, removed and vacated once.
    let killed = Instant::now();
    b.signal(libc::SIGKILL);
    let events = receiver.wait_events(6, Duration::from_secs(15)).await;
    let mut last = hook_names(&events[4..]);
    last.sort();
    assert_eq!(last, ["channel_vacated -", "member_removed alice"]);
    eprintln!("node killed to its events sent: {:?}", killed.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.events().len(), 6, "each event once");
    a.signal(libc::SIGTERM);
    let _ = a.wait_exit(T).await;
}

#[tokio::test]
async fn webhook_events_survive_a_redis_restart_without_repeats() {
    let receiver = hook_receiver::Receiver::start().await;
    let mut redis = Redis::start().await;
    let a = hooked_node(&redis, &receiver);
    let b = hooked_node(&redis, &receiver);
    for s in [&a, &b] {
        wait_health(s, "ok", T).await;
    }
    let channel = unique("room/");
    let mut alice = a.ws_authed("alice").await;
    alice.subscribe(&channel).await;
    let mut bob = b.ws_authed("bob").await;
    bob.subscribe(&channel).await;
    receiver.wait_events(3, T).await;

    // Redis comes back empty: the nodes put their members and channels back without telling
    // the backend again (it saw them), and the next transitions are reported once.
    redis.restart().await;
    for s in [&a, &b] {
        wait_reconnected(s, 1.0, Duration::from_secs(15)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.events().len(), 3, "{:?}", receiver.events());
    drop(alice);
    let events = receiver.wait_events(4, T).await;
    assert_eq!(hook_names(&events[3..]), ["member_removed alice"]);
    bob.call("unsubscribe", json!({"channel": channel})).await;
    let events = receiver.wait_events(6, T).await;
    let mut last = hook_names(&events[4..]);
    last.sort();
    assert_eq!(last, ["channel_vacated -", "member_removed bob"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.events().len(), 6, "each event once");
}

/// SSE and compression in cluster mode (SPEC 19, 20): a stream on node 1 gets node 0's
/// publications in order; its `Last-Event-ID` resumes on node 2 with what was published while it
/// was away (offsets and epochs are the channel's in Redis, the same on every node); a
/// compressing WebSocket on node 2 gets the same publications compressed, inflating to them byte
/// for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_compression_across_nodes() {
    use common::sse::Sse;
    let (_redis, nodes) = cluster(3).await;
    let ch = unique("sse");
    let token = nodes[0].token("s", &["*"], &["subscribe"]);
    let target = format!("/sse?channel={ch}&token={token}");
    let mut sse = Sse::connect(nodes[1].public, &target, &[]).await;
    sse.opening(&[ch.as_str()]).await;

    let (mut z, head) = RawWs::connect_offering(nodes[2].public, "permessage-deflate").await;
    assert!(header_value(&head, "sec-websocket-extensions").is_some());
    let auth = json!({"id":1,"method":"auth","params":{"token":token}}).to_string();
    ok_result(&z.request(&auth).await, &json!(1));
    let sub = json!({"id":2,"method":"subscribe","params":{"channel":ch}}).to_string();
    ok_result(&z.request(&sub).await, &json!(2));

    let boards: Vec<String> = (1..=5).map(|n| scoreboard(4000, n)).collect();
    for b in &boards[..3] {
        rest_publish_ok(nodes[0].backend(), &ch, "board", b).await;
    }
    let mut last_id = String::new();
    for (n, b) in boards[..3].iter().enumerate() {
        let (id, v) = sse.broadcast().await;
        assert_eq!(v["offset"], json!(n as u64 + 1));
        assert_eq!(v["payload"], serde_json::from_str::<Value>(b).unwrap());
        last_id = id;
    }
    for b in &boards[..3] {
        let f = loop {
            let f = z.frame().await;
            if f.opcode == OP_TEXT {
                break f;
            }
        };
        assert_eq!(f.rsv, 4, "compressed");
        let text = String::from_utf8(inflate_message(&f.payload)).unwrap();
        assert_eq!(raw_payload(&text), b);
    }

    drop(sse);
    for b in &boards[3..] {
        rest_publish_ok(nodes[0].backend(), &ch, "board", b).await;
    }
    let resume = [("Last-Event-ID", last_id.as_str())];
    let mut sse = Sse::connect(nodes[2].public, &target, &resume).await;
    let (results, replayed, _) = sse.opening_with(&[ch.as_str()]).await;
    assert_eq!(results[0]["recovered"], json!(true), "{}", results[0]);
    let offsets: Vec<u64> = replayed
        .iter()
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [4, 5], "the missed ones, once, in order");
}
