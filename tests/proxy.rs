//! SPEC 15 against a real HTTP backend started here on 127.0.0.1:0 (HTTP/1.1 with keep-alive,
//! Content-Length or chunked answers): allow, deny, the backend's own error codes, garbage,
//! 5xx, a slow backend, a down backend, overload, the cache, `expireAt` re-checks, the connect
//! proxy, and the secret and the cookie reaching the backend but never the logs.

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXY_SECRET: &str = "proxy-secret-5b7e1c9d";
const COOKIE: &str = "ouat=session-4f2a77e0";

/// One request as the backend saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// The access backend: answers by the channel's name (`contest/allow…`, `contest/deny…`, ...).
#[derive(Clone, Default)]
struct Backend {
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// Calls on `contest/expire…` so far: the first allows for a second, the next deny.
    expire_calls: Arc<AtomicUsize>,
    /// Connect calls with the `refresh` cookie so far.
    refresh_calls: Arc<AtomicUsize>,
    /// `contest/hold…` answers only once this is notified.
    hold: Arc<tokio::sync::Notify>,
}

impl Backend {
    async fn start() -> (Backend, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Backend::default();
        let b = backend.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                b.connections.fetch_add(1, SeqCst);
                tokio::spawn(b.clone().serve(stream));
            }
        });
        (backend, addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn calls_for(&self, channel: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.body["channel"] == json!(channel))
            .count()
    }

    /// Requests on one connection, keep-alive, until the node closes it.
    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some((head, body)) = read_request(&mut stream, &mut buf).await else {
                return;
            };
            let (path, authorization) = parse_head(&head);
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            self.seen.lock().unwrap().push(Seen {
                path: path.clone(),
                authorization,
                body: body.clone(),
            });
            let answer = if path == "/connect" {
                let cookie = body["headers"]["Cookie"].as_str().unwrap_or_default();
                let calls = if cookie.contains("refresh") {
                    self.refresh_calls.fetch_add(1, SeqCst)
                } else {
                    0
                };
                connect_answer(&body, calls)
            } else {
                self.subscribe_answer(&body).await
            };
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    async fn subscribe_answer(&self, body: &Value) -> String {
        let channel = body["channel"].as_str().unwrap_or_default();
        let name = channel.strip_prefix("contest/").unwrap_or_default();
        let kind = name.split('-').next().unwrap_or_default();
        match kind {
            "allow" => json_answer(json!({"result": {"allow": true}})),
            "deny" => json_answer(json!({"result": {"allow": false}})),
            "code" => {
                json_answer(json!({"error": {"code": "NotFound", "message": "no such contest"}}))
            }
            "weird" => json_answer(json!({"error": {"code": "Teapot", "message": "short"}})),
            "garbage" => "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!".into(),
            "fail" => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".into(),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                json_answer(json!({"result": {"allow": true}}))
            }
            "hold" => {
                self.hold.notified().await;
                json_answer(json!({"result": {"allow": true}}))
            }
            "chunked" => {
                let body = r#"{"result":{"allow":true}}"#;
                let (a, b) = body.split_at(10);
                format!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                )
            }
            "expire" => {
                if self.expire_calls.fetch_add(1, SeqCst) == 0 {
                    let at = SystemTime::now() + Duration::from_secs(2);
                    let at = humantime::format_rfc3339_seconds(at).to_string();
                    json_answer(json!({"result": {"allow": true, "expireAt": at}}))
                } else {
                    json_answer(json!({"result": {"allow": false}}))
                }
            }
            _ => json_answer(json!({"result": {"allow": false}})),
        }
    }
}

