//! The log side of the CLI (issue 13): `report` (a window's SOP-structured report),
//! `feedback` (an engineer's verdict on a window or a line), `logs` (a window's lines) and
//! `train-logs` (Chimera trained on the FDDB's runs and the analyzer's judged windows).

use std::path::{Path, PathBuf};

use afetm_analyzer::{
    reporting::by_file,
    store::{Limits, Store, WindowConfig},
};
use afetm_fddb::{Fddb, Role};
use afetm_logdiag::{
    chimera::Config,
    model::{LogModel, Window},
};
use afetm_proto::{self as pb, query_client::QueryClient};
use anyhow::{Context, Result, bail};

/// `afetm-analyzer report --window ID`.
#[derive(clap::Args)]
pub struct ReportArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The window (`afetm-analyzer diagnoses` lists them).
    #[arg(long)]
    window: u64,
    /// Historical cases to list.
    #[arg(long, default_value_t = 5)]
    similar: u32,
    /// Print the report as JSON (the gRPC message) instead of markdown.
    #[arg(long)]
    json: bool,
}

/// `afetm-analyzer feedback --window ID [--line TEXT] --confirm|--reject`.
#[derive(clap::Args)]
pub struct FeedbackArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long)]
    window: u64,
    /// A log line of the window as the report shows it; without it the verdict is on the
    /// window.
    #[arg(long, default_value = "")]
    line: String,
    /// The line is a root cause (or the window is in error).
    #[arg(long, conflicts_with = "reject", required_unless_present = "reject")]
    confirm: bool,
    /// The line is not a root cause (or the window is normal).
    #[arg(long)]
    reject: bool,
    #[arg(long, default_value = "")]
    note: String,
    /// The root cause, `function/kind` (what `ask` wants to know; LogSage learns from it).
    #[arg(long, default_value = "")]
    cause: String,
}

/// `afetm-analyzer ask`: the windows whose root cause LogSage is least sure of, to judge first.
#[derive(clap::Args)]
pub struct AskArgs {
    /// The analyzer's database (its closed windows are the cases to ask about).
    #[arg(long)]
    db: PathBuf,
    /// Only this agent's windows.
    #[arg(long, default_value = "")]
    agent: String,
    /// The campaign's FDDB: its training runs are the labelled cases.
    #[arg(long)]
    fddb: PathBuf,
    /// The target's name in the FDDB.
    #[arg(long)]
    target: String,
    /// The plan the agent runs (the FDDB's trees become the AFCTs it would give).
    #[arg(long)]
    plan: PathBuf,
    /// How many windows to ask about.
    #[arg(long, default_value_t = 5)]
    count: usize,
}

/// `afetm-analyzer train-logs`.
#[derive(clap::Args)]
pub struct TrainLogsArgs {
    /// The campaign's FDDB: each training run is one window (a fault run anomalous).
    #[arg(long)]
    fddb: PathBuf,
    /// The target's name in the FDDB.
    #[arg(long)]
    target: String,
    /// The analyzer's database: windows an engineer judged (`feedback`) join the training
    /// set with their verdicts.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Model directory to write (`serve --log-model` reads it).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = Config::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = Config::default().seed)]
    seed: u64,
}

async fn query(server: &str) -> Result<QueryClient<afetm_auth::AuthChannel>> {
    crate::cli_client::query(server).await
}

