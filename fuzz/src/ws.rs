//! WebSocket frames: a structured generator of client frame sequences, a plain reference
//! decoder written from RFC 6455 (no tungstenite), and a driver that feeds `wire::frame::Decoder`
//! the way the session does, in chunks, so the two can be compared.

use arbitrary::Arbitrary;
use broadcaster::wire::frame::{Decoder, Message};

/// What a client's byte stream amounts to, message by message, up to the first violation or
/// close (after which the server reads nothing more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
    Violation(u16),
}

/// Close codes a peer may send (RFC 6455 7.4.1, 7.4.2 and the IANA registry: 1012-1014 are
/// registered since; 1004-1006 and 1015 must never be sent).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The reference decoder: the whole stream at once. Checks happen in the order a server can
/// make them as bytes arrive: everything the header tells (opcode, reserved bits, mask, control
/// frame rules, size) as soon as the header is complete; the rest once the payload is there.
pub fn reference(stream: &[u8], max: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut pos = 0;
    // The open fragmented message: is it text, and its bytes so far.
    let mut open: Option<(bool, Vec<u8>)> = None;
    loop {
        let rest = &stream[pos..];
        if rest.len() < 2 {
            return out;
        }
        let fin = rest[0] & 0x80 != 0;
        let rsv = rest[0] & 0x70;
        let op = rest[0] & 0x0f;
        let masked = rest[1] & 0x80 != 0;
        let (len, mut hdr) = match rest[1] & 0x7f {
            126 => match rest.get(2..4) {
                Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
                None => return out,
            },
            127 => match rest.get(2..10) {
                Some(b) => (u64::from_be_bytes(b.try_into().unwrap()), 10),
                None => return out,
            },
            n => (n as u64, 2),
        };
        let mask = if masked {
            match rest.get(hdr..hdr + 4) {
                Some(m) => {
                    hdr += 4;
                    Some([m[0], m[1], m[2], m[3]])
                }
                None => return out,
            }
        } else {
            None
        };
        let control = op >= 8;
        // Reserved opcode or bits, or an unmasked client frame (RFC 6455 5.1-5.2).
        let malformed = matches!(op, 3..=7 | 11..=15) || rsv != 0 || mask.is_none();
        // Control frames: at most 125 bytes and never fragmented (5.5).
        let bad_control = control && (len > 125 || !fin);
        let violation = if malformed || bad_control {
            Some(1002)
        } else if len > max as u64 {
            Some(1009)
        } else {
            None
        };
        if let Some(code) = violation {
            out.push(Event::Violation(code));
            return out;
        }
        let len = len as usize;
        let Some(payload) = rest.get(hdr..hdr + len) else {
            return out;
        };
        let mask = mask.unwrap();
        let payload: Vec<u8> = payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        pos += hdr + len;
        let event = match op {
            9 => Event::Ping(payload),
            10 => Event::Pong,
            8 => {
                let e = match payload.len() {
                    0 => Event::Close(None),
                    1 => Event::Violation(1002),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close_code_allowed(code) {
                            Event::Violation(1002)
                        } else if std::str::from_utf8(&payload[2..]).is_err() {
                            Event::Violation(1007)
                        } else {
                            Event::Close(Some(code))
                        }
                    }
                };
                out.push(e);
                return out;
            }
            0 => {
                let Some((text, mut data)) = open.take() else {
                    out.push(Event::Violation(1002));
                    return out;
                };
                if data.len() + payload.len() > max {
                    out.push(Event::Violation(1009));
                    return out;
                }
                data.extend_from_slice(&payload);
                if !fin {
                    open = Some((text, data));
                    continue;
                }
                complete(text, data)
            }
            _ => {
                if open.is_some() {
                    out.push(Event::Violation(1002));
                    return out;
                }
                let text = op == 1;
                if !fin {
                    open = Some((text, payload));
                    continue;
                }
                complete(text, payload)
            }
        };
        let stop = matches!(event, Event::Violation(_));
        out.push(event);
        if stop {
            return out;
        }
    }
}

fn complete(text: bool, data: Vec<u8>) -> Event {
    if !text {
        Event::Binary(data)
    } else if std::str::from_utf8(&data).is_ok() {
        Event::Text(data)
    } else {
        Event::Violation(1007)
    }
}

