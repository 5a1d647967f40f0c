//! Which trees of a run the fault reached: the labels the diagnosis model learns from.
//!
//! Every tree is one thread's FCT in one analyzer window of one target process. A tree is
//! labelled with the fault only if its thread saw an application of it during its window
//! ([`Applied::overlaps`]); when the fault ends the whole process (crash, deadlock), every
//! thread of a process the fault was applied in is affected from the first application on.
//! Every other tree of a fault run is normal: with full traces, normal windows differ among
//! themselves with the request mix, and blaming every tree of a fault run would teach the
//! model that noise. Trees of windows that ended before the injection are not kept at all.

use afetm_fault::{Applied, Fault};

/// One window of one process, as the analyzer reports it (agent clock, ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Process.
    pub pid: u32,
    /// Thread.
    pub tid: u32,
    /// Window start.
    pub start_ns: u64,
    /// Window end.
    pub end_ns: u64,
}

/// Whether the trees of `w` belong to the run at all: windows that ended before `from_ns`
/// (the injection, or the same moment of a normal run) are start-up, not the fault's.
pub fn kept(w: &Window, from_ns: u64) -> bool {
    w.end_ns >= from_ns
}

/// Whether `fault`, applied as `applied` says, reached the thread and window `w`.
pub fn faulty(fault: &Fault, applied: &[Applied], w: &Window) -> bool {
    if fault.ends_process() {
        return applied.iter().any(|a| a.pid == w.pid && a.first_ns <= w.end_ns);
    }
    applied.iter().any(|a| a.pid == w.pid && a.tid == w.tid && a.overlaps(w.start_ns, w.end_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pid: u32, tid: u32, start_ns: u64) -> Window {
        Window { pid, tid, start_ns, end_ns: start_ns + 1000 }
    }

    #[test]
    fn only_the_threads_and_windows_a_fault_reached() {
        let applied = [Applied { pid: 10, tid: 11, first_ns: 1500, last_ns: 1600, count: 4 }];
        let input = Fault::Input { arg: 0, bit: 1 };
        assert!(faulty(&input, &applied, &w(10, 11, 1000)), "same thread, window holds the applications");
        assert!(!faulty(&input, &applied, &w(10, 12, 1000)), "another thread of the process");
        assert!(!faulty(&input, &applied, &w(10, 11, 2000)), "the thread's next window saw none");
        assert!(!faulty(&input, &applied, &w(20, 11, 1000)), "another process");
        assert!(!faulty(&input, &[], &w(10, 11, 1000)), "never applied");
        // A crash takes the whole process: every thread from the first application on.
        assert!(faulty(&Fault::Crash, &applied, &w(10, 12, 1000)));
        assert!(faulty(&Fault::Deadlock, &applied, &w(10, 12, 2000)));
        assert!(!faulty(&Fault::Crash, &applied, &w(10, 12, 0)), "ended before the first application");
        assert!(kept(&w(10, 11, 1000), 1999) && !kept(&w(10, 11, 0), 1001));
    }
}
