//! Sans-IO: bytes in, values or bytes out. Nothing here knows glommio, a socket or a shard, so
//! each entry point is fuzzed (`fuzz/`) and benched (`benches/`) on its own.

pub mod broadcast;
pub mod deflate;
pub mod frame;
pub(crate) mod handshake;
pub mod http;
pub mod json;
pub mod proxy;
pub(crate) mod reply;
pub mod request;
pub mod sse;
