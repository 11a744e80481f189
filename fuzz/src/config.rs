//! A structured generator of `broadcaster.toml` files: known keys with values at the edges.

use arbitrary::Arbitrary;

pub const KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "shards",
    "playground",
    "allowed_origins",
    "shutdown_grace",
    "auth.jwt_secret",
    "auth.api_keys",
    "auth.leeway",
    "auth.revocation_ttl",
    "auth.revocations_max",
    "auth.revocations_file",
    "limits.auth_timeout",
    "limits.http_head_timeout",
    "limits.http_head_bytes_max",
    "limits.max_frame_bytes",
    "limits.max_payload_bytes",
    "limits.requests_per_second",
    "limits.request_burst",
    "limits.max_subscriptions_per_connection",
    "limits.max_connections",
    "limits.outbound_buffer_bytes",
    "limits.write_timeout",
    "limits.ping_interval",
    "history.size",
    "history.ttl",
    "redis.url",
    "redis.mode",
    "redis.urls",
    "redis.master_name",
    "tls.cert_file",
    "tls.key_file",
    "log.level",
    "limits.anonymous_connections_max",
    "limits.anonymous_connections_per_ip_max",
    "limits.rewind_max",
    "limits.connections_per_user_max",
    "limits.trusted_proxies",
    "proxy.secret",
    "proxy.timeout",
    "proxy.concurrency_max",
    "proxy.forward_headers",
    "proxy.subscribe_url",
    "proxy.subscribe_cache_ttl",
    "proxy.connect_url",
    "presence.info_bytes_max",
    "presence.node_timeout",
    "sse.enabled",
    "sse.retry",
    "sse.channels_max",
    "sse.unknown",
    "unknown",
    "limits.unknown",
];

pub const VALUES: &[&str] = &[
    "\"10s\"",
    "\"0s\"",
    "\"500ms\"",
    "\"1ns\"",
    "\"1h 2m\"",
    "\"-1s\"",
    "\"10\"",
    "\"18446744073709551615s\"",
    "\"9223372036854775807s\"",
    "\"100years\"",
    "\"584942417355years\"",
    "0",
    "1",
    "255",
    "256",
    "65536",
    "1048576",
    "-1",
    "9223372036854775807",
    "1.5",
    "true",
    "false",
    "\"127.0.0.1:0\"",
    "\"0.0.0.0:8080\"",
    "\"[::1]:8080\"",
    "\"[::]:80\"",
    "\"localhost:80\"",
    "\"\"",
    "\"s3cret\"",
    "[]",
    "[\"\"]",
    "[\"a\", \"b\"]",
    "[1]",
    "\"info\"",
    "\"broadcaster=debug,warn\"",
    "\"[\"",
    "{}",
    "{ a = 1 }",
    "\"http://127.0.0.1:8000/broadcaster/subscribe\"",
    "\"http://localhost/x\"",
    "\"https://a.example/x\"",
    "\"http://[::1]:99999/\"",
    "[\"10.0.0.0/8\", \"::1\"]",
    "[\"10.0.0.0/33\"]",
    "[\"Cookie\"]",
    "[\"Bad Header\"]",
    "\"scoreboard/*\"",
    "\"*\"",
    "\"a*b\"",
    "\"public\"",
    "\"proxy\"",
    "\"token\"",
    "[\"channel_occupied\", \"member_added\"]",
    "[\"channel_closed\"]",
    "\"ftp://a.example/x\"",
    "\"http:///x\"",
    "1000",
    "1001",
    "10000001",
];

/// Keys of one `[[channels]]` table.
pub const RULE_KEYS: &[&str] = &[
    "pattern",
    "access",
    "history_size",
    "history_ttl",
    "rewind_default",
    "presence",
    "join_leave",
    "presence_members_max",
];

/// Keys of one `[[webhooks]]` table.
pub const WEBHOOK_KEYS: &[&str] = &[
    "url",
    "secret",
    "events",
    "patterns",
    "vacated_delay",
    "batch_max",
    "batch_delay",
    "queue_max",
    "timeout",
    "retry_max_delay",
];

#[derive(Debug, Arbitrary)]
pub enum Value {
    Known(u8),
    Str(String),
    Int(i64),
    Raw(String),
}

#[derive(Debug, Arbitrary)]
pub struct ConfigSpec {
    pub entries: Vec<(u8, Value)>,
    /// `[[channels]]` tables, each a list of (key, value).
    pub rules: Vec<Vec<(u8, Value)>>,
    /// Write dotted keys (`limits.x = 1`) instead of `[limits]` tables.
    pub dotted: bool,
    /// `[[webhooks]]` tables, each a list of (key, value).
    pub webhooks: Vec<Vec<(u8, Value)>>,
}

impl ConfigSpec {
    pub fn encode(&self) -> String {
        let mut top = String::new();
        let mut tables: Vec<(String, String)> = Vec::new();
        for (k, v) in &self.entries {
            let key = KEYS[*k as usize % KEYS.len()];
            let value = value_text(v);
            match key.split_once('.') {
                Some((table, leaf)) if !self.dotted => {
                    let line = format!("{leaf} = {value}\n");
                    match tables.iter_mut().find(|(t, _)| t == table) {
                        Some((_, body)) => body.push_str(&line),
                        None => tables.push((table.to_string(), line)),
                    }
                }
                _ => top.push_str(&format!("{key} = {value}\n")),
            }
        }
        for (table, body) in tables {
            top.push_str(&format!("[{table}]\n{body}"));
        }
        for rule in &self.rules {
            top.push_str("[[channels]]\n");
            for (k, v) in rule {
                let key = RULE_KEYS[*k as usize % RULE_KEYS.len()];
                top.push_str(&format!("{key} = {}\n", value_text(v)));
            }
        }
        for hook in &self.webhooks {
            top.push_str("[[webhooks]]\n");
            for (k, v) in hook {
                let key = WEBHOOK_KEYS[*k as usize % WEBHOOK_KEYS.len()];
                top.push_str(&format!("{key} = {}\n", value_text(v)));
            }
        }
        top
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Known(i) => VALUES[*i as usize % VALUES.len()].to_string(),
        Value::Str(s) => toml_string(s),
        Value::Int(i) => i.to_string(),
        Value::Raw(r) => r.replace('\n', " "),
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
