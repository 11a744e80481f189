//! `recovery`: a fan-out whose subscribers keep reconnecting (to the next node, when there are
//! several) and resubscribing with `since`; nothing may be lost across the reconnects.

use std::time::Duration;

use super::pubsub::{run_pubsub, PubSub};
use crate::cli::RecoveryArgs;
use crate::harness::SetupError;
use crate::report::{row, Report};

/// `recovery`: subscribers keep reconnecting with `since`.
pub fn recovery(a: &RecoveryArgs) -> Result<Report, SetupError> {
    let mut report = run_pubsub(PubSub {
        name: "recovery",
        common: &a.common,
        publish: &a.publish,
        channels: 1,
        per_channel: a.subscribers,
        reconnect_every: Some(Duration::from_secs_f64(a.reconnect_every.max(0.01))),
    })?;
    let counts = format!("{} / {}", report.reconnects, report.unrecovered);
    report
        .rows
        .checks
        .push(row("reconnects / unrecovered", counts));
    Ok(report)
}
