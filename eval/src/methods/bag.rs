//! The topology-free control: the same classes as AFETM's GCN (`normal` and every (function,
//! fault kind)) from a bag of the AFCT's functions, with no tree structure: softmax regression
//! on the share of the tree's nodes each function holds (plus log(1 + nodes)). If it matches
//! the GCN, the tree structure does not earn its keep on this data.
//!
//! Trained on every training window (labels as for the GCN: a faulty window whose AFCT equals a
//! normal window's is `normal`), inverse-frequency class weights, full-batch AdamW. The alarm
//! threshold follows the GCN's rule (Youden's J of faulty against normal runs' windows), on
//! the training windows themselves (the GCN uses held-out validation runs; fitting in-sample
//! makes the control's threshold optimistic, which the report states).

use std::collections::{HashMap, HashSet};

use afetm_diagnosis::{
    Class,
    train::{threshold, youden_threshold},
};
use afetm_proto as pb;
use candle_core::Var;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::edc::key;
use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
};

/// Training epochs (full batch).
pub const EPOCHS: usize = 300;

/// See the module docs.
pub struct Bag {
    vocab: HashMap<String, usize>,
    classes: Vec<Class>,
    weight: Tensor,
    bias: Tensor,
    threshold: f32,
}

fn features(tree: &pb::Tree, vocab: &HashMap<String, usize>) -> Vec<f32> {
    let mut x = vec![0f32; vocab.len() + 1];
    let n = tree.nodes.len().max(1) as f32;
    for node in &tree.nodes {
        if let Some(i) = vocab.get(&node.function) {
            x[*i] += 1.0 / n;
        }
    }
    x[vocab.len()] = (1.0 + n).ln() / 10.0;
    x
}

impl Bag {
    /// Trains on the training runs' windows.
    pub fn fit(train: &[Case]) -> Result<Bag, EvalError> {
        let mut rows: Vec<(&pb::Tree, Class, bool)> = Vec::new();
        let mut normal_keys = HashSet::new();
        for c in train {
            for w in &c.windows {
                let Some(t) = &w.afct else { continue };
                let class = if w.faulty { c.truth.clone() } else { Class::Normal };
                if class == Class::Normal {
                    normal_keys.insert(key(t));
                }
                rows.push((t, class, c.truth == Class::Normal));
            }
        }
        for r in &mut rows {
            if r.1 != Class::Normal && normal_keys.contains(&key(r.0)) {
                r.1 = Class::Normal;
            }
        }
        if rows.is_empty() {
            return Err(EvalError::Input("topology-free control: no training AFCT".into()));
        }
        let mut vocab = HashMap::new();
        for (t, _, _) in &rows {
            for n in &t.nodes {
                let next = vocab.len();
                vocab.entry(n.function.clone()).or_insert(next);
            }
        }
        let mut classes: Vec<Class> = rows.iter().map(|r| r.1.clone()).collect::<HashSet<_>>().into_iter().collect();
        classes.sort();
        let index: HashMap<&Class, u32> = classes.iter().enumerate().map(|(i, c)| (c, i as u32)).collect();
        let dev = Device::Cpu;
        let dim = vocab.len() + 1;
        let x: Vec<f32> = rows.iter().flat_map(|r| features(r.0, &vocab)).collect();
        let x = Tensor::from_vec(x, (rows.len(), dim), &dev)?;
        let y: Vec<u32> = rows.iter().map(|r| index[&r.1]).collect();
        let mut counts = vec![0f32; classes.len()];
        for c in &y {
            counts[*c as usize] += 1.0;
        }
        let w: Vec<f32> = y.iter().map(|c| rows.len() as f32 / (classes.len() as f32 * counts[*c as usize])).collect();
        let (y, w) = (Tensor::from_vec(y, (rows.len(), 1), &dev)?, Tensor::from_vec(w, rows.len(), &dev)?);
        // Zero start: the problem is convex, so no seed is needed for a reproducible result.
        let weight = Var::zeros((dim, classes.len()), DType::F32, &dev)?;
        let bias = Var::zeros(classes.len(), DType::F32, &dev)?;
        let params = ParamsAdamW { lr: 0.05, weight_decay: 1e-4, ..Default::default() };
        let mut opt = AdamW::new(vec![weight.clone(), bias.clone()], params)?;
        for _ in 0..EPOCHS {
            let logits = x.matmul(weight.as_tensor())?.broadcast_add(bias.as_tensor())?;
            let log_p = candle_nn::ops::log_softmax(&logits, 1)?.gather(&y, 1)?.squeeze(1)?;
            let loss = (log_p.mul(&w)?.sum_all()? / w.sum_all()?.to_scalar::<f32>()? as f64)?.neg()?;
            opt.backward_step(&loss)?;
        }
        let mut bag =
            Bag { vocab, classes, weight: weight.as_tensor().clone(), bias: bias.as_tensor().clone(), threshold: 0.5 };
        let p_normal = |keep: &dyn Fn(&(&pb::Tree, Class, bool)) -> bool| -> Result<Vec<f32>, EvalError> {
            rows.iter().filter(|r| keep(r)).map(|r| bag.probabilities(r.0).map(|p| p.0)).collect()
        };
        let normal = p_normal(&|r| r.2)?;
        let faulty = p_normal(&|r| r.1 != Class::Normal)?;
        bag.threshold = youden_threshold(&normal, &faulty).unwrap_or_else(|| threshold(&normal, 0.01));
        Ok(bag)
    }

    /// (P(normal), every class's probability).
    fn probabilities(&self, tree: &pb::Tree) -> Result<(f32, Vec<f32>), EvalError> {
        let x = Tensor::from_vec(features(tree, &self.vocab), (1, self.vocab.len() + 1), &Device::Cpu)?;
        let logits = x.matmul(&self.weight)?.broadcast_add(&self.bias)?;
        let p: Vec<f32> = candle_nn::ops::softmax(&logits, 1)?.squeeze(0)?.to_vec1()?;
        let normal = self.classes.iter().position(|c| *c == Class::Normal).map_or(0.0, |i| p[i]);
        Ok((normal, p))
    }
}

impl Method for Bag {
    fn name(&self) -> &str {
        "Bag of functions (no topology)"
    }

    fn input(&self) -> Input {
        Input::Afct
    }

    fn window(&self, window: &Window) -> Result<Option<Verdict>, EvalError> {
        let Some(tree) = &window.afct else { return Ok(None) };
        let (normal, p) = self.probabilities(tree)?;
        let mut ranked: Vec<(f32, &Class)> = p.iter().copied().zip(&self.classes).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top = ranked
            .iter()
            .filter_map(|(_, c)| match c {
                Class::Fault { function, kind } => Some(Suspect { function: function.clone(), kind: Some(*kind) }),
                Class::Normal => None,
            })
            .take(super::afetm::TOP_K)
            .collect();
        Ok(Some(Verdict::new(normal < self.threshold, f64::from(normal), top)))
    }
}
