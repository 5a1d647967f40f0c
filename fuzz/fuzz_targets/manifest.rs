#![no_main]
//! See [`afetm_fuzz::manifest`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| afetm_fuzz::manifest::run(data));
