//! The graph convolutional network of AFETM's diagnosis (sec. III.C.2, Fig. 3).
//!
//! Three graph-convolution layers, each eq. 9 with a root weight: H' = ReLU(Â H W + H R + b),
//! with eq. 10's Â = D^-1/2 (A + I) D^-1/2 over the graph's edges taken both ways. The root
//! term R (GraphConv's, Morris et al. 2019) is ours: the input is a window's call graph, where
//! a helper such as `zmalloc` is one node shared by every caller, and eq. 9 alone averages a
//! function's own features with all its neighbours' at every layer (its own weight is 1/deg):
//! on the synthetic task of `tests/gcn.rs` (which of six functions calls one function more,
//! callees drawn from a shared pool) eq. 9 alone stays at chance (loss ln 7 after 60 epochs) and
//! with R it learns. On a tree every calling context is a node of its own and eq. 9 sufficed.
//! Â is never a dense N x N matrix: [`propagate`] gathers each edge's source row (`index_select`), scales it by Â's
//! entry and adds it into its destination (`index_add`), so a batch of many trees (one disjoint
//! union, see [`crate::graph::Batch`]) costs time and memory linear in its nodes and edges.
//! The layers' input is the function's learned embedding next to the dense node features; the
//! readout is each graph's mean and max over its nodes, followed by a two-layer head whose
//! output is the class logits (softmax over `normal` and every (function, fault kind)).
//!
//! Written here rather than taken from a crate: no maintained GNN crate on candle exists, and
//! the layer is a few lines over candle's gather/scatter ops.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::{DiagnosisError, graph::Batch, graph::DENSE};

/// Graph convolution layers (the paper's three).
pub const LAYERS: usize = 3;

/// The network's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dims {
    /// Embedding rows (vocabulary + the unknown row).
    pub vocab: usize,
    /// Embedding width.
    pub embed: usize,
    /// Width of every hidden layer.
    pub hidden: usize,
    /// Classes (`normal` first).
    pub classes: usize,
}

/// Â H (eq. 10) for `h` `[N, d]`, given Â's entries as (`src`, `dst`, `norm`): row `dst[e]` of
/// the result sums `norm[e] * h[src[e]]`.
pub fn propagate(h: &Tensor, src: &Tensor, dst: &Tensor, norm: &Tensor) -> candle_core::Result<Tensor> {
    let messages = h.index_select(src, 0)?.broadcast_mul(norm)?;
    h.zeros_like()?.index_add(dst, &messages, 0)
}

/// One dense layer's parameters (`x @ weight + bias`; PyTorch's `Linear` stores the transpose).
/// Shared with the log-based models (`afetm-logdiag`).
#[derive(Debug)]
pub struct Dense {
    /// `[fan_in, fan_out]`.
    pub weight: Var,
    /// `[fan_out]`.
    pub bias: Var,
}

impl Dense {
    /// Glorot-uniform weights from `rng`, zero bias.
    pub fn new(rng: &mut StdRng, fan_in: usize, fan_out: usize, device: &Device) -> Result<Dense, DiagnosisError> {
        // Glorot uniform.
        let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
        let w: Vec<f32> = (0..fan_in * fan_out).map(|_| rng.random_range(-bound..bound)).collect();
        Ok(Dense {
            weight: Var::from_tensor(&Tensor::from_vec(w, (fan_in, fan_out), device)?)?,
            bias: Var::from_tensor(&Tensor::zeros(fan_out, DType::F32, device)?)?,
        })
    }

    /// `x @ weight + bias` for `x` `[N, fan_in]`.
    pub fn linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight)?.broadcast_add(&self.bias)
    }

    /// Eq. 9 for one layer with the root weight `root` (see the module docs):
    /// ReLU(Â (x W) + x R + b).
    fn convolve(&self, x: &Tensor, root: &Tensor, b: &Batch) -> candle_core::Result<Tensor> {
        let neighbours = propagate(&x.matmul(&self.weight)?, &b.src, &b.dst, &b.norm)?;
        (neighbours + x.matmul(root)?)?.broadcast_add(&self.bias)?.relu()
    }
}

/// The tensor `name` of `tensors`, if it is f32 of `shape`.
fn checked<'t>(
    tensors: &'t HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<&'t Tensor, DiagnosisError> {
    let t = tensors.get(name).ok_or_else(|| DiagnosisError::Weights(format!("no tensor {name:?}")))?;
    if t.dims() != shape || t.dtype() != DType::F32 {
        return Err(DiagnosisError::Weights(format!(
            "tensor {name:?} is {:?} {:?}, the manifest's model needs {shape:?} f32",
            t.dtype(),
            t.dims(),
        )));
    }
    Ok(t)
}

/// The network and its parameters.
#[derive(Debug)]
pub struct Gcn {
    dims: Dims,
    embed: Var,
    layers: Vec<Dense>,
    /// R of each layer, `[fan_in, hidden]`.
    roots: Vec<Var>,
    head: [Dense; 2],
}

