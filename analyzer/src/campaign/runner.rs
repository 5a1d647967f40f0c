//! Runs the fault injection campaign on the NHSR-OSW testbed and fills the FDDB (AFETM
//! sec. III.C.1, IV.A).
//!
//! 1. Activated functions: every function of the target counted (agent in count mode) under the
//!    CRUD mix for `sample`; those called are the injection targets, planned by
//!    [`super::plan`] with the DWARF signatures of the binary.
//! 2. Full tracing: one agent traces every planned function (event mode) for the whole
//!    campaign; the analyzer builds one FCT per process, thread and 1 s window.
//! 3. Normal runs (`normal_runs`), then per fault: fresh servers (the whole stack restarted),
//!    one `afetm-inject` per process of the target, the workload for `window`, the injectors
//!    stopped, stopped processes killed, the stack stopped (so every window closes), the FCTs
//!    of the target's processes, the servers' log lines of the run, and the manifestation.
//!    A fault is injected again until a run adds no new unique FCT, at most `cap` times.
//!
//! Every run is one FDDB transaction and a fault is marked done with its last run, so a killed
//! campaign resumes at the first fault not done and never repeats a finished one. The
//! processes the runner starts die with it (`PR_SET_PDEATHSIG`); the stack is stopped by pid
//! at the start of every run.

use std::{
    collections::{HashMap, HashSet},
    io::{Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use afetm_elf::{dwarf, symbols::Module};
use afetm_proto::{self as pb, query_client::QueryClient};
use anyhow::{Context, Result, bail};

use super::{Observed, Scope, classify, plan};
use crate::{
    fddb::{Done, Fddb, FunctionRow, Manifestation, Run},
    tree::{Forest, FuncTable},
    weights::Weights,
};

/// Which server of the shop a campaign injects into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Redis,
    Nginx,
    Httpd,
    Sqlite,
}

impl Target {
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

#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    /// Working folder: the stack's run folder, the analyzer database, logs.
    pub work_dir: PathBuf,
    pub base_port: u16,
    /// Source-built servers (with DWARF: interface faults possible) instead of Debian's.
    pub built: bool,
    /// Where afetm-agent, afetm-analyzer and afetm-inject are.
    pub bin_dir: PathBuf,
    pub db: PathBuf,
    pub scope: Scope,
    pub seed: u64,
    pub window: Duration,
    pub cap: usize,
    pub normal_runs: usize,
    pub sample: Duration,
    pub connections: usize,
    /// Stop after this many faults (the rest stays pending for the next invocation).
    pub max_faults: Option<usize>,
    /// A run's manifestation is `slow` above this factor x the normal mean latency.
    pub slow_factor: f64,
    /// A run still going after this long is ended: the target's processes are killed and the
    /// run is recorded as a hang.
    pub fault_timeout: Duration,
}

/// What one invocation did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub faults_done: usize,
    pub runs: usize,
    pub pending: usize,
    pub wall: Duration,
}

/// A child that dies with the runner and is killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> std::io::Result<Proc> {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map(Proc)
}

fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

fn wait_file(path: &Path, child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let t = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default().trim());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{what} not ready after 30 s: {}", std::fs::read_to_string(log).unwrap_or_default().trim());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

