//! One verdict per window, and a report an engineer can act on, after OScope
//! (001_9f46d70cd4615681.txt): SOP-structured (failure symptoms, diagnostic process, root
//! causes with confidence, resolution steps), with the most similar historical cases.
//!
//! * [`fusion`]: the GCN's and the log models' outputs combined into one diagnosis (a logistic
//!   regression for "in error", a mixing weight for the causes), learnt on runs the GCN did
//!   not train on.
//! * [`sop`]: the library of standard operating procedures, one data file per fault kind in
//!   `report/sop/` (built in; a folder of the same files overrides them).
//! * [`similar`]: historical cases from the FDDB like this one: the same suspected fault, and
//!   logs that look alike.
//! * [`report`]: the report of one window from its evidence, as a value, as markdown and as
//!   the gRPC message.
//!
//! No LLM is needed or called: every sentence comes from the evidence and the SOP files.
#![deny(missing_docs)]

pub mod fusion;
pub mod report;
pub mod similar;
pub mod sop;

pub use report::{Cause, Evidence, Report};

/// What can go wrong building a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// An SOP file that does not parse.
    #[error("SOP {path}: {message}")]
    Sop {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The FDDB refused.
    #[error("FDDB: {0}")]
    Fddb(#[from] afetm_fddb::FddbError),
    /// Not enough data to fit the fusion.
    #[error("fusion: {0}")]
    Fusion(String),
}
