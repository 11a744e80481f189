//! Every JSON text the server writes, except the broadcast notification (`broadcast.rs`):
//! WebSocket responses and the results in them, and REST answer bodies. Strings are escaped by
//! serde_json; payloads are copied as the publisher wrote them.

use crate::error::Error;

/// Appends `s` as a JSON string.
pub(crate) fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is the reference; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends `n` in decimal.
pub(crate) fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `{"requestId":ID,"result":BODY}`; `body` is JSON text.
pub(crate) fn write_result(out: &mut Vec<u8>, id: Option<&[u8]>, body: &[u8]) {
    out.extend_from_slice(b"{\"requestId\":");
    out.extend_from_slice(id.unwrap_or(b"null"));
    out.extend_from_slice(b",\"result\":");
    out.extend_from_slice(body);
    out.push(b'}');
}

/// Appends `{"requestId":ID,"error":{"code":..,"message":..}}`.
pub(crate) fn write_error(out: &mut Vec<u8>, id: Option<&[u8]>, e: &Error) {
    out.extend_from_slice(b"{\"requestId\":");
    out.extend_from_slice(id.unwrap_or(b"null"));
    out.extend_from_slice(b",\"error\":");
    write_error_object(out, e);
    out.push(b'}');
}

/// `{"code":..,"message":..}`.
fn write_error_object(out: &mut Vec<u8>, e: &Error) {
    out.extend_from_slice(b"{\"code\":\"");
    out.extend_from_slice(e.code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    write_json_string(out, &e.message);
    out.push(b'}');
}

/// A REST error body: the WebSocket error object, wrapped (SPEC 3).
pub(crate) fn rest_error(e: &Error) -> Vec<u8> {
    let mut out = b"{\"error\":".to_vec();
    write_error_object(&mut out, e);
    out.push(b'}');
    out
}

/// `{"success":true}` (auth, unsubscribe).
pub(crate) const SUCCESS: &[u8] = b"{\"success\":true}";

/// `{"timestamp":T}` (heartbeat).
pub(crate) fn heartbeat(timestamp: &str) -> Vec<u8> {
    let mut body = b"{\"timestamp\":".to_vec();
    write_json_string(&mut body, timestamp);
    body.push(b'}');
    body
}

/// `{"id","createTime","offset"}` of a publish result.
pub(crate) fn ack(id: &str, create_time: &str, offset: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(96);
    body.extend_from_slice(b"{\"id\":");
    write_json_string(&mut body, id);
    body.extend_from_slice(b",\"createTime\":");
    write_json_string(&mut body, create_time);
    body.extend_from_slice(b",\"offset\":");
    write_u64(&mut body, offset);
    body.push(b'}');
    body
}

/// The `subscribe` result: `{"subscriptionId","timestamp","offset","epoch","recovered"?}`.
pub(crate) fn subscribed(
    subscription_id: &str,
    timestamp: &str,
    offset: u64,
    epoch: &str,
    recovered: Option<bool>,
    rewound: Option<usize>,
    presence: Option<&[u8]>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(160 + presence.map_or(0, <[u8]>::len));
    body.extend_from_slice(b"{\"subscriptionId\":");
    write_json_string(&mut body, subscription_id);
    body.extend_from_slice(b",\"timestamp\":");
    write_json_string(&mut body, timestamp);
    body.extend_from_slice(b",\"offset\":");
    write_u64(&mut body, offset);
    body.extend_from_slice(b",\"epoch\":");
    write_json_string(&mut body, epoch);
    // SPEC 22.3: a subscribe asks with `since` or with `rewind`, never both, so at most one
    // of these is set.
    match recovered {
        Some(true) => body.extend_from_slice(b",\"recovered\":true"),
        Some(false) => body.extend_from_slice(b",\"recovered\":false"),
        None => {}
    }
    if let Some(k) = rewound {
        body.extend_from_slice(b",\"rewound\":");
        write_u64(&mut body, k as u64);
    }
    if let Some(presence) = presence {
        body.extend_from_slice(b",\"presence\":");
        body.extend_from_slice(presence);
    }
    body.push(b'}');
    body
}

/// `{"members":[{"user","info"}...],"count":N,"version":V}`: a channel's presence (the
/// `presence` method, `GET /presence`, and the subscribe result). A member without `info`
/// has none in its object.
pub(crate) fn presence<'a>(
    members: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    version: u64,
) -> Vec<u8> {
    let mut out = b"{\"members\":[".to_vec();
    let mut count = 0u64;
    for (user, info) in members {
        if count > 0 {
            out.push(b',');
        }
        count += 1;
        write_member(&mut out, user, info);
    }
    out.extend_from_slice(b"],\"count\":");
    write_u64(&mut out, count);
    out.extend_from_slice(b",\"version\":");
    write_u64(&mut out, version);
    out.push(b'}');
    out
}

