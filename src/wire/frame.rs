//! Sans-IO WebSocket framing for the server side of RFC 6455: bytes in, messages or a close code
//! out. Header parsing is tungstenite's `FrameHeader` (encoding too, in the test that checks
//! ours, which is written by hand for fan-out); the rules a server must
//! enforce (masking, reserved bits, control frame limits, fragmentation, UTF-8) are here.

use crate::error::close::{INVALID_DATA, PROTOCOL, TOO_BIG};
use crate::error::Close;
use crate::wire::deflate;
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// One complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Valid UTF-8, already unmasked and reassembled.
    Text(&'a [u8]),
    /// A binary message (the protocol answers InvalidArgument).
    Binary(&'a [u8]),
    /// A ping and its payload, to echo in a pong.
    Ping(&'a [u8]),
    /// A pong (the connection is alive; nothing to do).
    Pong,
    /// The code the client sent (None for an empty close frame).
    Close(Option<u16>),
}

/// Reassembles fragmented messages; holds no buffer while no message is in progress.
pub struct Decoder {
    max_message_bytes: usize,
    /// permessage-deflate was negotiated: RSV1 on a message's first frame means compressed.
    pub inflate: bool,
    /// The message being reassembled: whether it is text, whether it is compressed.
    fragments: Option<(bool, bool, Vec<u8>)>,
    /// The last reassembled (or inflated) message, kept so the returned slice can borrow it.
    assembled: Vec<u8>,
}

impl Decoder {
    /// A decoder of messages of at most `max_message_bytes` (`limits.max_frame_bytes`).
    pub fn new(max_message_bytes: usize) -> Decoder {
        Decoder {
            max_message_bytes,
            inflate: false,
            fragments: None,
            assembled: Vec::new(),
        }
    }

    /// Decodes the next message from `buf`, unmasking it in place. Returns the message and the
    /// bytes consumed, `Ok(None)` when more bytes are needed, or the violation to close with.
    /// Frames that complete nothing (a non-final fragment) return `Message::Pong`-like progress
    /// through the `consumed` count with `None` as message.
    pub fn decode<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> Result<Option<(Option<Message<'a>>, usize)>, Close> {
        if !self.assembled.is_empty() {
            self.assembled = Vec::new();
        }
        let mut cursor = Cursor::new(&buf[..]);
        let (header, length) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(_) => return Err(Close::new(PROTOCOL, "reserved opcode")),
        };
        let mask = check_header(&header, length, self.max_message_bytes, self.inflate)?;
        let start = cursor.position() as usize;
        let end = start + length as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let payload = &mut buf[start..end];
        unmask(payload, mask);
        let payload: &'a [u8] = payload;
        let message = match header.opcode {
            OpCode::Control(Control::Ping) => Some(Message::Ping(payload)),
            OpCode::Control(Control::Pong) => Some(Message::Pong),
            OpCode::Control(Control::Close) => Some(Message::Close(parse_close(payload)?)),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(Close::new(PROTOCOL, "reserved opcode"))
            }
            OpCode::Data(Data::Continue) if header.rsv1 => {
                return Err(Close::new(PROTOCOL, "RSV1 set on a continuation frame"))
            }
            OpCode::Data(Data::Continue) => self.continuation(payload, header.is_final)?,
            OpCode::Data(kind) => {
                let kind = (kind == Data::Text, header.rsv1);
                self.start(kind, payload, header.is_final)?
            }
        };
        Ok(Some((message, end)))
    }
}

impl Decoder {
    /// A continuation frame: appended to the message it continues, which completes when
    /// `last`.
    fn continuation<'a>(
        &'a mut self,
        payload: &[u8],
        last: bool,
    ) -> Result<Option<Message<'a>>, Close> {
        let Some((text, compressed, mut data)) = self.fragments.take() else {
            return Err(Close::new(PROTOCOL, "continuation frame without a message"));
        };
        if data.len() + payload.len() > self.max_message_bytes {
            return Err(Close::new(TOO_BIG, "message larger than max_frame_bytes"));
        }
        data.extend_from_slice(payload);
        if !last {
            self.fragments = Some((text, compressed, data));
            return Ok(None);
        }
        if compressed {
            deflate::inflate(&data, self.max_message_bytes, &mut self.assembled)?;
        } else {
            self.assembled = data;
        }
        Ok(Some(complete(text, &self.assembled)?))
    }

    /// The first frame of a data message (text or not, compressed or not): the whole message
    /// when `last`.
    fn start<'a>(
        &'a mut self,
        (text, compressed): (bool, bool),
        payload: &'a [u8],
        last: bool,
    ) -> Result<Option<Message<'a>>, Close> {
        if self.fragments.is_some() {
            let why = "new message before the fragmented one ended";
            return Err(Close::new(PROTOCOL, why));
        }
        if !last {
            self.fragments = Some((text, compressed, payload.to_vec()));
            return Ok(None);
        }
        if !compressed {
            return Ok(Some(complete(text, payload)?));
        }
        // The compressed size was bounded by the header; the inflated size is bounded here.
        deflate::inflate(payload, self.max_message_bytes, &mut self.assembled)?;
        Ok(Some(complete(text, &self.assembled)?))
    }
}

