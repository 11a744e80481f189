//! The receive path of every WebSocket worker (the subscribers' [`crate::client`] and the soak's
//! churning worker): read a ready socket until it is drained, parse the upgrade answer and the
//! server's frames in place, keep only a frame split across reads, reassemble fragmented messages,
//! answer pings. What a message means is the worker's business ([`Receiver`]).

use std::io::{ErrorKind, Read};

use crate::schedule::now_unix_ns;
use crate::ws::{self, Upgrade};

/// Bytes read per `read()`: one worker-wide buffer, large enough to take a burst of frames at once.
pub(crate) const READ_BUF_BYTES: usize = 256 * 1024;
/// Leftover (partial frame) bytes kept per connection before it is judged broken.
const PARTIAL_BYTES_MAX: usize = 32 << 20;

/// What a connection keeps between reads; empty most of the time, so an idle connection costs no
/// buffer.
#[derive(Debug, Default)]
pub(crate) struct Inbound {
    /// Unparsed bytes (a partial frame, or the upgrade response head).
    partial: Vec<u8>,
    /// A fragmented message being reassembled.
    fragments: Vec<u8>,
}

impl Inbound {
    /// Forgets everything (a new connection starts with nothing pending).
    pub(crate) fn clear(&mut self) {
        self.partial.clear();
        self.fragments.clear();
    }
}

/// A worker as the receive path sees it: its read buffer, its connections, and what it does with
/// what arrives.
pub(crate) trait Receiver {
    /// The worker-wide read buffer, [`READ_BUF_BYTES`] long.
    fn read_buf(&mut self) -> &mut Vec<u8>;
    /// Connection `idx`'s socket; None once closed.
    fn stream(&mut self, idx: usize) -> Option<&mut mio::net::TcpStream>;
    /// Connection `idx`'s bytes kept between reads.
    fn inbound(&mut self, idx: usize) -> &mut Inbound;
    /// True while the upgrade request is out and its answer not in.
    fn upgrading(&self, idx: usize) -> bool;
    /// True once our close frame is out: the server's close frame, or its FIN, ends the session
    /// cleanly.
    fn closing(&self, idx: usize) -> bool;
    /// The server switched protocols.
    fn on_upgraded(&mut self, idx: usize);
    /// The connections offered permessage-deflate: a compressed (RSV1) message is inflated.
    fn inflates(&self) -> bool {
        false
    }
    /// The connections are SSE streams (`GET /sse`), not WebSockets: the answer is a `200` and
    /// events follow it instead of frames.
    fn event_stream(&self) -> bool {
        false
    }
    /// A complete text message; `frame_bytes` is its frame's size, header included (for a
    /// reassembled message, the message's size). An error fails the connection.
    fn on_text(
        &mut self,
        idx: usize,
        text: &[u8],
        frame_bytes: u64,
        now_ns: u64,
    ) -> Result<(), String>;
    /// Queues a pong carrying `payload`.
    fn pong(&mut self, idx: usize, payload: &[u8]);
}

/// Why reading a connection stopped, when it was not simply drained.
#[derive(Debug)]
pub(crate) enum End {
    /// The server closed the TCP connection unasked.
    Eof,
    /// `read()` failed.
    ReadFailed(std::io::Error),
    /// The server answered our close frame: the session ended cleanly.
    Closed,
    /// A refused upgrade, a framing error, a close from the server, a message the worker refused.
    Failed(String),
}

