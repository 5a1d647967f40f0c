//! `afetm-agent --calibrate FILE`: what a probe costs on this host, per mode and per kind of
//! probe site (`afetm_proto::costs::ProbeCosts`), for cost-aware trace point selection.
//!
//! The agent probes two functions of its own binary, written in assembly so the instruction
//! under the probe is known: `afetm_calib_emu` starts with `push %rbp` (the kernel emulates it),
//! `afetm_calib_ss` with `lea` followed by `ret` (nothing emulated to move the probe to: it is
//! single-stepped). A child process (`--calibration-loop`) calls one of them in a loop, `depth`
//! frames below its main, and prints ns per call; the cost of a mode is the difference to the
//! same loop without probes (median of three). The real reader drains the ring buffer meanwhile
//! (into an outbox nobody sends), so the costs include what the events cost the kernel side
//! with a reader keeping up. Call-stack events are measured at two depths for the per-frame
//! cost of the kernel's unwinding.

use std::{
    path::Path,
    process::Command,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use afetm_proto::{
    costs::{ModeCosts, ProbeCosts},
    plan::{Mode, PlanFile, Point, Target as PlanTarget},
};
use anyhow::{Context, Result, bail};

use crate::{
    reader::{Reader, ReaderConfig, ReaderStats},
    tracer::{Target, Tracer},
    transport::Outbox,
};

std::arch::global_asm!(
    ".text",
    ".globl afetm_calib_emu",
    ".type afetm_calib_emu,@function",
    "afetm_calib_emu:",
    ".cfi_startproc",
    "push %rbp",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset %rbp,-16",
    "mov %rsp,%rbp",
    ".cfi_def_cfa_register %rbp",
    "lea 1(%rdi),%rax",
    "pop %rbp",
    ".cfi_def_cfa %rsp,8",
    "ret",
    ".cfi_endproc",
    ".size afetm_calib_emu,.-afetm_calib_emu",
    ".globl afetm_calib_ss",
    ".type afetm_calib_ss,@function",
    "afetm_calib_ss:",
    ".cfi_startproc",
    "lea 1(%rdi),%rax",
    "ret",
    ".cfi_endproc",
    ".size afetm_calib_ss,.-afetm_calib_ss",
    options(att_syntax)
);

unsafe extern "C" {
    fn afetm_calib_emu(x: u64) -> u64;
    fn afetm_calib_ss(x: u64) -> u64;
}

/// Kind of probe site a calibration loop calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Site {
    /// `afetm_calib_emu` (probe on `push %rbp`, emulated).
    Emu,
    /// `afetm_calib_ss` (probe on `lea`, single-stepped).
    Ss,
}

impl Site {
    fn function(self) -> &'static str {
        match self {
            Site::Emu => "afetm_calib_emu",
            Site::Ss => "afetm_calib_ss",
        }
    }

    /// Calls per measurement: a single-stepped hit costs ~15x an emulated one. 100,000
    /// call-stack events fit the ring buffer even if the reader fell behind.
    fn calls(self) -> u64 {
        match self {
            Site::Emu => 100_000,
            Site::Ss => 10_000,
        }
    }
}

/// Extra frames between the calibration loop's main and the probed call for the deep run.
const DEEP: u32 = 32;

#[inline(never)]
fn nest(depth: u32, site: Site, calls: u64) -> u64 {
    if depth == 0 {
        let f: unsafe extern "C" fn(u64) -> u64 = match site {
            Site::Emu => afetm_calib_emu,
            Site::Ss => afetm_calib_ss,
        };
        let f = std::hint::black_box(f);
        let t = Instant::now();
        let mut acc = 0u64;
        for i in 0..calls {
            // SAFETY: both functions only compute rdi + 1.
            acc = acc.wrapping_add(unsafe { f(i) });
        }
        std::hint::black_box(acc);
        return t.elapsed().as_nanos() as u64;
    }
    // Not a tail call: each level keeps its frame.
    std::hint::black_box(nest(depth - 1, site, calls))
}

/// The child side: calls the site's function `calls` times `depth` frames down and prints the
/// mean ns per call.
pub fn calibration_loop(site: Site, calls: u64, depth: u32) {
    let ns = nest(depth, site, calls.max(1));
    println!("{:.1}", ns as f64 / calls.max(1) as f64);
}

