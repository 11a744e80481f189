//! History and recovery (SPEC section 5): bounded history, forgotten idle channels, and
//! recovery racing a publisher across shards.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Publishes `copies` publications to `channel` in one `/broadcast` (channels may repeat).
async fn broadcast_copies(c: &mut HttpConn, channels: &[String], payload: &str) -> Value {
    let body = json!({"channels": channels, "event": "e", "payload": serde_json::from_str::<Value>(payload).unwrap()});
    let auth = format!("Bearer {API_KEY}");
    let r = c
        .send(
            "POST",
            "/broadcast",
            &[("Authorization", &auth)],
            Some(body.to_string().as_bytes()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn gauge(s: &Server, name: &str) -> f64 {
    metric_sum(&http_get(s.public, "/metrics").await.text(), name)
        .unwrap_or_else(|| panic!("no {name} metric"))
}

#[tokio::test]
async fn history_of_a_channel_published_100000_times_stays_bounded() {
    let s = Server::start(ServerOpts::shards(2).env("BROADCASTER_HISTORY_SIZE", "100"));
    let mut c = HttpConn::connect(s.public).await;
    let batch: Vec<String> = vec!["busy".to_string(); 1000];
    for _ in 0..100 {
        broadcast_copies(&mut c, &batch, "{\"x\":1}").await;
    }
    let h = http_get_key(s.public, "/history?channel=busy&limit=100000", API_KEY)
        .await
        .json();
    assert_eq!(h["offset"], 100_000);
    let items = h["publications"].as_array().expect("array");
    assert_eq!(items.len(), 100, "history.size bounds what is kept");
    assert_eq!(items[0]["offset"], 99_901);
    assert_eq!(items[99]["offset"], 100_000);
    let h = http_get_key(s.public, "/history?channel=busy&limit=3", API_KEY)
        .await
        .json();
    let offsets: Vec<_> = h["publications"]
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(99_998), json!(99_999), json!(100_000)]);
}

#[tokio::test]
async fn many_short_lived_channels_leave_nothing_behind() {
    let s = Server::start(
        ServerOpts::shards(2)
            .env("BROADCASTER_HISTORY_TTL", "3s")
            .env("BROADCASTER_LIMITS_REQUEST_BURST", "1000"),
    );
    let mut c = HttpConn::connect(s.public).await;
    for round in 0..5 {
        let names: Vec<String> = (0..1000).map(|i| format!("tmp/{round}/{i}")).collect();
        broadcast_copies(&mut c, &names, "1").await;
    }
    let mut ws = s.ws_authed("u").await;
    for i in 0..200 {
        ws.subscribe(&format!("sub/{i}")).await;
    }
    // The tables hold them now (gauges refresh every second).
    let deadline = Instant::now() + T;
    while gauge(&s, "channels_owned").await < 5000.0 {
        assert!(Instant::now() < deadline, "channels never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..200 {
        ws.call("unsubscribe", json!({"channel": format!("sub/{i}")}))
            .await;
    }
    drop(ws);
    // After the TTL and a sweep, every channel is forgotten on every shard.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let owned = gauge(&s, "channels_owned").await;
        let subscribed = gauge(&s, "channels_subscribed").await;
        if owned == 0.0 && subscribed == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{owned} owned and {subscribed} subscribed channels left behind"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let h = http_get_key(s.public, "/history?channel=tmp/0/0", API_KEY)
        .await
        .json();
    assert_eq!(h["publications"], json!([]));
}

/// Subscribers on every shard (so on shards other than the channel's owner) disconnect and come
/// back with `since` again and again while a publisher runs: each sees every offset exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_across_shards_racing_a_publisher_loses_nothing() {
    let s = Server::start(ServerOpts::shards(2).env("BROADCASTER_HISTORY_SIZE", "5000"));
    let total: u64 = 3000;
    let subscribers = 8;
    let mut first = Vec::new();
    let mut epoch = Value::Null;
    for i in 0..subscribers {
        let mut ws = s.ws_authed(&format!("s{i}")).await;
        epoch = ws.subscribe("race").await["epoch"].clone();
        first.push(ws);
    }
    let per_shard: Vec<f64> = {
        let text = http_get(s.public, "/metrics").await.text();
        (0..2)
            .map(|i| {
                let prefix = format!("connections_active{{shard=\"{i}\",transport=\"ws\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
                    .unwrap_or(0.0)
            })
            .collect()
    };
    assert!(
        per_shard.iter().all(|n| *n > 0.0),
        "subscribers on both shards: {per_shard:?}"
    );

    let addr = s.public;
    let publisher = tokio::spawn(async move {
        let mut c = HttpConn::connect(addr).await;
        let auth = format!("Bearer {API_KEY}");
        for i in 1..=total {
            let body = publish_body("race", "e", &i.to_string());
            let r = c
                .send(
                    "POST",
                    "/publish",
                    &[("Authorization", &auth)],
                    Some(body.as_bytes()),
                )
                .await;
            assert_eq!(r.status, 200);
        }
    });

    let mut tasks = Vec::new();
    for (i, mut ws) in first.into_iter().enumerate() {
        let s_token = s.token_all(&format!("s{i}"));
        let epoch = epoch.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0u64;
            let mut reconnects = 0;
            while last < total {
                // Read a few hundred, then drop the connection and recover from the last offset.
                let stop = (last + 300 + 37 * i as u64).min(total);
                let mut seq = None;
                while last < stop {
                    let b = ws.recv_broadcast().await;
                    let offset = b["offset"].as_u64().expect("offset");
                    assert_eq!(offset, last + 1, "subscriber {i}: gap or duplicate");
                    let s = b["seq"].as_u64().expect("seq");
                    if let Some(prev) = seq {
                        assert_eq!(s, prev + 1, "subscriber {i}: seq gap");
                    }
                    seq = Some(s);
                    last = offset;
                }
                if last == total {
                    break;
                }
                drop(ws);
                reconnects += 1;
                ws = Ws::connect(addr).await;
                ws.auth_ok(&s_token).await;
                let r = ws
                    .call(
                        "subscribe",
                        json!({"channel": "race", "since": {"offset": last, "epoch": epoch}}),
                    )
                    .await;
                assert_eq!(r["recovered"], json!(true), "subscriber {i}: {r}");
            }
            reconnects
        }));
    }
    publisher.await.expect("publisher");
    let mut reconnects = 0;
    for t in tasks {
        reconnects += within(Duration::from_secs(60), "subscriber", t)
            .await
            .expect("subscriber");
    }
    assert!(
        reconnects >= subscribers * 5,
        "only {reconnects} reconnects"
    );
}
