//! Sans-IO side of the access proxy (SPEC 15): the backend's URL, the HTTP/1.1 POST a node
//! sends it, the response read back, and the JSON of the requests and answers. The I/O is
//! the `proxy` module's, above this one.
//!
//! Only `http://` URLs that name an IP address or `localhost` are taken. Resolving a host name
//! would mean a blocking DNS lookup on a shard (every connection of that core waits), and the
//! backend is the operator's own service next to the node, so name resolution is deliberately
//! out of scope: configure the address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::UNIX_EPOCH;

use serde::ser::{Serialize, Serializer};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{err, Code, Error};

/// Bytes of a response head (status line and headers) read before the answer is refused.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Bytes of chunked framing (size lines, extensions, trailers) allowed on top of the body, so
/// a backend cannot make the node buffer without bound while its body stays small.
pub const FRAMING_BYTES_MAX: usize = 64 * 1024;
/// Bytes of a backend's error message passed on to the client.
pub const MESSAGE_BYTES_MAX: usize = 256;
/// Headers in a response head; more is refused (httparse needs a fixed array).
const HEADERS_MAX: usize = 64;

/// Where a backend URL points: the socket address, the `Host` header and the request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The address connected to; never the result of a name lookup.
    pub addr: SocketAddr,
    /// The `Host` header value: the URL's host and port as written.
    pub host: String,
    /// The request target: path and query, `/` when the URL has none.
    pub path: String,
}

/// Reads a backend URL from the configuration: `http://HOST[:PORT][/PATH]` where HOST is an
/// IPv4 literal, a bracketed IPv6 literal or `localhost` (127.0.0.1), and PORT defaults to 80.
/// Anything else is refused with a message that says what is accepted; host names are not
/// resolved (see the module's comment).
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = strip_prefix_ignore_case(url, "http://").ok_or_else(|| {
        refuse_url("not an http:// URL (https and other schemes are not supported)")
    })?;
    if url.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(refuse_url(
            "the URL holds a space, a control or a non-ASCII character",
        ));
    }
    if url.contains('#') {
        return Err(refuse_url("the URL has a fragment"));
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(refuse_url("the URL has user info"));
    }
    let addr = parse_authority(authority)?;
    let path = match path.as_bytes().first() {
        None => "/".to_string(),
        Some(b'?') => format!("/{path}"),
        Some(_) => path.to_string(),
    };
    Ok(Target {
        addr,
        host: authority.to_string(),
        path,
    })
}

