//! The report of one window (OScope's Fig.: failure symptoms, diagnostic process, root causes
//! with confidence, resolution steps), built from the window's evidence:
//! * symptoms: the verdicts, the servers' alarming log lines per file (counts and an example),
//!   non-OK responses, and the lines the log model flagged;
//! * process: the window, the GCN's verdict on its worst thread, the AFCT path from the root to
//!   the top suspect, the log evidence, the fusion, the historical cases;
//! * root causes: the GCN's top-k (function, kind) with their probabilities, and what backs
//!   each (similar historical runs with the same fault);
//! * resolution: the SOP of the top cause's fault kind (checks, then steps).

use std::{collections::BTreeMap, fmt::Write};

use afetm_logs::{Level, line::lines_of};
use afetm_proto as pb;
use serde::{Deserialize, Serialize};

use crate::{fusion::Fusion, similar::SimilarCase, sop::Library};

/// The GCN's diagnosis of a window's worst thread.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gcn {
    /// The thread.
    pub tid: u32,
    /// P(normal).
    pub p_normal: f64,
    /// The model's alarm threshold on P(normal).
    pub threshold: f64,
    /// The model alarmed.
    pub error: bool,
    /// (function, kind, probability), most likely first.
    pub top: Vec<(String, String, f64)>,
    /// The verdict is the thread's fate (killed or stopped by a fault), not the network's:
    /// the suspects are its last traced calls, ranked.
    #[serde(default)]
    pub by_fate: bool,
}

/// Everything known about a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evidence {
    /// The analyzer's window id.
    pub window_id: u64,
    /// The agent.
    pub agent: String,
    /// The process.
    pub pid: u32,
    /// Window start and end, agent clock (ns).
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// The GCN's diagnosis, if a model served.
    pub gcn: Option<Gcn>,
    /// The worst thread's AFCT.
    pub afct: Option<pb::Tree>,
    /// The window's log lines, (file, text).
    pub logs: Vec<(String, String)>,
    /// Lines a log model flagged as the root cause, with its score, best first.
    pub flagged: Vec<(String, f64)>,
    /// The log model's P(anomalous), if it ran.
    pub p_logs: Option<f64>,
    /// Similar historical cases.
    pub similar: Vec<SimilarCase>,
    /// The process exited at the end of this window (its last window; the agent saw the exit).
    pub exited: bool,
    /// Lines read in the seconds after the exit, (file, text): its callers' errors, which come
    /// once the window has closed. Shown as symptoms, not scored by the log model.
    pub after_exit: Vec<(String, String)>,
    /// How threads of the window ended or stopped, one line each (thread, what, last calls).
    pub fates: Vec<String>,
}

/// A root cause.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cause {
    /// The function.
    pub function: String,
    /// The fault kind.
    pub kind: String,
    /// Confidence in [0, 1].
    pub confidence: f64,
    /// What backs it.
    pub evidence: String,
}

/// The report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The window.
    pub window_id: u64,
    /// The agent.
    pub agent: String,
    /// The process.
    pub pid: u32,
    /// The fused verdict.
    pub error: bool,
    /// The fused P(error).
    pub p_error: f64,
    /// One line: what happened.
    pub title: String,
    /// Failure symptoms.
    pub symptoms: Vec<String>,
    /// Diagnostic process, in order.
    pub process: Vec<String>,
    /// Root causes, most likely first.
    pub causes: Vec<Cause>,
    /// Similar historical cases.
    pub similar: Vec<SimilarCase>,
    /// The SOP's checks.
    pub checks: Vec<String>,
    /// The SOP's resolution steps.
    pub resolution: Vec<String>,
    /// The SOP used (fault kind or `unknown`).
    pub sop: String,
    /// Its title.
    pub sop_title: Option<String>,
}

/// Signal handlers and crash reporters that stand in a crash's stack trace above the frame
/// that died.
const HANDLERS: [&str; 6] = [
    "sigsegvHandler",
    "sigtermHandler",
    "watchdogSignalHandler",
    "logStackTrace",
    "bugReportStart",
    "printCrashReport",
];

