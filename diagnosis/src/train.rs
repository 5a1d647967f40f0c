//! Training the GCN on labelled trees (AFETM sec. III.C.2).
//!
//! * **Split by run.** Validation takes about `val_share` of the runs of every class (the
//!   run's fault, or `normal`) that has at least two runs; a run is never on both sides, so
//!   validation measures trees of injections the model never saw. Classes with one run stay
//!   in training only.
//! * **Vocabulary** from the training split only; unseen functions map to the unknown row, and
//!   during training each node's function is replaced by the unknown row with probability
//!   `unknown_dropout` so that row learns something useful.
//! * **Loss**: softmax cross-entropy weighted per class by inverse frequency (faults have a few
//!   trees each, `normal` has many), AdamW, mini-batches of whole trees as one disjoint union.
//! * **Early stopping** on validation accuracy (ties broken by validation loss), not before
//!   `min_epochs`, keeping the best epoch's weights; fixed seed, so one thread gives the same model every time.
//! * **Threshold**: alarm when P(normal) < t. t maximizes Youden's J over validation *runs*,
//!   the unit detection and false alarms are scored on (share of the fault runs one of whose
//!   faulty trees alarms minus share of the normal runs one of whose trees alarms: fault-free
//!   windows, as trees of fault runs labelled normal may still be disturbed by the fault): a
//!   run alarms when its least normal tree does, so a threshold that lets one window in 16
//!   alarm makes a run of five windows alarm one time in four. (Over trees, J chose t = 0.39 on
//!   a redis campaign, 1 of 16 validation normal trees alarming, and 20 of 30 held-out normal
//!   runs alarmed.) The normal runs of J are the validation ones only: training normal runs
//!   score near 1 in sample and would dilute the false-alarm share ([`run_threshold`]); and
//!   each one's least P(normal) counts [`NORMAL_MARGIN`] logits lower, as a few held-out
//!   normal runs understate how far from normal the next ones reach.
//!   Without faulty or normal validation trees, or when no t has J > 0: the largest t at which
//!   at most `alarm_rate` of the validation normal-run trees alarm, the training normal runs'
//!   trees joining when there are fewer than five. (That quantile alone was the first rule;
//!   with tens of normal trees it is their minimum, and one normal tree the model finds
//!   faulty, e.g. a last window cut short by the end of the load, put t at 1e-16: no alarm,
//!   ever.)

use std::collections::{BTreeMap, BTreeSet, HashMap};

use afetm_calltree::graph::NamedGraph;
use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{RngExt, SeedableRng, rngs::StdRng, seq::SliceRandom};
use sha2::{Digest, Sha256};

use crate::{
    DiagnosisError,
    gcn::{Dims, Gcn},
    graph::{Batch, Graph, UNKNOWN, Vocab},
    model::{Class, FORMAT, Manifest, Model, PlanKey, TrainingSummary},
    profile::NormalProfile,
};

/// One labelled window of one thread.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The window's call graph as the model will see it (the graph of the events the plan's
    /// agent sends: `afct::trace_of_fct`).
    pub graph: NamedGraph,
    /// Its label.
    pub class: Class,
    /// The run it came from (the unit of the split).
    pub run: i64,
    /// The run's own class: its fault, or `normal` for a normal run.
    pub run_class: Class,
}

/// What the model is for.
#[derive(Clone, Debug)]
pub struct Target {
    /// FDDB target name.
    pub name: String,
    /// Traced module.
    pub module: String,
    /// The plan trained under.
    pub plan: PlanKey,
    /// Window length of the trees, ms.
    pub window_ms: u64,
}

