//! Runs the fault injection campaign on the NHSR-OSW testbed and fills the FDDB (AFETM
//! sec. III.C.1, IV.A).
//!
//! 1. The shop comes up once; the analyzer and the agents stay for the whole campaign.
//! 2. Activated functions: every function of the target counted (count mode) under the CRUD
//!    mix for `sample`; those called are the injection targets, planned by
//!    [`crate::plan::plan`] with the binary's DWARF signatures. Scope, seed and the other
//!    settings are stored with the target; a resumed campaign says what changed.
//! 3. Full tracing: one agent traces **every** function of the target module (`*`, event
//!    mode), attached while the target's processes run (the kernel checks a probe's
//!    instruction only in processes that map the file at attach time). The FDDB records the
//!    traced set.
//! 4. The workload rate: `--rate`, or the highest of a doubling series of short probes at
//!    which full tracing lost no event and the shop kept the rate, times 0.5 (stored).
//! 5. Normal runs, then per fault its training runs (until one adds no FCT new for that fault,
//!    at most `cap`) and its evaluation runs. A run: the target's tier restarted (Apache with
//!    the shop database restored from a pristine copy) and warmed up with the CRUD mix for
//!    0.5 s (its windows start after that; every other normal run starts cold instead, its
//!    first window holding the first requests of a fresh server, as after a restart in
//!    production: [`Start`]; a normal run also keeps the tier up for two idle windows after
//!    its load, `IDLE_TAIL_WINDOWS`), the CRUD mix at the fixed rate, one
//!    `afetm-inject` per target process after a fault-free lead drawn uniformly in
//!    [0, one analyzer window) (a fault does not strike at a window's start in production
//!    either), the mix for `window` more (several analyzer windows: the fault is permanent, so
//!    each of them is a faulty window to learn from and to score), the tier killed (its processes' exits close
//!    their windows at once and end the injectors, which report where and when they applied
//!    the fault) and started again in the background for the next run, the windows' FCTs
//!    labelled ([`crate::label`]), drops and logs.
//!
//! Every run is one FDDB transaction and a fault's done flag goes with its last training run,
//! so a killed campaign resumes at the first fault with work left and never repeats a run. The
//! processes the runner starts die with it (`PR_SET_PDEATHSIG`); the stack is stopped by pid at
//! the start.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use afetm_calltree::tree::{Forest, FuncTable};
use afetm_elf::{dwarf, symbols::Module};
use afetm_fault::{Applied, Fault};
use afetm_fddb::{
    Done, Fddb, FunctionRow, LabelledTree, Manifestation, Phases, Role, Run, RunFate, RunStatus, Settings, Start,
};
use afetm_proto::{self as pb, control_client::ControlClient, query_client::QueryClient};
use afetm_selection::weights::Weights;
use anyhow::{Context, Result, bail};
use testbed::Tier;

use crate::{
    label::{self, Window},
    plan::{Observed, Scope, classify, plan, split},
    procs::{Proc, Watchdog, spawn, state, stop_gently, wait_file},
};

/// Which server of the shop a campaign injects into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// redis-server.
    Redis,
    /// nginx.
    Nginx,
    /// Apache httpd (the apache2 binary).
    Httpd,
    /// libsqlite3 inside the Apache/PHP workers.
    Sqlite,
}

impl Target {
    /// The target's name in the FDDB.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Redis => "redis",
            Target::Nginx => "nginx",
            Target::Httpd => "httpd",
            Target::Sqlite => "sqlite",
        }
    }

    /// The file the target's code is in, for this stack's binaries.
    pub fn module_path(&self, b: &testbed::Binaries) -> PathBuf {
        match self {
            Target::Redis => b.redis.clone(),
            Target::Nginx => b.nginx.clone(),
            Target::Httpd => b.apache2.clone(),
            Target::Sqlite => b
                .sqlite_lib_dir
                .as_ref()
                .map(|d| d.join("libsqlite3.so.0"))
                .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0".into()),
        }
    }

    /// The tier whose processes run the target's code.
    pub fn tier(&self) -> Tier {
        match self {
            Target::Redis => Tier::Redis,
            Target::Nginx => Tier::Nginx,
            Target::Httpd | Target::Sqlite => Tier::Apache,
        }
    }

    /// The processes that run the target's code: redis; nginx master and workers; every
    /// Apache process (httpd and libsqlite3 inside PHP).
    fn processes(&self, cfg: &testbed::Config) -> Result<Vec<u32>> {
        let want = match self {
            Target::Redis => "redis",
            Target::Nginx => "nginx",
            Target::Httpd | Target::Sqlite => "apache",
        };
        let mut pids: Vec<u32> = testbed::servers(cfg)?
            .iter()
            .filter(|s| s.name.starts_with(want))
            .flat_map(|s| testbed::group_members(s.pid))
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }
}

