//! Just enough JSON for the receive path: the fields of a broadcast the load generator checks
//! (`seq`, `offset`, and the send time `t` and number `n` inside our own payload), and the few fields of
//! a response (`requestId`, `error`, `offset`, `epoch`, `recovered`, `rewound`). A full JSON parse
//! per delivered message would cost more than the server's own work per message; these byte
//! searches cost ~100 ns.
//!
//! The payload is ours, `{"t":<unix nanos>,"n":<k>,"pad":"xxxx"}`, so none of its keys or values can be
//! mistaken for an envelope key; `t` and `n` are looked up after `"payload":` only.

use crate::ws::find;

/// What one text frame from the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// A `broadcast` notification.
    Broadcast(Broadcast),
    /// A response to request `request_id` (`None` when the server echoed `null`).
    Response(Response),
    /// Any other frame (e.g. a notification the load generator does not know).
    Other,
}

/// The fields of a broadcast the load generator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Broadcast {
    /// Per-subscription sequence, from 1.
    pub(crate) seq: u64,
    /// Per-channel offset, from 1.
    pub(crate) offset: u64,
    /// The payload's `t`: the scheduled send time, unix nanoseconds (0 if the payload lacks it).
    pub(crate) sent_unix_ns: u64,
    /// The payload's `n`: the publication's number in the run.
    pub(crate) n: u64,
}

/// The fields of a response the load generator uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Response {
    /// `requestId` when it is a number.
    pub(crate) request_id: Option<u64>,
    /// The error object's `code`, when the response is an error.
    pub(crate) error_code: Option<String>,
    /// `result.offset` (subscribe, publish).
    pub(crate) offset: Option<u64>,
    /// `result.epoch` (subscribe).
    pub(crate) epoch: Option<String>,
    /// `result.recovered` (subscribe with `since`).
    pub(crate) recovered: Option<bool>,
    /// `result.rewound` (subscribe with `rewind`, or on a channel whose rule has
    /// `rewind_default`): the publications replayed right after the result.
    pub(crate) rewound: Option<u64>,
}

/// Classifies and extracts one server text frame.
pub(crate) fn parse_message(text: &[u8]) -> Message {
    // Fast path: the server writes `method` first for notifications; fall back to a search.
    let is_broadcast = text.starts_with(b"{\"method\":\"broadcast\"")
        || (find(text, b"\"requestId\"").is_none() && find(text, b"\"broadcast\"").is_some());
    if is_broadcast {
        return match parse_broadcast(text) {
            Some(b) => Message::Broadcast(b),
            None => Message::Other,
        };
    }
    if find(text, b"\"requestId\"").is_some() {
        return Message::Response(parse_response(text));
    }
    Message::Other
}

/// Extracts `seq`, `offset`, and the payload's `t` and `n` from a broadcast.
fn parse_broadcast(text: &[u8]) -> Option<Broadcast> {
    let payload_at = find(text, b"\"payload\":");
    // Envelope keys are searched outside the payload: before it, and after it when the server
    // put the payload first.
    let (envelope, rest) = match payload_at {
        Some(p) => (&text[..p], Some(&text[p..])),
        None => (text, None),
    };
    let seq = u64_field(envelope, b"\"seq\":")
        .or_else(|| rest.and_then(|r| u64_after_payload(r, b"\"seq\":")))?;
    let offset = u64_field(envelope, b"\"offset\":")
        .or_else(|| rest.and_then(|r| u64_after_payload(r, b"\"offset\":")))?;
    let (sent_unix_ns, n) = match rest {
        Some(p) => {
            let obj = payload_object(p);
            (
                u64_field(obj, b"\"t\":").unwrap_or(0),
                u64_field(obj, b"\"n\":").unwrap_or(0),
            )
        }
        None => (0, 0),
    };
    Some(Broadcast {
        seq,
        offset,
        sent_unix_ns,
        n,
    })
}

/// A message from Nchan, which sends the body of each publication as it was posted: our own
/// payload, `{"t":..,"n":..,...}`, with no envelope. Nchan numbers nothing that the load generator
/// sees, so `seq` and `offset` are both derived from `n`: the publication's number within its
/// channel (see [`channel_seq`]); None when `n` is missing (not a payload of ours).
pub(crate) fn parse_raw_payload(text: &[u8], channels: u64) -> Option<Broadcast> {
    // `t` and `n` come first; the search stops before the padding or the scoreboard rows.
    let head = &text[..text.len().min(64)];
    let n = u64_field(head, b"\"n\":")?;
    let seq = channel_seq(n, channels);
    Some(Broadcast {
        seq,
        offset: seq,
        sent_unix_ns: u64_field(head, b"\"t\":").unwrap_or(0),
        n,
    })
}

