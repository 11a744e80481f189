//! Presence (SPEC 16) as the load generator sees it: the `join`/`leave` notifications and the
//! presence objects (`{"members","count","version"}`) of subscribe results, of the `presence`
//! method and of `GET /presence`; the ordering checker ([`tracker`]); and the observer
//! connections that run it ([`observer`]), shared by the `presence` scenario and the soak.

pub(crate) mod observer;
pub(crate) mod settle;
pub(crate) mod tracker;

use serde_json::Value;

use crate::net::Node;
use tracker::{Kind, Notice};

/// A presence object: who is present, how many, at which version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// The members' users (`sub`s), in the server's order.
    pub(crate) users: Vec<String>,
    pub(crate) count: u64,
    pub(crate) version: u64,
}

/// A `{"members":[{"user",...}],"count","version"}` object.
fn snapshot_of(v: &Value) -> Option<Snapshot> {
    let users = v
        .get("members")?
        .as_array()?
        .iter()
        .map(|m| m.get("user").and_then(Value::as_str).map(str::to_string))
        .collect::<Option<Vec<_>>>()?;
    Some(Snapshot {
        users,
        count: v.get("count")?.as_u64()?,
        version: v.get("version")?.as_u64()?,
    })
}

/// A text frame, parsed as JSON when it may be a notification or a response with presence in it
/// (the rest are broadcasts, which the presence paths skip unparsed).
pub(crate) enum Frame {
    /// A `join` or `leave`.
    Notice(Notice),
    /// A response: its request id, error code, and presence object (the subscribe result's
    /// `presence`, or the `presence` method's whole result).
    Response {
        id: Option<u64>,
        error: Option<String>,
        presence: Option<Snapshot>,
    },
    /// Anything else.
    Other,
}

/// Classifies one text frame from the server.
pub(crate) fn parse_frame(text: &[u8]) -> Frame {
    let Ok(v) = serde_json::from_slice::<Value>(text) else {
        return Frame::Other;
    };
    if let Some(id) = v.get("requestId") {
        let error = v
            .get("error")
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let result = v.get("result");
        let presence = result
            .and_then(|r| r.get("presence"))
            .and_then(snapshot_of)
            .or_else(|| result.and_then(snapshot_of));
        return Frame::Response {
            id: id.as_u64(),
            error,
            presence,
        };
    }
    notice_of(&v).map_or(Frame::Other, Frame::Notice)
}

/// A `{"method":"join"|"leave","params":{"channel","user","version",...}}` notification.
fn notice_of(v: &Value) -> Option<Notice> {
    let kind = match v.get("method")?.as_str()? {
        "join" => Kind::Join,
        "leave" => Kind::Leave,
        _ => return None,
    };
    let p = v.get("params")?;
    Some(Notice {
        kind,
        channel: p.get("channel")?.as_str()?.to_string(),
        user: p.get("user")?.as_str()?.to_string(),
        version: p.get("version")?.as_u64()?,
    })
}

/// Whether a text frame may be a presence notification (a byte search, so the receive paths
/// parse only those).
pub(crate) fn may_be_notice(text: &[u8]) -> bool {
    crate::ws::find(text, b"\"join\"").is_some() || crate::ws::find(text, b"\"leave\"").is_some()
}

/// `{"id":ID,"method":METHOD,"params":{"channel":CHANNEL}}`.
pub(crate) fn channel_request(id: u64, method: &str, channel: &str) -> Vec<u8> {
    let mut req = Vec::with_capacity(96 + channel.len());
    req.extend_from_slice(b"{\"id\":");
    crate::extract::push_u64(&mut req, id);
    req.extend_from_slice(b",\"method\":");
    crate::extract::push_json_str(&mut req, method);
    req.extend_from_slice(b",\"params\":{\"channel\":");
    crate::extract::push_json_str(&mut req, channel);
    req.extend_from_slice(b"}}");
    req
}

