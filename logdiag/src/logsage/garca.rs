//! GARCA (LogSage sec. 3.2): root cause analysis over a case-similarity graph.
//!
//! * A case is one run of the FDDB (or one live incident): the mean embedding of its
//!   fault-indicating lines (FILE) and a vector of its call trees (the caller's choice; afetm
//!   uses the share of nodes per function of its AFCTs, hashed to a fixed width).
//! * Eq. 2-3: cases `i`, `j` are joined when their similarity `s = w_log cos(logs) + (1 -
//!   w_log) cos(trees)` reaches `τ`; the edge weighs `α s`. The paper uses the logs alone; the
//!   issue asks for both, and the weight says how much each counts.
//! * Eqs 4-6: two GraphSAGE layers, `h' = ReLU(W [h, m])` with `m` the edge-weighted mean of
//!   the neighbours' `h` (zero for a node without neighbours), then a logistic-regression head
//!   over the final embedding. Trained end to end (cross-entropy) on the labelled nodes, the
//!   unlabelled ones taking part as neighbours (semi-supervised, as in the paper).
//! * Eqs 7-8: active learning: the unlabelled cases whose predicted class has the highest
//!   entropy are asked about first ([`Garca::query`], [`active_learning`]).
//! * A new case joins the graph with edges to the known cases above `τ`; its embedding is
//!   computed from its neighbours' (inductive, [`Garca::classify`]).

use std::collections::HashMap;

use afetm_diagnosis::gcn::Dense;
use afetm_logs::embed::cosine;
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, ops::softmax};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

use crate::LogDiagError;

/// A case: its log and tree vectors and, if known, its class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Case {
    /// Mean embedding of its fault-indicating lines (zeros if it logged nothing).
    pub logs: Vec<f32>,
    /// Its call trees as a vector.
    pub trees: Vec<f32>,
    /// Its class (root cause), if labelled.
    pub label: Option<usize>,
}

/// Graph and training settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Edge threshold τ (the paper's best: 0.6).
    pub tau: f32,
    /// Edge scale α (the paper: 1).
    pub alpha: f32,
    /// Weight of the logs in the similarity (the rest is the trees').
    pub log_weight: f32,
    /// Width of the GraphSAGE layers.
    pub hidden: usize,
    /// Full-graph training passes.
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed of the weights and of the first labelled set.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { tau: 0.6, alpha: 1.0, log_weight: 0.5, hidden: 32, epochs: 150, lr: 0.01, seed: 2026 }
    }
}

/// Weighted edges into each node, normalized so that they sum to 1 per node (eq. 4's mean).
struct Edges {
    src: Tensor,
    dst: Tensor,
    w: Tensor,
}

/// The trained model with its graph.
pub struct Garca {
    cfg: Config,
    classes: usize,
    cases: Vec<Case>,
    x: Tensor,
    edges: Edges,
    layers: [Dense; 2],
    head: Dense,
}

fn similarity(cfg: &Config, a: &Case, b: &Case) -> f32 {
    cfg.log_weight * cosine(&a.logs, &b.logs) + (1.0 - cfg.log_weight) * cosine(&a.trees, &b.trees)
}

fn features(c: &Case) -> Vec<f32> {
    c.logs.iter().chain(&c.trees).copied().collect()
}

/// Eq. 4's weighted mean of `h` over `edges`.
fn aggregate(h: &Tensor, e: &Edges) -> candle_core::Result<Tensor> {
    afetm_diagnosis::gcn::propagate(h, &e.src, &e.dst, &e.w)
}

impl Garca {
    fn edges(cfg: &Config, cases: &[Case]) -> Result<Edges, LogDiagError> {
        let n = cases.len();
        let mut list: Vec<(u32, u32, f32)> = Vec::new();
        let mut total = vec![0f32; n];
        for i in 0..n {
            for j in 0..n {
                let s = if i == j { 0.0 } else { similarity(cfg, &cases[i], &cases[j]) };
                if i != j && s >= cfg.tau {
                    list.push((j as u32, i as u32, cfg.alpha * s));
                    total[i] += cfg.alpha * s;
                }
            }
        }
        let len = list.len();
        let src: Vec<u32> = list.iter().map(|e| e.0).collect();
        let dst: Vec<u32> = list.iter().map(|e| e.1).collect();
        let w: Vec<f32> = list.iter().map(|e| e.2 / total[e.1 as usize]).collect();
        let d = Device::Cpu;
        Ok(Edges {
            src: Tensor::from_vec(src, len, &d)?,
            dst: Tensor::from_vec(dst, len, &d)?,
            w: Tensor::from_vec(w, (len, 1), &d)?,
        })
    }

