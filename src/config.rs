//! Every tunable with its default, and the file / environment / flag layering.
//!
//! Layering works on one TOML table: the file is read first, then every `BROADCASTER_*` variable
//! that names a known key replaces that key, then the command-line flags replace theirs. Only the
//! merged table is deserialized, so a bad value is reported once, with the key's dotted path, no
//! matter which layer it came from.

use crate::clock::duration;
use crate::constants::SHARDS_MAX;
use crate::rules::{self, RuleConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a configuration was refused. The message always names the key and what to change.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration: the TOML file's keys, each overridable by environment and flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public listener. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Backend listener: when set, the backend endpoints (REST, metrics) move here and the
    /// public listener answers them 404. Default: none.
    pub admin_listen: Option<SocketAddr>,
    /// Shards to run; 0 (the default) means one per CPU the process may run on.
    pub shards: usize,
    /// Serve the playground page at `/`. Default false; always on in dev mode.
    pub playground: bool,
    /// Browser origins allowed at the handshake (403 otherwise); empty (the default) allows
    /// any, as dev mode does.
    pub allowed_origins: Vec<String>,
    /// How long a shutdown waits for queued messages to leave. Default 5 s.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[limits]`.
    pub limits: Limits,
    /// `[compression]`: permessage-deflate (SPEC 20).
    pub compression: CompressionConfig,
    /// `[history]`.
    pub history: HistoryConfig,
    /// `[redis]`.
    pub redis: RedisConfig,
    /// `[tls]`.
    pub tls: TlsConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[sse]`: server-sent events (SPEC 19).
    pub sse: SseConfig,
    /// `[[channels]]`: per-channel access, history and rewind (SPEC 14); file only.
    pub channels: Vec<RuleConfig>,
    /// `[proxy]`: the backend asked over HTTP (SPEC 15).
    pub proxy: ProxyConfig,
    /// `[presence]`: members and join/leave (SPEC 16).
    pub presence: PresenceConfig,
    /// `[[webhooks]]`: backends told of channel and member changes (SPEC 18); file only.
    pub webhooks: Vec<WebhookConfig>,
    /// Set when no JWT secret was configured and one was generated (SPEC section 2).
    #[serde(skip)]
    pub dev_mode: bool,
    /// The token dev mode printed; the playground page is pre-filled with it (loopback only).
    #[serde(skip)]
    pub dev_token: Option<String>,
}

/// `[auth]`: client tokens and backend keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret of client tokens. Unset: dev mode (a generated one, loopback only).
    pub jwt_secret: Option<String>,
    /// Backend API keys; several at once so they can be rotated. Default none.
    pub api_keys: Vec<String>,
    /// Clock skew allowed on a token's `exp`, at most 1 hour. Default 0 s.
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// How long a `/revoke` is kept: longer than the longest token lifetime. Default 24 h.
    #[serde(with = "duration")]
    pub revocation_ttl: Duration,
    /// Revocations kept at once; more are ResourceExhausted. Default 100,000.
    pub revocations_max: usize,
    /// A file the node appends each revocation to and reads back at start, so a single node
    /// keeps them across a restart (cluster mode keeps them in Redis). Default none.
    pub revocations_file: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            api_keys: Vec::new(),
            leeway: Duration::ZERO,
            revocation_ttl: Duration::from_secs(24 * 3600),
            revocations_max: 100_000,
            revocations_file: None,
        }
    }
}

/// `[limits]`: a bound on everything a client can make the server hold or do (SPEC 6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A connection with no successful `auth` by then is closed 4001. Default 10 s.
    #[serde(with = "duration")]
    pub auth_timeout: Duration,
    /// A request head (and body) not complete by then drops the connection. Default 10 s.
    #[serde(with = "duration")]
    pub http_head_timeout: Duration,
    /// Larger request heads are answered 431. Default 8 KiB.
    pub http_head_bytes_max: usize,
    /// Larger WebSocket messages close the connection 1009. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Larger payloads are ResourceExhausted / 413; at most `max_frame_bytes`. Default 64 KiB.
    pub max_payload_bytes: usize,
    /// Token bucket refill per connection. Default 100 requests a second.
    pub requests_per_second: u32,
    /// Token bucket size. Default 200.
    pub request_burst: u32,
    /// More subscribes are ResourceExhausted. Default 1024.
    pub max_subscriptions_per_connection: usize,
    /// WebSocket connections per node; more are answered 503 at the handshake. Default 1,000,000.
    pub max_connections: usize,
    /// Bytes queued for one connection (queued and being written); a broadcast beyond it closes
    /// the connection 4003, so one slow client never holds more. Default 1 MiB, as centrifuge's
    /// ClientQueueMaxSize: room for ~5,000 small broadcasts.
    pub outbound_buffer_bytes: usize,
    /// A write without progress for this long closes the connection. Default 10 s.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Server ping period; a client silent for twice this is closed 4005. Default 30 s.
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// Connections not (yet) authenticated per node; more are answered 503 at the handshake.
    /// Default 500,000.
    pub anonymous_connections_max: usize,
    /// Connections not (yet) authenticated per client address; more are answered 503 at the
    /// handshake. Default 64: a NAT of viewers, not one script holding thousands.
    pub anonymous_connections_per_ip_max: usize,
    /// Most publications one `rewind` may ask for. Default 100.
    pub rewind_max: usize,
    /// Most connections one user (token `sub`) may hold authenticated on this node; an `auth`
    /// beyond it is ResourceExhausted. Default 0: no limit.
    pub connections_per_user_max: usize,
    /// Peers (CIDRs, or single addresses) whose `X-Forwarded-For` names the client; from any
    /// other peer the header is ignored. Default none.
    pub trusted_proxies: Vec<String>,
}

/// `[proxy]`: the backend's word on access (SPEC 15).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Sent as `Authorization: Bearer`; required when a proxy URL is set. Never logged.
    pub secret: Option<String>,
    /// A call without an answer by then is `Unavailable` to the client. Default 1 s.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Calls in flight per node; more are `Unavailable` at once. Default 256.
    pub concurrency_max: usize,
    /// Handshake headers passed on to the backend (omegaUp's session cookie: `["Cookie"]`).
    /// Default none.
    pub forward_headers: Vec<String>,
    /// Asked at each subscribe to an `access = "proxy"` channel. Default: none.
    pub subscribe_url: Option<String>,
    /// How long an allow is reused for the same (user, channel); 0 turns the cache off.
    /// Anonymous subscribes are never cached. Default 30 s.
    #[serde(with = "duration")]
    pub subscribe_cache_ttl: Duration,
    /// Asked by `auth` with `{"proxy":true}`: the connection's permissions without a JWT.
    /// Default: none.
    pub connect_url: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            secret: None,
            timeout: Duration::from_secs(1),
            concurrency_max: 256,
            forward_headers: Vec::new(),
            subscribe_url: None,
            subscribe_cache_ttl: Duration::from_secs(30),
            connect_url: None,
        }
    }
}

impl ProxyConfig {
    fn assert_valid(&self, rules: &[RuleConfig]) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("proxy.{key}: {why}")));
        for (key, url) in [
            ("subscribe_url", &self.subscribe_url),
            ("connect_url", &self.connect_url),
        ] {
            if let Some(url) = url {
                if let Err(why) = crate::wire::proxy::parse_url(url) {
                    return bad(key, why);
                }
            }
        }
        let urls = self.subscribe_url.is_some() || self.connect_url.is_some();
        if urls && self.secret.as_deref().is_none_or(str::is_empty) {
            let why = "required when a proxy URL is set (the backend must know the call is ours)";
            return bad("secret", why.into());
        }
        if let Some(n) = rules.iter().position(|r| r.access == rules::Access::Proxy) {
            if self.subscribe_url.is_none() {
                let why = format!("required: channels[{n}] has access = \"proxy\"");
                return bad("subscribe_url", why);
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return bad("timeout", "must be between 1ms and 60s".into());
        }
        if self.concurrency_max == 0 {
            return bad("concurrency_max", "must be at least 1".into());
        }
        if let Some(h) = self.forward_headers.iter().find(|h| !is_header_name(h)) {
            return bad("forward_headers", format!("{h:?} is not a header name"));
        }
        Ok(())
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A `trusted_proxies` entry: `10.0.0.0/8`, `::1/128`, or one address.
pub fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    match text.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(ipnet::IpNet::from(ip)),
        Err(_) => Err(format!(
            "{text:?} is not an address or CIDR (like \"10.0.0.0/8\" or \"::1\")"
        )),
    }
}

/// `[sse]`: server-sent events (SPEC 19), `GET /sse?channel=..`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// Serve `GET /sse` (and `GET /ws` with `Accept: text/event-stream`). Default true.
    pub enabled: bool,
    /// The `retry` an EventSource waits before it reconnects. Default 2 s.
    #[serde(with = "duration")]
    pub retry: Duration,
    /// Most channels one SSE connection may name. Default 16: each broadcast's event id
    /// carries every channel's position, so its size grows with this.
    pub channels_max: usize,
}

/// Most channels `sse.channels_max` may allow: an event id of 256 positions is ~9 KB per
/// broadcast, already far more than the message itself.
const SSE_CHANNELS_MAX: usize = 256;

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            enabled: true,
            retry: Duration::from_secs(2),
            channels_max: 16,
        }
    }
}

impl SseConfig {
    /// `channels_max` above `limits.max_subscriptions_per_connection` is allowed: the smaller
    /// of the two applies (a lowered subscription limit must not make a default invalid).
    fn assert_valid(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("sse.{key}: {why}")));
        if self.retry < Duration::from_millis(1) || self.retry > Duration::from_secs(3600) {
            return bad("retry", "must be between 1ms and 1h");
        }
        if self.channels_max == 0 || self.channels_max > SSE_CHANNELS_MAX {
            return bad("channels_max", "must be between 1 and 256");
        }
        Ok(())
    }
}

/// `[presence]`: who is in a channel (the rules say which channels list members).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Largest `info` claim a token may carry, as compact JSON. Default 1024 bytes.
    pub info_bytes_max: usize,
    /// Cluster mode: a node silent in Redis this long has its members removed by the others,
    /// one `leave` each. Nodes heartbeat every fifth of it. Default 15 s.
    #[serde(with = "duration")]
    pub node_timeout: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            info_bytes_max: crate::auth::INFO_BYTES_MAX,
            node_timeout: Duration::from_secs(15),
        }
    }
}

impl PresenceConfig {
    fn assert_valid(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("presence.{key}: {why}")));
        if self.info_bytes_max == 0 || self.info_bytes_max > 65_536 {
            return bad("info_bytes_max", "must be between 1 and 65536");
        }
        if self.node_timeout < Duration::from_millis(500)
            || self.node_timeout > Duration::from_secs(3600)
        {
            return bad("node_timeout", "must be between 500ms and 1h");
        }
        Ok(())
    }
}

/// `[compression]`: permessage-deflate, negotiated when the client offers it (SPEC 20).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Accept the client's offer. Default true.
    pub enabled: bool,
    /// Broadcasts smaller than this go uncompressed (deflate gains little on them and costs a
    /// compression per publication). Default 512 bytes.
    pub min_payload_bytes: usize,
    /// zlib level, 1 (fastest) to 9 (smallest); paid once per publication, not per subscriber.
    /// Default 6.
    pub level: u32,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            min_payload_bytes: 512,
            level: 6,
        }
    }
}

impl CompressionConfig {
    fn assert_valid(&self) -> Result<(), ConfigError> {
        if !(1..=9).contains(&self.level) {
            let why = "compression.level: must be between 1 and 9";
            return Err(ConfigError(why.to_string()));
        }
        Ok(())
    }
}

/// The names of the events a webhook may be sent, as `events` and the body write them.
pub const WEBHOOK_EVENTS: [&str; 4] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
];

/// One `[[webhooks]]` table: a backend told of channel and member changes (SPEC 18).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where the batches are POSTed: `http://` or `https://` with a host. Required.
    pub url: String,
    /// Key of the HMAC-SHA256 of each body, sent hex in `X-Broadcaster-Signature`. Required;
    /// never logged.
    pub secret: String,
    /// Which events (`WEBHOOK_EVENTS`) this backend gets. Default all four.
    pub events: Vec<String>,
    /// Channels this backend hears about: exact names or prefixes ending in `*`. Default
    /// `["*"]`, every channel.
    pub patterns: Vec<String>,
    /// A `channel_vacated` waits this long; a `channel_occupied` of the same channel within it
    /// drops both, so a reconnecting last subscriber is not reported. Default 3 s.
    #[serde(with = "duration")]
    pub vacated_delay: Duration,
    /// Most events in one POST. Default 50.
    pub batch_max: usize,
    /// How long a batch waits for more events after its first. Default 50 ms.
    #[serde(with = "duration")]
    pub batch_delay: Duration,
    /// Events waiting per node for this backend (and channels held by `vacated_delay`); more:
    /// the oldest is dropped and counted in `webhook_dropped_total`. Default 10,000.
    pub queue_max: usize,
    /// One POST's limit: no answer by then is a failure, retried. Default 5 s.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Failed batches are retried after 100 ms, doubling up to this. Default 30 s.
    #[serde(with = "duration")]
    pub retry_max_delay: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            secret: String::new(),
            events: WEBHOOK_EVENTS.iter().map(|e| e.to_string()).collect(),
            patterns: vec!["*".to_string()],
            vacated_delay: Duration::from_secs(3),
            batch_max: 50,
            batch_delay: Duration::from_millis(50),
            queue_max: 10_000,
            timeout: Duration::from_secs(5),
            retry_max_delay: Duration::from_secs(30),
        }
    }
}

