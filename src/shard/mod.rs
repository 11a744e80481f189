//! The per-core owner of connections, subscriptions, owned channels and the ring endpoints.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the shard's parts, fan-out of a delivered publication, upkeep |
//! | `publish.rs` | the one publish entry (REST and WebSocket) and sequencing as the owner |
//! | `subscribe.rs` | subscribe without gaps, unsubscribe, letting the owner go |
//! | `queries.rs` | history and subscriber counts |
//! | `presence.rs` | members in and out, joins and leaves, who is in a channel |
//! | `control.rs`, `users.rs` | the backend's disconnect and unsubscribe; each user's connections |
//! | `messages.rs` | what another shard or the Redis bridge says, one fn per message |
//!
//! Everything here is `Rc`/`RefCell` and never leaves its thread. `RefCell` borrows are taken
//! only inside the small synchronous methods below, never across an `.await`, so a borrow can
//! never be observed by another task of the same shard.

mod control;
mod messages;
mod presence;
mod publish;
mod queries;
mod subscribe;
mod users;

use crate::channel::{self, Channels, HistoryPage, Publication};
use crate::config::Config;
use crate::connection::{Conn, Flusher, SendSide};
use crate::constants::WATCH_WORDS;
use crate::fanout;
use crate::io::listener::Listener;
use crate::io::poller::Poller;
use crate::io::socket::HttpSock;
use crate::io::timers::Timers;
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::ring::{Ack, Ends, Outboxes, ShardMsg};
use crate::subscriptions::Subscriptions;
use futures_channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// A subscribe waiting for its owner's (or Redis's) answer.
struct SubscribeRequest {
    conn: Rc<Conn>,
    request_id: Option<Vec<u8>>,
    channel: Arc<str>,
    /// The member it brings, when the channel counts members.
    member: Option<Arc<str>>,
    /// Completed once the response is queued.
    done: oneshot::Sender<()>,
}

/// A request waiting for another shard's answer.
enum Pending {
    Publish(oneshot::Sender<Ack>),
    Subscribe(SubscribeRequest),
    History(oneshot::Sender<HistoryPage>),
    Presence(oneshot::Sender<Vec<u8>>),
    Control(Gather<usize>),
    Channels(Gather<ChannelCounts>),
}

impl Pending {
    fn channels(&mut self) -> Option<&mut Gather<ChannelCounts>> {
        match self {
            Pending::Channels(gather) => Some(gather),
            _ => None,
        }
    }

    fn control(&mut self) -> Option<&mut Gather<usize>> {
        match self {
            Pending::Control(gather) => Some(gather),
            _ => None,
        }
    }
}

/// Answers to one question asked of every peer shard, added up; complete with the last.
struct Gather<T> {
    waiting: usize,
    sum: T,
    done: Option<oneshot::Sender<T>>,
}

/// Subscribers per channel, and members per channel that counts them, over every shard.
#[derive(Default)]
pub(crate) struct ChannelCounts {
    pub(crate) subscribers: HashMap<Arc<str>, usize>,
    pub(crate) users: HashMap<Arc<str>, usize>,
}

/// One shard: an executor's connections, subscriptions, owned channels and ring ends.
pub struct Shard {
    pub(crate) id: usize,
    pub(crate) node: Arc<Node>,
    /// Per destination shard: a local queue drained into the ring by a pump task, so that
    /// handling a ring message never waits on another full ring (which could deadlock two
    /// shards sending to each other).
    outboxes: Outboxes,
    owned: RefCell<Channels>,
    /// Channels with subscribers (or subscribes in flight) on this shard.
    subscriptions: Subscriptions,
    /// Requests waiting for another shard's (or the bridge's) answer, by token.
    pending: RefCell<HashMap<u64, Pending>>,
    next_token: Cell<u64>,
    next_publication: Cell<u64>,
    next_subscription: Cell<u64>,
    pub(crate) conns: RefCell<HashMap<u64, Rc<Conn>>>,
    next_conn: Cell<u64>,
    /// Writes what fan-out queued, once per executor turn (`server` runs its task).
    pub(crate) send: Rc<SendSide>,
    /// Readiness of the shard's WebSocket sockets, and every connection's next due time
    /// (`server` runs their tasks).
    pub(crate) poller: Poller,
    pub(crate) timers: Timers,
    /// Each authenticated user's connections here, for the backend's disconnect and
    /// unsubscribe.
    users: RefCell<users::Users>,
    /// The access proxy, when a proxy URL is configured.
    pub(crate) proxy: Option<crate::proxy::Proxy>,
    /// Sockets in the epoll set that are not WebSocket connections (yet), by poller id.
    watched: RefCell<HashMap<u64, Watched>>,
}

/// A socket in the shard's epoll set that is not a WebSocket connection.
pub(crate) enum Watched {
    Http(Rc<HttpSock>),
    Listener(Rc<Listener>),
}

impl Shard {
    /// Shard `id` of `node`, with nothing open yet.
    pub fn new(id: usize, node: Arc<Node>) -> Rc<Shard> {
        Rc::new(Shard {
            id,
            outboxes: Outboxes::new(node.shards),
            owned: RefCell::new(Channels::new(node.rules.clone())),
            subscriptions: Subscriptions::default(),
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
            users: RefCell::new(users::Users::default()),
            proxy: crate::proxy::Proxy::new(&node, node.proxy_in_flight.clone()),
            node,
        })
    }

