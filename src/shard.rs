//! The per-core owner of connections, subscriptions, owned channels and the ring endpoints.
//!
//! Everything here is `Rc`/`RefCell` and never leaves its thread. `RefCell` borrows are taken
//! only inside the small synchronous methods below, never across an `.await`, so a borrow can
//! never be observed by another task of the same shard.

use crate::channel::{self, Channels, HistoryPage, Position, Publication};
use crate::config::Config;
use crate::connection::{Conn, Flusher, SendSide, Subscription};
use crate::error::{Code, Error};
use crate::io::listener::Listener;
use crate::io::poller::Poller;
use crate::io::socket::HttpSock;
use crate::io::timers::Timers;
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::ring::{Ack, Ends, Outboxes, ShardMsg, Submitted};
use crate::route::{route, Route};
use crate::wire::reply;
use crate::wire::request::{PublishParams, Since};
use futures_channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use std::sync::Arc;
use std::time::Instant;

/// A request waiting for another shard's answer.
enum Pending {
    Publish(oneshot::Sender<Ack>),
    Subscribe {
        conn: Rc<Conn>,
        request_id: Option<Vec<u8>>,
        channel: Arc<str>,
        done: oneshot::Sender<()>,
    },
    History(oneshot::Sender<HistoryPage>),
    Channels {
        waiting: usize,
        counts: HashMap<Arc<str>, usize>,
        done: Option<oneshot::Sender<HashMap<Arc<str>, usize>>>,
    },
}

/// The shard-local subscribers of one channel.
#[derive(Default)]
struct Local {
    subs: Vec<Rc<Subscription>>,
    /// Subscribes sent to the owner and not yet answered; they hold the owner's watch too.
    pending: usize,
    /// While subscribes are pending, the publications delivered meanwhile: in cluster mode the
    /// answer can arrive after publications newer than its offset, which the new subscription
    /// must still get. Bounded by `HELD_MAX`; empty whenever nothing is pending.
    held: Vec<Arc<Publication>>,
}

/// Most publications held for pending subscribes of one channel (a subscribe round trip's worth).
const HELD_MAX: usize = 4096;

pub struct Shard {
    pub id: usize,
    pub node: Arc<Node>,
    /// Per destination shard: a local queue drained into the ring by a pump task, so that
    /// handling a ring message never waits on another full ring (which could deadlock two
    /// shards sending to each other).
    outboxes: Outboxes,
    owned: RefCell<Channels>,
    local: RefCell<HashMap<Arc<str>, Local>>,
    pending: RefCell<HashMap<u64, Pending>>,
    next_token: Cell<u64>,
    next_publication: Cell<u64>,
    next_subscription: Cell<u64>,
    pub conns: RefCell<HashMap<u64, Rc<Conn>>>,
    next_conn: Cell<u64>,
    /// Writes what fan-out queued, once per executor turn (`server` runs its task).
    pub send: Rc<SendSide>,
    /// Readiness of the shard's WebSocket sockets, and every connection's next due time
    /// (`server` runs their tasks).
    pub poller: Poller,
    pub timers: Timers,
    /// Sockets in the epoll set that are not WebSocket connections (yet), by poller id.
    watched: RefCell<HashMap<u64, Watched>>,
}

/// A socket in the shard's epoll set that is not a WebSocket connection.
pub enum Watched {
    Http(Rc<HttpSock>),
    Listener(Rc<Listener>),
}

/// How far ahead of the fan-out walk subscriptions are prefetched (their connections half as far,
/// once the subscription holding the pointer has arrived).
const PREFETCH_AHEAD: usize = 4;

impl Shard {
    pub fn new(id: usize, node: Arc<Node>) -> Rc<Shard> {
        let history = node.config.history.clone();
        Rc::new(Shard {
            id,
            outboxes: Outboxes::new(node.shards),
            owned: RefCell::new(Channels::new(history.size, history.ttl)),
            local: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            next_publication: Cell::new(0),
            next_subscription: Cell::new(0),
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(0),
            send: Rc::new(SendSide::new(node.clone(), id)),
            poller: Poller::new(),
            timers: Timers::default(),
            watched: RefCell::new(HashMap::new()),
            node,
        })
    }