/// `{"user":U,"info":I}` (no `info` when there is none).
fn write_member(out: &mut Vec<u8>, user: &str, info: Option<&str>) {
    out.push(b'{');
    write_user_info(out, user, info);
    out.push(b'}');
}

/// `"user":U,"info":I` (no `info` when there is none): a member's fields.
fn write_user_info(out: &mut Vec<u8>, user: &str, info: Option<&str>) {
    out.extend_from_slice(b"\"user\":");
    write_json_string(out, user);
    if let Some(info) = info {
        out.extend_from_slice(b",\"info\":");
        out.extend_from_slice(info.as_bytes());
    }
}

/// `{"method":"join"|"leave","params":{"channel","user","info","version"}}`.
pub(crate) fn presence_event(
    kind: &str,
    channel: &str,
    user: &str,
    info: Option<&str>,
    version: u64,
) -> Vec<u8> {
    let mut out = b"{\"method\":".to_vec();
    write_json_string(&mut out, kind);
    out.extend_from_slice(b",\"params\":{\"channel\":");
    write_json_string(&mut out, channel);
    out.push(b',');
    write_user_info(&mut out, user, info);
    out.extend_from_slice(b",\"version\":");
    write_u64(&mut out, version);
    out.extend_from_slice(b"}}");
    out
}

/// `{"method":"unsubscribed","params":{"channel","reason"}}`: the server ended a subscription
/// (SPEC 17); no broadcast of that channel follows it.
pub(crate) fn unsubscribed(channel: &str, reason: &str) -> Vec<u8> {
    let mut out = b"{\"method\":\"unsubscribed\",\"params\":{\"channel\":".to_vec();
    write_json_string(&mut out, channel);
    out.extend_from_slice(b",\"reason\":");
    write_json_string(&mut out, reason);
    out.extend_from_slice(b"}}");
    out
}

/// One publication of a `GET /history` page.
pub(crate) struct HistoryItem<'a> {
    pub id: &'a str,
    pub offset: u64,
    pub create_time: &'a str,
    pub event: &'a str,
    /// Who published it over a WebSocket (`{"user","info"}`), as its broadcast says.
    pub from: Option<&'a str>,
    /// As published, byte for byte.
    pub payload: &'a [u8],
}

/// `{"publications":[{"id","offset","createTime","event","payload"}...],"offset","epoch"}`.
pub(crate) fn history_page<'a>(
    items: impl Iterator<Item = HistoryItem<'a>>,
    offset: u64,
    epoch: &str,
) -> Vec<u8> {
    let mut out = b"{\"publications\":[".to_vec();
    for (i, p) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        write_json_string(&mut out, p.id);
        out.extend_from_slice(b",\"offset\":");
        write_u64(&mut out, p.offset);
        out.extend_from_slice(b",\"createTime\":");
        write_json_string(&mut out, p.create_time);
        out.extend_from_slice(b",\"event\":");
        write_json_string(&mut out, p.event);
        if let Some(from) = p.from {
            out.extend_from_slice(b",\"from\":");
            out.extend_from_slice(from.as_bytes());
        }
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(p.payload);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"offset\":");
    write_u64(&mut out, offset);
    out.extend_from_slice(b",\"epoch\":");
    write_json_string(&mut out, epoch);
    out.push(b'}');
    out
}

/// `{"channels":[{"channel","subscribers","users"}...]}` (`GET /channels`); `users` only for
/// channels that count their members.
pub(crate) fn channel_counts<'a>(
    counts: impl Iterator<Item = (&'a str, usize, Option<usize>)>,
) -> Vec<u8> {
    let mut out = b"{\"channels\":[".to_vec();
    for (i, (channel, n, users)) in counts.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"channel\":");
        write_json_string(&mut out, channel);
        out.extend_from_slice(b",\"subscribers\":");
        write_u64(&mut out, n as u64);
        if let Some(users) = users {
            out.extend_from_slice(b",\"users\":");
            write_u64(&mut out, users as u64);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// `{"results":[{"channel","id","offset"}...]}` (`POST /broadcast`), in request order.
pub(crate) fn broadcast_results<'a>(
    results: impl Iterator<Item = (&'a str, &'a str, u64)>,
) -> Vec<u8> {
    let mut out = b"{\"results\":[".to_vec();
    for (i, (channel, id, offset)) in results.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"channel\":");
        write_json_string(&mut out, channel);
        out.extend_from_slice(b",\"id\":");
        write_json_string(&mut out, id);
        out.extend_from_slice(b",\"offset\":");
        write_u64(&mut out, offset);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// `GET /health` bodies.
