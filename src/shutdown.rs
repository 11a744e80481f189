//! Draining a shard on SIGINT/SIGTERM (SPEC 6): every connection gets close 1001 after what is
//! queued for it, and gets up to `shutdown_grace` to take it.

use crate::error::close;
use crate::shard::Shard;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Closes every connection of `shard` with 1001 and waits until they are gone or
/// `shutdown_grace` has passed. `/health` already answers 503 and publishes are refused (the
/// node's shutdown flag).
pub(crate) async fn drain(shard: &Shard) {
    let conns: Vec<Rc<_>> = shard.conns.borrow().values().cloned().collect();
    for conn in conns {
        conn.close(close::GOING_AWAY, "server shutting down", false);
    }
    let deadline = Instant::now() + shard.config().shutdown_grace;
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}
