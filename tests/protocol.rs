//! The WebSocket protocol of SPEC sections 4 and 13: every method's success and every error
//! code, request ids, auth and token lifetime, channel names and patterns, limits, pings.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn with_env(pairs: &[(&str, &str)]) -> Server {
    let mut o = ServerOpts::default();
    for (k, v) in pairs {
        o = o.env(k, v);
    }
    Server::start(o)
}

// ----- request ids and malformed requests -------------------------------------------------

#[tokio::test]
async fn heartbeat_before_auth_echoes_every_kind_of_id() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    for (raw_id, id) in [
        ("0", json!(0)),
        ("-17", json!(-17)),
        ("\"\"", json!("")),
        ("\"abc\"", json!("abc")),
        ("123", json!(123)),
    ] {
        let resp = ws
            .request_raw(&format!("{{\"id\":{raw_id},\"method\":\"heartbeat\"}}"))
            .await;
        let r = ok_result(&resp, &id);
        assert!(
            r["timestamp"].as_str().is_some_and(is_rfc3339_utc),
            "timestamp must be RFC 3339 UTC: {resp}"
        );
        assert_eq!(
            resp.as_object().unwrap().len(),
            2,
            "only requestId and result: {resp}"
        );
    }
}

#[tokio::test]
async fn unreadable_frames_are_invalid_argument_and_the_connection_stays_open() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    for bad in [
        "not json",
        "{\"id\":1,",
        "[1,2,3]",
        "42",
        "\"heartbeat\"",
        "null",
    ] {
        let resp = ws.request_raw(bad).await;
        assert_error(&resp, &Value::Null, "InvalidArgument");
        assert!(
            resp.as_object().unwrap().contains_key("requestId"),
            "requestId must be present (null): {resp}"
        );
    }
    // A readable id is echoed even when the method is missing.
    let resp = ws.request_raw(r#"{"id":77,"params":{}}"#).await;
    assert_error(&resp, &json!(77), "InvalidArgument");
    let resp = ws.request_raw(r#"{"id":"s-1"}"#).await;
    assert_error(&resp, &json!("s-1"), "InvalidArgument");
    // No id and no method.
    let resp = ws.request_raw(r#"{"params":{}}"#).await;
    assert_error(&resp, &Value::Null, "InvalidArgument");
    // A binary frame: InvalidArgument with a null id.
    ws.send_binary(br#"{"id":5,"method":"heartbeat"}"#).await;
    let resp = ws.next_response().await;
    assert_error(&resp, &Value::Null, "InvalidArgument");
    // Still open and working.
    ws.heartbeat_ok().await;
}

#[tokio::test]
async fn unknown_method_is_not_found() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&s.token_all("u")).await;
    let resp = ws.request_raw(r#"{"id":9,"method":"frobnicate"}"#).await;
    assert_error(&resp, &json!(9), "NotFound");
    let resp = ws
        .request_raw(r#"{"id":10,"method":"Subscribe","params":{"channel":"a"}}"#)
        .await;
    assert_error(&resp, &json!(10), "NotFound");
    ws.heartbeat_ok().await;
}

#[tokio::test]
async fn unknown_method_before_auth_is_not_found() {
    // SPEC 4: "Unknown method: NotFound"; only subscribe/unsubscribe/publish list
    // Unauthenticated, and a method that does not exist needs no authentication to reject.
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    let resp = ws.request_raw(r#"{"id":9,"method":"frobnicate"}"#).await;
    assert_error(&resp, &json!(9), "NotFound");
    ws.heartbeat_ok().await;
}

// ----- auth -----------------------------------------------------------------------------

#[tokio::test]
async fn auth_errors_leave_the_connection_usable() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    let good = TokenSpec::new(&s.secret, "alice");

    // InvalidArgument: no params, no token, non-string token.
    let resp = ws.request_raw(r#"{"id":1,"method":"auth"}"#).await;
    assert_error(&resp, &json!(1), "InvalidArgument");
    ws.call_err("auth", json!({}), "InvalidArgument").await;
    ws.call_err("auth", json!({"token": 123}), "InvalidArgument")
        .await;
    ws.call_err("auth", json!({"token": null}), "InvalidArgument")
        .await;

    let mut cases: Vec<(&str, String)> = Vec::new();
    let mut t = good.clone();
    t.secret = "some-other-secret".into();
    cases.push(("bad signature", t.mint()));
    let mut t = good.clone();
    t.alg = Alg::HS384;
    cases.push(("HS384", t.mint()));
    let mut t = good.clone();
    t.alg = Alg::None;
    cases.push(("alg none", t.mint()));
    let mut t = good.clone();
    t.aud = None;
    cases.push(("aud missing", t.mint()));
    let mut t = good.clone();
    t.aud = Some(json!("other-service"));
    cases.push(("aud wrong", t.mint()));
    let mut t = good.clone();
    t.aud = Some(json!(["a", "b"]));
    cases.push(("aud array without broadcaster", t.mint()));
    let mut t = good.clone();
    t.exp = Some(now_secs() - 120);
    cases.push(("expired", t.mint()));
    let mut t = good.clone();
    t.exp = None;
    cases.push(("exp missing", t.mint()));
    let mut t = good.clone();
    t.sub = None;
    cases.push(("sub missing", t.mint()));
    cases.push(("garbage", "not.a.jwt".into()));
    cases.push(("empty", String::new()));

    for (what, token) in &cases {
        let id = json!(what);
        let req = json!({"id": what, "method": "auth", "params": {"token": token}});
        let resp = ws.request_raw(&req.to_string()).await;
        assert_eq!(resp["requestId"], id, "{what}: {resp}");
        assert_eq!(
            resp["error"]["code"],
            json!("Unauthenticated"),
            "{what} must be Unauthenticated: {resp}"
        );
        // Still unauthenticated.
        ws.call_err("subscribe", json!({"channel": "a"}), "Unauthenticated")
            .await;
    }
    ws.heartbeat_ok().await;
    ws.auth_ok(&good.mint()).await;
    let r = ws.subscribe("a").await;
    assert!(r["subscriptionId"].is_string());
}

#[tokio::test]
async fn leeway_allows_a_recently_expired_token() {
    let s = with_env(&[("BROADCASTER_AUTH_LEEWAY", "30s")]);
    let mut ws = Ws::connect(s.public).await;
    let mut t = TokenSpec::new(&s.secret, "late");
    t.exp = Some(now_secs() - 60);
    ws.call_err("auth", json!({"token": t.mint()}), "Unauthenticated")
        .await;
    t.exp = Some(now_secs() - 5);
    ws.auth_ok(&t.mint()).await;
}

#[tokio::test]
async fn aud_may_be_an_array_containing_broadcaster() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    let mut t = TokenSpec::new(&s.secret, "bob");
    t.aud = Some(json!(["other", "broadcaster"]));
    ws.auth_ok(&t.mint()).await;
    ws.subscribe("x").await;
}

#[tokio::test]
async fn reauth_same_sub_is_a_refresh_and_another_sub_is_failed_precondition() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&s.token_all("carol")).await;
    ws.subscribe("c1").await;
    ws.auth_ok(&s.token_all("carol")).await;
    ws.call_err(
        "auth",
        json!({"token": s.token_all("mallory")}),
        "FailedPrecondition",
    )
    .await;
    // Still carol, still subscribed, still able to subscribe.
    ws.subscribe("c2").await;
    ws.call_err("subscribe", json!({"channel": "c1"}), "AlreadyExists")
        .await;
    let p = s.publish("c1", "e", "1").await;
    let b = ws.recv_broadcast().await;
    assert_eq!(b["id"], p["id"]);
}

#[tokio::test]
async fn reauth_that_narrows_channels_drops_subscriptions() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&s.token("dave", &["news/*"], &["subscribe"]))
        .await;
    ws.subscribe("news/a").await;
    ws.subscribe("news/b").await;
    ws.auth_ok(&s.token("dave", &["news/a"], &["subscribe"]))
        .await;
    // Told, before the auth answer.
    let n = ws.recv_note(Duration::from_secs(5)).await;
    assert_eq!(
        n,
        json!({"method": "unsubscribed", "params": {"channel": "news/b", "reason": "permission"}})
    );

    // news/b is no longer delivered; news/a still is.
    s.publish("news/b", "e", "\"dropped\"").await;
    let pa = s.publish("news/a", "e", "\"kept\"").await;
    let b = ws.recv_broadcast().await;
    assert_eq!(b["channel"], json!("news/a"), "{b}");
    assert_eq!(b["id"], pa["id"]);
    ws.call_err("unsubscribe", json!({"channel": "news/b"}), "NotFound")
        .await;
    ws.call_err(
        "subscribe",
        json!({"channel": "news/b"}),
        "PermissionDenied",
    )
    .await;
    ws.call("unsubscribe", json!({"channel": "news/a"})).await;
}

