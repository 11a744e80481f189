//! Sans-IO protocol of SPEC section 4: requests parsed with simd-json, responses and broadcast
//! frames encoded into byte buffers.
//!
//! simd-json validates the whole request and reads the small fields. Two values must travel as the
//! client wrote them: `id` (echoed as `requestId`) and `payload` (relayed byte for byte), so a small
//! scanner finds their byte spans in the original text, which simd-json has already proven to be
//! valid JSON.

use crate::error::{err, Code, Error};
use crate::revocation::Target;
use crate::wire::json::{self, find, members, repeated, skip_ws, span_of, Span};
use simd_json::prelude::*;
use simd_json::BorrowedValue;

#[derive(Debug, Clone, PartialEq, Eq)]
/// A subscribe's `since`: the last position the client saw.
pub struct Since {
    /// The last offset seen.
    pub offset: u64,
    /// The epoch of that offset.
    pub epoch: String,
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// At the next publication.
    Live,
    /// After the client's last position, with what it missed (SPEC 5).
    Since(Since),
    /// With the last N publications held, replayed first (SPEC 14).
    Rewind(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// A request's method and parameters (SPEC 4).
pub enum Method {
    /// `auth` with a JWT.
    Auth {
        /// The JWT.
        token: String,
    },
    /// `auth` with `{"proxy":true}`: the backend's connect proxy decides (SPEC 15).
    AuthProxy,
    /// `subscribe`, with `since` to recover what was missed or `rewind` to replay the last
    /// publications; `None` when the client named neither (the channel's rule decides).
    Subscribe {
        /// The channel.
        channel: String,
        /// Where it starts, as asked.
        start: Option<Start>,
    },
    /// `unsubscribe`.
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// `publish`.
    Publish(PublishParams),
    /// `heartbeat`.
    Heartbeat,
    /// `presence`: who is in a channel (SPEC 16).
    Presence {
        /// The channel.
        channel: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// A publication as a publisher asks for it.
pub struct PublishParams {
    /// The channel.
    pub channel: String,
    /// The event name, 1-128 bytes.
    pub event: String,
    /// The payload exactly as the client wrote it.
    pub payload: Vec<u8>,
    /// `{"user","info"}` of the WebSocket publisher, set by the server from its token (never
    /// from the request); none for REST.
    pub from: Option<std::sync::Arc<str>>,
}

/// A request whose method was recognised. Parameter errors are kept apart from the method, because
/// `Unauthenticated` must win over a bad parameter of a method that needs auth.
#[derive(Debug)]
pub struct Request<'a> {
    /// Raw JSON text of `id` (a number or string), echoed as `requestId`.
    pub id: Option<&'a [u8]>,
    /// The method is one that needs `auth` first.
    pub method_needs_auth: bool,
    /// The method, or what is wrong with its parameters.
    pub method: Result<Method, Error>,
}

/// A frame that is not a request at all. The id is echoed when it could be read.
#[derive(Debug)]
pub struct Rejected<'a> {
    /// The request's `id` when it could be read.
    pub id: Option<&'a [u8]>,
    /// Why it is not a request.
    pub error: Error,
}

/// Event names are 1-128 bytes (SPEC section 4).
pub const EVENT_BYTES_MAX: usize = 128;
/// Channel names are 1-255 bytes (SPEC section 4).
pub const CHANNEL_BYTES_MAX: usize = 255;

/// Members that must not be repeated. simd-json keeps the first of duplicated keys in objects
/// of up to 32 members and the last in larger ones, while the span scanner reads raw bytes; a
/// repeated member could be validated in one place and used from another, so it is refused
/// (found by the `protocol_request` fuzz target).
/// Top-level members of a request.
pub const TOP_MEMBERS: [&str; 3] = ["id", "method", "params"];
/// Members of a request's `params`.
pub const PARAMS_MEMBERS: [&str; 7] = [
    "channel", "event", "payload", "token", "since", "rewind", "proxy",
];
/// Members of a REST body.
pub const BODY_MEMBERS: [&str; 9] = [
    "channel",
    "channels",
    "event",
    "payload",
    "user",
    "code",
    "reason",
    "jti",
    "issuedBefore",
];

fn refuse_repeated(body: &[u8], spans: &[(Span, Span)]) -> Result<(), Error> {
    match repeated(body, spans, &BODY_MEMBERS) {
        Some(name) => Err(err(
            Code::InvalidArgument,
            format!("body repeats member {name:?}"),
        )),
        None => Ok(()),
    }
}

/// Parses one text frame. `scratch` is reused across calls (simd-json parses in place).
pub fn parse_request<'a>(
    text: &'a [u8],
    scratch: &mut json::Scratch,
    payload_bytes_max: usize,
) -> Result<Request<'a>, Rejected<'a>> {
    let parsed = match json::parse(text, scratch) {
        Ok(p) => p,
        Err(e) => return Err(reject(None, &e.message("request"))),
    };
    let Some(obj) = parsed.value.as_object() else {
        return Err(reject(None, "request must be a JSON object"));
    };
    let spans = members(text, skip_ws(text, 0));
    if let Some(name) = repeated(text, &spans, &TOP_MEMBERS) {
        return Err(reject(None, &format!("request repeats member {name:?}")));
    }
    let id = match obj.get("id") {
        None => None,
        Some(v) if v.is_str() || v.is_number() => span_of(text, &spans, "id"),
        Some(_) => return Err(reject(None, "id must be a number or a string")),
    };
    let method = match obj.get("method") {
        None => return Err(reject(id, "request lacks method")),
        Some(m) => match m.as_str() {
            Some(m) => m,
            None => return Err(reject(id, "method must be a string")),
        },
    };
    let params = obj.get("params");
    // Only publish always needs auth: subscribe and unsubscribe work before it on public
    // channels (SPEC 14), so the session decides those per channel.
    let method_needs_auth = method == "publish";
    let inner = find(text, &spans, "params").map_or_else(Vec::new, |(at, _)| members(text, at));
    let params_repeat = repeated(text, &inner, &PARAMS_MEMBERS);
    let unpaired = unpaired_in(&parsed, text, &spans, &["method"])
        .or_else(|| unpaired_in(&parsed, text, &inner, &PARAMS_MEMBERS));
    let method = match (method, params_repeat, unpaired) {
        ("auth" | "subscribe" | "unsubscribe" | "publish" | "presence", Some(name), _) => Err(err(
            Code::InvalidArgument,
            format!("params repeats member {name:?}"),
        )),
        (_, _, Some(e)) => Err(e),
        (method, _, None) => match method {
            "auth" => parse_auth(params),
            "subscribe" => parse_subscribe(params),
            "unsubscribe" => channel_param(params).map(|channel| Method::Unsubscribe { channel }),
            "presence" => channel_param(params).map(|channel| Method::Presence { channel }),
            "publish" => {
                parse_publish(text, &inner, params, payload_bytes_max).map(Method::Publish)
            }
            "heartbeat" => Ok(Method::Heartbeat),
            other => {
                let mut shown = other.chars().take(64).collect::<String>();
                if shown.len() < other.len() {
                    shown.push('…');
                }
                Err(err(Code::NotFound, format!("unknown method {shown:?}")))
            }
        },
    };
    Ok(Request {
        id,
        method_needs_auth,
        method,
    })
}

/// An error when a member the server decodes as text (one of `names`) holds the escape of an
/// unpaired surrogate: that is not Unicode text, and reading it as U+FFFD would act on another
/// channel or event than the client named. Payloads and ids may hold one: they are relayed
/// byte for byte.
fn unpaired_in(
    parsed: &json::Parsed,
    text: &[u8],
    spans: &[(Span, Span)],
    names: &[&str],
) -> Option<Error> {
    if parsed.unpaired.is_empty() {
        return None;
    }
    let name = names.iter().find(|name| {
        **name != "payload" && find(text, spans, name).is_some_and(|v| parsed.unpaired_within(v))
    })?;
    Some(err(
        Code::InvalidArgument,
        format!("{name} holds an unpaired UTF-16 surrogate escape, which is not Unicode text"),
    ))
}

fn reject<'a>(id: Option<&'a [u8]>, message: &str) -> Rejected<'a> {
    Rejected {
        id,
        error: err(Code::InvalidArgument, message),
    }
}

