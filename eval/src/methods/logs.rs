//! The idealized log-based method (sec. IV.B): a run is detected when an error-level log line
//! appears in it, and its fault is then assumed located (FLR = EDR). Its FLD is the distance
//! from the target's logging function to the injected function.
//!
//! Error level, per log source: redis lines at warning level (`#`), nginx and Apache error-log
//! lines at `error` or worse, every line of the PHP app's error log (the app logs only
//! failures there). Access logs and the campaign's own notes are not logs of the target. A
//! line whose template (digits masked) also appears in the training normal runs is not an
//! error (redis logs its start-up at warning level in every run).

use std::collections::HashSet;

use afetm_diagnosis::Class;

use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
};

/// The function a target logs its errors with (the paper names redis' `serverLog`).
pub fn logging_function(target: &str) -> &'static str {
    match target {
        "redis" => "serverLog",
        "nginx" => "ngx_log_error_core",
        "httpd" => "ap_log_error_",
        _ => "sqlite3_log",
    }
}

/// Whether a line of `source` is at error level (see the module docs).
pub fn is_error_line(source: &str, line: &str) -> bool {
    if source.starts_with("redis") && source.ends_with(".log") && !source.contains("stdout") {
        // "pid:role dd Mon yyyy hh:mm:ss.mmm # message": '#' is LL_WARNING.
        return line.split_whitespace().nth(5) == Some("#");
    }
    if source.starts_with("php") {
        return !line.trim().is_empty();
    }
    if source.contains("error") {
        const LEVELS: [&str; 4] = ["error]", "crit]", "alert]", "emerg]"];
        return LEVELS.iter().any(|l| line.contains(&format!("[{l}")) || line.contains(&format!(":{l}")));
    }
    false
}

/// A line with its digits masked (timestamps, pids, ports, ids).
pub fn template(line: &str) -> String {
    afetm_logs::line::mask_digits(line)
}

fn error_lines(case: &Case) -> impl Iterator<Item = &str> + '_ {
    case.logs.iter().flat_map(|(source, text)| text.lines().filter(move |l| is_error_line(source, l)))
}

fn error_templates(case: &Case) -> impl Iterator<Item = String> + '_ {
    error_lines(case).map(template)
}

/// See the module docs.
pub struct LogIdealized {
    normal: HashSet<String>,
    logger: String,
}

impl LogIdealized {
    /// Learns the error-level templates of the training normal runs.
    pub fn fit(train: &[Case], target: &str) -> LogIdealized {
        let normal = train.iter().filter(|c| c.truth == Class::Normal).flat_map(error_templates).collect();
        LogIdealized { normal, logger: logging_function(target).to_string() }
    }

    /// The case's root-cause line (see [`Case::root_line`]): its first error-level line, in
    /// time order, whose template no training normal run logged.
    pub fn root_line(&self, case: &Case) -> Option<String> {
        let lines = afetm_logs::line::lines_of(&case.logs);
        lines
            .into_iter()
            .find(|l| is_error_line(&l.file, &l.raw) && !self.normal.contains(&template(&l.raw)))
            .map(|l| l.raw)
    }
}

impl Method for LogIdealized {
    fn name(&self) -> &str {
        "Log-based (idealized)"
    }

    fn input(&self) -> Input {
        Input::Logs
    }

    fn window(&self, _: &Window) -> Result<Option<Verdict>, EvalError> {
        Ok(None)
    }

    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        let new = error_templates(case).filter(|t| !self.normal.contains(t)).count();
        let top = vec![Suspect { function: self.logger.clone(), kind: None }];
        Ok(vec![Verdict { assumed_located: true, ..Verdict::new(new > 0, -(new as f64), top) }])
    }
}
