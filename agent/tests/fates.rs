//! Thread fates on real processes: the real agent traces the real `fates` program (two threads
//! calling tick -> leaf), and how each thread ended or stopped reaches the real analyzer with
//! its last traced calls: killed by SIGKILL, killed by its own SIGSEGV (with and without a
//! crash handler that makes traced calls after the fault), stopped by SIGSTOP, exited with a
//! status, and silent (no call in a window while its process lives). The
//! analyzer, with no model for the program, diagnoses the kills as crashes and the stop as a
//! deadlock at the thread's last calls, and raises nothing for the exit and the silence.
//! Root only.
mod common;

use std::{
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_proto as pb;
use common::*;

fn build_fates(dir: &Path) -> PathBuf {
    let out = dir.join("fates");
    let status = Command::new("gcc")
        .args(["-O1", "-g", "-fno-inline", "-pthread", "-o"])
        .arg(&out)
        .arg(repo_root().join("testbed/progs/fates.c"))
        .status()
        .expect("running gcc");
    assert!(status.success(), "gcc failed");
    out
}

/// Starts `fates mode` and lets it run (it waits for a line on stdin); no core dumps.
fn spawn(prog: &Path, mode: &str) -> Child {
    let mut cmd = Command::new(prog);
    cmd.args([mode, "3"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("starting fates");
    child.stdin.take().expect("stdin").write_all(b"go\n").expect("writing to fates");
    child
}

/// Every fate stored for `pid` so far, in window order (open windows included).
fn fates(url: &str, agent: &str, pid: u32) -> Vec<pb::ThreadFate> {
    rt().block_on(windows(url, agent, false)).into_iter().filter(|w| w.pid == pid).flat_map(|w| w.fates).collect()
}

/// Polls the analyzer until `done` holds for `pid`'s fates; panics with what it saw after 30 s.
fn wait_fates(
    url: &str,
    agent: &str,
    pid: u32,
    what: &str,
    done: impl Fn(&[pb::ThreadFate]) -> bool,
) -> Vec<pb::ThreadFate> {
    let t = Instant::now();
    loop {
        let got = fates(url, agent, pid);
        if done(&got) {
            return got;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: fates of {pid} never arrived: {got:#?}");
        sleep(Duration::from_millis(100));
    }
}

/// Waits until the analyzer has calls of `pid` (the agent traces it).
fn wait_traced(url: &str, agent: &str, pid: u32) {
    let t = Instant::now();
    while !rt().block_on(windows(url, agent, false)).iter().any(|w| w.pid == pid && w.events > 0) {
        assert!(t.elapsed() < Duration::from_secs(30), "no calls of {pid} reached the analyzer");
        sleep(Duration::from_millis(50));
    }
}

/// The analyzer's diagnoses of `pid`'s windows.
fn diagnoses(url: &str, pid: u32) -> Vec<pb::Diagnosis> {
    rt().block_on(async {
        let mut q = afetm_proto::query_client::QueryClient::connect(url.to_string()).await.expect("connect");
        q.list_diagnoses(pb::ListDiagnosesRequest { agent_id: "fates".into(), ..Default::default() })
            .await
            .expect("list diagnoses")
            .into_inner()
            .diagnoses
    })
    .into_iter()
    .filter(|d| d.pid == pid)
    .collect()
}

/// Waits until an error diagnosis of `pid` names `kind`; returns it.
fn wait_alarm(url: &str, pid: u32, kind: &str) -> pb::Diagnosis {
    let t = Instant::now();
    loop {
        let all = diagnoses(url, pid);
        if let Some(d) = all.iter().find(|d| d.error && d.top.first().is_some_and(|s| s.kind == kind)) {
            return d.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no {kind} alarm for {pid}: {all:#?}");
        sleep(Duration::from_millis(100));
    }
}

fn of_kind(f: &[pb::ThreadFate], kind: pb::FateKind) -> Vec<&pb::ThreadFate> {
    f.iter().filter(|x| x.kind == kind as i32).collect()
}

/// The last call is one the thread's loop makes (tick or leaf), named with the module.
fn ends_in_loop(f: &pb::ThreadFate) -> bool {
    f.last_calls.last().is_some_and(|c| c == "fates:tick" || c == "fates:leaf")
}

/// Whether the fate's stack at its signal (innermost first) holds `function` of the program.
fn stack_has(f: &pb::ThreadFate, function: &str) -> bool {
    f.stack.iter().any(|s| s == &format!("fates:{function}"))
}

/// The function that started the thread: `main` for the process's first, `worker` otherwise.
fn entry(f: &pb::ThreadFate, pid: u32) -> &'static str {
    if f.tid == pid { "main" } else { "worker" }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on our child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0, "kill {sig}");
}

#[test]
fn thread_fates_reach_the_analyzer() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_fates(dir.path());
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "1s"]);
    let plan = write_plan(
        dir.path(),
        "fates",
        &prog,
        &[("tick", "event"), ("leaf", "event"), ("boom", "event"), ("worker", "event"), ("report", "event")],
    );
    let agent = AgentProc::start(&plan, &an.url, "fates", dir.path());
    let url = an.url.as_str();

    // SIGKILL from outside: both threads killed by signal 9, each where its loop was.
    let mut child = spawn(&prog, "run");
    let pid = child.id();
    wait_traced(url, "fates", pid);
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let got = wait_fates(url, "fates", pid, "SIGKILL", |f| of_kind(f, pb::FateKind::Killed).len() == 2);
    for f in of_kind(&got, pb::FateKind::Killed) {
        assert_eq!(f.code, libc::SIGKILL, "{f:?}");
        assert!(ends_in_loop(f), "a killed thread's last calls are its loop's: {f:?}");
        assert!(stack_has(f, entry(f, pid)), "the stack at the SIGKILL reaches the thread's function: {f:?}");
    }
    let d = wait_alarm(url, pid, "crash");
    assert!(["tick", "leaf"].contains(&d.top[0].function.as_str()), "{d:?}");
    assert_eq!(d.model, "fate", "no model serves this agent: {d:?}");

    // Its own SIGSEGV: the worker's last call is boom, where it faulted; main dies with it.
    let mut child = spawn(&prog, "segv");
    let pid = child.id();
    child.wait().unwrap();
    let got = wait_fates(url, "fates", pid, "SIGSEGV", |f| of_kind(f, pb::FateKind::Killed).len() == 2);
    assert!(got.iter().all(|f| f.code == libc::SIGSEGV), "{got:#?}");
    let worker = got.iter().find(|f| f.tid != pid).expect("the worker's fate");
    assert!(
        worker.took_signal && got.iter().filter(|f| f.took_signal).count() == 1,
        "only the worker faulted: {got:#?}"
    );
    assert_eq!(worker.last_calls.last().map(String::as_str), Some("fates:boom"), "{worker:?}");
    assert_eq!(worker.stack[..2], ["fates:boom", "fates:worker"], "where it faulted, then its caller: {worker:?}");
    let d = wait_alarm(url, pid, "crash");
    assert_eq!((d.tid, d.top[0].function.as_str()), (worker.tid, "boom"), "the faulting thread's last call: {d:?}");

    // The same SIGSEGV into a crash handler that calls report -> tick before re-raising: the
    // fault's calls are those before the signal, not the handler's.
    let mut child = spawn(&prog, "handler");
    let pid = child.id();
    child.wait().unwrap();
    let got = wait_fates(url, "fates", pid, "handled SIGSEGV", |f| of_kind(f, pb::FateKind::Killed).len() == 2);
    let worker = got.iter().find(|f| f.tid != pid).expect("the worker's fate");
    assert!(worker.took_signal && worker.code == libc::SIGSEGV, "{got:#?}");
    assert_eq!(worker.last_calls.last().map(String::as_str), Some("fates:boom"), "{worker:?}");
    assert_eq!(worker.stack.first().map(String::as_str), Some("fates:boom"), "the fault's stack, not the re-raise's");
    let d = wait_alarm(url, pid, "crash");
    assert_eq!((d.tid, d.top[0].function.as_str()), (worker.tid, "boom"), "not the handler's calls: {d:?}");
    let (table, trees) = rt().block_on(afcts(url, "fates"));
    assert!(
        trees.iter().any(|(w, tid, f)| w.pid == pid && *tid == worker.tid && has_path(f, &table, &["report", "tick"])),
        "the handler's calls were traced after the fault (else this case shows nothing)"
    );

    // SIGSTOP: the process stops (a deadlock injection's signal); seen before it is killed.
    let mut child = spawn(&prog, "run");
    let pid = child.id();
    wait_traced(url, "fates", pid);
    signal(&child, libc::SIGSTOP);
    let got = wait_fates(url, "fates", pid, "SIGSTOP", |f| !of_kind(f, pb::FateKind::Stopped).is_empty());
    let stopped = of_kind(&got, pb::FateKind::Stopped);
    assert!(stopped.iter().all(|f| f.code == libc::SIGSTOP && ends_in_loop(f)), "{stopped:?}");
    assert!(stopped.iter().all(|f| stack_has(f, entry(f, pid))), "each stopped where its function runs: {stopped:?}");
    // Its window closes on the agent's clock while it stays stopped.
    let d = wait_alarm(url, pid, "deadlock");
    assert!(["tick", "leaf"].contains(&d.top[0].function.as_str()), "{d:?}");
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();

    // exit(3) from main: both threads end with status 3, not a signal.
    let mut child = spawn(&prog, "exit");
    let pid = child.id();
    assert_eq!(child.wait().unwrap().code(), Some(3));
    let got = wait_fates(url, "fates", pid, "exit(3)", |f| of_kind(f, pb::FateKind::Exited).len() == 2);
    assert!(of_kind(&got, pb::FateKind::Exited).iter().all(|f| f.code == 3), "{got:#?}");
    assert!(of_kind(&got, pb::FateKind::Killed).is_empty(), "an exit is not a kill: {got:#?}");
    let exited_pid = pid;

    // Silent: the worker blocks for good while main ticks on; the window after its last call
    // marks it silent, before the process exits (0) three seconds in.
    let mut child = spawn(&prog, "silent");
    let pid = child.id();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let got = wait_fates(url, "fates", pid, "silent", |f| of_kind(f, pb::FateKind::Exited).len() == 2);
    let silent = of_kind(&got, pb::FateKind::Silent);
    assert!(!silent.is_empty(), "the blocked worker is marked silent: {got:#?}");
    assert!(silent.iter().all(|f| f.tid != pid && ends_in_loop(f)), "only the worker went silent: {silent:?}");
    let exit_ts = of_kind(&got, pb::FateKind::Exited).iter().map(|f| f.ts_ns).min().unwrap_or(0);
    assert!(silent.iter().all(|f| f.ts_ns < exit_ts), "silent while the process lived: {got:#?}");
    // Neither an exit nor silence is a fault. Their windows are closed (the exits closed them)
    // and the diagnosis worker is done with them once a later alarm is listed.
    let mut child = spawn(&prog, "segv");
    let last = child.id();
    child.wait().unwrap();
    wait_alarm(url, last, "crash");
    for quiet in [exited_pid, pid] {
        let alarms: Vec<_> = diagnoses(url, quiet).into_iter().filter(|d| d.error).collect();
        assert!(alarms.is_empty(), "an orderly end raised an alarm: {alarms:#?}");
    }

    let log = agent.stop();
    assert!(!log.contains("thread fates are off"), "the fate programs attached: {log}");
    assert!(reader_counter(&log, "fates") >= 11, "{log}");
}