pub(crate) mod health {
    pub(crate) const OK: &[u8] = b"{\"status\":\"ok\"}";
    /// Redis unreachable in cluster mode: still 200, existing connections work.
    pub(crate) const DEGRADED: &[u8] = b"{\"status\":\"degraded\"}";
    pub(crate) const SHUTTING_DOWN: &[u8] = b"{\"status\":\"shutting_down\"}";

    /// One of the bodies above with `"rules":"<hash>"` added (SPEC 14), when rules are set.
    pub(crate) fn with_rules(body: &[u8], rules: Option<&str>) -> Vec<u8> {
        let Some(hash) = rules else {
            return body.to_vec();
        };
        let mut out = body[..body.len() - 1].to_vec();
        out.extend_from_slice(b",\"rules\":");
        super::write_json_string(&mut out, hash);
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{err, Code};
    use serde_json::{json, Value};

    fn parse(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    }

    #[test]
    fn every_reply_is_json_with_its_fields() {
        let e = err(Code::NotFound, "no \"such\" thing\n");
        let mut out = Vec::new();
        write_error(&mut out, Some(b"7"), &e);
        assert_eq!(
            parse(&out),
            json!({"requestId":7,"error":{"code":"NotFound","message":"no \"such\" thing\n"}})
        );
        assert_eq!(
            parse(&rest_error(&e)),
            json!({"error":{"code":"NotFound","message":"no \"such\" thing\n"}})
        );
        let mut out = Vec::new();
        write_result(&mut out, None, SUCCESS);
        assert_eq!(
            parse(&out),
            json!({"requestId":null,"result":{"success":true}})
        );
        assert_eq!(parse(&heartbeat("t")), json!({"timestamp":"t"}));
        assert_eq!(
            parse(&ack("n-1", "t", 3)),
            json!({"id":"n-1","createTime":"t","offset":3})
        );
        assert_eq!(
            parse(&subscribed("0-1", "t", 5, "e", Some(false), None, None)),
            json!({"subscriptionId":"0-1","timestamp":"t","offset":5,"epoch":"e","recovered":false})
        );
        let members = presence([("a", Some(r#"{"n":1}"#)), ("b", None)].into_iter(), 9);
        assert_eq!(
            parse(&subscribed("0-1", "t", 5, "e", None, None, Some(&members)))["presence"],
            json!({"members":[{"user":"a","info":{"n":1}},{"user":"b"}],"count":2,"version":9})
        );
        assert_eq!(
            parse(&presence_event("leave", "c", "a\"", None, 3)),
            json!({"method":"leave","params":{"channel":"c","user":"a\"","version":3}})
        );
        assert!(parse(&subscribed("0-1", "t", 5, "e", None, Some(3), None))
            .get("recovered")
            .is_none());
        let item = HistoryItem {
            id: "i",
            offset: 2,
            create_time: "t",
            event: "ev",
            from: Some(r#"{"user":"u"}"#),
            payload: b"[1e400]",
        };
        let page = history_page([item].into_iter(), 2, "e");
        assert!(
            page.windows(7).any(|w| w == b"[1e400]"),
            "payload as published"
        );
        assert!(page.windows(20).any(|w| w == br#","from":{"user":"u"}"#));
        let counts = channel_counts([("a", 2, Some(1)), ("b\"", 1, None)].into_iter());
        assert_eq!(
            parse(&counts),
            json!({"channels":[{"channel":"a","subscribers":2,"users":1},{"channel":"b\"","subscribers":1}]})
        );
        let results = broadcast_results([("a", "i", 1)].into_iter());
        assert_eq!(
            parse(&results),
            json!({"results":[{"channel":"a","id":"i","offset":1}]})
        );
        for body in [health::OK, health::DEGRADED, health::SHUTTING_DOWN] {
            assert!(parse(body)["status"].is_string());
        }
    }
}
