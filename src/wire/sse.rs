//! Server-sent events (SPEC 19), sans-IO: the response head, each message kind in its
//! `text/event-stream` form, the channels of `GET /sse?channel=..`, and the event id that
//! carries every channel's position (`Last-Event-ID` on reconnect).
//!
//! # The event id
//!
//! An EventSource reconnects to the same URL, so the id only needs the positions in the URL's
//! channel order: one entry per channel, joined by `_`; an entry is `<epoch>.<offset>`, or
//! empty for a channel without a position (its subscription ended). Trailing empty entries are
//! left out. Epochs are ASCII letters and digits (the server makes them: 16 hex digits), so
//! neither separator can occur inside an entry, and the id needs no escaping. Decoding accepts
//! only what the encoder writes (`decode_positions(x)` is `Ok` iff `x` is canonical), so
//! `encode(decode(x)) == x`.

use crate::error::Error;
use crate::wire::reply::{write_json_string, write_u64};

/// What a broadcast's shared prefix starts with; SSE's `data` is the `params` object only.
pub const BROADCAST_WRAPPER: &[u8] = b"{\"method\":\"broadcast\",\"params\":";
/// Most bytes of one epoch in an event id.
pub const EPOCH_BYTES_MAX: usize = 64;
/// Most bytes of one entry: an epoch, the dot, and a u64 in decimal.
pub const ENTRY_BYTES_MAX: usize = EPOCH_BYTES_MAX + 1 + 20;

/// Appends the `200` head of an event stream and the first `retry` field. The stream is
/// delimited by the connection's close (no `Content-Length`, no chunking), which every
/// HTTP/1.1 client and proxy understands; `X-Accel-Buffering: no` keeps nginx from buffering it.
pub fn write_head(out: &mut Vec<u8>, retry_ms: u64, allow_origin: Option<&str>) {
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n\
          x-accel-buffering: no\r\nconnection: close\r\n",
    );
    if let Some(origin) = allow_origin {
        out.extend_from_slice(b"access-control-allow-origin: ");
        out.extend_from_slice(origin.as_bytes());
        out.extend_from_slice(b"\r\nvary: origin\r\n");
    }
    out.extend_from_slice(b"\r\nretry: ");
    write_u64(out, retry_ms);
    out.extend_from_slice(b"\n\n");
}

/// Appends `data` as one `data:` line. JSON the server writes has no raw line breaks, but a
/// payload is relayed as published and may hold some between its tokens (where JSON allows
/// whitespace, never inside a string): they become spaces, which keeps the JSON the same value
/// and the event one line.
fn write_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(b"data: ");
    let start = out.len();
    out.extend_from_slice(data);
    flatten_lines(&mut out[start..]);
    out.push(b'\n');
}

/// Turns CR and LF into spaces (a tight loop the compiler vectorises).
#[inline]
fn flatten_lines(bytes: &mut [u8]) {
    for b in bytes {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
}

/// Appends one event: `event: NAME\ndata: DATA\n\n`.
pub fn write_event(out: &mut Vec<u8>, event: &[u8], data: &[u8]) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event);
    out.push(b'\n');
    write_data(out, data);
    out.push(b'\n');
}

/// A notification the server wrote as `{"method":"X","params":P}` (join, leave, unsubscribed)
/// becomes `event: X` with `data: P`; anything else goes whole as `event: message`.
pub fn write_notification(out: &mut Vec<u8>, text: &[u8]) {
    match split_notification(text) {
        Some((method, params)) => write_event(out, method, params),
        None => write_event(out, b"message", text),
    }
}

fn split_notification(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = text.strip_prefix(b"{\"method\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let (method, rest) = rest.split_at(end);
    let params = rest.strip_prefix(b"\",\"params\":")?.strip_suffix(b"}")?;
    let plain = method
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'_');
    (plain && !method.is_empty()).then_some((method, params))
}

