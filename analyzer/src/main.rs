//! `afetm-analyzer`: the analyzer daemon and a small client for it.
use std::{path::PathBuf, time::Duration};

use afetm_analyzer::tree::Forest;
use afetm_diagnosis::train::TrainConfig;
use afetm_proto::{self as pb, plan::PlanFile};
use afetm_selection::weights::Weights;
use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[path = "cli/client.rs"]
mod cli_client;
#[path = "cli/diagnosis.rs"]
mod cli_diagnosis;
#[path = "cli/export.rs"]
mod cli_export;
#[path = "cli/logs.rs"]
mod cli_logs;
#[path = "cli/select.rs"]
mod cli_select;
#[path = "cli/serve.rs"]
mod cli_serve;

#[derive(Parser)]
#[command(name = "afetm-analyzer", version, about = "Builds AFCTs from afetm-agent traces and serves them over gRPC")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Clients: the CA (PEM) that signed the analyzer's certificate, for `https://` servers.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Clients: a file holding the bearer token to send (first line).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Plaintext gRPC to (clients) or on (`serve`) a non-loopback address; refused otherwise.
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the analyzer: ingest, query and control services, gRPC health and reflection.
    Serve(cli_serve::ServeArgs),
    /// A window's report: symptoms, diagnostic process, root causes, similar historical cases
    /// (with `serve --fddb`) and the resolution steps of its fault kind's SOP.
    Report(cli_logs::ReportArgs),
    /// An engineer's verdict on a window or on one of its log lines; used by `train-logs`.
    Feedback(cli_logs::FeedbackArgs),
    /// Print the log lines the agent tailed during a window.
    Logs {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[arg(long)]
        window: u64,
    },
    /// Train Chimera (the log model) on the FDDB's runs and the judged windows.
    TrainLogs(cli_logs::TrainLogsArgs),
    /// Active learning (LogSage's GARCA): the closed windows whose root cause is least certain,
    /// to judge first with `feedback --cause`.
    Ask(cli_logs::AskArgs),
    /// Train the diagnosis GCN on an FDDB's training runs of one target under a plan.
    Train {
        #[arg(long)]
        fddb: PathBuf,
        /// The FDDB target (e.g. redis).
        #[arg(long)]
        target: String,
        /// The plan the agent will run (`afetm-analyzer select --out`).
        #[arg(long)]
        plan: PathBuf,
        /// Model directory to write (manifest.json + model.safetensors).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = TrainConfig::default().seed)]
        seed: u64,
        /// Most epochs (training stops early when validation stops improving).
        #[arg(long, default_value_t = TrainConfig::default().epochs)]
        epochs: usize,
        /// Epochs without improvement before stopping.
        #[arg(long, default_value_t = TrainConfig::default().patience)]
        patience: usize,
        /// Leave out the deviation-from-normal features (the ablation): nodes are not
        /// compared with the training normal runs' profile.
        #[arg(long)]
        no_deviation: bool,
        /// Train on at most N faulty windows per run and thread, the first ones (the
        /// ablation of several faulty windows per run; default: all).
        #[arg(long)]
        faulty_windows: Option<usize>,
    },
    /// Diagnose stored AFCTs with a loaded model (Query.Diagnose): every thread of a window,
    /// or one; prints the verdict and the AFCT with the suspects marked.
    Diagnose {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[arg(long)]
        window: u64,
        /// Only this thread (default: every thread of the window).
        #[arg(long)]
        tid: Option<u32>,
        /// The model's target name (default: the only model loaded).
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long, default_value_t = 3)]
        top_k: u32,
    },
    /// Print the stored diagnoses, one line per window; --follow prints new ones as they come.
    Diagnoses {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[arg(long, default_value = "")]
        agent: String,
        /// Only windows in error.
        #[arg(long)]
        errors: bool,
        #[arg(long)]
        follow: bool,
        /// How many stored diagnoses to print first (newest).
        #[arg(long, default_value_t = 50)]
        last: u32,
        /// Only this window.
        #[arg(long, default_value_t = 0)]
        window: u64,
        /// Also print each diagnosed thread's AFCT with the suspects marked.
        #[arg(long)]
        tree: bool,
    },
    /// A window's AFCTs as Graphviz DOT, SVG, or Chrome trace JSON (ui.perfetto.dev); the
    /// diagnosis's top suspect is marked.
    Export(cli_export::ExportArgs),
    /// Print stored AFCTs.
    Afcts {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Only this window (default: every closed window).
        #[arg(long)]
        window: Option<u64>,
        /// Only windows of this agent.
        #[arg(long, default_value = "")]
        agent: String,
    },
    /// Color stored normal FCTs against a trace point set (Alg. 2) and write the plan.
    Color {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Windows whose AFCTs are the normal FCTs (all their threads).
        #[arg(long = "window", required_unless_present = "agent")]
        windows: Vec<u64>,
        /// Use every closed window of this agent as the normal FCTs.
        #[arg(long)]
        agent: Option<String>,
        /// Afterwards, check that this agent's AFCTs equal the masked colored FCTs (the
        /// paper's equivalence claim) and say where they differ.
        #[arg(long)]
        check_agent: Option<String>,
        /// The trace point set F, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        traced: Vec<String>,
        /// Target binary for the plan.
        #[arg(long)]
        target: PathBuf,
        /// Where to write the plan (JSON); `-` for stdout.
        #[arg(long, default_value = "-")]
        out: String,
    },
    /// Push a plan to a connected agent.
    SetPlan {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        plan: PathBuf,
    },
    /// The blocks and call sites of an ELF binary or library (AFETM's set B and h_ij, read
    /// from machine code): counts per module, and optionally the structure as JSON.
    Structure {
        /// ELF file (executable or shared library).
        elf: PathBuf,
        /// Write the structure here (JSON) for the selector.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the weights file (w_j, calls per second) from the counts an agent in count mode
    /// sent during a sampling period.
    Weights {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// The agent that counted.
        #[arg(long)]
        agent: String,
        /// Module whose functions are weighed (the traced file's name, e.g. redis-server).
        #[arg(long)]
        module: String,
        /// Length of the sampling period (the agent's counts are divided by it).
        #[arg(long, value_parser = humantime::parse_duration)]
        period: Duration,
        /// What load ran, recorded in the file.
        #[arg(long, default_value = "")]
        workload: String,
        /// Requests the workload completed during the period: with `--real-rps`, weights are
        /// calls per request scaled to the untraced rate (counting every function slows the
        /// workload down, so raw calls per second understate the real load).
        #[arg(long, requires = "real_rps")]
        requests: Option<u64>,
        /// The workload's untraced request rate (see `--requests`).
        #[arg(long, requires = "requests")]
        real_rps: Option<f64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Trace point selection (Alg. 1, MMAS) for a binary under sampled weights; writes the plan.
    /// With normal FCTs (`--db` and `--normal-agent`) coloring them (Alg. 2) gives F^callstack.
    Select(cli_select::SelectArgs),
    /// The FDDB: per-target summary, export to JSON lines, import (merge), training dataset.
    Fddb {
        #[arg(long, default_value = "fddb.sqlite")]
        db: PathBuf,
        #[command(subcommand)]
        op: FddbOp,
    },
    /// Print the analyzer's counters.
    Stats {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
    },
}

#[derive(Subcommand)]
enum FddbOp {
    /// Figures per target.
    Summary,
    /// Write the content as JSON lines.
    Export { out: PathBuf },
    /// Merge an export into this FDDB.
    Import { file: PathBuf },
    /// One FCT (full-trace call tree) as Graphviz DOT or SVG.
    Fct(cli_export::FctArgs),
    /// One JSON line per tree of the target's valid runs, labelled (see the fddb crate's
    /// `dataset` docs); with --plan, colored against the plan (Alg. 2) with red nodes masked.
    Dataset {
        #[arg(long)]
        target: String,
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Only training or only evaluation runs.
        #[arg(long)]
        role: Option<afetm_fddb::Role>,
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) fn parse_budget(s: &str) -> Result<f64, String> {
    let (num, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 0.01),
        None => (s, 1.0),
    };
    let p = num.trim().parse::<f64>().map_err(|e| format!("{s:?}: {e}"))? * scale;
    if p > 0.0 && p <= 1.0 { Ok(p) } else { Err(format!("{s:?}: the budget must be in (0, 100%]")) }
}

fn main() {
    // candle runs on one thread unless asked otherwise: training is then deterministic for a
    // seed, and small graphs run faster without the thread pool's overhead.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    // candle allocates and frees a few-MB tensor per op: with glibc's default dynamic mmap
    // threshold each of them is a fresh mmap and page faults (training spent 40% in the
    // kernel). Keep such blocks in the heap instead.
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("afetm-analyzer: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async_main());
}

async fn async_main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (cli, shown) = parse_layered();
    if let Some(text) = shown {
        print!("{text}");
        return;
    }
    if let Err(e) = run(cli).await {
        eprintln!("afetm-analyzer: {e:#}");
        std::process::exit(1);
    }
}

/// The command line over the config file and `AFETM_*` (see `afetm-config`), and the effective
/// configuration when `serve --print-config` asked for it.
fn parse_layered() -> (Cli, Option<String>) {
    let cmd = Cli::command();
    let layered = afetm_config::layered_args(&cmd);
    let matches = cmd.clone().get_matches_from(&layered.args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let shown = match &cli.cmd {
        Cmd::Serve(a) if a.print_config => Some(afetm_config::effective(&cmd, &matches, &layered)),
        _ => None,
    };
    (cli, shown)
}

async fn run(cli: Cli) -> Result<()> {
    let token = afetm_auth::ClientAuth::token_from(cli.token_file.as_deref())?;
    cli_client::init(afetm_auth::ClientAuth { ca: cli.tls_ca.clone(), identity: None, token, insecure: cli.insecure });
    match cli.cmd {
        Cmd::Train { fddb, target, plan, out, seed, epochs, patience, no_deviation, faulty_windows } => {
            let cfg = TrainConfig { seed, epochs, patience, deviation: !no_deviation, ..Default::default() };
            let set = afetm_analyzer::training::SetOptions { faulty_windows };
            tokio::task::spawn_blocking(move || cli_diagnosis::train(&fddb, &target, &plan, &out, &set, &cfg)).await?
        }
        Cmd::Diagnose { server, window, tid, model, top_k } => {
            cli_diagnosis::diagnose_stored(&server, window, tid, model, top_k).await
        }
        Cmd::Diagnoses { server, agent, errors, follow, last, window, tree } => {
            let listing = cli_diagnosis::Listing { agent, window, errors, follow, last, tree };
            cli_diagnosis::diagnoses(&server, listing).await
        }
        Cmd::Report(a) => cli_logs::report(a).await,
        Cmd::Feedback(a) => cli_logs::feedback(a).await,
        Cmd::Logs { server, window } => cli_logs::logs(&server, window).await,
        Cmd::TrainLogs(a) => tokio::task::spawn_blocking(move || cli_logs::train_logs(&a)).await?,
        Cmd::Ask(a) => tokio::task::spawn_blocking(move || cli_logs::ask(&a)).await?,
        Cmd::Export(args) => cli_export::run(args).await,
        Cmd::Serve(args) => cli_serve::run(args, cli.insecure).await,
        Cmd::Afcts { server, window, agent } => {
            let mut q = cli_client::query(&server).await?;
            let windows = q
                .list_windows(pb::ListWindowsRequest { agent_id: agent, closed_only: true, ..Default::default() })
                .await?
                .into_inner()
                .windows;
            for w in windows.iter().filter(|w| window.is_none_or(|id| id == w.id)) {
                for tid in &w.tids {
                    let afct = q.get_afct(pb::GetAfctRequest { window_id: w.id, tid: *tid }).await?.into_inner();
                    let nodes = afct.tree.map(|t| t.nodes.len()).unwrap_or(0);
                    println!(
                        "== window {} agent {} pid {} tid {} ({} events, {nodes} nodes)",
                        w.id, w.agent_id, w.pid, tid, w.events
                    );
                    print!("{}", afct.text);
                }
                print_fates(w);
            }
            Ok(())
        }
        Cmd::Color { server, mut windows, agent, check_agent, traced, target, out } => {
            let mut q = cli_client::query(&server).await?;
            let all = q
                .list_windows(pb::ListWindowsRequest { closed_only: true, ..Default::default() })
                .await?
                .into_inner()
                .windows;
            if let Some(a) = &agent {
                windows.extend(all.iter().filter(|w| w.agent_id == *a).map(|w| w.id));
                if windows.is_empty() {
                    bail!("agent {a:?} has no closed windows");
                }
            }
            let mut fcts = Vec::new();
            for id in &windows {
                let w = all
                    .iter()
                    .find(|w| w.id == *id)
                    .with_context(|| format!("window {id} is unknown or still open"))?;
                fcts.extend(w.tids.iter().map(|tid| pb::FctRef { window_id: *id, tid: *tid }));
            }
            let mut c = cli_client::control(&server).await?;
            let resp = c.color(pb::ColorRequest { fcts, traced }).await?.into_inner();
            let mut plan = resp.plan.context("analyzer returned no plan")?;
            plan.target_path = target.to_string_lossy().into_owned();
            let file = PlanFile::from_proto(&plan)?;
            let json = serde_json::to_string_pretty(&file)?;
            eprintln!("F^callstack = {:?}", resp.callstack);
            if out == "-" {
                println!("{json}");
            } else {
                std::fs::write(&out, json + "\n").with_context(|| format!("writing {out}"))?;
            }
            if let Some(check) = check_agent {
                let mut table = afetm_analyzer::tree::FuncTable::default();
                let masked = resp
                    .colored
                    .iter()
                    .map(|t| Forest::from_proto(t, &mut table).map(|f| afetm_analyzer::coloring::mask_red(&f)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(anyhow::Error::msg)?;
                let mut afcts = Vec::new();
                for w in all.iter().filter(|w| w.agent_id == check) {
                    for tid in &w.tids {
                        let t = q
                            .get_afct(pb::GetAfctRequest { window_id: w.id, tid: *tid })
                            .await?
                            .into_inner()
                            .tree
                            .unwrap_or_default();
                        afcts.push(Forest::from_proto(&t, &mut table).map_err(anyhow::Error::msg)?);
                    }
                }
                if afcts.is_empty() {
                    bail!("agent {check:?} has no closed windows to check");
                }
                let problems = afetm_analyzer::coloring::compare_threads(&masked, &afcts, &table);
                if problems.is_empty() {
                    println!("equivalent: the {} AFCTs of {check} equal the masked colored FCTs", afcts.len());
                } else {
                    for p in &problems {
                        println!("differs: {p}");
                    }
                    bail!("{} thread(s) differ", problems.len());
                }
            }
            Ok(())
        }
        Cmd::SetPlan { server, agent, plan } => {
            let text = std::fs::read_to_string(&plan).with_context(|| format!("reading {}", plan.display()))?;
            let file = PlanFile::parse(&text).with_context(|| format!("in {}", plan.display()))?;
            let mut c = cli_client::control(&server).await?;
            let r = c.set_plan(pb::SetPlanRequest { agent_id: agent, plan: Some(file.to_proto()) }).await?.into_inner();
            println!("delivered to {} agent connection(s)", r.delivered);
            Ok(())
        }
        Cmd::Structure { elf, out } => {
            let module =
                afetm_elf::symbols::Module::load(&elf).with_context(|| format!("reading {}", elf.display()))?;
            let s = afetm_elf::structure::analyze(&module);
            let c = &s.counts;
            let covered_fns = s.covers.iter().filter(|c| !c.is_empty()).count();
            println!(
                "{}: {} functions ({} called directly somewhere), {} blocks, {} call edges ({} through its own PLT), {} PLT calls to {} imports, {} indirect calls, {} unresolved",
                s.module,
                c.functions,
                covered_fns,
                c.blocks,
                c.call_edges,
                c.own_plt_calls,
                c.plt_calls,
                s.imports.len(),
                c.indirect_calls,
                c.unresolved_calls
            );
            if let Some(path) = out {
                std::fs::write(&path, serde_json::to_vec(&s)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Cmd::Weights { server, agent, module, period, workload, requests, real_rps, out } => {
            let mut q = cli_client::query(&server).await?;
            let counts = q.counts(pb::CountsRequest { agent_id: agent.clone() }).await?.into_inner().counts;
            let mut w = Weights::from_counts(&module, &counts, period.as_secs_f64(), &workload)
                .with_context(|| format!("agent {agent:?}"))?;
            if let (Some(n), Some(rps)) = (requests, real_rps) {
                w.scale_to(n, rps)?;
            }
            std::fs::write(&out, serde_json::to_string_pretty(&w)? + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
            let total: f64 = w.functions.values().map(|f| f.per_sec).sum();
            println!(
                "{}: {} functions called, {total:.0} calls/s in all over {:.1} s -> {}",
                w.module,
                w.functions.len(),
                w.period_s,
                out.display()
            );
            Ok(())
        }
        Cmd::Select(args) => cli_select::select(args),
        Cmd::Fddb { db, op } => {
            if !db.exists() {
                bail!("no FDDB at {} (run a campaign first, or give --db)", db.display());
            }
            let mut f = afetm_fddb::Fddb::open(&db)?;
            match op {
                FddbOp::Summary => {
                    for t in f.targets()? {
                        let id = f.target_id(&t)?.context("target vanished")?;
                        println!("{t}: {}", serde_json::to_string(&f.summary(id)?)?);
                    }
                }
                FddbOp::Export { out } => println!("{} lines -> {}", f.export(&out)?, out.display()),
                FddbOp::Import { file } => println!("{} lines merged from {}", f.import(&file)?, file.display()),
                FddbOp::Fct(a) => cli_export::fct(&f, &a)?,
                FddbOp::Dataset { target, plan, role, out } => {
                    let plan = match plan {
                        Some(p) => Some(
                            PlanFile::parse(
                                &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                            )
                            .with_context(|| format!("plan {}", p.display()))?,
                        ),
                        None => None,
                    };
                    let file = std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    let opts = afetm_fddb::dataset::DatasetOptions { role, plan };
                    let stats = f.dataset(&target, &opts, &mut w)?;
                    std::io::Write::flush(&mut w)?;
                    println!(
                        "{} trees ({} faulty, {} of them normal-like; {} masked to nothing) -> {}",
                        stats.trees,
                        stats.faulty,
                        stats.normal_like,
                        stats.empty,
                        out.display()
                    );
                }
            }
            Ok(())
        }
        Cmd::Stats { server } => {
            let mut q = cli_client::query(&server).await?;
            let s = q.stats(pb::StatsRequest {}).await?.into_inner();
            println!("{s:#?}");
            Ok(())
        }
    }
}

/// The fates of a window's threads, one line each, after its AFCTs.
fn print_fates(w: &pb::WindowInfo) {
    for f in &w.fates {
        let kind = pb::FateKind::try_from(f.kind).map_or("unknown", |k| k.as_str_name());
        let kind = kind.trim_start_matches("FATE_KIND_").to_lowercase();
        let code = match kind.as_str() {
            "exited" => format!(" status {}", f.code),
            "killed" | "stopped" => format!(" by signal {}{}", f.code, if f.took_signal { " (its own)" } else { "" }),
            _ => String::new(),
        };
        let at = if f.stack.is_empty() { String::new() } else { format!(" in {}", f.stack.join(" <- ")) };
        println!("-- tid {} {kind}{code}{at}; last calls: {}", f.tid, f.last_calls.join(" -> "));
    }
}
