//! What afetm reads from ELF binaries, shared by the agent (probe sites, caller names,
//! unwinding) and the analyzer (trace point selection): [`symbols`] gives function bounds and
//! `.eh_frame` rules, [`structure`] the basic blocks and call sites of AFETM's set cover
//! (sec. III.A), [`probe_site`] where each function's uprobe goes and whether the kernel
//! emulates or single-steps it there (what a call costs, for cost-aware selection),
//! [`dwarf`] the parameters and return types the fault campaign corrupts (sec. III.C.1).

pub mod dwarf;
pub mod probe_site;
pub mod structure;
pub mod symbols;