fn connect_answer(body: &Value, calls: usize) -> String {
    let cookie = body["headers"]["Cookie"].as_str().unwrap_or_default();
    // "expiring": 2 s; "refresh": 2 s on the first call, an hour after (a refreshed session).
    let short = cookie.contains("expiring") || (cookie.contains("refresh") && calls == 0);
    let exp = now_secs() + if short { 2 } else { 3600 };
    if cookie.contains("ouat=") && !cookie.contains("bad") {
        json_answer(json!({"result": {
            "sub": "alice", "exp": exp, "authorizedChannels": ["room/*"],
            "scope": ["subscribe", "publish"], "info": {"username": "alice"}
        }}))
    } else {
        json_answer(json!({"error": {"code": "Unauthenticated", "message": "no session"}}))
    }
}

fn json_answer(v: Value) -> String {
    let body = v.to_string();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = header_value(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_head(head: &str) -> (String, Option<String>) {
    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
    (path, header_value(head, "authorization"))
}

fn config(backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[[channels]]
pattern = "contest/*"
access = "proxy"

[[channels]]
pattern = "room/*"

[proxy]
secret = "{PROXY_SECRET}"
subscribe_url = "http://{backend}/subscribe"
connect_url = "http://{backend}/connect"
forward_headers = ["Cookie"]
timeout = "1s"
{extra}
"#
    )
}

fn server(backend: SocketAddr, extra: &str, env: &[(&str, &str)]) -> Server {
    let mut o = ServerOpts {
        shards: 1,
        config_toml: Some(config(backend, extra)),
        ..Default::default()
    };
    for (k, v) in env {
        o = o.env(k, v);
    }
    Server::start(o)
}

async fn viewer(s: &Server) -> Ws {
    ws_from(s.public, "127.0.0.1", &[("Cookie", COOKIE)])
        .await
        .unwrap()
}

#[tokio::test]
async fn the_backend_allows_denies_and_its_errors_reach_the_client() {
    let (backend, addr) = Backend::start().await;
    let s = server(addr, "", &[]);
    let mut ws = viewer(&s).await;
    ws.subscribe("contest/allow-1").await;
    ws.subscribe("contest/chunked-1").await;
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/deny-1"}),
        "PermissionDenied",
    )
    .await;
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/code-1"}),
        "NotFound",
    )
    .await;
    let r = ws
        .request("subscribe", json!({"channel": "contest/code-2"}))
        .await;
    assert_eq!(r["error"]["message"], json!("no such contest"), "{r}");
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/weird-1"}),
        "Internal",
    )
    .await;
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/garbage-1"}),
        "Internal",
    )
    .await;
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/fail-1"}),
        "Unavailable",
    )
    .await;
    let started = Instant::now();
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/slow-1"}),
        "Unavailable",
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "{took:?}"
    );
    s.publish("contest/allow-1", "e", "1").await;
    assert_eq!(
        ws.recv_broadcast().await["channel"],
        json!("contest/allow-1")
    );
    // What the backend got: the secret as a bearer token, the cookie, the user (null before
    // auth), the connection and node.
    let seen = backend.seen();
    let first = &seen[0];
    assert_eq!(first.path, "/subscribe");
    assert_eq!(
        first.authorization.as_deref(),
        Some(format!("Bearer {PROXY_SECRET}").as_str())
    );
    assert_eq!(first.body["channel"], json!("contest/allow-1"));
    assert_eq!(first.body["user"], Value::Null);
    assert_eq!(first.body["headers"], json!({"Cookie": COOKIE}));
    assert!(
        first.body["connection"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{:?}",
        first.body
    );
    assert!(
        first.body["node"].as_str().is_some_and(|c| !c.is_empty()),
        "{:?}",
        first.body
    );
    // Authenticated: the token's sub.
    ws.auth_ok(&s.token("alice", &["x"], &["subscribe"])).await;
    ws.subscribe("contest/allow-2").await;
    assert_eq!(backend.seen().last().unwrap().body["user"], json!("alice"));
    let text = http_get(s.backend(), "/metrics").await.text();
    let count = |result: &str| -> f64 {
        let result = format!("result=\"{result}\"");
        metric_labelled(
            &text,
            "proxy_requests_total",
            &["kind=\"subscribe\"", &result],
        )
    };
    assert_eq!(count("allow"), 3.0, "{text}");
    assert_eq!(count("deny"), 1.0);
    assert_eq!(count("timeout"), 1.0);
    assert_eq!(count("error"), 5.0);
    assert!(text.contains("proxy_request_seconds_bucket{"), "{text}");
}

