#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fams_fuzz::alloc_damage(data));
