//! Chimera (000_840ce5b93fcf49d3.txt, sec. III): anomaly detection and root-cause line
//! localization over a window's log-event sequence, trained end to end from window labels.
//!
//! * Three GRU encoders (eqs 3-4, written as the paper states them: `z_t = σ(W_z [H_{t-1},
//!   e_t])`, `r_t = σ(W_r [H_{t-1}, e_t])`, `H~_t = tanh(W [r_t * H_{t-1}, e_t])`, `H_t = (1 -
//!   z_t) * H_{t-1} + z_t * H~_t`): private ones for the detector and the localizer, a shared
//!   one (eq. 1); the tasks' features are `V^d = V_p^d + V_s`, `V^l = V_p^l + V_s` (eq. 2).
//! * Disentanglement (eq. 5): `||V_p^d V_s^T||² + ||V_p^l V_s^T||²`, divided by the number of
//!   (event, event) pairs so it does not grow with the window.
//! * Detector: attention `α_t ∝ exp(tanh(w · H^d_t))` over the window's events (the paper's
//!   tanh score, normalized so that it is a distribution for eq. 8), the weighted sum, a
//!   logistic output; cross-entropy weighted so that both classes count equally.
//! * Localizer (eq. 7): a score `L(H^l_t) ∈ (0, 1)` per event and the multi-instance ranking
//!   loss `max(0, 1 + max L(normal window) - max L(anomalous window))` over every (anomalous,
//!   normal) pair of the batch.
//! * Alignment (eqs 8-9): the Jensen-Shannon divergence between the detector's attention and
//!   the localizer's scores normalized over the window. Applied to anomalous windows only:
//!   a normal window has no root cause for the two to agree on.
//! * Eq. 10: the weighted sum, λ = [`Config::lambda`].
//! * Feedback: an engineer's verdict on a line (root cause or not) adds a cross-entropy term on
//!   that event's localizer score ([`Config::feedback_weight`]); a verdict on a window
//!   replaces its label. The paper's interactive loop learns from the same two signals.
//!
//! A window with no log line has no sequence and gets no verdict.

use std::{collections::HashMap, path::Path};

use afetm_diagnosis::gcn::Dense;
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::LogDiagError;

/// Training settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Width of every encoder's hidden state.
    pub hidden: usize,
    /// Passes over the training windows (full batch).
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed of the initial weights.
    pub seed: u64,
    /// λ1..λ4 of eq. 10: detector, localizer, disentanglement, alignment.
    pub lambda: [f64; 4],
    /// Weight of the engineers' line verdicts.
    pub feedback_weight: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { hidden: 32, epochs: 120, lr: 0.01, seed: 2026, lambda: [1.0, 1.0, 0.1, 0.1], feedback_weight: 1.0 }
    }
}

/// One training window.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Its events' features (`afetm_logs::Sequence::features`), in time order.
    pub features: Vec<Vec<f32>>,
    /// Anomalous (a fault run from the injection on), or an engineer's verdict on it.
    pub anomalous: bool,
    /// Engineers' verdicts on events: (event index, is a root cause).
    pub lines: Vec<(usize, bool)>,
}

/// Chimera's output for one window.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// P(anomalous).
    pub p_anomaly: f32,
    /// Each event's localizer score `L(H^l_t)`, in the window's order.
    pub scores: Vec<f32>,
    /// The detector's attention over the events.
    pub attention: Vec<f32>,
}

impl Output {
    /// The `k` events most likely to be the root cause, best first.
    pub fn top(&self, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.scores.len()).collect();
        idx.sort_by(|a, b| self.scores[*b].total_cmp(&self.scores[*a]).then(a.cmp(b)));
        idx.truncate(k);
        idx
    }
}