/// Feeds `stream` to a `Decoder` in chunks of the given sizes (the rest in one last chunk),
/// exactly as the connection's read loop does: append, decode until it needs more, drop what
/// was consumed. Asserts the decoder's own invariants along the way.
pub fn drive(stream: &[u8], chunks: &[usize], max: usize) -> Vec<Event> {
    let mut decoder = Decoder::new(max);
    let mut input: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut sizes = chunks.iter().copied().chain(std::iter::once(usize::MAX));
    while fed < stream.len() {
        let n = sizes
            .next()
            .unwrap_or(usize::MAX)
            .max(1)
            .min(stream.len() - fed);
        input.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        let mut pos = 0;
        loop {
            let available = input.len() - pos;
            match decoder.decode(&mut input[pos..]) {
                Ok(None) => break,
                Err(v) => {
                    assert!(
                        matches!(v.code, 1002 | 1007 | 1009),
                        "decoder closes with {} ({})",
                        v.code,
                        v.reason
                    );
                    out.push(Event::Violation(v.code));
                    return out;
                }
                Ok(Some((message, used))) => {
                    assert!(used >= 2, "a frame is at least two bytes; consumed {used}");
                    assert!(used <= available, "consumed {used} of {available} bytes");
                    pos += used;
                    let Some(message) = message else { continue };
                    let event = match message {
                        Message::Text(t) => {
                            assert!(std::str::from_utf8(t).is_ok(), "Text is not UTF-8");
                            assert!(t.len() <= max, "Text of {} bytes over {max}", t.len());
                            Event::Text(t.to_vec())
                        }
                        Message::Binary(b) => {
                            assert!(b.len() <= max, "Binary of {} bytes over {max}", b.len());
                            Event::Binary(b.to_vec())
                        }
                        Message::Ping(p) => {
                            assert!(p.len() <= 125, "Ping of {} bytes", p.len());
                            Event::Ping(p.to_vec())
                        }
                        Message::Pong => Event::Pong,
                        Message::Close(code) => {
                            if let Some(c) = code {
                                assert!(close_code_allowed(c), "Close({c}) accepted");
                            }
                            out.push(Event::Close(code));
                            return out;
                        }
                    };
                    out.push(event);
                }
            }
        }
        input.drain(..pos);
        // What stays buffered is one incomplete frame: never more than its header plus the
        // largest payload the limit allows (the bound the connection relies on).
        assert!(
            input.len() <= 14 + max,
            "{} bytes buffered with a limit of {max}",
            input.len()
        );
    }
    out
}

// ---- structured generator ----

/// One client frame, described rather than encoded, so mutations stay mostly well-formed.
#[derive(Debug, Arbitrary)]
pub struct FrameSpec {
    /// Low nibble: opcode. Bit 4: clear FIN. Bits 5-7: reserved bits. Biased to sane values
    /// by `encode`.
    pub flags: u8,
    pub kind: Kind,
    pub payload: Payload,
    /// 0: minimal length encoding; 1: 16-bit; 2: 64-bit; 3: declared length off by `lie`.
    pub length_form: u8,
    pub lie: i8,
    /// 0 leaves the frame unmasked (a violation); anything else masks it.
    pub masked: u8,
    pub mask: [u8; 4],
}

#[derive(Debug, Arbitrary)]
pub enum Kind {
    /// Use the opcode and flags as given (any nibble, reserved ones included).
    Raw,
    /// A final text frame.
    Text,
    /// A fragmented text message start, continuation or end.
    TextStart,
    Continue,
    ContinueFinal,
    Binary,
    Ping,
    Pong,
    Close,
}

#[derive(Debug, Arbitrary)]
pub enum Payload {
    Bytes(Vec<u8>),
    Utf8(String),
    /// A long run of one byte, for the size limits.
    Repeat(u8, u16),
    /// A close payload: code and reason.
    Close(u16, String),
    CloseRaw(u16, Vec<u8>),
    Heartbeat(u32),
}

