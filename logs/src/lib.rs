//! The servers' logs as data for afetm's log-based models (Chimera, LogSage): what the
//! shop's servers wrote, parsed, templated, embedded and cut into sequences.
//!
//! * [`line`]: one log line of a known source (redis, nginx/Apache access and error logs, the
//!   PHP app's error log) as time, level and message; a run's or window's lines in time order.
//! * [`templates`]: Drain (He et al., 2017) through the `logdrain` crate, with afetm's masks,
//!   persisted so that a template keeps its id across restarts.
//! * [`embed`]: an event's embedding from its template's tokens (hashed unigrams and bigrams,
//!   TF-IDF weighted); no pretrained weights, nothing downloaded.
//! * [`sequence`]: a window's lines as a sequence of log events (consecutive repeats of one
//!   template folded into one event with a count), the input of the sequence models.
//!
//! Why `logdrain` (0.3) for Drain: it implements Drain's fixed-depth prefix tree with the
//! Drain3 extensions (masks, numeric parametrization, snapshot/restore with stable cluster
//! ids), its memory is bounded by an LRU per leaf, and it has no dependency beyond regex and
//! serde. The other crates found (`drain3`, `drain-rs`, `drainrs`) lack persistence or masks.
#![deny(missing_docs)]

pub mod embed;
pub mod line;
pub mod sequence;
pub mod templates;

pub use embed::Embedder;
pub use line::{Level, LogLine, Source};
pub use sequence::{Event, Sequence};
pub use templates::{TemplateId, Templates};

/// What can go wrong with logs.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A template store that cannot be read back.
    #[error("template store {path}: {message}")]
    Store {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}