// ----- subscribe ------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_errors() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    ws.call_err("subscribe", json!({"channel": "a"}), "Unauthenticated")
        .await;

    let mut pubonly = Ws::connect(s.public).await;
    pubonly.auth_ok(&s.token("p", &["*"], &["publish"])).await;
    pubonly
        .call_err("subscribe", json!({"channel": "a"}), "PermissionDenied")
        .await;

    let mut nochan = Ws::connect(s.public).await;
    let mut t = TokenSpec::new(&s.secret, "n");
    t.channels = None;
    nochan.auth_ok(&t.mint()).await;
    nochan
        .call_err("subscribe", json!({"channel": "a"}), "PermissionDenied")
        .await;

    let mut noscope = Ws::connect(s.public).await;
    let mut t = TokenSpec::new(&s.secret, "n");
    t.scope = None;
    noscope.auth_ok(&t.mint()).await;
    noscope
        .call_err("subscribe", json!({"channel": "a"}), "PermissionDenied")
        .await;

    ws.auth_ok(&s.token("u", &["a", "b/*"], &["subscribe"]))
        .await;
    ws.call_err("subscribe", json!({"channel": "c"}), "PermissionDenied")
        .await;
    ws.subscribe("a").await;
    ws.call_err("subscribe", json!({"channel": "a"}), "AlreadyExists")
        .await;
    ws.call_err("subscribe", json!({}), "InvalidArgument").await;
    ws.call_err("subscribe", json!({"channel": 5}), "InvalidArgument")
        .await;
}

