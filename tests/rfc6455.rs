//! RFC 6455 conformance with handcrafted frames over a raw TCP socket: masking, reserved bits
//! and opcodes, control frames, fragmentation, UTF-8, sizes, the closing handshake and the
//! opening handshake.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const HEARTBEAT: &str = r#"{"id":1,"method":"heartbeat"}"#;

fn mask() -> Option<[u8; 4]> {
    Some(rand::random())
}

/// Sends raw bytes and expects close `code` followed by the end of the TCP connection.
async fn expect_close_after(addr: SocketAddr, bytes: &[u8], code: u16) {
    let mut ws = RawWs::connect(addr).await;
    ws.send_raw_lossy(bytes).await;
    ws.expect_close(code).await;
    ws.expect_eof().await;
}

fn assert_heartbeat_response(text: &str, id: Value) {
    let v: Value = serde_json::from_str(text).unwrap();
    let r = ok_result(&v, &id);
    assert!(r["timestamp"].as_str().is_some_and(is_rfc3339_utc), "{v}");
}

#[tokio::test]
async fn a_plain_masked_request_is_answered_with_an_unmasked_frame() {
    let s = Server::start(ServerOpts::default());
    let mut ws = RawWs::connect(s.public).await;
    ws.send_text(HEARTBEAT).await;
    let f = ws.frame().await;
    assert!(f.fin);
    assert_eq!(f.rsv, 0);
    assert_eq!(f.opcode, OP_TEXT);
    assert_heartbeat_response(&f.text(), json!(1));
    // A client ping is answered with a pong carrying the same payload.
    ws.send_frame(true, OP_PING, b"are you there").await;
    let f = ws.frame().await;
    assert_eq!(f.opcode, OP_PONG);
    assert_eq!(f.payload, b"are you there");
    // An unsolicited pong is ignored.
    ws.send_frame(true, OP_PONG, b"x").await;
    ws.send_text(r#"{"id":2,"method":"heartbeat"}"#).await;
    assert_heartbeat_response(&ws.recv_text().await, json!(2));
}

#[tokio::test]
async fn unmasked_client_frame_is_1002() {
    let s = Server::start(ServerOpts::default());
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_TEXT, HEARTBEAT.as_bytes(), None),
        1002,
    )
    .await;
}

#[tokio::test]
async fn reserved_bits_are_1002() {
    let s = Server::start(ServerOpts::default());
    for rsv in [4u8, 2, 1] {
        expect_close_after(
            s.public,
            &encode_frame(true, rsv, OP_TEXT, HEARTBEAT.as_bytes(), mask()),
            1002,
        )
        .await;
    }
}

#[tokio::test]
async fn reserved_opcodes_are_1002() {
    let s = Server::start(ServerOpts::default());
    for op in [0x3u8, 0x7, 0xB, 0xF] {
        expect_close_after(s.public, &encode_frame(true, 0, op, b"x", mask()), 1002).await;
    }
}

#[tokio::test]
async fn bad_control_frames_are_1002() {
    let s = Server::start(ServerOpts::default());
    // A ping of 126 bytes.
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_PING, &[b'p'; 126], mask()),
        1002,
    )
    .await;
    // A fragmented ping.
    expect_close_after(
        s.public,
        &encode_frame(false, 0, OP_PING, b"p", mask()),
        1002,
    )
    .await;
    // A close frame of 126 bytes.
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[b'r'; 124]);
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_CLOSE, &payload, mask()),
        1002,
    )
    .await;
}