/// Reads connection `idx` until its socket is drained, handing what arrives to `r`; `flush` runs
/// after each read, to send what the handlers queued (pongs, the requests after the upgrade).
pub(crate) fn read_ready<R: Receiver>(
    r: &mut R,
    idx: usize,
    mut flush: impl FnMut(&mut R),
) -> Result<(), End> {
    loop {
        let n = match read_once(r, idx) {
            None => return Ok(()),
            Some(Ok(0)) if r.closing(idx) => return Err(End::Closed),
            Some(Ok(0)) => return Err(End::Eof),
            Some(Ok(n)) => n,
            Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Some(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
            Some(Err(e)) => return Err(End::ReadFailed(e)),
        };
        let data = std::mem::take(r.read_buf());
        let result = consume(r, idx, &data[..n]);
        let full = n == data.len();
        *r.read_buf() = data;
        result?;
        flush(r);
        // A short read drained the socket: with edge-triggered epoll a new arrival raises a new
        // event, so the extra read() that would return EAGAIN is skipped (half the syscalls).
        if !full {
            return Ok(());
        }
    }
}

/// One `read()` of connection `idx` into the worker's buffer; None when it has no socket.
fn read_once<R: Receiver>(r: &mut R, idx: usize) -> Option<std::io::Result<usize>> {
    let mut buf = std::mem::take(r.read_buf());
    let read = r.stream(idx).map(|s| s.read(&mut buf));
    *r.read_buf() = buf;
    read
}

/// Processes `fresh` bytes after what connection `idx` kept from earlier reads, and keeps what is
/// left of a split frame.
fn consume<R: Receiver>(r: &mut R, idx: usize, fresh: &[u8]) -> Result<(), End> {
    let now_ns = now_unix_ns();
    // Parse in place from the worker buffer when nothing is left over (the common case); only a
    // partial frame is copied into the connection.
    let mut partial = std::mem::take(&mut r.inbound(idx).partial);
    if partial.is_empty() {
        let used = process(r, idx, fresh, now_ns)?;
        partial.extend_from_slice(&fresh[used..]);
    } else {
        partial.extend_from_slice(fresh);
        let used = process(r, idx, &partial, now_ns)?;
        partial.drain(..used);
    }
    if partial.len() > PARTIAL_BYTES_MAX {
        return Err(End::Failed("partial frame over 32 MiB".into()));
    }
    // The handlers never close a connection (they return an error instead), so `idx` is still
    // the connection these bytes came from.
    r.inbound(idx).partial = partial;
    Ok(())
}

/// Consumes the complete units at the start of `data` (the upgrade answer, then frames); returns
/// the bytes used.
fn process<R: Receiver>(r: &mut R, idx: usize, data: &[u8], now_ns: u64) -> Result<usize, End> {
    let mut pos = 0;
    let expected: &[u8] = if r.event_stream() { b"200" } else { b"101" };
    if r.upgrading(idx) {
        match ws::parse_response_head(data, expected) {
            Upgrade::Incomplete => return Ok(0),
            Upgrade::Refused(status) => {
                return Err(End::Failed(format!("upgrade refused: {status}")))
            }
            Upgrade::Switched(used) => {
                pos = used;
                r.on_upgraded(idx);
            }
        }
    }
    if r.event_stream() {
        return events(r, idx, data, pos, now_ns);
    }
    while pos < data.len() {
        let f = match ws::decode_server_frame(&data[pos..]) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(End::Failed(e.to_string())),
        };
        let payload = &data[pos + f.payload_start..pos + f.end];
        pos += f.end;
        if f.compressed {
            inflated(r, idx, f, payload, now_ns)?;
            continue;
        }
        match f.opcode {
            ws::OP_TEXT if f.fin => {
                r.on_text(idx, payload, f.end as u64, now_ns)
                    .map_err(End::Failed)?;
            }
            ws::OP_TEXT | ws::OP_BINARY => {
                let fragments = &mut r.inbound(idx).fragments;
                fragments.clear();
                fragments.extend_from_slice(payload);
            }
            ws::OP_CONTINUATION => {
                let fragments = &mut r.inbound(idx).fragments;
                fragments.extend_from_slice(payload);
                if fragments.len() > PARTIAL_BYTES_MAX {
                    return Err(End::Failed("fragmented message over 32 MiB".into()));
                }
                if f.fin {
                    let msg = std::mem::take(fragments);
                    r.on_text(idx, &msg, msg.len() as u64, now_ns)
                        .map_err(End::Failed)?;
                }
            }
            ws::OP_PING => r.pong(idx, payload),
            ws::OP_CLOSE => return Err(close(r.closing(idx), payload)),
            _ => {}
        }
    }
    Ok(pos)
}

