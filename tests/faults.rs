//! Fault injection against the real binary (issue 7, item 4): a subscriber that stops reading
//! mid-frame, one that half-closes, one that sends a close and keeps sending, connection resets
//! during a write, a publisher that disconnects mid-request, and SIGTERM during heavy fan-out.
//!
//! Each test shows that the others are unaffected (a healthy subscriber on the same channel gets
//! every publication, offsets and seqs contiguous) and that nothing leaks (the connection and
//! subscription gauges return to the number of clients still open, and the server's open file
//! descriptors return to their level before the fault).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a released connection may take to disappear from the gauges and the fd table.
const RELEASE_WITHIN: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------------
// Leak checks
// ---------------------------------------------------------------------------------------------

/// Open file descriptors of the server process.
fn fd_count(s: &Server) -> usize {
    let dir = format!("/proc/{}/fd", s.pid());
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .count()
}

/// The server's fd count once it is quiet: the least of a few samples, so that a /metrics
/// connection the server is still closing is not counted.
async fn fd_baseline(s: &Server) -> usize {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut least = usize::MAX;
    for _ in 0..5 {
        least = least.min(fd_count(s));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    least
}

/// (`connections_active`, `subscriptions_total`) from /metrics.
async fn gauges(s: &Server) -> (u64, u64) {
    let r = http_get(s.backend(), "/metrics").await;
    assert_eq!(r.status, 200, "/metrics answered {}", r.status);
    let text = r.text();
    let get = |name: &str| {
        metric_sum(&text, name).unwrap_or_else(|| panic!("metric {name} missing:\n{text}")) as u64
    };
    (get("connections_active"), get("subscriptions_total"))
}

async fn counter(s: &Server, name: &str) -> f64 {
    let r = http_get(s.backend(), "/metrics").await;
    metric_sum(&r.text(), name).unwrap_or(0.0)
}

/// Polls until the gauges equal `conns` / `subs`.
async fn wait_gauges(s: &Server, conns: u64, subs: u64) {
    let deadline = Instant::now() + RELEASE_WITHIN;
    loop {
        let g = gauges(s).await;
        if g == (conns, subs) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gauges (connections_active, subscriptions_total) stayed at {g:?}, expected {:?}",
            (conns, subs)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls until the gauges equal the clients still open and the server holds no more file
/// descriptors than `fds_before`.
async fn assert_released(s: &Server, conns: u64, subs: u64, fds_before: usize, what: &str) {
    let deadline = Instant::now() + RELEASE_WITHIN;
    loop {
        let fds = fd_count(s);
        let g = gauges(s).await;
        if g == (conns, subs) && fds <= fds_before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not released within {RELEASE_WITHIN:?}: gauges (connections_active, \
             subscriptions_total) = {g:?}, expected {:?}; open fds {fds}, {fds_before} before the \
             fault",
            (conns, subs)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[track_caller]
fn assert_no_panic(s: &Server) {
    let err = s.stderr();
    assert!(
        !err.contains("panicked"),
        "the server panicked: {}",
        last_chars(&err, 3000)
    );
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A subscriber that reads everything and checks that seq and offset are contiguous.
struct Healthy {
    ws: Ws,
    channel: String,
    next_seq: u64,
    next_offset: u64,
    /// Every broadcast's params, in arrival order.
    seen: Vec<Value>,
}

impl Healthy {
    async fn join(s: &Server, channel: &str) -> Healthy {
        let mut ws = s.ws_authed("healthy").await;
        let r = ws.subscribe(channel).await;
        let offset = r["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("offset in {r}"));
        Healthy {
            ws,
            channel: channel.to_string(),
            next_seq: 1,
            next_offset: offset + 1,
            seen: Vec::new(),
        }
    }

    /// The next broadcast, which must continue both sequences.
    async fn next(&mut self) -> Value {
        let p = self.ws.recv_broadcast().await;
        assert_eq!(p["channel"], json!(self.channel), "{p}");
        assert_eq!(
            (p["seq"].as_u64(), p["offset"].as_u64()),
            (Some(self.next_seq), Some(self.next_offset)),
            "healthy subscriber: gap or reorder after {} broadcasts (expected seq {} offset {})",
            self.seen.len(),
            self.next_seq,
            self.next_offset
        );
        self.next_seq += 1;
        self.next_offset += 1;
        self.seen.push(p.clone());
        p
    }

    /// Reads `n` more broadcasts within `d` (for a spawned reader).
    async fn take(mut self, n: usize, d: Duration) -> Healthy {
        within(
            d,
            &format!("healthy subscriber to get {n} broadcasts"),
            async {
                for _ in 0..n {
                    self.next().await;
                }
            },
        )
        .await;
        self
    }
}

/// A REST publisher on one keep-alive connection.
struct Publisher {
    conn: HttpConn,
    auth: String,
}

impl Publisher {
    async fn connect(s: &Server) -> Publisher {
        Publisher {
            conn: HttpConn::connect(s.backend()).await,
            auth: format!("Bearer {}", s.api_key),
        }
    }

    /// Publishes and returns the ack (`{"id","createTime","offset"}`).
    async fn publish(&mut self, channel: &str, event: &str, payload_raw: &str) -> Value {
        let body = publish_body(channel, event, payload_raw);
        let r = self
            .conn
            .send(
                "POST",
                "/publish",
                &[("Authorization", &self.auth)],
                Some(body.as_bytes()),
            )
            .await;
        assert_eq!(r.status, 200, "publish answered {}: {}", r.status, r.text());
        r.json()
    }
}

/// A JSON string payload of about `len` bytes that names `tag`.
fn big_payload(tag: &str, len: usize) -> String {
    let mut s = format!("\"{tag}:");
    while s.len() < len + 1 {
        s.push_str("0123456789abcdef");
    }
    s.truncate(len + 1);
    s.push('"');
    s
}

/// Authenticates a raw socket (all channels, both scopes) and subscribes it to `channel`.
async fn raw_join(s: &Server, raw: &mut RawWs, sub: &str, channel: &str) {
    let r = raw
        .request(&json!({"id":1,"method":"auth","params":{"token": s.token_all(sub)}}).to_string())
        .await;
    ok_result(&r, &json!(1));
    let r = raw
        .request(&json!({"id":2,"method":"subscribe","params":{"channel": channel}}).to_string())
        .await;
    ok_result(&r, &json!(2));
}

fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(true, 0, opcode, payload, Some(rand::random()))
}

fn close_frame(code: u16) -> Vec<u8> {
    masked(OP_CLOSE, &code.to_be_bytes())
}

fn publish_request(id: u64, channel: &str, event: &str, payload_raw: &str) -> String {
    format!(
        "{{\"id\":{id},\"method\":\"publish\",\"params\":{}}}",
        publish_body(channel, event, payload_raw)
    )
}

/// Reads server frames from any byte stream (e.g. the read half of a split socket).
struct FrameReader<R> {
    rd: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(rd: R, buf: Vec<u8>) -> Self {
        FrameReader { rd, buf }
    }

    /// The next frame; Err says how the connection ended (a torn last frame reads as Eof).
    async fn next(&mut self, d: Duration) -> Result<RawFrame, RawEnd> {
        let deadline = tokio::time::Instant::now() + d;
        let mut tmp = vec![0u8; 65536];
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            match tokio::time::timeout_at(deadline, self.rd.read(&mut tmp)).await {
                Err(_) => panic!("no frame and no end from the server within {d:?}"),
                Ok(Ok(0)) => return Err(RawEnd::Eof),
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Ok(Err(e)) => return Err(RawEnd::Reset(e.to_string())),
            }
        }
    }

    /// Reads to the end of the connection, sorting what came.
    async fn drain(&mut self, d: Duration) -> Drained {
        let deadline = tokio::time::Instant::now() + d;
        let mut out = Drained::default();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(f) if f.opcode == OP_CLOSE => out.closes.push(f.close_code()),
                Ok(f) if !out.closes.is_empty() => out.after_close.push(f),
                Ok(f) if f.opcode == OP_TEXT => out.texts.push(f.text()),
                Ok(_) => {}
                Err(e) => {
                    out.end = Some(e);
                    return out;
                }
            }
        }
    }
}

#[derive(Default, Debug)]
struct Drained {
    texts: Vec<String>,
    closes: Vec<Option<u16>>,
    after_close: Vec<RawFrame>,
    end: Option<RawEnd>,
}

/// Every text frame a subscriber got before the end must be a broadcast (no response).
#[track_caller]
fn assert_only_broadcasts(texts: &[String], who: &str) {
    for t in texts {
        let v: Value =
            serde_json::from_str(t).unwrap_or_else(|e| panic!("{who}: invalid JSON {t:?}: {e}"));
        assert_eq!(v["method"], json!("broadcast"), "{who}: unexpected {t}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A subscriber that stops reading in the middle of a frame
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_that_stops_reading_mid_frame_is_cut_off_and_released() {
    let s = Server::start(
        ServerOpts::shards(2)
            .env("BROADCASTER_LIMITS_OUTBOUND_BUFFER_BYTES", "65536")
            .env("BROADCASTER_LIMITS_WRITE_TIMEOUT", "1s"),
    );
    let ch = "faults/stall";
    let mut healthy = Healthy::join(&s, ch).await;
    let mut publisher = Publisher::connect(&s).await;
    wait_gauges(&s, 1, 1).await;
    let fds0 = fd_baseline(&s).await;

    let mut slow = RawWs::connect_small_rcvbuf(s.public, 4096).await;
    raw_join(&s, &mut slow, "slow", ch).await;
    wait_gauges(&s, 2, 2).await;

    // One large broadcast; the slow one reads its header and half its payload, then stops.
    let mut expected: HashMap<u64, String> = HashMap::new();
    let payload = big_payload("p1", 48 * 1024);
    let ack = publisher.publish(ch, "big", &payload).await;
    expected.insert(ack["offset"].as_u64().unwrap(), payload);
    healthy.next().await;
    let mut head = [0u8; 4];
    within(
        T,
        "broadcast frame header",
        slow.stream.read_exact(&mut head),
    )
    .await
    .expect("read frame header");
    assert_eq!(head[0], 0x81, "a final text frame");
    assert_eq!(head[1], 126, "a 16-bit length");
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut half = vec![0u8; len / 2];
    within(
        T,
        "half a broadcast frame",
        slow.stream.read_exact(&mut half),
    )
    .await
    .expect("read half a frame");

    // Keep publishing (the healthy one reads each before the next) until the server drops the
    // slow one: 4003 when its queue overflows, or the write timeout.
    let mut published = 1usize;
    let stall_started = Instant::now();
    let cut_after = loop {
        let payload = big_payload(&format!("p{}", published + 1), 48 * 1024);
        let ack = publisher.publish(ch, "big", &payload).await;
        expected.insert(ack["offset"].as_u64().unwrap(), payload);
        healthy.next().await;
        published += 1;
        if published.is_multiple_of(4) && gauges(&s).await.0 == 1 {
            break published;
        }
        assert!(
            stall_started.elapsed() < Duration::from_secs(15),
            "a subscriber that stopped reading was not cut off in 15 s ({published} \
             publications); server log: {}",
            last_chars(&s.stderr(), 3000)
        );
    };
    eprintln!(
        "stalled subscriber cut off after {cut_after} publications, {:?}",
        stall_started.elapsed()
    );
    // The others go on as before.
    for _ in 0..10 {
        let payload = big_payload(&format!("p{}", published + 1), 48 * 1024);
        let ack = publisher.publish(ch, "big", &payload).await;
        expected.insert(ack["offset"].as_u64().unwrap(), payload);
        healthy.next().await;
        published += 1;
    }
    // Released while the stalled client still holds its socket, unread.
    assert_released(&s, 1, 1, fds0, "stalled subscriber").await;
    let cut = counter(&s, "slow_consumers_total").await + counter(&s, "write_timeouts_total").await;
    assert!(
        cut >= 1.0,
        "neither slow_consumers_total nor write_timeouts_total moved"
    );

    // What the stalled socket still holds ends with 4003 (if the close got through) or the end
    // of the connection, and it never got everything.
    let mut rest = FrameReader::new(slow.stream, [&head[..], &half[..]].concat());
    let d = rest.drain(Duration::from_secs(10)).await;
    eprintln!(
        "stalled subscriber: {} of {published} frames, closes {:?}, end {:?}",
        d.texts.len(),
        d.closes,
        d.end
    );
    assert_only_broadcasts(&d.texts, "stalled subscriber");
    assert!(
        matches!(d.closes.as_slice(), [] | [Some(4003)]),
        "close codes {:?}",
        d.closes
    );
    assert!(d.after_close.is_empty(), "frames after the close");
    assert!(
        matches!(d.end, Some(RawEnd::Eof) | Some(RawEnd::Reset(_))),
        "{:?}",
        d.end
    );
    assert!(d.texts.len() < published, "the stalled subscriber got all");

    // The healthy subscriber got every publication, complete.
    assert_eq!(healthy.seen.len(), published);
    for p in &healthy.seen {
        let offset = p["offset"].as_u64().unwrap();
        let want: Value = serde_json::from_str(&expected[&offset]).unwrap();
        assert_eq!(p["payload"], want, "payload of offset {offset}");
    }
    healthy.ws.heartbeat_ok().await;
    assert_no_panic(&s);
}

/// The same fault without the race: the queue overflows while the socket still has room (two
/// 40 KiB broadcasts queued before the writer runs), so the 4003 close frame and FIN go out at
/// once; the client then stops reading and never answers the close. The server must drop it
/// after its close linger, not keep it until some later timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_cut_off_4003_that_never_answers_the_close_is_released() {
    // One shard: the REST request, the owner and every subscriber share it, so one /broadcast
    // queues both of its publications for a subscriber before that subscriber's writer runs.
    let s = Server::start(
        ServerOpts::shards(1)
            .env("BROADCASTER_LIMITS_OUTBOUND_BUFFER_BYTES", "65536")
            .env("BROADCASTER_LIMITS_WRITE_TIMEOUT", "1s"),
    );
    let (ch, ch2) = ("faults/burst", "faults/burst-2");
    let mut healthy = Healthy::join(&s, ch).await;
    let mut publisher = Publisher::connect(&s).await;
    wait_gauges(&s, 1, 1).await;
    let fds0 = fd_baseline(&s).await;

    // The faulty one is on both channels: one /broadcast to both queues 2 x 40 KiB for it (over
    // the 64 KiB bound) and 40 KiB for the healthy one.
    let mut frozen = RawWs::connect(s.public).await;
    raw_join(&s, &mut frozen, "frozen", ch).await;
    let r = frozen
        .request(&json!({"id":3,"method":"subscribe","params":{"channel": ch2}}).to_string())
        .await;
    ok_result(&r, &json!(3));
    wait_gauges(&s, 2, 3).await;
    let payload = big_payload("burst", 40 * 1024);
    let body =
        format!("{{\"channels\":[\"{ch}\",\"{ch2}\"],\"event\":\"burst\",\"payload\":{payload}}}");
    let r = http_post_key(s.backend(), "/broadcast", API_KEY, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let p = healthy.next().await;
    assert_eq!(
        p["payload"],
        serde_json::from_str::<Value>(&payload).unwrap()
    );

    // The faulty one gets 4003 and the end of the server's side at once...
    assert_eq!(frozen.ended(T).await, RawEnd::Close(Some(4003)));
    frozen.expect_eof().await;
    let closed_at = Instant::now();
    // ... then never answers and keeps its socket. The server waits for the peer's close for
    // its close linger (2 s), not until some later timer (the next ping, 30 s).
    assert_released(
        &s,
        1,
        1,
        fds0,
        "4003 subscriber that never answers the close",
    )
    .await;
    eprintln!(
        "4003 subscriber released {:?} after its close",
        closed_at.elapsed()
    );

    // The others go on.
    for i in 0..5 {
        publisher.publish(ch, "after", &i.to_string()).await;
        healthy.next().await;
    }
    drop(frozen);
    assert_no_panic(&s);
}

// ---------------------------------------------------------------------------------------------
// 2. Clients that half-close
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_clients_are_ended_and_released() {
    let s = Server::start(ServerOpts::shards(2));
    let ch = "faults/half";
    let healthy = Healthy::join(&s, ch).await;
    let mut publisher = Publisher::connect(&s).await;
    wait_gauges(&s, 1, 1).await;
    let fds0 = fd_baseline(&s).await;

    // a: subscribed, then FIN; b: subscribed, half a request frame, then FIN; c: FIN right
    // after the handshake, before auth.
    let mut a = RawWs::connect(s.public).await;
    raw_join(&s, &mut a, "a", ch).await;
    let mut b = RawWs::connect(s.public).await;
    raw_join(&s, &mut b, "b", ch).await;
    let c = RawWs::connect(s.public).await;
    wait_gauges(&s, 4, 3).await;

    let n = 40usize;
    let reader = tokio::spawn(healthy.take(n, Duration::from_secs(20)));
    let pub_task = tokio::spawn(async move {
        for i in 0..n {
            publisher.publish(ch, "e", &i.to_string()).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        publisher
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let frame = masked(
        OP_TEXT,
        publish_request(3, ch, "torn", &big_payload("b", 2000)).as_bytes(),
    );
    b.send_raw(&frame[..frame.len() / 2]).await;
    let mut halves = Vec::new();
    for (name, raw) in [("a", a), ("b", b), ("c", c)] {
        let mut stream = raw.stream;
        within(T, "shutdown(Write)", stream.shutdown())
            .await
            .expect("shutdown(Write)");
        halves.push((name, stream));
    }
    // The server ends each one (the read side sees the end) while the client keeps its socket.
    let mut readers = Vec::new();
    for (name, stream) in halves {
        let mut r = FrameReader::new(stream, Vec::new());
        let d = r.drain(T).await;
        eprintln!(
            "half-closed {name}: {} frames, closes {:?}, end {:?}",
            d.texts.len(),
            d.closes,
            d.end
        );
        assert_only_broadcasts(&d.texts, name);
        assert!(d.after_close.is_empty(), "{name}: frames after the close");
        assert!(d.end.is_some(), "{name}");
        readers.push(r);
    }
    assert_released(&s, 1, 1, fds0, "half-closed clients").await;

    let mut publisher = within(Duration::from_secs(20), "publisher", pub_task)
        .await
        .expect("publisher task");
    let mut healthy = reader.await.expect("healthy reader");
    // The half frame of b was never published, and the server still serves.
    let ack = publisher.publish(ch, "after", "1").await;
    assert_eq!(ack["offset"], json!(n + 1));
    let p = healthy.next().await;
    assert_eq!(p["event"], json!("after"));
    drop(readers);
    assert_released(&s, 1, 1, fds0, "half-closed clients, dropped").await;
    assert_no_panic(&s);
}

// ---------------------------------------------------------------------------------------------
// 3. A client that sends a close frame and keeps sending
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_after_a_close_are_ignored_and_the_connection_released() {
    let s = Server::start(ServerOpts::shards(2));
    let ch = "faults/chatty";
    let healthy = Healthy::join(&s, ch).await;
    let mut publisher = Publisher::connect(&s).await;
    wait_gauges(&s, 1, 1).await;
    let fds0 = fd_baseline(&s).await;

    let mut chatty = RawWs::connect(s.public).await;
    raw_join(&s, &mut chatty, "chatty", ch).await;
    wait_gauges(&s, 2, 2).await;
    // Nothing else was sent to it yet, so RawWs holds no unread bytes.
    let (rd, mut wr) = chatty.stream.into_split();
    let mut rd = FrameReader::new(rd, Vec::new());

    let n = 40usize;
    let reader = tokio::spawn(healthy.take(n, Duration::from_secs(20)));
    let pub_task = tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 0..n {
            acks.push(publisher.publish(ch, "legit", &i.to_string()).await);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        (publisher, acks)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A close with more frames in the same write, then more frames for longer than the server
    // waits for the peer's close (2 s).
    let mut burst = close_frame(1000);
    burst.extend(masked(
        OP_TEXT,
        publish_request(10, ch, "after-close", "0").as_bytes(),
    ));
    burst.extend(masked(OP_PING, b"p0"));
    within(T, "close + frames", wr.write_all(&burst))
        .await
        .expect("send close");
    let writer = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_millis(3500);
        let mut sent = 0u64;
        while Instant::now() < until {
            let i = sent + 1;
            let mut b = Vec::new();
            b.extend(masked(
                OP_TEXT,
                publish_request(10 + i, ch, "after-close", &i.to_string()).as_bytes(),
            ));
            b.extend(masked(
                OP_TEXT,
                json!({"id": 1000 + i, "method": "subscribe", "params": {"channel": format!("faults/other{i}")}})
                    .to_string()
                    .as_bytes(),
            ));
            b.extend(masked(OP_PING, format!("p{i}").as_bytes()));
            b.extend(masked(OP_BINARY, b"\x00\x01"));
            b.extend(close_frame(1000));
            match tokio::time::timeout(T, wr.write_all(&b)).await {
                Ok(Ok(())) => sent = i,
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        (wr, sent)
    });

    // Exactly one close (the echo of 1000), nothing after it, then the end of the stream.
    let d = rd.drain(T).await;
    eprintln!(
        "after close: {} broadcasts before the close, closes {:?}, end {:?}",
        d.texts.len(),
        d.closes,
        d.end
    );
    assert_only_broadcasts(&d.texts, "closing client");
    assert_eq!(d.closes, vec![Some(1000)], "one close frame echoing 1000");
    assert!(
        d.after_close.is_empty(),
        "frames after the close: {:?}",
        d.after_close
    );
    assert!(
        matches!(d.end, Some(RawEnd::Eof) | Some(RawEnd::Reset(_))),
        "{:?}",
        d.end
    );
    // Released although the client neither closed its socket nor stopped sending.
    assert_released(&s, 1, 1, fds0, "client sending after its close").await;
    let (wr, sent) = within(Duration::from_secs(10), "writer", writer)
        .await
        .expect("writer task");
    assert!(sent >= 5, "only {sent} bursts went out after the close");

    let (_publisher, acks) = within(Duration::from_secs(20), "publisher", pub_task)
        .await
        .expect("publisher task");
    let healthy = reader.await.expect("healthy reader");
    for (p, ack) in healthy.seen.iter().zip(&acks) {
        assert_eq!(p["id"], ack["id"]);
        assert_eq!(p["event"], json!("legit"));
    }
    // No publish or subscribe sent after the close was acted on.
    let h = http_get_key(
        s.backend(),
        &format!("/history?channel={ch}&limit=1000"),
        API_KEY,
    )
    .await
    .json();
    let pubs = h["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), n, "history: {h}");
    assert!(pubs.iter().all(|p| p["event"] == json!("legit")), "{h}");
    let channels = http_get_key(s.backend(), "/channels", API_KEY).await.json();
    assert_eq!(
        channels,
        json!({"channels": [{"channel": ch, "subscribers": 1}]})
    );
    drop((rd, wr));
    assert_released(&s, 1, 1, fds0, "client sending after its close, dropped").await;
    assert_no_panic(&s);
}

// ---------------------------------------------------------------------------------------------
// 4. Connection resets while the server writes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_during_fan_out_writes_leave_others_whole_and_leak_nothing() {
    // A send queue large enough for the whole burst: what is tested is the resets, not the
    // slow-consumer limit.
    let s = Server::start(
        ServerOpts::shards(2).env("BROADCASTER_LIMITS_OUTBOUND_BUFFER_BYTES", "4194304"),
    );
    let ch = "faults/reset";
    let healthy = Healthy::join(&s, ch).await;
    let mut publisher = Publisher::connect(&s).await;
    wait_gauges(&s, 1, 1).await;
    let fds0 = fd_baseline(&s).await;

    // Subscribers that never read: half with a tiny receive buffer, so that the server's
    // writes to them are stuck part way when the reset comes.
    let n_faulty = 48usize;
    let mut faulty = Vec::new();
    for i in 0..n_faulty {
        let mut raw = if i % 2 == 0 {
            RawWs::connect_small_rcvbuf(s.public, 4096).await
        } else {
            RawWs::connect(s.public).await
        };
        raw_join(&s, &mut raw, &format!("r{i}"), ch).await;
        faulty.push(raw);
    }
    wait_gauges(&s, 1 + n_faulty as u64, 1 + n_faulty as u64).await;

    let n = 60usize;
    let reader = tokio::spawn(healthy.take(n, Duration::from_secs(30)));
    let mut expected = HashMap::new();
    let started = Instant::now();
    for i in 0..n {
        if i == n / 3 || i == 2 * n / 3 {
            // Half of them now, half of the rest later, the last after the burst was accepted
            // (their queues still being written): RST (SO_LINGER 0).
            let k = faulty.len() / 2;
            for raw in faulty.drain(..k) {
                raw.stream.set_zero_linger().expect("SO_LINGER 0");
                drop(raw);
            }
        }
        let payload = big_payload(&format!("r{i}"), 32 * 1024);
        let ack = publisher.publish(ch, "burst", &payload).await;
        expected.insert(ack["offset"].as_u64().unwrap(), payload);
    }
    for raw in faulty.drain(..) {
        raw.stream.set_zero_linger().expect("SO_LINGER 0");
        drop(raw);
    }
    eprintln!("burst of {n} published in {:?}", started.elapsed());
    let healthy = reader.await.expect("healthy reader");
    for p in &healthy.seen {
        let offset = p["offset"].as_u64().unwrap();
        let want: Value = serde_json::from_str(&expected[&offset]).unwrap();
        assert_eq!(p["payload"], want, "payload of offset {offset}");
    }
    assert_released(&s, 1, 1, fds0, "reset subscribers").await;
    let mut healthy = healthy;
    publisher.publish(ch, "after", "1").await;
    healthy.next().await;
    assert_no_panic(&s);
}

// ---------------------------------------------------------------------------------------------
// 5. Publishers that disconnect mid-request
// ---------------------------------------------------------------------------------------------

/// The publications held for `channel`, oldest first.
async fn history(s: &Server, channel: &str) -> Vec<Value> {
    let r = http_get_key(
        s.backend(),
        &format!("/history?channel={channel}&limit=1000"),
        API_KEY,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["publications"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_cut_off_mid_body_publishes_nothing() {
    let s = Server::start(ServerOpts::shards(2));
    let ch = "faults/rest";
    let mut healthy = Healthy::join(&s, ch).await;
    let mut publisher = Publisher::connect(&s).await;
    publisher.publish(ch, "legit", "1").await;
    healthy.next().await;
    wait_gauges(&s, 1, 1).await;
    let fds0 = fd_baseline(&s).await;

    let head = |len: usize| {
        format!(
            "POST /publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
            s.backend()
        )
    };
    // Complete, valid JSON, but the announced length is twice as long: the server must wait
    // for the rest and, when the client goes, publish nothing.
    for (i, how) in ["fin", "rst", "half-close"].iter().enumerate() {
        let body = publish_body(ch, &format!("torn-{how}"), &big_payload("t", 1000));
        let mut c = within(T, "connect", TcpStream::connect(s.backend()))
            .await
            .unwrap();
        let mut req = head(body.len() * 2).into_bytes();
        req.extend_from_slice(body.as_bytes());
        within(T, "send", c.write_all(&req)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        match i {
            0 => drop(c),
            1 => {
                c.set_zero_linger().unwrap();
                drop(c);
            }
            _ => {
                c.shutdown().await.unwrap();
                let mut answer = Vec::new();
                let _ = within(
                    T,
                    "the server to end the request",
                    c.read_to_end(&mut answer),
                )
                .await;
                let answer = String::from_utf8_lossy(&answer);
                assert!(
                    !answer.starts_with("HTTP/1.1 200"),
                    "a request cut off mid-body was answered {answer:?}"
                );
            }
        }
    }
    // Cut inside the JSON, and cut inside the head.
    let body = publish_body(ch, "torn-json", &big_payload("t", 1000));
    let mut c = within(T, "connect", TcpStream::connect(s.backend()))
        .await
        .unwrap();
    let mut req = head(body.len()).into_bytes();
    req.extend_from_slice(&body.as_bytes()[..body.len() / 2]);
    within(T, "send", c.write_all(&req)).await.unwrap();
    drop(c);
    let mut c = within(T, "connect", TcpStream::connect(s.backend()))
        .await
        .unwrap();
    let h = head(body.len());
    within(T, "send", c.write_all(&h.as_bytes()[..h.len() / 2]))
        .await
        .unwrap();
    drop(c);

    assert_released(&s, 1, 1, fds0, "cut-off HTTP requests").await;
    let health = http_get(s.backend(), "/health").await;
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );
    // Nothing was published: the next publication follows the first, for the subscriber and
    // in history.
    let ack = publisher.publish(ch, "legit", "2").await;
    assert_eq!(ack["offset"], json!(2));
    let p = healthy.next().await;
    assert_eq!(p["event"], json!("legit"));
    let pubs = history(&s, ch).await;
    let events: Vec<_> = pubs.iter().map(|p| p["event"].clone()).collect();
    assert_eq!(events, vec![json!("legit"), json!("legit")], "{pubs:?}");
    healthy
        .ws
        .expect_no_broadcast(Duration::from_millis(200))
        .await;
    assert_no_panic(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_publisher_that_disconnects_after_publishing_delivers_whole_or_nothing() {
    let s = Server::start(ServerOpts::shards(2));
    let ch = "faults/wspub";
    let mut healthy = Healthy::join(&s, ch).await;
    wait_gauges(&s, 1, 1).await;
    let fds0 = fd_baseline(&s).await;

    // Each publisher sends one publish of a 40 KiB payload and goes: after the whole frame
    // (FIN, RST, or half-close), or after half of it (never published).
    let token = s.token("pub", &[ch], &["publish"]);
    let mut payloads: HashMap<String, String> = HashMap::new();
    let rounds = 24usize;
    for i in 0..rounds {
        let mut raw = RawWs::connect(s.public).await;
        let r = raw
            .request(&json!({"id":1,"method":"auth","params":{"token": token}}).to_string())
            .await;
        ok_result(&r, &json!(1));
        let event = format!(
            "ws-{i}-{}",
            ["fin", "rst", "half-close", "half-frame"][i % 4]
        );
        let payload = big_payload(&event, 40 * 1024);
        let frame = masked(OP_TEXT, publish_request(2, ch, &event, &payload).as_bytes());
        payloads.insert(event, payload);
        match i % 4 {
            0 => {
                raw.send_raw(&frame).await;
                drop(raw);
            }
            1 => {
                raw.send_raw(&frame).await;
                raw.stream.set_zero_linger().unwrap();
                drop(raw);
            }
            2 => {
                raw.send_raw(&frame).await;
                let _ = raw.stream.shutdown().await;
                drop(raw);
            }
            _ => {
                raw.send_raw(&frame[..frame.len() / 2]).await;
                drop(raw);
            }
        }
    }
    // Once every publisher's connection is gone, whatever they published has its offset.
    assert_released(&s, 1, 1, fds0, "disconnected WS publishers").await;
    let mut publisher = Publisher::connect(&s).await;
    let last = publisher.publish(ch, "sentinel", "0").await;
    let last = last["offset"].as_u64().unwrap();

    // The subscriber gets each publication whole, in order, up to the sentinel.
    while healthy.next_offset <= last {
        healthy.next().await;
    }
    let mut published = Vec::new();
    for p in &healthy.seen[..healthy.seen.len() - 1] {
        let event = p["event"].as_str().unwrap().to_string();
        assert!(
            !event.ends_with("half-frame"),
            "half a frame was published: {event}"
        );
        let want: Value = serde_json::from_str(&payloads[&event]).unwrap();
        assert_eq!(p["payload"], want, "payload of {event}");
        published.push(event);
    }
    eprintln!(
        "{} of {} disconnecting WS publishers' publications went out",
        published.len(),
        rounds
    );
    // History holds exactly the same publications.
    let held: Vec<_> = history(&s, ch)
        .await
        .iter()
        .map(|p| (p["offset"].clone(), p["id"].clone()))
        .collect();
    let seen: Vec<_> = healthy
        .seen
        .iter()
        .map(|p| (p["offset"].clone(), p["id"].clone()))
        .collect();
    assert_eq!(held, seen);
    healthy
        .ws
        .expect_no_broadcast(Duration::from_millis(200))
        .await;
    assert_no_panic(&s);
}

// ---------------------------------------------------------------------------------------------
// 6. SIGTERM during heavy fan-out
// ---------------------------------------------------------------------------------------------

fn publish_request_bytes(
    backend: std::net::SocketAddr,
    channel: &str,
    n: u64,
    pad: &str,
) -> String {
    let body = publish_body(channel, "tick", &format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"));
    format!(
        "POST /publish HTTP/1.1\r\nHost: {backend}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The status of the next response on a keep-alive socket and, for a 200, the publication's
/// offset; None when the connection ended.
async fn read_status(c: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, u64)> {
    let mut tmp = vec![0u8; 16384];
    loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
            let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
            let len: usize = header_value(&head, "content-length")?.parse().ok()?;
            while buf.len() < pos + 4 + len {
                let n = c.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body: Vec<u8> = buf.drain(..pos + 4 + len).skip(pos + 4).collect();
            let offset = match status {
                200 => serde_json::from_slice::<Value>(&body).ok()?["offset"].as_u64()?,
                _ => 0,
            };
            return Some((status, offset));
        }
        let n = c.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Publishes to `channel` until `stop`, the server refuses, or the connection ends; counts the
/// highest acknowledged offset in `acked` and returns (acknowledged, refused with 503).
async fn publish_loop(
    backend: std::net::SocketAddr,
    channel: &'static str,
    pad: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> (u64, u64) {
    let mut c = within(T, "TCP connect", TcpStream::connect(backend))
        .await
        .unwrap();
    c.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    let (mut ok, mut refused) = (0u64, 0u64);
    let pad = "x".repeat(pad);
    while !stop.load(Ordering::Relaxed) {
        let req = publish_request_bytes(backend, channel, ok, &pad);
        if c.write_all(req.as_bytes()).await.is_err() {
            break;
        }
        match tokio::time::timeout(T, read_status(&mut c, &mut buf)).await {
            Ok(Some((200, offset))) => {
                ok += 1;
                acked.fetch_max(offset, Ordering::Relaxed);
            }
            Ok(Some((503, _))) => {
                // Draining: refused, as it should be; do not spin.
                refused += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Some((other, _))) => panic!("publish answered {other}"),
            Ok(None) => break,
            Err(_) => panic!("publish got no answer within {T:?}"),
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_heavy_fan_out_closes_everyone_1001_without_gaps_and_exits_0() {
    let grace = Duration::from_secs(5);
    // A write timeout longer than the test, so that only shutdown_grace can end the stuck client
    // below; send queues with room for the backlog built while the subscribers pause (what is
    // tested is the drain, not the slow-consumer limit).
    let mut s = Server::start(
        ServerOpts::shards(2)
            .env("BROADCASTER_SHUTDOWN_GRACE", "5s")
            .env("BROADCASTER_LIMITS_WRITE_TIMEOUT", "60s")
            .env("BROADCASTER_LIMITS_OUTBOUND_BUFFER_BYTES", "8388608"),
    );
    let ch = "faults/term";
    let n_subs = 200usize;
    let received = Arc::new(AtomicUsize::new(0));
    // While the gate is shut the subscribers stop reading, so that a backlog is queued for each
    // of them when SIGTERM comes.
    let (gate, gate_rx) = tokio::sync::watch::channel(true);

    // 200 subscribers, each reading until the end and checking its own sequence.
    let token = s.token("sub", &[ch], &["subscribe"]);
    let mut subs = Vec::new();
    for batch in 0..n_subs / 25 {
        let mut joins = Vec::new();
        for _ in 0..25 {
            let (addr, token) = (s.public, token.clone());
            joins.push(tokio::spawn(async move {
                let mut ws = Ws::connect(addr).await;
                ws.auth_ok(&token).await;
                let r = ws.subscribe(ch).await;
                assert_eq!(r["offset"], json!(0), "{r}");
                ws
            }));
        }
        for (k, j) in joins.into_iter().enumerate() {
            let mut ws = j.await.expect("subscriber setup");
            let who = batch * 25 + k;
            let received = received.clone();
            let mut gate = gate_rx.clone();
            subs.push(tokio::spawn(async move {
                let mut next = 1u64;
                loop {
                    within(
                        Duration::from_secs(20),
                        "the gate to open",
                        gate.wait_for(|o| *o),
                    )
                    .await
                    .expect("gate");
                    match ws.try_recv_text(Duration::from_secs(10)).await {
                        Ok(Some(t)) => {
                            let v: Value = serde_json::from_str(&t).unwrap();
                            let p = &v["params"];
                            assert_eq!(v["method"], json!("broadcast"), "subscriber {who}: {t}");
                            assert_eq!(
                                (p["seq"].as_u64(), p["offset"].as_u64()),
                                (Some(next), Some(next)),
                                "subscriber {who}: gap or reorder"
                            );
                            next += 1;
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => panic!("subscriber {who}: nothing for 10 s, no close"),
                        Err(end) => return (who, next - 1, end),
                    }
                }
            }));
        }
    }
    // And a client that never reads, on another channel, with several MB written at it so that
    // the server's writes to it are stuck: the drain waits for it until shutdown_grace, no
    // longer.
    let stuck_ch = "faults/term-stuck";
    let mut stalled = RawWs::connect_small_rcvbuf(s.public, 4096).await;
    raw_join(&s, &mut stalled, "stalled", stuck_ch).await;
    wait_gauges(&s, n_subs as u64 + 1, n_subs as u64 + 1).await;
    let mut stuffer = Publisher::connect(&s).await;
    for i in 0..120 {
        let payload = big_payload(&format!("s{i}"), 48 * 1024);
        stuffer.publish(stuck_ch, "stuff", &payload).await;
    }
    drop(stuffer);

    // Publishers in a loop, each on its own keep-alive connection.
    let backend = s.backend();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let (n_pub, pad) = (2, 300);
    let publishers: Vec<_> = (0..n_pub)
        .map(|_| tokio::spawn(publish_loop(backend, ch, pad, stop.clone(), acked.clone())))
        .collect();

    // Let the fan-out run; then the subscribers pause, a pipelined burst fills every send queue,
    // and SIGTERM comes while all of it is still queued. Then they read on.
    within(Duration::from_secs(20), "fan-out to get going", async {
        while received.load(Ordering::Relaxed) < n_subs * 50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    gate.send_replace(false);
    let burst = 100u64;
    let mut c = within(T, "TCP connect", TcpStream::connect(backend))
        .await
        .unwrap();
    let pad_s = "y".repeat(pad);
    let reqs: String = (0..burst)
        .map(|n| publish_request_bytes(backend, ch, n, &pad_s))
        .collect();
    within(T, "send the burst", c.write_all(reqs.as_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    for _ in 0..burst {
        match within(T, "burst answers", read_status(&mut c, &mut buf)).await {
            Some((200, offset)) => acked.fetch_max(offset, Ordering::Relaxed),
            other => panic!("burst publish answered {other:?}"),
        };
    }
    // Every publication acknowledged by now must reach every subscriber before its close.
    let acked_at_signal = acked.load(Ordering::Relaxed);
    let delivered_at_signal = received.load(Ordering::Relaxed);
    s.signal(libc::SIGTERM);
    let signalled = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.send_replace(true);
    let status = s
        .wait_exit(grace + Duration::from_secs(2) - signalled.elapsed())
        .await;
    let exit_time = signalled.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert!(status.success(), "exit status {status:?} after SIGTERM");
    assert!(exit_time <= grace + Duration::from_secs(2), "{exit_time:?}");
    let (mut ok, mut refused) = (0, 0);
    ok += burst;
    for p in publishers {
        let (o, r) = within(T, "publisher to stop", p)
            .await
            .expect("publisher task");
        ok += o;
        refused += r;
    }

    let mut counts = Vec::new();
    let mut bad = Vec::new();
    for t in subs {
        let (who, got, end) = within(T, "subscriber to end", t)
            .await
            .expect("subscriber task");
        counts.push(got);
        if end != Ended::Close(Some(1001)) {
            bad.push((who, got, end));
        }
    }
    eprintln!(
        "SIGTERM with offset {acked_at_signal} acknowledged and {} broadcasts per subscriber \
         delivered: exit in {exit_time:?}; {ok} published, {refused} refused; per subscriber \
         {}..={} broadcasts",
        delivered_at_signal / n_subs,
        counts.iter().min().unwrap(),
        counts.iter().max().unwrap()
    );
    assert!(
        bad.is_empty(),
        "{} of {n_subs} subscribers did not end with close 1001, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(
        *counts.iter().min().unwrap() >= acked_at_signal,
        "a subscriber's close came before a publication acknowledged before SIGTERM \
         (offset {acked_at_signal}): what was queued was dropped"
    );
    // The stalled one was dropped at the end of the grace period (the process is gone).
    let mut rest = FrameReader::new(stalled.stream, Vec::new());
    let d = rest.drain(T).await;
    assert!(d.end.is_some(), "{d:?}");
    // Nothing refused was delivered (at most one accepted publish per publisher lost its answer).
    assert!(*counts.iter().max().unwrap() <= ok + n_pub as u64);
}

// ---------------------------------------------------------------------------------------------
// 7. Out of file descriptors
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_server_refuses_new_connections_and_keeps_serving() {
    const NOFILE: u64 = 96;
    let s = Server::start(ServerOpts {
        nofile: Some(NOFILE),
        ..ServerOpts::shards(1)
    });
    let ch = "faults/emfile";
    let mut healthy = Healthy::join(&s, ch).await;
    let mut publisher = Publisher::connect(&s).await;
    let fds0 = fd_count(&s);

    // More connections than the server has descriptors for: it accepts until EMFILE, the
    // kernel queues the rest in the listen backlog.
    let mut flood = Vec::new();
    for _ in 0..NOFILE + 40 {
        match tokio::time::timeout(T, TcpStream::connect(s.public)).await {
            Ok(Ok(mut c)) => {
                let _ = c.write_all(b"GET /ws HTTP/1.1\r\n").await;
                flood.push(c);
            }
            _ => break,
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while fd_count(&s) + 2 < NOFILE as usize {
        assert!(
            Instant::now() < deadline,
            "the server never ran out of descriptors: {} open",
            fd_count(&s)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{} flood connections; server fds {fds0} -> {}",
        flood.len(),
        fd_count(&s)
    );

    // Out of descriptors, it still delivers, and still reads its WebSockets (their readiness
    // comes from the shard's epoll set, whose wait itself needs a spare descriptor).
    for i in 0..20 {
        publisher.publish(ch, "full", &i.to_string()).await;
    }
    healthy = healthy.take(20, Duration::from_secs(10)).await;
    let ch2 = "faults/emfile/2";
    let r = within(
        T,
        "subscribe while out of descriptors",
        healthy.ws.subscribe(ch2),
    )
    .await;
    assert!(r["offset"].is_u64(), "{r}");
    publisher.publish(ch2, "full", "\"second\"").await;
    let p = within(
        T,
        "broadcast on the second channel",
        healthy.ws.recv_broadcast(),
    )
    .await;
    assert_eq!(p["channel"], json!(ch2), "{p}");

    // Descriptors free again: new connections are served.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fd_count(&s) > fds0 + 4 {
        assert!(
            Instant::now() < deadline,
            "descriptors not released: {} open, {fds0} before",
            fd_count(&s)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut late = Healthy::join(&s, ch).await;
    let ack = publisher.publish(ch, "after", "1").await;
    assert_eq!(late.next().await["offset"], ack["offset"]);
    assert_eq!(healthy.next().await["offset"], ack["offset"]);
    assert!(counter(&s, "accept_errors_total").await >= 1.0);
    assert!(
        s.stderr().contains("accept failed"),
        "no accept warning logged"
    );
    assert_no_panic(&s);
}