/// Publication `n` of a run (numbered from 0 over all channels) as the number within its channel
/// (from 1): the publisher goes round robin, publication `n` to channel `n % channels`, so that
/// channel's earlier ones are `n % channels`, `n % channels + channels`, ... For Nchan this stands
/// for the offset Broadcaster returns, on the publisher's side (the highest per channel) as on the
/// subscribers' (loss, duplicates and order checked on it).
pub(crate) fn channel_seq(n: u64, channels: u64) -> u64 {
    n / channels.max(1) + 1
}

/// A broadcast's `channel` (looked up outside the payload, like `seq` and `offset`).
pub(crate) fn broadcast_channel(text: &[u8]) -> Option<&[u8]> {
    match find(text, b"\"payload\":") {
        Some(p) => string_field(&text[..p], b"\"channel\":").or_else(|| {
            let rest = &text[p..];
            let obj = payload_object(rest);
            string_field(&rest[obj.len()..], b"\"channel\":")
        }),
        None => string_field(text, b"\"channel\":"),
    }
}

/// The payload object starting at `"payload":` up to its closing brace (our payloads hold no
/// nested objects or braces in strings).
fn payload_object(from_key: &[u8]) -> &[u8] {
    match from_key.iter().position(|&b| b == b'}') {
        Some(end) => &from_key[..end + 1],
        None => from_key,
    }
}

/// A key searched for after the payload object (for a server that orders the payload first).
fn u64_after_payload(from_key: &[u8], key: &[u8]) -> Option<u64> {
    let obj = payload_object(from_key);
    u64_field(&from_key[obj.len()..], key)
}

/// Extracts the response fields.
fn parse_response(text: &[u8]) -> Response {
    let request_id = u64_field(text, b"\"requestId\":");
    let error_code = find(text, b"\"error\":")
        .and_then(|p| string_field(&text[p..], b"\"code\":"))
        .map(|s| String::from_utf8_lossy(s).into_owned());
    Response {
        request_id,
        error_code,
        offset: u64_field(text, b"\"offset\":"),
        epoch: string_field(text, b"\"epoch\":").map(|s| String::from_utf8_lossy(s).into_owned()),
        recovered: bool_field(text, b"\"recovered\":"),
        rewound: u64_field(text, b"\"rewound\":"),
    }
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// The unsigned integer after `key` (which includes the colon), whitespace allowed.
pub(crate) fn u64_field(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(text, key)?;
    parse_u64_prefix(skip_ws(&text[at + key.len()..]))
}

/// Parses the leading decimal digits of `s` (none, or overflow: `None`).
fn parse_u64_prefix(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut any = false;
    for &b in s {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add((b - b'0') as u64)?;
        any = true;
    }
    any.then_some(v)
}

/// The string after `key` (no escapes expected in the fields read here).
fn string_field<'a>(text: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = find(text, key)?;
    let s = skip_ws(&text[at + key.len()..]);
    let s = s.strip_prefix(b"\"")?;
    let end = s.iter().position(|&b| b == b'"')?;
    Some(&s[..end])
}

fn bool_field(text: &[u8], key: &[u8]) -> Option<bool> {
    let at = find(text, key)?;
    let s = skip_ws(&text[at + key.len()..]);
    if s.starts_with(b"true") {
        Some(true)
    } else if s.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

/// What fills a payload after its send time and number.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum PayloadShape {
    /// One string of `x`: compresses to almost nothing.
    #[default]
    Pad,
    /// Rows of a contest scoreboard (rank, user, score, penalty, per-problem results) that change
    /// with `n`: compresses about as well as a real one (omegaUp's are 66-88 kB).
    Scoreboard,
}

