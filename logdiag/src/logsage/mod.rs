//! LogSage (002_28bdf65b24f1a9d8.txt) without an LLM: the two stages of its pipeline that
//! need none.
//!
//! * [`file`]: Fault-indicating Log Extraction, the paper's "FILE (No LLM)" variant (Table 6):
//!   density clustering (DBSCAN) of a window's lines, and the cluster that indicates the fault.
//! * [`garca`]: GraphSAGE-based root cause analysis: a case-similarity graph over the FDDB's
//!   runs (eqs 2-3), two GraphSAGE layers (eqs 4-6), a logistic classifier over the node
//!   embeddings, and uncertainty-driven active learning (eqs 7-8); a new case joins the graph
//!   inductively.
//! * [`cases`]: a run or a window as a case (its FILE region and its call trees as vectors).
//!
//! The LLM summary of FILE (Full) is not built: it needs a model this project does not ship.
//! The report (issue 13, sec. 5) quotes the extracted lines instead.

pub mod cases;
pub mod file;
pub mod garca;