#[tokio::test]
async fn channel_patterns() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&s.token("u", &["contest/a/*", "exact"], &["subscribe"]))
        .await;
    for ok in ["contest/a/x", "contest/a/x/y", "exact"] {
        ws.subscribe(ok).await;
    }
    for denied in [
        "contest/a",
        "contest/ab",
        "contest/ab/x",
        "exac",
        "exact2",
        "contest/b/x",
    ] {
        ws.call_err("subscribe", json!({"channel": denied}), "PermissionDenied")
            .await;
    }
    let mut all = Ws::connect(s.public).await;
    all.auth_ok(&s.token("v", &["*"], &["subscribe"])).await;
    for ok in ["anything", "x/y/z", "contest/a"] {
        all.subscribe(ok).await;
    }
}

#[tokio::test]
async fn invalid_channel_names() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    let max = "c".repeat(255);
    let too_long = "c".repeat(256);
    let max_multibyte = format!("{}a", "é".repeat(127));
    let too_long_multibyte = "é".repeat(128);
    assert_eq!(max_multibyte.len(), 255);
    assert_eq!(too_long_multibyte.len(), 256);
    let bad = [
        String::new(),
        "a b".into(),
        "a\tb".into(),
        "a\nb".into(),
        "a\rb".into(),
        "a\u{0}b".into(),
        "a\u{1}b".into(),
        "a\u{7f}b".into(),
        "a\u{85}b".into(),
        "a\u{a0}b".into(),
        "a\u{2003}b".into(),
        "a\u{3000}b".into(),
        "a*b".into(),
        "*".into(),
        too_long.clone(),
        too_long_multibyte.clone(),
    ];
    for name in &bad {
        ws.call_err("subscribe", json!({"channel": name}), "InvalidArgument")
            .await;
        ws.call_err("unsubscribe", json!({"channel": name}), "InvalidArgument")
            .await;
        ws.call_err(
            "publish",
            json!({"channel": name, "event": "e", "payload": 1}),
            "InvalidArgument",
        )
        .await;
    }
    for name in [&max, &max_multibyte, &"é/ü/日本".to_string()] {
        let r = ws.subscribe(name).await;
        assert_eq!(r["offset"], json!(0));
    }
}