/// A campaign for one target.
#[derive(Clone, Debug)]
pub struct Config {
    /// The server to inject into.
    pub target: Target,
    /// Working folder: the stack's run folder, the analyzer database, logs.
    pub work_dir: PathBuf,
    /// The shop's base port.
    pub base_port: u16,
    /// Source-built servers (with DWARF: interface faults possible) instead of Debian's.
    pub built: bool,
    /// Where afetm-agent, afetm-analyzer and afetm-inject are.
    pub bin_dir: PathBuf,
    /// The FDDB.
    pub db: PathBuf,
    /// Which activated functions.
    pub scope: Scope,
    /// Seed of the scope's sample and the flipped bits.
    pub seed: u64,
    /// Load per run after the fault-free lead (a fault run's faulty windows: one per analyzer
    /// window of it).
    pub window: Duration,
    /// Training runs per fault at most.
    pub cap: usize,
    /// Evaluation runs per fault.
    pub eval_runs: usize,
    /// Normal evaluation runs.
    pub normal_eval_runs: usize,
    /// Normal training runs.
    pub normal_runs: usize,
    /// Count-mode sampling for the activated functions.
    pub sample: Duration,
    /// Client connections of the workload.
    pub connections: usize,
    /// Fixed request rate; None: calibrated (or the stored one when resuming).
    pub rate: Option<f64>,
    /// Stop after this many faults (the rest stays pending for the next invocation).
    pub max_faults: Option<usize>,
    /// Sample and plan, then stop (for sizing a scope; the plan stays in the FDDB).
    pub plan_only: bool,
    /// A run's manifestation is `slow` above this factor x the normal mean latency.
    pub slow_factor: f64,
    /// A run still going after this long is ended: the target's processes are killed and the
    /// run is recorded as a hang.
    pub fault_timeout: Duration,
    /// Share of the scope's functions held out of training (their faults get evaluation runs
    /// only: the "unseen function" row); rounded down, and at least one function is trained.
    pub held_out_share: f64,
}

/// What one invocation did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Faults whose work was finished.
    pub faults_done: usize,
    /// Runs recorded.
    pub runs: usize,
    /// Faults with work left.
    pub pending: usize,
    /// The workload rate used.
    pub rate: f64,
    /// Time per run by phase, and whole (ms), for every run of this invocation.
    pub timings: Vec<(Phases, u64)>,
    /// Wall time of the invocation.
    pub wall: Duration,
}

/// A request of the campaign's workload unanswered this long has failed: the shop answers in
/// a few ms, and a hung or crashed server must not stretch a run by more than this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// A running `afetm-inject` and the file its report goes to.
type Injector = (Proc, PathBuf);

/// One tree the analyzer built for a target process.
/// The workload a restarted tier gets before a run's windows start: a fresh process takes
/// paths a long-running one no longer does (lazy initialization, tables growing from empty),
/// and production diagnoses long-running processes.
const WARM_UP: Duration = Duration::from_millis(500);

/// Windows a normal run's tier stays up after its load before it is killed, so that training
/// and held-out normal runs hold idle windows (the timers alone: redis's `serverCron`), as
/// production has between busy spells: without them the daemon alarmed on every idle window
/// after a live load stopped (P(normal) 0.0000, 100-1,000 events). Two, so that one is idle
/// from start to end.
const IDLE_TAIL_WINDOWS: u32 = 2;

struct Fct {
    window: Window,
    forest: Forest,
    table: FuncTable,
}

struct Session {
    cfg: Config,
    stack: testbed::Config,
    module: PathBuf,
    url: String,
    rt: tokio::runtime::Runtime,
    pristine: Option<PathBuf>,
    rate: f64,
    /// The target's tier starting in the background for the next run.
    next_tier: std::sync::Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
    /// Draws each run's fault-free lead (see `run_once`) and its workload's seed.
    draws: std::sync::Mutex<rand::rngs::StdRng>,
    _analyzer: Proc,
}

impl Session {
    fn agent(&self, id: &str, points: serde_json::Value) -> Result<Proc> {
        let dir = &self.cfg.work_dir;
        let plan = dir.join(format!("{id}.plan.json"));
        std::fs::write(&plan, serde_json::json!({"target": {"path": self.module}, "points": points}).to_string())?;
        let ready = dir.join(format!("{id}.ready"));
        let log = dir.join(format!("{id}.log"));
        let _ = std::fs::remove_file(&ready);
        let mut p = spawn(
            Command::new(self.cfg.bin_dir.join("afetm-agent"))
                .arg("--plan")
                .arg(&plan)
                .args(["--analyzer", &self.url, "--agent-id", id, "--flush", "20ms"])
                // A full trace stays full: a run that overflows is marked dropped and left out,
                // never kept with some functions demoted.
                .args(["--overload-control", "false", "--ready-file"])
                .arg(&ready)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
        )?;
        wait_file(&ready, &mut p.0, &format!("agent {id}"), &log)?;
        Ok(p)
    }

    /// The CRUD mix for `duration` at `rate` (None: closed loop), a request sequence of its own
    /// (see [`Session::load_config`]); a request unanswered after [`REQUEST_TIMEOUT`] counts as
    /// failed.
    fn load(&self, duration: Duration, rate: Option<f64>) -> Result<testbed::load::Report> {
        testbed::load::run(&self.load_config(duration, rate))
    }

    /// The workload of one run or warm-up. Each draws its own request sequence (a seed from the
    /// campaign's): with one sequence for all, a warm-up cached exactly the items its run asked
    /// for first and every run's windows replayed the same requests, so normal windows varied
    /// less than a serving shop's do.
    fn load_config(&self, duration: Duration, rate: Option<f64>) -> testbed::load::LoadConfig {
        use rand::RngExt;
        let mut l = testbed::load::LoadConfig::new(self.stack.url());
        l.seed = self.draws.lock().unwrap_or_else(|e| e.into_inner()).random();
        l.connections = self.cfg.connections;
        l.duration = duration;
        l.warmup = Duration::ZERO;
        l.rate = rate;
        l.items = self.stack.seed_items;
        l.request_timeout = REQUEST_TIMEOUT;
        l
    }

