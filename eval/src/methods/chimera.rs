//! Chimera (`afetm_logdiag::chimera`) as an evaluation method: one log window per run (a
//! campaign run is a few seconds; its logs are what the servers wrote during it), labelled
//! anomalous for a fault run and normal otherwise, as the issue defines the labels. It names
//! lines, not functions: its FLR is zero by construction, its HR@k is the figure to read.
//!
//! Templates are mined by Drain online, on the evaluation runs too (unsupervised, no label);
//! the embedder's IDF is fitted on the training runs only.

use afetm_diagnosis::Class;
use afetm_logdiag::chimera::{Chimera, Config, Sample};
use afetm_logs::{Embedder, Sequence, Templates, embed::DIM, line::lines_of};

use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Verdict},
};

/// Lines reported per window.
pub const TOP_LINES: usize = 3;

/// A run's logs as a sequence, and the embedder fitted on training sequences.
pub struct LogView {
    /// Drain's templates (learning online).
    pub templates: Templates,
    /// The embedder.
    pub embedder: Embedder,
}

impl LogView {
    /// Mines the training runs' templates and fits the embedder's IDF on them (one document
    /// per run: its distinct templates).
    pub fn fit(train: &[Case]) -> (LogView, Vec<Sequence>) {
        let templates = Templates::new();
        let seqs: Vec<Sequence> = train.iter().map(|c| Sequence::build(&lines_of(&c.logs), &templates)).collect();
        let docs: Vec<String> = seqs
            .iter()
            .map(|s| {
                let mut t: Vec<&str> = s.events.iter().map(|e| e.text.as_str()).collect();
                t.sort_unstable();
                t.dedup();
                t.join(" \n ")
            })
            .collect();
        let embedder = Embedder::fit(DIM, docs.iter().map(|d| d.as_str()));
        (LogView { templates, embedder }, seqs)
    }

    /// A case's sequence.
    pub fn sequence(&self, case: &Case) -> Sequence {
        Sequence::build(&lines_of(&case.logs), &self.templates)
    }
}

/// See the module docs.
pub struct ChimeraMethod {
    view: LogView,
    net: Chimera,
}

impl ChimeraMethod {
    /// Trains on the training runs' logs.
    pub fn fit(train: &[Case]) -> Result<ChimeraMethod, EvalError> {
        let (view, seqs) = LogView::fit(train);
        let samples: Vec<Sample> = seqs
            .iter()
            .zip(train)
            .map(|(s, c)| Sample {
                features: s.features(&view.embedder),
                anomalous: c.truth != Class::Normal,
                lines: vec![],
            })
            .collect();
        let width = Sequence::width(&view.embedder);
        let net = Chimera::train(&samples, width, Config::default())
            .map_err(|e| EvalError::Input(format!("Chimera: {e}")))?;
        Ok(ChimeraMethod { view, net })
    }
}

impl ChimeraMethod {
    /// P(anomalous) of a run and its top lines; `None` without logs.
    pub fn score(&self, case: &Case) -> Result<Option<(f32, Vec<String>)>, EvalError> {
        let seq = self.view.sequence(case);
        let out = self
            .net
            .diagnose(&seq.features(&self.view.embedder))
            .map_err(|e| EvalError::Input(format!("Chimera: {e}")))?;
        Ok(out.map(|o| {
            let lines = o.top(TOP_LINES).into_iter().map(|i| seq.events[i].example.clone()).collect();
            (o.p_anomaly, lines)
        }))
    }
}

impl Method for ChimeraMethod {
    fn name(&self) -> &str {
        "Chimera (logs)"
    }

    fn input(&self) -> Input {
        Input::Logs
    }

    fn window(&self, _: &Window) -> Result<Option<Verdict>, EvalError> {
        Ok(None)
    }

    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        let t = std::time::Instant::now();
        let seq = self.view.sequence(case);
        let out = self
            .net
            .diagnose(&seq.features(&self.view.embedder))
            .map_err(|e| EvalError::Input(format!("Chimera: {e}")))?;
        let Some(out) = out else { return Ok(vec![]) };
        let mut v = Verdict::new(out.p_anomaly > 0.5, f64::from(1.0 - out.p_anomaly), vec![]);
        v.lines = out.top(TOP_LINES).into_iter().map(|i| seq.events[i].example.clone()).collect();
        v.compute_us = t.elapsed().as_micros() as u64;
        tracing::debug!(run = case.run, p = out.p_anomaly, lines = ?v.lines, root = ?case.root_line, "Chimera");
        Ok(vec![v])
    }
}