#[tokio::test]
async fn subscriptions_per_connection_are_limited() {
    let s = with_env(&[("BROADCASTER_LIMITS_MAX_SUBSCRIPTIONS_PER_CONNECTION", "3")]);
    let mut ws = s.ws_authed("u").await;
    for c in ["s1", "s2", "s3"] {
        ws.subscribe(c).await;
    }
    ws.call_err("subscribe", json!({"channel": "s4"}), "ResourceExhausted")
        .await;
    ws.call("unsubscribe", json!({"channel": "s2"})).await;
    ws.subscribe("s4").await;
    ws.call_err("subscribe", json!({"channel": "s5"}), "ResourceExhausted")
        .await;
    // The limit is per connection.
    let mut other = s.ws_authed("u").await;
    for c in ["s1", "s2", "s3"] {
        other.subscribe(c).await;
    }
}

#[tokio::test]
async fn subscribe_result_fields() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    let r = ws.subscribe("fresh").await;
    assert!(
        r["subscriptionId"].as_str().is_some_and(|x| !x.is_empty()),
        "subscriptionId: {r}"
    );
    assert!(
        r["timestamp"].as_str().is_some_and(is_rfc3339_utc),
        "timestamp: {r}"
    );
    assert_eq!(r["offset"], json!(0), "offset of a new channel: {r}");
    let epoch = r["epoch"].as_str().expect("epoch string").to_string();
    assert!(!epoch.is_empty());
    if let Some(rec) = r.get("recovered") {
        assert_eq!(rec, &json!(false), "nothing to recover without since: {r}");
    }

    s.publish("fresh", "e", "1").await;
    s.publish("fresh", "e", "2").await;
    let mut other = s.ws_authed("v").await;
    let r2 = other.subscribe("fresh").await;
    assert_eq!(r2["offset"], json!(2), "{r2}");
    assert_eq!(r2["epoch"], json!(epoch), "same history, same epoch");
    assert_ne!(
        r2["subscriptionId"], r["subscriptionId"],
        "subscription ids differ"
    );
}

// ----- unsubscribe ----------------------------------------------------------------------

#[tokio::test]
async fn unsubscribe_success_and_errors() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    ws.call_err("unsubscribe", json!({"channel": "a"}), "Unauthenticated")
        .await;
    ws.auth_ok(&s.token_all("u")).await;
    ws.call_err("unsubscribe", json!({"channel": "a"}), "NotFound")
        .await;
    ws.subscribe("a").await;
    ws.subscribe("b").await;
    let r = ws.call("unsubscribe", json!({"channel": "a"})).await;
    assert_eq!(r, json!({"success": true}));
    ws.call_err("unsubscribe", json!({"channel": "a"}), "NotFound")
        .await;
    ws.call_err("unsubscribe", json!({"channel": "a b"}), "InvalidArgument")
        .await;
    // No more deliveries on a; b still delivered.
    s.publish("a", "e", "\"a\"").await;
    let pb = s.publish("b", "e", "\"b\"").await;
    let got = ws.recv_broadcast().await;
    assert_eq!(got["channel"], json!("b"));
    assert_eq!(got["id"], pb["id"]);
}

// ----- publish and broadcast ------------------------------------------------------------

