//! `report.md` and its figures (plotters, SVG and PNG), from the rows `afetm-eval score` wrote
//! and the response-time measurements `cargo xtask eval` took, with the paper's numbers beside
//! ours (004_eb31801e7dc37aff.txt, Fig. 5-7 and Table I; "-" where the paper gives a value only
//! as a bar in a figure).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{
    EvalError,
    method::Input,
    metrics::{Chance, Scores, mean, quantile, rate_text},
};

/// One method's figures on one target, budget and condition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// The target (redis, nginx, httpd, sqlite).
    pub target: String,
    /// The plan's budget P (`10%`); full-trace and log methods carry the budget of the run
    /// they were scored in.
    pub budget: String,
    /// `fddb` (the campaign's eval-role runs: full FCTs and the AFCTs the plan gives), one of
    /// its three parts (`fddb: same spec`, `fddb: unseen spec`, `fddb: unseen function`, each
    /// with every normal eval-role run), or `live` (fresh injections into the running shop,
    /// AFCTs built by the daemon).
    pub condition: String,
    /// The method's name.
    pub method: String,
    /// What it reads.
    pub input: Input,
    /// Its figures.
    pub scores: Scores,
    /// Peak memory the method added to the scoring process (fit and diagnose), KiB; for the
    /// daemon, the analyzer's peak RSS.
    pub mo_kib: Option<u64>,
    /// Facts about the method's fit (threshold, sigma, ...).
    pub notes: String,
    /// The condition's runs left out of the denominators (FDDB conditions: eval-role runs
    /// stored as not activated or dropped).
    #[serde(default)]
    pub excluded: Option<afetm_fddb::RunCounts>,
    /// What guessing gets on top-1 function over the same runs.
    #[serde(default)]
    pub chance: Option<Chance>,
}

/// Response times of one condition, repeated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rtgr {
    /// The target.
    pub target: String,
    /// `untraced`, `P=10%`, ..., `full`.
    pub condition: String,
    /// The target tier's own mean time per request, us, one per repetition.
    pub tier_us: Vec<f64>,
    /// The shop's end-to-end mean latency, ms, one per repetition.
    pub e2e_ms: Vec<f64>,
}

/// What the report says about how it was made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Setup {
    /// Free text lines: machine, versions, campaign sizes, split, wall time.
    pub lines: Vec<String>,
}

/// The paper's figures: (target, method) -> (EDR %, FLR %, FLD) where the text states them.
fn paper_fig5_6(target: &str, method: &str) -> (Option<f64>, Option<f64>, Option<f64>) {
    match (target, method) {
        ("redis", "AFETM") => (Some(81.0), None, Some(5.6)),
        ("nginx", "AFETM") => (Some(100.0), Some(92.0), Some(7.1)),
        ("httpd", "AFETM") => (Some(99.0), Some(92.0), Some(3.4)),
        ("sqlite", "AFETM") => (Some(99.0), Some(89.0), Some(23.1)),
        ("redis", "AFCT_GDC") => (Some(100.0), Some(91.0), None),
        ("httpd", "AFCT_GDC") => (Some(100.0), Some(26.0), Some(2.5)),
        (_, "AFCT_GDC") => (Some(100.0), None, None),
        ("redis", "FCT_EDC") => (None, Some(25.0), None),
        ("nginx", "FCT_EDC") => (None, Some(16.0), None),
        ("httpd", "FCT_EDC") => (None, Some(2.0), None),
        _ => (None, None, None),
    }
}