#[tokio::test]
async fn a_down_backend_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let s = server(addr, "", &[]);
    let mut ws = viewer(&s).await;
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/allow-1"}),
        "Unavailable",
    )
    .await;
    ws.call_err("auth", json!({"proxy": true}), "Unavailable")
        .await;
    ws.heartbeat_ok().await;
}

#[tokio::test]
async fn allow_decisions_are_cached_per_user_and_channel_and_connections_kept_alive() {
    let (backend, addr) = Backend::start().await;
    let s = server(addr, "subscribe_cache_ttl = \"1s\"", &[]);
    let mut alice = viewer(&s).await;
    alice.auth_ok(&s.token("alice", &[], &["subscribe"])).await;
    for _ in 0..3 {
        alice.subscribe("contest/allow-c").await;
        alice
            .call("unsubscribe", json!({"channel": "contest/allow-c"}))
            .await;
    }
    assert_eq!(backend.calls_for("contest/allow-c"), 1, "cached for alice");
    let mut bob = viewer(&s).await;
    bob.auth_ok(&s.token("bob", &[], &["subscribe"])).await;
    bob.subscribe("contest/allow-c").await;
    assert_eq!(
        backend.calls_for("contest/allow-c"),
        2,
        "bob is asked about"
    );
    // Anonymous connections are never cached: cookies differ, the user does not.
    for _ in 0..2 {
        let mut anon = viewer(&s).await;
        anon.subscribe("contest/allow-c").await;
    }
    assert_eq!(backend.calls_for("contest/allow-c"), 4);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    alice.subscribe("contest/allow-c").await;
    assert_eq!(
        backend.calls_for("contest/allow-c"),
        5,
        "the cache entry expired"
    );
    // Sequential calls from one shard: one keep-alive connection.
    assert_eq!(backend.connections.load(SeqCst), 1);
}

#[tokio::test]
async fn expire_at_is_rechecked_and_a_denial_ends_the_subscription() {
    let (backend, addr) = Backend::start().await;
    let s = server(addr, "", &[]);
    let mut ws = viewer(&s).await;
    ws.auth_ok(&s.token_all("alice")).await;
    ws.subscribe("contest/expire-1").await;
    ws.subscribe("news").await;
    s.publish("contest/expire-1", "e", "1").await;
    assert_eq!(ws.recv_broadcast().await["payload"], json!(1));
    // At expireAt (2 s, whole seconds) the backend is asked again and denies.
    let t = ws.recv_text_within(Duration::from_secs(5)).await;
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(
        v,
        json!({"method": "unsubscribed", "params": {"channel": "contest/expire-1", "reason": "expired"}})
    );
    assert_eq!(backend.calls_for("contest/expire-1"), 2);
    s.publish("contest/expire-1", "e", "2").await;
    s.publish("news", "e", "3").await;
    let b = ws.recv_broadcast().await;
    assert_eq!(
        b["channel"],
        json!("news"),
        "no broadcast of the ended channel: {b}"
    );
    // Subscribing again asks again (the denial is not cached).
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/expire-1"}),
        "PermissionDenied",
    )
    .await;
}