impl FrameSpec {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let payload: Vec<u8> = match &self.payload {
            Payload::Bytes(b) => b.clone(),
            Payload::Utf8(s) => s.as_bytes().to_vec(),
            Payload::Repeat(b, n) => vec![*b; *n as usize],
            Payload::Close(code, reason) => {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                p
            }
            Payload::CloseRaw(code, reason) => {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason);
                p
            }
            Payload::Heartbeat(id) => format!(r#"{{"id":{id},"method":"heartbeat"}}"#).into_bytes(),
        };
        let (fin, op) = match self.kind {
            Kind::Raw => (self.flags & 0x10 == 0, self.flags & 0x0f),
            Kind::Text => (true, 1),
            Kind::TextStart => (false, 1),
            Kind::Continue => (false, 0),
            Kind::ContinueFinal => (true, 0),
            Kind::Binary => (true, 2),
            Kind::Ping => (true, 9),
            Kind::Pong => (true, 10),
            Kind::Close => (true, 8),
        };
        // Reserved bits only on Raw frames, and there only one time in eight.
        let rsv = if matches!(self.kind, Kind::Raw) && self.flags >> 5 == 7 {
            self.mask[0] & 0x70
        } else {
            0
        };
        out.push(if fin { 0x80 } else { 0 } | rsv | op);
        let masked = self.masked != 0;
        let m = if masked { 0x80 } else { 0 };
        let n = payload.len();
        match self.length_form % 4 {
            1 => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            2 => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
            3 => {
                // A declared length that differs from the bytes that follow (or a huge one).
                let declared = (n as i64 + self.lie as i64).max(0) as u64;
                let declared = if self.lie == i8::MIN {
                    u64::MAX - n as u64
                } else {
                    declared
                };
                if declared < 126 {
                    out.push(m | declared as u8);
                } else if declared <= 0xffff {
                    out.push(m | 126);
                    out.extend_from_slice(&(declared as u16).to_be_bytes());
                } else {
                    out.push(m | 127);
                    out.extend_from_slice(&declared.to_be_bytes());
                }
            }
            _ => {
                if n < 126 {
                    out.push(m | n as u8);
                } else if n <= 0xffff {
                    out.push(m | 126);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(m | 127);
                    out.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
        }
        if masked {
            out.extend_from_slice(&self.mask);
            out.extend(
                payload
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ self.mask[i % 4]),
            );
        } else {
            out.extend_from_slice(&payload);
        }
    }
}

#[derive(Debug, Arbitrary)]
pub enum Stream {
    /// Bytes as they come.
    Raw(Vec<u8>),
    /// A sequence of described frames, possibly followed by junk.
    Frames(Vec<FrameSpec>, Vec<u8>),
}

/// The message limit, from a few typical values or anything small.
pub fn limit(selector: u16) -> usize {
    match selector % 8 {
        0 => 65536,
        1 => 1024,
        2 => 256,
        3 => 125,
        4 => 0,
        _ => selector as usize,
    }
}

#[derive(Debug, Arbitrary)]
pub struct Case {
    pub stream: Stream,
    /// Sizes of the reads that deliver the stream.
    pub chunks: Vec<u16>,
}

impl Case {
    pub fn bytes(&self) -> Vec<u8> {
        match &self.stream {
            Stream::Raw(b) => b.clone(),
            Stream::Frames(frames, junk) => {
                let mut out = Vec::new();
                for f in frames {
                    f.encode(&mut out);
                }
                out.extend_from_slice(junk);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let spec = FrameSpec {
            flags: (first & 0x0f) | if first & 0x80 == 0 { 0x10 } else { 0 },
            kind: Kind::Raw,
            payload: Payload::Bytes(payload.to_vec()),
            length_form: 0,
            lie: 0,
            masked: 1,
            mask: [1, 2, 3, 4],
        };
        let mut out = Vec::new();
        spec.encode(&mut out);
        out
    }

    #[test]
    fn the_reference_decodes_the_rfc_examples() {
        let mut s = frame(0x01, b"hel");
        s.extend(frame(0x89, b"p"));
        s.extend(frame(0x80, b"lo"));
        s.extend(frame(0x88, &[0x03, 0xe8, b'x']));
        s.extend(frame(0x81, b"after close"));
        assert_eq!(
            reference(&s, 1024),
            vec![
                Event::Ping(b"p".to_vec()),
                Event::Text(b"hello".to_vec()),
                Event::Close(Some(1000))
            ]
        );
        for cut in 0..s.len() {
            let chunks: Vec<usize> = vec![cut, 1, 3, 2];
            assert_eq!(
                drive(&s, &chunks, 1024),
                reference(&s, 1024),
                "chunks {chunks:?}"
            );
        }
        assert_eq!(
            reference(&frame(0x81, &[0xff]), 10),
            vec![Event::Violation(1007)]
        );
        assert_eq!(
            reference(&frame(0x81, &[b'a'; 11]), 10),
            vec![Event::Violation(1009)]
        );
        assert_eq!(
            reference(&frame(0x83, b""), 10),
            vec![Event::Violation(1002)]
        );
        assert_eq!(
            reference(&frame(0x00, b""), 10),
            vec![Event::Violation(1002)]
        );
    }
}
