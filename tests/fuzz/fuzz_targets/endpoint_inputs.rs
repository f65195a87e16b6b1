#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fams_fuzz::endpoint_inputs(data);
});
