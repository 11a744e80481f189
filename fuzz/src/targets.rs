//! The body of every fuzz target. Each takes libFuzzer's bytes and asserts invariants: a
//! failed assertion is a crash that libFuzzer saves. The bins in `fuzz_targets/` only call
//! these, so `cargo test` can replay the corpora through exactly the same code.

use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use broadcaster::auth::{self, Verifier};
use broadcaster::config::{Config, Overrides};
use broadcaster::error::Code;
use broadcaster::revocation::Target;
use broadcaster::wire::http::{is_loopback_host, parse_head, query_param};
use broadcaster::wire::json::DEPTH_MAX;
use broadcaster::wire::request::{
    check_channel, parse_broadcast_body, parse_disconnect_body, parse_publish_body, parse_request,
    parse_revoke_body, parse_unsubscribe_body, Control, Method, BODY_MEMBERS,
    CLOSE_REASON_BYTES_MAX, EVENT_BYTES_MAX, PARAMS_MEMBERS, TOP_MEMBERS, USER_BYTES_MAX,
};

use crate::json::{self, is_valid_json, raw_members, serde_accepts};
use crate::{config, http, jwt, ws};

// ---------------------------------------------------------------------------------------------
// http_head: parse_head + query_param
// ---------------------------------------------------------------------------------------------

pub fn http_head(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(selector) = u.arbitrary::<u8>() else {
        return;
    };
    let max = match selector % 4 {
        0 => 8192,
        1 => 256,
        2 => 64,
        _ => u.int_in_range(1..=16384).unwrap_or(1),
    };
    let Ok(structured) = u.arbitrary::<bool>() else {
        return;
    };
    let buf = if structured {
        match u.arbitrary::<http::HeadSpec>() {
            Ok(spec) => spec.encode(),
            Err(_) => return,
        }
    } else {
        u.bytes(u.len()).unwrap_or_default().to_vec()
    };
    check_head(&buf, max, &mut u);
}

fn check_head(buf: &[u8], max: usize, u: &mut Unstructured) {
    match parse_head(buf, max) {
        Ok(None) => {
            // Incomplete is only an answer while the head may still fit: otherwise the server
            // would keep reading without bound.
            assert!(
                buf.len() < max,
                "Ok(None) with {} bytes, limit {max}",
                buf.len()
            );
        }
        Err(e) => {
            assert!(matches!(e.status, 400 | 431), "status {}", e.status);
        }
        Ok(Some(h)) => {
            assert!(
                h.len > 0 && h.len <= buf.len() && h.len <= max,
                "len {}",
                h.len
            );
            assert_eq!(buf[h.len - 1], b'\n', "head ends with a line end");
            assert!(!h.path.contains('?'), "path {:?} holds the query", h.path);
            if let Some(b) = &h.bearer {
                assert_eq!(b.trim_ascii(), &b[..], "bearer not trimmed");
            }
            // The same head with other bytes after it (a body, a pipelined request) and
            // alone: the same answer.
            let alone = parse_head(&buf[..h.len], max)
                .expect("the head alone")
                .expect("complete");
            assert_eq!(alone, h, "head changes with what follows it");
            // Every prefix is incomplete: a head that arrives in pieces is never refused for
            // arriving in pieces.
            let mut cuts = vec![0, h.len - 1, h.len / 2, h.len.saturating_sub(2)];
            for _ in 0..4 {
                cuts.push(u.int_in_range(0..=h.len - 1).unwrap_or(0));
            }
            for cut in cuts {
                assert_eq!(
                    parse_head(&buf[..cut], max),
                    Ok(None),
                    "prefix of {cut} bytes of a complete {}-byte head",
                    h.len
                );
            }
            check_query(&h.query, u);
            if let Some(host) = &h.host {
                check_host(host);
            }
        }
    }
}