/// The secret stays out of logs and panic messages.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<hidden>")
            .field("events", &self.events)
            .field("patterns", &self.patterns)
            .field("vacated_delay", &self.vacated_delay)
            .field("batch_max", &self.batch_max)
            .field("batch_delay", &self.batch_delay)
            .field("queue_max", &self.queue_max)
            .field("timeout", &self.timeout)
            .field("retry_max_delay", &self.retry_max_delay)
            .finish()
    }
}

impl WebhookConfig {
    /// The first bad key and why; the caller adds `webhooks[N].`.
    fn assert_valid(&self) -> Result<(), (&'static str, String)> {
        let bad = |key: &'static str, why: &str| Err((key, why.to_string()));
        if let Err(why) = webhook_url(&self.url) {
            return Err(("url", why));
        }
        if self.secret.is_empty() {
            return bad(
                "secret",
                "required (the backend checks each body's signature with it)",
            );
        }
        if self.events.is_empty() {
            return bad("events", "name at least one event");
        }
        if let Some(e) = self
            .events
            .iter()
            .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
        {
            let why = format!("{e:?} is not one of {}", WEBHOOK_EVENTS.join(", "));
            return Err(("events", why));
        }
        if self.patterns.is_empty() {
            return bad(
                "patterns",
                "name at least one pattern (\"*\" is every channel)",
            );
        }
        if let Some(p) = self
            .patterns
            .iter()
            .find(|p| p.is_empty() || p.strip_suffix('*').unwrap_or(p).contains('*'))
        {
            let why = format!("{p:?}: a channel name, or a prefix ending in '*'");
            return Err(("patterns", why));
        }
        if self.batch_max == 0 || self.batch_max > 1000 {
            return bad("batch_max", "must be between 1 and 1000");
        }
        if self.batch_delay > Duration::from_secs(10) {
            return bad("batch_delay", "at most 10s");
        }
        if self.vacated_delay > Duration::from_secs(3600) {
            return bad("vacated_delay", "at most 1h");
        }
        if self.queue_max == 0 || self.queue_max > 10_000_000 {
            return bad("queue_max", "must be between 1 and 10000000");
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return bad("timeout", "must be between 1ms and 60s");
        }
        if self.retry_max_delay < Duration::from_millis(100)
            || self.retry_max_delay > Duration::from_secs(3600)
        {
            return bad("retry_max_delay", "must be between 100ms and 1h");
        }
        Ok(())
    }
}

