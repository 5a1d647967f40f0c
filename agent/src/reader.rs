//! The ring buffer reader: turns raw records into AFETM trace elements (function, caller,
//! callstack), batches them for the analyzer, reports calls counted in count-only mode, process
//! exits and kernel-side drops.
//!
//! Records are submitted without wakeups, so the reader polls on a short timer. Callers are
//! resolved from the return address through `/proc/<pid>/maps` and the module's functions;
//! stacks are unwound from the copied window and kept up to and including the first frame
//! outside the traced module (where a full trace of the module would see its root).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use afetm_proto as pb;
use agent_common::{EventHeader, FateRecord, HEADER_LEN, Mode, UnwindStep, fate, kind, record_kind, stat};

use crate::{
    governor::{Action, Governor},
    lastcalls::{self, LastCalls},
    logtail::LogQueue,
    procmaps::{Mapping, ProcMaps},
    symbols::Module,
    tracer::{FnTable, ReaderMaps},
    transport::Outbox,
    unwind::{StackSnapshot, kernel_step, unwind},
};

#[derive(Clone, Debug)]
pub struct ReaderConfig {
    /// How often the ring buffer is drained.
    pub poll: Duration,
    /// Longest time an event waits in a batch.
    pub flush: Duration,
    /// An empty batch carries the agent clock at least this often (closes windows on time).
    pub heartbeat: Duration,
    pub max_batch_events: usize,
    pub max_frames: usize,
    /// Count-only functions are reported this often.
    pub count_interval: Duration,
    /// Traced processes are checked for exit this often; an exit closes the process's windows
    /// in the analyzer (the campaign ends each run by killing the target, so this bounds how
    /// long a run waits for its trees).
    pub exit_check: Duration,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            poll: Duration::from_millis(5),
            flush: Duration::from_millis(100),
            heartbeat: Duration::from_millis(500),
            max_batch_events: 16_384,
            max_frames: 128,
            count_interval: Duration::from_secs(1),
            exit_check: Duration::from_millis(50),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Agent-side names for functions, sent to the analyzer as `Symbol`s.
#[derive(Default)]
struct Interner {
    ids: HashMap<(Arc<str>, Arc<str>), u32>,
    defs: Vec<(Arc<str>, Arc<str>)>,
}

impl Interner {
    fn id(&mut self, module: &str, name: &str) -> u32 {
        let key: (Arc<str>, Arc<str>) = (module.into(), name.into());
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        self.defs.push(key.clone());
        let id = self.defs.len() as u32;
        self.ids.insert(key, id);
        id
    }

    fn def(&self, id: u32) -> Option<pb::Symbol> {
        let (m, n) = self.defs.get(id.checked_sub(1)? as usize)?;
        Some(pb::Symbol { id, module: m.to_string(), name: n.to_string() })
    }
}

struct Proc {
    maps: ProcMaps,
    refreshed: Instant,
    /// lookup address -> (symbol, in the traced module)
    syms: HashMap<u64, (u32, bool)>,
}

const SYM_CACHE_LIMIT: usize = 1 << 16;
/// Log lines per batch, at most.
const MAX_BATCH_LOGS: usize = 10_000;

/// Counters the reader keeps for its final report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    pub events: u64,
    /// Thread fates (exits, stops) reported.
    pub fates: u64,
    /// Log lines sent (`--log`).
    pub log_lines: u64,
    pub stack_events: u64,
    pub malformed: u64,
    pub unknown_fn: u64,
    pub kernel_drops: u64,
    pub unwinder_disagreed: u64,
    pub batches: u64,
    /// Call-stack events the kernel unwound itself (no stack copy).
    pub kernel_unwound: u64,
    /// Return addresses in those events.
    pub chain_frames: u64,
    /// Unwind steps handed to the kernel.
    pub unwind_steps_learnt: u64,
    /// Overload control: mode steps down and back up (`crate::governor`).
    pub demotions: u64,
    pub restorations: u64,
    /// Where the reader thread's time went (wall ms, summed): reading the ring and turning
    /// records into events (symbolization included), of which unwinding stack copies; cutting
    /// batches; and the thread's CPU time in all.
    pub drain_ms: u64,
    pub unwind_ms: u64,
    pub cut_ms: u64,
    pub thread_cpu_ms: u64,
}