    /// A fault-free lead, uniform in [0, one analyzer window): production windows do not
    /// start when a fault strikes, so neither do the campaign's.
    fn lead(&self) -> Duration {
        use rand::RngExt;
        let frac: f64 = self.draws.lock().unwrap_or_else(|e| e.into_inner()).random_range(0.0..1.0);
        Duration::from_millis(afetm_fddb::WINDOW_MS).mul_f64(frac)
    }

    fn query<T>(&self, f: impl AsyncFnOnce(QueryClient<tonic::transport::Channel>) -> Result<T>) -> Result<T> {
        self.rt.block_on(async {
            let q = QueryClient::connect(self.url.clone())
                .await
                .context("connecting to the campaign's analyzer")?
                .max_decoding_message_size(256 << 20);
            f(q).await
        })
    }

    /// Cuts the full trace's windows of `pids` at `at_ns` (`Control.Cut`).
    fn cut(&self, pids: &[u32], at_ns: u64) -> Result<()> {
        self.rt.block_on(async {
            let mut c = ControlClient::connect(self.url.clone()).await.context("connecting to the analyzer")?;
            c.cut(pb::CutRequest { agent_id: "full".into(), pids: pids.to_vec(), at_ns }).await.context("Cut")?;
            Ok(())
        })
    }

    /// Kernel and queue drops the agent `id` reported so far.
    fn drops(&self, id: &str) -> Result<(u64, u64)> {
        self.query(async |mut q| {
            let req = pb::ListAgentsRequest { without_plans: true };
            let agents = q.list_agents(req).await.context("ListAgents")?.into_inner().agents;
            Ok(agents
                .iter()
                .filter(|a| a.agent_id == id)
                .fold((0, 0), |acc, a| (acc.0 + a.kernel_drops, acc.1 + a.queue_drops)))
        })
    }

    /// Activated functions (name, calls per second) from count mode under the workload.
    fn sample(&self, module: &str) -> Result<Vec<(String, f64)>> {
        let agent = self.agent("count", serde_json::json!([{"function": "*", "mode": "count"}]))?;
        let t = Instant::now();
        let report = self.load(self.cfg.sample, None);
        let secs = t.elapsed().as_secs_f64();
        stop_gently(agent);
        let report = report?;
        if report.errors > 0 {
            tracing::warn!(errors = report.errors, "requests failed while sampling");
        }
        let counts = self.query(async |mut q| {
            Ok(q.counts(pb::CountsRequest { agent_id: "count".into() }).await?.into_inner().counts)
        })?;
        let w = Weights::from_counts(module, &counts, secs, "campaign sampling")?;
        Ok(w.functions.into_iter().map(|(f, w)| (f, w.per_sec)).collect())
    }

    /// The highest rate of 25, 50, 100, ... req/s (1 s each, at most `max`) at which the full
    /// trace lost nothing and the shop kept up, times 0.5 for margin: a 1 s probe passes at a
    /// rate the fully traced server cannot hold for a run's 4-6 s, and with the shop's 200
    /// items 0.75 of a 200 req/s probe left the demo's normal runs timing out up to half their
    /// requests (at 100 req/s the tests' campaigns saw errors in one normal run of four, the
    /// second, cold-started one: 1 and 16 of ~350 requests).
    fn calibrate(&self, max: f64) -> Result<f64> {
        /// Light load after the probes, so that the first run does not serve their backlog.
        const SETTLE: Duration = Duration::from_secs(2);
        // The agents were just attached (probes of every function): let the shop settle first.
        let _ = self.load(Duration::from_secs(1), Some(10.0))?;
        let mut best = None;
        let mut why = String::new();
        let mut rate = 25.0;
        while rate <= max {
            let before = self.drops("full")?;
            let r = self.load(Duration::from_secs(1), Some(rate))?;
            std::thread::sleep(Duration::from_millis(300)); // the agent's next batch reports drops
            let after = self.drops("full")?;
            let lost = (after.0 - before.0) + (after.1 - before.1);
            let kept_up = r.errors == 0 && r.throughput_rps >= 0.9 * rate;
            tracing::info!(
                rate,
                lost,
                throughput = r.throughput_rps,
                errors = r.errors,
                "calibrating the workload rate"
            );
            if lost > 0 || !kept_up {
                why = format!(
                    "{lost} events lost, {} of {} requests failed, {:.0} req/s served",
                    r.errors, r.requests, r.throughput_rps
                );
                break;
            }
            best = Some(rate);
            rate *= 2.0;
        }
        let best =
            best.with_context(|| format!("under full tracing the shop does not keep 25 req/s ({why}); give --rate"))?;
        // The probe that failed may leave requests queued in the tiers that are not restarted
        // per run: a seed-1 campaign's first normal run after a 400 req/s probe with 43 errors
        // saw 40 errors in 353 requests (mean 210 ms) and no later one did, so they drain here.
        // A backlog is suspected, not shown: in the demo's campaign the settle itself saw no
        // error (3.9 ms) after an 800 req/s probe with 447, and its normal runs at the
        // calibrated 200 req/s still saw 2-9 errors (the rate, not a backlog, there).
        let settle = self.load(SETTLE, Some(10.0))?;
        tracing::info!(
            errors = settle.errors,
            mean_latency_ms = settle.latency.mean_us / 1000.0,
            "the shop settled after the probes"
        );
        Ok((best * 0.5_f64).max(10.0))
    }

