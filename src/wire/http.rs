//! Sans-IO HTTP/1.1: request heads parsed with httparse into the few fields the server uses, and
//! responses written into byte buffers.

use crate::error::Error;

/// The parts of a request head the server acts on. Owned, because the read buffer moves on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The target up to `?`.
    pub path: String,
    /// The target after `?` (not decoded).
    pub query: String,
    /// Bytes taken by the head, including the blank line.
    pub len: usize,
    /// HTTP/1.1 without `Connection: close` (or HTTP/1.0 with `keep-alive`).
    pub keep_alive: bool,
    /// `Content-Length`.
    pub content_length: Option<usize>,
    /// Any `Transfer-Encoding` (refused: 411).
    pub chunked: bool,
    /// `Upgrade: websocket`.
    pub upgrade_websocket: bool,
    /// `Connection: Upgrade`.
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Extensions`, several headers joined with `,` in order.
    pub ws_extensions: Option<String>,
    /// `Origin`.
    pub origin: Option<String>,
    /// `Host`.
    pub host: Option<String>,
    /// The token of `Authorization: Bearer TOKEN`.
    pub bearer: Option<Vec<u8>>,
    /// `X-Forwarded-For`, several headers joined with `,` in order (RFC 9110 5.3).
    pub forwarded_for: Option<String>,
}

/// A head that cannot be served. The status and message go back before the connection closes.
#[derive(Debug, PartialEq, Eq)]
pub struct HeadError {
    /// 400 or 431.
    pub status: u16,
    /// What was wrong.
    pub message: &'static str,
}

const MAX_HEADERS: usize = 64;

/// The values of the headers named in `names` (case-insensitive), in the order they came, from
/// a complete request head; the names as `names` writes them. For the access proxy, which
/// passes chosen handshake headers on to the backend.
pub fn headers_named(head: &[u8], names: &[String]) -> Vec<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for h in req.headers.iter() {
        if let Some(name) = names.iter().find(|n| n.eq_ignore_ascii_case(h.name)) {
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            out.push((name.clone(), value));
        }
    }
    out
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete, read more (unless
/// `buf` already holds `max_bytes`, which the caller turns into 431).
pub fn parse_head(buf: &[u8], max_bytes: usize) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let window = &buf[..buf.len().min(max_bytes)];
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if window.len() >= max_bytes {
                return Err(HeadError {
                    status: 431,
                    message: "request head larger than http_head_bytes_max",
                });
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError {
                status: 431,
                message: "too many request headers",
            })
        }
        Err(_) => {
            return Err(HeadError {
                status: 400,
                message: "malformed HTTP request head",
            })
        }
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        len,
        keep_alive: req.version == Some(1),
        ..Head::default()
    };
    for h in req.headers.iter() {
        head.take_header(h.name, h.value)?;
    }
    Ok(Some(head))
}

impl Head {
    /// Takes what the server uses of one header.
    fn take_header(&mut self, name: &str, value: &[u8]) -> Result<(), HeadError> {
        let text = || String::from_utf8_lossy(value).trim().to_string();
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") {
            self.take_content_length(value)?;
        } else if is("transfer-encoding") {
            self.chunked = true;
        } else if is("connection") {
            for token in text().split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    self.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    self.keep_alive = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    self.connection_upgrade = true;
                }
            }
        } else if is("upgrade") {
            self.upgrade_websocket = text()
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if is("sec-websocket-key") {
            self.ws_key = Some(text());
        } else if is("sec-websocket-version") {
            self.ws_version = Some(text());
        } else if is("origin") {
            self.origin = Some(text());
        } else if is("host") {
            self.host = Some(text());
        } else if is("x-forwarded-for") {
            join_into(&mut self.forwarded_for, text());
        } else if is("sec-websocket-extensions") {
            join_into(&mut self.ws_extensions, text());
        } else if is("authorization") {
            let v = value.trim_ascii();
            if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                self.bearer = Some(v[7..].trim_ascii().to_vec());
            }
        }
        Ok(())
    }

    /// A `Content-Length`; several must agree (request smuggling).
    fn take_content_length(&mut self, value: &[u8]) -> Result<(), HeadError> {
        let n = std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .ok_or(HeadError {
                status: 400,
                message: "invalid Content-Length",
            })?;
        if self.content_length.is_some_and(|m| m != n) {
            return Err(HeadError {
                status: 400,
                message: "conflicting Content-Length headers",
            });
        }
        self.content_length = Some(n);
        Ok(())
    }
}

/// A list header seen again: its values follow the earlier ones (RFC 9110 5.3).
fn join_into(slot: &mut Option<String>, value: String) {
    *slot = Some(match slot.take() {
        Some(earlier) => format!("{earlier},{value}"),
        None => value,
    });
}

/// True when a `Host` header names this machine (localhost, 127.0.0.0/8 or ::1), with any port.
/// Dev mode answers only those, so a web page whose name rebinds to 127.0.0.1 cannot read the
/// dev token embedded in the playground (DNS rebinding).
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Value of `key` in a query string, percent-decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == key)
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Appends a complete response with a body.
pub(crate) fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\n{}\r\n",
        reason(status),
        body.len(),
        if keep_alive { "" } else { "connection: close\r\n" },
    );
    out.extend_from_slice(body);
}

/// Appends an error answer: the WebSocket error object, wrapped (SPEC section 3).
pub(crate) fn write_error(out: &mut Vec<u8>, status: u16, e: &Error, keep_alive: bool) {
    let body = crate::wire::reply::rest_error(e);
    write_response(out, status, "application/json", &body, keep_alive);
}

/// The 426 answer to an upgrade of another WebSocket version (RFC 6455 4.4).
pub(crate) fn write_upgrade_required(out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 426 Upgrade Required\r\nsec-websocket-version: 13\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_heads_parse() {
        let req = b"GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://a.example\r\n\r\nrest";
        let h = parse_head(req, 8192).unwrap().unwrap();
        assert_eq!(h.path, "/ws");
        assert_eq!(h.query, "x=1");
        assert!(h.upgrade_websocket && h.connection_upgrade && h.keep_alive);
        assert_eq!(h.len, req.len() - 4);
        assert_eq!(h.origin.as_deref(), Some("https://a.example"));
    }

    #[test]
    fn truncated_oversized_and_malformed_heads() {
        let req =
            b"POST /publish HTTP/1.1\r\nAuthorization: Bearer k1 \r\nContent-Length: 5\r\n\r\n";
        for cut in 0..req.len() {
            assert_eq!(parse_head(&req[..cut], 8192), Ok(None), "cut {cut}");
        }
        let h = parse_head(req, 8192).unwrap().unwrap();
        assert_eq!(h.bearer.as_deref(), Some(&b"k1"[..]));
        assert_eq!(h.content_length, Some(5));
        assert_eq!(parse_head(&req[..30], 30).unwrap_err().status, 431);
        assert_eq!(
            parse_head(b"GARBAGE\x01\r\n\r\n", 8192).unwrap_err().status,
            400
        );
        let bad_len = b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n";
        assert_eq!(parse_head(bad_len, 8192).unwrap_err().status, 400);
        let close = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(!parse_head(close, 8192).unwrap().unwrap().keep_alive);
        let old = b"GET / HTTP/1.0\r\n\r\n";
        assert!(!parse_head(old, 8192).unwrap().unwrap().keep_alive);
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:80",
            "[2001:db8::1]:80",
            "",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn query_params_decode() {
        assert_eq!(
            query_param("channel=a%2Fb&limit=5", "channel").as_deref(),
            Some("a/b")
        );
        assert_eq!(
            query_param("channel=a%2Fb&limit=5", "limit").as_deref(),
            Some("5")
        );
        assert_eq!(query_param("limit=5", "channel"), None);
        assert_eq!(query_param("channel=%zz", "channel"), None);
    }
}
