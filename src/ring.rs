//! Cross-shard messaging: what shards say to each other (`ShardMsg`), the rings that carry it
//! (one bounded lock-free glommio `shared_channel` per ordered pair of shards), and each
//! shard's outboxes.
//!
//! Handlers never wait on a ring: a message for shard B goes into a shard-local unbounded outbox
//! that a pump task drains into the A-to-B ring. So two shards sending to each other with full
//! rings cannot deadlock; memory is bounded upstream by the per-connection rate limits and by
//! REST publishers waiting for their acknowledgement.

use crate::channel::{Asked, Position, Publication};
use crate::constants::RING_CAPACITY;
use crate::error::{Code, Error};
use crate::wire::request::{Control, PublishParams};
use futures_channel::{mpsc, oneshot};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Publication acknowledgement, as `publish` returns it.
#[derive(Debug, Clone)]
pub(crate) struct Ack {
    pub id: Box<str>,
    pub create_time: Box<str>,
    pub offset: u64,
}

/// A publication on its way to its owner (or Redis); `wait` gives its acknowledgement.
pub(crate) enum Submitted {
    Done(Result<Ack, Error>),
    Ring(oneshot::Receiver<Ack>),
    Bridge(oneshot::Receiver<Result<Ack, Error>>),
}

impl Submitted {
    pub(crate) async fn wait(self) -> Result<Ack, Error> {
        match self {
            Submitted::Done(r) => r,
            Submitted::Ring(rx) => rx
                .await
                .map_err(|_| crate::error::err(Code::Unavailable, "owner shard stopped")),
            Submitted::Bridge(rx) => rx
                .await
                .map_err(|_| crate::error::err(Code::Unavailable, "cluster bridge stopped"))?,
        }
    }
}

/// Messages between shards (and from the Redis bridge to a shard), carried by the rings. Only
/// `Send` data: `Arc`s and owned values.
pub(crate) enum ShardMsg {
    Publish {
        token: u64,
        from: usize,
        params: PublishParams,
        accepted: Instant,
    },
    Published {
        token: u64,
        ack: Ack,
    },
    Subscribe {
        token: u64,
        from: usize,
        channel: Arc<str>,
        asked: Asked,
    },
    /// A member's subscription ended.
    Leave {
        channel: Arc<str>,
        user: Arc<str>,
    },
    Subscribed {
        token: u64,
        position: Position,
    },
    /// Cluster mode: the subscription could not be set up (Redis unreachable).
    SubscribeFailed {
        token: u64,
        error: Error,
    },
    Unwatch {
        from: usize,
        channel: Arc<str>,
    },
    Deliver(Arc<Publication>),
    History {
        token: u64,
        from: usize,
        channel: String,
        limit: usize,
    },
    HistoryIs {
        token: u64,
        items: Vec<Arc<Publication>>,
        offset: u64,
        epoch: String,
    },
    Presence {
        token: u64,
        from: usize,
        channel: String,
    },
    /// The backend's disconnect or unsubscribe, for this shard's connections; answered with
    /// how many ended.
    Control {
        token: u64,
        from: usize,
        op: Arc<Control>,
    },
    ControlDone {
        token: u64,
        count: usize,
    },
    /// Another node's disconnect or unsubscribe (from the Redis bridge): no answer.
    Apply(Arc<Control>),
    PresenceIs {
        token: u64,
        body: Vec<u8>,
    },
    Channels {
        token: u64,
        from: usize,
    },
    ChannelsAre {
        token: u64,
        counts: Vec<(Arc<str>, usize)>,
        /// Members of the channels the peer owns that count them.
        users: Vec<(Arc<str>, usize)>,
    },
}

/// One shard's ends of every ring, handed to the shard that connects them.
pub(crate) struct Ends {
    to: Vec<Option<SharedSender<ShardMsg>>>,
    from: Vec<Option<SharedReceiver<ShardMsg>>>,
    /// Cluster mode: answers and publications from the Redis bridge.
    bridge: Option<mpsc::UnboundedReceiver<ShardMsg>>,
}

/// The rings between `shards` shards, one per ordered pair, and in cluster mode one channel
/// from the Redis bridge to each shard (`bridge` holds their senders, for the bridge).
pub(crate) fn mesh(
    shards: usize,
    cluster: bool,
) -> (Vec<Ends>, Vec<mpsc::UnboundedSender<ShardMsg>>) {
    let mut bridge = Vec::new();
    let mut ends: Vec<Ends> = (0..shards)
        .map(|_| Ends {
            to: (0..shards).map(|_| None).collect(),
            from: (0..shards).map(|_| None).collect(),
            bridge: cluster.then(|| {
                let (tx, rx) = mpsc::unbounded();
                bridge.push(tx);
                rx
            }),
        })
        .collect();
    for a in 0..shards {
        for b in 0..shards {
            if a != b {
                let (tx, rx) = shared_channel::new_bounded(RING_CAPACITY);
                ends[a].to[b] = Some(tx);
                ends[b].from[a] = Some(rx);
            }
        }
    }
    (ends, bridge)
}

/// A shard's queues towards its peers: sending never waits (see the module's comment).
pub(crate) struct Outboxes(RefCell<Vec<Option<LocalSender<ShardMsg>>>>);

impl Outboxes {
    pub(crate) fn new(shards: usize) -> Outboxes {
        Outboxes(RefCell::new((0..shards).map(|_| None).collect()))
    }

    pub(crate) fn send(&self, peer: usize, msg: ShardMsg) {
        if let Some(tx) = &self.0.borrow()[peer] {
            // Unbounded and local: fails only after the pump has gone (shutdown).
            let _ = tx.try_send(msg);
        }
    }
}

/// Connects a shard's ends: a pump per destination draining its outbox into the ring, and a
/// reader per source (and for the bridge) handing each message to `handle`, in ring order.
pub(crate) fn connect(outboxes: &Outboxes, ends: Ends, handle: Rc<dyn Fn(ShardMsg)>) {
    for (peer, tx) in ends.to.into_iter().enumerate() {
        let Some(tx) = tx else { continue };
        let (outbox, pending) = local_channel::new_unbounded();
        outboxes.0.borrow_mut()[peer] = Some(outbox);
        glommio::spawn_local(async move {
            let ring = tx.connect().await;
            while let Some(msg) = pending.recv().await {
                if ring.send(msg).await.is_err() {
                    break;
                }
            }
        })
        .detach();
    }
    if let Some(mut inbox) = ends.bridge {
        let handle = handle.clone();
        glommio::spawn_local(async move {
            use futures_util::StreamExt;
            while let Some(msg) = inbox.next().await {
                handle(msg);
                glommio::yield_if_needed().await;
            }
        })
        .detach();
    }
    for rx in ends.from.into_iter().flatten() {
        let handle = handle.clone();
        glommio::spawn_local(async move {
            let ring = rx.connect().await;
            while let Some(msg) = ring.recv().await {
                handle(msg);
                glommio::yield_if_needed().await;
            }
        })
        .detach();
    }
}
