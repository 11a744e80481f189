//! The accept loop of one listener of one shard.

use super::serve::serve;
use super::Role;
use crate::io::listener::Listener;
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Pause after a failed accept (out of file descriptors), so the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections for the shard's life, one HTTP task each.
pub(crate) async fn accept_loop(shard: Rc<Shard>, listener: Rc<Listener>, role: Role) {
    let mut last_logged: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((fd, peer)) => {
                glommio::spawn_local(serve(shard.clone(), fd, peer, role)).detach();
                // A full backlog (4,096) is taken in one go otherwise: let the others run.
                glommio::yield_if_needed().await;
            }
            Err(e) => {
                ShardMetrics::add(&shard.metrics().accept_errors_total, 1);
                // Log once a minute at most: out of descriptors repeats every backoff.
                if last_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(shard = shard.id, error = %e, "accept failed; backing off (raise the open-files limit if this is EMFILE)");
                    last_logged = Some(Instant::now());
                }
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