/// A GRU encoder of eqs 3-4.
#[derive(Debug)]
struct Gru {
    z: Dense,
    r: Dense,
    h: Dense,
    hidden: usize,
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl Gru {
    fn new(rng: &mut StdRng, width: usize, hidden: usize, device: &Device) -> Result<Gru, LogDiagError> {
        let n = width + hidden;
        Ok(Gru {
            z: Dense::new(rng, n, hidden, device)?,
            r: Dense::new(rng, n, hidden, device)?,
            h: Dense::new(rng, n, hidden, device)?,
            hidden,
        })
    }

    /// `x` `[B, T, F]`, `mask` `[B, T, 1]` (1 on events, 0 on padding): `[B, T, H]`. Padding
    /// leaves the state as it was.
    fn run(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let mut h = Tensor::zeros((b, self.hidden), DType::F32, x.device())?;
        let mut out = Vec::with_capacity(t);
        for i in 0..t {
            let e = x.narrow(1, i, 1)?.squeeze(1)?;
            let m = mask.narrow(1, i, 1)?.squeeze(1)?;
            let he = Tensor::cat(&[&h, &e], 1)?;
            let z = sigmoid(&self.z.linear(&he)?)?;
            let r = sigmoid(&self.r.linear(&he)?)?;
            let cand = self.h.linear(&Tensor::cat(&[&(&r * &h)?, &e], 1)?)?.tanh()?;
            let new = (&h + (z * (cand - &h)?)?)?;
            h = (&h + m.broadcast_mul(&(new - &h)?)?)?;
            out.push(h.clone());
        }
        Tensor::stack(&out, 1)
    }

    fn named<'a>(&'a self, p: &str, out: &mut Vec<(String, &'a Var)>) {
        for (n, d) in [("z", &self.z), ("r", &self.r), ("h", &self.h)] {
            out.push((format!("{p}.{n}.weight"), &d.weight));
            out.push((format!("{p}.{n}.bias"), &d.bias));
        }
    }
}

/// What a forward pass gives, batched.
struct Forward {
    /// Detector logits `[B]`.
    logit: Tensor,
    /// Attention `[B, T]` (0 on padding).
    attention: Tensor,
    /// Localizer logits `[B, T]`.
    loc: Tensor,
    /// Eq. 5 over the batch.
    disentangle: Tensor,
}

/// A padded batch.
struct Batch {
    x: Tensor,
    mask: Tensor,
    lens: Vec<usize>,
}

impl Batch {
    fn new(seqs: &[&[Vec<f32>]], width: usize, device: &Device) -> Result<Batch, LogDiagError> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut x = vec![0f32; seqs.len() * t * width];
        let mut mask = vec![0f32; seqs.len() * t];
        for (b, s) in seqs.iter().enumerate() {
            for (i, f) in s.iter().enumerate() {
                if f.len() != width {
                    return Err(LogDiagError::Data(format!("an event has {} features, the model {width}", f.len())));
                }
                x[(b * t + i) * width..(b * t + i + 1) * width].copy_from_slice(f);
                mask[b * t + i] = 1.0;
            }
        }
        Ok(Batch {
            x: Tensor::from_vec(x, (seqs.len(), t, width), device)?,
            mask: Tensor::from_vec(mask, (seqs.len(), t, 1), device)?,
            lens: seqs.iter().map(|s| s.len()).collect(),
        })
    }
}

/// The network.
#[derive(Debug)]
pub struct Chimera {
    width: usize,
    config: Config,
    detector: Gru,
    localizer: Gru,
    shared: Gru,
    attention: Dense,
    out: Dense,
    loc: [Dense; 2],
}

/// Softmax over the events of each row of `s` `[B, T]`, zero on padding (`mask` `[B, T]`).
fn masked_softmax(s: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let max = s.max_keepdim(1)?;
    let e = s.broadcast_sub(&max)?.exp()?.mul(mask)?;
    let sum = (e.sum_keepdim(1)? + 1e-12)?;
    e.broadcast_div(&sum)
}

