//! Tests that cannot run here (most need root: uprobes, the shop's servers, namespaces) skip
//! themselves, and a skip must be seen: [`needs_root`] prints it and, when `AFETM_SKIP_LOG`
//! names a file, appends the test's name and reason there. `cargo xtask test` sets it, lists
//! the skipped tests in its summary and fails under CI, where nothing may be skipped.
use std::io::Write;

/// The environment variable naming the skip log.
pub const SKIP_LOG_ENV: &str = "AFETM_SKIP_LOG";

/// True when the calling test must skip because this process is not root; the skip is printed
/// and logged (see the module doc). `why` says what needs root.
pub fn needs_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    skipped(&format!("{why} needs root"));
    true
}

/// Records that the calling test skipped itself, and why.
pub fn skipped(reason: &str) {
    // libtest names each test's thread after the test.
    let name = std::thread::current().name().unwrap_or("<unnamed test>").to_string();
    eprintln!("SKIPPED {name}: {reason}; run as root (cargo xtask test)");
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    let line = format!("{name}\t{reason}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("could not log the skip to {}: {e}", path.to_string_lossy());
    }
}
