//! Types shared by `agent-ebpf` (kernel side) and `agent` (userspace).
//!
//! Everything here is `#[repr(C)]` plain data: the eBPF program writes these records into a ring
//! buffer and the agent reads them back byte for byte. Keep the layouts in sync by changing them
//! only here.
#![no_std]

/// Largest function id the eBPF maps can hold (size of the `MODES` and `COUNTS` arrays).
pub const MAX_FUNCS: u32 = 1 << 16;

/// Largest user-stack window, in bytes, a call-stack event can carry. The window actually copied
/// is chosen at load time (global `STACK_WINDOW`), up to this size.
pub const MAX_STACK_WINDOW: usize = 16 * 1024;

/// Default user-stack window copied for call-stack events.
pub const DEFAULT_STACK_WINDOW: u32 = 8 * 1024;

/// Default ring buffer size in bytes (a power-of-two multiple of the page size; the agent sets
/// the real size at load time, `--ring-mib`).
pub const RING_BYTES: u32 = 16 << 20;

/// What the probe of a function does, stored per function id in the `MODES` array map.
///
/// Keeping the mode in a map (instead of in the attach cookie) lets a plan change a function
/// from "event" to "callstack" or switch it off without touching its uprobe link.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Silent (function not in the plan).
    Off = 0,
    /// One [`EventHeader`] per call: (function, caller).
    Event = 1,
    /// One [`EventHeader`] plus a copy of the user stack per call (AFETM's `callstack` attribute).
    CallStack = 2,
    /// Count calls in a per-CPU counter; no events (used to weigh functions, AFETM eq. 8's `w_j`).
    Count = 3,
}

impl Mode {
    /// Decodes a map value; unknown values read as [`Mode::Off`].
    pub const fn from_u32(v: u32) -> Mode {
        match v {
            1 => Mode::Event,
            2 => Mode::CallStack,
            3 => Mode::Count,
            _ => Mode::Off,
        }
    }
}

/// Link generations are 24-bit; 0 means "none".
pub const MAX_GENERATION: u32 = (1 << 24) - 1;

/// Generation of throwaway links (used to find functions the kernel cannot probe): never the
/// owner of a function, so their probes record nothing.
pub const PROBE_GENERATION: u32 = MAX_GENERATION;

/// The attach cookie of a function's probe in the link of generation `gen`.
pub const fn cookie(fn_id: u32, generation: u32) -> u64 {
    ((generation as u64) << 32) | fn_id as u64
}

/// A function's entry in the `MODES` map: its mode and which uprobe link may record it.
///
/// Each uprobe_multi link has a generation (in the attach cookie). Only the probe of the
/// owner link records; probes of other links on the same function are silent. When a link is
/// rebuilt (its surviving functions move to a new link so the ones that left can be detached),
/// the function is handed over without losing or duplicating a call:
/// 1. the new link is attached while `owner` is the old one (new probes silent);
/// 2. `incoming` is set to the new link: its probe records and leaves a per-thread mark
///    (ip, sp, generation); the old probe skips a call so marked. The kernel runs the newest
///    consumer of a probed address first (kernel/events/uprobes.c adds consumers at the list
///    head), so within one hit the mark is always written before the old probe looks;
/// 3. the old link is detached, then `owner` becomes the new link and `incoming` is cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub mode: Mode,
    pub owner: u32,
    pub incoming: u32,
}

impl Slot {
    pub const OFF: Slot = Slot { mode: Mode::Off, owner: 0, incoming: 0 };

    pub const fn encode(self) -> u64 {
        (self.mode as u64)
            | (((self.owner & MAX_GENERATION) as u64) << 8)
            | (((self.incoming & MAX_GENERATION) as u64) << 32)
    }

    pub const fn decode(v: u64) -> Slot {
        Slot {
            mode: Mode::from_u32((v & 0xff) as u32),
            owner: ((v >> 8) as u32) & MAX_GENERATION,
            incoming: ((v >> 32) as u32) & MAX_GENERATION,
        }
    }
}

/// A per-thread handover mark (see [`Slot`]): the incoming link recorded the call at `ip` with
/// stack pointer `sp`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub ip: u64,
    pub sp: u64,
    pub generation: u32,
    pub _pad: u32,
}

/// Threads that can be in a handover at once (LRU map of marks).
pub const MAX_MARKS: u32 = 16384;