/// Dev mode serves only loopback `Host` names (DNS rebinding): a name under some domain is
/// never taken for one.
fn check_host(host: &str) {
    if is_loopback_host(host) {
        let name = match host.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        let ip = name.parse::<std::net::IpAddr>();
        assert!(
            name.eq_ignore_ascii_case("localhost") || ip.is_ok_and(|ip| ip.is_loopback()),
            "Host {host:?} taken for loopback"
        );
    }
}

fn check_query(query: &str, u: &mut Unstructured) {
    for key in ["channel", "limit", ""] {
        if let Some(v) = query_param(query, key) {
            assert!(
                v.len() <= query.len(),
                "decoded value longer than the query"
            );
        }
    }
    // A pair in front, percent-encoded, decodes back to what was encoded.
    let key: String = u.arbitrary().unwrap_or_default();
    let value: String = u.arbitrary().unwrap_or_default();
    let q = format!(
        "{}={}&{query}",
        http::percent_encode(&key),
        http::percent_encode(&value)
    );
    assert_eq!(
        query_param(&q, &key).as_deref(),
        Some(value.as_str()),
        "{q}"
    );
    let _ = query_param(query, &key);
}

// ---------------------------------------------------------------------------------------------
// ws_frames: frame::Decoder against the reference decoder, fed in random chunks
// ---------------------------------------------------------------------------------------------

pub fn ws_frames(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let (Ok(limit), Ok(mode)) = (u.arbitrary::<u16>(), u.arbitrary::<u8>()) else {
        return;
    };
    let (bytes, chunks) = if mode & 1 == 0 {
        // Raw bytes, read in pieces of `mode / 2` bytes (0: all at once).
        let bytes = u.bytes(u.len()).unwrap_or_default().to_vec();
        let piece = (mode / 2) as usize;
        let chunks = if piece == 0 {
            Vec::new()
        } else {
            vec![piece; bytes.len() / piece + 1]
        };
        (bytes, chunks)
    } else {
        let Ok(case) = u.arbitrary::<ws::Case>() else {
            return;
        };
        let chunks: Vec<usize> = case.chunks.iter().map(|&c| c as usize).collect();
        (case.bytes(), chunks)
    };
    let max = ws::limit(limit);
    let got = ws::drive(&bytes, &chunks, max);
    let want = ws::reference(&bytes, max);
    assert_eq!(got, want, "decoder and reference disagree (limit {max})");
}

// ---------------------------------------------------------------------------------------------
// protocol_request: parse_request
// ---------------------------------------------------------------------------------------------

fn payload_max(u: &mut Unstructured) -> usize {
    match u.arbitrary::<u8>().unwrap_or(0) % 4 {
        0 => 65536,
        1 => 16,
        2 => 0,
        _ => u.int_in_range(0..=70000).unwrap_or(0),
    }
}

/// The text to parse: the rest of the input as it is, or a generated JSON text.
fn json_text(u: &mut Unstructured) -> Option<Vec<u8>> {
    if u.arbitrary::<bool>().ok()? {
        json::generate(u).ok()
    } else {
        Some(u.bytes(u.len()).ok()?.to_vec())
    }
}

pub fn protocol_request(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let max = payload_max(&mut u);
    let Some(text) = json_text(&mut u) else {
        return;
    };
    check_request(&text, max);
}

fn is_within(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr() as usize;
    let i = inner.as_ptr() as usize;
    i >= o && i + inner.len() <= o + outer.len()
}

/// A raw id span: inside the text, and one JSON number or string.
fn check_id(text: &[u8], id: &[u8]) {
    let shown = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        is_within(text, id),
        "id span outside the text {:?}",
        shown(text)
    );
    assert!(
        is_valid_json(id),
        "id {:?} is not JSON in {:?}",
        shown(id),
        shown(text)
    );
    assert!(
        matches!(id.first(), Some(b'"' | b'-' | b'0'..=b'9')),
        "id {:?} is not a number or string in {:?}",
        shown(id),
        shown(text)
    );
}