/// Table I: (target) -> RTGR % of full tracing, P = 10%, 30%, 50%.
fn paper_table1(target: &str) -> Option<[f64; 4]> {
    Some(match target {
        "redis" => [684.0, 81.0, 190.0, 373.0],
        "nginx" => [94.0, 19.0, 36.0, 50.0],
        "httpd" => [55.0, 19.0, 25.0, 36.0],
        "sqlite" => [119.0, 49.0, 96.0, 103.0],
        _ => return None,
    })
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// What the threads' fates change: crash and deadlock figures with and without them, and
/// the whole row's EDR and top-1 (a fate's verdict replaces the GCN's in its window).
fn fates_findings(out: &mut String, g: &Scores, alone: Option<&Scores>, fate_rule: Option<&Scores>) {
    let kind = |r: &Scores, k: &str| r.per_kind.get(k).copied().unwrap_or_default();
    let (crash, hang) = (kind(g, "crash"), kind(g, "deadlock"));
    if crash.runs + hang.runs > 0 {
        let _ = write!(
            out,
            "- Crashes and hangs: {} of {} crash and {} of {} deadlock injections detected, {} and {} located, {} and {} with the function in the top 3 (who names the fault in a killed or stopped thread's window is the fate rule chosen on the GCN's validation runs, in Fig. 7's notes: under `fate` its stack at the signal, then its last traced calls; under `gcn` the GCN's suspects for its AFCT)",
            crash.detected,
            crash.runs,
            hang.detected,
            hang.runs,
            crash.located,
            hang.located,
            crash.located_top3,
            hang.located_top3
        );
        match alone {
            Some(a) => {
                let _ = writeln!(
                    out,
                    "; the GCN alone detects {} and {} (a killed thread's tree is a normal tree cut short).",
                    kind(a, "crash").detected,
                    kind(a, "deadlock").detected
                );
            }
            None => out.push_str(".\n"),
        }
    }
    if let Some(a) = alone {
        let _ = writeln!(
            out,
            "- Fates: EDR {} -> {}, FLR top-1 (function) {} -> {}, false alarms {} -> {} (the GCN alone -> with the fates' alarms and the chosen rule's suspects).",
            pct(a.edr),
            pct(g.edr),
            pct(a.flr_top1_function),
            pct(g.flr_top1_function),
            pct(a.false_alarm_rate),
            pct(g.false_alarm_rate)
        );
    }
    if let Some(f) = fate_rule {
        let _ = writeln!(
            out,
            "- Fate rule: under `fate` (the last calls name the fault) FLR top-1 (function) {}, (function, kind) {}; under the rule chosen on validation {} and {} (same runs).",
            pct(f.flr_top1_function),
            pct(f.flr_top1_class),
            pct(g.flr_top1_function),
            pct(g.flr_top1_class)
        );
    }
}

/// The row of AFETM under the `fate` rule whatever validation chose (the ablation of the rule).
pub const FATE_SUSPECTS: &str = "AFETM (fate's suspects)";

/// [`FATE_SUSPECTS`] with the last calls by recency alone, the model's fault functions not
/// ranked first (the ablation of that order).
pub const FATE_RECENCY: &str = "AFETM (fate's suspects by recency)";

/// AFETM with its rules chosen as in the main row, a fate's stack at its signal left out of
/// its suspects (the ablation of fate stacks).
pub const FATE_NO_STACK: &str = "AFETM (no fate stacks)";

/// The paper's name for a method row (AFETM rows of either kind compare with "AFETM").
fn paper_name(method: &str) -> &str {
    if method.starts_with("AFETM") { "AFETM" } else { method }
}

/// Writes `report.md` and the figures into `dir`.
pub fn write(dir: &Path, setup: &Setup, rows: &[Row], rtgr: &[Rtgr], discussion: &str) -> Result<(), EvalError> {
    let mut md = String::new();
    let _ = writeln!(md, "# afetm evaluation report\n");
    let _ = writeln!(md, "## Setup\n");
    for l in &setup.lines {
        let _ = writeln!(md, "- {l}");
    }
    let _ = writeln!(md, "\n## Fig. 5: error detection and fault location (eval-role and live runs only)\n");
    let _ = writeln!(
        md,
        "Per run: detected if a window that ended after the injection's first application alarms (an alarm in a window that ended before it is a false alarm, column 'alarmed before'); located if the top-1 of its least normal alarming window after the injection names the injected function (for an unseen function: the nearest trained function in the normal FCT). FAR: normal held-out runs with any alarm. Every rate: k/n and its Wilson 95% interval. 'same spec': the faults training injected, injected again; 'unseen spec': other bits, arguments and N of trained (function, kind) pairs; 'unseen function': functions no training run injected into. Chance: top-1 of a uniform guess among the trained functions, and of always naming the most trained one. Paper values in brackets where its text gives them.\n"
    );
    let _ = writeln!(
        md,
        "| target | P | condition | method | EDR [paper] | EDR, manifested | alarmed before | FLR top-1 fn [paper] | chance (uniform / majority) | FLR top-3 fn | FLR top-1 (fn, kind) | FLR top-3 (fn, kind) | FAR |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (pe, pf, _) = paper_fig5_6(&r.target, paper_name(&r.method));
        let (s, c) = (&r.scores, &r.scores.counts);
        let n = s.fault_runs;
        let chance = r.chance.as_ref().map_or_else(
            || "-".into(),
            |c| format!("{} / {} ({} of {} fns)", pct(c.uniform), pct(c.majority), c.majority_function, c.functions),
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} [{}] | {} | {} | {} [{}] | {chance} | {} | {} | {} | {} |",
            r.target,
            r.budget,
            r.condition,
            r.method,
            rate_text(c.detected, n),
            opt(pe, 0),
            rate_text(c.manifested_detected, c.manifested),
            rate_text(c.pre_injection_alarms, n),
            rate_text(c.top1_function, n),
            opt(pf, 0),
            rate_text(c.top3_function, n),
            rate_text(c.top1_class, n),
            rate_text(c.top3_class, n),
            rate_text(c.false_alarms, s.normal_runs)
        );
    }
    excluded_table(&mut md, rows);
    let _ = writeln!(md, "\n![Fig. 5](fig5.svg)\n");
    log_table(&mut md, rows);
    per_kind_table(&mut md, rows);
    window_table(&mut md, rows);
    fld_table(&mut md, rows);
    fdd_mo_table(&mut md, rows);
    rtgr_table(&mut md, rtgr);
    let _ = writeln!(md, "\n## Discussion\n\n{discussion}");
    std::fs::write(dir.join("report.md"), md).map_err(|e| EvalError::Input(format!("{}: {e}", dir.display())))?;
    plots(dir, rows)?;
    Ok(())
}

