//! The `proxy` scenario's access backend (SPEC 15): an HTTP/1.1 keep-alive server on a thread of
//! its own, one tokio (current-thread) runtime, that answers every `POST` with
//! `{"result":{"allow":true}}`, after `delay` if one is set. It counts the calls by the prefix of
//! their `channel`, so the scenario can prove which subscribes the server asked about and which it
//! answered from its cache.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ws::find;

/// The answer to every well-formed call.
const ALLOW: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 25\r\n\r\n\
                     {\"result\":{\"allow\":true}}";
/// Request heads and bodies larger than this are refused (the server's are a few hundred bytes).
const REQUEST_BYTES_MAX: usize = 1 << 20;

/// How the backend runs.
#[derive(Debug, Clone)]
pub(crate) struct BackendConfig {
    /// Where it listens (`--backend-listen`).
    pub(crate) listen: SocketAddr,
    /// How long it waits before each answer (`--backend-delay-us`).
    pub(crate) delay: Duration,
    /// The bearer token every call must carry (`--proxy-secret`); None: not checked.
    pub(crate) secret: Option<String>,
    /// Channel prefixes whose calls are counted apart, in order; a channel matching none counts
    /// as `other`.
    pub(crate) classes: Vec<String>,
    /// The CPU its thread is pinned to, if any.
    pub(crate) cpu: Option<usize>,
}

/// What the backend saw, counted as calls arrive.
#[derive(Debug, Default)]
struct Counters {
    /// Calls answered with allow.
    calls: AtomicU64,
    /// Those calls by `classes` (same order); the last entry: matching none.
    by_class: Vec<AtomicU64>,
    /// Calls without the expected `Authorization: Bearer SECRET` (answered 401).
    unauthorized: AtomicU64,
    /// Requests that were not a `POST` with a JSON body naming a `channel` (answered 400).
    malformed: AtomicU64,
    /// TCP connections accepted (the server keeps them alive between calls).
    connections: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct BackendCounts {
    /// Calls answered with allow.
    pub(crate) calls: u64,
    /// Those calls by channel prefix, in the order of `BackendConfig::classes`.
    pub(crate) by_class: Vec<u64>,
    /// Calls whose channel matched none of the prefixes.
    pub(crate) other: u64,
    /// Calls with a missing or wrong bearer token.
    pub(crate) unauthorized: u64,
    /// Requests that were not a well-formed subscribe call.
    pub(crate) malformed: u64,
    /// TCP connections the server opened to the backend.
    pub(crate) connections: u64,
}

/// What a connection's task shares.
struct Shared {
    counters: Counters,
    classes: Vec<String>,
    /// `Bearer SECRET`, when checked.
    bearer: Option<String>,
    delay: Duration,
}

/// The running backend; dropping it stops it (and closes the server's connections to it).
pub(crate) struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Binds `cfg.listen` (an error if it cannot) and starts serving on a thread of its own.
    pub(crate) fn start(cfg: BackendConfig) -> Result<Backend, String> {
        let listener = std::net::TcpListener::bind(cfg.listen).map_err(|e| {
            format!(
                "the access backend cannot listen on {} (--backend-listen): {e}",
                cfg.listen
            )
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("backend listener: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("backend runtime: {e}"))?;
        let shared = Arc::new(Shared {
            counters: Counters {
                by_class: (0..=cfg.classes.len()).map(|_| AtomicU64::new(0)).collect(),
                ..Counters::default()
            },
            classes: cfg.classes,
            bearer: cfg.secret.map(|s| format!("Bearer {s}")),
            delay: cfg.delay,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let cpu = cfg.cpu;
        let thread = std::thread::Builder::new()
            .name("access-backend".into())
            .spawn(move || {
                if let Some(c) = cpu {
                    // Threads of the blocking pool (the delay) inherit the pinning.
                    let _ = crate::procstat::pin_current_thread(c);
                }
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("broadcaster-loadtest: access backend: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(listener, sh) => {}
                    }
                });
            })
            .map_err(|e| format!("backend thread: {e}"))?;
        Ok(Backend {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters now.
    pub(crate) fn counts(&self) -> BackendCounts {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let n = self.shared.classes.len();
        BackendCounts {
            calls: load(&c.calls),
            by_class: c.by_class[..n].iter().map(load).collect(),
            other: load(&c.by_class[n]),
            unauthorized: load(&c.unauthorized),
            malformed: load(&c.malformed),
            connections: load(&c.connections),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(stream, shared.clone()));
            }
            // Out of descriptors, or a connection reset before it was accepted: try again.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Calls on one keep-alive connection until the server closes it (or asks to).
async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let Ok(Some(req)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let answer = shared.answer(&req);
        if !shared.delay.is_zero() {
            // tokio's timer counts whole milliseconds; a thread's sleep keeps microseconds, and
            // calls in flight together still wait side by side.
            let d = shared.delay;
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
        }
        if stream.write_all(answer.as_bytes()).await.is_err() || req.close {
            return;
        }
    }
}

/// One request: what the backend looks at.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    method: String,
    authorization: Option<String>,
    /// `Connection: close`.
    close: bool,
    body: Vec<u8>,
}

impl Shared {
    /// Counts `req` and picks its answer.
    fn answer(&self, req: &Request) -> &'static str {
        let c = &self.counters;
        if let Some(want) = &self.bearer {
            if req.authorization.as_deref() != Some(want.as_str()) {
                c.unauthorized.fetch_add(1, Ordering::Relaxed);
                return "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
            }
        }
        let channel = (req.method == "POST")
            .then(|| serde_json::from_slice::<serde_json::Value>(&req.body).ok())
            .flatten()
            .and_then(|v| v.get("channel")?.as_str().map(str::to_string));
        let Some(channel) = channel else {
            c.malformed.fetch_add(1, Ordering::Relaxed);
            return "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        };
        let class = self
            .classes
            .iter()
            .position(|p| channel.starts_with(p.as_str()))
            .unwrap_or(self.classes.len());
        c.by_class[class].fetch_add(1, Ordering::Relaxed);
        c.calls.fetch_add(1, Ordering::Relaxed);
        ALLOW
    }
}

/// Reads one request (head and Content-Length body); `Ok(None)` at a clean end of stream.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(req) = parse_request(buf)? {
            return Ok(Some(req));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Takes one complete request off the front of `buf`; `Ok(None)` when more bytes are needed.
fn parse_request(buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > REQUEST_BYTES_MAX {
            return Err(bad("request head too large"));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let method = lines
        .next()
        .and_then(|l| l.split(' ').next())
        .unwrap_or_default()
        .to_string();
    let mut req = Request {
        method,
        ..Request::default()
    };
    let mut len = 0usize;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse().map_err(|_| bad("bad Content-Length"))?;
        } else if k.eq_ignore_ascii_case("authorization") {
            req.authorization = Some(v.to_string());
        } else if k.eq_ignore_ascii_case("connection") {
            req.close = v.eq_ignore_ascii_case("close");
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked requests are not expected"));
        }
    }
    if len > REQUEST_BYTES_MAX {
        return Err(bad("request body too large"));
    }
    let start = end + 4;
    if buf.len() < start + len {
        return Ok(None);
    }
    req.body = buf[start..start + len].to_vec();
    buf.drain(..start + len);
    Ok(Some(req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn call(body: &str, auth: &str) -> String {
        format!(
            "POST /subscribe HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: keep-alive\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn requests_parse_back_to_back_and_in_pieces() {
        let one = call(r#"{"channel":"contest/a"}"#, "Bearer s");
        let mut buf = format!("{one}{one}").into_bytes();
        let r = parse_request(&mut buf).unwrap().unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.authorization.as_deref(), Some("Bearer s"));
        assert!(!r.close);
        assert_eq!(r.body, br#"{"channel":"contest/a"}"#);
        assert_eq!(buf.len(), one.len());
        let mut part = buf[..one.len() - 3].to_vec();
        assert_eq!(parse_request(&mut part).unwrap(), None);
        assert!(parse_request(&mut buf).unwrap().is_some());
        assert!(buf.is_empty());
        let mut chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec();
        assert!(parse_request(&mut chunked).is_err());
    }

    /// A real server on a loopback port: keep-alive, the allow answer, the counts by class, the
    /// secret, and a malformed call.
    #[test]
    fn the_backend_allows_and_counts_by_channel_prefix() {
        let b = Backend::start(BackendConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            delay: Duration::from_micros(100),
            secret: Some("s3".into()),
            classes: vec!["contest/m".into(), "contest/h".into()],
            cpu: None,
        })
        .unwrap();
        let mut s = std::net::TcpStream::connect(b.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let mut ask = |req: String| {
            s.write_all(req.as_bytes()).unwrap();
            crate::http::read_http_response(&mut s, &mut buf).unwrap()
        };
        for ch in ["contest/m/1", "contest/m/2", "contest/h/1", "public/x"] {
            let (status, body) = ask(call(&format!(r#"{{"channel":"{ch}"}}"#), "Bearer s3"));
            assert_eq!(status, 200);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["result"]["allow"], true);
        }
        assert_eq!(
            ask(call(r#"{"channel":"contest/m/3"}"#, "Bearer no")).0,
            401
        );
        assert_eq!(ask(call("not json", "Bearer s3")).0, 400);
        let c = b.counts();
        assert_eq!(c.calls, 4);
        assert_eq!(c.by_class, [2, 1]);
        assert_eq!(c.other, 1);
        assert_eq!((c.unauthorized, c.malformed, c.connections), (1, 1, 1));
        // Connection: close is honoured.
        let mut req = call(r#"{"channel":"contest/m/9"}"#, "Bearer s3");
        req = req.replace("keep-alive", "close");
        s.write_all(req.as_bytes()).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        let (status, _) = crate::http::read_http_response(&mut &rest[..], &mut Vec::new()).unwrap();
        assert_eq!(status, 200);
        assert_eq!(b.counts().calls, 5);
        drop(b);
    }
}