/// A response on an SSE connection, which only the subscribes of its opening get: `subscribed`
/// with the result, the channel added first, or `error` with the channel and the error.
/// `channel` is the JSON string the subscribe passed as its request id.
pub fn write_response(out: &mut Vec<u8>, channel: Option<&[u8]>, result: Result<&[u8], &Error>) {
    let channel = channel.unwrap_or(b"null");
    let mut data = Vec::with_capacity(128);
    data.extend_from_slice(b"{\"channel\":");
    data.extend_from_slice(channel);
    let event: &[u8] = match result {
        Ok(body) => {
            match body.strip_prefix(b"{") {
                Some(b"}") | None => data.push(b'}'),
                Some(rest) => {
                    data.push(b',');
                    data.extend_from_slice(rest);
                }
            }
            b"subscribed"
        }
        Err(e) => {
            data.extend_from_slice(b",\"error\":");
            let body = crate::wire::reply::rest_error(e);
            // `{"error":{..}}`: its inner object.
            data.extend_from_slice(&body[9..body.len() - 1]);
            data.push(b'}');
            b"error"
        }
    };
    write_event(out, event, &data);
}

/// `event: close` with `{"code":N}`; the connection ends after it.
pub fn write_close(out: &mut Vec<u8>, code: u16) {
    out.extend_from_slice(b"event: close\ndata: {\"code\":");
    write_u64(out, u64::from(code));
    out.extend_from_slice(b"}\n\n");
}

/// A comment line: keeps proxies from timing the stream out and lets the server notice a dead
/// peer when the write fails.
pub fn write_ping(out: &mut Vec<u8>) {
    out.extend_from_slice(b": ping\n\n");
}

/// A broadcast's suffix with the line breaks its payload holds between JSON tokens turned into
/// spaces (the same JSON value, and the event stays one `data:` line); None when it holds none,
/// as almost every payload, and the suffix serves as it is. Once per publication, not per
/// subscriber (`Publication::sse_suffix`).
pub fn flattened(suffix: &[u8]) -> Option<Box<[u8]>> {
    if !suffix.iter().any(|&b| b == b'\n' || b == b'\r') {
        return None;
    }
    let mut flat = suffix.to_vec();
    flatten_lines(&mut flat);
    Some(flat.into_boxed_slice())
}

/// Appends one broadcast for a subscriber: its `id:` line (written by `id`, if any), `event: broadcast`, and
/// `data:` the broadcast's params, sliced out of the parts shared by every subscriber (the
/// prefix without its wrapper, the seq, the suffix without the wrapper's closing brace), so
/// the SSE form costs no encoding per subscriber. `suffix` has no line break (`flattened`).
#[inline]
pub fn write_broadcast(
    out: &mut Vec<u8>,
    id: impl FnOnce(&mut Vec<u8>),
    prefix: &[u8],
    seq: u64,
    suffix: &[u8],
) {
    debug_assert!(prefix.starts_with(BROADCAST_WRAPPER));
    debug_assert!(suffix.ends_with(b"}}"));
    let params = prefix.get(BROADCAST_WRAPPER.len()..).unwrap_or(prefix);
    let tail = &suffix[..suffix.len().saturating_sub(1)];
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq).as_bytes();
    out.reserve(params.len() + seq.len() + tail.len() + 64);
    id(out);
    out.extend_from_slice(b"event: broadcast\ndata: ");
    out.extend_from_slice(params);
    out.extend_from_slice(seq);
    debug_assert!(
        !tail.contains(&b'\n'),
        "a suffix with line breaks, not flattened"
    );
    out.extend_from_slice(tail);
    out.extend_from_slice(b"\n\n");
}

/// Appends the event id of `positions`: (index of the channel in the URL, epoch, offset), in
/// increasing index order; channels left out get empty entries.
pub fn write_positions<'a>(
    out: &mut Vec<u8>,
    positions: impl Iterator<Item = (usize, &'a str, u64)>,
) {
    let mut at = 0;
    for (index, epoch, offset) in positions {
        debug_assert!(index >= at, "positions in URL order");
        while at < index {
            if at > 0 {
                out.push(b'_');
            }
            at += 1;
        }
        if at > 0 {
            out.push(b'_');
        }
        out.extend_from_slice(epoch.as_bytes());
        out.push(b'.');
        write_u64(out, offset);
        at = index + 1;
    }
}

