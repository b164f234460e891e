#![no_main]
//! See `restorer::fuzz::chain`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| restorer::fuzz::chain(data));
