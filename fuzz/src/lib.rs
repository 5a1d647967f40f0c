//! afetm's fuzz targets: every place where bytes from outside become our data. Each module is
//! one target with a `run` that libFuzzer calls (`fuzz_targets/*.rs` are one line each) and that
//! asserts what must hold for any input, not only that nothing panics:
//!
//! - [`batch`]: Ingest batches through validation into the store (exactly-once, refusals).
//! - [`plan`]: plan files (`afetm-agent --plan`, `set-plan`).
//! - [`elf`]: the ELF, `.eh_frame` and DWARF readers of `afetm-elf` over a binary's bytes.
//! - [`fddb_import`]: FDDB JSON-lines import (all or nothing; exports import back).
//! - [`manifest`]: a model directory's `manifest.json` and weights.
//!
//! Seeds live in `fuzz/corpus/<target>/`, written by `cargo run --example seeds` (see there).
#![deny(missing_docs)]

pub mod batch;
pub mod elf;
pub mod fddb_import;
pub mod manifest;
pub mod plan;