    /// Connection `id`, while it is open (the poller and the timers know connections by id).
    pub fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Readiness of the socket the poller knows as `id`.
    pub fn socket_ready(&self, id: u64, events: u32) {
        if let Some(conn) = self.conn(id) {
            conn.socket_ready(events);
            return;
        }
        // Waking only schedules the task, so the map stays borrowed for no longer than this.
        match self.watched.borrow().get(&id) {
            Some(Watched::Http(sock)) => sock.ready(events),
            Some(Watched::Listener(l)) => l.ready(),
            None => {}
        }
    }

    /// The timers' entry for connection `id` at `due` has come.
    pub fn timer_due(&self, id: u64, due: Instant) {
        if let Some(conn) = self.conn(id) {
            conn.timer_due(due);
        }
    }

    /// Lets the poller reach `w` as `id` (registered in the epoll set under that id).
    pub fn watch(&self, id: u64, w: Watched) {
        self.watched.borrow_mut().insert(id, w);
    }

    pub fn unwatch(&self, id: u64) {
        self.watched.borrow_mut().remove(&id);
    }

    /// The flush pass of this shard's connections.
    pub fn flusher(&self) -> &Flusher {
        &self.send.flusher
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.id]
    }

    pub fn config(&self) -> &Config {
        &self.node.config
    }

    fn send(&self, peer: usize, msg: ShardMsg) {
        debug_assert_ne!(peer, self.id, "local work takes the fast path");
        self.outboxes.send(peer, msg);
    }

    /// Connects this shard's ends of the rings; messages are handled by `on_ring`.
    pub fn connect_rings(self: &Rc<Self>, ends: Ends) {
        let shard = self.clone();
        crate::ring::connect(&self.outboxes, ends, Rc::new(move |msg| shard.on_ring(msg)));
    }

    fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    pub fn new_conn_id(&self) -> u64 {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        (n << crate::constants::SHARD_ID_BITS) | self.id as u64
    }

    // ---- publish ----

    /// The one publish entry for REST and WebSocket: route to the owner shard, wait for the ack.
    pub async fn publish(self: &Rc<Self>, params: PublishParams) -> Result<Ack, Error> {
        self.submit(params).wait().await
    }

    /// Sends a publication on its way without waiting: publications submitted one after another
    /// from one shard keep their order, so `/broadcast` submits all, then waits for all.
    pub fn submit(self: &Rc<Self>, params: PublishParams) -> Submitted {
        if self.node.is_shutting_down() {
            return Submitted::Done(Err(crate::error::err(
                Code::Unavailable,
                "server is shutting down",
            )));
        }
        ShardMetrics::add(&self.metrics().messages_received_total, 1);
        let accepted = Instant::now();
        let owner = match route(&self.node, self.id, &params.channel) {
            Route::Local => return Submitted::Done(Ok(self.owner_publish(&params, accepted))),
            Route::Peer(owner) => owner,
            Route::Redis(bridge) => {
                if !bridge.is_up() {
                    return Submitted::Done(Err(crate::error::err(
                        Code::Unavailable,
                        "cluster broker unreachable; retry",
                    )));
                }
                let (reply, rx) = oneshot::channel();
                bridge.send(crate::cluster::Request::Publish {
                    params,
                    accepted,
                    reply,
                });
                return Submitted::Bridge(rx);
            }
        };
        let (tx, rx) = oneshot::channel();
        let token = self.token();
        self.pending
            .borrow_mut()
            .insert(token, Pending::Publish(tx));
        self.send(
            owner,
            ShardMsg::Publish {
                token,
                from: self.id,
                params,
                accepted,
            },
        );
        Submitted::Ring(rx)
    }

    fn owner_publish(&self, p: &PublishParams, accepted: Instant) -> Ack {
        let n = self.next_publication.get() + 1;
        self.next_publication.set(n);
        let id = format!("{}-{}-{}", self.node.node_id, self.id, n);
        let (publication, watchers) = self.owned.borrow_mut().publish(
            &p.channel,
            &p.event,
            &p.payload,
            id,
            crate::clock::now_rfc3339(),
            accepted,
        );
        for shard in channel::shards_in(&watchers) {
            if shard == self.id {
                self.deliver(&publication);
            } else {
                self.send(shard, ShardMsg::Deliver(publication.clone()));
            }
        }
        Ack {
            id: publication.id.clone(),
            create_time: publication.create_time.clone(),
            offset: publication.offset,
        }
    }

    /// Shard-local fan-out: one frame per subscriber, spliced from the shared parts. No
    /// allocation, no syscall and no await per subscriber; the writers run after this returns, so
    /// everything queued for a socket leaves in one write.
    pub fn deliver(&self, publication: &Arc<Publication>) {
        let mut local = self.local.borrow_mut();
        let Some(local) = local.get_mut(&publication.channel) else {
            return;
        };
        if local.pending > 0 && local.held.len() < HELD_MAX {
            local.held.push(publication.clone());
        }
        let mut sent = 0u64;
        let subs = &local.subs;
        for (i, sub) in subs.iter().enumerate() {
            // Subscriptions and their connections are spread over the heap and cold by the
            // next publication (the kernel's sends in between evict them): start loading the
            // ones a few steps ahead so their misses overlap instead of coming one by one.
            if let Some(ahead) = subs.get(i + PREFETCH_AHEAD) {
                crate::sys::prefetch(Rc::as_ptr(ahead), 2);
            }
            if let Some(ahead) = subs.get(i + PREFETCH_AHEAD / 2) {
                crate::sys::prefetch(Rc::as_ptr(&ahead.conn), 4);
            }
            debug_assert!(Rc::ptr_eq(&local.subs[sub.slot()], sub));
            if !sub.takes(publication) {
                continue;
            }
            if sub.conn.enqueue_broadcast(
                publication,
                sub.next_seq(),
                self.metrics(),
                &self.send.flusher,
            ) {
                sent += 1;
            }
        }
        ShardMetrics::add(&self.metrics().messages_sent_total, sent);
    }

    // ---- subscribe ----

    /// Starts a subscription for `conn`. It becomes active, and its response is queued, at the
    /// moment the owner's answer arrives in ring order, so no publication after the answer's
    /// offset can be missed and none before it is delivered. The returned receiver completes then.
    pub fn subscribe(
        self: &Rc<Self>,
        conn: &Rc<Conn>,
        request_id: Option<&[u8]>,
        channel: &str,
        since: Option<Since>,
    ) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let channel: Arc<str> = {
            let mut local = self.local.borrow_mut();
            match local.get_key_value(channel) {
                Some((k, _)) => k.clone(),
                None => {
                    let k: Arc<str> = Arc::from(channel);
                    local.insert(k.clone(), Local::default());
                    k
                }
            }
        };
        if let Some(l) = self.local.borrow_mut().get_mut(&channel) {
            l.pending += 1;
        }
        let pending = Pending::Subscribe {
            conn: conn.clone(),
            request_id: request_id.map(<[u8]>::to_vec),
            channel: channel.clone(),
            done,
        };
        match route(&self.node, self.id, &channel) {
            Route::Local => {
                let position = self
                    .owned
                    .borrow_mut()
                    .subscribe(self.id, &channel, since.as_ref());
                self.finish_subscribe(pending, position);
            }
            Route::Peer(owner) => {
                let token = self.token();
                self.pending.borrow_mut().insert(token, pending);
                let from = self.id;
                let msg = ShardMsg::Subscribe {
                    token,
                    from,
                    channel,
                    since,
                };
                self.send(owner, msg);
            }
            Route::Redis(bridge) => {
                let token = self.token();
                self.pending.borrow_mut().insert(token, pending);
                let shard = self.id;
                let request = crate::cluster::Request::Watch {
                    shard,
                    token,
                    channel,
                    since,
                };
                bridge.send(request);
            }
        }
        rx
    }

    fn finish_subscribe(&self, pending: Pending, position: Position) {
        let Pending::Subscribe {
            conn,
            request_id,
            channel,
            done,
        } = pending
        else {
            return;
        };
        let held = {
            let mut local = self.local.borrow_mut();
            match local.get_mut(&channel) {
                Some(l) => {
                    l.pending -= 1;
                    if l.pending == 0 {
                        std::mem::take(&mut l.held)
                    } else {
                        l.held.clone()
                    }
                }
                None => Vec::new(),
            }
        };
        if conn.is_closing() {
            self.release(&channel);
            let _ = done.send(());
            return;
        }
        let n = self.next_subscription.get() + 1;
        self.next_subscription.set(n);
        let sub = Rc::new(Subscription::new(
            conn.clone(),
            channel.clone(),
            n,
            position.offset,
            position.epoch.clone(),
        ));
        {
            let mut local = self.local.borrow_mut();
            let l = local.entry(channel.clone()).or_default();
            sub.set_slot(l.subs.len());
            l.subs.push(sub.clone());
        }
        conn.add_subscription(sub.clone());
        ShardMetrics::gauge(&self.metrics().subscriptions_total, 1);
        // The response first, then what was missed, then (later) live publications.
        let body = reply::subscribed(
            &format!("{}-{}", self.id, n),
            &crate::clock::now_rfc3339(),
            position.offset,
            &position.epoch,
            position.recovered,
        );
        conn.respond(request_id.as_deref(), Ok(&body));
        for publication in &position.replay {
            conn.enqueue_broadcast(
                publication,
                sub.next_seq(),
                self.metrics(),
                &self.send.flusher,
            );
        }
        let newer = |p: &&Arc<Publication>| {
            p.offset > position.offset || p.epoch.as_ref().is_some_and(|e| *e != position.epoch)
        };
        for publication in held.iter().filter(newer) {
            conn.enqueue_broadcast(
                publication,
                sub.next_seq(),
                self.metrics(),
                &self.send.flusher,
            );
        }
        let _ = done.send(());
    }

    /// Removes one subscription of `conn` (unsubscribe, re-auth narrowing, or close).
    pub fn unsubscribe(&self, sub: &Rc<Subscription>) {
        {
            let mut local = self.local.borrow_mut();
            let Some(l) = local.get_mut(&sub.channel) else {
                return;
            };
            let slot = sub.slot();
            if slot >= l.subs.len() || !Rc::ptr_eq(&l.subs[slot], sub) {
                return;
            }
            l.subs.swap_remove(slot);
            if let Some(moved) = l.subs.get(slot) {
                moved.set_slot(slot);
            }
        }
        ShardMetrics::gauge(&self.metrics().subscriptions_total, -1);
        self.release(&sub.channel);
    }

    /// When a channel has neither subscribers nor pending subscribes here, tell its owner to stop
    /// sending its publications to this shard.
    fn release(&self, channel: &Arc<str>) {
        let idle = {
            let mut local = self.local.borrow_mut();
            let idle = local
                .get(channel)
                .is_some_and(|l| l.subs.is_empty() && l.pending == 0);
            if idle {
                local.remove(channel);
            }
            idle
        };
        if !idle {
            return;
        }
        match route(&self.node, self.id, channel) {
            Route::Local => self.owned.borrow_mut().unwatch(self.id, channel),
            Route::Peer(owner) => {
                let (from, channel) = (self.id, channel.clone());
                self.send(owner, ShardMsg::Unwatch { from, channel });
            }
            Route::Redis(bridge) => {
                let (shard, channel) = (self.id, channel.clone());
                bridge.send(crate::cluster::Request::Unwatch { shard, channel });
            }
        }
    }

    /// Forgets an idle local entry without telling the owner (it already let go).
    fn release_local(&self, channel: &Arc<str>) {
        let mut local = self.local.borrow_mut();
        if local
            .get(channel)
            .is_some_and(|l| l.subs.is_empty() && l.pending == 0)
        {
            local.remove(channel);
        }
    }

    // ---- queries ----

    pub async fn history(
        self: &Rc<Self>,
        channel: String,
        limit: usize,
    ) -> Result<HistoryPage, Error> {
        let owner = match route(&self.node, self.id, &channel) {
            Route::Local => return Ok(self.owned.borrow_mut().history(&channel, limit)),
            Route::Peer(owner) => owner,
            Route::Redis(bridge) => {
                let (reply, rx) = oneshot::channel();
                bridge.send(crate::cluster::Request::History {
                    channel,
                    limit,
                    reply,
                });
                return rx
                    .await
                    .map_err(|_| crate::error::err(Code::Unavailable, "cluster bridge stopped"))?;
            }
        };
        let (tx, rx) = oneshot::channel();
        let token = self.token();
        self.pending
            .borrow_mut()
            .insert(token, Pending::History(tx));
        self.send(
            owner,
            ShardMsg::History {
                token,
                from: self.id,
                channel,
                limit,
            },
        );
        rx.await
            .map_err(|_| crate::error::err(Code::Unavailable, "owner shard stopped"))
    }

    fn local_counts(&self) -> Vec<(Arc<str>, usize)> {
        self.local
            .borrow()
            .iter()
            .filter(|(_, l)| !l.subs.is_empty())
            .map(|(c, l)| (c.clone(), l.subs.len()))
            .collect()
    }

    /// Subscriber counts of every channel with subscribers, summed over all shards.
    pub async fn channel_counts(self: &Rc<Self>) -> Result<HashMap<Arc<str>, usize>, Error> {
        let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
        for (c, n) in self.local_counts() {
            *counts.entry(c).or_default() += n;
        }
        if self.node.shards == 1 {
            return Ok(counts);
        }
        let (tx, rx) = oneshot::channel();
        let token = self.token();
        self.pending.borrow_mut().insert(
            token,
            Pending::Channels {
                waiting: self.node.shards - 1,
                counts,
                done: Some(tx),
            },
        );
        for peer in 0..self.node.shards {
            if peer != self.id {
                self.send(
                    peer,
                    ShardMsg::Channels {
                        token,
                        from: self.id,
                    },
                );
            }
        }
        rx.await
            .map_err(|_| crate::error::err(Code::Unavailable, "a shard stopped"))
    }

    // ---- the ring ----

    /// Handles one message from another shard. Never waits: replies go to outboxes.
    pub fn on_ring(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish {
                token,
                from,
                params,
                accepted,
            } => {
                let ack = self.owner_publish(&params, accepted);
                self.send(from, ShardMsg::Published { token, ack });
            }
            ShardMsg::Published { token, ack } => {
                if let Some(Pending::Publish(tx)) = self.pending.borrow_mut().remove(&token) {
                    let _ = tx.send(ack);
                }
            }
            ShardMsg::Subscribe {
                token,
                from,
                channel,
                since,
            } => {
                let position = self
                    .owned
                    .borrow_mut()
                    .subscribe(from, &channel, since.as_ref());
                self.send(from, ShardMsg::Subscribed { token, position });
            }
            ShardMsg::Subscribed { token, position } => {
                let pending = self.pending.borrow_mut().remove(&token);
                if let Some(p) = pending {
                    self.finish_subscribe(p, position);
                }
            }
            ShardMsg::SubscribeFailed { token, error } => {
                let pending = self.pending.borrow_mut().remove(&token);
                if let Some(Pending::Subscribe {
                    conn,
                    request_id,
                    channel,
                    done,
                }) = pending
                {
                    if let Some(l) = self.local.borrow_mut().get_mut(&channel) {
                        l.pending -= 1;
                        if l.pending == 0 {
                            l.held.clear();
                        }
                    }
                    self.metrics().rejected(error.code);
                    conn.respond(request_id.as_deref(), Err(&error));
                    self.release_local(&channel);
                    let _ = done.send(());
                }
            }
            ShardMsg::Unwatch { from, channel } => {
                self.owned.borrow_mut().unwatch(from, &channel);
            }
            ShardMsg::Deliver(publication) => self.deliver(&publication),
            ShardMsg::History {
                token,
                from,
                channel,
                limit,
            } => {
                let (items, offset, epoch) = self.owned.borrow_mut().history(&channel, limit);
                self.send(
                    from,
                    ShardMsg::HistoryIs {
                        token,
                        items,
                        offset,
                        epoch,
                    },
                );
            }
            ShardMsg::HistoryIs {
                token,
                items,
                offset,
                epoch,
            } => {
                if let Some(Pending::History(tx)) = self.pending.borrow_mut().remove(&token) {
                    let _ = tx.send((items, offset, epoch));
                }
            }
            ShardMsg::Channels { token, from } => {
                let counts = self.local_counts();
                self.send(from, ShardMsg::ChannelsAre { token, counts });
            }
            ShardMsg::ChannelsAre { token, counts } => {
                let mut pending = self.pending.borrow_mut();
                let finished = match pending.get_mut(&token) {
                    Some(Pending::Channels {
                        waiting,
                        counts: acc,
                        done,
                    }) => {
                        for (c, n) in counts {
                            *acc.entry(c).or_default() += n;
                        }
                        *waiting -= 1;
                        if *waiting == 0 {
                            if let Some(tx) = done.take() {
                                let _ = tx.send(std::mem::take(acc));
                            }
                            true
                        } else {
                            false
                        }
                    }
                    _ => false,
                };
                if finished {
                    pending.remove(&token);
                }
            }
        }
    }

    /// Periodic upkeep: history expiry and forgetting idle channels.
    pub fn sweep(&self) {
        self.owned.borrow_mut().sweep(Instant::now());
        let (owned, local) = self.table_sizes();
        let m = self.metrics();
        m.channels_owned
            .store(owned as i64, std::sync::atomic::Ordering::Relaxed);
        m.channels_subscribed
            .store(local as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of channels this shard sequences and of channels with local subscribers.
    pub fn table_sizes(&self) -> (usize, usize) {
        (self.owned.borrow().len(), self.local.borrow().len())
    }
}