#[tokio::test]
async fn fragmented_request_is_reassembled() {
    let s = Server::start(ServerOpts::default());
    let mut ws = RawWs::connect(s.public).await;
    ws.send_frame(false, OP_TEXT, br#"{"id":42,"me"#).await;
    ws.send_frame(false, OP_CONT, br#"thod":"heart"#).await;
    ws.send_frame(true, OP_CONT, br#"beat"}"#).await;
    assert_heartbeat_response(&ws.recv_text().await, json!(42));
    // Empty fragments are legal too.
    ws.send_frame(false, OP_TEXT, b"").await;
    ws.send_frame(false, OP_CONT, br#"{"id":43,"method":"heartbeat"}"#)
        .await;
    ws.send_frame(true, OP_CONT, b"").await;
    assert_heartbeat_response(&ws.recv_text().await, json!(43));
}

#[tokio::test]
async fn ping_between_fragments_is_answered_and_the_message_completes() {
    let s = Server::start(ServerOpts::default());
    let mut ws = RawWs::connect(s.public).await;
    ws.send_frame(false, OP_TEXT, br#"{"id":7,"method""#).await;
    ws.send_frame(true, OP_PING, b"mid-ping-123").await;
    let f = ws.frame().await;
    assert_eq!(f.opcode, OP_PONG, "{f:?}");
    assert_eq!(f.payload, b"mid-ping-123");
    ws.send_frame(true, OP_CONT, br#":"heartbeat"}"#).await;
    assert_heartbeat_response(&ws.recv_text().await, json!(7));
}

#[tokio::test]
async fn continuation_without_start_is_1002() {
    let s = Server::start(ServerOpts::default());
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_CONT, HEARTBEAT.as_bytes(), mask()),
        1002,
    )
    .await;
}

#[tokio::test]
async fn new_data_frame_inside_a_fragmented_message_is_1002() {
    let s = Server::start(ServerOpts::default());
    let mut bytes = encode_frame(false, 0, OP_TEXT, br#"{"id":1,"#, mask());
    bytes.extend(encode_frame(true, 0, OP_TEXT, HEARTBEAT.as_bytes(), mask()));
    expect_close_after(s.public, &bytes, 1002).await;
    let mut bytes = encode_frame(false, 0, OP_TEXT, br#"{"id":1,"#, mask());
    bytes.extend(encode_frame(true, 0, OP_BINARY, b"x", mask()));
    expect_close_after(s.public, &bytes, 1002).await;
}

#[tokio::test]
async fn invalid_utf8_is_1007() {
    let s = Server::start(ServerOpts::default());
    // In a single frame.
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_TEXT, b"{\"id\":1,\"x\":\"\xC3\x28\"}", mask()),
        1007,
    )
    .await;
    // An overlong encoding and a surrogate.
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_TEXT, b"\xC0\xAF", mask()),
        1007,
    )
    .await;
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_TEXT, b"\xED\xA0\x80", mask()),
        1007,
    )
    .await;
    // Split across fragments: the sequence is cut, then continued wrongly.
    let mut bytes = encode_frame(false, 0, OP_TEXT, b"{\"x\":\"\xE2\x82", mask());
    bytes.extend(encode_frame(true, 0, OP_CONT, b"A\"}", mask()));
    expect_close_after(s.public, &bytes, 1007).await;
    // Invalid only in the last fragment.
    let mut bytes = encode_frame(false, 0, OP_TEXT, br#"{"id":1,"#, mask());
    bytes.extend(encode_frame(true, 0, OP_CONT, b"\"x\":\"\xFF\"}", mask()));
    expect_close_after(s.public, &bytes, 1007).await;
}

#[tokio::test]
async fn valid_utf8_split_across_fragments_is_accepted() {
    let s = Server::start(ServerOpts::default());
    let mut ws = RawWs::connect(s.public).await;
    // "é" is C3 A9, "€" is E2 82 AC; both cut between fragments.
    ws.send_frame(false, OP_TEXT, b"{\"id\":\"\xC3").await;
    ws.send_frame(false, OP_CONT, b"\xA9\xE2\x82").await;
    ws.send_frame(true, OP_CONT, b"\xAC\",\"method\":\"heartbeat\"}")
        .await;
    assert_heartbeat_response(&ws.recv_text().await, json!("é€"));
}

#[tokio::test]
async fn frames_and_messages_over_max_frame_bytes_are_1009() {
    // max_payload_bytes may not exceed max_frame_bytes (a payload travels in one message).
    let s = Server::start(
        ServerOpts::default()
            .env("BROADCASTER_LIMITS_MAX_FRAME_BYTES", "1024")
            .env("BROADCASTER_LIMITS_MAX_PAYLOAD_BYTES", "512"),
    );
    // A request of exactly 1024 bytes is fine.
    let prefix = r#"{"id":1,"method":"heartbeat","pad":""#;
    let pad = "p".repeat(1024 - prefix.len() - 2);
    let exact = format!("{prefix}{pad}\"}}");
    assert_eq!(exact.len(), 1024);
    let mut ws = RawWs::connect(s.public).await;
    ws.send_text(&exact).await;
    assert_heartbeat_response(&ws.recv_text().await, json!(1));

    // One frame of 2000 bytes.
    let big = format!(
        r#"{{"id":1,"method":"heartbeat","pad":"{}"}}"#,
        "p".repeat(2000)
    );
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_TEXT, big.as_bytes(), mask()),
        1009,
    )
    .await;
    // Three fragments of 500 bytes each: each fits, the message does not.
    let msg = big.as_bytes();
    let mut bytes = encode_frame(false, 0, OP_TEXT, &msg[..500], mask());
    bytes.extend(encode_frame(false, 0, OP_CONT, &msg[500..1000], mask()));
    bytes.extend(encode_frame(true, 0, OP_CONT, &msg[1000..1500], mask()));
    expect_close_after(s.public, &bytes, 1009).await;
}

