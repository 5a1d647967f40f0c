//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` (libFuzzer, AddressSanitizer)
//! and runs each for `--seconds`, starting from the seeds in `fuzz/corpus/<target>/`. New
//! inputs go to `target/fuzz/corpus/<target>/` (the repo's corpus is only read, unless
//! `--grow-corpus` merges the new coverage back into it); a crash or a failed assertion leaves
//! its input in `target/fuzz/artifacts/<target>/` and fails the task.
//!
//! libFuzzer needs nightly flags; `RUSTC_BOOTSTRAP=1` gives them to the stable compiler. The
//! build lives in `~/.cache/afetm/fuzz-target` so a fresh clone reuses the instrumented
//! dependencies (cargo's own fingerprints decide what is rebuilt).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{root, run, target_dir, tools_dir};

/// Every target in `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: &[&str] = &["batch", "plan", "elf", "fddb_import", "manifest"];
/// The cargo-fuzz release `setup` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 15;

/// `cargo xtask fuzz` arguments.
#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only this target (repeatable); all when absent.
    #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
    /// Afterwards, merge what added coverage into `fuzz/corpus/` (libFuzzer `-merge=1`).
    #[arg(long)]
    pub grow_corpus: bool,
}

/// What one target's run did.
struct Outcome {
    target: &'static str,
    execs: u64,
    secs: f64,
    coverage: u64,
    corpus: usize,
    crashed: Option<PathBuf>,
}

pub fn cargo_fuzz_ok() -> bool {
    Command::new(tools_dir().join("bin/cargo-fuzz"))
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false)
}

/// Installs cargo-fuzz into the tools folder (about 80 s, once).
pub fn install_cargo_fuzz() -> Result<()> {
    eprintln!("xtask setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 1.5 minutes)");
    std::fs::create_dir_all(tools_dir())?;
    run(Command::new("cargo")
        .current_dir(tools_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["install", &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"), "--locked", "--root"])
        .arg(tools_dir()))
}

fn fuzz_target_dir() -> PathBuf {
    tools_dir().parent().unwrap_or(&tools_dir()).join("fuzz-target")
}

fn build() -> Result<PathBuf> {
    let started = Instant::now();
    let dir = fuzz_target_dir();
    run(Command::new(tools_dir().join("bin/cargo-fuzz"))
        .current_dir(root())
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--target-dir"])
        .arg(&dir))?;
    eprintln!("xtask fuzz: targets built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(dir.join("x86_64-unknown-linux-gnu/release"))
}

/// Reads libFuzzer's last status line (`#N DONE cov: C ft: F corp: K/...`).
fn parse_status(log: &str) -> (u64, u64) {
    let last = log.lines().rev().find(|l| l.starts_with('#') && l.contains("cov:")).unwrap_or("");
    let execs = last.trim_start_matches('#').split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let field = |name: &str| {
        let mut words = last.split_whitespace();
        words.find(|w| *w == name).and_then(|_| words.next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    (execs, field("cov:"))
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn fuzz_one(bin: &Path, target: &'static str, seconds: u64) -> Result<Outcome> {
    let work = target_dir().join("fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    // Only this run's findings: an old crash input must not be reported again.
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts)?;
    let seeds = root().join("fuzz/corpus").join(target);
    let started = Instant::now();
    let out = Command::new(bin.join(target))
        .arg(&corpus)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // One input may take at most 10 s and 2 GiB: a hang or a runaway allocation is a finding.
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .output()
        .with_context(|| format!("cannot run fuzz target {target}"))?;
    let secs = started.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::write(work.join(format!("{target}.log")), &log)?;
    let (execs, coverage) = parse_status(&log);
    let crashed = (!out.status.success()).then(|| {
        std::fs::read_dir(&artifacts)
            .ok()
            .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).max())
            .unwrap_or_else(|| work.join(format!("{target}.log")))
    });
    if let Some(p) = &crashed {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("xtask fuzz: {target} FAILED; input {}; log tail:", p.display());
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    Ok(Outcome { target, execs, secs, coverage, corpus: files_in(&corpus) + files_in(&seeds), crashed })
}

/// Merges `target/fuzz/corpus/<t>` into the repo's `fuzz/corpus/<t>`, keeping only inputs that
/// add coverage.
fn grow(bin: &Path, target: &str) -> Result<()> {
    let seeds = root().join("fuzz/corpus").join(target);
    let found = target_dir().join("fuzz/corpus").join(target);
    let before = files_in(&seeds);
    let out = Command::new(bin.join(target)).arg("-merge=1").arg(&seeds).arg(&found).output()?;
    if !out.status.success() {
        bail!("merging the {target} corpus failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    eprintln!("xtask fuzz: {target}: corpus {before} -> {} inputs", files_in(&seeds));
    Ok(())
}

/// Builds and runs the targets; fails when any found a crash.
pub fn run_fuzz(args: &FuzzArgs) -> Result<()> {
    let bin = build()?;
    let targets: Vec<&'static str> =
        TARGETS.iter().copied().filter(|t| args.targets.is_empty() || args.targets.iter().any(|a| a == t)).collect();
    let mut outcomes = Vec::new();
    for t in &targets {
        eprintln!("xtask fuzz: {t} for {} s", args.seconds);
        outcomes.push(fuzz_one(&bin, t, args.seconds)?);
    }
    println!("{:<12} {:>12} {:>10} {:>8} {:>8}  findings", "target", "executions", "exec/s", "cov", "corpus");
    for o in &outcomes {
        let found = o.crashed.as_ref().map_or("none".to_string(), |p| p.display().to_string());
        let rate = o.execs as f64 / o.secs.max(1e-9);
        println!("{:<12} {:>12} {:>10.0} {:>8} {:>8}  {found}", o.target, o.execs, rate, o.coverage, o.corpus);
    }
    let failed: Vec<&str> = outcomes.iter().filter(|o| o.crashed.is_some()).map(|o| o.target).collect();
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs under {})",
            failed.join(", "),
            target_dir().join("fuzz/artifacts").display()
        );
    }
    if args.grow_corpus {
        for t in &targets {
            grow(&bin, t)?;
        }
    }
    Ok(())
}