fn check_payload(what: &str, body: &[u8], payload: &[u8], max: usize, expected: Option<&str>) {
    assert!(
        payload.len() <= max,
        "{what}: payload of {} over {max}",
        payload.len()
    );
    let shown = || String::from_utf8_lossy(payload).into_owned();
    assert!(
        is_valid_json(payload),
        "{what}: payload {:?} is not JSON",
        shown()
    );
    if let Err(e) = serde_accepts(payload) {
        panic!("{what}: serde_json refuses payload {:?}: {e}", shown());
    }
    if let Some(raw) = expected {
        assert_eq!(
            shown(),
            raw,
            "{what}: payload span is not the payload's value"
        );
    }
    let _ = body;
}

fn repeats(m: &json::Members, names: &[&str]) -> bool {
    names.iter().any(|n| m.all(n).len() > 1)
}

pub fn check_request(text: &[u8], max: usize) {
    // A dirty scratch buffer must not matter.
    let mut scratch = broadcaster::wire::json::Scratch::default();
    let _ = parse_request(b"{\"junk\":[1,2,1e400]}", &mut scratch, max);
    let r = parse_request(text, &mut scratch, max);
    let again = parse_request(text, &mut scratch, max);
    assert_eq!(
        format!("{r:?}"),
        format!("{again:?}"),
        "parse is not deterministic"
    );
    let shown = || String::from_utf8_lossy(text).into_owned();
    // serde_json's view of the members, for the spans. The members the server reads must not
    // repeat (which of two a parser keeps is its choice: simd-json keeps the first in objects
    // of up to 32 members and the last beyond), so a request repeating `id`, `method` or
    // `params` is refused whole, and one repeating a member of its `params` gets
    // InvalidArgument for its method. Other members may repeat.
    let top = raw_members(text);
    let top_repeats = top.as_ref().is_some_and(|m| repeats(m, &TOP_MEMBERS));
    let inner = top
        .as_ref()
        .and_then(|m| m.unique("params"))
        .and_then(|p| raw_members(p.as_bytes()));
    let params_repeat = inner.as_ref().is_some_and(|m| repeats(m, &PARAMS_MEMBERS));
    if top_repeats {
        match &r {
            Err(rejected) => assert!(rejected.id.is_none(), "id echoed from {:?}", shown()),
            Ok(_) => panic!("request repeating a member accepted: {:?}", shown()),
        }
    }
    match r {
        Err(rejected) => {
            assert_eq!(
                rejected.error.code,
                Code::InvalidArgument,
                "{:?}",
                rejected.error
            );
            if let Some(id) = rejected.id {
                check_id(text, id);
            }
            check_json_verdict(text, &rejected.error.message);
            // Completeness: a JSON object (any numbers, any escapes, nesting within the
            // documented bound), not repeating `id`, `method` or `params`, whose `method` is
            // a string and whose `id` is absent, a number or a string, is a request.
            let reads = is_valid_json(text) && json::depth(text) <= DEPTH_MAX;
            if let Some(m) = top.as_ref().filter(|_| reads && !top_repeats) {
                let method_is_string = m.unique("method").is_some_and(|v| v.starts_with('"'));
                let id_ok = m.all("id").is_empty()
                    || m.unique("id")
                        .is_some_and(|v| matches!(v.as_bytes()[0], b'"' | b'-' | b'0'..=b'9'));
                assert!(
                    !(method_is_string && id_ok),
                    "request {:?} rejected: {:?}",
                    shown(),
                    rejected.error
                );
            }
        }
        Ok(req) => {
            assert!(
                is_valid_json(text),
                "accepted text {:?} is not JSON",
                shown()
            );
            if let Err(e) = serde_accepts(text) {
                panic!("serde_json refuses accepted text {:?}: {e}", shown());
            }
            if let Some(id) = req.id {
                check_id(text, id);
                if let Some(m) = &top {
                    assert_eq!(
                        Some(String::from_utf8_lossy(id).as_ref()),
                        m.unique("id"),
                        "id span of {:?}",
                        shown()
                    );
                }
            }
            let known = !matches!(&req.method, Err(e) if e.code == Code::NotFound);
            if params_repeat && known {
                assert!(
                    matches!(&req.method, Err(e) if e.code == Code::InvalidArgument),
                    "params repeating a member accepted: {:?} for {:?}",
                    req.method,
                    shown()
                );
            }
            match req.method {
                Err(e) => {
                    check_json_verdict(text, &e.message);
                    assert!(
                        matches!(
                            e.code,
                            Code::InvalidArgument | Code::NotFound | Code::ResourceExhausted
                        ),
                        "{:?} for {:?}",
                        e,
                        shown()
                    );
                    // Messages quote at most 64 characters of the input, escaped.
                    assert!(
                        e.message.len() <= 1024,
                        "error message of {} bytes",
                        e.message.len()
                    );
                }
                Ok(Method::Publish(p)) => {
                    assert!(req.method_needs_auth);
                    assert!(check_channel(&p.channel).is_ok(), "channel {:?}", p.channel);
                    assert!(
                        (1..=EVENT_BYTES_MAX).contains(&p.event.len()),
                        "event of {} bytes",
                        p.event.len()
                    );
                    let expected = inner.as_ref().and_then(|m| m.unique("payload"));
                    assert!(
                        top.is_none() || expected.is_some(),
                        "payload span of {:?}",
                        shown()
                    );
                    check_payload("publish", text, &p.payload, max, expected);
                }
                Ok(Method::Subscribe { channel, start }) => {
                    // Before auth on public channels: the session decides per channel.
                    assert!(!req.method_needs_auth);
                    assert!(check_channel(&channel).is_ok(), "channel {channel:?}");
                    let both = inner.as_ref().is_some_and(|m| {
                        m.unique("since").is_some_and(|v| v != "null")
                            && m.unique("rewind").is_some_and(|v| v != "null")
                    });
                    assert!(!both, "since and rewind together accepted: {start:?}");
                }
                Ok(Method::Unsubscribe { channel }) | Ok(Method::Presence { channel }) => {
                    assert!(!req.method_needs_auth);
                    assert!(check_channel(&channel).is_ok(), "channel {channel:?}");
                }
                Ok(Method::Auth { .. }) | Ok(Method::AuthProxy) | Ok(Method::Heartbeat) => {
                    assert!(!req.method_needs_auth);
                }
            }
        }
    }
}

