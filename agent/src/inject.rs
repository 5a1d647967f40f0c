//! Fault injection for the FDDB campaign (AFETM sec. III.C.1), without a kernel module: an eBPF
//! uprobe on the target function's entry (or a uretprobe on its return) applies the fault to
//! every call from attach on (permanent faults), in one process only.
//! Crash and deadlock sit where the agent's tracer puts the function's probe
//! ([`probe_site::place`](afetm_elf::probe_site::place): the entry, or the first emulated
//! instruction of the prologue, e.g. after `endbr64`): a fault in a function happens once it
//! was entered, so its tracer records the call. At the entry, before a probe moved past
//! `endbr64`, the signal stops the thread first and the call is never recorded: the thread's
//! last calls then end in the caller, which a diagnosis would name.
//!
//! | fault | where | mechanism |
//! |---|---|---|
//! | crash | the tracer's probe site | `bpf_send_signal(SIGKILL)` |
//! | deadlock | the tracer's probe site | `bpf_send_signal(SIGSTOP)` (the whole process stops) |
//! | IP+N | entry | the uprobe program writes `regs->ip`, or ([`ptrace`] fallback) SIGTRAP + ptrace |
//! | input corruption | entry | register parameters: `regs` write or ptrace fallback; stack parameters: `bpf_probe_write_user`, or ptrace `POKEDATA` at the entry rsp the probe recorded |
//! | output corruption | return | uretprobe writes `regs->ax`, or SIGTRAP + ptrace |
//!
//! Each eBPF program is tried first; Linux 6.18 (this project's machines) refuses context
//! writes from uprobe programs ("invalid bpf_context access") and `bpf_probe_write_user`, so
//! register faults go through the ptrace fallback there and stack parameters are unavailable.
//! [`capabilities`] reports what the running kernel accepts.
//!
//! Safety: an [`Injector`] only ever touches a [`Victim`], which is either a child process the
//! caller started or a pid named explicitly as foreign; pid 1 and the injector itself are
//! refused.

use std::{fmt, num::NonZeroU32, path::Path, sync::atomic::AtomicBool};

pub use afetm_fault::Fault;

use agent_common::{InjectSpec, fault, inject_stat};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{UProbe, uprobe::UProbeScope},
};

use crate::symbols::Module;

pub mod ptrace;

/// How the victim ended, as the injector saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Exit(i32),
    Signal(i32),
    /// The process is gone (not the injector's child, so its status is unknown).
    Gone,
    /// The injector was stopped first; the process runs on.
    Stopped,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Exit(c) => write!(f, "exit {c}"),
            Ended::Signal(s) => write!(f, "signal {s}"),
            Ended::Gone => write!(f, "gone"),
            Ended::Stopped => write!(f, "injector stopped"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("refusing to inject into pid {0}: {1}")]
    Refused(u32, &'static str),
    #[error("process {0} is gone")]
    Gone(u32),
    #[error(transparent)]
    Symbols(#[from] crate::symbols::SymbolError),
    #[error("no function {0:?} in {1}")]
    UnknownFunction(String, String),
    #[error("function {0} has no file offset")]
    NoOffset(String),
    #[error("bad fault {0:?}: expected crash, deadlock, ip+N, input:ARG:BIT or output:BIT")]
    BadFault(String),
    #[error("this kernel cannot apply {fault} with eBPF: {why}")]
    Unsupported { fault: String, why: String },
    #[error("loading the injector: {0}")]
    Load(String),
    #[error("attaching the injector to {function}: {error}")]
    Attach { function: String, error: String },
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// A process the injector may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Victim(NonZeroU32, bool);

impl Victim {
    /// A process the caller started.
    pub fn child(child: &std::process::Child) -> Result<Victim, InjectError> {
        Victim::check(child.id()).map(|v| Victim(v.0, true))
    }

    /// A pid the user named explicitly as one the injector may break.
    pub fn foreign(pid: u32) -> Result<Victim, InjectError> {
        Victim::check(pid)
    }

    fn check(pid: u32) -> Result<Victim, InjectError> {
        if pid <= 1 {
            return Err(InjectError::Refused(pid, "pid 0 and init are never injected"));
        }
        if pid == std::process::id() {
            return Err(InjectError::Refused(pid, "that is the injector itself"));
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(InjectError::Gone(pid));
        }
        NonZeroU32::new(pid).map(|p| Victim(p, false)).ok_or(InjectError::Refused(pid, "pid 0"))
    }

    pub fn pid(&self) -> u32 {
        self.0.get()
    }

    /// Whether the caller started it (so it may die with the injector).
    pub fn is_child(&self) -> bool {
        self.1
    }
}

const SIGNAL: &str = "afetm_inject_signal";
const STACK: &str = "afetm_inject_stack";
const REGS: &str = "afetm_inject_regs";
const RETURN: &str = "afetm_inject_ret";
const TRAP_RETURN: &str = "afetm_inject_trap_ret";

/// The eBPF program that applies `fault` where the kernel allows it.
fn program(fault: Fault) -> &'static str {
    match fault {
        Fault::Crash | Fault::Deadlock => SIGNAL,
        Fault::Input { arg, .. } if arg >= 6 => STACK,
        Fault::IpPlus(_) | Fault::Input { .. } => REGS,
        Fault::Output { .. } => RETURN,
    }
}

/// How the eBPF programs apply `fault` where the kernel allows them to.
fn direct_mechanism(fault: Fault) -> &'static str {
    match fault {
        Fault::Crash | Fault::Deadlock => "eBPF bpf_send_signal at the tracer's probe site",
        Fault::IpPlus(_) => "eBPF uprobe context write (ip) at entry",
        Fault::Input { arg, .. } if arg < 6 => "eBPF uprobe context write (parameter register) at entry",
        Fault::Input { .. } => "eBPF bpf_probe_write_user (stack parameter) at entry",
        Fault::Output { .. } => "eBPF uretprobe context write (rax) at return",
    }
}

