//! `afetm-agent`: traces the functions of a plan with uprobes and streams (function, caller,
//! callstack) events to the analyzer.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use afetm_agent::{
    calibrate,
    governor::{Action, Governor, GovernorConfig},
    logtail::{self, LogQueue},
    metrics::metrics,
    reader::{Reader, ReaderConfig},
    tracer::{self, Target, Tracer},
    transport::{self, Outbox},
};
use afetm_proto::{self as pb, plan::PlanFile};
use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches, Parser};
use tokio::sync::{mpsc, watch};

#[derive(Parser, Debug)]
#[command(
    name = "afetm-agent",
    version,
    about = "Traces a plan's functions with uprobes and streams the calls to the afetm analyzer"
)]
struct Cli {
    /// A TOML file whose keys are these flags' long names with `_` (`queue_events = 500000`,
    /// `log = ["/var/log/a.log"]`); `AFETM_<KEY>` variables override it and flags override
    /// both. Also `AFETM_CONFIG`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the configuration the agent would run with (each value's source marked) and exit.
    #[arg(long)]
    print_config: bool,
    /// Plan file (JSON): target and trace points; see the README.
    #[arg(long, required_unless_present_any = ["calibrate", "calibration_loop", "print_config"])]
    plan: Option<PathBuf>,
    /// Measure what a probe costs on this host (per mode, emulated and single-stepped probe
    /// sites), write it to this file (`afetm-analyzer select --costs` reads it) and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "plan")]
    calibrate: Option<PathBuf>,
    /// Internal: the calibration's traced loop (site, calls, depth).
    #[arg(long, hide = true, num_args = 3, value_names = ["SITE", "CALLS", "DEPTH"])]
    calibration_loop: Option<Vec<String>>,
    /// Analyzer gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    analyzer: String,
    /// The CA (PEM) that signed the analyzer's certificate, for an `https://` analyzer.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This agent's client certificate (PEM) for mTLS; with `--tls-key`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A file holding the bearer token (role `agent` or `control`) to send, first line.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Send plaintext gRPC to a non-loopback analyzer (refused otherwise).
    #[arg(long)]
    insecure: bool,
    /// Name this agent reports (default: hostname/target basename).
    #[arg(long)]
    agent_id: Option<String>,
    /// Most events held for the analyzer while it is slow or unreachable; the oldest go first
    /// (an event takes about 100 bytes, more with a call stack).
    #[arg(long, default_value_t = 500_000)]
    queue_events: usize,
    /// Bytes of user stack copied per call-stack event and per fate stack (64..=16384).
    #[arg(long, default_value_t = agent_common::DEFAULT_STACK_WINDOW)]
    stack_window: u32,
    /// Overload control: when the ring buffer overflows, lower the hottest functions' modes
    /// (call stack -> event -> count) until drops stop, and restore them one at a time after
    /// 5 s without drops. Demotions are logged and in the plan report.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    overload_control: bool,
    /// Ring buffer between the probes and the agent, MiB (a power of two); a bigger one rides
    /// out longer bursts before the kernel drops.
    #[arg(long, default_value_t = 16)]
    ring_mib: u32,
    /// Test knob: the ring buffer in KiB instead (a power of two, >= 4), to force overflows.
    #[arg(long, hide = true)]
    ring_kib: Option<u32>,
    /// Test knob: how often the reader drains the ring buffer.
    #[arg(long, hide = true, default_value = "5ms", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Test knob: drop-free time before overload control restores a mode.
    #[arg(long, hide = true, default_value = "5s", value_parser = humantime::parse_duration)]
    overload_calm: Duration,
    /// Unwind call stacks in the kernel, from unwind steps learnt from earlier stack copies
    /// (a few hundred bytes per call-stack event instead of the window, and no unwinding here);
    /// `false` copies the window for every call-stack event. Both give the same call stacks.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kernel_unwind: bool,
    /// A log file to tail beside the traces (repeatable): its new lines go to the analyzer in
    /// the same stream, stamped with the agent clock, and land in the windows they were
    /// written in. Rotation and truncation are followed.
    #[arg(long = "log", value_name = "FILE")]
    logs: Vec<PathBuf>,
    /// Most log lines held for the next batch; the oldest go first.
    #[arg(long, default_value_t = 100_000)]
    log_queue: usize,
    /// How often the log files are read.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    log_poll: Duration,
    /// Serve Prometheus metrics (`afetm_agent_*`) on this address, at `/metrics`; e.g.
    /// `127.0.0.1:9431`. Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Write this file once every probe is attached (for scripts and tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Print the probe address chosen for every function.
    #[arg(long)]
    print_probes: bool,
    /// Resolve the plan and print the probe sites without attaching anything (no root needed).
    #[arg(long)]
    dry_run: bool,
    /// Give up sending after shutdown once this much time has passed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Longest time an event waits in the agent before it is sent (smaller: fresher windows,
    /// more batches).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    flush: Duration,
    /// Test knob: hold each link handover in its middle phase this long (widens the window in
    /// which both links record, so a test can check that no call is lost or doubled there).
    #[arg(long, hide = true, default_value = "0ms", value_parser = humantime::parse_duration)]
    handover_hold: Duration,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cmd = Cli::command();
    let layered = afetm_config::layered_args(&cmd);
    let matches = cmd.clone().get_matches_from(&layered.args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.print_config {
        print!("{}", afetm_config::effective(&cmd, &matches, &layered));
        return;
    }
    if let Err(e) = run(cli) {
        eprintln!("afetm-agent: {e:#}");
        std::process::exit(1);
    }
}

fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (loading uprobe programs needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)");
    }
    let tracefs = ["/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events"];
    if !tracefs.iter().any(|p| Path::new(p).exists()) {
        bail!("tracefs is not mounted: mount -t tracefs tracefs /sys/kernel/tracing (cargo xtask setup does it)");
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        bail!("this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe/type): CONFIG_UPROBE_EVENTS is off");
    }
    Ok(())
}