    /// One run: the target's tier restarted (warmed up or cold), injectors (for `fault`),
    /// the workload at the fixed rate, the tier killed, the labelled FCTs of its processes.
    fn run_once(
        &self,
        fault: Option<(&str, Fault)>,
        role: Role,
        normal_latency: f64,
        start: Start,
    ) -> Result<(Run, Vec<LabelledTree>)> {
        let started = Instant::now();
        self.fresh_tier(start)?;
        let victims = self.cfg.target.processes(&self.stack)?;
        if victims.is_empty() {
            bail!("no {} process is running", self.cfg.target.name());
        }
        let drops_before = self.drops("full")?;
        let logs_at = testbed::logs::log_sizes(&self.stack.logs_dir());
        // The run starts here: the new processes' windows are cut, so that no tree mixes the
        // tier's start-up (a 70,000-node FCT for redis) with the run.
        let from_ns = testbed::monotonic_ns();
        self.cut(&victims, from_ns)?;
        let restarted = Instant::now();
        // Past the per-fault timeout the target's processes are killed, which ends the
        // injectors (their victims are gone) and makes the rest of the workload fail fast.
        let watchdog = Watchdog::start(victims.clone(), started + self.cfg.fault_timeout);
        // The workload starts at the cut; the fault comes after a fault-free lead, so the
        // window it strikes in also holds normal requests, as in production.
        let lead = self.lead();
        let l = self.load_config(lead + self.cfg.window, Some(self.rate));
        let load = std::thread::spawn(move || testbed::load::run(&l));
        std::thread::sleep(lead);
        let (injectors, mut problems) = match fault {
            Some((function, f)) => self.inject(&victims, function, f)?,
            None => (Vec::new(), Vec::new()),
        };
        let injected = Instant::now();
        let report = load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        if fault.is_none() {
            // The idle tail: the tier stays up with no load, as servers do between busy spells.
            std::thread::sleep(IDLE_TAIL_WINDOWS * Duration::from_millis(afetm_fddb::WINDOW_MS));
        }
        let loaded = Instant::now();
        let died = victims.iter().any(|p| state(*p).is_none_or(|s| s == 'Z' || s == 'X'));
        let stopped = victims.iter().any(|p| state(*p) == Some('T'));
        // The exits close the processes' windows (and end the injectors, whose reports hold
        // what they applied); the next run's tier starts meanwhile.
        let harness_end = testbed::monotonic_ns();
        let watchdog_kill = watchdog.finish();
        let timed_out = watchdog_kill.is_some();
        // From here the harness ends the processes: their fates say nothing of the fault.
        let harness_end = watchdog_kill.map_or(harness_end, |at| at.min(harness_end));
        self.restart_in_background()?;
        let killed = Instant::now();
        let (applied, applications) = collect_injectors(injectors);
        let injectors_stopped = Instant::now();
        let (fcts, fates) = self.fcts_of(&victims, from_ns, harness_end)?;
        let fetched = Instant::now();
        let drops_after = self.drops("full")?;
        tracing::debug!(
            kill_ms = ms(killed - loaded),
            injectors_ms = ms(injectors_stopped - killed),
            trees_ms = ms(fetched - injectors_stopped),
            "collected"
        );
        let (kernel_drops, queue_drops) = (drops_after.0 - drops_before.0, drops_after.1 - drops_before.1);
        let mut logs = testbed::logs::read_new_logs(&self.stack.logs_dir(), &logs_at);
        if timed_out {
            problems.push(format!(
                "run exceeded the fault timeout ({:?}); target processes killed",
                self.cfg.fault_timeout
            ));
        }
        logs.extend(problems.into_iter().map(|p| ("campaign".to_string(), p)));
        let manifestation = match fault {
            None => Manifestation::Normal,
            Some(_) if timed_out => Manifestation::Hang,
            Some(_) => classify(
                &Observed {
                    died,
                    stopped,
                    requests: report.requests,
                    errors: report.errors,
                    mean_latency_us: report.latency.mean_us,
                },
                normal_latency,
                self.cfg.slow_factor,
            ),
        };
        let status = if kernel_drops + queue_drops > 0 {
            RunStatus::Dropped
        } else if fault.is_some() && applied == 0 {
            RunStatus::NotActivated
        } else {
            RunStatus::Ok
        };
        let trees = fcts
            .into_iter()
            .map(|f| LabelledTree {
                faulty: fault.is_some_and(|(_, x)| label::faulty(&x, &applications, &f.window)),
                pid: f.window.pid,
                tid: f.window.tid,
                start_ns: f.window.start_ns,
                end_ns: f.window.end_ns,
                forest: f.forest,
                table: f.table,
            })
            .collect();
        let done = Instant::now();
        let phases = Phases {
            restart_ms: ms(restarted - started),
            inject_ms: ms(injected - restarted),
            load_ms: ms(loaded - injected),
            collect_ms: ms(done - loaded),
        };
        let run = Run {
            role,
            status,
            manifestation,
            requests: report.requests,
            errors: report.errors,
            mean_latency_us: report.latency.mean_us,
            applied,
            kernel_drops,
            queue_drops,
            phases,
            start,
            wall_ms: ms(done - started),
            logs,
            applications,
            fates,
        };
        Ok((run, trees))
    }