impl Chimera {
    /// A fresh network for events of `width` features.
    pub fn new(width: usize, config: Config) -> Result<Chimera, LogDiagError> {
        let device = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let h = config.hidden;
        Ok(Chimera {
            width,
            detector: Gru::new(&mut rng, width, h, &device)?,
            localizer: Gru::new(&mut rng, width, h, &device)?,
            shared: Gru::new(&mut rng, width, h, &device)?,
            attention: Dense::new(&mut rng, h, 1, &device)?,
            out: Dense::new(&mut rng, h, 1, &device)?,
            loc: [Dense::new(&mut rng, h, h, &device)?, Dense::new(&mut rng, h, 1, &device)?],
            config,
        })
    }

    /// Width of an event's features.
    pub fn width(&self) -> usize {
        self.width
    }

    fn forward(&self, b: &Batch) -> candle_core::Result<Forward> {
        let (bs, t, _) = b.x.dims3()?;
        let h = self.config.hidden;
        let pd = self.detector.run(&b.x, &b.mask)?;
        let pl = self.localizer.run(&b.x, &b.mask)?;
        let vs = self.shared.run(&b.x, &b.mask)?;
        // Eq. 5, masked (padding repeats the last state; it must not count).
        let pairs = b.lens.iter().map(|l| (l * l) as f64).sum::<f64>().max(1.0);
        let orth = |p: &Tensor| -> candle_core::Result<Tensor> {
            let pm = p.broadcast_mul(&b.mask)?;
            let sm = vs.broadcast_mul(&b.mask)?;
            pm.matmul(&sm.transpose(1, 2)?.contiguous()?)?.sqr()?.sum_all()
        };
        let disentangle = ((orth(&pd)? + orth(&pl)?)? / pairs)?;
        // Eq. 2.
        let vd = (&pd + &vs)?;
        let vl = (&pl + &vs)?;
        let mask2 = b.mask.squeeze(2)?;
        let flat = |v: &Tensor| v.reshape((bs * t, h));
        let score = self.attention.linear(&flat(&vd)?)?.tanh()?.reshape((bs, t))?;
        let attention = masked_softmax(&score, &mask2)?;
        let rep = vd.broadcast_mul(&attention.unsqueeze(2)?)?.sum(1)?;
        let logit = self.out.linear(&rep)?.squeeze(1)?;
        let loc = self.loc[1].linear(&self.loc[0].linear(&flat(&vl)?)?.relu()?)?.reshape((bs, t))?;
        Ok(Forward { logit, attention, loc, disentangle })
    }

