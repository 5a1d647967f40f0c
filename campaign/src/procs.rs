//! Processes the runner starts and watches: children that die with it, ready files, a
//! per-run watchdog (the servers' log lines of a run: `testbed::logs`).

use std::{
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// A child that dies with the runner and is killed when dropped.
pub(crate) struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn(cmd: &mut Command) -> std::io::Result<Proc> {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map(Proc)
}

pub(crate) fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

pub(crate) fn wait_file(path: &Path, child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let t = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default().trim());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{what} not ready after 30 s: {}", std::fs::read_to_string(log).unwrap_or_default().trim());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Kills `victims` if still running at `deadline`, unless finished first.
pub(crate) struct Watchdog {
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Option<u64>>,
}

impl Watchdog {
    pub(crate) fn start(victims: Vec<u32>, deadline: Instant) -> Watchdog {
        use std::sync::atomic::Ordering;
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = cancel.clone();
        let handle = std::thread::spawn(move || {
            while !c.load(Ordering::Relaxed) {
                if Instant::now() >= deadline {
                    let at = testbed::monotonic_ns();
                    for pid in &victims {
                        // SAFETY: kill has no memory preconditions; processes of this run.
                        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                    }
                    return Some(at);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        });
        Watchdog { cancel, handle }
    }

    /// Stops watching; when (monotonic ns, the agent's clock) the deadline passed and the
    /// victims were killed, if it did.
    pub(crate) fn finish(self) -> Option<u64> {
        self.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or(None)
    }
}

pub(crate) fn stop_gently(p: Proc) {
    // SAFETY: kill has no memory preconditions; the pid is our child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let mut p = p;
    let t = Instant::now();
    while p.0.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_kills_only_after_its_deadline() {
        let mut slow = Command::new("sleep").arg("30").spawn().unwrap();
        let w = Watchdog::start(vec![slow.id()], Instant::now() + Duration::from_millis(200));
        let before = testbed::monotonic_ns();
        let status = slow.wait().unwrap();
        let at = w.finish().expect("the deadline passed");
        assert!(at >= before && at <= testbed::monotonic_ns(), "killed at {at}, started watching at {before}");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        let mut quick = Command::new("sleep").arg("30").spawn().unwrap();
        let w = Watchdog::start(vec![quick.id()], Instant::now() + Duration::from_secs(60));
        assert_eq!(w.finish(), None, "finished before the deadline");
        assert!(quick.try_wait().unwrap().is_none(), "not killed");
        quick.kill().unwrap();
        quick.wait().unwrap();
    }
}