/// The runs each condition's denominators leave out, once per (target, P, condition).
fn excluded_table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(md, "\n### Runs left out of the denominators\n");
    let _ = writeln!(
        md,
        "Scores count valid runs only. Not activated: the injector never applied the fault (the function was not called in the victims); dropped: events were lost, so the run's trees are no labels.\n"
    );
    let _ = writeln!(
        md,
        "| target | P | condition | fault runs scored | not activated | dropped | normal runs scored | normal dropped |\n|---|---|---|---|---|---|---|---|"
    );
    let mut seen = Vec::new();
    for r in rows {
        let Some(x) = &r.excluded else { continue };
        if seen.contains(&(&r.target, &r.budget, &r.condition)) {
            continue;
        }
        seen.push((&r.target, &r.budget, &r.condition));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.budget,
            r.condition,
            r.scores.fault_runs,
            x.fault_not_activated,
            x.fault_dropped,
            r.scores.normal_runs,
            x.normal_dropped
        );
    }
}

/// Detection F1 of every method, and the root-cause lines of those that name lines (HR@k:
/// the run's root-cause line, where it has one, among the first k lines named).
fn log_table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(md, "\n### Detection F1 and root-cause lines (HR@k)\n");
    let _ = writeln!(
        md,
        "F1 per run: detected fault runs against alarmed normal runs and missed fault runs. A run's root-cause line is its first error-level line whose template no normal training run logged; HR@k counts the fault runs that have one, for methods that name lines.\n"
    );
    let _ = writeln!(md, "| target | P | condition | method | F1 | runs with a root-cause line | HR@1 | HR@3 |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let s = &r.scores;
        let (hr1, hr3) = if s.line_runs == 0 { ("-".into(), "-".into()) } else { (pct(s.hr1), pct(s.hr3)) };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {hr1} | {hr3} |",
            r.target,
            r.budget,
            r.condition,
            r.method,
            pct(s.f1),
            s.line_runs
        );
    }
}

fn per_kind_table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(md, "\n### Per fault kind (detected / located top-1 fn / fn in top-3 / runs)\n");
    let kinds: std::collections::BTreeSet<&String> = rows.iter().flat_map(|r| r.scores.per_kind.keys()).collect();
    let _ = write!(md, "| target | P | condition | method |");
    for k in &kinds {
        let _ = write!(md, " {k} |");
    }
    let _ = writeln!(md, "\n|---|---|---|---|{}", "---|".repeat(kinds.len()));
    for r in rows {
        let _ = write!(md, "| {} | {} | {} | {} |", r.target, r.budget, r.condition, r.method);
        for k in &kinds {
            match r.scores.per_kind.get(*k) {
                Some(x) => {
                    let _ = write!(md, " {}/{}/{}/{} |", x.detected, x.located, x.located_top3, x.runs);
                }
                None => md.push_str(" - |"),
            }
        }
        md.push('\n');
    }
}

