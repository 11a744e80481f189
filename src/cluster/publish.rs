//! One publication through the publish script: the offset, the history entry and the pub/sub
//! message in one atomic step, so Redis's pub/sub order is the offset order on every node.

use super::scripts::keys;
use super::{bump, unavailable, State, REDIS_TIMEOUT};
use crate::clock::{now_rfc3339, unix_ms};
use crate::error::Error;
use crate::ring::Ack;
use crate::wire::request::PublishParams;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

pub(super) async fn publish(
    state: &State,
    params: PublishParams,
    _accepted: Instant,
) -> Result<Ack, Error> {
    let Some(mut conn) = state.connection() else {
        return Err(unavailable("not connected"));
    };
    let n = state.next_publication.get() + 1;
    state.next_publication.set(n);
    let id = format!("{}-{n}", state.node_id);
    let create_time = now_rfc3339();
    let k = keys(&params.channel);
    let policy = state.rules.policy(&params.channel);
    let epoch = format!("{:016x}", rand::random::<u64>());
    let mut invocation = state.scripts.publish.key(&k[0]);
    invocation
        .key(&k[1])
        .key(&k[2])
        .key(&k[3])
        .key(&k[4])
        .arg(&id)
        .arg(&create_time)
        .arg(&params.event)
        .arg(&params.payload[..])
        .arg(&epoch)
        .arg(policy.history_size)
        .arg(policy.history_ttl.as_millis().max(1) as u64)
        .arg(unix_ms())
        .arg(params.from.as_deref().unwrap_or(""))
        .arg(&*state.generation.borrow());
    let started = Instant::now();
    let result =
        tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async::<u64>(&mut conn)).await;
    match result {
        Ok(Ok(offset)) => {
            let m = &state.metrics;
            m.publish_seconds_sum_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            m.publish_seconds_count.fetch_add(1, Relaxed);
            bump(&m.publications_out_total);
            Ok(Ack {
                id: id.into(),
                create_time: create_time.into(),
                offset,
            })
        }
        Ok(Err(e)) => {
            bump(&state.metrics.publish_errors_total);
            tracing::warn!(error = %e, channel = %params.channel, "redis publish failed");
            Err(unavailable("publish failed"))
        }
        Err(_) => {
            bump(&state.metrics.publish_errors_total);
            Err(unavailable("publish timed out"))
        }
    }
}
