#![no_main]
// The invariants are in broadcaster_fuzz::sse::sse_event_id.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broadcaster_fuzz::sse::sse_event_id(data));
