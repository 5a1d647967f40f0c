//! Project tasks: `cargo xtask setup | check | test | demo | eval | testbed | campaign | fuzz | soak | bench`.
//!
//! `setup` installs, idempotently, what building and testing need on a fresh Debian machine:
//! Debian's rustc/cargo/std sources (the eBPF crate needs `-Z build-std=core`), LLVM 22 and
//! bpf-linker built against it, gcc, bpftrace (benchmark baseline), cargo-fuzz, and mounts
//! tracefs/debugfs.
//! Every other task checks the same things first and names what is missing in one line.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod attach;
mod bench;
mod bench_diagnose;
mod bench_rtgr;
mod campaign;
mod demo;
mod demo_diagnosis;
mod eval;
mod fuzz;
mod rtgr;
mod sample;
mod soak;
mod testbed;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install and configure everything the build and the tests need (idempotent).
    Setup,
    /// Check the prerequisites without changing anything.
    Check,
    /// Set up, build, and run every test of the workspace.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up and run afetm end to end on the shop's redis: campaign, selection, training, a
    /// fresh fault injected under the plan, the diagnosis. `demo calltree`: the call tree
    /// walk-through on a small bundled program instead.
    Demo {
        #[arg(value_parser = ["calltree"])]
        which: Option<String>,
        /// Seed of the fault drawn from the held-out specs (default: the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The NHSR-OSW shop: up, down, status, load.
    Testbed {
        #[command(subcommand)]
        cmd: testbed::Cmd,
    },
    /// The fault injection campaign on the testbed; fills the FDDB (resumes where it stopped).
    /// Arguments go to `afetm-campaign` (see its --help).
    Campaign {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The evaluation (paper sec. IV.B-C): AFETM against FCT_EDC, AFCT_GDC, the idealized
    /// log-based method and a topology-free control on held-out runs; writes
    /// target/eval/report.md and its figures.
    Eval(eval::EvalArgs),
    /// Fuzz every parser of untrusted input (cargo-fuzz targets in `fuzz/`) for `--seconds`
    /// each; prints executions and findings, fails on a crash.
    Fuzz(fuzz::FuzzArgs),
    /// The analyzer down for `--down` (10 minutes) under load: checks that the agent's RSS stays
    /// bounded by its queue, that drops are counted exactly and that everything after the
    /// restart arrives once; writes target/soak/report.md.
    Soak(soak::SoakArgs),
    /// Benchmarks that print figures as ratios to a baseline taken in the same run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

const APT_PACKAGES: &[&str] = &[
    // eBPF toolchain (../shared/notes/ebpf-toolchain.md) and the benchmark baseline
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "gcc",
    "libc6-dev",
    "bpftrace",
    // systemd-analyze checks the units in packaging/; headless Chromium renders the web view
    "systemd",
    "chromium",
    "iproute2",
    // the NHSR-OSW shop (../shared/notes/testbed.md); installing starts no service
    "nginx",
    "apache2",
    "libapache2-mod-php",
    "php-cli",
    "php-sqlite3",
    "php-redis",
    "redis-server",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Cargo's target folder: `CARGO_TARGET_DIR` (relative to the workspace root when relative)
/// or `<root>/target`. Built binaries and every task's output live here.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root().join(d),
        _ => root().join("target"),
    }
}

pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AFETM_TOOLS") {
        return PathBuf::from(d);
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/afetm/tools")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .chain(::testbed::build::BUILD_DEPS)
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    Command::new(tools_dir().join("bin/bpf-linker"))
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

fn mounted(fs: &str, at: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(at) && l.split_whitespace().nth(2) == Some(fs)))
        .unwrap_or(false)
}

/// What is missing, one item per entry; empty when everything is in place.
fn problems() -> Vec<String> {
    let mut out = Vec::new();
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        out.push(format!("Debian packages {}", pkgs.join(" ")));
    }
    if !bpf_linker_ok() {
        out.push(format!("bpf-linker {BPF_LINKER_VERSION} in {}", tools_dir().join("bin").display()));
    }
    if !fuzz::cargo_fuzz_ok() {
        out.push(format!("cargo-fuzz {} in {}", fuzz::CARGO_FUZZ_VERSION, tools_dir().join("bin").display()));
    }
    if !mounted("tracefs", "/sys/kernel/tracing") && !Path::new("/sys/kernel/tracing/uprobe_events").exists() {
        out.push("tracefs at /sys/kernel/tracing".into());
    }
    out
}

