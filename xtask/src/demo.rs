//! `cargo xtask demo`: the main job end to end on the bundled example program.
//!
//! 1. full trace of `testbed/progs/calltree.c` (every function, event mode) -> normal FCTs;
//! 2. FCT coloring (Alg. 2) of those FCTs against a small trace point set -> plan with
//!    F^callstack;
//! 3. adaptive trace with that plan -> AFCTs (Alg. 3), printed and checked against the masked
//!    colored FCTs.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::target_dir;
use crate::{Guard, cargo, root, run as run_cmd};

/// The trace point set of the demo: the entry points, the leaf and the two operations reached
/// through function pointers; everything between them is left untraced.
pub const TRACED: &str = "main,worker,leaf,op_add,op_mul";

fn wait_file(path: &Path, what: &str, child: &mut Child) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited early ({status})");
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} not ready after 30 s");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn terminate(mut child: Child) -> Result<()> {
    // SIGTERM lets the agent drain its ring buffer and queue before it exits.
    run_cmd(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("agent exited with {status}");
    }
    Ok(())
}

fn trace(bin: &Path, plan: &Path, agent_id: &str, prog: &Path, server: &str, dir: &Path) -> Result<()> {
    let ready = dir.join(format!("{agent_id}.ready"));
    let _ = std::fs::remove_file(&ready);
    let mut agent = Command::new(bin.join("afetm-agent"))
        .args(["--plan"])
        .arg(plan)
        .args(["--analyzer", server, "--agent-id", agent_id, "--ready-file"])
        .arg(&ready)
        .stdout(Stdio::inherit())
        .spawn()
        .context("starting afetm-agent")?;
    wait_file(&ready, "afetm-agent", &mut agent)?;
    run_cmd(Command::new(prog).args(["20", "0.3"]).stdout(Stdio::null()))?;
    terminate(agent)
}

/// Builds the bundled example program into `dir` (frame pointers, no inlining: every call
/// stays a call).
pub fn build_calltree(dir: &Path) -> Result<PathBuf> {
    let prog = dir.join("calltree");
    run_cmd(
        Command::new("gcc")
            .args([
                "-O1",
                "-g",
                "-fno-inline",
                "-fno-optimize-sibling-calls",
                "-fno-omit-frame-pointer",
                "-pthread",
                "-o",
            ])
            .arg(&prog)
            .arg(root().join("testbed/progs/calltree.c")),
    )?;
    Ok(prog)
}

pub fn run() -> Result<()> {
    run_cmd(&mut cargo(&["build", "--workspace", "--bins"]))?;
    let bin = target_dir().join("debug");
    let dir = target_dir().join("demo");
    std::fs::create_dir_all(&dir)?;
    let prog = build_calltree(&dir)?;
    let db = dir.join("afetm.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(PathBuf::from(format!("{}{ext}", db.display())));
    }
    let listen = "127.0.0.1:20071";
    let server = format!("http://{listen}");
    let analyzer = Command::new(bin.join("afetm-analyzer"))
        .args(["serve", "--listen", listen, "--window", "60s", "--db"])
        .arg(&db)
        .spawn()
        .context("starting afetm-analyzer")?;
    let _guard = Guard(vec![analyzer]);
    sleep(Duration::from_millis(500));

    println!("\n### 1. Full trace of {} (every function)\n", prog.display());
    let full = dir.join("full-plan.json");
    std::fs::write(
        &full,
        format!(r#"{{"target":{{"path":"{}"}},"points":[{{"function":"*","mode":"event"}}]}}"#, prog.display()),
    )?;
    trace(&bin, &full, "demo-full", &prog, &server, &dir)?;
    run_cmd(Command::new(bin.join("afetm-analyzer")).args(["afcts", "--server", &server, "--agent", "demo-full"]))?;

    println!("\n### 2. FCT coloring against F = {{{TRACED}}} (Alg. 2)\n");
    let adaptive = dir.join("adaptive-plan.json");
    let color = |extra: &[&str]| {
        run_cmd(
            Command::new(bin.join("afetm-analyzer"))
                .args(["color", "--server", &server, "--agent", "demo-full", "--traced", TRACED, "--target"])
                .arg(&prog)
                .args(extra),
        )
    };
    color(&["--out", &adaptive.display().to_string()])?;
    println!("{}", std::fs::read_to_string(&adaptive)?);

    println!("\n### 3. Adaptive trace with that plan: AFCTs (Alg. 3)\n");
    trace(&bin, &adaptive, "demo-adaptive", &prog, &server, &dir)?;
    run_cmd(Command::new(bin.join("afetm-analyzer")).args(["afcts", "--server", &server, "--agent", "demo-adaptive"]))?;
    println!();
    color(&["--out", "/dev/null", "--check-agent", "demo-adaptive"])?;
    println!("\ndatabase: {}", db.display());
    Ok(())
}
