//! The analyzer's Prometheus metrics (`serve --metrics-listen`), named `afetm_analyzer_*`.
//!
//! One set per [`crate::service::Analyzer`] (tests run several in one process). Ingest,
//! the diagnosis worker and the health probe update them where things happen; the endpoint
//! (`afetm_metrics::serve`) reads them at scrape time.
use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// What became of a batch (`afetm_analyzer_batches_total{result}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum BatchResult {
    /// Stored.
    applied,
    /// Already stored (resent after a reconnect); acknowledged again, changed nothing.
    duplicate,
}

/// Label set of [`AnalyzerMetrics::batches`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// What became of the batch.
    pub result: BatchResult,
}

/// Label set of [`AnalyzerMetrics::rejected`]: the contract the input broke (`seq`,
/// `timestamp`, `unknown_symbol`, ...; the same names as `Query.Stats`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The broken rule.
    pub reason: String,
}

/// A window's verdict (`afetm_analyzer_diagnoses_total{verdict, stale}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Verdict {
    /// The GCN's P(normal) is above its threshold.
    normal,
    /// Below: an alarm.
    error,
}

/// Label set of [`AnalyzerMetrics::diagnoses`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    /// The verdict.
    pub verdict: Verdict,
    /// "true" when the model was trained under another plan than the agent's.
    pub stale: String,
}

/// Every metric the analyzer exports.
pub struct AnalyzerMetrics {
    /// Batches received and what became of them.
    pub batches: Family<ResultLabel, Counter>,
    /// Call events stored.
    pub events: Counter,
    /// Batches and Hellos refused, by reason; late events (for closed windows) by `late_event`.
    pub rejected: Family<ReasonLabel, Counter>,
    /// Windows opened.
    pub windows_opened: Counter,
    /// Windows closed (AFCTs built).
    pub windows_closed: Counter,
    /// AFCTs built (one per thread and closed window).
    pub afcts: Counter,
    /// Diagnoses stored, by verdict.
    pub diagnoses: Family<VerdictLabel, Counter>,
    /// From a window's close to its stored diagnosis.
    pub diagnosis_latency: Histogram,
    /// Models serving an agent whose plan they were not trained under (retraining or no FDDB).
    pub stale_models: Gauge,
    /// Commit time of a batch's SQLite transaction.
    pub commit_latency: Histogram,
    /// Agent streams open.
    pub agents_connected: Gauge,
    /// 1 while the database takes writes (the health probe), else 0.
    pub database_up: Gauge,
    registry: Arc<Registry>,
}

impl Default for AnalyzerMetrics {
    fn default() -> Self {
        let m = AnalyzerMetrics {
            batches: Family::default(),
            events: Counter::default(),
            rejected: Family::default(),
            windows_opened: Counter::default(),
            windows_closed: Counter::default(),
            afcts: Counter::default(),
            diagnoses: Family::default(),
            diagnosis_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            stale_models: Gauge::default(),
            commit_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            agents_connected: Gauge::default(),
            database_up: Gauge::default(),
            registry: Arc::default(),
        };
        let mut r = Registry::with_prefix("afetm_analyzer");
        r.register("batches", "Batches received, by result", m.batches.clone());
        r.register("events", "Call events stored", m.events.clone());
        r.register("rejected", "Input refused, by reason", m.rejected.clone());
        r.register("windows_opened", "Windows opened", m.windows_opened.clone());
        r.register("windows_closed", "Windows closed", m.windows_closed.clone());
        r.register("afcts", "AFCTs built", m.afcts.clone());
        r.register("diagnoses", "Window diagnoses stored, by verdict", m.diagnoses.clone());
        r.register_with_unit(
            "diagnosis_latency",
            "From a window's close to its stored diagnosis",
            Unit::Seconds,
            m.diagnosis_latency.clone(),
        );
        r.register("stale_models", "Models serving a plan they were not trained under", m.stale_models.clone());
        r.register_with_unit(
            "sqlite_commit",
            "Commit time of a batch's transaction",
            Unit::Seconds,
            m.commit_latency.clone(),
        );
        r.register("agents_connected", "Agent streams open", m.agents_connected.clone());
        r.register("database_up", "1 while the database takes writes", m.database_up.clone());
        AnalyzerMetrics { registry: Arc::new(r), ..m }
    }
}

impl AnalyzerMetrics {
    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Counts refused input.
    pub fn reject(&self, reason: &str, n: u64) {
        self.rejected.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc_by(n);
    }

    /// Counts a stored diagnosis.
    pub fn diagnosed(&self, error: bool, stale: bool, latency: std::time::Duration) {
        let verdict = if error { Verdict::error } else { Verdict::normal };
        self.diagnoses.get_or_create(&VerdictLabel { verdict, stale: stale.to_string() }).inc();
        self.diagnosis_latency.observe(latency.as_secs_f64());
    }
}
