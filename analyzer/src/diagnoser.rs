//! Online diagnosis: the loaded models, which one fits an agent, the diagnosis of each closed
//! window, and retraining when an agent's plan changes.
//!
//! A window is diagnosed right after its AFCTs are stored: every thread's AFCT goes through the
//! model of the agent's module in one batch, and the window's verdict is its thread with the
//! lowest P(normal) (see `afetm-diagnosis`'s docs on what a sample is). A model fits an agent
//! when the agent's last plan report names the model's module and traces exactly the model's
//! plan. When only the module matches, the plan changed: the model keeps serving with its
//! diagnoses marked stale, and with an FDDB a new model is trained for the agent's plan in the
//! background and replaces it once ready.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use afetm_diagnosis::{Diagnosis, Model, PlanKey, fate, graph::Graph, train::TrainConfig};
use afetm_proto::{
    self as pb,
    plan::{Mode, PlanFile, Point, Target},
};
use tokio::sync::broadcast;

use crate::store::WindowTrees;

/// Why a model cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum DiagnoserError {
    /// Loading or using a model failed.
    #[error("model {0}: {1}")]
    Model(PathBuf, #[source] afetm_diagnosis::DiagnosisError),
    /// Two models for one module.
    #[error("models {0} and {1} are both for module {2:?}: give one model per target")]
    Duplicate(PathBuf, PathBuf, String),
    /// No model for a request.
    #[error("{0}")]
    NoModel(String),
    /// The tree could not be diagnosed.
    #[error(transparent)]
    Diagnosis(#[from] afetm_diagnosis::DiagnosisError),
}

/// The module and plan an agent reported it traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPlan {
    /// Traced module.
    pub module: String,
    /// The plan as applied.
    pub key: PlanKey,
}

impl AgentPlan {
    /// From a plan report; None for a refused plan or an agent that does not report points.
    pub fn of_report(report: &pb::PlanReport) -> Option<AgentPlan> {
        (report.ok && !report.module.is_empty() && !report.points.is_empty())
            .then(|| AgentPlan { module: report.module.clone(), key: PlanKey::of_report(report) })
    }

    /// The plan as a plan file (for retraining; the target is not needed there).
    fn to_plan_file(&self) -> PlanFile {
        let cs: std::collections::HashSet<&String> = self.key.callstack.iter().collect();
        PlanFile {
            target: Target { path: Some(PathBuf::from(&self.module)), pid: None },
            version: 0,
            points: self
                .key
                .traced
                .iter()
                .map(|f| Point {
                    function: f.clone(),
                    mode: if cs.contains(f) { Mode::Callstack } else { Mode::Event },
                })
                .collect(),
            selection: None,
        }
    }
}

struct Served {
    model: Arc<Model>,
    dir: PathBuf,
    /// The plan a retraining is running for.
    retraining: Option<PlanKey>,
    warned_stale: bool,
}

/// Retraining's schedule: shorter than `afetm-analyzer train`'s (at most 60 epochs, early
/// stopping from the 20th) so that a model for a new plan serves within a minute on two cores
/// busy with the service; train with the CLI for the full schedule.
fn retrain_config() -> TrainConfig {
    TrainConfig { epochs: 60, min_epochs: 20, patience: 10, ..TrainConfig::default() }
}

/// The loaded models and what the daemon does with them.
pub struct Diagnoser {
    served: Mutex<Vec<Served>>,
    fddb: Option<PathBuf>,
    top_k: usize,
    fate_rule: fate::Rules,
    train: TrainConfig,
    watch: broadcast::Sender<pb::Diagnosis>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The `model` of a diagnosis made from a window's fates alone (no model serves the agent).
pub const FATE_ONLY: &str = "fate";

/// A [`Diagnosis`] on the wire; `model` is the target name of the model that made it.
pub fn to_proto(d: &Diagnosis, model: &str) -> pb::Diagnosis {
    pb::Diagnosis {
        p_normal: d.p_normal,
        error: d.error,
        top: d
            .top
            .iter()
            .map(|s| pb::Suspect { function: s.function.clone(), kind: s.kind.to_string(), probability: s.probability })
            .collect(),
        model: model.to_string(),
        ..Default::default()
    }
}

impl Diagnoser {
    /// Loads the models in `dirs` (one per module). `fddb` enables retraining.
    pub fn load(
        dirs: &[PathBuf],
        fddb: Option<PathBuf>,
        top_k: usize,
        window_ms: u64,
    ) -> Result<Diagnoser, DiagnoserError> {
        let mut served: Vec<Served> = Vec::new();
        for dir in dirs {
            let model = Model::load(dir).map_err(|e| DiagnoserError::Model(dir.clone(), e))?;
            if let Some(other) = served.iter().find(|s| s.model.manifest.module == model.manifest.module) {
                return Err(DiagnoserError::Duplicate(other.dir.clone(), dir.clone(), model.manifest.module.clone()));
            }
            if model.manifest.window_ms != window_ms {
                tracing::warn!(dir = %dir.display(), model_ms = model.manifest.window_ms, window_ms,
                    "the model was trained on windows of another length: its diagnoses will be off (serve --window)");
            }
            tracing::info!(dir = %dir.display(), target = %model.manifest.target, module = %model.manifest.module,
                classes = model.manifest.classes.len(), traced = model.manifest.plan.traced.len(), "diagnosis model loaded");
            served.push(Served { model: Arc::new(model), dir: dir.clone(), retraining: None, warned_stale: false });
        }
        let (watch, _) = broadcast::channel(1024);
        Ok(Diagnoser {
            served: Mutex::new(served),
            fddb,
            top_k: top_k.max(1),
            fate_rule: fate::Rules::default(),
            train: retrain_config(),
            watch,
        })
    }

