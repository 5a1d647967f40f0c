//! What afetm reads from ELF binaries, shared by the agent (probe sites, caller names,
//! unwinding) and the analyzer (trace point selection): [`symbols`] gives function bounds and
//! `.eh_frame` rules, [`structure`] the basic blocks and call sites of AFETM's set cover
//! (sec. III.A), [`dwarf`] the parameters and return types the fault campaign corrupts
//! (sec. III.C.1).

pub mod dwarf;
pub mod structure;
pub mod symbols;
