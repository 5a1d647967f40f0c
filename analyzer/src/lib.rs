//! The afetm analyzer daemon: ingests the agent's trace events, builds approximate function
//! call trees (AFCTs) and serves them over gRPC.
//!
//! [`store`] (the `afetm-store` crate) cuts agent batches into windows and persists windows and AFCTs in SQLite;
//! [`service`] is the gRPC surface (ingest, query, control); [`reporting`] builds a window's
//! report (issue 13) from the store, the log model and the FDDB. The algorithms live in their own
//! crates: call trees, Alg. 2 and Alg. 3 in `afetm-calltree`, trace point selection (Alg. 1)
//! in `afetm-selection`, the FDDB in `afetm-fddb`, the campaign in `afetm-campaign`.

pub mod diagnoser;
pub mod metrics;
pub mod reporting;
pub mod service;
pub mod training;
pub mod web;

pub use afetm_calltree::{afct, coloring, tree};
pub use afetm_store as store;
