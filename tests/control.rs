//! SPEC 17 on one node: the backend's `POST /disconnect` and `POST /unsubscribe` reach every
//! connection of a user on every shard, and nobody else; bad bodies are refused.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

async fn post(s: &Server, path: &str, body: &Value) -> HttpResponse {
    http_post_key(s.backend(), path, &s.api_key, &body.to_string()).await
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user_and_no_other() {
    let s = Server::start(ServerOpts::shards(2));
    // The kernel spreads connections over the shards: open until both hold some of alice's.
    let mut alice = Vec::new();
    while alice.len() < 4 || !every_shard_holds(&s, 2, 1.0).await {
        assert!(alice.len() < 40, "40 connections all on one shard");
        let mut ws = s.ws_authed("alice").await;
        ws.subscribe("news").await;
        alice.push(ws);
    }
    let opened = alice.len();
    let mut bob = s.ws_authed("bob").await;
    bob.subscribe("news").await;
    let mut anonymous = Ws::connect(s.public).await;

    let r = post(&s, "/disconnect", &json!({"user": "alice"})).await;
    assert_eq!((r.status, r.json()), (200, json!({"connections": opened})));
    for ws in &mut alice {
        ws.expect_close(4006, WAIT).await;
    }
    bob.heartbeat_ok().await;
    anonymous.heartbeat_ok().await;
    s.publish("news", "e", "1").await;
    assert_eq!(bob.recv_broadcast().await["payload"], json!(1));
    // Nothing left of alice to disconnect.
    let r = post(&s, "/disconnect", &json!({"user": "alice"})).await;
    assert_eq!(r.json(), json!({"connections": 0}));

    // 4007 for a stolen token; a fresh connection of alice works again.
    let mut again = s.ws_authed("alice").await;
    let body = json!({"user": "alice", "code": 4007, "reason": "token revoked"});
    assert_eq!(
        post(&s, "/disconnect", &body).await.json(),
        json!({"connections": 1})
    );
    again.expect_close(4007, WAIT).await;
}

#[tokio::test]
async fn disconnect_and_unsubscribe_refuse_bad_bodies() {
    let s = Server::start(ServerOpts::shards(1));
    let cases = [
        ("/disconnect", json!({})),
        ("/disconnect", json!({"user": ""})),
        ("/disconnect", json!({"user": 7})),
        ("/disconnect", json!({"user": "a", "code": 4001})),
        ("/disconnect", json!({"user": "a", "code": "4006"})),
        (
            "/disconnect",
            json!({"user": "a", "reason": "x".repeat(124)}),
        ),
        ("/unsubscribe", json!({"user": "a"})),
        ("/unsubscribe", json!({"user": "a", "channel": "a b"})),
        ("/unsubscribe", json!({"user": "a", "channel": "a*b"})),
        ("/unsubscribe", json!({"channel": "a"})),
    ];
    for (path, body) in cases {
        let r = post(&s, path, &body).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert_eq!(
            r.json()["error"]["code"],
            json!("InvalidArgument"),
            "{body}"
        );
    }
    let r = http_request(
        s.backend(),
        "POST",
        "/disconnect",
        &[],
        Some(b"{\"user\":\"a\"}"),
    )
    .await;
    assert_eq!(r.status, 401, "the API key is required");
    let r = post(&s, "/disconnect", &json!({"user": "a", "user2": 1})).await;
    assert_eq!(r.status, 200, "unknown members are ignored: {}", r.text());
}

#[tokio::test]
async fn unsubscribe_ends_matching_subscriptions_and_says_so() {
    let s = Server::start(ServerOpts::shards(2));
    let mut a1 = s.ws_authed("alice").await;
    let mut a2 = s.ws_authed("alice").await;
    for ch in ["chat/a", "chat/b", "news"] {
        a1.subscribe(ch).await;
    }
    a2.subscribe("chat/a").await;
    let mut bob = s.ws_authed("bob").await;
    bob.subscribe("chat/a").await;

    let body = json!({"user": "alice", "channel": "chat/*"});
    let r = post(&s, "/unsubscribe", &body).await;
    assert_eq!((r.status, r.json()), (200, json!({"subscriptions": 3})));
    let mut told = Vec::new();
    for _ in 0..2 {
        let n = a1.recv_note(WAIT).await;
        assert_eq!(n["method"], json!("unsubscribed"), "{n}");
        assert_eq!(n["params"]["reason"], json!("server"), "{n}");
        told.push(n["params"]["channel"].as_str().unwrap().to_string());
    }
    told.sort();
    assert_eq!(told, ["chat/a", "chat/b"]);
    let n = a2.recv_note(WAIT).await;
    assert_eq!(
        n["params"],
        json!({"channel": "chat/a", "reason": "server"})
    );

    // No broadcast of those channels follows; the others go on, and bob is untouched.
    s.publish("chat/a", "e", "1").await;
    s.publish("news", "e", "2").await;
    assert_eq!(a1.recv_broadcast().await["channel"], json!("news"));
    a2.expect_no_broadcast(Duration::from_millis(300)).await;
    assert_eq!(bob.recv_broadcast().await["payload"], json!(1));
    // Subscribing again is allowed.
    a1.subscribe("chat/a").await;
    s.publish("chat/a", "e", "3").await;
    assert_eq!(a1.recv_broadcast().await["payload"], json!(3));
    assert_eq!(bob.recv_broadcast().await["payload"], json!(3));
    let r = post(
        &s,
        "/unsubscribe",
        &json!({"user": "alice", "channel": "*"}),
    )
    .await;
    assert_eq!(r.json(), json!({"subscriptions": 2}), "chat/a and news");
}

#[tokio::test]
async fn connections_per_user_max_refuses_the_extra_auth_on_any_shard() {
    let s = Server::start(
        ServerOpts::shards(2).env("BROADCASTER_LIMITS_CONNECTIONS_PER_USER_MAX", "2"),
    );
    let token = s.token_all("alice");
    let mut first = s.ws_authed("alice").await;
    let _second = s.ws_authed("alice").await;
    let mut third = Ws::connect(s.public).await;
    third
        .call_err("auth", json!({"token": token}), "ResourceExhausted")
        .await;
    // Not counted twice: a refresh of an authenticated connection, and another user.
    first.auth_ok(&token).await;
    let _bob = s.ws_authed("bob").await;
    drop(first);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = third.request("auth", json!({"token": token})).await;
        if r.get("result").is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a closed connection freed no room: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `2026-12-06T10:00:00Z` for `secs` since the epoch.
fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Every connection of `ws` gets `unsubscribed` (reason `revoked`) for `channel`, then 4007.
async fn expect_revoked(ws: &mut Ws, channel: &str) {
    let n = ws.recv_note(WAIT).await;
    assert_eq!(n["method"], json!("unsubscribed"), "{n}");
    assert_eq!(
        n["params"],
        json!({"channel": channel, "reason": "revoked"})
    );
    ws.expect_close(4007, WAIT).await;
}

#[tokio::test]
async fn revoke_by_time_closes_older_tokens_on_every_shard_and_refuses_them() {
    let s = Server::start(ServerOpts::shards(2));
    let cutoff = now_secs();
    let old = TokenSpec::new(&s.secret, "alice")
        .issued_at(cutoff - 60)
        .mint();
    let mut alice = Vec::new();
    while alice.len() < 4 || !every_shard_holds(&s, 2, 1.0).await {
        assert!(alice.len() < 40, "40 connections all on one shard");
        let mut ws = Ws::connect(s.public).await;
        ws.auth_ok(&old).await;
        ws.subscribe("news").await;
        alice.push(ws);
    }
    // Issued at the cutoff's whole second: not before it.
    let fresh = TokenSpec::new(&s.secret, "alice").issued_at(cutoff).mint();
    let mut kept = Ws::connect(s.public).await;
    kept.auth_ok(&fresh).await;
    kept.subscribe("news").await;
    let mut bob = s.ws_authed("bob").await;
    bob.subscribe("news").await;

    let body = json!({"user": "alice", "issuedBefore": rfc3339(cutoff)});
    let r = post(&s, "/revoke", &body).await;
    assert_eq!((r.status, r.json()), (200, json!({"revoked": true})));
    for ws in &mut alice {
        expect_revoked(ws, "news").await;
    }
    let mut again = Ws::connect(s.public).await;
    let refused = again.request("auth", json!({"token": old})).await;
    assert_error(&refused, &refused["requestId"], "Unauthenticated");
    assert!(
        refused.to_string().contains("revoked"),
        "the error says why: {refused}"
    );
    again.auth_ok(&fresh).await;
    s.publish("news", "e", "1").await;
    assert_eq!(kept.recv_broadcast().await["payload"], json!(1));
    assert_eq!(bob.recv_broadcast().await["payload"], json!(1));
}

#[tokio::test]
async fn revoke_by_jti_takes_that_token_only() {
    let s = Server::start(ServerOpts::shards(2));
    let stolen = TokenSpec::new(&s.secret, "alice").jti("j-1").mint();
    let other = TokenSpec::new(&s.secret, "alice").jti("j-2").mint();
    let mut a = Ws::connect(s.public).await;
    a.auth_ok(&stolen).await;
    a.subscribe("news").await;
    let mut b = Ws::connect(s.public).await;
    b.auth_ok(&other).await;

    let r = post(&s, "/revoke", &json!({"jti": "j-1"})).await;
    assert_eq!((r.status, r.json()), (200, json!({"revoked": true})));
    expect_revoked(&mut a, "news").await;
    b.heartbeat_ok().await;
    let mut again = Ws::connect(s.public).await;
    again
        .call_err("auth", json!({"token": stolen}), "Unauthenticated")
        .await;
    again.auth_ok(&other).await;
    // A re-auth of a live connection with the revoked token is refused too.
    b.call_err("auth", json!({"token": stolen}), "Unauthenticated")
        .await;
}

#[tokio::test]
async fn revocations_are_bounded_and_bad_bodies_refused() {
    let s = Server::start(ServerOpts::shards(1).env("BROADCASTER_AUTH_REVOCATIONS_MAX", "2"));
    for jti in ["a", "b", "a"] {
        let r = post(&s, "/revoke", &json!({"jti": jti})).await;
        assert_eq!(r.status, 200, "{jti}: {}", r.text());
    }
    let m = http_get(s.backend(), "/metrics").await.text();
    assert_eq!(metric_sum(&m, "revocations_held"), Some(2.0), "{m}");
    let r = post(&s, "/revoke", &json!({"jti": "c"})).await;
    assert_eq!(
        r.json()["error"]["code"],
        json!("ResourceExhausted"),
        "{}",
        r.text()
    );
    for bad in [
        json!({}),
        json!({"user": "alice"}),
        json!({"user": "alice", "issuedBefore": "yesterday"}),
        json!({"user": "", "issuedBefore": rfc3339(0)}),
        json!({"jti": ""}),
        json!({"jti": 7}),
        json!({"jti": "x", "user": "alice"}),
    ] {
        let r = post(&s, "/revoke", &bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
}

#[tokio::test]
async fn a_single_node_keeps_revocations_in_its_file_across_a_restart() {
    let file = temp_path("-revocations");
    let opts = || {
        ServerOpts::shards(1).env(
            "BROADCASTER_AUTH_REVOCATIONS_FILE",
            file.to_str().expect("a UTF-8 path"),
        )
    };
    let s = Server::start(opts());
    let stolen = TokenSpec::new(&s.secret, "alice").jti("j-9").mint();
    let old = TokenSpec::new(&s.secret, "bob")
        .issued_at(now_secs() - 60)
        .mint();
    let r = post(&s, "/revoke", &json!({"jti": "j-9"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = json!({"user": "bob", "issuedBefore": rfc3339(now_secs() - 1)});
    assert_eq!(post(&s, "/revoke", &body).await.status, 200);
    drop(s);

    let s = Server::start(opts());
    for token in [&stolen, &old] {
        let mut ws = Ws::connect(s.public).await;
        ws.call_err("auth", json!({"token": token}), "Unauthenticated")
            .await;
    }
    s.ws_authed("bob").await.heartbeat_ok().await;
    let _ = std::fs::remove_file(&file);
}
