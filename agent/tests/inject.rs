//! `afetm-inject` on the real `faulty` test program with real uprobes (and ptrace where this
//! kernel needs it): each of the five fault types has its effect (killed, stopped, control
//! flow changed, wrong values seen) and the traced call trees of the faulty runs differ from
//! the normal one (nothing below the injected function after a crash or hang; the faulty path
//! after IP+N and interface corruption). Safety refusals are clear errors. Root only.
mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_calltree::tree::Color;
use common::*;

fn inject_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_afetm-inject"))
}

fn build_faulty(dir: &Path) -> PathBuf {
    let out = dir.join("faulty");
    let status = Command::new("gcc")
        .args(["-O0", "-o"])
        .arg(&out)
        .arg(repo_root().join("testbed/progs/faulty.c"))
        .status()
        .unwrap();
    assert!(status.success());
    out
}

/// Runs `faulty 20` under the injector; returns the victim's pid, the injector's JSON report,
/// and what `faulty` printed.
fn injected_run(
    prog: &Path,
    dir: &Path,
    function: &str,
    fault: &str,
    while_running: impl FnOnce(u32),
) -> (u32, serde_json::Value, String) {
    let ready = dir.join(format!("{}.ready", fault.replace(':', "_")));
    let mut inj = Command::new(inject_bin())
        .args(["--module"])
        .arg(prog)
        .args(["--function", function, "--fault", fault, "--ready-file"])
        .arg(&ready)
        .arg("--")
        .arg(prog)
        .arg("20")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ready.exists() {
        assert!(inj.try_wait().unwrap().is_none(), "injector exited early");
        assert!(t.elapsed() < Duration::from_secs(20), "injector not ready");
        sleep(Duration::from_millis(20));
    }
    let pid: u32 = std::fs::read_to_string(&ready).unwrap().trim().parse().unwrap();
    inj.stdin.take().unwrap().write_all(b"go\n").unwrap();
    while_running(pid);
    let out = inj.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(report)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (pid, json, stdout)
}

fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