/// Fault injection (AFETM sec. III.C.1): what the injector's probes do to each call of the
/// target function, from injection on (permanent faults). Kept in the one-entry `INJECT` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectSpec {
    /// One of [`fault`].
    pub kind: u32,
    /// Only this process (thread group id) is touched.
    pub tgid: u32,
    /// IP+N: bytes to move the instruction pointer by. Input corruption: the parameter index
    /// (0..6 are rdi, rsi, rdx, rcx, r8, r9; 6.. the stack slots after the return address).
    pub arg: u32,
    /// Input/output corruption: the bit to flip (0..64).
    pub bit: u32,
}

impl InjectSpec {
    /// The map value as the kernel sees it (the `repr(C)` layout, four u32 words).
    pub const fn words(&self) -> [u32; 4] {
        [self.kind, self.tgid, self.arg, self.bit]
    }
}

/// Fault kinds of [`InjectSpec`].
pub mod fault {
    /// At entry: SIGKILL (process crash).
    pub const CRASH: u32 = 1;
    /// At entry: SIGSTOP (the process hangs, as in a deadlock).
    pub const DEADLOCK: u32 = 2;
    /// At entry: instruction pointer + N.
    pub const IP_PLUS_N: u32 = 3;
    /// At entry: one bit of one integer parameter flipped.
    pub const INPUT: u32 = 4;
    /// At return: one bit of the integer return value (rax) flipped.
    pub const OUTPUT: u32 = 5;
    /// At entry or return: SIGTRAP to the calling thread, which the injector traces with
    /// ptrace and whose registers it changes in the signal-delivery stop (kernels whose
    /// uprobe programs cannot write registers).
    pub const TRAP: u32 = 6;
}

/// Index of each counter in the injector's `INJECT_STATS` array.
pub mod inject_stat {
    /// Calls the fault was applied to.
    pub const APPLIED: u32 = 0;
    /// Calls where applying it failed (signal or user-memory write refused).
    pub const FAILED: u32 = 1;
    pub const LEN: u32 = 2;
}

/// Kind of a ring buffer record.
pub mod kind {
    /// A call without a stack.
    pub const CALL: u32 = 1;
    /// A call followed by `stack_len` bytes of user stack starting at `sp`.
    pub const CALL_STACK: u32 = 2;
    /// A call followed by `stack_len / 8` return addresses (u64, innermost caller first) that
    /// the kernel unwound with the rules learnt in the `UNWIND` map (see [`UnwindStep`](crate::UnwindStep)).
    pub const CALL_CHAIN: u32 = 3;
    /// A [`FateRecord`](crate::FateRecord): a traced thread exited or stopped.
    pub const FATE: u32 = 4;
    /// Where a traced thread was when the kernel delivered it a fatal or stop signal
    /// (SIGKILL, SIGSEGV, SIGSTOP, ...): an [`EventHeader`](crate::EventHeader) with `fn_id` the
    /// signal, ip/sp/bp the thread's user registers at that moment (the instruction it would
    /// have run next), `ret_addr` 0, followed by `stack_len` bytes of user stack from `sp`.
    /// The fate that follows (its exit, its stop) is where the agent attaches the unwound stack.
    pub const FATE_STACK: u32 = 5;
}

/// Processes whose threads' fates the kernel reports (the `TRACED` map, filled by the agent
/// with each process it sees calls from).
pub const MAX_TRACED_PROCS: u32 = 4096;

/// What happened to a thread, in a [`FateRecord`].
pub mod fate {
    /// The thread left `do_exit`: `code` is the kernel's exit code (a wait status: the exit
    /// status in bits 8..16, or the killing signal in bits 0..7, 0x80 when it dumped core).
    pub const EXIT: u32 = 1;
    /// The thread took a stop signal with its default action: `code` is the signal.
    pub const STOP: u32 = 2;
    /// The thread took a fatal signal a fault raises (SIGSEGV, SIGABRT, ...) with its default
    /// action: the process dies of a fault in this thread. `code` is the signal.
    pub const FAULT_SIGNAL: u32 = 3;
    /// The thread took a fault's signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) into a
    /// handler of its own: the fault is in this thread, and the calls that follow are the
    /// handler's (a crash reporter's), not the ones that faulted. `code` is the signal.
    pub const FAULT_HANDLED: u32 = 4;
}