/// Training settings; [`Default`] is what `afetm-analyzer train` uses.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Seed of the split, the initialization and the batch order.
    pub seed: u64,
    /// Most epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation result...
    pub patience: usize,
    /// ...but never before this epoch (small validation splits peak early by chance).
    pub min_epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Trees per mini-batch.
    pub batch: usize,
    /// Embedding width.
    pub embed: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Share of each class's runs held out for validation.
    pub val_share: f64,
    /// Probability of replacing a node's function by the unknown row in training.
    pub unknown_dropout: f64,
    /// Trees with more nodes are left out of training (and counted).
    pub max_nodes: usize,
    /// Highest share of normal validation trees allowed to alarm.
    pub alarm_rate: f64,
    /// Compare every node with the normal profile ([`crate::profile`]); off: the deviation
    /// features are all zero (the ablation row).
    pub deviation: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 2026,
            epochs: 150,
            patience: 25,
            min_epochs: 60,
            lr: 0.005,
            weight_decay: 1e-4,
            batch: 32,
            embed: 32,
            hidden: 64,
            val_share: 0.2,
            unknown_dropout: 0.05,
            max_nodes: 20_000,
            alarm_rate: 0.01,
            deviation: true,
        }
    }
}

/// Reported after every epoch.
#[derive(Clone, Copy, Debug)]
pub struct Epoch {
    /// 1-based.
    pub epoch: usize,
    /// Most epochs.
    pub epochs: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Validation accuracy (NaN without a validation split).
    pub val_accuracy: f64,
}

struct Prepared {
    graph: Graph,
    class: usize,
    normal: bool,
    /// From a normal run (a fault-free window, what the alarm rate is about).
    normal_run: bool,
    /// The run it came from (the unit the threshold is chosen on).
    run: i64,
}

/// Trains a model on `samples` for `target`; `progress` sees every epoch.
pub fn train(
    samples: &[Sample],
    target: Target,
    cfg: &TrainConfig,
    mut progress: impl FnMut(Epoch),
) -> Result<Model, DiagnosisError> {
    let started = std::time::Instant::now();
    if samples.is_empty() {
        return Err(DiagnosisError::Data("no training trees".into()));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let val_runs = split(samples, cfg.val_share, &mut rng);
    let (train_s, val_s): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| !val_runs.contains(&s.run));
    let vocab = Vocab::new(train_s.iter().flat_map(|s| {
        s.graph.graph.nodes.keys().map(|f| {
            let f = s.graph.func(*f);
            (f.module.to_string(), f.name.to_string())
        })
    }));
    let faults: BTreeSet<&Class> = train_s.iter().map(|s| &s.class).filter(|c| **c != Class::Normal).collect();
    let classes: Vec<Class> = std::iter::once(Class::Normal).chain(faults.into_iter().cloned()).collect();
    let index: BTreeMap<&Class, usize> = classes.iter().enumerate().map(|(i, c)| (c, i)).collect();
    let mut summary = TrainingSummary {
        train_runs: train_s.iter().map(|s| s.run).collect::<BTreeSet<_>>().len(),
        val_runs: val_runs.len(),
        val_run_ids: val_runs.iter().copied().collect(),
        ..Default::default()
    };
    // The profile holds every normal run, the validation ones too: a normal shape that only a
    // validation run had (on a seed-1 redis campaign, the last loaded window of a cold run,
    // one of 20 normal runs) was otherwise "never seen" to the served model, and the held-out
    // normal runs with that window alarmed at P(normal) 0.001. No fault run is in it.
    let profile = if cfg.deviation {
        NormalProfile::build(samples.iter().filter(|s| s.run_class == Class::Normal).map(|s| (s.run, &s.graph)))
    } else {
        NormalProfile::default()
    };
    // A normal run's trees (training or validation) are compared with the other normal runs
    // only (see `crate::profile`), as a new normal run is at serving; every other tree with
    // the whole profile.
    let mut own: HashMap<i64, NormalProfile> = HashMap::new();
    let mut prepare = |set: &[&Sample], summary: &mut TrainingSummary| -> Result<Vec<Prepared>, DiagnosisError> {
        let mut out = Vec::new();
        for s in set {
            let Some(&class) = index.get(&s.class) else { continue };
            let against = if s.run_class == Class::Normal && !profile.is_empty() {
                own.entry(s.run).or_insert_with(|| profile.without(s.run))
            } else {
                &profile
            };
            let graph = Graph::from_graph(&s.graph, &vocab, against)?;
            if graph.len() > cfg.max_nodes {
                summary.too_large += 1;
                continue;
            }
            out.push(Prepared {
                graph,
                class,
                normal: class == 0,
                normal_run: s.run_class == Class::Normal,
                run: s.run,
            });
        }
        Ok(out)
    };
    let train_p = prepare(&train_s, &mut summary)?;
    let val_p = prepare(&val_s, &mut summary)?;
    summary.train_samples = train_p.len();
    summary.val_samples = val_p.len();
    summary.thin_classes = thin_classes(&train_p, &classes);
    if train_p.is_empty() {
        return Err(DiagnosisError::Data("every training tree was left out".into()));
    }
    let dims = Dims { vocab: vocab.rows(), embed: cfg.embed, hidden: cfg.hidden, classes: classes.len() };
    let device = Device::Cpu;
    let mut net = Gcn::new(dims, cfg.seed, &device)?;
    let weights = class_weights(&train_p, classes.len());
    let (best_epoch, epochs, best) = fit(&net, &train_p, &val_p, &weights, cfg, &mut rng, &mut progress)?;
    if let Some(best) = &best {
        net.load(best)?;
    }
    let meta = Meta { target, classes, vocab, profile, summary, best_epoch, epochs, started };
    finish(net, meta, samples, &val_p, &train_p, cfg)
}

