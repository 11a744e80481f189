//! The access proxy (SPEC 15): the backend asked over HTTP whether a connection may subscribe
//! to a proxy channel, or who it is (`auth` with `{"proxy":true}`).
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | one shard's proxy: the two URLs, the cache of allow decisions, metrics, answers as errors |
//! | `client.rs` | the HTTP client on the shard's executor: keep-alive pool, timeout, the node-wide bound |
//!
//! The wire side (request bodies, the response parser, the answers) is `wire::proxy`, fuzzed.

mod client;

pub use client::{CallError, ProxyClient, BODY_BYTES_MAX};

use crate::auth::Permissions;
use crate::error::{err, Code, Error};
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::wire::proxy::{self as wire, SubscribeAnswer, Target};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Allow decisions kept per shard; beyond it the expired ones go, then all (a cache, not a
/// store: a miss only costs a call).
const CACHE_ENTRIES_MAX: usize = 100_000;

/// The `kind` of a call: its index in `metrics::PROXY_KINDS`.
const SUBSCRIBE: usize = 0;
const CONNECT: usize = 1;

/// One subscribe the backend is asked about.
pub(crate) struct SubscribeCall<'a> {
    pub(crate) channel: &'a str,
    /// The token's `sub`; None for an anonymous connection (never cached).
    pub(crate) user: Option<&'a str>,
    pub(crate) connection: u64,
    pub(crate) headers: &'a [(String, String)],
    /// False for a re-check at `expireAt`: the backend must be asked.
    pub(crate) cached: bool,
}

/// The cache's key: (user, channel).
type CacheKey = (Box<str>, Box<str>);

/// A cached allow: until when it may be reused, and the `expireAt` it came with.
struct Allowed {
    until: Instant,
    expire_at: Option<u64>,
}

/// One shard's access proxy.
pub(crate) struct Proxy {
    client: ProxyClient,
    subscribe: Option<Target>,
    connect: Option<Target>,
    secret: String,
    node_id: String,
    cache_ttl: Duration,
    cache: RefCell<HashMap<CacheKey, Allowed>>,
}

