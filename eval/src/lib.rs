//! The evaluation of AFETM (004_eb31801e7dc37aff.txt, sec. IV.B-C) against the methods the
//! paper compares with, on held-out runs.
//!
//! - [`case`]: what every method is scored on: a run (its truth, its windows' trees, its logs),
//!   read from the FDDB's runs or from a live analyzer's database;
//! - [`method`]: the one trait every diagnosis method implements ([`method::Method`]), with
//!   AFETM's GCN and the baselines in [`methods`];
//! - [`ted`]: tree edit distance (Zhang-Shasha), which the two tree baselines need;
//! - [`metrics`]: EDR (eq. 11), FLR (eq. 12), FLD, FDD, the false alarm rate, per run and per
//!   window;
//! - [`report`]: `report.md` and the figures;
//! - [`seeds`]: the figures of several campaign seeds side by side, with their spread.
#![deny(missing_docs)]

pub mod case;
pub mod method;
pub mod methods;
pub mod metrics;
pub mod report;
pub mod seeds;
pub mod ted;

/// What went wrong in the evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The FDDB refused.
    #[error("FDDB: {0}")]
    Fddb(#[from] afetm_fddb::FddbError),
    /// Reading labelled trees failed.
    #[error(transparent)]
    Training(#[from] afetm_analyzer::training::TrainingError),
    /// A model refused.
    #[error(transparent)]
    Diagnosis(#[from] afetm_diagnosis::DiagnosisError),
    /// The live analyzer's database refused.
    #[error("analyzer store: {0}")]
    Store(#[from] afetm_analyzer::store::StoreError),
    /// candle failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Bad input data.
    #[error("{0}")]
    Input(String),
}