/// The rules of RFC 6455 5.1-5.5 a frame header must keep: no reserved bits without an
/// extension (RSV1 on data frames with permessage-deflate, `inflate`), masked, control frames
/// short and unfragmented, within the size limit. Returns the mask.
fn check_header(
    header: &FrameHeader,
    length: u64,
    max: usize,
    inflate: bool,
) -> Result<[u8; 4], Close> {
    let is_control = matches!(header.opcode, OpCode::Control(_));
    if (header.rsv1 && (!inflate || is_control)) || header.rsv2 || header.rsv3 {
        let why = "reserved bits set without an extension";
        return Err(Close::new(PROTOCOL, why));
    }
    let Some(mask) = header.mask else {
        return Err(Close::new(PROTOCOL, "client frames must be masked"));
    };
    if is_control && (length > 125 || !header.is_final) {
        let why = "control frames are at most 125 bytes, unfragmented";
        return Err(Close::new(PROTOCOL, why));
    }
    if length > max as u64 {
        return Err(Close::new(TOO_BIG, "message larger than max_frame_bytes"));
    }
    Ok(mask)
}

fn complete(text: bool, data: &[u8]) -> Result<Message<'_>, Close> {
    if !text {
        return Ok(Message::Binary(data));
    }
    match simdutf8::basic::from_utf8(data) {
        Ok(_) => Ok(Message::Text(data)),
        Err(_) => Err(Close::new(INVALID_DATA, "text message is not valid UTF-8")),
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, Close> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Close::new(PROTOCOL, "close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            // RFC 6455 7.4: codes a peer may send. 1004-1006 and 1015 are reserved.
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(Close::new(PROTOCOL, "invalid close code"));
            }
            if simdutf8::basic::from_utf8(&payload[2..]).is_err() {
                return Err(Close::new(INVALID_DATA, "close reason is not valid UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

/// XORs the client's mask over the payload, eight bytes at a time.
pub(crate) fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        // Chunks of eight keep the mask phase, so the remainder starts at phase 0.
        *b ^= mask[i & 3];
    }
}

/// Appends a server (unmasked) frame header for a final frame of `opcode` carrying `len` bytes.
///
/// Written by hand, not with tungstenite's `FrameHeader::format`: fan-out writes one header per
/// subscriber (its `seq` changes the length), and `format` goes through `io::Write` a field at a
/// time (2.1% of the server's CPU at max rate, more than the rest of the frame). A test checks
/// both agree for every length class.
#[inline]
pub(crate) fn write_header(out: &mut Vec<u8>, opcode: OpCode, len: usize) {
    let first = 0x80 | u8::from(opcode);
    if len < 126 {
        out.extend_from_slice(&[first, len as u8]);
    } else if let Ok(short) = u16::try_from(len) {
        let [hi, lo] = short.to_be_bytes();
        out.extend_from_slice(&[first, 126, hi, lo]);
    } else {
        out.extend_from_slice(&[first, 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

pub(crate) const TEXT: OpCode = OpCode::Data(Data::Text);

/// Appends one text frame.
pub(crate) fn write_text(out: &mut Vec<u8>, body: &[u8]) {
    write_header(out, TEXT, body.len());
    out.extend_from_slice(body);
}

/// Appends a close frame with `code` and a short reason (cut to fit a control frame).
pub(crate) fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    write_header(out, OpCode::Control(Control::Close), 2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

pub(crate) fn write_ping(out: &mut Vec<u8>) {
    write_header(out, OpCode::Control(Control::Ping), 0);
}

pub(crate) fn write_pong(out: &mut Vec<u8>, payload: &[u8]) {
    write_header(out, OpCode::Control(Control::Pong), payload.len());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_tungstenite_for_every_length_class() {
        let opcodes = [
            TEXT,
            OpCode::Control(Control::Close),
            OpCode::Control(Control::Pong),
        ];
        for opcode in opcodes {
            for len in [
                0,
                1,
                125,
                126,
                127,
                65535,
                65536,
                1 << 20,
                u32::MAX as usize + 1,
            ] {
                let mut ours = Vec::new();
                write_header(&mut ours, opcode, len);
                let mut theirs = Vec::new();
                FrameHeader {
                    opcode,
                    ..FrameHeader::default()
                }
                .format(len as u64, &mut theirs)
                .unwrap();
                assert_eq!(ours, theirs, "{opcode:?} {len}");
            }
        }
    }

    fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n < 65536 => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<String>, Close> {
        let mut buf = bytes.to_vec();
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some((msg, used)) = d.decode(&mut buf[pos..])? {
            if let Some(msg) = msg {
                out.push(format!("{msg:?}"));
            }
            pos += used;
        }
        Ok(out)
    }

    #[test]
    fn unmask_matches_the_plain_version() {
        let mask = [1, 2, 3, 250];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let plain: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, plain, "len {len}");
        }
    }

    #[test]
    fn text_frames_decode_and_truncation_waits() {
        let frame = client_frame(0x81, b"{\"method\":\"heartbeat\"}", true);
        for cut in 0..frame.len() {
            let mut d = Decoder::new(1024);
            let mut part = frame[..cut].to_vec();
            assert_eq!(d.decode(&mut part).unwrap(), None, "cut {cut}");
        }
        let mut d = Decoder::new(1024);
        assert_eq!(
            decode_all(&mut d, &frame).unwrap(),
            vec!["Text([123, 34, 109, 101, 116, 104, 111, 100, 34, 58, 34, 104, 101, 97, 114, 116, 98, 101, 97, 116, 34, 125])"]
        );
    }

    #[test]
    fn rules_of_rfc6455_are_enforced() {
        let cases: &[(Vec<u8>, u16)] = &[
            (client_frame(0x81, b"x", false), 1002),
            (client_frame(0xC1, b"x", true), 1002),
            (client_frame(0x83, b"x", true), 1002),
            (client_frame(0x8B, b"", true), 1002),
            (client_frame(0x89, &[0; 126], true), 1002),
            (client_frame(0x09, b"", true), 1002),
            (client_frame(0x80, b"x", true), 1002),
            (client_frame(0x81, &[0xff, 0xfe], true), 1007),
            (client_frame(0x81, &[b'a'; 2000], true), 1009),
            (client_frame(0x88, &[3, 0xed], true), 1002),
            (client_frame(0x88, &[3], true), 1002),
            (client_frame(0x88, &[3, 0xe8, 0xff], true), 1007),
        ];
        for (bytes, code) in cases {
            let mut d = Decoder::new(1024);
            assert_eq!(
                decode_all(&mut d, bytes).unwrap_err().code,
                *code,
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn fragments_reassemble_around_control_frames() {
        let mut bytes = client_frame(0x01, b"hel", true);
        bytes.extend(client_frame(0x89, b"p", true));
        bytes.extend(client_frame(0x00, b"lo ", true));
        bytes.extend(client_frame(0x80, "wörld".as_bytes(), true));
        let mut d = Decoder::new(1024);
        let got = decode_all(&mut d, &bytes).unwrap();
        assert_eq!(got[0], "Ping([112])");
        assert_eq!(got[1], format!("Text({:?})", "hello wörld".as_bytes()));
        assert!(d.fragments.is_none());
        // A message whose fragments together exceed the limit.
        let mut bytes = client_frame(0x01, &[b'a'; 600], true);
        bytes.extend(client_frame(0x80, &[b'a'; 600], true));
        assert_eq!(
            decode_all(&mut Decoder::new(1024), &bytes)
                .unwrap_err()
                .code,
            1009
        );
        // UTF-8 split across fragments is valid once joined; invalid once joined is 1007.
        let e = "é".as_bytes();
        let mut bytes = client_frame(0x01, &e[..1], true);
        bytes.extend(client_frame(0x80, &e[1..], true));
        assert!(decode_all(&mut Decoder::new(1024), &bytes).is_ok());
        let mut bytes = client_frame(0x01, &e[..1], true);
        bytes.extend(client_frame(0x80, b"a", true));
        assert_eq!(
            decode_all(&mut Decoder::new(1024), &bytes)
                .unwrap_err()
                .code,
            1007
        );
    }

    #[test]
    fn server_frames_have_the_right_headers() {
        let mut out = Vec::new();
        write_text(&mut out, &[b'x'; 200]);
        assert_eq!(&out[..4], &[0x81, 126, 0, 200]);
        out.clear();
        write_close(&mut out, 4003, "slow consumer");
        assert_eq!(&out[..4], &[0x88, 15, 0x0f, 0xa3]);
    }
}
