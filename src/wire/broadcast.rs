//! A broadcast notification as every subscriber gets it: encoded once per publication as two
//! halves around the per-subscription `seq`, then spliced per subscriber with no allocation.

use crate::wire::frame;
use crate::wire::reply::{write_json_string, write_u64};

/// The two halves of a broadcast message around the per-subscription `seq`, built once per
/// publication and shared by every subscriber on every shard.
pub(crate) fn broadcast_parts(
    id: &str,
    offset: u64,
    create_time: &str,
    channel: &str,
    event: &str,
    from: Option<&str>,
    payload: &[u8],
) -> (Box<[u8]>, Box<[u8]>) {
    let mut prefix = Vec::with_capacity(48 + id.len());
    prefix.extend_from_slice(b"{\"method\":\"broadcast\",\"params\":{\"id\":");
    write_json_string(&mut prefix, id);
    prefix.extend_from_slice(b",\"seq\":");
    let from_len = from.map_or(0, |f| f.len() + 8);
    let mut suffix =
        Vec::with_capacity(80 + channel.len() + event.len() + from_len + payload.len());
    suffix.extend_from_slice(b",\"offset\":");
    write_u64(&mut suffix, offset);
    suffix.extend_from_slice(b",\"createTime\":");
    write_json_string(&mut suffix, create_time);
    suffix.extend_from_slice(b",\"channel\":");
    write_json_string(&mut suffix, channel);
    suffix.extend_from_slice(b",\"event\":");
    write_json_string(&mut suffix, event);
    // Set by the server from the publisher's token (SPEC 16), never from the request.
    if let Some(from) = from {
        suffix.extend_from_slice(b",\"from\":");
        suffix.extend_from_slice(from.as_bytes());
    }
    suffix.extend_from_slice(b",\"payload\":");
    suffix.extend_from_slice(payload);
    suffix.extend_from_slice(b"}}");
    (prefix.into_boxed_slice(), suffix.into_boxed_slice())
}

/// Appends one broadcast frame for a subscriber: header, prefix, its `seq`, suffix. This is the
/// only work done per subscriber per publication: no allocation, two short copies.
#[inline]
pub fn write_broadcast_frame(out: &mut Vec<u8>, prefix: &[u8], seq: u64, suffix: &[u8]) {
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq).as_bytes();
    let len = prefix.len() + seq.len() + suffix.len();
    out.reserve(len + 10);
    frame::write_header(out, frame::TEXT, len);
    out.extend_from_slice(prefix);
    out.extend_from_slice(seq);
    out.extend_from_slice(suffix);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_frames_splice_seq() {
        let from = Some(r#"{"user":"al"}"#);
        let (p, s) = broadcast_parts(
            "n-1",
            7,
            "2026-01-01T00:00:00.000Z",
            "c\"",
            "e",
            from,
            b"[1]",
        );
        let mut out = Vec::new();
        write_broadcast_frame(&mut out, &p, 42, &s);
        assert_eq!(out[1], 126, "a 16-bit length follows");
        let body = &out[4..];
        assert_eq!(u16::from_be_bytes([out[2], out[3]]) as usize, body.len());
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["params"]["seq"], 42);
        assert_eq!(v["params"]["offset"], 7);
        assert_eq!(v["params"]["channel"], "c\"");
        assert_eq!(v["params"]["payload"], serde_json::json!([1]));
        assert_eq!(v["params"]["from"]["user"], "al");
        let text = std::str::from_utf8(body).unwrap();
        assert!(text.find("\"from\"") < text.find("\"payload\""));
        assert!(text.find("\"event\"") < text.find("\"from\""));
    }
}