fn refuse_url(why: &str) -> String {
    format!(
        "{why}; accepted: http://HOST[:PORT]/PATH where HOST is an IPv4 address, \
         an [IPv6] address or localhost (host names are not resolved)"
    )
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `HOST[:PORT]` of a URL into an address.
fn parse_authority(authority: &str) -> Result<SocketAddr, String> {
    let (ip, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| refuse_url("an IPv6 address without its closing ]"))?;
        let ip = inside
            .parse::<Ipv6Addr>()
            .map_err(|_| refuse_url("not an IPv6 address between [ and ]"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| refuse_url("text after the IPv6 address"))?,
            ),
        };
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ip = if host.eq_ignore_ascii_case("localhost") {
            Ipv4Addr::LOCALHOST
        } else {
            host.parse::<Ipv4Addr>()
                .map_err(|_| refuse_url("the host is not an IP address or localhost"))?
        };
        (IpAddr::V4(ip), port)
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&n| n > 0 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| refuse_url("the port is not a number from 1 to 65535"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// Appends the POST of `body` (JSON) to `target`, authenticated with `secret`, asking to keep
/// the connection for the next call. `secret` comes from the configuration, which refuses
/// line breaks in it (they would end the header).
pub fn write_post(out: &mut Vec<u8>, target: &Target, secret: &str, body: &[u8]) {
    use std::io::Write;
    debug_assert!(!secret.bytes().any(|b| b == b'\r' || b == b'\n'));
    debug_assert!(!target.path.bytes().any(|b| !b.is_ascii_graphic()));
    let _ = write!(
        out,
        "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {secret}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
        target.path,
        target.host,
        body.len(),
    );
    out.extend_from_slice(body);
}

/// A backend's complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (an interim 1xx is skipped, never returned).
    pub status: u16,
    /// The body, chunked encoding removed; at most the `body_max` asked for.
    pub body: Vec<u8>,
    /// HTTP/1.1 without `Connection: close`: the connection may carry the next call.
    pub keep_alive: bool,
    /// Bytes of the input the response took, interim responses included.
    pub used: usize,
}

/// The most bytes `parse_response` reads for a body of `body_max`: past this without a
/// complete response it is an error, so the reader's buffer is bounded.
pub fn response_bytes_max(body_max: usize) -> usize {
    HEAD_BYTES_MAX
        .saturating_add(body_max)
        .saturating_add(FRAMING_BYTES_MAX)
}

/// Parses an HTTP/1.1 response from the start of `buf`. `Ok(None)`: incomplete, read more
/// (only while `buf` is under `response_bytes_max(body_max)`). The body comes from
/// `Content-Length` or chunked encoding (extensions and trailers ignored); a response with
/// neither is refused unless it is a 204 or 304, and so are bodies over `body_max`,
/// conflicting lengths and both framings at once (request smuggling's ground).
pub fn parse_response(buf: &[u8], body_max: usize) -> Result<Option<Response>, String> {
    let window_max = response_bytes_max(body_max);
    let window = &buf[..buf.len().min(window_max)];
    let mut start = 0;
    loop {
        let Some(head) = parse_head(&window[start..], body_max)? else {
            return incomplete(window.len(), window_max);
        };
        if head.status == 101 {
            return Err("the access backend switched protocols (101)".to_string());
        }
        start += head.len;
        if head.status < 200 {
            // An interim answer (100 Continue, 103 Early Hints): the final one follows.
            continue;
        }
        let Some((body, len)) = read_body(head.framing, &window[start..], body_max)? else {
            return incomplete(window.len(), window_max);
        };
        return Ok(Some(Response {
            status: head.status,
            body,
            keep_alive: head.keep_alive,
            used: start + len,
        }));
    }
}

fn incomplete(len: usize, window_max: usize) -> Result<Option<Response>, String> {
    if len >= window_max {
        return Err(format!(
            "access backend answer larger than {window_max} bytes"
        ));
    }
    Ok(None)
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
}

/// What `parse_response` uses of a head.
struct Head {
    status: u16,
    len: usize,
    keep_alive: bool,
    framing: Framing,
}

fn parse_head(buf: &[u8], body_max: usize) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= HEAD_BYTES_MAX => len,
        // A head is refused for its size however it arrives, in one read or in pieces.
        Ok(httparse::Status::Complete(_)) => return Err(head_too_large()),
        Ok(httparse::Status::Partial) if buf.len() >= HEAD_BYTES_MAX => {
            return Err(head_too_large())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed access backend answer head: {e}")),
    };
    let status = res.code.unwrap_or(0);
    let mut keep_alive = res.version == Some(1);
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for h in res.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value)?;
            if length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".to_string());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err("a Transfer-Encoding other than chunked, or more than one".to_string());
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            let mut tokens = h.value.split(|&b| b == b',');
            if tokens.any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")) {
                keep_alive = false;
            }
        }
    }
    let framing = match (length, chunked) {
        // No body whatever the headers say (RFC 9112 6.3), and interim answers have none.
        _ if matches!(status, 204 | 304) || status < 200 => Framing::Length(0),
        (Some(_), true) => return Err("both Content-Length and chunked encoding".to_string()),
        (Some(n), false) if n > body_max => {
            return Err(format!("access backend answer body over {body_max} bytes"))
        }
        (Some(n), false) => Framing::Length(n),
        (None, true) => Framing::Chunked,
        (None, false) => {
            return Err("access backend answer without Content-Length or chunked encoding".into())
        }
    };
    Ok(Some(Head {
        status,
        len,
        keep_alive,
        framing,
    }))
}

fn head_too_large() -> String {
    format!("access backend answer head larger than {HEAD_BYTES_MAX} bytes")
}

/// A `Content-Length` value: decimal digits only (no sign, no list).
fn parse_length(value: &[u8]) -> Result<usize, String> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err("invalid Content-Length".to_string());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(|| "invalid Content-Length".to_string())
}