fn window_table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(md, "\n### Per window (one thread's tree of one window)\n");
    let _ = writeln!(
        md,
        "| target | P | condition | method | faulty windows | alarmed | located top-1 | other windows | alarmed |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows.iter().filter(|r| r.input != Input::Logs) {
        let w = &r.scores.windows;
        let f = |n: u64, of: u64| {
            if of == 0 { "-".to_string() } else { format!("{n} ({:.0}%)", 100.0 * n as f64 / of as f64) }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.budget,
            r.condition,
            r.method,
            w.faulty,
            f(w.faulty_alarmed, w.faulty),
            f(w.faulty_located, w.faulty),
            w.normal,
            f(w.normal_alarmed, w.normal)
        );
    }
}

fn fld_table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(md, "\n## Fig. 6: fault location distance (preorder positions in the normal FCT)\n");
    let _ = writeln!(
        md,
        "The normal FCT: the training normal runs' full FCTs merged by call path, numbered in preorder; FLD = |position(located) - position(injected)| over detected runs. A function outside it has no position (the log method's logging function, e.g. redis' `serverLog`, is not called in normal runs: its FLD is undefined, counted in the last column).\n"
    );
    let _ = writeln!(
        md,
        "| target | P | condition | method | FLD mean [paper] | median | max | detected runs without FLD |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let v: Vec<f64> = r.scores.fld.iter().map(|x| *x as f64).collect();
        let (_, _, pd) = paper_fig5_6(&r.target, paper_name(&r.method));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} [{}] | {} | {} | {} |",
            r.target,
            r.budget,
            r.condition,
            r.method,
            opt(mean(&v), 1),
            opt(pd, 1),
            opt(quantile(&v, 0.5), 0),
            opt(quantile(&v, 1.0), 0),
            r.scores.fld_undefined
        );
    }
    let _ = writeln!(md, "\n![Fig. 6](fig6.svg)");
}

fn fdd_mo_table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(md, "\n## Fig. 7: fault diagnosis delay and memory occupation\n");
    let _ = writeln!(
        md,
        "FDD: from the injection's first application to the first alarming verdict's report (live runs only). The daemon: when it stored the diagnosis (a window also closes early when its process exits). The methods run offline on the daemon's AFCTs: the window's nominal end plus their compute time. Compute: per verdict (the tree baselines diagnose each distinct tree once: repeated trees are cache hits, which puts their p50 low and their p99 where the edit distances are). MO: peak memory the method added to the scoring process (fit + diagnose); the daemon: the analyzer's peak RSS. Paper: AFETM FDD 0.3 s on average, AFCT_GDC 333.6 s; AFETM MO 16.2 MB.\n"
    );
    let _ = writeln!(
        md,
        "| target | P | condition | method | FDD p50 (ms) | FDD p99 (ms) | compute p50 (us) | compute p99 (us) | MO (MiB) | notes |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let c: Vec<f64> = r.scores.compute_us.iter().map(|x| *x as f64).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.budget,
            r.condition,
            r.method,
            opt(quantile(&r.scores.fdd_ms, 0.5), 0),
            opt(quantile(&r.scores.fdd_ms, 0.99), 0),
            opt(quantile(&c, 0.5), 0),
            opt(quantile(&c, 0.99), 0),
            opt(r.mo_kib.map(|k| k as f64 / 1024.0), 1),
            r.notes
        );
    }
    let _ = writeln!(md, "\n![Fig. 7](fig7.svg)");
}

fn median(v: &[f64]) -> Option<f64> {
    quantile(v, 0.5)
}

fn spread(v: &[f64]) -> String {
    match (quantile(v, 0.0), quantile(v, 1.0)) {
        (Some(lo), Some(hi)) => format!("{lo:.2}-{hi:.2}"),
        _ => "-".into(),
    }
}