    /// Who names the fault where a thread's fate shows one, per fate class (`serve
    /// --fate-rule`; the rules `afetm-eval` chose on the GCN's validation runs are in its
    /// report's notes).
    pub fn with_fate_rule(self, rules: fate::Rules) -> Diagnoser {
        Diagnoser { fate_rule: rules, ..self }
    }

    /// Subscribes to every diagnosis stored from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::Diagnosis> {
        self.watch.subscribe()
    }

    /// Hands a stored diagnosis to the watchers.
    pub fn publish(&self, d: pb::Diagnosis) {
        let _ = self.watch.send(d);
    }

    /// The model for an agent's plan and whether it is stale; starts a retraining when the
    /// plan changed and an FDDB is at hand.
    /// Models that serve an agent whose plan they were not trained under (until a retrained
    /// one replaces them).
    pub fn stale_models(&self) -> usize {
        lock(&self.served).iter().filter(|s| s.warned_stale).count()
    }

    pub fn model_for(self: &Arc<Self>, plan: &AgentPlan) -> Option<(Arc<Model>, bool)> {
        let mut served = lock(&self.served);
        let s = served.iter_mut().find(|s| s.model.manifest.module == plan.module)?;
        let Err(why) = s.model.check_plan(&plan.module, &plan.key) else {
            return Some((s.model.clone(), false));
        };
        if !s.warned_stale {
            s.warned_stale = true;
            match &self.fddb {
                Some(_) => {
                    tracing::warn!(target = %s.model.manifest.target, %why, "agent's plan changed: retraining; the old model serves (stale) until then")
                }
                None => {
                    tracing::warn!(target = %s.model.manifest.target, %why, "agent's plan changed and no --fddb to retrain from: diagnoses are marked stale")
                }
            }
        }
        if self.fddb.is_some() && s.retraining.as_ref() != Some(&plan.key) {
            s.retraining = Some(plan.key.clone());
            self.retrain(s.model.manifest.target.clone(), s.dir.clone(), plan.clone());
        }
        Some((s.model.clone(), true))
    }

