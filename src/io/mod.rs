//! Sockets, readiness, timers and io_uring: what a shard waits on and writes with. The only
//! folder that knows glommio's I/O types.

pub(crate) mod listener;
pub(crate) mod poller;
pub(crate) mod send_batch;
pub(crate) mod socket;
pub(crate) mod timers;
pub(crate) mod tls;

/// An executor for tests of code that needs glommio (sockets, timers).
#[cfg(test)]
pub(crate) fn test_executor() -> glommio::LocalExecutor {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .expect("a glommio executor")
}
