//! JSON texts as RFC 8259 defines them: parsed with simd-json, and the byte spans of members
//! found in the original text.
//!
//! simd-json refuses some valid texts: numbers outside i64/u64 and f64 (snowflake ids, decimals
//! for money, `1e400`), escapes of unpaired UTF-16 surrogates (`"\ud800"`, which
//! `JSON.stringify` writes for a string cut inside an emoji), and nesting deeper than
//! `DEPTH_MAX`. The server never needs the value of a number it relays, so when simd-json
//! refuses a text, serde_json (which checks the grammar without converting numbers or
//! decoding escapes) decides whether it is JSON at all; if it is, the refused tokens are
//! replaced in a copy by tokens of the same length that simd-json reads, and that copy is
//! parsed. Byte offsets are the same in both, so the spans the caller takes from the original
//! text (a payload, an id) are the client's bytes, untouched.

use simd_json::BorrowedValue;

/// Deepest nesting of arrays and objects in one text, the request's own envelope included
/// (simd-json's bound: its value builders recurse once per level).
pub const DEPTH_MAX: usize = simd_json::DEFAULT_MAX_DEPTH;

/// Why a text could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JsonError {
    /// Not one JSON text (RFC 8259); serde_json's description, with line and column.
    Invalid(String),
    /// Valid, but nested deeper than `DEPTH_MAX`.
    TooDeep,
}

impl JsonError {
    /// The message for a client, `what` naming the text ("request", "body").
    pub(crate) fn message(&self, what: &str) -> String {
        match self {
            JsonError::Invalid(why) => format!("{what} is not valid JSON: {why}"),
            JsonError::TooDeep => {
                format!(
                    "{what} nests arrays and objects deeper than {DEPTH_MAX} levels (the limit)"
                )
            }
        }
    }
}

/// Reusable buffers for `parse` (simd-json parses in place). One per shard, not per connection.
#[derive(Default)]
pub struct Scratch {
    fast: Vec<u8>,
    /// The copy with replaced tokens, on the rare texts simd-json refuses.
    slow: Vec<u8>,
    /// simd-json's working buffers, made at the first parse: made per parse they were four
    /// allocations (one aligned and zeroed) for each request. They keep the size of the largest
    /// text parsed, a few times `max_frame_bytes` at most, once per shard.
    buffers: Option<simd_json::Buffers>,
}

impl Scratch {
    pub(crate) const fn new() -> Scratch {
        Scratch {
            fast: Vec::new(),
            slow: Vec::new(),
            buffers: None,
        }
    }
}

/// A parsed text.
pub(crate) struct Parsed<'s> {
    pub(crate) value: BorrowedValue<'s>,
    /// Byte offsets of the escapes of unpaired surrogates (`\udXXX`): `value` holds U+FFFD in
    /// their place, so a caller that decodes a string holding one must refuse it rather than
    /// use another text than the client sent. Empty for nearly every text.
    pub(crate) unpaired: Vec<usize>,
}

impl Parsed<'_> {
    /// True when an unpaired surrogate escape lies within `start..end` of the text.
    pub(crate) fn unpaired_within(&self, (start, end): (usize, usize)) -> bool {
        self.unpaired.iter().any(|&at| at >= start && at < end)
    }
}

/// Parses one JSON text. Every text RFC 8259 allows is read, except nesting beyond `DEPTH_MAX`.
pub(crate) fn parse<'s>(text: &[u8], scratch: &'s mut Scratch) -> Result<Parsed<'s>, JsonError> {
    let Scratch {
        fast,
        slow,
        buffers,
    } = scratch;
    let buffers = buffers.get_or_insert_with(simd_json::Buffers::default);
    fast.clear();
    fast.extend_from_slice(text);
    let refused = match simd_json::to_borrowed_value_with_buffers(fast, buffers) {
        Ok(value) => {
            return Ok(Parsed {
                value,
                unpaired: Vec::new(),
            })
        }
        Err(e) => e,
    };
    validate(text)?;
    if *refused.error() == simd_json::ErrorType::DepthLimitExceeded {
        return Err(JsonError::TooDeep);
    }
    slow.clear();
    slow.extend_from_slice(text);
    let unpaired = replace_unreadable(slow);
    match simd_json::to_borrowed_value_with_buffers(slow, buffers) {
        Ok(value) => Ok(Parsed { value, unpaired }),
        Err(e) if *e.error() == simd_json::ErrorType::DepthLimitExceeded => Err(JsonError::TooDeep),
        // Not expected (the fuzz targets check it): a valid text neither parser reads.
        Err(e) => Err(JsonError::Invalid(format!(
            "the server cannot read this valid JSON ({e}); please report it"
        ))),
    }
}