pub async fn report(a: ReportArgs) -> Result<()> {
    let r = query(&a.server)
        .await?
        .report(pb::ReportRequest { window_id: a.window, similar: a.similar })
        .await
        .with_context(|| format!("report of window {}", a.window))?
        .into_inner();
    if a.json {
        let v = serde_json::json!({
            "window_id": r.window_id, "agent_id": r.agent_id, "pid": r.pid, "error": r.error,
            "p_error": r.p_error, "title": r.title, "symptoms": r.symptoms, "process": r.process,
            "causes": r.causes.iter().map(|c| serde_json::json!({"function": c.function, "kind": c.kind, "confidence": c.confidence, "evidence": c.evidence})).collect::<Vec<_>>(),
            "similar": r.similar.iter().map(|s| serde_json::json!({"run": s.run, "function": s.function, "fault": s.fault, "manifestation": s.manifestation, "similarity": s.similarity, "line": s.line})).collect::<Vec<_>>(),
            "checks": r.checks, "resolution": r.resolution, "sop": r.sop,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", r.markdown);
    }
    Ok(())
}

pub async fn feedback(a: FeedbackArgs) -> Result<()> {
    let mut c = crate::cli_client::control(&a.server)
        .await
        .with_context(|| format!("cannot reach analyzer at {}", a.server))?;
    let req = pb::FeedbackRequest {
        window_id: a.window,
        line: a.line.clone(),
        confirm: a.confirm,
        note: a.note,
        cause: a.cause,
    };
    let id = c.feedback(req).await.context("feedback")?.into_inner().id;
    let on = if a.line.is_empty() { format!("window {}", a.window) } else { format!("a line of window {}", a.window) };
    println!(
        "feedback {id} stored ({} on {on}); `afetm-analyzer train-logs --db` uses it",
        if a.confirm { "confirmed" } else { "rejected" }
    );
    Ok(())
}

pub async fn logs(server: &str, window: u64) -> Result<()> {
    let lines = query(server).await?.window_logs(pb::WindowLogsRequest { window_id: window }).await?.into_inner().lines;
    for l in &lines {
        println!("{} {}: {}", l.ts_ns, l.file, l.text);
    }
    eprintln!("{} line(s)", lines.len());
    Ok(())
}

/// A case of the graph: its logs, its trees and its class (if known).
struct AskCase {
    logs: Vec<(String, String)>,
    trees: Vec<pb::Tree>,
    label: Option<usize>,
    window: Option<pb::WindowInfo>,
}

/// The FDDB's training runs as labelled cases, with the AFCTs the plan's agent would give; the
/// class names (`normal`, then `function/kind`).
fn fddb_cases(path: &Path, target: &str, plan: &Path) -> Result<(Vec<AskCase>, Vec<String>)> {
    let db = Fddb::open(path).with_context(|| format!("FDDB {}", path.display()))?;
    let text = std::fs::read_to_string(plan).with_context(|| format!("plan {}", plan.display()))?;
    let plan = afetm_proto::plan::PlanFile::parse(&text).with_context(|| format!("plan {}", plan.display()))?;
    let mut classes = vec!["normal".to_string()];
    let mut cases = Vec::new();
    let mut index = std::collections::HashMap::new();
    for r in db.valid_runs(target, Role::Train)? {
        let class = r.fault.as_ref().map_or("normal".to_string(), |(f, k, _)| format!("{f}/{k}"));
        let label = classes.iter().position(|c| *c == class).unwrap_or_else(|| {
            classes.push(class.clone());
            classes.len() - 1
        });
        index.insert(r.id, cases.len());
        cases.push(AskCase { logs: db.run_logs(r.id)?, trees: vec![], label: Some(label), window: None });
    }
    let opts = afetm_fddb::dataset::DatasetOptions { role: Some(Role::Train), plan: Some(plan) };
    db.for_each_tree(target, &opts, |row| {
        if let Some(&i) = index.get(&row.run) {
            cases[i].trees.push(row.forest.to_proto(row.table));
        }
        Ok(())
    })?;
    Ok((cases, classes))
}

/// The analyzer's closed windows as cases; an engineer's cause (or "normal" verdict) labels one.
fn live_cases(path: &Path, agent: &str, classes: &[String]) -> Result<Vec<AskCase>> {
    let store = Store::open(path, WindowConfig::default(), Limits::default())
        .with_context(|| format!("opening database {}", path.display()))?;
    let mut label: std::collections::HashMap<u64, usize> = Default::default();
    for f in store.feedback()?.into_iter().filter(|f| f.line.is_empty()) {
        let class = if !f.confirm { Some(0) } else { classes.iter().position(|c| *c == f.cause) };
        if let Some(c) = class {
            label.insert(f.window_id, c);
        }
    }
    let mut out = Vec::new();
    for w in store.list_windows(&pb::ListWindowsRequest {
        agent_id: agent.to_string(),
        closed_only: true,
        ..Default::default()
    })? {
        let mut trees = Vec::new();
        for tid in &w.tids {
            trees.extend(store.afct(w.id, *tid)?);
        }
        let logs = by_file(&store.window_logs(w.id)?);
        out.push(AskCase { logs, trees, label: label.get(&w.id).copied(), window: Some(w) });
    }
    Ok(out)
}

pub fn ask(a: &AskArgs) -> Result<()> {
    use afetm_logdiag::logsage::{cases::CaseBuilder, garca};
    let (mut cases, classes) = fddb_cases(&a.fddb, &a.target, &a.plan)?;
    cases.extend(live_cases(&a.db, &a.agent, &classes)?);
    if cases.iter().all(|c| c.window.is_none()) {
        bail!(
            "{} has no closed window{}",
            a.db.display(),
            if a.agent.is_empty() { String::new() } else { format!(" of agent {:?}", a.agent) }
        );
    }
    let mut b = CaseBuilder::fit(cases.iter().map(|c| c.logs.as_slice()));
    let raws: Vec<garca::Case> =
        cases.iter().map(|c| garca::Case { label: c.label, ..b.raw(&c.logs, &c.trees, 0).0 }).collect();
    b.centre_on(&raws);
    let graph: Vec<garca::Case> = raws.into_iter().map(|c| b.centred(c)).collect();
    let model = garca::Garca::train(graph, classes.len(), garca::Config::default()).context("training GARCA")?;
    let p = model.probabilities()?;
    println!(
        "GARCA over {} cases ({} edges); ask about these windows first (most uncertain first):",
        cases.len(),
        model.edge_count()
    );
    for i in model.query(a.count)? {
        let Some(w) = &cases[i].window else { continue };
        let mut order: Vec<usize> = (0..classes.len()).collect();
        order.sort_by(|x, y| p[i][*y].total_cmp(&p[i][*x]));
        let guess: Vec<String> = order.iter().take(2).map(|c| format!("{} {:.2}", classes[*c], p[i][*c])).collect();
        println!(
            "  window {} (agent {}, pid {}): {}; judge it: afetm-analyzer feedback --window {} --confirm --cause FUNCTION/KIND (or --reject if normal)",
            w.id,
            w.agent_id,
            w.pid,
            guess.join(", "),
            w.id
        );
    }
    Ok(())
}

/// The FDDB's training runs of `target` as windows.
fn fddb_windows(path: &Path, target: &str) -> Result<Vec<Window>> {
    let db = Fddb::open(path).with_context(|| format!("FDDB {}", path.display()))?;
    let mut out = Vec::new();
    for r in db.valid_runs(target, Role::Train)? {
        out.push(Window { logs: db.run_logs(r.id)?, anomalous: r.fault.is_some(), lines: vec![] });
    }
    Ok(out)
}

/// The analyzer's windows with feedback: the last verdict on a window sets its label (a
/// window with only line verdicts counts as anomalous when one confirms a line).
fn judged_windows(path: &Path) -> Result<Vec<Window>> {
    let store = Store::open(path, WindowConfig::default(), Limits::default())
        .with_context(|| format!("opening database {}", path.display()))?;
    let mut by_window: std::collections::BTreeMap<u64, (Option<bool>, Vec<(String, bool)>)> = Default::default();
    for f in store.feedback()? {
        let e = by_window.entry(f.window_id).or_default();
        if f.line.is_empty() {
            e.0 = Some(f.confirm);
        } else {
            e.1.retain(|(l, _)| *l != f.line);
            e.1.push((f.line, f.confirm));
        }
    }
    let mut out = Vec::new();
    for (id, (label, lines)) in by_window {
        let logs = by_file(&store.window_logs(id)?);
        let anomalous = label.unwrap_or_else(|| lines.iter().any(|(_, c)| *c));
        out.push(Window { logs, anomalous, lines });
    }
    Ok(out)
}

pub fn train_logs(a: &TrainLogsArgs) -> Result<()> {
    let mut windows = fddb_windows(&a.fddb, &a.target)?;
    let from_fddb = windows.len();
    if let Some(db) = &a.db {
        windows.extend(judged_windows(db)?);
    }
    if windows.is_empty() {
        bail!("no training run of {:?} in {} and no judged window", a.target, a.fddb.display());
    }
    let judged = windows.len() - from_fddb;
    let t = std::time::Instant::now();
    let cfg = Config { epochs: a.epochs, seed: a.seed, ..Config::default() };
    let model = LogModel::fit(&windows, cfg).context("training Chimera")?;
    model.save(&a.out)?;
    println!(
        "Chimera trained on {from_fddb} FDDB runs and {judged} judged windows ({} templates) in {:.1} s -> {}",
        model.templates.len(),
        t.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