fn parse_auth(params: Option<&BorrowedValue>) -> Result<Method, Error> {
    let token = params.and_then(|p| p.get("token"));
    let proxy = params.and_then(|p| p.get("proxy"));
    match (
        token.and_then(|t| t.as_str()),
        proxy.and_then(|p| p.as_bool()),
    ) {
        (Some(token), None) => Ok(Method::Auth {
            token: token.to_string(),
        }),
        (None, Some(true)) if token.is_none() => Ok(Method::AuthProxy),
        _ => Err(err(
            Code::InvalidArgument,
            "auth needs params.token, a string, or params.proxy: true",
        )),
    }
}

fn channel_param(params: Option<&BorrowedValue>) -> Result<String, Error> {
    let Some(channel) = params
        .and_then(|p| p.get("channel"))
        .and_then(|c| c.as_str())
    else {
        return Err(err(
            Code::InvalidArgument,
            "params.channel, a string, is required",
        ));
    };
    check_channel(channel)?;
    Ok(channel.to_string())
}

/// Channel names: 1-255 bytes of UTF-8, no whitespace or control characters (in the Unicode
/// sense, SPEC 13.7), no `*`.
pub fn check_channel(channel: &str) -> Result<(), Error> {
    if channel.is_empty() || channel.len() > CHANNEL_BYTES_MAX {
        return Err(err(
            Code::InvalidArgument,
            "channel name must be 1-255 bytes",
        ));
    }
    if channel
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '*')
    {
        return Err(err(
            Code::InvalidArgument,
            "channel name may not hold whitespace, control characters or '*'",
        ));
    }
    Ok(())
}

