//! RFC 6455 conformance, case groups modelled on the Autobahn|Testsuite (fuzzingclient): a raw
//! TCP client sends hand-crafted masked frames and each case asserts the exact answer the RFC
//! requires: the close code, the pong, or the answer to the request.
//!
//! The server speaks JSON requests rather than echoing, so "echo" here is a `heartbeat`
//! request: a text message of a given size is `{"id":N,"method":"heartbeat","pad":"..."}`,
//! padded to the size, and its echo is the heartbeat result with `requestId` N. A text message
//! that is valid UTF-8 but not a request is answered with an `InvalidArgument` error and the
//! connection stays open (SPEC section 4).
//!
//! | group | Autobahn | what |
//! |---|---|---|
//! | 1 | 1.x | text and binary sizes at every length-encoding edge, pipelined messages |
//! | 2 | 2.x | pings and pongs: payloads up to 125 bytes, binary payloads, unsolicited pongs |
//! | 3 | 3.x | reserved bits |
//! | 4 | 4.x | reserved opcodes, data and control |
//! | 5 | 5.x | fragmentation: control frames between fragments, empty fragments, bad sequences |
//! | 6 | 6.x | UTF-8: valid and invalid sequences, whole and split at fragment boundaries |
//! | 7 | 7.x | the closing handshake: codes, payload lengths, reasons, frames after close |
//! | 9 | 9.x | limits: messages just under, at and over `max_frame_bytes` |
//! | 10 | 10.x | misc: auto-fragmented messages, frames in the handshake's segment |
//!
//! Where the RFC leaves a choice, the case says which one this server makes: it answers every
//! ping (2.10), checks UTF-8 when a message is complete rather than per fragment ("non-strict"
//! in Autobahn's terms, 6.4), echoes the peer's close code (7.7), and accepts the close codes
//! IANA registered after Autobahn was written (1012-1014; Autobahn 7.9.10-12 predate them).
//! Each test prints `conformance group N: passed/total` to stderr, even under capture.

mod common;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// `max_frame_bytes` of the servers here (the default, 64 KiB).
const MAX: usize = 65536;

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The cases of one group: an Autobahn-style number, and the case itself.
struct Group {
    number: u32,
    name: &'static str,
    cases: Vec<(String, CaseFuture)>,
}

impl Group {
    fn new(number: u32, name: &'static str) -> Group {
        Group {
            number,
            name,
            cases: Vec::new(),
        }
    }

    fn case<F: Future<Output = ()> + Send + 'static>(&mut self, id: impl Into<String>, f: F) {
        self.cases.push((id.into(), Box::pin(f)));
    }

    /// Runs every case concurrently (each on its own connection), prints the pass count and
    /// fails with the list of failed cases.
    async fn run(self) {
        let total = self.cases.len();
        let handles: Vec<_> = self
            .cases
            .into_iter()
            .map(|(id, f)| (id, tokio::spawn(f)))
            .collect();
        let mut failed = Vec::new();
        for (id, h) in handles {
            if let Err(e) = h.await {
                let why = match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()),
                    Err(e) => e.to_string(),
                };
                failed.push(format!("{id}: {why}"));
            }
        }
        let line = format!(
            "conformance group {} ({}): {}/{} passed\n",
            self.number,
            self.name,
            total - failed.len(),
            total
        );
        // Straight to the file descriptor, so the count shows without --nocapture.
        let _ = std::io::stderr().write_all(line.as_bytes());
        assert!(
            failed.is_empty(),
            "group {} failed cases:\n{}",
            self.number,
            failed.join("\n")
        );
    }
}

/// One server per group; its cases run concurrently, each on its own connection. The default
/// `max_frame_bytes` (64 KiB), and a small `max_payload_bytes` for case 9.5.1.
fn server() -> Server {
    Server::start(ServerOpts::shards(2).env("BROADCASTER_LIMITS_MAX_PAYLOAD_BYTES", "1024"))
}

fn mask() -> Option<[u8; 4]> {
    Some(rand::random())
}

/// One client frame, masked.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(fin, 0, opcode, payload, mask())
}

fn text(payload: &[u8]) -> Vec<u8> {
    frame(true, OP_TEXT, payload)
}