/// How a traced thread ended or stopped, seen by the kernel (`do_exit`, a stop signal's
/// delivery): the crash and hang half of what a fault does, which the thread's calls alone
/// only show as a tree cut short.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FateRecord {
    /// Always [`kind::FATE`] (records are told apart by their first word).
    pub kind: u32,
    /// One of [`fate`].
    pub fate: u32,
    pub pid: u32,
    pub tid: u32,
    /// CLOCK_MONOTONIC nanoseconds, the clock of the call events.
    pub ts_ns: u64,
    pub code: i64,
}

/// Size in bytes of [`FateRecord`].
pub const FATE_LEN: usize = core::mem::size_of::<FateRecord>();

impl FateRecord {
    /// Reads a fate record; `None` when the record is short or of another kind.
    pub fn read(bytes: &[u8]) -> Option<FateRecord> {
        if bytes.len() < FATE_LEN {
            return None;
        }
        // SAFETY: length checked above; FateRecord is plain old data, read unaligned.
        let r = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<FateRecord>()) };
        (r.kind == kind::FATE).then_some(r)
    }
}

/// The kind of a ring buffer record (its first word), `None` when it is shorter than a word.
pub fn record_kind(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// Most return addresses the kernel unwinds for one [`kind::CALL_CHAIN`] event; a longer
/// chain falls back to the stack copy.
pub const MAX_CHAIN: usize = 64;

/// Entries of the `UNWIND` map (an LRU map: an evicted rule only costs one stack copy).
pub const MAX_UNWIND_RULES: u32 = 1 << 16;

/// Key of the `UNWIND` map: (process, runtime address). The address is the probe address for
/// the traced function's own frame and a return address for the frames above it; keyed per
/// process because the same address means different code in different address spaces.
pub const fn unwind_key(tgid: u32, addr: u64) -> [u64; 2] {
    [tgid as u64, addr]
}

/// What the kernel does at one address while walking a call chain: the userspace unwinder's
/// step there, learnt from the module's `.eh_frame` on an earlier stack copy (the first call
/// through a new path is always a stack copy). Only steps that depend on the address alone are
/// learnt; a frame the userspace unwinder handles by a register-dependent guess is never in the
/// map, so the kernel falls back to a stack copy there and the two paths give the same chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwindStep {
    /// Stop after this address: the end of the chain the reader would keep (the frame lies
    /// outside the traced module, or the unwinder stops here).
    End,
    /// CFA = (rbp if `cfa_from_rbp` else the frame's sp) + `cfa_offset`; the return address is
    /// at CFA + `ra_offset`; the caller's rbp at CFA + `rbp_offset` (None: rbp unchanged).
    Rule { cfa_from_rbp: bool, cfa_offset: i32, ra_offset: i32, rbp_offset: Option<i32> },
}

impl UnwindStep {
    const END: i32 = 1;
    const FROM_RBP: i32 = 2;
    const HAS_RBP: i32 = 4;

    /// The map value: `[flags, cfa_offset, ra_offset, rbp_offset]`.
    pub const fn encode(self) -> [i32; 4] {
        match self {
            UnwindStep::End => [Self::END, 0, 0, 0],
            UnwindStep::Rule { cfa_from_rbp, cfa_offset, ra_offset, rbp_offset } => {
                let mut flags = 0;
                if cfa_from_rbp {
                    flags |= Self::FROM_RBP;
                }
                let rbp = match rbp_offset {
                    Some(o) => {
                        flags |= Self::HAS_RBP;
                        o
                    }
                    None => 0,
                };
                [flags, cfa_offset, ra_offset, rbp]
            }
        }
    }

    pub const fn decode(v: [i32; 4]) -> UnwindStep {
        if v[0] & Self::END != 0 {
            return UnwindStep::End;
        }
        UnwindStep::Rule {
            cfa_from_rbp: v[0] & Self::FROM_RBP != 0,
            cfa_offset: v[1],
            ra_offset: v[2],
            rbp_offset: if v[0] & Self::HAS_RBP != 0 { Some(v[3]) } else { None },
        }
    }
}

/// The stack-copy sizes the eBPF program tries, largest first (each a constant the verifier
/// can check): the configured window, or the largest of these below it that is readable.
pub const STACK_ATTEMPTS: [usize; 7] = [16384, 8192, 4096, 2048, 1024, 512, 256];

/// Header of every ring buffer record.
///
/// `ret_addr` is the word at the stack pointer when the probe fires. Probes are only ever placed
/// where nothing before them in the function changed the stack pointer, so it is the return
/// address, i.e. the caller. `ip`, `sp` and `bp` are the registers at the probe: the userspace
/// unwinder starts from them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub fn_id: u32,
    pub pid: u32,
    pub tid: u32,
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    pub ret_addr: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of stack that follow the header (0 for [`kind::CALL`]).
    pub stack_len: u32,
    pub _pad: u32,
}

