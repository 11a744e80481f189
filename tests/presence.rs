//! SPEC 16 on one node: members by `sub` counted once over connections and shards, the
//! snapshot in the subscribe result, the `presence` method, `GET /presence`, `users` in
//! `GET /channels`, join/leave once per member in order with broadcasts and without `seq`, the
//! member cap, the `presence` scope, and the server-set `from` of WebSocket publications.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const RULES: &str = r#"
[[channels]]
pattern = "room/*"
access = "public"
presence = true
join_leave = true

[[channels]]
pattern = "small/*"
presence = true
join_leave = true
presence_members_max = 2

[[channels]]
pattern = "quiet/*"
presence = true

[[channels]]
pattern = "plain/*"
"#;

const WAIT: Duration = Duration::from_secs(5);

fn server(shards: usize) -> Server {
    let mut o = ServerOpts::shards(shards);
    o.config_toml = Some(RULES.into());
    Server::start(o)
}

fn token(s: &Server, sub: &str, scope: &[&str]) -> String {
    TokenSpec::new(&s.secret, sub)
        .scope(scope)
        .info(json!({"username": sub.to_uppercase()}))
        .mint()
}

/// A connection of `sub` (info `{"username": SUB}`) with the given scopes.
async fn member(s: &Server, sub: &str, scope: &[&str]) -> Ws {
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&token(s, sub, scope)).await;
    ws
}

/// The next notification, which must be a join or leave of `user`; returns its params.
async fn expect_event(ws: &mut Ws, kind: &str, user: &str) -> Value {
    let n = ws.recv_note(WAIT).await;
    assert_eq!(n["method"], json!(kind), "{n}");
    assert_eq!(n["params"]["user"], json!(user), "{n}");
    assert!(
        n.get("id").is_none() && n["params"].get("seq").is_none(),
        "{n}"
    );
    n["params"].clone()
}

async fn rest_presence(s: &Server, channel: &str) -> HttpResponse {
    let path = format!("/presence?channel={channel}");
    http_get_key(s.backend(), &path, &s.api_key).await
}

#[tokio::test]
async fn one_join_per_member_however_many_connections_and_shards() {
    let s = server(2);
    let mut watcher = member(&s, "watcher", &["subscribe"]).await;
    // Its own join is in its subscribe result's presence version, so it does not get it.
    watcher.subscribe("room/1").await;

    // The kernel spreads connections over the shards: open alice's until both hold some.
    let mut alice = Vec::new();
    while alice.len() < 6 || !every_shard_holds(&s, 2, 2.0).await {
        assert!(alice.len() < 40, "40 connections all on one shard");
        let mut ws = member(&s, "alice", &["subscribe"]).await;
        ws.subscribe("room/1").await;
        alice.push(ws);
    }
    let join = expect_event(&mut watcher, "join", "alice").await;
    assert_eq!(join["info"], json!({"username": "ALICE"}));
    assert_eq!(join["channel"], json!("room/1"));
    watcher.expect_no_note(Duration::from_millis(300)).await;
    // Closing all but one: alice is still there.
    while alice.len() > 1 {
        drop(alice.pop());
    }
    watcher.expect_no_note(Duration::from_millis(500)).await;
    let r = rest_presence(&s, "room/1").await.json();
    assert_eq!(r["count"], json!(2), "{r}");
    drop(alice.pop());
    let leave = expect_event(&mut watcher, "leave", "alice").await;
    assert!(leave["version"].as_u64() > join["version"].as_u64());
    assert_eq!(leave["info"], json!({"username": "ALICE"}));
    let r = rest_presence(&s, "room/1").await.json();
    assert_eq!(
        r["members"],
        json!([{"user": "watcher", "info": {"username": "WATCHER"}}])
    );
    assert_eq!(r["version"], leave["version"], "{r}");
}