/// Fewest training trees of a class before the summary calls it thin.
pub const THIN_CLASS: usize = 5;

/// The classes with fewer than [`THIN_CLASS`] trees in `train`, with their counts, in class order.
fn thin_classes(train: &[Prepared], classes: &[Class]) -> Vec<(String, usize)> {
    let mut count = vec![0usize; classes.len()];
    for p in train {
        count[p.class] += 1;
    }
    classes.iter().zip(count).filter(|(_, n)| *n < THIN_CLASS).map(|(c, n)| (c.to_string(), n)).collect()
}

/// Picks the validation runs: about `share` of the runs of each run class with two or more.
fn split(samples: &[Sample], share: f64, rng: &mut StdRng) -> BTreeSet<i64> {
    let mut by_class: BTreeMap<&Class, BTreeSet<i64>> = BTreeMap::new();
    for s in samples {
        by_class.entry(&s.run_class).or_default().insert(s.run);
    }
    let mut val = BTreeSet::new();
    for runs in by_class.values() {
        if runs.len() < 2 || share <= 0.0 {
            continue;
        }
        let mut runs: Vec<i64> = runs.iter().copied().collect();
        runs.shuffle(rng);
        let n = ((runs.len() as f64 * share).round() as usize).clamp(1, runs.len() - 1);
        val.extend(runs.into_iter().take(n));
    }
    val
}

/// Inverse class frequency, normalized so a tree weighs 1 on average.
fn class_weights(train: &[Prepared], classes: usize) -> Vec<f32> {
    let mut n = vec![0usize; classes];
    for p in train {
        n[p.class] += 1;
    }
    let present = n.iter().filter(|c| **c > 0).count().max(1);
    n.iter().map(|c| if *c == 0 { 0.0 } else { train.len() as f32 / (present * c) as f32 }).collect()
}

type Snapshot = std::collections::HashMap<String, Tensor>;

