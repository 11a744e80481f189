//! The node: what all its shards share, read-mostly (configuration, token verifier, TLS,
//! metrics slots, the Redis bridge handle) and the node-wide atomics (connection count,
//! shutdown flag).

use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::ShardMetrics;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// What every shard of the node shares: read-only configuration and node-wide atomics. Nothing
/// here is on the per-message path except the metrics, which each shard writes only in its own
/// slot.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) verifier: Verifier,
    pub(crate) node_id: String,
    pub(crate) shards: usize,
    /// Open WebSocket connections of the node, for `max_connections` (SPEC 13.17).
    pub(crate) connections: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
    /// One slot per shard, written only by its shard.
    pub(crate) metrics: Arc<[ShardMetrics]>,
    /// What `/metrics` renders: the slots above, process figures, build info, the bridge.
    pub(crate) exposition: crate::metrics::Exposition,
    /// Set when `tls.cert_file` and `tls.key_file` are: every listener speaks TLS.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Cluster mode: offsets, history and delivery between nodes go through Redis.
    pub(crate) bridge: Option<crate::cluster::Bridge>,
    /// `[[channels]]` resolved: each channel's access, history and rewind.
    pub(crate) rules: Arc<crate::rules::Rules>,
    /// Connections not yet authenticated, against the anonymous caps.
    pub(crate) anonymous: Arc<crate::admission::Anonymous>,
    /// `limits.trusted_proxies`, parsed.
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    /// Access-proxy calls in flight on every shard, against `proxy.concurrency_max`.
    pub(crate) proxy_in_flight: Arc<AtomicUsize>,
    /// Authenticated connections per user, when `limits.connections_per_user_max` is set.
    pub(crate) per_user: Option<crate::admission::PerUser>,
    /// Members, joins, leaves and reaps (`presence_*`).
    pub(crate) presence: Arc<crate::metrics::PresenceMetrics>,
    /// Revoked tokens (`/revoke`), checked at each `auth`; the bridge keeps them in Redis.
    pub(crate) revocations: Arc<crate::revocation::Revocations>,
    /// `[[webhooks]]` (SPEC 18): their queues and sender threads; None when none is configured.
    pub(crate) webhooks: Option<Arc<crate::webhook::Webhooks>>,
}

impl Node {
    /// The node of `shards` shards. The JWT secret must already be set (dev mode sets one).
    pub fn new(config: Config, shards: usize) -> Result<Node, String> {
        let secret = config.auth.jwt_secret.clone().unwrap_or_default();
        let tls = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) => Some(crate::io::tls::server_config(cert, key)?),
            _ => None,
        };
        let metrics: Arc<[ShardMetrics]> = (0..shards).map(|_| ShardMetrics::default()).collect();
        let limits = &config.limits;
        let anonymous = Arc::new(crate::admission::Anonymous::new(
            limits.anonymous_connections_max,
            limits.anonymous_connections_per_ip_max,
        ));
        let mut exposition = crate::metrics::Exposition::new(metrics.clone());
        exposition.add_anonymous(anonymous.clone());
        let presence = Arc::new(crate::metrics::PresenceMetrics::default());
        exposition.add_presence(presence.clone());
        let mut revocations = crate::revocation::Revocations::new(
            config.auth.revocations_max,
            config.auth.revocation_ttl,
        );
        if let Some(path) = &config.auth.revocations_file {
            revocations = revocations.with_file(path, crate::clock::unix_ms())?;
        }
        let revocations = Arc::new(revocations);
        exposition.add_revocations(revocations.clone());
        let webhook_metrics = Arc::new(crate::metrics::WebhookMetrics::default());
        exposition.add_webhooks(webhook_metrics.clone());
        let webhooks =
            crate::webhook::Webhooks::start(&config.webhooks, webhook_metrics).map(Arc::new);
        Ok(Node {
            tls,
            exposition,
            anonymous,
            per_user: (limits.connections_per_user_max > 0)
                .then(|| crate::admission::PerUser::new(limits.connections_per_user_max)),
            presence,
            revocations,
            webhooks,
            metrics,
            bridge: None,
            rules: Arc::new(config.rules()),
            proxy_in_flight: Arc::new(AtomicUsize::new(0)),
            trusted_proxies: config
                .limits
                .trusted_proxies
                .iter()
                .filter_map(|t| crate::config::parse_cidr(t).ok())
                .collect(),
            verifier: Verifier::new(&secret, config.auth.leeway)
                .info_bytes_max(config.presence.info_bytes_max),
            node_id: format!("{:08x}", rand::random::<u32>()),
            shards,
            connections: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            config,
        })
    }
}

impl Node {
    /// Counts a new WebSocket connection against `limits.max_connections` (SPEC 13.17); false,
    /// and nothing counted, when the node is full.
    pub(crate) fn admit_connection(&self) -> bool {
        if self.connections.fetch_add(1, Relaxed) >= self.config.limits.max_connections {
            self.connections.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    /// A connection counted by `admit_connection` has ended.
    pub(crate) fn connection_ended(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// True when handshake headers are kept for the backend: a proxy URL is set and
    /// `proxy.forward_headers` names some.
    pub(crate) fn keeps_handshake_headers(&self) -> bool {
        let proxy = &self.config.proxy;
        (proxy.subscribe_url.is_some() || proxy.connect_url.is_some())
            && !proxy.forward_headers.is_empty()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }
}
