//! LogSage without an LLM (`afetm_logdiag::logsage`) as an evaluation method: FILE extracts
//! each run's fault-indicating lines, GARCA classifies the run over a graph of the training
//! runs, in the GCN's classes (`normal` and every (function, fault kind)).
//!
//! A run is a case as `afetm_logdiag::logsage::cases` builds it: its logs' FILE region and its
//! AFCTs under the plan, centred on the training runs' mean.
//!
//! With `label_share`, the graph is trained by active learning: a tenth of the share labelled
//! at random, the rest asked in four rounds, most uncertain first, the FDDB's truth standing
//! in for the engineer. Without it, every training run is labelled (the campaign's labels
//! cost nothing).

use afetm_diagnosis::Class;
use afetm_logdiag::logsage::{
    cases::CaseBuilder,
    garca::{self, Garca, active_learning},
};

use super::chimera::TOP_LINES;
use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
};

/// See the module docs.
pub struct LogSage {
    name: String,
    cases: CaseBuilder,
    classes: Vec<Class>,
    model: Garca,
    labels: usize,
}

fn raw(b: &CaseBuilder, c: &Case) -> (garca::Case, Vec<String>) {
    b.raw(&c.logs, c.windows.iter().filter_map(|w| w.afct.as_ref()), TOP_LINES)
}

impl LogSage {
    /// Builds the graph over the training runs and trains GARCA (see the module docs).
    pub fn fit(train: &[Case], label_share: Option<f64>) -> Result<LogSage, EvalError> {
        let mut builder = CaseBuilder::fit(train.iter().map(|c| c.logs.as_slice()));
        let mut classes = vec![Class::Normal];
        for c in train {
            if !classes.contains(&c.truth) {
                classes.push(c.truth.clone());
            }
        }
        let raws: Vec<garca::Case> = train.iter().map(|c| raw(&builder, c).0).collect();
        builder.centre_on(&raws);
        let cases: Vec<garca::Case> = raws.into_iter().map(|c| builder.centred(c)).collect();
        let truth: Vec<usize> = train.iter().map(|c| classes.iter().position(|k| *k == c.truth).unwrap_or(0)).collect();
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
        Ok(LogSage { name, cases: builder, classes, model, labels })
    }

    /// Class probabilities of a case, by class.
    pub fn probabilities(&self, case: &Case) -> Result<Vec<(Class, f32)>, EvalError> {
        let (c, _) = raw(&self.cases, case);
        let p = self.model.classify(&self.cases.centred(c)).map_err(|e| EvalError::Input(format!("LogSage: {e}")))?;
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
        let (c, lines) = raw(&self.cases, case);
        let p = self.model.classify(&self.cases.centred(c)).map_err(|e| EvalError::Input(format!("LogSage: {e}")))?;
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
