//! The fault injection campaign (AFETM, 004_eb31801e7dc37aff.txt, sec. III.C.1 and IV.A):
//! which faults to inject ([`plan`]), how each run is carried out on the NHSR-OSW shop under a
//! full trace of the target ([`runner`]), and which of a run's call trees the fault reached
//! ([`label`]). Everything a run yields goes into the FDDB (`afetm-fddb`). The command is
//! `afetm-campaign` (`src/main.rs`); `cargo xtask campaign` builds and calls it.
#![deny(missing_docs)]

pub mod label;
pub mod plan;
mod procs;
pub mod runner;