/// A webhook URL: `http://` or `https://`, a host, and nothing a request line could not carry.
fn webhook_url(url: &str) -> Result<(), String> {
    let example = "like \"https://backend.example/hooks/broadcaster\"";
    if url.is_empty() {
        return Err(format!("required, {example}"));
    }
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e}); write it {example}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{url:?}: must start with http:// or https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?}: names no host; write it {example}"));
    }
    Ok(())
}

/// `[history]`: what each channel keeps for recovery and `GET /history`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Publications kept per channel, at most 100,000. Default 100.
    pub size: usize,
    /// How long they are kept. Default 300 s.
    #[serde(with = "duration")]
    pub ttl: Duration,
}

/// `[redis]`: cluster mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Set: nodes share channels, offsets and history through this Redis. Default: none.
    pub url: Option<String>,
    /// `standalone` (one Redis), `sentinel` (the master the sentinels name, followed across
    /// failovers) or `cluster` (Redis Cluster). Default standalone.
    pub mode: RedisMode,
    /// Standalone: one URL, as `url`. Sentinel: the sentinels' URLs. Cluster: some of its
    /// nodes (any one that answers gives the rest). Default none.
    pub urls: Vec<String>,
    /// Sentinel: the name the sentinels monitor the master under. Default `mymaster`.
    pub master_name: String,
}

/// How the node reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis at `url`.
    Standalone,
    /// The master that the sentinels at `urls` name `master_name`.
    Sentinel,
    /// A Redis Cluster found from any of `urls` (sharded pub/sub, keys by slot).
    Cluster,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            mode: RedisMode::Standalone,
            urls: Vec::new(),
            master_name: "mymaster".into(),
        }
    }
}

impl RedisConfig {
    /// Whether the node runs in cluster mode (a Redis, or sentinels, are named).
    pub fn enabled(&self) -> bool {
        self.url.is_some() || !self.urls.is_empty()
    }

    /// Every URL named: `url`, then `urls`.
    pub fn all_urls(&self) -> Vec<String> {
        self.url.iter().chain(&self.urls).cloned().collect()
    }