/// CPU time of the calling thread, ms.
fn thread_cpu_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

pub struct Reader {
    maps: ReaderMaps,
    table: FnTable,
    target: Arc<Module>,
    target_module: String,
    /// pid -> load bias of the traced module, learnt from probe addresses.
    biases: HashMap<u32, u64>,
    fn_probe: HashMap<u32, u64>,
    outbox: Arc<Outbox>,
    cfg: ReaderConfig,
    syms: Interner,
    procs: HashMap<u32, Proc>,
    modules: HashMap<Arc<str>, Option<Arc<Module>>>,
    fn_syms: HashMap<u32, u32>,
    events: Vec<pb::CallEvent>,
    counts: Vec<pb::CallCount>,
    exits: Vec<pb::ProcessExit>,
    fates: Vec<pb::ThreadFate>,
    /// Threads that took a fault's signal (`agent_common::fate::FAULT_SIGNAL`,
    /// `FAULT_HANDLED`) and have not exited yet, with their last calls when they took it.
    faulted: HashMap<u32, Vec<u32>>,
    /// Each thread's last calls (symbol ids), for `faulted`.
    last_calls: LastCalls,
    /// Where each thread that took a fatal or stop signal was then (symbol ids, innermost
    /// first; `kind::FATE_STACK`), until its fate takes it. A thread's first such signal wins
    /// (a crash handler's re-raise comes after the fault).
    fate_stacks: HashMap<u32, Vec<u32>>,
    live: HashSet<u32>,
    counts_prev: HashMap<u32, u64>,
    /// Functions out of count mode whose counts were read after they left it.
    drained: HashSet<u32>,
    /// Addresses whose unwind step is in the kernel's map, per process.
    learnt: HashMap<u32, HashSet<u64>>,
    learnt_total: usize,
    /// Overload control, when the agent runs it: the policy and where its actions go.
    governor: Option<(Governor, std::sync::mpsc::Sender<Action>)>,
    /// Log lines tailed beside the traces (`--log`), sent in the same batches.
    logs: Option<Arc<LogQueue>>,
    stats: ReaderStats,
    /// What the metrics have seen of `stats` (they get the difference at each batch).
    published: ReaderStats,
    drain_ns: u128,
    unwind_ns: u128,
    cut_ns: u128,
}

impl Reader {
    pub fn new(
        maps: ReaderMaps,
        table: FnTable,
        target: Arc<Module>,
        outbox: Arc<Outbox>,
        cfg: ReaderConfig,
    ) -> Reader {
        let target_module = target.name.clone();
        Reader {
            maps,
            table,
            target,
            target_module,
            biases: HashMap::new(),
            fn_probe: HashMap::new(),
            outbox,
            cfg,
            syms: Interner::default(),
            procs: HashMap::new(),
            modules: HashMap::new(),
            fn_syms: HashMap::new(),
            events: Vec::new(),
            counts: Vec::new(),
            exits: Vec::new(),
            fates: Vec::new(),
            faulted: HashMap::new(),
            last_calls: LastCalls::default(),
            fate_stacks: HashMap::new(),
            live: HashSet::new(),
            counts_prev: HashMap::new(),
            drained: HashSet::new(),
            learnt: HashMap::new(),
            learnt_total: 0,
            governor: None,
            logs: None,
            stats: ReaderStats::default(),
            published: ReaderStats::default(),
            drain_ns: 0,
            unwind_ns: 0,
            cut_ns: 0,
        }
    }

    /// Turns overload control on: the reader feeds `governor` and sends its actions to `to`.
    pub fn with_governor(mut self, governor: Governor, to: std::sync::mpsc::Sender<Action>) -> Reader {
        self.governor = Some((governor, to));
        self
    }

