//! Minimal client side of RFC 6455, sans-IO: the upgrade request, the 101 check, masked client frames
//! out, unmasked server frames in. The load generator needs no more than this, and hand-rolling it
//! keeps the receive path to one header decode and a few byte searches per broadcast.

/// Text frame opcode.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Binary frame opcode.
pub(crate) const OP_BINARY: u8 = 0x2;
/// Continuation frame opcode.
pub(crate) const OP_CONTINUATION: u8 = 0x0;
/// Close frame opcode.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Ping frame opcode.
pub(crate) const OP_PING: u8 = 0x9;
/// Pong frame opcode.
pub(crate) const OP_PONG: u8 = 0xA;

/// The largest server frame accepted; the server's own `max_frame_bytes` default is 64 KiB, recovery
/// replays are single frames, so 16 MiB only guards against a corrupt length.
const SERVER_FRAME_BYTES_MAX: u64 = 16 << 20;

/// The `Sec-WebSocket-Key` sent by every connection. The load generator does not verify the accept
/// hash (the server is under test for throughput here, not for handshake conformance).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The HTTP upgrade request for `GET /ws`.
pub(crate) fn upgrade_request(host: &str) -> Vec<u8> {
    upgrade_request_offering(host, false)
}

/// The HTTP upgrade request for `GET /ws`, offering permessage-deflate as browsers do when
/// `compress`.
pub(crate) fn upgrade_request_offering(host: &str, compress: bool) -> Vec<u8> {
    upgrade_request_for(host, "/ws", compress)
}

/// The upgrade request of an Nchan subscriber: `GET /sub/<channel>`, the URL being the whole
/// subscription.
pub(crate) fn nchan_upgrade_request(host: &str, channel: &str) -> Vec<u8> {
    upgrade_request_for(host, &nchan_path("/sub/", channel), false)
}

/// `prefix` followed by `channel` percent-encoded for a path: `/` stays (Nchan's location captures
/// the rest of the path, slashes included, and nginx would decode `%2F` to the same channel).
pub(crate) fn nchan_path(prefix: &str, channel: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + channel.len());
    out.push_str(prefix);
    for b in channel.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The upgrade request for `GET path`.
fn upgrade_request_for(host: &str, path: &str, compress: bool) -> Vec<u8> {
    let offer = if compress {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    )
    .into_bytes()
}

thread_local! {
    /// One inflater per receive thread, reset per message (the server takes no context over).
    static INFLATER: std::cell::RefCell<flate2::Decompress> =
        std::cell::RefCell::new(flate2::Decompress::new(false));
}

/// Inflates one permessage-deflate message (RFC 7692 7.2.2: the payload plus the four bytes the
/// sender dropped) into `out`.
pub(crate) fn inflate(payload: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        out.clear();
        out.reserve(payload.len() * 4 + 64);
        for part in [payload, &[0, 0, 0xff, 0xff][..]] {
            let start = d.total_in();
            loop {
                let read = (d.total_in() - start) as usize;
                let before = (d.total_in(), d.total_out());
                d.decompress_vec(&part[read..], out, flate2::FlushDecompress::Sync)
                    .map_err(|e| format!("compressed message does not inflate: {e}"))?;
                // miniz pauses at each 32 KiB of its window, room left or not: done only when a
                // call with room left makes no progress.
                if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() {
                    if ((d.total_in() - start) as usize) < part.len() {
                        return Err("compressed message stops inflating mid-way".into());
                    }
                    break;
                }
                if out.len() > SERVER_FRAME_BYTES_MAX as usize {
                    return Err("compressed message inflates past 16 MiB".into());
                }
                if out.len() == out.capacity() {
                    out.reserve(out.capacity());
                }
            }
        }
        Ok(())
    })
}

/// The request of an SSE subscriber (SPEC 19): `GET /sse?channel=..`, the token as a Bearer
/// header (none: a public channel).
pub(crate) fn event_stream_request(host: &str, channel: &str, token: Option<&str>) -> Vec<u8> {
    let mut out = format!(
        "GET /sse?channel={} HTTP/1.1\r\nHost: {host}\r\n",
        query_escape(channel)
    );
    out.push_str("Accept: text/event-stream\r\n");
    if let Some(token) = token {
        out.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Percent-encodes all but unreserved characters (RFC 3986 2.3).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Result of looking at the bytes received after sending the upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// The head is not complete yet: read more.
    Incomplete,
    /// `101 Switching Protocols`; the head took this many bytes, frames may follow.
    Switched(usize),
    /// Anything else: the status line, for the error message.
    Refused(String),
}

/// Checks the server's answer to the upgrade request.
pub(crate) fn parse_upgrade_response(buf: &[u8]) -> Upgrade {
    parse_response_head(buf, b"101")
}

/// Checks the answer's head: `Switched` when its status is `expected` (`101` for an upgrade,
/// `200` for an event stream).
pub(crate) fn parse_response_head(buf: &[u8], expected: &[u8]) -> Upgrade {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            return Upgrade::Refused("response head over 16 KiB".into());
        }
        return Upgrade::Incomplete;
    };
    let head = &buf[..end];
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let status_line = &head[..line_end];
    let mut parts = status_line.split(|&b| b == b' ');
    let _version = parts.next();
    if parts.next() == Some(expected) {
        Upgrade::Switched(end + 4)
    } else {
        Upgrade::Refused(String::from_utf8_lossy(status_line).into_owned())
    }
}