fn parse_subscribe(params: Option<&BorrowedValue>) -> Result<Method, Error> {
    let channel = channel_param(params)?;
    let since = parse_since(params)?;
    let rewind = match params.and_then(|p| p.get("rewind")) {
        None => None,
        Some(r) if r.is_null() => None,
        Some(r) => match r.as_u64() {
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => {
                let why = "rewind must be a whole number of publications (0 or more)";
                return Err(err(Code::InvalidArgument, why));
            }
        },
    };
    let start = match (since, rewind) {
        (Some(_), Some(_)) => {
            let why =
                "since and rewind exclude each other: recover with since, or replay with rewind";
            return Err(err(Code::InvalidArgument, why));
        }
        (Some(since), None) => Some(Start::Since(since)),
        (None, Some(n)) => Some(Start::Rewind(n)),
        (None, None) => None,
    };
    Ok(Method::Subscribe { channel, start })
}

fn parse_since(params: Option<&BorrowedValue>) -> Result<Option<Since>, Error> {
    Ok(match params.and_then(|p| p.get("since")) {
        None => None,
        Some(s) if s.is_null() => None,
        Some(s) => {
            let offset = s.get("offset").and_then(|o| o.as_u64());
            let epoch = s.get("epoch").and_then(|e| e.as_str());
            match (offset, epoch) {
                (Some(offset), Some(epoch)) => Some(Since {
                    offset,
                    epoch: epoch.to_string(),
                }),
                _ => {
                    return Err(err(
                        Code::InvalidArgument,
                        "since must be {\"offset\": number, \"epoch\": string}",
                    ))
                }
            }
        }
    })
}

fn parse_publish(
    text: &[u8],
    inner: &[(Span, Span)],
    params: Option<&BorrowedValue>,
    payload_bytes_max: usize,
) -> Result<PublishParams, Error> {
    let channel = channel_param(params)?;
    let event = match params.and_then(|p| p.get("event")).and_then(|e| e.as_str()) {
        Some(e) => e,
        None => {
            return Err(err(
                Code::InvalidArgument,
                "params.event, a string, is required",
            ))
        }
    };
    check_event(event)?;
    if params.and_then(|p| p.get("payload")).is_none() {
        return Err(err(Code::InvalidArgument, "params.payload is required"));
    }
    let payload = span_of(text, inner, "payload")
        .ok_or_else(|| err(Code::Internal, "payload could not be located"))?;
    check_payload(payload.len(), payload_bytes_max)?;
    Ok(PublishParams {
        channel,
        event: event.to_string(),
        payload: payload.to_vec(),
        from: None,
    })
}

pub(crate) fn check_event(event: &str) -> Result<(), Error> {
    if event.is_empty() || event.len() > EVENT_BYTES_MAX {
        return Err(err(Code::InvalidArgument, "event must be 1-128 bytes"));
    }
    Ok(())
}