fn print_probes(report: &pb::PlanReport) {
    println!("{:<40} {:>18} {:>18} {:<9} instruction", "function", "entry", "probe", "cost");
    for p in &report.probes {
        let cost = if p.emulated { "emulated" } else { "1-step" };
        println!("{:<40} {:>#18x} {:>#18x} {:<9} {}", p.function, p.entry, p.probe, cost, p.instruction);
    }
}

fn summary(report: &pb::PlanReport) -> (usize, usize, usize) {
    let moved = report.probes.iter().filter(|p| p.probe != p.entry).count();
    let emulated = report.probes.iter().filter(|p| p.emulated).count();
    (report.probes.len(), emulated, moved)
}

/// CPU time (user + system) of this process so far, ms (every thread: reader, transport,
/// encoding, overload control).
fn process_cpu_ms() -> u64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes into the struct we own.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// The ring buffer size the flags ask for, checked.
fn ring_bytes(cli: &Cli) -> Result<u32> {
    let bytes = match cli.ring_kib {
        Some(k) => k.checked_mul(1024),
        None => cli.ring_mib.checked_mul(1 << 20),
    };
    match bytes {
        Some(b) if b.is_power_of_two() && b >= 4096 => Ok(b),
        _ => bail!("--ring-mib must be a power of two (1, 2, 4, ... up to 2048)"),
    }
}

/// `--calibration-loop SITE CALLS DEPTH`.
fn calibration_loop(args: &[String]) -> Result<()> {
    let [site, calls, depth] = args else {
        bail!("--calibration-loop takes SITE CALLS DEPTH");
    };
    let site = <calibrate::Site as clap::ValueEnum>::from_str(site, true).map_err(|e| anyhow::anyhow!(e))?;
    calibrate::calibration_loop(site, calls.parse().context("CALLS")?, depth.parse().context("DEPTH")?);
    Ok(())
}

