//! Shared code of the fuzz targets: generators that build valid-ish inputs from libFuzzer's
//! bytes, independent oracles (a reference WebSocket decoder, a JSON grammar check, an HMAC
//! check of accepted tokens), and the target bodies themselves (`targets`).

pub mod config;
pub mod deflate;
pub mod http;
pub mod json;
pub mod jwt;
pub mod proxy;
pub mod replay;
pub mod sse;
pub mod targets;
pub mod ws;
