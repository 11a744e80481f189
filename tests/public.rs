//! SPEC 14 on one node: channel rules, public channels before `auth`, the anonymous caps (per
//! node, per client address, `X-Forwarded-For` from trusted proxies only), rewind and
//! `rewind_default`, per-rule history, and the rules' hash in `/health`.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const RULES: &str = r#"
[[channels]]
pattern = "scoreboard/*"
access = "public"
history_size = 1
rewind_default = 1

[[channels]]
pattern = "board/*"
access = "public"
history_size = 10

[[channels]]
pattern = "short/*"
history_size = 2
"#;

fn server(shards: usize, env: &[(&str, &str)]) -> Server {
    let mut o = ServerOpts::shards(shards);
    o.config_toml = Some(RULES.into());
    for (k, v) in env {
        o = o.env(k, v);
    }
    Server::start(o)
}

/// Offsets of the next `n` broadcasts, checking that their `seq` counts from `first_seq`.
async fn offsets(ws: &mut Ws, n: usize, first_seq: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 0..n {
        let b = ws.recv_broadcast().await;
        assert_eq!(b["seq"], json!(first_seq + i as u64), "{b}");
        out.push(b["offset"].as_u64().unwrap());
    }
    out
}

#[tokio::test]
async fn public_channels_work_before_auth_and_nothing_else_does() {
    let s = server(2, &[]);
    let mut ws = Ws::connect(s.public).await;
    ws.heartbeat_ok().await;
    let r = ws.subscribe("board/a").await;
    assert!(r["offset"].is_u64() && r.get("rewound").is_none(), "{r}");
    s.publish("board/a", "e", r#"{"n":1}"#).await;
    let b = ws.recv_broadcast().await;
    assert_eq!(
        (b["channel"].clone(), b["seq"].clone()),
        (json!("board/a"), json!(1))
    );
    // SPEC 22.4: a token channel before auth is Unauthenticated, not PermissionDenied.
    ws.call_err("subscribe", json!({"channel": "chat"}), "Unauthenticated")
        .await;
    ws.call_err("unsubscribe", json!({"channel": "chat"}), "Unauthenticated")
        .await;
    let publish = json!({"channel": "board/a", "event": "e", "payload": 1});
    ws.call_err("publish", publish, "Unauthenticated").await;
    ws.call_err("unsubscribe", json!({"channel": "board/b"}), "NotFound")
        .await;
    ws.call_err("subscribe", json!({"channel": "board/a"}), "AlreadyExists")
        .await;
    ws.call_err(
        "subscribe",
        json!({"channel": "bad name"}),
        "InvalidArgument",
    )
    .await;
    assert_eq!(
        ws.call("unsubscribe", json!({"channel": "board/a"})).await,
        json!({"success": true})
    );
    s.publish("board/a", "e", "2").await;
    ws.expect_no_broadcast(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_authenticated_connection_subscribes_to_public_channels_whatever_its_token() {
    let s = server(2, &[]);
    let mut ws = Ws::connect(s.public).await;
    ws.subscribe("board/a").await;
    // The token allows neither board/a nor the subscribe scope; auth keeps the public one.
    let token = s.token("alice", &["chat"], &["publish"]);
    ws.auth_ok(&token).await;
    ws.subscribe("board/b").await;
    ws.call_err("subscribe", json!({"channel": "other"}), "PermissionDenied")
        .await;
    s.publish("board/a", "e", "1").await;
    s.publish("board/b", "e", "2").await;
    // Two channels owned by two shards: each arrives, in no promised order between them.
    let mut channels: Vec<String> = vec![
        ws.recv_broadcast().await["channel"].to_string(),
        ws.recv_broadcast().await["channel"].to_string(),
    ];
    channels.sort();
    assert_eq!(channels, vec!["\"board/a\"", "\"board/b\""]);
    // And publishing to a public channel still needs the token's permission.
    let publish = json!({"channel": "board/a", "event": "e", "payload": 1});
    ws.call_err("publish", publish, "PermissionDenied").await;
}

#[tokio::test]
async fn a_public_only_connection_survives_auth_timeout_and_an_idle_one_does_not() {
    let s = server(1, &[("BROADCASTER_LIMITS_AUTH_TIMEOUT", "1s")]);
    let mut viewer = Ws::connect(s.public).await;
    viewer.subscribe("board/a").await;
    let mut idle = Ws::connect(s.public).await;
    let mut left = Ws::connect(s.public).await;
    left.subscribe("board/b").await;
    idle.expect_close(4001, Duration::from_secs(3)).await;
    // Holding no subscription past auth_timeout: closed at once.
    left.call("unsubscribe", json!({"channel": "board/b"}))
        .await;
    left.expect_close(4001, Duration::from_secs(2)).await;
    s.publish("board/a", "e", "7").await;
    assert_eq!(viewer.recv_broadcast().await["payload"], json!(7));
    viewer.heartbeat_ok().await;
}

#[tokio::test]
async fn anonymous_viewers_recover_with_since() {
    let s = server(2, &[]);
    let mut ws = Ws::connect(s.public).await;
    let r = ws.subscribe("board/r").await;
    let epoch = r["epoch"].as_str().unwrap().to_string();
    s.publish("board/r", "e", "1").await;
    let first = ws.recv_broadcast().await;
    drop(ws);
    for n in 2..=4 {
        s.publish("board/r", "e", &n.to_string()).await;
    }
    let mut again = Ws::connect(s.public).await;
    let since = json!({"offset": first["offset"], "epoch": epoch});
    let r = again
        .call("subscribe", json!({"channel": "board/r", "since": since}))
        .await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    assert!(r.get("rewound").is_none(), "SPEC 22.3: {r}");
    assert_eq!(offsets(&mut again, 3, 1).await, vec![2, 3, 4]);
}

/// Publications replayed by rewind come right after the result, before any newer one, with no
/// gap or duplicate, while a publisher keeps going; on one shard and on two (where the
/// channel's owner is usually another shard than the subscriber's).
#[tokio::test]
async fn rewind_replays_the_last_publications_in_order_under_publishing() {
    for shards in [1, 2] {
        let s = server(shards, &[]);
        let mut sub = Ws::connect(s.public).await;
        sub.auth_ok(&s.token_all("u")).await;
        for n in 1..=6 {
            s.publish("news", "e", &n.to_string()).await;
        }
        let publisher = {
            let addr = s.backend();
            tokio::spawn(async move {
                for n in 7..=40 {
                    let body = publish_body("news", "e", &n.to_string());
                    let r = http_post_key(addr, "/publish", API_KEY, &body).await;
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let r = sub
            .call("subscribe", json!({"channel": "news", "rewind": 3}))
            .await;
        assert_eq!(r["rewound"], json!(3), "{r}");
        assert!(r.get("recovered").is_none(), "SPEC 22.3: {r}");
        let at = r["offset"].as_u64().unwrap();
        publisher.await.unwrap();
        let got = offsets(&mut sub, (40 - at + 3) as usize, 1).await;
        let want: Vec<u64> = (at - 2..=40).collect();
        assert_eq!(got, want, "{shards} shards");
        sub.expect_no_broadcast(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn rewind_is_bounded_and_says_what_was_held() {
    let s = server(2, &[("BROADCASTER_LIMITS_REWIND_MAX", "5")]);
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&s.token_all("u")).await;
    s.publish("short/a", "e", "1").await;
    // history_size 2 on short/*: at most 2.
    let r = ws
        .request("subscribe", json!({"channel": "short/a", "rewind": 3}))
        .await;
    assert_eq!(r["error"]["code"], json!("InvalidArgument"), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("between 0 and 2"),
        "{r}"
    );
    // rewind_max 5 below the default history of 100.
    ws.call_err(
        "subscribe",
        json!({"channel": "long", "rewind": 6}),
        "InvalidArgument",
    )
    .await;
    for bad in [json!(-1), json!(1.5), json!("2")] {
        ws.call_err(
            "subscribe",
            json!({"channel": "long", "rewind": bad}),
            "InvalidArgument",
        )
        .await;
    }
    let both = json!({"channel": "long", "rewind": 1, "since": {"offset": 0, "epoch": "e"}});
    ws.call_err("subscribe", both, "InvalidArgument").await;
    // Asked for 2, one held: rewound 1.
    let r = ws
        .call("subscribe", json!({"channel": "short/a", "rewind": 2}))
        .await;
    assert_eq!(r["rewound"], json!(1), "{r}");
    assert_eq!(ws.recv_broadcast().await["payload"], json!(1));
    // rewind 0 and a channel never published to: nothing replayed, rewound 0.
    let r = ws
        .call("subscribe", json!({"channel": "empty", "rewind": 0}))
        .await;
    assert_eq!(r["rewound"], json!(0), "{r}");
    let r = ws
        .call("subscribe", json!({"channel": "empty2", "rewind": 5}))
        .await;
    assert_eq!(r["rewound"], json!(0), "{r}");
    ws.expect_no_broadcast(Duration::from_millis(200)).await;
}

/// The scoreboard case: a page that opens gets the current board at once, without auth.
#[tokio::test]
async fn rewind_default_gives_a_new_viewer_the_current_board() {
    let s = server(2, &[]);
    for n in 1..=3 {
        s.publish("scoreboard/c1", "board", &format!(r#"{{"v":{n}}}"#))
            .await;
    }
    let mut viewer = Ws::connect(s.public).await;
    let r = viewer.subscribe("scoreboard/c1").await;
    assert_eq!(r["rewound"], json!(1), "{r}");
    let b = viewer.recv_broadcast().await;
    assert_eq!(
        (b["payload"].clone(), b["seq"].clone(), b["offset"].clone()),
        (json!({"v":3}), json!(1), json!(3))
    );
    // A client that names rewind 0 gets none; history_size 1 bounds it.
    let mut other = Ws::connect(s.public).await;
    let r = other
        .call(
            "subscribe",
            json!({"channel": "scoreboard/c1", "rewind": 0}),
        )
        .await;
    assert_eq!(r["rewound"], json!(0), "{r}");
    other
        .call_err(
            "subscribe",
            json!({"channel": "scoreboard/c2", "rewind": 2}),
            "InvalidArgument",
        )
        .await;
    s.publish("scoreboard/c1", "board", r#"{"v":4}"#).await;
    assert_eq!(viewer.recv_broadcast().await["seq"], json!(2));
    assert_eq!(other.recv_broadcast().await["payload"], json!({"v":4}));
    // Per-rule history: GET /history holds one publication on scoreboard/*.
    let page = http_get_key(s.backend(), "/history?channel=scoreboard/c1", API_KEY)
        .await
        .json();
    assert_eq!(page["publications"].as_array().unwrap().len(), 1, "{page}");
}

#[tokio::test]
async fn anonymous_caps_answer_503_per_address_and_per_node() {
    let s = server(
        2,
        &[
            ("BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX", "2"),
            ("BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_MAX", "3"),
        ],
    );
    let mut a1 = ws_from(s.public, "127.0.0.1", &[]).await.unwrap();
    let _a2 = ws_from(s.public, "127.0.0.1", &[]).await.unwrap();
    assert_eq!(ws_from(s.public, "127.0.0.1", &[]).await.err(), Some(503));
    let _b1 = ws_from(s.public, "127.0.0.2", &[]).await.unwrap();
    assert_eq!(
        ws_from(s.public, "127.0.0.3", &[]).await.err(),
        Some(503),
        "node cap"
    );
    // An authenticated connection no longer counts.
    a1.auth_ok(&s.token_all("u")).await;
    let _a3 = ws_from(s.public, "127.0.0.1", &[]).await.unwrap();
    let text = http_get(s.backend(), "/metrics").await.text();
    assert_eq!(
        metric_labelled(&text, "anonymous_refused_total", &["reason=\"address\""]),
        1.0
    );
    assert_eq!(
        metric_labelled(&text, "anonymous_refused_total", &["reason=\"node\""]),
        1.0
    );
    assert_eq!(metric_sum(&text, "anonymous_connections"), Some(3.0));
}

#[tokio::test]
async fn forwarded_for_is_the_client_only_from_a_trusted_proxy() {
    let s = server(
        1,
        &[
            ("BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX", "1"),
            ("BROADCASTER_LIMITS_TRUSTED_PROXIES", "127.0.0.2/32"),
        ],
    );
    let xff = |ip: &'static str| [("X-Forwarded-For", ip)];
    let _p1 = ws_from(s.public, "127.0.0.2", &xff("10.0.0.1"))
        .await
        .unwrap();
    assert_eq!(
        ws_from(s.public, "127.0.0.2", &xff("10.0.0.1")).await.err(),
        Some(503)
    );
    // The client may prepend anything; the address the trusted proxy appended counts.
    let _p2 = ws_from(s.public, "127.0.0.2", &xff("10.0.0.1, 10.0.0.2"))
        .await
        .unwrap();
    // From an untrusted peer the header is ignored: both count as 127.0.0.1.
    let _u1 = ws_from(s.public, "127.0.0.1", &xff("10.0.0.7"))
        .await
        .unwrap();
    assert_eq!(
        ws_from(s.public, "127.0.0.1", &xff("10.0.0.8")).await.err(),
        Some(503)
    );
}

#[tokio::test]
async fn health_carries_the_rules_hash_only_with_rules() {
    let plain = Server::start(ServerOpts::default());
    assert_eq!(
        http_get(plain.public, "/health").await.json(),
        json!({"status": "ok"})
    );
    let a = server(1, &[]);
    let b = server(2, &[]);
    let ha = http_get(a.public, "/health").await.json();
    let hb = http_get(b.public, "/health").await.json();
    assert_eq!(ha["status"], json!("ok"));
    let hash = ha["rules"].as_str().unwrap();
    assert!(
        hash.len() == 16 && hash.bytes().all(|c| c.is_ascii_hexdigit()),
        "{ha}"
    );
    assert_eq!(ha, hb, "same rules, same hash");
    let o = ServerOpts {
        config_toml: Some(RULES.replace("history_size = 10", "history_size = 11")),
        ..Default::default()
    };
    let c = Server::start(o);
    let hc = http_get(c.public, "/health").await.json();
    assert_ne!(hc["rules"], ha["rules"]);
}

#[tokio::test]
async fn a_bad_rule_stops_the_server_naming_it() {
    let o = ServerOpts {
        config_toml: Some(format!("{RULES}\n[[channels]]\npattern = \"board/x\"\n")),
        ..Default::default()
    };
    let e = Server::try_start(o)
        .err()
        .expect("a shadowed rule is refused");
    assert!(e.contains("channels[3].pattern"), "{e}");
    let o = ServerOpts {
        config_toml: Some("[[channels]]\npattern = \"a\"\naccess = \"secret\"\n".into()),
        ..Default::default()
    };
    let e = Server::try_start(o)
        .err()
        .expect("an unknown access is refused");
    assert!(e.contains("channels[0].access"), "{e}");
}

/// nginx (the binary; NGINX to use another), in front of `upstream` with the shipped
/// `tuning/nginx-location.conf`, on a free loopback port.
struct Nginx {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Nginx {
    fn start(upstream: std::net::SocketAddr) -> Nginx {
        let shipped = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/nginx-location.conf"),
        )
        .unwrap()
        .replace("127.0.0.1:8080", &upstream.to_string());
        // The file's upstream block belongs in http { }, its locations in server { }.
        let start = shipped.find("upstream broadcaster {").unwrap();
        let end = start + shipped[start..].find('}').unwrap() + 1;
        let (upstream_block, locations) = (
            &shipped[start..end],
            [&shipped[..start], &shipped[end..]].concat(),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = temp_path("-nginx");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/b;\n proxy_temp_path {d}/p;\n\
             fastcgi_temp_path {d}/f;\n uwsgi_temp_path {d}/u;\n scgi_temp_path {d}/s;\n\
             map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n{upstream_block}\n\
             server {{\n listen 127.0.0.1:{port};\n{locations}\n}}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        // /usr/sbin is not on every user's PATH.
        let bin = std::env::var("NGINX").unwrap_or_else(|_| {
            let sbin = std::path::Path::new("/usr/sbin/nginx");
            if sbin.exists() {
                sbin.display().to_string()
            } else {
                "nginx".into()
            }
        });
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"));
        kill_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {bin} ({e}): this test needs nginx (Debian package nginx)")
        });
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + T;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not listen: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, addr, dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The deployment of tuning/: nginx on loopback in front, `trusted_proxies` naming it. Every
/// connection reaches the server from 127.0.0.1, yet the per-address cap counts the clients.
#[tokio::test]
async fn behind_the_shipped_nginx_config_the_cap_counts_clients_not_nginx() {
    let s = server(
        1,
        &[
            ("BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX", "1"),
            ("BROADCASTER_LIMITS_TRUSTED_PROXIES", "127.0.0.1"),
        ],
    );
    let nginx = Nginx::start(s.public);
    let mut a = ws_from(nginx.addr, "127.0.0.2", &[]).await.unwrap();
    let _b = ws_from(nginx.addr, "127.0.0.3", &[]).await.unwrap();
    assert_eq!(ws_from(nginx.addr, "127.0.0.2", &[]).await.err(), Some(503));
    // A client's own X-Forwarded-For does not move it to another address.
    let spoof = [("X-Forwarded-For", "10.9.9.9")];
    assert_eq!(
        ws_from(nginx.addr, "127.0.0.2", &spoof).await.err(),
        Some(503)
    );
    a.subscribe("board/n").await;
    s.publish("board/n", "e", "1").await;
    assert_eq!(a.recv_broadcast().await["payload"], json!(1));
}

/// Server-sent events through the shipped nginx config: each event arrives as it is published
/// (nothing buffered), and a reconnect with `Last-Event-ID` through nginx resumes.
#[tokio::test]
async fn sse_through_the_shipped_nginx_config() {
    use common::sse::Sse;
    let s = server(1, &[]);
    let nginx = Nginx::start(s.public);
    let target = "/sse?channel=board/sse";
    let mut sse = Sse::connect(nginx.addr, target, &[]).await;
    sse.opening(&["board/sse"]).await;
    let mut last_id = String::new();
    for n in 1..=3 {
        s.publish("board/sse", "e", &n.to_string()).await;
        let (id, v) = sse.broadcast().await;
        assert_eq!(v["payload"], json!(n), "each event as it is published");
        last_id = id;
    }
    drop(sse);
    s.publish("board/sse", "e", "4").await;
    let resume = [("Last-Event-ID", last_id.as_str())];
    let mut sse = Sse::connect(nginx.addr, target, &resume).await;
    let (results, replayed, _) = sse.opening_with(&["board/sse"]).await;
    assert_eq!(results[0]["recovered"], json!(true), "{}", results[0]);
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["payload"], json!(4));
}
