//! `cargo xtask campaign <redis|nginx|httpd|sqlite|all> [afetm-campaign options]`: builds the
//! release binaries and the source-built servers, then runs `afetm-campaign` with the FDDB at
//! `target/campaign/fddb.sqlite` and its working folder under `target/campaign/` (both
//! overridable with the same options). `afetm-campaign --help` lists the options.
use anyhow::{Result, bail};

use crate::target_dir;
use crate::{cargo, run};

pub fn campaign(args: Vec<String>) -> Result<()> {
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") && args.len() == 1 {
        bail!("usage: cargo xtask campaign <redis|nginx|httpd|sqlite|all> [options]; see `afetm-campaign --help`");
    }
    run(&mut cargo(&["build", "--release", "--bins", "-p", "agent", "-p", "analyzer", "-p", "campaign"]))?;
    if !args.iter().any(|a| a == "--stock") {
        for (pkg, _, secs) in testbed::build::build_all(&testbed::build::cache_dir())? {
            if secs > 0.0 {
                eprintln!("built {} in {secs:.0} s", pkg.source_name());
            }
        }
    }
    let release = target_dir().join("release");
    let mut c = std::process::Command::new(release.join("afetm-campaign"));
    let has = |flag: &str| args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if !has("--db") {
        c.arg("--db").arg(target_dir().join("campaign/fddb.sqlite"));
    }
    if !has("--work-dir") {
        c.arg("--work-dir").arg(target_dir().join("campaign"));
    }
    if !has("--bin-dir") {
        c.arg("--bin-dir").arg(&release);
    }
    run(c.args(&args))
}
