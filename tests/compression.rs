//! permessage-deflate (SPEC 20, RFC 7692) against a reference inflater: what the handshake
//! accepts, a publication compressed once with each subscriber's `seq` spliced in, small payloads
//! left plain, inbound compressed messages inflated under `max_frame_bytes` (a zip bomb closes
//! 1009), and the metrics of bytes before and after compression.

mod common;

use common::*;
use flate2::{Compress, Compression, FlushCompress};
use serde_json::{json, Value};
use std::time::Duration;

/// Browsers' offer (Chromium, Firefox).
const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A server that takes a 64 kB scoreboard in one message.
fn server() -> Server {
    Server::start(
        ServerOpts::default()
            .env("BROADCASTER_LIMITS_MAX_PAYLOAD_BYTES", "100000")
            .env("BROADCASTER_LIMITS_MAX_FRAME_BYTES", "131072")
            .env("BROADCASTER_LIMITS_OUTBOUND_BUFFER_BYTES", "4194304"),
    )
}

/// `data` as a client compresses it (raw deflate, sync flush, the last four bytes dropped).
fn deflated(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A connection that offered compression and had it accepted, authenticated and subscribed.
async fn compressing_subscriber(s: &Server, channel: &str) -> RawWs {
    let (mut ws, head) = RawWs::connect_offering(s.public, OFFER).await;
    let accepted = header_value(&head, "sec-websocket-extensions").expect("extension accepted");
    assert_eq!(
        accepted,
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    let token = s.token_all("z");
    let auth = ws
        .request(&json!({"id":1,"method":"auth","params":{"token":token}}).to_string())
        .await;
    ok_result(&auth, &json!(1));
    let sub = ws
        .request(&json!({"id":2,"method":"subscribe","params":{"channel":channel}}).to_string())
        .await;
    ok_result(&sub, &json!(2));
    ws
}

/// The next text message, inflated when its frame says it is compressed; and whether it was.
async fn next_message(ws: &mut RawWs) -> (Value, String, bool) {
    loop {
        let f = ws.frame().await;
        if f.opcode != OP_TEXT {
            continue;
        }
        assert!(f.fin);
        let compressed = f.rsv == 4;
        assert!(f.rsv == 0 || compressed, "reserved bits {}", f.rsv);
        let bytes = if compressed {
            inflate_message(&f.payload)
        } else {
            f.payload
        };
        let text = String::from_utf8(bytes).expect("UTF-8 once inflated");
        let v: Value = serde_json::from_str(&text).expect("JSON once inflated");
        return (v, text, compressed);
    }
}

#[tokio::test]
async fn one_compressed_publication_reaches_every_subscriber_with_its_own_seq() {
    let s = server();
    let mut zs = Vec::new();
    for _ in 0..12 {
        zs.push(compressing_subscriber(&s, "board").await);
    }
    // One subscriber that offered nothing gets the same messages uncompressed.
    let mut plain = s.ws_authed("plain").await;
    plain.subscribe("board").await;
    // A subscriber already two messages in: its seq differs from the others' in the same frame.
    let mut late_seq = compressing_subscriber(&s, "warmup").await;
    for n in 0..2 {
        s.publish("warmup", "tick", &n.to_string()).await;
        let (v, _, _) = next_message(&mut late_seq).await;
        assert_eq!(v["params"]["seq"], n + 1);
    }
    let sub = late_seq
        .request(&json!({"id":3,"method":"subscribe","params":{"channel":"board"}}).to_string())
        .await;
    ok_result(&sub, &json!(3));
    zs.push(late_seq);

    let boards: Vec<String> = (0..3).map(|r| scoreboard(64_000, r)).collect();
    for b in &boards {
        s.publish("board", "scoreboard", b).await;
    }
    s.publish("board", "small", r#"{"note":"under min_payload_bytes"}"#)
        .await;

    let mut wire_compressed = 0;
    for (i, ws) in zs.iter_mut().enumerate() {
        for (n, b) in boards.iter().enumerate() {
            let (v, text, compressed) = next_message(ws).await;
            assert!(
                compressed,
                "subscriber {i}: a 64 kB payload goes compressed"
            );
            assert_eq!(
                raw_payload(&text),
                b,
                "subscriber {i}: payload byte for byte"
            );
            assert_eq!(v["params"]["seq"], n as u64 + 1, "subscriber {i}");
            assert_eq!(v["params"]["channel"], "board");
        }
        let (v, _, compressed) = next_message(ws).await;
        assert!(!compressed, "a small payload goes plain");
        assert_eq!(v["params"]["event"], "small");
        assert_eq!(v["params"]["seq"], 4);
        wire_compressed += 1;
    }
    assert_eq!(wire_compressed, 13);
    for b in &boards {
        let frame = plain.recv_broadcast_raw().await;
        assert_eq!(raw_payload(&frame), b);
    }

    let metrics = http_get(s.backend(), "/metrics").await.text();
    let before = metric_sum(&metrics, "compression_bytes_before_total").unwrap();
    let after = metric_sum(&metrics, "compression_bytes_after_total").unwrap();
    // 13 subscribers x 3 scoreboards, each about 64 kB before; rows compress several times.
    assert!(before >= 13.0 * 3.0 * 64_000.0, "{before}");
    assert!(after * 4.0 < before, "after {after}, before {before}");
}

#[tokio::test]
async fn a_small_window_gets_plain_broadcasts_and_bad_offers_are_declined() {
    let s = server();
    // Our shared compressed suffix needs the full window: a client limiting it to 10 bits is
    // accepted (the limit echoed) and gets broadcasts uncompressed, which RFC 7692 allows.
    let offer = "permessage-deflate; server_max_window_bits=10";
    let (mut ws, head) = RawWs::connect_offering(s.public, offer).await;
    let accepted = header_value(&head, "sec-websocket-extensions").expect("extension accepted");
    assert!(
        accepted.ends_with("; server_max_window_bits=10"),
        "{accepted}"
    );
    let token = s.token_all("small");
    let auth = json!({"id":1,"method":"auth","params":{"token":token}}).to_string();
    ok_result(&ws.request(&auth).await, &json!(1));
    // Its own messages may still come compressed.
    let m: [u8; 4] = rand::random();
    let sub = deflated(br#"{"id":2,"method":"subscribe","params":{"channel":"w"}}"#);
    ws.send_raw(&encode_frame(true, 4, OP_TEXT, &sub, Some(m)))
        .await;
    let (v, _, _) = next_message(&mut ws).await;
    ok_result(&v, &json!(2));
    let board = scoreboard(64_000, 9);
    s.publish("w", "scoreboard", &board).await;
    let (_, text, compressed) = next_message(&mut ws).await;
    assert!(!compressed, "a 10-bit window gets broadcasts uncompressed");
    assert_eq!(raw_payload(&text), board);

    // An offer with a parameter we do not know is declined; then RSV1 is a protocol error.
    let (mut ws, head) =
        RawWs::connect_offering(s.public, "permessage-deflate; mystery_param").await;
    assert_eq!(header_value(&head, "sec-websocket-extensions"), None);
    let body = deflated(br#"{"id":1,"method":"heartbeat"}"#);
    ws.send_raw(&encode_frame(true, 4, OP_TEXT, &body, Some(m)))
        .await;
    expect_close_code(&mut ws, 1002).await;

    let off = Server::start(ServerOpts::default().env("BROADCASTER_COMPRESSION_ENABLED", "false"));
    let (_ws, head) = RawWs::connect_offering(off.public, OFFER).await;
    assert_eq!(header_value(&head, "sec-websocket-extensions"), None);
}

#[tokio::test]
async fn inbound_compressed_messages_are_inflated_under_the_frame_limit() {
    let s = server();
    let heartbeat = br#"{"id":7,"method":"heartbeat"}"#;

    // Whole and fragmented (RSV1 on the first frame only), each answered.
    let mut ws = compressing_subscriber(&s, "in").await;
    let m: [u8; 4] = rand::random();
    ws.send_raw(&encode_frame(
        true,
        4,
        OP_TEXT,
        &deflated(heartbeat),
        Some(m),
    ))
    .await;
    let (v, _, _) = next_message(&mut ws).await;
    ok_result(&v, &json!(7));
    let z = deflated(br#"{"id":8,"method":"heartbeat"}"#);
    let (a, b) = z.split_at(z.len() / 2);
    ws.send_raw(&encode_frame(false, 4, OP_TEXT, a, Some(m)))
        .await;
    ws.send_raw(&encode_frame(true, 0, 0, b, Some(m))).await;
    let (v, _, _) = next_message(&mut ws).await;
    ok_result(&v, &json!(8));
    // A plain message on the same connection is still read.
    ws.send_text(r#"{"id":9,"method":"heartbeat"}"#).await;
    let (v, _, _) = next_message(&mut ws).await;
    ok_result(&v, &json!(9));
    // A compressed publication that inflates past the inflater's 32 KiB window arrives whole.
    let mut reader = s.ws_authed("reader").await;
    reader.subscribe("up").await;
    let board = scoreboard(90_000, 3);
    let publish = format!(
        r#"{{"id":11,"method":"publish","params":{{"channel":"up","event":"board","payload":{board}}}}}"#
    );
    ws.send_raw(&encode_frame(
        true,
        4,
        OP_TEXT,
        &deflated(publish.as_bytes()),
        Some(m),
    ))
    .await;
    let (v, _, _) = next_message(&mut ws).await;
    ok_result(&v, &json!(11));
    assert_eq!(raw_payload(&reader.recv_broadcast_raw().await), board);

    // A zip bomb: 64 MiB of spaces in about 64 kB; the server stops at max_frame_bytes.
    let mut bomb_ws = compressing_subscriber(&s, "in").await;
    let bomb = deflated(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 131_072);
    bomb_ws
        .send_raw(&encode_frame(true, 4, OP_TEXT, &bomb, Some(m)))
        .await;
    expect_close_code(&mut bomb_ws, 1009).await;

    // Not deflate data: 1007.
    let mut bad = compressing_subscriber(&s, "in").await;
    bad.send_raw(&encode_frame(
        true,
        4,
        OP_TEXT,
        &[0xff, 0xff, 0xff],
        Some(m),
    ))
    .await;
    expect_close_code(&mut bad, 1007).await;

    // RSV1 on a continuation frame, or on a control frame: 1002.
    let mut cont = compressing_subscriber(&s, "in").await;
    cont.send_raw(&encode_frame(false, 4, OP_TEXT, a, Some(m)))
        .await;
    cont.send_raw(&encode_frame(true, 4, 0, b, Some(m))).await;
    expect_close_code(&mut cont, 1002).await;
    let mut ping = compressing_subscriber(&s, "in").await;
    ping.send_raw(&encode_frame(true, 4, OP_PING, b"", Some(m)))
        .await;
    expect_close_code(&mut ping, 1002).await;

    // Nobody else was disturbed.
    ws.send_text(r#"{"id":10,"method":"heartbeat"}"#).await;
    let (v, _, _) = next_message(&mut ws).await;
    ok_result(&v, &json!(10));
}

/// Reads until the server's close frame, which must carry `code`.
async fn expect_close_code(ws: &mut RawWs, code: u16) {
    loop {
        match ws.read_frame(Duration::from_secs(10)).await {
            Ok(f) if f.opcode == OP_CLOSE => {
                assert_eq!(f.close_code(), Some(code));
                return;
            }
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e:?}"),
        }
    }
}