/// Checks that `text` is one JSON text (RFC 8259), with no limit on depth or number size:
/// what a client may send as a payload. Used where a text is relayed without being read.
pub(crate) fn validate(text: &[u8]) -> Result<(), JsonError> {
    // serde_json checks the grammar of strings but not their UTF-8.
    if simdutf8::basic::from_utf8(text).is_err() {
        return Err(JsonError::Invalid("not UTF-8".into()));
    }
    // IgnoredAny walks the text without recursion, without converting numbers and without
    // decoding \u escapes.
    serde_json::from_slice::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| JsonError::Invalid(e.to_string()))
}

/// In a valid text, replaces every number simd-json may refuse with `0.0` padded with spaces
/// (a float, so a field that must be a whole number refuses it) and every unpaired surrogate
/// escape with `\ufffd`. Returns the offsets of the replaced escapes.
fn replace_unreadable(t: &mut [u8]) -> Vec<usize> {
    let mut unpaired = Vec::new();
    let mut i = 0;
    while i < t.len() {
        match t[i] {
            b'"' => i = replace_in_string(t, i + 1, &mut unpaired),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < t.len() && matches!(t[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                if !is_plain_integer(&t[start..i]) && i - start >= 3 {
                    t[start..start + 3].copy_from_slice(b"0.0");
                    t[start + 3..i].fill(b' ');
                }
            }
            _ => i += 1,
        }
    }
    unpaired
}

/// A number token without fraction or exponent that fits i64 or u64: simd-json reads those
/// exactly. Every other number is replaced, so no float edge of simd-json's can refuse it.
fn is_plain_integer(token: &[u8]) -> bool {
    if token.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return false;
    }
    let text = std::str::from_utf8(token).unwrap_or("");
    text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok()
}