    fn assert_valid(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("redis.{key}: {why}")));
        let urls = self.all_urls();
        if let Some(u) = urls.iter().find(|u| redis::parse_redis_url(u).is_none()) {
            // The URL may hold a password: say which entry, not what it holds.
            let n = urls.iter().position(|x| x == u).unwrap_or(0);
            return bad("urls", &format!("entry {n} is not a redis:// URL"));
        }
        match self.mode {
            RedisMode::Standalone if urls.len() > 1 => bad(
                "urls",
                "standalone mode takes one URL (set mode = \"sentinel\" to list sentinels)",
            ),
            RedisMode::Sentinel if urls.is_empty() => {
                bad("urls", "sentinel mode needs the sentinels' URLs")
            }
            RedisMode::Sentinel if self.master_name.is_empty() => bad(
                "master_name",
                "the sentinels' name of the master is required",
            ),
            RedisMode::Cluster if urls.is_empty() => bad(
                "urls",
                "cluster mode needs the URL of at least one Redis Cluster node",
            ),
            _ => Ok(()),
        }
    }
}

/// `[tls]`: both set turn every listener into wss:// and https://.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: Option<String>,
    /// PEM private key.
    pub key_file: Option<String>,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `broadcaster=debug,info`); `RUST_LOG` overrides. Default info.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: None,
            shards: 0,
            playground: false,
            allowed_origins: Vec::new(),
            shutdown_grace: Duration::from_secs(5),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            compression: CompressionConfig::default(),
            history: HistoryConfig::default(),
            redis: RedisConfig::default(),
            tls: TlsConfig::default(),
            log: LogConfig::default(),
            sse: SseConfig::default(),
            channels: Vec::new(),
            proxy: ProxyConfig::default(),
            presence: PresenceConfig::default(),
            webhooks: Vec::new(),
            dev_mode: false,
            dev_token: None,
        }
    }
}

impl Limits {
    fn assert_valid(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("limits.{key}: {why}")));
        if self.max_frame_bytes < 256 {
            return bad("max_frame_bytes", "must be at least 256");
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > self.max_frame_bytes {
            return bad(
                "max_payload_bytes",
                "must be between 1 and limits.max_frame_bytes (a payload travels inside one message)",
            );
        }
        if self.http_head_bytes_max < 256 {
            return bad("http_head_bytes_max", "must be at least 256");
        }
        if self.requests_per_second == 0 {
            return bad("requests_per_second", "must be at least 1");
        }
        if self.request_burst == 0 {
            return bad("request_burst", "must be at least 1");
        }
        if self.outbound_buffer_bytes < self.max_frame_bytes {
            return bad(
                "outbound_buffer_bytes",
                "must be at least limits.max_frame_bytes, or no large broadcast could be queued",
            );
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if let Some(Err(why)) = self
            .trusted_proxies
            .iter()
            .map(|t| parse_cidr(t))
            .find(Result::is_err)
        {
            return Err(ConfigError(format!("limits.trusted_proxies: {why}")));
        }
        for (key, d) in [
            ("auth_timeout", self.auth_timeout),
            ("http_head_timeout", self.http_head_timeout),
            ("write_timeout", self.write_timeout),
            ("ping_interval", self.ping_interval),
        ] {
            if d.is_zero() {
                return bad(key, "must be longer than 0s");
            }
        }
        Ok(())
    }
}

