//! The injector's ptrace fallback for faults that change registers, on kernels whose uprobe
//! programs cannot write their context: a pid-scoped uprobe (or uretprobe) sends SIGTRAP to
//! the calling thread (`bpf_send_signal_thread`); every thread of the victim is traced
//! (`PTRACE_SEIZE`, new threads through `PTRACE_O_TRACECLONE`), so the thread stops in
//! signal-delivery-stop, the injector changes its registers and suppresses the signal.
//!
//! The stop comes after the probed instruction has run (the kernel emulates or single-steps it
//! before returning to user space) or, for a uretprobe, on the return into the caller. So
//! input corruption flips a parameter register after the function's first instruction, IP+N
//! moves the instruction pointer from the second instruction, and output corruption flips rax
//! in the caller right after the return.
//!
//! All ptrace calls must come from the thread that seized the victim: create, run and drop a
//! [`Session`] on one thread.

use std::{
    collections::HashSet,
    io,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use super::Ended;

/// `si_code` of a signal sent by the kernel (`bpf_send_signal_thread` sends SI_KERNEL).
const SI_KERNEL: i32 = 0x80;

/// A stopped thread's memory, for the fault handler.
pub struct Memory(i32);

impl Memory {
    /// XORs the 8 bytes at `addr` with `mask`; false if the address is not writable.
    pub fn xor_u64(&mut self, addr: u64, mask: u64) -> bool {
        // SAFETY: PEEKDATA/POKEDATA on a thread stopped under our ptrace; errno tells failure.
        unsafe {
            *libc::__errno_location() = 0;
            let v = libc::ptrace(libc::PTRACE_PEEKDATA, self.0, addr as *mut libc::c_void, 0);
            if v == -1 && errno() != 0 {
                return false;
            }
            libc::ptrace(libc::PTRACE_POKEDATA, self.0, addr as *mut libc::c_void, (v as u64 ^ mask) as libc::c_long)
                == 0
        }
    }
}

/// The traced threads of one victim process.
pub struct Session {
    pid: i32,
    threads: HashSet<i32>,
    /// Register changes made.
    pub applied: u64,
    detached: bool,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cont(tid: i32, sig: i32) {
    // SAFETY: ptrace on a tracee of ours; a failure (thread gone) is harmless.
    unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0, sig as libc::c_long) };
}

fn tasks(pid: i32) -> io::Result<Vec<i32>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

impl Session {
    /// Traces every thread of `pid` without stopping it. `exit_kill`: the victim dies with the
    /// injector (for processes the campaign started).
    pub fn seize(pid: u32, exit_kill: bool) -> io::Result<Session> {
        let pid = pid as i32;
        let mut opts = libc::PTRACE_O_TRACECLONE;
        if exit_kill {
            opts |= libc::PTRACE_O_EXITKILL;
        }
        let mut s = Session { pid, threads: HashSet::new(), applied: 0, detached: false };
        loop {
            let mut new = false;
            for tid in tasks(pid)? {
                if s.threads.contains(&tid) {
                    continue;
                }
                // SAFETY: PTRACE_SEIZE takes no memory argument; opts in data.
                if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, opts as libc::c_long) } == 0 {
                    s.threads.insert(tid);
                    new = true;
                } else if errno() != libc::ESRCH {
                    let e = io::Error::last_os_error();
                    s.detach();
                    return Err(e);
                }
            }
            if !new {
                break;
            }
        }
        Ok(s)
    }

    /// Handles the victim's stops until it ends or `stop` is set: SIGTRAPs the kernel sent
    /// go to `apply` (which changes the registers and says whether it did) and are
    /// suppressed; every other signal is delivered as it would have been.
    pub fn run(
        &mut self,
        mut apply: impl FnMut(i32, &mut libc::user_regs_struct, &mut Memory) -> bool,
        stop: &AtomicBool,
    ) -> Ended {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ended::Stopped;
            }
            let mut status = 0;
            // SAFETY: status is a valid out pointer.
            let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::WNOHANG) };
            if tid == 0 {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            if tid < 0 {
                if errno() == libc::ECHILD {
                    return Ended::Gone;
                }
                continue;
            }
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                self.threads.remove(&tid);
                if tid == self.pid {
                    self.detached = true;
                    return if libc::WIFEXITED(status) {
                        Ended::Exit(libc::WEXITSTATUS(status))
                    } else {
                        Ended::Signal(libc::WTERMSIG(status))
                    };
                }
                continue;
            }
            if !libc::WIFSTOPPED(status) {
                continue;
            }
            let sig = libc::WSTOPSIG(status);
            match status >> 16 {
                libc::PTRACE_EVENT_CLONE => {
                    let mut new: libc::c_ulong = 0;
                    // SAFETY: GETEVENTMSG writes one unsigned long.
                    unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut new as *mut libc::c_ulong) };
                    self.threads.insert(new as i32);
                    cont(tid, 0);
                }
                libc::PTRACE_EVENT_STOP => {
                    if matches!(sig, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) {
                        // Group stop: stay stopped as the process would without us.
                        // SAFETY: no memory arguments.
                        unsafe { libc::ptrace(libc::PTRACE_LISTEN, tid, 0, 0) };
                    } else {
                        self.threads.insert(tid);
                        cont(tid, 0);
                    }
                }
                0 if sig == libc::SIGTRAP && self.sent_by_kernel(tid) => {
                    // SAFETY: user_regs_struct is plain data; GETREGS/SETREGS fill/read it.
                    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
                    if unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut libc::user_regs_struct) }
                        == 0
                        && apply(tid, &mut regs, &mut Memory(tid))
                        && unsafe { libc::ptrace(libc::PTRACE_SETREGS, tid, 0, &regs as *const libc::user_regs_struct) }
                            == 0
                    {
                        self.applied += 1;
                    }
                    cont(tid, 0);
                }
                _ => cont(tid, sig),
            }
        }
    }

    fn sent_by_kernel(&self, tid: i32) -> bool {
        // SAFETY: siginfo_t is plain data; GETSIGINFO fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, tid, 0, &mut info as *mut libc::siginfo_t) };
        r == 0 && info.si_code == SI_KERNEL
    }

    /// Stops tracing every thread (each is interrupted, a pending SIGTRAP of ours is dropped,
    /// then detached). Call after the probes that send SIGTRAP are gone.
    pub fn detach(&mut self) {
        if self.detached {
            return;
        }
        self.detached = true;
        for tid in std::mem::take(&mut self.threads) {
            // SAFETY: no memory arguments.
            if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) } != 0 {
                continue;
            }
            for _ in 0..100 {
                let mut status = 0;
                // SAFETY: status is a valid out pointer.
                let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
                if r != tid || !libc::WIFSTOPPED(status) {
                    break;
                }
                let sig = libc::WSTOPSIG(status);
                if status >> 16 == libc::PTRACE_EVENT_STOP || sig != libc::SIGTRAP || !self.sent_by_kernel(tid) {
                    // SAFETY: no memory arguments; the signal (if any) is passed on.
                    let pass = if status >> 16 == 0 && sig != libc::SIGTRAP { sig } else { 0 };
                    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, pass as libc::c_long) };
                    break;
                }
                // One of our SIGTRAPs was pending: drop it and wait for the interrupt stop.
                cont(tid, 0);
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.detach();
    }
}