/// Like [`build_payload`], filled as `shape` says; a scoreboard is at least `target_bytes` long
/// (whole rows).
pub(crate) fn build_shaped_payload(
    out: &mut Vec<u8>,
    sent_unix_ns: u64,
    n: u64,
    target_bytes: usize,
    shape: PayloadShape,
) {
    if shape == PayloadShape::Pad {
        return build_payload(out, sent_unix_ns, n, target_bytes);
    }
    let start = out.len();
    out.extend_from_slice(b"{\"t\":");
    push_u64(out, sent_unix_ns);
    out.extend_from_slice(b",\"n\":");
    push_u64(out, n);
    out.extend_from_slice(b",\"rows\":[");
    let mut i = 0u64;
    while out.len() - start + 2 < target_bytes {
        if i > 0 {
            out.push(b',');
        }
        // Scores drift with n, so consecutive boards differ as a live contest's do.
        let score = (i * 37 + n * 11) % 1000;
        out.extend_from_slice(b"{\"rank\":");
        push_u64(out, i + 1);
        out.extend_from_slice(b",\"user\":\"contestant_");
        push_u64(out, (i * 7919) % 100_000);
        out.extend_from_slice(b"\",\"score\":");
        push_u64(out, score);
        out.extend_from_slice(b",\"penalty\":");
        push_u64(out, (i * 13 + n) % 500);
        out.extend_from_slice(b",\"problems\":[");
        for p in 0..8 {
            if p > 0 {
                out.push(b',');
            }
            push_u64(out, (i + p + n) % 3 * 50);
        }
        out.extend_from_slice(b"]}");
        i += 1;
    }
    out.extend_from_slice(b"]}");
}