pub(crate) fn check_payload(len: usize, payload_bytes_max: usize) -> Result<(), Error> {
    if len > payload_bytes_max {
        return Err(err(
            Code::ResourceExhausted,
            format!("payload of {len} bytes is over the limit of {payload_bytes_max}"),
        ));
    }
    Ok(())
}

/// Parses a REST publish body (`{"channel","event","payload"}`), keeping the payload's bytes.
pub fn parse_publish_body(body: &[u8], payload_bytes_max: usize) -> Result<PublishParams, Error> {
    let mut scratch = json::Scratch::default();
    let (value, inner) = parse_body(body, &mut scratch)?;
    let channel = channel_param(Some(&value))?;
    let (event, payload) = body_event_and_payload(body, &value, &inner, payload_bytes_max)?;
    Ok(PublishParams {
        channel,
        event,
        payload,
        from: None,
    })
}

/// A REST body's `event` and `payload` (the payload's bytes as written), checked.
fn body_event_and_payload(
    body: &[u8],
    value: &BorrowedValue,
    members: &[(Span, Span)],
    payload_bytes_max: usize,
) -> Result<(String, Vec<u8>), Error> {
    let event = value
        .get("event")
        .and_then(|e| e.as_str())
        .ok_or_else(|| err(Code::InvalidArgument, "event, a string, is required"))?;
    check_event(event)?;
    let payload = span_of(body, members, "payload")
        .ok_or_else(|| err(Code::InvalidArgument, "payload is required"))?;
    check_payload(payload.len(), payload_bytes_max)?;
    Ok((event.to_string(), payload.to_vec()))
}

/// What the backend asks of every node (SPEC 17): end a user's connections, or its
/// subscriptions to the channels a pattern matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// `POST /disconnect`: close every connection of `user` with `code` (4006 or 4007).
    Disconnect {
        /// The token `sub`.
        user: String,
        /// 4006 (reconnect allowed) or 4007 (token revoked).
        code: u16,
        /// The close frame's reason, at most `CLOSE_REASON_BYTES_MAX` bytes.
        reason: String,
    },
    /// `POST /unsubscribe`: end `user`'s subscriptions to the channels `pattern` matches (an
    /// exact name, or a prefix ending in `*`).
    Unsubscribe {
        /// The token `sub`.
        user: String,
        /// The channel or pattern.
        pattern: String,
    },
    /// `POST /revoke`: refuse the tokens it names from now on and close the connections using
    /// them with 4007.
    Revoke(crate::revocation::Revocation),
}

/// A close frame's reason fits its 125-byte payload with the 2-byte code.
pub const CLOSE_REASON_BYTES_MAX: usize = 123;
/// Longest `user` a control body may name (a token `sub`).
pub const USER_BYTES_MAX: usize = 1024;

/// `POST /disconnect`: `{"user","code"?,"reason"?}`.
pub fn parse_disconnect_body(body: &[u8]) -> Result<Control, Error> {
    let mut scratch = json::Scratch::default();
    let (value, _) = parse_body(body, &mut scratch)?;
    let user = user_param(&value)?;
    let code = match value.get("code") {
        None => crate::error::close::DISCONNECTED,
        Some(c) => match c.as_u64() {
            Some(4006) => 4006,
            Some(4007) => 4007,
            _ => return Err(err(Code::InvalidArgument, "code must be 4006 or 4007")),
        },
    };
    let reason = match value.get("reason") {
        None => "disconnected by the backend".to_string(),
        Some(r) => match r.as_str() {
            Some(r) if r.len() <= CLOSE_REASON_BYTES_MAX => r.to_string(),
            _ => {
                let why =
                    format!("reason must be a string of at most {CLOSE_REASON_BYTES_MAX} bytes");
                return Err(err(Code::InvalidArgument, why));
            }
        },
    };
    Ok(Control::Disconnect { user, code, reason })
}

/// `POST /unsubscribe`: `{"user","channel"}`, the channel an exact name or a pattern.
pub fn parse_unsubscribe_body(body: &[u8]) -> Result<Control, Error> {
    let mut scratch = json::Scratch::default();
    let (value, _) = parse_body(body, &mut scratch)?;
    let user = user_param(&value)?;
    let Some(pattern) = value.get("channel").and_then(|c| c.as_str()) else {
        return Err(err(Code::InvalidArgument, "channel, a string, is required"));
    };
    match pattern.strip_suffix('*') {
        Some("") => {}
        Some(prefix) => check_channel(prefix).map_err(|_| {
            err(
                Code::InvalidArgument,
                "channel: a channel name, or a prefix of one ending in '*'",
            )
        })?,
        None => check_channel(pattern)?,
    }
    let pattern = pattern.to_string();
    Ok(Control::Unsubscribe { user, pattern })
}

