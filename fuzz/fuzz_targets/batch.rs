#![no_main]
//! See [`afetm_fuzz::batch`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| afetm_fuzz::batch::run(data));
