//! Broadcaster: a real-time WebSocket messaging server on a shard-per-core engine.
//!
//! One glommio executor per core (a *shard*) owns its connections and its channel-subscription
//! table. A publication goes to the channel's *owner shard* (`hash(channel) % shards`), which
//! assigns its offset, keeps history, encodes the broadcast frame once, and hands one
//! `Arc<Publication>` to every shard with subscribers through lock-free rings. Each shard splices
//! each subscription's `seq` into the shared frame parts and queues the bytes on the connection;
//! the connection's writer sends everything queued in one write.
//!
//! | module | role |
//! |---|---|
//! | `config` | every tunable, file/env/flag layering, `assert_valid` |
//! | `http`, `frame`, `protocol` | sans-IO parsing and encoding (fuzzable, benchable) |
//! | `auth` | JWT verification into `Permissions`, API keys, minting |
//! | `channel` | owner-shard state of a channel: offset, epoch, history, watchers |
//! | `shard` | per-core state, the ring messages, publish/subscribe routing, fan-out |
//! | `connection` | one WebSocket: send queue, writer, read loop, timers, close codes |
//! | `transport` | listeners, plain sockets (epoll) or rustls over TCP, one read buffer per shard |
//! | `poller` | per-shard epoll set (listeners, every plain socket) and timer heap |
//! | `web` | accept loops, REST endpoints, the WebSocket upgrade |
//! | `metrics` | per-shard counters merged on scrape |
//! | `server` | start shards, wire rings, signals, shutdown |
//! | `client` | the `publish` and `connect` subcommands |

#![deny(unsafe_code)]
#![warn(unreachable_pub, missing_docs)]

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
mod ring;
mod route;
pub mod server;
mod session;
pub mod shard;
mod shutdown;
mod subscriptions;
mod sys;
mod web;
pub mod wire;