/// `POST /revoke`: `{"user","issuedBefore":RFC3339}` or `{"jti"}`; the target and its cutoff
/// in unix ms (0 for a `jti`).
pub fn parse_revoke_body(body: &[u8]) -> Result<(Target, u64), Error> {
    let mut scratch = json::Scratch::default();
    let (value, _) = parse_body(body, &mut scratch)?;
    let jti = value.get("jti");
    let user = value.get("user");
    let before = value.get("issuedBefore");
    match (jti, user, before) {
        (Some(jti), None, None) => match jti.as_str() {
            Some(j) if !j.is_empty() && j.len() <= USER_BYTES_MAX => {
                Ok((Target::Jti(j.to_string()), 0))
            }
            _ => Err(err(
                Code::InvalidArgument,
                format!("jti must be a string of 1-{USER_BYTES_MAX} bytes"),
            )),
        },
        (None, Some(_), Some(before)) => {
            let user = user_param(&value)?;
            let cutoff = before
                .as_str()
                .and_then(crate::revocation::parse_rfc3339_ms)
                .ok_or_else(|| {
                    let why = "issuedBefore must be an RFC 3339 time, like 2026-12-06T10:00:00Z";
                    err(Code::InvalidArgument, why)
                })?;
            Ok((Target::User(user), cutoff))
        }
        _ => Err(err(
            Code::InvalidArgument,
            "give either user and issuedBefore, or jti",
        )),
    }
}

fn user_param(value: &BorrowedValue) -> Result<String, Error> {
    match value.get("user").and_then(|u| u.as_str()) {
        Some(u) if !u.is_empty() && u.len() <= USER_BYTES_MAX => Ok(u.to_string()),
        _ => Err(err(
            Code::InvalidArgument,
            format!("user, a token sub of 1-{USER_BYTES_MAX} bytes, is required"),
        )),
    }
}

/// Parses a REST body: a JSON object that repeats none of the members the server reads and
/// holds no unpaired surrogate in them. Returns its value and its members' spans.
fn parse_body<'s>(
    body: &[u8],
    scratch: &'s mut json::Scratch,
) -> Result<(BorrowedValue<'s>, Vec<(Span, Span)>), Error> {
    let parsed =
        json::parse(body, scratch).map_err(|e| err(Code::InvalidArgument, e.message("body")))?;
    if !parsed.value.is_object() {
        return Err(err(Code::InvalidArgument, "body must be a JSON object"));
    }
    let inner = members(body, skip_ws(body, 0));
    refuse_repeated(body, &inner)?;
    if let Some(e) = unpaired_in(&parsed, body, &inner, &BODY_MEMBERS) {
        return Err(e);
    }
    Ok((parsed.value, inner))
}