/// The epochs: returns (best epoch, epochs run, best weights if validated).
fn fit(
    net: &Gcn,
    train: &[Prepared],
    val: &[Prepared],
    weights: &[f32],
    cfg: &TrainConfig,
    rng: &mut StdRng,
    progress: &mut impl FnMut(Epoch),
) -> Result<(usize, usize, Option<Snapshot>), DiagnosisError> {
    let params = ParamsAdamW { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() };
    let mut opt = AdamW::new(net.vars(), params)?;
    let device = Device::Cpu;
    let class_w = Tensor::from_vec(weights.to_vec(), weights.len(), &device)?;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut best: Option<(f64, f64, usize, Snapshot)> = None;
    let mut epoch = 0;
    while epoch < cfg.epochs {
        epoch += 1;
        order.shuffle(rng);
        let mut total = 0.0;
        for chunk in order.chunks(cfg.batch.max(1)) {
            let graphs: Vec<&Graph> = chunk.iter().map(|i| &train[*i].graph).collect();
            let rows: Vec<u32> = graphs
                .iter()
                .flat_map(|g| g.rows.iter())
                .map(|r| if rng.random_bool(cfg.unknown_dropout) { UNKNOWN } else { *r })
                .collect();
            let batch = Batch::new(&graphs, Some(rows), &device)?;
            let labels: Vec<u32> = chunk.iter().map(|i| train[*i].class as u32).collect();
            let loss = weighted_loss(&net.forward(&batch)?, &labels, &class_w)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        }
        let loss = total / train.len() as f64;
        let (acc, val_loss) =
            if val.is_empty() { (f64::NAN, f64::NAN) } else { evaluate(net, val, &class_w, cfg.batch)? };
        progress(Epoch { epoch, epochs: cfg.epochs, loss, val_accuracy: acc });
        if val.is_empty() {
            continue;
        }
        let better = best.as_ref().is_none_or(|(a, l, _, _)| acc > *a || (acc == *a && val_loss < *l));
        if better {
            let snap = net.tensors().into_iter().map(|(k, t)| t.copy().map(|t| (k, t))).collect::<Result<_, _>>()?;
            best = Some((acc, val_loss, epoch, snap));
        } else if epoch >= cfg.min_epochs && best.as_ref().is_some_and(|(_, _, e, _)| epoch - e >= cfg.patience) {
            break;
        }
    }
    Ok(match best {
        Some((_, _, e, snap)) => (e, epoch, Some(snap)),
        None => (epoch, epoch, None),
    })
}

/// Class-weighted mean cross-entropy of `logits` `[G, C]` against `labels`.
fn weighted_loss(logits: &Tensor, labels: &[u32], class_w: &Tensor) -> candle_core::Result<Tensor> {
    let device = logits.device();
    let y = Tensor::from_vec(labels.to_vec(), (labels.len(), 1), device)?;
    let log_p = candle_nn::ops::log_softmax(logits, 1)?.gather(&y, 1)?.squeeze(1)?;
    let w = class_w.index_select(&y.squeeze(1)?, 0)?;
    let total_w = w.sum_all()?;
    (log_p * &w)?.sum_all()?.neg()?.broadcast_div(&total_w)
}

/// Accuracy and weighted loss over `set`.
fn evaluate(net: &Gcn, set: &[Prepared], class_w: &Tensor, batch: usize) -> Result<(f64, f64), DiagnosisError> {
    let device = Device::Cpu;
    let (mut right, mut loss) = (0usize, 0.0);
    for chunk in set.chunks(batch.max(1)) {
        let graphs: Vec<&Graph> = chunk.iter().map(|p| &p.graph).collect();
        let logits = net.forward(&Batch::new(&graphs, None, &device)?)?;
        let labels: Vec<u32> = chunk.iter().map(|p| p.class as u32).collect();
        loss += weighted_loss(&logits, &labels, class_w)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        right += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
    }
    Ok((right as f64 / set.len() as f64, loss / set.len() as f64))
}

/// Fewest fault-free trees the threshold is chosen on before training ones join.
const MIN_CALIBRATION: usize = 5;

/// The alarm threshold: the largest t with at most `rate` of `p_normal` below it.
pub fn threshold(p_normal: &[f32], rate: f64) -> f32 {
    if p_normal.is_empty() {
        return 0.5;
    }
    let mut p = p_normal.to_vec();
    p.sort_by(f32::total_cmp);
    let allowed = (rate * p.len() as f64).floor() as usize;
    p[allowed.min(p.len() - 1)]
}