/// Builds our payload: `{"t":T,"n":N,"pad":"xx..."}`, padded so the whole JSON value is
/// `target_bytes` long when that is reachable (it never goes below the unpadded length).
pub(crate) fn build_payload(out: &mut Vec<u8>, sent_unix_ns: u64, n: u64, target_bytes: usize) {
    let start = out.len();
    out.extend_from_slice(b"{\"t\":");
    push_u64(out, sent_unix_ns);
    out.extend_from_slice(b",\"n\":");
    push_u64(out, n);
    out.extend_from_slice(b",\"pad\":\"");
    let used = out.len() - start + 2;
    let pad = target_bytes.saturating_sub(used);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

/// Appends the decimal form of `v`.
pub(crate) fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `s` as a JSON string literal (channel names and tokens here need no escapes, but be safe).
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    out.extend_from_slice(quoted.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = br#"{"method":"broadcast","params":{"id":"01HZX","seq":17,"offset":42,"createTime":"2025-01-01T00:00:00.000Z","channel":"lt/fanout","event":"m","payload":{"t":1735689600123456789,"n":41,"pad":"xxxx"}}}"#;

    #[test]
    fn broadcast_fields_are_extracted() {
        let m = parse_message(SAMPLE);
        assert_eq!(
            m,
            Message::Broadcast(Broadcast {
                seq: 17,
                offset: 42,
                sent_unix_ns: 1_735_689_600_123_456_789,
                n: 41
            })
        );
    }

    #[test]
    fn scoreboard_payloads_are_json_with_their_time_and_number() {
        let mut out = Vec::new();
        build_shaped_payload(&mut out, 123, 7, 64_000, PayloadShape::Scoreboard);
        assert!(out.len() >= 64_000 && out.len() < 64_200, "{}", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!((v["t"].as_u64(), v["n"].as_u64()), (Some(123), Some(7)));
        assert!(v["rows"].as_array().unwrap().len() > 500);
        let mut next = Vec::new();
        build_shaped_payload(&mut next, 123, 8, 64_000, PayloadShape::Scoreboard);
        assert_ne!(out, next, "boards change with n");
        let mut pad = Vec::new();
        build_shaped_payload(&mut pad, 123, 7, 100, PayloadShape::Pad);
        assert_eq!(pad.len(), 100);
    }

    #[test]
    fn broadcast_with_other_key_order_and_spaces() {
        let text = br#"{"params": {"payload": {"n": 3, "t": 99, "pad": "x"}, "offset": 5, "seq": 2, "channel":"c"}, "method": "broadcast"}"#;
        let b = parse_broadcast(text).unwrap();
        assert_eq!((b.seq, b.offset, b.sent_unix_ns, b.n), (2, 5, 99, 3));
        assert!(matches!(parse_message(text), Message::Broadcast(_)));
    }

    #[test]
    fn payload_keys_do_not_shadow_envelope_keys() {
        // A payload that itself contains "seq" and "offset" must not be read as the envelope's.
        let text = br#"{"method":"broadcast","params":{"seq":1,"offset":2,"payload":{"t":5,"n":6,"seq":99}}}"#;
        let b = parse_broadcast(text).unwrap();
        assert_eq!((b.seq, b.offset, b.sent_unix_ns, b.n), (1, 2, 5, 6));
    }

    #[test]
    fn broadcast_channel_is_found_outside_the_payload() {
        assert_eq!(broadcast_channel(SAMPLE), Some(&b"lt/fanout"[..]));
        let after =
            br#"{"params":{"payload":{"t":1,"n":2,"pad":"x"},"channel":"a/b","seq":1,"offset":1}}"#;
        assert_eq!(broadcast_channel(after), Some(&b"a/b"[..]));
        let none = br#"{"method":"broadcast","params":{"seq":1,"offset":1}}"#;
        assert_eq!(broadcast_channel(none), None);
    }

    #[test]
    fn broadcast_without_seq_is_other() {
        assert_eq!(
            parse_message(br#"{"method":"broadcast","params":{"offset":1}}"#),
            Message::Other
        );
    }

    #[test]
    fn responses_are_extracted() {
        let ok = br#"{"requestId":2,"result":{"subscriptionId":"s1","timestamp":"x","offset":7,"epoch":"ab12","recovered":true}}"#;
        let r = match parse_message(ok) {
            Message::Response(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.request_id, Some(2));
        assert_eq!(r.error_code, None);
        assert_eq!(r.offset, Some(7));
        assert_eq!(r.epoch.as_deref(), Some("ab12"));
        assert_eq!(r.recovered, Some(true));
        assert_eq!(r.rewound, None);

        let rewound = br#"{"requestId":2,"result":{"subscriptionId":"s1","timestamp":"x","offset":9,"epoch":"ab12","rewound":1}}"#;
        let r = parse_response(rewound);
        assert_eq!((r.offset, r.recovered, r.rewound), (Some(9), None, Some(1)));

        let err = br#"{"requestId":1,"error":{"code":"Unauthenticated","message":"bad"}}"#;
        let r = parse_response(err);
        assert_eq!(r.request_id, Some(1));
        assert_eq!(r.error_code.as_deref(), Some("Unauthenticated"));
        assert_eq!(
            parse_response(br#"{"requestId":null,"error":{"code":"X"}}"#).request_id,
            None
        );
    }

    #[test]
    fn payload_is_built_to_size_and_parses_back() {
        for target in [0usize, 40, 64, 200] {
            let mut p = Vec::new();
            build_payload(&mut p, 1_735_689_600_123_456_789, 12345, target);
            if target >= 64 {
                assert_eq!(p.len(), target);
            }
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["t"].as_u64(), Some(1_735_689_600_123_456_789));
            assert_eq!(v["n"].as_u64(), Some(12345));
            let mut frame =
                br#"{"method":"broadcast","params":{"seq":1,"offset":1,"payload":"#.to_vec();
            frame.extend_from_slice(&p);
            frame.extend_from_slice(b"}}");
            let b = parse_broadcast(&frame).unwrap();
            assert_eq!(b.sent_unix_ns, 1_735_689_600_123_456_789);
            assert_eq!(b.n, 12345);
        }
    }

    #[test]
    fn raw_payloads_give_time_and_channel_sequence() {
        let mut p = Vec::new();
        build_payload(&mut p, 1_735_689_600_123_456_789, 7, 64);
        let b = parse_raw_payload(&p, 1).unwrap();
        assert_eq!(
            (b.seq, b.offset, b.sent_unix_ns, b.n),
            (8, 8, 1_735_689_600_123_456_789, 7)
        );
        // Three channels round robin: publication 7 is channel 1's third (1, 4, 7).
        let b = parse_raw_payload(&p, 3).unwrap();
        assert_eq!((b.seq, b.offset), (3, 3));
        let mut board = Vec::new();
        build_shaped_payload(&mut board, 5, 0, 4000, PayloadShape::Scoreboard);
        let b = parse_raw_payload(&board, 2).unwrap();
        assert_eq!((b.seq, b.sent_unix_ns, b.n), (1, 5, 0));
        assert_eq!(parse_raw_payload(br#"{"pad":"x"}"#, 1), None);
        assert_eq!(parse_raw_payload(b"", 1), None);
        let untimed = parse_raw_payload(br#"{"n":0}"#, 1).unwrap();
        assert_eq!((untimed.seq, untimed.sent_unix_ns), (1, 0));
        // Every channel's publications number 1, 2, 3.. whatever the channel count.
        for channels in [1u64, 2, 5] {
            for ch in 0..channels {
                let seqs: Vec<u64> = (0..20)
                    .filter(|n| n % channels == ch)
                    .map(|n| channel_seq(n, channels))
                    .collect();
                assert!(
                    seqs.iter().enumerate().all(|(i, &s)| s == i as u64 + 1),
                    "{seqs:?}"
                );
            }
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64_prefix(b"123,"), Some(123));
        assert_eq!(parse_u64_prefix(b",1"), None);
        assert_eq!(parse_u64_prefix(b"99999999999999999999999"), None);
        let mut v = Vec::new();
        push_u64(&mut v, 0);
        v.push(b' ');
        push_u64(&mut v, u64::MAX);
        assert_eq!(v, b"0 18446744073709551615");
    }
}
