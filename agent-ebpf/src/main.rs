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
    EventHeader, HEADER_LEN, MAX_FUNCS, MAX_MARKS, MAX_STACK_WINDOW, Mark, Mode, RING_BYTES, Slot, StackEvent, kind,
    stat,
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::ProbeContext,
};

/// Bytes of user stack to copy for call-stack events; set by the loader, at most
/// [`MAX_STACK_WINDOW`].
#[unsafe(no_mangle)]
static STACK_WINDOW: u32 = agent_common::DEFAULT_STACK_WINDOW;

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

#[inline(always)]
fn emit_stack(ctx: &ProbeContext, fn_id: u32) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut *ev };
    fill(ctx, fn_id, &mut ev.hdr, kind::CALL_STACK);
    let window = unsafe { core::ptr::read_volatile(&STACK_WINDOW) } as usize;
    let sp = ev.hdr.sp as *const u8;
    // The window may run past the top of the stack mapping (shallow frames of the main thread):
    // try the configured size, then halve, each a constant size the verifier can check.
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
    if len == 0 {
        bump(stat::STACK_UNREADABLE);
    }
    ev.hdr.stack_len = len as u32;
    let total = HEADER_LEN + len;
    if total > core::mem::size_of::<StackEvent>() {
        return;
    }
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const StackEvent).cast::<u8>(), total) };
    if EVENTS.output(bytes, BPF_RB_NO_WAKEUP as u64).is_err() {
        bump(stat::DROPPED);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
