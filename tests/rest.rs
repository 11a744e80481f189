//! The REST API of SPEC section 3 and 13.9-13.14: status codes, JSON shapes, API keys,
//! HTTP limits, the admin listener and the connection limit.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test]
async fn publish_returns_200_with_id_create_time_and_offset() {
    let s = Server::start(ServerOpts::default());
    let mut sub = s.ws_authed("u").await;
    sub.subscribe("orders").await;
    let r = http_post_key(
        s.public,
        "/publish",
        API_KEY,
        r#"{"channel":"orders","event":"created","payload":{"n":1}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.contains("application/json")),
        "JSON content type: {}",
        r.head
    );
    let v = r.json();
    assert!(v["id"].as_str().is_some_and(|x| !x.is_empty()), "{v}");
    assert!(v["createTime"].as_str().is_some_and(is_rfc3339_utc), "{v}");
    assert_eq!(v["offset"], json!(1), "{v}");
    let b = sub.recv_broadcast().await;
    assert_eq!(b["id"], v["id"]);
    assert_eq!(b["createTime"], v["createTime"]);
    assert_eq!(b["event"], json!("created"));
    assert_eq!(b["payload"], json!({"n": 1}));

    let r2 = s.publish("orders", "created", "2").await;
    assert_eq!(r2["offset"], json!(2));
}

#[tokio::test]
async fn api_keys_every_configured_key_works_and_others_are_401() {
    let s = Server::start(ServerOpts::default());
    let body = r#"{"channel":"k","event":"e","payload":1}"#;
    for (i, key) in [API_KEY, API_KEY_2].iter().enumerate() {
        let r = http_post_key(s.public, "/publish", key, body).await;
        assert_eq!(r.status, 200, "key {key}: {}", r.text());
        assert_eq!(r.json()["offset"], json!(i + 1));
    }
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("Authorization", bearer("wrong-key"))],
        vec![("Authorization", bearer(""))],
        vec![("Authorization", format!("Basic {API_KEY}"))],
        vec![("Authorization", API_KEY.to_string())],
        vec![("Authorization", bearer(&format!("{API_KEY}x")))],
        vec![("Authorization", bearer(&API_KEY[..API_KEY.len() - 1]))],
    ];
    for headers in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = http_request(s.public, "POST", "/publish", &h, Some(body.as_bytes())).await;
        r.assert_error(401, "Unauthenticated");
        for path in ["/history?channel=k", "/channels"] {
            let r = http_request(s.public, "GET", path, &h, None).await;
            r.assert_error(401, "Unauthenticated");
        }
        let r = http_request(
            s.public,
            "POST",
            "/broadcast",
            &h,
            Some(br#"{"channels":["k"],"event":"e","payload":1}"#),
        )
        .await;
        r.assert_error(401, "Unauthenticated");
    }
    // Nothing was published by the rejected requests.
    let h = http_get_key(s.public, "/history?channel=k", API_KEY).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["offset"], json!(2));
}

#[tokio::test]
async fn publish_bad_input_is_400_invalid_argument() {
    let s = Server::start(ServerOpts::default());
    let long_event = format!(
        r#"{{"channel":"c","event":"{}","payload":1}}"#,
        "e".repeat(129)
    );
    let bodies: Vec<String> = vec![
        "not json".into(),
        "{\"channel\":".into(),
        "[1,2]".into(),
        "\"str\"".into(),
        "".into(),
        r#"{"event":"e","payload":1}"#.into(),
        r#"{"channel":"c","payload":1}"#.into(),
        r#"{"channel":"c","event":"","payload":1}"#.into(),
        r#"{"channel":"c","event":5,"payload":1}"#.into(),
        r#"{"channel":"a b","event":"e","payload":1}"#.into(),
        r#"{"channel":"","event":"e","payload":1}"#.into(),
        r#"{"channel":"a*","event":"e","payload":1}"#.into(),
        "{\"channel\":\"a\u{3000}b\",\"event\":\"e\",\"payload\":1}".into(),
        format!(
            r#"{{"channel":"{}","event":"e","payload":1}}"#,
            "c".repeat(256)
        ),
        r#"{"channel":7,"event":"e","payload":1}"#.into(),
        long_event,
    ];
    for body in &bodies {
        let r = http_post_key(s.public, "/publish", API_KEY, body).await;
        assert_eq!(r.status, 400, "body {body:?} answered {}", r.text());
        r.assert_error(400, "InvalidArgument");
    }
    // The connection-level state is fine afterwards.
    let ok = s.publish("c", "e", "1").await;
    assert_eq!(ok["offset"], json!(1));
}