    /// Kills the target's tier and starts it again on another thread: its start-up (half a
    /// second for redis under a full trace: ~90,000 traced calls) overlaps this run's
    /// collection. [`Session::fresh_tier`] waits for it.
    fn restart_in_background(&self) -> Result<()> {
        let tier = self.cfg.target.tier();
        testbed::stop_tier(&self.stack, tier)?;
        let (stack, pristine) = (self.stack.clone(), self.pristine.clone());
        let warm = self.load_config(WARM_UP, Some(self.rate));
        let handle = std::thread::spawn(move || {
            testbed::start_tier(&stack, tier, pristine.as_deref()).context("restarting the target's tier")?;
            testbed::load::run(&warm).map(|_| ()).context("warming the restarted tier up")
        });
        *self.next_tier.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// A freshly started target tier: the one started (and warmed up) in the background, or
    /// one restarted now; for a [`Start::Cold`] run restarted now without a warm-up, so that
    /// the run's first window holds the first requests it serves.
    fn fresh_tier(&self, start: Start) -> Result<()> {
        let pending = self.next_tier.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = pending {
            h.join().map_err(|_| anyhow::anyhow!("the tier's restart thread panicked"))??;
            if start == Start::Warm {
                return Ok(());
            }
        }
        let tier = self.cfg.target.tier();
        testbed::stop_tier(&self.stack, tier)?;
        testbed::start_tier(&self.stack, tier, self.pristine.as_deref()).context("restarting the target's tier")?;
        match start {
            Start::Warm => self.load(WARM_UP, Some(self.rate)).map(|_| ()).context("warming the restarted tier up"),
            Start::Cold => Ok(()),
        }
    }

    /// One `afetm-inject` per victim, all started before any is waited for.
    fn inject(&self, victims: &[u32], function: &str, fault: Fault) -> Result<(Vec<Injector>, Vec<String>)> {
        let mut started = Vec::new();
        for pid in victims {
            let ready = self.cfg.work_dir.join(format!("inject-{pid}.ready"));
            let out = self.cfg.work_dir.join(format!("inject-{pid}.out"));
            let err = self.cfg.work_dir.join(format!("inject-{pid}.err"));
            let _ = std::fs::remove_file(&ready);
            let p = spawn(
                Command::new(self.cfg.bin_dir.join("afetm-inject"))
                    .arg("--module")
                    .arg(&self.module)
                    .args(["--function", function, "--fault", &fault.to_string(), "--pid", &pid.to_string()])
                    .arg("--foreign")
                    .arg("--ready-file")
                    .arg(&ready)
                    .stdout(std::fs::File::create(&out)?)
                    .stderr(std::fs::File::create(&err)?),
            )?;
            started.push((*pid, p, ready, out, err));
        }
        let mut injectors = Vec::new();
        let mut problems = Vec::new();
        for (pid, mut p, ready, out, err) in started {
            match wait_file(&ready, &mut p.0, "afetm-inject", &err) {
                Ok(()) => injectors.push((p, out)),
                // A process that exits at the fault's first call can take its injector with it
                // before it is ready (its report still counts: the injector prints on exit).
                Err(e) if state(pid).is_none() => {
                    tracing::debug!(pid, error = %e, "victim gone at injection");
                    injectors.push((p, out));
                }
                Err(e) => problems.push(format!("afetm-inject pid {pid}: {e:#}")),
            }
        }
        Ok((injectors, problems))
    }

    /// The FCTs of `pids`' windows that ended at or after `from_ns`, once all are closed, and
    /// the fates of their threads before `harness_end` (AFETM sec. III.C.1: the full trace's
    /// view, from which any plan's can be derived). The harness's own kills come after it.
    fn fcts_of(&self, pids: &[u32], from_ns: u64, harness_end: u64) -> Result<(Vec<Fct>, Vec<RunFate>)> {
        self.query(async |mut q| {
            let t = Instant::now();
            let windows = loop {
                let mut mine: Vec<pb::WindowInfo> = Vec::new();
                for pid in pids {
                    let req = pb::ListWindowsRequest { agent_id: "full".into(), pid: *pid, ..Default::default() };
                    mine.extend(q.list_windows(req).await.context("ListWindows")?.into_inner().windows);
                }
                if mine.iter().all(|w| w.closed) || t.elapsed() > Duration::from_secs(10) {
                    break mine;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let mut out = Vec::new();
            let mut fates = Vec::new();
            for w in windows.iter().filter(|w| w.closed) {
                let window = Window { pid: w.pid, tid: 0, start_ns: w.start_ns, end_ns: w.end_ns };
                if label::kept(&window, from_ns) {
                    let before_end = w.fates.iter().filter(|f| f.ts_ns < harness_end);
                    fates.extend(before_end.filter_map(|f| RunFate::new(w.start_ns, f)));
                }
                for tid in &w.tids {
                    let window = Window { pid: w.pid, tid: *tid, start_ns: w.start_ns, end_ns: w.end_ns };
                    if !label::kept(&window, from_ns) {
                        continue;
                    }
                    let req = pb::GetAfctRequest { window_id: w.id, tid: *tid };
                    let tree = q.get_afct(req).await.context("GetAfct")?.into_inner().tree.unwrap_or_default();
                    let mut table = FuncTable::default();
                    let forest = Forest::from_proto(&tree, &mut table).map_err(anyhow::Error::msg)?;
                    tracing::debug!(
                        pid = w.pid,
                        tid,
                        start_ns = w.start_ns,
                        from_ns,
                        nodes = forest.len(),
                        truncated = forest.truncated,
                        "tree"
                    );
                    if !forest.is_empty() {
                        out.push(Fct { window, forest, table });
                    }
                }
            }
            Ok((out, fates))
        })
    }
}

/// Stops the injectors (all signalled first, then waited for: each detaches from its victim's
/// threads); the calls they applied the fault to and where and when.
fn collect_injectors(injectors: Vec<Injector>) -> (u64, Vec<Applied>) {
    for (p, _) in &injectors {
        // SAFETY: kill has no memory preconditions; the pid is our injector.
        unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    }
    let mut applied = 0;
    let mut applications = Vec::new();
    let t = Instant::now();
    for (mut p, out) in injectors {
        while p.0.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(v) = text.lines().last().and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            applied += v["applied"].as_u64().unwrap_or(0);
            if let Ok(a) = serde_json::from_value::<Vec<Applied>>(v["applications"].clone()) {
                applications.extend(a);
            }
        }
    }
    (applied, applications)
}

/// Makes the fault plan on a new target (sampling the activated functions).
fn ensure_plan(s: &Session, db: &mut Fddb, target: i64, m: &Module) -> Result<()> {
    if db.summary(target)?.faults > 0 {
        return Ok(());
    }
    let activated = s.sample(&m.name)?;
    let by_start: HashMap<u64, &str> = m.functions().iter().map(|f| (f.start, &*f.name)).collect();
    let sigs: HashMap<String, dwarf::Signature> = dwarf::signatures(&s.module)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(start, sig)| Some((by_start.get(&start)?.to_string(), sig)))
        .collect();
    if sigs.is_empty() {
        tracing::warn!(module = %s.module.display(), "no DWARF: only crash, deadlock and IP+N faults (use source builds for interface faults)");
    }
    let p = plan(&activated, &sigs, &s.cfg.scope, s.cfg.seed);
    let skip_two: HashMap<String, u32> = p
        .functions
        .iter()
        .filter_map(|f| {
            let func = m.find(f).into_iter().next()?;
            let lens = afetm_elf::probe_site::instruction_lengths(func.start, m.code(func), 2);
            (lens.len() == 2).then(|| (f.clone(), lens.iter().sum()))
        })
        .collect();
    let held = (p.functions.len() as f64 * s.cfg.held_out_share.clamp(0.0, 1.0)).floor() as usize;
    let cut = split(&p, held, &skip_two, s.cfg.seed);
    let weight: HashMap<&str, f64> = activated.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    let mut ids = HashMap::new();
    for f in &p.functions {
        let sig = sigs.get(f);
        let row = FunctionRow {
            name: f.clone(),
            params: sig.map(|s| s.params.len() as u32),
            returns_value: sig.map(|s| s.returns.is_some()),
            calls_per_sec: weight.get(f.as_str()).copied().unwrap_or(0.0),
        };
        ids.insert(f.clone(), db.function(target, &row)?);
    }
    for f in &cut.train {
        db.fault(ids[&f.function], f.fault)?;
    }
    for (f, why) in &cut.held_out {
        db.held_out_fault(ids[&f.function], f.fault, *why)?;
    }
    tracing::info!(
        target = s.cfg.target.name(),
        activated = activated.len(),
        functions = p.functions.len(),
        faults = p.faults.len(),
        held_out_functions = held,
        held_out_faults = cut.held_out.len(),
        without_signature = p.without_signature,
        "campaign planned"
    );
    Ok(())
}

/// The settings to run with: a new campaign stores the given ones; a resumed one keeps the
/// plan's scope and seed (refusing others), and says how the other settings change.
fn settings(cfg: &Config, items: u32, stored: Option<Settings>) -> Result<Settings> {
    let mut s = Settings {
        scope: cfg.scope.to_string(),
        seed: cfg.seed,
        cap: cfg.cap as u32,
        eval_runs: cfg.eval_runs as u32,
        normal_runs: cfg.normal_runs as u32,
        window_ms: ms(cfg.window),
        rate: cfg.rate.unwrap_or(0.0),
        items,
    };
    let Some(old) = stored else { return Ok(s) };
    if old.scope != s.scope || old.seed != s.seed {
        bail!(
            "this FDDB's fault plan was made for scope {} seed {}; this run asks for scope {} seed {}: \
             resume with those, or give another --db for a new plan",
            old.scope,
            old.seed,
            s.scope,
            s.seed
        );
    }
    if cfg.rate.is_none() {
        s.rate = old.rate; // keep the calibrated rate: runs stay comparable
    }
    let changes: Vec<String> = [
        (
            "cap",
            old.cap.to_string(),
            s.cap.to_string(),
            "faults already done stay done; pending ones run up to the new cap",
        ),
        (
            "eval-runs",
            old.eval_runs.to_string(),
            s.eval_runs.to_string(),
            "faults get evaluation runs up to the new count",
        ),
        (
            "normal-runs",
            old.normal_runs.to_string(),
            s.normal_runs.to_string(),
            "normal runs are added up to the new count",
        ),
        (
            "window",
            format!("{}ms", old.window_ms),
            format!("{}ms", s.window_ms),
            "new runs use the new window; older ones keep theirs",
        ),
        ("rate", old.rate.to_string(), s.rate.to_string(), "new runs use the new rate; older ones keep theirs"),
        (
            "shop items",
            old.items.to_string(),
            s.items.to_string(),
            "new runs' shop holds the new items (its cache misses change); older runs keep theirs: \
             start a new --db for runs that all agree",
        ),
    ]
    .into_iter()
    .filter(|(_, a, b, _)| a != b)
    .map(|(k, a, b, what)| format!("{k} {a} -> {b}: {what}"))
    .collect();
    for c in &changes {
        tracing::warn!("resuming with a changed setting: {c}");
    }
    Ok(s)
}

fn start_analyzer(cfg: &Config) -> Result<(Proc, String)> {
    let adb = cfg.work_dir.join("analyzer.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", adb.display()));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let analyzer = spawn(
        Command::new(cfg.bin_dir.join("afetm-analyzer"))
            .args([
                "serve",
                "--listen",
                &listen,
                "--window",
                &format!("{}ms", afetm_fddb::WINDOW_MS),
                "--grace",
                "500ms",
                "--db",
            ])
            .arg(&adb)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cfg.work_dir.join("analyzer.log"))?),
    )?;
    let t = Instant::now();
    while std::net::TcpStream::connect(&listen).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("analyzer did not come up: {}", std::fs::read_to_string(cfg.work_dir.join("analyzer.log"))?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((analyzer, format!("http://{listen}")))
}

