//! Delivery guarantees across shards (SPEC sections 4, 5, 6 and 7): the same order for every
//! subscriber, contiguous offsets and seqs, no loss at 1,000 x 1,000, slow consumers cut off
//! without hurting others, and history recovery with `since`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Note {
    method: String,
    params: NoteParams,
}

#[derive(Deserialize)]
struct NoteParams {
    id: String,
    seq: u64,
    offset: u64,
}

fn parse_note(text: &str) -> NoteParams {
    let n: Note =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("bad broadcast {text:?}: {e}"));
    assert_eq!(n.method, "broadcast", "{text}");
    n.params
}

/// Opens `n` authenticated subscribers of `channel`, `batch` handshakes at a time.
async fn subscribers(s: &Server, channel: &str, n: usize, batch: usize) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    let token = s.token("sub", &["*"], &["subscribe"]);
    while out.len() < n {
        let k = batch.min(n - out.len());
        let mut tasks = Vec::with_capacity(k);
        for _ in 0..k {
            let addr = s.public;
            let token = token.clone();
            let channel = channel.to_string();
            tasks.push(tokio::spawn(async move {
                let mut ws = Ws::connect(addr).await;
                ws.auth_ok(&token).await;
                let r = ws.subscribe(&channel).await;
                assert_eq!(r["offset"], json!(0), "{r}");
                ws
            }));
        }
        for t in tasks {
            out.push(t.await.expect("subscriber task"));
        }
    }
    out
}

/// Reads exactly `count` broadcasts and returns their (id, seq, offset).
async fn collect(mut ws: Ws, count: usize, d: Duration) -> Vec<(String, u64, u64)> {
    let mut got = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + d;
    while got.len() < count {
        let text = match tokio::time::timeout_at(deadline, ws.recv_broadcast_raw()).await {
            Ok(t) => t,
            Err(_) => panic!("only {} of {count} broadcasts arrived", got.len()),
        };
        let p = parse_note(&text);
        got.push((p.id, p.seq, p.offset));
    }
    got
}

