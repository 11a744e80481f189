//! Operating the server: metrics that move, logs without secrets, TLS on every listener.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metrics(s: &Server) -> String {
    let r = http_get(s.public, "/metrics").await;
    assert_eq!(r.status, 200);
    r.text()
}

fn value(text: &str, name: &str) -> f64 {
    metric_sum(text, name).unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
}

/// Polls /metrics until `name` equals `want` (gauges settle after a close is processed).
async fn settle(s: &Server, name: &str, want: f64) {
    let deadline = Instant::now() + T;
    loop {
        let v = value(&metrics(s).await, name);
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_move_with_connect_subscribe_publish_and_disconnect() {
    let s = Server::start(ServerOpts::shards(2));
    let before = metrics(&s).await;
    assert_eq!(value(&before, "connections_active"), 0.0);
    assert_eq!(value(&before, "subscriptions_total"), 0.0);
    let received0 = value(&before, "messages_received_total");
    let sent0 = value(&before, "messages_sent_total");

    let mut a = s.ws_authed("a").await;
    let mut b = s.ws_authed("b").await;
    settle(&s, "connections_active", 2.0).await;
    a.subscribe("m").await;
    b.subscribe("m").await;
    settle(&s, "subscriptions_total", 2.0).await;

    s.publish("m", "e", "1").await;
    a.recv_broadcast().await;
    b.recv_broadcast().await;
    let after = metrics(&s).await;
    assert_eq!(value(&after, "messages_received_total"), received0 + 1.0);
    assert_eq!(value(&after, "messages_sent_total"), sent0 + 2.0);
    assert!(
        value(&after, "publish_to_write_seconds_count") >= 2.0,
        "{after}"
    );

    let mut c = Ws::connect(s.public).await;
    let r = c.request("auth", json!({"token": "not-a-jwt"})).await;
    assert_eq!(r["error"]["code"], "Unauthenticated");
    let m = metrics(&s).await;
    assert!(value(&m, "auth_failures_total") >= 1.0);
    let unauthenticated: f64 = parse_metrics(&m)
        .samples
        .iter()
        .filter(|s| s.metric == "rejected_requests_total")
        .filter(|s| s.labels.get("code") == Some("Unauthenticated"))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            ref v => panic!("{v:?}"),
        })
        .sum();
    assert_eq!(unauthenticated, 1.0, "{m}");

    drop(a);
    drop(b);
    drop(c);
    settle(&s, "connections_active", 0.0).await;
    settle(&s, "subscriptions_total", 0.0).await;
}

/// Issue 14: each series once. Per-shard figures carry a `shard` label and no total beside
/// them, so sums over shards (what Prometheus and dashboards do) are the truth; node-wide ones
/// (`process_*`, build info) have no label. Read with a Prometheus text-format parser.
#[tokio::test]
async fn metrics_are_one_series_per_shard_and_sum_to_what_is_open() {
    let s = Server::start(ServerOpts::shards(2));
    let mut conns = Vec::new();
    for i in 0..6 {
        let mut ws = s.ws_authed(&format!("u{i}")).await;
        for c in 0..i % 3 {
            ws.subscribe(&format!("ch{c}")).await;
        }
        conns.push(ws);
    }
    // 6 connections; subscriptions 0+1+2+0+1+2.
    settle(&s, "connections_active", 6.0).await;
    settle(&s, "subscriptions_total", 6.0).await;
    let r = http_get(s.public, "/metrics").await;
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    let scrape = parse_metrics(&text);
    let mut labelled = std::collections::BTreeSet::new();
    let mut plain = std::collections::BTreeSet::new();
    for sample in &scrape.samples {
        let name = sample.metric.clone();
        match sample.labels.get("shard") {
            Some(shard) => {
                assert!(["0", "1"].contains(&shard), "{name} shard {shard}");
                labelled.insert(name);
            }
            None => {
                plain.insert(name);
            }
        }
    }
    let both: Vec<_> = labelled.intersection(&plain).collect();
    assert!(
        both.is_empty(),
        "with and without a shard label: {both:?}\n{text}"
    );
    for name in [
        "connections_active",
        "subscriptions_total",
        "messages_sent_total",
        "messages_received_total",
        "publish_to_write_seconds",
        "slow_consumers_total",
        "rejected_requests_total",
    ] {
        assert!(labelled.contains(name), "{name} is not per shard:\n{text}");
    }
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "broadcaster_build_info",
    ] {
        assert!(plain.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(value(&text, "connections_active"), 6.0);
    assert_eq!(value(&text, "subscriptions_total"), 6.0);
    assert!(value(&text, "process_open_fds") >= 6.0);
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);
    let build = scrape
        .samples
        .iter()
        .find(|s| s.metric == "broadcaster_build_info")
        .unwrap();
    assert_eq!(build.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(build.value, prometheus_parse::Value::Gauge(1.0));
    // Every series has its help text.
    for name in labelled.iter().chain(&plain) {
        let family = name
            .strip_suffix("_sum")
            .or_else(|| name.strip_suffix("_count"))
            .filter(|f| scrape.docs.contains_key(*f))
            .unwrap_or(name);
        assert!(scrape.docs.contains_key(family), "no HELP for {name}");
    }
    drop(conns);
    settle(&s, "connections_active", 0.0).await;
}

#[tokio::test]
async fn logs_carry_connection_fields_but_never_a_token_or_key() {
    let s = Server::start(ServerOpts::shards(1).env("RUST_LOG", "debug"));
    let token = s.token_all("alice");
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&token).await;
    ws.subscribe("logs").await;
    s.publish("logs", "e", "{}").await;
    ws.recv_broadcast().await;
    let bad = TokenSpec::new("wrong-secret", "mallory").mint();
    let r = ws.request("auth", json!({"token": bad})).await;
    assert_eq!(r["error"]["code"], "Unauthenticated");
    drop(ws);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = s.stderr();
    assert!(
        log.contains("conn="),
        "debug logs name the connection:\n{log}"
    );
    assert!(log.contains("shard="), "debug logs name the shard:\n{log}");
    for secret in [token.as_str(), bad.as_str(), API_KEY, API_KEY_2, SECRET] {
        assert!(!log.contains(secret), "a secret leaked into the log");
    }
}

