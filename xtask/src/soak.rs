//! `cargo xtask soak`: the analyzer down for a long time (default 10 minutes) while a traced
//! program keeps working, then back on the same database.
//!
//! `testbed/progs/steady.c` makes requests at a fixed rate, three traced calls each, and says
//! at the end how many it made. The agent (release build, `--queue-events Q`) traces it into an
//! analyzer, which is killed (SIGKILL, as a crash would) after a minute and restarted on the
//! same database after `--down`. The soak then checks, and fails unless all hold:
//!
//! - **RSS bounded by the queue**: while the analyzer is down the agent's RSS grows by at most
//!   `--queue-events` x [`EVENT_BYTES`] + [`RSS_SLACK_KIB`], and once the outbox is full it
//!   stops growing: over the second half of the outage by less than [`RSS_SLACK_KIB`].
//! - **Drops counted exactly**: calls made = events stored + events the agent's queue dropped
//!   + events the kernel dropped + events that arrived for closed windows, to the event; and the
//!   drops the analyzer stored equal the agent's own counter.
//! - **Everything after the restart arrives once**: the identity above leaves no room for an
//!   event stored twice, the outbox drains to zero, and the database passes
//!   `PRAGMA integrity_check`.
//!
//! It prints the agent's RSS, queue drops and outbox size over time and writes them to
//! `target/soak/report.md`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_proto::{self as pb, query_client::QueryClient};
use anyhow::{Context, Result, bail};
use testbed::scrape::{sample, scrape};

use crate::{Guard, bench::start_agent_with, cargo, root, run, target_dir};

/// Allowed RSS growth over the second half of the outage, KiB: allocator noise, not a queue.
pub const RSS_SLACK_KIB: u64 = 8 * 1024;
/// What `--queue-events` documents an event to take in the agent's queue, bytes.
pub const EVENT_BYTES: u64 = 100;
const ANALYZER: &str = "127.0.0.1:20092";
const ANALYZER_METRICS: &str = "127.0.0.1:20093";
const AGENT_METRICS: &str = "127.0.0.1:20094";
/// Traced calls per request of `steady`.
const CALLS_PER_REQUEST: u64 = 3;

/// `cargo xtask soak` arguments.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the analyzer stays down.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub down: Duration,
    /// Requests per second of the traced program (three traced calls each).
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// The agent's `--queue-events`.
    #[arg(long, default_value_t = 200_000)]
    pub queue_events: u64,
    /// Seconds between samples of the agent's RSS and counters.
    #[arg(long, default_value_t = 10)]
    pub every: u64,
}

/// One sample of the agent during the soak.
struct Sample {
    at: f64,
    phase: &'static str,
    rss_kib: u64,
    events: u64,
    queue_drops: u64,
    outbox: u64,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("agent status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS in /proc/PID/status")
}

fn agent_counter(m: &str, name: &str) -> u64 {
    sample(m, &format!("afetm_agent_{name}")).unwrap_or(0.0) as u64
}

