//! The `publish` subcommand (one REST publish, for scripts and cron jobs) and the `connect`
//! terminal client.

use std::collections::HashMap;
use std::time::Duration;

/// Publishes one message through `POST {base}/publish` and returns the JSON answer.
pub fn publish(
    base: &str,
    api_key: &str,
    channel: &str,
    event: &str,
    payload: &str,
) -> Result<String, String> {
    let payload: serde_json::Value =
        serde_json::from_str(payload).map_err(|e| format!("--payload is not JSON: {e}"))?;
    let body = serde_json::json!({"channel": channel, "event": event, "payload": payload});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/publish", base.trim_end_matches('/'));
    let mut response = agent
        .post(&url)
        .header("Authorization", &format!("Bearer {api_key}"))
        .send_json(&body)
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
    use serde_json::{json, Value};
    use tungstenite::{stream::MaybeTlsStream, Message};
    let dropped = |e: &dyn std::fmt::Display| SessionEnd::Dropped(e.to_string());
    let (mut ws, _) = tungstenite::connect(url).map_err(|e| dropped(&e))?;
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    }
    let mut next_id = 1u64;
    let mut send = |ws: &mut tungstenite::WebSocket<_>, method: &str, params: Value| {
        let id = next_id;
        next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        ws.send(Message::text(msg)).map(|_| id)
    };
    let auth_id = send(&mut ws, "auth", json!({"token": token})).map_err(|e| dropped(&e))?;
    let mut subscribe_ids = HashMap::new();
    for (i, p) in positions.iter().enumerate() {
        let mut params = json!({"channel": p.channel});
        if let (Some(offset), Some(epoch)) = (p.offset, &p.epoch) {
            params["since"] = json!({"offset": offset, "epoch": epoch});
        }
        let id = send(&mut ws, "subscribe", params).map_err(|e| dropped(&e))?;
        subscribe_ids.insert(id, i);
    }
    loop {
        while let Ok(line) = lines.try_recv() {
            let params =
                json!({"channel": positions[0].channel, "event": "message", "payload": line});
            send(&mut ws, "publish", params).map_err(|e| dropped(&e))?;
        }
        if lines.is_empty() && is_disconnected(lines) {
            let _ = ws.close(None);
            return Ok(());
        }
        let msg = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(dropped(&e)),
        };
        let Message::Text(text) = msg else {
            if let Message::Close(Some(frame)) = msg {
                return Err(dropped(&format!(
                    "closed {}: {}",
                    u16::from(frame.code),
                    frame.reason
                )));
            }
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if v["method"] == "broadcast" {
            let p = &v["params"];
            let channel = p["channel"].as_str().unwrap_or_default();
            println!(
                "{channel} {}: {}",
                p["event"].as_str().unwrap_or_default(),
                p["payload"]
            );
            if let Some(pos) = positions.iter_mut().find(|x| x.channel == channel) {
                pos.offset = p["offset"].as_u64();
            }
            continue;
        }
        let id = v["requestId"].as_u64().unwrap_or(0);
        if let Some(e) = v.get("error") {
            let text = format!(
                "{}: {}",
                e["code"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            );
            if id == auth_id || subscribe_ids.contains_key(&id) {
                return Err(SessionEnd::Fatal(text));
            }
            eprintln!("error: {text}");
        } else if let Some(&i) = subscribe_ids.get(&id) {
            let r = &v["result"];
            let pos = &mut positions[i];
            if r["recovered"] == false {
                eprintln!(
                    "{}: could not recover missed messages (history gone); continuing live",
                    pos.channel
                );
            }
            if pos.offset.is_none() || r["recovered"] != true {
                pos.offset = r["offset"].as_u64();
            }
            pos.epoch = r["epoch"].as_str().map(str::to_string);
        }
    }
}

fn is_disconnected<T>(rx: &crossbeam_channel::Receiver<T>) -> bool {
    // A receiver whose senders are gone reports Disconnected once drained.
    matches!(
        rx.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}
