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
}

/// The `connect` subcommand: the chat of seed 004. Prints every broadcast as
/// `channel event: payload`, publishes each stdin line to the first channel as event `message`,
/// and after a dropped connection reconnects and resubscribes with `since` so nothing is missed.
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
        })
        .collect();
    let mut backoff = Duration::from_millis(250);
    loop {
        match session(&url, token, &mut positions, &lines) {
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

fn session(
    url: &str,
    token: &str,
    positions: &mut [Position],
    lines: &crossbeam_channel::Receiver<String>,
) -> Result<(), SessionEnd> {
    let mut t = Terminal::open(url, token, positions)?;
    loop {
        while let Ok(line) = lines.try_recv() {
            let channel = &t.positions[0].channel;
            let params =
                serde_json::json!({"channel": channel, "event": "message", "payload": line});
            t.send("publish", params)?;
        }
        if lines.is_empty() && is_disconnected(lines) {
            let _ = t.ws.close(None);
            return Ok(());
        }
        if let Some(text) = t.next_text()? {
            t.on_text(&text)?;
        }
    }
}

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

fn dropped(e: &dyn std::fmt::Display) -> SessionEnd {
    SessionEnd::Dropped(e.to_string())
}

/// One connection of the terminal client: authenticated, subscribed, its requests' ids.
struct Terminal<'p> {
    ws: Socket,
    next_id: u64,
    auth_id: u64,
    /// Subscribe request ids and the position each is for.
    subscribe_ids: HashMap<u64, usize>,
    positions: &'p mut [Position],
}

impl<'p> Terminal<'p> {
    /// Connects, authenticates and subscribes every channel (with `since` where a position is
    /// known, so a reconnect misses nothing).
    fn open(url: &str, token: &str, positions: &'p mut [Position]) -> Result<Self, SessionEnd> {
        use serde_json::json;
        let (mut ws, _) = tungstenite::connect(url).map_err(|e| dropped(&e))?;
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        }
        let mut t = Terminal {
            ws,
            next_id: 1,
            auth_id: 0,
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
            let id = t.send("subscribe", params)?;
            t.subscribe_ids.insert(id, i);
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
            Message::Close(Some(frame)) => Err(dropped(&format!(
                "closed {}: {}",
                u16::from(frame.code),
                frame.reason
            ))),
            _ => Ok(None),
        }
    }

    /// Prints a broadcast, or takes note of a response.
    fn on_text(&mut self, text: &str) -> Result<(), SessionEnd> {
        let Ok(frame) = serde_json::from_str::<Incoming>(text) else {
            eprintln!("unreadable frame from the server: {text}");
            return Ok(());
        };
        let broadcast = frame
            .params
            .filter(|_| frame.method.as_deref() == Some("broadcast"))
            .and_then(|p| serde_json::from_str::<Broadcast>(p.get()).ok());
        if let Some(b) = broadcast {
            // The payload as published, byte for byte: re-encoding it would change numbers
            // (`1.0e10`), spacing and escapes.
            println!("{} {}: {}", b.channel, b.event, b.payload.get());
            if let Some(pos) = self.positions.iter_mut().find(|x| x.channel == b.channel) {
                pos.offset = b.offset;
            }
            return Ok(());
        }
        let id = frame.request_id.unwrap_or(0);
        if let Some(e) = frame.error {
            let text = format!("{}: {}", e.code, e.message);
            if id == self.auth_id || self.subscribe_ids.contains_key(&id) {
                return Err(SessionEnd::Fatal(text));
            }
            eprintln!("error: {text}");
        } else if let (Some(&i), Some(r)) = (self.subscribe_ids.get(&id), frame.result) {
            let pos = &mut self.positions[i];
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
    #[serde(borrow)]
    payload: &'a serde_json::value::RawValue,
}

#[derive(serde::Deserialize)]
struct SubscribeResult {
    offset: Option<u64>,
    epoch: Option<String>,
    recovered: Option<bool>,
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