/// The body and the bytes it took, or None while incomplete.
fn read_body(
    framing: Framing,
    rest: &[u8],
    body_max: usize,
) -> Result<Option<(Vec<u8>, usize)>, String> {
    match framing {
        Framing::Length(n) => Ok(rest.get(..n).map(|b| (b.to_vec(), n))),
        Framing::Chunked => {
            // Walk once without copying: while incomplete, a read costs a scan of the chunk
            // lines, and the body is copied only once it has all arrived.
            let Some((len, body_len)) = walk_chunks(rest, body_max, None)? else {
                return Ok(None);
            };
            let mut body = Vec::with_capacity(body_len);
            walk_chunks(rest, body_max, Some(&mut body))?;
            Ok(Some((body, len)))
        }
    }
}

/// Walks a chunked body: `(bytes taken, body bytes)` when complete, copying the chunks into
/// `out` when given.
fn walk_chunks(
    rest: &[u8],
    body_max: usize,
    mut out: Option<&mut Vec<u8>>,
) -> Result<Option<(usize, usize)>, String> {
    let mut pos = 0;
    let mut total = 0usize;
    loop {
        let line = &rest[pos..];
        let Some(first) = line.first() else {
            return Ok(None);
        };
        // httparse takes a line with no digits as size 0, which would end the body early.
        if !first.is_ascii_hexdigit() {
            return Err("malformed chunk size".to_string());
        }
        let (n, size) = match httparse::parse_chunk_size(line) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("malformed chunk size".to_string()),
        };
        pos += n;
        if size == 0 {
            break;
        }
        let end = usize::try_from(size)
            .ok()
            .filter(|&s| s <= body_max - total)
            .and_then(|s| pos.checked_add(s))
            .ok_or_else(|| format!("access backend answer body over {body_max} bytes"))?;
        let Some(after) = rest.get(end..end.saturating_add(2)) else {
            return Ok(None);
        };
        if after.len() < 2 {
            return Ok(None);
        }
        if after != b"\r\n" {
            return Err("chunk data not followed by CRLF".to_string());
        }
        if let Some(out) = out.as_deref_mut() {
            out.extend_from_slice(&rest[pos..end]);
        }
        total += end - pos;
        pos = end + 2;
    }
    skip_trailers(rest, pos).map(|end| end.map(|end| (end, total)))
}

/// The end of the trailer section that starts at `pos` (trailers are ignored).
fn skip_trailers(rest: &[u8], mut pos: usize) -> Result<Option<usize>, String> {
    loop {
        let Some(i) = rest[pos..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line = &rest[pos..pos + i];
        pos += i + 1;
        if line.is_empty() || line == b"\r" {
            return Ok(Some(pos));
        }
        if line.first().is_some_and(|b| matches!(b, b' ' | b'\t')) || !line.contains(&b':') {
            return Err("malformed trailer".to_string());
        }
    }
}

/// A subscribe proxy's decision (SPEC 15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeAnswer {
    /// Subscribe; ask again at `expire_at` (Unix seconds) when given.
    Allow {
        /// When the decision lapses, in Unix seconds.
        expire_at: Option<u64>,
    },
    /// Refuse: the client gets PermissionDenied.
    Deny,
    /// The backend's error, passed to the client (codes not ours become Internal).
    Error(Error),
}

/// The `{"result":..}` or `{"error":..}` of an answer, each left as raw JSON until checked.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct SubscribeResult {
    allow: bool,
    #[serde(rename = "expireAt")]
    expire_at: Option<String>,
}

#[derive(Deserialize)]
struct ConnectResult {
    sub: String,
    exp: u64,
    #[serde(rename = "authorizedChannels", default)]
    authorized_channels: Vec<String>,
    #[serde(default)]
    scope: Vec<String>,
    info: Option<Box<RawValue>>,
}

/// Reads a subscribe proxy's answer body: `{"result":{"allow":true,"expireAt"?:RFC3339}}`,
/// `{"result":{"allow":false}}` or `{"error":{"code","message"}}`. `Err(why)` for anything
/// else; the caller answers the client Unavailable or Internal and logs `why`.
pub fn parse_subscribe_answer(body: &[u8]) -> Result<SubscribeAnswer, String> {
    let result = match envelope(body)? {
        Err(e) => return Ok(SubscribeAnswer::Error(e)),
        Ok(raw) => object::<SubscribeResult>(raw, "result")?,
    };
    let expire_at = match result.expire_at.as_deref() {
        None => None,
        Some(text) => Some(parse_time(text)?),
    };
    Ok(if result.allow {
        SubscribeAnswer::Allow { expire_at }
    } else {
        SubscribeAnswer::Deny
    })
}

