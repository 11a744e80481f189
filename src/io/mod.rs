//! Sockets, readiness, timers and io_uring: what a shard waits on and writes with. The only
//! folder that knows glommio's I/O types.

pub(crate) mod listener;
pub(crate) mod poller;
pub(crate) mod send_batch;
pub(crate) mod socket;
pub(crate) mod timers;
pub(crate) mod tls;