#[tokio::test]
async fn publish_result_and_errors() {
    let s = Server::start(ServerOpts::default());
    let mut ws = Ws::connect(s.public).await;
    ws.call_err(
        "publish",
        json!({"channel": "p", "event": "e", "payload": 1}),
        "Unauthenticated",
    )
    .await;
    ws.auth_ok(&s.token("u", &["p", "q/*"], &["publish"])).await;
    let r = ws
        .call(
            "publish",
            json!({"channel": "p", "event": "e", "payload": {"k": 1}}),
        )
        .await;
    assert!(r["id"].as_str().is_some_and(|x| !x.is_empty()), "{r}");
    assert!(r["createTime"].as_str().is_some_and(is_rfc3339_utc), "{r}");
    assert_eq!(r["offset"], json!(1), "{r}");
    let r2 = ws
        .call(
            "publish",
            json!({"channel": "p", "event": "e", "payload": 2}),
        )
        .await;
    assert_eq!(r2["offset"], json!(2), "{r2}");
    assert_ne!(r2["id"], r["id"], "ids are unique");
    let r3 = ws
        .call(
            "publish",
            json!({"channel": "q/1", "event": "e", "payload": 2}),
        )
        .await;
    assert_eq!(r3["offset"], json!(1), "offsets are per channel: {r3}");

    ws.call_err(
        "publish",
        json!({"channel": "other", "event": "e", "payload": 1}),
        "PermissionDenied",
    )
    .await;
    let mut subonly = Ws::connect(s.public).await;
    subonly.auth_ok(&s.token("u", &["*"], &["subscribe"])).await;
    subonly
        .call_err(
            "publish",
            json!({"channel": "p", "event": "e", "payload": 1}),
            "PermissionDenied",
        )
        .await;

    // Events: 1..=128 bytes of string.
    for bad_event in [
        json!(""),
        json!("e".repeat(129)),
        json!("é".repeat(65)),
        json!(5),
    ] {
        ws.call_err(
            "publish",
            json!({"channel": "p", "event": bad_event, "payload": 1}),
            "InvalidArgument",
        )
        .await;
    }
    ws.call_err(
        "publish",
        json!({"channel": "p", "payload": 1}),
        "InvalidArgument",
    )
    .await;
    ws.call_err(
        "publish",
        json!({"event": "e", "payload": 1}),
        "InvalidArgument",
    )
    .await;
    for good_event in ["x".repeat(128), "é".repeat(64)] {
        ws.call(
            "publish",
            json!({"channel": "p", "event": good_event, "payload": 1}),
        )
        .await;
    }
}

#[tokio::test]
async fn payload_size_limit_is_resource_exhausted() {
    let s = with_env(&[("BROADCASTER_LIMITS_MAX_PAYLOAD_BYTES", "1000")]);
    let mut ws = s.ws_authed("u").await;
    // A JSON string of exactly 1000 bytes (quotes included), then 1001.
    let exact = format!("\"{}\"", "x".repeat(998));
    let over = format!("\"{}\"", "x".repeat(999));
    let req = format!(
        r#"{{"id":1,"method":"publish","params":{{"channel":"big","event":"e","payload":{exact}}}}}"#
    );
    let resp = ws.request_raw(&req).await;
    ok_result(&resp, &json!(1));
    let req = format!(
        r#"{{"id":2,"method":"publish","params":{{"channel":"big","event":"e","payload":{over}}}}}"#
    );
    let resp = ws.request_raw(&req).await;
    assert_error(&resp, &json!(2), "ResourceExhausted");
    ws.heartbeat_ok().await;
}

#[tokio::test]
async fn broadcast_fields_and_raw_payload_relay() {
    let s = Server::start(ServerOpts::default());
    let mut sub = s.ws_authed("sub").await;
    let sr = sub.subscribe("room").await;
    assert_eq!(sr["offset"], json!(0));
    let mut publisher = s.ws_authed("pub").await;
    publisher.subscribe("room").await;

    let payloads = [
        r#"{"b":1,  "a":[1.0e3, "\u00e9"]}"#,
        r#"{ "nested" : { "x" : [ ] , "y":null } }"#,
        "12.50",
        "-0.0e-0",
        "1E+2",
        r#""str\u0041\n""#,
        "true",
        "null",
        "[ 1,2 ,3 ]",
        r#""é日本""#,
    ];
    for (i, payload) in payloads.iter().enumerate() {
        let req = format!(
            r#"{{"id":{i},"method":"publish","params":{{"channel":"room","event":"ev-{i}","payload":{payload}}}}}"#
        );
        let resp = publisher.request_raw(&req).await;
        let pr = ok_result(&resp, &json!(i));
        let n = i as u64 + 1;
        assert_eq!(pr["offset"], json!(n));

        for ws in [&mut sub, &mut publisher] {
            let raw = ws.recv_broadcast_raw().await;
            assert!(
                raw.contains(payload),
                "payload {payload} must be relayed byte for byte; frame was {raw}"
            );
            let v: Value = serde_json::from_str(&raw).unwrap();
            assert_eq!(v["method"], json!("broadcast"));
            assert!(
                v.get("id").is_none() && v.get("requestId").is_none(),
                "{raw}"
            );
            let b = &v["params"];
            assert_eq!(b["id"], pr["id"], "broadcast id = publish id: {raw}");
            assert_eq!(b["createTime"], pr["createTime"], "{raw}");
            assert_eq!(b["seq"], json!(n), "{raw}");
            assert_eq!(b["offset"], json!(n), "{raw}");
            assert_eq!(b["channel"], json!("room"));
            assert_eq!(b["event"], json!(format!("ev-{i}")));
            let expected: Value = serde_json::from_str(payload).unwrap();
            assert_eq!(b["payload"], expected);
        }
    }
    // REST publications are relayed byte for byte too.
    let payload = r#"{"z" :  [true,false] ,"a":"\ud83d\ude00"}"#;
    let pr = s.publish("room", "rest", payload).await;
    let raw = sub.recv_broadcast_raw().await;
    assert!(
        raw.contains(payload),
        "REST payload relayed raw; frame was {raw}"
    );
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["params"]["id"], pr["id"]);
    assert_eq!(v["params"]["createTime"], pr["createTime"]);
    assert_eq!(v["params"]["offset"], json!(payloads.len() + 1));
}

