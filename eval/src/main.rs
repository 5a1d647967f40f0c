//! `afetm-eval`: scores every method on held-out runs (`score`) and writes the report
//! (`report`). `cargo xtask eval` runs the campaign, the live injections and the response-time
//! measurements, and calls these two.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Instant,
};

use afetm_diagnosis::Class;
use afetm_diagnosis::{
    Model,
    fate::{Combine, Rules},
};
use afetm_eval::{
    case::{self, Case},
    method::{Input, Method},
    methods::{
        afetm::Afetm, afetm::Online, bag::Bag, chimera::ChimeraMethod, edc::FctEdc, fusion::Fused, gdc::AfctGdc,
        logs::LogIdealized, logsage::LogSage,
    },
    metrics::{Reference, RunOutcome, Scores, aggregate, chance, nearest_known, outcome},
    report::{self, Row, Rtgr, Setup},
};
use afetm_fddb::{Fddb, HeldOut, Role};
use afetm_proto::plan::PlanFile;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(about = "Scores AFETM and its baselines on held-out runs and writes the report")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fits every method on the FDDB's training runs and scores it on its eval-role runs (and,
    /// given a live analyzer database, on the live runs); writes the rows as JSON.
    Score(ScoreArgs),
    /// Fits the fusion of the GCN and the log models on the GCN's validation runs and writes
    /// it (`afetm-analyzer serve --fusion FILE` reads it).
    Fuse {
        #[command(flatten)]
        gcn: GcnArgs,
        /// Where the fusion goes (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Chooses the fate rules on the GCN's validation runs, as the AFETM row does, and prints
    /// them (`afetm-analyzer serve --fate-rule RULES` reads the line); the hits go to stderr.
    FateRules(GcnArgs),
    /// Writes report.md and the figures from the rows, rtgr.json and setup.json in a folder.
    Report {
        /// The folder (`target/eval`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Prints each figure of the rows of several evaluation folders (one per campaign seed:
    /// `target/eval`, `target/eval-seed-2`, ...) side by side, with the spread and the worst
    /// seed, as markdown.
    Seeds {
        /// The folders, two or more.
        #[arg(long = "dir", required = true, num_args = 1..)]
        dirs: Vec<PathBuf>,
    },
}

/// A GCN and the FDDB it was trained from.
#[derive(clap::Args)]
struct GcnArgs {
    /// The campaign's FDDB.
    #[arg(long)]
    fddb: PathBuf,
    /// The target's name in it.
    #[arg(long)]
    target: String,
    /// The plan the GCN was trained under.
    #[arg(long)]
    plan: PathBuf,
    /// The GCN (its manifest lists its validation runs).
    #[arg(long)]
    model: PathBuf,
}

impl GcnArgs {
    /// The training-role runs as the plan sees them, and the model.
    fn load(&self) -> Result<(Vec<Case>, Model)> {
        let db = Fddb::open(&self.fddb).with_context(|| format!("FDDB {}", self.fddb.display()))?;
        let text = std::fs::read_to_string(&self.plan).with_context(|| format!("plan {}", self.plan.display()))?;
        let train = case::from_fddb(&db, &self.target, Some(&PlanFile::parse(&text)?), Role::Train)?;
        Ok((train, Model::load(&self.model).with_context(|| format!("model {}", self.model.display()))?))
    }
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// The campaign's FDDB.
    #[arg(long)]
    fddb: PathBuf,
    /// The target's name in it.
    #[arg(long)]
    target: String,
    /// The budget label of the plan (for the report).
    #[arg(long)]
    budget: String,
    /// The plan (selection at that budget).
    #[arg(long)]
    plan: PathBuf,
    /// The GCN trained under the plan.
    #[arg(long)]
    model: PathBuf,
    /// The live analyzer's database (the daemon that served with the model).
    #[arg(long, requires = "live_runs")]
    live_db: Option<PathBuf>,
    /// The live runs (`live-runs.jsonl`, written by `cargo xtask eval`).
    #[arg(long)]
    live_runs: Option<PathBuf>,
    /// The live analyzer's peak RSS, KiB (MO of the daemon).
    #[arg(long)]
    daemon_peak_kib: Option<u64>,
    /// Leave out the methods that do not depend on the plan (full-trace FCT_EDC and the log
    /// method): they were scored with another budget already.
    #[arg(long)]
    plan_methods_only: bool,
    /// Only the methods that read the model (AFETM and its fate variants): for a model
    /// trained with one change off (an ablation), where the others would repeat their rows.
    #[arg(long)]
    model_methods_only: bool,
    /// Leave out the methods that compare trees by edit distance (FCT_EDC, AFCT_GDC): on
    /// libsqlite3's trees (10,000 nodes per window on average, cut to 2,000) scoring them took
    /// over 15 minutes here where the others took seconds.
    #[arg(long)]
    no_tree_distance: bool,
    /// Where the rows go.
    #[arg(long)]
    out: PathBuf,
    /// Also write every method's outcome per run here, one JSON line each (method, condition
    /// and the run's outcome: detected, located, least normality and its window, the windows
    /// that alarmed), to find where a false alarm or a miss came from.
    #[arg(long)]
    runs_out: Option<PathBuf>,
}

/// One line of `--runs-out`.
#[derive(serde::Serialize)]
struct RunLine<'a> {
    method: &'a str,
    condition: &'a str,
    /// Why the run's fault had no training runs (eval-role runs).
    held_out: Option<HeldOut>,
    #[serde(flatten)]
    outcome: &'a RunOutcome,
}

