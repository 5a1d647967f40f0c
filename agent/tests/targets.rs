//! Kinds of targets: a shared library by path, one process by pid, a stripped binary. Root only.
mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use afetm_calltree::tree::Color;
use common::*;

fn gcc(args: &[&str], dir: &Path) {
    let status = Command::new("gcc").current_dir(dir).args(args).status().expect("gcc");
    assert!(status.success(), "gcc {args:?}");
}

/// A shared library traced by path: events come from the process that loaded it, callers in
/// the main program are named, and the call stack of lib_leaf restores the static lib_inner.
#[test]
fn shared_library_by_path() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = repo_root().join("testbed/progs");
    let lib = dir.path().join("libshared.so");
    gcc(
        &[
            "-O1",
            "-g",
            "-fPIC",
            "-shared",
            "-fno-optimize-sibling-calls",
            "-o",
            lib.to_str().unwrap(),
            src.join("libshared.c").to_str().unwrap(),
        ],
        dir.path(),
    );
    let exe = dir.path().join("shlib_main");
    gcc(
        &[
            "-O1",
            "-g",
            "-fno-optimize-sibling-calls",
            "-o",
            exe.to_str().unwrap(),
            src.join("shlib_main.c").to_str().unwrap(),
            "-L",
            dir.path().to_str().unwrap(),
            "-lshared",
            &format!("-Wl,-rpath,{}", dir.path().display()),
        ],
        dir.path(),
    );
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &[]);
    let plan = write_plan(dir.path(), "lib", &lib, &[("lib_entry", "event"), ("lib_leaf", "callstack")]);
    let agent = AgentProc::start(&plan, &an.url, "lib", dir.path());
    // The program stays up until the analyzer has its first events, as a server would: a
    // process gone before the reader reads its maps loses callers outside the library.
    let mut child =
        Command::new(&exe).args(["300", "linger"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let start = std::time::Instant::now();
    while rt().block_on(windows(&an.url, "lib", false)).iter().all(|w| w.events == 0) {
        assert!(start.elapsed() < Duration::from_secs(30), "no events: {}", agent.log());
        sleep(Duration::from_millis(50));
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    sleep(Duration::from_millis(300));
    agent.stop();
    let (table, trees) = rt().block_on(afcts(&an.url, "lib"));
    assert_eq!(trees.len(), 1, "one thread");
    let tree = &trees[0].2;
    assert!(has_path(tree, &table, &["app_work", "lib_entry", "lib_inner", "lib_leaf"]), "{}", tree.render(&table));
    let module_of = |name: &str| {
        tree.nodes.iter().find(|n| &*table.get(n.func).name == name).map(|n| table.get(n.func).module.to_string())
    };
    assert_eq!(module_of("app_work").as_deref(), Some("shlib_main"));
    assert_eq!(module_of("lib_inner").as_deref(), Some("libshared.so"));
    let colors: Vec<(String, Color)> =
        tree.nodes.iter().map(|n| (table.get(n.func).name.to_string(), n.color)).collect();
    assert!(
        colors.contains(&("lib_inner".into(), Color::Blue)) && colors.contains(&("lib_leaf".into(), Color::White)),
        "{colors:?}"
    );
    // The stack stops at the first frame outside the library: main is not in the tree.
    assert!(module_of("main").is_none(), "{}", tree.render(&table));
    let calls = tree.nodes.iter().find(|n| &*table.get(n.func).name == "lib_entry").unwrap().calls;
    assert_eq!(calls, 300);
}

/// A pid target traces that process only, not another process running the same binary.
#[test]
fn pid_target_traces_only_that_process() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), true);
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &[]);
    let mut traced = Command::new(&prog).args(["5", "1.5"]).stdout(Stdio::null()).spawn().unwrap();
    let pid = traced.id();
    let plan = dir.path().join("pid.json");
    std::fs::write(&plan, format!(r#"{{"target":{{"pid":{pid}}},"points":[{{"function":"op_add","mode":"event"}}]}}"#))
        .unwrap();
    let mut agent = AgentProc::start(&plan, &an.url, "bypid", dir.path());
    let other = Command::new(&prog).args(["5", "0.5"]).stdout(Stdio::null()).status().unwrap();
    assert!(other.success());
    assert!(traced.wait().unwrap().success());
    // The agent follows its target out: once the pid is gone it delivers what it has, says so
    // and exits non-zero (a supervisor must see that there is nothing left to trace).
    let mut status = None;
    for _ in 0..100 {
        status = agent.proc.0.as_mut().unwrap().try_wait().unwrap();
        if status.is_some() {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    let status = status.unwrap_or_else(|| panic!("agent should exit after its target pid: {}", agent.log()));
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(agent.log().contains(&format!("target process {pid} is gone")), "{}", agent.log());
    let w = rt().block_on(windows(&an.url, "bypid", true));
    assert!(!w.is_empty());
    assert!(w.iter().all(|w| w.pid == pid), "only pid {pid} is traced: {w:?}");
}

/// A path target follows restarts: a new process of the traced binary (new pid) is traced
/// from its first call, with no action from the agent. Its first window starts (first event,
/// kernel timestamp) within 1 s of the process's start.
#[test]
fn path_target_follows_a_restarted_process() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), true);
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &[]);
    let plan = write_plan(dir.path(), "restart", &prog, &[("op_add", "event")]);
    let agent = AgentProc::start(&plan, &an.url, "restart", dir.path());
    run_prog(&prog, 5, 0.0);
    // The "restart": the same binary again, a new pid.
    let started = testbed::monotonic_ns();
    let mut second = Command::new(&prog).args(["20", "2.0"]).stdout(Stdio::null()).spawn().unwrap();
    let pid = second.id();
    let mut first_window = None;
    for _ in 0..100 {
        first_window = rt().block_on(windows(&an.url, "restart", false)).into_iter().find(|w| w.pid == pid);
        if first_window.is_some() {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert!(second.wait().unwrap().success());
    let w = first_window.unwrap_or_else(|| panic!("no event from the restarted process {pid}: {}", agent.log()));
    let resumed_ms = w.start_ns.saturating_sub(started) as f64 / 1e6;
    assert!(resumed_ms < 1000.0, "events resumed {resumed_ms:.0} ms after the restart");
    eprintln!("restarted process traced from {resumed_ms:.1} ms after its start");
    let pids: std::collections::BTreeSet<u32> =
        rt().block_on(windows(&an.url, "restart", false)).iter().map(|w| w.pid).collect();
    assert_eq!(pids.len(), 2, "both processes traced: {pids:?}");
    agent.stop();
}

/// A stripped binary: functions come from .eh_frame and are named <module>+0x<addr>; the full
/// trace has the same shape as that of the unstripped binary.
#[test]
fn stripped_binary_is_traced_through_eh_frame() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), false);
    let stripped = dir.path().join("calltree-stripped");
    let status = Command::new("strip").arg("--strip-all").arg("-o").arg(&stripped).arg(&prog).status().unwrap();
    assert!(status.success());
    // Traced through a symlink, as /usr/bin/redis-server -> redis-check-rdb: functions must be
    // named after the real file, the name callers resolved through /proc get.
    let link = dir.path().join("calltree-link");
    std::os::unix::fs::symlink(&stripped, &link).unwrap();
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &[]);
    let mut shapes = Vec::new();
    for (id, bin) in [("plain", &prog), ("stripped", &link)] {
        let plan = write_plan(dir.path(), id, bin, &[("*", "event")]);
        let agent = AgentProc::start(&plan, &an.url, id, dir.path());
        run_prog(bin, 10, 0.3);
        agent.stop();
        let (table, trees) = rt().block_on(afcts(&an.url, id));
        let pid = trees[0].0.pid;
        let main = &trees.iter().find(|(_, tid, _)| *tid == pid).unwrap().2;
        if id == "stripped" {
            assert!(
                !main.nodes.iter().any(|n| table.get(n.func).name.contains("calltree-link")),
                "{}",
                main.render(&table)
            );
            assert!(
                main.nodes.iter().any(|n| table.get(n.func).name.starts_with("calltree-stripped+0x")),
                "{}",
                main.render(&table)
            );
        }
        // Depth profile of the main thread's tree, independent of names.
        let shape: Vec<usize> = main
            .canonical(&table)
            .iter()
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect::<Vec<usize>>();
        let mut hist = vec![0usize; 16];
        for d in shape {
            hist[d.min(15)] += 1;
        }
        shapes.push(hist);
    }
    assert_eq!(shapes[0], shapes[1], "stripped and unstripped binaries give trees of the same shape");
}

/// A non-PIE executable (fixed load address): same known call tree as the PIE build.
#[test]
fn non_pie_binary() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = dir.path().join("calltree-nopie");
    gcc(
        &[
            "-O1",
            "-g",
            "-fno-inline",
            "-fno-optimize-sibling-calls",
            "-fno-pie",
            "-no-pie",
            "-pthread",
            "-o",
            prog.to_str().unwrap(),
            repo_root().join("testbed/progs/calltree.c").to_str().unwrap(),
        ],
        dir.path(),
    );
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &[]);
    let plan = write_plan(dir.path(), "nopie", &prog, &[("*", "event")]);
    let agent = AgentProc::start(&plan, &an.url, "nopie", dir.path());
    run_prog(&prog, 10, 0.2);
    agent.stop();
    let (table, trees) = rt().block_on(afcts(&an.url, "nopie"));
    let pid = trees[0].0.pid;
    let main = &trees.iter().find(|(_, tid, _)| *tid == pid).unwrap().2;
    assert!(has_path(main, &table, &["main", "run_main", "dispatch", "op_add", "leaf"]), "{}", main.render(&table));
    assert!(has_path(main, &table, &["main", "run_main", "chain2", "chain3", "leaf"]), "{}", main.render(&table));
}