/// The function names of a crash's stack trace the server logged (redis' `------ STACK TRACE
/// ------` lines, `binary addr(function+0x60)[0x...]`), innermost first, each once, signal
/// handlers and nameless frames (`libc.so.6(+0x3c050)`) left out.
pub fn crash_frames(logs: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in logs.iter().flat_map(|(_, text)| text.lines()) {
        let Some(open) = line.rfind('(') else { continue };
        let rest = &line[open + 1..];
        let Some(plus) = rest.find("+0x") else { continue };
        let name = &rest[..plus];
        let named = !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '.');
        if named && rest[plus..].contains(")[0x") && !HANDLERS.contains(&name) && !out.iter().any(|f| f == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// The confidence given to the function a server's own stack trace says it died in: the
/// crash is where it died unless the fault came in from a caller (a corrupted argument).
pub const STACK_TRACE_CONFIDENCE: f64 = 0.9;

/// The AFCT path from a root to the first node of `function`, as names.
pub fn path_to(tree: &pb::Tree, function: &str) -> Option<Vec<String>> {
    let i = tree.nodes.iter().position(|n| n.function == function)?;
    let mut path = vec![tree.nodes[i].function.clone()];
    let mut at = tree.nodes[i].parent;
    while let Some(n) = usize::try_from(at).ok().and_then(|p| tree.nodes.get(p)) {
        path.push(n.function.clone());
        at = n.parent;
    }
    path.reverse();
    Some(path)
}

fn symptoms(e: &Evidence) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(g) = &e.gcn {
        out.push(format!(
            "call trees: the GCN puts P(normal) at {:.3} on thread {} (it alarms below {:.3})",
            g.p_normal, g.tid, g.threshold
        ));
    }
    if let Some(p) = e.p_logs {
        out.push(format!("logs: the log model puts P(anomalous) at {p:.2}"));
    }
    out.extend(warnings(&e.logs, ""));
    if e.exited {
        out.push(format!("the process (pid {}) exited: this is its last window", e.pid));
        out.extend(warnings(&e.after_exit, "after the exit, "));
    }
    out.extend(e.fates.iter().cloned());
    let frames = crash_frames(&e.logs);
    if !frames.is_empty() {
        let shown: Vec<&str> = frames.iter().take(4).map(String::as_str).collect();
        out.push(format!("the server logged a stack trace at its crash: {} (innermost first)", shown.join(" ← ")));
    }
    for (line, score) in e.flagged.iter().take(3) {
        out.push(format!("flagged by the log model (score {score:.2}): `{}`", line.trim()));
    }
    if out.is_empty() {
        out.push("nothing alarming: no verdict and no warning in the logs".into());
    }
    out
}

/// One line per file and level at warning or worse: how many lines, and the first.
fn warnings(logs: &[(String, String)], prefix: &str) -> Vec<String> {
    let mut per_file: BTreeMap<(String, Level), (usize, String)> = BTreeMap::new();
    for l in lines_of(logs).into_iter().filter(|l| l.level >= Level::Warning) {
        let entry = per_file.entry((l.file.clone(), l.level)).or_insert((0, l.message.clone()));
        entry.0 += 1;
    }
    per_file
        .iter()
        .rev()
        .map(|((file, level), (n, example))| {
            format!("{prefix}{file}: {n} line(s) at {level:?} level, e.g. `{example}`")
        })
        .collect()
}

fn process(e: &Evidence, causes: &[Cause], p_error: f64, fused: bool) -> Vec<String> {
    let lines = lines_of(&e.logs).len();
    let mut out = vec![format!(
        "window {} of agent {} (pid {}), agent clock {:.3} s to {:.3} s, {lines} log line(s)",
        e.window_id,
        e.agent,
        e.pid,
        e.start_ns as f64 / 1e9,
        e.end_ns as f64 / 1e9
    )];
    match (&e.gcn, &e.afct) {
        (Some(g), Some(t)) => out.push(format!(
            "the AFCT of thread {} ({} nodes) goes through the GCN: P(normal) {:.3}, {}",
            g.tid,
            t.nodes.len(),
            g.p_normal,
            if g.error { "alarm" } else { "no alarm" }
        )),
        (Some(g), None) => {
            out.push(format!("the GCN's stored verdict on thread {}: P(normal) {:.3}", g.tid, g.p_normal))
        }
        _ => out.push("no GCN verdict for this window (no model served, or no AFCT)".into()),
    }
    if let Some(top) = causes.first() {
        match e.afct.as_ref().and_then(|t| path_to(t, &top.function)) {
            Some(p) => out.push(format!("AFCT path to the top suspect: {}", p.join(" → "))),
            None => out.push(format!(
                "{} is not a node of the AFCT (not traced under the plan): the GCN infers it from the shape of the tree",
                top.function
            )),
        }
    }
    if !e.flagged.is_empty() {
        out.push(format!(
            "the log model ranked the window's {} event(s); the best are listed as symptoms",
            e.flagged.len()
        ));
    }
    out.push(if fused {
        format!("fusion of the call-tree and log verdicts: P(error) {p_error:.2}")
    } else {
        "no fusion model: an alarm of the GCN or of the log model, or the process's exit, makes the verdict".into()
    });
    if !e.similar.is_empty() {
        let same = e.similar.iter().filter(|s| causes.first().is_some_and(|c| c.function == s.function)).count();
        out.push(format!(
            "{} similar historical case(s) in the FDDB, {same} with the top suspect's function",
            e.similar.len()
        ));
    }
    out
}

/// The GCN's suspects; when the process exited, its crash suspects first (an exit is what a
/// crash looks like from outside, whatever the tree's shape says). A model without a crash
/// class for any suspect (the campaign's crash runs of those functions were not valid) still
/// gets one: a crash of the top suspect's function, at that function's probability. A stack
/// trace the server logged at its crash outranks both: its innermost frame comes first, at
/// [`STACK_TRACE_CONFIDENCE`].
fn causes(e: &Evidence) -> Vec<Cause> {
    let mut out = gcn_causes(e);
    if let Some(f) = crash_frames(&e.logs).first() {
        out.retain(|c| !(c.kind == "crash" && c.evidence.starts_with("the process exited")));
        let evidence = "the server's own stack trace at the crash names it (the fault may have come in from a caller)";
        out.insert(
            0,
            Cause {
                function: f.clone(),
                kind: "crash".into(),
                confidence: STACK_TRACE_CONFIDENCE,
                evidence: evidence.into(),
            },
        );
    }
    out
}

fn gcn_causes(e: &Evidence) -> Vec<Cause> {
    let Some(g) = &e.gcn else { return Vec::new() };
    let mut top: Vec<&(String, String, f64)> = g.top.iter().collect();
    if e.exited {
        top.sort_by_key(|(_, k, _)| k != "crash");
    }
    let backing = |function: &str, kind: &str| -> Vec<String> {
        e.similar
            .iter()
            .filter(|s| s.function == function && s.fault.starts_with(kind.trim_end_matches("+n")))
            .map(|s| format!("run {} ({})", s.run, s.manifestation))
            .collect()
    };
    let mut out: Vec<Cause> = top
        .into_iter()
        .map(|(function, kind, p)| {
            let runs = backing(function, kind);
            let evidence = if g.by_fate {
                format!("the thread's fate (see the symptoms) at one of its last traced calls, most recent first (weight {p:.2})")
            } else if runs.is_empty() {
                format!("GCN probability {p:.2}")
            } else {
                format!("GCN probability {p:.2}; like historical {}", runs.join(", "))
            };
            Cause { function: function.clone(), kind: kind.clone(), confidence: *p, evidence }
        })
        .collect();
    if let (true, Some(first)) = (e.exited, out.first().filter(|c| c.kind != "crash").cloned()) {
        let p: f64 = g.top.iter().filter(|(f, _, _)| *f == first.function).map(|t| t.2).sum();
        let crashed: Vec<String> = e
            .similar
            .iter()
            .filter(|s| s.function == first.function && s.manifestation == "crash")
            .map(|s| format!("run {} ({})", s.run, s.fault))
            .collect();
        let mut evidence = format!(
            "the process exited; the model has no crash class here, the function is the GCN's top suspect (its probability over all kinds {p:.2})"
        );
        if !crashed.is_empty() {
            evidence.push_str(&format!("; historical crashes of it: {}", crashed.join(", ")));
        }
        out.insert(0, Cause { function: first.function, kind: "crash".into(), confidence: p, evidence });
    }
    out
}

/// Builds the report of a window (see the module docs). With a fitted `fusion`, the verdict
/// is the fused P(error) >= 0.5; with the default one, either source's own alarm: the GCN's,
/// the log model's P(anomalous) >= 0.5, or the process's exit. P(error) is then the larger of
/// the two models' (1 for an exit).
pub fn build(e: &Evidence, fusion: &Fusion, lib: &Library) -> Report {
    let fused = fusion.samples > 0;
    let p_gcn = e.gcn.as_ref().map(|g| 1.0 - g.p_normal);
    let either = p_gcn.unwrap_or(0.0).max(e.p_logs.unwrap_or(0.0));
    let p_error = match (fused, p_gcn) {
        (true, Some(g)) => fusion.p_error(g, e.p_logs),
        _ if e.exited => 1.0,
        _ => either,
    };
    let error = match (fused, &e.gcn) {
        (true, Some(_)) => p_error >= 0.5 || e.exited,
        _ => e.gcn.as_ref().is_some_and(|g| g.error) || e.p_logs.is_some_and(|p| p >= 0.5) || e.exited,
    } || !crash_frames(&e.logs).is_empty();
    let causes = if error { causes(e) } else { Vec::new() };
    let sop = lib.get(causes.first().map(|c| c.kind.as_str()));
    let title = match (error, causes.first()) {
        (false, _) => "No fault: the window looks normal".to_string(),
        (true, Some(c)) => format!(
            "Suspected {} in {} ({:.0}%){}",
            c.kind,
            c.function,
            100.0 * c.confidence,
            if e.exited { ": the process exited" } else { "" }
        ),
        (true, None) => "Anomaly without a named fault".to_string(),
    };
    Report {
        window_id: e.window_id,
        agent: e.agent.clone(),
        pid: e.pid,
        error,
        p_error,
        title,
        symptoms: symptoms(e),
        process: process(e, &causes, p_error, fused),
        similar: if error { e.similar.clone() } else { Vec::new() },
        checks: if error { sop.map(|s| s.checks.clone()).unwrap_or_default() } else { Vec::new() },
        resolution: if error { sop.map(|s| s.resolution.clone()).unwrap_or_default() } else { Vec::new() },
        sop: if error { sop.map(|s| s.kind.clone()).unwrap_or_default() } else { String::new() },
        sop_title: if error { sop.map(|s| s.title.clone()) } else { None },
        causes,
    }
}

impl Report {
    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# {}\n", self.title);
        if let Some(t) = &self.sop_title {
            let _ = writeln!(md, "SOP: *{t}*\n");
        }
        let _ = writeln!(
            md,
            "Window {} · agent `{}` · pid {} · verdict: **{}** (P(error) {:.2})\n",
            self.window_id,
            self.agent,
            self.pid,
            if self.error { "ERROR" } else { "normal" },
            self.p_error
        );
        let _ = writeln!(md, "## Failure symptoms\n");
        for s in &self.symptoms {
            let _ = writeln!(md, "- {s}");
        }
        let _ = writeln!(md, "\n## Diagnostic process\n");
        for (i, s) in self.process.iter().enumerate() {
            let _ = writeln!(md, "{}. {s}", i + 1);
        }
        if !self.causes.is_empty() {
            let _ = writeln!(
                md,
                "\n## Root causes\n\n| # | function | fault kind | confidence | evidence |\n|---|---|---|---|---|"
            );
            for (i, c) in self.causes.iter().enumerate() {
                let _ = writeln!(
                    md,
                    "| {} | `{}` | {} | {:.0}% | {} |",
                    i + 1,
                    c.function,
                    c.kind,
                    100.0 * c.confidence,
                    c.evidence
                );
            }
        }
        if !self.similar.is_empty() {
            let _ = writeln!(
                md,
                "\n## Similar historical cases (FDDB)\n\n| run | fault | function | manifestation | similarity | first warning line |\n|---|---|---|---|---|---|"
            );
            for s in &self.similar {
                let line = s.line.as_deref().unwrap_or("-").replace('|', "\\|");
                let _ = writeln!(
                    md,
                    "| {} | {} | `{}` | {} | {:.2} | `{}` |",
                    s.run,
                    s.fault,
                    s.function,
                    s.manifestation,
                    s.similarity,
                    line.trim()
                );
            }
        }
        if !self.checks.is_empty() || !self.resolution.is_empty() {
            let _ = writeln!(md, "\n## Resolution (SOP: {})\n\nCheck:\n", self.sop);
            for (i, s) in self.checks.iter().enumerate() {
                let _ = writeln!(md, "{}. {s}", i + 1);
            }
            let _ = writeln!(md, "\nThen:\n");
            for (i, s) in self.resolution.iter().enumerate() {
                let _ = writeln!(md, "{}. {s}", i + 1);
            }
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence() -> Evidence {
        let node = |f: &str, parent: i32| pb::TreeNode { function: f.into(), parent, ..Default::default() };
        Evidence {
            window_id: 7,
            agent: "redis".into(),
            pid: 42,
            start_ns: 1_000_000_000,
            end_ns: 2_000_000_000,
            gcn: Some(Gcn {
                tid: 42,
                p_normal: 0.001,
                threshold: 0.013,
                error: true,
                by_fate: false,
                top: vec![("setGenericCommand".into(), "crash".into(), 0.91), ("call".into(), "crash".into(), 0.05)],
            }),
            afct: Some(pb::Tree {
                nodes: vec![node("main", -1), node("processCommand", 0), node("setGenericCommand", 1)],
                truncated: false,
            }),
            logs: vec![(
                "php-error.log".into(),
                "[29-Nov-2026 01:25:37 UTC] shop: Connection refused\n[29-Nov-2026 01:25:38 UTC] shop: Connection refused\n".into(),
            )],
            flagged: vec![("[29-Nov-2026 01:25:37 UTC] shop: Connection refused".into(), 0.97)],
            p_logs: Some(0.99),
            exited: false,
            after_exit: Vec::new(),
            fates: Vec::new(),
            similar: vec![SimilarCase {
                run: 17,
                function: "setGenericCommand".into(),
                fault: "crash".into(),
                manifestation: "crash".into(),
                similarity: 1.0,
                line: Some("shop: Connection refused".into()),
            }],
        }
    }

    #[test]
    fn a_crash_report_names_the_crash_the_function_and_the_steps() {
        let lib = Library::built_in().unwrap();
        let r = build(&evidence(), &Fusion::default(), &lib);
        assert!(r.error);
        assert_eq!(r.title, "Suspected crash in setGenericCommand (91%)");
        assert_eq!(r.causes[0].function, "setGenericCommand");
        assert!(r.causes[0].evidence.contains("run 17"));
        assert!(r.process.iter().any(|p| p.contains("main → processCommand → setGenericCommand")));
        assert!(r.symptoms.iter().any(|s| s.contains("php-error.log: 2 line(s)")));
        assert_eq!(r.sop, "crash");
        let md = r.markdown();
        for part in [
            "## Failure symptoms",
            "## Diagnostic process",
            "## Root causes",
            "## Similar historical cases",
            "## Resolution (SOP: crash)",
        ] {
            assert!(md.contains(part), "{part} missing from\n{md}");
        }
    }

    #[test]
    fn an_exit_puts_the_crash_first_and_alarms_alone() {
        let lib = Library::built_in().unwrap();
        let mut e = evidence();
        let g = e.gcn.as_mut().unwrap();
        g.error = false;
        g.p_normal = 0.9;
        g.top = vec![("call".into(), "input".into(), 0.6), ("setGenericCommand".into(), "crash".into(), 0.2)];
        e.p_logs = None;
        assert!(!build(&e, &Fusion::default(), &lib).error);
        e.exited = true;
        let r = build(&e, &Fusion::default(), &lib);
        assert!(r.error);
        assert_eq!((r.causes[0].function.as_str(), r.causes[0].kind.as_str()), ("setGenericCommand", "crash"));
        assert!(r.symptoms.iter().any(|s| s.contains("exited")));
        assert!(!r.symptoms.iter().any(|s| s.starts_with("after the exit")), "{:?}", r.symptoms);
        let refused = "[29-Nov-2026 01:25:39 UTC] shop: Connection refused";
        e.after_exit = vec![("php-error.log".into(), refused.into())];
        let r = build(&e, &Fusion::default(), &lib);
        let after = "after the exit, php-error.log: 1 line(s) at Error level, e.g. `shop: Connection refused`";
        assert!(r.symptoms.iter().any(|s| s == after), "{:?}", r.symptoms);
    }

    #[test]
    fn an_exit_without_a_crash_class_still_names_a_crash() {
        let lib = Library::built_in().unwrap();
        let mut e = evidence();
        e.exited = true;
        e.gcn.as_mut().unwrap().top = vec![("f".into(), "input".into(), 0.02), ("f".into(), "ip+n".into(), 0.01)];
        let r = build(&e, &Fusion::default(), &lib);
        assert_eq!((r.causes[0].function.as_str(), r.causes[0].kind.as_str()), ("f", "crash"));
        assert!((r.causes[0].confidence - 0.03).abs() < 1e-9);
        assert_eq!(r.causes[1].kind, "input");
        assert_eq!(r.sop, "crash");
    }

    #[test]
    fn a_stack_trace_in_the_log_names_the_function_that_died() {
        let lib = Library::built_in().unwrap();
        let mut e = evidence();
        e.exited = true;
        e.gcn.as_mut().unwrap().top = vec![("getGenericCommand".into(), "input".into(), 0.4)];
        let log = "12907:M 29 Nov 2026 08:32:14.123 # Redis 7.0.15 crashed by signal: 11, si_code: 1\n\
                   ------ STACK TRACE ------\nEIP:\n/x/redis-server 127.0.0.1:22379(delGenericCommand+0x60)[0x563c3cda6520]\n\n\
                   Backtrace:\n/x/redis-server 127.0.0.1:22379(sigsegvHandler+0x1d1)[0x1]\n\
                   /lib/x86_64-linux-gnu/libc.so.6(+0x3c050)[0x2]\n\
                   /x/redis-server 127.0.0.1:22379(delGenericCommand+0x60)[0x563c3cda6520]\n\
                   /x/redis-server 127.0.0.1:22379(call+0x16d)[0x3]\n";
        e.logs.push(("redis.log".into(), log.into()));
        assert_eq!(crash_frames(&e.logs), ["delGenericCommand", "call"]);
        let r = build(&e, &Fusion::default(), &lib);
        assert_eq!((r.causes[0].function.as_str(), r.causes[0].kind.as_str()), ("delGenericCommand", "crash"));
        // The GCN's own suspects follow; no second crash cause made up from them.
        assert_eq!(r.causes.iter().filter(|c| c.kind == "crash").count(), 1);
        assert!(r.symptoms.iter().any(|s| s.contains("delGenericCommand ← call")), "{:?}", r.symptoms);
        assert!(crash_frames(&[("php-error.log".into(), "shop: read error (x+1)\n".into())]).is_empty());
    }

    #[test]
    fn a_normal_window_has_no_causes_and_a_fitted_fusion_decides() {
        let lib = Library::built_in().unwrap();
        let mut e = evidence();
        e.gcn.as_mut().unwrap().error = false;
        e.gcn.as_mut().unwrap().p_normal = 0.9;
        e.p_logs = Some(0.1);
        let r = build(&e, &Fusion::default(), &lib);
        assert!(!r.error && r.causes.is_empty() && r.resolution.is_empty());
        // A fusion that trusts the logs alarms when they say so, whatever the GCN says.
        let f = Fusion { w: [0.0, 0.0, 2.0], lambda: 1.0, samples: 10 };
        e.p_logs = Some(0.95);
        let r = build(&e, &f, &lib);
        assert!(r.error, "p_error {}", r.p_error);
    }
}