#[tokio::test]
async fn snapshot_presence_method_rest_and_channels_agree() {
    let s = server(2);
    let mut bob = member(&s, "bob", &["subscribe"]).await;
    let r = bob.subscribe("room/snap").await;
    assert!(
        r.get("presence").is_none(),
        "no presence scope, no snapshot: {r}"
    );
    let mut carol = member(&s, "carol", &["subscribe", "presence"]).await;
    let r = carol.subscribe("room/snap").await;
    let snapshot = &r["presence"];
    assert_eq!(snapshot["count"], json!(2), "{r}");
    assert_eq!(
        snapshot["members"],
        json!([
            {"user": "bob", "info": {"username": "BOB"}},
            {"user": "carol", "info": {"username": "CAROL"}}
        ])
    );
    let method = carol
        .call("presence", json!({"channel": "room/snap"}))
        .await;
    assert_eq!(&method, snapshot);
    let rest = rest_presence(&s, "room/snap").await;
    assert_eq!(rest.status, 200);
    assert_eq!(&rest.json(), snapshot);
    let channels = http_get_key(s.backend(), "/channels", &s.api_key)
        .await
        .json();
    let row = channels["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == json!("room/snap"))
        .cloned()
        .unwrap();
    assert_eq!(
        row,
        json!({"channel": "room/snap", "subscribers": 2, "users": 2})
    );

    // An anonymous viewer of the public channel is never a member.
    let mut anon = Ws::connect(s.public).await;
    anon.subscribe("room/snap").await;
    let r = rest_presence(&s, "room/snap").await.json();
    assert_eq!(r["count"], json!(2), "{r}");
    let channels = http_get_key(s.backend(), "/channels", &s.api_key)
        .await
        .json();
    assert!(
        channels
            .to_string()
            .contains(r#""subscribers":3,"users":2"#),
        "{channels}"
    );
}

#[tokio::test]
async fn presence_errors_follow_scope_rule_and_auth() {
    let s = server(1);
    let mut anon = Ws::connect(s.public).await;
    anon.call_err("presence", json!({"channel": "room/e"}), "Unauthenticated")
        .await;
    let mut no_scope = member(&s, "u1", &["subscribe"]).await;
    no_scope
        .call_err("presence", json!({"channel": "room/e"}), "PermissionDenied")
        .await;
    let narrow = TokenSpec::new(&s.secret, "u2")
        .channels(&["small/mine"])
        .scope(&["subscribe", "presence"])
        .mint();
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&narrow).await;
    ws.call_err(
        "presence",
        json!({"channel": "small/other"}),
        "PermissionDenied",
    )
    .await;
    let r = ws.call("presence", json!({"channel": "small/mine"})).await;
    assert_eq!(
        (r["count"].clone(), r["members"].clone()),
        (json!(0), json!([]))
    );
    let mut full = member(&s, "u3", &["subscribe", "presence"]).await;
    full.call_err(
        "presence",
        json!({"channel": "plain/x"}),
        "FailedPrecondition",
    )
    .await;
    full.call_err("presence", json!({"channel": 7}), "InvalidArgument")
        .await;
    let r = rest_presence(&s, "plain/x").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("FailedPrecondition"), "{}", r.text());
    let r = http_get(s.backend(), "/presence?channel=room/e").await;
    assert_eq!(r.status, 401, "the API key is required");

    // An info claim over presence.info_bytes_max (1024) is refused at auth.
    let big = TokenSpec::new(&s.secret, "u4")
        .info(json!({"bio": "x".repeat(1100)}))
        .mint();
    let mut ws = Ws::connect(s.public).await;
    ws.call_err("auth", json!({"token": big}), "Unauthenticated")
        .await;
    let not_object = TokenSpec::new(&s.secret, "u5").info(json!("alice")).mint();
    ws.call_err("auth", json!({"token": not_object}), "Unauthenticated")
        .await;
}

