//! SPEC 18 on one node, against a real HTTP receiver: channel occupied and vacated (with the
//! delay that hides flapping), member added and removed, the signature, retries while the
//! receiver fails, and the queue bound while it is down.

mod common;
mod hook_receiver;

use common::*;
use hmac::{Hmac, Mac};
use hook_receiver::Receiver;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(5);
const HOOK_SECRET: &str = "hook-secret";

/// A node of two shards whose one hook posts to `receiver`, with extra keys for the hook.
fn node(receiver: &Receiver, hook: &str) -> Server {
    let toml = format!(
        r#"
[[channels]]
pattern = "room/*"
presence = true

[[webhooks]]
url = "{}"
secret = "{HOOK_SECRET}"
batch_delay = "10ms"
{hook}
"#,
        receiver.url()
    );
    let mut opts = ServerOpts::shards(2);
    opts.config_toml = Some(toml);
    Server::start(opts)
}

fn names(events: &[Value]) -> Vec<String> {
    let name = |e: &Value| {
        let user = e.get("user").and_then(Value::as_str);
        let user = user.map(|u| format!(" {u}")).unwrap_or_default();
        format!(
            "{} {}{user}",
            e["name"].as_str().unwrap(),
            e["channel"].as_str().unwrap()
        )
    };
    events.iter().map(name).collect()
}

#[tokio::test]
async fn occupied_members_and_vacated_arrive_signed_with_flapping_hidden() {
    let receiver = Receiver::start().await;
    let s = node(&receiver, r#"vacated_delay = "600ms""#);
    let mut alice = s.ws_authed("alice").await;
    alice.subscribe("room/1").await;
    let events = receiver.wait_events(2, WAIT).await;
    assert_eq!(
        names(&events),
        ["channel_occupied room/1", "member_added room/1 alice"]
    );

    // The body is signed, and says who sent what when.
    let r = &receiver.requests()[0];
    let signature = r
        .header("x-broadcaster-signature")
        .expect("signature header");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(&r.body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(signature, want, "HMAC-SHA256 of the body, hex");
    let body = r.json();
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    let sent_ms = body["timeMs"].as_u64().expect("timeMs");
    assert!(
        sent_ms.abs_diff(now_secs() as u64 * 1000) < 60_000,
        "{body}"
    );

    // Out and back in within the delay: nothing about the channel, a member left and came back.
    alice
        .call("unsubscribe", json!({"channel": "room/1"}))
        .await;
    alice.subscribe("room/1").await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        names(&receiver.events()[2..]),
        ["member_removed room/1 alice", "member_added room/1 alice"]
    );

    // Gone for good: vacated, no sooner than the delay.
    let left = Instant::now();
    drop(alice);
    let events = receiver.wait_events(6, WAIT).await;
    assert_eq!(
        names(&events[4..]),
        ["member_removed room/1 alice", "channel_vacated room/1"]
    );
    let vacated_at = receiver.requests().last().unwrap().at;
    assert!(
        vacated_at.duration_since(left) >= Duration::from_millis(550),
        "vacated after {:?}",
        vacated_at.duration_since(left)
    );
}

#[tokio::test]
async fn events_and_patterns_choose_what_is_sent() {
    let receiver = Receiver::start().await;
    let s = node(
        &receiver,
        r#"events = ["channel_occupied"]
patterns = ["news/*"]"#,
    );
    let mut ws = s.ws_authed("alice").await;
    for ch in ["room/1", "other", "news/a"] {
        ws.subscribe(ch).await;
    }
    let events = receiver.wait_events(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        names(&receiver.events()),
        ["channel_occupied news/a"],
        "{events:?}"
    );
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_batch_again_and_a_full_queue_drops_the_oldest() {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let s = node(
        &receiver,
        r#"events = ["channel_occupied"]
queue_max = 3
retry_max_delay = "200ms""#,
    );
    let mut ws = s.ws_authed("alice").await;
    ws.subscribe("c/0").await;
    // The first batch is refused and retried: it left the queue, so the queue holds the next
    // three of the five that follow, the oldest two dropped.
    let deadline = Instant::now() + WAIT;
    while receiver.requests().is_empty() {
        assert!(Instant::now() < deadline, "no attempt at all");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 1..=5 {
        ws.subscribe(&format!("c/{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.requests().len() >= 2, "retried while failing");
    receiver.set_status(200);
    let events = receiver.wait_events(4, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = names(&events);
    assert_eq!(
        names(&receiver.events()),
        events,
        "nothing more after the queue drained"
    );
    assert_eq!(
        events,
        [
            "channel_occupied c/0",
            "channel_occupied c/3",
            "channel_occupied c/4",
            "channel_occupied c/5"
        ]
    );
    let requests = receiver.requests();
    let first_id = requests[0].json()["id"].clone();
    assert!(
        requests
            .iter()
            .filter(|r| r.json()["id"] == first_id)
            .count()
            >= 2,
        "the refused batch is sent again with its id"
    );
    let m = http_get(s.backend(), "/metrics").await.text();
    assert_eq!(metric_sum(&m, "webhook_dropped_total"), Some(2.0), "{m}");
    let failed = metric_labelled(&m, "webhook_events_total", &["result=\"failed\""]);
    assert!(failed >= 1.0, "{m}");
    let delivered = metric_labelled(&m, "webhook_events_total", &["result=\"delivered\""]);
    assert_eq!(delivered, 4.0, "{m}");
}

#[tokio::test]
async fn a_receiver_that_hangs_holds_up_no_client() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_secs(4));
    let s = node(&receiver, "");
    let mut alice = s.ws_authed("alice").await;
    let mut bob = s.ws_authed("bob").await;
    let asked = Instant::now();
    // Each subscribe and leave is an event for a receiver that sits on every POST for 4 s.
    for i in 0..20 {
        let channel = format!("room/{i}");
        alice.subscribe(&channel).await;
        bob.subscribe(&channel).await;
        s.publish(&channel, "e", &i.to_string()).await;
        assert_eq!(alice.recv_broadcast().await["payload"], json!(i));
        assert_eq!(bob.recv_broadcast().await["payload"], json!(i));
        bob.call("unsubscribe", json!({"channel": channel})).await;
    }
    assert!(
        receiver.requests().is_empty(),
        "the clients were served before the receiver answered once ({:?})",
        asked.elapsed()
    );
    receiver.wait_events(1, WAIT).await;
}
