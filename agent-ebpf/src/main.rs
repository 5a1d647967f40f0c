//! The kernel half of the afetm agent: a single uprobe program attached (through uprobe_multi
//! links) to every traced function.
//!
//! The attach cookie is the function id and the generation of its link; the per-function mode
//! and owning link live in `MODES` (`agent_common::Slot`), so a plan can change what a probe
//! does without re-attaching it, and a link can be rebuilt without losing or doubling a call. Per call it records AFETM's trace tuple
//! (function, caller, callstack) of section III.B: the caller as the return address at `[sp]`,
//! the call stack as the chain of return addresses unwound here with the `.eh_frame` steps the
//! agent learnt (`walk`), or, where a step is not learnt yet, a copy of a bounded window of the
//! user stack plus the registers the agent's unwinder needs. Records are submitted without a
//! wakeup; the agent polls.
#![no_std]
#![no_main]

use agent_common::{
    EventHeader, FateRecord, HEADER_LEN, InjectSpec, MAX_CHAIN, MAX_FUNCS, MAX_MARKS, MAX_STACK_WINDOW,
    MAX_TRACED_PROCS, MAX_UNWIND_RULES, Mark, Mode, RING_BYTES, STACK_ATTEMPTS, Slot, StackEvent, UnwindStep, fate,
    fault, inject_stat, kind, stat, unwind_key,
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_buf, bpf_probe_write_user,
        generated::{
            bpf_get_attach_cookie, bpf_get_current_task, bpf_loop, bpf_send_signal, bpf_send_signal_thread,
            bpf_get_current_task_btf, bpf_task_pt_regs,
        },
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    bindings::pt_regs,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};

/// Bytes of user stack to copy for call-stack events; set by the loader, at most
/// [`MAX_STACK_WINDOW`].
#[unsafe(no_mangle)]
static STACK_WINDOW: u32 = agent_common::DEFAULT_STACK_WINDOW;

/// 1: call-stack events are unwound in the kernel where the `UNWIND` map knows every step
/// (`kind::CALL_CHAIN`); 0: always a stack copy. Set by the loader.
#[unsafe(no_mangle)]
static KERNEL_UNWIND: u32 = 1;

/// Unwind steps learnt by the agent (see `agent_common::UnwindStep`).
#[map]
static UNWIND: LruHashMap<[u64; 2], [i32; 4]> = LruHashMap::with_max_entries(MAX_UNWIND_RULES, 0);

#[map]
static MODES: Array<u64> = Array::with_max_entries(MAX_FUNCS, 0);
#[map]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_FUNCS, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::LEN, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static SCRATCH: PerCpuArray<StackEvent> = PerCpuArray::with_max_entries(1, 0);
/// Handover marks per thread id (see `agent_common::Slot`).
#[map]
static MARKS: LruHashMap<u32, Mark> = LruHashMap::with_max_entries(MAX_MARKS, 0);

#[uprobe(multi)]
pub fn afetm_probe(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (fn_id, generation) = (cookie as u32, (cookie >> 32) as u32);
    let Some(slot) = MODES.get(fn_id) else {
        return 0;
    };
    let slot = Slot::decode(*slot);
    if slot.mode == Mode::Off {
        return 0;
    }
    if generation == slot.owner {
        if slot.incoming != 0 {
            // Handover: the incoming link's probe ran first in this hit if it left our mark.
            let regs = unsafe { &*ctx.regs };
            let tid = bpf_get_current_pid_tgid() as u32;
            if let Some(m) = unsafe { MARKS.get(&tid) }
                && m.ip == regs.rip
                && m.sp == regs.rsp
                && m.generation == slot.incoming
            {
                let _ = MARKS.remove(&tid);
                return 0;
            }
        }
    } else if generation == slot.incoming && generation != 0 {
        let regs = unsafe { &*ctx.regs };
        let tid = bpf_get_current_pid_tgid() as u32;
        let mark = Mark { ip: regs.rip, sp: regs.rsp, generation, _pad: 0 };
        let _ = MARKS.insert(&tid, &mark, 0);
    } else {
        return 0; // a link on its way out, or a throwaway probe
    }
    match slot.mode {
        Mode::Off => {}
        Mode::Count => {
            if let Some(c) = COUNTS.get_ptr_mut(fn_id) {
                unsafe { *c += 1 };
            }
        }
        Mode::Event => emit_call(&ctx, fn_id),
        Mode::CallStack => emit_stack(&ctx, fn_id),
    }
    0
}