/// Applies the overload governor's actions to the tracer and reports the demotions; ends when
/// the reader drops its sender.
fn govern(tracer: &Mutex<Tracer>, actions: &std::sync::mpsc::Receiver<Action>, reports: &mpsc::Sender<pb::PlanReport>) {
    while let Ok(action) = actions.recv() {
        let mut t = tracer.lock().unwrap_or_else(|e| e.into_inner());
        let (id, result, what) = match action {
            Action::Demote(id) => (id, t.demote(id), "demoted: the ring buffer overflowed"),
            Action::Restore(id) => (id, t.restore(id), "restored: no drops for a while"),
        };
        match result {
            Ok(Some(mode)) => {
                let report = t.report();
                let function = t.function_name(id).unwrap_or_default();
                tracing::warn!(function, ?mode, demoted = report.demoted.len(), "{what}");
                drop(t);
                let _ = reports.blocking_send(report);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "overload control could not change a mode"),
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(args) = &cli.calibration_loop {
        return calibration_loop(args);
    }
    if let Some(out) = &cli.calibrate {
        preflight()?;
        let c = calibrate::calibrate(out)?;
        println!(
            "probe costs (ns per call), emulated site: count {:.0}, event {:.0}, callstack {:.0} ({} frames, +{:.1} per frame); single-stepped: count {:.0}, event {:.0}, callstack {:.0} -> {}",
            c.emulated.count_ns,
            c.emulated.event_ns,
            c.emulated.callstack_ns,
            c.callstack_frames,
            c.per_frame_ns,
            c.single_stepped.count_ns,
            c.single_stepped.event_ns,
            c.single_stepped.callstack_ns,
            out.display()
        );
        return Ok(());
    }
    let auth = afetm_auth::ClientAuth {
        ca: cli.tls_ca.clone(),
        identity: cli.tls_cert.clone().zip(cli.tls_key.clone()),
        token: afetm_auth::ClientAuth::token_from(cli.token_file.as_deref())?,
        insecure: cli.insecure,
    };
    // Bad TLS files or a plaintext non-loopback address fail here, not in the send loop.
    auth.endpoint(&cli.analyzer)?;
    let plan_path = cli.plan.clone().context("--plan is required")?;
    let text = std::fs::read_to_string(&plan_path).with_context(|| format!("reading plan {}", plan_path.display()))?;
    let plan = PlanFile::parse(&text).with_context(|| format!("plan {}", plan_path.display()))?;
    if cli.dry_run {
        let target = Target::open(&plan.target)?;
        let resolved = tracer::resolve(&target.module, &plan.points)?;
        let report =
            pb::PlanReport { probes: resolved.iter().map(tracer::Resolved::placed).collect(), ..Default::default() };
        print_probes(&report);
        let (n, emulated, moved) = summary(&report);
        eprintln!(
            "{n} functions: {emulated} probes on emulated instructions ({moved} moved past the entry), {} single-stepped",
            n - emulated
        );
        return Ok(());
    }
    preflight()?;
    let target = Target::open(&plan.target)?;
    let describe = target.describe();
    let module = target.module.clone();
    let (mut tracer, maps, table) = Tracer::load(target, cli.stack_window, cli.kernel_unwind, ring_bytes(&cli)?)?;
    tracer.set_handover_hold(cli.handover_hold);
    let report = tracer.apply(&plan)?;
    metrics().plan_report(&report);
    let (n, emulated, moved) = summary(&report);
    tracing::info!(target = %describe, functions = n, emulated, moved, single_stepped = n - emulated, unprobeable = report.unprobeable.len(), "probes attached");
    if cli.print_probes {
        print_probes(&report);
    }

    let outbox = Outbox::new(cli.queue_events);
    let stop = Arc::new(AtomicBool::new(false));
    let reader_cfg =
        ReaderConfig { flush: cli.flush.max(Duration::from_millis(1)), poll: cli.poll, ..ReaderConfig::default() };
    let (actions_tx, actions_rx) = std::sync::mpsc::channel::<Action>();
    let mut reader = Reader::new(maps, table, module, outbox.clone(), reader_cfg);
    if cli.overload_control {
        let cfg = GovernorConfig { calm: cli.overload_calm, ..GovernorConfig::default() };
        reader = reader.with_governor(Governor::new(cfg), actions_tx);
    }
    let log_stop = Arc::new(AtomicBool::new(false));
    let mut log_thread = None;
    if !cli.logs.is_empty() {
        let queue = LogQueue::new(cli.log_queue);
        reader = reader.with_logs(queue.clone());
        let (files, poll, s) = (cli.logs.clone(), cli.log_poll.max(Duration::from_millis(10)), log_stop.clone());
        tracing::info!(files = ?files, "tailing log files");
        log_thread = Some(
            std::thread::Builder::new().name("afetm-logs".into()).spawn(move || logtail::run(files, queue, poll, s))?,
        );
    }
    let reader_stop = stop.clone();
    let reader_thread =
        std::thread::Builder::new().name("afetm-reader".into()).spawn(move || reader.run(reader_stop))?;

    if let Some(path) = &cli.ready_file {
        std::fs::write(path, format!("{n}\n")).with_context(|| format!("writing {}", path.display()))?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    if let Some(addr) = &cli.metrics_listen {
        // The agent is healthy while it runs: a broken tracer or transport ends the process.
        let health: afetm_metrics::Health = Arc::new(|| Ok(()));
        rt.block_on(afetm_metrics::serve(addr, metrics().registry(), health))?;
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let agent_id = cli.agent_id.clone().unwrap_or_else(|| format!("{hostname}/{}", tracer.target().module.name));
    let hello = pb::Hello { agent_id, instance: rand::random::<u64>().max(1), hostname, target: describe };
    let pid = plan.target.pid;
    let tracer = Arc::new(Mutex::new(tracer));
    let outbox_run = outbox.clone();
    let gone = rt.block_on(async move {
        let outbox = outbox_run;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (plans_tx, mut plans_rx) = mpsc::channel::<pb::Plan>(8);
        let (reports_tx, reports_rx) = mpsc::channel::<pb::PlanReport>(8);
        let _ = reports_tx.send(report).await;
        let transport = tokio::spawn(transport::run(cli.analyzer.clone(), auth, hello, outbox.clone(), plans_tx, reports_rx, shutdown_rx, cli.drain_timeout));
        let governed = reports_tx.clone();
        let t = tracer.clone();
        let plans = tokio::spawn(async move {
            while let Some(p) = plans_rx.recv().await {
                let t = t.clone();
                let version = p.version;
                let result = tokio::task::spawn_blocking(move || {
                    let file = PlanFile::from_proto(&p).map_err(|e| e.to_string())?;
                    t.lock().unwrap_or_else(|e| e.into_inner()).apply(&file).map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                let report = match result {
                    Ok(r) => {
                        let (n, emulated, _) = summary(&r);
                        tracing::info!(version, functions = n, attached = r.attached, detached = r.detached, relinked = r.relinked, unprobeable = r.unprobeable.len(), emulated, "new plan applied");
                        r
                    }
                    Err(error) => {
                        tracing::error!(version, %error, "plan refused; the previous plan stays");
                        pb::PlanReport { version, ok: false, error, ..Default::default() }
                    }
                };
                metrics().plan_report(&report);
                if reports_tx.send(report).await.is_err() {
                    break;
                }
            }
        });
        let t = tracer.clone();
        let governor = tokio::task::spawn_blocking(move || govern(&t, &actions_rx, &governed));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let target_gone = async {
            match pid {
                Some(pid) => loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        tracing::error!(pid, "target process exited; sending what is left, then exiting");
                        break pid;
                    }
                },
                None => std::future::pending().await,
            }
        };
        let gone = tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); None }
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => { tracing::info!("terminated"); None }
            pid = target_gone => Some(pid),
        };
        // The log tailer reads its files one last time before the reader's final batch.
        log_stop.store(true, Ordering::Relaxed);
        if let Some(t) = log_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        stop.store(true, Ordering::Relaxed);
        let stats = tokio::task::spawn_blocking(move || reader_thread.join()).await;
        match stats {
            Ok(Ok(s)) => tracing::info!(events = s.events, fates = s.fates, log_lines = s.log_lines, stack_events = s.stack_events, kernel_unwound = s.kernel_unwound, unwind_steps_learnt = s.unwind_steps_learnt, demotions = s.demotions, restorations = s.restorations, drain_ms = s.drain_ms, unwind_ms = s.unwind_ms, cut_ms = s.cut_ms, reader_cpu_ms = s.thread_cpu_ms, process_cpu_ms = process_cpu_ms(), batches = s.batches, kernel_drops = s.kernel_drops, unwinder_disagreed = s.unwinder_disagreed, malformed = s.malformed, "reader finished"),
            _ => tracing::error!("reader thread failed"),
        }
        let _ = governor.await;
        let _ = shutdown_tx.send(true);
        let _ = transport.await;
        plans.abort();
        gone
    });
    let (queued, dropped, rejected, _) = outbox.counters();
    if queued > 0 || dropped > 0 || rejected > 0 {
        tracing::warn!(
            unsent_batches = queued,
            dropped_events = dropped,
            rejected_batches = rejected,
            "not everything reached the analyzer"
        );
    }
    // A pid names one process: once it is gone there is nothing left to trace, and a
    // supervisor must hear that (a path target follows restarts instead).
    if let Some(pid) = gone {
        bail!("target process {pid} is gone (traced by pid; trace by path to follow restarts)");
    }
    Ok(())
}