impl LogConfig {
    fn assert_valid(&self) -> Result<(), ConfigError> {
        // tracing-subscriber 0.3 can panic on non-ASCII directives (found by the config fuzz
        // target); levels and module paths are ASCII anyway.
        if !self.level.is_ascii() {
            return Err(ConfigError(
                "log.level: must be ASCII, like \"info\" or \"broadcaster=debug,info\"".into(),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(ConfigError(format!(
                "log.level: not a valid level or filter: {e}"
            )));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            auth_timeout: Duration::from_secs(10),
            http_head_timeout: Duration::from_secs(10),
            http_head_bytes_max: 8192,
            max_frame_bytes: 65536,
            max_payload_bytes: 65536,
            requests_per_second: 100,
            request_burst: 200,
            max_subscriptions_per_connection: 1024,
            max_connections: 1_000_000,
            outbound_buffer_bytes: 1 << 20,
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            anonymous_connections_max: 500_000,
            anonymous_connections_per_ip_max: 64,
            rewind_max: 100,
            connections_per_user_max: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 100,
            ttl: Duration::from_secs(300),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

/// Most publications a channel may keep (`history.size`, a rule's `history_size`).
const HISTORY_SIZE_MAX: usize = 100_000;
/// Longest duration any key accepts.
const DURATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most clock skew `auth.leeway` may allow.
const LEEWAY_MAX: Duration = Duration::from_secs(3600);

/// How an environment variable's text becomes a TOML value for its key.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    List,
}

/// Every key that the environment may set. The file may set the same keys; serde rejects others.
const KEYS: &[(&str, Kind)] = &[
    ("listen", Kind::Str),
    ("admin_listen", Kind::Str),
    ("shards", Kind::Int),
    ("playground", Kind::Bool),
    ("allowed_origins", Kind::List),
    ("shutdown_grace", Kind::Str),
    ("auth.jwt_secret", Kind::Str),
    ("auth.api_keys", Kind::List),
    ("auth.leeway", Kind::Str),
    ("auth.revocation_ttl", Kind::Str),
    ("auth.revocations_max", Kind::Int),
    ("auth.revocations_file", Kind::Str),
    ("limits.auth_timeout", Kind::Str),
    ("limits.http_head_timeout", Kind::Str),
    ("limits.http_head_bytes_max", Kind::Int),
    ("limits.max_frame_bytes", Kind::Int),
    ("limits.max_payload_bytes", Kind::Int),
    ("limits.requests_per_second", Kind::Int),
    ("limits.request_burst", Kind::Int),
    ("limits.max_subscriptions_per_connection", Kind::Int),
    ("limits.max_connections", Kind::Int),
    ("limits.outbound_buffer_bytes", Kind::Int),
    ("limits.write_timeout", Kind::Str),
    ("limits.ping_interval", Kind::Str),
    ("limits.anonymous_connections_max", Kind::Int),
    ("limits.anonymous_connections_per_ip_max", Kind::Int),
    ("limits.rewind_max", Kind::Int),
    ("limits.connections_per_user_max", Kind::Int),
    ("limits.trusted_proxies", Kind::List),
    ("compression.enabled", Kind::Bool),
    ("compression.min_payload_bytes", Kind::Int),
    ("compression.level", Kind::Int),
    ("history.size", Kind::Int),
    ("history.ttl", Kind::Str),
    ("redis.url", Kind::Str),
    ("redis.mode", Kind::Str),
    ("redis.urls", Kind::List),
    ("redis.master_name", Kind::Str),
    ("tls.cert_file", Kind::Str),
    ("tls.key_file", Kind::Str),
    ("log.level", Kind::Str),
    ("sse.enabled", Kind::Bool),
    ("sse.retry", Kind::Str),
    ("sse.channels_max", Kind::Int),
    ("proxy.secret", Kind::Str),
    ("proxy.timeout", Kind::Str),
    ("proxy.concurrency_max", Kind::Int),
    ("proxy.forward_headers", Kind::List),
    ("proxy.subscribe_url", Kind::Str),
    ("proxy.subscribe_cache_ttl", Kind::Str),
    ("proxy.connect_url", Kind::Str),
    ("presence.info_bytes_max", Kind::Int),
    ("presence.node_timeout", Kind::Str),
];

/// The environment variable that sets `key`: `auth.jwt_secret` is `BROADCASTER_AUTH_JWT_SECRET`.
pub fn env_name(key: &str) -> String {
    format!("BROADCASTER_{}", key.replace('.', "_").to_uppercase())
}

/// Values given on the command line; each replaces the file's and the environment's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--shards`.
    pub shards: Option<usize>,
    /// `--redis`.
    pub redis: Option<String>,
}

impl Config {
    /// Builds the configuration from the file (if any), the environment and the flags, then
    /// checks it. `env` is passed in so that tests need not touch the process environment.
    pub fn load(
        file: Option<&std::path::Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    ConfigError(format!(
                        "config file {} is not valid TOML: {e}",
                        path.display()
                    ))
                })?
            }
            None => toml::Table::new(),
        };
        for (key, kind) in KEYS {
            let name = env_name(key);
            if let Some(text) = env(&name) {
                let value = env_value(&text, *kind)
                    .map_err(|why| ConfigError(format!("{key} (from {name}): {why}")))?;
                set_path(&mut table, key, value);
            }
        }
        if let Some(v) = &flags.listen {
            set_path(&mut table, "listen", toml::Value::String(v.clone()));
        }
        if let Some(v) = &flags.admin_listen {
            set_path(&mut table, "admin_listen", toml::Value::String(v.clone()));
        }
        if let Some(v) = flags.shards {
            set_path(&mut table, "shards", toml::Value::Integer(v as i64));
        }
        if let Some(v) = &flags.redis {
            set_path(&mut table, "redis.url", toml::Value::String(v.clone()));
        }
        let mut config: Config = serde_path_to_error::deserialize(table).map_err(|e| {
            let path = e.path().to_string();
            ConfigError(format!("{path}: {}", e.into_inner()))
        })?;
        if config.auth.jwt_secret.as_deref().is_none_or(str::is_empty) {
            config.dev_mode = true;
        }
        config.assert_valid()?;
        Ok(config)
    }

    /// Relationships between values, checked before any shard starts (tungstenite's
    /// `WebSocketConfig::assert_valid`).
    pub fn assert_valid(&self) -> Result<(), ConfigError> {
        self.limits.assert_valid()?;
        self.assert_durations()?;
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.history.size > HISTORY_SIZE_MAX {
            return bad("history.size", "at most 100000 publications per channel");
        }
        if self.shards > SHARDS_MAX {
            return bad("shards", &format!("at most {SHARDS_MAX}"));
        }
        if self.auth.api_keys.iter().any(|k| k.is_empty()) {
            return bad("auth.api_keys", "an API key may not be empty");
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("tls", "set both tls.cert_file and tls.key_file, or neither");
        }
        self.assert_dev_mode()?;
        rules::check(&self.channels, self.history.size, HISTORY_SIZE_MAX).map_err(ConfigError)?;
        let rewind_max = self.limits.rewind_max;
        if let Some(n) = self
            .channels
            .iter()
            .position(|r| r.rewind_default > rewind_max)
        {
            let why =
                format!("channels[{n}].rewind_default: at most limits.rewind_max ({rewind_max})");
            return Err(ConfigError(why));
        }
        self.proxy.assert_valid(&self.channels)?;
        self.presence.assert_valid()?;
        self.compression.assert_valid()?;
        self.sse.assert_valid()?;
        self.redis.assert_valid()?;
        for (n, hook) in self.webhooks.iter().enumerate() {
            hook.assert_valid()
                .map_err(|(key, why)| ConfigError(format!("webhooks[{n}].{key}: {why}")))?;
        }
        self.log.assert_valid()
    }

    /// The channel rules resolved against `[history]`.
    pub fn rules(&self) -> rules::Rules {
        rules::Rules::new(&self.channels, self.history.size, self.history.ttl)
    }

    /// Bounds that keep `Instant + duration` and jsonwebtoken's `now - leeway` from
    /// overflowing (found by the config fuzz target).
    fn assert_durations(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let durations = [
            ("shutdown_grace", self.shutdown_grace),
            ("limits.auth_timeout", l.auth_timeout),
            ("limits.http_head_timeout", l.http_head_timeout),
            ("limits.write_timeout", l.write_timeout),
            ("limits.ping_interval", l.ping_interval),
            ("history.ttl", self.history.ttl),
            ("proxy.subscribe_cache_ttl", self.proxy.subscribe_cache_ttl),
        ];
        for (key, d) in durations {
            if d > DURATION_MAX {
                return Err(ConfigError(format!("{key}: at most 365 days")));
            }
        }
        for (n, rule) in self.channels.iter().enumerate() {
            if rule.history_ttl.is_some_and(|d| d > DURATION_MAX) {
                let why = format!("channels[{n}].history_ttl: at most 365 days");
                return Err(ConfigError(why));
            }
        }
        if self.auth.leeway > LEEWAY_MAX {
            let why = "auth.leeway: at most 1 hour of clock skew";
            return Err(ConfigError(why.into()));
        }
        let ttl = self.auth.revocation_ttl;
        if ttl < Duration::from_secs(1) || ttl > DURATION_MAX {
            let why = "auth.revocation_ttl: between 1s and 365 days";
            return Err(ConfigError(why.into()));
        }
        if !(1..=10_000_000).contains(&self.auth.revocations_max) {
            let why = "auth.revocations_max: between 1 and 10000000";
            return Err(ConfigError(why.into()));
        }
        Ok(())
    }

    /// Dev mode binds loopback addresses only: its secrets are printed, and its playground
    /// holds a token.
    fn assert_dev_mode(&self) -> Result<(), ConfigError> {
        if !self.dev_mode {
            return Ok(());
        }
        if !self.listen.ip().is_loopback() {
            return Err(ConfigError(
                "listen: dev mode (no auth.jwt_secret) only binds a loopback address; configure a secret to listen elsewhere".into(),
            ));
        }
        if self.admin_listen.is_some_and(|a| !a.ip().is_loopback()) {
            let why = "admin_listen: dev mode only binds a loopback address";
            return Err(ConfigError(why.into()));
        }
        Ok(())
    }

    /// Shards to start: the configured number, or one per CPU this process may run on (at most
    /// `SHARDS_MAX`).
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(SHARDS_MAX)
    }
}