impl Gcn {
    /// A freshly initialized network; the same `seed` gives the same weights.
    pub fn new(dims: Dims, seed: u64, device: &Device) -> Result<Gcn, DiagnosisError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let e: Vec<f32> = (0..dims.vocab * dims.embed).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let embed = Var::from_tensor(&Tensor::from_vec(e, (dims.vocab, dims.embed), device)?)?;
        let mut layers = Vec::with_capacity(LAYERS);
        let mut roots = Vec::with_capacity(LAYERS);
        let mut width = dims.embed + DENSE;
        for _ in 0..LAYERS {
            layers.push(Dense::new(&mut rng, width, dims.hidden, device)?);
            roots.push(Dense::new(&mut rng, width, dims.hidden, device)?.weight);
            width = dims.hidden;
        }
        let head = [
            Dense::new(&mut rng, 2 * dims.hidden, dims.hidden, device)?,
            Dense::new(&mut rng, dims.hidden, dims.classes, device)?,
        ];
        Ok(Gcn { dims, embed, layers, roots, head })
    }

    /// The sizes.
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Class logits `[G, classes]` of a batch of `G` graphs.
    pub fn forward(&self, b: &Batch) -> candle_core::Result<Tensor> {
        let mut h = Tensor::cat(&[&self.embed.index_select(&b.rows, 0)?, &b.dense], 1)?;
        for (layer, root) in self.layers.iter().zip(&self.roots) {
            h = layer.convolve(&h, root.as_tensor(), b)?;
        }
        // Readout: mean and max per graph. h >= 0 after ReLU, so a zero pad row never wins a max.
        let d = self.dims.hidden;
        let sum = Tensor::zeros((b.graphs, d), DType::F32, h.device())?.index_add(&b.graph_of, &h, 0)?;
        let mean = sum.broadcast_mul(&b.inv_len)?;
        let with_pad = Tensor::cat(&[&h, &Tensor::zeros((1, d), DType::F32, h.device())?], 0)?;
        let max = with_pad.index_select(&b.padded, 0)?.reshape((b.graphs, b.max_len, d))?.max(1)?;
        let r = Tensor::cat(&[&mean, &max], 1)?;
        self.head[1].linear(&self.head[0].linear(&r)?.relu()?)
    }

    /// Every trainable variable (for the optimizer).
    pub fn vars(&self) -> Vec<Var> {
        self.named().into_iter().map(|(_, v)| v.clone()).collect()
    }

    fn named(&self) -> Vec<(String, &Var)> {
        let mut out = vec![("embed".to_string(), &self.embed)];
        let dense = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("gcn.{i}"), l))
            .chain(self.head.iter().enumerate().map(|(i, l)| (format!("head.{i}"), l)));
        for (name, l) in dense {
            out.push((format!("{name}.weight"), &l.weight));
            out.push((format!("{name}.bias"), &l.bias));
        }
        for (i, r) in self.roots.iter().enumerate() {
            out.push((format!("gcn.{i}.root"), r));
        }
        out
    }

    /// The parameters by name, for safetensors.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.named().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
    }

    /// The parameters' names and shapes for `dims`, in [`Gcn::named`] order, computed without
    /// allocating them; `None` when a width overflows.
    fn shapes(dims: Dims) -> Option<Vec<(String, Vec<usize>)>> {
        let mut out = vec![("embed".to_string(), vec![dims.vocab, dims.embed])];
        let mut width = dims.embed.checked_add(DENSE)?;
        let mut dense = Vec::new();
        for i in 0..LAYERS {
            dense.push((format!("gcn.{i}"), width, dims.hidden));
            width = dims.hidden;
        }
        dense.push(("head.0".into(), dims.hidden.checked_mul(2)?, dims.hidden));
        dense.push(("head.1".into(), dims.hidden, dims.classes));
        let roots: Vec<(String, Vec<usize>)> = dense
            .iter()
            .take(LAYERS)
            .enumerate()
            .map(|(i, (_, fan_in, fan_out))| (format!("gcn.{i}.root"), vec![*fan_in, *fan_out]))
            .collect();
        for (name, fan_in, fan_out) in dense {
            out.push((format!("{name}.weight"), vec![fan_in, fan_out]));
            out.push((format!("{name}.bias"), vec![fan_out]));
        }
        out.extend(roots);
        Some(out)
    }

    /// The network for `dims` with the parameters `tensors` (by name). Every shape is checked
    /// against `dims` before anything is allocated, so a model file cannot make the loader
    /// allocate what its weights file does not hold.
    pub fn from_tensors(dims: Dims, tensors: &HashMap<String, Tensor>) -> Result<Gcn, DiagnosisError> {
        let shapes = Gcn::shapes(dims).ok_or_else(|| DiagnosisError::Weights(format!("dims {dims:?} overflow")))?;
        let mut vars = Vec::with_capacity(shapes.len());
        for (name, shape) in shapes {
            vars.push(Var::from_tensor(checked(tensors, &name, &shape)?)?);
        }
        let mut vars = vars.into_iter();
        let mut next = || vars.next().ok_or_else(|| DiagnosisError::Weights("parameter count".into()));
        let embed = next()?;
        let mut dense = Vec::with_capacity(LAYERS + 2);
        for _ in 0..LAYERS + 2 {
            dense.push(Dense { weight: next()?, bias: next()? });
        }
        let head1 = dense.pop().ok_or_else(|| DiagnosisError::Weights("head".into()))?;
        let head0 = dense.pop().ok_or_else(|| DiagnosisError::Weights("head".into()))?;
        let roots = (0..LAYERS).map(|_| next()).collect::<Result<Vec<_>, _>>()?;
        Ok(Gcn { dims, embed, layers: dense, roots, head: [head0, head1] })
    }

    /// Overwrites the parameters with `tensors` (by name), checking every shape.
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), DiagnosisError> {
        for (name, var) in self.named() {
            var.set(checked(tensors, &name, var.dims())?)?;
        }
        Ok(())
    }
}