/// Parses a REST broadcast body (`{"channels":[...],"event","payload"}`).
pub fn parse_broadcast_body(
    body: &[u8],
    payload_bytes_max: usize,
    channels_max: usize,
) -> Result<(Vec<String>, String, Vec<u8>), Error> {
    let mut scratch = json::Scratch::default();
    let (value, inner) = parse_body(body, &mut scratch)?;
    let Some(list) = value.get("channels").and_then(|c| c.as_array()) else {
        return Err(err(
            Code::InvalidArgument,
            "channels, an array of names, is required",
        ));
    };
    if list.is_empty() || list.len() > channels_max {
        return Err(err(
            Code::InvalidArgument,
            format!("channels must hold 1 to {channels_max} names"),
        ));
    }
    let mut channels = Vec::with_capacity(list.len());
    for c in list {
        let name = c
            .as_str()
            .ok_or_else(|| err(Code::InvalidArgument, "every channel must be a string"))?;
        check_channel(name)?;
        channels.push(name.to_string());
    }
    let (event, payload) = body_event_and_payload(body, &value, &inner, payload_bytes_max)?;
    Ok((channels, event, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request<'_>, Rejected<'_>> {
        parse_request(text.as_bytes(), &mut json::Scratch::default(), 65536)
    }

    #[test]
    fn ids_are_echoed_as_written() {
        for (text, id) in [
            (r#"{"id":0,"method":"heartbeat"}"#, "0"),
            (r#"{"id": -5 ,"method":"heartbeat"}"#, "-5"),
            (r#"{"method":"heartbeat","id":"a\"b"}"#, r#""a\"b""#),
            (r#"{"id":"","method":"heartbeat"}"#, r#""""#),
        ] {
            let r = parse(text).unwrap();
            assert_eq!(r.id, Some(id.as_bytes()), "{text}");
            assert_eq!(r.method, Ok(Method::Heartbeat));
        }
        assert_eq!(parse(r#"{"method":"heartbeat"}"#).unwrap().id, None);
    }

    #[test]
    fn malformed_requests_are_rejected() {
        for text in [
            "nope",
            "[1]",
            "{\"id\":1",
            "{\"id\":1}",
            "{\"id\":{},\"method\":\"x\"}",
            "",
        ] {
            let r = parse(text).unwrap_err();
            assert_eq!(r.error.code, Code::InvalidArgument, "{text}");
        }
        assert_eq!(parse(r#"{"id":7}"#).unwrap_err().id, Some(&b"7"[..]));
        let r = parse(r#"{"id":1,"method":"dance"}"#).unwrap();
        assert_eq!(r.method.unwrap_err().code, Code::NotFound);
    }

    #[test]
    fn payload_is_kept_byte_for_byte() {
        let text = r#"{"id":1,"method":"publish","params":{"payload" : {"b":1,  "a":[1.0e3, "\u00e9", "}"]} ,"channel":"c","event":"e"}}"#;
        let r = parse(text).unwrap();
        let Ok(Method::Publish(p)) = r.method else {
            panic!("{:?}", r.method)
        };
        assert_eq!(p.payload, br#"{"b":1,  "a":[1.0e3, "\u00e9", "}"]}"#);
        assert_eq!(p.channel, "c");
        let text = r#"{"method":"publish","params":{"channel":"c","event":"e","payload":-1.5e2}}"#;
        let Ok(Method::Publish(p)) = parse(text).unwrap().method else {
            panic!()
        };
        assert_eq!(p.payload, b"-1.5e2");
        let text =
            r#"{"method":"publish","params":{"channel":"c","event":"e","p\u0061yload":"x"}}"#;
        let Ok(Method::Publish(p)) = parse(text).unwrap().method else {
            panic!()
        };
        assert_eq!(p.payload, br#""x""#);
    }

    #[test]
    fn valid_json_that_simd_json_refuses_is_relayed_byte_for_byte() {
        for payload in [
            r#"{"i":1,"big":123456789012345678901234567890}"#,
            r#"[-123456789012345678901234567890,1e400,-1e400,1e-400,-0,-0.0,1.7976931348623159e308]"#,
            r#""cut inside an emoji: \ud83d""#,
            r#"{"\udc00":["\ud800x"]}"#,
        ] {
            let text = format!(
                r#"{{"id":123456789012345678901234567890,"method":"publish","params":{{"channel":"c","event":"e","payload":{payload}}}}}"#
            );
            let r = parse(&text).expect(&text);
            assert_eq!(r.id, Some(&b"123456789012345678901234567890"[..]));
            let Ok(Method::Publish(p)) = r.method else {
                panic!("{text}: {:?}", r.method)
            };
            assert_eq!(p.payload, payload.as_bytes());
            let body = format!(r#"{{"channel":"c","event":"e","payload":{payload},"x":1e999}}"#);
            let p = parse_publish_body(body.as_bytes(), 100).expect(&body);
            assert_eq!(p.payload, payload.as_bytes());
            let body = format!(r#"{{"channels":["c","d"],"event":"e","payload":{payload}}}"#);
            let (_, _, p) = parse_broadcast_body(body.as_bytes(), 100, 10).expect(&body);
            assert_eq!(p, payload.as_bytes());
        }
        // A deep payload within the bound, and one beyond it with a message naming the limit.
        let depth = json::DEPTH_MAX - 2;
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let text = format!(
            r#"{{"method":"publish","params":{{"channel":"c","event":"e","payload":{deep}}}}}"#
        );
        assert!(parse(&text).unwrap().method.is_ok());
        let text = format!(
            r#"{{"method":"publish","params":{{"channel":"c","event":"e","payload":[{deep}]}}}}"#
        );
        let e = parse(&text).unwrap_err().error;
        assert!(e.message.contains("deeper than 1024 levels"), "{e:?}");
    }

    #[test]
    fn unreadable_values_in_decoded_members_are_refused() {
        for (text, says) in [
            (
                r#"{"method":"subscribe","params":{"channel":"a\ud800"}}"#,
                "channel holds an unpaired",
            ),
            (
                r#"{"method":"publish","params":{"channel":"a","event":"\udfff","payload":1}}"#,
                "event holds",
            ),
            (
                r#"{"method":"auth","params":{"token":"\ud800"}}"#,
                "token holds",
            ),
            (
                r#"{"method":"subscribe","params":{"channel":"a","since":{"offset":18446744073709551616,"epoch":"e"}}}"#,
                "since must be",
            ),
            (
                r#"{"method":"subscribe","params":{"channel":"a","since":{"offset":1e400,"epoch":"e"}}}"#,
                "since must be",
            ),
            (
                r#"{"method":"subscribe","params":{"channel":123456789012345678901234567890}}"#,
                "params.channel, a string",
            ),
        ] {
            let e = parse(text).expect(text).method.expect_err(text);
            assert_eq!(e.code, Code::InvalidArgument, "{text}");
            assert!(e.message.contains(says), "{text}: {e:?}");
        }
        let r = parse(r#"{"method":"he\udbffartbeat"}"#).unwrap();
        assert!(r.method.unwrap_err().message.contains("method holds"));
        let e = parse_publish_body(br#"{"channel":"\ud800","event":"e","payload":1}"#, 100)
            .unwrap_err();
        assert!(e.message.contains("channel holds"), "{e:?}");
        let e = parse_broadcast_body(
            br#"{"channels":["a","\ud800"],"event":"e","payload":1}"#,
            100,
            9,
        )
        .unwrap_err();
        assert!(e.message.contains("channels holds"), "{e:?}");
        // Members the server does not read may hold anything valid.
        let r = parse(r#"{"method":"heartbeat","x":"\ud800","y":1e400}"#).unwrap();
        assert_eq!(r.method, Ok(Method::Heartbeat));
        // Not JSON: serde_json's description says where.
        let r = parse(r#"{"method":"heartbeat","x":[1,]}"#).unwrap_err();
        assert!(r.error.message.contains("line 1 column"), "{:?}", r.error);
    }

    #[test]
    fn repeated_members_are_refused() {
        // Found by the protocol_request fuzz target: simd-json keeps the first of duplicated
        // keys in small objects and the last in objects of more than 32 members.
        let filler: String = (0..40).map(|i| format!(r#""f{i}":{i},"#)).collect();
        for pad in ["", filler.as_str()] {
            for text in [
                format!(r#"{{{pad}"id":1,"method":"heartbeat","id":{{"a":[1]}}}}"#),
                format!(r#"{{{pad}"id":{{"a":[1]}},"method":"heartbeat","id":1}}"#),
                format!(r#"{{{pad}"method":"heartbeat","m\u0065thod":"auth"}}"#),
                format!(
                    r#"{{{pad}"method":"publish","params":{{"channel":"c","event":"e","payload":[1]}},"params":{{}}}}"#
                ),
            ] {
                let r = parse(&text).expect_err(&text);
                assert_eq!(r.error.code, Code::InvalidArgument, "{text}");
                assert_eq!(r.id, None, "{text}");
            }
            for text in [
                format!(
                    r#"{{"id":7,"method":"publish","params":{{{pad}"channel":"c","event":"e","payload":[1],"payload":2}}}}"#
                ),
                format!(
                    r#"{{"id":7,"method":"subscribe","params":{{{pad}"channel":"c","channel":"d"}}}}"#
                ),
                format!(r#"{{"id":7,"method":"auth","params":{{{pad}"token":"a","token":"b"}}}}"#),
            ] {
                let r = parse(&text).expect(&text);
                assert_eq!(r.id, Some(&b"7"[..]));
                let e = r.method.expect_err(&text);
                assert_eq!(e.code, Code::InvalidArgument, "{text}");
                assert!(e.message.contains("repeats"), "{e:?}");
            }
            // Members the server does not read may repeat.
            let text = format!(r#"{{{pad}"x":1,"x":2,"method":"heartbeat","id":3}}"#);
            assert!(parse(&text).expect(&text).method.is_ok());
            let body = format!(r#"{{{pad}"channel":"c","event":"e","payload":1,"payload":{{}}}}"#);
            let e = parse_publish_body(body.as_bytes(), 100).expect_err(&body);
            assert_eq!(e.code, Code::InvalidArgument);
            let body =
                format!(r#"{{{pad}"channels":["c"],"channels":["d"],"event":"e","payload":1}}"#);
            let e = parse_broadcast_body(body.as_bytes(), 100, 10).expect_err(&body);
            assert_eq!(e.code, Code::InvalidArgument);
        }
    }

    #[test]
    fn params_are_validated() {
        let bad = [
            r#"{"method":"auth"}"#,
            r#"{"method":"auth","params":{"token":5}}"#,
            r#"{"method":"subscribe","params":{"channel":"a b"}}"#,
            r#"{"method":"subscribe","params":{"channel":"a*"}}"#,
            r#"{"method":"subscribe","params":{"channel":"a\u00a0b"}}"#,
            r#"{"method":"subscribe","params":{"channel":"a\u3000b"}}"#,
            r#"{"method":"subscribe","params":{"channel":"a\u0085b"}}"#,
            r#"{"method":"subscribe","params":{"channel":"a\u007fb"}}"#,
            r#"{"method":"subscribe","params":{"channel":""}}"#,
            r#"{"method":"subscribe","params":{"channel":"a","since":{"offset":"1"}}}"#,
            r#"{"method":"unsubscribe","params":{"channel":"\t"}}"#,
            r#"{"method":"publish","params":{"channel":"a","event":"","payload":1}}"#,
            r#"{"method":"publish","params":{"channel":"a","event":"e"}}"#,
        ];
        for text in bad {
            let r = parse(text).unwrap();
            assert_eq!(r.method.unwrap_err().code, Code::InvalidArgument, "{text}");
        }
        let long = format!(
            r#"{{"method":"subscribe","params":{{"channel":"{}"}}}}"#,
            "x".repeat(256)
        );
        assert!(parse(&long).unwrap().method.is_err());
        let ok = format!(
            r#"{{"method":"subscribe","params":{{"channel":"{}"}}}}"#,
            "é".repeat(127)
        );
        assert!(parse(&ok).unwrap().method.is_ok());
        let big =
            r#"{"method":"publish","params":{"channel":"a","event":"e","payload":"0123456789"}}"#;
        let r = parse_request(big.as_bytes(), &mut json::Scratch::default(), 8).unwrap();
        assert_eq!(r.method.unwrap_err().code, Code::ResourceExhausted);
    }

    #[test]
    fn rest_bodies_parse() {
        let p = parse_publish_body(br#" {"channel":"a","event":"e","payload": {"x" :1}}"#, 100)
            .unwrap();
        assert_eq!(p.payload, br#"{"x" :1}"#);
        let e = parse_publish_body(br#"{"channel":"a","event":"e"}"#, 100).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        let (c, _, pl) = parse_broadcast_body(
            br#"{"channels":["a","b"],"event":"e","payload":null}"#,
            100,
            10,
        )
        .unwrap();
        assert_eq!(c, vec!["a", "b"]);
        assert_eq!(pl, b"null");
        assert!(parse_broadcast_body(
            br#"{"channels":["a","b c"],"event":"e","payload":1}"#,
            100,
            10
        )
        .is_err());
    }

    #[test]
    fn revoke_bodies_name_a_user_and_a_time_or_a_jti() {
        let by_time = parse_revoke_body(br#"{"user":"al","issuedBefore":"1970-01-01T00:00:02Z"}"#);
        assert_eq!(by_time.unwrap(), (Target::User("al".into()), 2_000));
        let by_jti = parse_revoke_body(br#"{"jti":"j"}"#);
        assert_eq!(by_jti.unwrap(), (Target::Jti("j".into()), 0));
        for bad in [
            r#"{"jti":"a","jti":[1]}"#,
            r#"{"user":"a","issuedBefore":"1970-01-01T00:00:02Z","issuedBefore":7}"#,
            r#"{"jti":"a","user":"b"}"#,
            r#"{"user":"a"}"#,
            r#"{"jti":""}"#,
        ] {
            let e = parse_revoke_body(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument, "{bad}");
        }
    }
}