/// What a connect proxy grants: a token's claims (SPEC 15).
#[derive(Debug)]
pub struct ConnectAnswer {
    /// The user; never empty.
    pub sub: String,
    /// When the grant expires, in Unix seconds (close 4002 then, as for a token).
    pub exp: u64,
    /// Channel patterns the connection may subscribe to.
    pub authorized_channels: Vec<String>,
    /// Scopes, as a token's `scope` claim.
    pub scope: Vec<String>,
    /// The presence `info` object, as the backend wrote it.
    pub info: Option<Box<RawValue>>,
}

/// Reads a connect proxy's answer body: `{"result":{"sub","exp","authorizedChannels"?,
/// "scope"?,"info"?}}` (`Ok(Ok(..))`) or `{"error":{"code","message"}}` (`Ok(Err(..))`, codes
/// not ours become Internal). `Err(why)` for anything else, an empty `sub` and an `info`
/// that is not an object included.
pub fn parse_connect_answer(body: &[u8]) -> Result<Result<ConnectAnswer, Error>, String> {
    let result = match envelope(body)? {
        Err(e) => return Ok(Err(e)),
        Ok(raw) => object::<ConnectResult>(raw, "result")?,
    };
    if result.sub.is_empty() {
        return Err("connect answer with an empty sub".to_string());
    }
    if result
        .info
        .as_ref()
        .is_some_and(|i| !i.get().starts_with('{'))
    {
        return Err("connect answer whose info is not an object".to_string());
    }
    Ok(Ok(ConnectAnswer {
        sub: result.sub,
        exp: result.exp,
        authorized_channels: result.authorized_channels,
        scope: result.scope,
        info: result.info,
    }))
}

/// The raw `result` of an answer, or its `error` read into ours. Exactly one must be there.
fn envelope(body: &[u8]) -> Result<Result<&RawValue, Error>, String> {
    // A struct would also take a JSON array, member by position: only objects are answers.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err("access backend answer is not a JSON object".to_string());
    }
    let e: Envelope = serde_json::from_slice(body)
        .map_err(|e| format!("access backend answer is not valid: {e}"))?;
    match (e.result, e.error) {
        (Some(result), None) => Ok(Ok(result)),
        (None, Some(error)) => {
            let error = object::<ErrorBody>(error, "error")?;
            let code = Code::from_name(&error.code).unwrap_or(Code::Internal);
            Ok(Err(err(code, truncate(error.message, MESSAGE_BYTES_MAX))))
        }
        _ => Err("access backend answer needs exactly one of result and error".to_string()),
    }
}

/// `raw` read as `T`, which must be written as an object.
fn object<'a, T: Deserialize<'a>>(raw: &'a RawValue, what: &str) -> Result<T, String> {
    if !raw.get().starts_with('{') {
        return Err(format!("access backend answer's {what} is not an object"));
    }
    serde_json::from_str(raw.get())
        .map_err(|e| format!("access backend answer's {what} is not valid: {e}"))
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(cut);
    }
    s
}

/// An RFC 3339 time in Unix seconds (fractions dropped). humantime reads only UTC, so an
/// offset (`+02:00`) is taken off here and applied after.
fn parse_time(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "expireAt {:?} is not an RFC 3339 time",
            truncate(text.into(), 64)
        )
    };
    // ASCII only, so every slice below falls on a character boundary.
    if !text.is_ascii() {
        return Err(bad());
    }
    let upper = text.to_ascii_uppercase();
    let (utc, offset_s) = match upper.len().checked_sub(6).map(|i| upper.split_at(i)) {
        Some((time, off)) if off.starts_with(['+', '-']) => {
            let hours = two_digits(&off[1..3]).filter(|&h| h < 24);
            let minutes = two_digits(&off[4..]).filter(|&m| m < 60);
            let (Some(hours), Some(minutes), b':') = (hours, minutes, off.as_bytes()[3]) else {
                return Err(bad());
            };
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{time}Z"), sign * (hours * 3600 + minutes * 60))
        }
        _ => (upper, 0),
    };
    let at = humantime::parse_rfc3339(&utc).map_err(|_| bad())?;
    let utc_s = at.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_secs();
    let unix = i128::from(utc_s) - i128::from(offset_s);
    u64::try_from(unix).map_err(|_| bad())
}