struct Session {
    cfg: Config,
    stack: testbed::Config,
    module: PathBuf,
    url: String,
    rt: tokio::runtime::Runtime,
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
                .args(["--analyzer", &self.url, "--agent-id", id, "--ready-file"])
                .arg(&ready)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
        )?;
        wait_file(&ready, &mut p.0, &format!("agent {id}"), &log)?;
        Ok(p)
    }

    /// The CRUD mix for `duration`, without warm-up; a request unanswered past the window
    /// (plus a second) counts as failed.
    fn load(&self, duration: Duration) -> Result<testbed::load::Report> {
        let mut l = testbed::load::LoadConfig::new(self.stack.url());
        l.connections = self.cfg.connections;
        l.duration = duration;
        l.warmup = Duration::ZERO;
        l.items = self.stack.seed_items;
        l.request_timeout = self.cfg.window + Duration::from_secs(1);
        testbed::load::run(&l)
    }

    /// Activated functions (name, calls per second) from count mode under the workload.
    fn sample(&self, module: &str) -> Result<Vec<(String, f64)>> {
        testbed::up(&self.stack).context("testbed up")?;
        let agent = self.agent("count", serde_json::json!([{"function": "*", "mode": "count"}]))?;
        let t = Instant::now();
        let report = self.load(self.cfg.sample);
        let secs = t.elapsed().as_secs_f64();
        stop_gently(agent);
        testbed::down(&self.stack)?;
        let report = report?;
        if report.errors > 0 {
            tracing::warn!(errors = report.errors, "requests failed while sampling");
        }
        let counts = self.rt.block_on(async {
            let mut q = QueryClient::connect(self.url.clone()).await?;
            anyhow::Ok(q.counts(pb::CountsRequest { agent_id: "count".into() }).await?.into_inner().counts)
        })?;
        let w = Weights::from_counts(module, &counts, secs, "campaign sampling")?;
        Ok(w.functions.into_iter().map(|(f, w)| (f, w.per_sec)).collect())
    }

    /// One run: fresh stack, injectors (for `fault`), workload, FCTs of the target's processes.
    fn run_once(&self, fault: Option<(&str, &str)>, normal_latency: f64) -> Result<(Run, Vec<(Forest, FuncTable)>)> {
        let started = Instant::now();
        testbed::down(&self.stack)?;
        testbed::up(&self.stack).context("testbed up")?;
        let logs_at = log_sizes(&self.stack.logs_dir());
        let victims = self.cfg.target.processes(&self.stack)?;
        if victims.is_empty() {
            bail!("no {} process is running", self.cfg.target.name());
        }
        // Per-fault timeout: past it, the target's processes are killed, which ends the
        // injectors (their victims are gone) and makes the rest of the workload fail fast.
        let watchdog = Watchdog::start(victims.clone(), started + self.cfg.fault_timeout);
        let mut injectors = Vec::new();
        let mut injector_errors = Vec::new();
        if let Some((function, spec)) = fault {
            for pid in &victims {
                let ready = self.cfg.work_dir.join(format!("inject-{pid}.ready"));
                let out = self.cfg.work_dir.join(format!("inject-{pid}.out"));
                let err = self.cfg.work_dir.join(format!("inject-{pid}.err"));
                let _ = std::fs::remove_file(&ready);
                let mut p = spawn(
                    Command::new(self.cfg.bin_dir.join("afetm-inject"))
                        .arg("--module")
                        .arg(&self.module)
                        .args(["--function", function, "--fault", spec, "--pid", &pid.to_string(), "--foreign"])
                        .arg("--ready-file")
                        .arg(&ready)
                        .stdout(std::fs::File::create(&out)?)
                        .stderr(std::fs::File::create(&err)?),
                )?;
                match wait_file(&ready, &mut p.0, "afetm-inject", &err) {
                    Ok(()) => injectors.push((p, out)),
                    // A process that exits at the fault's first call can take its injector
                    // with it before it is ready; anything else is worth recording.
                    Err(e) if state(*pid).is_none() => tracing::debug!(pid, error = %e, "victim gone at injection"),
                    Err(e) => injector_errors.push(format!("pid {pid}: {e:#}")),
                }
            }
        }
        let report = self.load(self.cfg.window)?;
        let died = victims.iter().any(|p| state(*p).is_none_or(|s| s == 'Z' || s == 'X'));
        let stopped = victims.iter().any(|p| state(*p) == Some('T'));
        let mut applied = 0;
        for (p, out) in injectors {
            // SAFETY: kill has no memory preconditions; the pid is our injector.
            unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
            let mut p = p;
            let t = Instant::now();
            while p.0.try_wait()?.is_none() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if let Some(v) = text.lines().last().and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
                applied += v["applied"].as_u64().unwrap_or(0);
            }
        }
        for pid in &victims {
            if state(*pid) == Some('T') {
                // SAFETY: as above; a stopped victim of this run.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
        let timed_out = watchdog.finish();
        testbed::down(&self.stack)?;
        let fcts = self.fcts_of(&victims)?;
        let mut logs = read_new_logs(&self.stack.logs_dir(), &logs_at);
        logs.extend(injector_errors.iter().map(|e| ("afetm-inject".to_string(), e.clone())));
        if timed_out {
            logs.push((
                "campaign".to_string(),
                format!("run exceeded the fault timeout ({:?}); target processes killed", self.cfg.fault_timeout),
            ));
        }
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
        Ok((
            Run {
                manifestation,
                requests: report.requests,
                errors: report.errors,
                mean_latency_us: report.latency.mean_us,
                applied,
                wall_ms: started.elapsed().as_millis() as u64,
                logs,
            },
            fcts,
        ))
    }

    /// The FCTs of the windows of `pids` once all are closed (the stack is down, so every
    /// process exited and the agent reported it).
    fn fcts_of(&self, pids: &[u32]) -> Result<Vec<(Forest, FuncTable)>> {
        let pids: HashSet<u32> = pids.iter().copied().collect();
        self.rt.block_on(async {
            let mut q = QueryClient::connect(self.url.clone()).await?;
            let t = Instant::now();
            let windows = loop {
                let all = q
                    .list_windows(pb::ListWindowsRequest { agent_id: "full".into(), pid: 0, closed_only: false })
                    .await?
                    .into_inner()
                    .windows;
                let mine: Vec<pb::WindowInfo> = all.into_iter().filter(|w| pids.contains(&w.pid)).collect();
                if mine.iter().all(|w| w.closed) || t.elapsed() > Duration::from_secs(10) {
                    break mine;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let mut out = Vec::new();
            for w in windows.iter().filter(|w| w.closed) {
                for tid in &w.tids {
                    let tree = q
                        .get_afct(pb::GetAfctRequest { window_id: w.id, tid: *tid })
                        .await?
                        .into_inner()
                        .tree
                        .unwrap_or_default();
                    let mut table = FuncTable::default();
                    let f = Forest::from_proto(&tree, &mut table).map_err(anyhow::Error::msg)?;
                    if !f.is_empty() {
                        out.push((f, table));
                    }
                }
            }
            anyhow::Ok(out)
        })
    }
}

/// Kills `victims` if still running at `deadline`, unless finished first.
struct Watchdog {
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    fn start(victims: Vec<u32>, deadline: Instant) -> Watchdog {
        use std::sync::atomic::Ordering;
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = cancel.clone();
        let handle = std::thread::spawn(move || {
            while !c.load(Ordering::Relaxed) {
                if Instant::now() >= deadline {
                    for pid in &victims {
                        // SAFETY: kill has no memory preconditions; processes of this run.
                        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                    }
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        Watchdog { cancel, handle }
    }

    /// Stops watching; whether the deadline had passed (and the victims were killed).
    fn finish(self) -> bool {
        self.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or(false)
    }
}

fn stop_gently(p: Proc) {
    // SAFETY: kill has no memory preconditions; the pid is our child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let mut p = p;
    let t = Instant::now();
    while p.0.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_sizes(dir: &Path) -> HashMap<PathBuf, u64> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| Some((e.path(), e.metadata().ok()?.len()))).collect())
        .unwrap_or_default()
}

/// Lines the servers logged during a run: what each log file grew by, the last 4 KiB of it.
fn read_new_logs(dir: &Path, before: &HashMap<PathBuf, u64>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, len) in log_sizes(dir) {
        let from = before.get(&path).copied().unwrap_or(0).min(len);
        if len == from {
            continue;
        }
        let start = from.max(len.saturating_sub(4096));
        let Ok(mut f) = std::fs::File::open(&path) else { continue };
        let mut buf = String::new();
        if f.seek(SeekFrom::Start(start)).is_ok() && f.take(4096).read_to_string(&mut buf).is_ok() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !buf.trim().is_empty() {
                out.push((name, buf));
            }
        }
    }
    out.sort();
    out
}

/// Runs (or resumes) the campaign for one target.
pub fn run(cfg: &Config, progress: bool) -> Result<Outcome> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.work_dir)?;
    let mut stack = testbed::Config::new(cfg.work_dir.join("stack"));
    stack.base_port = cfg.base_port;
    stack.apaches = 2;
    stack.children = 4;
    stack.seed_items = 50;
    if cfg.built {
        stack.binaries = testbed::build::binaries(&testbed::build::cache_dir())
            .context("source builds missing: run `cargo xtask testbed build`")?;
    }
    testbed::down(&stack)?; // leftovers of an interrupted campaign
    let module = cfg.target.module_path(&stack.binaries);
    let adb = cfg.work_dir.join("analyzer.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", adb.display()));
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let listen = format!("127.0.0.1:{port}");
    let analyzer = spawn(
        Command::new(cfg.bin_dir.join("afetm-analyzer"))
            .args(["serve", "--listen", &listen, "--window", "1s", "--grace", "500ms", "--db"])
            .arg(&adb)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cfg.work_dir.join("analyzer.log"))?),
    )?;
    let s = Session {
        cfg: cfg.clone(),
        stack,
        module: module.clone(),
        url: format!("http://{listen}"),
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        _analyzer: analyzer,
    };
    // Wait for the analyzer.
    let t = Instant::now();
    while std::net::TcpStream::connect(&listen).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("analyzer did not come up: {}", std::fs::read_to_string(cfg.work_dir.join("analyzer.log"))?);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut db = Fddb::open(&cfg.db).with_context(|| format!("opening FDDB {}", cfg.db.display()))?;
    let m = Module::load(&module).with_context(|| format!("reading {}", module.display()))?;
    let target = db.target(cfg.target.name(), &m.name)?;
    if db.summary(target)?.faults == 0 {
        let activated = s.sample(&m.name)?;
        let by_start: HashMap<u64, &str> = m.functions().iter().map(|f| (f.start, &*f.name)).collect();
        let sigs: HashMap<String, dwarf::Signature> = dwarf::signatures(&module)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(start, sig)| Some((by_start.get(&start)?.to_string(), sig)))
            .collect();
        if sigs.is_empty() {
            tracing::warn!(module = %module.display(), "no DWARF: only crash, deadlock and IP+N faults (use source builds for interface faults)");
        }
        let p = plan(&activated, &sigs, &cfg.scope, cfg.seed);
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
        for f in &p.faults {
            db.fault(ids[&f.function], f.kind, &f.spec)?;
        }
        tracing::info!(
            target = cfg.target.name(),
            activated = activated.len(),
            functions = p.functions.len(),
            faults = p.faults.len(),
            without_signature = p.without_signature,
            "campaign planned"
        );
    }
    // Full tracing of the planned functions for the rest of the campaign.
    let traced: Vec<serde_json::Value> =
        db.function_names(target)?.iter().map(|f| serde_json::json!({"function": f, "mode": "event"})).collect();
    let full = s.agent("full", serde_json::Value::Array(traced))?;
    let mut runs = 0;
    for _ in db.normal_runs(target)? as usize..cfg.normal_runs {
        let (run, fcts) = s.run_once(None, 0.0)?;
        db.record_run(target, None, &run, &fcts, Done::No)?;
        runs += 1;
    }
    let normal_latency = db.normal_mean_latency(target)?;
    let pending = db.pending(target)?;
    let todo = cfg.max_faults.map_or(pending.len(), |n| n.min(pending.len()));
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(todo as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} faults, ETA {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_prefix(cfg.target.name());
        b
    });
    let mut done = 0;
    for fault in pending.iter().take(todo) {
        if let Some(b) = &bar {
            b.set_message(format!("{} {}", fault.function, fault.spec));
        }
        // Inject again until a run adds no new unique FCT, at most `cap` runs in all (runs of
        // an interrupted invocation count).
        let cap = cfg.cap.max(1) as u64;
        for attempt in db.runs_of_fault(fault.id)? + 1..=cap {
            let (run, fcts) = s.run_once(Some((&fault.function, &fault.spec)), normal_latency)?;
            let rule = if attempt == cap { Done::Yes } else { Done::IfNothingNew };
            let new = db.record_run(target, Some(fault.id), &run, &fcts, rule)?;
            runs += 1;
            tracing::debug!(function = %fault.function, spec = %fault.spec, attempt, new, manifestation = run.manifestation.as_str(), "run");
            if new == 0 {
                break;
            }
        }
        done += 1;
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(full);
    testbed::down(&s.stack)?;
    Ok(Outcome { faults_done: done, runs, pending: db.pending(target)?.len(), wall: started.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_kills_only_after_its_deadline() {
        let mut slow = Command::new("sleep").arg("30").spawn().unwrap();
        let w = Watchdog::start(vec![slow.id()], Instant::now() + Duration::from_millis(200));
        let status = slow.wait().unwrap();
        assert!(w.finish(), "the deadline passed");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        let mut quick = Command::new("sleep").arg("30").spawn().unwrap();
        let w = Watchdog::start(vec![quick.id()], Instant::now() + Duration::from_secs(60));
        assert!(!w.finish(), "finished before the deadline");
        assert!(quick.try_wait().unwrap().is_none(), "not killed");
        quick.kill().unwrap();
        quick.wait().unwrap();
    }
}