#[tokio::test]
async fn seq_restarts_at_one_for_every_new_subscription() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    let r = ws.subscribe("seq").await;
    assert_eq!(r["offset"], json!(0));
    for i in 1..=3u64 {
        s.publish("seq", "e", &i.to_string()).await;
        let b = ws.recv_broadcast().await;
        assert_eq!(b["seq"], json!(i), "{b}");
        assert_eq!(b["offset"], json!(i), "{b}");
    }
    ws.call("unsubscribe", json!({"channel": "seq"})).await;
    s.publish("seq", "e", "4").await;
    let r = ws.subscribe("seq").await;
    assert_eq!(r["offset"], json!(4), "top offset at subscription: {r}");
    s.publish("seq", "e", "5").await;
    let b = ws.recv_broadcast().await;
    assert_eq!(b["seq"], json!(1), "new subscription restarts seq: {b}");
    assert_eq!(b["offset"], json!(5), "offset = subscribe offset + 1: {b}");
    assert_eq!(b["payload"], json!(5));
}

// ----- timeouts -------------------------------------------------------------------------

#[tokio::test]
async fn auth_timeout_closes_4001() {
    let s = with_env(&[("BROADCASTER_LIMITS_AUTH_TIMEOUT", "1s")]);
    let start = Instant::now();
    let mut lazy = Ws::connect(s.public).await;
    let mut authed = Ws::connect(s.public).await;
    authed.auth_ok(&s.token_all("u")).await;
    // A heartbeat is not authentication.
    lazy.heartbeat_ok().await;
    lazy.expect_close(4001, Duration::from_secs(4)).await;
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "closed too early: {:?}",
        start.elapsed()
    );
    // The authenticated one is not closed.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(start.elapsed())).await;
    authed.heartbeat_ok().await;
}

#[tokio::test]
async fn token_expiry_closes_4002_unless_refreshed() {
    let s = Server::start(ServerOpts::default());
    let mut expiring = Ws::connect(s.public).await;
    expiring
        .auth_ok(&TokenSpec::new(&s.secret, "e").exp_in(2).mint())
        .await;
    let mut refreshed = Ws::connect(s.public).await;
    refreshed
        .auth_ok(&TokenSpec::new(&s.secret, "r").exp_in(2).mint())
        .await;
    refreshed
        .auth_ok(&TokenSpec::new(&s.secret, "r").exp_in(60).mint())
        .await;
    expiring.expect_close(4002, Duration::from_secs(6)).await;
    refreshed.heartbeat_ok().await;
    refreshed.subscribe("still-here").await;
}

// ----- rate limit -----------------------------------------------------------------------