/// The t that maximizes Youden's J = TPR - FPR of the rule "alarm when P(normal) < t" on
/// faulty trees (`faulty`) and fault-free trees (`normal`); ties go to the smallest t. `None`
/// when either set is empty or no t has J > 0.
pub fn youden_threshold(normal: &[f32], faulty: &[f32]) -> Option<f32> {
    if normal.is_empty() || faulty.is_empty() {
        return None;
    }
    let mut cuts: Vec<f32> = normal.iter().chain(faulty).copied().filter(|p| p.is_finite()).collect();
    cuts.sort_by(f32::total_cmp);
    cuts.dedup();
    let share = |set: &[f32], t: f32| set.iter().filter(|p| **p < t).count() as f64 / set.len() as f64;
    let mut best: Option<(f64, f32)> = None;
    for c in cuts {
        // Just above c: trees at exactly c alarm.
        let t = f32::from_bits(c.to_bits() + 1).max(f32::MIN_POSITIVE);
        let j = share(faulty, t) - share(normal, t);
        if j > 0.0 && best.is_none_or(|(b, _)| j > b) {
            best = Some((j, t));
        }
    }
    best.map(|(_, t)| t)
}

/// The alarm threshold from (run, P(normal)) trees: Youden's J over runs
/// ([`youden_threshold`] on [`run_minima`]) with the false-alarm share read from the held-out
/// normal runs (`held`) only, each run's least P(normal) lowered by [`NORMAL_MARGIN`] logits.
/// Training normal runs (`fitted`) score near 1 in sample: counted
/// there, with one held-out normal run of four a t that makes it alarm cost J a quarter instead
/// of all of it, and the live normal windows of such a model alarmed. Without a Youden t, the
/// largest t with at most `rate` of the held-out normal trees below it, the fitted ones joining
/// when the held-out ones are fewer than [`MIN_CALIBRATION`].
pub fn run_threshold(held: &[(i64, f32)], fitted: &[(i64, f32)], faulty: &[(i64, f32)], rate: f64) -> f32 {
    let normal: Vec<f32> = run_minima(held.iter().copied()).into_iter().map(widened).collect();
    if let Some(t) = youden_threshold(&normal, &run_minima(faulty.iter().copied())) {
        return t;
    }
    let mut calib: Vec<f32> = held.iter().map(|(_, p)| *p).collect();
    if calib.len() < MIN_CALIBRATION {
        calib.extend(fitted.iter().map(|(_, p)| *p));
    }
    threshold(&calib, rate)
}

/// Logits by which a held-out normal run's least P(normal) is lowered before the threshold is
/// chosen ([`run_threshold`]): the 1-5 held-out normal runs of a campaign are a small sample,
/// and the least normal of the tens of normal runs a model then serves sits below their least
/// normal one. Without it, Youden's J put t just above a held-out fault run that scored like
/// the normal ones (t = 0.904 from a fault run at 0.9038, the one held-out normal run above
/// 0.91), and the next normal run's windows, at 0.908, cleared it by 0.005. One logit is a
/// factor e on the odds of normal (0.91 becomes 0.79, 0.5 becomes 0.27); it was set on the
/// analyzer's end-to-end redis campaigns, never on evaluation runs.
pub const NORMAL_MARGIN: f32 = 1.0;

/// `p` lowered by [`NORMAL_MARGIN`] logits (0 and 1 stay where they are).
fn widened(p: f32) -> f32 {
    if !(p > 0.0 && p < 1.0) {
        return p;
    }
    let logit = (p / (1.0 - p)).ln() - NORMAL_MARGIN;
    1.0 / (1.0 + (-logit).exp())
}

/// Each run's least P(normal) over its trees, given as (run, P(normal)): whether the run
/// alarms under "alarm when P(normal) < t" for every t at once.
pub fn run_minima(trees: impl IntoIterator<Item = (i64, f32)>) -> Vec<f32> {
    let mut least: BTreeMap<i64, f32> = BTreeMap::new();
    for (run, p) in trees {
        least.entry(run).and_modify(|m| *m = m.min(p)).or_insert(p);
    }
    least.into_values().collect()
}