/// Processes (thread group ids) the agent has seen calls from: the only ones whose threads'
/// fates are reported.
#[map]
static TRACED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_TRACED_PROCS, 0);

/// Reports the fate of a thread of a traced process (see `agent_common::FateRecord`).
#[inline(always)]
fn emit_fate(fate: u32, code: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if unsafe { TRACED.get(&pid) }.is_none() {
        return;
    }
    let record = FateRecord { kind: kind::FATE, fate, pid, tid: pid_tgid as u32, ts_ns: unsafe { bpf_ktime_get_ns() }, code };
    if EVENTS.output(&record, BPF_RB_NO_WAKEUP as u64).is_err() {
        bump(stat::DROPPED);
    }
}

/// Byte offset of `exit_code` in the kernel's `struct task_struct`, read from the kernel's BTF
/// by the loader (0: unknown, exits not reported).
#[unsafe(no_mangle)]
static EXIT_CODE_OFFSET: u32 = 0;

/// `sched/sched_process_exit`: every thread of a traced process that ends, with the kernel's
/// exit code (`do_exit` sets it just before: the exit status or the killing signal, as `wait`
/// reports it). Runs in the exiting thread.
#[tracepoint]
pub fn afetm_exit(_ctx: TracePointContext) -> u32 {
    let offset = unsafe { core::ptr::read_volatile(&EXIT_CODE_OFFSET) } as usize;
    if offset == 0 || offset > 1 << 16 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Ok(code) = (unsafe { bpf_probe_read_kernel(task.wrapping_add(offset).cast::<i32>()) }) else {
        return 0;
    };
    emit_fate(fate::EXIT, code as i64);
    0
}

/// Where a thread of a traced process was when it took signal `sig` ([`kind::FATE_STACK`]):
/// its user registers (`bpf_task_pt_regs`: the state it entered the kernel with) and a copy of
/// its user stack, for the agent to unwind as it does call-stack events. `signal_deliver` runs
/// in the thread itself, on its way back to user space, so its memory is still mapped (at
/// `sched_process_exit` it may not be).
#[inline(always)]
fn emit_fate_stack(sig: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if unsafe { TRACED.get(&pid) }.is_none() {
        return;
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut *ev };
    // The helper takes the task as a BTF pointer (`bpf_get_current_task` gives a plain number).
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    let Ok(regs) = (unsafe { bpf_probe_read_kernel(regs) }) else {
        return;
    };
    let hdr = &mut ev.hdr;
    hdr.kind = kind::FATE_STACK;
    hdr.fn_id = sig;
    hdr.pid = pid;
    hdr.tid = pid_tgid as u32;
    hdr.ts_ns = unsafe { bpf_ktime_get_ns() };
    hdr.ip = regs.rip;
    hdr.sp = regs.rsp;
    hdr.bp = regs.rbp;
    hdr.ret_addr = 0;
    hdr._pad = 0;
    let window = unsafe { core::ptr::read_volatile(&STACK_WINDOW) } as usize;
    let len = copy_window(ev, window);
    ev.hdr.stack_len = len as u32;
    output(ev, HEADER_LEN + len);
}

/// Offsets in the `signal/signal_deliver` tracepoint's record
/// (`/sys/kernel/tracing/events/signal/signal_deliver/format`).
const SIGNAL_DELIVER_SIG: usize = 8;
const SIGNAL_DELIVER_HANDLER: usize = 24;