    /// Sends the lines of `queue` in its batches.
    pub fn with_logs(mut self, queue: Arc<LogQueue>) -> Reader {
        self.logs = Some(queue);
        self
    }

    /// Runs until `stop` is set, then drains, reports exits and flushes.
    pub fn run(mut self, stop: Arc<AtomicBool>) -> ReaderStats {
        let mut last_flush = Instant::now();
        let mut last_push = Instant::now();
        let mut last_exit_check = Instant::now();
        let mut last_counts = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            self.drain();
            if stopping || last_exit_check.elapsed() >= self.cfg.exit_check {
                if self.check_exits() {
                    // What the exited processes wrote before they died goes out before their
                    // exits: the analyzer closes their windows on the exit.
                    self.drain();
                }
                last_exit_check = Instant::now();
            }
            if stopping || last_counts.elapsed() >= self.cfg.count_interval {
                self.read_counts(last_counts.elapsed());
                last_counts = Instant::now();
            }
            let due = last_flush.elapsed() >= self.cfg.flush;
            let has_data = !self.events.is_empty()
                || !self.counts.is_empty()
                || !self.exits.is_empty()
                || !self.fates.is_empty()
                || self.logs.as_ref().is_some_and(|q| q.pending() > 0);
            if stopping || (due && has_data) || last_push.elapsed() >= self.cfg.heartbeat {
                self.cut(stopping);
                last_push = Instant::now();
            }
            if due {
                last_flush = Instant::now();
            }
            if stopping {
                break;
            }
            std::thread::sleep(self.cfg.poll);
        }
        self.stats.drain_ms = (self.drain_ns / 1_000_000) as u64;
        self.stats.unwind_ms = (self.unwind_ns / 1_000_000) as u64;
        self.stats.cut_ms = (self.cut_ns / 1_000_000) as u64;
        self.stats.thread_cpu_ms = thread_cpu_ms();
        self.stats
    }

    fn drain(&mut self) {
        let started = Instant::now();
        self.drain_inner();
        self.drain_ns += started.elapsed().as_nanos();
    }

    fn drain_inner(&mut self) {
        let mut n = 0usize;
        let mut bytes: Vec<u8> = Vec::with_capacity(agent_common::MAX_STACK_WINDOW + HEADER_LEN);
        loop {
            match self.maps.events.next() {
                Some(item) => {
                    bytes.clear();
                    bytes.extend_from_slice(&item);
                }
                None => break,
            }
            self.handle(&bytes);
            n += 1;
            if self.events.len() >= self.cfg.max_batch_events {
                self.cut(false);
            }
            if n >= 1 << 20 {
                break; // let the timers run under a flood
            }
        }
    }

    fn fn_symbol(&mut self, fn_id: u32) -> Option<u32> {
        if let Some(s) = self.fn_syms.get(&fn_id) {
            return Some(*s);
        }
        let entry = self.table.read().unwrap_or_else(|p| p.into_inner()).get(fn_id as usize).cloned().flatten()?;
        let s = self.syms.id(&entry.module, &entry.name);
        self.fn_syms.insert(fn_id, s);
        self.fn_probe.insert(fn_id, entry.probe_vaddr);
        Some(s)
    }

    fn module_for(&mut self, pid: u32, m: &Mapping) -> Option<Arc<Module>> {
        if let Some(found) = self.modules.get(&m.path) {
            return found.clone();
        }
        let name = PathBuf::from(&*m.path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Through the process's root (its mount namespace) while it lives; a process already
        // gone (a fate's stack is read after the kill) has none: then the path as this host sees it.
        let loaded = match Module::load_as(&m.open_path(pid), name.clone())
            .or_else(|_| Module::load_as(std::path::Path::new(&*m.path), name))
        {
            Ok(mut module) => {
                module.path = PathBuf::from(&*m.path);
                Some(Arc::new(module))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read module; its frames stay unnamed");
                None
            }
        };
        self.modules.insert(m.path.clone(), loaded.clone());
        loaded
    }

    fn proc(&mut self, pid: u32) -> Option<&mut Proc> {
        if let std::collections::hash_map::Entry::Vacant(e) = self.procs.entry(pid) {
            let maps = ProcMaps::read(pid).ok()?;
            e.insert(Proc { maps, refreshed: Instant::now(), syms: HashMap::new() });
        }
        self.procs.get_mut(&pid)
    }

    /// Module and module virtual address of a runtime address in `pid`. Addresses in the traced
    /// module resolve through the load bias, without `/proc` (the process may be gone already);
    /// others through `/proc/<pid>/maps`.
    fn locate(&mut self, pid: u32, addr: u64) -> Option<(Arc<Module>, u64)> {
        if let Some(bias) = self.biases.get(&pid) {
            let vaddr = addr.wrapping_sub(*bias);
            if self.target.function_at(vaddr).is_some() {
                return Some((self.target.clone(), vaddr));
            }
        }
        let proc = self.proc(pid)?;
        let mapping = match proc.maps.find(addr) {
            Some(m) => m.clone(),
            None => {
                // New mappings (dlopen) show up on a re-read, at most every 100 ms.
                if proc.refreshed.elapsed() < Duration::from_millis(100) {
                    return None;
                }
                proc.maps = ProcMaps::read(pid).ok()?;
                proc.refreshed = Instant::now();
                proc.maps.find(addr)?.clone()
            }
        };
        if !mapping.is_file() {
            return None;
        }
        let module = self.module_for(pid, &mapping)?;
        let vaddr = module.offset_to_vaddr(addr - mapping.start + mapping.offset)?;
        Some((module, vaddr))
    }

    /// Symbol of the function containing `addr` in `pid` (0 when unknown), and whether it lies
    /// in the traced module.
    fn symbol_at(&mut self, pid: u32, addr: u64) -> (u32, bool) {
        if let Some(hit) = self.procs.get(&pid).and_then(|p| p.syms.get(&addr)) {
            return *hit;
        }
        let found = match self.locate(pid, addr) {
            Some((module, vaddr)) => {
                let in_target = module.name == self.target_module;
                let id = match module.function_at(vaddr) {
                    Some(f) => self.syms.id(&module.name, &f.name),
                    None => self.syms.id(&module.name, &format!("{}+0x{vaddr:x}", module.name)),
                };
                (id, in_target)
            }
            None => (0, false),
        };
        if let Some(p) = self.procs.get_mut(&pid) {
            if p.syms.len() >= SYM_CACHE_LIMIT {
                p.syms.clear();
            }
            p.syms.insert(addr, found);
        }
        found
    }

    fn handle(&mut self, bytes: &[u8]) {
        match record_kind(bytes) {
            Some(kind::FATE) => return self.handle_fate(bytes),
            Some(kind::FATE_STACK) => return self.handle_fate_stack(bytes),
            _ => {}
        }
        let Some(h) = EventHeader::read(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let Some(function) = self.fn_symbol(h.fn_id) else {
            self.stats.unknown_fn += 1;
            return;
        };
        if let Some(probe) = self.fn_probe.get(&h.fn_id) {
            self.biases.entry(h.pid).or_insert(h.ip.wrapping_sub(*probe));
        }
        if !self.procs.contains_key(&h.pid) {
            let _ = self.proc(h.pid); // snapshot the maps as early as possible
        }
        let caller = if h.ret_addr > 0 { self.symbol_at(h.pid, h.ret_addr - 1).0 } else { 0 };
        let mut callstack = Vec::new();
        if h.kind == kind::CALL_STACK || h.kind == kind::CALL_CHAIN {
            self.stats.stack_events += 1;
            let end = HEADER_LEN.saturating_add(h.stack_len as usize);
            match bytes.get(HEADER_LEN..end) {
                Some(data) if h.kind == kind::CALL_CHAIN => {
                    self.stats.kernel_unwound += 1;
                    self.stats.chain_frames += (data.len() / 8) as u64;
                    let addrs: Vec<u64> = data
                        .chunks_exact(8)
                        .take(self.cfg.max_frames)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect();
                    callstack = self.keep_frames(h.pid, &addrs, &mut Vec::new());
                }
                Some(stack) if !stack.is_empty() => {
                    let snap = StackSnapshot::new(&h, stack);
                    let pid = h.pid;
                    let mut steps = Vec::new();
                    let started = Instant::now();
                    let addrs = unwind(
                        &snap,
                        self.cfg.max_frames,
                        |a| self.locate(pid, a),
                        |key, rule| {
                            if let Some(step) = kernel_step(&rule) {
                                steps.push((key, step));
                            }
                        },
                    );
                    self.unwind_ns += started.elapsed().as_nanos();
                    callstack = self.keep_frames(pid, &addrs, &mut steps);
                    self.learn(pid, steps);
                }
                _ => self.stats.malformed += (end > bytes.len()) as u64,
            }
            if caller != 0 && !callstack.is_empty() && callstack.first() != Some(&caller) {
                self.stats.unwinder_disagreed += 1;
                callstack.clear();
            }
            // Unknown frames carry no information the analyzer can use.
            callstack.retain(|s| *s != 0);
        }
        if let Some((g, _)) = &mut self.governor {
            g.record(h.fn_id);
        }
        if self.live.insert(h.pid)
            && let Some(traced) = &mut self.maps.traced
            && let Err(e) = traced.insert(&h.pid, &1, 0)
        {
            tracing::warn!(pid = h.pid, error = %e, "the kernel will not report this process's thread fates");
        }
        self.stats.events += 1;
        self.last_calls.push(h.tid, function);
        self.events.push(pb::CallEvent { pid: h.pid, tid: h.tid, ts_ns: h.ts_ns, function, caller, callstack });
    }

    /// A thread of a traced process exited or stopped (`agent_common::FateRecord`).
    fn handle_fate(&mut self, bytes: &[u8]) {
        let Some(r) = FateRecord::read(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let (kind, code) = match r.fate {
            // The exit code is a wait status: a signal in the low 7 bits, else the status.
            fate::EXIT if r.code & 0x7f != 0 => (pb::FateKind::Killed, (r.code & 0x7f) as i32),
            fate::EXIT => (pb::FateKind::Exited, ((r.code >> 8) & 0xff) as i32),
            fate::STOP => (pb::FateKind::Stopped, r.code as i32),
            fate::FAULT_SIGNAL | fate::FAULT_HANDLED => {
                // Not a fate yet: the thread's exit, which follows, says it took the signal.
                // Where it was is its calls now; a handler's calls come after, and a handler
                // that re-raises the signal does not move it.
                if !self.faulted.contains_key(&r.tid) && self.faulted.len() < lastcalls::MAX_THREADS {
                    self.faulted.insert(r.tid, self.last_calls.of(r.tid));
                }
                return;
            }
            _ => {
                self.stats.malformed += 1;
                return;
            }
        };
        self.stats.fates += 1;
        let fault_calls = match r.fate {
            fate::EXIT => {
                self.last_calls.forget(r.tid);
                self.faulted.remove(&r.tid)
            }
            _ => None,
        };
        let stack_ids = self.fate_stacks.remove(&r.tid).unwrap_or_default();
        self.fates.push(pb::ThreadFate {
            pid: r.pid,
            tid: r.tid,
            ts_ns: r.ts_ns,
            kind: kind as i32,
            code,
            last_calls: Vec::new(),
            took_signal: fault_calls.is_some(),
            fault_calls: fault_calls.unwrap_or_default(),
            stack_ids,
            stack: Vec::new(),
        });
    }

    /// Where a thread was when it took a fatal or stop signal (`agent_common::kind::FATE_STACK`):
    /// the function of its next instruction, then its callers, unwound as a call-stack event's
    /// copy is (nothing is learnt for the kernel: these are rare). Kept for its fate.
    fn handle_fate_stack(&mut self, bytes: &[u8]) {
        let Some(h) = EventHeader::read(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        if self.fate_stacks.contains_key(&h.tid) || self.fate_stacks.len() >= lastcalls::MAX_THREADS {
            return;
        }
        let end = HEADER_LEN.saturating_add(h.stack_len as usize);
        let Some(stack) = bytes.get(HEADER_LEN..end) else {
            self.stats.malformed += 1;
            return;
        };
        let pid = h.pid;
        let here = self.symbol_at(pid, h.ip).0;
        let snap = StackSnapshot::new(&h, stack);
        let addrs = unwind(&snap, self.cfg.max_frames, |a| self.locate(pid, a), |_, _| {});
        let mut frames = vec![here];
        frames.extend(addrs.iter().map(|ra| self.symbol_at(pid, ra.wrapping_sub(1)).0));
        tracing::debug!(
            tid = h.tid,
            signal = h.fn_id,
            ip = h.ip,
            sp = h.sp,
            bytes = stack.len(),
            ?frames,
            "fate stack"
        );
        frames.retain(|s| *s != 0);
        frames.dedup();
        self.fate_stacks.insert(h.tid, frames);
    }

    /// The frames of an unwound chain the analyzer gets: up to and including the first frame
    /// outside the traced module. The return address of that frame becomes an end step in
    /// `steps` (the kernel stops its walk there too).
    fn keep_frames(&mut self, pid: u32, addrs: &[u64], steps: &mut Vec<(u64, UnwindStep)>) -> Vec<u32> {
        let mut callstack = Vec::new();
        for &ra in addrs {
            let (sym, in_target) = self.symbol_at(pid, ra.wrapping_sub(1));
            callstack.push(sym);
            if !in_target || sym == 0 {
                if sym != 0 {
                    steps.push((ra, UnwindStep::End));
                }
                break;
            }
        }
        callstack
    }

    /// Hands the unwind steps of a stack copy to the kernel (`agent_common::UnwindStep`), once
    /// per (process, address); an end step replaces a rule learnt at the same address.
    fn learn(&mut self, pid: u32, steps: Vec<(u64, UnwindStep)>) {
        let mut chosen: HashMap<u64, UnwindStep> = HashMap::new();
        for (key, step) in steps {
            match chosen.get(&key) {
                Some(UnwindStep::End) => {}
                _ => {
                    chosen.insert(key, step);
                }
            }
        }
        if self.learnt_total >= 2 * agent_common::MAX_UNWIND_RULES as usize {
            // The kernel map is an LRU; forgetting what we sent only costs re-sending it.
            self.learnt.clear();
            self.learnt_total = 0;
        }
        let known = self.learnt.entry(pid).or_default();
        for (key, step) in chosen {
            if !known.insert(key) {
                continue;
            }
            self.learnt_total += 1;
            match self.maps.unwind.insert(&agent_common::unwind_key(pid, key), &step.encode(), 0) {
                Ok(()) => self.stats.unwind_steps_learnt += 1,
                Err(e) => tracing::debug!(error = %e, "unwind step not stored"),
            }
        }
    }

    /// Forgets the unwind steps of an exited process (its pid may come back as another program).
    fn forget(&mut self, pid: u32) {
        for key in self.learnt.remove(&pid).unwrap_or_default() {
            let _ = self.maps.unwind.remove(&agent_common::unwind_key(pid, key));
        }
    }

    /// Reports processes that exited since the last check; whether there were any.
    fn check_exits(&mut self) -> bool {
        let gone: Vec<u32> = self
            .live
            .iter()
            .copied()
            .filter(|pid| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // State is the field after the parenthesised command name.
                Ok(s) => s
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|st| st == "Z" || st == "X"),
                Err(_) => true,
            })
            .collect();
        let any = !gone.is_empty();
        for pid in gone {
            self.live.remove(&pid);
            if let Some(traced) = &mut self.maps.traced {
                let _ = traced.remove(&pid);
            }
            self.procs.remove(&pid);
            self.biases.remove(&pid);
            self.forget(pid);
            self.exits.push(pb::ProcessExit { pid, ts_ns: monotonic_ns() });
            tracing::debug!(pid, "traced process exited");
        }
        any
    }

    fn read_counts(&mut self, interval: Duration) {
        let ids: Vec<(u32, bool, Arc<str>, Arc<str>)> = {
            let table = self.table.read().unwrap_or_else(|p| p.into_inner());
            table
                .iter()
                .enumerate()
                // Those counting now, and once more those that left count mode (the plan
                // changed) since the last read: their last calls are still to report.
                .filter_map(|(i, e)| {
                    let e = e.as_ref()?;
                    let counting = e.mode == Mode::Count;
                    (counting || (e.counted && !self.drained.contains(&(i as u32))))
                        .then(|| (i as u32, counting, e.module.clone(), e.name.clone()))
                })
                .collect()
        };
        for (id, counting, module, name) in ids {
            if counting {
                self.drained.remove(&id);
            } else {
                self.drained.insert(id);
            }
            let total: u64 = match self.maps.counts.get(&id, 0) {
                Ok(values) => values.iter().sum(),
                Err(_) => continue,
            };
            let prev = self.counts_prev.insert(id, total).unwrap_or(0);
            let calls = total.saturating_sub(prev);
            if calls > 0 {
                let function = self.syms.id(&module, &name);
                self.counts.push(pb::CallCount { function, calls, interval_ns: interval.as_nanos() as u64 });
            }
        }
    }

    fn kernel_drops(&self) -> u64 {
        self.maps.stats.get(&stat::DROPPED, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// One overload-control tick: `new_drops` were lost since the last.
    fn govern(&mut self, new_drops: u64) {
        let Some((g, to)) = &mut self.governor else { return };
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let demotable = |id: u32| {
            table
                .get(id as usize)
                .and_then(|e| e.as_ref())
                .is_some_and(|e| matches!(e.mode, Mode::Event | Mode::CallStack))
        };
        for action in g.tick(Instant::now(), new_drops, demotable) {
            match action {
                Action::Demote(_) => self.stats.demotions += 1,
                Action::Restore(_) => self.stats.restorations += 1,
            }
            let _ = to.send(action);
        }
    }

    /// Cuts the pending events into a batch and queues it; `last` marks the agent's final batch.
    fn cut(&mut self, last: bool) {
        let started = Instant::now();
        self.cut_inner(last);
        self.cut_ns += started.elapsed().as_nanos();
    }

    fn cut_inner(&mut self, last: bool) {
        let drops = self.kernel_drops();
        if drops > self.stats.kernel_drops {
            tracing::warn!(
                dropped = drops,
                new = drops - self.stats.kernel_drops,
                "ring buffer full: the kernel side dropped events"
            );
        }
        self.govern(drops.saturating_sub(self.stats.kernel_drops));
        self.stats.kernel_drops = drops;
        let mut referenced: BTreeSet<u32> = BTreeSet::new();
        for e in &self.events {
            referenced.insert(e.function);
            referenced.insert(e.caller);
            referenced.extend(e.callstack.iter().copied());
        }
        referenced.extend(self.counts.iter().map(|c| c.function));
        referenced.extend(self.fates.iter().flat_map(|f| f.fault_calls.iter().chain(&f.stack_ids).copied()));
        referenced.remove(&0);
        let acked = self.outbox.acked_symbols();
        let symbols = referenced.into_iter().filter(|s| !acked.contains(s)).filter_map(|s| self.syms.def(s)).collect();
        let (logs, log_drops) = self.logs.as_ref().map(|q| q.take(MAX_BATCH_LOGS)).unwrap_or_default();
        self.stats.log_lines += logs.len() as u64;
        let batch = pb::Batch {
            logs,
            log_drops,
            seq: 0,
            agent_clock_ns: monotonic_ns(),
            symbols,
            events: std::mem::take(&mut self.events),
            counts: std::mem::take(&mut self.counts),
            exits: std::mem::take(&mut self.exits),
            fates: std::mem::take(&mut self.fates),
            kernel_drops: drops,
            queue_drops: 0,
            final_batch: last,
        };
        self.outbox.push(batch);
        self.stats.batches += 1;
        crate::metrics::metrics().reader_progress(&self.published, &self.stats);
        self.published = self.stats.clone();
    }
}
