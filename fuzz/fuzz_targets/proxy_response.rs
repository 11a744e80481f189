#![no_main]
// The invariants are in broadcaster_fuzz::proxy::proxy_response.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broadcaster_fuzz::proxy::proxy_response(data));
