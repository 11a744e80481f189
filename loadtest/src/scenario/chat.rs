//! `chat`: C channels x K subscribers, publications round robin over the channels.

use super::pubsub::{run_pubsub, PubSub};
use crate::cli::ChatArgs;
use crate::harness::SetupError;
use crate::report::Report;

/// `chat`: C channels x K subscribers.
pub fn chat(a: &ChatArgs) -> Result<Report, SetupError> {
    run_pubsub(PubSub {
        name: "chat",
        common: &a.common,
        publish: &a.publish,
        channels: a.channels.max(1),
        per_channel: a.per_channel,
        reconnect_every: None,
    })
}
