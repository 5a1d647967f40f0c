//! What afetm reads from ELF binaries, shared by the agent (probe sites, caller names,
//! unwinding) and the analyzer (trace point selection): [`symbols`] gives function bounds and
//! `.eh_frame` rules, [`structure`] the basic blocks and call sites of AFETM's set cover
//! (sec. III.A).

pub mod structure;
pub mod symbols;
