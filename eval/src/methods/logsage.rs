//! LogSage without an LLM (`afetm_logdiag::logsage`) as an evaluation method: FILE extracts
//! each run's fault-indicating lines, GARCA classifies the run over a graph of the training
//! runs, in the GCN's classes (`normal` and every (function, fault kind)).
//!
//! A case's vectors, both centred on the training cases' mean so that what every run shares
//! (the access log's ordinary lines, the functions every request calls) does not make every
//! pair of cases similar: the mean embedding of its FILE lines' templates, and the share of
//! its AFCTs' nodes per function, hashed into [`TREE_DIM`] buckets.
//!
//! With `label_share`, the graph is trained by active learning: a tenth of the share labelled
//! at random, the rest asked in four rounds, most uncertain first, the FDDB's truth standing
//! in for the engineer. Without it, every training run is labelled (the campaign's labels
//! cost nothing).

use afetm_diagnosis::Class;
use afetm_logdiag::logsage::{
    file::{self, extract},
    garca::{self, Garca, active_learning},
};
use afetm_logdiag::model::view;
use afetm_logs::{Embedder, Templates, line::lines_of};

use super::chimera::TOP_LINES;
use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
};

/// Width of a case's tree vector.
pub const TREE_DIM: usize = 64;

/// Templates and embedder, fitted on the training runs.
struct LogView {
    templates: Templates,
    embedder: Embedder,
}

/// See the module docs.
pub struct LogSage {
    name: String,
    view: LogView,
    classes: Vec<Class>,
    mean: garca::Case,
    model: Garca,
    labels: usize,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn centred(mean: &garca::Case, mut c: garca::Case) -> garca::Case {
    c.logs.iter_mut().zip(&mean.logs).for_each(|(a, m)| *a -= m);
    c.trees.iter_mut().zip(&mean.trees).for_each(|(a, m)| *a -= m);
    c
}

fn tree_vector(case: &Case) -> Vec<f32> {
    let mut v = vec![0f32; TREE_DIM];
    let mut n = 0f32;
    for t in case.windows.iter().filter_map(|w| w.afct.as_ref()) {
        for node in &t.nodes {
            v[(fnv(&node.function) % TREE_DIM as u64) as usize] += 1.0;
            n += 1.0;
        }
    }
    v.iter_mut().for_each(|x| *x /= n.max(1.0));
    v
}

impl LogSage {
    fn vectors(view: &LogView, case: &Case) -> (garca::Case, Vec<String>) {
        let lines = lines_of(&case.logs);
        let region = extract(&lines, &view.templates, &view.embedder, file::Config::default());
        let mut logs = vec![0f32; view.embedder.dim];
        for &i in &region {
            let id = view.templates.learn(&lines[i].message);
            let e = view.embedder.embed(&view.templates.text(id).unwrap_or_default());
            logs.iter_mut().zip(e).for_each(|(a, b)| *a += b / region.len() as f32);
        }
        let shown = region.iter().take(TOP_LINES).map(|&i| lines[i].raw.clone()).collect();
        (garca::Case { logs, trees: tree_vector(case), label: None }, shown)
    }

    /// Builds the graph over the training runs and trains GARCA (see the module docs).
    pub fn fit(train: &[Case], label_share: Option<f64>) -> Result<LogSage, EvalError> {
        let (templates, embedder, _) = view(train.iter().map(|c| c.logs.as_slice()));
        let view = LogView { templates, embedder };
        let mut classes = vec![Class::Normal];
        for c in train {
            if !classes.contains(&c.truth) {
                classes.push(c.truth.clone());
            }
        }
        let raw: Vec<garca::Case> = train.iter().map(|c| Self::vectors(&view, c).0).collect();
        let n = raw.len().max(1) as f32;
        let avg = |f: &dyn Fn(&garca::Case) -> &Vec<f32>| -> Vec<f32> {
            let w = raw.first().map(|c| f(c).len()).unwrap_or(0);
            (0..w).map(|i| raw.iter().map(|c| f(c)[i]).sum::<f32>() / n).collect()
        };
        let mean = garca::Case { logs: avg(&|c| &c.logs), trees: avg(&|c| &c.trees), label: None };
        let truth: Vec<usize> = train.iter().map(|c| classes.iter().position(|k| *k == c.truth).unwrap_or(0)).collect();
        let cases: Vec<garca::Case> = raw.into_iter().map(|c| centred(&mean, c)).collect();
        let err = |e: afetm_logdiag::LogDiagError| EvalError::Input(format!("LogSage: {e}"));
        let cfg = garca::Config::default();
        let (model, labels, name) = match label_share {
            None => {
                let labelled =
                    cases.into_iter().zip(&truth).map(|(c, t)| garca::Case { label: Some(*t), ..c }).collect();
                (Garca::train(labelled, classes.len(), cfg).map_err(err)?, truth.len(), "LogSage (logs + AFCTs)".into())
            }
            Some(share) => {
                let budget = ((share * truth.len() as f64).round() as usize).max(2);
                let initial = (budget / 10).max(1);
                let per_round = (budget - initial).div_ceil(4);
                let (m, used) =
                    active_learning(cases, classes.len(), cfg, (initial, 4, per_round), &mut |i| Some(truth[i]))
                        .map_err(err)?;
                (m, used, format!("LogSage (active, {:.0}% labels)", share * 100.0))
            }
        };
        Ok(LogSage { name, view, classes, mean, model, labels })
    }

    /// Class probabilities of a case, by class.
    pub fn probabilities(&self, case: &Case) -> Result<Vec<(Class, f32)>, EvalError> {
        let (c, _) = Self::vectors(&self.view, case);
        let p = self.model.classify(&centred(&self.mean, c)).map_err(|e| EvalError::Input(format!("LogSage: {e}")))?;
        Ok(self.classes.iter().cloned().zip(p).collect())
    }

    /// Labels the graph was trained with, and its edges.
    pub fn notes(&self) -> String {
        format!("{} labels, {} classes, {} edges", self.labels, self.classes.len(), self.model.edge_count())
    }
}

impl Method for LogSage {
    fn name(&self) -> &str {
        &self.name
    }

    fn input(&self) -> Input {
        Input::Logs
    }

    fn window(&self, _: &Window) -> Result<Option<Verdict>, EvalError> {
        Ok(None)
    }

    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        let t = std::time::Instant::now();
        let (c, lines) = Self::vectors(&self.view, case);
        let p = self.model.classify(&centred(&self.mean, c)).map_err(|e| EvalError::Input(format!("LogSage: {e}")))?;
        let mut ranked: Vec<usize> = (1..self.classes.len()).collect();
        ranked.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
        let top = ranked
            .into_iter()
            .take(5)
            .filter_map(|i| match &self.classes[i] {
                Class::Fault { function, kind } => Some(Suspect { function: function.clone(), kind: Some(*kind) }),
                Class::Normal => None,
            })
            .collect();
        let mut v = Verdict::new(p[0] < 0.5, f64::from(p[0]), top);
        v.lines = lines;
        v.compute_us = t.elapsed().as_micros() as u64;
        Ok(vec![v])
    }
}
