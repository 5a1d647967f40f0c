//! `afetm-inject`: inject one fault (AFETM sec. III.C.1) into one function of one process.
//!
//! ```text
//! afetm-inject --module BIN --function F --fault crash|deadlock|ip+[N]|input:ARG:BIT|output:BIT -- CMD [ARGS]
//! afetm-inject --module BIN --function F --fault ... --pid N --foreign
//! afetm-inject --capabilities
//! ```
//! With `-- CMD`, the injector starts CMD (stdin, stdout, stderr inherited), injects into it
//! and exits with it, printing one JSON line: the fault, the mechanism, how many calls it was
//! applied to, and how CMD ended. `--pid N` touches a process it did not start and therefore
//! needs `--foreign`; the injector then runs until that process exits or it gets SIGINT/SIGTERM.
//! It never injects into pid 1 or itself. Root only.
use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use afetm_agent::inject::{Fault, Injector, Victim, capabilities};
use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(name = "afetm-inject", version, about = "Inject one fault into one function of one process (root)")]
struct Cli {
    /// Print which fault types this kernel supports through eBPF and exit.
    #[arg(long)]
    capabilities: bool,
    /// The executable or library holding the function.
    #[arg(long, required_unless_present = "capabilities")]
    module: Option<PathBuf>,
    #[arg(long, required_unless_present = "capabilities")]
    function: Option<String>,
    /// crash, deadlock, ip+[N] (N bytes; default: skip the first instruction), input:ARG:BIT,
    /// output:BIT.
    #[arg(long, required_unless_present = "capabilities")]
    fault: Option<Fault>,
    /// A running process to inject into (needs --foreign).
    #[arg(long, conflicts_with = "cmd")]
    pid: Option<u32>,
    /// Confirms that --pid names a process the injector may break.
    #[arg(long, requires = "pid")]
    foreign: bool,
    /// Write this file once the fault is attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// The command to start and inject into.
    #[arg(last = true)]
    cmd: Vec<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("afetm-inject: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (loads eBPF programs and attaches uprobes)");
    }
    if cli.capabilities {
        let c = capabilities()?;
        let show = |r: &Result<(), String>| match r {
            Ok(()) => "yes".to_string(),
            Err(e) => format!("no ({e})"),
        };
        println!("crash, deadlock (bpf_send_signal once the function is entered): {}", show(&c.signal));
        println!("input, stack parameters (bpf_probe_write_user at entry): {}", show(&c.stack));
        println!("ip+N, input, register parameters (uprobe context write): {}", show(&c.regs));
        println!("output (uretprobe context write): {}", show(&c.ret));
        if c.regs.is_err() || c.ret.is_err() {
            println!(
                "ip+N, register parameters and output use the ptrace fallback (SIGTRAP from the probe, registers set in the signal stop)"
            );
        }
        return Ok(0);
    }
    let (module, function, fault) = match (cli.module, cli.function, cli.fault) {
        (Some(m), Some(f), Some(x)) => (m, f, x),
        _ => bail!("--module, --function and --fault are required"),
    };
    let mut child = None;
    let victim = match (cli.pid, cli.cmd.split_first()) {
        (Some(pid), _) => {
            if !cli.foreign {
                bail!("--pid {pid} is a process afetm-inject did not start; add --foreign to inject into it anyway");
            }
            Victim::foreign(pid)?
        }
        (None, Some((prog, args))) => {
            let c = Command::new(prog).args(args).spawn().with_context(|| format!("starting {prog}"))?;
            let v = Victim::child(&c)?;
            child = Some(c);
            v
        }
        (None, None) => bail!("give the command to start after --, or --pid N --foreign"),
    };
    let mut injector = match Injector::start(victim, &module, &function, fault) {
        Ok(i) => i,
        Err(e) => {
            if let Some(mut c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
            return Err(e.into());
        }
    };
    tracing::info!(pid = victim.pid(), %function, fault = %injector.fault, mechanism = injector.mechanism, "fault injected");
    if let Some(path) = &cli.ready_file {
        std::fs::write(path, format!("{}\n", victim.pid())).with_context(|| format!("writing {}", path.display()))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_hook_flag(sig, stop.clone());
    }
    let ended = injector.wait(child.as_mut(), &stop);
    let (applied, failed) = injector.applied();
    println!(
        "{}",
        serde_json::json!({
            "pid": victim.pid(),
            "function": function,
            "fault": injector.fault.to_string(),
            "mechanism": injector.mechanism,
            "applied": applied,
            "failed": failed,
            "applications": injector.applications(),
            "ended": ended.to_string(),
        })
    );
    Ok(0)
}

static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::Relaxed);
    }
}

fn signal_hook_flag(sig: libc::c_int, flag: Arc<AtomicBool>) {
    let _ = FLAG.set(flag);
    // SAFETY: on_signal is async-signal-safe (one atomic store).
    unsafe { libc::signal(sig, on_signal as *const () as usize) };
}