/// `GET /presence?channel=C` on `node` with the API key.
pub(crate) fn rest_presence(node: &Node, api_key: &str, channel: &str) -> Result<Snapshot, String> {
    let path = format!("/presence?channel={}", percent_encode(channel));
    let (status, body) = crate::http::get(node, &path, Some(api_key))?;
    let text = String::from_utf8_lossy(&body);
    if status != 200 {
        return Err(format!(
            "GET {path} on {} answered HTTP {status}: {text}",
            node.addr
        ));
    }
    serde_json::from_slice::<Value>(&body)
        .ok()
        .as_ref()
        .and_then(snapshot_of)
        .ok_or_else(|| format!("GET {path} answered no presence object: {text}"))
}

/// `s` with every byte but RFC 3986's unreserved ones percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_parsed() {
        let join = br#"{"method":"join","params":{"channel":"room/a","user":"alice","info":{"username":"Alice"},"version":7}}"#;
        assert!(may_be_notice(join));
        let Frame::Notice(n) = parse_frame(join) else {
            panic!("not a notice")
        };
        assert_eq!(
            n,
            Notice {
                kind: Kind::Join,
                channel: "room/a".into(),
                user: "alice".into(),
                version: 7
            }
        );
        let leave = br#"{"method":"leave","params":{"channel":"room/a","user":"bob","version":8}}"#;
        assert!(matches!(
            parse_frame(leave),
            Frame::Notice(Notice {
                kind: Kind::Leave,
                ..
            })
        ));
        let broadcast =
            br#"{"method":"broadcast","params":{"channel":"c","seq":1,"offset":1,"payload":{}}}"#;
        assert!(!may_be_notice(broadcast));
        assert!(matches!(parse_frame(broadcast), Frame::Other));
        assert!(matches!(parse_frame(b"not json"), Frame::Other));
    }

    #[test]
    fn presence_objects_of_subscribe_and_method_results() {
        let sub = br#"{"requestId":3,"result":{"subscriptionId":"s","offset":0,"epoch":"e","presence":{"members":[{"user":"a","info":{"x":1}},{"user":"b"}],"count":2,"version":9}}}"#;
        let Frame::Response {
            id,
            error,
            presence,
        } = parse_frame(sub)
        else {
            panic!("not a response")
        };
        assert_eq!((id, error), (Some(3), None));
        let p = presence.unwrap();
        assert_eq!(
            (p.users, p.count, p.version),
            (vec!["a".into(), "b".into()], 2, 9)
        );
        let method = br#"{"requestId":4,"result":{"members":[],"count":0,"version":12}}"#;
        let Frame::Response { presence, .. } = parse_frame(method) else {
            panic!("not a response")
        };
        assert_eq!(presence.unwrap().version, 12);
        let plain = br#"{"requestId":5,"result":{"subscriptionId":"s","offset":0}}"#;
        assert!(matches!(
            parse_frame(plain),
            Frame::Response { presence: None, .. }
        ));
        let err = br#"{"requestId":6,"error":{"code":"FailedPrecondition","message":"off"}}"#;
        let Frame::Response { error, .. } = parse_frame(err) else {
            panic!("not a response")
        };
        assert_eq!(error.as_deref(), Some("FailedPrecondition"));
    }

    #[test]
    fn requests_are_json() {
        let r = channel_request(7, "presence", "room/\"a\"");
        let v: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":7,"method":"presence","params":{"channel":"room/\"a\""}})
        );
    }

    #[test]
    fn channel_names_are_percent_encoded() {
        assert_eq!(percent_encode("room/lt-1_2.x~"), "room%2Flt-1_2.x~");
        assert_eq!(percent_encode("a b&c=é"), "a%20b%26c%3D%C3%A9");
    }

    #[test]
    fn rest_presence_reads_the_object() {
        let body = r#"{"members":[{"user":"u"}],"count":1,"version":3}"#;
        let (node, t) = crate::net::answer_once(body);
        let s = rest_presence(&node, "k", "room/a").unwrap();
        let head = t.join().unwrap();
        assert!(
            head.starts_with("GET /presence?channel=room%2Fa HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("Authorization: Bearer k\r\n"), "{head}");
        assert_eq!((s.count, s.version, s.users.len()), (1, 3, 1));
    }
}