fn rtgr_table(md: &mut String, rtgr: &[Rtgr]) {
    let _ = writeln!(md, "\n## Table I: response time growth rate (eq. 13)\n");
    let _ = writeln!(
        md,
        "The shop's CRUD mix; conditions interleaved, repeated; median of the repetitions, spread = min-max. Tier: the target's own time per request (redis: INFO commandstats usec_per_call; nginx: `$request_time` of its access log, which includes the backends; Apache: `%D`; SQLite: not measured yet). RTGR against the untraced runs of the same session.\n"
    );
    let _ = writeln!(
        md,
        "| target | condition | tier us/req (median, spread) | RTGR tier | end-to-end ms (median, spread) | RTGR e2e | paper RTGR |\n|---|---|---|---|---|---|---|"
    );
    let mut by_target: BTreeMap<&str, Vec<&Rtgr>> = BTreeMap::new();
    for r in rtgr {
        by_target.entry(&r.target).or_default().push(r);
    }
    for (target, conds) in by_target {
        let base = conds.iter().find(|c| c.condition == "untraced");
        let growth = |v: &[f64], b: Option<&Vec<f64>>| match (median(v), b.and_then(|b| median(b))) {
            (Some(x), Some(b)) if b > 0.0 => format!("{:+.0}%", 100.0 * (x - b) / b),
            _ => "-".into(),
        };
        for c in &conds {
            let paper = paper_table1(target).and_then(|p| match c.condition.as_str() {
                "full" => Some(p[0]),
                "P=10%" => Some(p[1]),
                "P=30%" => Some(p[2]),
                "P=50%" => Some(p[3]),
                _ => None,
            });
            let _ = writeln!(
                md,
                "| {target} | {} | {} ({}) | {} | {} ({}) | {} | {} |",
                c.condition,
                opt(median(&c.tier_us), 2),
                spread(&c.tier_us),
                growth(&c.tier_us, base.map(|b| &b.tier_us)),
                opt(median(&c.e2e_ms), 2),
                spread(&c.e2e_ms),
                growth(&c.e2e_ms, base.map(|b| &b.e2e_ms)),
                paper.map_or_else(|| "-".into(), |p| format!("{p:.0}%"))
            );
        }
    }
}

/// Bar groups: per group (x label), (series, value).
type Groups = [(String, Vec<(String, f64)>)];

/// A grouped bar chart, as SVG and PNG next to `path`.
fn bars(path: &Path, title: &str, x_label: &str, groups: &Groups) -> Result<(), EvalError> {
    if groups.is_empty() {
        return Ok(());
    }
    let plot = |e: String| EvalError::Input(format!("{}: {e}", path.display()));
    let svg = path.with_extension("svg");
    draw_bars(
        SVGBackend::new(&svg, (1000, 160 + 36 * groups.len() as u32)).into_drawing_area(),
        title,
        x_label,
        groups,
    )
    .map_err(|e| plot(e.to_string()))?;
    let png = path.with_extension("png");
    draw_bars(
        BitMapBackend::new(&png, (1000, 160 + 36 * groups.len() as u32)).into_drawing_area(),
        title,
        x_label,
        groups,
    )
    .map_err(|e| plot(e.to_string()))?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    groups: &Groups,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    // Horizontal bars: one band per group, its label on the left, top to bottom.
    let mut series: Vec<&String> = Vec::new();
    for (_, g) in groups {
        for (n, _) in g {
            if !series.contains(&n) {
                series.push(n);
            }
        }
    }
    let n = groups.len();
    let xmax = groups.iter().flat_map(|(_, g)| g.iter().map(|x| x.1)).fold(0.0f64, f64::max).max(1e-9) * 1.25;
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(280)
        .build_cartesian_2d(0f64..xmax, 0f64..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(x_label)
        .y_labels(n * 2 + 1)
        .y_label_style(("sans-serif", 12))
        .y_label_formatter(&|y| {
            // Label each band at its centre; band i (from the top) spans [n-1-i, n-i).
            let k = y.floor() as usize;
            if (y - k as f64 - 0.5).abs() < 1e-6 && k < n { groups[n - 1 - k].0.clone() } else { String::new() }
        })
        .draw()?;
    let height = 0.8 / series.len().max(1) as f64;
    for (si, name) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let rects: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(gi, (_, g))| {
                let v = g.iter().find(|x| &x.0 == *name)?.1;
                let top = (n - gi) as f64 - 0.1 - si as f64 * height;
                Some(Rectangle::new([(0.0, top - height * 0.9), (v, top)], color.filled()))
            })
            .collect();
        chart
            .draw_series(rects)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A method's name short enough for an axis label.
fn short(method: &str) -> &str {
    match method {
        "Bag of functions (no topology)" => "Bag",
        "Log-based (idealized)" => "Logs",
        "AFETM (daemon)" => "AFETM daemon",
        m => m,
    }
}

/// Fig. 5 (EDR and FLR), Fig. 6 (FLD), Fig. 7 (FDD): one group per (target, P, condition,
/// method).
fn plots(dir: &Path, rows: &[Row]) -> Result<(), EvalError> {
    let label = |r: &Row| format!("{} {} {} {}", r.target, r.budget, r.condition, short(&r.method));
    let fig5: Vec<(String, Vec<(String, f64)>)> = rows
        .iter()
        .map(|r| {
            let s = &r.scores;
            (
                label(r),
                vec![
                    ("EDR".into(), 100.0 * s.edr),
                    ("FLR top-1".into(), 100.0 * s.flr_top1_function),
                    ("FLR top-3".into(), 100.0 * s.flr_top3_function),
                    ("FAR".into(), 100.0 * s.false_alarm_rate),
                ],
            )
        })
        .collect();
    bars(&dir.join("fig5"), "EDR, FLR and false alarms (%)", "%", &fig5)?;
    let fig6: Vec<(String, Vec<(String, f64)>)> = rows
        .iter()
        .filter_map(|r| {
            let v: Vec<f64> = r.scores.fld.iter().map(|x| *x as f64).collect();
            Some((label(r), vec![("FLD mean".into(), mean(&v)?)]))
        })
        .collect();
    bars(&dir.join("fig6"), "Fault location distance", "preorder positions", &fig6)?;
    let fig7: Vec<(String, Vec<(String, f64)>)> = rows
        .iter()
        .filter_map(|r| Some((label(r), vec![("FDD p50 (ms)".into(), quantile(&r.scores.fdd_ms, 0.5)?)])))
        .collect();
    bars(&dir.join("fig7"), "Fault diagnosis delay, live runs", "ms", &fig7)?;
    Ok(())
}

fn find<'a>(rows: &'a [Row], target: &str, budget: &str, condition: &str, method: &str) -> Option<&'a Scores> {
    rows.iter()
        .find(|r| r.target == target && r.budget == budget && r.condition == condition && r.method == method)
        .map(|r| &r.scores)
}