/// A heartbeat request of exactly `len` bytes (at least 43): the echo of a text message.
fn heartbeat_of_len(id: u64, len: usize) -> Vec<u8> {
    let head = format!(r#"{{"id":{id},"method":"heartbeat","pad":""#);
    assert!(
        len >= head.len() + 2,
        "a heartbeat needs {} bytes",
        head.len() + 2
    );
    let mut out = head.into_bytes();
    out.resize(len - 2, b'p');
    out.extend_from_slice(b"\"}");
    out
}

/// A heartbeat request whose pad holds `bytes` verbatim (UTF-8 cases).
fn heartbeat_with(id: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = format!(r#"{{"id":{id},"method":"heartbeat","pad":""#).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\"}");
    out
}

async fn connect(addr: SocketAddr) -> RawWs {
    RawWs::connect(addr).await
}

/// Writes each byte on its own (Autobahn's "octet-wise" sends).
async fn send_octets(ws: &mut RawWs, bytes: &[u8]) {
    for b in bytes {
        ws.send_raw(std::slice::from_ref(b)).await;
    }
}

/// Writes in pieces of `n` bytes.
async fn send_chopped(ws: &mut RawWs, bytes: &[u8], n: usize) {
    for piece in bytes.chunks(n) {
        ws.send_raw(piece).await;
    }
}

/// The next frame, which must be a final, unmasked text frame with no reserved bits; its JSON.
async fn next_text(ws: &mut RawWs) -> Value {
    loop {
        let f = ws.frame().await;
        match f.opcode {
            OP_PING => continue,
            OP_TEXT => {
                assert!(f.fin && f.rsv == 0, "server frame {f:?}");
                return serde_json::from_slice(&f.payload)
                    .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {f:?}"));
            }
            _ => panic!("expected a text answer, got {f:?}"),
        }
    }
}

/// The heartbeat result for request `id`.
async fn expect_echo(ws: &mut RawWs, id: u64) {
    let v = next_text(ws).await;
    let r = ok_result(&v, &json!(id));
    assert!(
        r["timestamp"].as_str().is_some_and(is_rfc3339_utc),
        "heartbeat result {v}"
    );
}

/// An error answer with `code` and `requestId` null (a frame that is no request).
async fn expect_error(ws: &mut RawWs, code: &str) {
    let v = next_text(ws).await;
    assert_error(&v, &Value::Null, code);
}

/// A pong carrying `payload`.
async fn expect_pong(ws: &mut RawWs, payload: &[u8]) {
    let f = ws.frame().await;
    assert_eq!(f.opcode, OP_PONG, "expected a pong, got {f:?}");
    assert!(f.fin && f.rsv == 0, "pong frame {f:?}");
    assert_eq!(f.payload, payload, "pong payload");
}

/// The close frame with `code` (None: a close frame without a code), then the end of TCP.
async fn expect_close(ws: &mut RawWs, code: Option<u16>) {
    let f = loop {
        match ws.read_frame(T).await {
            Ok(f) if f.opcode == OP_CLOSE => break f,
            Ok(f) if f.opcode == OP_PING => continue,
            Ok(f) => panic!("expected close {code:?}, got {f:?}"),
            Err(e) => panic!("expected close {code:?}, the connection ended: {e:?}"),
        }
    };
    assert!(f.fin && f.rsv == 0, "close frame {f:?}");
    assert_eq!(f.close_code(), code, "close code; reason {:?}", f.payload);
    if f.payload.len() > 2 {
        assert!(
            std::str::from_utf8(&f.payload[2..]).is_ok(),
            "close reason not UTF-8"
        );
    }
    ws.expect_eof().await;
}

/// A case that sends `bytes` in one write and expects close `code`.
fn closes(g: &mut Group, addr: SocketAddr, id: &str, bytes: Vec<u8>, code: u16) {
    g.case(id, async move {
        let mut ws = connect(addr).await;
        ws.send_raw_lossy(&bytes).await;
        expect_close(&mut ws, Some(code)).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 1: framing
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_1_framing() {
    let s = server();
    let addr = s.public;
    let mut g = Group::new(1, "framing");
    // 1.1.1: an empty text message is valid and answered (it is not a request).
    g.case("1.1.1 text, 0 bytes", async move {
        let mut ws = connect(addr).await;
        ws.send_raw(&text(b"")).await;
        expect_error(&mut ws, "InvalidArgument").await;
        ws.send_raw(&text(&heartbeat_of_len(2, 60))).await;
        expect_echo(&mut ws, 2).await;
    });
    // 1.1.2-1.1.7: the lengths around the 7-bit, 16-bit and 64-bit encodings.
    for (i, len) in [125usize, 126, 127, 128, 65535, 65536]
        .into_iter()
        .enumerate()
    {
        g.case(format!("1.1.{} text, {len} bytes", i + 2), async move {
            let mut ws = connect(addr).await;
            ws.send_raw(&text(&heartbeat_of_len(len as u64, len))).await;
            expect_echo(&mut ws, len as u64).await;
        });
    }
    // 1.1.8: 65536 bytes written in chops of 997.
    g.case("1.1.8 text, 65536 bytes in chops of 997", async move {
        let mut ws = connect(addr).await;
        send_chopped(&mut ws, &text(&heartbeat_of_len(8, 65536)), 997).await;
        expect_echo(&mut ws, 8).await;
    });
    // 1.2.x: binary messages are valid frames; this protocol answers them with an error and
    // keeps the connection.
    for (i, len) in [0usize, 125, 126, 127, 128, 65535, 65536]
        .into_iter()
        .enumerate()
    {
        g.case(format!("1.2.{} binary, {len} bytes", i + 1), async move {
            let mut ws = connect(addr).await;
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            ws.send_raw(&frame(true, OP_BINARY, &data)).await;
            expect_error(&mut ws, "InvalidArgument").await;
            ws.send_raw(&text(&heartbeat_of_len(9, 50))).await;
            expect_echo(&mut ws, 9).await;
        });
    }
    g.case("1.2.8 binary, 65536 bytes in chops of 997", async move {
        let mut ws = connect(addr).await;
        send_chopped(&mut ws, &frame(true, OP_BINARY, &[0xfe; 65536]), 997).await;
        expect_error(&mut ws, "InvalidArgument").await;
    });
    g.case(
        "1.3.1 100 messages in one write, answered in order",
        async move {
            let mut ws = connect(addr).await;
            let mut bytes = Vec::new();
            for id in 0..100u64 {
                bytes.extend(text(&heartbeat_of_len(id, 50 + id as usize)));
            }
            ws.send_raw(&bytes).await;
            for id in 0..100u64 {
                expect_echo(&mut ws, id).await;
            }
        },
    );
    g.case("1.3.2 a message written one byte at a time", async move {
        let mut ws = connect(addr).await;
        send_octets(&mut ws, &text(&heartbeat_of_len(3, 200))).await;
        expect_echo(&mut ws, 3).await;
    });
    g.case("1.3.3 two messages split mid-header", async move {
        let mut ws = connect(addr).await;
        let mut bytes = text(&heartbeat_of_len(1, 300));
        bytes.extend(text(&heartbeat_of_len(2, 70)));
        // Cut inside the second frame's 16-bit length... and inside the first one's.
        let (a, b) = bytes.split_at(3);
        ws.send_raw(a).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (b, c) = b.split_at(b.len() - 70);
        ws.send_raw(b).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        ws.send_raw(c).await;
        expect_echo(&mut ws, 1).await;
        expect_echo(&mut ws, 2).await;
    });
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 2: pings and pongs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_2_pings_and_pongs() {
    let s = server();
    let addr = s.public;
    let mut g = Group::new(2, "pings and pongs");
    let pings: [(&str, Vec<u8>); 4] = [
        ("2.1 ping, no payload", Vec::new()),
        ("2.2 ping, small text payload", b"Hello, world!".to_vec()),
        (
            "2.3 ping, small binary payload",
            vec![0x00, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0x00, 0xff],
        ),
        (
            "2.4 ping, 125-byte binary payload",
            (0..125).map(|i| (255 - i) as u8).collect(),
        ),
    ];
    for (id, payload) in pings {
        g.case(id, async move {
            let mut ws = connect(addr).await;
            ws.send_raw(&frame(true, OP_PING, &payload)).await;
            expect_pong(&mut ws, &payload).await;
        });
    }
    closes(
        &mut g,
        addr,
        "2.5 ping, 126-byte payload",
        frame(true, OP_PING, &[0xfe; 126]),
        1002,
    );
    g.case(
        "2.6 ping, 125 bytes written one byte at a time",
        async move {
            let mut ws = connect(addr).await;
            let payload = [b'*'; 125];
            send_octets(&mut ws, &frame(true, OP_PING, &payload)).await;
            expect_pong(&mut ws, &payload).await;
        },
    );
    g.case("2.7 unsolicited pong, no payload: ignored", async move {
        let mut ws = connect(addr).await;
        ws.send_raw(&frame(true, OP_PONG, b"")).await;
        ws.send_raw(&text(&heartbeat_of_len(7, 50))).await;
        expect_echo(&mut ws, 7).await;
    });
    g.case("2.8 unsolicited pong with payload: ignored", async move {
        let mut ws = connect(addr).await;
        ws.send_raw(&frame(true, OP_PONG, b"unsolicited pong payload"))
            .await;
        ws.send_raw(&text(&heartbeat_of_len(8, 50))).await;
        expect_echo(&mut ws, 8).await;
    });
    g.case(
        "2.9 unsolicited pong, then ping: one pong, for the ping",
        async move {
            let mut ws = connect(addr).await;
            let mut bytes = frame(true, OP_PONG, b"unsolicited");
            bytes.extend(frame(true, OP_PING, b"solicited"));
            ws.send_raw(&bytes).await;
            expect_pong(&mut ws, b"solicited").await;
            ws.send_raw(&text(&heartbeat_of_len(9, 50))).await;
            expect_echo(&mut ws, 9).await;
        },
    );
    for (id, octets) in [
        ("2.10 ten pings in one write", false),
        ("2.11 ten pings, octet-wise", true),
    ] {
        g.case(id, async move {
            let mut ws = connect(addr).await;
            let mut bytes = Vec::new();
            for i in 0..10 {
                bytes.extend(frame(true, OP_PING, format!("payload-{i}").as_bytes()));
            }
            if octets {
                send_octets(&mut ws, &bytes).await;
            } else {
                ws.send_raw(&bytes).await;
            }
            // The RFC allows answering only the latest; this server answers each, in order.
            for i in 0..10 {
                expect_pong(&mut ws, format!("payload-{i}").as_bytes()).await;
            }
        });
    }
    g.case("2.12 ping with every byte value", async move {
        let mut ws = connect(addr).await;
        for chunk in (0..=255u8).collect::<Vec<_>>().chunks(125) {
            ws.send_raw(&frame(true, OP_PING, chunk)).await;
            expect_pong(&mut ws, chunk).await;
        }
    });
    g.case("2.13 ping after a request, answers in order", async move {
        let mut ws = connect(addr).await;
        let mut bytes = text(&heartbeat_of_len(13, 50));
        bytes.extend(frame(true, OP_PING, b"after"));
        ws.send_raw(&bytes).await;
        expect_echo(&mut ws, 13).await;
        expect_pong(&mut ws, b"after").await;
    });
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 3: reserved bits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_3_reserved_bits() {
    let s = server();
    let addr = s.public;
    let mut g = Group::new(3, "reserved bits");
    let hb = heartbeat_of_len(1, 50);
    closes(
        &mut g,
        addr,
        "3.1 text, RSV = 1",
        encode_frame(true, 4, OP_TEXT, &hb, mask()),
        1002,
    );
    // 3.2-3.4: a good message, then the bad frame, then a ping: the good one is answered, the
    // bad one closes, the ping after it is not answered.
    for (id, rsv, how) in [
        ("3.2 text, then text with RSV = 2, then ping", 2u8, 0),
        ("3.3 the same, frame-wise", 3, 1),
        ("3.4 the same, octet-wise, RSV = 4", 4, 2),
    ] {
        let hb = hb.clone();
        g.case(id, async move {
            let mut ws = connect(addr).await;
            let good = text(&hb);
            let bad = encode_frame(true, rsv, OP_TEXT, &hb, mask());
            let ping = frame(true, OP_PING, b"after");
            match how {
                0 => ws.send_raw_lossy(&[good, bad, ping].concat()).await,
                1 => {
                    ws.send_raw(&good).await;
                    ws.send_raw_lossy(&bad).await;
                    ws.send_raw_lossy(&ping).await;
                }
                _ => {
                    for b in [good, bad, ping].concat() {
                        if ws.stream.write_all(&[b]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            expect_echo(&mut ws, 1).await;
            expect_close(&mut ws, Some(1002)).await;
        });
    }
    closes(
        &mut g,
        addr,
        "3.5 binary, RSV = 5",
        encode_frame(true, 5, OP_BINARY, &[0xff; 8], mask()),
        1002,
    );
    closes(
        &mut g,
        addr,
        "3.6 ping, RSV = 6",
        encode_frame(true, 6, OP_PING, b"ping", mask()),
        1002,
    );
    closes(
        &mut g,
        addr,
        "3.7 close, RSV = 7",
        encode_frame(true, 7, OP_CLOSE, &1000u16.to_be_bytes(), mask()),
        1002,
    );
    closes(
        &mut g,
        addr,
        "3.8 continuation, RSV = 1, inside a fragmented message",
        [
            frame(false, OP_TEXT, b"{\"id\":1,"),
            encode_frame(true, 4, OP_CONT, b"\"method\":\"heartbeat\"}", mask()),
        ]
        .concat(),
        1002,
    );
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 4: opcodes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_4_opcodes() {
    let s = server();
    let addr = s.public;
    let mut g = Group::new(4, "opcodes");
    for (section, ops) in [("4.1", [3u8, 4, 5, 6, 7]), ("4.2", [11, 12, 13, 14, 15])] {
        for (i, op) in ops.into_iter().enumerate() {
            let id = format!("{section}.{} reserved opcode {op}", i + 1);
            match i {
                // x.1: empty; x.2: with payload.
                0 => closes(&mut g, addr, &id, frame(true, op, b""), 1002),
                1 => closes(&mut g, addr, &id, frame(true, op, b"reserved"), 1002),
                // x.3, x.4: after a good message, before a ping; x.5 octet-wise.
                _ => g.case(id, async move {
                    let mut ws = connect(addr).await;
                    let bytes = [
                        text(&heartbeat_of_len(4, 50)),
                        frame(true, op, b"reserved"),
                        frame(true, OP_PING, b""),
                    ]
                    .concat();
                    if i == 4 {
                        for b in bytes {
                            if ws.stream.write_all(&[b]).await.is_err() {
                                break;
                            }
                        }
                    } else {
                        ws.send_raw_lossy(&bytes).await;
                    }
                    expect_echo(&mut ws, 4).await;
                    expect_close(&mut ws, Some(1002)).await;
                }),
            }
        }
    }
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 5: fragmentation
// ---------------------------------------------------------------------------------------------

/// How a sequence of frames is written.
#[derive(Clone, Copy)]
enum How {
    /// All in one write.
    Whole,
    /// One write per frame.
    Frames,
    /// One write per byte.
    Octets,
}

async fn send_frames(ws: &mut RawWs, frames: &[Vec<u8>], how: How) {
    match how {
        How::Whole => ws.send_raw_lossy(&frames.concat()).await,
        How::Frames => {
            for f in frames {
                ws.send_raw_lossy(f).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        How::Octets => {
            for b in frames.concat() {
                if ws.stream.write_all(&[b]).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Sends `frames` and expects the pongs and echoes in `answers`, then possibly a close.
fn fragments(
    g: &mut Group,
    addr: SocketAddr,
    id: &str,
    frames: Vec<Vec<u8>>,
    how: How,
    answers: Vec<Answer>,
) {
    g.case(id, async move {
        let mut ws = connect(addr).await;
        send_frames(&mut ws, &frames, how).await;
        for a in answers {
            match a {
                Answer::Echo(id) => expect_echo(&mut ws, id).await,
                Answer::Pong(p) => expect_pong(&mut ws, &p).await,
                Answer::Error(code) => expect_error(&mut ws, code).await,
                Answer::Close(code) => expect_close(&mut ws, code).await,
            }
        }
    });
}

#[derive(Clone)]
enum Answer {
    Echo(u64),
    Pong(Vec<u8>),
    Error(&'static str),
    Close(Option<u16>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_5_fragmentation() {
    use Answer::*;
    let s = server();
    let addr = s.public;
    let mut g = Group::new(5, "fragmentation");
    let hb = heartbeat_of_len(5, 64);
    let (a, b) = hb.split_at(20);
    let (a, b) = (a.to_vec(), b.to_vec());
    fragments(
        &mut g,
        addr,
        "5.1 ping in 2 fragments",
        vec![
            frame(false, OP_PING, b"frag"),
            frame(true, OP_CONT, b"ment"),
        ],
        How::Whole,
        vec![Close(Some(1002))],
    );
    fragments(
        &mut g,
        addr,
        "5.2 pong in 2 fragments",
        vec![
            frame(false, OP_PONG, b"frag"),
            frame(true, OP_CONT, b"ment"),
        ],
        How::Whole,
        vec![Close(Some(1002))],
    );
    for (id, how) in [
        ("5.3 text in 2 fragments", How::Whole),
        ("5.4 the same, octet-wise", How::Octets),
        ("5.5 the same, frame-wise", How::Frames),
    ] {
        fragments(
            &mut g,
            addr,
            id,
            vec![frame(false, OP_TEXT, &a), frame(true, OP_CONT, &b)],
            how,
            vec![Echo(5)],
        );
    }
    for (id, how) in [
        ("5.6 text in 2 fragments, ping between", How::Whole),
        ("5.7 the same, octet-wise", How::Octets),
        ("5.8 the same, frame-wise", How::Frames),
    ] {
        fragments(
            &mut g,
            addr,
            id,
            vec![
                frame(false, OP_TEXT, &a),
                frame(true, OP_PING, b"between"),
                frame(true, OP_CONT, &b),
            ],
            how,
            vec![Pong(b"between".to_vec()), Echo(5)],
        );
    }
    // 5.9-5.14: a continuation with nothing to continue (FIN set, then not), then a message.
    for (i, (fin, how)) in [
        (true, How::Whole),
        (true, How::Frames),
        (true, How::Octets),
        (false, How::Whole),
        (false, How::Frames),
        (false, How::Octets),
    ]
    .into_iter()
    .enumerate()
    {
        fragments(
            &mut g,
            addr,
            &format!(
                "5.{} continuation (FIN = {fin}) with nothing to continue",
                9 + i
            ),
            vec![frame(fin, OP_CONT, b"orphan"), text(&hb)],
            how,
            vec![Close(Some(1002))],
        );
    }
    // 5.15: a complete fragmented message, then an orphan continuation.
    fragments(
        &mut g,
        addr,
        "5.15 message in 2 fragments, then continuation with nothing to continue",
        vec![
            frame(false, OP_TEXT, &a),
            frame(true, OP_CONT, &b),
            frame(false, OP_CONT, b"orphan"),
            frame(true, OP_TEXT, &hb),
        ],
        How::Whole,
        vec![Echo(5), Close(Some(1002))],
    );
    for (id, fin) in [
        (
            "5.16 orphan continuation (FIN = false) before a fragmented message",
            false,
        ),
        (
            "5.17 orphan continuation (FIN = true) before a fragmented message",
            true,
        ),
    ] {
        fragments(
            &mut g,
            addr,
            id,
            vec![
                frame(fin, OP_CONT, b"orphan"),
                frame(false, OP_TEXT, &a),
                frame(true, OP_CONT, &b),
            ],
            How::Whole,
            vec![Close(Some(1002))],
        );
    }
    fragments(
        &mut g,
        addr,
        "5.18 text in 2 fragments, both with opcode text",
        vec![frame(false, OP_TEXT, &a), frame(true, OP_TEXT, &b)],
        How::Whole,
        vec![Close(Some(1002))],
    );
    // 5.19, 5.20: five fragments with pings after the 2nd and the 4th, written with pauses.
    let pieces: Vec<Vec<u8>> = hb.chunks(13).map(<[u8]>::to_vec).collect();
    assert_eq!(pieces.len(), 5);
    let five = |how| {
        let mut frames = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let op = if i == 0 { OP_TEXT } else { OP_CONT };
            frames.push(frame(i == 4, op, p));
            if i == 1 || i == 3 {
                frames.push(frame(true, OP_PING, format!("pong-{i}").as_bytes()));
            }
        }
        (frames, how)
    };
    for (id, (frames, how)) in [
        (
            "5.19 text in 5 fragments, 2 pings between",
            five(How::Frames),
        ),
        ("5.20 the same, octet-wise", five(How::Octets)),
    ] {
        fragments(
            &mut g,
            addr,
            id,
            frames,
            how,
            vec![Pong(b"pong-1".to_vec()), Pong(b"pong-3".to_vec()), Echo(5)],
        );
    }
    fragments(
        &mut g,
        addr,
        "5.21 empty first and last fragments",
        vec![
            frame(false, OP_TEXT, b""),
            frame(false, OP_CONT, &hb),
            frame(true, OP_CONT, b""),
        ],
        How::Whole,
        vec![Echo(5)],
    );
    fragments(
        &mut g,
        addr,
        "5.22 every fragment empty: an empty text message",
        vec![
            frame(false, OP_TEXT, b""),
            frame(false, OP_CONT, b""),
            frame(true, OP_CONT, b""),
        ],
        How::Whole,
        vec![Error("InvalidArgument")],
    );
    fragments(
        &mut g,
        addr,
        "5.23 a message in one-byte fragments",
        hb.iter()
            .enumerate()
            .map(|(i, byte)| {
                let op = if i == 0 { OP_TEXT } else { OP_CONT };
                frame(i == hb.len() - 1, op, &[*byte])
            })
            .collect(),
        How::Whole,
        vec![Echo(5)],
    );
    fragments(
        &mut g,
        addr,
        "5.24 unsolicited pong between fragments",
        vec![
            frame(false, OP_TEXT, &a),
            frame(true, OP_PONG, b"unsolicited"),
            frame(true, OP_CONT, &b),
        ],
        How::Whole,
        vec![Echo(5)],
    );
    fragments(
        &mut g,
        addr,
        "5.25 binary in 2 fragments",
        vec![
            frame(false, OP_BINARY, b"\x00\x01"),
            frame(true, OP_CONT, b"\x02"),
        ],
        How::Whole,
        vec![Error("InvalidArgument")],
    );
    fragments(
        &mut g,
        addr,
        "5.26 close between fragments is answered",
        vec![
            frame(false, OP_TEXT, &a),
            frame(true, OP_CLOSE, &1000u16.to_be_bytes()),
            frame(true, OP_CONT, &b),
        ],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "5.27 new binary message inside a fragmented text message",
        vec![
            frame(false, OP_TEXT, &a),
            frame(true, OP_BINARY, b"x"),
            frame(true, OP_CONT, &b),
        ],
        How::Whole,
        vec![Close(Some(1002))],
    );
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 6: UTF-8 handling
// ---------------------------------------------------------------------------------------------

/// Byte sequences of Autobahn 6.x (after Markus Kuhn's UTF-8 decoder stress test).
const UTF8_CASES: &[(&str, &[u8])] = &[
    ("6.2 κόσμε", "κόσμε".as_bytes()),
    (
        "6.2 Hello-µ@ßöäüàá-UTF-8!!",
        "Hello-µ@ßöäüàá-UTF-8!!".as_bytes(),
    ),
    ("6.5 first 2-byte sequence U+0080", b"\xc2\x80"),
    ("6.5 first 3-byte sequence U+0800", b"\xe0\xa0\x80"),
    ("6.5 first 4-byte sequence U+10000", b"\xf0\x90\x80\x80"),
    ("6.7 last 1-byte sequence U+007F", b"\x7f"),
    ("6.7 last 2-byte sequence U+07FF", b"\xdf\xbf"),
    ("6.7 last 3-byte sequence U+FFFF", b"\xef\xbf\xbf"),
    ("6.7 last 4-byte sequence U+10FFFF", b"\xf4\x8f\xbf\xbf"),
    ("6.8 5-byte sequence", b"\xf8\x88\x80\x80\x80"),
    ("6.8 6-byte sequence", b"\xfc\x84\x80\x80\x80\x80"),
    ("6.9 4-byte sequence over U+10FFFF", b"\xf7\xbf\xbf\xbf"),
    ("6.10 U+D7FF", b"\xed\x9f\xbf"),
    ("6.10 U+E000", b"\xee\x80\x80"),
    ("6.10 U+FFFD", b"\xef\xbf\xbd"),
    ("6.10 U+110000", b"\xf4\x90\x80\x80"),
    ("6.12 lone continuation 0x80", b"\x80"),
    ("6.12 lone continuation 0xBF", b"\xbf"),
    ("6.12 two continuations", b"\x80\xbf"),
    ("6.12 all 64 continuation bytes", &CONTINUATIONS),
    ("6.13 lonely 2-byte start, then space", b"\xc0 "),
    ("6.13 lonely 3-byte start, then space", b"\xe0 "),
    ("6.13 lonely 4-byte start, then space", b"\xf0 "),
    ("6.14 2-byte sequence, last byte missing", b"\xc2"),
    ("6.14 3-byte sequence, last byte missing", b"\xe0\x80"),
    ("6.14 4-byte sequence, last byte missing", b"\xf0\x80\x80"),
    ("6.14 3-byte U+FFFF, last byte missing", b"\xef\xbf"),
    ("6.16 impossible byte 0xFE", b"\xfe"),
    ("6.16 impossible byte 0xFF", b"\xff"),
    ("6.16 0xFE 0xFE 0xFF 0xFF", b"\xfe\xfe\xff\xff"),
    ("6.17 overlong '/' in 2 bytes", b"\xc0\xaf"),
    ("6.17 overlong '/' in 3 bytes", b"\xe0\x80\xaf"),
    ("6.17 overlong '/' in 4 bytes", b"\xf0\x80\x80\xaf"),
    ("6.18 maximum overlong 2 bytes", b"\xc1\xbf"),
    ("6.18 maximum overlong 3 bytes", b"\xe0\x9f\xbf"),
    ("6.18 maximum overlong 4 bytes", b"\xf0\x8f\xbf\xbf"),
    ("6.19 overlong NUL in 2 bytes", b"\xc0\x80"),
    ("6.19 overlong NUL in 3 bytes", b"\xe0\x80\x80"),
    ("6.20 surrogate U+D800", b"\xed\xa0\x80"),
    ("6.20 surrogate U+DB7F", b"\xed\xad\xbf"),
    ("6.20 surrogate U+DC00", b"\xed\xb0\x80"),
    ("6.20 surrogate U+DFFF", b"\xed\xbf\xbf"),
    (
        "6.21 surrogate pair U+D800 U+DC00",
        b"\xed\xa0\x80\xed\xb0\x80",
    ),
    (
        "6.21 surrogate pair U+DBFF U+DFFF",
        b"\xed\xaf\xbf\xed\xbf\xbf",
    ),
    ("6.22 noncharacter U+FFFE", b"\xef\xbf\xbe"),
    ("6.22 noncharacter U+1FFFF", b"\xf0\x9f\xbf\xbf"),
    ("6.22 noncharacter U+10FFFE", b"\xf4\x8f\xbf\xbe"),
    ("6.22 noncharacter U+FDD0", b"\xef\xb7\x90"),
];

const CONTINUATIONS: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        a[i] = 0x80 + i as u8;
        i += 1;
    }
    a
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_6_utf8() {
    let s = server();
    let addr = s.public;
    let mut g = Group::new(6, "UTF-8 handling");
    // 6.1: empty text, whole and in empty fragments: valid UTF-8, not a request.
    fragments(
        &mut g,
        addr,
        "6.1.1 empty text",
        vec![text(b"")],
        How::Whole,
        vec![Answer::Error("InvalidArgument")],
    );
    fragments(
        &mut g,
        addr,
        "6.1.2 empty text in 3 empty fragments",
        vec![
            frame(false, OP_TEXT, b""),
            frame(false, OP_CONT, b""),
            frame(true, OP_CONT, b""),
        ],
        How::Whole,
        vec![Answer::Error("InvalidArgument")],
    );
    for (n, (name, bytes)) in UTF8_CASES.iter().enumerate() {
        let valid = std::str::from_utf8(bytes).is_ok();
        let id = n as u64 + 100;
        let message = heartbeat_with(id, bytes);
        let expected = if valid {
            Answer::Echo(id)
        } else {
            Answer::Close(Some(1007))
        };
        let verdict = if valid { "valid" } else { "invalid" };
        // Whole, in one frame.
        fragments(
            &mut g,
            addr,
            &format!("{name} ({verdict}), one frame"),
            vec![text(&message)],
            How::Whole,
            vec![expected.clone()],
        );
        // Split into one-byte fragments: every sequence crosses fragment boundaries.
        let frames: Vec<Vec<u8>> = message
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let op = if i == 0 { OP_TEXT } else { OP_CONT };
                frame(i == message.len() - 1, op, &[*b])
            })
            .collect();
        fragments(
            &mut g,
            addr,
            &format!("{name} ({verdict}), one-byte fragments"),
            frames,
            How::Whole,
            vec![expected.clone()],
        );
        // The bytes as a message of their own (not JSON): answered or 1007.
        let own = if valid {
            Answer::Error("InvalidArgument")
        } else {
            Answer::Close(Some(1007))
        };
        fragments(
            &mut g,
            addr,
            &format!("{name} ({verdict}), alone"),
            vec![text(bytes)],
            How::Whole,
            vec![own],
        );
    }
    // 6.3/6.4: invalid in the middle of a message split across frames, fail at the message.
    let bad = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited";
    fragments(
        &mut g,
        addr,
        "6.3.1 invalid sequence in one frame",
        vec![text(bad)],
        How::Whole,
        vec![Answer::Close(Some(1007))],
    );
    fragments(
        &mut g,
        addr,
        "6.4.1 invalid sequence in the 2nd of 3 fragments",
        vec![
            frame(false, OP_TEXT, &bad[..5]),
            frame(false, OP_CONT, &bad[5..14]),
            frame(true, OP_CONT, &bad[14..]),
        ],
        How::Frames,
        vec![Answer::Close(Some(1007))],
    );
    fragments(
        &mut g,
        addr,
        "6.4.2 sequence cut by a fragment boundary, continued with ASCII",
        vec![
            frame(false, OP_TEXT, b"{\"x\":\"\xe2\x82"),
            frame(true, OP_CONT, b"A\"}"),
        ],
        How::Whole,
        vec![Answer::Close(Some(1007))],
    );
    fragments(
        &mut g,
        addr,
        "6.4.3 message ends inside a sequence",
        vec![
            frame(false, OP_TEXT, b"{}"),
            frame(true, OP_CONT, b"\xf0\x90\x80"),
        ],
        How::Whole,
        vec![Answer::Close(Some(1007))],
    );
    fragments(
        &mut g,
        addr,
        "6.4.4 4-byte character split 1+1+1+1 across fragments",
        {
            let msg = heartbeat_with(64, "😀".as_bytes());
            let at = msg.len() - 6;
            vec![
                frame(false, OP_TEXT, &msg[..at]),
                frame(false, OP_CONT, &msg[at..at + 1]),
                frame(false, OP_CONT, &msg[at + 1..at + 2]),
                frame(false, OP_CONT, &msg[at + 2..at + 3]),
                frame(true, OP_CONT, &msg[at + 3..]),
            ]
        },
        How::Whole,
        vec![Answer::Echo(64)],
    );
    // 6.6: "κόσμε" cut after each byte: valid exactly at character boundaries.
    let kosme = "κόσμε".as_bytes();
    for cut in 1..=kosme.len() {
        let part = &kosme[..cut];
        let answer = if std::str::from_utf8(part).is_ok() {
            Answer::Error("InvalidArgument")
        } else {
            Answer::Close(Some(1007))
        };
        fragments(
            &mut g,
            addr,
            &format!("6.6.{cut} κόσμε cut after {cut} bytes"),
            vec![text(part)],
            How::Whole,
            vec![answer],
        );
    }
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 7: close handling
// ---------------------------------------------------------------------------------------------

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_7_close_handling() {
    use Answer::*;
    let s = server();
    let addr = s.public;
    let mut g = Group::new(7, "close handling");
    let c1000 = || frame(true, OP_CLOSE, &close_payload(1000, b""));
    fragments(
        &mut g,
        addr,
        "7.1.1 close 1000 after a message",
        vec![text(&heartbeat_of_len(71, 50)), c1000()],
        How::Whole,
        vec![Echo(71), Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.1.2 close twice: one close answered",
        vec![c1000(), c1000()],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.1.3 ping after close: not answered",
        vec![c1000(), frame(true, OP_PING, b"late")],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.1.4 text after close: not answered",
        vec![c1000(), text(&heartbeat_of_len(74, 50))],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.1.5 fragment, close, continuation: closed",
        vec![
            frame(false, OP_TEXT, b"{\"id\":75,"),
            c1000(),
            frame(true, OP_CONT, b"\"method\":\"heartbeat\"}"),
        ],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.1.6 many large messages, then close, then ping",
        {
            let mut v: Vec<Vec<u8>> = (0..8)
                .map(|i| text(&heartbeat_of_len(760 + i, 60000)))
                .collect();
            v.push(c1000());
            v.push(frame(true, OP_PING, b"late"));
            v
        },
        How::Whole,
        (0..8)
            .map(|i| Echo(760 + i))
            .chain([Close(Some(1000))])
            .collect(),
    );
    // 7.3: payload lengths.
    g.case("7.3.1 close with empty payload", async move {
        let mut ws = connect(addr).await;
        ws.send_raw(&frame(true, OP_CLOSE, b"")).await;
        // 1005 must not be sent (RFC 6455 7.4.1): the answer has no code or 1000.
        let e = ws.ended(T).await;
        assert!(
            e == RawEnd::Close(None) || e == RawEnd::Close(Some(1000)),
            "empty close answered with {e:?}"
        );
        ws.expect_eof().await;
    });
    fragments(
        &mut g,
        addr,
        "7.3.2 close with 1-byte payload",
        vec![frame(true, OP_CLOSE, b"\x03")],
        How::Whole,
        vec![Close(Some(1002))],
    );
    fragments(
        &mut g,
        addr,
        "7.3.3 close with code only",
        vec![frame(true, OP_CLOSE, &close_payload(1000, b""))],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.3.4 close with code and reason",
        vec![frame(true, OP_CLOSE, &close_payload(1000, b"Hello World!"))],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.3.5 close with 123-byte reason (125-byte payload)",
        vec![frame(true, OP_CLOSE, &close_payload(1000, &[b'*'; 123]))],
        How::Whole,
        vec![Close(Some(1000))],
    );
    fragments(
        &mut g,
        addr,
        "7.3.6 close with 124-byte reason (126-byte payload)",
        vec![frame(true, OP_CLOSE, &close_payload(1000, &[b'*'; 124]))],
        How::Whole,
        vec![Close(Some(1002))],
    );
    fragments(
        &mut g,
        addr,
        "7.5.1 close reason not UTF-8",
        vec![frame(
            true,
            OP_CLOSE,
            &close_payload(
                1000,
                b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            ),
        )],
        How::Whole,
        vec![Close(Some(1007))],
    );
    fragments(
        &mut g,
        addr,
        "7.5.2 close reason in UTF-8 (multi-byte)",
        vec![frame(
            true,
            OP_CLOSE,
            &close_payload(1001, "κόσμε 😀".as_bytes()),
        )],
        How::Whole,
        vec![Close(Some(1001))],
    );
    // 7.7: valid codes are echoed.
    let valid = [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        // Registered with IANA after RFC 6455: service restart, try again later, bad gateway.
        1012, 1013, 1014,
    ];
    for (i, code) in valid.into_iter().enumerate() {
        fragments(
            &mut g,
            addr,
            &format!("7.7.{} close code {code} is echoed", i + 1),
            vec![frame(true, OP_CLOSE, &close_payload(code, b""))],
            How::Whole,
            vec![Close(Some(code))],
        );
    }
    // 7.9 and 7.13: codes a peer must not send.
    let invalid = [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ];
    for (i, code) in invalid.into_iter().enumerate() {
        fragments(
            &mut g,
            addr,
            &format!("7.9.{} close code {code} is a protocol error", i + 1),
            vec![frame(true, OP_CLOSE, &close_payload(code, b""))],
            How::Whole,
            vec![Close(Some(1002))],
        );
    }
    g.case(
        "7.10.1 after the server's close, the TCP connection ends",
        async move {
            // The server fails the connection (1002) and closes TCP without waiting for our close.
            let mut ws = connect(addr).await;
            ws.send_raw(&encode_frame(true, 0, OP_TEXT, b"x", None))
                .await;
            expect_close(&mut ws, Some(1002)).await;
        },
    );
    g.case(
        "7.10.2 frames after the server's close are ignored",
        async move {
            let mut ws = connect(addr).await;
            ws.send_raw(&frame(true, 0x3, b"")).await;
            let f = ws.frame().await;
            assert_eq!(f.close_code(), Some(1002));
            // Keep talking: nothing comes back but the end of the connection.
            ws.send_raw_lossy(&text(&heartbeat_of_len(1, 50))).await;
            ws.send_raw_lossy(&frame(true, OP_PING, b"?")).await;
            ws.expect_eof().await;
        },
    );
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 9: limits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_9_limits() {
    use Answer::*;
    let s = server();
    let addr = s.public;
    let mut g = Group::new(9, "limits");
    for (id, len, answer) in [
        ("9.1.1 text of max_frame_bytes - 1", MAX - 1, Echo(1)),
        ("9.1.2 text of exactly max_frame_bytes", MAX, Echo(1)),
        (
            "9.1.3 text of max_frame_bytes + 1",
            MAX + 1,
            Close(Some(1009)),
        ),
        (
            "9.1.4 text of 4 * max_frame_bytes",
            4 * MAX,
            Close(Some(1009)),
        ),
    ] {
        fragments(
            &mut g,
            addr,
            id,
            vec![text(&heartbeat_of_len(1, len))],
            How::Whole,
            vec![answer],
        );
    }
    fragments(
        &mut g,
        addr,
        "9.1.5 binary of max_frame_bytes + 1",
        vec![frame(true, OP_BINARY, &vec![0; MAX + 1])],
        How::Whole,
        vec![Close(Some(1009))],
    );
    // Fragmented: each fragment fits, the message must too.
    let split = |len: usize, pieces: usize| -> Vec<Vec<u8>> {
        let msg = heartbeat_of_len(2, len);
        let n = msg.len().div_ceil(pieces);
        let chunks: Vec<&[u8]> = msg.chunks(n).collect();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let op = if i == 0 { OP_TEXT } else { OP_CONT };
                frame(i == chunks.len() - 1, op, c)
            })
            .collect()
    };
    for (id, len, pieces, answer) in [
        ("9.2.1 max_frame_bytes in 2 fragments", MAX, 2, Echo(2)),
        (
            "9.2.2 max_frame_bytes + 1 in 2 fragments",
            MAX + 1,
            2,
            Close(Some(1009)),
        ),
        ("9.2.3 max_frame_bytes in 64 fragments", MAX, 64, Echo(2)),
        (
            "9.2.4 max_frame_bytes + 1 in 65 fragments",
            MAX + 1,
            65,
            Close(Some(1009)),
        ),
        (
            "9.2.5 max_frame_bytes - 1 in 1000 fragments",
            MAX - 1,
            1000,
            Echo(2),
        ),
    ] {
        fragments(
            &mut g,
            addr,
            id,
            split(len, pieces),
            How::Whole,
            vec![answer],
        );
    }
    // The size is judged from the header: no payload needs to arrive for the close.
    for (id, header) in [
        (
            "9.3.1 header announcing max_frame_bytes + 1, no payload",
            [
                &[0x81u8, 0xff][..],
                &((MAX + 1) as u64).to_be_bytes(),
                &[1, 2, 3, 4],
            ]
            .concat(),
        ),
        (
            "9.3.2 header announcing 2^63 - 1 bytes, no payload",
            [
                &[0x82u8, 0xff][..],
                &(u64::MAX >> 1).to_be_bytes(),
                &[1, 2, 3, 4],
            ]
            .concat(),
        ),
    ] {
        closes(&mut g, addr, id, header, 1009);
    }
    g.case("9.3.3 64-bit length with the top bit set", async move {
        // RFC 6455 5.2: the most significant bit must be 0. Either failure code is right.
        let mut ws = connect(addr).await;
        let header = [&[0x81u8, 0xff][..], &u64::MAX.to_be_bytes(), &[1, 2, 3, 4]].concat();
        ws.send_raw_lossy(&header).await;
        let e = ws.ended(T).await;
        assert!(
            e == RawEnd::Close(Some(1009)) || e == RawEnd::Close(Some(1002)),
            "answered {e:?}"
        );
    });
    g.case("9.4.1 32 messages of 60 KiB in one write", async move {
        let mut ws = connect(addr).await;
        let bytes: Vec<u8> = (0..32)
            .flat_map(|i| text(&heartbeat_of_len(i, 60 * 1024)))
            .collect();
        ws.send_raw(&bytes).await;
        for i in 0..32 {
            expect_echo(&mut ws, i).await;
        }
    });
    g.case(
        "9.4.2 max_frame_bytes in chops of 1, 7, 1300 and 65535",
        async move {
            let mut ws = connect(addr).await;
            for (i, chop) in [1usize, 7, 1300, 65535].into_iter().enumerate() {
                let len = if chop == 1 { 4096 } else { MAX };
                send_chopped(&mut ws, &text(&heartbeat_of_len(i as u64, len)), chop).await;
                expect_echo(&mut ws, i as u64).await;
            }
        },
    );
    // The payload limit of SPEC section 6 (1024 bytes on this server) inside a valid frame.
    g.case("9.5.1 publish payload at and over max_payload_bytes", async move {
        let mut ws = connect(addr).await;
        let token = TokenSpec::new(SECRET, "limits").mint();
        ws.send_text(&json!({"id":1,"method":"auth","params":{"token":token}}).to_string())
            .await;
        let v = next_text(&mut ws).await;
        ok_result(&v, &json!(1));
        for (id, len, ok) in [(2u64, 1024usize, true), (3, 1025, false)] {
            // A JSON string payload of exactly `len` bytes, quotes included.
            let payload = format!("\"{}\"", "x".repeat(len - 2));
            let req = format!(
                r#"{{"id":{id},"method":"publish","params":{{"channel":"limits","event":"e","payload":{payload}}}}}"#
            );
            ws.send_text(&req).await;
            let v = next_text(&mut ws).await;
            if ok {
                ok_result(&v, &json!(id));
            } else {
                assert_error(&v, &json!(id), "ResourceExhausted");
            }
        }
    });
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// 10: misc
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_10_misc() {
    use Answer::*;
    let s = server();
    let addr = s.public;
    let mut g = Group::new(10, "misc");
    // 10.1.1: 65536 bytes auto-fragmented into frames of 1300.
    let msg = heartbeat_of_len(10, MAX);
    let pieces: Vec<&[u8]> = msg.chunks(1300).collect();
    let frames: Vec<Vec<u8>> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            frame(
                i == pieces.len() - 1,
                if i == 0 { OP_TEXT } else { OP_CONT },
                p,
            )
        })
        .collect();
    fragments(
        &mut g,
        addr,
        "10.1.1 65536 bytes in fragments of 1300",
        frames,
        How::Whole,
        vec![Echo(10)],
    );
    g.case(
        "10.2.1 frames in the same write as the opening handshake",
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let key = ws_key();
            let mut bytes = format!(
                "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .into_bytes();
            bytes.extend(text(&heartbeat_of_len(21, 60)));
            bytes.extend(frame(true, OP_PING, b"early"));
            stream.write_all(&bytes).await.unwrap();
            let (head, rest) = read_http_head(&mut stream).await;
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert_eq!(
                header_value(&head, "sec-websocket-accept"),
                Some(expected_accept(&key))
            );
            let mut buf = rest;
            let mut frames = Vec::new();
            while frames.len() < 2 {
                if let Some((f, used)) = parse_server_frame(&buf) {
                    buf.drain(..used);
                    frames.push(f);
                    continue;
                }
                let mut tmp = [0u8; 4096];
                let n = within(
                    T,
                    "answers",
                    tokio::io::AsyncReadExt::read(&mut stream, &mut tmp),
                )
                .await
                .unwrap();
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&tmp[..n]);
            }
            let v: Value = serde_json::from_slice(&frames[0].payload).unwrap();
            ok_result(&v, &json!(21));
            assert_eq!(frames[1].opcode, OP_PONG);
            assert_eq!(frames[1].payload, b"early");
        },
    );
    g.case(
        "10.3.1 server frames are unmasked, final, without reserved bits",
        async move {
            // parse_server_frame asserts the mask bit; here FIN and RSV of each kind of frame.
            let mut ws = connect(addr).await;
            ws.send_raw(&frame(true, OP_PING, b"p")).await;
            let pong = ws.frame().await;
            ws.send_raw(&text(&heartbeat_of_len(1, 60))).await;
            let answer = ws.frame().await;
            ws.send_raw(&frame(true, OP_CLOSE, &close_payload(1000, b"")))
                .await;
            let close = ws.frame().await;
            for f in [pong, answer, close] {
                assert!(f.fin && f.rsv == 0, "{f:?}");
            }
        },
    );
    fragments(
        &mut g,
        addr,
        "10.4.1 non-minimal 16-bit and 64-bit lengths are read",
        vec![
            {
                let p = heartbeat_of_len(41, 60);
                let m = [9, 8, 7, 6];
                let mut f = vec![0x81, 0x80 | 126, 0, 60];
                f.extend_from_slice(&m);
                f.extend(p.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
                f
            },
            {
                let p = heartbeat_of_len(42, 60);
                let m = [1, 2, 3, 4];
                let mut f = vec![0x81, 0x80 | 127];
                f.extend_from_slice(&60u64.to_be_bytes());
                f.extend_from_slice(&m);
                f.extend(p.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
                f
            },
        ],
        How::Whole,
        vec![Echo(41), Echo(42)],
    );
    fragments(
        &mut g,
        addr,
        "10.5.1 all-zero mask",
        vec![encode_frame(
            true,
            0,
            OP_TEXT,
            &heartbeat_of_len(51, 60),
            Some([0; 4]),
        )],
        How::Whole,
        vec![Echo(51)],
    );
    fragments(
        &mut g,
        addr,
        "10.6.1 unmasked frame after good ones",
        vec![
            text(&heartbeat_of_len(61, 60)),
            encode_frame(true, 0, OP_TEXT, &heartbeat_of_len(62, 60), None),
        ],
        How::Whole,
        vec![Echo(61), Close(Some(1002))],
    );
    fragments(
        &mut g,
        addr,
        "10.6.2 unmasked ping",
        vec![encode_frame(true, 0, OP_PING, b"x", None)],
        How::Whole,
        vec![Close(Some(1002))],
    );
    g.run().await;
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs found by the fuzzers and this suite (fixed in 48ddd6b and be5b05a)
// ---------------------------------------------------------------------------------------------

/// A token whose `exp` is far beyond what `Instant` can hold (a backend minting "never
/// expires" tokens with `u64::MAX`): the connection computes its expiry deadline from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_token_exp_beyond_instant_range() {
    let s = Server::start(ServerOpts::shards(1));
    let claims = json!({"sub": "forever", "aud": "broadcaster", "exp": u64::MAX,
        "authorizedChannels": ["*"], "scope": ["subscribe"]});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut ws = connect(s.public).await;
    ws.send_text(&json!({"id": 1, "method": "auth", "params": {"token": token}}).to_string())
        .await;
    let f = match ws.read_frame(T).await {
        Ok(f) => f,
        Err(e) => panic!(
            "connection ended after auth ({e:?}); server stderr:\n{}",
            last_chars(&s.stderr(), 6000)
        ),
    };
    ok_result(&serde_json::from_slice(&f.payload).unwrap(), &json!(1));
    ws.send_raw(&text(&heartbeat_of_len(2, 60))).await;
    expect_echo(&mut ws, 2).await;
    // The shard still serves other connections.
    let mut other = connect(s.public).await;
    other.send_raw(&text(&heartbeat_of_len(3, 60))).await;
    expect_echo(&mut other, 3).await;
}

/// Durations the configuration accepts must not overflow when the server adds them to the
/// current time (SPEC 2: a bad configuration is an error naming the key, never a panic).
/// Refusing to start with the key named is the right answer too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_huge_durations_in_config() {
    let huge = "10000000000000000000s";
    let mut failures = Vec::new();
    for (env, key) in [
        (
            "BROADCASTER_LIMITS_HTTP_HEAD_TIMEOUT",
            "limits.http_head_timeout",
        ),
        ("BROADCASTER_LIMITS_AUTH_TIMEOUT", "limits.auth_timeout"),
        ("BROADCASTER_LIMITS_PING_INTERVAL", "limits.ping_interval"),
        ("BROADCASTER_LIMITS_WRITE_TIMEOUT", "limits.write_timeout"),
        ("BROADCASTER_AUTH_LEEWAY", "auth.leeway"),
    ] {
        let s = match Server::try_start(ServerOpts::shards(1).env(env, huge)) {
            Err(e) if e.contains(key) => continue,
            Err(e) => {
                failures.push(format!("{env}: refused without naming {key}: {e}"));
                continue;
            }
            Ok(s) => s,
        };
        if let Err(why) = serves_a_session(s.public).await {
            let stderr = s.stderr();
            let panic = stderr
                .lines()
                .skip_while(|l| !l.contains("panicked"))
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            failures.push(format!("{env}={huge}: {why}; {panic}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// GET /health answers 200, and a WebSocket authenticates and answers a heartbeat.
async fn serves_a_session(addr: SocketAddr) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let n = within(T, "health", tcp.read(&mut buf)).await.unwrap_or(0);
    if !buf[..n].starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "GET /health answered {:?}",
            String::from_utf8_lossy(&buf[..n])
        ));
    }
    let mut ws = connect(addr).await;
    let token = TokenSpec::new(SECRET, "d").mint();
    ws.send_text(&json!({"id": 1, "method": "auth", "params": {"token": token}}).to_string())
        .await;
    ws.send_raw(&text(&heartbeat_of_len(2, 60))).await;
    for id in [1, 2] {
        let f = ws
            .read_frame(T)
            .await
            .map_err(|e| format!("websocket ended: {e:?}"))?;
        let v: Value = serde_json::from_slice(&f.payload).map_err(|e| e.to_string())?;
        if v["requestId"] != json!(id) || v.get("result").is_none() {
            return Err(format!("answer {v}"));
        }
    }
    Ok(())
}