/// Walks the string whose first byte after the quote is at `i`; returns the offset after its
/// closing quote.
fn replace_in_string(t: &mut [u8], mut i: usize, unpaired: &mut Vec<usize>) -> usize {
    while i < t.len() {
        match t[i] {
            b'"' => return i + 1,
            b'\\' if t.get(i + 1) == Some(&b'u') => {
                let unit = hex4(t, i + 2);
                let high = unit.is_some_and(|u| (0xD800..0xDC00).contains(&u));
                let low = |at: usize| {
                    t.get(at) == Some(&b'\\')
                        && t.get(at + 1) == Some(&b'u')
                        && hex4(t, at + 2).is_some_and(|u| (0xDC00..0xE000).contains(&u))
                };
                if high && low(i + 6) {
                    i += 12;
                } else if unit.is_some_and(|u| (0xD800..0xE000).contains(&u)) {
                    unpaired.push(i);
                    t[i + 2..i + 6].copy_from_slice(b"fffd");
                    i += 6;
                } else {
                    i += 6;
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    t.len()
}

fn hex4(t: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(t.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

// ---- spans: where a member's value is in the original text ----
//
// simd-json validates the text and reads the small fields; two values must travel as the client
// wrote them, `id` (echoed as `requestId`) and `payload` (relayed byte for byte), so this small
// scanner finds byte spans in the original text, which `parse` has proven to be valid JSON.

/// Byte range `[start, end)` in the original text.
pub(crate) type Span = (usize, usize);

pub(crate) fn skip_ws(t: &[u8], mut i: usize) -> usize {
    while i < t.len() && matches!(t[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at the quote at `i`.
fn skip_string(t: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < t.len() {
        match t[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    t.len()
}

/// End (exclusive) of the value starting at `i`.
fn skip_value(t: &[u8], i: usize) -> usize {
    match t.get(i) {
        Some(b'"') => skip_string(t, i),
        Some(b'{') | Some(b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < t.len() {
                match t[j] {
                    b'"' => {
                        j = skip_string(t, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            t.len()
        }
        Some(_) => {
            let mut j = i;
            while j < t.len() && !matches!(t[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            j
        }
        None => i,
    }
}

/// The (key, value) spans of the object starting at `i`; keys without their quotes.
pub(crate) fn members(t: &[u8], i: usize) -> Vec<(Span, Span)> {
    let mut out = Vec::new();
    if t.get(i) != Some(&b'{') {
        return out;
    }
    let mut j = skip_ws(t, i + 1);
    while j < t.len() && t[j] == b'"' {
        let key_end = skip_string(t, j);
        let key = (j + 1, key_end.saturating_sub(1).max(j + 1));
        let colon = skip_ws(t, key_end);
        let v = skip_ws(t, colon + 1);
        let v_end = skip_value(t, v);
        out.push((key, (v, v_end)));
        j = skip_ws(t, v_end);
        if t.get(j) == Some(&b',') {
            j = skip_ws(t, j + 1);
        } else {
            break;
        }
    }
    out
}

/// The first of `names` that occurs more than once among the keys of `spans`.
pub(crate) fn repeated<'n>(t: &[u8], spans: &[(Span, Span)], names: &[&'n str]) -> Option<&'n str> {
    let mut seen = 0u32;
    for (k, _) in spans {
        for (i, name) in names.iter().enumerate() {
            if key_is(t, *k, name) {
                if seen & (1 << i) != 0 {
                    return Some(name);
                }
                seen |= 1 << i;
            }
        }
    }
    None
}

fn key_is(t: &[u8], k: Span, name: &str) -> bool {
    let Some(raw) = t.get(k.0..k.1) else {
        return false;
    };
    if raw.contains(&b'\\') {
        let quoted = k.0.checked_sub(1).and_then(|a| t.get(a..k.1 + 1));
        quoted
            .and_then(|q| serde_json::from_slice::<String>(q).ok())
            .as_deref()
            == Some(name)
    } else {
        raw == name.as_bytes()
    }
}

/// The value span of the member named `name` (keys may be written with escapes). Callers have
/// refused repeated members, so the first is the only one and the one simd-json validated.
pub(crate) fn find(t: &[u8], spans: &[(Span, Span)], name: &str) -> Option<Span> {
    spans
        .iter()
        .find_map(|(k, v)| key_is(t, *k, name).then_some(*v))
}

pub(crate) fn span_of<'a>(t: &'a [u8], spans: &[(Span, Span)], name: &str) -> Option<&'a [u8]> {
    find(t, spans, name).and_then(|(a, b)| t.get(a..b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use simd_json::prelude::*;

    fn read(text: &str) -> Result<(String, Vec<usize>), JsonError> {
        let mut scratch = Scratch::default();
        let parsed = parse(text.as_bytes(), &mut scratch)?;
        Ok((parsed.value.encode(), parsed.unpaired))
    }

    fn nest(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn every_valid_shape_is_read() {
        for text in [
            r#"{"big":123456789012345678901234567890}"#,
            r#"{"big":-123456789012345678901234567890}"#,
            r#"{"big":18446744073709551616,"small":18446744073709551615}"#,
            r#"{"e":1e400,"f":-1e400,"g":1e-400,"h":1.7976931348623159e308}"#,
            r#"{"e":1E+2,"f":0e0,"g":-0,"h":-0.0,"i":123456789012345678901234567890e-10}"#,
            r#"{"s":"\ud800","t":"\udc00\ud800","u":"\ud83d\ude00","v":"a\ud83d"}"#,
            r#"{"s":"\u0000\/\b\f\n\r\t\"\\","t":"é😀"}"#,
        ] {
            assert!(read(text).is_ok(), "{text}");
        }
        assert!(read(&nest(DEPTH_MAX)).is_ok());
        let long = format!(
            r#"{{"s":"{}","n":{}}}"#,
            "x".repeat(70_000),
            "9".repeat(800)
        );
        assert!(read(&long).is_ok());
    }

    #[test]
    fn replaced_tokens_keep_every_offset() {
        let text = r#"{"a":123456789012345678901234567890,"b":[1e400],"c":"x\ud800y","d":7}"#;
        let (_, unpaired) = read(text).unwrap();
        assert_eq!(unpaired, vec![text.find("\\ud800").unwrap()]);
        let mut copy = text.as_bytes().to_vec();
        replace_unreadable(&mut copy);
        assert_eq!(copy.len(), text.len());
        let copy = String::from_utf8(copy).unwrap();
        assert!(copy.starts_with(r#"{"a":0.0 "#), "{copy}");
        assert!(copy.contains(r#""b":[0.0  ]"#), "{copy}");
        assert!(copy.contains(r#""c":"x\ufffdy""#), "{copy}");
        assert!(copy.ends_with(r#""d":7}"#), "{copy}");
        // A pair stays; a low surrogate alone and a high one before a non-surrogate do not.
        let (_, unpaired) = read(r#"["\ud83d\ude00","\ude00","\ud83d\u0041"]"#).unwrap();
        assert_eq!(unpaired, vec![17, 26]);
    }

    #[test]
    fn invalid_texts_and_depth_are_told_apart() {
        for text in [
            "",
            "nope",
            "{\"a\":[1,2,]}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":.5}",
            "{\"a\":+1}",
            "{\"a\":NaN}",
            "{\"a\":\"\t\"}",
            "\u{feff}{}",
            "{\"a\":\"\\x\"}",
            "{\"a\":1}x",
            "[123456789012345678901234567890",
            "[1e400,]",
        ] {
            assert!(
                matches!(read(text), Err(JsonError::Invalid(_))),
                "{text:?}: {:?}",
                read(text)
            );
        }
        assert_eq!(read(&nest(DEPTH_MAX + 1)), Err(JsonError::TooDeep));
        let deep_and_big = format!(
            "{}1e400{}",
            "[".repeat(DEPTH_MAX + 1),
            "]".repeat(DEPTH_MAX + 1)
        );
        assert_eq!(read(&deep_and_big), Err(JsonError::TooDeep));
        let mut scratch = Scratch::default();
        let e = parse(b"[\"\xff\"]", &mut scratch).err().unwrap();
        assert_eq!(e, JsonError::Invalid("not UTF-8".into()));
        assert!(JsonError::TooDeep.message("request").contains("1024"));
    }
}
