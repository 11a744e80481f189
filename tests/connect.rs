//! `broadcaster connect` recovers what it missed while its connection was down (SPEC section 2,
//! issue 6): the test cuts its TCP connection through a proxy, publishes meanwhile, and expects
//! every message printed once, in order, after the reconnect. Against a stand-in server, and then
//! the real one's backend endpoints: a close 4007 (token revoked) ends it with an error and no
//! retry, a close 4006 (disconnected by the backend) is reconnected, and a channel the server
//! unsubscribed is not resubscribed (SPEC 17).

mod common;
mod fake_server;

use common::*;
use fake_server::{accept_session, close_with, next_request, send_json, unsubscribed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy whose connections can all be cut at once.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: Arc<tokio::sync::Notify>,
}

async fn proxy(to: std::net::SocketAddr) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cut = Arc::new(tokio::sync::Notify::new());
    let cut2 = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let cut = cut2.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.notified() => {}
                }
            });
        }
    });
    Proxy { addr, cut }
}

async fn wait_for(lines: &Mutex<Vec<String>>, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while printed(lines).len() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: printed so far {:?}",
            printed(lines)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connect_reconnects_and_recovers_what_it_missed() {
    let s = Server::start(ServerOpts::default());
    // Another subscriber keeps the channel (and its epoch) alive while the client is away.
    let mut keeper = s.ws_authed("keeper").await;
    keeper.subscribe("room").await;
    let p = proxy(s.public).await;

    let cli = spawn_cli(
        &format!("ws://{}/ws", p.addr),
        &s.token_all("terminal"),
        &["room"],
    );
    let lines = cli.out.clone();

    // Live: publish until the client shows it is subscribed.
    let deadline = Instant::now() + T;
    let mut n = 0;
    while printed(&lines).is_empty() {
        assert!(
            Instant::now() < deadline,
            "connect never printed a broadcast"
        );
        n += 1;
        s.publish("room", "live", &n.to_string()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Messages published before the subscription started are not for it.
    let first: usize = printed(&lines)[0]
        .rsplit(": ")
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a numeric payload");
    let live = n - first + 1;
    wait_for(&lines, live, "live messages").await;

    // Cut the connection, publish while it is down, and let it come back.
    p.cut.notify_waiters();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 1..=5 {
        s.publish("room", "missed", &(n + i).to_string()).await;
    }
    wait_for(&lines, live + 5, "recovered messages").await;
    s.publish("room", "after", &(n + 6).to_string()).await;
    wait_for(&lines, live + 6, "live after the reconnect").await;

    let got = printed(&lines);
    let payloads: Vec<String> = got
        .iter()
        .map(|l| l.rsplit(": ").next().unwrap_or_default().to_string())
        .collect();
    let expected: Vec<String> = (first..=n + 6).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "every message once, in order: {got:?}");
    assert!(got[live].starts_with("room missed: "), "{got:?}");
}

// ---------------------------------------------------------------------------------------------
// Close codes 4006 and 4007, and `unsubscribed` (SPEC 17, 22.1): against the stand-in server of
// tests/fake_server, which shows each request the client makes, then the backend's endpoints.
// ---------------------------------------------------------------------------------------------

/// Waits for a line containing `want`.
async fn wait_text(lines: &Mutex<Vec<String>>, want: &str) {
    let deadline = Instant::now() + T;
    while !printed(lines).iter().any(|l| l.contains(want)) {
        assert!(
            Instant::now() < deadline,
            "no line with {want:?}: {:?}",
            printed(lines)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 4007: the token was revoked. The CLI says so and that a new token is needed, exits non-zero,
/// and does not try the same token again.
#[tokio::test]
async fn connect_exits_on_close_4007_without_retrying() {
    let mut fake = fake_server::start().await;
    let cli = spawn_cli(&fake.ws_url(), "t", &["room"]);
    let mut ws = fake.next_conn("the CLI's connection").await;
    accept_session(&mut ws, 1).await;
    close_with(ws, 4007, "token revoked").await;
    let (status, said) = cli.finish().await;
    assert!(!status.success(), "{status}: {said}");
    assert!(
        said.contains("broadcaster: the token was revoked (closed 4007: token revoked)")
            && said.contains("get a new token"),
        "{said}"
    );
    assert!(!said.contains("reconnecting"), "{said}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!fake.has_conn(), "it connected again");
}

/// 4006: the backend disconnected the client, which may come back: it reconnects and
/// resubscribes every channel with `since` from where it was.
#[tokio::test]
async fn connect_reconnects_after_close_4006() {
    let mut fake = fake_server::start().await;
    let mut cli = spawn_cli(&fake.ws_url(), "t", &["a", "b"]);
    let mut ws = fake.next_conn("the CLI's connection").await;
    accept_session(&mut ws, 2).await;
    let b = serde_json::json!({"method": "broadcast", "params": {"id": "m8", "seq": 1,
        "offset": 8, "createTime": "2026-12-01T00:00:00Z", "channel": "a", "event": "e",
        "payload": 1}});
    send_json(&mut ws, b).await;
    wait_text(&cli.out, "a e: 1").await;
    close_with(ws, 4006, "bye\u{1b}[2J").await;

    let mut ws = fake.next_conn("a reconnect after 4006").await;
    let subscribes = accept_session(&mut ws, 2).await.subscribes;
    assert_eq!(
        subscribes,
        [
            serde_json::json!({"channel": "a", "since": {"offset": 8, "epoch": "e1"}}),
            serde_json::json!({"channel": "b", "since": {"offset": 7, "epoch": "e1"}}),
        ]
    );
    // The backend's reason is shown escaped: it must not drive the terminal.
    wait_text(
        &cli.err,
        r"connection lost (disconnected by the backend, closed 4006: bye\u{1b}[2J); reconnecting",
    )
    .await;
    assert!(cli.child.try_wait().expect("try_wait").is_none());
}

/// `unsubscribed` (SPEC 17): said on stderr with its reason; that channel is not resubscribed
/// after a reconnect; stdin lines still go to the first channel named (never to another
/// audience); and with no channel left the CLI exits 0.
#[tokio::test]
async fn connect_does_not_resubscribe_what_the_server_unsubscribed() {
    let mut fake = fake_server::start().await;
    let mut cli = spawn_cli(&fake.ws_url(), "t", &["a", "b"]);
    let mut ws = fake.next_conn("the CLI's connection").await;
    accept_session(&mut ws, 2).await;
    send_json(&mut ws, unsubscribed("a", "server")).await;
    wait_text(&cli.err, "unsubscribed from a (server)").await;
    drop(ws); // a network failure: no close frame

    let mut ws = fake.next_conn("a reconnect").await;
    let subscribes = accept_session(&mut ws, 1).await.subscribes;
    assert_eq!(subscribes[0]["channel"], "b", "{subscribes:?}");
    let stdin = cli.child.stdin.as_mut().expect("stdin");
    stdin.write_all(b"hello\n").await.expect("write stdin");
    stdin.flush().await.expect("flush stdin");
    let req = next_request(&mut ws, T).await.expect("the publish");
    assert_eq!(req["method"], "publish", "no other subscribe: {req}");
    assert_eq!(req["params"]["channel"], "a", "{req}");

    send_json(&mut ws, unsubscribed("b", "permission")).await;
    let (status, said) = cli.finish().await;
    assert!(status.success(), "{status}: {said}");
    assert!(
        said.contains("unsubscribed from b (permission)") && said.contains("no channel left"),
        "{said}"
    );
}

/// The subscribers of `channel` on the server (0 when it has none).
async fn subscribers(s: &Server, channel: &str) -> u64 {
    let v = http_get_key(s.public, "/channels", API_KEY).await.json();
    v["channels"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["channel"] == channel))
        .and_then(|c| c["subscribers"].as_u64())
        .unwrap_or(0)
}

/// Waits until the server counts `want` subscribers of `channel`.
async fn wait_subscribers(s: &Server, channel: &str, want: u64) {
    let deadline = Instant::now() + T;
    while subscribers(s, channel).await != want {
        assert!(
            Instant::now() < deadline,
            "{channel}: never {want} subscribers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn backend_post(s: &Server, path: &str, body: serde_json::Value) -> serde_json::Value {
    let r = http_post_key(s.backend(), path, API_KEY, &body.to_string()).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

/// SPEC 17 end to end, the backend's endpoints against `broadcaster connect`: `POST
/// /unsubscribe` is said and that channel stays unsubscribed across the reconnect a `POST
/// /disconnect` (4006) brings; a `POST /disconnect` with 4007 ends it with an error.
#[tokio::test]
async fn connect_follows_the_backend_endpoints() {
    let s = Server::start(ServerOpts::default());
    let token = s.token("u-cli", &["a", "b"], &["subscribe"]);
    let cli = spawn_cli(&s.ws_url(), &token, &["a", "b"]);
    wait_subscribers(&s, "a", 1).await;
    wait_subscribers(&s, "b", 1).await;

    let body = serde_json::json!({"user": "u-cli", "channel": "b"});
    let r = backend_post(&s, "/unsubscribe", body).await;
    assert_eq!(r, serde_json::json!({"subscriptions": 1}));
    wait_text(&cli.err, "unsubscribed from b (server)").await;

    let r = backend_post(&s, "/disconnect", serde_json::json!({"user": "u-cli"})).await;
    assert_eq!(r, serde_json::json!({"connections": 1}));
    wait_text(&cli.err, "disconnected by the backend, closed 4006").await;
    // Back on `a` only. Published until shown: the subscribe may still be on its way.
    let deadline = Instant::now() + T;
    while !printed(&cli.out).iter().any(|l| l.starts_with("a after: ")) {
        assert!(
            Instant::now() < deadline,
            "no broadcast after the reconnect"
        );
        s.publish("a", "after", "1").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(subscribers(&s, "a").await, 1);
    assert_eq!(subscribers(&s, "b").await, 0);

    let body = serde_json::json!({"user": "u-cli", "code": 4007, "reason": "token revoked"});
    let r = backend_post(&s, "/disconnect", body).await;
    assert_eq!(r, serde_json::json!({"connections": 1}));
    let (status, said) = cli.finish().await;
    assert!(!status.success(), "{status}: {said}");
    assert!(
        said.contains("the token was revoked (closed 4007: token revoked)"),
        "{said}"
    );
    assert_eq!(said.matches("connected to").count(), 2, "{said}");
}