/// Consumes the complete events of an SSE stream from `pos` (SPEC 19); returns the bytes used.
/// A `subscribed` event is handled as the subscribe's answer and a `broadcast` as a broadcast
/// message (their `data` wrapped as the WebSocket would carry it, so one path checks both);
/// `close` fails the connection, comments (pings) and the rest are skipped.
fn events<R: Receiver>(
    r: &mut R,
    idx: usize,
    data: &[u8],
    mut pos: usize,
    now_ns: u64,
) -> Result<usize, End> {
    let mut text = WRAPPED.take();
    let result = loop {
        let Some(len) = data[pos..].windows(2).position(|w| w == b"\n\n") else {
            break Ok(pos);
        };
        let block = &data[pos..pos + len];
        pos += len + 2;
        let (mut event, mut body): (&[u8], &[u8]) = (b"", b"");
        for line in block.split(|&b| b == b'\n') {
            if let Some(v) = line.strip_prefix(b"event: ") {
                event = v;
            } else if let Some(v) = line.strip_prefix(b"data: ") {
                body = v;
            }
        }
        text.clear();
        match event {
            b"subscribed" => text.extend_from_slice(b"{\"requestId\":2,\"result\":"),
            b"broadcast" => text.extend_from_slice(b"{\"method\":\"broadcast\",\"params\":"),
            b"close" => {
                let why = format!("event stream closed: {}", String::from_utf8_lossy(body));
                break Err(End::Failed(why));
            }
            _ => continue,
        }
        text.extend_from_slice(body);
        text.push(b'}');
        if let Err(e) = r.on_text(idx, &text, len as u64 + 2, now_ns) {
            break Err(End::Failed(e));
        }
    };
    WRAPPED.set(text);
    result
}

/// A compressed message (the server compresses only whole text messages): inflated, then handled
/// as text; its size on the wire is what `on_text` is told.
fn inflated<R: Receiver>(
    r: &mut R,
    idx: usize,
    f: ws::FrameRef,
    payload: &[u8],
    now_ns: u64,
) -> Result<(), End> {
    if !r.inflates() || !f.fin || f.opcode != ws::OP_TEXT {
        let why =
            "RSV1 set on a frame that is not a whole text message of a compressing connection";
        return Err(End::Failed(why.into()));
    }
    // One buffer per receive thread, not per connection: it holds a whole inflated message.
    let mut text = INFLATED.take();
    let result = ws::inflate(payload, &mut text)
        .and_then(|()| r.on_text(idx, &text, f.end as u64, now_ns))
        .map_err(End::Failed);
    INFLATED.set(text);
    result
}

