#![no_main]
//! See [`afetm_fuzz::fddb_import`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| afetm_fuzz::fddb_import::run(data));