/// A tiny xorshift generator for mask keys. Masking exists to defeat proxy cache poisoning, which
/// is no concern on loopback; the keys still vary so the server's unmasking is exercised honestly.
#[derive(Debug, Clone)]
pub(crate) struct MaskRng(u64);

impl MaskRng {
    /// A generator seeded from `seed` (zero is replaced, xorshift must not start at zero).
    pub(crate) fn new(seed: u64) -> Self {
        MaskRng(seed | 1)
    }

    /// The next mask key.
    pub(crate) fn next_key(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x as u32).to_le_bytes()
    }
}

/// Appends one complete, masked client frame (FIN set) to `out`.
pub(crate) fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends a masked close frame with `code` and no reason.
pub(crate) fn encode_close(out: &mut Vec<u8>, code: u16, mask: [u8; 4]) {
    encode_client_frame(out, OP_CLOSE, &code.to_be_bytes(), mask);
}

/// One server frame located inside a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameRef {
    /// FIN bit.
    pub(crate) fin: bool,
    /// RSV1: compressed (permessage-deflate).
    pub(crate) compressed: bool,
    /// Opcode (low four bits of the first byte).
    pub(crate) opcode: u8,
    /// Start of the payload in the buffer.
    pub(crate) payload_start: usize,
    /// End of the payload (exclusive); also the bytes the whole frame took.
    pub(crate) end: usize,
}

/// A server frame that breaks the protocol; the connection is dropped and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Servers must not mask (RFC 6455 section 5.1).
    Masked,
    /// Reserved bits set without a negotiated extension.
    ReservedBits,
    /// Length beyond [`SERVER_FRAME_BYTES_MAX`].
    TooLong(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Masked => write!(f, "server frame is masked (RFC 6455 forbids it)"),
            FrameError::ReservedBits => write!(f, "server frame has RSV bits set"),
            FrameError::TooLong(n) => {
                write!(f, "server frame of {n} bytes exceeds the 16 MiB guard")
            }
        }
    }
}

/// Decodes the frame at the start of `buf`: `Ok(None)` when more bytes are needed.
pub(crate) fn decode_server_frame(buf: &[u8]) -> Result<Option<FrameRef>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    // RSV1 is permessage-deflate's; the receive path refuses it on a connection that did not ask.
    if b0 & 0x30 != 0 {
        return Err(FrameError::ReservedBits);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (len, header) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4usize)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10usize)
        }
        n => (n as u64, 2usize),
    };
    if len > SERVER_FRAME_BYTES_MAX {
        return Err(FrameError::TooLong(len));
    }
    let end = header + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(FrameRef {
        fin: b0 & 0x80 != 0,
        compressed: b0 & 0x40 != 0,
        opcode: b0 & 0x0F,
        payload_start: header,
        end,
    }))
}