/// One channel's position in an event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The channel's epoch.
    pub epoch: String,
    /// The last offset delivered.
    pub offset: u64,
}

/// Why a `Last-Event-ID` was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadId(pub &'static str);

/// The positions an event id holds, one per URL channel (`channels` of them; `None` where it
/// has none). Only the encoder's own form is accepted (see the module docs).
pub fn decode_positions(id: &str, channels: usize) -> Result<Vec<Option<Position>>, BadId> {
    let mut out = vec![None; channels];
    if id.is_empty() {
        return Ok(out);
    }
    if id.len() > channels * (ENTRY_BYTES_MAX + 1) {
        return Err(BadId("longer than the URL's channels can need"));
    }
    let entries: Vec<&str> = id.split('_').collect();
    if entries.len() > channels {
        return Err(BadId("more positions than channels in the URL"));
    }
    if entries.last().is_some_and(|e| e.is_empty()) {
        return Err(BadId("ends with an empty position"));
    }
    for (slot, entry) in out.iter_mut().zip(&entries) {
        if !entry.is_empty() {
            *slot = Some(decode_entry(entry)?);
        }
    }
    Ok(out)
}

fn decode_entry(entry: &str) -> Result<Position, BadId> {
    let (epoch, offset) = entry
        .split_once('.')
        .ok_or(BadId("a position is <epoch>.<offset>"))?;
    if epoch.is_empty()
        || epoch.len() > EPOCH_BYTES_MAX
        || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(BadId("an epoch is 1 to 64 ASCII letters and digits"));
    }
    let canonical = !offset.is_empty()
        && offset.bytes().all(|b| b.is_ascii_digit())
        && (offset == "0" || !offset.starts_with('0'));
    if !canonical {
        return Err(BadId("an offset is a decimal number without leading zeros"));
    }
    let offset = offset
        .parse::<u64>()
        .map_err(|_| BadId("an offset is at most 2^64-1"))?;
    Ok(Position {
        epoch: epoch.to_string(),
        offset,
    })
}

/// The event id of `positions` (the inverse of `decode_positions`).
pub fn encode_positions(positions: &[Option<Position>]) -> String {
    let mut out = Vec::new();
    let held = positions
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.epoch.as_str(), p.offset)));
    write_positions(&mut out, held);
    // Epochs are ASCII (decode checked them), separators and digits too.
    String::from_utf8(out).unwrap_or_default()
}

/// Every value of `key` in a query string, percent-decoded, in order; `Err` when one cannot be
/// decoded (bad escape, not UTF-8).
pub fn query_values(query: &str, key: &str) -> Result<Vec<String>, BadId> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != key {
            continue;
        }
        let one = format!("{key}={v}");
        match crate::wire::http::query_param(&one, key) {
            Some(value) => out.push(value),
            None => return Err(BadId("a query value is not valid percent-encoded UTF-8")),
        }
    }
    Ok(out)
}

