//! The `publish` subcommand (one REST publish, for scripts and cron jobs) and the `connect`
//! terminal client.

use std::collections::HashMap;
use std::time::Duration;

/// Publishes one message through `POST {base}/publish` and returns the JSON answer. The payload
/// is checked to be one JSON text and sent exactly as given (spacing, key order, number
/// spelling and escapes are the caller's).
pub fn publish(
    base: &str,
    api_key: &str,
    channel: &str,
    event: &str,
    payload: &str,
) -> Result<String, String> {
    crate::wire::json::validate(payload.as_bytes())
        .map_err(|e| format!("--payload: {}", e.message("it")))?;
    let body = publish_body(channel, event, payload);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/publish", base.trim_end_matches('/'));
    let mut response = agent
        .post(&url)
        .header("Authorization", &format!("Bearer {api_key}"))
        .header("Content-Type", "application/json")
        .send(&body[..])
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    if status == 200 {
        Ok(text)
    } else {
        Err(format!("HTTP {status}: {text}"))
    }
}

/// `{"channel":C,"event":E,"payload":P}` with `payload` as it is (already checked to be JSON).
fn publish_body(channel: &str, event: &str, payload: &str) -> Vec<u8> {
    let mut body = b"{\"channel\":".to_vec();
    crate::wire::reply::write_json_string(&mut body, channel);
    body.extend_from_slice(b",\"event\":");
    crate::wire::reply::write_json_string(&mut body, event);
    body.extend_from_slice(b",\"payload\":");
    body.extend_from_slice(payload.as_bytes());
    body.push(b'}');
    body
}

/// Where the terminal client stands in one channel, so a reconnect can ask for what it missed.
struct Position {
    channel: String,
    offset: Option<u64>,
    epoch: Option<String>,
    /// The presence version already shown (snapshot, then each join/leave printed); None when
    /// the subscribe result had no snapshot, and then every join/leave is shown.
    presence_version: Option<u64>,
}