/// Size in bytes of [`EventHeader`].
pub const HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

impl EventHeader {
    /// Reads a header from the start of a ring buffer record; `None` when the record is short.
    pub fn read(bytes: &[u8]) -> Option<EventHeader> {
        if bytes.len() < HEADER_LEN {
            return None;
        }
        // SAFETY: length checked above; EventHeader is plain old data, read unaligned.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<EventHeader>()) })
    }
}

/// Per-CPU scratch record used to build call-stack events before copying them to the ring.
#[repr(C)]
pub struct StackEvent {
    pub hdr: EventHeader,
    pub stack: [u8; MAX_STACK_WINDOW],
}

/// Index of each counter in the per-CPU `STATS` array.
pub mod stat {
    /// Records the ring buffer had no room for.
    pub const DROPPED: u32 = 0;
    /// Call-stack events whose stack could not be read at all (sent without stack).
    pub const STACK_UNREADABLE: u32 = 1;
    /// Call-stack events the kernel unwound itself ([`kind::CALL_CHAIN`](crate::kind::CALL_CHAIN)).
    pub const CHAINS: u32 = 2;
    /// Call-stack events sent as a stack copy because a step of their chain was not learnt yet.
    pub const CHAIN_MISSES: u32 = 3;
    /// Number of counters.
    pub const LEN: u32 = 4;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_stable() {
        assert_eq!(HEADER_LEN, 64);
        let h = EventHeader { kind: 2, fn_id: 7, stack_len: 9, ..Default::default() };
        let bytes: [u8; HEADER_LEN] = unsafe { core::mem::transmute(h) };
        assert_eq!(EventHeader::read(&bytes), Some(h));
        assert_eq!(EventHeader::read(&bytes[..10]), None);
    }

    #[test]
    fn fate_layout_is_stable() {
        assert_eq!(FATE_LEN, 32);
        let f = FateRecord { kind: kind::FATE, fate: fate::EXIT, pid: 3, tid: 4, ts_ns: 5, code: 11 };
        let bytes: [u8; FATE_LEN] = unsafe { core::mem::transmute(f) };
        assert_eq!(record_kind(&bytes), Some(kind::FATE));
        assert_eq!(FateRecord::read(&bytes), Some(f));
        assert_eq!(FateRecord::read(&bytes[..8]), None);
        let call: [u8; HEADER_LEN] =
            unsafe { core::mem::transmute(EventHeader { kind: kind::CALL, ..Default::default() }) };
        assert_eq!(FateRecord::read(&call), None, "a call record is not a fate");
    }

    #[test]
    fn slot_and_cookie_encoding() {
        for s in [
            Slot::OFF,
            Slot { mode: Mode::CallStack, owner: 1, incoming: 0 },
            Slot { mode: Mode::Count, owner: MAX_GENERATION - 1, incoming: MAX_GENERATION },
        ] {
            assert_eq!(Slot::decode(s.encode()), s);
        }
        assert_eq!(cookie(7, 3) as u32, 7);
        assert_eq!((cookie(7, 3) >> 32) as u32, 3);
    }

    #[test]
    fn inject_spec_words_match_layout() {
        let s = InjectSpec { kind: 1, tgid: 2, arg: 3, bit: 4 };
        let bytes: [u32; 4] = unsafe { core::mem::transmute(s) };
        assert_eq!(bytes, s.words());
    }

    #[test]
    fn unwind_step_roundtrip() {
        for s in [
            UnwindStep::End,
            UnwindStep::Rule { cfa_from_rbp: false, cfa_offset: 8, ra_offset: -8, rbp_offset: None },
            UnwindStep::Rule { cfa_from_rbp: true, cfa_offset: 16, ra_offset: -8, rbp_offset: Some(-16) },
            UnwindStep::Rule { cfa_from_rbp: false, cfa_offset: i32::MAX, ra_offset: i32::MIN, rbp_offset: Some(0) },
        ] {
            assert_eq!(UnwindStep::decode(s.encode()), s);
        }
    }

    #[test]
    fn mode_roundtrip() {
        for m in [Mode::Off, Mode::Event, Mode::CallStack, Mode::Count] {
            assert_eq!(Mode::from_u32(m as u32), m);
        }
        assert_eq!(Mode::from_u32(99), Mode::Off);
    }
}