fn two_digits(s: &str) -> Option<i64> {
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// A forwarded header list as a JSON object; a repeated name (in any case) is written once,
/// its values joined as RFC 9110 5.3 says (`; ` for Cookie, RFC 6265 5.4).
struct Headers<'a>(&'a [(String, String)]);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut merged: Vec<(&str, String)> = Vec::with_capacity(self.0.len());
        for (name, value) in self.0 {
            match merged
                .iter_mut()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                Some((n, v)) => {
                    v.push_str(if n.eq_ignore_ascii_case("cookie") {
                        "; "
                    } else {
                        ", "
                    });
                    v.push_str(value);
                }
                None => merged.push((name, value.clone())),
            }
        }
        s.collect_map(merged.iter().map(|(n, v)| (n, v)))
    }
}

/// The body of a subscribe proxy request: `{"channel","user","connection","node","headers"}`,
/// `user` null for an anonymous connection.
pub fn subscribe_request_body(
    channel: &str,
    user: Option<&str>,
    connection: &str,
    node: &str,
    headers: &[(String, String)],
) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        channel: &'a str,
        user: Option<&'a str>,
        connection: &'a str,
        node: &'a str,
        headers: Headers<'a>,
    }
    let body = Body {
        channel,
        user,
        connection,
        node,
        headers: Headers(headers),
    };
    // Strings and a map of strings: writing into a Vec cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The body of a connect proxy request: `{"connection","node","headers"}`.
