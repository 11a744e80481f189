//! Broadcaster: a real-time WebSocket messaging server on a shard-per-core engine.
//!
//! One glommio executor per core (a *shard*) owns its connections and its channel-subscription
//! table. A publication goes to the channel's *owner shard* (`hash(channel) % shards`), which
//! assigns its offset, keeps its history and encodes its broadcast once; every shard with
//! subscribers gets one `Arc` of it through a lock-free ring, splices each subscription's `seq`
//! into the shared bytes, and its flush pass writes every socket with one io_uring submission.
//! `ARCHITECTURE.md` gives the reasons.
//!
//! # One publication's path
//!
//! ```text
//! POST /publish ── web::serve ── web::routes ── wire::request::parse_publish_body ──┐
//! WS publish ─── session (read loop) ── session::requests ── wire::request ──────────┤
//!                                                                                    ▼
//!                      shard::publish: route::route ──► Local │ Peer(shard) │ Redis
//!        ┌─────────────────────────────────────────────────┘       │            │
//!        ▼  (the owner shard; a Peer gets it through ring)          ▼            ▼
//!  channel::Channels::publish: offset, history,            ring::ShardMsg   cluster::publish
//!  wire::broadcast parts, the watching shards                   │         (Lua script; Redis
//!        │ ring::ShardMsg::Deliver(Arc<Publication>)            │          pub/sub back to every
//!        ▼                                                      ▼          node's cluster::bridge)
//!  shard::deliver ── subscriptions (this shard's subscribers) ── fanout::deliver
//!        per subscriber: Subscription::takes, next_seq ── connection::send_queue::enqueue_broadcast
//!        (a frame staged in the pass's arena, or the connection's own queue)
//!        ▼
//!  connection::flush (once per executor turn) ── io::send_batch (one io_uring submission)
//!        what a socket does not take ── connection::writer (waits under write_timeout)
//! ```
//!
//! # Where to find it
//!
//! | behaviour | file |
//! |---|---|
//! | the slow-consumer close (4003) | `connection/send_queue.rs` (`enqueue_broadcast`); the write timeout in `connection/writer.rs` |
//! | JWT verification, API keys | `auth.rs` |
//! | the request rate limit and the 4004 rule | `session/rate_limit.rs` |
//! | the decision: this shard, a peer shard, or Redis | `route.rs` |
//! | recovery's no-gap rule | `shard/subscribe.rs` (a subscription starts when its owner's answer arrives in ring order); `connection/subscription.rs` (`takes`); `channel.rs` (`Channels::subscribe`: what history still holds) |
//! | history trimming and expiry | `channel.rs` (`Channels::publish`, `sweep`); in Redis, the capped stream of `cluster/scripts.rs` |
//! | the flush pass | `connection/flush.rs`, `io/send_batch.rs` |
//! | what is read on a connection, and when it is closed for time | `session/mod.rs` |
//! | one method of the protocol | `session/requests.rs` |
//! | every JSON text the server writes | `wire/reply.rs` (answers), `wire/broadcast.rs` (notifications) |
//! | parsing requests, bodies, heads, frames | `wire/request.rs`, `wire/json.rs`, `wire/http.rs`, `wire/frame.rs` |
//! | the WebSocket handshake | `wire/handshake.rs`, `web/serve.rs` (`upgrade`) |
//! | permessage-deflate: the offer, compressing once, inflating under the limit | `wire/deflate.rs`; `channel.rs` (`Publication::deflated`), `connection/send_queue.rs`, `wire/frame.rs` |
//! | server-sent events: the checks before the stream, the session, each event's bytes and the event id | `sse/open.rs`, `sse/mod.rs`, `wire/sse.rs`; `connection/event_stream.rs` (event ids, `enqueue_sse_broadcast`) |
//! | the REST endpoints | `web/routes.rs` (the route table) |
//! | a shard's sockets and timers | `io/poller.rs`, `io/timers.rs` |
//! | cluster mode | `cluster/` (its `mod.rs` lists its files) |
//! | limits built into the data structures | `constants.rs`; tunables in `config.rs` |
//! | who may subscribe where: token, public, proxy; where a subscription starts (`since`, `rewind`) | `rules.rs` (the `[[channels]]` rules), `session/access.rs` (the decision), `channel.rs` and `cluster/recovery.rs` (what rewind replays) |
//! | the anonymous caps and the client address (`X-Forwarded-For`) | `admission.rs`; counted at the handshake in `web/serve.rs` (`upgrade`) |
//! | the access proxy (the backend decides subscribes and connects) | `proxy/mod.rs` (calls, cache, metrics), `proxy/client.rs` (HTTP client, keep-alive pool, in-flight bound), `wire/proxy.rs` (URL, request, answer) |
//! | presence: members, join/leave, the `presence` method | `presence.rs` (counting), `channel.rs` (the owner's members), `shard/presence.rs` (in, out, asked), `cluster/presence.rs` (Redis, heartbeats, reaping) |
//! | `from` in broadcasts (who said it) | `auth.rs` (`Permissions::from`), `session/requests.rs` (`publish`), `wire/broadcast.rs` |
//! | the backend's `/disconnect` and `/unsubscribe` | `shard/control.rs` (every shard), `shard/users.rs` (a user's connections), `cluster/control.rs` (every node) |
//! | the backend's `/revoke`: what is revoked, and the check at `auth` | `revocation.rs`; `shard/control.rs` closes the connections; `cluster/control.rs` keeps it in Redis |
//! | webhooks: which events, batches, signatures, retries, the vacated delay | `webhook/mod.rs` (`Webhooks`: what is wanted, the queues), `webhook/sender.rs` (one hook's thread); `config.rs` (`WebhookConfig`) |
//! | every libc call | `sys.rs` |
//! | `/metrics` | `metrics.rs` |
//! | start, signals, panics | `server.rs`; the checks before start in `preflight.rs`; drain in `shutdown.rs` |
//!
//! # Modules
//!
//! Each module imports only modules of earlier lines (no import circle):
//!
//! 1. `clock`, `constants`, `error`, `sys`: leaves.
//! 2. `rules` (channel rules: access, history, rewind), `admission` (the anonymous caps),
//!    `revocation` (revoked tokens).
//! 3. `auth` (tokens, keys), `config` (tunables), `wire/` (sans-IO parsing and encoding),
//!    `preflight` (io_uring), `io/` (sockets, epoll, timers, TLS, the io_uring batch),
//!    `metrics` (per-shard counters, the exposition).
//! 4. `presence` (members, counted once each), then `channel` (owner-shard channel state and
//!    `Publication`), `cli` (the `publish` and `connect` subcommands), `dev` (dev mode),
//!    `webhook/` (the webhook queues and sender threads).
//! 5. `ring` (messages between shards, the rings, outboxes).
//! 6. `cluster/` (the Redis bridge).
//! 7. `node` (what all shards share).
//! 8. `proxy/` (the access backend: its HTTP client, the cache of its answers),
//!    `connection/` (one connection's send side: queue, flush pass, writer, subscriptions).
//! 9. `subscriptions` (a shard's table of local subscribers), `fanout` (the per-subscriber
//!    loop), `route` (local, peer or Redis).
//! 10. `shard/` (the per-core owner of everything above).
//! 11. `session/` (one WebSocket session over a connection), `shutdown` (drain).
//! 12. `sse/` (one server-sent event stream: its opening checks, access and teardown as a
//!     session's).
//! 13. `web/` (accept loops, HTTP, REST, the upgrade, the playground).
//! 14. `server` (start the shards, signals).

#![deny(unsafe_code)]
#![warn(unreachable_pub, missing_docs)]

mod admission;
pub mod auth;
pub mod channel;
pub mod cli;
pub mod clock;
mod cluster;
pub mod config;
pub mod connection;
mod constants;
mod dev;
pub mod error;
mod fanout;
mod io;
mod metrics;
pub mod node;
mod preflight;
pub mod presence;
pub mod proxy;
pub mod revocation;
mod ring;
mod route;
pub mod rules;
pub mod server;
mod session;
pub mod shard;
mod shutdown;
mod sse;
mod subscriptions;
mod sys;
mod web;
mod webhook;
pub mod wire;