/// The findings the numbers support, per target and budget, written from the rows (so the
/// text cannot drift from the tables).
pub fn discussion(rows: &[Row], rtgr: &[Rtgr]) -> String {
    let mut out = String::new();
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        if !seen.contains(&(&r.target, &r.budget)) {
            seen.push((&r.target, &r.budget));
        }
    }
    for (target, budget) in seen {
        let _ = writeln!(out, "**{target}, P = {budget}.**");
        let gcn = find(rows, target, budget, "fddb", "AFETM");
        // The topology question is the GCN's alone, without the fates' verdicts.
        let gcn_alone = find(rows, target, budget, "fddb", "AFETM (no fates)");
        let bag = find(rows, target, budget, "fddb", "Bag of functions (no topology)");
        if let (Some(g), Some(b)) = (gcn_alone.or(gcn), bag) {
            let verdict = if g.flr_top1_class > b.flr_top1_class + 0.05 {
                "the tree structure earns its keep here"
            } else if g.flr_top1_class + 0.05 < b.flr_top1_class {
                "the bag of functions does better: on this data the GCN's use of the tree structure does not pay"
            } else {
                "the two are within 5 points: on this data the tree structure does not measurably help"
            };
            let _ = writeln!(
                out,
                "- Topology: on the eval-role runs AFETM's GCN locates (function, kind) at top-1 in {} of the injections, the topology-free control in {} (EDR {} vs {}, false alarms {} vs {}): {verdict}.",
                pct(g.flr_top1_class),
                pct(b.flr_top1_class),
                pct(g.edr),
                pct(b.edr),
                pct(g.false_alarm_rate),
                pct(b.false_alarm_rate)
            );
        }
        if let (Some(g), Some(l)) = (gcn, find(rows, target, budget, "live", "AFETM (daemon)")) {
            let _ = writeln!(
                out,
                "- Colored FCTs vs live AFCTs: AFETM's EDR {} -> {}, FLR top-1 (function) {} -> {}, false alarms {} -> {} ({} eval-role vs {} live injections). {}",
                pct(g.edr),
                pct(l.edr),
                pct(g.flr_top1_function),
                pct(l.flr_top1_function),
                pct(g.false_alarm_rate),
                pct(l.false_alarm_rate),
                g.fault_runs,
                l.fault_runs,
                if l.flr_top1_function + 0.1 < g.flr_top1_function {
                    "The model loses much of its location power on the AFCTs the daemon builds under load: the training trees (campaign at a low fixed rate, AFCTs derived from full traces) differ from what the agent sees at the shop's own rate."
                } else {
                    "The gap is small: what the model learnt from the campaign's trees carries over to the daemon's AFCTs."
                }
            );
        }
        let live: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.target == target && r.budget == budget && r.condition == "live" && r.scores.false_alarm_rate > 0.0
            })
            .collect();
        for r in live {
            let _ = writeln!(
                out,
                "- Live false alarms: {} alarmed in {} of {} normal live runs (EDR {} there): a method whose alarms hold on the campaign's trees can fail on the daemon's.",
                r.method,
                pct(r.scores.false_alarm_rate),
                r.scores.normal_runs,
                pct(r.scores.edr)
            );
        }
        for m in ["FCT_EDC", "AFCT_GDC", "Log-based (idealized)"] {
            if let (Some(s), Some(g)) = (find(rows, target, budget, "fddb", m), gcn) {
                let _ = writeln!(
                    out,
                    "- {m}: EDR {} (AFETM {}), FLR top-1 {} (AFETM {}), false alarms {} (AFETM {}).",
                    pct(s.edr),
                    pct(g.edr),
                    pct(s.flr_top1_function),
                    pct(g.flr_top1_function),
                    pct(s.false_alarm_rate),
                    pct(g.false_alarm_rate)
                );
            }
        }
        logs_findings(&mut out, rows, target, budget, gcn);
        if let Some(g) = gcn {
            let fate_rule = find(rows, target, budget, "fddb", FATE_SUSPECTS);
            fates_findings(&mut out, g, gcn_alone, fate_rule);
            if let (Some(f), Some(r)) = (fate_rule, find(rows, target, budget, "fddb", FATE_RECENCY)) {
                let _ = writeln!(
                    out,
                    "- Fate's suspects: the model's fault functions first among the last calls give FLR top-1 (function) {}, by recency alone {} (rule `fate`, same runs).",
                    pct(f.flr_top1_function),
                    pct(r.flr_top1_function)
                );
            }
            if let Some(n) = find(rows, target, budget, "fddb", FATE_NO_STACK) {
                let _ = writeln!(
                    out,
                    "- Fate stacks: with each killed or stopped thread's stack at its signal ahead of its last calls, FLR top-1 (function) {}, top-3 {}; without them {}, {} (rules chosen the same way, same runs).",
                    pct(g.flr_top1_function),
                    pct(g.flr_top3_function),
                    pct(n.flr_top1_function),
                    pct(n.flr_top3_function)
                );
            }
        }
        out.push('\n');
    }
    tradeoff(&mut out, rows, rtgr);
    if rtgr.is_empty() {
        let _ = writeln!(out, "No response-time measurement in this run.");
    }
    out
}