/// The `connect` subcommand: the chat of seed 004. Says on stderr whom it connected as; prints
/// chat messages (event `message` published over a WebSocket) as `alice: text`, other
/// broadcasts as `channel event: payload`, who is in a presence channel when it subscribes and
/// who joins and leaves; publishes each stdin line to the first channel as event `message`; and
/// after a dropped connection (4006 from the backend included) reconnects and resubscribes with
/// `since` so nothing is missed. A channel the server unsubscribes (SPEC 17) is said on stderr
/// and not resubscribed; with none left it exits 0. A close 4007 (token revoked) is an error:
/// the same token would only be refused again.
pub fn connect(url: &str, token: &str, channels: &[String]) -> Result<(), String> {
    use std::io::BufRead;
    if channels.is_empty() {
        return Err("name at least one --channel".into());
    }
    let url = ws_url(url);
    let (lines_tx, lines) = crossbeam_channel::unbounded::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut positions: Vec<Position> = channels
        .iter()
        .map(|c| Position {
            channel: c.clone(),
            offset: None,
            epoch: None,
            presence_version: None,
        })
        .collect();
    let greeting = match token_name(token) {
        Some(name) => format!("connected to {url} as {}", printable(&name)),
        None => format!("connected to {url}"),
    };
    let setup = Setup {
        url: &url,
        token,
        greeting: &greeting,
        // Kept when the server unsubscribes the first channel: typed lines must not silently
        // go to another audience.
        publish_to: &channels[0],
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        match session(&setup, &mut positions, &lines) {
            Ok(()) => return Ok(()),
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Dropped(e)) => {
                eprintln!("connection lost ({e}); reconnecting in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// What every connection of one `connect` run uses.
struct Setup<'a> {
    url: &'a str,
    token: &'a str,
    /// Printed (stderr) once `auth` succeeds.
    greeting: &'a str,
    /// The channel stdin lines are published to: the first one named.
    publish_to: &'a str,
}

enum SessionEnd {
    /// Worth retrying: the network or the server went away.
    Dropped(String),
    /// Retrying cannot help: bad token, no permission.
    Fatal(String),
}

fn ws_url(url: &str) -> String {
    let url = url
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    if url.trim_end_matches('/').ends_with("/ws") {
        url
    } else {
        format!("{}/ws", url.trim_end_matches('/'))
    }
}

/// The name a token shows as: its `info.username`, else its `sub`. Read without checking the
/// signature: the server checks it at `auth`, and this only labels the session.
fn token_name(token: &str) -> Option<String> {
    let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    let sub = claims.get("sub").and_then(serde_json::Value::as_str)?;
    Some(display_name(sub, claims.get("info")).to_string())
}

/// How a member or publisher is shown: `info.username` when it is a string, else the user (the
/// token's `sub`).
fn display_name<'a>(user: &'a str, info: Option<&'a serde_json::Value>) -> &'a str {
    info.and_then(|i| i.get("username"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or(user)
}

/// `text` with control characters escaped: names and chat text come from other users, and an
/// escape sequence or newline in them must not drive the terminal or fake a line.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// The line printed for a broadcast: `name: text` for a chat message (event `message` with the
/// server-set `from`), else `channel event: payload` with the payload byte for byte, as
/// re-encoding it would change numbers (`1.0e10`), spacing and escapes.
fn broadcast_line(b: &Broadcast) -> String {
    match &b.from {
        Some(from) if b.event == "message" => {
            let name = display_name(&from.user, from.info.as_ref());
            // A JSON string is shown as its text; anything else (or a string serde refuses,
            // like an unpaired surrogate escape) as published.
            let raw = b.payload.get();
            let text: std::borrow::Cow<str> =
                serde_json::from_str::<String>(raw).map_or_else(|_| raw.into(), Into::into);
            format!("{}: {}", printable(name), printable(&text))
        }
        _ => format!("{} {}: {}", b.channel, b.event, b.payload.get()),
    }
}

/// Whether a join/leave of `version` is news given the version already shown (`seen`), which
/// it then advances. The server may deliver an event that the snapshot already reflects.
fn presence_event_is_new(seen: &mut Option<u64>, version: u64) -> bool {
    match seen {
        Some(v) if version <= *v => false,
        Some(v) => {
            *v = version;
            true
        }
        None => true,
    }
}

/// `in chat/x: alice, bob (2)`.
fn members_line(channel: &str, p: &PresenceSnapshot) -> String {
    let names: Vec<_> = p
        .members
        .iter()
        .map(|m| printable(display_name(&m.user, m.info.as_ref())))
        .collect();
    let names = if names.is_empty() {
        "nobody".to_string()
    } else {
        names.join(", ")
    };
    format!(
        "in {channel}: {names} ({})",
        p.count.unwrap_or(p.members.len() as u64)
    )
}

/// One connection, until stdin ends (Ok), the server leaves no channel to follow (Ok), or it
/// ends otherwise (Err).
fn session(
    setup: &Setup,
    positions: &mut Vec<Position>,
    lines: &crossbeam_channel::Receiver<String>,
) -> Result<(), SessionEnd> {
    let mut t = Terminal::open(setup.url, setup.token, setup.greeting, positions)?;
    loop {
        while let Ok(line) = lines.try_recv() {
            let params = serde_json::json!(
                {"channel": setup.publish_to, "event": "message", "payload": line}
            );
            t.send("publish", params)?;
        }
        if lines.is_empty() && is_disconnected(lines) {
            let _ = t.ws.close(None);
            return Ok(());
        }
        if let Some(text) = t.next_text()? {
            t.on_text(&text)?;
        }
        if t.positions.is_empty() {
            eprintln!("no channel left to follow; exiting");
            let _ = t.ws.close(None);
            // Sends the close frame; the answer is not worth waiting for.
            let _ = t.ws.flush();
            return Ok(());
        }
    }
}

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

fn dropped(e: &dyn std::fmt::Display) -> SessionEnd {
    SessionEnd::Dropped(e.to_string())
}

/// How a close frame from the server ends the session. The reason is the backend's text
/// (`POST /disconnect`), so it is escaped before it reaches the terminal.
fn closed(code: u16, reason: &str) -> SessionEnd {
    use crate::error::close;
    let reason = printable(reason);
    let reason = if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    };
    match code {
        // Retrying with this token cannot succeed (SPEC 22.1).
        close::REVOKED => SessionEnd::Fatal(format!(
            "the token was revoked (closed {code}{reason}); get a new token and connect with it"
        )),
        // The backend's `POST /disconnect`: reconnecting is allowed.
        close::DISCONNECTED => SessionEnd::Dropped(format!(
            "disconnected by the backend, closed {code}{reason}"
        )),
        _ => SessionEnd::Dropped(format!("closed {code}{reason}")),
    }
}

/// One connection of the terminal client: authenticated, subscribed, its requests' ids.
struct Terminal<'p> {
    ws: Socket,
    next_id: u64,
    auth_id: u64,
    /// Printed (stderr) once `auth` succeeds.
    greeting: &'p str,
    /// Subscribe request ids and the channel each is for (by name: positions the server
    /// unsubscribes are removed, which moves the others).
    subscribe_ids: HashMap<u64, String>,
    positions: &'p mut Vec<Position>,
}

impl<'p> Terminal<'p> {
    /// Connects, authenticates and subscribes every channel (with `since` where a position is
    /// known, so a reconnect misses nothing).
    fn open(
        url: &str,
        token: &str,
        greeting: &'p str,
        positions: &'p mut Vec<Position>,
    ) -> Result<Self, SessionEnd> {
        use serde_json::json;
        let (mut ws, _) = tungstenite::connect(url).map_err(|e| dropped(&e))?;
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        }
        let mut t = Terminal {
            ws,
            next_id: 1,
            auth_id: 0,
            greeting,
            subscribe_ids: HashMap::new(),
            positions,
        };
        t.auth_id = t.send("auth", json!({"token": token}))?;
        for i in 0..t.positions.len() {
            let p = &t.positions[i];
            let mut params = json!({"channel": p.channel});
            if let (Some(offset), Some(epoch)) = (p.offset, &p.epoch) {
                params["since"] = json!({"offset": offset, "epoch": epoch});
            }
            let channel = p.channel.clone();
            let id = t.send("subscribe", params)?;
            t.subscribe_ids.insert(id, channel);
        }
        Ok(t)
    }

    /// Sends a request; returns its id.
    fn send(&mut self, method: &str, params: serde_json::Value) -> Result<u64, SessionEnd> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = serde_json::json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(tungstenite::Message::text(msg))
            .map_err(|e| dropped(&e))?;
        Ok(id)
    }

    /// The next text frame, None when the read timed out (to look at stdin again) or brought
    /// another kind of frame; a close is the end of the session.
    fn next_text(&mut self) -> Result<Option<String>, SessionEnd> {
        use tungstenite::Message;
        let msg = match self.ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(dropped(&e)),
        };
        match msg {
            Message::Text(text) => Ok(Some(text.to_string())),
            Message::Close(Some(frame)) => Err(closed(u16::from(frame.code), &frame.reason)),
            _ => Ok(None),
        }
    }

    /// Prints a broadcast or a join/leave, or takes note of a response.
    fn on_text(&mut self, text: &str) -> Result<(), SessionEnd> {
        let Ok(frame) = serde_json::from_str::<Incoming>(text) else {
            eprintln!("unreadable frame from the server: {text}");
            return Ok(());
        };
        match (frame.method.as_deref(), frame.params) {
            (Some("broadcast"), Some(params)) => self.on_broadcast(params.get()),
            (Some(kind @ ("join" | "leave")), Some(params)) => {
                self.on_presence_event(kind, params.get())
            }
            (Some("unsubscribed"), Some(params)) => self.on_unsubscribed(params.get()),
            // Other notifications carry nothing the terminal shows.
            (Some(_), _) => {}
            (None, _) => {
                return self.on_response(frame.request_id.unwrap_or(0), frame.result, frame.error)
            }
        }
        Ok(())
    }

    fn on_broadcast(&mut self, params: &str) {
        let Ok(b) = serde_json::from_str::<Broadcast>(params) else {
            eprintln!("unreadable broadcast from the server: {params}");
            return;
        };
        println!("{}", broadcast_line(&b));
        if let Some(pos) = self.positions.iter_mut().find(|x| x.channel == b.channel) {
            pos.offset = b.offset;
        }
    }

    /// `alice joined chat/x` / `alice left chat/x`, unless the snapshot or an earlier event
    /// already showed it.
    fn on_presence_event(&mut self, kind: &str, params: &str) {
        let Ok(e) = serde_json::from_str::<PresenceEvent>(params) else {
            eprintln!("unreadable {kind} from the server: {params}");
            return;
        };
        let Some(pos) = self.positions.iter_mut().find(|x| x.channel == e.channel) else {
            return;
        };
        if presence_event_is_new(&mut pos.presence_version, e.version) {
            let verb = if kind == "join" { "joined" } else { "left" };
            let name = display_name(&e.user, e.info.as_ref());
            println!("{} {verb} {}", printable(name), e.channel);
        }
    }

    /// `unsubscribed from chat/x (server)`: the server ended that subscription (SPEC 17), so
    /// it is dropped from what a reconnect resubscribes; resubscribing would undo the backend's
    /// decision, or be refused.
    fn on_unsubscribed(&mut self, params: &str) {
        let Ok(u) = serde_json::from_str::<Unsubscribed>(params) else {
            eprintln!("unreadable unsubscribed from the server: {params}");
            return;
        };
        let reason = u.reason.as_deref().unwrap_or("no reason given");
        eprintln!(
            "unsubscribed from {} ({})",
            printable(&u.channel),
            printable(reason)
        );
        self.positions.retain(|p| p.channel != u.channel);
    }

    fn on_response(
        &mut self,
        id: u64,
        result: Option<SubscribeResult>,
        error: Option<ErrorObject>,
    ) -> Result<(), SessionEnd> {
        if let Some(e) = error {
            let text = format!("{}: {}", e.code, e.message);
            if id == self.auth_id || self.subscribe_ids.contains_key(&id) {
                return Err(SessionEnd::Fatal(text));
            }
            eprintln!("error: {text}");
        } else if id == self.auth_id {
            eprintln!("{}", self.greeting);
        } else if let (Some(channel), Some(r)) = (self.subscribe_ids.get(&id), result) {
            // None: the server unsubscribed it meanwhile.
            let Some(pos) = self.positions.iter_mut().find(|p| &p.channel == channel) else {
                return Ok(());
            };
            if r.recovered == Some(false) {
                eprintln!(
                    "{}: could not recover missed messages (history gone); continuing live",
                    pos.channel
                );
            }
            if pos.offset.is_none() || r.recovered != Some(true) {
                pos.offset = r.offset;
            }
            pos.epoch = r.epoch;
            // A new snapshot after a reconnect: versions before it are in it.
            pos.presence_version = r.presence.as_ref().map(|p| p.version);
            if let Some(p) = &r.presence {
                println!("{}", members_line(&pos.channel, p));
            }
        }
        Ok(())
    }
}

