//! The NHSR-OSW benchmark shop of AFETM's evaluation (004_eb31801e7dc37aff.txt sec. IV.A,
//! Fig. 4) on one machine: nginx (L1) balancing over Apache httpd + mod_php instances (L2)
//! running `app/shop.php`, backed by SQLite and Redis (L3).
//!
//! Everything runs from a run folder (configs rendered from `conf/`, data, logs, pid files);
//! nothing under /etc is read or changed, and every server listens on loopback. Each server is
//! started in a session of its own and its pid is written before anything waits on it, so
//! [`down`] stops exactly what [`up`] started, whole process groups, even after `up` failed
//! half way.

pub mod build;
pub mod load;
pub mod logs;
pub mod ports;
pub mod scrape;
pub mod skip;
mod stack;

pub use stack::*;

/// CLOCK_MONOTONIC in ns: the agent's and the injector's clock (window bounds, cuts, fault
/// applications), for anything that must line up with them.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