/// Where `fault` is attached in `func`: crash and deadlock at the tracer's probe site (see
/// the module doc), the other faults at the entry (IP+N and input corruption count
/// instructions and read registers from there).
fn stop_site(module: &Module, func: &crate::symbols::Function, fault: Fault) -> u64 {
    match fault {
        Fault::Crash | Fault::Deadlock => afetm_elf::probe_site::place(func.start, module.code(func)).vaddr,
        _ => func.start,
    }
}

fn object() -> Result<Ebpf, InjectError> {
    EbpfLoader::new()
        .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/afetm.bpf.o")))
        .map_err(|e| InjectError::Load(e.to_string()))
}

fn load(ebpf: &mut Ebpf, name: &str) -> Result<(), String> {
    let prog: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load().map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            s.push_str(&format!(": {x}"));
            src = x.source();
        }
        s
    })
}

/// What this kernel lets the injector do, per fault type: `Ok` or the verifier's reason.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Crash and deadlock (signals from a uprobe).
    pub signal: Result<(), String>,
    /// Input corruption of stack parameters (user memory writes).
    pub stack: Result<(), String>,
    /// IP+N and input corruption of register parameters (uprobe context writes).
    pub regs: Result<(), String>,
    /// Output corruption (uretprobe context writes).
    pub ret: Result<(), String>,
}

/// Loads every injector program once to see what this kernel accepts.
pub fn capabilities() -> Result<Capabilities, InjectError> {
    let mut ebpf = object()?;
    // Only the first line of a verifier refusal: the rest is the verifier log.
    let mut try_load = |name| {
        load(&mut ebpf, name).map_err(|e| {
            e.lines()
                .rev()
                .find(|l| {
                    !l.trim_start_matches(": ").is_empty()
                        && !l.starts_with("processed")
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                        && !l.starts_with(": ")
                })
                .unwrap_or(&e)
                .to_string()
        })
    };
    Ok(Capabilities { signal: try_load(SIGNAL), stack: try_load(STACK), regs: try_load(REGS), ret: try_load(RETURN) })
}

/// A fault attached to one function of one process; removed when dropped (a stopped or killed
/// process stays so).
pub struct Injector {
    ebpf: Option<Ebpf>,
    stats: PerCpuArray<MapData, u64>,
    /// tid -> [first_ns, last_ns, count] of the applications in that thread.
    applied_at: aya::maps::HashMap<MapData, u32, [u64; 3]>,
    /// tid -> rsp at the function's entry (ptrace fallback of stack parameter flips).
    entry_sp: Option<aya::maps::HashMap<MapData, u32, u64>>,
    ptrace: Option<ptrace::Session>,
    pub function: String,
    pub fault: Fault,
    pub victim: Victim,
    /// How this kernel applies the fault.
    pub mechanism: &'static str,
}

