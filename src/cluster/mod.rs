//! Cluster mode: the Redis bridge (SPEC section 8).
//!
//! The bridge lives on its own thread with a single-threaded tokio runtime, off the shards, so
//! Redis never blocks a shard. Shards send it requests through an unbounded channel (a send is a
//! plain function call); it answers and delivers through one unbounded channel per shard, whose
//! receiving task the shard runs like a ring reader.
//!
//! Redis holds, per channel, the offset counter, the epoch and a capped stream of history. One Lua
//! script per publication assigns the offset, appends to the stream and PUBLISHes, atomically, so
//! the pub/sub order is the offset order on every node. A node SUBSCRIBEs to a channel only while
//! one of its shards has subscribers, over one pub/sub connection, and fans each message out to
//! those shards once (one `Arc<Publication>`, encoded once per node).

//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the handle shards hold, what they may ask, the bridge's state, `start` |
//! | `bridge.rs` | the request loop, (re)connecting with backoff, pub/sub messages to shards |
//! | `publish.rs` | one publication through the publish script |
//! | `watch.rs` | which channels the node subscribes to in Redis, and the subscribe answer |
//! | `recovery.rs` | a channel's position, recovery from the stream, history pages |
//! | `control.rs` | the backend's disconnect, unsubscribe and revoke, from node to node; revocations kept in Redis |
//! | `presence.rs` | members in Redis: joins, leaves, heartbeats, reaping dead nodes |
//! | `occupancy.rs` | which nodes have subscribers of a channel, for the occupied and vacated webhooks |
//! | `scripts.rs` | the Lua scripts (hashed once, `Scripts`) and the key scheme |
//! | `conn.rs` | the command and pub/sub connections, to one Redis or to a Redis Cluster |

mod bridge;
mod conn;
mod control;
mod occupancy;
mod presence;
mod publish;
mod recovery;
mod scripts;
mod watch;

use crate::channel::{Asked, HistoryPage};
use crate::error::{Code, Error};
use crate::metrics::{BridgeMetrics, PresenceMetrics};
use crate::presence::Members;
use crate::revocation::Revocations;
use crate::ring::{Ack, ShardMsg};
use crate::rules::Rules;
use crate::webhook::{Event, Webhooks};
use crate::wire::request::PublishParams;
use futures_channel::{mpsc, oneshot};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Redis call slower than this counts as Redis being unreachable (SPEC 13.18 asks for
/// `Unavailable` within 5 s).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// What a shard may ask of the bridge.
pub(crate) enum Request {
    Publish {
        params: PublishParams,
        accepted: Instant,
        reply: oneshot::Sender<Result<Ack, Error>>,
    },
    Watch {
        shard: usize,
        token: u64,
        channel: Arc<str>,
        asked: Asked,
    },
    Unwatch {
        shard: usize,
        channel: Arc<str>,
    },
    /// A member's subscription on some shard ended.
    Leave {
        channel: Arc<str>,
        user: Arc<str>,
    },
    /// Who is in a channel (`reply::presence`).
    Presence {
        channel: String,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    /// Members of each channel, for `GET /channels`.
    MemberCounts {
        channels: Vec<Arc<str>>,
        reply: oneshot::Sender<Result<MemberCounts, Error>>,
    },
    /// The backend's disconnect or unsubscribe, applied here already: to the other nodes.
    Control {
        op: Arc<crate::wire::request::Control>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// The bridge's own: make Redis hold exactly this node's members.
    Reconcile,
    History {
        channel: String,
        limit: usize,
        reply: oneshot::Sender<Result<HistoryPage, Error>>,
    },
}

/// A channel's epoch and the offset of its last publication handed to the shards.
type Delivered = (Arc<str>, u64);

/// Members per channel.
pub(crate) type MemberCounts = Vec<(Arc<str>, usize)>;

/// What shards hold to talk to the bridge.
pub(crate) struct Bridge {
    pub requests: tokio::sync::mpsc::UnboundedSender<Request>,
    pub metrics: Arc<BridgeMetrics>,
}

impl Bridge {
    pub(crate) fn is_up(&self) -> bool {
        self.metrics.up.load(Relaxed)
    }

    pub(crate) fn send(&self, r: Request) {
        // Fails only when the bridge thread is gone (shutdown); callers then see a dropped reply.
        let _ = self.requests.send(r);
    }
}

fn unavailable(what: &str) -> Error {
    crate::error::err(
        Code::Unavailable,
        format!("cluster broker unreachable ({what}); retry"),
    )
}

/// Where Redis is.
pub(crate) enum Upstream {
    /// One Redis at this URL.
    Standalone(String),
    /// The master the sentinels at `urls` name `master`, asked again at every (re)connect.
    Sentinel { urls: Vec<String>, master: String },
    /// A Redis Cluster, found from any of these nodes.
    Cluster(Vec<String>),
}

impl Upstream {
    /// From `[redis]` (cluster mode must be on).
    pub(crate) fn of(config: &crate::config::RedisConfig) -> Upstream {
        let urls = config.all_urls();
        match config.mode {
            crate::config::RedisMode::Sentinel => Upstream::Sentinel {
                urls,
                master: config.master_name.clone(),
            },
            crate::config::RedisMode::Cluster => Upstream::Cluster(urls),
            crate::config::RedisMode::Standalone => {
                Upstream::Standalone(urls.into_iter().next().unwrap_or_default())
            }
        }
    }
}

/// What the bridge is started with, besides the shards' channels.
pub(crate) struct Setup {
    pub upstream: Upstream,
    pub node_id: String,
    pub rules: Arc<Rules>,
    pub presence: Arc<PresenceMetrics>,
    /// `presence.node_timeout`.
    pub node_timeout: Duration,
    /// The node's revoked tokens, kept in Redis too.
    pub revocations: Arc<Revocations>,
    /// Where occupancy and member events go (`[[webhooks]]`).
    pub webhooks: Option<Arc<Webhooks>>,
}

/// Starts the bridge thread. `shards` are the per-shard delivery channels.
pub(crate) fn start(
    setup: Setup,
    shards: Vec<mpsc::UnboundedSender<ShardMsg>>,
) -> Result<Bridge, String> {
    let Setup {
        upstream,
        node_id,
        rules,
        presence,
        node_timeout,
        revocations,
        webhooks,
    } = setup;
    let sharded = matches!(upstream, Upstream::Cluster(_));
    let finder = bridge::Finder::new(upstream)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let metrics = Arc::new(BridgeMetrics::default());
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("redis-bridge".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the redis bridge runtime");
                    return;
                }
            };
            let state = Rc::new(State {
                generation: RefCell::new(String::new()),
                node_id,
                shards,
                rules,
                metrics: m,
                conn: RefCell::new(None),
                sink: RefCell::new(None),
                watchers: RefCell::new(HashMap::new()),
                delivered: RefCell::new(HashMap::new()),
                next_publication: std::cell::Cell::new(0),
                members: RefCell::new(HashMap::new()),
                presence,
                scripts: scripts::Scripts::new(sharded),
                sharded,
                dirty: std::cell::Cell::new(false),
                beating: std::cell::Cell::new(false),
                node_timeout,
                revocations,
                webhooks,
            });
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, bridge::run(state, finder, rx));
        })
        .map_err(|e| format!("cannot start the redis bridge thread: {e}"))?;
    Ok(Bridge {
        requests: tx,
        metrics,
    })
}