/// What the log models, the fusion and fault-aware selection add to the GCN (issue 13).
fn logs_findings(out: &mut String, rows: &[Row], target: &str, budget: &str, gcn: Option<&Scores>) {
    let Some(g) = gcn else { return };
    if let Some(f) = find(rows, target, budget, "fddb", "Fusion (GCN + Chimera + LogSage)") {
        let _ = writeln!(
            out,
            "- Fusion: EDR {} -> {}, FLR top-1 (function) {} -> {}, false alarms {} -> {} (the GCN alone -> fused with Chimera and LogSage).",
            pct(g.edr),
            pct(f.edr),
            pct(g.flr_top1_function),
            pct(f.flr_top1_function),
            pct(g.false_alarm_rate),
            pct(f.false_alarm_rate)
        );
    }
    if let Some(c) = find(rows, target, budget, "fddb", "Chimera (logs)") {
        let _ = writeln!(
            out,
            "- Chimera alone: detection F1 {:.2} (GCN {:.2}), false alarms {}; root-cause line HR@1 {} / HR@3 {} over {} runs that have one.",
            c.f1,
            g.f1,
            pct(c.false_alarm_rate),
            pct(c.hr1),
            pct(c.hr3),
            c.line_runs
        );
    }
    ablation_findings(out, rows, target, budget, g);
    let fault_aware = format!("{budget} infogain");
    if let Some(i) = find(rows, target, &fault_aware, "fddb", "AFETM") {
        let _ = writeln!(
            out,
            "- Fault-aware selection at the same bound: AFETM's EDR {} (MMAS plan) vs {} (infogain plan), FLR top-1 {} vs {}, top-3 {} vs {}.",
            pct(g.edr),
            pct(i.edr),
            pct(g.flr_top1_function),
            pct(i.flr_top1_function),
            pct(g.flr_top3_function),
            pct(i.flr_top3_function)
        );
    }
}

