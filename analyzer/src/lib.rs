//! The afetm analyzer: rebuilds approximate function call trees (AFCTs) from the agent's trace
//! events and serves them over gRPC.
//!
//! Modules follow the AFETM paper (004_eb31801e7dc37aff.txt): [`afct`] is Algorithm 3,
//! [`coloring`] is Algorithm 2, [`tree`] the FCT data model; [`store`] persists windows and
//! AFCTs in SQLite, [`selection`] is Algorithm 1 over the weights of [`weights`], [`ingest`] turns agent batches into windows, [`service`] is the gRPC surface.

pub mod afct;
pub mod campaign;
pub mod coloring;
pub mod fddb;
pub mod selection;
pub mod service;
pub mod store;
pub mod tree;
pub mod weights;