/// The shop for a campaign: one Apache instance with four workers (each run restarts the
/// target's tier, and every Apache process gets an injector); source builds unless `--stock`.
/// It holds the testbed's default items, as the shops that serve do: a campaign on 50 items
/// hit the Redis cache far more often than they, and its normal windows held 20-40% fewer redis
/// commands than live ones at the same rate (issue 23, item 4).
fn stack_config(cfg: &Config) -> Result<testbed::Config> {
    let mut stack = testbed::Config::new(cfg.work_dir.join("stack"));
    stack.base_port = cfg.base_port;
    stack.apaches = 1;
    stack.children = 4;
    if cfg.built {
        stack.binaries = testbed::build::binaries(&testbed::build::cache_dir())
            .context("source builds missing: run `cargo xtask testbed build`")?;
    }
    Ok(stack)
}

/// Runs (or resumes) the campaign for one target.
pub fn run(cfg: &Config, progress: bool) -> Result<Outcome> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.work_dir)?;
    let stack = stack_config(cfg)?;
    testbed::down(&stack)?; // leftovers of an interrupted campaign
    let module = cfg.target.module_path(&stack.binaries);
    let (analyzer, url) = start_analyzer(cfg)?;
    let mut db = Fddb::open(&cfg.db).with_context(|| format!("opening FDDB {}", cfg.db.display()))?;
    let m = Module::load(&module).with_context(|| format!("reading {}", module.display()))?;
    let target = db.target(cfg.target.name(), &m.name)?;
    let mut settings = settings(cfg, stack.seed_items, db.settings(target)?)?;
    testbed::up(&stack).context("testbed up")?;
    let mut s = Session {
        cfg: cfg.clone(),
        stack,
        module: module.clone(),
        url,
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        pristine: None,
        rate: settings.rate,
        next_tier: std::sync::Mutex::new(None),
        draws: std::sync::Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.seed)),
        _analyzer: analyzer,
    };
    let result = campaign(&mut s, &mut db, target, &m, &mut settings, progress);
    if let Some(h) = s.next_tier.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = h.join();
    }
    let _ = testbed::down(&s.stack);
    let (done, runs, timings) = result?;
    Ok(Outcome {
        faults_done: done,
        runs,
        pending: db.pending(target, cfg.eval_runs as u64)?.len(),
        rate: s.rate,
        timings,
        wall: started.elapsed(),
    })
}