    /// Eqs 5-6 for one layer.
    fn layer(l: &Dense, h: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
        l.linear(&Tensor::cat(&[h, m], 1)?)?.relu()
    }

    fn embed(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let h1 = Self::layer(&self.layers[0], &self.x, &aggregate(&self.x, &self.edges)?)?;
        let h2 = Self::layer(&self.layers[1], &h1, &aggregate(&h1, &self.edges)?)?;
        Ok((h1, h2))
    }

    /// Builds the graph over `cases` and trains on the labelled ones (`classes` classes).
    pub fn train(cases: Vec<Case>, classes: usize, cfg: Config) -> Result<Garca, LogDiagError> {
        let labelled: Vec<(u32, u32)> =
            cases.iter().enumerate().filter_map(|(i, c)| c.label.map(|l| (i as u32, l as u32))).collect();
        if labelled.is_empty() || classes < 2 {
            return Err(LogDiagError::Data(format!(
                "GARCA needs labelled cases and two classes or more; got {} labelled, {classes} classes",
                labelled.len()
            )));
        }
        if let Some((_, l)) = labelled.iter().find(|(_, l)| *l as usize >= classes) {
            return Err(LogDiagError::Data(format!("label {l} out of {classes} classes")));
        }
        let width = cases.first().map(|c| features(c).len()).unwrap_or(0);
        if cases.iter().any(|c| features(c).len() != width) {
            return Err(LogDiagError::Data("cases' vectors differ in width".into()));
        }
        let d = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let flat: Vec<f32> = cases.iter().flat_map(features).collect();
        let x = Tensor::from_vec(flat, (cases.len(), width), &d)?;
        let edges = Self::edges(&cfg, &cases)?;
        let h = cfg.hidden;
        let layers = [Dense::new(&mut rng, 2 * width, h, &d)?, Dense::new(&mut rng, 2 * h, h, &d)?];
        let head = Dense::new(&mut rng, h, classes, &d)?;
        let g = Garca { cfg, classes, cases, x, edges, layers, head };
        let idx = Tensor::from_vec(labelled.iter().map(|l| l.0).collect::<Vec<_>>(), labelled.len(), &d)?;
        let y = Tensor::from_vec(labelled.iter().map(|l| l.1).collect::<Vec<_>>(), labelled.len(), &d)?;
        let vars: Vec<Var> = g.vars().into_iter().cloned().collect();
        let mut opt = AdamW::new(vars, ParamsAdamW { lr: g.cfg.lr, weight_decay: 1e-4, ..Default::default() })?;
        for _ in 0..g.cfg.epochs {
            let (_, h2) = g.embed()?;
            let logits = g.head.linear(&h2.index_select(&idx, 0)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
        }
        Ok(g)
    }

    fn vars(&self) -> Vec<&Var> {
        self.layers.iter().chain([&self.head]).flat_map(|l| [&l.weight, &l.bias]).collect()
    }

    /// Class probabilities of every case of the graph.
    pub fn probabilities(&self) -> Result<Vec<Vec<f32>>, LogDiagError> {
        let (_, h2) = self.embed()?;
        Ok(softmax(&self.head.linear(&h2)?, D::Minus1)?.to_vec2::<f32>()?)
    }

    /// Eqs 7-8: the `m` unlabelled cases with the most uncertain prediction, most uncertain
    /// first.
    pub fn query(&self, m: usize) -> Result<Vec<usize>, LogDiagError> {
        let p = self.probabilities()?;
        let mut h: Vec<(usize, f32)> = p
            .iter()
            .enumerate()
            .filter(|(i, _)| self.cases[*i].label.is_none())
            .map(|(i, p)| (i, -p.iter().map(|q| if *q > 0.0 { q * q.ln() } else { 0.0 }).sum::<f32>()))
            .collect();
        h.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(h.into_iter().take(m).map(|(i, _)| i).collect())
    }

    /// Class probabilities of a new case, joined to the graph by its edges to the known cases.
    pub fn classify(&self, case: &Case) -> Result<Vec<f32>, LogDiagError> {
        let d = Device::Cpu;
        let mut nbrs: Vec<(u32, f32)> = Vec::new();
        for (j, c) in self.cases.iter().enumerate() {
            let s = similarity(&self.cfg, case, c);
            if s >= self.cfg.tau {
                nbrs.push((j as u32, self.cfg.alpha * s));
            }
        }
        let total: f32 = nbrs.iter().map(|n| n.1).sum();
        let width = self.x.dims2()?.1;
        let own = features(case);
        if own.len() != width {
            return Err(LogDiagError::Data(format!("a case of width {}, the graph's is {width}", own.len())));
        }
        let x = Tensor::from_vec(own, (1, width), &d)?;
        let mean = |h: &Tensor| -> candle_core::Result<Tensor> {
            if nbrs.is_empty() {
                return Tensor::zeros((1, h.dims2()?.1), DType::F32, &d);
            }
            let idx = Tensor::from_vec(nbrs.iter().map(|n| n.0).collect::<Vec<_>>(), nbrs.len(), &d)?;
            let w = Tensor::from_vec(nbrs.iter().map(|n| n.1 / total).collect::<Vec<_>>(), (1, nbrs.len()), &d)?;
            w.matmul(&h.index_select(&idx, 0)?)
        };
        let (h1, _) = self.embed()?;
        let n1 = Self::layer(&self.layers[0], &x, &mean(&self.x)?)?;
        let n2 = Self::layer(&self.layers[1], &n1, &mean(&h1)?)?;
        Ok(softmax(&self.head.linear(&n2)?, D::Minus1)?.squeeze(0)?.to_vec1::<f32>()?)
    }

    /// How many classes it tells apart.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The graph's edges (each direction counted).
    pub fn edge_count(&self) -> usize {
        self.edges.src.dims1().unwrap_or(0)
    }
}

/// LogSage's loop: label `initial` random cases, then `rounds` times train and ask `oracle`
/// (the engineer; in the evaluation, the FDDB's truth) about the `per_round` most uncertain.
/// `truth_known[i]` says whether case `i` can be asked about at all. Returns the last model
/// and how many labels it used.
pub fn active_learning(
    mut cases: Vec<Case>,
    classes: usize,
    cfg: Config,
    (initial, rounds, per_round): (usize, usize, usize),
    oracle: &mut dyn FnMut(usize) -> Option<usize>,
) -> Result<(Garca, usize), LogDiagError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..cases.len()).collect();
    order.shuffle(&mut rng);
    let mut asked: HashMap<usize, bool> = HashMap::new();
    for i in order.into_iter().take(initial) {
        cases[i].label = oracle(i);
        asked.insert(i, true);
    }
    let mut model = Garca::train(cases.clone(), classes, cfg.clone())?;
    for _ in 0..rounds {
        for i in model.query(per_round)? {
            cases[i].label = oracle(i);
            asked.insert(i, true);
        }
        model = Garca::train(cases.clone(), classes, cfg.clone())?;
    }
    Ok((model, asked.len()))
}

