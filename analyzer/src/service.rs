//! The analyzer's gRPC surface: `Ingest` (agent streams), `Query` (agents, windows, AFCTs,
//! counters), `Control` (FCT coloring, pushing plans), plus gRPC health and reflection.
//!
//! Nothing an agent sends is trusted: a batch that breaks the contract ends its stream with
//! `InvalidArgument` (the offending seq in the `afetm-bad-seq` metadata so the agent can drop
//! it), is counted by reason, and never reaches the database.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use afetm_proto::{self as pb, control_server::Control, ingest_server::Ingest, query_server::Query};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    coloring,
    diagnoser::{AgentPlan, Closed, Diagnoser, DiagnoserError, Plans},
    metrics::{AnalyzerMetrics, BatchResult, ResultLabel},
    reporting::{Reporter, ReportingError, to_proto},
    store::{AgentKey, Applied, Store, StoreError},
    tree::{Forest, FuncTable},
};

pub use afetm_proto::BAD_SEQ_KEY;

/// Counters since the analyzer started.
#[derive(Default)]
pub struct Stats {
    batches: AtomicU64,
    events: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    by_reason: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn reject(&self, reason: &str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.by_reason.lock() {
            *m.entry(reason.to_string()).or_insert(0) += 1;
        }
    }
}

struct Connected {
    instance: u64,
    conn_id: u64,
    tx: mpsc::Sender<Result<pb::AnalyzerMessage, Status>>,
    last_plan: Option<pb::PlanReport>,
}

/// Shared state behind all three services.
#[derive(Clone)]
pub struct Analyzer {
    store: Arc<Mutex<Store>>,
    agents: Arc<Mutex<HashMap<String, Vec<Connected>>>>,
    stats: Arc<Stats>,
    next_conn: Arc<AtomicU64>,
    /// Each agent's last applied plan (kept after it disconnects: its last windows close then).
    plans: Plans,
    diagnoser: Option<Arc<Diagnoser>>,
    closed_tx: Option<mpsc::Sender<Closed>>,
    reporter: Arc<Reporter>,
    metrics: Arc<AnalyzerMetrics>,
    /// Why the database is unusable, from the last health probe; `None` while it takes writes.
    unhealthy: Arc<Mutex<Option<String>>>,
    /// How often `serve` probes the database.
    probe_every: Duration,
    /// Set when the server is shutting down: long-lived streams end so that it can.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the SQLite state half-written (transactions
    // roll back), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn reporting_status(e: ReportingError) -> Status {
    match e {
        ReportingError::NoWindow(m) => Status::not_found(m),
        ReportingError::Store(s) => status(s),
        other => Status::internal(other.to_string()),
    }
}

fn status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid { reason, detail } => Status::invalid_argument(format!("{reason}: {detail}")),
        other => Status::internal(other.to_string()),
    }
}

