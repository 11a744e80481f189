//! Server-sent events (SPEC 19) against the real server: a raw TCP reader that parses the event
//! stream itself (exact bytes, ids, order), and a real EventSource client from crates.io
//! (`eventsource-client`, which reconnects with `Last-Event-ID` on its own).

mod common;

use std::time::{Duration, Instant};

use common::sse::{bearer, positions, Opened, Sse};
use common::{http_post_key, metric_sum, within, Server, ServerOpts, TokenSpec, T};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

/// Public channels under `pub/`; everything else needs a token.
const RULES: &str = "[[channels]]\npattern = \"pub/*\"\naccess = \"public\"\n";

fn server(extra: &str) -> Server {
    Server::start(ServerOpts {
        config_toml: Some(format!("{RULES}{extra}")),
        ..ServerOpts::shards(2)
    })
}

#[tokio::test]
async fn events_come_in_order_with_every_channels_position() {
    let s = server("[sse]\nretry = \"1500ms\"\n");
    let token = s.token("ann", &["a", "b"], &["subscribe"]);
    let auth = bearer(&token);
    let mut sse = Sse::connect(
        s.public,
        "/sse?channel=a&channel=b",
        &[("Authorization", &auth)],
    )
    .await;
    assert!(sse.head.starts_with("HTTP/1.1 200"), "{}", sse.head);
    let header = |n| common::header_value(&sse.head, n);
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(header("x-accel-buffering").as_deref(), Some("no"));
    let first = sse.buf.starts_with(b"retry: 1500\n\n") || sse.buf.is_empty();
    assert!(first, "{:?}", String::from_utf8_lossy(&sse.buf));
    let (subscribed, replayed, opened_id) = sse.opening_with(&["a", "b"]).await;
    assert!(replayed.is_empty());
    for v in &subscribed {
        assert!(
            v["epoch"].is_string() && v["offset"].is_u64() && v["subscriptionId"].is_string(),
            "{v}"
        );
    }
    let epoch = |i: usize| subscribed[i]["epoch"].as_str().unwrap().to_string();
    assert_eq!(
        positions(&opened_id),
        [Some((epoch(0), 0)), Some((epoch(1), 0))]
    );
    let plan = [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)];
    for (channel, n) in plan {
        s.publish(
            channel,
            "e",
            &format!("{{\"n\":{n},\n \"c\":\"{channel}\"}}"),
        )
        .await;
    }
    // Each channel in its order (two channels may have two owner shards: no order between
    // them); each id holds every channel's position as of that event.
    let (mut a, mut b) = (0u64, 0u64);
    let mut next = [1u64, 1u64];
    for _ in plan {
        let (id, v) = sse.broadcast().await;
        let i = usize::from(v["channel"] == json!("b"));
        let channel = ["a", "b"][i];
        let n = next[i];
        next[i] += 1;
        assert_eq!(
            v["payload"],
            json!({"n": n, "c": channel}),
            "in order, as published"
        );
        assert!(
            v.get("method").is_none() && v.get("params").is_none(),
            "params only: {v}"
        );
        assert_eq!(v["seq"], json!(n), "seq per subscription");
        assert_eq!(v["offset"], json!(n), "offset per channel");
        if i == 0 {
            a = n;
        } else {
            b = n;
        }
        // Before a channel's first broadcast, its position is where it was subscribed (0).
        let want = vec![Some((epoch(0), a)), Some((epoch(1), b))];
        assert_eq!(positions(&id), want, "id {id}");
    }
    assert_eq!(next, [4, 3]);
}

