//! `cargo xtask campaign <redis|nginx|httpd|sqlite|all> [afetm-campaign options]`: builds the
//! release binaries and the source-built servers, then runs `afetm-campaign` with the FDDB at
//! `target/campaign/fddb.sqlite` and its working folder under `target/campaign/` (both
//! overridable with the same options). `afetm-campaign --help` lists the options.
use anyhow::{Result, bail};

use crate::{cargo, root, run};

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
    let release = root().join("target/release");
    let mut c = std::process::Command::new(release.join("afetm-campaign"));
    let has = |flag: &str| args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if !has("--db") {
        c.arg("--db").arg(root().join("target/campaign/fddb.sqlite"));
    }
    if !has("--work-dir") {
        c.arg("--work-dir").arg(root().join("target/campaign"));
    }
    if !has("--bin-dir") {
        c.arg("--bin-dir").arg(&release);
    }
    run(c.args(&args))
}
