//! The agent's Prometheus metrics (`--metrics-listen`), named `afetm_agent_*`.
//!
//! One process-wide set ([`metrics`]): the reader, the outbox, the transport and the plan
//! handling each update their own counters where the thing happens, and the endpoint
//! (`afetm_metrics::serve`) reads them at scrape time. Counters only grow; the reader adds
//! its deltas once per batch, not per event, so the hot path stays untouched.
use std::sync::{Arc, LazyLock};

use afetm_proto as pb;
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

use crate::reader::ReaderStats;

/// Where a planned function's probe sits (`afetm_agent_probes{placement}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Placement {
    /// On an instruction uprobes emulate (cheap).
    emulated,
    /// Moved past the entry to reach such an instruction.
    moved,
    /// On an instruction the kernel single-steps out of line (about twice the cost).
    single_stepped,
    /// The kernel refused to probe it; left out of the plan.
    unprobeable,
}

/// The label set of [`AgentMetrics::probes`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlacementLabel {
    /// Where the probe sits.
    pub placement: Placement,
}

/// Every metric the agent exports.
pub struct AgentMetrics {
    /// Call events read from the ring buffer.
    pub events: Counter,
    /// Of those, events with a call stack.
    pub stack_events: Counter,
    /// Events the kernel side dropped because the ring buffer was full.
    pub kernel_drops: Counter,
    /// Events dropped from the outbox because it was full (analyzer slow or away).
    pub queue_drops: Counter,
    /// Log lines read from `--log` files and queued for the analyzer.
    pub log_lines: Counter,
    /// Batches cut and queued.
    pub batches: Counter,
    /// Batches the analyzer acknowledged as durable.
    pub batches_acked: Counter,
    /// Batches sent again after a reconnect (they were in flight when the stream broke).
    pub batches_resent: Counter,
    /// Batches the analyzer refused as malformed (dropped for good).
    pub batches_rejected: Counter,
    /// Streams to the analyzer opened after the first one.
    pub reconnects: Counter,
    /// Failed attempts to reach the analyzer.
    pub connect_failures: Counter,
    /// Batches waiting in the outbox.
    pub outbox_batches: Gauge,
    /// Overload control's mode demotions.
    pub demotions: Counter,
    /// The plan's functions by where their probe sits.
    pub probes: Family<PlacementLabel, Gauge>,
    /// Time to apply a plan (resolve, attach, hand over, detach).
    pub plan_apply: Histogram,
    /// Plans applied and refused.
    pub plans_applied: Counter,
    /// Plans refused (the previous plan stayed).
    pub plans_refused: Counter,
    registry: Arc<Registry>,
}

impl AgentMetrics {
    fn new() -> AgentMetrics {
        let m = AgentMetrics {
            events: Counter::default(),
            stack_events: Counter::default(),
            kernel_drops: Counter::default(),
            queue_drops: Counter::default(),
            log_lines: Counter::default(),
            batches: Counter::default(),
            batches_acked: Counter::default(),
            batches_resent: Counter::default(),
            batches_rejected: Counter::default(),
            reconnects: Counter::default(),
            connect_failures: Counter::default(),
            outbox_batches: Gauge::default(),
            demotions: Counter::default(),
            probes: Family::default(),
            plan_apply: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            plans_applied: Counter::default(),
            plans_refused: Counter::default(),
            registry: Arc::default(),
        };
        let mut r = Registry::with_prefix("afetm_agent");
        r.register("events", "Call events read from the ring buffer", m.events.clone());
        r.register("stack_events", "Call events with a call stack", m.stack_events.clone());
        r.register("kernel_drops", "Events the kernel dropped (ring buffer full)", m.kernel_drops.clone());
        r.register("queue_drops", "Events dropped from the full outbox (analyzer slow or away)", m.queue_drops.clone());
        r.register("log_lines", "Log lines tailed and queued", m.log_lines.clone());
        r.register("batches", "Batches cut and queued", m.batches.clone());
        r.register("batches_acked", "Batches the analyzer acknowledged", m.batches_acked.clone());
        r.register("batches_resent", "Batches sent again after a reconnect", m.batches_resent.clone());
        r.register("batches_rejected", "Batches the analyzer refused as malformed", m.batches_rejected.clone());
        r.register("reconnects", "Streams to the analyzer opened after the first", m.reconnects.clone());
        r.register("connect_failures", "Failed attempts to reach the analyzer", m.connect_failures.clone());
        r.register("outbox_batches", "Batches waiting for the analyzer", m.outbox_batches.clone());
        r.register("demotions", "Overload control's mode demotions", m.demotions.clone());
        r.register("probes", "Planned functions by probe placement", m.probes.clone());
        r.register_with_unit("plan_apply", "Time to apply a plan", Unit::Seconds, m.plan_apply.clone());
        r.register("plans_applied", "Plans applied", m.plans_applied.clone());
        r.register("plans_refused", "Plans refused (the previous one stayed)", m.plans_refused.clone());
        AgentMetrics { registry: Arc::new(r), ..m }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Adds what the reader counted since `before`.
    pub fn reader_progress(&self, before: &ReaderStats, now: &ReaderStats) {
        self.events.inc_by(now.events.saturating_sub(before.events));
        self.stack_events.inc_by(now.stack_events.saturating_sub(before.stack_events));
        self.kernel_drops.inc_by(now.kernel_drops.saturating_sub(before.kernel_drops));
        self.log_lines.inc_by(now.log_lines.saturating_sub(before.log_lines));
        self.batches.inc_by(now.batches.saturating_sub(before.batches));
        self.demotions.inc_by(now.demotions.saturating_sub(before.demotions));
    }

    /// Records an applied plan (or a refused one): placements and apply time.
    pub fn plan_report(&self, report: &pb::PlanReport) {
        if !report.ok {
            self.plans_refused.inc();
            return;
        }
        self.plans_applied.inc();
        self.plan_apply.observe(report.apply_us as f64 / 1e6);
        let emulated = report.probes.iter().filter(|p| p.emulated).count();
        let moved = report.probes.iter().filter(|p| p.probe != p.entry).count();
        let set = |placement, n: usize| {
            self.probes.get_or_create(&PlacementLabel { placement }).set(n as i64);
        };
        set(Placement::emulated, emulated);
        set(Placement::moved, moved);
        set(Placement::single_stepped, report.probes.len() - emulated);
        set(Placement::unprobeable, report.unprobeable.len());
    }
}

static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

/// The agent's metrics.
pub fn metrics() -> &'static AgentMetrics {
    &METRICS
}
