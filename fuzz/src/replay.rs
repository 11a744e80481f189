//! Replays committed inputs (seed corpora and regression reproducers) through the target
//! bodies without libFuzzer, so `cargo test` on a stable toolchain checks them.

use std::path::{Path, PathBuf};

/// A target's folder name under `corpus/` and `regressions/`, and its body.
pub type Target = (&'static str, fn(&[u8]));

pub const TARGETS: &[Target] = &[
    ("http_head", crate::targets::http_head),
    ("ws_frames", crate::targets::ws_frames),
    ("deflate_frames", crate::deflate::deflate_frames),
    ("protocol_request", crate::targets::protocol_request),
    ("rest_bodies", crate::targets::rest_bodies),
    ("jwt", crate::targets::jwt),
    ("config", crate::targets::config),
    ("proxy_response", crate::proxy::proxy_response),
    ("sse_event_id", crate::sse::sse_event_id),
];

pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The files of `dir/target`, sorted; none when the folder does not exist.
pub fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fuzz_dir().join(dir).join(target))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}
