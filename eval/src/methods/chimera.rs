//! Chimera (`afetm_logdiag::model::LogModel`) as an evaluation method: one log window per run
//! (a campaign run is a few seconds; its logs are what the servers wrote during it), labelled
//! anomalous for a fault run and normal otherwise, as the issue defines the labels. It names
//! lines, not functions: its FLR is zero by construction, its HR@k is the figure to read.
//!
//! Templates are mined by Drain on the training runs and frozen: an evaluation line no
//! template matches is an unknown event (`afetm_logs::sequence::Sequence::frozen`). The
//! embedder's IDF is fitted on the training runs only.

use afetm_diagnosis::Class;
use afetm_logdiag::{
    chimera::Config,
    model::{LogModel, Window as LogWindow},
};

use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Verdict},
};

/// Lines reported per window.
pub const TOP_LINES: usize = 3;

/// See the module docs.
pub struct ChimeraMethod {
    model: LogModel,
}

fn err(e: afetm_logdiag::LogDiagError) -> EvalError {
    EvalError::Input(format!("Chimera: {e}"))
}

impl ChimeraMethod {
    /// Trains on the training runs' logs.
    pub fn fit(train: &[Case]) -> Result<ChimeraMethod, EvalError> {
        let windows: Vec<LogWindow> = train
            .iter()
            .map(|c| LogWindow { logs: c.logs.clone(), anomalous: c.truth != Class::Normal, lines: vec![] })
            .collect();
        Ok(ChimeraMethod { model: LogModel::fit(&windows, Config::default()).map_err(err)? })
    }

    /// P(anomalous) of a run and its top lines; `None` without logs.
    pub fn score(&self, case: &Case) -> Result<Option<(f32, Vec<String>)>, EvalError> {
        let out = self.model.score(&case.logs).map_err(err)?;
        Ok(out.map(|o| (o.p_anomaly, o.lines.into_iter().take(TOP_LINES).map(|l| l.0).collect())))
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
        let Some((p, lines)) = self.score(case)? else { return Ok(vec![]) };
        let mut v = Verdict::new(p > 0.5, f64::from(1.0 - p), vec![]);
        v.lines = lines;
        v.compute_us = t.elapsed().as_micros() as u64;
        Ok(vec![v])
    }
}