struct Tls {
    cert: String,
    client: Arc<rustls::ClientConfig>,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

fn self_signed() -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert = ck.cert.pem();
    let cert_path = temp_path(".crt");
    let key_path = temp_path(".key");
    std::fs::write(&cert_path, &cert).expect("write cert");
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).expect("write key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Tls {
        cert,
        client: Arc::new(client),
        cert_path,
        key_path,
    }
}

async fn tls_connect(
    tls: &Tls,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    within(
        T,
        "tls handshake",
        tokio_rustls::TlsConnector::from(tls.client.clone()).connect(name, tcp),
    )
    .await
    .expect("tls handshake")
}

#[tokio::test]
async fn tls_serves_https_and_wss_on_every_listener() {
    let tls = self_signed();
    assert!(tls.cert.contains("BEGIN CERTIFICATE"));
    let mut opts = ServerOpts::shards(2)
        .env(
            "BROADCASTER_TLS_CERT_FILE",
            &tls.cert_path.to_string_lossy(),
        )
        .env("BROADCASTER_TLS_KEY_FILE", &tls.key_path.to_string_lossy());
    opts.admin = true;
    let s = Server::start(opts);

    // https on both listeners.
    for addr in [s.public, s.backend()] {
        let mut stream = tls_connect(&tls, addr).await;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        within(T, "https answer", stream.read_to_end(&mut answer))
            .await
            .ok();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("{\"status\":\"ok\"}"), "{text}");
    }

    // wss: auth, subscribe, then a publish over https reaches it.
    let stream = tls_connect(&tls, s.public).await;
    let (mut ws, _) = within(
        T,
        "wss handshake",
        tokio_tungstenite::client_async("wss://localhost/ws", stream),
    )
    .await
    .expect("wss handshake");
    let token = s.token_all("tls-user");
    let send = |v: Value| tokio_tungstenite::tungstenite::Message::text(v.to_string());
    ws.send(send(
        json!({"id":1,"method":"auth","params":{"token":token}}),
    ))
    .await
    .expect("send");
    ws.send(send(
        json!({"id":2,"method":"subscribe","params":{"channel":"secure"}}),
    ))
    .await
    .expect("send");
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let msg = within(T, "wss answer", ws.next())
            .await
            .expect("open")
            .expect("frame");
        answers.push(serde_json::from_str::<Value>(msg.to_text().expect("text")).expect("json"));
    }
    assert_eq!(answers[0]["result"]["success"], true, "{answers:?}");
    assert_eq!(answers[1]["result"]["offset"], 0, "{answers:?}");

    let body = publish_body("secure", "e", "{\"tls\":true}");
    let mut https = tls_connect(&tls, s.backend()).await;
    let request = format!(
        "POST /publish HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    https.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    within(T, "publish answer", https.read_to_end(&mut answer))
        .await
        .ok();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let msg = within(T, "broadcast over wss", ws.next())
        .await
        .expect("open")
        .expect("frame");
    let v: Value = serde_json::from_str(msg.to_text().expect("text")).expect("json");
    assert_eq!(v["method"], "broadcast");
    assert_eq!(v["params"]["payload"], json!({"tls": true}));
    assert_eq!(v["params"]["seq"], 1);

    // Plain HTTP to a TLS listener gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(s.public).await.expect("tcp");
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), plain.read(&mut answer))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    assert!(
        !answer[..n].starts_with(b"HTTP/1.1 200"),
        "plain HTTP must not be served on a TLS listener"
    );
}

#[tokio::test]
async fn bad_tls_files_stop_the_server_naming_the_key() {
    let missing = temp_path(".crt");
    let out = run_cli(
        &["serve", "--listen", "127.0.0.1:0", "--shards", "1"],
        &[
            ("BROADCASTER_AUTH_JWT_SECRET", SECRET),
            ("BROADCASTER_TLS_CERT_FILE", &missing.to_string_lossy()),
            ("BROADCASTER_TLS_KEY_FILE", &missing.to_string_lossy()),
        ],
        T,
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert_file"), "{err}");
}