/// Appends one unmasked (server-style) frame; used by tests and by the `floor` scenario, which sends
/// frames shaped exactly like the server's broadcasts.
pub(crate) fn encode_server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Byte-string search (naive; the haystacks here are a few hundred bytes).
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    if hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_frames_are_flagged_and_inflate() {
        let long = format!(
            r#"{{"method":"broadcast","params":{{"payload":"{}"}}}}"#,
            "abc".repeat(30_000)
        );
        let text = long.as_bytes();
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut z = Vec::with_capacity(text.len());
        c.compress_vec(text, &mut z, flate2::FlushCompress::Sync)
            .unwrap();
        z.truncate(z.len() - 4);
        let mut frame = vec![0xC1, 126];
        frame.extend_from_slice(&(z.len() as u16).to_be_bytes());
        frame.extend_from_slice(&z);
        let f = decode_server_frame(&frame).unwrap().unwrap();
        assert!(f.compressed && f.fin && f.opcode == OP_TEXT);
        let mut out = Vec::new();
        inflate(&frame[f.payload_start..f.end], &mut out).unwrap();
        assert_eq!(out, text);
        // RSV2 and RSV3 still belong to no extension.
        assert_eq!(
            decode_server_frame(&[0xA1, 0]),
            Err(FrameError::ReservedBits)
        );
        assert!(upgrade_request_offering("h", true)
            .windows(18)
            .any(|w| w == b"permessage-deflate"));
    }

    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let opcode = frame[0] & 0x0F;
        assert!(frame[0] & 0x80 != 0, "FIN");
        assert!(frame[1] & 0x80 != 0, "client frames must be masked");
        let (len, mut i) = match frame[1] & 0x7F {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&frame[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        let mask = [frame[i], frame[i + 1], frame[i + 2], frame[i + 3]];
        i += 4;
        assert_eq!(frame.len(), i + len);
        let payload = frame[i..]
            .iter()
            .enumerate()
            .map(|(j, b)| b ^ mask[j & 3])
            .collect();
        (opcode, payload)
    }

    #[test]
    fn client_frames_are_masked_and_round_trip_at_every_length_form() {
        let mut rng = MaskRng::new(7);
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_client_frame(&mut out, OP_TEXT, &payload, rng.next_key());
            let (op, back) = unmask(&out);
            assert_eq!(op, OP_TEXT);
            assert_eq!(back, payload, "len {len}");
        }
    }

    #[test]
    fn known_masked_frame_matches_rfc_example() {
        // RFC 6455 section 5.7: a masked "Hello" with key 37 fa 21 3d.
        let mut out = Vec::new();
        encode_client_frame(&mut out, OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(
            out,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn close_frame_carries_code() {
        let mut out = Vec::new();
        encode_close(&mut out, 1000, [1, 2, 3, 4]);
        let (op, payload) = unmask(&out);
        assert_eq!(op, OP_CLOSE);
        assert_eq!(payload, 1000u16.to_be_bytes());
    }

    #[test]
    fn server_frames_decode_incrementally() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536] {
            let payload = vec![b'a'; len];
            let mut buf = Vec::new();
            encode_server_frame(&mut buf, OP_TEXT, &payload);
            buf.extend_from_slice(&[0x89, 0x00]); // a ping right behind it
            let frame_end = buf.len() - 2;
            for cut in [0, 1, frame_end - 1] {
                assert_eq!(
                    decode_server_frame(&buf[..cut]),
                    Ok(None),
                    "len {len} cut {cut}"
                );
            }
            let f = decode_server_frame(&buf).unwrap().unwrap();
            assert!(f.fin);
            assert_eq!(f.opcode, OP_TEXT);
            assert_eq!(&buf[f.payload_start..f.end], &payload[..]);
            let g = decode_server_frame(&buf[f.end..]).unwrap().unwrap();
            assert_eq!(g.opcode, OP_PING);
            assert_eq!(g.end, 2);
        }
    }

    #[test]
    fn masked_or_reserved_server_frames_are_errors() {
        assert_eq!(
            decode_server_frame(&[0x81, 0x81, 0, 0, 0, 0, 0]),
            Err(FrameError::Masked)
        );
        // RSV2 and RSV3 belong to no extension; RSV1 is permessage-deflate's, reported as
        // compressed (the receive path refuses it where compression was not asked for).
        for b0 in [0xA1, 0x91] {
            assert_eq!(
                decode_server_frame(&[b0, 0x00]),
                Err(FrameError::ReservedBits)
            );
        }
        assert!(
            decode_server_frame(&[0xC1, 0x00])
                .unwrap()
                .unwrap()
                .compressed
        );
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(
            decode_server_frame(&huge),
            Err(FrameError::TooLong(_))
        ));
    }

    #[test]
    fn upgrade_response_parsing() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00";
        assert_eq!(parse_upgrade_response(&ok[..20]), Upgrade::Incomplete);
        assert_eq!(parse_upgrade_response(ok), Upgrade::Switched(ok.len() - 2));
        let no = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_upgrade_response(no),
            Upgrade::Refused("HTTP/1.1 503 Service Unavailable".into())
        );
        let req = String::from_utf8(upgrade_request("127.0.0.1:1")).unwrap();
        assert!(req.starts_with("GET /ws HTTP/1.1\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }

    #[test]
    fn nchan_subscribes_by_url() {
        let req =
            String::from_utf8(nchan_upgrade_request("127.0.0.1:9", "lt-1-2/fanout/0")).unwrap();
        assert!(
            req.starts_with("GET /sub/lt-1-2/fanout/0 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"),
            "{req}"
        );
        assert!(req.contains("Upgrade: websocket\r\n") && req.ends_with("\r\n\r\n"));
        assert!(!req.contains("permessage-deflate"));
        assert_eq!(
            nchan_path("/pub/", "a b?#%/é"),
            "/pub/a%20b%3F%23%25/%C3%A9"
        );
    }

    #[test]
    fn find_works() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"xxxx", b"y"), None);
        assert_eq!(find(b"y", b"y"), Some(0));
    }
}
