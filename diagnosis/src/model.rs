//! A trained model on disk and in use: the manifest, the weights, and the diagnosis of a tree.
//!
//! A model directory holds `model.safetensors` (the weights; `x @ weight + bias`, so a PyTorch
//! `Linear` takes the transpose) and `manifest.json`: what the model is for (target and module),
//! its classes, its function vocabulary, the plan it was trained under (traced set and
//! F^callstack), the alarm threshold and a hash of the training data. A model is only valid for
//! trees of its module built under its plan: [`Model::check_plan`] refuses any other.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use afetm_fault::FaultKind;
use afetm_proto::{plan::Mode, plan::PlanFile, v1 as pb};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{
    DiagnosisError,
    gcn::{Dims, Gcn},
    graph::{Batch, Graph, Vocab},
    profile::NormalProfile,
};
use afetm_calltree::graph::NamedGraph;

/// Manifest format written by this version (3: the input is the window's call graph, one node
/// per function; 2 read trees, node per calling context, and 1 took no deviation features:
/// both are refused, their networks were trained on other inputs).
pub const FORMAT: u32 = 3;
/// File names inside a model directory.
pub const MANIFEST: &str = "manifest.json";
/// See [`MANIFEST`].
pub const WEIGHTS: &str = "model.safetensors";

/// What a tree is diagnosed as: `normal`, or a fault of one kind in one function. Fault
/// parameters (which bit, how many bytes of IP+N) are not classes of their own: they leave the
/// same trace and an engineer acts on the function and the kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// No fault.
    Normal,
    /// A fault of `kind` injected at `function`.
    Fault {
        /// The faulty function.
        function: String,
        /// The fault's type.
        kind: FaultKind,
    },
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Class::Normal => f.write_str("normal"),
            Class::Fault { function, kind } => write!(f, "{kind}@{function}"),
        }
    }
}

/// The plan a model was trained under, as the functions it traces: every event or callstack
/// point, and the callstack ones apart (F^callstack). Sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanKey {
    /// Functions traced in event or callstack mode.
    pub traced: Vec<String>,
    /// Of those, the ones in callstack mode.
    pub callstack: Vec<String>,
}

impl PlanKey {
    /// The key of `plan`; `expand` gives the functions of `*`.
    pub fn of(plan: &PlanFile, expand: impl Fn() -> Vec<String>) -> PlanKey {
        let mut traced = BTreeSet::new();
        let mut callstack = BTreeSet::new();
        for p in plan.points.iter().filter(|p| p.mode != Mode::Count) {
            let names = if p.function == "*" { expand() } else { vec![p.function.clone()] };
            if p.mode == Mode::Callstack {
                callstack.extend(names.iter().cloned());
            }
            traced.extend(names);
        }
        PlanKey { traced: traced.into_iter().collect(), callstack: callstack.into_iter().collect() }
    }

    /// The key of what an agent reports it traces: its points as applied, plus the functions
    /// the kernel refused to probe (they were in the plan).
    pub fn of_report(report: &pb::PlanReport) -> PlanKey {
        let mut traced: BTreeSet<String> = report.unprobeable.iter().cloned().collect();
        let mut callstack = BTreeSet::new();
        for p in &report.points {
            let mode = pb::TraceMode::try_from(p.mode).unwrap_or(pb::TraceMode::Unspecified);
            match mode {
                pb::TraceMode::Event => {
                    traced.insert(p.function.clone());
                }
                pb::TraceMode::Callstack => {
                    traced.insert(p.function.clone());
                    callstack.insert(p.function.clone());
                }
                _ => {}
            }
        }
        PlanKey { traced: traced.into_iter().collect(), callstack: callstack.into_iter().collect() }
    }

    /// A short description of how `self` differs from `other`.
    pub fn difference(&self, other: &PlanKey) -> Option<String> {
        let a: BTreeSet<&String> = self.traced.iter().collect();
        let b: BTreeSet<&String> = other.traced.iter().collect();
        let only_a: Vec<&&String> = a.difference(&b).take(3).collect();
        let only_b: Vec<&&String> = b.difference(&a).take(3).collect();
        if !only_a.is_empty() || !only_b.is_empty() {
            return Some(format!(
                "traced sets differ ({} vs {} functions; e.g. only in the model's: {only_a:?}, only in the other: {only_b:?})",
                a.len(),
                b.len()
            ));
        }
        (self.callstack != other.callstack)
            .then(|| format!("F^callstack differs ({} vs {} functions)", self.callstack.len(), other.callstack.len()))
    }
}

