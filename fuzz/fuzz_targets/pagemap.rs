#![no_main]
//! See `images::fuzz::pagemap`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| images::fuzz::pagemap(data));
