//! The access proxy's HTTP client (SPEC 15): one per shard, it POSTs to the backend that
//! decides subscribes and connects, keeps idle connections for the next call, and bounds both
//! the time of a call and how many calls the node has in flight. The bytes are
//! `wire::proxy`'s; nothing here blocks the executor (no std::net, no threads, no DNS).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::wire::proxy::{parse_response, write_post, Response, Target};

/// Idle keep-alive connections kept per backend address; one more is closed. Enough for the
/// calls one shard has in flight at a time in practice, few enough to leave the backend's
/// connection limit to the other nodes.
const IDLE_PER_ADDR_MAX: usize = 32;
/// The largest answer body read from a backend; answers are small JSON objects.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Bytes asked of the socket per read.
const READ_BYTES: usize = 16 * 1024;

/// Why a backend call gave no usable answer. `Display` is written for the client's error
/// message: it names no URL, secret or header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// `concurrency_max` calls already in flight on this node; nothing was sent.
    Overload,
    /// No complete answer within the timeout.
    Timeout,
    /// No connection, or it was closed or reset before any answer came.
    Refused,
    /// The backend answered this non-2xx status.
    Status(u16),
    /// The answer is not HTTP the node reads; the text says why, for the log.
    Malformed(String),
}

impl CallError {
    /// True when the backend could not decide (busy, slow, down, 5xx): the client is answered
    /// Unavailable and may retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            CallError::Overload | CallError::Timeout | CallError::Refused => true,
            CallError::Status(s) => (500..600).contains(s),
            CallError::Malformed(_) => false,
        }
    }

    /// The `result` label of `proxy_requests_total` for this failure.
    pub fn metric_result(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            _ => "error",
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Overload => f.write_str("access backend busy: too many calls in flight"),
            CallError::Timeout => f.write_str("access backend timed out"),
            CallError::Refused => f.write_str("access backend unreachable"),
            CallError::Status(s) => write!(f, "access backend answered HTTP {s}"),
            CallError::Malformed(_) => f.write_str("access backend answer malformed"),
        }
    }
}

impl std::error::Error for CallError {}

/// A shard's client of access backends. Not `Send`: its idle connections belong to the
/// shard's executor.
pub struct ProxyClient {
    /// Idle keep-alive connections by backend address, at most `IDLE_PER_ADDR_MAX` each.
    /// Borrowed only inside `take_idle` and `put_idle`, never across an `.await`.
    idle: RefCell<HashMap<SocketAddr, Vec<TcpStream>>>,
    /// Bound on a whole call: connect, write, read, and the one retry.
    timeout: Duration,
    /// Calls in flight on every shard of the node, against `concurrency_max`.
    in_flight: Arc<AtomicUsize>,
    concurrency_max: usize,
}

impl ProxyClient {
    /// A client whose calls take at most `timeout` each, sharing the node-wide count of calls
    /// `in_flight` with every other shard's client (at most `concurrency_max` at once).
    pub fn new(
        timeout: Duration,
        in_flight: Arc<AtomicUsize>,
        concurrency_max: usize,
    ) -> ProxyClient {
        ProxyClient {
            idle: RefCell::new(HashMap::new()),
            timeout,
            in_flight,
            concurrency_max,
        }
    }

