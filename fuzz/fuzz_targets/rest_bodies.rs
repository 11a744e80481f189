#![no_main]
// The invariants are in broadcaster_fuzz::targets::rest_bodies.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broadcaster_fuzz::targets::rest_bodies(data));