/// Median ns per call of `reps` child runs.
fn measure(site: Site, depth: u32, calls: u64, reps: usize) -> Result<f64> {
    let exe = std::env::current_exe().context("finding the agent's own binary")?;
    let mut v = Vec::new();
    for _ in 0..reps {
        let out = Command::new(&exe)
            .args(["--calibration-loop", &format!("{site:?}").to_lowercase(), &calls.to_string(), &depth.to_string()])
            .output()
            .context("running the calibration loop")?;
        if !out.status.success() {
            bail!("calibration loop failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        v.push(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().context("calibration loop output")?);
        // Let the reader drain the ring before the next run: a full ring drops, and a dropped
        // event costs less than a delivered one.
        std::thread::sleep(Duration::from_millis(200));
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

/// A tracer on the agent's own binary and a reader draining it; `stop` ends the reader.
struct Session {
    tracer: Tracer,
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<ReaderStats>,
    plan: PlanFile,
}

impl Session {
    fn start() -> Result<Session> {
        let exe = std::env::current_exe().context("finding the agent's own binary")?;
        let spec = PlanTarget { path: Some(exe), pid: None };
        let target = Target::open(&spec)?;
        let module = target.module.clone();
        let (tracer, maps, table) =
            Tracer::load(target, agent_common::DEFAULT_STACK_WINDOW, true, agent_common::RING_BYTES)?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = Reader::new(maps, table, module, Outbox::new(100_000), ReaderConfig::default());
        let s = stop.clone();
        let reader = std::thread::Builder::new().name("afetm-reader".into()).spawn(move || reader.run(s))?;
        let plan = PlanFile { target: spec, version: 0, points: Vec::new(), selection: None };
        Ok(Session { tracer, stop, reader, plan })
    }

    fn probe(&mut self, mode: Mode) -> Result<()> {
        self.plan.version += 1;
        self.plan.points =
            [Site::Emu, Site::Ss].iter().map(|s| Point { function: s.function().to_string(), mode }).collect();
        let report = self.tracer.apply(&self.plan)?;
        let emulated: Vec<bool> = [Site::Emu, Site::Ss]
            .iter()
            .map(|s| report.probes.iter().find(|p| p.function == s.function()).is_some_and(|p| p.emulated))
            .collect();
        if emulated != [true, false] {
            bail!("calibration probes were not placed as expected (emulated: {emulated:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
        Ok(())
    }

    fn finish(self) -> ReaderStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(self.tracer);
        self.reader.join().unwrap_or_default()
    }
}

fn warn_drops(stats: &ReaderStats) {
    if stats.kernel_drops > 0 {
        tracing::warn!(
            drops = stats.kernel_drops,
            "the reader fell behind during calibration (a release build keeps up): dropped events cost less, so the costs are understated"
        );
    }
}

/// Measures every mode at both kinds of site and writes the costs to `out`.
pub fn calibrate(out: &Path) -> Result<ProbeCosts> {
    const REPS: usize = 3;
    let base = |site: Site, depth: u32| measure(site, depth, site.calls(), REPS);
    let none = [base(Site::Emu, 0)?, base(Site::Ss, 0)?];
    let none_deep = base(Site::Emu, DEEP)?;
    let mut session = Session::start()?;
    let mut costs = [[0.0f64; 3]; 2];
    for (k, mode) in [Mode::Count, Mode::Event, Mode::Callstack].into_iter().enumerate() {
        session.probe(mode)?;
        for (i, site) in [Site::Emu, Site::Ss].into_iter().enumerate() {
            costs[i][k] = (base(site, 0)? - none[i]).max(0.0);
            tracing::info!(?mode, ?site, ns = costs[i][k], "probe cost");
        }
    }
    let stats = session.finish();
    warn_drops(&stats);
    let frames = if stats.kernel_unwound > 0 { stats.chain_frames as f64 / stats.kernel_unwound as f64 } else { 0.0 };
    let mut session = Session::start()?;
    session.probe(Mode::Callstack)?;
    let deep = (base(Site::Emu, DEEP)? - none_deep).max(0.0);
    let deep_stats = session.finish();
    warn_drops(&deep_stats);
    if deep_stats.kernel_unwound * 2 < deep_stats.stack_events {
        tracing::warn!(
            unwound = deep_stats.kernel_unwound,
            stack_events = deep_stats.stack_events,
            "most deep call stacks were copied, not unwound in the kernel: the per-frame cost is off"
        );
    }
    let per_frame = ((deep - costs[0][2]) / DEEP as f64).max(0.0);
    let mode_costs = |c: [f64; 3]| ModeCosts { count_ns: c[0], event_ns: c[1], callstack_ns: c[2] };
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    let result = ProbeCosts {
        host: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
        calls: Site::Emu.calls(),
        emulated: mode_costs(costs[0]),
        single_stepped: mode_costs(costs[1]),
        callstack_frames: frames.round() as u32,
        per_frame_ns: per_frame,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(result)
}