/// `signal/signal_deliver`: a thread of a traced process takes SIGSTOP, SIGTSTP, SIGTTIN or
/// SIGTTOU with its default action, i.e. its process stops (as a deadlock injection does); or
/// it takes SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV or SIGSYS with the default
/// action: the fault is in this thread (the process's other threads die of it too); or it
/// takes SIGILL, SIGABRT, SIGBUS, SIGFPE or SIGSEGV into a handler of its own (a crash
/// reporter, as redis's): the fault is in this thread, and its calls so far are where.
#[tracepoint]
pub fn afetm_signal(ctx: TracePointContext) -> u32 {
    let Ok(sig) = (unsafe { ctx.read_at::<i32>(SIGNAL_DELIVER_SIG) }) else {
        return 0;
    };
    let stop = (19..=22).contains(&sig);
    if sig == 9 {
        // A SIGKILL (the whole group's, as each thread dies of another's fault signal too):
        // its exit reports the fate; here is only where it was.
        emit_fate_stack(sig as u32);
        return 0;
    }
    if !stop && !matches!(sig, 4..=8 | 11 | 31) {
        return 0;
    }
    let Ok(handler) = (unsafe { ctx.read_at::<u64>(SIGNAL_DELIVER_HANDLER) }) else {
        return 0;
    };
    if sig == 19 || handler == 0 || matches!(sig, 4 | 6 | 7 | 8 | 11) {
        emit_fate_stack(sig as u32);
    }
    // SIGSTOP cannot be caught; the others act only with the default action (SIG_DFL, 0).
    if sig == 19 || handler == 0 {
        emit_fate(if stop { fate::STOP } else { fate::FAULT_SIGNAL }, sig as i64);
    } else if matches!(sig, 4 | 6 | 7 | 8 | 11) {
        // Not SIGTRAP or SIGSYS: debuggers and sandboxes catch those without a fault.
        emit_fate(fate::FAULT_HANDLED, sig as i64);
    }
    0
}

/// The fault the injector applies (one entry; see `agent_common::InjectSpec`).
#[map]
static INJECT: Array<InjectSpec> = Array::with_max_entries(1, 0);
#[map]
static INJECT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(inject_stat::LEN, 0);

/// Stack pointer at the entry of the injected function, per thread (ptrace fallback).
#[map]
static ENTRY_SP: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_MARKS, 0);

#[inline(always)]
fn inject_count(index: u32) {
    if let Some(c) = INJECT_STATS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

/// Per thread of the victim, `[first_ns, last_ns, count]` of the applications
/// (`bpf_ktime_get_ns`, the agent's event clock): the campaign labels only the threads and
/// windows a fault reached.
#[map]
static APPLIED_AT: LruHashMap<u32, [u64; 3]> = LruHashMap::with_max_entries(MAX_MARKS, 0);

/// Counts one application and notes when and in which thread it happened.
#[inline(always)]
fn note_applied() {
    inject_count(inject_stat::APPLIED);
    let tid = bpf_get_current_pid_tgid() as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    match APPLIED_AT.get_ptr_mut(&tid) {
        Some(v) => unsafe {
            (*v)[1] = now;
            (*v)[2] += 1;
        },
        None => {
            let _ = APPLIED_AT.insert(&tid, &[now, now, 1], 0);
        }
    }
}

#[inline(always)]
fn inject_spec() -> Option<&'static InjectSpec> {
    let spec = INJECT.get(0)?;
    ((bpf_get_current_pid_tgid() >> 32) as u32 == spec.tgid).then_some(spec)
}

/// Fault injection at function entry by signal (AFETM sec. III.C.1): crash (SIGKILL),
/// deadlock (SIGSTOP), or SIGTRAP to the thread for the injector's ptrace fallback. Loaded only
/// by `afetm-inject`.
#[uprobe]
pub fn afetm_inject_signal(_ctx: ProbeContext) -> u32 {
    let Some(spec) = inject_spec() else {
        return 0;
    };
    let ok = match spec.kind {
        fault::CRASH => (unsafe { bpf_send_signal(9) }) == 0,
        fault::DEADLOCK => (unsafe { bpf_send_signal(19) }) == 0,
        fault::TRAP => {
            // The stack pointer at entry, for the injector's stack parameter flips (the thread
            // stops only after the first instruction, which may move rsp).
            // Copied to the stack: the map helper takes no pointer into the context.
            let sp: u64 = unsafe { core::ptr::read_volatile(&(*_ctx.regs).rsp) };
            let tid = bpf_get_current_pid_tgid() as u32;
            let _ = ENTRY_SP.insert(&tid, &sp, 0);
            (unsafe { bpf_send_signal_thread(5) }) == 0
        }
        _ => return 0,
    };
    if ok {
        note_applied();
    } else {
        inject_count(inject_stat::FAILED);
    }
    0
}

