//! Sockets, readiness, timers and io_uring: what a shard waits on and writes with. The only
//! folder that knows glommio's I/O types.

pub mod listener;
pub mod poller;
pub mod send_batch;
pub mod socket;
pub mod timers;
pub mod tls;