#[tokio::test]
async fn payload_too_large_is_413_resource_exhausted() {
    let s =
        Server::start(ServerOpts::default().env("BROADCASTER_LIMITS_MAX_PAYLOAD_BYTES", "1000"));
    let exact = format!("\"{}\"", "x".repeat(998));
    let over = format!("\"{}\"", "x".repeat(999));
    let r = http_post_key(
        s.public,
        "/publish",
        API_KEY,
        &publish_body("c", "e", &exact),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http_post_key(
        s.public,
        "/publish",
        API_KEY,
        &publish_body("c", "e", &over),
    )
    .await;
    r.assert_error(413, "ResourceExhausted");
    // A body far over every limit.
    let huge = format!("\"{}\"", "y".repeat(200_000));
    let r = http_post_key(
        s.public,
        "/publish",
        API_KEY,
        &publish_body("c", "e", &huge),
    )
    .await;
    r.assert_error(413, "ResourceExhausted");
    // Nothing over the limit was published.
    let h = http_get_key(s.public, "/history?channel=c", API_KEY).await;
    assert_eq!(h.json()["offset"], json!(1));
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_is_405() {
    let s = Server::start(ServerOpts::default());
    for (method, path) in [
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("GET", "/publish/extra"),
        ("GET", "/wss"),
    ] {
        let r = http_request(
            s.public,
            method,
            path,
            &[("Authorization", &bearer(API_KEY))],
            None,
        )
        .await;
        r.assert_error(404, "NotFound");
    }
    for (method, path) in [
        ("GET", "/publish"),
        ("PUT", "/publish"),
        ("GET", "/broadcast"),
        ("POST", "/history?channel=a"),
        ("DELETE", "/channels"),
        ("POST", "/health"),
    ] {
        let r = http_request(
            s.public,
            method,
            path,
            &[("Authorization", &bearer(API_KEY))],
            Some(b"{}"),
        )
        .await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        r.assert_error(405, "InvalidArgument");
    }
}

#[tokio::test]
async fn broadcast_results_in_request_order() {
    let s = Server::start(ServerOpts::default());
    let mut sub = s.ws_authed("u").await;
    sub.subscribe("b").await;
    s.publish("b", "e", "0").await;
    let _ = sub.recv_broadcast().await;

    let r = http_post_key(
        s.public,
        "/broadcast",
        API_KEY,
        r#"{"channels":["c","b","a"],"event":"multi","payload":{"v":[1, 2]}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let results = v["results"].as_array().expect("results array");
    assert_eq!(results.len(), 3, "{v}");
    let channels: Vec<&Value> = results.iter().map(|x| &x["channel"]).collect();
    assert_eq!(channels, vec![&json!("c"), &json!("b"), &json!("a")]);
    let offsets: Vec<&Value> = results.iter().map(|x| &x["offset"]).collect();
    assert_eq!(offsets, vec![&json!(1), &json!(2), &json!(1)]);
    for x in results {
        assert!(x["id"].as_str().is_some_and(|i| !i.is_empty()), "{x}");
    }
    let raw = sub.recv_broadcast_raw().await;
    assert!(
        raw.contains(r#"{"v":[1, 2]}"#),
        "payload relayed raw: {raw}"
    );
    let b: Value = serde_json::from_str::<Value>(&raw).unwrap()["params"].clone();
    assert_eq!(b["id"], results[1]["id"]);
    assert_eq!(b["offset"], json!(2));
    assert_eq!(b["event"], json!("multi"));
}

#[tokio::test]
async fn broadcast_with_any_invalid_channel_is_400_and_publishes_nothing() {
    let s = Server::start(ServerOpts::default());
    for body in [
        r#"{"channels":["ok","bad name"],"event":"e","payload":1}"#,
        r#"{"channels":["ok",""],"event":"e","payload":1}"#,
        r#"{"channels":["ok",5],"event":"e","payload":1}"#,
        r#"{"channels":"ok","event":"e","payload":1}"#,
        r#"{"channels":["ok"],"payload":1}"#,
    ] {
        let r = http_post_key(s.public, "/broadcast", API_KEY, body).await;
        r.assert_error(400, "InvalidArgument");
    }
    let h = http_get_key(s.public, "/history?channel=ok", API_KEY).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["publications"], json!([]), "nothing published");
}

#[tokio::test]
async fn health_is_200_ok_without_a_key() {
    let s = Server::start(ServerOpts::default());
    let r = http_get(s.public, "/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn metrics_need_no_key_and_carry_the_seed_names() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    ws.subscribe("m").await;
    s.publish("m", "e", "1").await;
    ws.recv_broadcast().await;
    let r = http_get(s.public, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert_eq!(metric_sum(&text, "connections_active"), Some(1.0), "{text}");
    assert_eq!(
        metric_sum(&text, "subscriptions_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "messages_sent_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "messages_received_total"),
        Some(1.0),
        "{text}"
    );
    for name in [
        "publish_to_write_seconds",
        "slow_consumers_total",
        "auth_failures_total",
    ] {
        assert!(text.contains(name), "metric {name} missing:\n{text}");
    }
}

#[tokio::test]
async fn history_shape_order_and_limit() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    let sr = ws.subscribe("h").await;
    let mut published = Vec::new();
    for (i, payload) in [r#"{"a": 1}"#, "\"two\"", "[3]"].iter().enumerate() {
        let p = s.publish("h", &format!("ev{i}"), payload).await;
        published.push((p, *payload));
    }
    let r = http_get_key(s.public, "/history?channel=h", API_KEY).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["offset"], json!(3), "{v}");
    assert_eq!(v["epoch"], sr["epoch"], "same epoch as subscribe: {v}");
    let pubs = v["publications"].as_array().expect("publications array");
    assert_eq!(pubs.len(), 3, "{v}");
    for (i, (item, (p, payload))) in pubs.iter().zip(&published).enumerate() {
        assert_eq!(item["id"], p["id"], "{item}");
        assert_eq!(item["offset"], json!(i + 1), "oldest first: {v}");
        assert_eq!(item["createTime"], p["createTime"]);
        assert_eq!(item["event"], json!(format!("ev{i}")));
        let expected: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(item["payload"], expected);
    }
    assert!(
        r.text().contains(r#"{"a": 1}"#),
        "payload kept raw in history: {}",
        r.text()
    );

    let r = http_get_key(s.public, "/history?channel=h&limit=2", API_KEY).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let offsets: Vec<&Value> = v["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["offset"])
        .collect();
    assert_eq!(
        offsets,
        vec![&json!(2), &json!(3)],
        "the latest 2, oldest first"
    );
    assert_eq!(v["offset"], json!(3));

    let r = http_get_key(s.public, "/history?channel=never-used", API_KEY).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["publications"], json!([]));

    for bad in [
        "/history",
        "/history?limit=2",
        "/history?channel=h&limit=abc",
        "/history?channel=a%20b",
    ] {
        let r = http_get_key(s.public, bad, API_KEY).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        r.assert_error(400, "InvalidArgument");
    }
}

#[tokio::test]
async fn channels_lists_subscriber_counts() {
    let s = Server::start(ServerOpts::default());
    let mut a1 = s.ws_authed("a1").await;
    let mut a2 = s.ws_authed("a2").await;
    let mut b1 = s.ws_authed("b1").await;
    a1.subscribe("x").await;
    a2.subscribe("x").await;
    b1.subscribe("y").await;
    let counts = |v: &Value| -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = v["channels"]
            .as_array()
            .unwrap_or_else(|| panic!("channels array in {v}"))
            .iter()
            .map(|c| {
                (
                    c["channel"].as_str().unwrap().to_string(),
                    c["subscribers"].as_u64().unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let r = http_get_key(s.public, "/channels", API_KEY).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        counts(&r.json()),
        vec![("x".to_string(), 2), ("y".to_string(), 1)]
    );
    a2.call("unsubscribe", json!({"channel": "x"})).await;
    drop(b1);
    let deadline = Instant::now() + T;
    loop {
        let r = http_get_key(s.public, "/channels", API_KEY).await;
        let c = counts(&r.json());
        if c == vec![("x".to_string(), 1)] {
            break;
        }
        assert!(Instant::now() < deadline, "channels did not update: {c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let s = Server::start(ServerOpts::default());
    let mut c = HttpConn::connect(s.public).await;
    for _ in 0..2 {
        let r = c.send("GET", "/health", &[], None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), json!({"status": "ok"}));
    }
    let auth = bearer(API_KEY);
    for i in 1..=3 {
        let body = publish_body("ka", "e", &i.to_string());
        let r = c
            .send(
                "POST",
                "/publish",
                &[("Authorization", &auth)],
                Some(body.as_bytes()),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["offset"], json!(i));
    }
    // An error answer keeps the connection too.
    let r = c.send("GET", "/nope", &[], None).await;
    assert_eq!(r.status, 404);
    let r = c.send("GET", "/health", &[], None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn oversized_http_head_is_431() {
    let s =
        Server::start(ServerOpts::default().env("BROADCASTER_LIMITS_HTTP_HEAD_BYTES_MAX", "1024"));
    let mut c = HttpConn::connect(s.public).await;
    let big = "v".repeat(2000);
    let r = c.send("GET", "/health", &[("X-Big", &big)], None).await;
    assert_eq!(r.status, 431, "{}", r.head);
    // A head under the limit is fine.
    let r = http_request(s.public, "GET", "/health", &[("X-Small", "v")], None).await;
    assert_eq!(r.status, 200);
    // A complete but invalid head gets a 4xx and the connection is closed.
    let mut c = HttpConn::connect(s.public).await;
    c.stream
        .write_all(b"THIS IS NOT HTTP\r\n\r\n")
        .await
        .unwrap();
    let r = c.read_response().await;
    assert!(
        (400..500).contains(&r.status),
        "invalid head answered {}",
        r.status
    );
    assert!(
        c.closed_within(T).await,
        "connection closed after an invalid head"
    );
}

#[tokio::test]
async fn incomplete_http_head_is_dropped_after_the_head_timeout() {
    let s = Server::start(ServerOpts::default().env("BROADCASTER_LIMITS_HTTP_HEAD_TIMEOUT", "1s"));
    let mut c = HttpConn::connect(s.public).await;
    let start = Instant::now();
    c.stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        c.closed_within(Duration::from_secs(4)).await,
        "connection not dropped"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "dropped too early: {:?}",
        start.elapsed()
    );
    // A silent connection (nothing sent at all) is dropped too.
    let mut c = HttpConn::connect(s.public).await;
    assert!(
        c.closed_within(Duration::from_secs(4)).await,
        "silent connection not dropped"
    );
}

#[tokio::test]
async fn admin_listen_moves_backend_endpoints() {
    let s = Server::start(ServerOpts {
        admin: true,
        ..Default::default()
    });
    let admin = s.admin.expect("admin address");
    assert_ne!(admin, s.public);
    let body = r#"{"channel":"adm","event":"e","payload":1}"#;
    let auth = bearer(API_KEY);
    // Public: backend endpoints are 404.
    for (method, path, body) in [
        ("POST", "/publish", Some(body)),
        (
            "POST",
            "/broadcast",
            Some(r#"{"channels":["adm"],"event":"e","payload":1}"#),
        ),
        ("GET", "/history?channel=adm", None),
        ("GET", "/channels", None),
        ("GET", "/metrics", None),
    ] {
        let r = http_request(
            s.public,
            method,
            path,
            &[("Authorization", &auth)],
            body.map(|b| b.as_bytes()),
        )
        .await;
        r.assert_error(404, "NotFound");
    }
    // Admin serves them.
    let r = http_post_key(admin, "/publish", API_KEY, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["offset"], json!(1));
    let r = http_get_key(admin, "/history?channel=adm", API_KEY).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["offset"], json!(1));
    assert_eq!(http_get_key(admin, "/channels", API_KEY).await.status, 200);
    assert_eq!(http_get(admin, "/metrics").await.status, 200);
    // /health on both.
    for addr in [s.public, admin] {
        let r = http_get(addr, "/health").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), json!({"status": "ok"}));
    }
    // WebSocket stays public, and sees admin publications.
    let mut ws = s.ws_authed("u").await;
    ws.subscribe("adm").await;
    let p = s.publish("adm", "e", "2").await;
    assert_eq!(ws.recv_broadcast().await["id"], p["id"]);
}

#[tokio::test]
async fn websocket_connections_over_max_connections_get_503() {
    let s = Server::start(ServerOpts::default().env("BROADCASTER_LIMITS_MAX_CONNECTIONS", "3"));
    let mut held = Vec::new();
    for _ in 0..3 {
        // Unauthenticated connections count too.
        held.push(Ws::connect(s.public).await);
    }
    for _ in 0..2 {
        match Ws::try_connect(s.public).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 503)
            }
            Err(e) => panic!("expected HTTP 503, got {e}"),
            Ok(_) => panic!("a 4th connection was accepted with max_connections = 3"),
        }
    }
    // Plain HTTP still works at the limit.
    assert_eq!(http_get(s.public, "/health").await.status, 200);
    // Freeing one makes room again.
    let mut first = held.remove(0);
    let _ = first.stream.close(None).await;
    drop(first);
    let deadline = Instant::now() + T;
    loop {
        match Ws::try_connect(s.public).await {
            Ok(mut ws) => {
                ws.heartbeat_ok().await;
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no room after a close: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A publish is answered once its shard wrote the publication to that shard's subscribers: when
/// the answer arrives, every subscriber's socket already holds the broadcast. (Answered before
/// the write, a publisher waiting for its answers sends its next publication into a queue behind
/// the running fan-out, where it waits a whole pass.)
#[tokio::test]
async fn publish_is_answered_after_the_fan_out_was_written() {
    let s = Server::start(ServerOpts::shards(1));
    let token = s.token_all("u");
    let mut subs = Vec::new();
    for _ in 0..300 {
        let mut ws = RawWs::connect(s.public).await;
        let a = ws
            .request(&json!({"id":1,"method":"auth","params":{"token":token}}).to_string())
            .await;
        assert_eq!(a["result"]["success"], json!(true), "{a}");
        let r = ws
            .request(r#"{"id":2,"method":"subscribe","params":{"channel":"wide"}}"#)
            .await;
        assert!(r.get("result").is_some(), "{r}");
        subs.push(ws);
    }
    s.publish("wide", "e", r#"{"n":1}"#).await;
    // The last subscribers are written last: looked at first.
    for (i, ws) in subs.into_iter().enumerate().rev() {
        let sock = ws.stream.into_std().expect("std socket");
        let mut b = [0u8; 1];
        match sock.peek(&mut b) {
            Ok(n) if n > 0 => {}
            other => panic!("subscriber {i} had nothing when the publish was answered: {other:?}"),
        }
    }
}

/// Pipelined requests are answered in order, together once the last one in the buffer is done;
/// a next request that has not fully arrived does not hold back the answers before it.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_a_partial_one_holds_nothing_back() {
    let s = Server::start(ServerOpts::default());
    let mut c = HttpConn::connect(s.public).await;
    let request = |i: usize| {
        let body = publish_body("pipe", "e", &i.to_string());
        format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut burst: String = (1..=5).map(request).collect();
    burst.push_str("GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    c.stream.write_all(burst.as_bytes()).await.unwrap();
    for i in 1..=5 {
        let r = c.read_response().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["offset"], json!(i));
    }
    assert_eq!(c.read_response().await.json(), json!({"status": "ok"}));
    // One whole request and part of the next, cut in its head, then in its body: the whole one
    // is answered while the rest is still arriving.
    for (n, cut) in [(6, 20), (8, request(9).len() - 3)] {
        let next = request(n + 1);
        let partial = format!("{}{}", request(n), &next[..cut]);
        c.stream.write_all(partial.as_bytes()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), c.read_response())
            .await
            .expect("the whole request is answered while the next one is still arriving");
        assert_eq!(r.json()["offset"], json!(n));
        c.stream.write_all(&next.as_bytes()[cut..]).await.unwrap();
        assert_eq!(c.read_response().await.json()["offset"], json!(n + 1));
    }
}

/// An upgrade pipelined behind a request: the request's answer comes first, then the 101.
#[tokio::test]
async fn an_answer_pipelined_before_an_upgrade_is_written_before_the_101() {
    let s = Server::start(ServerOpts::default());
    let mut stream = tokio::net::TcpStream::connect(s.public).await.unwrap();
    let requests = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n\
                    GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("HTTP/1.1 101") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut tmp))
            .await
            .expect("both answers within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&tmp[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let ok = text.find("HTTP/1.1 200").expect("the health answer");
    assert!(ok < text.find("HTTP/1.1 101").unwrap(), "{text}");
    assert!(text.contains(r#"{"status":"ok"}"#), "{text}");
}