impl Injector {
    /// Injects `fault` into `function` of the file `module_path` (an executable or a library
    /// the victim maps), in `victim` only. Register faults fall back to ptrace where the kernel
    /// refuses uprobe context writes; then [`Injector::wait`] must run on this same thread.
    pub fn start(victim: Victim, module_path: &Path, function: &str, fault: Fault) -> Result<Injector, InjectError> {
        if !Path::new(&format!("/proc/{}", victim.pid())).exists() {
            return Err(InjectError::Gone(victim.pid()));
        }
        let module = Module::load(module_path)?;
        let func = module
            .find(function)
            .first()
            .copied()
            .cloned()
            .ok_or_else(|| InjectError::UnknownFunction(function.to_string(), module_path.display().to_string()))?;
        let offset = module
            .vaddr_to_offset(stop_site(&module, &func, fault))
            .ok_or_else(|| InjectError::NoOffset(function.to_string()))?;
        // Lengths of the function's first two instructions (IP+N defaults).
        let lens = afetm_elf::probe_site::instruction_lengths(func.start, module.code(&func), 2);
        let mut ebpf = object()?;
        let direct = load(&mut ebpf, program(fault));
        let (fault, spec, name, mechanism, session) = match (direct, fault) {
            (Ok(()), f) => {
                let f = match f {
                    Fault::IpPlus(None) => Fault::IpPlus(Some(*lens.first().ok_or_else(|| {
                        InjectError::BadFault(format!("ip+ ({function} does not start with an instruction)"))
                    })?)),
                    f => f,
                };
                let spec = match f {
                    Fault::Crash => InjectSpec { kind: fault::CRASH, ..Default::default() },
                    Fault::Deadlock => InjectSpec { kind: fault::DEADLOCK, ..Default::default() },
                    Fault::IpPlus(n) => {
                        InjectSpec { kind: fault::IP_PLUS_N, arg: n.unwrap_or(1), ..Default::default() }
                    }
                    Fault::Input { arg, bit } => InjectSpec { kind: fault::INPUT, arg, bit, ..Default::default() },
                    Fault::Output { bit } => InjectSpec { kind: fault::OUTPUT, bit, ..Default::default() },
                };
                (f, spec, program(f), direct_mechanism(f), None)
            }
            (Err(_), f @ (Fault::IpPlus(_) | Fault::Input { .. } | Fault::Output { .. })) => {
                let f = match f {
                    Fault::IpPlus(None) => Fault::IpPlus(Some(*lens.get(1).ok_or_else(|| {
                        InjectError::BadFault(format!("ip+ ({function} has fewer than two instructions)"))
                    })?)),
                    f => f,
                };
                let (name, mechanism) = match f {
                    Fault::Output { .. } => {
                        (TRAP_RETURN, "ptrace: SIGTRAP from a uretprobe, rax flipped in the caller after the return")
                    }
                    Fault::IpPlus(_) => {
                        (SIGNAL, "ptrace: SIGTRAP from a uprobe at entry, ip moved after the first instruction")
                    }
                    Fault::Input { arg, .. } if arg >= 6 => (
                        SIGNAL,
                        "ptrace: SIGTRAP from a uprobe at entry, stack parameter flipped (entry rsp from the probe)",
                    ),
                    _ => {
                        (SIGNAL, "ptrace: SIGTRAP from a uprobe at entry, register flipped after the first instruction")
                    }
                };
                load(&mut ebpf, name).map_err(|why| InjectError::Unsupported { fault: f.to_string(), why })?;
                // Trace every thread before the first SIGTRAP can be sent.
                let session = ptrace::Session::seize(victim.pid(), victim.is_child()).map_err(|e| {
                    InjectError::Attach { function: function.to_string(), error: format!("ptrace: {e}") }
                })?;
                (f, InjectSpec { kind: fault::TRAP, ..Default::default() }, name, mechanism, Some(session))
            }
            (Err(why), f) => {
                return Err(InjectError::Unsupported {
                    fault: f.to_string(),
                    why: why
                        .lines()
                        .rev()
                        .find(|l| l.contains("cannot use helper") || l.starts_with("invalid bpf_context access"))
                        .map(|l| format!("the verifier says: {l}"))
                        .unwrap_or(why.clone()),
                });
            }
        };
        let spec = InjectSpec { tgid: victim.pid(), ..spec };
        let mut map: Array<MapData, [u32; 4]> =
            Array::try_from(ebpf.take_map("INJECT").ok_or_else(|| InjectError::Load("map INJECT missing".into()))?)?;
        map.set(0, &spec.words(), 0)?;
        let stats = PerCpuArray::try_from(
            ebpf.take_map("INJECT_STATS").ok_or_else(|| InjectError::Load("map INJECT_STATS missing".into()))?,
        )?;
        let applied_at = aya::maps::HashMap::try_from(
            ebpf.take_map("APPLIED_AT").ok_or_else(|| InjectError::Load("map APPLIED_AT missing".into()))?,
        )?;
        let entry_sp = match ebpf.take_map("ENTRY_SP") {
            Some(m) => Some(aya::maps::HashMap::try_from(m)?),
            None => None,
        };
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| InjectError::Load("program vanished".into()))?;
        prog.attach([offset], module_path, UProbeScope::OneProcess(victim.0))
            .map_err(|e| InjectError::Attach { function: function.to_string(), error: e.to_string() })?;
        Ok(Injector {
            ebpf: Some(ebpf),
            stats,
            applied_at,
            entry_sp,
            ptrace: session,
            function: function.to_string(),
            fault,
            victim,
            mechanism,
        })
    }

    /// Calls the fault was applied to, and calls where applying it failed. With ptrace, the
    /// register changes actually made.
    pub fn applied(&self) -> (u64, u64) {
        let sum = |i: u32| self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        match &self.ptrace {
            Some(s) => (s.applied, sum(inject_stat::FAILED) + sum(inject_stat::APPLIED).saturating_sub(s.applied)),
            None => (sum(inject_stat::APPLIED), sum(inject_stat::FAILED)),
        }
    }

    /// Per thread: when the fault was first and last applied there, and how often (the probe's
    /// count; with the ptrace fallback, the signals sent). Sorted by first application.
    pub fn applications(&self) -> Vec<afetm_fault::Applied> {
        let pid = self.victim.pid();
        let mut v: Vec<afetm_fault::Applied> = self
            .applied_at
            .iter()
            .filter_map(Result::ok)
            .map(|(tid, [first_ns, last_ns, count])| afetm_fault::Applied { pid, tid, first_ns, last_ns, count })
            .collect();
        v.sort_by_key(|a| (a.first_ns, a.tid));
        v
    }

    /// Runs until the victim ends or `stop` is set. `child`: the victim's process handle when
    /// the caller started it (reaped here).
    pub fn wait(&mut self, mut child: Option<&mut std::process::Child>, stop: &AtomicBool) -> Ended {
        if let Some(session) = self.ptrace.as_mut() {
            let fault = self.fault;
            let entry_sp = self.entry_sp.as_ref();
            let ended = session.run(
                |tid, regs, mem| match fault {
                    Fault::IpPlus(n) => {
                        regs.rip = regs.rip.wrapping_add(n.unwrap_or(1) as u64);
                        true
                    }
                    Fault::Input { arg, bit } if arg >= 6 => {
                        // Slot arg-6 above the return address, from the rsp the probe saw.
                        match entry_sp.and_then(|m| m.get(&(tid as u32), 0).ok()) {
                            Some(sp) => mem.xor_u64(sp + 8 * (arg as u64 - 5), 1u64 << (bit & 63)),
                            None => false,
                        }
                    }
                    Fault::Input { arg, bit } => {
                        let r = match arg {
                            0 => &mut regs.rdi,
                            1 => &mut regs.rsi,
                            2 => &mut regs.rdx,
                            3 => &mut regs.rcx,
                            4 => &mut regs.r8,
                            5 => &mut regs.r9,
                            _ => return false,
                        };
                        *r ^= 1u64 << (bit & 63);
                        true
                    }
                    Fault::Output { bit } => {
                        regs.rax ^= 1u64 << (bit & 63);
                        true
                    }
                    _ => false,
                },
                stop,
            );
            // No more SIGTRAPs, then let the threads go. (A child that ended was reaped by the
            // session's waitpid.)
            self.ebpf = None;
            if let Some(s) = self.ptrace.as_mut() {
                s.detach();
            }
            return ended;
        }
        loop {
            if let Some(c) = child.as_mut() {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        use std::os::unix::process::ExitStatusExt;
                        return match (status.code(), status.signal()) {
                            (Some(code), _) => Ended::Exit(code),
                            (_, Some(sig)) => Ended::Signal(sig),
                            _ => Ended::Gone,
                        };
                    }
                    Ok(None) => {}
                    Err(_) => return Ended::Gone,
                }
            } else if !Path::new(&format!("/proc/{}", self.victim.pid())).exists() {
                return Ended::Gone;
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Ended::Stopped;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victims_are_checked() {
        assert!(matches!(Victim::foreign(1), Err(InjectError::Refused(1, _))));
        assert!(matches!(Victim::foreign(std::process::id()), Err(InjectError::Refused(..))));
        assert!(matches!(Victim::foreign(u32::MAX - 1), Err(InjectError::Gone(_))));
        let child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let v = Victim::child(&child).unwrap();
        assert_eq!(v.pid(), child.id());
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
