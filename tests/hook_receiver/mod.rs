//! A real HTTP receiver of webhooks for the tests: it keeps every request (head, body, when),
//! answers with the status the test sets (after an optional delay), and checks nothing itself.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub head: String,
    pub body: Vec<u8>,
    pub at: Instant,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a webhook body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        super::common::header_value(&self.head, name)
    }
}

struct Inner {
    received: Vec<Received>,
    status: u16,
    delay: Duration,
}

pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inner = Arc::new(Mutex::new(Inner {
            received: Vec::new(),
            status: 200,
            delay: Duration::ZERO,
        }));
        let shared = inner.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Receiver { addr, inner, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Later requests are answered with `status`.
    pub fn set_status(&self, status: u16) {
        self.inner.lock().unwrap().status = status;
    }

    /// Later requests are answered after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().unwrap().delay = delay;
    }

    pub fn requests(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    /// Every event of every acknowledged (2xx) request, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        let acked = self.requests().into_iter().filter(|r| r.status / 100 == 2);
        let bodies: Vec<Value> = acked.map(|r| r.json()).collect();
        bodies
            .iter()
            .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until `n` events were acknowledged; returns them all.
    pub async fn wait_events(&self, n: usize, d: Duration) -> Vec<Value> {
        let deadline = Instant::now() + d;
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "{} webhook events within {d:?}, not {n}: {events:?}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Requests on one keep-alive connection.
async fn serve(mut stream: TcpStream, inner: Arc<Mutex<Inner>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut tmp = [0u8; 8192];
            match stream.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = super::common::header_value(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut tmp = [0u8; 8192];
            match stream.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        let (status, delay) = {
            let i = inner.lock().unwrap();
            (i.status, i.delay)
        };
        tokio::time::sleep(delay).await;
        inner.lock().unwrap().received.push(Received {
            head,
            body,
            at: Instant::now(),
            status,
        });
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}
