//! The kernel floor: alone (the `floor` scenario), or beside a scenario's run (`--floor`), with the
//! run's socket count and mean broadcast frame size.

use crate::cli::{Common, FloorArgs};
use crate::floor::{self, FloorConfig, FloorResult};
use crate::harness::SetupError;
use crate::report::Report;

/// `floor`: the kernel floor alone.
pub fn floor_only(a: &FloorArgs) -> Result<FloorResult, SetupError> {
    let frame_bytes = a
        .frame_bytes
        .unwrap_or_else(|| floor::estimated_broadcast_frame_bytes(a.payload_bytes, "lt/fanout/0"));
    floor::run(&FloorConfig {
        sockets: a.sockets,
        frame_bytes,
        frames_per_send: a.frames_per_send.clone(),
        seconds: a.seconds,
        passes_per_s: a.passes_per_s,
        group: a.group,
        pin: a.pin,
    })
}

/// Measures the floor for the run in `report` and sets the server's ratios to it.
pub(super) fn measure_floor(report: &mut Report, common: &Common, sockets: usize) {
    let frame_bytes = report
        .frame_bytes_mean
        .map(|b| b.round() as usize)
        .unwrap_or_else(|| {
            floor::estimated_broadcast_frame_bytes(common.payload_bytes, "lt/fanout/0")
        });
    if !common.quiet {
        eprintln!("measuring the kernel floor: {sockets} sockets, {frame_bytes}-byte frames, 1 and {} per send", common.floor_k);
    }
    let cfg = FloorConfig {
        sockets,
        frame_bytes,
        frames_per_send: vec![common.floor_k],
        seconds: 2.0,
        passes_per_s: 0.0,
        group: 0,
        pin: false,
    };
    match floor::run(&cfg) {
        Ok(f) => report.set_floor(f),
        Err(e) => report.errors.push(format!("floor measurement failed: {e}")),
    }
    // At a fixed rate each publication goes to one channel's subscribers: the paced floor
    // writes that many sockets per pass, `rate` passes a second, the next group each pass.
    if report.rate > 0.0 && report.channels > 0 {
        let passes = report.rate;
        let group = sockets.div_ceil(report.channels as usize);
        let cfg = FloorConfig {
            frames_per_send: Vec::new(),
            seconds: 3.0f64.max(50.0 / passes),
            passes_per_s: passes,
            group,
            ..cfg
        };
        match floor::run(&cfg) {
            Ok(f) => report.set_paced_floor(passes, group, &f),
            Err(e) => report.errors.push(format!("paced floor failed: {e}")),
        }
    }
}