#[tokio::test]
async fn last_event_id_resumes_every_channel() {
    let s = server("");
    let token = s.token("bo", &["r/*"], &["subscribe"]);
    let target = format!("/sse?channel=r/x&channel=r/y&token={token}");
    let mut sse = Sse::connect(s.public, &target, &[]).await;
    sse.opening(&["r/x", "r/y"]).await;
    s.publish("r/x", "e", "1").await;
    s.publish("r/y", "e", "2").await;
    sse.broadcast().await;
    let (last_id, _) = sse.broadcast().await;
    drop(sse);
    // Missed while away, on both channels.
    for (channel, n) in [("r/y", 3), ("r/x", 4), ("r/x", 5), ("r/y", 6)] {
        s.publish(channel, "e", &n.to_string()).await;
    }
    let mut sse = Sse::connect(s.public, &target, &[("Last-Event-ID", &last_id)]).await;
    let (results, replayed, _) = sse.opening_with(&["r/x", "r/y"]).await;
    for r in &results {
        assert_eq!(r["recovered"], json!(true), "{r}");
    }
    let got: Vec<(String, u64)> = replayed
        .iter()
        .map(|v| {
            let channel = v["channel"].as_str().unwrap().to_string();
            (channel, v["payload"].as_u64().unwrap())
        })
        .collect();
    // Per channel in order (channels are independent streams).
    let on = |c: &str| {
        got.iter()
            .filter(|(ch, _)| ch == c)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
    };
    assert_eq!(on("r/x"), [4, 5]);
    assert_eq!(on("r/y"), [3, 6]);
    s.publish("r/x", "e", "7").await;
    let (id, v) = sse.broadcast().await;
    assert_eq!(v["payload"], json!(7), "then live, no duplicate");
    assert_eq!(
        positions(&id)[0].as_ref().unwrap().1,
        v["offset"].as_u64().unwrap()
    );

    // An unknown epoch is not recovered; nor is an id that does not decode (and the stream
    // still opens: a 400 would stop an EventSource for good).
    for bad in ["ffff.1_ffff.1", "garbage", "e.1_f.2_g.3"] {
        let mut sse = Sse::connect(s.public, &target, &[("Last-Event-ID", bad)]).await;
        for r in sse.opening(&["r/x", "r/y"]).await {
            assert_eq!(r["recovered"], json!(false), "{bad}: {r}");
        }
    }
}