    /// POSTs `body` (JSON) to `target` with `secret` as bearer token and returns the body of
    /// a 2xx answer. Over `concurrency_max` calls in flight it is `Overload` at once, nothing
    /// sent. An idle connection closed by the backend meanwhile is retried once on a fresh
    /// one, within the same timeout.
    pub async fn post(
        &self,
        target: &Target,
        secret: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, CallError> {
        let Some(_slot) = Slot::take(&self.in_flight, self.concurrency_max) else {
            return Err(CallError::Overload);
        };
        let mut request = Vec::with_capacity(256 + body.len());
        write_post(&mut request, target, secret, body);
        let timeout = self.timeout;
        // On timeout the call's future is dropped, and with it any connection it holds: a
        // connection with a request still unanswered is never pooled.
        future::or(self.call(target.addr, &request), async move {
            glommio::timer::sleep(timeout).await;
            Err(CallError::Timeout)
        })
        .await
    }

    async fn call(&self, addr: SocketAddr, request: &[u8]) -> Result<Vec<u8>, CallError> {
        if let Some(stream) = self.take_idle(addr) {
            match exchange(stream, request).await {
                Ok((stream, answer)) => return self.finish(addr, stream, answer),
                // The backend closed it while idle (its keep-alive timeout): a fresh one.
                Err(Failure::BeforeAnswer) => {}
                Err(Failure::Call(e)) => return Err(e),
            }
        }
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|_| CallError::Refused)?;
        // Requests are one small write each; Nagle would hold the next one for the ACK.
        let _ = stream.set_nodelay(true);
        match exchange(stream, request).await {
            Ok((stream, answer)) => self.finish(addr, stream, answer),
            Err(Failure::BeforeAnswer) => Err(CallError::Refused),
            Err(Failure::Call(e)) => Err(e),
        }
    }