/// SHA-256 over every sample's run, label, functions and edges (by name, so the same data
/// interned in another order hashes the same).
fn data_hash(samples: &[Sample]) -> String {
    let mut h = Sha256::new();
    for s in samples {
        h.update(format!("{} {}\n", s.run, s.class));
        let g = &s.graph;
        let mut lines: Vec<String> = g.graph.nodes.iter().map(|(f, c)| format!("{}\t{c:?}\n", g.func(*f))).collect();
        lines.extend(g.graph.edges.iter().map(|((c, f), n)| format!("{}\t{}\t{n}\n", g.func(*c), g.func(*f))));
        lines.sort();
        for l in lines {
            h.update(l);
        }
    }
    format!("{:x}", h.finalize())
}

/// What [`finish`] writes into the manifest besides the network.
struct Meta {
    target: Target,
    classes: Vec<Class>,
    vocab: Vocab,
    profile: NormalProfile,
    summary: TrainingSummary,
    best_epoch: usize,
    epochs: usize,
    started: std::time::Instant,
}

/// The model with its manifest: threshold from the validation normals, validation figures.
fn finish(
    net: Gcn,
    meta: Meta,
    samples: &[Sample],
    val: &[Prepared],
    train: &[Prepared],
    cfg: &TrainConfig,
) -> Result<Model, DiagnosisError> {
    let Meta { target, classes, vocab, profile, mut summary, best_epoch, epochs, started } = meta;
    let manifest = Manifest {
        format: FORMAT,
        target: target.name,
        module: target.module,
        classes,
        dims: net.dims(),
        vocab,
        plan: target.plan,
        window_ms: target.window_ms,
        threshold: 0.5,
        data_hash: data_hash(samples),
        training: TrainingSummary::default(),
        profile,
    };
    let mut model = Model::new(manifest, net);
    let p_normal = |set: Vec<&Prepared>| -> Result<Vec<(i64, f32)>, DiagnosisError> {
        let mut out = Vec::with_capacity(set.len());
        for chunk in set.chunks(cfg.batch.max(1)) {
            let graphs: Vec<&Graph> = chunk.iter().map(|p| &p.graph).collect();
            let p = model.probabilities(&graphs)?;
            out.extend(chunk.iter().map(|s| s.run).zip(p.into_iter().map(|p| p[0])));
        }
        Ok(out)
    };
    let held = p_normal(val.iter().filter(|p| p.normal_run).collect())?;
    // Only the quantile fallback with few held-out trees reads the training normal runs.
    let fitted = if held.len() < MIN_CALIBRATION {
        p_normal(train.iter().filter(|p| p.normal_run).collect())?
    } else {
        Vec::new()
    };
    let faulty = p_normal(val.iter().filter(|p| !p.normal).collect())?;
    let t = run_threshold(&held, &fitted, &faulty, cfg.alarm_rate);
    model.manifest.threshold = t;
    if !val.is_empty() {
        let p = probabilities(&model, val, cfg.batch)?;
        let right = val.iter().zip(&p).filter(|(s, p)| argmax(p) == s.class).count();
        summary.val_accuracy = right as f64 / val.len() as f64;
        let rate = |normal: bool| {
            let of: Vec<&Vec<f32>> = val
                .iter()
                .zip(&p)
                .filter(|(s, _)| if normal { s.normal_run } else { !s.normal })
                .map(|(_, p)| p)
                .collect();
            of.iter().filter(|p| p[0] < t).count() as f64 / of.len().max(1) as f64
        };
        summary.val_false_alarms = rate(true);
        summary.val_detection = rate(false);
    }
    summary.epochs = epochs;
    summary.best_epoch = best_epoch;
    summary.seconds = started.elapsed().as_secs_f64();
    model.manifest.training = summary;
    Ok(model)
}

fn probabilities(model: &Model, set: &[Prepared], batch: usize) -> Result<Vec<Vec<f32>>, DiagnosisError> {
    let mut out = Vec::with_capacity(set.len());
    for chunk in set.chunks(batch.max(1)) {
        let graphs: Vec<&Graph> = chunk.iter().map(|p| &p.graph).collect();
        out.extend(model.probabilities(&graphs)?);
    }
    Ok(out)
}

fn argmax(p: &[f32]) -> usize {
    (0..p.len()).max_by(|a, b| p[*a].total_cmp(&p[*b]).then(b.cmp(a))).unwrap_or(0)
}
