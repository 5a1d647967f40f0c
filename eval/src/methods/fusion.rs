//! One verdict from AFETM's GCN and the log models (`afetm_report::fusion`): "in error" from
//! the GCN's and Chimera's probabilities, the causes from the GCN's and LogSage's class
//! probabilities, both combined by weights learnt on the GCN's validation runs (listed in its
//! manifest). Chimera and LogSage are trained here on the other training runs, so that every
//! output the fusion learns from is out of sample.

use std::collections::{HashMap, HashSet};

use afetm_diagnosis::{Class, Model};
use afetm_report::fusion::{Fusion, Sample};

use super::{afetm::TOP_K, chimera::ChimeraMethod, logsage::LogSage};
use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
};

/// See the module docs.
pub struct Fused {
    model: Model,
    chimera: ChimeraMethod,
    logsage: LogSage,
    fusion: Fusion,
}

struct Outputs {
    /// GCN class probabilities of the run's worst window (`None`: no AFCT).
    gcn: Option<Vec<f32>>,
    logs: Option<(f32, Vec<String>)>,
    case: HashMap<Class, f32>,
}

impl Fused {
    /// Fits Chimera and LogSage on the training runs the GCN trained on, and the fusion on its
    /// validation runs.
    pub fn fit(train: &[Case], model: Model) -> Result<Fused, EvalError> {
        let val: HashSet<i64> = model.manifest.training.val_run_ids.iter().copied().collect();
        if val.is_empty() {
            return Err(EvalError::Input(
                "the GCN's manifest lists no validation runs (trained before they were recorded): retrain it".into(),
            ));
        }
        let (rest, held): (Vec<Case>, Vec<Case>) = train.iter().cloned().partition(|c| !val.contains(&c.run));
        let chimera = ChimeraMethod::fit(&rest)?;
        let logsage = LogSage::fit(&rest, None)?;
        let mut me = Fused { model, chimera, logsage, fusion: Fusion::default() };
        let mut samples = Vec::new();
        let mut ranked = Vec::new();
        for c in &held {
            let o = me.outputs(c)?;
            let Some(g) = &o.gcn else { continue };
            samples.push(Sample {
                p_gcn: f64::from(1.0 - g[0]),
                p_logs: o.logs.as_ref().map(|l| f64::from(l.0)),
                error: c.truth != Class::Normal,
            });
            let classes = &me.model.manifest.classes;
            if let Some(t) = classes.iter().position(|k| *k == c.truth).filter(|_| c.truth != Class::Normal) {
                let gp: Vec<f64> = g.iter().map(|p| f64::from(*p)).collect();
                let cp: Vec<f64> = classes.iter().map(|k| f64::from(o.case.get(k).copied().unwrap_or(0.0))).collect();
                ranked.push((gp, cp, t));
            }
        }
        me.fusion = Fusion::fit(&samples).map_err(|e| EvalError::Input(e.to_string()))?;
        me.fusion.fit_lambda(&ranked);
        Ok(me)
    }

    /// The fitted fusion (what `afetm-analyzer serve --fusion` reads).
    pub fn fusion(&self) -> &Fusion {
        &self.fusion
    }

    /// The weights learnt, for the report's notes.
    pub fn notes(&self) -> String {
        let w = self.fusion.w;
        format!(
            "fitted on {} validation runs: bias {:.2}, GCN {:.2}, logs {:.2}, lambda {:.1}",
            self.fusion.samples, w[0], w[1], w[2], self.fusion.lambda
        )
    }

    fn outputs(&self, case: &Case) -> Result<Outputs, EvalError> {
        let mut gcn: Option<Vec<f32>> = None;
        for graph in case.windows.iter().filter_map(|w| w.graph.as_ref()) {
            let g = self.model.input(graph)?;
            let p = self.model.probabilities(&[&g])?.remove(0);
            if gcn.as_ref().is_none_or(|b| p[0] < b[0]) {
                gcn = Some(p);
            }
        }
        let logs = self.chimera.score(case)?;
        let case = self.logsage.probabilities(case)?.into_iter().collect();
        Ok(Outputs { gcn, logs, case })
    }
}

impl Method for Fused {
    fn name(&self) -> &str {
        "Fusion (GCN + Chimera + LogSage)"
    }

    fn input(&self) -> Input {
        Input::Afct
    }

    fn window(&self, _: &Window) -> Result<Option<Verdict>, EvalError> {
        Ok(None)
    }

    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        let t = std::time::Instant::now();
        let o = self.outputs(case)?;
        let Some(g) = o.gcn else { return Ok(vec![]) };
        let p = self.fusion.p_error(f64::from(1.0 - g[0]), o.logs.as_ref().map(|l| f64::from(l.0)));
        let classes = &self.model.manifest.classes;
        let mut order: Vec<(usize, f64)> = (1..classes.len())
            .map(|i| (i, self.fusion.cause(f64::from(g[i]), o.case.get(&classes[i]).map(|x| f64::from(*x)))))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top = order
            .into_iter()
            .take(TOP_K)
            .filter_map(|(i, _)| match &classes[i] {
                Class::Fault { function, kind } => Some(Suspect { function: function.clone(), kind: Some(*kind) }),
                Class::Normal => None,
            })
            .collect();
        let mut v = Verdict::new(p >= 0.5, 1.0 - p, top);
        v.lines = o.logs.map(|l| l.1).unwrap_or_default();
        v.compute_us = t.elapsed().as_micros() as u64;
        Ok(vec![v])
    }
}