#[tokio::test]
async fn the_member_cap_refuses_new_members_only() {
    let s = server(2);
    let mut a = member(&s, "a", &["subscribe"]).await;
    a.subscribe("small/x").await;
    let mut b = member(&s, "b", &["subscribe"]).await;
    b.subscribe("small/x").await;
    let mut c = member(&s, "c", &["subscribe"]).await;
    c.call_err(
        "subscribe",
        json!({"channel": "small/x"}),
        "ResourceExhausted",
    )
    .await;
    // An existing member's second connection is not a new member.
    let mut a2 = member(&s, "a", &["subscribe"]).await;
    a2.subscribe("small/x").await;
    drop(b);
    let deadline = std::time::Instant::now() + WAIT;
    let _c = loop {
        let mut c = member(&s, "c", &["subscribe"]).await;
        let r = c.request("subscribe", json!({"channel": "small/x"})).await;
        if r.get("result").is_some() {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b's leave freed no room: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = rest_presence(&s, "small/x").await.json();
    assert_eq!(r["count"], json!(2), "{r}");
}

#[tokio::test]
async fn joins_and_leaves_come_in_order_with_broadcasts_without_seq() {
    let s = server(2);
    let mut watcher = Ws::connect(s.public).await;
    watcher.subscribe("room/order").await;
    s.publish("room/order", "e", "1").await;
    let mut dave = member(&s, "dave", &["subscribe", "publish"]).await;
    dave.subscribe("room/order").await;
    s.publish("room/order", "e", "2").await;
    drop(dave);
    // The leave is sent when the server sees the close; wait for it before the last publish.
    let r1 = watcher.recv_note(WAIT).await;
    let join = watcher.recv_note(WAIT).await;
    let r2 = watcher.recv_note(WAIT).await;
    let leave = watcher.recv_note(WAIT).await;
    s.publish("room/order", "e", "3").await;
    let r3 = watcher.recv_note(WAIT).await;
    let methods: Vec<_> = [&r1, &join, &r2, &leave, &r3]
        .iter()
        .map(|n| n["method"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        methods,
        ["broadcast", "join", "broadcast", "leave", "broadcast"]
    );
    let seqs: Vec<_> = [&r1, &r2, &r3]
        .iter()
        .map(|n| n["params"]["seq"].clone())
        .collect();
    assert_eq!(
        seqs,
        [json!(1), json!(2), json!(3)],
        "joins and leaves take no seq"
    );
    assert!(join["params"]["version"].as_u64() < leave["params"]["version"].as_u64());
}

#[tokio::test]
async fn from_is_the_publishers_token_and_cannot_be_forged() {
    let s = server(2);
    let mut watcher = Ws::connect(s.public).await;
    watcher.subscribe("room/from").await;
    let mut eve = member(&s, "eve", &["subscribe", "publish"]).await;
    let forged = json!({
        "channel": "room/from",
        "event": "message",
        "from": {"user": "admin"},
        "payload": "hi"
    });
    eve.call("publish", forged).await;
    let raw = watcher.recv_broadcast_raw().await;
    let b: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        b["params"]["from"],
        json!({"user": "eve", "info": {"username": "EVE"}})
    );
    let (event, from, payload) = (
        raw.find(r#""event""#).unwrap(),
        raw.find(r#""from""#).unwrap(),
        raw.find(r#""payload""#).unwrap(),
    );
    assert!(
        event < from && from < payload,
        "from after event, before payload: {raw}"
    );
    // REST publications have no sender, whatever the body says.
    let body = r#"{"channel":"room/from","event":"e","from":{"user":"admin"},"payload":1}"#;
    let r = http_post_key(s.backend(), "/publish", &s.api_key, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = watcher.recv_broadcast().await;
    assert!(b.get("from").is_none(), "{b}");
    // A token without info: from has the user alone; history keeps from.
    let plain = TokenSpec::new(&s.secret, "frank").mint();
    let mut frank = Ws::connect(s.public).await;
    frank.auth_ok(&plain).await;
    frank
        .call(
            "publish",
            json!({"channel": "room/from", "event": "e", "payload": 2}),
        )
        .await;
    assert_eq!(
        watcher.recv_broadcast().await["from"],
        json!({"user": "frank"})
    );
    let h = http_get_key(s.backend(), "/history?channel=room/from", &s.api_key)
        .await
        .json();
    let froms: Vec<_> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.get("from").cloned().unwrap_or(Value::Null))
        .collect();
    assert_eq!(
        froms,
        [
            json!({"user": "eve", "info": {"username": "EVE"}}),
            Value::Null,
            json!({"user": "frank"})
        ]
    );
}

#[tokio::test]
async fn unsubscribe_and_narrower_reauth_leave_and_metrics_count() {
    let s = server(2);
    let mut watcher = member(&s, "watcher", &["subscribe"]).await;
    watcher.subscribe("small/re").await;
    let wide = TokenSpec::new(&s.secret, "gina")
        .scope(&["subscribe"])
        .mint();
    let mut gina = Ws::connect(s.public).await;
    gina.auth_ok(&wide).await;
    gina.subscribe("small/re").await;
    gina.subscribe("quiet/q").await;
    expect_event(&mut watcher, "join", "gina").await;
    let narrow = TokenSpec::new(&s.secret, "gina")
        .channels(&["other"])
        .scope(&["subscribe"])
        .mint();
    gina.auth_ok(&narrow).await;
    expect_event(&mut watcher, "leave", "gina").await;
    let r = rest_presence(&s, "quiet/q").await.json();
    assert_eq!(
        r["count"],
        json!(0),
        "the narrower token dropped quiet/q too: {r}"
    );
    let mut hank = member(&s, "hank", &["subscribe"]).await;
    hank.subscribe("small/re").await;
    expect_event(&mut watcher, "join", "hank").await;
    hank.call("unsubscribe", json!({"channel": "small/re"}))
        .await;
    expect_event(&mut watcher, "leave", "hank").await;
    hank.subscribe("quiet/q").await;
    let text = http_get(s.backend(), "/metrics").await.text();
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
    };
    assert_eq!(
        value("presence_members "),
        2.0,
        "watcher in small/re, hank in quiet/q"
    );
    assert_eq!(value("presence_events_total{kind=\"join\"}"), 5.0);
    assert_eq!(value("presence_events_total{kind=\"leave\"}"), 3.0);
    assert_eq!(value("presence_reaped_total "), 0.0);
}
