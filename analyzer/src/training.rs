//! From the FDDB to a diagnosis model: the training set of one target under one plan, and the
//! training run that `afetm-analyzer train` and the daemon's retraining share.
//!
//! Only `train`-role runs are read (eval-role runs are the evaluation's). Every window is the
//! call graph of the events the agent running the plan would send for the campaign's FCT
//! (exactly what the analyzer gets from it; the model's input). A faulty window whose AFCT
//! under the plan equals that of a normal run is trained as `normal`: the plan cannot see that
//! fault in that thread, the input is a normal window, and labelling it faulty would teach the
//! model to alarm on normal ones. The `normal_like` trees of the campaign (unchanged even in
//! full) are a subset of these.

use std::{collections::HashSet, path::Path, str::FromStr};

use afetm_calltree::graph::NamedGraph;
use afetm_diagnosis::{
    Class, Model, PlanKey,
    model::WindowSizes,
    train::{self, Epoch, Sample, Target, TrainConfig},
};
use afetm_fddb::{
    FaultKind, Fddb, Role,
    dataset::{DatasetOptions, TreeRow},
};
use afetm_proto::plan::PlanFile;

/// What went wrong building the training set or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// The FDDB refused.
    #[error("FDDB: {0}")]
    Fddb(#[from] afetm_fddb::FddbError),
    /// Training refused.
    #[error(transparent)]
    Diagnosis(#[from] afetm_diagnosis::DiagnosisError),
    /// No FDDB at the path.
    #[error("no FDDB at {0} (run a campaign first: cargo xtask campaign <target>)")]
    Missing(std::path::PathBuf),
    /// A fault kind the model does not know.
    #[error("FDDB holds a fault of unknown kind {0:?}")]
    Kind(String),
}

/// The training set of `target` under `plan`.
pub struct TrainingSet {
    /// Labelled trees.
    pub samples: Vec<Sample>,
    /// What the model will be for.
    pub target: Target,
    /// Faulty trees relabelled `normal` (see the module docs).
    pub relabelled: usize,
    /// Nodes per window, as graphs and as AFCTs.
    pub sizes: WindowSizes,
}

fn run_class(row: &TreeRow) -> Result<Class, TrainingError> {
    Ok(match &row.run_fault {
        Some((function, kind, _)) => Class::Fault {
            function: function.clone(),
            kind: FaultKind::from_str(kind).map_err(|_| TrainingError::Kind(kind.clone()))?,
        },
        None => Class::Normal,
    })
}

/// Reads the training set (see the module docs).
pub fn training_set(fddb: &Fddb, target: &str, plan: &PlanFile) -> Result<TrainingSet, TrainingError> {
    labelled_trees(fddb, target, plan, Role::Train)
}

/// The labelled trees of the runs of `role` (training set: [`Role::Train`]; the evaluation
/// reads [`Role::Eval`] the same way).
pub fn labelled_trees(fddb: &Fddb, target: &str, plan: &PlanFile, role: Role) -> Result<TrainingSet, TrainingError> {
    let opts = DatasetOptions { role: Some(role), plan: Some(plan.clone()) };
    let mut normal_shapes: HashSet<String> = HashSet::new();
    let mut rows: Vec<(Sample, bool, String)> = Vec::new();
    let mut sizes: Vec<(usize, usize)> = Vec::new();
    fddb.for_each_tree(target, &opts, |row| {
        let shape = row.forest.hash(row.table);
        let run_class = run_class(row).map_err(|e| afetm_fddb::FddbError::Plan(e.to_string()))?;
        if run_class == Class::Normal {
            normal_shapes.insert(shape.clone());
        }
        let class = if row.faulty { run_class.clone() } else { Class::Normal };
        let sample = Sample { graph: NamedGraph::compact(row.graph, row.table), class, run: row.run, run_class };
        sizes.push((row.graph.len(), row.forest.len()));
        rows.push((sample, row.faulty, shape));
        Ok(())
    })?;
    let mut relabelled = 0;
    let samples = rows
        .into_iter()
        .map(|(mut s, faulty, shape)| {
            if faulty && normal_shapes.contains(&shape) {
                s.class = Class::Normal;
                relabelled += 1;
            }
            s
        })
        .collect();
    let id = fddb.target_id(target)?.ok_or_else(|| afetm_fddb::FddbError::Plan(format!("no target {target:?}")))?;
    let traced = fddb.traced(id)?;
    let key = PlanKey::of(plan, || traced.iter().cloned().collect());
    let module = fddb.module(id)?;
    Ok(TrainingSet {
        samples,
        target: Target { name: target.to_string(), module, plan: key, window_ms: afetm_fddb::WINDOW_MS },
        relabelled,
        sizes: WindowSizes::of(sizes),
    })
}

/// Opens the FDDB, reads the training set and trains; `progress` sees every epoch.
pub fn train_from_fddb(
    path: &Path,
    target: &str,
    plan: &PlanFile,
    cfg: &TrainConfig,
    progress: impl FnMut(Epoch),
) -> Result<Model, TrainingError> {
    if !path.is_file() {
        return Err(TrainingError::Missing(path.to_path_buf()));
    }
    let fddb = Fddb::open(path)?;
    let set = training_set(&fddb, target, plan)?;
    tracing::info!(target, trees = set.samples.len(), relabelled = set.relabelled, "training set read");
    let mut model = train::train(&set.samples, set.target, cfg, progress)?;
    model.manifest.training.relabelled_normal = set.relabelled;
    model.manifest.training.sizes = set.sizes;
    Ok(model)
}