fn analyzer(bin: &Path, dir: &Path, db: &Path, log: &str) -> Result<Child> {
    let mut child = Command::new(bin.join("afetm-analyzer"))
        .args(["serve", "--listen", ANALYZER, "--metrics-listen", ANALYZER_METRICS, "--window", "10s", "--db"])
        .arg(db)
        .stderr(std::fs::File::create(dir.join(log))?)
        .spawn()?;
    let t = Instant::now();
    while scrape(ANALYZER_METRICS).is_err() {
        if let Some(s) = child.try_wait()? {
            bail!("analyzer exited at start ({s}); see {}", dir.join(log).display());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("analyzer not up after 30 s");
        }
        sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// Events the analyzer dropped because their window had closed (its `late_event` refusals).
fn late_events(m: &str) -> u64 {
    sample(m, r#"afetm_analyzer_rejected_total{reason="late_event"}"#).unwrap_or(0.0) as u64
}

fn steady(dir: &Path, rate: u64) -> Result<(PathBuf, Child)> {
    let prog = dir.join("steady");
    run(Command::new("gcc")
        .args(["-O2", "-fno-optimize-sibling-calls", "-o"])
        .arg(&prog)
        .arg(root().join("testbed/progs/steady.c")))?;
    let child = Command::new(&prog).arg(rate.to_string()).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    Ok((prog, child))
}

fn write_plan(dir: &Path, prog: &Path) -> Result<PathBuf> {
    let plan = dir.join("plan.json");
    let points: Vec<_> = ["soak_request", "soak_parse", "soak_reply"]
        .iter()
        .map(|f| serde_json::json!({ "function": f, "mode": "event" }))
        .collect();
    std::fs::write(&plan, serde_json::json!({ "target": { "path": prog }, "points": points }).to_string())?;
    Ok(plan)
}

/// Samples the agent every `every` until `until`, appending to `out`.
fn watch(
    pid: u32,
    phase: &'static str,
    start: Instant,
    until: Instant,
    every: Duration,
    out: &mut Vec<Sample>,
) -> Result<()> {
    loop {
        let m = scrape(AGENT_METRICS).context("agent metrics")?;
        let s = Sample {
            at: start.elapsed().as_secs_f64(),
            phase,
            rss_kib: rss_kib(pid)?,
            events: agent_counter(&m, "events_total"),
            queue_drops: agent_counter(&m, "queue_drops_total"),
            outbox: agent_counter(&m, "outbox_batches"),
        };
        eprintln!(
            "xtask soak: {:>6.0} s {:<10} rss {:>7} KiB  events {:>10}  queue drops {:>10}  outbox {:>5}",
            s.at, s.phase, s.rss_kib, s.events, s.queue_drops, s.outbox
        );
        out.push(s);
        if Instant::now() + every > until {
            sleep(until.saturating_duration_since(Instant::now()));
            return Ok(());
        }
        sleep(every);
    }
}

/// Waits until the agent's outbox is empty and has stayed so for a second.
fn drained(timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    let mut empty_since: Option<Instant> = None;
    loop {
        let m = scrape(AGENT_METRICS)?;
        if agent_counter(&m, "outbox_batches") == 0 {
            let since = *empty_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(1) {
                return Ok(since.duration_since(t));
            }
        } else {
            empty_since = None;
        }
        if t.elapsed() > timeout {
            bail!("the agent's outbox did not drain in {timeout:?}");
        }
        sleep(Duration::from_millis(200));
    }
}

fn stored_agent() -> Result<pb::AgentInfo> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut q = QueryClient::connect(format!("http://{ANALYZER}")).await?;
        let agents = q.list_agents(pb::ListAgentsRequest { without_plans: true }).await?.into_inner().agents;
        agents.into_iter().find(|a| a.agent_id == "soak").context("the agent is not in the database")
    })
}

fn integrity(db: &Path) -> Result<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])",
        ])
        .arg(db)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The checks of the module doc, as (what, held) lines.
struct Verdict(Vec<(String, bool)>);

impl Verdict {
    fn check(&mut self, held: bool, what: String) {
        eprintln!("xtask soak: {} {what}", if held { "ok  " } else { "FAIL" });
        self.0.push((what, held));
    }
}