    fn retrain(self: &Arc<Self>, target: String, dir: PathBuf, plan: AgentPlan) {
        let me = self.clone();
        let Some(fddb) = self.fddb.clone() else { return };
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = crate::training::train_from_fddb(
                &fddb,
                &target,
                &plan.to_plan_file(),
                &Default::default(),
                &me.train,
                |_| {},
            );
            let mut served = lock(&me.served);
            let Some(s) = served.iter_mut().find(|s| s.model.manifest.module == plan.module) else { return };
            if s.retraining.as_ref() != Some(&plan.key) {
                return; // the plan changed again meanwhile; that retraining will land instead
            }
            s.retraining = None;
            match result {
                Ok(model) => {
                    let out = retrained_dir(&dir, &model.manifest.plan);
                    if let Err(e) = model.save(&out) {
                        tracing::warn!(error = %e, "could not save the retrained model; serving it from memory");
                    }
                    tracing::info!(%target, seconds = started.elapsed().as_secs_f64(), dir = %out.display(),
                        val_accuracy = model.manifest.training.val_accuracy, "retrained model for the new plan is ready");
                    s.model = Arc::new(model);
                    s.warned_stale = false;
                }
                Err(e) => {
                    tracing::error!(%target, error = %e, "retraining for the new plan failed; the old model stays (stale)")
                }
            }
        });
    }

    /// Diagnoses a closed window with `model`: every thread's call graph in one batch, the verdict
    /// of the thread with the lowest P(normal); a thread killed or stopped by a fault overrides
    /// it (`afetm_diagnosis::fate`), its suspects named by the fate rule. None when no thread
    /// has a diagnosable tree or such a fate.
    pub fn diagnose_window(&self, model: &Model, w: &WindowTrees) -> Option<(u32, Diagnosis, u32)> {
        let fates = fate::from_proto(&w.fates);
        let functions = model.fault_functions();
        let Some((tid, d)) = fate::verdict(&fates, self.top_k, &|f| functions.contains(f)) else {
            return self.diagnose_graphs(model, w);
        };
        let rule = fate::class_of(&fates, tid).map_or(fate::Combine::Fate, |c| self.fate_rule.get(c));
        // Under the fate's own rule the network need not run.
        let gcn = match rule {
            fate::Combine::Fate => None,
            _ => w.graphs.iter().find(|(t, _)| *t == tid).and_then(|(_, graph)| {
                model
                    .diagnose_graph(graph, model.manifest.classes.len())
                    .inspect_err(|e| tracing::debug!(window = w.id, tid, error = %e, "fate's thread not diagnosed"))
                    .ok()
            }),
        };
        Some((tid, fate::combine(rule, d, gcn.as_ref(), self.top_k), w.graphs.len() as u32))
    }

    /// The verdict of a window's fates alone (`afetm_diagnosis::fate`), for windows of agents
    /// no model serves: with no model's functions to rank first, the traced ones (those among
    /// the fates' last calls) come first, a stack's frames in them innermost first, then the
    /// last calls by recency, then the stack's other frames (the C library's, say).
    pub fn diagnose_fates(&self, w: &WindowTrees) -> Option<(u32, Diagnosis, u32)> {
        let fates = fate::from_proto(&w.fates);
        let traced: std::collections::HashSet<&str> =
            fates.iter().flat_map(|f| f.last_calls.iter().map(String::as_str)).collect();
        fate::verdict(&fates, self.top_k, &|f| traced.contains(f)).map(|(tid, d)| (tid, d, 0))
    }

    /// The GCN's verdict on a window's call graphs: that of the thread with the lowest
    /// P(normal).
    fn diagnose_graphs(&self, model: &Model, w: &WindowTrees) -> Option<(u32, Diagnosis, u32)> {
        let mut graphs: Vec<(u32, Graph)> = Vec::new();
        for (tid, graph) in &w.graphs {
            match model.input(graph) {
                Ok(g) => graphs.push((*tid, g)),
                Err(e) => tracing::debug!(window = w.id, tid, error = %e, "thread not diagnosed"),
            }
        }
        let refs: Vec<&Graph> = graphs.iter().map(|(_, g)| g).collect();
        if refs.is_empty() {
            return None;
        }
        let probs = match model.probabilities(&refs) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(window = w.id, error = %e, "diagnosis failed");
                return None;
            }
        };
        let worst = (0..probs.len()).min_by(|a, b| probs[*a][0].total_cmp(&probs[*b][0]))?;
        Some((graphs[worst].0, model.explain(&probs[worst], self.top_k), graphs.len() as u32))
    }

    /// The stored form of a window's diagnosis by `model` (None: by its fates alone).
    pub fn window_record(
        &self,
        model: Option<&Model>,
        w: &WindowTrees,
        (tid, d, threads): (u32, Diagnosis, u32),
        stale: bool,
        closed_at: Instant,
    ) -> pb::Diagnosis {
        pb::Diagnosis {
            window_id: w.id as u64,
            agent_id: w.agent_id.clone(),
            pid: w.pid,
            tid,
            start_ns: w.start_ns,
            end_ns: w.end_ns,
            stale,
            threads,
            diagnosed_unix_ms: unix_ms(),
            latency_us: closed_at.elapsed().as_micros() as u64,
            ..to_proto(&d, model.map_or(FATE_ONLY, |m| m.manifest.target.as_str()))
        }
    }

    /// Diagnoses one tree with the model of target `name` (or the only model).
    pub fn diagnose_tree(&self, name: &str, tree: &pb::Tree, k: u32) -> Result<pb::Diagnosis, DiagnoserError> {
        let model = {
            let served = lock(&self.served);
            let found: Vec<&Served> =
                served.iter().filter(|s| name.is_empty() || s.model.manifest.target == name).collect();
            match found.as_slice() {
                [one] => one.model.clone(),
                [] if name.is_empty() => return Err(DiagnoserError::NoModel("no diagnosis model is loaded".into())),
                [] => return Err(DiagnoserError::NoModel(format!("no model for target {name:?} is loaded"))),
                _ => return Err(DiagnoserError::NoModel("several models are loaded: name one".into())),
            }
        };
        let k = if k == 0 { self.top_k } else { k as usize };
        let d = model.diagnose(tree, k)?;
        Ok(pb::Diagnosis { diagnosed_unix_ms: unix_ms(), threads: 1, ..to_proto(&d, &model.manifest.target) })
    }

    /// The alarm threshold on P(normal) of the model for `target`.
    pub fn threshold(&self, target: &str) -> Option<f64> {
        lock(&self.served)
            .iter()
            .find(|s| s.model.manifest.target == target)
            .map(|s| f64::from(s.model.manifest.threshold))
    }

    /// Models loaded (for logs and tests).
    pub fn models(&self) -> usize {
        lock(&self.served).len()
    }
}

/// Where a model retrained for `plan` is written: beside the original, named by the plan.
fn retrained_dir(dir: &Path, plan: &PlanKey) -> PathBuf {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in &plan.traced {
        h.update(f.as_bytes());
        h.update(if plan.callstack.binary_search(f).is_ok() { b"c\n" } else { b"e\n" });
    }
    let hash = format!("{:x}", h.finalize());
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    dir.with_file_name(format!("{name}.plan-{}", &hash[..12]))
}

/// Closed windows waiting for diagnosis: (window ids, when they closed).
pub type Closed = (Vec<i64>, Instant);

/// Per-agent plans as reported.
pub type Plans = Arc<Mutex<HashMap<String, AgentPlan>>>;
