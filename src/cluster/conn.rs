//! The two connections the bridge holds, whichever Redis it talks to: one for commands and
//! scripts, one for pub/sub. With one Redis (standalone or the master the sentinels name) they
//! are a multiplexed connection and a classic pub/sub connection; with Redis Cluster they are two
//! cluster connections (each one socket per Redis shard, routed by slot and following MOVED and
//! failovers), the second speaking RESP3 so that sharded pub/sub messages come back as pushes.

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, PushKind, RedisFuture, RedisResult, Value};

/// The command connection.
#[derive(Clone)]
pub(super) enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The pub/sub connection's sending half (a clone sends on the same connection).
#[derive(Clone)]
pub(super) enum Subscriber {
    /// `SUBSCRIBE` on one Redis.
    Classic(redis::aio::PubSubSink),
    /// `SSUBSCRIBE`, sent by the cluster connection to the shard that owns the channel's slot.
    Sharded(ClusterConnection),
}

impl Subscriber {
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Classic(sink) => sink.subscribe(channel).await,
            Subscriber::Sharded(conn) => conn.ssubscribe(channel).await,
        }
    }

    pub(super) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Classic(sink) => sink.unsubscribe(channel).await,
            Subscriber::Sharded(conn) => conn.sunsubscribe(channel).await,
        }
    }
}

/// What the pub/sub connection delivers.
pub(super) enum Incoming {
    Classic(redis::Msg),
    Sharded(PushInfo),
}

impl Incoming {
    /// A message: its pub/sub channel and payload.
    pub(super) fn message(&self) -> Option<(&[u8], &[u8])> {
        match self {
            Incoming::Classic(msg) => {
                Some((msg.get_channel_name().as_bytes(), msg.get_payload_bytes()))
            }
            Incoming::Sharded(push) if push.kind == PushKind::SMessage => {
                match push.data.as_slice() {
                    [Value::BulkString(channel), Value::BulkString(payload), ..] => {
                        Some((channel, payload))
                    }
                    _ => None,
                }
            }
            Incoming::Sharded(_) => None,
        }
    }

    /// A shard channel Redis confirmed this node's subscription to.
    pub(super) fn ssubscribed(&self) -> Option<&[u8]> {
        self.shard_notice(PushKind::SSubscribe)
    }

    /// A shard channel Redis unsubscribed this node from: its confirmation of our own
    /// `SUNSUBSCRIBE`, or Redis's notice after the channel's slot moved to another shard (a
    /// resharding, or a failover), when the subscription must be made again where the slot is.
    pub(super) fn sunsubscribed(&self) -> Option<&[u8]> {
        self.shard_notice(PushKind::SUnsubscribe)
    }

    /// The channel a sharded push of `kind` names.
    fn shard_notice(&self, kind: PushKind) -> Option<&[u8]> {
        match self {
            Incoming::Sharded(push) if push.kind == kind => match push.data.first() {
                Some(Value::BulkString(channel)) => Some(channel),
                _ => None,
            },
            _ => None,
        }
    }
}
