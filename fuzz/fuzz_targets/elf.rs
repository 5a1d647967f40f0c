#![no_main]
//! See [`afetm_fuzz::elf`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| afetm_fuzz::elf::run(data));