thread_local! {
    static WRAPPED: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static INFLATED: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The server's close frame: the end of our closing handshake, or a failure.
fn close(closing: bool, payload: &[u8]) -> End {
    if closing {
        return End::Closed;
    }
    let code = if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    };
    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
    End::Failed(format!("server sent close {code} {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// One connection over a real loopback socket, recording what the receive path hands over.
    struct Fake {
        buf: Vec<u8>,
        stream: Option<mio::net::TcpStream>,
        inbound: Inbound,
        upgrading: bool,
        closing: bool,
        texts: Vec<(Vec<u8>, u64)>,
        pongs: Vec<Vec<u8>>,
    }

    impl Receiver for Fake {
        fn read_buf(&mut self) -> &mut Vec<u8> {
            &mut self.buf
        }
        fn stream(&mut self, _idx: usize) -> Option<&mut mio::net::TcpStream> {
            self.stream.as_mut()
        }
        fn inbound(&mut self, _idx: usize) -> &mut Inbound {
            &mut self.inbound
        }
        fn upgrading(&self, _idx: usize) -> bool {
            self.upgrading
        }
        fn closing(&self, _idx: usize) -> bool {
            self.closing
        }
        fn on_upgraded(&mut self, _idx: usize) {
            self.upgrading = false;
        }
        fn on_text(&mut self, _: usize, text: &[u8], bytes: u64, _: u64) -> Result<(), String> {
            self.texts.push((text.to_vec(), bytes));
            Ok(())
        }
        fn pong(&mut self, _idx: usize, payload: &[u8]) {
            self.pongs.push(payload.to_vec());
        }
    }

    /// A receiver connected to a plain socket that plays the server; a small read buffer, so a
    /// frame is split across reads.
    fn pair() -> (Fake, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        let fake = Fake {
            buf: vec![0; 16],
            stream: Some(mio::net::TcpStream::from_std(client)),
            inbound: Inbound::default(),
            upgrading: true,
            closing: false,
            texts: Vec::new(),
            pongs: Vec::new(),
        };
        (fake, server)
    }

    /// Reads until `done` or a second passes.
    fn pump(f: &mut Fake, done: impl Fn(&Fake) -> bool) -> Result<(), End> {
        let deadline = Instant::now() + Duration::from_secs(1);
        while !done(f) && Instant::now() < deadline {
            read_ready(f, 0, |_| {})?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        ws::encode_server_frame(&mut out, opcode, payload);
        if !fin {
            out[0] &= 0x7F;
        }
        out
    }

    #[test]
    fn frames_split_across_reads_and_fragments_are_put_back_together() {
        let (mut f, mut server) = pair();
        let text = frame(
            ws::OP_TEXT,
            true,
            b"{\"hello\":\"a message longer than the buffer\"}",
        );
        let mut all = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
        all.extend_from_slice(&text);
        all.extend_from_slice(&frame(ws::OP_PING, true, b"p"));
        all.extend_from_slice(&frame(ws::OP_TEXT, false, b"frag"));
        all.extend_from_slice(&frame(ws::OP_CONTINUATION, true, b"mented"));
        let (a, b) = all.split_at(70);
        server.write_all(a).unwrap();
        pump(&mut f, |f| !f.upgrading).unwrap();
        assert!(
            f.texts.is_empty(),
            "the first text frame is not complete yet"
        );
        server.write_all(b).unwrap();
        pump(&mut f, |f| f.texts.len() == 2).unwrap();
        assert_eq!(f.texts[0].0, &text[2..]);
        assert_eq!(f.texts[0].1, text.len() as u64);
        assert_eq!(f.texts[1], (b"fragmented".to_vec(), 10));
        assert_eq!(f.pongs, [b"p".to_vec()]);
        assert!(f.inbound.partial.is_empty() && f.inbound.fragments.is_empty());
    }

    #[test]
    fn a_close_frame_is_a_failure_unless_we_are_closing() {
        let (mut f, mut server) = pair();
        f.upgrading = false;
        server
            .write_all(&frame(ws::OP_CLOSE, true, b"\x03\xe9bye"))
            .unwrap();
        match pump(&mut f, |_| false) {
            Err(End::Failed(m)) => assert_eq!(m, "server sent close 1001 bye"),
            other => panic!("{other:?}"),
        }

        let (mut f, mut server) = pair();
        (f.upgrading, f.closing) = (false, true);
        server.write_all(&frame(ws::OP_CLOSE, true, b"")).unwrap();
        assert!(matches!(pump(&mut f, |_| false), Err(End::Closed)));
    }

    #[test]
    fn end_of_stream_and_refused_upgrades_end_the_connection() {
        let (mut f, server) = pair();
        drop(server);
        assert!(matches!(pump(&mut f, |_| false), Err(End::Eof)));

        let (mut f, mut server) = pair();
        server
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        match pump(&mut f, |_| false) {
            Err(End::Failed(m)) => assert_eq!(m, "upgrade refused: HTTP/1.1 403 Forbidden"),
            other => panic!("{other:?}"),
        }
    }
}