type Timings = Vec<(Phases, u64)>;

fn campaign(
    s: &mut Session,
    db: &mut Fddb,
    target: i64,
    m: &Module,
    settings: &mut Settings,
    progress: bool,
) -> Result<(usize, usize, Timings)> {
    ensure_plan(s, db, target, m)?;
    if s.cfg.plan_only {
        return Ok((0, 0, Vec::new()));
    }
    if s.cfg.target.tier() == Tier::Apache {
        testbed::stop_tier(&s.stack, Tier::Apache)?;
        let pristine = s.cfg.work_dir.join("pristine.sqlite");
        testbed::snapshot_db(&s.stack, &pristine)?;
        testbed::start_tier(&s.stack, Tier::Apache, None)?;
        s.pristine = Some(pristine);
    }
    // Full tracing of the whole module, attached while its processes run.
    let full = s.agent("full", serde_json::json!([{"function": "*", "mode": "event"}]))?;
    let names: Vec<String> = m.functions().iter().map(|f| f.name.to_string()).collect();
    db.add_traced(target, &names)?;
    if s.rate <= 0.0 {
        s.rate = s.calibrate(1600.0)?;
        tracing::info!(rate = s.rate, "workload rate for the campaign");
    }
    settings.rate = s.rate;
    db.set_settings(target, settings)?;
    let mut timings = Vec::new();
    let mut runs = 0;
    for role in [Role::Train, Role::Eval] {
        let want = if role == Role::Train { s.cfg.normal_runs } else { s.cfg.normal_eval_runs } as u64;
        // A run that dropped events does not count; at most 3 such retries.
        while let (all, valid) = db.normal_runs(target, role)?
            && valid < want
            && all < want + 3
        {
            // Every other normal run starts cold: production restarts too.
            let start = if valid % 2 == 1 { Start::Cold } else { Start::Warm };
            let (run, trees) = s.run_once(None, role, 0.0, start)?;
            if run.errors > 0 {
                // Its windows are an overloaded server's, not the fault-free ones serving sees.
                tracing::warn!(
                    errors = run.errors,
                    requests = run.requests,
                    mean_latency_ms = run.mean_latency_us / 1000.0,
                    rate = s.rate,
                    "a normal run saw errors: the fully traced target did not keep up with the \
                     campaign's rate (calibrated, or --rate); a lower --rate gives cleaner normal runs"
                );
            }
            timings.push((run.phases, run.wall_ms));
            db.record_run(target, None, &run, &trees, Done::No)?;
            runs += 1;
        }
    }
    let normal_latency = db.normal_mean_latency(target)?;
    let pending = db.pending(target, s.cfg.eval_runs as u64)?;
    let todo = s.cfg.max_faults.map_or(pending.len(), |n| n.min(pending.len()));
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(todo as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} faults, ETA {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_prefix(s.cfg.target.name());
        b
    });
    let mut done = 0;
    for fault in pending.iter().take(todo) {
        if let Some(b) = &bar {
            b.set_message(format!("{} {}", fault.function, fault.fault));
        }
        let (r, t) = fault_runs(s, db, target, fault, normal_latency)?;
        runs += r;
        timings.extend(t);
        done += 1;
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(full);
    Ok((done, runs, timings))
}