#[tokio::test]
async fn public_channels_need_no_token_and_refusals_come_before_the_stream() {
    let s = server("[sse]\nchannels_max = 3\n");
    let mut sse = Sse::connect(s.public, "/sse?channel=pub/news", &[]).await;
    sse.opening(&["pub/news"]).await;
    s.publish("pub/news", "e", "{\"hi\":1}").await;
    assert_eq!(sse.broadcast().await.1["payload"], json!({"hi": 1}));
    // GET /ws asking for an event stream, without Upgrade, is one too.
    let mut sse = Sse::connect(s.public, "/ws?channel=pub/news", &[]).await;
    sse.opening(&["pub/news"]).await;

    let refused = |target: String, headers: Vec<(&'static str, String)>| {
        let addr = s.public;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            match Sse::open(addr, &target, &h).await {
                Opened::Refused(status, body) => (status, body["error"]["code"].clone()),
                Opened::Stream(_) => panic!("{target} was not refused"),
            }
        }
    };
    let no_channels = refused("/sse".into(), vec![]).await;
    assert_eq!(no_channels, (400, json!("InvalidArgument")));
    let many = refused(
        "/sse?channel=pub/1&channel=pub/2&channel=pub/3&channel=pub/4".into(),
        vec![],
    )
    .await;
    assert_eq!(many, (400, json!("InvalidArgument")));
    let twice = refused("/sse?channel=pub/1&channel=pub/1".into(), vec![]).await;
    assert_eq!(twice, (400, json!("InvalidArgument")));
    let bad_name = refused("/sse?channel=a%20b".into(), vec![]).await;
    assert_eq!(bad_name, (400, json!("InvalidArgument")));
    // A token channel without a token, or with a bad one: 401.
    let anonymous = refused("/sse?channel=secret".into(), vec![]).await;
    assert_eq!(anonymous, (401, json!("Unauthenticated")));
    let forged = TokenSpec::new("another-secret", "eve")
        .channels(&["*"])
        .scope(&["subscribe"])
        .mint();
    let bad = refused(format!("/sse?channel=secret&token={forged}"), vec![]).await;
    assert_eq!(bad, (401, json!("Unauthenticated")));
    let expired = TokenSpec::new(&s.secret, "old")
        .channels(&["*"])
        .scope(&["subscribe"])
        .exp_in(-60)
        .mint();
    let old = refused(
        "/sse?channel=secret".into(),
        vec![("Authorization", bearer(&expired))],
    )
    .await;
    assert_eq!(old, (401, json!("Unauthenticated")));
    // A valid token without the channel, or without the subscribe scope: 403.
    let other = s.token("cy", &["elsewhere"], &["subscribe"]);
    let denied = refused(
        "/sse?channel=secret".into(),
        vec![("Authorization", bearer(&other))],
    )
    .await;
    assert_eq!(denied, (403, json!("PermissionDenied")));
    let publisher = s.token("cy", &["secret"], &["publish"]);
    let denied = refused(format!("/sse?channel=secret&token={publisher}"), vec![]).await;
    assert_eq!(denied, (403, json!("PermissionDenied")));

    // The query token works, and no token is ever logged.
    let token = s.token("dee", &["secret"], &["subscribe"]);
    let mut sse = Sse::connect(s.public, &format!("/sse?token={token}&channel=secret"), &[]).await;
    sse.opening(&["secret"]).await;
    let text = common::http_get(s.backend(), "/metrics").await.text();
    let sse_gauge = text
        .lines()
        .filter(|l| l.starts_with("connections_active{") && l.contains("transport=\"sse\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum::<f64>();
    assert!(
        sse_gauge >= 1.0,
        "connections_active{{transport=\"sse\"}}: {text}"
    );
    assert!(!s.stderr().contains(&token), "a token was logged");
    assert!(!s.stderr().contains(&forged), "a token was logged");
}

#[tokio::test]
async fn pings_flow_and_the_token_expiry_closes_4002() {
    let s = server("[limits]\nping_interval = \"300ms\"\n");
    let token = TokenSpec::new(&s.secret, "fay")
        .channels(&["t"])
        .scope(&["subscribe"])
        .exp_in(2)
        .mint();
    let mut sse = Sse::connect(s.public, &format!("/sse?channel=t&token={token}"), &[]).await;
    sse.opening(&["t"]).await;
    let ping = sse
        .next_within(Duration::from_secs(2))
        .await
        .expect("a ping");
    assert_eq!(ping.comment.as_deref(), Some("ping"), "{ping:?}");
    let started = Instant::now();
    let close = loop {
        let e = sse
            .next_within(Duration::from_secs(5))
            .await
            .expect("a close event before the end");
        if e.comment.is_none() {
            break e;
        }
    };
    assert_eq!(close.event, "close");
    assert_eq!(close.json(), json!({"code": 4002}));
    assert!(
        sse.next_within(T).await.is_none(),
        "the stream ends after close"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn a_reader_that_stops_is_cut_off_and_the_others_are_not() {
    let s = server(
        "[limits]\nmax_frame_bytes = 16384\nmax_payload_bytes = 16384\noutbound_buffer_bytes = 32768\n",
    );
    let slow_sock = tokio::net::TcpSocket::new_v4().unwrap();
    slow_sock.set_recv_buffer_size(4096).unwrap();
    let slow_tcp = slow_sock.connect(s.public).await.unwrap();
    let Opened::Stream(mut slow) =
        Sse::open_on(slow_tcp, s.public, "/sse?channel=pub/flood", &[]).await
    else {
        panic!("refused");
    };
    slow.opening(&["pub/flood"]).await;
    let mut good = Sse::connect(s.public, "/sse?channel=pub/flood", &[]).await;
    good.opening(&["pub/flood"]).await;
    let payload = format!("\"{}\"", "x".repeat(6000));
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A few at a time: the good reader reads between, so its queue stays under the bound.
        for _ in 0..3 {
            s.publish("pub/flood", "e", &payload).await;
            sent += 1;
        }
        // The good reader keeps up, every message in order.
        while good_seen(&mut good, sent).await {}
        let text = common::http_get(s.backend(), "/metrics").await.text();
        if metric_sum(&text, "slow_consumers_total") >= Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slow consumer after {sent} publications"
        );
    }
    // The stopped reader, reading again, finds its stream ended: its queue was dropped (the
    // close event after it is best effort, SPEC 13.16), so it got far fewer than were sent.
    let mut rest = std::mem::take(&mut slow.buf);
    // Ended within T (a reset is an end too; what came before it is kept).
    let _ = within(
        T,
        "the slow reader's end of stream",
        slow.stream.read_to_end(&mut rest),
    )
    .await;
    let text = String::from_utf8_lossy(&rest);
    let events = text.matches("event: broadcast\n").count() as u64;
    assert!(events < sent, "{events} of {sent}");
    if text.contains("event: close\n") {
        assert!(
            text.ends_with("event: close\ndata: {\"code\":4003}\n\n"),
            "{}",
            common::last_chars(&text, 200)
        );
    }
    s.publish("pub/flood", "e", "\"after\"").await;
    loop {
        let (_, v) = good.broadcast().await;
        if v["payload"] == json!("after") {
            break;
        }
    }
}

/// The next event of an `eventsource-client` stream (its connects, comments and the errors it
/// reconnects after skipped).
async fn next_event<S>(stream: &mut S) -> eventsource_client::Event
where
    S: futures_util::Stream<Item = Result<eventsource_client::SSE, eventsource_client::Error>>
        + Unpin,
{
    use eventsource_client::SSE;
    loop {
        match within(T, "an event from eventsource-client", stream.next()).await {
            Some(Ok(SSE::Event(e))) => return e,
            Some(Ok(_)) => continue,
            // A stream the server ended is an error item; the client reconnects by itself.
            Some(Err(_)) => continue,
            None => panic!("the client gave up"),
        }
    }
}

/// Reads broadcasts until the good reader has seen `sent`; false once it has.
async fn good_seen(good: &mut Sse, sent: u64) -> bool {
    let (_, v) = good.broadcast().await;
    let seq = v["seq"].as_u64().unwrap();
    seq < sent
}

/// A real EventSource client: it reconnects by itself after the server closes the stream
/// (`/disconnect`), sends `Last-Event-ID`, and gets what it missed, once each, in order.
#[tokio::test]
async fn a_real_eventsource_client_resumes_after_a_server_close() {
    use eventsource_client::{Client, ClientBuilder, ReconnectOptions};
    let s = server("[sse]\nretry = \"300ms\"\n");
    let token = s.token("gil", &["live/*"], &["subscribe"]);
    let url = format!("http://{}/sse?channel=live/a&channel=live/b", s.public);
    let transport = launchdarkly_sdk_transport::HyperTransport::builder()
        .build_http()
        .expect("an HTTP transport");
    let client = ClientBuilder::for_url(&url)
        .unwrap()
        .header("Authorization", &bearer(&token))
        .unwrap()
        .reconnect(
            ReconnectOptions::reconnect(true)
                .delay(Duration::from_millis(700))
                .retry_initial(false)
                .build(),
        )
        .build_with_transport(transport);
    let mut stream = client.stream();
    let mut subscribed: Vec<Value> = Vec::new();
    let mut payloads: Vec<(String, u64)> = Vec::new();
    let mut closes: Vec<Value> = Vec::new();
    let mut record = |e: eventsource_client::Event| {
        let v: Value = serde_json::from_str(&e.data).unwrap();
        match e.event_type.as_str() {
            "subscribed" => subscribed.push(v),
            "broadcast" => payloads.push((
                v["channel"].as_str().unwrap().into(),
                v["payload"].as_u64().unwrap(),
            )),
            "close" => closes.push(v),
            other => panic!("unexpected event {other}"),
        }
    };
    for _ in 0..2 {
        record(next_event(&mut stream).await);
    }
    for (i, channel) in ["live/a", "live/b", "live/a"].iter().enumerate() {
        s.publish(channel, "e", &i.to_string()).await;
    }
    for _ in 0..3 {
        record(next_event(&mut stream).await);
    }
    let r = http_post_key(
        s.backend(),
        "/disconnect",
        &s.api_key,
        &json!({"user": "gil"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Published while the client is away (it waits 700 ms before reconnecting).
    for (i, channel) in ["live/b", "live/a", "live/b"].iter().enumerate() {
        s.publish(channel, "e", &(10 + i).to_string()).await;
    }
    // The close event, two subscribed, three missed; then one live.
    for _ in 0..6 {
        record(next_event(&mut stream).await);
    }
    s.publish("live/a", "e", "20").await;
    record(next_event(&mut stream).await);
    assert_eq!(closes, [json!({"code": 4006})]);
    assert_eq!(subscribed.len(), 4);
    for r in &subscribed[2..] {
        assert_eq!(r["recovered"], json!(true), "{r}");
    }
    let on = |c: &str| {
        payloads
            .iter()
            .filter(|(ch, _)| ch == c)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
    };
    assert_eq!(on("live/a"), [0, 2, 11, 20], "{payloads:?}");
    assert_eq!(on("live/b"), [1, 10, 12], "{payloads:?}");
}

/// A drain (SIGTERM) ends an event stream as it ends a WebSocket: `close` with 1001 after what
/// was queued, then the end of the stream, and the server exits 0.
#[tokio::test]
async fn shutdown_closes_streams_with_1001() {
    let mut s = server("");
    let mut sse = Sse::connect(s.public, "/sse?channel=pub/last", &[]).await;
    sse.opening(&["pub/last"]).await;
    s.publish("pub/last", "e", "1").await;
    assert_eq!(sse.broadcast().await.1["payload"], json!(1));
    s.signal(libc::SIGTERM);
    let close = sse.event().await;
    assert_eq!(
        (close.event.as_str(), close.json()),
        ("close", json!({"code": 1001}))
    );
    assert!(
        sse.next_within(T).await.is_none(),
        "the stream ends after close"
    );
    assert!(s.wait_exit(Duration::from_secs(10)).await.success());
}

/// A stream whose reader stalls with the queue under its bound is ended by `write_timeout`,
/// as a WebSocket is.
#[tokio::test]
async fn a_stalled_stream_ends_at_the_write_timeout() {
    let s = server("[limits]\nwrite_timeout = \"500ms\"\n");
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(s.public).await.unwrap();
    let Opened::Stream(mut stalled) = Sse::open_on(tcp, s.public, "/sse?channel=pub/s", &[]).await
    else {
        panic!("refused");
    };
    stalled.opening(&["pub/s"]).await;
    let payload = format!("\"{}\"", "y".repeat(8000));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // 80 KB per 100 ms: the socket fills, and the queue grows far slower than the
        // timeout lets it reach outbound_buffer_bytes (1 MiB).
        for _ in 0..10 {
            s.publish("pub/s", "e", &payload).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = common::http_get(s.backend(), "/metrics").await.text();
        if metric_sum(&text, "write_timeouts_total") >= Some(1.0) {
            assert_eq!(metric_sum(&text, "slow_consumers_total"), Some(0.0));
            break;
        }
        assert!(Instant::now() < deadline, "no write timeout");
    }
    let mut rest = std::mem::take(&mut stalled.buf);
    // Ended within T (a reset is an end too; what came before it is kept).
    let _ = within(
        T,
        "the stalled stream's end",
        stalled.stream.read_to_end(&mut rest),
    )
    .await;
}
