//! The `proxy_response` target: what an access backend can send a node (SPEC 15). Its HTTP
//! answer goes to `parse_response` whole and cut at several points, its body to the subscribe
//! and connect answer parsers; a structured generator writes responses with lying lengths,
//! chunked framing and answer bodies near the accepted shapes.

use arbitrary::{Arbitrary, Unstructured};
use broadcaster::wire::proxy::{
    parse_connect_answer, parse_response, parse_subscribe_answer, parse_url, response_bytes_max,
    Response, SubscribeAnswer, MESSAGE_BYTES_MAX,
};

/// Input format: a byte choosing the body limit, a byte choosing the mode (even: the rest is
/// the response as it is; odd: a generated response), then the bytes of that mode.
pub fn proxy_response(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(selector) = u.arbitrary::<u8>() else {
        return;
    };
    let max = match selector % 4 {
        0 => 64 * 1024,
        1 => 16,
        2 => 0,
        _ => u.int_in_range(0..=1024).unwrap_or(0),
    };
    let Ok(structured) = u.arbitrary::<bool>() else {
        return;
    };
    let buf = if structured {
        match u.arbitrary::<ResponseSpec>() {
            Ok(spec) => spec.encode(),
            Err(_) => return,
        }
    } else {
        u.bytes(u.len()).unwrap_or_default().to_vec()
    };
    let whole = check_response(&buf, max);
    for cut in cuts(&buf, whole.as_ref().map(|r| r.used)) {
        check_prefix(&buf, cut, max, &whole);
    }
    check_answers(&buf);
    if let Some(r) = whole {
        check_answers(&r.body);
    }
    if let Ok(text) = std::str::from_utf8(&buf) {
        check_url(text);
    }
}

/// Invariants of one answer; returns it when complete.
fn check_response(buf: &[u8], max: usize) -> Option<Response> {
    match parse_response(buf, max) {
        Ok(None) => {
            // Incomplete only while under the bound, or the reader would buffer forever.
            assert!(
                buf.len() < response_bytes_max(max),
                "Ok(None) at {} bytes",
                buf.len()
            );
            None
        }
        Err(why) => {
            assert!(!why.is_empty());
            None
        }
        Ok(Some(r)) => {
            assert!(
                r.used > 0 && r.used <= buf.len(),
                "used {} of {}",
                r.used,
                buf.len()
            );
            assert!(r.body.len() <= max, "body {} over {max}", r.body.len());
            assert!((200..=999).contains(&r.status), "status {}", r.status);
            assert!(r.body.len() <= r.used);
            // The answer alone is the same answer: what follows it is the next one's.
            let alone = parse_response(&buf[..r.used], max);
            assert_eq!(
                alone,
                Ok(Some(r.clone())),
                "answer changes with what follows it"
            );
            Some(r)
        }
    }
}

/// A prefix agrees with the whole: incomplete before the end of a complete answer, the same
/// answer once it holds it, and an error only if the whole is one too.
fn check_prefix(buf: &[u8], cut: usize, max: usize, whole: &Option<Response>) {
    let part = parse_response(&buf[..cut], max);
    match (whole, &part) {
        (Some(r), _) if cut < r.used => {
            assert_eq!(
                part,
                Ok(None),
                "prefix of {cut} of a {}-byte answer",
                r.used
            )
        }
        (Some(r), _) => assert_eq!(part, Ok(Some(r.clone())), "prefix of {cut}"),
        (None, Ok(Some(r))) => panic!("prefix of {cut} complete ({r:?}), the whole is not"),
        (None, Err(why)) => assert!(
            parse_response(buf, max).is_err(),
            "prefix of {cut} refused ({why}), the whole is not"
        ),
        (None, Ok(None)) => {}
    }
}

