//! Any valid JSON payload (RFC 8259) is accepted and relayed byte for byte (SPEC 4, issue 14):
//! over REST, WebSocket and `/broadcast`, in history and in recovery, with real clients and raw
//! frame text compared. Cluster mode has its own case in `cluster.rs`.

mod common;

use common::*;
use serde_json::{json, Value};

/// A WebSocket publish with the payload as raw text; returns the result.
async fn ws_publish(ws: &mut Ws, channel: &str, payload: &str) -> Value {
    let text = format!(
        r#"{{"id":"p","method":"publish","params":{}}}"#,
        publish_body(channel, "ws", payload)
    );
    let r = ws.request_raw(&text).await;
    ok_result(&r, &json!("p"))
}

#[tokio::test]
async fn valid_payloads_are_relayed_byte_for_byte_everywhere() {
    let s = Server::start(ServerOpts::default());
    let mut sub = s.ws_authed("sub").await;
    let first = sub.subscribe("payloads").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let mut other = s.ws_authed("other").await;
    other.subscribe("payloads-2").await;
    let mut publisher = s.ws_authed("publisher").await;
    let payloads = hard_payloads();
    let mut sent = Vec::new();
    for p in &payloads {
        s.publish("payloads", "rest", p).await;
        assert_eq!(raw_payload(&sub.recv_broadcast_raw().await), p, "REST");
        ws_publish(&mut publisher, "payloads", p).await;
        assert_eq!(raw_payload(&sub.recv_broadcast_raw().await), p, "WebSocket");
        let body = format!(r#"{{"channels":["payloads","payloads-2"],"event":"b","payload":{p}}}"#);
        let r = http_post_key(s.public, "/broadcast", API_KEY, &body).await;
        assert_eq!(r.status, 200, "/broadcast: {}", r.text());
        assert_eq!(
            raw_payload(&sub.recv_broadcast_raw().await),
            p,
            "/broadcast"
        );
        assert_eq!(
            raw_payload(&other.recv_broadcast_raw().await),
            p,
            "/broadcast"
        );
        sent.extend([p.clone(), p.clone(), p.clone()]);
    }

    // History: each item's payload is the text published.
    let r = http_get_key(s.public, "/history?channel=payloads", API_KEY).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let mut from = 0;
    for p in &sent {
        let item = format!(r#","payload":{p}}}"#);
        let at = text[from..]
            .find(&item)
            .unwrap_or_else(|| panic!("history lacks {p} in order: {text}"));
        from += at + item.len();
    }

    // Recovery from offset 0: every publication again, in order, byte for byte.
    let mut late = s.ws_authed("late").await;
    let r = late
        .call(
            "subscribe",
            json!({"channel": "payloads", "since": {"offset": 0, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    for p in &sent {
        assert_eq!(raw_payload(&late.recv_broadcast_raw().await), p, "recovery");
    }
}

#[tokio::test]
async fn invalid_json_and_excess_depth_are_refused_with_what_is_wrong() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    for (payload, says) in [
        ("[1,]", "not valid JSON: expected value at line 1 column"),
        ("01", "not valid JSON"),
        ("\"a\tb\"", "control character"),
        (
            &format!("{}{}", "[".repeat(1100), "]".repeat(1100)),
            "deeper than 1024 levels",
        ),
    ] {
        let body = publish_body("c", "e", payload);
        let r = http_post_key(s.public, "/publish", API_KEY, &body).await;
        r.assert_error(400, "InvalidArgument");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "REST {payload:.40}: {message}");
        let text = format!(r#"{{"id":9,"method":"publish","params":{body}}}"#);
        let v = ws.request_raw(&text).await;
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(v["error"]["code"], json!("InvalidArgument"), "{v}");
        assert!(message.contains(says), "WebSocket {payload:.40}: {v}");
    }
    // A name the server reads must be Unicode text: an unpaired surrogate is refused there,
    // while the same escape in the payload is relayed.
    let r = http_post_key(
        s.public,
        "/publish",
        API_KEY,
        r#"{"channel":"c\ud800","event":"e","payload":"\ud800"}"#,
    )
    .await;
    r.assert_error(400, "InvalidArgument");
    assert!(
        r.text().contains("channel holds an unpaired"),
        "{}",
        r.text()
    );
    let v = ws
        .request_raw(r#"{"id":3,"method":"subscribe","params":{"channel":"c\udfff"}}"#)
        .await;
    assert_eq!(v["error"]["code"], json!("InvalidArgument"), "{v}");
    // A bad body is told at its place; the connection is still usable.
    let r = http_post_key(
        s.public,
        "/publish",
        API_KEY,
        r#"{"channel":"c","event":"e","payload":1} x"#,
    )
    .await;
    r.assert_error(400, "InvalidArgument");
    assert!(r.text().contains("trailing characters"), "{}", r.text());
    ws.heartbeat_ok().await;
}
