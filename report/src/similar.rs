//! Historical cases like this one, from the FDDB's training runs (the evaluation's held-out
//! runs are never read): OScope's retrieval of similar cases, without embeddings of an LLM.
//!
//! A run's similarity to the window is `0.6 c + 0.4 j`: `c` is 1 when the run's fault is the
//! top cause, 0.5 when it is among the other causes, else 0; `j` is the Jaccard index of the
//! templates (digits masked) of the two sides' warning-or-worse log lines.

use std::collections::BTreeSet;

use afetm_fddb::{Fddb, Role};
use afetm_logs::{
    Level,
    line::{lines_of, mask_digits as mask},
};
use serde::{Deserialize, Serialize};

use crate::ReportError;

/// A historical case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimilarCase {
    /// The FDDB run id.
    pub run: i64,
    /// Its fault's function.
    pub function: String,
    /// Its fault (`crash`, `input:1:3`, ...).
    pub fault: String,
    /// How it manifested (`crash`, `errors`, `hang`, `nothing`).
    pub manifestation: String,
    /// Similarity in [0, 1].
    pub similarity: f64,
    /// Its first warning-or-worse log line, if any.
    pub line: Option<String>,
}

/// The masked messages of the warning-or-worse lines of `(file, text)` logs, and the first
/// such line.
pub fn alarming(logs: &[(String, String)]) -> (BTreeSet<String>, Option<String>) {
    let lines = lines_of(logs);
    let bad: Vec<_> = lines.iter().filter(|l| l.level >= Level::Warning).collect();
    (bad.iter().map(|l| mask(&l.message)).collect(), bad.first().map(|l| l.raw.clone()))
}

fn jaccard(a: &BTreeSet<String>, b: &BTreeSet<String>) -> f64 {
    let union = a.union(b).count();
    if union == 0 { 0.0 } else { a.intersection(b).count() as f64 / union as f64 }
}

/// The `k` training runs of `target` most similar to a window whose causes are `causes`
/// ((function, kind), most likely first) and whose logs are `logs`.
pub fn find(
    fddb: &Fddb,
    target: &str,
    causes: &[(String, String)],
    logs: &[(String, String)],
    k: usize,
) -> Result<Vec<SimilarCase>, ReportError> {
    let (mine, _) = alarming(logs);
    let mut out = Vec::new();
    for r in fddb.valid_runs(target, Role::Train)? {
        let Some((function, kind, fault)) = r.fault else { continue };
        let c = match causes.iter().position(|(f, k)| *f == function && *k == kind) {
            Some(0) => 1.0,
            Some(_) => 0.5,
            None => 0.0,
        };
        let (theirs, line) = alarming(&fddb.run_logs(r.id)?);
        let similarity = 0.6 * c + 0.4 * jaccard(&mine, &theirs);
        if similarity > 0.0 {
            out.push(SimilarCase { run: r.id, function, fault, manifestation: r.manifestation, similarity, line });
        }
    }
    out.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then(a.run.cmp(&b.run)));
    out.truncate(k);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarming_lines_are_masked_and_compared() {
        let a = vec![(
            "php-error.log".to_string(),
            "[29-Nov-2026 01:25:37 UTC] shop: read error on 127.0.0.1:21379\n".to_string(),
        )];
        let b = vec![(
            "php-error.log".to_string(),
            "[30-Nov-2026 02:00:00 UTC] shop: read error on 10.0.0.1:6379\n".to_string(),
        )];
        let (x, first) = alarming(&a);
        let (y, _) = alarming(&b);
        assert_eq!(jaccard(&x, &y), 1.0);
        assert!(first.unwrap().contains("read error"));
        let ok = vec![(
            "nginx-access.log".to_string(),
            "127.0.0.1 [29/Nov/2026:01:24:56 +0000] \"GET / HTTP/1.1\" 200 5\n".to_string(),
        )];
        assert!(alarming(&ok).0.is_empty());
    }
}