/// Where to cut: the edges, the middle, around the end of the answer, and a few points
/// spread by a hash of the input (every prefix would cost quadratic time).
fn cuts(buf: &[u8], used: Option<usize>) -> Vec<usize> {
    let len = buf.len();
    let mut cuts = vec![0, len / 2, len.saturating_sub(1)];
    if let Some(used) = used {
        cuts.extend([used.saturating_sub(1), used / 2, used.saturating_sub(2)]);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in buf.iter().take(64) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    for _ in 0..4 {
        h = h.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        cuts.push((h % (len as u64 + 1)) as usize);
    }
    cuts
}

fn check_answers(body: &[u8]) {
    let json_ok = || serde_json::from_slice::<serde_json::Value>(body).is_ok();
    match parse_subscribe_answer(body) {
        Ok(answer) => {
            assert!(json_ok(), "accepted subscribe answer is not JSON");
            if let SubscribeAnswer::Error(e) = answer {
                assert!(e.message.len() <= MESSAGE_BYTES_MAX);
            }
        }
        Err(why) => assert!(!why.is_empty()),
    }
    match parse_connect_answer(body) {
        Ok(Ok(a)) => {
            assert!(json_ok(), "accepted connect answer is not JSON");
            assert!(!a.sub.is_empty());
            if let Some(info) = &a.info {
                assert!(info.get().starts_with('{'), "info {:?}", info.get());
            }
        }
        Ok(Err(e)) => assert!(e.message.len() <= MESSAGE_BYTES_MAX),
        Err(why) => assert!(!why.is_empty()),
    }
}

/// An accepted URL is plain `http://`, names no user, and its target is a path.
fn check_url(text: &str) {
    if let Ok(t) = parse_url(text) {
        assert!(text
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://")));
        assert!(t.path.starts_with('/'), "path {:?}", t.path);
        assert!(
            !t.host.contains('@') && !text.contains(['#', ' ', '\r', '\n']),
            "{text:?}"
        );
        assert!(t.addr.port() != 0);
    }
}

const STATUSES: &[&str] = &[
    "200 OK",
    "204 No Content",
    "304 Not Modified",
    "100 Continue",
    "101 Switching Protocols",
    "500 Internal Server Error",
    "403 Forbidden",
    "199 X",
    "999 X",
];
const VERSIONS: &[&str] = &["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", ""];
const NAMES: &[&str] = &[
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "content-length",
    "X-Other",
    "Transfer-Encoding ",
    "",
];
const VALUES: &[&str] = &[
    "chunked",
    "Chunked",
    "gzip, chunked",
    "close",
    "keep-alive",
    "0",
    "5",
    "+5",
    " 5 ",
    "5, 5",
    "18446744073709551616",
    "",
];
const BODIES: &[&str] = &[
    r#"{"result":{"allow":true}}"#,
    r#"{"result":{"allow":false}}"#,
    r#"{"result":{"allow":true,"expireAt":"2030-01-01T00:00:00Z"}}"#,
    r#"{"result":{"allow":true,"expireAt":"2030-01-01T00:00:00.123+05:30"}}"#,
    r#"{"result":{"allow":true,"expireAt":"1970-01-01T00:00:00+00:01"}}"#,
    r#"{"error":{"code":"NotFound","message":"no"}}"#,
    r#"{"error":{"code":"Teapot","message":"ééééé"}}"#,
    r#"{"result":{"sub":"a","exp":1,"authorizedChannels":["c"],"scope":[],"info":{"n":1}}}"#,
    r#"{"result":{"sub":"","exp":1}}"#,
];

/// One chunk: how many body bytes it carries, the size it declares instead (a lie), and an
/// extension.
#[derive(Debug, Arbitrary)]
struct ChunkSpec {
    len: u8,
    declared: Option<u16>,
    ext: Option<String>,
}

#[derive(Debug, Arbitrary)]
enum Piece {
    Known(u8),
    Own(String),
}

impl Piece {
    fn text(&self, table: &[&str]) -> String {
        match self {
            Piece::Known(i) => table[*i as usize % table.len()].to_string(),
            Piece::Own(s) => s.clone(),
        }
    }
}

/// A response: status line, headers, a body sent whole or in chunks, and what follows.
#[derive(Debug, Arbitrary)]
pub struct ResponseSpec {
    interim: bool,
    version: Piece,
    status: Piece,
    headers: Vec<(Piece, Piece)>,
    /// Add a Content-Length of the body (plus this, wrapping) or chunked framing.
    length_skew: Option<i8>,
    chunked: Option<Vec<ChunkSpec>>,
    body: Piece,
    trailers: Vec<String>,
    tail: Vec<u8>,
}

impl ResponseSpec {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.interim {
            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let body = self.body.text(BODIES).into_bytes();
        let head = format!(
            "{} {}\r\n",
            self.version.text(VERSIONS),
            self.status.text(STATUSES)
        );
        out.extend_from_slice(head.as_bytes());
        for (name, value) in self.headers.iter().take(8) {
            out.extend_from_slice(
                format!("{}: {}\r\n", name.text(NAMES), value.text(VALUES)).as_bytes(),
            );
        }
        if let Some(skew) = self.length_skew {
            let n = (body.len() as i64 + i64::from(skew)).max(0);
            out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes());
        }
        match &self.chunked {
            None => {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&body);
            }
            Some(chunks) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                self.write_chunks(&body, chunks, &mut out);
            }
        }
        out.extend_from_slice(&self.tail);
        out
    }

    /// The body in chunks of the lengths asked for, some declaring another size or carrying
    /// an extension, then the last chunk and the trailers.
    fn write_chunks(&self, body: &[u8], chunks: &[ChunkSpec], out: &mut Vec<u8>) {
        let mut rest = body;
        for c in chunks.iter().take(16) {
            let n = usize::from(c.len).min(rest.len());
            let size = c.declared.map_or(n, usize::from);
            let ext = c
                .ext
                .as_deref()
                .map(|e| format!(";{e}"))
                .unwrap_or_default();
            out.extend_from_slice(format!("{size:x}{ext}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        if !rest.is_empty() {
            out.extend_from_slice(format!("{:X}\r\n", rest.len()).as_bytes());
            out.extend_from_slice(rest);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for t in self.trailers.iter().take(4) {
            out.extend_from_slice(t.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}