/// Fails with one clear line when setup has not been run.
pub fn check() -> Result<()> {
    let p = problems();
    if !p.is_empty() {
        bail!("missing: {} (run `cargo xtask setup`)", p.join("; "));
    }
    Ok(())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn setup() -> Result<()> {
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        if !is_root() {
            bail!("Debian packages {} are missing and installing them needs root", pkgs.join(" "));
        }
        eprintln!("xtask setup: installing {}", pkgs.join(" "));
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-q"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends"])
            .args(&pkgs))?;
    }
    if !bpf_linker_ok() {
        eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes)");
        std::fs::create_dir_all(tools_dir())?;
        // Outside the workspace, so this repo's cargo config (aya workarounds) does not apply.
        run(Command::new("cargo")
            .current_dir(tools_dir())
            .env_remove("RUSTC_BOOTSTRAP")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
                "--root",
            ])
            .arg(tools_dir()))?;
    }
    if !fuzz::cargo_fuzz_ok() {
        fuzz::install_cargo_fuzz()?;
    }
    for (fs, at) in [("tracefs", "/sys/kernel/tracing"), ("debugfs", "/sys/kernel/debug")] {
        if !mounted(fs, at) && is_root() {
            let _ = Command::new("mount").args(["-t", fs, fs, at]).status();
        }
    }
    check()?;
    eprintln!("xtask setup: everything in place");
    Ok(())
}

/// Child processes killed (and reaped) when the guard goes, whatever path a task leaves by.
pub struct Guard(pub Vec<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `cargo <args> --ignore-rust-version` in the workspace root (aya declares rust-version 1.98).
pub fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root()).args(args).arg("--ignore-rust-version");
    c
}

/// Lists the tests that skipped themselves (see `testbed::skip`); under CI a skip fails the
/// run, since CI runs as root and every test must really run there.
fn report_skips(log: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let skipped: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if skipped.is_empty() {
        eprintln!("xtask test: no test skipped");
        return Ok(());
    }
    eprintln!("xtask test: {} tests SKIPPED (they passed without running):", skipped.len());
    for l in &skipped {
        eprintln!("  {}", l.replace('\t', ": "));
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{} tests skipped under CI", skipped.len());
    }
    Ok(())
}

fn main() {
    // Library code (the campaign runner) logs through tracing.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Check => check(),
        Cmd::Test { args } => setup().and_then(|_| {
            if is_root() {
                // The servers test runs on these too; cached after the first time.
                for (pkg, _, secs) in ::testbed::build::build_all(&::testbed::build::cache_dir())? {
                    if secs > 0.0 {
                        eprintln!("xtask test: built {} in {secs:.0} s", pkg.source_name());
                    }
                }
            }
            run(&mut cargo(&["build", "--workspace", "--bins"]))?;
            let skip_log = target_dir().join("afetm-skipped-tests.txt");
            let _ = std::fs::remove_file(&skip_log);
            let mut c = cargo(&["test", "--workspace"]);
            c.env("AFETM_BIN_DIR", target_dir().join("debug")).env(::testbed::skip::SKIP_LOG_ENV, &skip_log);
            if !args.is_empty() {
                c.arg("--").args(&args);
            }
            run(&mut c)?;
            report_skips(&skip_log)?;
            // Every fuzz target, briefly: the seeds and what a short run finds must not crash.
            let seconds = fuzz::TEST_SECONDS;
            fuzz::run_fuzz(&fuzz::FuzzArgs { seconds, targets: Vec::new(), grow_corpus: false })
        }),
        Cmd::Demo { which, seed } => setup().and_then(|_| match which {
            Some(_) => demo::run(),
            None => demo_diagnosis::run_demo(seed),
        }),
        Cmd::Testbed { cmd } => testbed::run(cmd),
        Cmd::Campaign { args } => check().and_then(|_| campaign::campaign(args)),
        Cmd::Eval(a) => setup().and_then(|_| eval::run_eval(a)),
        Cmd::Fuzz(a) => setup().and_then(|_| fuzz::run_fuzz(&a)),
        Cmd::Soak(a) => check().and_then(|_| soak::soak(a)),
        Cmd::Bench { which } => check().and_then(|_| bench::run_bench(which)),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