    fn vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        self.detector.named("enc_detector", &mut out);
        self.localizer.named("enc_localizer", &mut out);
        self.shared.named("enc_shared", &mut out);
        for (n, d) in
            [("attention", &self.attention), ("out", &self.out), ("loc0", &self.loc[0]), ("loc1", &self.loc[1])]
        {
            out.push((format!("{n}.weight"), &d.weight));
            out.push((format!("{n}.bias"), &d.bias));
        }
        out
    }

    /// Trains a fresh network on `samples` (empty windows are skipped). Needs at least one
    /// normal and one anomalous window.
    pub fn train(samples: &[Sample], width: usize, config: Config) -> Result<Chimera, LogDiagError> {
        let used: Vec<&Sample> = samples.iter().filter(|s| !s.features.is_empty()).collect();
        let pos = used.iter().filter(|s| s.anomalous).count();
        let neg = used.len() - pos;
        if pos == 0 || neg == 0 {
            return Err(LogDiagError::Data(format!(
                "Chimera needs normal and anomalous windows with logs; got {neg} normal and {pos} anomalous"
            )));
        }
        let net = Chimera::new(width, config)?;
        let device = Device::Cpu;
        let seqs: Vec<&[Vec<f32>]> = used.iter().map(|s| s.features.as_slice()).collect();
        let batch = Batch::new(&seqs, width, &device)?;
        let t = batch.x.dims3()?.1;
        let terms = Terms::new(&used, t, pos, neg, &device)?;
        let vars: Vec<Var> = net.vars().into_iter().map(|(_, v)| v.clone()).collect();
        let mut opt = AdamW::new(vars, ParamsAdamW { lr: net.config.lr, weight_decay: 1e-4, ..Default::default() })?;
        for epoch in 0..net.config.epochs {
            let f = net.forward(&batch)?;
            let loss = terms.loss(&f, &batch, &net.config)?;
            opt.backward_step(&loss)?;
            if epoch % 20 == 0 {
                tracing::debug!(epoch, loss = loss.to_scalar::<f32>()?, "chimera");
            }
        }
        Ok(net)
    }

    /// The verdict on one window (`None` for a window without events).
    pub fn diagnose(&self, features: &[Vec<f32>]) -> Result<Option<Output>, LogDiagError> {
        if features.is_empty() {
            return Ok(None);
        }
        let b = Batch::new(&[features], self.width, &Device::Cpu)?;
        let f = self.forward(&b)?;
        let p = sigmoid(&f.logit)?.to_vec1::<f32>()?[0];
        let scores = sigmoid(&f.loc)?.squeeze(0)?.to_vec1::<f32>()?;
        let attention = f.attention.squeeze(0)?.to_vec1::<f32>()?;
        Ok(Some(Output { p_anomaly: p, scores, attention }))
    }

    /// Writes the weights (safetensors) and `chimera.json` (width and config) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), LogDiagError> {
        let err = |p: &Path, e: &dyn std::fmt::Display| LogDiagError::Model {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
        let tensors: HashMap<String, Tensor> =
            self.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let w = dir.join("chimera.safetensors");
        candle_core::safetensors::save(&tensors, &w).map_err(|e| err(&w, &e))?;
        let m = dir.join("chimera.json");
        let manifest = serde_json::json!({ "width": self.width, "config": self.config });
        std::fs::write(&m, manifest.to_string()).map_err(|e| err(&m, &e))
    }

    /// Reads what [`Chimera::save`] wrote, checking every tensor's shape.
    pub fn load(dir: &Path) -> Result<Chimera, LogDiagError> {
        let err = |p: &Path, e: &dyn std::fmt::Display| LogDiagError::Model {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        let m = dir.join("chimera.json");
        let text = std::fs::read_to_string(&m).map_err(|e| err(&m, &e))?;
        #[derive(Deserialize)]
        struct Manifest {
            width: usize,
            config: Config,
        }
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| err(&m, &e))?;
        let net = Chimera::new(manifest.width, manifest.config)?;
        let w = dir.join("chimera.safetensors");
        let tensors = candle_core::safetensors::load(&w, &Device::Cpu).map_err(|e| err(&w, &e))?;
        for (name, var) in net.vars() {
            let t = tensors.get(&name).ok_or_else(|| err(&w, &format!("no tensor {name:?}")))?;
            if t.dims() != var.dims() {
                return Err(err(&w, &format!("tensor {name:?} is {:?}, the model needs {:?}", t.dims(), var.dims())));
            }
            var.set(t)?;
        }
        Ok(net)
    }
}

/// The constant parts of eq. 10's terms for one training batch.
struct Terms {
    /// Window labels `[B]`.
    y: Tensor,
    /// Per-window detector weights `[B]` (classes balanced).
    w: Tensor,
    anomalous: Tensor,
    normal: Tensor,
    /// Alignment weight per window (1 / #anomalous on anomalous windows).
    align: Tensor,
    /// Feedback: flat (window * T + event) indices and labels.
    fb: Option<(Tensor, Tensor)>,
}