/// The server calls a text "not valid JSON" only when it is not (RFC 8259), and "nests
/// deeper" only when it does; it never fails to read a valid text within the bound. Only the
/// verdict's own words are read: other messages quote the input, which may hold any phrase.
fn check_json_verdict(text: &[u8], message: &str) {
    let shown = || String::from_utf8_lossy(text).into_owned();
    let Some(verdict) = ["request ", "body "]
        .iter()
        .find_map(|what| message.strip_prefix(what))
    else {
        return;
    };
    assert!(
        !verdict.starts_with("is not valid JSON: the server cannot read"),
        "{:?}: {message}",
        shown()
    );
    if verdict.starts_with("is not valid JSON") {
        assert!(
            !is_valid_json(text),
            "valid JSON {:?} refused: {message}",
            shown()
        );
    }
    if verdict.starts_with("nests arrays and objects deeper than") {
        assert!(
            is_valid_json(text) && json::depth(text) > DEPTH_MAX,
            "{:?} refused for depth: {message}",
            shown()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// rest_bodies: parse_publish_body, parse_broadcast_body
// ---------------------------------------------------------------------------------------------

pub fn rest_bodies(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let max = payload_max(&mut u);
    let channels_max = match u.arbitrary::<u8>().unwrap_or(0) % 3 {
        0 => 1024,
        1 => 1,
        _ => 3,
    };
    let Some(body) = json_text(&mut u) else {
        return;
    };
    check_bodies(&body, max, channels_max);
}

pub fn check_bodies(body: &[u8], max: usize, channels_max: usize) {
    let top = raw_members(body);
    let expected = top.as_ref().and_then(|m| m.unique("payload"));
    let body_repeats = top.as_ref().is_some_and(|m| repeats(m, &BODY_MEMBERS));
    let shown = || String::from_utf8_lossy(body).into_owned();
    // A body repeating a member the server reads is refused (see check_request).
    let rest_code = |c: Code| {
        matches!(c, Code::InvalidArgument) || (!body_repeats && c == Code::ResourceExhausted)
    };
    match parse_publish_body(body, max) {
        Ok(p) => {
            assert!(
                is_valid_json(body),
                "accepted body {:?} is not JSON",
                shown()
            );
            assert!(check_channel(&p.channel).is_ok(), "channel {:?}", p.channel);
            assert!((1..=EVENT_BYTES_MAX).contains(&p.event.len()));
            assert!(
                !body_repeats,
                "body repeating a member accepted: {:?}",
                shown()
            );
            check_payload("publish body", body, &p.payload, max, expected);
        }
        Err(e) => {
            check_json_verdict(body, &e.message);
            assert!(rest_code(e.code), "publish body: {e:?} for {:?}", shown())
        }
    }
    match parse_broadcast_body(body, max, channels_max) {
        Ok((channels, event, payload)) => {
            assert!(
                is_valid_json(body),
                "accepted body {:?} is not JSON",
                shown()
            );
            assert!(
                (1..=channels_max).contains(&channels.len()),
                "{} channels",
                channels.len()
            );
            for c in &channels {
                assert!(check_channel(c).is_ok(), "channel {c:?}");
            }
            assert!((1..=EVENT_BYTES_MAX).contains(&event.len()));
            assert!(
                !body_repeats,
                "body repeating a member accepted: {:?}",
                shown()
            );
            check_payload("broadcast body", body, &payload, max, expected);
        }
        Err(e) => {
            check_json_verdict(body, &e.message);
            assert!(rest_code(e.code), "broadcast body: {e:?} for {:?}", shown())
        }
    }
    check_control_bodies(body, body_repeats);
}

/// `/disconnect` and `/unsubscribe` bodies (SPEC 17, 22.5): what is accepted is JSON that
/// repeats no member, names a user within the bound, a close code the client can act on, a
/// reason that fits a close frame, and a channel or a prefix pattern; anything else is
/// InvalidArgument.
fn check_control_bodies(body: &[u8], body_repeats: bool) {
    let shown = || String::from_utf8_lossy(body).into_owned();
    for parsed in [parse_disconnect_body(body), parse_unsubscribe_body(body)] {
        let op = match parsed {
            Ok(op) => op,
            Err(e) => {
                check_json_verdict(body, &e.message);
                assert_eq!(e.code, Code::InvalidArgument, "{e:?} for {:?}", shown());
                continue;
            }
        };
        assert!(
            is_valid_json(body),
            "accepted body {:?} is not JSON",
            shown()
        );
        assert!(
            !body_repeats,
            "body repeating a member accepted: {:?}",
            shown()
        );
        match op {
            Control::Disconnect { user, code, reason } => {
                assert!((1..=USER_BYTES_MAX).contains(&user.len()));
                assert!(code == 4006 || code == 4007, "code {code}");
                assert!(reason.len() <= CLOSE_REASON_BYTES_MAX);
            }
            Control::Unsubscribe { user, pattern } => {
                assert!((1..=USER_BYTES_MAX).contains(&user.len()));
                let prefix = pattern.strip_suffix('*').unwrap_or(&pattern);
                assert!(
                    prefix.is_empty() || check_channel(prefix).is_ok(),
                    "{pattern:?}"
                );
            }
            Control::Revoke(_) => unreachable!("not parsed here"),
        }
    }
    check_revoke_body(body, body_repeats);
}

/// `/revoke`: a user with an RFC 3339 cutoff, or a jti, never both; the cutoff is the time
/// the text says (checked against an independent reading for the `Z` form).
fn check_revoke_body(body: &[u8], body_repeats: bool) {
    let shown = || String::from_utf8_lossy(body).into_owned();
    let (target, cutoff_ms) = match parse_revoke_body(body) {
        Ok(parsed) => parsed,
        Err(e) => {
            check_json_verdict(body, &e.message);
            assert_eq!(e.code, Code::InvalidArgument, "{e:?} for {:?}", shown());
            return;
        }
    };
    assert!(is_valid_json(body), "accepted {:?} is not JSON", shown());
    assert!(
        !body_repeats,
        "body repeating a member accepted: {:?}",
        shown()
    );
    match &target {
        Target::User(user) | Target::Jti(user) => {
            assert!((1..=USER_BYTES_MAX).contains(&user.len()))
        }
    }
    // serde_json refuses some valid JSON the server reads (an unpaired surrogate escape in
    // another member): the members are compared only where it reads the body.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    match target {
        Target::User(user) => {
            assert_eq!(value["user"].as_str(), Some(user.as_str()));
            assert!(value.get("jti").is_none(), "{:?}", shown());
            let text = value["issuedBefore"].as_str().unwrap_or_default();
            if let Ok(t) = humantime::parse_rfc3339(text) {
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis());
                assert_eq!(ms.ok(), Some(u128::from(cutoff_ms)), "{text:?}");
            }
        }
        Target::Jti(jti) => {
            assert_eq!(value["jti"].as_str(), Some(jti.as_str()));
            assert_eq!(cutoff_ms, 0);
            assert!(value.get("user").is_none(), "{:?}", shown());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// jwt: Verifier::verify
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "fuzz-secret-0123456789";

#[derive(Debug, arbitrary::Arbitrary)]
enum JwtCase {
    /// Any text as a token.
    Text(String),
    /// A token minted by `auth::mint`, then mutated.
    Minted {
        sub: String,
        channels: Vec<String>,
        scopes: Vec<String>,
        ttl: u16,
        /// An `info` claim `{"name": <this>}` when set.
        info: Option<String>,
        mutations: Vec<jwt::Mutation>,
    },
}

pub fn jwt(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let leeway = match u.arbitrary::<u8>().unwrap_or(0) % 4 {
        0 => 0,
        1 => 5,
        2 => 60,
        _ => 3600,
    };
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    let case = if mode & 1 == 0 {
        JwtCase::Text(String::from_utf8_lossy(u.bytes(u.len()).unwrap_or_default()).into_owned())
    } else {
        match u.arbitrary::<JwtCase>() {
            Ok(c) => c,
            Err(_) => return,
        }
    };
    let verifier = Verifier::new(SECRET, Duration::from_secs(leeway));
    let now = broadcaster::clock::unix_now();
    let check = |token: &str| {
        let r = verifier.verify(token);
        if let Ok(p) = &r {
            // An accepted info claim is an object within presence.info_bytes_max.
            if let Some(info) = &p.info {
                assert!(
                    info.len() <= broadcaster::auth::INFO_BYTES_MAX,
                    "info of {} bytes",
                    info.len()
                );
                let v: serde_json::Value = serde_json::from_str(info).expect("info is JSON");
                assert!(v.is_object(), "info {info:?}");
            }
            if let Some(why) =
                jwt::acceptance_error(token, SECRET.as_bytes(), leeway, now, &p.sub, p.exp)
            {
                panic!("token {token:?} accepted: {why}");
            }
        }
        r
    };
    match case {
        JwtCase::Text(t) => {
            let _ = check(&t);
        }
        JwtCase::Minted {
            sub,
            channels,
            scopes,
            ttl,
            info,
            mutations,
        } => {
            let info = info.map(|name| serde_json::json!({ "name": name }));
            let Ok(token) = auth::mint_with_info(
                SECRET,
                &sub,
                &channels,
                &scopes,
                Duration::from_secs(ttl.into()),
                info.as_ref(),
            ) else {
                return;
            };
            let info_fits = info
                .as_ref()
                .is_none_or(|i| i.to_string().len() <= broadcaster::auth::INFO_BYTES_MAX);
            // A freshly minted token verifies (unless its sub is empty) and grants exactly
            // what it names.
            match check(&token) {
                Ok(p) => {
                    assert!(info_fits, "an info claim over the bound accepted");
                    assert_eq!(p.info.as_deref(), info.map(|i| i.to_string()).as_deref());
                    assert_eq!(&*p.sub, sub);
                    assert_eq!(p.can_subscribe, scopes.iter().any(|s| s == "subscribe"));
                    assert_eq!(p.can_publish, scopes.iter().any(|s| s == "publish"));
                    for c in &channels {
                        if !c.contains('*') {
                            assert!(p.allows_channel(c), "{c:?} not allowed by its own token");
                        }
                    }
                }
                Err(e) => assert!(sub.is_empty() || !info_fits, "fresh token refused: {e:?}"),
            }
            let mut t = token;
            for m in mutations.iter().take(8) {
                t = jwt::mutate(&t, m, SECRET, now);
                let _ = check(&t);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config: Config::load on a TOML file, empty environment
// ---------------------------------------------------------------------------------------------

fn config_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "broadcaster-fuzz-config-{}.toml",
        std::process::id()
    ))
}

pub fn config(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let text = match u.arbitrary::<bool>() {
        Ok(true) => match u.arbitrary::<config::ConfigSpec>() {
            Ok(spec) => spec.encode().into_bytes(),
            Err(_) => return,
        },
        Ok(false) => u.bytes(u.len()).unwrap_or_default().to_vec(),
        Err(_) => return,
    };
    check_config(&text);
}

pub fn check_config(text: &[u8]) {
    let path = config_path();
    std::fs::write(&path, text).expect("write the config file");
    let r = Config::load(Some(&path), &|_| None, &Overrides::default());
    let Ok(c) = r else {
        let e = r.unwrap_err();
        assert!(!e.0.is_empty(), "an empty error message");
        return;
    };
    assert!(
        c.assert_valid().is_ok(),
        "load returned a config that is not valid"
    );
    let l = &c.limits;
    assert!(l.max_frame_bytes >= 256);
    assert!(l.max_payload_bytes >= 1 && l.max_payload_bytes <= l.max_frame_bytes);
    assert!(l.outbound_buffer_bytes >= l.max_frame_bytes);
    assert!(l.http_head_bytes_max >= 256);
    assert!(l.requests_per_second >= 1 && l.request_burst >= 1);
    assert_eq!(
        c.dev_mode,
        c.auth.jwt_secret.as_deref().is_none_or(str::is_empty)
    );
    if c.dev_mode {
        assert!(c.listen.ip().is_loopback(), "dev mode on {}", c.listen);
        assert!(c.admin_listen.is_none_or(|a| a.ip().is_loopback()));
    }
    assert!(c.auth.api_keys.iter().all(|k| !k.is_empty()));
    for hook in &c.webhooks {
        assert!(hook.url.starts_with("http://") || hook.url.starts_with("https://"));
        assert!(!hook.secret.is_empty() && !hook.events.is_empty() && !hook.patterns.is_empty());
        assert!((1..=1000).contains(&hook.batch_max));
        assert!((1..=10_000_000).contains(&hook.queue_max));
        assert!(!hook.timeout.is_zero());
        for d in [
            hook.vacated_delay,
            hook.batch_delay,
            hook.timeout,
            hook.retry_max_delay,
        ] {
            assert!(
                d <= Duration::from_secs(3600),
                "a webhook duration of {d:?}"
            );
        }
    }
    // An accepted configuration never makes the server panic later (SPEC 2: "a clear error
    // naming the key, never a panic"). Every duration is added to `Instant::now()` somewhere
    // (timers, deadlines), the ping interval is doubled for the ping timeout, the write timeout
    // plus the close linger is a backstop, and the leeway is subtracted from the current time by
    // the JWT validation. (Found unbounded by this target; bounded since in assert_valid.)
    let now = Instant::now();
    let durations = [
        ("shutdown_grace", c.shutdown_grace),
        ("auth.leeway", c.auth.leeway),
        ("limits.auth_timeout", l.auth_timeout),
        ("limits.http_head_timeout", l.http_head_timeout),
        ("limits.write_timeout", l.write_timeout),
        ("limits.ping_interval", l.ping_interval),
        ("history.ttl", c.history.ttl),
    ];
    for (key, d) in durations {
        assert!(
            now.checked_add(d).is_some(),
            "{key} = {d:?} overflows Instant"
        );
    }
    let twice = l.ping_interval.checked_mul(2);
    assert!(
        twice.is_some_and(|t| now.checked_add(t).is_some()),
        "limits.ping_interval = {:?}: twice it overflows",
        l.ping_interval
    );
    let linger = l.write_timeout.checked_add(Duration::from_secs(2));
    assert!(
        linger.is_some_and(|t| now.checked_add(t).is_some()),
        "limits.write_timeout = {:?} overflows the close backstop",
        l.write_timeout
    );
    assert!(
        c.auth.leeway.as_secs() <= broadcaster::clock::unix_now(),
        "auth.leeway = {:?} underflows the JWT exp check",
        c.auth.leeway
    );
    // And a token verifies with it.
    let token = auth::mint("s", "a", &[], &[], Duration::from_secs(60)).expect("mint");
    assert!(Verifier::new("s", c.auth.leeway).verify(&token).is_ok());
    check_rules(&c, now);
}

/// What an accepted `[[channels]]` and `[proxy]` promise the server: every duration can be
/// added to now, every rewind_default can be served, the proxy URLs parse, and a policy is
/// found for any channel without a panic.
fn check_rules(c: &Config, now: Instant) {
    let rules = c.rules();
    assert_eq!(rules.hash().is_some(), !c.channels.is_empty());
    for (n, r) in c.channels.iter().enumerate() {
        let size = r.history_size.unwrap_or(c.history.size);
        assert!(size <= 100_000, "channels[{n}].history_size {size}");
        assert!(
            r.rewind_default <= size.min(c.limits.rewind_max),
            "channels[{n}].rewind_default"
        );
        let ttl = r.history_ttl.unwrap_or(c.history.ttl);
        assert!(
            now.checked_add(ttl).is_some(),
            "channels[{n}].history_ttl overflows"
        );
        assert!(!r.pattern.is_empty() && !r.pattern.trim_end_matches('*').contains('*'));
        // Its own pattern's channels reach it unless an earlier rule takes them: never one
        // wholly shadowed.
        let probe = r.pattern.trim_end_matches('*');
        if !probe.is_empty() {
            let _ = rules.policy(probe);
        }
    }
    for url in [&c.proxy.subscribe_url, &c.proxy.connect_url]
        .into_iter()
        .flatten()
    {
        assert!(broadcaster::wire::proxy::parse_url(url).is_ok(), "{url}");
        assert!(c.proxy.secret.as_deref().is_some_and(|s| !s.is_empty()));
    }
    for d in [c.proxy.timeout, c.proxy.subscribe_cache_ttl] {
        assert!(now.checked_add(d).is_some(), "a proxy duration overflows");
    }
    for t in &c.limits.trusted_proxies {
        assert!(broadcaster::config::parse_cidr(t).is_ok(), "{t}");
    }
    for channel in ["a", "scoreboard/x", "contest/1/2", "*"] {
        let p = rules.policy(channel);
        assert!(p.history_size <= 100_000);
        assert!((1..=1_000_000).contains(&p.presence_members_max));
    }
    // Presence's durations and bounds: the heartbeat period (a fifth) is never zero.
    let presence = &c.presence;
    assert!(presence.node_timeout / 5 > Duration::ZERO);
    assert!(now.checked_add(presence.node_timeout).is_some());
    assert!((1..=65_536).contains(&presence.info_bytes_max));
}
