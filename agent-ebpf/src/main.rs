//! The kernel half of the afetm agent: a single uprobe program attached (through uprobe_multi
//! links) to every traced function.
//!
//! The attach cookie is the function id and the generation of its link; the per-function mode
//! and owning link live in `MODES` (`agent_common::Slot`), so a plan can change what a probe
//! does without re-attaching it, and a link can be rebuilt without losing or doubling a call. Per call it records AFETM's trace tuple
//! (function, caller, callstack) of section III.B: the caller as the return address at `[sp]`,
//! the call stack as a copy of a bounded window of the user stack plus the registers that the
//! userspace `.eh_frame` unwinder needs. Records are submitted without a wakeup; the agent polls.
#![no_std]
#![no_main]

use agent_common::{
    EventHeader, HEADER_LEN, InjectSpec, MAX_CHAIN, MAX_FUNCS, MAX_MARKS, MAX_STACK_WINDOW, MAX_UNWIND_RULES, Mark,
    Mode, RING_BYTES, STACK_ATTEMPTS, Slot, StackEvent, UnwindStep, fault, inject_stat, kind, stat, unwind_key,
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
        bpf_probe_write_user,
        generated::{bpf_get_attach_cookie, bpf_send_signal, bpf_send_signal_thread},
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
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
            Some(frames) => {
                bump(stat::CHAINS);
                ev.hdr.kind = kind::CALL_CHAIN;
                ev.hdr.stack_len = (frames * 8) as u32;
                output(ev, HEADER_LEN + frames * 8);
                return;
            }
            None => bump(stat::CHAIN_MISSES),
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
/// window (a copy succeeds exactly when every page it touches is readable).
#[inline(always)]
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
#[inline(always)]
fn walk(ev: &mut StackEvent, window: usize) -> Option<usize> {
    let sp0 = ev.hdr.sp;
    let len = readable_window(sp0, window);
    if len == 0 {
        return None;
    }
    let end = sp0 + len as u64;
    let tgid = ev.hdr.pid;
    let (mut sp, mut bp, mut key) = (sp0, ev.hdr.bp, ev.hdr.ip);
    // A read the copy would not have covered ends the chain there, as it ends the unwinder.
    let in_copy = |a: Option<u64>| a.filter(|a| *a >= sp0 && a.wrapping_add(8) <= end);
    for n in 0..MAX_CHAIN {
        let step = UnwindStep::decode(*unsafe { UNWIND.get(&unwind_key(tgid, key)) }?);
        let UnwindStep::Rule { cfa_from_rbp, cfa_offset, ra_offset, rbp_offset } = step else {
            return Some(n);
        };
        let base = if cfa_from_rbp { bp } else { sp };
        let Some(cfa) = base.checked_add_signed(cfa_offset as i64) else {
            return Some(n);
        };
        let Some(ra_at) = in_copy(cfa.checked_add_signed(ra_offset as i64)) else {
            return Some(n);
        };
        let ra = unsafe { bpf_probe_read_user(ra_at as *const u64) }.ok()?;
        if let Some(o) = rbp_offset {
            let Some(at) = in_copy(cfa.checked_add_signed(o as i64)) else {
                return Some(n);
            };
            bp = unsafe { bpf_probe_read_user(at as *const u64) }.ok()?;
        }
        if ra == 0 || (cfa <= sp && n > 0) {
            return Some(n);
        }
        sp = cfa;
        let at = n * 8;
        if at + 8 > ev.stack.len() {
            return None;
        }
        unsafe { core::ptr::write_unaligned(ev.stack.as_mut_ptr().add(at).cast::<u64>(), ra) };
        key = ra;
    }
    None
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
