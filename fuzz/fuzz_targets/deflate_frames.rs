#![no_main]
// The invariants are in broadcaster_fuzz::deflate::deflate_frames.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broadcaster_fuzz::deflate::deflate_frames(data));
