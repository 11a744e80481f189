#![no_main]
// The invariants are in broadcaster_fuzz::targets::http_head.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broadcaster_fuzz::targets::http_head(data));