#[tokio::test]
async fn client_close_is_echoed_and_the_tcp_connection_ends() {
    let s = Server::start(ServerOpts::default());
    let mut ws = RawWs::connect(s.public).await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    ws.send_frame(true, OP_CLOSE, &payload).await;
    ws.expect_close(1000).await;
    ws.expect_eof().await;

    // A close without a code is answered with a close too (RFC 6455 7.1.5: 1005 is
    // never sent, so the answer carries no code or 1000).
    let mut ws = RawWs::connect(s.public).await;
    ws.send_frame(true, OP_CLOSE, b"").await;
    let e = ws.ended(T).await;
    assert!(
        e == RawEnd::Close(None) || e == RawEnd::Close(Some(1000)),
        "empty close answered with {e:?}"
    );
    ws.expect_eof().await;
}

#[tokio::test]
async fn close_with_an_invalid_code_is_1002() {
    let s = Server::start(ServerOpts::default());
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 2999] {
        let mut ws = RawWs::connect(s.public).await;
        ws.send_frame(true, OP_CLOSE, &code.to_be_bytes()).await;
        let e = ws.ended(T).await;
        assert_eq!(e, RawEnd::Close(Some(1002)), "close code {code}");
        ws.expect_eof().await;
    }
    // A one-byte close payload is malformed.
    expect_close_after(
        s.public,
        &encode_frame(true, 0, OP_CLOSE, &[3], mask()),
        1002,
    )
    .await;
    // A close reason that is not UTF-8 fails the connection (1007, or 1002 as Autobahn
    // also accepts).
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.extend_from_slice(b"\xFF\xFE");
    let mut ws = RawWs::connect(s.public).await;
    ws.send_raw(&encode_frame(true, 0, OP_CLOSE, &p, mask()))
        .await;
    let e = ws.ended(T).await;
    assert!(
        e == RawEnd::Close(Some(1007)) || e == RawEnd::Close(Some(1002)),
        "close with an invalid UTF-8 reason answered {e:?}"
    );
}

async fn raw_handshake(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_http_head(&mut stream).await;
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head)
}

#[tokio::test]
async fn opening_handshake_checks() {
    let s = Server::start(ServerOpts::default());
    let addr = s.public;
    // The RFC 6455 section 1.3 example.
    let (status, head) = raw_handshake(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 101, "{head}");
    assert_eq!(
        header_value(&head, "sec-websocket-accept").as_deref(),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert!(header_value(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
    assert!(header_value(&head, "connection")
        .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")));

    // Header names and the Upgrade/Connection tokens are case-insensitive.
    let (status, head) = raw_handshake(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nhost: {addr}\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 101, "{head}");

    // No Sec-WebSocket-Key.
    let (status, head) = raw_handshake(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 400, "{head}");

    // A version other than 13.
    let (status, head) = raw_handshake(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
        ),
    )
    .await;
    assert!(status == 426 || status == 400, "{head}");
    if status == 426 {
        assert_eq!(
            header_value(&head, "sec-websocket-version").as_deref(),
            Some("13"),
            "426 names the supported version: {head}"
        );
    }

    // No Upgrade header: not a WebSocket handshake.
    let (status, head) = raw_handshake(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        ),
    )
    .await;
    assert!((400..500).contains(&status), "{head}");
}

async fn handshake_with_origin(addr: SocketAddr, origin: Option<&str>) -> u16 {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let (status, _) = raw_handshake(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n",
            ws_key()
        ),
    )
    .await;
    status
}

#[tokio::test]
async fn allowed_origins_compare_exactly() {
    let s = Server::start(ServerOpts::default().env(
        "BROADCASTER_ALLOWED_ORIGINS",
        "https://good.example,http://localhost:3000",
    ));
    let addr = s.public;
    assert_eq!(
        handshake_with_origin(addr, None).await,
        101,
        "no Origin is allowed"
    );
    assert_eq!(
        handshake_with_origin(addr, Some("https://good.example")).await,
        101
    );
    assert_eq!(
        handshake_with_origin(addr, Some("http://localhost:3000")).await,
        101
    );
    for bad in [
        "http://good.example",
        "https://good.example:8443",
        "https://evil.example",
        "https://good.example.evil",
        "http://localhost:3001",
        "null",
    ] {
        assert_eq!(
            handshake_with_origin(addr, Some(bad)).await,
            403,
            "origin {bad}"
        );
    }
}
