//! afetm's diagnosis: the graph convolutional network of AFETM (004_eb31801e7dc37aff.txt,
//! sec. III.C.2, eqs 9-10, Fig. 3) that tells, for a call tree, whether it shows a fault and
//! which function and fault kind is behind it.
//!
//! * [`graph`]: a tree (AFCT or masked colored FCT) as the network's input graph, and batches
//!   of many graphs.
//! * [`gcn`]: the network (three graph convolutions, mean+max readout, softmax head).
//! * [`train`]: training on labelled trees, split by run.
//! * [`profile`]: the normal profile (training-split normal runs) every node is compared with.
//! * [`model`]: the model on disk (safetensors + JSON manifest) and the diagnosis of a tree.
//! * [`fate`]: the verdict of a thread killed or stopped by a fault (crash, deadlock), which its
//!   tree alone cannot give.
//!
//! **One sample is one thread's tree of one window.** The FDDB labels trees per thread (the
//! thread the fault reached is faulty, the others of the same run are normal), an AFCT is built
//! per thread, and a thread's tree has a stable shape across windows whatever the process's
//! thread count. A window is diagnosed through its threads: the window's verdict is that of
//! its thread with the lowest P(normal); a run's, that of its worst window.
//!
//! Runs on the CPU with candle. Training is deterministic for a seed when candle runs on one
//! thread (`RAYON_NUM_THREADS=1`, which `afetm-analyzer` sets unless the user did).
#![deny(missing_docs)]

pub mod fate;
pub mod gcn;
pub mod graph;
pub mod model;
pub mod profile;
pub mod train;

use std::path::PathBuf;

pub use model::{Class, Diagnosis, Manifest, Model, PlanKey, Suspect};

/// What can go wrong in diagnosis.
#[derive(Debug, thiserror::Error)]
pub enum DiagnosisError {
    /// The input tree is malformed.
    #[error("malformed tree: {0}")]
    BadTree(String),
    /// Nothing to learn from.
    #[error("training data: {0}")]
    Data(String),
    /// A manifest that cannot be used.
    #[error("model manifest: {0}")]
    Manifest(String),
    /// Weights that cannot be read or do not fit the manifest.
    #[error("model weights: {0}")]
    Weights(String),
    /// A model for another module or plan.
    #[error("model does not fit: {0}")]
    Mismatch(String),
    /// Reading or writing a file.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    /// candle failed.
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}