/// A fault's remaining training runs (until nothing new, at most `cap` in all, runs of an
/// interrupted invocation included), then its evaluation runs.
fn fault_runs(
    s: &Session,
    db: &mut Fddb,
    target: i64,
    fault: &afetm_fddb::PendingFault,
    normal_latency: f64,
) -> Result<(usize, Timings)> {
    let mut timings = Vec::new();
    let cap = s.cfg.cap.max(1) as u64;
    if !fault.done && fault.train_runs >= cap {
        db.mark_done(fault.id)?; // the cap was lowered since these runs
    } else if !fault.done {
        for attempt in fault.train_runs + 1..=cap {
            let (run, trees) =
                s.run_once(Some((&fault.function, fault.fault)), Role::Train, normal_latency, Start::Warm)?;
            timings.push((run.phases, run.wall_ms));
            let rule = if attempt == cap { Done::Yes } else { Done::IfNothingNew };
            let r = db.record_run(target, Some(fault.id), &run, &trees, rule)?;
            tracing::debug!(function = %fault.function, fault = %fault.fault, attempt, new = r.new,
                status = run.status.as_str(), manifestation = run.manifestation.as_str(), "run");
            if r.done {
                break;
            }
        }
    }
    for _ in fault.eval_runs..s.cfg.eval_runs as u64 {
        let (run, trees) = s.run_once(Some((&fault.function, fault.fault)), Role::Eval, normal_latency, Start::Warm)?;
        timings.push((run.phases, run.wall_ms));
        db.record_run(target, Some(fault.id), &run, &trees, Done::No)?;
    }
    let runs = timings.len();
    Ok((runs, timings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            target: Target::Redis,
            work_dir: "w".into(),
            base_port: 1,
            built: true,
            bin_dir: "b".into(),
            db: "d".into(),
            scope: Scope::Top(5),
            seed: 1,
            window: Duration::from_secs(1),
            cap: 3,
            eval_runs: 1,
            normal_eval_runs: 1,
            normal_runs: 3,
            sample: Duration::from_secs(5),
            connections: 4,
            rate: None,
            max_faults: None,
            plan_only: false,
            slow_factor: 2.0,
            fault_timeout: Duration::from_secs(60),
            held_out_share: 0.2,
        }
    }

    #[test]
    fn resuming_keeps_the_plan_and_says_what_changes() {
        let first = settings(&cfg(), 200, None).unwrap();
        assert_eq!((first.scope.as_str(), first.rate, first.items), ("top:5", 0.0, 200));
        let stored = Settings { rate: 180.0, ..first };
        // Same settings: the calibrated rate is kept.
        assert_eq!(settings(&cfg(), 200, Some(stored.clone())).unwrap(), stored);
        // Another scope or seed would need another plan: refused, saying how to go on.
        let err = settings(&Config { scope: Scope::All, ..cfg() }, 200, Some(stored.clone())).unwrap_err().to_string();
        assert!(err.contains("scope top:5 seed 1") && err.contains("scope all") && err.contains("--db"), "{err}");
        assert!(settings(&Config { seed: 2, ..cfg() }, 200, Some(stored.clone())).is_err());
        // Cap and rate may change; the new values are used.
        // A campaign whose shop held 50 items goes on with the shop's items now.
        assert_eq!(settings(&cfg(), 200, Some(Settings { items: 50, ..stored.clone() })).unwrap().items, 200);
        let s = settings(&Config { cap: 5, rate: Some(90.0), ..cfg() }, 200, Some(stored)).unwrap();
        assert_eq!((s.cap, s.rate), (5, 90.0));
    }
}