/// Appends the outcomes of `method` on `cases` to `lines` as JSON (see `--runs-out`).
fn run_lines(lines: &mut String, method: &str, condition: &str, cases: &[Case], outcomes: &[RunOutcome]) -> Result<()> {
    for (c, o) in cases.iter().zip(outcomes) {
        let line = RunLine { method, condition, held_out: c.held_out, outcome: o };
        lines.push_str(&serde_json::to_string(&line)?);
        lines.push('\n');
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    match Cli::parse().cmd {
        Cmd::Score(a) => score(&a),
        Cmd::Fuse { gcn, out } => fuse(&gcn, &out),
        Cmd::FateRules(gcn) => fate_rules(&gcn),
        Cmd::Report { dir } => write_report(&dir),
        Cmd::Seeds { dirs } => {
            if dirs.len() < 2 {
                anyhow::bail!("give two folders or more (--dir A --dir B)");
            }
            let mut seeds = Vec::new();
            for d in &dirs {
                let name = d.file_name().map_or_else(|| d.display().to_string(), |n| n.to_string_lossy().into_owned());
                seeds.push(afetm_eval::seeds::Seeded { name, rows: read_rows(d)? });
            }
            print!("{}", afetm_eval::seeds::table(&seeds));
            Ok(())
        }
    }
}

/// Peak-RSS accounting of this process (Linux: `clear_refs` 5 resets the peak).
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS")
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

struct Fitted {
    method: Box<dyn Method>,
    notes: String,
    fit_peak_kib: u64,
}

fn fit_all(a: &ScoreArgs, train: &[Case]) -> Result<Vec<Fitted>> {
    let mut out = Vec::new();
    let mut fit = |f: &mut dyn FnMut() -> Result<(Box<dyn Method>, String)>| -> Result<()> {
        let base = reset_peak();
        let t = Instant::now();
        let (method, notes) = f()?;
        let peak = status_kib("VmHWM").saturating_sub(base);
        eprintln!("fitted {} in {:.1} s {notes}", method.name(), t.elapsed().as_secs_f64());
        out.push(Fitted { method, notes, fit_peak_kib: peak });
        Ok(())
    };
    fit(&mut || {
        let model = Model::load(&a.model).with_context(|| format!("model {}", a.model.display()))?;
        let threshold = model.manifest.threshold;
        let thin = format!(
            "{} of {} classes under {} training trees",
            model.manifest.training.thin_classes.len(),
            model.manifest.classes.len(),
            afetm_diagnosis::train::THIN_CLASS
        );
        let mut m = Afetm::new(model, "AFETM");
        let rule = match m.fit_rule(train)? {
            Some(choice) => choice.notes(),
            None => "fate rule fate (the GCN's manifest lists no validation runs)".to_string(),
        };
        Ok((Box::new(m), format!("threshold {threshold:.3}, {thin}, {rule}")))
    })?;
    fit(&mut || {
        let model = Model::load(&a.model).with_context(|| format!("model {}", a.model.display()))?;
        let mut m = Afetm::new(model, afetm_eval::report::FATE_NO_STACK).without_stacks();
        let rule = m.fit_rule(train)?.map(|c| c.notes()).unwrap_or_default();
        Ok((Box::new(m), rule))
    })?;
    fit(&mut || {
        let model = Model::load(&a.model).with_context(|| format!("model {}", a.model.display()))?;
        Ok((Box::new(Afetm::new(model, "AFETM (no fates)").without_fates()), String::new()))
    })?;
    fit(&mut || {
        let model = Model::load(&a.model).with_context(|| format!("model {}", a.model.display()))?;
        let m = Afetm::new(model, afetm_eval::report::FATE_SUSPECTS).with_rules(Rules::all(Combine::Fate));
        Ok((Box::new(m), String::new()))
    })?;
    fit(&mut || {
        let model = Model::load(&a.model).with_context(|| format!("model {}", a.model.display()))?;
        let m = Afetm::new(model, afetm_eval::report::FATE_RECENCY).with_rules(Rules::all(Combine::Fate)).by_recency();
        Ok((Box::new(m), String::new()))
    })?;
    if a.model_methods_only {
        return Ok(out);
    }
    // Methods on full FCTs or logs alone do not depend on the plan.
    let all = !a.plan_methods_only;
    if all && !a.no_tree_distance {
        fit(&mut || {
            let m = FctEdc::fit(train)?;
            let notes = format!("threshold {} edits", m.threshold());
            Ok((Box::new(m), notes))
        })?;
    }
    if !a.no_tree_distance {
        fit(&mut || {
            let m = AfctGdc::fit(train)?;
            let notes = format!("{} entries, sigma {:.2}", m.entries(), m.sigma());
            Ok((Box::new(m), notes))
        })?;
    }
    if all {
        fit(&mut || Ok((Box::new(LogIdealized::fit(train, &a.target)), String::new())))?;
    }
    fit(&mut || Ok((Box::new(Bag::fit(train)?), String::new())))?;
    if all {
        fit(&mut || Ok((Box::new(ChimeraMethod::fit(train)?), String::new())))?;
    }
    for share in [None, Some(ACTIVE_LABELS)].into_iter().filter(|_| all) {
        fit(&mut || {
            let m = LogSage::fit(train, share)?;
            let notes = m.notes();
            Ok((Box::new(m), notes))
        })?;
    }
    if all {
        let model = Model::load(&a.model).with_context(|| format!("model {}", a.model.display()))?;
        if model.manifest.training.val_run_ids.is_empty() {
            eprintln!(
                "fusion left out: the GCN's manifest lists no validation runs (trained before they were recorded)"
            );
        } else {
            let mut model = Some(model);
            fit(&mut || {
                let m = Fused::fit(train, model.take().context("the fusion is fitted once")?)?;
                let notes = m.notes();
                Ok((Box::new(m), notes))
            })?;
        }
    }
    Ok(out)
}

/// The share of training runs LogSage's active learning may ask about.
const ACTIVE_LABELS: f64 = 0.3;

/// Sets every case's root-cause line (the truth of HR@k), from the training normal runs'
/// error templates.
fn mark_root_lines(target: &str, train: &[Case], cases: &mut [Case]) {
    let logs = LogIdealized::fit(train, target);
    for c in cases.iter_mut() {
        c.root_line = logs.root_line(c);
    }
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} runs {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

/// One method's outcome on every case (in case order), its verdicts' compute times and the
/// peak memory it added.
struct Scored {
    outcomes: Vec<RunOutcome>,
    compute: Vec<u64>,
    peak_kib: u64,
}

/// Scores one method on `cases`.
fn score_method(f: &Fitted, cases: &[Case], reference: &Reference, label: &str) -> Result<Scored> {
    let base = reset_peak();
    let pb = bar(cases.len(), &format!("{label}: {}", f.method.name()));
    let (mut outcomes, mut compute) = (Vec::new(), Vec::new());
    for c in cases {
        let v = f.method.diagnose(c)?;
        compute.extend(v.iter().map(|v| v.compute_us));
        outcomes.push(outcome(c, &v, reference));
        pb.inc(1);
    }
    pb.finish();
    let peak_kib = status_kib("VmHWM").saturating_sub(base);
    Ok(Scored { outcomes, compute, peak_kib })
}

/// The eval-role runs' parts (issue 23, "Unseen specs"): each part's fault runs by why their
/// fault had no training runs, every normal run in each.
const PARTS: [(&str, Option<HeldOut>); 3] = [
    ("fddb: same spec", None),
    ("fddb: unseen spec", Some(HeldOut::Spec)),
    ("fddb: unseen function", Some(HeldOut::Function)),
];

/// Unseen functions are scored against the nearest trained function (see `metrics::nearest_known`).
fn mark_nearest_known(train: &[Case], eval: &mut [Case], reference: &Reference) {
    let known: BTreeSet<String> = train
        .iter()
        .filter_map(|c| match &c.truth {
            Class::Fault { function, .. } => Some(function.clone()),
            Class::Normal => None,
        })
        .collect();
    for c in eval.iter_mut().filter(|c| c.held_out == Some(HeldOut::Function)) {
        if let Class::Fault { function, .. } = &c.truth {
            c.located_as = nearest_known(reference, function, &known).map(str::to_string);
        }
    }
}

fn score(a: &ScoreArgs) -> Result<()> {
    let fddb = Fddb::open(&a.fddb).with_context(|| format!("FDDB {}", a.fddb.display()))?;
    let plan =
        PlanFile::parse(&std::fs::read_to_string(&a.plan).with_context(|| format!("plan {}", a.plan.display()))?)
            .with_context(|| format!("plan {}", a.plan.display()))?;
    let t = Instant::now();
    let train = case::from_fddb(&fddb, &a.target, Some(&plan), Role::Train)?;
    let mut eval = case::from_fddb(&fddb, &a.target, Some(&plan), Role::Eval)?;
    mark_root_lines(&a.target, &train, &mut eval);
    eprintln!("read {} training and {} eval-role runs in {:.1} s", train.len(), eval.len(), t.elapsed().as_secs_f64());
    if eval.is_empty() {
        anyhow::bail!(
            "the FDDB holds no valid eval-role run of {} (run the campaign with --eval-runs 1 or more)",
            a.target
        );
    }
    let reference = Reference::from_trees(
        train
            .iter()
            .filter(|c| c.truth == afetm_diagnosis::Class::Normal)
            .flat_map(|c| &c.windows)
            .filter_map(|w| w.full.as_ref()),
    );
    mark_nearest_known(&train, &mut eval, &reference);
    let excluded = fddb.run_counts(&a.target, Role::Eval)?;
    let mut fitted = fit_all(a, &train)?;
    if a.plan_methods_only {
        fitted.retain(|f| f.method.input() == Input::Afct);
    }
    let mut rows = Vec::new();
    let mut lines = String::new();
    for f in &fitted {
        let scored = score_method(f, &eval, &reference, "eval-role runs")?;
        run_lines(&mut lines, f.method.name(), "fddb", &eval, &scored.outcomes)?;
        let mo = Some(f.fit_peak_kib.max(scored.peak_kib));
        let mut all = row(a, "fddb", f, aggregate(&scored.outcomes, scored.compute.clone()), mo);
        all.excluded = Some(excluded);
        all.chance = chance(&train, &eval);
        rows.push(all);
        for (label, held) in PARTS {
            let part = |c: &&Case| c.truth == Class::Normal || c.held_out == held;
            if !eval.iter().filter(part).any(|c| c.truth != Class::Normal) {
                continue;
            }
            let (cases, outcomes): (Vec<Case>, Vec<RunOutcome>) =
                eval.iter().zip(&scored.outcomes).filter(|(c, _)| part(c)).map(|(c, o)| (c.clone(), o.clone())).unzip();
            let mut r = row(a, label, f, aggregate(&outcomes, Vec::new()), mo);
            r.chance = chance(&train, &cases);
            rows.push(r);
        }
    }
    if let (Some(db), Some(runs)) = (&a.live_db, &a.live_runs) {
        let window_ms = Model::load(&a.model)?.manifest.window_ms;
        let mut live = case::from_live(db, runs, window_ms)?;
        mark_root_lines(&a.target, &train, &mut live);
        eprintln!("{} live runs", live.len());
        let online = Fitted { method: Box::new(Online), notes: "the daemon's stored verdicts".into(), fit_peak_kib: 0 };
        for f in fitted.iter().filter(|f| f.method.input() != Input::FullFct).chain([&online]) {
            let scored = score_method(f, &live, &reference, "live runs")?;
            run_lines(&mut lines, f.method.name(), "live", &live, &scored.outcomes)?;
            let mo = if f.method.name() == "AFETM (daemon)" {
                a.daemon_peak_kib
            } else {
                Some(f.fit_peak_kib.max(scored.peak_kib))
            };
            let mut r = row(a, "live", f, aggregate(&scored.outcomes, scored.compute), mo);
            r.chance = chance(&train, &live);
            rows.push(r);
        }
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&rows)?).with_context(|| format!("{}", a.out.display()))?;
    eprintln!("wrote {} rows to {}", rows.len(), a.out.display());
    if let Some(path) = &a.runs_out {
        std::fs::write(path, lines).with_context(|| format!("{}", path.display()))?;
        eprintln!("wrote the runs' outcomes to {}", path.display());
    }
    Ok(())
}

fn fate_rules(gcn: &GcnArgs) -> Result<()> {
    let (train, model) = gcn.load()?;
    let mut m = Afetm::new(model, "AFETM");
    match m.fit_rule(&train)? {
        Some(choice) => {
            eprintln!("{}", choice.notes());
            println!("{}", choice.rules);
        }
        None => anyhow::bail!("the GCN's manifest lists no validation runs (trained before they were recorded)"),
    }
    Ok(())
}

fn fuse(gcn: &GcnArgs, out: &Path) -> Result<()> {
    let (train, model) = gcn.load()?;
    let m = Fused::fit(&train, model)?;
    std::fs::write(out, serde_json::to_string_pretty(m.fusion())?).with_context(|| format!("{}", out.display()))?;
    eprintln!("{} -> {}", m.notes(), out.display());
    Ok(())
}

fn row(a: &ScoreArgs, condition: &str, f: &Fitted, scores: Scores, mo_kib: Option<u64>) -> Row {
    Row {
        target: a.target.clone(),
        budget: a.budget.clone(),
        condition: condition.into(),
        method: f.method.name().to_string(),
        input: f.method.input(),
        scores,
        mo_kib,
        notes: f.notes.clone(),
        excluded: None,
        chance: None,
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
}

/// The rows of every `rows-*.json` in `dir`, files in name order.
fn read_rows(dir: &Path) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("rows-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    for f in &files {
        rows.extend(read_json::<Vec<Row>>(f)?);
    }
    if rows.is_empty() {
        anyhow::bail!("no rows-*.json in {} (run afetm-eval score first)", dir.display());
    }
    Ok(rows)
}

fn write_report(dir: &Path) -> Result<()> {
    let rows = read_rows(dir)?;
    let rtgr: Vec<Rtgr> = if dir.join("rtgr.json").is_file() { read_json(&dir.join("rtgr.json"))? } else { Vec::new() };
    // setup.json (the machine) first, then setup-<target>.json of every target evaluated.
    let mut setup = Setup::default();
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("setup-") && n.ends_with(".json"))
        })
        .collect();
    parts.sort();
    for p in std::iter::once(dir.join("setup.json")).chain(parts).filter(|p| p.is_file()) {
        setup.lines.extend(read_json::<Setup>(&p)?.lines);
    }
    let discussion = report::discussion(&rows, &rtgr);
    report::write(dir, &setup, &rows, &rtgr, &discussion)?;
    eprintln!("wrote {}", dir.join("report.md").display());
    Ok(())
}
