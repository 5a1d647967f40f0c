//! afetm's log-based diagnosis, run beside the GCN on the same incidents:
//!
//! * [`chimera`]: Chimera (000_840ce5b93fcf49d3.txt): shared and private GRU encoders (eqs
//!   1-4), the disentanglement loss (eq. 5), an attention detector, the sequence-driven
//!   (multi-instance) localizer (eq. 7) and the alignment of their results (eqs 8-9), trained
//!   end to end (eq. 10) from window labels only; engineers' feedback on lines and windows
//!   joins the next training.
//! * [`logsage`]: LogSage (002_28bdf65b24f1a9d8.txt) without an LLM: density clustering of a
//!   window's lines and the fault-indicating region (FILE, "No LLM" variant), and GARCA: a
//!   case-similarity graph over the FDDB's runs, GraphSAGE, and active learning that asks
//!   about the most uncertain cases first.
//!
//! * [`model`]: Chimera with its templates and embedder, saved and loaded as one directory
//!   (what the daemon serves and `afetm-analyzer train-logs` writes).
//!
//! Both read logs through `afetm-logs` (templates, embeddings, sequences) and run on the CPU
//! with candle, deterministic for a seed on one thread.
#![deny(missing_docs)]

pub mod chimera;
pub mod logsage;
pub mod model;

/// What can go wrong in the log-based models.
#[derive(Debug, thiserror::Error)]
pub enum LogDiagError {
    /// Nothing (or nothing usable) to learn from.
    #[error("training data: {0}")]
    Data(String),
    /// A tensor operation failed (a shape bug or out of memory).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The GCN crate's layer failed to initialize.
    #[error(transparent)]
    Diagnosis(#[from] afetm_diagnosis::DiagnosisError),
    /// A model file.
    #[error("model {path}: {message}")]
    Model {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}
