//! `fanout`: S subscribers on one channel, one publisher.

use super::pubsub::{run_pubsub, PubSub};
use crate::cli::FanoutArgs;
use crate::harness::SetupError;
use crate::report::Report;

/// `fanout`: S subscribers on one channel.
pub fn fanout(a: &FanoutArgs) -> Result<Report, SetupError> {
    run_pubsub(PubSub {
        name: "fanout",
        common: &a.common,
        publish: &a.publish,
        channels: 1,
        per_channel: a.subscribers,
        reconnect_every: None,
    })
}
