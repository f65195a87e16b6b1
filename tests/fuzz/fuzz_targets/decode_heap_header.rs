#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fams_fuzz::decode_heap_header(data));