async fn same_order_for_everyone(shards: usize) {
    let s = Server::start(ServerOpts::shards(shards));
    let n_subs = 24;
    let per_source = 50u64;
    let subs = subscribers(&s, "feed", n_subs, 24).await;
    let readers: Vec<_> = subs
        .into_iter()
        .map(|ws| {
            tokio::spawn(collect(
                ws,
                (2 * per_source) as usize,
                Duration::from_secs(20),
            ))
        })
        .collect();

    // Two publishers at once: a WebSocket client and the REST API, each on its own connection.
    let mut wsp = Ws::connect(s.public).await;
    wsp.auth_ok(&s.token("pub", &["feed"], &["publish"])).await;
    let ws_pub = async move {
        let mut results = Vec::new();
        for i in 0..per_source {
            let r = wsp
                .call(
                    "publish",
                    json!({"channel": "feed", "event": "ws", "payload": i}),
                )
                .await;
            results.push(r);
        }
        results
    };
    let backend = s.public;
    let rest_pub = async move {
        let mut c = HttpConn::connect(backend).await;
        let auth = format!("Bearer {API_KEY}");
        let mut results = Vec::new();
        for i in 0..per_source {
            let body = publish_body("feed", "rest", &i.to_string());
            let r = c
                .send(
                    "POST",
                    "/publish",
                    &[("Authorization", &auth)],
                    Some(body.as_bytes()),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            results.push(r.json());
        }
        results
    };
    let (a, b) = tokio::join!(ws_pub, rest_pub);
    let mut by_offset = std::collections::BTreeMap::new();
    for r in a.iter().chain(b.iter()) {
        let off = r["offset"].as_u64().expect("offset");
        let prev = by_offset.insert(off, r["id"].as_str().unwrap().to_string());
        assert!(prev.is_none(), "offset {off} assigned twice");
    }
    let offsets: Vec<u64> = by_offset.keys().copied().collect();
    assert_eq!(
        offsets,
        (1..=2 * per_source).collect::<Vec<_>>(),
        "contiguous offsets"
    );

    let mut first: Option<Vec<String>> = None;
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.await.expect("reader");
        for (k, (id, seq, offset)) in got.iter().enumerate() {
            assert_eq!(*seq, k as u64 + 1, "subscriber {i}: seq");
            assert_eq!(*offset, k as u64 + 1, "subscriber {i}: offset");
            assert_eq!(
                Some(id),
                by_offset.get(offset),
                "subscriber {i}: id at {offset}"
            );
        }
        let ids: Vec<String> = got.into_iter().map(|(id, _, _)| id).collect();
        match &first {
            None => first = Some(ids),
            Some(f) => assert_eq!(&ids, f, "subscriber {i} saw another order"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_order_for_every_subscriber_with_2_shards() {
    same_order_for_everyone(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_order_for_every_subscriber_with_3_shards() {
    same_order_for_everyone(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_subscribers_get_a_thousand_messages_each() {
    // The publisher pipelines its requests, so the rate limit is lifted for it.
    let s = Server::start(
        ServerOpts::shards(2)
            .env("BROADCASTER_LIMITS_REQUESTS_PER_SECOND", "1000000")
            .env("BROADCASTER_LIMITS_REQUEST_BURST", "1000000"),
    );
    let n_subs = 1000;
    let n_msgs = 1000u64;
    let started = Instant::now();
    let subs = subscribers(&s, "fan", n_subs, 50).await;
    eprintln!("{n_subs} subscribers ready in {:?}", started.elapsed());

    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                use futures_util::StreamExt;
                use tokio_tungstenite::tungstenite::Message;
                // A lean loop (one typed parse per frame): a thousand readers share two cores
                // with the server.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
                let mut next = 1u64;
                while next <= n_msgs {
                    let msg = match tokio::time::timeout_at(deadline, ws.stream.next()).await {
                        Ok(Some(Ok(m))) => m,
                        Ok(other) => return Err(format!("after {}: {other:?}", next - 1)),
                        Err(_) => return Err(format!("only {} of {n_msgs} arrived", next - 1)),
                    };
                    let Message::Text(text) = msg else { continue };
                    let p = parse_note(text.as_str());
                    if p.seq != next || p.offset != next {
                        return Err(format!(
                            "expected seq/offset {next}, got seq {} offset {}",
                            p.seq, p.offset
                        ));
                    }
                    next += 1;
                }
                // Nothing more than what was published.
                match ws.try_recv_text(Duration::from_millis(200)).await {
                    Ok(None) => Ok(ws),
                    Ok(Some(t)) => Err(format!("extra frame {t}")),
                    Err(e) => Err(format!("connection ended: {e:?}")),
                }
            })
        })
        .collect();

    // One WebSocket publisher sends every request before reading the answers, so the server
    // sees publications in bursts as a busy backend would send them.
    let mut publisher = s.ws_authed("publisher").await;
    {
        use futures_util::SinkExt;
        for i in 1..=n_msgs {
            let req = format!(
                r#"{{"id":{i},"method":"publish","params":{{"channel":"fan","event":"tick","payload":{{"i":{i}}}}}}}"#
            );
            within(
                T,
                "pipelined publish",
                publisher
                    .stream
                    .feed(tokio_tungstenite::tungstenite::Message::text(req)),
            )
            .await
            .expect("send publish");
        }
        within(T, "flush", publisher.stream.flush())
            .await
            .expect("flush");
    }
    for i in 1..=n_msgs {
        let resp = publisher.next_response().await;
        let r = ok_result(&resp, &json!(i));
        assert_eq!(
            r["offset"],
            json!(i),
            "publications sequenced in request order"
        );
    }
    eprintln!("published {n_msgs} in {:?}", started.elapsed());
    let mut failures = Vec::new();
    let mut ok = 0;
    for (i, r) in readers.into_iter().enumerate() {
        match r.await.expect("reader task") {
            Ok(_) => ok += 1,
            Err(e) => failures.push(format!("subscriber {i}: {e}")),
        }
    }
    eprintln!("delivered in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {n_subs} subscribers failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(ok, n_subs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_and_fast_subscribers_get_everything() {
    let s = Server::start(
        ServerOpts::shards(2).env("BROADCASTER_LIMITS_OUTBOUND_BUFFER_BYTES", "65536"),
    );
    let n_msgs = 400usize;
    let payload = format!("\"{}\"", "z".repeat(32 * 1024));

    // The slow one: subscribes, then never reads.
    let mut slow = RawWs::connect_small_rcvbuf(s.public, 4096).await;
    let r = slow
        .request(
            &json!({"id":1,"method":"auth","params":{"token": s.token_all("slow")}}).to_string(),
        )
        .await;
    ok_result(&r, &json!(1));
    let r = slow
        .request(r#"{"id":2,"method":"subscribe","params":{"channel":"firehose"}}"#)
        .await;
    ok_result(&r, &json!(2));

    let mut fast = s.ws_authed("fast").await;
    fast.subscribe("firehose").await;

    // The fast subscriber reads each publication before the next is sent, so it never lags
    // (a debug-build test client parsing 32 KiB frames could otherwise fall behind a burst and
    // rightly be cut off too); the slow one falls further behind with every publication.
    let started = Instant::now();
    let mut c = HttpConn::connect(s.public).await;
    let auth = format!("Bearer {API_KEY}");
    for k in 1..=n_msgs as u64 {
        let body = publish_body("firehose", "big", &payload);
        let r = c
            .send(
                "POST",
                "/publish",
                &[("Authorization", &auth)],
                Some(body.as_bytes()),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let p = parse_note(&fast.recv_broadcast_raw().await);
        assert_eq!((p.seq, p.offset), (k, k), "fast subscriber order");
        assert_eq!(json!(p.id), r.json()["id"]);
    }
    let publish_time = started.elapsed();
    assert!(
        publish_time < Duration::from_secs(20),
        "a slow consumer must not hold publishers back: {publish_time:?}"
    );
    fast.heartbeat_ok().await;

    // Now drain the slow socket: it must end (4003 when a close frame makes it through) before
    // it has seen every publication.
    let mut seen = 0usize;
    let end = loop {
        match slow.read_frame(Duration::from_secs(10)).await {
            Ok(f) if f.opcode == OP_TEXT => seen += 1,
            Ok(f) if f.opcode == OP_CLOSE => break RawEnd::Close(f.close_code()),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    eprintln!("slow consumer: {seen} of {n_msgs} received, then {end:?}");
    assert!(
        matches!(
            end,
            RawEnd::Close(Some(4003)) | RawEnd::Eof | RawEnd::Reset(_)
        ),
        "slow consumer ended with {end:?}"
    );
    assert!(
        seen < n_msgs,
        "the slow consumer was never cut off ({seen} received)"
    );

    let m = http_get(s.public, "/metrics").await;
    let slow_count = metric_sum(&m.text(), "slow_consumers_total");
    assert!(
        slow_count.is_some_and(|v| v >= 1.0),
        "slow_consumers_total = {slow_count:?}"
    );
}

// ----- history recovery -------------------------------------------------------------------

async fn publish_n(s: &Server, channel: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(s.publish(channel, "e", &format!("{{\"n\": {i}}}")).await);
    }
    out
}

#[tokio::test]
async fn recovery_delivers_exactly_the_missed_publications_first() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    let r = ws.subscribe("r").await;
    let epoch = r["epoch"].clone();
    publish_n(&s, "r", 2).await;
    assert_eq!(ws.recv_broadcast().await["offset"], json!(1));
    let last = ws.recv_broadcast().await;
    assert_eq!(last["offset"], json!(2));
    drop(ws);

    let missed = publish_n(&s, "r", 3).await;
    let mut ws = s.ws_authed("u").await;
    let r = ws
        .call(
            "subscribe",
            json!({"channel": "r", "since": {"offset": 2, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    assert_eq!(r["epoch"], epoch);
    assert_eq!(r["offset"], json!(5), "top offset at subscription: {r}");
    for (k, p) in missed.iter().enumerate() {
        let raw = ws.recv_broadcast_raw().await;
        assert!(
            raw.contains(&format!("{{\"n\": {k}}}")),
            "replayed payload kept raw: {raw}"
        );
        let b: Value = serde_json::from_str::<Value>(&raw).unwrap()["params"].clone();
        assert_eq!(b["offset"], json!(k + 3), "{b}");
        assert_eq!(
            b["seq"],
            json!(k + 1),
            "replayed publications count in seq: {b}"
        );
        assert_eq!(b["id"], p["id"]);
        assert_eq!(b["createTime"], p["createTime"]);
        assert_eq!(b["channel"], json!("r"));
    }
    let live = s.publish("r", "e", "\"live\"").await;
    let b = ws.recv_broadcast().await;
    assert_eq!(b["id"], live["id"]);
    assert_eq!(b["offset"], json!(6));
    assert_eq!(b["seq"], json!(4));

    // Recovering from the top: nothing to replay, still recovered.
    let mut ws2 = s.ws_authed("u2").await;
    let r = ws2
        .call(
            "subscribe",
            json!({"channel": "r", "since": {"offset": 6, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    let live = s.publish("r", "e", "7").await;
    let b = ws2.recv_broadcast().await;
    assert_eq!(b["id"], live["id"]);
    assert_eq!(b["seq"], json!(1));
    assert_eq!(b["offset"], json!(7));
}

#[tokio::test]
async fn recovery_fails_with_a_wrong_epoch_or_an_offset_above_the_top() {
    let s = Server::start(ServerOpts::default());
    let mut first = s.ws_authed("u").await;
    let epoch = first.subscribe("w").await["epoch"].clone();
    publish_n(&s, "w", 3).await;

    // Each case publishes one more, so offsets "above the top" are computed as we go.
    let mut top = 3u64;
    for case in 0..3 {
        let since = match case {
            0 => json!({"offset": 1, "epoch": "not-the-epoch"}),
            1 => json!({"offset": top + 1, "epoch": epoch}),
            _ => json!({"offset": top + 100, "epoch": epoch}),
        };
        let mut ws = s.ws_authed("u").await;
        let r = ws
            .call("subscribe", json!({"channel": "w", "since": since}))
            .await;
        assert_eq!(r["recovered"], json!(false), "since {since}: {r}");
        assert_eq!(r["offset"], json!(top));
        assert_eq!(r["epoch"], epoch, "the current epoch is returned");
        // Delivery starts with live publications.
        let live = s.publish("w", "e", "\"live\"").await;
        top += 1;
        let b = ws.recv_broadcast().await;
        assert_eq!(b["id"], live["id"], "no replay after recovered:false: {b}");
        assert_eq!(b["seq"], json!(1));
        assert_eq!(b["offset"], json!(top));
    }
}

#[tokio::test]
async fn recovery_fails_when_history_no_longer_holds_the_gap() {
    let s = Server::start(ServerOpts::default().env("BROADCASTER_HISTORY_SIZE", "5"));
    let mut first = s.ws_authed("u").await;
    let epoch = first.subscribe("small").await["epoch"].clone();
    publish_n(&s, "small", 10).await;
    let mut ws = s.ws_authed("u").await;
    let r = ws
        .call(
            "subscribe",
            json!({"channel": "small", "since": {"offset": 2, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["recovered"], json!(false), "{r}");
    let mut ws = s.ws_authed("u").await;
    let r = ws
        .call(
            "subscribe",
            json!({"channel": "small", "since": {"offset": 5, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["recovered"], json!(true), "offsets 6..10 are held: {r}");
    for k in 6..=10 {
        assert_eq!(ws.recv_broadcast().await["offset"], json!(k));
    }
    let h = http_get_key(s.public, "/history?channel=small", API_KEY).await;
    let offs: Vec<u64> = h.json()["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offs,
        vec![6, 7, 8, 9, 10],
        "history keeps the last history.size"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_during_concurrent_publishing_has_no_gap_and_no_duplicate() {
    let s = Server::start(ServerOpts::shards(2).env("BROADCASTER_HISTORY_SIZE", "1000"));
    let mut first = s.ws_authed("u").await;
    // `first` stays subscribed: a channel with no subscribers and no history may be forgotten
    // (and get a new epoch).
    let epoch = first.subscribe("busy").await["epoch"].clone();
    publish_n(&s, "busy", 20).await;

    let total = 300u64;
    let addr = s.public;
    let publisher = tokio::spawn(async move {
        let mut c = HttpConn::connect(addr).await;
        let auth = format!("Bearer {API_KEY}");
        for i in 20..total {
            let body = publish_body("busy", "e", &i.to_string());
            let r = c
                .send(
                    "POST",
                    "/publish",
                    &[("Authorization", &auth)],
                    Some(body.as_bytes()),
                )
                .await;
            assert_eq!(r.status, 200);
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut ws = s.ws_authed("u").await;
    let r = ws
        .call(
            "subscribe",
            json!({"channel": "busy", "since": {"offset": 10, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    publisher.await.expect("publisher");
    for k in 11..=total {
        let b = ws.recv_broadcast().await;
        assert_eq!(b["offset"], json!(k), "gap or duplicate: {b}");
        assert_eq!(b["seq"], json!(k - 10));
    }
    ws.expect_no_broadcast(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn history_expires_after_its_ttl() {
    let s = Server::start(ServerOpts::default().env("BROADCASTER_HISTORY_TTL", "1s"));
    let mut first = s.ws_authed("u").await;
    let epoch = first.subscribe("ttl").await["epoch"].clone();
    publish_n(&s, "ttl", 2).await;
    let h = http_get_key(s.public, "/history?channel=ttl", API_KEY).await;
    assert_eq!(h.json()["publications"].as_array().map(Vec::len), Some(2));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let h = http_get_key(s.public, "/history?channel=ttl", API_KEY).await;
    assert_eq!(h.status, 200);
    assert_eq!(
        h.json()["publications"],
        json!([]),
        "expired history is empty"
    );
    let mut ws = s.ws_authed("u").await;
    let r = ws
        .call(
            "subscribe",
            json!({"channel": "ttl", "since": {"offset": 0, "epoch": epoch}}),
        )
        .await;
    assert_eq!(
        r["recovered"],
        json!(false),
        "expired publications cannot be recovered: {r}"
    );
    assert_eq!(r["offset"], json!(2), "offsets survive expiry: {r}");
    let live = s.publish("ttl", "e", "3").await;
    assert_eq!(live["offset"], json!(3));
    let b = ws.recv_broadcast().await;
    assert_eq!(
        (b["seq"].clone(), b["offset"].clone()),
        (json!(1), json!(3))
    );
}
