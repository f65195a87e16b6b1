#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fams_fuzz::recover_from_bytes(data));
