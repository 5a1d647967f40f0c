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

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    str::FromStr,
};

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

/// Which windows of the training runs are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// At most this many faulty windows per run and thread, the first ones; None: all. One is
    /// what campaigns gave before a run's load lasted several windows (issue 23, item 4): the
    /// ablation that measures what the later faulty windows of a permanent fault add.
    pub faulty_windows: Option<usize>,
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
    /// Each sample's window: (pid, tid, start_ns).
    pub windows: Vec<(u32, u32, u64)>,
    /// Faulty windows left out by [`SetOptions::faulty_windows`].
    pub dropped_faulty: usize,
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
pub fn training_set(
    fddb: &Fddb,
    target: &str,
    plan: &PlanFile,
    set: &SetOptions,
) -> Result<TrainingSet, TrainingError> {
    let mut t = labelled_trees(fddb, target, plan, Role::Train)?;
    if let Some(n) = set.faulty_windows {
        let before = t.samples.len();
        let keep = first_faulty_windows(&t.samples, &t.windows, n);
        let samples = std::mem::take(&mut t.samples).into_iter().zip(&keep);
        t.samples = samples.filter_map(|(s, k)| k.then_some(s)).collect();
        t.windows = t.windows.iter().zip(&keep).filter_map(|(w, k)| k.then_some(*w)).collect();
        t.dropped_faulty = before - t.samples.len();
    }
    Ok(t)
}

/// Which of `samples` to keep: all but the faulty ones past the first `n` of their run and
/// thread (by window start); `windows[i]` is sample i's (pid, tid, start_ns).
fn first_faulty_windows(samples: &[Sample], windows: &[(u32, u32, u64)], n: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| (samples[i].run, windows[i]));
    let mut seen: HashMap<(i64, u32, u32), usize> = HashMap::new();
    let mut keep = vec![true; samples.len()];
    for i in order.into_iter().filter(|&i| samples[i].class != Class::Normal) {
        let (pid, tid, _) = windows[i];
        let k = seen.entry((samples[i].run, pid, tid)).or_default();
        *k += 1;
        keep[i] = *k <= n;
    }
    keep
}

/// The labelled trees of the runs of `role` (training set: [`Role::Train`]; the evaluation
/// reads [`Role::Eval`] the same way).
pub fn labelled_trees(fddb: &Fddb, target: &str, plan: &PlanFile, role: Role) -> Result<TrainingSet, TrainingError> {
    let opts = DatasetOptions { role: Some(role), plan: Some(plan.clone()) };
    let mut normal_shapes: HashSet<String> = HashSet::new();
    let mut rows: Vec<(Sample, bool, String)> = Vec::new();
    let mut sizes: Vec<(usize, usize)> = Vec::new();
    let mut windows = Vec::new();
    fddb.for_each_tree(target, &opts, |row| {
        let shape = row.forest.hash(row.table);
        let run_class = run_class(row).map_err(|e| afetm_fddb::FddbError::Plan(e.to_string()))?;
        if run_class == Class::Normal {
            normal_shapes.insert(shape.clone());
        }
        let class = if row.faulty { run_class.clone() } else { Class::Normal };
        let sample = Sample { graph: NamedGraph::compact(row.graph, row.table), class, run: row.run, run_class };
        sizes.push((row.graph.len(), row.forest.len()));
        windows.push((row.pid, row.tid, row.start_ns));
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
        windows,
        dropped_faulty: 0,
    })
}

/// Faulty windows per fault run that has one (item 4's "several faulty windows per run").
fn faulty_per_run(samples: &[Sample]) -> f64 {
    let faulty: Vec<i64> = samples.iter().filter(|s| s.class != Class::Normal).map(|s| s.run).collect();
    let runs: HashSet<i64> = faulty.iter().copied().collect();
    if runs.is_empty() { 0.0 } else { faulty.len() as f64 / runs.len() as f64 }
}

/// Opens the FDDB, reads the training set and trains; `progress` sees every epoch.
pub fn train_from_fddb(
    path: &Path,
    target: &str,
    plan: &PlanFile,
    set: &SetOptions,
    cfg: &TrainConfig,
    progress: impl FnMut(Epoch),
) -> Result<Model, TrainingError> {
    if !path.is_file() {
        return Err(TrainingError::Missing(path.to_path_buf()));
    }
    let fddb = Fddb::open(path)?;
    let set = training_set(&fddb, target, plan, set)?;
    tracing::info!(
        target,
        trees = set.samples.len(),
        relabelled = set.relabelled,
        dropped_faulty = set.dropped_faulty,
        faulty_per_run = format!("{:.2}", faulty_per_run(&set.samples)),
        "training set read"
    );
    let mut model = train::train(&set.samples, set.target, cfg, progress)?;
    model.manifest.training.relabelled_normal = set.relabelled;
    model.manifest.training.sizes = set.sizes;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(run: i64, faulty: bool) -> Sample {
        let fault = Class::Fault { function: "f".into(), kind: FaultKind::Crash };
        let class = if faulty { fault.clone() } else { Class::Normal };
        Sample { graph: NamedGraph::default(), class, run, run_class: fault }
    }

    #[test]
    fn the_first_faulty_windows_of_each_run_and_thread_are_kept() {
        // Run 1: thread 7 has three faulty windows (given out of order) and a normal one;
        // thread 8 one faulty window. Run 2: one faulty window on thread 7.
        let samples =
            vec![sample(1, true), sample(1, true), sample(1, false), sample(1, true), sample(1, true), sample(2, true)];
        let windows = [(5, 7, 3000), (5, 7, 1000), (5, 7, 500), (5, 7, 2000), (5, 8, 2500), (6, 7, 9000)];
        // Kept: the normal window, thread 7's first faulty one (start 1000), thread 8's, run 2's.
        assert_eq!(first_faulty_windows(&samples, &windows, 1), [false, true, true, false, true, true]);
        assert_eq!(first_faulty_windows(&samples, &windows, 2), [false, true, true, true, true, true]);
        assert!(first_faulty_windows(&samples, &windows, 9).iter().all(|k| *k));
    }
}
