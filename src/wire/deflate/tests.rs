use super::*;
use crate::error::close::{INVALID_DATA, TOO_BIG};
use crate::wire::broadcast::broadcast_parts;
use std::io::Read;

/// A reference inflater (flate2's `Read` adapter): the frame's payload plus the tail RFC 7692
/// drops, as a client restores it.
fn reference_inflate(payload: &[u8]) -> Vec<u8> {
    let mut stream = payload.to_vec();
    stream.extend_from_slice(&SYNC_TAIL);
    let mut out = Vec::new();
    let mut d = flate2::read::DeflateDecoder::new(&stream[..]);
    // The stream has no final block: reading ends with an early-EOF error after the data.
    let _ = d.read_to_end(&mut out);
    out
}

fn deflated(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&SYNC_TAIL));
    out.truncate(out.len() - 4);
    out
}

fn accepts(offers: &str) -> bool {
    negotiate(offers).is_some_and(|a| a.compresses())
}

fn response(offers: &str) -> Option<String> {
    let mut out = Vec::new();
    negotiate(offers)?.write_response(&mut out);
    Some(String::from_utf8(out).unwrap())
}

#[test]
fn offers_are_read_per_rfc_7692() {
    // Chromium's and Firefox's offer.
    assert!(accepts("permessage-deflate; client_max_window_bits"));
    assert!(accepts("permessage-deflate"));
    assert!(accepts(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    ));
    assert!(accepts(
        "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=9"
    ));
    assert_eq!(
        response("permessage-deflate; client_max_window_bits").as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    // A limit on our window is echoed to accept it; below 15 bits broadcasts go uncompressed.
    assert!(accepts("permessage-deflate; server_max_window_bits=15"));
    assert!(response("permessage-deflate; server_max_window_bits=15")
        .unwrap()
        .ends_with("; server_max_window_bits=15"));
    let small = negotiate("permessage-deflate; server_max_window_bits=9").unwrap();
    assert!(!small.compresses());
    assert_eq!(small.server_window, Some(9));
    // The first acceptable offer wins.
    assert_eq!(
        negotiate("permessage-deflate; bogus, permessage-deflate; server_max_window_bits=10"),
        Some(Accepted {
            server_window: Some(10)
        })
    );
    for declined in [
        "",
        "x-webkit-deflate-frame",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=08",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; unknown",
        "permessage-deflate-x",
    ] {
        assert_eq!(negotiate(declined), None, "{declined:?}");
    }
}

#[test]
fn seq_is_spliced_into_one_compressed_suffix() {
    let payload = format!(
        "{{\"rows\":[{}]}}",
        (0..400)
            .map(|i| format!("{{\"user\":\"u{i}\",\"score\":{}}}", i * 7))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (prefix, suffix) = broadcast_parts(
        "pub-1",
        42,
        "2026-12-07T00:00:00.000Z",
        "scoreboard",
        "",
        None,
        payload.as_bytes(),
    );
    let z = compress(&suffix, 6).expect("a scoreboard compresses");
    assert!(
        z.len() * 3 < suffix.len(),
        "{} of {}",
        z.len(),
        suffix.len()
    );
    // Many subscribers, each its own seq, all from the one compressed suffix.
    for seq in [0, 1, 9, 10, 99_999, u64::MAX] {
        let mut frame = Vec::new();
        write_broadcast_frame(&mut frame, &prefix, seq, &z);
        assert_eq!(frame[0], 0xC1, "FIN, RSV1, text");
        let (len, at) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), at + len);
        let text = reference_inflate(&frame[at..]);
        let mut plain = prefix.to_vec();
        plain.extend_from_slice(seq.to_string().as_bytes());
        plain.extend_from_slice(&suffix);
        assert_eq!(text, plain, "seq {seq}");
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["params"]["seq"], seq);
        // Our own inflater reads what we send too.
        let mut ours = Vec::new();
        inflate(&frame[at..], 1 << 20, &mut ours).unwrap();
        assert_eq!(ours, plain);
    }
}

#[test]
fn incompressible_or_small_suffixes_stay_plain() {
    assert!(compress(b",\"offset\":1,\"payload\":1}}", 6).is_none());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    assert!(compress(&noise, 6).is_none());
    // The compressor is reset between uses: the same input gives the same bytes.
    let text = "abc".repeat(1000);
    assert_eq!(compress(text.as_bytes(), 6), compress(text.as_bytes(), 6));
    assert!(compress(text.as_bytes(), 1).is_some());
}

#[test]
fn inbound_messages_inflate_under_the_bound() {
    let text = "{\"method\":\"publish\",\"pad\":\"".to_string() + &"x".repeat(5000) + "\"}";
    let z = deflated(text.as_bytes());
    let mut out = Vec::new();
    inflate(&z, text.len(), &mut out).unwrap();
    assert_eq!(out, text.as_bytes());
    // One byte over the bound: 1009.
    let err = inflate(&z, text.len() - 1, &mut out).unwrap_err();
    assert_eq!(err.code, TOO_BIG);
    // A bomb: 64 MiB of zeros in ~64 KB is refused at the bound, not inflated whole.
    let bomb = deflated(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 128 << 10);
    let err = inflate(&bomb, 65_536, &mut out).unwrap_err();
    assert_eq!(err.code, TOO_BIG);
    assert!(out.capacity() <= 4 * 65_536, "{}", out.capacity());
    // Not deflate data: 1007. (0xff starts a block of the reserved type 11.)
    let err = inflate(&[0xff, 0xff, 0xff], 65_536, &mut out).unwrap_err();
    assert_eq!(err.code, INVALID_DATA);
    // An empty message is the empty stored block alone.
    inflate(&[0x00], 10, &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn a_message_inflating_past_a_window_is_read_whole() {
    // Found by the deflate_frames fuzz target: 82 bytes that inflate to 65,564 (zlib agrees).
    let z = hex("ecc13101000000c2a02aeb9fd20cfe400100000000001d000000000000000000000000000000240000000000000000000000000000080000003e00008000000000000000ff00000000002e00000000000000");
    let mut out = Vec::new();
    inflate(&z, 68_401, &mut out).unwrap();
    assert_eq!(out.len(), 65_564);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn suffixes_past_several_windows_compress_whole() {
    // Larger than miniz's 32 KiB window many times over, varied enough to need many blocks.
    let rows: Vec<String> = (0..20_000u64)
        .map(|i| {
            format!(
                "{{\"user\":\"u{}\",\"score\":{}}}",
                i * 7919 % 100_003,
                i % 977
            )
        })
        .collect();
    let suffix = format!(",\"payload\":[{}]}}}}", rows.join(","));
    for level in [1, 6, 9] {
        let z = compress(suffix.as_bytes(), level).expect("compresses");
        assert_eq!(reference_inflate(&z), suffix.as_bytes(), "level {level}");
        let mut ours = Vec::new();
        inflate(&z, suffix.len(), &mut ours).unwrap();
        assert_eq!(ours, suffix.as_bytes(), "level {level}");
    }
}
