//! A raw reader of server-sent events over TCP (SPEC 19), shared by the SSE and cluster tests.

use super::{within, T};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One parsed block of the stream: an event, or a comment (`: ping`), or a lone `retry`.
#[derive(Debug, Default, Clone)]
pub struct Event {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
    pub comment: Option<String>,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data of {self:?} is not JSON: {e}"))
    }
}

/// A raw event-stream reader over TCP: the HTTP head checked, then blocks split at blank lines
/// and parsed field by field as the HTML standard says (only `\n` line ends: the server's).
pub struct Sse {
    pub stream: TcpStream,
    /// The event stream's bytes not yet parsed.
    pub buf: Vec<u8>,
    pub head: String,
    /// A proxy in front (nginx) re-frames the close-delimited stream as chunked: the bytes of
    /// chunks not yet complete.
    chunked: Option<Vec<u8>>,
}

pub enum Opened {
    Stream(Sse),
    /// The status and the body of a refusal.
    Refused(u16, Value),
}

impl Sse {
    pub async fn open(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Opened {
        let stream = within(T, "TCP connect", TcpStream::connect(addr))
            .await
            .unwrap();
        Self::open_on(stream, addr, target, headers).await
    }

    pub async fn open_on(
        mut stream: TcpStream,
        addr: SocketAddr,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Opened {
        let mut req =
            format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let (head, rest) = super::read_http_head(&mut stream).await;
        let status: u16 = head[9..12].parse().unwrap();
        if status != 200 {
            let len: usize = super::header_value(&head, "content-length")
                .expect("an error has a Content-Length")
                .parse()
                .unwrap();
            let mut body = rest;
            while body.len() < len {
                let mut tmp = [0u8; 4096];
                let n = within(T, "error body", stream.read(&mut tmp))
                    .await
                    .unwrap();
                assert!(n > 0, "closed inside the error body");
                body.extend_from_slice(&tmp[..n]);
            }
            return Opened::Refused(status, serde_json::from_slice(&body).unwrap());
        }
        let chunked = super::header_value(&head, "transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let mut sse = Sse {
            stream,
            buf: Vec::new(),
            head,
            chunked: chunked.then(Vec::new),
        };
        sse.take_bytes(&rest);
        Opened::Stream(sse)
    }

    /// Adds bytes read from the socket: as they are, or their chunks' data when chunked.
    fn take_bytes(&mut self, bytes: &[u8]) {
        let Some(raw) = &mut self.chunked else {
            self.buf.extend_from_slice(bytes);
            return;
        };
        raw.extend_from_slice(bytes);
        while let Some(line_end) = super::find(raw, b"\r\n") {
            let size_text = std::str::from_utf8(&raw[..line_end]).unwrap();
            let size = usize::from_str_radix(size_text.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            let end = line_end + 2 + size + 2;
            if raw.len() < end {
                return;
            }
            self.buf
                .extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
            raw.drain(..end);
        }
    }

    /// Opens and expects the stream (200).
    pub async fn connect(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Sse {
        match Self::open(addr, target, headers).await {
            Opened::Stream(s) => s,
            Opened::Refused(status, body) => panic!("{target} refused {status}: {body}"),
        }
    }

    /// The next block, or None when the server closed the stream within `d`.
    pub async fn next_within(&mut self, d: Duration) -> Option<Event> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(end) = super::find(&self.buf, b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Some(parse_block(
                    &String::from_utf8(block).expect("UTF-8 stream"),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut tmp = vec![0u8; 65536];
            let n = match tokio::time::timeout(left, self.stream.read(&mut tmp)).await {
                Ok(r) => r.unwrap_or(0),
                Err(_) => panic!(
                    "no event within {d:?}; buffered {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            };
            if n == 0 {
                assert!(
                    self.buf.is_empty(),
                    "stream ended inside an event: {:?}",
                    self.buf
                );
                return None;
            }
            self.take_bytes(&tmp[..n]);
        }
    }

    pub async fn next(&mut self) -> Event {
        self.next_within(T).await.expect("the stream ended")
    }

    /// The next event, skipping pings and bare ids.
    pub async fn event(&mut self) -> Event {
        loop {
            let e = self.next().await;
            if e.comment.is_none() && !(e.event.is_empty() && e.data.is_empty()) {
                return e;
            }
        }
    }

    /// The opening: `retry`, then one `subscribed` per channel in URL order, each followed by
    /// what it recovered, then a bare `id` with every position. Returns the results, the
    /// recovered broadcasts, and that id.
    pub async fn opening_with(&mut self, channels: &[&str]) -> (Vec<Value>, Vec<Value>, String) {
        let first = self.next().await;
        assert!(
            first.retry.is_some(),
            "the stream starts with retry: {first:?}"
        );
        let (mut results, mut replayed) = (Vec::new(), Vec::new());
        loop {
            let e = self.next().await;
            match e.event.as_str() {
                "subscribed" => {
                    let v = e.json();
                    assert_eq!(
                        v["channel"],
                        json!(channels[results.len()]),
                        "URL order: {v}"
                    );
                    results.push(v);
                }
                "broadcast" => {
                    assert!(
                        e.id.is_none(),
                        "no id before every channel is subscribed: {e:?}"
                    );
                    assert!(!results.is_empty());
                    replayed.push(e.json());
                }
                "" if e.data.is_empty() && e.id.is_some() => {
                    assert_eq!(results.len(), channels.len(), "the id comes last");
                    return (results, replayed, e.id.unwrap());
                }
                _ => panic!("unexpected in the opening: {e:?}"),
            }
        }
    }

    pub async fn opening(&mut self, channels: &[&str]) -> Vec<Value> {
        self.opening_with(channels).await.0
    }

    pub async fn broadcast(&mut self) -> (String, Value) {
        let e = self.event().await;
        assert_eq!(e.event, "broadcast", "{e:?}");
        (e.id.clone().expect("a broadcast has an id"), e.json())
    }
}

pub fn parse_block(block: &str) -> Event {
    let mut e = Event::default();
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines().filter(|l| !l.is_empty()) {
        if let Some(c) = line.strip_prefix(':') {
            e.comment = Some(c.trim().to_string());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => e.event = value.to_string(),
            "data" => data.push(value),
            "id" => e.id = Some(value.to_string()),
            "retry" => e.retry = Some(value.parse().unwrap()),
            other => panic!("unknown field {other:?} in {block:?}"),
        }
    }
    e.data = data.join("\n");
    e
}

/// The positions an id holds, as (epoch, offset) per URL channel.
pub fn positions(id: &str) -> Vec<Option<(String, u64)>> {
    id.split('_')
        .map(|entry| {
            (!entry.is_empty()).then(|| {
                let (epoch, offset) = entry.split_once('.').unwrap();
                (epoch.to_string(), offset.parse().unwrap())
            })
        })
        .collect()
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
