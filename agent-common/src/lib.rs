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

/// Ring buffer size in bytes (a power-of-two multiple of the page size).
pub const RING_BYTES: u32 = 16 << 20;

/// What the probe of a function does, stored per function id in the `MODES` array map.
///
/// Keeping the mode in a map (instead of in the attach cookie) lets a plan change a function
/// from "event" to "callstack" or switch it off without touching its uprobe link.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Probe attached but silent (function left the plan; link not yet released).
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

/// Kind of a ring buffer record.
pub mod kind {
    /// A call without a stack.
    pub const CALL: u32 = 1;
    /// A call followed by `stack_len` bytes of user stack starting at `sp`.
    pub const CALL_STACK: u32 = 2;
}

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
    fn mode_roundtrip() {
        for m in [Mode::Off, Mode::Event, Mode::CallStack, Mode::Count] {
            assert_eq!(Mode::from_u32(m as u32), m);
        }
        assert_eq!(Mode::from_u32(99), Mode::Off);
    }
}
