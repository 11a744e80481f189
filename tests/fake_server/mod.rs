//! A stand-in WebSocket server for client tests (`broadcaster connect`, `/client.js`): it
//! accepts each connection a client makes and hands it to the test, which answers `auth` and
//! `subscribe` and then sends what the case needs (a notification, a close code). Unlike the real
//! server it shows the test each request the client makes, so what a client does after a close
//! (the `since` it resumes with, the token it sends, that it does not come back) is checked
//! exactly.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The bound on each wait for the client.
const WAIT: Duration = Duration::from_secs(10);

pub type FakeWs = WebSocketStream<TcpStream>;

/// A stand-in server on 127.0.0.1.
pub struct Fake {
    pub addr: SocketAddr,
    /// The clients' connections, past the WebSocket handshake, in the order they came.
    pub conns: tokio::sync::mpsc::UnboundedReceiver<FakeWs>,
}

/// What a client sent to open a session.
pub struct Session {
    /// The params of its `auth`.
    pub auth: Value,
    /// The params of each `subscribe`, in the order sent.
    pub subscribes: Vec<Value>,
}

pub async fn start() -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, conns) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                if tx.send(ws).is_err() {
                    return;
                }
            }
        }
    });
    Fake { addr, conns }
}

impl Fake {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The next connection; panics naming `what` when none comes.
    pub async fn next_conn(&mut self, what: &str) -> FakeWs {
        match tokio::time::timeout(WAIT, self.conns.recv()).await {
            Ok(Some(ws)) => ws,
            Ok(None) => panic!("the fake server stopped"),
            Err(_) => panic!("no connection within {WAIT:?}: {what}"),
        }
    }

    /// Whether a connection came that the test has not taken.
    pub fn has_conn(&mut self) -> bool {
        self.conns.try_recv().is_ok()
    }
}

pub async fn send_json(ws: &mut FakeWs, v: Value) {
    match tokio::time::timeout(WAIT, ws.send(Message::text(v.to_string()))).await {
        Ok(Ok(())) => {}
        other => panic!("send to the client: {other:?}"),
    }
}

/// The next request the client sends; None when it sent nothing within `d`.
pub async fn next_request(ws: &mut FakeWs, d: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(t)))) => {
                return Some(serde_json::from_str(t.as_str()).expect("a JSON request"))
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the client's connection ended: {other:?}"),
        }
    }
}

/// Answers the client's `auth` and its `subscribe`s (each at offset 7 of epoch `e1`) until `n`
/// channels are subscribed.
pub async fn accept_session(ws: &mut FakeWs, n: usize) -> Session {
    let mut session = Session {
        auth: Value::Null,
        subscribes: Vec::new(),
    };
    while session.subscribes.len() < n {
        let req = next_request(ws, WAIT).await.expect("auth and subscribe");
        let result = match req["method"].as_str() {
            Some("auth") => {
                session.auth = req["params"].clone();
                json!({"success": true})
            }
            Some("subscribe") => {
                session.subscribes.push(req["params"].clone());
                json!({"subscriptionId": "s", "timestamp": "2026-12-01T00:00:00Z",
                       "offset": 7, "epoch": "e1"})
            }
            _ => panic!("unexpected request before subscribing: {req}"),
        };
        send_json(ws, json!({"requestId": req["id"], "result": result})).await;
    }
    session
}

/// `{"method":"unsubscribed","params":{"channel","reason"}}` (SPEC 17).
pub fn unsubscribed(channel: &str, reason: &str) -> Value {
    json!({"method": "unsubscribed", "params": {"channel": channel, "reason": reason}})
}

/// Closes with `code`, then reads until the client answers the close (or goes).
pub async fn close_with(mut ws: FakeWs, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = ws.close(Some(frame)).await;
    let _ = tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}