/// Input corruption of a stack parameter (index >= 6) at entry: user memory write.
#[uprobe]
pub fn afetm_inject_stack(ctx: ProbeContext) -> u32 {
    let Some(spec) = inject_spec() else {
        return 0;
    };
    if spec.kind != fault::INPUT || spec.arg < 6 {
        return 0;
    }
    let regs = unsafe { &*ctx.regs };
    // Slot arg-6 above the return address.
    let addr = (regs.rsp + 8 * (spec.arg as u64 - 5)) as *mut u64;
    let ok = match unsafe { bpf_probe_read_user(addr as *const u64) } {
        Ok(v) => {
            let flipped = v ^ (1u64 << (spec.bit & 63));
            unsafe { bpf_probe_write_user(addr, &flipped as *const u64) }.is_ok()
        }
        Err(_) => false,
    };
    if ok {
        note_applied();
    } else {
        inject_count(inject_stat::FAILED);
    }
    0
}

/// IP+N and input corruption of a register parameter at entry: writes the saved registers,
/// which only kernels that let uprobe programs write their context accept (the injector checks
/// at start and says so).
#[uprobe]
pub fn afetm_inject_regs(ctx: ProbeContext) -> u32 {
    let Some(spec) = inject_spec() else {
        return 0;
    };
    let regs = unsafe { &mut *ctx.regs };
    let mask = 1u64 << (spec.bit & 63);
    match (spec.kind, spec.arg) {
        (fault::IP_PLUS_N, n) => regs.rip = regs.rip.wrapping_add(n as u64),
        (fault::INPUT, 0) => regs.rdi ^= mask,
        (fault::INPUT, 1) => regs.rsi ^= mask,
        (fault::INPUT, 2) => regs.rdx ^= mask,
        (fault::INPUT, 3) => regs.rcx ^= mask,
        (fault::INPUT, 4) => regs.r8 ^= mask,
        (fault::INPUT, 5) => regs.r9 ^= mask,
        _ => return 0,
    }
    note_applied();
    0
}

/// At function return: SIGTRAP to the thread for the ptrace fallback of output corruption
/// (delivered on the return to the caller, where rax holds the return value).
#[uretprobe]
pub fn afetm_inject_trap_ret(_ctx: RetProbeContext) -> u32 {
    let Some(spec) = inject_spec() else {
        return 0;
    };
    if spec.kind != fault::TRAP {
        return 0;
    }
    let ok = (unsafe { bpf_send_signal_thread(5) }) == 0;
    if ok {
        note_applied();
    } else {
        inject_count(inject_stat::FAILED);
    }
    0
}

/// Output corruption at function return: one bit of rax flipped.
#[uretprobe]
pub fn afetm_inject_ret(ctx: RetProbeContext) -> u32 {
    let Some(spec) = inject_spec() else {
        return 0;
    };
    if spec.kind != fault::OUTPUT {
        return 0;
    }
    let regs = unsafe { &mut *ctx.regs };
    regs.rax ^= 1u64 << (spec.bit & 63);
    note_applied();
    0
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn fill(ctx: &ProbeContext, fn_id: u32, hdr: &mut EventHeader, kind: u32) {
    let regs = unsafe { &*ctx.regs };
    let pid_tgid = bpf_get_current_pid_tgid();
    hdr.kind = kind;
    hdr.fn_id = fn_id;
    hdr.pid = (pid_tgid >> 32) as u32;
    hdr.tid = pid_tgid as u32;
    hdr.ts_ns = unsafe { bpf_ktime_get_ns() };
    hdr.ip = regs.rip;
    hdr.sp = regs.rsp;
    hdr.bp = regs.rbp;
    hdr.ret_addr = unsafe { bpf_probe_read_user(regs.rsp as *const u64) }.unwrap_or(0);
    hdr.stack_len = 0;
    hdr._pad = 0;
}

#[inline(always)]
fn emit_call(ctx: &ProbeContext, fn_id: u32) {
    match EVENTS.reserve::<EventHeader>(0) {
        Some(mut entry) => {
            let hdr = unsafe { entry.assume_init_mut() };
            fill(ctx, fn_id, hdr, kind::CALL);
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => bump(stat::DROPPED),
    }
}

/// A call-stack event: the chain of return addresses unwound here when every step of it is
/// learnt (a few map lookups and 8-byte reads), else a copy of the stack window for the agent
/// to unwind (and learn from).
#[inline(always)]
fn emit_stack(ctx: &ProbeContext, fn_id: u32) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut *ev };
    fill(ctx, fn_id, &mut ev.hdr, kind::CALL_STACK);
    let window = unsafe { core::ptr::read_volatile(&STACK_WINDOW) } as usize;
    if unsafe { core::ptr::read_volatile(&KERNEL_UNWIND) } != 0 {
        match walk(ev, window) {
            Some(frames) if frames <= MAX_CHAIN => {
                // Masked so the verifier sees the bound on the very register it checks.
                let bytes = (frames & (2 * MAX_CHAIN - 1)) * 8;
                bump(stat::CHAINS);
                ev.hdr.kind = kind::CALL_CHAIN;
                ev.hdr.stack_len = bytes as u32;
                output(ev, HEADER_LEN + bytes);
                return;
            }
            _ => bump(stat::CHAIN_MISSES),
        }
    }
    let len = copy_window(ev, window);
    if len == 0 {
        bump(stat::STACK_UNREADABLE);
    }
    ev.hdr.stack_len = len as u32;
    output(ev, HEADER_LEN + len);
}

