//! Function call trees (AFETM, 004_eb31801e7dc37aff.txt): the data model and the two algorithms
//! that work on trees alone.
//!
//! - [`tree`]: a [`tree::Forest`] in preorder, its functions interned in a [`tree::FuncTable`],
//!   its canonical text form and the SHA-256 of it ([`tree::Forest::hash`]), and the protobuf
//!   form the analyzer serves.
//! - [`afct`]: Algorithm 3, an approximate FCT from the traced (function, caller, call stack)
//!   events of one thread and window.
//! - [`graph`]: the window's call graph Alg. 3 unrolls, one node per function; unrolled it is
//!   the AFCT, and read back from an AFCT it is the same graph.
//! - [`coloring`]: Algorithm 2, FCTs colored against a trace point set, red nodes masked, and
//!   the equivalence check between masked FCTs and AFCTs.
//!
//! The daemon (`analyzer`), the FDDB (`fddb`) and the campaign (`campaign`) all build on this
//! crate; it has no I/O of its own.

pub mod afct;
pub mod coloring;
pub mod export;
pub mod graph;
pub mod tree;