#[tokio::test]
async fn calls_over_concurrency_max_are_unavailable_at_once() {
    let (backend, addr) = Backend::start().await;
    let s = server(addr, "concurrency_max = 1", &[]);
    let mut holder = viewer(&s).await;
    let id = 77;
    holder
        .send_text(
            &json!({"id": id, "method": "subscribe", "params": {"channel": "contest/hold-1"}})
                .to_string(),
        )
        .await;
    // Wait until the backend holds the call.
    let deadline = Instant::now() + T;
    while backend.calls_for("contest/hold-1") == 0 {
        assert!(Instant::now() < deadline, "the held call never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut other = viewer(&s).await;
    let started = Instant::now();
    other
        .call_err(
            "subscribe",
            json!({"channel": "contest/allow-o"}),
            "Unavailable",
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    backend.hold.notify_one();
    let r = holder.next_response().await;
    assert_eq!(r["requestId"], json!(id));
    assert!(r["result"]["subscriptionId"].is_string(), "{r}");
    other.subscribe("contest/allow-o").await;
}

#[tokio::test]
async fn the_connect_proxy_turns_the_cookie_into_permissions() {
    let (backend, addr) = Backend::start().await;
    let s = server(addr, "", &[]);
    let mut ws = viewer(&s).await;
    assert_eq!(
        ws.call("auth", json!({"proxy": true})).await,
        json!({"success": true})
    );
    let seen = backend.seen();
    let call = seen.iter().find(|c| c.path == "/connect").unwrap();
    assert_eq!(call.body["headers"], json!({"Cookie": COOKIE}));
    assert_eq!(
        call.authorization.as_deref(),
        Some(format!("Bearer {PROXY_SECRET}").as_str())
    );
    // The answer's authorizedChannels and scope, as a token's.
    ws.subscribe("room/1").await;
    ws.call_err("subscribe", json!({"channel": "other"}), "PermissionDenied")
        .await;
    let publish = json!({"channel": "room/1", "event": "e", "payload": {"a": 1}});
    ws.call("publish", publish).await;
    assert_eq!(ws.recv_broadcast().await["payload"], json!({"a": 1}));
    // The backend's refusal passes through; bad params are InvalidArgument.
    let mut bad = ws_from(s.public, "127.0.0.1", &[("Cookie", "ouat=bad")])
        .await
        .unwrap();
    bad.call_err("auth", json!({"proxy": true}), "Unauthenticated")
        .await;
    bad.call_err("auth", json!({"proxy": false}), "InvalidArgument")
        .await;
    bad.call_err(
        "auth",
        json!({"proxy": true, "token": "x"}),
        "InvalidArgument",
    )
    .await;
    // exp is enforced as a token's: close 4002.
    let mut short = ws_from(s.public, "127.0.0.1", &[("Cookie", "ouat=expiring")])
        .await
        .unwrap();
    short.call("auth", json!({"proxy": true})).await;
    short.expect_close(4002, Duration::from_secs(5)).await;
    // Re-auth through the proxy refreshes: the second answer's exp is an hour away.
    let mut refreshed = ws_from(s.public, "127.0.0.1", &[("Cookie", "ouat=refresh")])
        .await
        .unwrap();
    refreshed.call("auth", json!({"proxy": true})).await;
    refreshed.call("auth", json!({"proxy": true})).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    refreshed.heartbeat_ok().await;
    assert_eq!(backend.refresh_calls.load(SeqCst), 2);
}

#[tokio::test]
async fn without_a_connect_url_proxy_auth_is_a_failed_precondition() {
    let o = ServerOpts {
        shards: 1,
        ..Default::default()
    };
    let s = Server::start(o);
    let mut ws = Ws::connect(s.public).await;
    ws.call_err("auth", json!({"proxy": true}), "FailedPrecondition")
        .await;
}

/// The secret, the cookie and tokens reach the backend and nowhere else: not in the server's
/// output at the most verbose level.
#[tokio::test]
async fn secrets_and_cookies_never_reach_the_logs() {
    let (backend, addr) = Backend::start().await;
    let s = server(addr, "", &[("RUST_LOG", "trace")]);
    let mut ws = viewer(&s).await;
    ws.call("auth", json!({"proxy": true})).await;
    ws.subscribe("contest/allow-l").await;
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/garbage-l"}),
        "Internal",
    )
    .await;
    ws.call_err(
        "subscribe",
        json!({"channel": "contest/fail-l"}),
        "Unavailable",
    )
    .await;
    drop(ws);
    assert!(backend.calls_for("contest/allow-l") == 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = s.stderr();
    assert!(
        logs.contains("access backend"),
        "the failures are logged: {logs}"
    );
    for secret in [PROXY_SECRET, "session-4f2a77e0"] {
        assert!(!logs.contains(secret), "{secret} in the logs");
    }
}

/// SSE (SPEC 19) takes the same decisions before its stream: the connect proxy turns the
/// forwarded cookie into permissions for a token channel, and the access proxy allows or
/// denies a proxy channel; refusals are REST errors.
#[tokio::test]
async fn event_streams_ask_the_same_backend() {
    let (backend, addr) = Backend::start().await;
    let s = server(addr, "", &[]);
    let open = |target: &'static str, cookie: &'static str| {
        let addr = s.public;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n"
            );
            stream.write_all(req.as_bytes()).await.unwrap();
            let (head, mut rest) = read_http_head(&mut stream).await;
            let status: u16 = head[9..12].parse().unwrap();
            // Enough of the stream (or the error) to look at.
            while status == 200 && !String::from_utf8_lossy(&rest).contains("event: subscribed") {
                let mut tmp = [0u8; 4096];
                let n = within(T, "the stream", stream.read(&mut tmp))
                    .await
                    .unwrap();
                assert!(n > 0, "ended early: {:?}", String::from_utf8_lossy(&rest));
                rest.extend_from_slice(&tmp[..n]);
            }
            (status, String::from_utf8_lossy(&rest).into_owned())
        }
    };
    let (status, text) = open("/sse?channel=room/1", COOKIE).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"channel\":\"room/1\""), "{text}");
    let call = backend
        .seen()
        .into_iter()
        .find(|c| c.path == "/connect")
        .unwrap();
    assert_eq!(call.body["headers"], json!({"Cookie": COOKIE}));
    let (status, text) = open("/sse?channel=room/1", "ouat=bad").await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("Unauthenticated"), "{text}");
    let (status, text) = open("/sse?channel=other", COOKIE).await;
    assert_eq!(status, 403, "{text}");
    let (status, text) = open("/sse?channel=contest/allow-sse", "none=1").await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = open("/sse?channel=contest/deny-sse", "none=1").await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("PermissionDenied"), "{text}");
    // A stream of proxy channels only never asked the connect proxy.
    let connects = backend
        .seen()
        .iter()
        .filter(|c| c.path == "/connect")
        .count();
    assert_eq!(connects, 3, "{:?}", backend.seen());

    // expireAt is re-checked: the backend's later denial ends the channel with `unsubscribed`.
    let mut stream = TcpStream::connect(s.public).await.unwrap();
    let req =
        "GET /sse?channel=contest/expire-sse&channel=contest/allow-2 HTTP/1.1\r\nHost: x\r\n\r\n";
    stream.write_all(req.as_bytes()).await.unwrap();
    let (head, mut rest) = read_http_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let unsubscribed = "event: unsubscribed\ndata: {\"channel\":\"contest/expire-sse\",\"reason\":\"expired\"}\n\n";
    while !String::from_utf8_lossy(&rest).contains(unsubscribed) {
        let mut tmp = [0u8; 4096];
        let n = within(
            Duration::from_secs(6),
            "the unsubscribed event",
            stream.read(&mut tmp),
        )
        .await
        .unwrap();
        assert!(n > 0, "ended: {:?}", String::from_utf8_lossy(&rest));
        rest.extend_from_slice(&tmp[..n]);
    }
    assert_eq!(backend.calls_for("contest/expire-sse"), 2);
}