fn env_value(text: &str, kind: Kind) -> Result<toml::Value, String> {
    Ok(match kind {
        Kind::Str => toml::Value::String(text.to_string()),
        Kind::Int => toml::Value::Integer(
            text.trim()
                .parse::<i64>()
                .map_err(|_| format!("expected a whole number, got {text:?}"))?,
        ),
        Kind::Bool => toml::Value::Boolean(match text.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("expected true or false, got {text:?}")),
        }),
        // Environment lists replace the file's list (SPEC 13.21).
        Kind::List => toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
    })
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = table
                .entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                set_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(file: Option<&str>, env: &[(&str, &str)], flags: Overrides) -> Result<Config, String> {
        let dir = std::env::temp_dir().join(format!("bc-config-{}", rand::random::<u64>()));
        let path = file.map(|text| {
            std::fs::write(&dir, text).unwrap();
            dir.clone()
        });
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = Config::load(path.as_deref(), &|k| env.get(k).cloned(), &flags);
        let _ = std::fs::remove_file(&dir);
        r.map_err(|e| e.0)
    }

    #[test]
    fn defaults_are_dev_mode_on_loopback() {
        let c = load(None, &[], Overrides::default()).unwrap();
        assert!(c.dev_mode);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.limits.max_frame_bytes, 65536);
        assert_eq!(c.history.ttl, Duration::from_secs(300));
    }

    #[test]
    fn flags_beat_env_and_env_beats_file() {
        let file =
            "listen = \"127.0.0.1:1\"\n[auth]\njwt_secret = \"f\"\napi_keys = [\"a\", \"b\"]\n";
        let c = load(Some(file), &[], Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.auth.api_keys, vec!["a", "b"]);
        let env = [
            ("BROADCASTER_LISTEN", "127.0.0.1:2"),
            ("BROADCASTER_AUTH_API_KEYS", "c"),
        ];
        let c = load(Some(file), &env, Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.auth.api_keys, vec!["c"]);
        let flags = Overrides {
            listen: Some("127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let c = load(Some(file), &env, flags).unwrap();
        assert_eq!(c.listen.port(), 3);
        assert!(!c.dev_mode);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load(
            None,
            &[("BROADCASTER_LIMITS_MAX_FRAME_BYTES", "abc")],
            Overrides::default(),
        )
        .unwrap_err();
        assert!(e.contains("limits.max_frame_bytes"), "{e}");
        let e = load(
            Some("[limits]\nping_interval = \"soon\"\n"),
            &[],
            Overrides::default(),
        )
        .unwrap_err();
        assert!(e.contains("limits.ping_interval"), "{e}");
        let e = load(Some("[limits]\nnot_a_key = 1\n"), &[], Overrides::default()).unwrap_err();
        assert!(e.contains("not_a_key"), "{e}");
        let e = load(Some("listen = \"nowhere\"\n"), &[], Overrides::default()).unwrap_err();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn dev_mode_refuses_public_addresses() {
        let flags = Overrides {
            listen: Some("0.0.0.0:8080".into()),
            ..Overrides::default()
        };
        let e = load(None, &[], flags.clone()).unwrap_err();
        assert!(e.starts_with("listen:"), "{e}");
        assert!(load(None, &[("BROADCASTER_AUTH_JWT_SECRET", "s")], flags).is_ok());
    }

    #[test]
    fn sse_keys_load_and_are_checked() {
        let secret = ("BROADCASTER_AUTH_JWT_SECRET", "s");
        let c = load(None, &[secret], Overrides::default()).unwrap();
        assert!(c.sse.enabled);
        assert_eq!(c.sse.retry, Duration::from_secs(2));
        assert_eq!(c.sse.channels_max, 16);
        let file = "[sse]\nenabled = false\nretry = \"250ms\"\nchannels_max = 4\n";
        let c = load(Some(file), &[secret], Overrides::default()).unwrap();
        assert!(!c.sse.enabled);
        assert_eq!(c.sse.retry, Duration::from_millis(250));
        assert_eq!(c.sse.channels_max, 4);
        let env = [secret, ("BROADCASTER_SSE_CHANNELS_MAX", "2")];
        assert_eq!(
            load(None, &env, Overrides::default())
                .unwrap()
                .sse
                .channels_max,
            2
        );
        for (bad, key) in [
            ("[sse]\nretry = \"0s\"\n", "sse.retry"),
            ("[sse]\nretry = \"2h\"\n", "sse.retry"),
            ("[sse]\nchannels_max = 0\n", "sse.channels_max"),
            ("[sse]\nchannels_max = 257\n", "sse.channels_max"),
            ("[sse]\nnope = 1\n", "sse"),
        ] {
            let e = load(Some(bad), &[secret], Overrides::default()).unwrap_err();
            assert!(e.starts_with(key), "{bad}: {e}");
        }
        // A lowered subscription limit does not make the default invalid: the smaller applies.
        let env = [
            secret,
            ("BROADCASTER_LIMITS_MAX_SUBSCRIPTIONS_PER_CONNECTION", "3"),
        ];
        assert!(load(None, &env, Overrides::default()).is_ok());
    }

    #[test]
    fn the_example_file_is_valid_and_documents_every_key() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/broadcaster.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::load(Some(&path), &|_| None, &Overrides::default()).unwrap();
        assert_eq!(c.limits.ping_interval, Duration::from_secs(30));
        for (key, _) in KEYS {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(
                text.contains(leaf),
                "tuning/broadcaster.toml does not document {key}"
            );
        }
    }

    /// The commented example `name` of tuning/broadcaster.toml (between its BEGIN and END
    /// lines), uncommented, and the configuration it loads into.
    fn tuning_example(name: &str) -> (String, Config) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/broadcaster.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let (_, rest) = text
            .split_once(&format!("# BEGIN EXAMPLE {name}\n"))
            .unwrap();
        let (example, _) = rest.split_once(&format!("# END EXAMPLE {name}")).unwrap();
        let example: String = example
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = load(
            Some(&example),
            &[("BROADCASTER_AUTH_JWT_SECRET", "s")],
            Overrides::default(),
        )
        .unwrap();
        (example, c)
    }

    /// The commented omegaUp example of tuning/broadcaster.toml, uncommented, is a valid
    /// configuration with the rules it describes.
    #[test]
    fn the_example_channel_rules_load() {
        let (example, c) = tuning_example("channels");
        let rules = c.rules();
        assert_eq!(rules.policy("scoreboard/c1").access, rules::Access::Public);
        assert_eq!(rules.policy("scoreboard/c1").rewind_default, 1);
        assert_eq!(rules.policy("contest/c1").access, rules::Access::Proxy);
        let chat = rules.policy("chat/c1");
        assert!(chat.presence && chat.join_leave && chat.presence_members_max == 5000);
        assert!(!rules.policy("contest/c1").tracks_members());
        assert_eq!(c.proxy.forward_headers, vec!["Cookie"]);
        for key in [
            "pattern",
            "access",
            "history_size",
            "history_ttl",
            "rewind_default",
            "presence",
            "join_leave",
            "presence_members_max",
        ] {
            assert!(
                example.contains(key),
                "tuning/broadcaster.toml does not document {key}"
            );
        }
    }

    #[test]
    fn rules_and_proxy_keys_are_checked() {
        let secret = [("BROADCASTER_AUTH_JWT_SECRET", "s")];
        let cases = [
            ("[[channels]]\npattern = \"a*b\"\n", "channels[0].pattern"),
            (
                "[[channels]]\npattern = \"a\"\naccess = \"open\"\n",
                "channels[0].access",
            ),
            (
                "[[channels]]\npattern = \"a/*\"\n[[channels]]\npattern = \"a/b\"\n",
                "channels[1].pattern",
            ),
            (
                "[[channels]]\npattern = \"a\"\nrewind_default = 200\nhistory_size = 300\n",
                "channels[0].rewind_default",
            ),
            (
                "[[channels]]\npattern = \"a\"\naccess = \"proxy\"\n",
                "proxy.subscribe_url",
            ),
            (
                "[proxy]\nsubscribe_url = \"http://127.0.0.1:1/x\"\n",
                "proxy.secret",
            ),
            (
                "[proxy]\nsecret = \"k\"\nsubscribe_url = \"https://a.example/x\"\n",
                "proxy.subscribe_url",
            ),
            (
                "[proxy]\nforward_headers = [\"Bad Header\"]\n",
                "proxy.forward_headers",
            ),
            (
                "[limits]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
                "limits.trusted_proxies",
            ),
        ];
        for (file, key) in cases {
            let e = load(Some(file), &secret, Overrides::default()).unwrap_err();
            assert!(e.starts_with(key), "{file:?}: {e}");
        }
        let env = [
            ("BROADCASTER_AUTH_JWT_SECRET", "s"),
            ("BROADCASTER_LIMITS_TRUSTED_PROXIES", "10.0.0.0/8, ::1"),
            ("BROADCASTER_PROXY_SECRET", "k"),
            ("BROADCASTER_PROXY_CONNECT_URL", "http://127.0.0.1:9/c"),
        ];
        let c = load(None, &env, Overrides::default()).unwrap();
        assert_eq!(c.limits.trusted_proxies.len(), 2);
        assert!(c.proxy.connect_url.is_some());
    }

    #[test]
    fn webhooks_load_with_their_defaults() {
        let secret = [("BROADCASTER_AUTH_JWT_SECRET", "s")];
        let file = "[[webhooks]]\nurl = \"https://b.example/h\"\nsecret = \"k\"\n\
                    [[webhooks]]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"k\"\n\
                    events = [\"member_added\"]\npatterns = [\"contest/*\"]\n\
                    vacated_delay = \"0s\"\nbatch_max = 1000\nbatch_delay = \"10s\"\n\
                    queue_max = 1\ntimeout = \"1ms\"\nretry_max_delay = \"100ms\"\n";
        let c = load(Some(file), &secret, Overrides::default()).unwrap();
        let (a, b) = (&c.webhooks[0], &c.webhooks[1]);
        assert_eq!(a.events, WEBHOOK_EVENTS);
        assert_eq!(a.patterns, vec!["*"]);
        assert_eq!(a.vacated_delay, Duration::from_secs(3));
        assert_eq!((a.batch_max, a.queue_max), (50, 10_000));
        assert_eq!(a.batch_delay, Duration::from_millis(50));
        assert_eq!(a.timeout, Duration::from_secs(5));
        assert_eq!(a.retry_max_delay, Duration::from_secs(30));
        assert_eq!(b.events, vec!["member_added"]);
        assert_eq!((b.batch_max, b.queue_max), (1000, 1));
        assert!(
            !format!("{a:?}").contains("\"k\""),
            "the secret is never printed"
        );
        assert!(load(None, &secret, Overrides::default())
            .unwrap()
            .webhooks
            .is_empty());
    }

    /// The commented `[[webhooks]]` example of tuning/broadcaster.toml, uncommented, loads.
    #[test]
    fn the_example_webhook_loads() {
        let (example, c) = tuning_example("webhooks");
        let hook = &c.webhooks[0];
        assert_eq!(hook.patterns, vec!["contest/*"]);
        assert_eq!(hook.events, WEBHOOK_EVENTS);
        for key in [
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
        ] {
            assert!(
                example.contains(&format!("\n{key} = ")),
                "the example lacks {key}"
            );
        }
    }

    #[test]
    fn redis_modes_are_checked() {
        let secret = ("BROADCASTER_AUTH_JWT_SECRET", "s");
        let sentinels = (
            "BROADCASTER_REDIS_URLS",
            "redis://127.0.0.1:1,redis://127.0.0.1:2",
        );
        let c = load(
            None,
            &[secret, ("BROADCASTER_REDIS_MODE", "sentinel"), sentinels],
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.redis.mode, RedisMode::Sentinel);
        assert!(c.redis.enabled() && c.redis.all_urls().len() == 2);
        assert_eq!(c.redis.master_name, "mymaster");
        assert!(!Config::default().redis.enabled());
        let c = load(
            None,
            &[secret, ("BROADCASTER_REDIS_MODE", "cluster"), sentinels],
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.redis.mode, RedisMode::Cluster);
        assert_eq!(c.redis.all_urls().len(), 2);
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("BROADCASTER_REDIS_MODE", "sentinel")], "redis.urls"),
            (&[sentinels], "standalone mode takes one URL"),
            (
                &[("BROADCASTER_REDIS_MODE", "cluster")],
                "at least one Redis Cluster node",
            ),
            (
                &[("BROADCASTER_REDIS_URL", "http://a:1")],
                "redis.urls: entry 0",
            ),
            (
                &[
                    ("BROADCASTER_REDIS_MODE", "sentinel"),
                    sentinels,
                    ("BROADCASTER_REDIS_MASTER_NAME", ""),
                ],
                "redis.master_name",
            ),
        ];
        for (env, want) in cases {
            let mut env = env.to_vec();
            env.push(secret);
            let e = load(None, &env, Overrides::default()).unwrap_err();
            assert!(e.contains(want), "{env:?}: {e}");
        }
    }

    #[test]
    fn webhook_keys_are_checked() {
        let secret = [("BROADCASTER_AUTH_JWT_SECRET", "s")];
        let hook = "[[webhooks]]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"k\"\n";
        let cases = [
            ("url = \"\"", "webhooks[1].url"),
            ("url = \"ftp://a.example/h\"", "webhooks[1].url"),
            ("url = \"http:///h\"", "webhooks[1].url"),
            ("url = \"http://a b/h\"", "webhooks[1].url"),
            ("secret = \"\"", "webhooks[1].secret"),
            ("events = []", "webhooks[1].events"),
            ("events = [\"channel_closed\"]", "webhooks[1].events"),
            ("patterns = []", "webhooks[1].patterns"),
            ("patterns = [\"\"]", "webhooks[1].patterns"),
            ("patterns = [\"a*b\"]", "webhooks[1].patterns"),
            ("batch_max = 0", "webhooks[1].batch_max"),
            ("batch_max = 1001", "webhooks[1].batch_max"),
            ("batch_delay = \"11s\"", "webhooks[1].batch_delay"),
            ("vacated_delay = \"2h\"", "webhooks[1].vacated_delay"),
            ("queue_max = 0", "webhooks[1].queue_max"),
            ("queue_max = 10000001", "webhooks[1].queue_max"),
            ("timeout = \"0s\"", "webhooks[1].timeout"),
            ("timeout = \"61s\"", "webhooks[1].timeout"),
            ("retry_max_delay = \"99ms\"", "webhooks[1].retry_max_delay"),
            ("retry_max_delay = \"2h\"", "webhooks[1].retry_max_delay"),
            ("retries = 3", "webhooks[1]"),
        ];
        for (line, key) in cases {
            // The second table: the index in the message must be the failing table's.
            let (name, _) = line.split_once(" = ").unwrap();
            let second: String = hook
                .lines()
                .filter(|l| !l.starts_with(&format!("{name} =")))
                .map(|l| format!("{l}\n"))
                .collect();
            let file = format!("{hook}{second}{line}\n");
            let e = load(Some(&file), &secret, Overrides::default()).unwrap_err();
            assert!(e.starts_with(key), "{line:?}: {e}");
        }
        let e = load(
            Some("[[webhooks]]\nsecret = \"k\"\n"),
            &secret,
            Overrides::default(),
        )
        .unwrap_err();
        assert!(e.starts_with("webhooks[0].url: required"), "{e}");
    }

    #[test]
    fn durations_that_would_overflow_are_refused() {
        // Found by the config fuzz target: both used to panic a shard or refuse every token.
        let e = load(
            Some("[limits]\nhttp_head_timeout = \"9223372036854775807s\"\n"),
            &[],
            Overrides::default(),
        )
        .unwrap_err();
        assert!(e.contains("limits.http_head_timeout"), "{e}");
        let e = load(
            Some("[auth]\nleeway = \"9223372036854775807s\"\n"),
            &[],
            Overrides::default(),
        )
        .unwrap_err();
        assert!(e.contains("auth.leeway"), "{e}");
    }

    #[test]
    fn non_ascii_log_levels_are_refused_not_panicked_on() {
        let e = load(
            Some("[log]\nlevel = \" \u{6ae}=q\"\n"),
            &[],
            Overrides::default(),
        )
        .unwrap_err();
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn limit_relationships_are_checked() {
        let env = [("BROADCASTER_LIMITS_MAX_PAYLOAD_BYTES", "100000")];
        let e = load(None, &env, Overrides::default()).unwrap_err();
        assert!(e.contains("limits.max_payload_bytes"), "{e}");
    }
}
