//! `afetm-analyzer`: the analyzer daemon and a small client for it.
use std::{path::PathBuf, time::Duration};

use afetm_analyzer::{
    service::{self, Analyzer},
    store::{Limits, Store, WindowConfig},
    tree::Forest,
};
use afetm_proto::{self as pb, control_client::ControlClient, plan::PlanFile, query_client::QueryClient};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "afetm-analyzer", version, about = "Builds AFCTs from afetm-agent traces and serves them over gRPC")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the analyzer: ingest, query and control services, gRPC health and reflection.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: String,
        /// SQLite database file (created if missing; WAL mode).
        #[arg(long, default_value = "afetm.sqlite")]
        db: PathBuf,
        /// Window length: each process's events are cut into windows this long, one AFCT per
        /// thread and window.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        window: Duration,
        /// A window closes when the agent's clock passes its end by this much.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Largest AFCT, in nodes; bigger ones are cut and marked truncated.
        #[arg(long, default_value_t = afetm_analyzer::afct::DEFAULT_NODE_CAP)]
        node_cap: usize,
        /// Close the open windows of an agent silent this long.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        stale_after: Duration,
    },
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
    /// Print the analyzer's counters.
    Stats {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("afetm-analyzer: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve { listen, db, window, grace, node_cap, stale_after } => {
            if window.is_zero() {
                bail!("--window must be longer than 0");
            }
            let cfg = WindowConfig { len_ns: window.as_nanos() as u64, grace_ns: grace.as_nanos() as u64, node_cap };
            let store = Store::open(&db, cfg, Limits::default())
                .with_context(|| format!("opening database {}", db.display()))?;
            let listener =
                tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            let shutdown = async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
                tracing::info!("shutting down");
            };
            service::serve(Analyzer::new(store), listener, stale_after, shutdown).await
        }
        Cmd::Afcts { server, window, agent } => {
            let mut q = QueryClient::connect(server.clone())
                .await
                .with_context(|| format!("cannot reach analyzer at {server}"))?;
            let windows = q
                .list_windows(pb::ListWindowsRequest { agent_id: agent, pid: 0, closed_only: true })
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
            }
            Ok(())
        }
        Cmd::Color { server, mut windows, agent, check_agent, traced, target, out } => {
            let mut q = QueryClient::connect(server.clone())
                .await
                .with_context(|| format!("cannot reach analyzer at {server}"))?;
            let all = q
                .list_windows(pb::ListWindowsRequest { agent_id: String::new(), pid: 0, closed_only: true })
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
            let mut c = ControlClient::connect(server).await?;
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
            let mut c = ControlClient::connect(server.clone())
                .await
                .with_context(|| format!("cannot reach analyzer at {server}"))?;
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
        Cmd::Stats { server } => {
            let mut q = QueryClient::connect(server.clone())
                .await
                .with_context(|| format!("cannot reach analyzer at {server}"))?;
            let s = q.stats(pb::StatsRequest {}).await?.into_inner();
            println!("{s:#?}");
            Ok(())
        }
    }
}