/// Every fault type of the paper's model into `faulty`, each run traced by a real agent: the
/// effect the fault type must have, and call trees that differ from the normal run's.
#[test]
fn each_fault_type_takes_effect_and_changes_the_call_trees() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_faulty(dir.path());
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "60s"]);
    let fns = ["main", "step", "work", "pick", "leaf", "check", "mark"];
    let points: Vec<(&str, &str)> = fns.iter().map(|f| (*f, "event")).collect();
    let agent = AgentProc::start(&write_plan(dir.path(), "faulty", &prog, &points), &an.url, "faulty", dir.path());

    // Normal run.
    let mut normal = Command::new(&prog).arg("20").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let normal_pid = normal.id();
    normal.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = normal.wait_with_output().unwrap();
    assert!(out.status.success());
    let normal_out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(normal_out.lines().count(), 20);

    // Crash: SIGKILL at the first call of work(); nothing printed.
    let (crash_pid, r, printed) = injected_run(&prog, dir.path(), "work", "crash", |_| {});
    assert_eq!(r["ended"], "signal 9", "{r}");
    assert!(r["applied"].as_u64().unwrap() >= 1, "{r}");
    let apps = r["applications"].as_array().unwrap();
    assert_eq!(apps.len(), 1, "one thread: {r}");
    assert_eq!((apps[0]["pid"].as_u64(), apps[0]["tid"].as_u64()), (Some(crash_pid as u64), Some(crash_pid as u64)));
    assert_eq!(printed.lines().count(), 1, "only the report: faulty died before printing: {printed}");

    // Deadlock: the process stops at the first call of work() and stays stopped.
    let (dead_pid, r, _) = injected_run(&prog, dir.path(), "work", "deadlock", |pid| {
        let t = Instant::now();
        while state(pid) != Some('T') {
            assert!(t.elapsed() < Duration::from_secs(10), "pid {pid} never stopped: state {:?}", state(pid));
            sleep(Duration::from_millis(20));
        }
        sleep(Duration::from_millis(300));
        assert_eq!(state(pid), Some('T'), "still stopped");
        // SAFETY: kill has no memory preconditions; pid is the victim the injector started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    assert_eq!(r["ended"], "signal 9", "{r}");

    // IP+N in check() (the jump over `return 2` is skipped), output corruption of check's
    // return value, input corruption of work's b (a register) and of many's g (on the stack):
    // each run completes with other values.
    let mut changed = Vec::new();
    for (func, fault) in [("check", "ip+"), ("check", "output:1"), ("work", "input:1:30"), ("many", "input:6:30")] {
        let (pid, r, printed) = injected_run(&prog, dir.path(), func, fault, |_| {});
        assert_eq!(r["ended"], "exit 0", "{fault}: {r}");
        assert_eq!(r["applied"].as_u64().unwrap(), 20, "{fault}: once per call: {r}");
        // Where and when: the one thread, 20 times, on the agent's clock (CLOCK_MONOTONIC).
        let apps = r["applications"].as_array().unwrap();
        assert_eq!(apps.len(), 1, "{fault}: {r}");
        let (first, last) = (apps[0]["first_ns"].as_u64().unwrap(), apps[0]["last_ns"].as_u64().unwrap());
        assert_eq!((apps[0]["tid"].as_u64(), apps[0]["count"].as_u64()), (Some(pid as u64), Some(20)), "{r}");
        assert!(first < last && last <= afetm_agent::reader::monotonic_ns(), "{r}");
        let values: String = printed.lines().take(20).map(|l| format!("{l}\n")).collect();
        assert_ne!(values, normal_out, "{fault}: the program must see the fault");
        eprintln!("{fault} in {func}: {}", r["mechanism"]);
        changed.push((fault, pid));
    }
    agent.stop();

    let (table, trees) = rt().block_on(afcts(&an.url, "faulty"));
    let names_of = |pid: u32| -> std::collections::BTreeSet<String> {
        trees
            .iter()
            .filter(|(w, _, _)| w.pid == pid)
            .flat_map(|(_, _, f)| {
                f.nodes.iter().filter(|n| n.color == Color::White).map(|n| table.get(n.func).name.to_string())
            })
            .collect()
    };
    let normal = names_of(normal_pid);
    assert!(
        ["main", "step", "work", "pick", "leaf", "check"].iter().all(|f| normal.contains(*f)),
        "normal: {normal:?}"
    );
    assert!(!normal.contains("mark"), "mark is only on faulty paths: {normal:?}");
    for (what, pid) in [("crash", crash_pid), ("deadlock", dead_pid)] {
        let t = names_of(pid);
        assert!(t.contains("work"), "{what}: the injected function was entered: {t:?}");
        assert!(!t.contains("leaf") && !t.contains("pick"), "{what}: nothing below work after the fault: {t:?}");
    }
    for (what, pid) in changed {
        let t = names_of(pid);
        assert!(t.contains("mark"), "{what}: the faulty path (mark) shows in the call tree: {t:?}");
    }
}

#[test]
fn injector_refuses_foreign_pids_init_unknown_functions_and_bad_faults() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_faulty(dir.path());
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(inject_bin()).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let p = prog.to_str().unwrap();
    let pid = other.id().to_string();
    let (ok, err) = run(&["--module", p, "--function", "work", "--fault", "crash", "--pid", &pid]);
    assert!(!ok && err.contains("--foreign") && err.trim().lines().count() == 1, "{err}");
    let (ok, err) = run(&["--module", p, "--function", "work", "--fault", "crash", "--pid", "1", "--foreign"]);
    assert!(!ok && err.contains("init"), "{err}");
    let (ok, err) = run(&["--module", p, "--function", "nosuch", "--fault", "crash", "--pid", &pid, "--foreign"]);
    assert!(!ok && err.contains("no function \"nosuch\""), "{err}");
    let (ok, err) = run(&["--module", p, "--function", "work", "--fault", "output:99", "--pid", &pid, "--foreign"]);
    assert!(!ok && err.contains("bad fault"), "{err}");
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the foreign process was not touched");
    other.kill().unwrap();
    other.wait().unwrap();
}