#[tokio::test]
async fn rate_limit_burst_is_resource_exhausted_and_short_bursts_do_not_close() {
    let s = with_env(&[
        ("BROADCASTER_LIMITS_REQUESTS_PER_SECOND", "10"),
        ("BROADCASTER_LIMITS_REQUEST_BURST", "20"),
    ]);
    let mut ws = Ws::connect(s.public).await;
    let n = 40;
    for i in 0..n {
        ws.send_text(&format!(r#"{{"id":{i},"method":"heartbeat"}}"#))
            .await;
    }
    let mut rejected = 0;
    for i in 0..n {
        let resp = ws.next_response().await;
        assert_eq!(resp["requestId"], json!(i), "responses in order: {resp}");
        if i < 20 {
            ok_result(&resp, &json!(i));
        } else if resp.get("error").is_some() {
            assert_error(&resp, &json!(i), "ResourceExhausted");
            rejected += 1;
        }
    }
    assert!(
        rejected >= 15,
        "only {rejected} of 20 over-burst requests rejected"
    );
    // A short burst of rejections does not close the connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.heartbeat_ok().await;
}

#[tokio::test]
async fn sustained_abuse_closes_4004() {
    let s = with_env(&[
        ("BROADCASTER_LIMITS_REQUESTS_PER_SECOND", "10"),
        ("BROADCASTER_LIMITS_REQUEST_BURST", "20"),
    ]);
    let mut ws = Ws::connect(s.public).await;
    // One request at a time, far faster than 10/s, so that nothing is left unread on the
    // server's side when it closes.
    let mut rejected = 0;
    let mut end = None;
    for i in 0..400 {
        use futures_util::SinkExt;
        let msg = tokio_tungstenite::tungstenite::Message::text(format!(
            r#"{{"id":{i},"method":"heartbeat"}}"#
        ));
        if let Err(e) = ws.stream.send(msg).await {
            end = Some(ws.ended(T).await);
            eprintln!("send failed after {rejected} rejections: {e}");
            break;
        }
        match ws.try_recv_text(T).await {
            Ok(Some(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["error"]["code"] == json!("ResourceExhausted") {
                    rejected += 1;
                }
            }
            Ok(None) => panic!("no answer to request {i}"),
            Err(e) => {
                end = Some(e);
                break;
            }
        }
    }
    let end = end.unwrap_or_else(|| panic!("not closed after {rejected} rejections"));
    assert_eq!(end, Ended::Close(Some(4004)), "after {rejected} rejections");
    assert!(
        (100..=120).contains(&rejected),
        "closed after {rejected} rejections; expected just over 100"
    );
}

// ----- pings ----------------------------------------------------------------------------

#[tokio::test]
async fn server_pings_and_a_ponging_client_stays_open() {
    let s = with_env(&[("BROADCASTER_LIMITS_PING_INTERVAL", "1s")]);
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&s.token_all("u")).await;
    // Reading lets the client library answer each ping with a pong.
    match ws.try_recv_text(Duration::from_millis(3500)).await {
        Ok(None) => {}
        Ok(Some(t)) => panic!("unexpected frame {t}"),
        Err(e) => panic!("connection ended although the client answered pings: {e:?}"),
    }
    assert!(
        ws.pings >= 2,
        "expected pings every second, got {}",
        ws.pings
    );
    ws.heartbeat_ok().await;
}

#[tokio::test]
async fn silent_client_is_closed_4005() {
    let s = with_env(&[("BROADCASTER_LIMITS_PING_INTERVAL", "1s")]);
    let mut raw = RawWs::connect(s.public).await;
    let start = Instant::now();
    let mut pings = 0;
    let end = loop {
        match raw.read_frame(Duration::from_secs(6)).await {
            Ok(f) if f.opcode == OP_PING => pings += 1,
            Ok(f) if f.opcode == OP_CLOSE => break RawEnd::Close(f.close_code()),
            Ok(f) => panic!("unexpected frame {f:?}"),
            Err(e) => break e,
        }
    };
    let t = start.elapsed();
    assert!(
        matches!(
            end,
            RawEnd::Close(Some(4005)) | RawEnd::Eof | RawEnd::Reset(_)
        ),
        "a silent client is closed with 4005 (or dropped): {end:?}"
    );
    assert!(pings >= 1, "the server pings before giving up");
    assert!(
        t >= Duration::from_millis(1500) && t <= Duration::from_millis(4500),
        "closed after {t:?}, expected about 2 ping intervals"
    );
}