/// How the model was trained (informational).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Trees in the training / validation split.
    pub train_samples: usize,
    /// See `train_samples`.
    pub val_samples: usize,
    /// Runs on each side.
    pub train_runs: usize,
    /// See `train_runs`.
    pub val_runs: usize,
    /// Faulty trees trained as `normal` because masking under the plan left them equal to a
    /// normal tree.
    pub relabelled_normal: usize,
    /// Trees left out for exceeding the node limit.
    pub too_large: usize,
    /// Epochs run and the epoch whose weights were kept.
    pub epochs: usize,
    /// See `epochs`.
    pub best_epoch: usize,
    /// Validation accuracy (top-1 over all classes) of the kept weights.
    pub val_accuracy: f64,
    /// Share of the validation trees of normal runs that raise an alarm at the threshold.
    pub val_false_alarms: f64,
    /// Share of faulty validation trees that raise an alarm.
    pub val_detection: f64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The FDDB runs held out for validation: what a model stacked on the GCN (the fusion of
    /// `afetm-report`) may be fitted on without the GCN having trained on it.
    #[serde(default)]
    pub val_run_ids: Vec<i64>,
    /// The classes with fewer than [`THIN_CLASS`](crate::train::THIN_CLASS) training trees, as
    /// (class, trees): what the model learnt from too little to trust (issue 23). Empty in
    /// models trained before it was recorded.
    #[serde(default)]
    pub thin_classes: Vec<(String, usize)>,
    /// How large the training windows were, as graphs and as the AFCTs they unroll to (filled
    /// by whoever read the data: the model sees only the graphs).
    #[serde(default)]
    pub sizes: WindowSizes,
}

/// Nodes per training window: the call graph the model reads and its unrolling (the AFCT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowSizes {
    /// Windows counted.
    pub windows: usize,
    /// Mean and largest graph (functions).
    pub graph_mean: f64,
    /// See `graph_mean`.
    pub graph_max: usize,
    /// Mean and largest AFCT (calling contexts).
    pub tree_mean: f64,
    /// See `tree_mean`.
    pub tree_max: usize,
}

impl WindowSizes {
    /// The sizes of windows given as (graph nodes, tree nodes).
    pub fn of(windows: impl IntoIterator<Item = (usize, usize)>) -> WindowSizes {
        let mut s = WindowSizes::default();
        let (mut g, mut t) = (0usize, 0usize);
        for (gn, tn) in windows {
            s.windows += 1;
            (g, t) = (g + gn, t + tn);
            s.graph_max = s.graph_max.max(gn);
            s.tree_max = s.tree_max.max(tn);
        }
        if s.windows > 0 {
            s.graph_mean = g as f64 / s.windows as f64;
            s.tree_mean = t as f64 / s.windows as f64;
        }
        s
    }
}

/// The model directory's `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The FDDB target the model was trained for (e.g. `redis`).
    pub target: String,
    /// The traced module (file name, e.g. `redis-server`).
    pub module: String,
    /// Classes in output order; `normal` first.
    pub classes: Vec<Class>,
    /// Function vocabulary (embedding rows 1..).
    pub vocab: Vocab,
    /// The plan trained under.
    pub plan: PlanKey,
    /// Network sizes.
    pub dims: Dims,
    /// Window length of the training trees, ms: the analyzer should cut windows as long.
    pub window_ms: u64,
    /// Alarm when P(normal) is below this (chosen on the validation split: at most 1% of
    /// normal validation trees alarm).
    pub threshold: f32,
    /// SHA-256 over the training samples and labels.
    pub data_hash: String,
    /// How training went.
    pub training: TrainingSummary,
    /// What normal windows look like under the plan (training-split normal runs); empty when
    /// trained without deviation features (the ablation).
    #[serde(default)]
    pub profile: NormalProfile,
}

/// One suspect: a fault class and its probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suspect {
    /// The faulty function.
    pub function: String,
    /// The fault's type.
    pub kind: FaultKind,
    /// Softmax probability.
    pub probability: f32,
}

/// The model's answer for one tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// P(normal).
    pub p_normal: f32,
    /// P(normal) is below the model's threshold.
    pub error: bool,
    /// The K most likely faults, most likely first.
    pub top: Vec<Suspect>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Model {
    /// What it is.
    pub manifest: Manifest,
    net: Gcn,
    device: Device,
}

impl Model {
    /// Wraps a trained network.
    pub fn new(manifest: Manifest, net: Gcn) -> Model {
        Model { manifest, net, device: Device::Cpu }
    }

    /// The functions of the model's fault classes: those its FDDB injected faults into, the
    /// only ones it can name (a fate's last calls rank them first: [`crate::fate::verdict`]).
    pub fn fault_functions(&self) -> std::collections::HashSet<&str> {
        self.manifest
            .classes
            .iter()
            .filter_map(|c| match c {
                Class::Fault { function, .. } => Some(function.as_str()),
                Class::Normal => None,
            })
            .collect()
    }