/// Appends `s` as a JSON string (the request id that names a channel in its `subscribed`).
pub fn json_string(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    write_json_string(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{err, Code};
    use crate::wire::broadcast::broadcast_parts;

    fn pos(epoch: &str, offset: u64) -> Option<Position> {
        Some(Position {
            epoch: epoch.into(),
            offset,
        })
    }

    #[test]
    fn ids_round_trip_and_keep_url_order() {
        let cases = [
            vec![pos("ab12", 7)],
            vec![pos("ab12", 7), pos("ff", 0), pos("x", u64::MAX)],
            vec![None, pos("e", 3)],
            vec![pos("e", 3), None, None, pos("f", 1)],
        ];
        for positions in cases {
            let id = encode_positions(&positions);
            assert_eq!(
                decode_positions(&id, positions.len()).unwrap(),
                positions,
                "{id}"
            );
        }
        assert_eq!(
            encode_positions(&[pos("e", 3), None, pos("f", 10)]),
            "e.3__f.10"
        );
        assert_eq!(encode_positions(&[None, pos("f", 1)]), "_f.1");
        // Trailing channels without a position are left out, and decode as none.
        assert_eq!(encode_positions(&[pos("e", 1), None]), "e.1");
        assert_eq!(decode_positions("e.1", 2).unwrap(), vec![pos("e", 1), None]);
        assert_eq!(decode_positions("", 2).unwrap(), vec![None, None]);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "e",
            "e.",
            ".1",
            "e.01",
            "e.-1",
            "e.1_",
            "_",
            "e.1__",
            "e.1_f.2_g.3",
            "é.1",
            "e-x.1",
            "e.1.2",
            "e.18446744073709551616",
            "e.+1",
            "e. 1",
        ] {
            assert!(decode_positions(bad, 2).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}.1", "a".repeat(65));
        assert!(decode_positions(&long, 1).is_err());
        assert!(decode_positions(&"1".repeat(10_000), 1).is_err());
    }

    #[test]
    fn broadcast_is_the_params_with_an_id() {
        let (p, s) = broadcast_parts(
            "n-1",
            7,
            "2026-01-01T00:00:00.000Z",
            "c",
            "e",
            None,
            b"{\n\"a\":\r\n1}",
        );
        let flat = flattened(&s).expect("the payload has line breaks");
        assert_eq!(flat.len(), s.len());
        let plain = broadcast_parts("n-2", 8, "", "c", "e", None, b"{\"a\":1}").1;
        assert_eq!(
            flattened(&plain),
            None,
            "nothing to flatten: the suffix serves"
        );
        let mut out = Vec::new();
        write_broadcast(
            &mut out,
            |o| o.extend_from_slice(b"id: ab.7\n"),
            &p,
            42,
            &flat,
        );
        let text = std::str::from_utf8(&out).unwrap();
        let data = text
            .strip_prefix("id: ab.7\nevent: broadcast\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap();
        assert!(!data.contains('\n') && !data.contains('\r'));
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["offset"], 7);
        assert_eq!(v["channel"], "c");
        assert_eq!(v["payload"]["a"], 1);
        assert!(v.get("method").is_none());
    }

    #[test]
    fn each_message_kind_has_its_event() {
        let mut out = Vec::new();
        write_notification(
            &mut out,
            br#"{"method":"join","params":{"channel":"c","user":"u"}}"#,
        );
        assert_eq!(
            out,
            b"event: join\ndata: {\"channel\":\"c\",\"user\":\"u\"}\n\n"
        );
        out.clear();
        write_notification(&mut out, b"{\"x\":1}");
        assert_eq!(out, b"event: message\ndata: {\"x\":1}\n\n");
        out.clear();
        write_close(&mut out, 4002);
        assert_eq!(out, b"event: close\ndata: {\"code\":4002}\n\n");
        out.clear();
        write_ping(&mut out);
        assert_eq!(out, b": ping\n\n");
        out.clear();
        write_response(&mut out, Some(b"\"c\""), Ok(br#"{"offset":3,"epoch":"e"}"#));
        assert_eq!(
            out,
            b"event: subscribed\ndata: {\"channel\":\"c\",\"offset\":3,\"epoch\":\"e\"}\n\n"
        );
        out.clear();
        let e = err(Code::Unavailable, "down");
        write_response(&mut out, Some(b"\"c\""), Err(&e));
        assert_eq!(
            out,
            b"event: error\ndata: {\"channel\":\"c\",\"error\":{\"code\":\"Unavailable\",\"message\":\"down\"}}\n\n"
        );
        out.clear();
        write_head(&mut out, 2000, None);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("content-type: text/event-stream\r\n"));
        assert!(text.contains("x-accel-buffering: no\r\n"));
        assert!(text.ends_with("\r\n\r\nretry: 2000\n\n"));
    }

    #[test]
    fn query_values_keep_order_and_decode() {
        let q = "channel=a&token=t&channel=b%2Fc&channel=";
        assert_eq!(query_values(q, "channel").unwrap(), ["a", "b/c", ""]);
        assert!(query_values("channel=%zz", "channel").is_err());
    }
}
