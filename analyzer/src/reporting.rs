//! Reports in the daemon (`Query.Report`, `afetm-analyzer report --window ID`): a window's
//! evidence from the store (its stored GCN diagnosis, the worst thread's AFCT, the log lines
//! its agent tailed during it, and for a process's last window those of the 5 s after the exit,
//! [`AFTER_EXIT_NS`]), the log model's verdict on those lines (`serve --log-model`),
//! similar historical cases from the FDDB (`serve --fddb`), the fusion (`serve --fusion`) and
//! the SOP library (`serve --sop-dir`, else the built-in one), put together by
//! `afetm_report::report::build`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use afetm_fddb::Fddb;
use afetm_logdiag::model::LogModel;
use afetm_proto as pb;
use afetm_report::{
    Evidence, Report,
    fusion::Fusion,
    report::{Gcn, build},
    similar,
    sop::Library,
};

use crate::store::{Store, StoreError};

/// How long after a process's last window its agent's lines still count as the exit's
/// aftermath in that window's report: the callers' errors (PHP's refused connections, nginx's
/// 502s) come once the server is gone, within a request timeout or two.
pub const AFTER_EXIT_NS: u64 = 5_000_000_000;

/// What can go wrong building a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportingError {
    /// The window is unknown or still open.
    #[error("{0}")]
    NoWindow(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log model refused.
    #[error("log model: {0}")]
    Logs(#[from] afetm_logdiag::LogDiagError),
    /// The SOP library, the fusion file or the FDDB refused.
    #[error(transparent)]
    Report(#[from] afetm_report::ReportError),
    /// A file.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The daemon's report builder and what it draws on.
pub struct Reporter {
    logs: Option<LogModel>,
    fusion: Fusion,
    fddb: Option<PathBuf>,
    sop: Library,
}

impl Default for Reporter {
    /// The GCN alone, no log model, no FDDB, the built-in SOP library.
    fn default() -> Reporter {
        let sop = Library::built_in().unwrap_or_else(|e| {
            // The built-in files are constants checked by afetm-report's tests.
            tracing::error!(error = %e, "built-in SOP library unreadable: reports come without resolution steps");
            Library::empty()
        });
        Reporter { logs: None, fusion: Fusion::default(), fddb: None, sop }
    }
}

/// A window's log lines grouped by file, in the order they were read.
pub fn by_file(lines: &[pb::LogRecord]) -> Vec<(String, String)> {
    let mut files: BTreeMap<&str, String> = BTreeMap::new();
    for l in lines {
        let text = files.entry(l.file.as_str()).or_default();
        text.push_str(&l.text);
        text.push('\n');
    }
    files.into_iter().map(|(f, t)| (f.to_string(), t)).collect()
}

impl Reporter {
    /// Loads what the flags name (each optional).
    pub fn new(
        log_model: Option<&Path>,
        fusion: Option<&Path>,
        fddb: Option<PathBuf>,
        sop_dir: Option<&Path>,
    ) -> Result<Reporter, ReportingError> {
        let logs = log_model.map(LogModel::load).transpose()?;
        let fusion = match fusion {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ReportingError::File { path: p.display().to_string(), message: e.to_string() })?;
                serde_json::from_str(&text)
                    .map_err(|e| ReportingError::File { path: p.display().to_string(), message: e.to_string() })?
            }
            None => Fusion::default(),
        };
        if let Some(f) = &fddb {
            Fddb::open(f)
                .map_err(|e| ReportingError::File { path: f.display().to_string(), message: e.to_string() })?;
        }
        let sop = match sop_dir {
            Some(d) => Library::load_dir(d)?,
            None => Library::built_in()?,
        };
        Ok(Reporter { logs, fusion, fddb, sop })
    }

    /// A window's evidence from the store, and the target its diagnosis was made for. Reads
    /// the store only (call it under the store's lock, then [`Reporter::report`] without).
    pub fn evidence(
        store: &Store,
        window_id: u64,
        threshold: impl Fn(&str) -> Option<f64>,
    ) -> Result<(Evidence, Option<String>), ReportingError> {
        let w = store
            .window_trees(window_id as i64)?
            .ok_or_else(|| ReportingError::NoWindow(format!("window {window_id} does not exist or is still open")))?;
        let req = pb::ListDiagnosesRequest { window_id, ..Default::default() };
        let d = store.list_diagnoses(&req)?.into_iter().next();
        let afct = d.as_ref().and_then(|d| w.trees.iter().find(|(t, _)| *t == d.tid)).map(|(_, t)| t.clone());
        let fates = afetm_diagnosis::fate::from_proto(&w.fates);
        let gcn = d.as_ref().map(|d| Gcn {
            tid: d.tid,
            p_normal: f64::from(d.p_normal),
            threshold: threshold(&d.model).unwrap_or(f64::NAN),
            error: d.error,
            top: d.top.iter().map(|s| (s.function.clone(), s.kind.clone(), f64::from(s.probability))).collect(),
            by_fate: d.p_normal == 0.0 && fates.iter().any(|f| f.tid == d.tid && f.fault_kind().is_some()),
        });
        let logs = by_file(&store.window_logs(window_id)?);
        let exited = store.ends_exited_process(window_id)?;
        let after_exit = if exited { by_file(&store.logs_after_window(window_id, AFTER_EXIT_NS)?) } else { Vec::new() };
        let e = Evidence {
            window_id,
            agent: w.agent_id,
            pid: w.pid,
            start_ns: w.start_ns,
            end_ns: w.end_ns,
            gcn,
            afct,
            logs,
            exited,
            after_exit,
            fates: fates.iter().map(describe_fate).collect(),
            ..Evidence::default()
        };
        Ok((e, d.map(|d| d.model)))
    }

    /// Completes the evidence (log model, historical cases) and builds the report.
    pub fn report(&self, mut e: Evidence, target: Option<&str>, similar_k: usize) -> Result<Report, ReportingError> {
        if let Some(m) = &self.logs
            && let Some(s) = m.score(&e.logs)?
        {
            e.p_logs = Some(f64::from(s.p_anomaly));
            e.flagged = s.lines.into_iter().take(5).map(|(l, p)| (l, f64::from(p))).collect();
        }
        if let (Some(f), Some(t), Some(g)) = (&self.fddb, target, &e.gcn) {
            let fddb = Fddb::open(f)
                .map_err(|x| ReportingError::File { path: f.display().to_string(), message: x.to_string() })?;
            let causes: Vec<(String, String)> = g.top.iter().map(|(f, k, _)| (f.clone(), k.clone())).collect();
            e.similar = similar::find(&fddb, t, &causes, &e.logs, similar_k)?;
        }
        Ok(build(&e, &self.fusion, &self.sop))
    }
}

/// One line for a thread's fate in a report's symptoms.
fn describe_fate(f: &afetm_diagnosis::fate::ThreadFate) -> String {
    use afetm_diagnosis::fate::Fate;
    let what = match f.fate {
        Fate::Exited { status } => format!("exited with status {status}"),
        Fate::Killed { signal } => format!("was killed by {}", signal_name(signal)),
        Fate::Stopped { signal } => format!("was stopped by {}", signal_name(signal)),
        Fate::Silent => "went silent (calls in the window before, none in this one, its process alive)".into(),
    };
    let at = match f.stack.is_empty() {
        true => String::new(),
        false => format!(" in {}", f.stack.join(" ← ")),
    };
    match f.last_calls.is_empty() {
        true => format!("thread {} {what}{at}", f.tid),
        false => format!("thread {} {what}{at}; its last traced calls: {}", f.tid, f.last_calls.join(" → ")),
    }
}

/// `SIGSEGV (11)` and the like.
fn signal_name(signal: i32) -> String {
    const NAMES: [(i32, &str); 14] = [
        (1, "SIGHUP"),
        (2, "SIGINT"),
        (3, "SIGQUIT"),
        (4, "SIGILL"),
        (5, "SIGTRAP"),
        (6, "SIGABRT"),
        (7, "SIGBUS"),
        (8, "SIGFPE"),
        (9, "SIGKILL"),
        (11, "SIGSEGV"),
        (15, "SIGTERM"),
        (19, "SIGSTOP"),
        (20, "SIGTSTP"),
        (31, "SIGSYS"),
    ];
    match NAMES.iter().find(|(n, _)| *n == signal) {
        Some((_, name)) => format!("{name} ({signal})"),
        None => format!("signal {signal}"),
    }
}

/// A report on the wire.
pub fn to_proto(r: &Report) -> pb::WindowReport {
    pb::WindowReport {
        window_id: r.window_id,
        agent_id: r.agent.clone(),
        pid: r.pid,
        error: r.error,
        p_error: r.p_error,
        title: r.title.clone(),
        symptoms: r.symptoms.clone(),
        process: r.process.clone(),
        causes: r
            .causes
            .iter()
            .map(|c| pb::ReportCause {
                function: c.function.clone(),
                kind: c.kind.clone(),
                confidence: c.confidence,
                evidence: c.evidence.clone(),
            })
            .collect(),
        similar: r
            .similar
            .iter()
            .map(|s| pb::ReportCase {
                run: s.run,
                function: s.function.clone(),
                fault: s.fault.clone(),
                manifestation: s.manifestation.clone(),
                similarity: s.similarity,
                line: s.line.clone().unwrap_or_default(),
            })
            .collect(),
        checks: r.checks.clone(),
        resolution: r.resolution.clone(),
        sop: r.sop.clone(),
        markdown: r.markdown(),
    }
}
