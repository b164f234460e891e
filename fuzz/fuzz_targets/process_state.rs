#![no_main]
//! See `images::fuzz::process_state`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| images::fuzz::process_state(data));