struct State {
    /// Sentinel mode: the run id of the master connected to; Redis Cluster: `*`, which the
    /// scripts read as the id of the shard's master they run on. The scripts give a channel a
    /// new epoch when it differs from the one its state was written under, since a promoted
    /// replica may lack the last writes of the master it replaced (offsets would repeat).
    /// Empty in standalone mode.
    generation: RefCell<String>,
    node_id: String,
    shards: Vec<mpsc::UnboundedSender<ShardMsg>>,
    /// Each channel's history size and TTL.
    rules: Arc<Rules>,
    metrics: Arc<BridgeMetrics>,
    conn: RefCell<Option<conn::Conn>>,
    sink: RefCell<Option<conn::Subscriber>>,
    /// Redis Cluster: sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`).
    sharded: bool,
    /// Per channel, how many subscriptions (pending ones included) each shard holds.
    watchers: RefCell<HashMap<Arc<str>, Vec<usize>>>,
    /// Per watched channel, the epoch and offset of the last publication handed to the shards.
    delivered: RefCell<HashMap<Arc<str>, Delivered>>,
    next_publication: std::cell::Cell<u64>,
    /// Per channel, this node's members with how many subscriptions hold each.
    members: RefCell<HashMap<Arc<str>, Members>>,
    presence: Arc<PresenceMetrics>,
    scripts: scripts::Scripts,
    /// Redis may not hold exactly this node's members: reconcile at the next heartbeat.
    dirty: std::cell::Cell<bool>,
    /// This node has heartbeat in `bc:nodes` at least once.
    beating: std::cell::Cell<bool>,
    node_timeout: Duration,
    revocations: Arc<Revocations>,
    webhooks: Option<Arc<Webhooks>>,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl State {
    /// The command connection, while Redis is connected.
    fn connection(&self) -> Option<conn::Conn> {
        self.conn.borrow().clone()
    }

    /// Notes that `offset` of `channel` (in `epoch`) reaches the shards; false when it did
    /// already (a publication both read back from history and then received from pub/sub).
    fn follow(&self, channel: &str, epoch: &Arc<str>, offset: u64) -> bool {
        let mut delivered = self.delivered.borrow_mut();
        let Some((held, last)) = delivered.get_mut(channel) else {
            delivered.insert(Arc::from(channel), (epoch.clone(), offset));
            return true;
        };
        if **held != **epoch {
            *held = epoch.clone();
        } else if offset <= *last {
            return false;
        }
        *last = offset;
        true
    }

    /// How a message is published outside a script.
    fn publish_command(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A transition this node made, to the webhooks that want it.
    fn hook(&self, event: Event, channel: &str, user: Option<&str>) {
        if let Some(hooks) = &self.webhooks {
            hooks.emit(event, channel, user);
        }
    }
}