pub fn connect_request_body(connection: &str, node: &str, headers: &[(String, String)]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        connection: &'a str,
        node: &'a str,
        headers: Headers<'a>,
    }
    let body = Body {
        connection,
        node,
        headers: Headers(headers),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    #[test]
    fn urls_of_ip_literals_and_localhost() {
        let t = parse_url("http://127.0.0.1:8000/broadcaster/subscribe").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:8000");
        assert_eq!(t.path, "/broadcaster/subscribe");
        let t = parse_url("HTTP://localhost/a?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
        assert_eq!((t.host.as_str(), t.path.as_str()), ("localhost", "/a?x=1"));
        let t = parse_url("http://[::1]:9/").unwrap();
        assert_eq!(t.addr, "[::1]:9".parse().unwrap());
        assert_eq!(t.host, "[::1]:9");
        assert_eq!(parse_url("http://10.0.0.1").unwrap().path, "/");
        assert_eq!(parse_url("http://10.0.0.1?q").unwrap().path, "/?q");
        assert_eq!(parse_url("http://[2001:db8::1]").unwrap().addr.port(), 80);
    }

    #[test]
    fn other_urls_are_refused_saying_what_is_accepted() {
        for url in [
            "",
            "https://127.0.0.1/x",
            "ftp://127.0.0.1/",
            "127.0.0.1:80/x",
            "http://",
            "http://backend.example/x",
            "http://user:pw@127.0.0.1/x",
            "http://127.0.0.1/x#frag",
            "http://127.0.0.1:/x",
            "http://127.0.0.1:0/x",
            "http://127.0.0.1:65536/x",
            "http://127.0.0.1:+80/x",
            "http://127.0.0.1:80:81/x",
            "http://::1/x",
            "http://[::1/x",
            "http://[::1]x/",
            "http://[127.0.0.1]/",
            "http://127.0.0.1/a b",
            "http://127.0.0.1/a\r\nX: y",
            "http://127.0.0.1/é",
            "http://01.2.3.4/",
        ] {
            let e = parse_url(url).expect_err(url);
            assert!(
                e.contains("accepted: http://HOST[:PORT]/PATH"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn post_is_written_with_every_header() {
        let t = parse_url("http://127.0.0.1:8000/sub").unwrap();
        let mut out = Vec::new();
        write_post(&mut out, &t, "s3cret", b"{\"a\":1}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /sub HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: Bearer s3cret\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\nConnection: keep-alive\r\n\r\n\
             {\"a\":1}"
        );
    }

    fn complete(buf: &[u8]) -> Response {
        parse_response(buf, MAX).unwrap().expect("complete")
    }

    /// Every prefix shorter than the response is incomplete, and bytes after it change nothing.
    fn check_split(buf: &[u8]) -> Response {
        let r = complete(buf);
        assert_eq!(r.used, buf.len());
        for cut in 0..buf.len() {
            assert_eq!(parse_response(&buf[..cut], MAX), Ok(None), "cut {cut}");
        }
        let mut more = buf.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(complete(&more), r);
        r
    }

    #[test]
    fn content_length_bodies() {
        let r = check_split(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(
            (r.status, &r.body[..], r.keep_alive),
            (200, &b"hello"[..], true)
        );
        let r = check_split(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = check_split(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n");
        assert!(r.body.is_empty());
        let twice = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(check_split(twice).body, b"ok");
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5;ext=1\r\nhello\r\nA \r\n, world!!!\r\n0\r\nX-Trailer: t\r\n\r\n";
        let r = check_split(buf);
        assert_eq!(r.body, b"hello, world!!!");
        let r = check_split(b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n0\r\n\r\n");
        assert!(r.body.is_empty() && r.keep_alive);
    }

    #[test]
    fn interim_answers_are_skipped() {
        let r = check_split(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        );
        assert_eq!((r.status, &r.body[..]), (200, &b"x"[..]));
    }

    #[test]
    fn keep_alive_ends_with_close_or_http10() {
        let close = b"HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 0\r\n\r\n";
        assert!(!complete(close).keep_alive);
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(!complete(old).keep_alive);
        let old_ka = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert!(!complete(old_ka).keep_alive);
    }

    #[test]
    fn refused_responses() {
        for buf in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 65537\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10001\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n bad\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"garbage\r\n\r\n",
            b"\x00\xff\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            let shown = String::from_utf8_lossy(buf);
            assert!(parse_response(buf, MAX).is_err(), "{shown}");
        }
        // Chunks adding up to more than the limit, each under it.
        let mut buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            buf.extend_from_slice(b"8000\r\n");
            buf.extend_from_slice(&[b'x'; 0x8000]);
            buf.extend_from_slice(b"\r\n");
        }
        assert!(parse_response(&buf, MAX)
            .unwrap_err()
            .contains("over 65536"));
    }

    #[test]
    fn unbounded_answers_are_refused_at_the_window() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        while head.len() < HEAD_BYTES_MAX {
            head.extend_from_slice(b"X-Filler: ");
            head.extend_from_slice(&[b'a'; 1024]);
            head.extend_from_slice(b"\r\n");
        }
        assert!(parse_response(&head, MAX).is_err());
        // The same head complete in one read is refused too, as it would be in pieces.
        head.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        assert!(parse_response(&head, MAX)
            .unwrap_err()
            .contains("head larger"));
        // Endless chunk extensions: framing that never yields a byte of body.
        let mut buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        buf.resize(response_bytes_max(16) - 1, b'e');
        assert_eq!(parse_response(&buf, 16), Ok(None));
        buf.push(b'e');
        assert!(parse_response(&buf, 16).is_err());
    }

    #[test]
    fn subscribe_answers() {
        let p = |s: &str| parse_subscribe_answer(s.as_bytes());
        assert_eq!(
            p(r#"{"result":{"allow":true}}"#),
            Ok(SubscribeAnswer::Allow { expire_at: None })
        );
        assert_eq!(
            p(r#" {"result":{"allow":true,"expireAt":"2030-01-01T00:00:00Z"},"x":1}"#),
            Ok(SubscribeAnswer::Allow {
                expire_at: Some(1_893_456_000)
            })
        );
        assert_eq!(
            p(r#"{"result":{"allow":true,"expireAt":"2030-01-01t02:30:00.5+02:30"}}"#),
            Ok(SubscribeAnswer::Allow {
                expire_at: Some(1_893_456_000)
            })
        );
        assert_eq!(
            p(r#"{"result":{"allow":true,"expireAt":"2029-12-31T23:00:00-01:00"}}"#),
            Ok(SubscribeAnswer::Allow {
                expire_at: Some(1_893_456_000)
            })
        );
        assert_eq!(
            p(r#"{"result":{"allow":false}}"#),
            Ok(SubscribeAnswer::Deny)
        );
        assert_eq!(
            p(r#"{"error":{"code":"NotFound","message":"no such contest"}}"#),
            Ok(SubscribeAnswer::Error(err(
                Code::NotFound,
                "no such contest"
            )))
        );
        let long = "é".repeat(200);
        let text = format!(r#"{{"error":{{"code":"Teapot","message":"{long}"}}}}"#);
        let Ok(SubscribeAnswer::Error(e)) = p(&text) else {
            panic!("{text}")
        };
        assert_eq!(e.code, Code::Internal);
        assert_eq!(e.message, "é".repeat(128));
    }

    #[test]
    fn malformed_subscribe_answers() {
        for text in [
            "",
            "not json",
            "[]",
            r#"[{"allow":true},null]"#,
            "{}",
            r#"{"result":null}"#,
            r#"{"result":{"allow":true},"error":{"code":"Internal","message":""}}"#,
            r#"{"result":{"allow":"yes"}}"#,
            r#"{"result":{}}"#,
            r#"{"result":[true]}"#,
            r#"{"result":{"allow":true,"allow":false}}"#,
            r#"{"result":{"allow":true,"expireAt":"tomorrow"}}"#,
            r#"{"result":{"allow":true,"expireAt":"1969-12-31T23:59:59Z"}}"#,
            r#"{"result":{"allow":true,"expireAt":"1970-01-01T00:00:00+01:00"}}"#,
            r#"{"result":{"allow":true,"expireAt":"2030-01-01T00:00:00+24:00"}}"#,
            r#"{"result":{"allow":true,"expireAt":"2030-01-01T00:00:00ü:0"}}"#,
            r#"{"result":{"allow":true,"expireAt":1893456000}}"#,
            r#"{"error":{"message":"no code"}}"#,
            r#"{"error":"Internal"}"#,
            r#"{"result":{"allow":true}} trailing"#,
        ] {
            assert!(parse_subscribe_answer(text.as_bytes()).is_err(), "{text}");
        }
    }

    #[test]
    fn connect_answers() {
        let text = r#"{"result":{"sub":"alice","exp":2000000000,"authorizedChannels":["c.*"],
                       "scope":["publish"],"info":{"username":"alice"}}}"#;
        let a = parse_connect_answer(text.as_bytes()).unwrap().unwrap();
        assert_eq!((a.sub.as_str(), a.exp), ("alice", 2_000_000_000));
        assert_eq!(a.authorized_channels, ["c.*"]);
        assert_eq!(a.scope, ["publish"]);
        assert_eq!(a.info.unwrap().get(), r#"{"username":"alice"}"#);
        let bare = parse_connect_answer(br#"{"result":{"sub":"b","exp":1}}"#)
            .unwrap()
            .unwrap();
        assert!(
            bare.authorized_channels.is_empty() && bare.scope.is_empty() && bare.info.is_none()
        );
        let e = parse_connect_answer(br#"{"error":{"code":"Unauthenticated","message":"no"}}"#);
        assert_eq!(e.unwrap().unwrap_err(), err(Code::Unauthenticated, "no"));
        for text in [
            r#"{"result":{"sub":"","exp":1}}"#,
            r#"{"result":{"exp":1}}"#,
            r#"{"result":{"sub":"a"}}"#,
            r#"{"result":{"sub":"a","exp":-1}}"#,
            r#"{"result":{"sub":"a","exp":1,"info":[1]}}"#,
            r#"{"result":{"sub":"a","exp":1,"scope":"publish"}}"#,
        ] {
            assert!(parse_connect_answer(text.as_bytes()).is_err(), "{text}");
        }
    }

    #[test]
    fn request_bodies() {
        let headers = vec![
            ("Cookie".to_string(), "ouat=1".to_string()),
            ("X-Forwarded-For".to_string(), "1.2.3.4".to_string()),
            ("cookie".to_string(), "b=\"2\"".to_string()),
        ];
        let body = subscribe_request_body("contest:1", Some("alice"), "c-1", "n-1", &headers);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel":"contest:1","user":"alice","connection":"c-1",
                "node":"n-1","headers":{"Cookie":"ouat=1; b=\"2\"","X-Forwarded-For":"1.2.3.4"}})
        );
        let body = subscribe_request_body("c", None, "c-1", "n-1", &[]);
        assert_eq!(
            body,
            br#"{"channel":"c","user":null,"connection":"c-1","node":"n-1","headers":{}}"#
        );
        let body = connect_request_body("c-2", "n-1", &headers[..1]);
        assert_eq!(
            body,
            br#"{"connection":"c-2","node":"n-1","headers":{"Cookie":"ouat=1"}}"#
        );
    }
}