    /// Writes `manifest.json` and `model.safetensors` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<(), DiagnosisError> {
        std::fs::create_dir_all(dir).map_err(|e| DiagnosisError::Io(dir.to_path_buf(), e))?;
        let weights = dir.join(WEIGHTS);
        candle_core::safetensors::save(&self.net.tensors(), &weights)
            .map_err(|e| DiagnosisError::Weights(format!("writing {}: {e}", weights.display())))?;
        let text = serde_json::to_string_pretty(&self.manifest).map_err(|e| DiagnosisError::Manifest(e.to_string()))?;
        let path = dir.join(MANIFEST);
        std::fs::write(&path, text).map_err(|e| DiagnosisError::Io(path, e))
    }

    /// Reads a model directory written by [`Model::save`].
    pub fn load(dir: &Path) -> Result<Model, DiagnosisError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| DiagnosisError::Io(path.clone(), e))?;
        let weights: PathBuf = dir.join(WEIGHTS);
        let bytes = std::fs::read(&weights).map_err(|e| DiagnosisError::Io(weights.clone(), e))?;
        Model::from_parts(&text, &bytes, dir)
    }

    /// A model from the text of its manifest and the bytes of its safetensors file; `dir` names
    /// them in errors. Sizes are checked before any tensor is allocated. The fuzz target
    /// `manifest` enters here.
    pub fn from_parts(manifest: &str, weights: &[u8], dir: &Path) -> Result<Model, DiagnosisError> {
        let path = dir.join(MANIFEST);
        let mut manifest: Manifest =
            serde_json::from_str(manifest).map_err(|e| DiagnosisError::Manifest(format!("{}: {e}", path.display())))?;
        if manifest.format != FORMAT {
            return Err(DiagnosisError::Manifest(format!(
                "{}: format {} (this afetm reads {FORMAT}: retrain the model with `afetm-analyzer train`)",
                path.display(),
                manifest.format
            )));
        }
        manifest.vocab.reindex();
        manifest.profile.index();
        let dims = manifest.dims;
        if dims.vocab != manifest.vocab.rows()
            || dims.classes != manifest.classes.len()
            || manifest.classes.first() != Some(&Class::Normal)
        {
            return Err(DiagnosisError::Manifest(format!(
                "{}: sizes disagree (dims {dims:?}, {} vocabulary rows, {} classes, normal first required)",
                path.display(),
                manifest.vocab.rows(),
                manifest.classes.len()
            )));
        }
        let device = Device::Cpu;
        let file = dir.join(WEIGHTS);
        let tensors = candle_core::safetensors::load_buffer(weights, &device)
            .map_err(|e| DiagnosisError::Weights(format!("{}: {e}", file.display())))?;
        let net = Gcn::from_tensors(dims, &tensors)
            .map_err(|e| DiagnosisError::Weights(format!("{}: {e}", file.display())))?;
        Ok(Model { manifest, net, device })
    }

    /// Refuses a plan other than the one the model was trained under, or another module.
    pub fn check_plan(&self, module: &str, plan: &PlanKey) -> Result<(), DiagnosisError> {
        if module != self.manifest.module {
            return Err(DiagnosisError::Mismatch(format!(
                "the model is for module {:?} (target {}), not {module:?}",
                self.manifest.module, self.manifest.target
            )));
        }
        match self.manifest.plan.difference(plan) {
            Some(d) => Err(DiagnosisError::Mismatch(format!(
                "the model for {} was trained under another plan: {d}",
                self.manifest.target
            ))),
            None => Ok(()),
        }
    }

    /// The input graph of `tree` for this model (the call graph it unrolls).
    pub fn graph(&self, tree: &pb::Tree) -> Result<Graph, DiagnosisError> {
        Graph::from_tree(tree, &self.manifest.vocab, &self.manifest.profile)
    }

    /// The input graph of a window's call graph for this model.
    pub fn input(&self, graph: &NamedGraph) -> Result<Graph, DiagnosisError> {
        Graph::from_graph(graph, &self.manifest.vocab, &self.manifest.profile)
    }

    /// Class probabilities `[G, classes]` for many graphs at once.
    pub fn probabilities(&self, graphs: &[&Graph]) -> Result<Vec<Vec<f32>>, DiagnosisError> {
        let batch = Batch::new(graphs, None, &self.device)?;
        let logits = self.net.forward(&batch)?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?.to_vec2()?)
    }

    /// Diagnoses one tree: P(normal), the alarm, and the `k` most likely faults.
    pub fn diagnose(&self, tree: &pb::Tree, k: usize) -> Result<Diagnosis, DiagnosisError> {
        let g = self.graph(tree)?;
        let p = self.probabilities(&[&g])?.remove(0);
        Ok(self.explain(&p, k))
    }

    /// Diagnoses one window's call graph, as [`Model::diagnose`] does a tree.
    pub fn diagnose_graph(&self, graph: &NamedGraph, k: usize) -> Result<Diagnosis, DiagnosisError> {
        let g = self.input(graph)?;
        let p = self.probabilities(&[&g])?.remove(0);
        Ok(self.explain(&p, k))
    }

    /// A [`Diagnosis`] from class probabilities.
    pub fn explain(&self, p: &[f32], k: usize) -> Diagnosis {
        let mut order: Vec<usize> = (1..p.len()).collect();
        order.sort_by(|a, b| p[*b].total_cmp(&p[*a]).then(a.cmp(b)));
        let top = order
            .into_iter()
            .take(k)
            .filter_map(|i| match &self.manifest.classes[i] {
                Class::Fault { function, kind } => {
                    Some(Suspect { function: function.clone(), kind: *kind, probability: p[i] })
                }
                Class::Normal => None,
            })
            .collect();
        Diagnosis { p_normal: p[0], error: p[0] < self.manifest.threshold, top }
    }

    /// The raw network (for tests).
    pub fn net(&self) -> &Gcn {
        &self.net
    }
}