impl Terms {
    fn new(used: &[&Sample], t: usize, pos: usize, neg: usize, device: &Device) -> Result<Terms, LogDiagError> {
        let n = used.len() as f32;
        let y: Vec<f32> = used.iter().map(|s| s.anomalous as u8 as f32).collect();
        let w: Vec<f32> =
            y.iter().map(|&y| if y > 0.5 { n / (2.0 * pos as f32) } else { n / (2.0 * neg as f32) }).collect();
        let idx = |want: bool| -> Vec<u32> {
            (0..used.len() as u32).filter(|&i| used[i as usize].anomalous == want).collect()
        };
        let align: Vec<f32> = y.iter().map(|&y| y / pos as f32).collect();
        let mut fi = Vec::new();
        let mut fl = Vec::new();
        for (b, s) in used.iter().enumerate() {
            for &(e, root) in s.lines.iter().filter(|(e, _)| *e < s.features.len()) {
                fi.push((b * t + e) as u32);
                fl.push(root as u8 as f32);
            }
        }
        let fb = if fi.is_empty() {
            None
        } else {
            let len = fi.len();
            Some((Tensor::from_vec(fi, len, device)?, Tensor::from_vec(fl, len, device)?))
        };
        let (a, nm) = (idx(true), idx(false));
        Ok(Terms {
            y: Tensor::from_vec(y, used.len(), device)?,
            w: Tensor::from_vec(w, used.len(), device)?,
            anomalous: Tensor::from_vec(a.clone(), a.len(), device)?,
            normal: Tensor::from_vec(nm.clone(), nm.len(), device)?,
            align: Tensor::from_vec(align, used.len(), device)?,
            fb,
        })
    }

    fn loss(&self, f: &Forward, b: &Batch, c: &Config) -> candle_core::Result<Tensor> {
        let mask = b.mask.squeeze(2)?;
        // Detector: weighted binary cross-entropy on logits.
        let detector = (bce(&f.logit, &self.y)? * &self.w)?.mean_all()?;
        // Eq. 7 over every (anomalous, normal) pair; padding pushed below any score.
        let l = (sigmoid(&f.loc)? + ((&mask - 1.0)? * 2.0)?)?;
        let top = l.max(1)?;
        let ma = top.index_select(&self.anomalous, 0)?.unsqueeze(1)?;
        let mn = top.index_select(&self.normal, 0)?.unsqueeze(0)?;
        let localizer = (mn.broadcast_sub(&ma)? + 1.0)?.relu()?.mean_all()?;
        // Eqs 8-9 on anomalous windows.
        let r = masked_softmax(&f.loc, &mask)?;
        let js = js(&f.attention, &r, &mask)?;
        let align = (js * &self.align)?.sum_all()?;
        let mut total = ((detector * c.lambda[0])? + (localizer * c.lambda[1])?)?;
        total = ((total + (f.disentangle.clone() * c.lambda[2])?)? + (align * c.lambda[3])?)?;
        if let Some((i, y)) = &self.fb {
            let picked = f.loc.flatten_all()?.index_select(i, 0)?;
            total = (total + (bce(&picked, y)?.mean_all()? * c.feedback_weight)?)?;
        }
        Ok(total)
    }
}

/// Binary cross-entropy of logits `x` against `y` (elementwise, stable).
fn bce(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let softplus = ((x.abs()?.neg()?.exp()? + 1.0)?.log()? + x.relu()?)?;
    softplus - (y * x)?
}