/// The models trained with one of issue 23's input changes off, each scored on the same
/// eval-role runs under the budget label "`budget` `suffix`" (`cargo xtask eval` trains them
/// for the first budget): (suffix, what was left out).
pub const ABLATIONS: [(&str, &str); 2] = [
    ("no deviation", "the deviation-from-normal features (`train --no-deviation`)"),
    ("one faulty window", "every faulty window of a run but its first (`train --faulty-windows 1`)"),
];

/// One line per ablation model scored: AFETM and the GCN alone with and without the change.
fn ablation_findings(out: &mut String, rows: &[Row], target: &str, budget: &str, full: &Scores) {
    let alone = find(rows, target, budget, "fddb", "AFETM (no fates)");
    for (suffix, what) in ABLATIONS {
        let label = format!("{budget} {suffix}");
        let Some(a) = find(rows, target, &label, "fddb", "AFETM") else { continue };
        let mut line = format!(
            "- Ablation, {what}: AFETM's EDR {} -> {}, FLR top-1 (function) {} -> {}, top-3 {} -> {}, (function, kind) {} -> {}",
            pct(full.edr),
            pct(a.edr),
            pct(full.flr_top1_function),
            pct(a.flr_top1_function),
            pct(full.flr_top3_function),
            pct(a.flr_top3_function),
            pct(full.flr_top1_class),
            pct(a.flr_top1_class)
        );
        if let (Some(g), Some(n)) = (alone, find(rows, target, &label, "fddb", "AFETM (no fates)")) {
            line += &format!(
                "; the GCN alone {} -> {} top-1, {} -> {} top-3",
                pct(g.flr_top1_function),
                pct(n.flr_top1_function),
                pct(g.flr_top3_function),
                pct(n.flr_top3_function)
            );
        }
        let _ = writeln!(out, "{line} (same eval-role runs; label \"{label}\").");
    }
}

/// The paper's P = 10% vs 50% trade-off (+3% FLR for +98% RTGR), per target, from the
/// smallest and the largest budget measured.
fn tradeoff(out: &mut String, rows: &[Row], rtgr: &[Rtgr]) {
    let mut targets: Vec<&str> = rows.iter().map(|r| r.target.as_str()).collect();
    targets.dedup();
    for target in targets {
        // MMAS budgets only ("10%"; not "10% infogain").
        let mut budgets: Vec<(u32, &str)> = rows
            .iter()
            .filter(|r| r.target == target && r.method == "AFETM")
            .filter_map(|r| Some((r.budget.trim_end_matches('%').parse::<u32>().ok()?, r.budget.as_str())))
            .collect();
        budgets.sort();
        let mut budgets: Vec<&str> = budgets.into_iter().map(|b| b.1).collect();
        budgets.dedup();
        let (Some(lo), Some(hi)) = (budgets.first(), budgets.last()) else { continue };
        if lo == hi {
            continue;
        }
        let (Some(a), Some(b)) = (find(rows, target, lo, "fddb", "AFETM"), find(rows, target, hi, "fddb", "AFETM"))
        else {
            continue;
        };
        let e2e = |cond: String| {
            rtgr.iter().find(|r| r.target == target && r.condition == cond).and_then(|r| median(&r.e2e_ms))
        };
        let base = e2e("untraced".into());
        let growth = |b: &str| match (e2e(format!("P={b}")), base) {
            (Some(x), Some(u)) if u > 0.0 => format!("{:+.0}%", 100.0 * (x - u) / u),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "**{target}: P = {lo} vs {hi}** (paper: +3% FLR for +98% RTGR on average): AFETM's FLR top-1 (function) {} -> {} on the eval-role runs, end-to-end RTGR {} -> {}.\n",
            pct(a.flr_top1_function),
            pct(b.flr_top1_function),
            growth(lo),
            growth(hi)
        );
    }
}