#[inline(always)]
fn output(ev: &StackEvent, total: usize) {
    let total = total & 0x7fff;
    if total > core::mem::size_of::<StackEvent>() {
        return;
    }
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const StackEvent).cast::<u8>(), total) };
    if EVENTS.output(bytes, BPF_RB_NO_WAKEUP as u64).is_err() {
        bump(stat::DROPPED);
    }
}

/// Copies the stack window into `ev.stack`. The window may run past the top of the stack
/// mapping (shallow frames of the main thread): try the configured size, then halve, each a
/// constant size the verifier can check. Returns the bytes copied.
#[inline(always)]
fn copy_window(ev: &mut StackEvent, window: usize) -> usize {
    let sp = ev.hdr.sp as *const u8;
    let mut len = 0usize;
    macro_rules! attempt {
        ($n:expr) => {
            if len == 0 && window >= $n && $n <= MAX_STACK_WINDOW {
                if unsafe { bpf_probe_read_user_buf(sp, &mut ev.stack[..$n]) }.is_ok() {
                    len = $n;
                }
            }
        };
    }
    attempt!(16384);
    attempt!(8192);
    attempt!(4096);
    attempt!(2048);
    attempt!(1024);
    attempt!(512);
    attempt!(256);
    len
}

/// The length [`copy_window`] would copy, found by reading one byte per page instead of the
/// window (a copy succeeds exactly when every page it touches is readable). A BPF-to-BPF call:
/// inlined into [`frame`], LLVM spilled a register that path never set and the verifier refused.
#[inline(never)]
fn readable_window(sp: u64, window: usize) -> usize {
    let mut limit = sp + window as u64;
    let mut page = (sp & !4095) + 4096;
    for _ in 0..(MAX_STACK_WINDOW / 4096 + 1) {
        if page >= limit {
            break;
        }
        if unsafe { bpf_probe_read_user(page as *const u8) }.is_err() {
            limit = page;
            break;
        }
        page += 4096;
    }
    for n in STACK_ATTEMPTS {
        if n <= window && sp + n as u64 <= limit {
            return n;
        }
    }
    0
}

/// AFETM's call stack unwound in the kernel: the same steps, in the same order and with the
/// same stopping rules, as the agent's `.eh_frame` unwinder on a copy of `[sp, sp + window)`
/// (agent/src/unwind.rs), so both give the same chain. Writes the return addresses into
/// `ev.stack`; `None` when a step is not learnt or the chain is longer than [`MAX_CHAIN`].
///
/// Cost: one map lookup per frame and one user read (the return address and a saved rbp next
/// to it come in one 16-byte read; the first return address is the header's). The readable
/// length of the window, which the copy would have had, is only probed for reads beyond the
/// smallest copy (256 bytes). The frames are walked by `bpf_loop` (one verification of
/// [`walk_step`] instead of one per unrolled frame, which exceeded the verifier's budget).
#[inline(always)]
fn walk(ev: &StackEvent, window: usize) -> Option<usize> {
    let mut w = Walk {
        sp0: ev.hdr.sp,
        end: 0,
        sp: ev.hdr.sp,
        bp: ev.hdr.bp,
        key: ev.hdr.ip,
        ret_addr: ev.hdr.ret_addr,
        window: window as u64,
        tgid: ev.hdr.pid,
        n: 0,
        status: WALKING,
        _pad: 0,
    };
    unsafe {
        bpf_loop(
            MAX_CHAIN as u32,
            walk_step as *mut core::ffi::c_void,
            (&mut w as *mut Walk).cast(),
            0,
        )
    };
    (w.status == DONE).then_some(w.n as usize)
}