impl Analyzer {
    pub fn new(store: Store) -> Analyzer {
        Analyzer {
            store: Arc::new(Mutex::new(store)),
            agents: Arc::default(),
            stats: Arc::default(),
            next_conn: Arc::new(AtomicU64::new(1)),
            plans: Arc::default(),
            diagnoser: None,
            closed_tx: None,
            reporter: Arc::new(Reporter::default()),
            metrics: Arc::default(),
            unhealthy: Arc::default(),
            probe_every: Duration::from_secs(5),
            stopping: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Probes the database this often while serving (default 5 s); see [`Store::probe`].
    pub fn with_probe_every(mut self, every: Duration) -> Analyzer {
        self.probe_every = every.max(Duration::from_millis(10));
        self
    }

    /// This analyzer's Prometheus metrics.
    pub fn metrics(&self) -> Arc<AnalyzerMetrics> {
        self.metrics.clone()
    }

    /// `Ok` while the database takes writes; else why not (the last probe's error).
    pub fn health(&self) -> Result<(), String> {
        match lock(&self.unhealthy).as_ref() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Counts refused input in `Query.Stats` and the metrics.
    fn reject(&self, reason: &str) {
        self.stats.reject(reason);
        self.metrics.reject(reason, 1);
    }

    fn count_applied(&self, a: &Applied) {
        let m = &self.metrics;
        let result = if a.duplicate { BatchResult::duplicate } else { BatchResult::applied };
        m.batches.get_or_create(&ResultLabel { result }).inc();
        if a.duplicate {
            return;
        }
        m.events.inc_by(a.events);
        m.windows_opened.inc_by(a.windows_opened);
        m.windows_closed.inc_by(a.windows_closed);
        m.afcts.inc_by(a.afcts);
        m.commit_latency.observe(a.commit.as_secs_f64());
    }

    /// Probes the database once and records the outcome; returns whether it takes writes.
    async fn probe(&self) -> bool {
        let result = match tokio::time::timeout(Duration::from_secs(10), self.with_store(Store::probe)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the database did not answer within 10 s".to_string()),
        };
        let mut state = lock(&self.unhealthy);
        match result {
            Ok(()) => {
                if state.take().is_some() {
                    tracing::info!("database takes writes again: serving");
                }
                self.metrics.database_up.set(1);
                true
            }
            Err(why) => {
                if state.is_none() {
                    tracing::error!(error = %why, "database unusable: health says NOT_SERVING");
                }
                *state = Some(why);
                self.metrics.database_up.set(0);
                false
            }
        }
    }

    /// Builds reports with `reporter` (log model, FDDB, fusion, SOP library).
    pub fn with_reporter(mut self, reporter: Reporter) -> Analyzer {
        self.reporter = Arc::new(reporter);
        self
    }

    /// Diagnoses every window closed from now on with `diagnoser`'s models, or by its threads'
    /// fates where no model serves (a worker task on the current runtime; windows queue in
    /// order, and ingest waits when 4,096 are queued).
    pub fn with_diagnoser(mut self, diagnoser: Diagnoser) -> Analyzer {
        let (tx, mut rx) = mpsc::channel::<Closed>(4096);
        self.diagnoser = Some(Arc::new(diagnoser));
        self.closed_tx = Some(tx);
        let worker = self.clone();
        tokio::spawn(async move {
            while let Some((ids, at)) = rx.recv().await {
                for id in ids {
                    worker.diagnose_window(id, at).await;
                }
            }
        });
        self
    }

    /// Queues closed windows for diagnosis.
    async fn closed(&self, ids: Vec<i64>) {
        if let (Some(tx), false) = (&self.closed_tx, ids.is_empty()) {
            let _ = tx.send((ids, std::time::Instant::now())).await;
        }
    }

    async fn diagnose_window(&self, id: i64, closed_at: std::time::Instant) {
        let Some(diag) = self.diagnoser.clone() else { return };
        let w = match self.with_store(move |s| s.window_trees(id)).await {
            Ok(Some(w)) => w,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(window = id, error = %e, "reading a window to diagnose");
                return;
            }
        };
        // A window of an agent no model serves is still diagnosed by its threads' fates.
        let plan = lock(&self.plans).get(&w.agent_id).cloned();
        let served = plan.as_ref().and_then(|p| diag.model_for(p));
        self.metrics.stale_models.set(diag.stale_models() as i64);
        let d = diag.clone();
        let record = tokio::task::spawn_blocking(move || match served {
            Some((model, stale)) => {
                d.diagnose_window(&model, &w).map(|r| d.window_record(Some(&model), &w, r, stale, closed_at))
            }
            None => d.diagnose_fates(&w).map(|r| d.window_record(None, &w, r, false, closed_at)),
        })
        .await;
        let Ok(Some(mut record)) = record else { return };
        record.latency_us = closed_at.elapsed().as_micros() as u64;
        let stored = record.clone();
        match self.with_store(move |s| s.put_diagnosis(&stored)).await {
            Ok(()) => {
                self.metrics.diagnosed(record.error, record.stale, closed_at.elapsed());
                diag.publish(record)
            }
            Err(e) => tracing::error!(window = id, error = %e, "storing a diagnosis"),
        }
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&store)))
            .await
            .unwrap_or_else(|e| Err(StoreError::Corrupt(format!("store task failed: {e}"))))
    }

    /// Closes windows of agents silent for `idle` (run periodically by `serve`).
    pub async fn sweep(&self, idle: Duration) {
        let secs = idle.as_secs() as i64;
        match self.with_store(move |s| s.close_stale(secs)).await {
            Ok((ids, _)) if ids.is_empty() => {}
            Ok((ids, afcts)) => {
                self.metrics.windows_closed.inc_by(ids.len() as u64);
                self.metrics.afcts.inc_by(afcts);
                tracing::info!(windows = ids.len(), "closed windows of silent agents");
                self.closed(ids).await;
            }
            Err(e) => tracing::error!(error = %e, "closing stale windows"),
        }
    }

    async fn run_stream(
        self,
        mut inbound: Streaming<pb::AgentMessage>,
        tx: mpsc::Sender<Result<pb::AnalyzerMessage, Status>>,
    ) {
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(h)) }))) => h,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "agent stream failed before hello");
                return;
            }
            _ => {
                self.reject("hello");
                let _ = tx.send(Err(Status::invalid_argument("hello: the first message must be Hello"))).await;
                return;
            }
        };
        let key = AgentKey { agent_id: hello.agent_id.clone(), instance: hello.instance };
        let h = hello.clone();
        let (last_seq, mut session) = match self.with_store(move |s| s.hello(&h)).await {
            Ok((last, session, closed)) => {
                self.metrics.windows_closed.inc_by(closed);
                if closed > 0 {
                    tracing::info!(agent = %key.agent_id, windows = closed, "new agent instance: closed the old one's windows");
                }
                (last, session)
            }
            Err(e) => {
                if let StoreError::Invalid { reason, .. } = &e {
                    self.reject(reason);
                }
                let _ = tx.send(Err(status(e))).await;
                return;
            }
        };
        tracing::info!(agent = %key.agent_id, instance = key.instance, target = %hello.target, last_seq, "agent connected");
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.metrics.agents_connected.inc();
        lock(&self.agents).entry(key.agent_id.clone()).or_default().push(Connected {
            instance: key.instance,
            conn_id,
            tx: tx.clone(),
            last_plan: None,
        });
        let welcome = pb::AnalyzerMessage {
            msg: Some(pb::analyzer_message::Msg::Welcome(pb::Welcome { last_acked_seq: last_seq })),
        };
        let mut stopping = self.stopping.subscribe();
        if tx.send(Ok(welcome)).await.is_ok() {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => Some(m),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                let Some(next) = next else {
                    // The agent reconnects and resends what was not acknowledged.
                    let _ = tx.send(Err(Status::unavailable("the analyzer is shutting down"))).await;
                    break;
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(agent = %key.agent_id, error = %e, "agent stream ended");
                        break;
                    }
                };
                match msg.msg {
                    Some(pb::agent_message::Msg::Batch(batch)) => {
                        let seq = batch.seq;
                        let k = key.clone();
                        let mut sess = std::mem::take(&mut session);
                        let result = self
                            .with_store(move |s| {
                                let r = s.apply_batch(&k, &mut sess, &batch);
                                Ok((r, sess))
                            })
                            .await;
                        let result = match result {
                            Ok((r, sess)) => {
                                session = sess;
                                r
                            }
                            Err(e) => Err(e),
                        };
                        match result {
                            Ok(applied) => {
                                self.closed(applied.closed.clone()).await;
                                self.count_applied(&applied);
                                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                                self.stats.events.fetch_add(applied.events, Ordering::Relaxed);
                                if applied.duplicate {
                                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                                }
                                if applied.late_events > 0 {
                                    tracing::warn!(agent = %key.agent_id, events = applied.late_events, "events for already closed windows were not stored");
                                    if let Ok(mut m) = self.stats.by_reason.lock() {
                                        *m.entry("late_event".into()).or_insert(0) += applied.late_events;
                                    }
                                    self.metrics.reject("late_event", applied.late_events);
                                }
                                let ack =
                                    pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Ack(pb::Ack { seq })) };
                                if tx.send(Ok(ack)).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                let mut st = match &e {
                                    StoreError::Invalid { reason, .. } => {
                                        self.reject(reason);
                                        tracing::warn!(agent = %key.agent_id, seq, error = %e, "rejected batch");
                                        status(e)
                                    }
                                    _ => {
                                        tracing::error!(agent = %key.agent_id, seq, error = %e, "storing batch failed");
                                        status(e)
                                    }
                                };
                                if let Ok(v) = seq.to_string().parse() {
                                    st.metadata_mut().insert(BAD_SEQ_KEY, v);
                                }
                                let _ = tx.send(Err(st)).await;
                                break;
                            }
                        }
                    }
                    Some(pb::agent_message::Msg::PlanReport(report)) => {
                        if report.ok {
                            tracing::info!(agent = %key.agent_id, version = report.version, attached = report.attached, detached = report.detached, "plan applied");
                        } else {
                            tracing::warn!(agent = %key.agent_id, version = report.version, error = %report.error, "agent refused plan");
                        }
                        if let Some(plan) = AgentPlan::of_report(&report) {
                            lock(&self.plans).insert(key.agent_id.clone(), plan);
                        }
                        if let Some(list) = lock(&self.agents).get_mut(&key.agent_id) {
                            for c in list.iter_mut().filter(|c| c.conn_id == conn_id) {
                                c.last_plan = Some(report.clone());
                            }
                        }
                    }
                    Some(pb::agent_message::Msg::Hello(_)) | None => {
                        self.reject("hello");
                        let _ = tx.send(Err(Status::invalid_argument("hello: sent twice or empty message"))).await;
                        break;
                    }
                }
            }
        }
        if let Some(list) = lock(&self.agents).get_mut(&key.agent_id) {
            list.retain(|c| c.conn_id != conn_id);
        }
        self.metrics.agents_connected.dec();
        tracing::info!(agent = %key.agent_id, instance = key.instance, "agent disconnected");
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for Analyzer {
    type StreamStream = BoxStream<pb::AnalyzerMessage>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(self.clone().run_stream(request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn diagnoser_status(e: DiagnoserError) -> Status {
    match e {
        DiagnoserError::NoModel(m) => Status::failed_precondition(m),
        DiagnoserError::Diagnosis(afetm_diagnosis::DiagnosisError::BadTree(m)) => {
            Status::invalid_argument(format!("malformed tree: {m}"))
        }
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl Query for Analyzer {
    type WatchDiagnosesStream = BoxStream<pb::Diagnosis>;

    async fn list_diagnoses(
        &self,
        request: Request<pb::ListDiagnosesRequest>,
    ) -> Result<Response<pb::ListDiagnosesResponse>, Status> {
        let req = request.into_inner();
        let diagnoses = self.with_store(move |s| s.list_diagnoses(&req)).await.map_err(status)?;
        Ok(Response::new(pb::ListDiagnosesResponse { diagnoses }))
    }

    async fn diagnose(&self, request: Request<pb::DiagnoseRequest>) -> Result<Response<pb::Diagnosis>, Status> {
        let req = request.into_inner();
        let diag = self
            .diagnoser
            .clone()
            .ok_or_else(|| Status::failed_precondition("no diagnosis model is loaded (serve --model DIR)"))?;
        let tree = req.tree.ok_or_else(|| Status::invalid_argument("diagnose: no tree"))?;
        let d = tokio::task::spawn_blocking(move || diag.diagnose_tree(&req.model, &tree, req.top_k))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(diagnoser_status)?;
        Ok(Response::new(d))
    }

    async fn watch_diagnoses(
        &self,
        request: Request<pb::WatchDiagnosesRequest>,
    ) -> Result<Response<Self::WatchDiagnosesStream>, Status> {
        let req = request.into_inner();
        let diag = self
            .diagnoser
            .clone()
            .ok_or_else(|| Status::failed_precondition("no diagnosis model is loaded (serve --model DIR)"))?;
        let mut sub = diag.subscribe();
        let (tx, rx) = mpsc::channel(256);
        let mut stopping = self.stopping.subscribe();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    d = sub.recv() => Some(d),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                let Some(next) = next else { break };
                let d = match next {
                    Ok(d) => d,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "a WatchDiagnoses client fell behind; it missed diagnoses (ListDiagnoses has them)"
                        );
                        continue;
                    }
                    Err(_) => break,
                };
                if (req.agent_id.is_empty() || d.agent_id == req.agent_id)
                    && (!req.errors_only || d.error)
                    && tx.send(Ok(d)).await.is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let without_plans = req.into_inner().without_plans;
        let mut agents = self.with_store(|s| s.list_agents()).await.map_err(status)?;
        let connected = lock(&self.agents);
        for a in &mut agents {
            if let Some(c) = connected.get(&a.agent_id).and_then(|l| l.iter().find(|c| c.instance == a.instance)) {
                a.connected = true;
                if !without_plans {
                    a.last_plan = c.last_plan.clone();
                }
            }
        }
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn list_windows(
        &self,
        request: Request<pb::ListWindowsRequest>,
    ) -> Result<Response<pb::ListWindowsResponse>, Status> {
        let req = request.into_inner();
        let windows = self.with_store(move |s| s.list_windows(&req)).await.map_err(status)?;
        Ok(Response::new(pb::ListWindowsResponse { windows }))
    }

    async fn get_afct(&self, request: Request<pb::GetAfctRequest>) -> Result<Response<pb::GetAfctResponse>, Status> {
        let req = request.into_inner();
        let tree =
            self.with_store(move |s| s.afct(req.window_id, req.tid)).await.map_err(status)?.ok_or_else(|| {
                Status::not_found(format!(
                    "no AFCT for window {} thread {} (is the window closed?)",
                    req.window_id, req.tid
                ))
            })?;
        let mut table = FuncTable::default();
        let forest = Forest::from_proto(&tree, &mut table).map_err(Status::internal)?;
        Ok(Response::new(pb::GetAfctResponse { text: forest.render(&table), tree: Some(tree) }))
    }

    async fn counts(&self, request: Request<pb::CountsRequest>) -> Result<Response<pb::CountsResponse>, Status> {
        let agent = request.into_inner().agent_id;
        let counts = self.with_store(move |s| s.counts(&agent)).await.map_err(status)?;
        Ok(Response::new(pb::CountsResponse { counts }))
    }

    async fn window_logs(
        &self,
        request: Request<pb::WindowLogsRequest>,
    ) -> Result<Response<pb::WindowLogsResponse>, Status> {
        let id = request.into_inner().window_id;
        let lines = self.with_store(move |s| s.window_logs(id)).await.map_err(status)?;
        Ok(Response::new(pb::WindowLogsResponse { lines }))
    }

    async fn report(&self, request: Request<pb::ReportRequest>) -> Result<Response<pb::WindowReport>, Status> {
        let req = request.into_inner();
        let diag = self.diagnoser.clone();
        let threshold = move |t: &str| diag.as_ref().and_then(|d| d.threshold(t));
        let store = self.store.clone();
        let (evidence, target) =
            tokio::task::spawn_blocking(move || Reporter::evidence(&lock(&store), req.window_id, threshold))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(reporting_status)?;
        let reporter = self.reporter.clone();
        let k = if req.similar == 0 { 5 } else { req.similar as usize };
        let report = tokio::task::spawn_blocking(move || reporter.report(evidence, target.as_deref(), k))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(reporting_status)?;
        Ok(Response::new(to_proto(&report)))
    }

    async fn stats(&self, _: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let (windows_closed, afcts) = self.with_store(|s| s.totals()).await.map_err(status)?;
        let s = &self.stats;
        Ok(Response::new(pb::StatsResponse {
            batches: s.batches.load(Ordering::Relaxed),
            events: s.events.load(Ordering::Relaxed),
            duplicate_batches: s.duplicates.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            rejected_by_reason: lock(&s.by_reason).iter().map(|(k, v)| (k.clone(), *v)).collect(),
            windows_closed,
            afcts,
        }))
    }
}

#[tonic::async_trait]
impl Control for Analyzer {
    async fn feedback(&self, request: Request<pb::FeedbackRequest>) -> Result<Response<pb::FeedbackResponse>, Status> {
        let req = request.into_inner();
        let id = self.with_store(move |s| s.put_feedback(&req)).await.map_err(status)?;
        tracing::info!(id, "feedback stored; it joins the next train-logs");
        Ok(Response::new(pb::FeedbackResponse { id: id as u64 }))
    }

    async fn color(&self, request: Request<pb::ColorRequest>) -> Result<Response<pb::ColorResponse>, Status> {
        let req = request.into_inner();
        if req.fcts.is_empty() {
            return Err(Status::invalid_argument("color: no FCTs given"));
        }
        if req.traced.is_empty() {
            return Err(Status::invalid_argument("color: the trace point set is empty"));
        }
        let (fcts, traced) = (req.fcts, req.traced);
        self.with_store(move |s| Ok(color_stored(s, &fcts, &traced))).await.map_err(status)?.map(Response::new)
    }

    async fn set_plan(&self, request: Request<pb::SetPlanRequest>) -> Result<Response<pb::SetPlanResponse>, Status> {
        let req = request.into_inner();
        let plan = req.plan.ok_or_else(|| Status::invalid_argument("set_plan: no plan"))?;
        afetm_proto::plan::PlanFile::from_proto(&plan)
            .map_err(|e| Status::invalid_argument(format!("set_plan: {e}")))?;
        let targets: Vec<_> =
            lock(&self.agents).get(&req.agent_id).map(|l| l.iter().map(|c| c.tx.clone()).collect()).unwrap_or_default();
        let mut delivered = 0;
        for tx in targets {
            let msg = pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Plan(plan.clone())) };
            if tx.send(Ok(msg)).await.is_ok() {
                delivered += 1;
            }
        }
        if delivered == 0 {
            return Err(Status::not_found(format!("agent {:?} is not connected", req.agent_id)));
        }
        Ok(Response::new(pb::SetPlanResponse { delivered }))
    }

    async fn cut(&self, request: Request<pb::CutRequest>) -> Result<Response<pb::CutResponse>, Status> {
        let req = request.into_inner();
        if req.pids.is_empty() {
            return Err(Status::invalid_argument("cut: no pids"));
        }
        let discarded = self.with_store(move |s| s.cut(&req.agent_id, &req.pids, req.at_ns)).await.map_err(status)?;
        Ok(Response::new(pb::CutResponse { windows_discarded: discarded }))
    }
}

/// Largest message the analyzer decodes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Serves all services on `listener` until `shutdown` resolves.
pub async fn serve(
    analyzer: Analyzer,
    listener: tokio::net::TcpListener,
    stale_after: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(analyzer, listener, stale_after, Security::default(), shutdown).await
}

/// Transport security and access control for [`serve_with`] (see `afetm-auth`).
#[derive(Clone, Default)]
pub struct Security {
    /// TLS, when the analyzer has a certificate.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Who may call what.
    pub policy: afetm_auth::Policy,
}

/// [`serve`] with TLS and access control.
pub async fn serve_with(
    analyzer: Analyzer,
    listener: tokio::net::TcpListener,
    stale_after: Duration,
    security: Security,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use afetm_auth::Service;
    use afetm_proto::{control_server::ControlServer, ingest_server::IngestServer, query_server::QueryServer};
    use tonic::service::interceptor::InterceptedService;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, analyzer.probe().await).await;
    // Both reflection versions: older grpcurl releases only speak v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(afetm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_alpha = reflection_builder().build_v1alpha()?;
    let prober = analyzer.clone();
    let probe = tokio::spawn(async move {
        let mut tick = tokio::time::interval(prober.probe_every);
        let mut serving = true;
        loop {
            tick.tick().await;
            let ok = prober.probe().await;
            if ok != serving {
                serving = ok;
                set_health(&health, ok).await;
            }
        }
    });
    let sweeper = analyzer.clone();
    let sweep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10).min(stale_after));
        loop {
            tick.tick().await;
            sweeper.sweep(stale_after).await;
        }
    });
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "analyzer listening");
    let stopping = analyzer.stopping.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls)?;
    }
    let policy = security.policy;
    let ingest = IngestServer::new(analyzer.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let control = ControlServer::new(analyzer.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let result = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(InterceptedService::new(ingest, policy.interceptor(Service::Ingest)))
        .add_service(InterceptedService::new(QueryServer::new(analyzer), policy.interceptor(Service::Query)))
        .add_service(InterceptedService::new(control, policy.interceptor(Service::Control)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            shutdown.await;
            // Streams never end by themselves; graceful shutdown waits for them.
            stopping.send_replace(true);
        })
        .await;
    sweep.abort();
    probe.abort();
    Ok(result?)
}

/// gRPC health of the whole server ("") and of each afetm service: SERVING while the
/// database takes writes, NOT_SERVING while it does not.
async fn set_health(health: &tonic_health::server::HealthReporter, ok: bool) {
    use afetm_proto::{control_server::ControlServer, ingest_server::IngestServer, query_server::QueryServer};
    use tonic_health::ServingStatus;
    let status = if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
    for name in [
        "",
        <IngestServer<Analyzer> as tonic::server::NamedService>::NAME,
        <QueryServer<Analyzer> as tonic::server::NamedService>::NAME,
        <ControlServer<Analyzer> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(name, status).await;
    }
}

/// Colors stored FCTs against the trace point set `traced` (Alg. 2) and derives the plan:
/// every traced function in event mode, those in F^callstack in callstack mode.
pub fn color_stored(store: &Store, refs: &[pb::FctRef], traced: &[String]) -> Result<pb::ColorResponse, Status> {
    let mut table = FuncTable::default();
    let mut fcts = Vec::with_capacity(refs.len());
    for r in refs {
        let t = store
            .afct(r.window_id, r.tid)
            .map_err(status)?
            .ok_or_else(|| Status::not_found(format!("no FCT for window {} thread {}", r.window_id, r.tid)))?;
        fcts.push(Forest::from_proto(&t, &mut table).map_err(Status::internal)?);
    }
    let traced_ids: HashSet<_> = traced.iter().flat_map(|n| table.matching(n).collect::<Vec<_>>()).collect();
    let out = coloring::color(&fcts, &traced_ids);
    let callstack_names: Vec<String> = out.callstack.iter().map(|f| table.get(*f).name.to_string()).collect();
    let cs: HashSet<&str> = callstack_names.iter().map(String::as_str).collect();
    let plan = pb::Plan {
        version: 0,
        points: traced
            .iter()
            .map(|n| pb::TracePoint {
                function: n.clone(),
                mode: if cs.contains(n.rsplit(':').next().unwrap_or(n)) {
                    pb::TraceMode::Callstack
                } else {
                    pb::TraceMode::Event
                } as i32,
            })
            .collect(),
        target_path: String::new(),
        target_pid: 0,
    };
    Ok(pb::ColorResponse {
        callstack: callstack_names,
        colored: out.fcts.iter().map(|f| f.to_proto(&table)).collect(),
        plan: Some(plan),
    })
}
