//! `cargo xtask bench ...`: figures as ratios to a baseline taken in the same run (these
//! machines are noisy; absolute numbers only mean something next to their baseline).
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::{cargo, root, run};

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// ns per call of a probed function (no probe; afetm count = bare probe; afetm event;
    /// afetm callstack; bpftrace count) for an emulated and a single-stepped entry instruction,
    /// then events/s through agent -> gRPC -> analyzer -> AFCT with one core each.
    Probe {
        /// Calls per probed measurement.
        #[arg(long, default_value_t = 300_000)]
        calls: u64,
        /// Repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

pub fn run_bench(which: Which) -> Result<()> {
    match which {
        Which::Probe { calls, reps } => probe(calls, reps),
    }
}

struct Guard(Vec<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
}

fn measure(prog: &Path, which: &str, calls: u64, reps: usize) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..reps {
        let out = Command::new(prog).args([which, &calls.to_string()]).output()?;
        v.push(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().context("probebench output")?);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn start_agent(bin: &Path, plan: &Path, server: &str, dir: &Path, pin: Option<&str>) -> Result<(Child, PathBuf)> {
    let ready = dir.join("agent.ready");
    let log = dir.join("agent.log");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = match pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(bin.join("afetm-agent"));
            c
        }
        None => Command::new(bin.join("afetm-agent")),
    };
    let mut child = cmd
        .arg("--plan")
        .arg(plan)
        .args(["--analyzer", server, "--agent-id", "bench", "--ready-file"])
        .arg(&ready)
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let t = Instant::now();
    while !ready.exists() {
        if child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(30) {
            bail!("agent did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        sleep(Duration::from_millis(20));
    }
    Ok((child, log))
}

fn stop_agent(mut child: Child, log: &Path) -> Result<String> {
    signal(&child, "-TERM");
    child.wait()?;
    Ok(std::fs::read_to_string(log).unwrap_or_default())
}

fn start_analyzer(bin: &Path, dir: &Path, listen: &str, pin: Option<&str>) -> Result<Child> {
    let db = dir.join("bench.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    let mut cmd = match pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(bin.join("afetm-analyzer"));
            c
        }
        None => Command::new(bin.join("afetm-analyzer")),
    };
    let child =
        cmd.args(["serve", "--listen", listen, "--window", "1s", "--db"]).arg(&db).stderr(Stdio::null()).spawn()?;
    sleep(Duration::from_millis(500));
    Ok(child)
}

fn analyzer_events(bin: &Path, server: &str) -> Result<u64> {
    let out = Command::new(bin.join("afetm-analyzer")).args(["stats", "--server", server]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("events: ").map(|v| v.trim_end_matches(',').parse::<u64>()))
        .context("no events counter in analyzer stats")?
        .context("bad events counter")
}

fn bpftrace(prog: &Path, func: &str, which: &str, calls: u64, reps: usize) -> Result<f64> {
    let mut child = Command::new("bpftrace")
        .args(["-e", &format!("uprobe:{}:{func} {{ @c = count(); }}", prog.display())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    let stdout = child.stdout.take().context("bpftrace stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("Attaching") => break,
            Some(Ok(_)) => {}
            _ => bail!("bpftrace did not attach"),
        }
    }
    sleep(Duration::from_millis(300));
    let ns = measure(prog, which, calls, reps);
    signal(&child, "-INT");
    let _ = child.wait();
    ns
}

fn probe(calls: u64, reps: usize) -> Result<()> {
    run(&mut cargo(&["build", "--release", "--workspace", "--bins"]))?;
    let bin = root().join("target/release");
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let prog = dir.join("probebench");
    run(Command::new("gcc").args(["-O2", "-o"]).arg(&prog).arg(root().join("testbed/progs/probebench.c")))?;
    let listen = "127.0.0.1:50081";
    let server = format!("http://{listen}");
    let mut guard = Guard(vec![start_analyzer(&bin, &dir, listen, None)?]);

    let free_calls = calls * 20;
    let mut rows: Vec<(String, f64, f64)> =
        vec![("no probe".into(), measure(&prog, "emu", free_calls, reps)?, measure(&prog, "ss", free_calls, reps)?)];
    let mut placement = String::new();
    for mode in ["count", "event", "callstack"] {
        let plan = dir.join(format!("{mode}.json"));
        std::fs::write(
            &plan,
            format!(
                r#"{{"target":{{"path":"{}"}},"points":[{{"function":"emu_fn","mode":"{mode}"}},{{"function":"ss_fn","mode":"{mode}"}}]}}"#,
                prog.display()
            ),
        )?;
        if placement.is_empty() {
            placement = String::from_utf8_lossy(
                &Command::new(bin.join("afetm-agent")).arg("--plan").arg(&plan).arg("--dry-run").output()?.stdout,
            )
            .into_owned();
        }
        let (agent, log) = start_agent(&bin, &plan, &server, &dir, None)?;
        let emu = measure(&prog, "emu", calls, reps)?;
        let ss = measure(&prog, "ss", calls, reps)?;
        stop_agent(agent, &log)?;
        let label = if mode == "count" { "afetm count (bare probe)".to_string() } else { format!("afetm {mode}") };
        rows.push((label, emu, ss));
    }
    rows.push((
        "bpftrace count (entry)".into(),
        bpftrace(&prog, "emu_fn", "emu", calls, reps)?,
        bpftrace(&prog, "ss_fn", "ss", calls, reps)?,
    ));

    println!("\nprobe sites chosen by afetm:\n{placement}");
    println!("{:<28} {:>14} {:>14}", "ns per call", "emu_fn (push)", "ss_fn (lea)");
    for (label, emu, ss) in &rows {
        println!("{label:<28} {emu:>14.1} {ss:>14.1}");
    }
    let get = |l: &str| rows.iter().find(|r| r.0.starts_with(l)).map(|r| (r.1, r.2)).unwrap_or((f64::NAN, f64::NAN));
    let (none_e, none_s) = get("no probe");
    let (cnt_e, _) = get("afetm count");
    let (ev_e, ev_s) = get("afetm event");
    let (_, bt_s) = get("bpftrace");
    let (bt_e, _) = get("bpftrace");
    println!("\nratios (same run):");
    println!("  afetm event / bare emulated probe, emu_fn : {:.2} (target <= 1.5)", (ev_e - none_e) / (cnt_e - none_e));
    println!("  bpftrace / afetm event, ss_fn             : {:.1}x (target >= 8)", (bt_s - none_s) / (ev_s - none_s));
    println!("  bpftrace / afetm event, emu_fn            : {:.2}x", (bt_e - none_e) / (ev_e - none_e));

    // Throughput: agent on CPU 0, analyzer on CPU 1.
    for mut c in guard.0.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    guard.0.push(start_analyzer(&bin, &dir, listen, Some("1"))?);
    let plan = dir.join("event.json");
    let (agent, log) = start_agent(&bin, &plan, &server, &dir, Some("0"))?;
    let total = 2_000_000u64;
    let t0 = Instant::now();
    run(Command::new(&prog).args(["emu", &total.to_string()]).stdout(Stdio::null()))?;
    let mut last = (0u64, t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        sleep(Duration::from_millis(200));
        let n = analyzer_events(&bin, &server)?;
        if n > last.0 {
            last = (n, t0.elapsed());
        } else if n >= total || t0.elapsed() > last.1 + Duration::from_secs(3) {
            break;
        }
    }
    let log = stop_agent(agent, &log)?;
    let drops = log
        .lines()
        .find(|l| l.contains("reader finished"))
        .map(|l| l.split_whitespace().filter(|w| w.contains("drops=")).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!("\nend to end (agent on CPU 0, analyzer on CPU 1, target unpinned):");
    println!(
        "  {} of {total} events stored in {:.2} s: {:.0} events/s  ({drops})",
        last.0,
        last.1.as_secs_f64(),
        last.0 as f64 / last.1.as_secs_f64()
    );
    Ok(())
}