const WALKING: u32 = 0;
const DONE: u32 = 1;
const FALLBACK: u32 = 2;

/// State of one [`walk`] between its `bpf_loop` steps.
#[repr(C)]
struct Walk {
    sp0: u64,
    /// End of what the copy would hold; 0 until a read beyond the smallest copy needs it.
    end: u64,
    sp: u64,
    bp: u64,
    /// Address whose step comes next: the probe address, then each return address.
    key: u64,
    ret_addr: u64,
    window: u64,
    tgid: u32,
    /// Frames written so far.
    n: u32,
    status: u32,
    _pad: u32,
}

/// One frame of [`walk`]; returns 1 to stop the loop.
#[inline(never)]
extern "C" fn walk_step(_index: u32, ctx: *mut core::ffi::c_void) -> i64 {
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    w.status = match frame(w) {
        Some(true) => return 0,
        Some(false) => DONE,
        None => FALLBACK,
    };
    1
}

/// Unwinds one frame: `Some(true)` when it was written and the walk goes on, `Some(false)` when
/// the chain ends here (as the unwinder's would), `None` to fall back to the stack copy.
#[inline(always)]
fn frame(w: &mut Walk) -> Option<bool> {
    let step = UnwindStep::decode(*unsafe { UNWIND.get(&unwind_key(w.tgid, w.key)) }?);
    let UnwindStep::Rule { cfa_from_rbp, cfa_offset, ra_offset, rbp_offset } = step else {
        return Some(false);
    };
    let base = if cfa_from_rbp { w.bp } else { w.sp };
    let Some(cfa) = base.checked_add_signed(cfa_offset as i64) else {
        return Some(false);
    };
    let Some(ra_at) = cfa.checked_add_signed(ra_offset as i64) else {
        return Some(false);
    };
    let rbp_at = match rbp_offset {
        Some(o) => match cfa.checked_add_signed(o as i64) {
            Some(a) => Some(a),
            None => return Some(false),
        },
        None => None,
    };
    // Every read must lie where the copy would have reached, as the unwinder reads it.
    let (lowest, highest) = match rbp_at {
        Some(b) if b < ra_at => (b, ra_at),
        Some(b) => (ra_at, b),
        None => (ra_at, ra_at),
    };
    let small = STACK_ATTEMPTS[STACK_ATTEMPTS.len() - 1] as u64;
    if lowest < w.sp0 {
        return Some(false);
    }
    let top = highest.checked_add(8)?;
    if top > w.sp0 + small {
        if w.end == 0 {
            w.end = w.sp0 + readable_window(w.sp0, w.window as usize) as u64;
        }
        if top > w.end {
            return Some(false);
        }
    }
    let (ra, saved_bp) = match rbp_at {
        Some(b) if b + 8 == ra_at => {
            let pair = unsafe { bpf_probe_read_user(b as *const [u64; 2]) }.ok()?;
            (pair[1], Some(pair[0]))
        }
        Some(b) => {
            let ra = unsafe { bpf_probe_read_user(ra_at as *const u64) }.ok()?;
            (ra, Some(unsafe { bpf_probe_read_user(b as *const u64) }.ok()?))
        }
        None if ra_at == w.sp0 => (w.ret_addr, None),
        None => (unsafe { bpf_probe_read_user(ra_at as *const u64) }.ok()?, None),
    };
    if let Some(v) = saved_bp {
        w.bp = v;
    }
    if ra == 0 || (cfa <= w.sp && w.n > 0) {
        return Some(false);
    }
    let ev = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let at = w.n as usize * 8;
    if at + 8 > MAX_CHAIN * 8 {
        return None;
    }
    unsafe { core::ptr::write_unaligned(ev.stack.as_mut_ptr().add(at).cast::<u64>(), ra) };
    w.n += 1;
    w.sp = cfa;
    w.key = ra;
    Some(true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