pub fn soak(a: SoakArgs) -> Result<()> {
    run(&mut cargo(&["build", "--release", "--bins", "-p", "agent", "-p", "analyzer"]))?;
    let bin = target_dir().join("release");
    let dir = target_dir().join("soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("soak.sqlite");
    let every = Duration::from_secs(a.every.max(1));

    let mut guard = Guard(vec![analyzer(&bin, &dir, &db, "analyzer-1.log")?]);
    let (prog, mut steady) = steady(&dir, a.rate)?;
    let plan = write_plan(&dir, &prog)?;
    let q = a.queue_events.to_string();
    let extra = ["--queue-events", q.as_str(), "--metrics-listen", AGENT_METRICS];
    let (agent, agent_log) = start_agent_with(&bin, &plan, &format!("http://{ANALYZER}"), &dir, None, "soak", &extra)?;
    let agent_pid = agent.id();
    let mut agent_guard = Guard(vec![agent]);
    let mut stdin = steady.stdin.take().context("steady's stdin")?;
    writeln!(stdin, "go")?;

    let start = Instant::now();
    let mut samples = Vec::new();
    watch(agent_pid, "up", start, Instant::now() + Duration::from_secs(60), every, &mut samples)?;
    let late_before = late_events(&scrape(ANALYZER_METRICS)?);
    for c in &mut guard.0 {
        c.kill()?; // SIGKILL: the analyzer crashes
        c.wait()?;
    }
    guard.0.clear();
    eprintln!("xtask soak: analyzer killed; down for {}", humantime::format_duration(a.down));
    watch(agent_pid, "down", start, Instant::now() + a.down, every, &mut samples)?;
    guard.0.push(analyzer(&bin, &dir, &db, "analyzer-2.log")?);
    let recovery = drained(Duration::from_secs(120))?;
    eprintln!("xtask soak: analyzer back; the outbox drained in {:.1} s", recovery.as_secs_f64());
    watch(agent_pid, "restarted", start, Instant::now() + Duration::from_secs(60), every, &mut samples)?;

    writeln!(stdin, "stop")?;
    let out = steady.wait_with_output()?;
    let requests: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("steady's request count")?;
    // Let the last events be read and sent, then stop the agent (it sends its final batch).
    sleep(Duration::from_secs(2));
    drained(Duration::from_secs(60))?;
    let final_metrics = scrape(AGENT_METRICS)?;
    let agent = agent_guard.0.pop().context("the agent")?;
    crate::bench::stop_agent(agent, &agent_log)?;
    let stored = stored_agent()?;
    let late = late_before + late_events(&scrape(ANALYZER_METRICS)?);
    drop(guard);
    let integrity = integrity(&db)?;

    let made = requests * CALLS_PER_REQUEST;
    let agent_drops = agent_counter(&final_metrics, "queue_drops_total");
    let accounted = stored.events + stored.queue_drops + stored.kernel_drops + late;
    let mut v = Verdict(Vec::new());
    v.check(
        made == accounted,
        format!(
            "calls made {made} = stored {} + queue drops {} + kernel drops {} + late {late} (= {accounted})",
            stored.events, stored.queue_drops, stored.kernel_drops
        ),
    );
    v.check(
        agent_drops == stored.queue_drops,
        format!("queue drops: agent counted {agent_drops}, analyzer stored {}", stored.queue_drops),
    );
    v.check(stored.queue_drops > 0, format!("the outage overflowed the queue ({} drops)", stored.queue_drops));
    let down: Vec<&Sample> = samples.iter().filter(|s| s.phase == "down").collect();
    let half = &down[down.len() / 2..];
    let (first, peak) = (half.first().map_or(0, |s| s.rss_kib), half.iter().map(|s| s.rss_kib).max().unwrap_or(0));
    v.check(
        peak <= first + RSS_SLACK_KIB,
        format!("RSS over the outage's second half: {first} KiB -> peak {peak} KiB (slack {RSS_SLACK_KIB} KiB)"),
    );
    let before = samples.iter().filter(|s| s.phase == "up").map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_down = down.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let bound = before + a.queue_events * EVENT_BYTES / 1024 + RSS_SLACK_KIB;
    v.check(
        peak_down <= bound,
        format!(
            "RSS while down: {before} KiB before -> peak {peak_down} KiB, bound {bound} KiB ({} events x {EVENT_BYTES} B + slack)",
            a.queue_events
        ),
    );
    v.check(integrity == "ok", format!("PRAGMA integrity_check: {integrity}"));
    v.check(true, format!("outbox drained {:.1} s after the restart", recovery.as_secs_f64()));
    report(&dir, &a, &samples, &v, requests)?;
    let failed = v.0.iter().filter(|(_, held)| !held).count();
    if failed > 0 {
        bail!("{failed} soak checks failed (see {})", dir.join("report.md").display());
    }
    Ok(())
}

fn report(dir: &Path, a: &SoakArgs, samples: &[Sample], v: &Verdict, requests: u64) -> Result<()> {
    let mut md = format!(
        "# Soak: analyzer down {} under {} requests/s ({} traced calls/s), --queue-events {}\n\n",
        humantime::format_duration(a.down),
        a.rate,
        a.rate * CALLS_PER_REQUEST,
        a.queue_events
    );
    md += &format!("Requests made: {requests}.\n\n## Checks\n\n");
    for (what, held) in &v.0 {
        md += &format!("- {} {what}\n", if *held { "ok" } else { "**FAILED**" });
    }
    md += "\n## The agent over time\n\n| s | phase | RSS KiB | events | queue drops | outbox batches |\n|---:|---|---:|---:|---:|---:|\n";
    for s in samples {
        md += &format!(
            "| {:.0} | {} | {} | {} | {} | {} |\n",
            s.at, s.phase, s.rss_kib, s.events, s.queue_drops, s.outbox
        );
    }
    std::fs::write(dir.join("report.md"), md)?;
    eprintln!("xtask soak: report in {}", dir.join("report.md").display());
    Ok(())
}
