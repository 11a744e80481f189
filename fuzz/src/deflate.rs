//! deflate_frames: `wire::frame::Decoder` with permessage-deflate on. A message is either
//! libFuzzer's bytes taken as compressed data, or a generated text compressed at some level and
//! cut into fragments; both are masked and framed as a client would. The decoder's answer must
//! equal an independent inflate (flate2's `Read` adapter) of the same bytes: the exact text when
//! it inflates within the limit and is UTF-8, 1009 beyond the limit, 1007 for text that is not
//! UTF-8. Corrupt data must give a close or a text within the limit. Never a panic, never more
//! than the limit held.

use arbitrary::Unstructured;
use broadcaster::wire::frame::{Decoder, Message};
use flate2::{Compress, Compression, FlushCompress};
use std::io::Read;

pub fn deflate_frames(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let (Ok(limit), Ok(generated), Ok(pieces)) = (
        u.int_in_range(1..=70_000usize),
        u.arbitrary::<bool>(),
        u.int_in_range(1..=4usize),
    ) else {
        return;
    };
    let compressed = if generated {
        let Ok(level) = u.int_in_range(0..=9u32) else {
            return;
        };
        let Ok(text) = u.arbitrary::<String>() else {
            return;
        };
        // Repeated, so that small inputs inflate past small limits (a bomb in miniature).
        let Ok(times) = u.int_in_range(1..=200usize) else {
            return;
        };
        deflated(text.repeat(times).as_bytes(), level)
    } else {
        u.bytes(u.len()).unwrap_or_default().to_vec()
    };
    let frames = frame(&compressed, pieces);
    let got = decode(&frames, limit);
    let want = reference(&compressed, limit);
    if want == Err(1007) && !generated {
        // Corrupt data. miniz's inflater (the server's) reads a distance reaching before the
        // message's start as zeros where the reference stops, so it may inflate further: any
        // close, or a text within the limit (`decode` checked both), is a right answer.
        return;
    }
    let show = |r: &Result<Vec<u8>, u16>| match r {
        Ok(t) => format!("a text of {} bytes", t.len()),
        Err(code) => format!("close {code}"),
    };
    assert!(
        got == want,
        "decoder: {}, reference: {} (limit {limit}, {} compressed bytes, generated {generated})",
        show(&got),
        show(&want),
        compressed.len()
    );
}

/// Raw deflate with a sync flush, its last four bytes dropped (RFC 7692 7.2.1).
fn deflated(data: &[u8], level: u32) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    loop {
        let read = c.total_in() as usize;
        if c.compress_vec(&data[read..], &mut out, FlushCompress::Sync)
            .is_err()
        {
            return Vec::new();
        }
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    out.truncate(out.len().saturating_sub(4));
    out
}

/// `payload` as a compressed text message in `pieces` masked frames (RSV1 on the first).
fn frame(payload: &[u8], pieces: usize) -> Vec<u8> {
    let size = payload.len().div_ceil(pieces).max(1);
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[][..]]
    } else {
        payload.chunks(size).collect()
    };
    let mut out = Vec::new();
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    for (i, chunk) in chunks.iter().enumerate() {
        let fin = i + 1 == chunks.len();
        let opcode = if i == 0 { 0x1 } else { 0x0 };
        let rsv1 = if i == 0 { 0x40 } else { 0 };
        out.push(u8::from(fin) << 7 | rsv1 | opcode);
        let n = chunk.len();
        if n < 126 {
            out.push(0x80 | n as u8);
        } else if n <= 0xffff {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(chunk.iter().enumerate().map(|(j, b)| b ^ mask[j % 4]));
    }
    out
}

/// What the decoder made of the frames: the text, or the close code.
fn decode(frames: &[u8], limit: usize) -> Result<Vec<u8>, u16> {
    let mut decoder = Decoder::new(limit);
    decoder.inflate = true;
    let mut input = frames.to_vec();
    let mut pos = 0;
    loop {
        match decoder.decode(&mut input[pos..]) {
            Ok(None) => panic!("the whole message was given, yet the decoder wants more"),
            Err(close) => return Err(close.code),
            Ok(Some((None, used))) => pos += used,
            Ok(Some((Some(Message::Text(t)), _))) => {
                assert!(t.len() <= limit, "{} bytes over the limit {limit}", t.len());
                return Ok(t.to_vec());
            }
            Ok(Some((Some(other), _))) => panic!("a text message decoded as {other:?}"),
        }
    }
}

/// The reference: flate2's streaming reader over the data and the restored tail, read to at
/// most one byte past the limit.
fn reference(compressed: &[u8], limit: usize) -> Result<Vec<u8>, u16> {
    // The frame header bounds the compressed size first.
    if compressed.len() > limit {
        return Err(1009);
    }
    let mut stream = compressed.to_vec();
    stream.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    let mut reader = flate2::read::DeflateDecoder::new(&stream[..]).take(limit as u64 + 1);
    let result = reader.read_to_end(&mut out);
    if out.len() > limit {
        return Err(1009);
    }
    match result {
        Ok(_) => {}
        // The stream has no final block, so a complete message ends in an early EOF.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(_) => return Err(1007),
    }
    std::str::from_utf8(&out).map_err(|_| 1007u16)?;
    Ok(out)
}