/// A frame from the server, as far as the terminal client reads it. Unknown members are
/// skipped without being converted, so any JSON a payload holds is fine.
#[derive(serde::Deserialize)]
struct Incoming<'a> {
    method: Option<String>,
    #[serde(borrow)]
    params: Option<&'a serde_json::value::RawValue>,
    #[serde(rename = "requestId")]
    request_id: Option<u64>,
    result: Option<SubscribeResult>,
    error: Option<ErrorObject>,
}

#[derive(serde::Deserialize)]
struct Broadcast<'a> {
    channel: String,
    event: String,
    offset: Option<u64>,
    /// The publisher, set by the server for publications made over a WebSocket.
    from: Option<Member>,
    #[serde(borrow)]
    payload: &'a serde_json::value::RawValue,
}

/// A member of a channel, or the publisher of a broadcast: the token's `sub` and `info`.
#[derive(serde::Deserialize)]
struct Member {
    user: String,
    info: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct PresenceSnapshot {
    members: Vec<Member>,
    count: Option<u64>,
    version: u64,
}

/// The params of an `unsubscribed`.
#[derive(serde::Deserialize)]
struct Unsubscribed {
    channel: String,
    reason: Option<String>,
}

/// The params of a `join` or `leave`.
#[derive(serde::Deserialize)]
struct PresenceEvent {
    channel: String,
    user: String,
    info: Option<serde_json::Value>,
    version: u64,
}

#[derive(serde::Deserialize)]
struct SubscribeResult {
    offset: Option<u64>,
    epoch: Option<String>,
    recovered: Option<bool>,
    presence: Option<PresenceSnapshot>,
}

#[derive(serde::Deserialize)]
struct ErrorObject {
    code: String,
    message: String,
}

fn is_disconnected<T>(rx: &crossbeam_channel::Receiver<T>) -> bool {
    // A receiver whose senders are gone reports Disconnected once drained.
    matches!(
        rx.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(params: &str) -> String {
        broadcast_line(&serde_json::from_str(params).unwrap())
    }

    #[test]
    fn chat_messages_show_the_sender_and_the_text() {
        let from = r#""from":{"user":"u1","info":{"username":"alice"}}"#;
        let b = |event: &str, from: &str, payload: &str| {
            format!(
                r#"{{"channel":"chat/x","event":"{event}","offset":3{from},"payload":{payload}}}"#
            )
        };
        let with = format!(",{from}");
        assert_eq!(
            line(&b("message", &with, r#""Hello everyone!""#)),
            "alice: Hello everyone!"
        );
        assert_eq!(
            line(&b("message", &with, r#"{"a": 1.0e10}"#)),
            r#"alice: {"a": 1.0e10}"#
        );
        // An unpaired surrogate is not a Rust string: shown as published.
        assert_eq!(
            line(&b("message", &with, r#""\ud83d""#)),
            r#"alice: "\ud83d""#
        );
        assert_eq!(
            line(&b("message", &with, r#""a\u001b[2Jb\nc""#)),
            r"alice: a\u{1b}[2Jb\nc"
        );
        let no_info = r#","from":{"user":"bob"}"#;
        assert_eq!(line(&b("message", no_info, r#""hi""#)), "bob: hi");
        // Not a chat message: REST publications (no from) and other events.
        assert_eq!(
            line(&b("message", "", r#""hi""#)),
            r#"chat/x message: "hi""#
        );
        assert_eq!(line(&b("score", &with, "[1]")), "chat/x score: [1]");
    }

    #[test]
    fn close_4007_is_final_and_4006_is_retried() {
        let SessionEnd::Fatal(e) = closed(4007, "token revoked") else {
            panic!("4007 must not be retried");
        };
        assert!(e.contains("revoked") && e.contains("new token"), "{e}");
        let SessionEnd::Dropped(e) = closed(4006, "") else {
            panic!("4006 allows a reconnect");
        };
        assert_eq!(e, "disconnected by the backend, closed 4006");
        let SessionEnd::Dropped(e) = closed(4003, "slow\n") else {
            panic!("4003 allows a reconnect");
        };
        assert_eq!(e, "closed 4003: slow\\n");
    }

    #[test]
    fn join_and_leave_at_or_below_the_snapshot_are_not_news() {
        let mut seen = Some(5);
        assert!(!presence_event_is_new(&mut seen, 4));
        assert!(!presence_event_is_new(&mut seen, 5));
        assert!(presence_event_is_new(&mut seen, 6));
        assert!(!presence_event_is_new(&mut seen, 6));
        assert_eq!(seen, Some(6));
        let mut none = None;
        assert!(presence_event_is_new(&mut none, 1));
        assert!(presence_event_is_new(&mut none, 1));
    }

    #[test]
    fn members_line_names_everyone_present() {
        let p: PresenceSnapshot = serde_json::from_str(
            r#"{"members":[{"user":"u1","info":{"username":"alice"}},{"user":"bob"},
               {"user":"c","info":{"username":7}}],"count":3,"version":9}"#,
        )
        .unwrap();
        assert_eq!(members_line("chat/x", &p), "in chat/x: alice, bob, c (3)");
        let empty: PresenceSnapshot =
            serde_json::from_str(r#"{"members":[],"count":0,"version":1}"#).unwrap();
        assert_eq!(members_line("c", &empty), "in c: nobody (0)");
    }

    #[test]
    fn token_name_is_the_username_or_the_sub() {
        let info = serde_json::json!({"username": "alice"});
        let token = crate::auth::mint_with_info(
            "s",
            "u1",
            &["*".into()],
            &["subscribe".into()],
            Duration::from_secs(60),
            Some(&info),
        )
        .unwrap();
        assert_eq!(token_name(&token).as_deref(), Some("alice"));
        let token = crate::auth::mint_with_info(
            "s",
            "u2",
            &["*".into()],
            &["subscribe".into()],
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        assert_eq!(token_name(&token).as_deref(), Some("u2"));
        assert_eq!(token_name("not a token"), None);
    }
}