impl Proxy {
    /// The shard's proxy when a proxy URL is configured. `in_flight` is the node's count of
    /// calls, shared by every shard.
    pub(crate) fn new(
        node: &Node,
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Option<Proxy> {
        let c = &node.config.proxy;
        // The configuration was checked: both parse.
        let target = |url: &Option<String>| url.as_deref().and_then(|u| wire::parse_url(u).ok());
        let (subscribe, connect) = (target(&c.subscribe_url), target(&c.connect_url));
        if subscribe.is_none() && connect.is_none() {
            return None;
        }
        Some(Proxy {
            client: ProxyClient::new(c.timeout, in_flight, c.concurrency_max),
            subscribe,
            connect,
            secret: c.secret.clone().unwrap_or_default(),
            node_id: node.node_id.clone(),
            cache_ttl: c.subscribe_cache_ttl,
            cache: RefCell::new(HashMap::new()),
        })
    }

    /// Whether `call` may subscribe: `Ok(expire_at)` when allowed (the Unix second to ask
    /// again at, if any), PermissionDenied when denied, the backend's own error, or
    /// Unavailable / Internal when it gave no usable answer.
    pub(crate) async fn subscribe(
        &self,
        metrics: &ShardMetrics,
        call: SubscribeCall<'_>,
    ) -> Result<Option<u64>, Error> {
        let Some(target) = &self.subscribe else {
            return Err(err(Code::Internal, "no proxy.subscribe_url configured"));
        };
        let key = call.user.map(|u| (Box::from(u), Box::from(call.channel)));
        if let (Some(key), true) = (&key, call.cached) {
            if let Some(hit) = self.cached(key) {
                return Ok(hit);
            }
        }
        let connection = self.connection_name(call.connection);
        let body = wire::subscribe_request_body(
            call.channel,
            call.user,
            &connection,
            &self.node_id,
            call.headers,
        );
        let read = |body: &[u8]| match wire::parse_subscribe_answer(body) {
            Ok(SubscribeAnswer::Allow { expire_at }) => Ok(expire_at),
            Ok(SubscribeAnswer::Deny) => Err(("deny", denied())),
            Ok(SubscribeAnswer::Error(e)) => Err(("error", e)),
            Err(why) => Err(("error", malformed(&why))),
        };
        let expire_at = self.call(metrics, SUBSCRIBE, target, &body, read).await?;
        if let Some(key) = key {
            self.remember(key, expire_at);
        }
        Ok(expire_at)
    }

    /// A connection as the backend sees it: unique across the cluster.
    fn connection_name(&self, id: u64) -> String {
        format!("{}-{id}", self.node_id)
    }

    fn cached(&self, key: &CacheKey) -> Option<Option<u64>> {
        let mut cache = self.cache.borrow_mut();
        let hit = cache.get(key)?;
        if hit.until > Instant::now() {
            return Some(hit.expire_at);
        }
        cache.remove(key);
        None
    }

    fn remember(&self, key: CacheKey, expire_at: Option<u64>) {
        if self.cache_ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut until = now + self.cache_ttl;
        if let Some(at) = expire_at {
            let left = at.saturating_sub(crate::clock::unix_now());
            until = until.min(now + Duration::from_secs(left));
        }
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHE_ENTRIES_MAX {
            cache.retain(|_, a| a.until > now);
            if cache.len() >= CACHE_ENTRIES_MAX {
                cache.clear();
            }
        }
        cache.insert(key, Allowed { until, expire_at });
    }

    /// The connect proxy's answer as the connection's permissions.
    pub(crate) async fn connect(
        &self,
        metrics: &ShardMetrics,
        connection: u64,
        headers: &[(String, String)],
    ) -> Result<Permissions, Error> {
        let Some(target) = &self.connect else {
            return Err(no_connect_url());
        };
        let connection = self.connection_name(connection);
        let body = wire::connect_request_body(&connection, &self.node_id, headers);
        let read = |body: &[u8]| match wire::parse_connect_answer(body) {
            Ok(Ok(a)) => Ok(Permissions::new(
                a.sub,
                a.exp,
                a.authorized_channels,
                &a.scope,
            )),
            // The backend's refusal of who the headers say this is.
            Ok(Err(e)) => Err(("deny", e)),
            Err(why) => Err(("error", malformed(&why))),
        };
        self.call(metrics, CONNECT, target, &body, read).await
    }

    /// One call of `kind` (`SUBSCRIBE`, `CONNECT`): the POST, its answer read by `read` (which
    /// gives the `result` label of a refusal with it), and the call counted and timed.
    async fn call<T>(
        &self,
        metrics: &ShardMetrics,
        kind: usize,
        target: &Target,
        body: &[u8],
        read: impl FnOnce(&[u8]) -> Result<T, (&'static str, Error)>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let answer = self.client.post(target, &self.secret, body).await;
        let answer = answer.map_err(|e| (e.metric_result(), call_error(&e)));
        let outcome = answer.and_then(|body| read(&body));
        let result = outcome.as_ref().map_or_else(|(r, _)| *r, |_| "allow");
        metrics.proxy_call(kind, result, started.elapsed());
        outcome.map_err(|(_, e)| e)
    }
}

/// `auth` with `{"proxy":true}` on a node without `proxy.connect_url`.
pub(crate) fn no_connect_url() -> Error {
    let why = "no connect proxy is configured (proxy.connect_url); auth with a token";
    err(Code::FailedPrecondition, why)
}

fn denied() -> Error {
    err(
        Code::PermissionDenied,
        "the backend does not allow subscribing to this channel",
    )
}

/// A failed call as the client's error: Unavailable when the backend could not decide (busy,
/// slow, down, 5xx), Internal otherwise. The text names no URL, secret or header.
fn call_error(e: &CallError) -> Error {
    if !e.is_unavailable() {
        tracing::warn!(error = ?e, "access backend call failed");
    }
    let code = if e.is_unavailable() {
        Code::Unavailable
    } else {
        Code::Internal
    };
    err(code, format!("{e}; retry"))
}

fn malformed(why: &str) -> Error {
    tracing::warn!(why, "access backend answer not understood");
    err(Code::Internal, "access backend answer malformed")
}