/// Eq. 8 per row of `a`, `r` `[B, T]` (distributions over the events of each row).
fn js(a: &Tensor, r: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = ((a + r)? * 0.5)?;
    let kl = |p: &Tensor| -> candle_core::Result<Tensor> {
        let ratio = ((p + 1e-8)?.log()? - (&m + 1e-8)?.log()?)?;
        (p * ratio)?.mul(mask)?.sum(D::Minus1)
    };
    (kl(a)? + kl(r)?)? * 0.5
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    use super::*;

    const W: usize = 12;

    fn unit(rng: &mut StdRng) -> Vec<f32> {
        let v: Vec<f32> = (0..W).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    /// Windows of 6-14 events drawn from 8 ordinary events; an anomalous one has one planted
    /// error event at a random place. Returns the samples and where the error was planted.
    fn windows(rng: &mut StdRng, vocab: &[Vec<f32>], error: &[f32], n: usize) -> Vec<(Sample, Option<usize>)> {
        (0..n)
            .map(|i| {
                let len = rng.random_range(6..15);
                let mut features: Vec<Vec<f32>> =
                    (0..len).map(|_| vocab[rng.random_range(0..vocab.len())].clone()).collect();
                let planted = (i % 2 == 1).then(|| rng.random_range(0..len));
                if let Some(p) = planted {
                    features[p] = error.to_vec();
                }
                (Sample { features, anomalous: planted.is_some(), lines: Vec::new() }, planted)
            })
            .collect()
    }

    #[test]
    fn learns_to_detect_and_ranks_the_planted_line_first() {
        let mut rng = StdRng::seed_from_u64(7);
        let vocab: Vec<Vec<f32>> = (0..8).map(|_| unit(&mut rng)).collect();
        let error = unit(&mut rng);
        let train: Vec<Sample> = windows(&mut rng, &vocab, &error, 60).into_iter().map(|(s, _)| s).collect();
        let net = Chimera::train(&train, W, Config { epochs: 80, ..Config::default() }).unwrap();
        let test = windows(&mut rng, &vocab, &error, 40);
        let (mut right, mut located, mut anomalous) = (0, 0, 0);
        for (s, planted) in &test {
            let out = net.diagnose(&s.features).unwrap().unwrap();
            right += ((out.p_anomaly > 0.5) == s.anomalous) as usize;
            if let Some(p) = planted {
                anomalous += 1;
                located += (out.top(1) == [*p]) as usize;
            }
        }
        assert!(right >= 36, "detection accuracy {right}/40, want >= 90%");
        assert!(located * 10 >= anomalous * 9, "planted line ranked first in {located}/{anomalous}, want >= 90%");
        // Saved and loaded, it gives the same answers.
        let dir = tempfile::tempdir().unwrap();
        net.save(dir.path()).unwrap();
        let back = Chimera::load(dir.path()).unwrap();
        let a = net.diagnose(&test[1].0.features).unwrap().unwrap();
        let b = back.diagnose(&test[1].0.features).unwrap().unwrap();
        assert_eq!(a, b);
        assert!(net.diagnose(&[]).unwrap().is_none());
    }

    #[test]
    fn refuses_one_class_and_bad_widths() {
        let s = Sample { features: vec![vec![0.0; W]], anomalous: true, lines: vec![] };
        assert!(matches!(Chimera::train(&[s.clone()], W, Config::default()), Err(LogDiagError::Data(_))));
        let net = Chimera::new(W, Config::default()).unwrap();
        assert!(matches!(net.diagnose(&[vec![0.0; W + 1]]), Err(LogDiagError::Data(_))));
    }

    #[test]
    fn feedback_on_a_line_moves_its_score() {
        // Anomalous windows hold two events no normal window has; window labels alone cannot
        // tell which is the root cause. An engineer's verdict on the lines decides it, either way.
        let mut rng = StdRng::seed_from_u64(3);
        let (x, c, y) = (unit(&mut rng), unit(&mut rng), unit(&mut rng));
        let train = |root: usize| {
            let samples: Vec<Sample> = (0..20)
                .map(|i| {
                    let anomalous = i % 2 == 0;
                    let features = if anomalous { vec![x.clone(), c.clone(), y.clone()] } else { vec![y.clone(); 3] };
                    let lines = if anomalous { vec![(root, true), (1 - root, false)] } else { vec![] };
                    Sample { features, anomalous, lines }
                })
                .collect();
            let net = Chimera::train(&samples, W, Config { epochs: 60, ..Config::default() }).unwrap();
            net.diagnose(&samples[0].features).unwrap().unwrap()
        };
        for root in [0, 1] {
            let out = train(root);
            assert_eq!(out.top(1), [root], "scores {:?}", out.scores);
        }
    }
}