#[cfg(test)]
mod tests {
    use rand::RngExt;

    use super::*;

    /// Three classes, each a noisy copy of its own log and tree prototype.
    fn cases(rng: &mut StdRng, n: usize) -> Vec<(Case, usize)> {
        let protos: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
            .map(|_| {
                let v = |rng: &mut StdRng| (0..8).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
                (v(rng), v(rng))
            })
            .collect();
        let noisy = |rng: &mut StdRng, v: &[f32]| v.iter().map(|x| x + rng.random_range(-0.25f32..0.25)).collect();
        (0..n)
            .map(|i| {
                let k = i % 3;
                (Case { logs: noisy(rng, &protos[k].0), trees: noisy(rng, &protos[k].1), label: None }, k)
            })
            .collect()
    }

    #[test]
    fn classifies_new_cases_and_active_learning_asks_few() {
        let mut rng = StdRng::seed_from_u64(11);
        let all = cases(&mut rng, 90);
        let (train, test) = all.split_at(60);
        let truth: Vec<usize> = train.iter().map(|c| c.1).collect();
        let graph: Vec<Case> = train.iter().map(|c| c.0.clone()).collect();
        let mut asked = 0;
        let (model, labels) = active_learning(graph, 3, Config::default(), (3, 3, 2), &mut |i| {
            asked += 1;
            Some(truth[i])
        })
        .unwrap();
        assert_eq!(labels, 9);
        assert!(model.edge_count() > 0);
        let right = test
            .iter()
            .filter(|(c, k)| {
                let p = model.classify(c).unwrap();
                (0..3).max_by(|a, b| p[*a].total_cmp(&p[*b])) == Some(*k)
            })
            .count();
        assert!(right >= 27, "{right}/30 new cases right with 9 labels, want >= 90%");
    }

    #[test]
    fn refuses_without_labels() {
        let c = Case { logs: vec![1.0], trees: vec![1.0], label: None };
        assert!(matches!(Garca::train(vec![c], 2, Config::default()), Err(LogDiagError::Data(_))));
    }
}