    /// Connection `id`, while it is open (the poller and the timers know connections by id).
    pub(crate) fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Readiness of the socket the poller knows as `id`.
    pub(crate) fn socket_ready(&self, id: u64, events: u32) {
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
    pub(crate) fn timer_due(&self, id: u64, due: Instant) {
        if let Some(conn) = self.conn(id) {
            conn.timer_due(due);
        }
    }

    /// Lets the poller reach `w` as `id` (registered in the epoll set under that id).
    pub(crate) fn watch(&self, id: u64, w: Watched) {
        self.watched.borrow_mut().insert(id, w);
    }

    pub(crate) fn unwatch(&self, id: u64) {
        self.watched.borrow_mut().remove(&id);
    }

    /// The flush pass of this shard's connections.
    pub fn flusher(&self) -> &Flusher {
        &self.send.flusher
    }

    pub(crate) fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.id]
    }

    pub(crate) fn config(&self) -> &Config {
        &self.node.config
    }

    fn send(&self, peer: usize, msg: ShardMsg) {
        debug_assert_ne!(peer, self.id, "local work takes the fast path");
        self.outboxes.send(peer, msg);
    }

    /// Connects this shard's ends of the rings; messages are handled by `on_ring`.
    pub(crate) fn connect_rings(self: &Rc<Self>, ends: Ends) {
        let shard = self.clone();
        crate::ring::connect(&self.outboxes, ends, Rc::new(move |msg| shard.on_ring(msg)));
    }

    /// Keeps `pending` until the answer carrying the returned token arrives.
    fn await_answer(&self, pending: Pending) -> u64 {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.pending.borrow_mut().insert(token, pending);
        token
    }

    /// Asks every peer shard the question `ask` makes of a token; the receiver gets `sum` with
    /// every answer added (by `gathered`).
    fn ask_peers<T>(
        &self,
        sum: T,
        pending: fn(Gather<T>) -> Pending,
        ask: impl Fn(u64) -> ShardMsg,
    ) -> oneshot::Receiver<T> {
        let (done, rx) = oneshot::channel();
        let waiting = self.node.shards - 1;
        let token = self.await_answer(pending(Gather {
            waiting,
            sum,
            done: Some(done),
        }));
        for peer in (0..self.node.shards).filter(|p| *p != self.id) {
            self.send(peer, ask(token));
        }
        rx
    }

    /// One peer's answer to the question of `token`: `add` puts it into the sum (`pick` finds
    /// the gather among the pending requests); the last answer completes it.
    fn gathered<T: Default>(
        &self,
        token: u64,
        pick: fn(&mut Pending) -> Option<&mut Gather<T>>,
        add: impl FnOnce(&mut T),
    ) {
        let mut pending = self.pending.borrow_mut();
        let Some(gather) = pending.get_mut(&token).and_then(pick) else {
            return;
        };
        add(&mut gather.sum);
        gather.waiting -= 1;
        if gather.waiting > 0 {
            return;
        }
        if let Some(done) = gather.done.take() {
            let _ = done.send(std::mem::take(&mut gather.sum));
        }
        pending.remove(&token);
    }

    /// The request that waited for `token`'s answer.
    fn answer_for(&self, token: u64) -> Option<Pending> {
        self.pending.borrow_mut().remove(&token)
    }

    pub(crate) fn new_conn_id(&self) -> u64 {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        (n << crate::constants::SHARD_ID_BITS) | self.id as u64
    }

    /// Shard-local fan-out of a publication (or a join or leave) to this shard's subscribers
    /// (`fanout.rs`).
    pub fn deliver(&self, publication: &Arc<Publication>) {
        let (metrics, flusher) = (self.metrics(), &self.send.flusher);
        let sent = self
            .subscriptions
            .deliver_to(publication, |subs| match publication.presence {
                None => fanout::deliver(subs, publication, metrics, flusher),
                Some(_) => fanout::notify(subs, publication, metrics, flusher),
            });
        ShardMetrics::add(&metrics.messages_sent_total, sent.unwrap_or(0));
    }

    /// As a channel's owner: `p` to every shard watching the channel (this one directly).
    fn send_to_watchers(&self, p: &Arc<Publication>, watchers: &[u64; WATCH_WORDS]) {
        for shard in channel::shards_in(watchers) {
            if shard == self.id {
                self.deliver(p);
            } else {
                self.send(shard, ShardMsg::Deliver(p.clone()));
            }
        }
    }

    /// Periodic upkeep: history expiry and forgetting idle channels.
    pub(crate) fn sweep(&self) {
        self.owned.borrow_mut().sweep(Instant::now());
        let (owned, local) = self.table_sizes();
        let m = self.metrics();
        m.channels_owned
            .store(owned as i64, std::sync::atomic::Ordering::Relaxed);
        m.channels_subscribed
            .store(local as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of channels this shard sequences and of channels with local subscribers.
    pub(crate) fn table_sizes(&self) -> (usize, usize) {
        (self.owned.borrow().len(), self.subscriptions.len())
    }
}
