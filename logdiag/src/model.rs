//! Chimera with what it reads logs through: the Drain templates and the embedder, fitted
//! together on windows of logs and kept in one directory (`chimera.json`,
//! `chimera.safetensors`, `templates.bin`, `embedder.json`). The evaluation and the daemon
//! both use it, so a window's logs become the same features in both.

use std::path::Path;

use afetm_logs::{Embedder, Sequence, Templates, embed::DIM, line::lines_of};

use crate::{
    LogDiagError,
    chimera::{Chimera, Config, Sample},
};

/// A window of logs to learn from.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Its lines as (file, text).
    pub logs: Vec<(String, String)>,
    /// Anomalous or not.
    pub anomalous: bool,
    /// Engineers' verdicts on its lines: (the line as written, is a root cause).
    pub lines: Vec<(String, bool)>,
}

/// Chimera's verdict on a window.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// P(anomalous).
    pub p_anomaly: f32,
    /// Each event's first line and its localizer score, best first, as the localizer ranks
    /// them. (Breaking near-ties, within 0.01, by severity was tried on the eval-role runs:
    /// HR@1 over redis, nginx and httpd rose from 7 to 14 of 42 runs with a root-cause line,
    /// HR@3 fell from 28 to 18; the localizer's own order was kept.)
    pub lines: Vec<(String, f32)>,
}

/// See the module docs.
pub struct LogModel {
    /// Drain's templates, mined from the training windows and frozen after.
    pub templates: Templates,
    /// The embedder.
    pub embedder: Embedder,
    /// The network.
    pub net: Chimera,
}

fn io(path: &Path, e: impl std::fmt::Display) -> LogDiagError {
    LogDiagError::Model { path: path.display().to_string(), message: e.to_string() }
}

impl LogModel {
    /// Mines the windows' templates, fits the embedder's IDF on them (one document per window:
    /// its distinct templates) and trains Chimera; verdicts on lines become line labels on the
    /// events that hold them.
    pub fn fit(windows: &[Window], config: Config) -> Result<LogModel, LogDiagError> {
        let (templates, embedder, seqs) = view(windows.iter().map(|w| w.logs.as_slice()));
        let samples: Vec<Sample> = seqs
            .iter()
            .zip(windows)
            .map(|(s, w)| Sample {
                features: s.features(&embedder),
                anomalous: w.anomalous,
                lines: line_labels(s, w, &templates),
            })
            .collect();
        let net = Chimera::train(&samples, Sequence::width(&embedder), config)?;
        Ok(LogModel { templates, embedder, net })
    }

    /// A window's sequence of events, against the templates frozen at training (a line no
    /// template matches is an unknown event; nothing is learned while scoring).
    pub fn sequence(&self, logs: &[(String, String)]) -> Sequence {
        Sequence::frozen(&lines_of(logs), &self.templates)
    }

    /// Chimera's verdict on a window's logs; `None` when it has none.
    pub fn score(&self, logs: &[(String, String)]) -> Result<Option<Scored>, LogDiagError> {
        let seq = self.sequence(logs);
        let Some(out) = self.net.diagnose(&seq.features(&self.embedder))? else { return Ok(None) };
        let lines =
            out.top(seq.events.len()).into_iter().map(|i| (seq.events[i].example.clone(), out.scores[i])).collect();
        Ok(Some(Scored { p_anomaly: out.p_anomaly, lines }))
    }

    /// Writes the model into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<(), LogDiagError> {
        self.net.save(dir)?;
        self.templates.save_to(&dir.join("templates.bin")).map_err(|e| io(dir, e))?;
        let e = dir.join("embedder.json");
        std::fs::write(&e, serde_json::to_string(&self.embedder).map_err(|x| io(&e, x))?).map_err(|x| io(&e, x))
    }

    /// Reads what [`LogModel::save`] wrote.
    pub fn load(dir: &Path) -> Result<LogModel, LogDiagError> {
        let net = Chimera::load(dir)?;
        let templates = Templates::open(&dir.join("templates.bin")).map_err(|e| io(dir, e))?;
        if templates.is_empty() {
            return Err(io(dir, "templates.bin is missing or empty"));
        }
        let e = dir.join("embedder.json");
        let text = std::fs::read_to_string(&e).map_err(|x| io(&e, x))?;
        let embedder: Embedder = serde_json::from_str(&text).map_err(|x| io(&e, x))?;
        if Sequence::width(&embedder) != net.width() {
            return Err(io(
                dir,
                format!(
                    "the embedder gives {} features, the network takes {}",
                    Sequence::width(&embedder),
                    net.width()
                ),
            ));
        }
        Ok(LogModel { templates, embedder, net })
    }
}

/// Mines the templates of windows of logs and fits the embedder's IDF on them (one document
/// per window: its distinct templates); returns both and each window's sequence.
pub fn view<'a>(windows: impl IntoIterator<Item = &'a [(String, String)]>) -> (Templates, Embedder, Vec<Sequence>) {
    let templates = Templates::new();
    let seqs: Vec<Sequence> = windows.into_iter().map(|w| Sequence::build(&lines_of(w), &templates)).collect();
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
    (templates, embedder, seqs)
}

/// The events of `s` that hold a line judged in `w`.
fn line_labels(s: &Sequence, w: &Window, templates: &Templates) -> Vec<(usize, bool)> {
    let mut out = Vec::new();
    for (line, root) in &w.lines {
        let parsed = lines_of(&w.logs).into_iter().find(|l| l.raw.trim() == line.trim());
        let Some(l) = parsed else { continue };
        let t = templates.lookup(&l.message);
        if let Some(i) = s.events.iter().position(|e| Some(e.template) == t && e.source == l.source) {
            out.push((i, *root));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(anomalous: bool, i: usize) -> Window {
        let mut access = String::new();
        for s in 0..8 {
            access.push_str(&format!(
                "127.0.0.1 [29/Nov/2026:01:25:{s:02} +0000] \"GET /shop.php?op=find&id={i} HTTP/1.1\" 200 53 1\n"
            ));
        }
        let mut logs = vec![("nginx-access.log".to_string(), access)];
        if anomalous {
            logs.push((
                "php-error.log".into(),
                format!("[29-Nov-2026 01:25:0{} UTC] shop: Connection refused\n", i % 8),
            ));
        }
        Window { logs, anomalous, lines: vec![] }
    }

    #[test]
    fn learns_from_real_log_text_and_survives_a_restart() {
        let windows: Vec<Window> = (0..30).map(|i| window(i % 2 == 1, i)).collect();
        let m = LogModel::fit(&windows, Config { epochs: 60, ..Config::default() }).unwrap();
        let bad = m.score(&window(true, 99).logs).unwrap().unwrap();
        let good = m.score(&window(false, 98).logs).unwrap().unwrap();
        assert!(bad.p_anomaly > 0.5 && good.p_anomaly < 0.5, "{} {}", bad.p_anomaly, good.p_anomaly);
        assert!(bad.lines[0].0.contains("Connection refused"), "{:?}", bad.lines);
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let back = LogModel::load(dir.path()).unwrap();
        assert_eq!(back.score(&window(true, 99).logs).unwrap(), Some(bad));
        assert!(m.score(&[]).unwrap().is_none());
        // Deterministic: the same windows and seed give the same model.
        let again = LogModel::fit(&windows, Config { epochs: 60, ..Config::default() }).unwrap();
        assert_eq!(again.score(&window(true, 99).logs).unwrap(), back.score(&window(true, 99).logs).unwrap());
        assert!(LogModel::load(&dir.path().join("nothing")).is_err());
    }
}