    /// The body of a 2xx answer; the connection goes back to the pool when it can carry
    /// another call.
    fn finish(
        &self,
        addr: SocketAddr,
        stream: Option<TcpStream>,
        answer: Response,
    ) -> Result<Vec<u8>, CallError> {
        if let Some(stream) = stream {
            self.put_idle(addr, stream);
        }
        if (200..300).contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(CallError::Status(answer.status))
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<TcpStream> {
        self.idle.borrow_mut().get_mut(&addr)?.pop()
    }

    fn put_idle(&self, addr: SocketAddr, stream: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        let pool = idle.entry(addr).or_default();
        if pool.len() < IDLE_PER_ADDR_MAX {
            pool.push(stream);
        }
    }

    /// Idle connections kept for `addr`.
    #[cfg(test)]
    fn idle_count(&self, addr: SocketAddr) -> usize {
        self.idle.borrow().get(&addr).map_or(0, Vec::len)
    }
}

/// One slot of the node-wide bound on calls in flight, given back when dropped, so every
/// way out of a call (answer, error, timeout, a dropped future) releases it.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(in_flight: &'a AtomicUsize, max: usize) -> Option<Slot<'a>> {
        // Relaxed: the count guards no other memory, it only has to add up.
        let before = in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(in_flight);
        // Over the bound the slot is dropped here, which gives it back.
        (before < max).then_some(slot)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an exchange failed.
enum Failure {
    /// The write failed, or the connection ended before one byte of answer: on a pooled
    /// connection, the backend closed it while idle.
    BeforeAnswer,
    /// Anything later, or an answer the node does not read.
    Call(CallError),
}

/// Writes `request` and reads the answer. The stream comes back when it can carry another
/// call: keep-alive, and nothing read past the answer.
async fn exchange(
    mut stream: TcpStream,
    request: &[u8],
) -> Result<(Option<TcpStream>, Response), Failure> {
    if stream.write_all(request).await.is_err() {
        return Err(Failure::BeforeAnswer);
    }
    let mut buf = Vec::new();
    loop {
        let len = buf.len();
        buf.resize(len + READ_BYTES, 0);
        let read = stream.read(&mut buf[len..]).await;
        let n = read.as_ref().map_or(0, |&n| n);
        buf.truncate(len + n);
        if n == 0 {
            return Err(match len {
                0 => Failure::BeforeAnswer,
                _ => Failure::Call(CallError::Malformed(
                    "the connection ended inside the answer".to_string(),
                )),
            });
        }
        // parse_response refuses past response_bytes_max, so `buf` stays bounded.
        match parse_response(&buf, BODY_BYTES_MAX) {
            Ok(None) => {}
            Ok(Some(answer)) => {
                let reusable = answer.keep_alive && answer.used == buf.len();
                return Ok((reusable.then_some(stream), answer));
            }
            Err(why) => return Err(Failure::Call(CallError::Malformed(why))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::proxy::parse_url;
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::Instant;

    const ALLOW: &str = r#"{"result":{"allow":true}}"#;

    /// A backend on 127.0.0.1:0 served by std threads: `serve` gets each accepted connection.
    /// Returns the target and the count of connections accepted.
    fn backend(
        serve: impl Fn(std::net::TcpStream) + Send + Sync + 'static,
    ) -> (Target, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/access", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let serve = Arc::new(serve);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let serve = serve.clone();
                std::thread::spawn(move || serve(stream));
            }
        });
        (parse_url(&url).unwrap(), accepted)
    }

    /// Reads one request, head and Content-Length body; None at end of stream.
    fn read_request(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let len: usize = head
            .split("content-length: ")
            .nth(1)
            .and_then(|rest| rest.split("\r\n").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let start = buf.len();
        buf.resize(start + len, 0);
        stream.read_exact(&mut buf[start..]).ok()?;
        Some(buf)
    }

    fn answer(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// Answers every request on a connection with `reply`, until the client closes it.
    fn replying(reply: String) -> impl Fn(std::net::TcpStream) + Send + Sync + 'static {
        move |mut s| {
            while read_request(&mut s).is_some() {
                if s.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }

    fn client(timeout_ms: u64, max: usize) -> (ProxyClient, Arc<AtomicUsize>) {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let c = ProxyClient::new(Duration::from_millis(timeout_ms), in_flight.clone(), max);
        (c, in_flight)
    }

    #[test]
    fn request_arrives_as_written_and_content_length_answer_is_read() {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let (target, _) = backend(move |mut s| {
            let request = read_request(&mut s).unwrap();
            tx.lock().unwrap().send(request).unwrap();
            s.write_all(answer("200 OK", ALLOW).as_bytes()).unwrap();
        });
        let body = br#"{"channel":"c","user":null}"#;
        crate::io::test_executor().run(async {
            let (c, in_flight) = client(2000, 4);
            assert_eq!(c.post(&target, "s3cret", body).await, Ok(ALLOW.into()));
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        });
        let mut expected = Vec::new();
        write_post(&mut expected, &target, "s3cret", body);
        assert_eq!(
            String::from_utf8(rx.recv().unwrap()),
            String::from_utf8(expected)
        );
    }

    #[test]
    fn chunked_answer_is_decoded() {
        let reply = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5\r\n{\"res\r\n14\r\nult\":{\"allow\":true}}\r\n0\r\n\r\n";
        let (target, _) = backend(replying(reply.to_string()));
        crate::io::test_executor().run(async {
            let (c, _) = client(2000, 4);
            assert_eq!(c.post(&target, "s", b"{}").await, Ok(ALLOW.into()));
        });
    }

    #[test]
    fn keep_alive_connection_is_reused() {
        let (target, accepted) = backend(replying(answer("200 OK", ALLOW)));
        crate::io::test_executor().run(async {
            let (c, _) = client(2000, 4);
            for _ in 0..3 {
                assert_eq!(c.post(&target, "s", b"{}").await, Ok(ALLOW.into()));
                assert_eq!(c.idle_count(target.addr), 1);
            }
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn connection_close_answer_is_not_pooled() {
        let reply = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{ALLOW}",
            ALLOW.len()
        );
        let (target, accepted) = backend(replying(reply));
        crate::io::test_executor().run(async {
            let (c, _) = client(2000, 4);
            assert!(c.post(&target, "s", b"{}").await.is_ok());
            assert_eq!(c.idle_count(target.addr), 0);
            assert!(c.post(&target, "s", b"{}").await.is_ok());
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn idle_connection_closed_by_the_backend_is_retried_once() {
        // One answer per connection, then the backend closes it although it said keep-alive.
        let (target, accepted) = backend(|mut s| {
            if read_request(&mut s).is_some() {
                let _ = s.write_all(answer("200 OK", ALLOW).as_bytes());
            }
        });
        crate::io::test_executor().run(async {
            let (c, in_flight) = client(2000, 4);
            assert_eq!(c.post(&target, "s", b"{}").await, Ok(ALLOW.into()));
            assert_eq!(c.idle_count(target.addr), 1);
            glommio::timer::sleep(Duration::from_millis(50)).await;
            assert_eq!(c.post(&target, "s", b"{}").await, Ok(ALLOW.into()));
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn slow_backend_times_out() {
        let (target, _) = backend(|mut s| {
            let _ = read_request(&mut s);
            std::thread::sleep(Duration::from_secs(3));
        });
        crate::io::test_executor().run(async {
            let (c, in_flight) = client(200, 4);
            let start = Instant::now();
            let e = c.post(&target, "s", b"{}").await.unwrap_err();
            let took = start.elapsed();
            assert_eq!(e, CallError::Timeout);
            assert!(e.is_unavailable() && e.metric_result() == "timeout");
            assert!(
                took >= Duration::from_millis(190) && took < Duration::from_millis(1000),
                "{took:?}"
            );
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
            assert_eq!(c.idle_count(target.addr), 0);
        });
    }

    #[test]
    fn refused_port_is_refused() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let target = parse_url(&format!("http://{addr}/x")).unwrap();
        crate::io::test_executor().run(async {
            let (c, in_flight) = client(2000, 4);
            let e = c.post(&target, "s", b"{}").await.unwrap_err();
            assert_eq!(e, CallError::Refused);
            assert!(e.is_unavailable() && e.metric_result() == "error");
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        });
    }

    #[test]
    fn server_error_status_is_unavailable() {
        let (target, accepted) = backend(replying(answer("500 Internal Server Error", "oops")));
        crate::io::test_executor().run(async {
            let (c, _) = client(2000, 4);
            let e = c.post(&target, "s", b"{}").await.unwrap_err();
            assert_eq!(e, CallError::Status(500));
            assert!(e.is_unavailable());
            assert_eq!(e.to_string(), "access backend answered HTTP 500");
            // The answer was read whole, so the connection carries the next call.
            assert_eq!(
                c.post(&target, "s", b"{}").await,
                Err(CallError::Status(500))
            );
            assert!(!CallError::Status(403).is_unavailable());
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn garbage_is_malformed() {
        let (target, _) = backend(replying("SMTP ready\r\n\r\n".to_string()));
        crate::io::test_executor().run(async {
            let (c, in_flight) = client(2000, 4);
            let e = c.post(&target, "s", b"{}").await.unwrap_err();
            assert!(matches!(e, CallError::Malformed(_)), "{e:?}");
            assert!(!e.is_unavailable());
            assert_eq!(c.idle_count(target.addr), 0);
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        });
    }

    #[test]
    fn over_concurrency_max_is_overload_at_once() {
        let (release, held) = mpsc::channel::<()>();
        let held = std::sync::Mutex::new(held);
        let (target, accepted) = backend(move |mut s| {
            let _ = read_request(&mut s);
            let _ = held.lock().unwrap().recv();
            let _ = s.write_all(answer("200 OK", ALLOW).as_bytes());
        });
        crate::io::test_executor().run(async move {
            let (c, in_flight) = client(3000, 1);
            let c = std::rc::Rc::new(c);
            let first = glommio::spawn_local({
                let (c, target) = (c.clone(), target.clone());
                async move { c.post(&target, "s", b"{}").await }
            });
            while accepted.load(Ordering::SeqCst) == 0 {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(in_flight.load(Ordering::SeqCst), 1);
            let start = Instant::now();
            assert_eq!(c.post(&target, "s", b"{}").await, Err(CallError::Overload));
            assert!(start.elapsed() < Duration::from_millis(50));
            assert_eq!(in_flight.load(Ordering::SeqCst), 1);
            release.send(()).unwrap();
            assert_eq!(first.await, Ok(ALLOW.into()));
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn messages_name_no_secret() {
        for e in [
            CallError::Overload,
            CallError::Timeout,
            CallError::Refused,
            CallError::Status(502),
            CallError::Malformed("bad".into()),
        ] {
            assert!(e.to_string().starts_with("access backend"), "{e}");
        }
    }
}
