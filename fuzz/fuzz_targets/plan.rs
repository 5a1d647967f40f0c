#![no_main]
//! See [`afetm_fuzz::plan`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| afetm_fuzz::plan::run(data));
