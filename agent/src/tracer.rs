//! Loads the eBPF program and applies plans: resolves trace points to functions and probe
//! sites, attaches new functions through one uprobe_multi link per plan change, and detaches
//! only what left the plan.
//!
//! Each function gets a small id (in the attach cookie, with its link's generation) and its mode
//! lives in the `MODES` map, so a mode change (event <-> callstack <-> count) is a map write. A
//! function that leaves the plan is switched off at once and its link is rebuilt without it:
//! the link's other functions are handed over to a new link without losing or doubling a call
//! (`agent_common::Slot`), and the old link is detached.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use afetm_proto::{self as pb, plan};
use agent_common::{MAX_FUNCS, MAX_STACK_WINDOW, Mode, PROBE_GENERATION, Slot, cookie};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};

use crate::{
    probe_site::{self, ProbeSite},
    symbols::{Function, Module},
};

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("target {0}: no such file")]
    MissingBinary(PathBuf),
    #[error("process {0} is gone (no /proc/{0})")]
    PidGone(u32),
    #[error(transparent)]
    Symbols(#[from] crate::symbols::SymbolError),
    #[error("unknown function {name:?} in {module} ({known} functions known{hint})")]
    UnknownFunction { name: String, module: String, known: usize, hint: String },
    #[error("plan has {0} functions; the agent can trace at most {MAX_FUNCS}")]
    TooMany(usize),
    #[error("function {0} has no file offset (not in a loadable segment)")]
    NoOffset(String),
    #[error("the plan changes the target ({0}); start a new agent for another target")]
    TargetChanged(String),
    #[error("stack window {0} is out of range (64..={MAX_STACK_WINDOW})")]
    StackWindow(u32),
    #[error("loading the eBPF program: {0}")]
    Load(String),
    #[error("attaching uprobes to {path}: {error}")]
    Attach { path: PathBuf, error: String },
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// The traced module and how to attach to it.
#[derive(Clone, Debug)]
pub struct Target {
    pub module: Arc<Module>,
    /// Path handed to the kernel (for a pid target: `/proc/<pid>/exe` or the library path).
    pub attach_path: PathBuf,
    pub pid: Option<u32>,
    pub spec: plan::Target,
}

impl Target {
    pub fn open(spec: &plan::Target) -> Result<Target, TraceError> {
        if let Some(pid) = spec.pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            return Err(TraceError::PidGone(pid));
        }
        let (attach_path, name) = match (&spec.path, spec.pid) {
            (Some(path), _) => {
                if !path.exists() {
                    return Err(TraceError::MissingBinary(path.clone()));
                }
                // Processes map the file under its real name (e.g. redis-server -> redis-check-rdb).
                let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
                (path.clone(), real.file_name().map(|n| n.to_string_lossy().into_owned()))
            }
            (None, Some(pid)) => {
                let exe = PathBuf::from(format!("/proc/{pid}/exe"));
                let real = std::fs::read_link(&exe).map_err(|_| TraceError::PidGone(pid))?;
                (exe, real.file_name().map(|n| n.to_string_lossy().into_owned()))
            }
            (None, None) => return Err(TraceError::MissingBinary(PathBuf::from("(none)"))),
        };
        let name = name
            .unwrap_or_else(|| attach_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let module = Module::load_as(&attach_path, name)?;
        Ok(Target { module: Arc::new(module), attach_path, pid: spec.pid, spec: spec.clone() })
    }

    pub fn describe(&self) -> String {
        match self.pid {
            Some(pid) => format!("{} in pid {pid}", self.module.name),
            None => self.attach_path.display().to_string(),
        }
    }
}

/// What the reader needs to know about function ids.
#[derive(Clone, Debug)]
pub struct FnEntry {
    pub module: Arc<str>,
    pub name: Arc<str>,
    pub mode: Mode,
    /// Module virtual address of the probe: an event's ip minus this is the module's load bias.
    pub probe_vaddr: u64,
    /// Has been in count mode since the agent started, so `COUNTS` may hold calls the reader
    /// has not reported yet.
    pub counted: bool,
}

/// fn_id -> function, shared with the ring buffer reader.
pub type FnTable = Arc<RwLock<Vec<Option<FnEntry>>>>;

/// A resolved trace point.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub func: Function,
    pub site: ProbeSite,
    pub mode: Mode,
}

impl Resolved {
    /// Where its probe went, as plan reports and `--print-probes` show it.
    pub fn placed(&self) -> pb::PlacedProbe {
        pb::PlacedProbe {
            function: self.func.name.to_string(),
            entry: self.func.start,
            probe: self.site.vaddr,
            instruction: self.site.instruction.clone(),
            emulated: self.site.emulated,
        }
    }

    /// The point as applied, as plan reports give it.
    pub fn point(&self) -> pb::TracePoint {
        pb::TracePoint { function: self.func.name.to_string(), mode: pb_mode(self.mode) as i32 }
    }
}

/// Resolves the plan's points against the target module. `*` means every function.
pub fn resolve(module: &Module, points: &[plan::Point]) -> Result<Vec<Resolved>, TraceError> {
    let mut chosen: HashMap<u64, (Function, Mode)> = HashMap::new();
    for p in points {
        let mode = match p.mode {
            plan::Mode::Event => Mode::Event,
            plan::Mode::Callstack => Mode::CallStack,
            plan::Mode::Count => Mode::Count,
        };
        let funcs: Vec<&Function> =
            if p.function == "*" { module.functions().iter().collect() } else { module.find(&p.function) };
        if funcs.is_empty() {
            let mut close: Vec<&str> = module
                .functions()
                .iter()
                .map(|f| &*f.name)
                .filter(|n| n.contains(p.function.as_str()) || p.function.contains(*n))
                .take(3)
                .collect();
            close.sort();
            let hint = if close.is_empty() { String::new() } else { format!("; similar: {}", close.join(", ")) };
            return Err(TraceError::UnknownFunction {
                name: p.function.clone(),
                module: module.path.display().to_string(),
                known: module.functions().len(),
                hint,
            });
        }
        for f in funcs {
            let e = chosen.entry(f.start).or_insert_with(|| (f.clone(), mode));
            if rank(mode) > rank(e.1) {
                e.1 = mode;
            }
        }
    }
    let mut out: Vec<Resolved> = chosen
        .into_values()
        .map(|(func, mode)| {
            let site = probe_site::place(func.start, module.code(&func));
            Resolved { func, site, mode }
        })
        .collect();
    out.sort_by_key(|r| r.func.start);
    Ok(out)
}

/// One uprobe_multi link and the functions it owns.
struct Link {
    id: UProbeLinkId,
    members: HashSet<u32>,
}

/// The maps the ring buffer reader takes over.
pub struct ReaderMaps {
    pub events: RingBuf<MapData>,
    /// Unwind steps the reader learns from stack copies, for the kernel's own unwinding.
    pub unwind: aya::maps::HashMap<MapData, [u64; 2], [i32; 4]>,
    pub counts: PerCpuArray<MapData, u64>,
    pub stats: PerCpuArray<MapData, u64>,
    /// Processes whose threads' fates the kernel reports (`agent_common::FateRecord`); None
    /// when the fate programs could not be attached.
    pub traced: Option<aya::maps::HashMap<MapData, u32, u8>>,
}

pub struct Tracer {
    ebpf: Ebpf,
    modes: Array<MapData, u64>,
    target: Target,
    ids: HashMap<u64, u32>,
    /// Live links by generation.
    links: HashMap<u32, Link>,
    next_generation: u32,
    /// fn_id -> (owning link generation, current mode) for attached functions.
    attached: HashMap<u32, (u32, Mode)>,
    /// Functions the kernel refused to probe (entry address -> reason), skipped from then on.
    unprobeable: HashMap<u64, String>,
    table: FnTable,
    handover_hold: std::time::Duration,
    /// Functions running below their planned mode (overload control), with the mode they run in.
    demoted: HashMap<u32, Mode>,
    last_report: pb::PlanReport,
}

const PROGRAM: &str = "afetm_probe";

/// Where `exit_code` lies in the running kernel's `struct task_struct`, from its BTF
/// (`/sys/kernel/btf/vmlinux`): the exit tracepoint reads it from the exiting task. Kernels
/// without BTF report no exits (stops still are).
fn exit_code_offset() -> Result<u32, String> {
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    let btf = btf_rs::Btf::from_file(VMLINUX).map_err(|e| format!("reading {VMLINUX}: {e}"))?;
    let types = btf.resolve_types_by_name("task_struct").map_err(|e| format!("{VMLINUX}: task_struct: {e}"))?;
    for ty in types {
        let btf_rs::Type::Struct(s) = ty else { continue };
        for m in &s.members {
            if btf.resolve_name(m).is_ok_and(|n| n == "exit_code") && m.bitfield_size().is_none_or(|b| b == 0) {
                return Ok(m.bit_offset() / 8);
            }
        }
    }
    Err(format!("{VMLINUX}: no task_struct.exit_code"))
}

/// Attaches one tracepoint program of the object for the agent's life.
fn attach_tracepoint(ebpf: &mut Ebpf, program: &str, category: &str, name: &str) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load().map_err(|e| format!("loading {program}: {}", chain(&e)))?;
    prog.attach(category, name).map_err(|e| format!("tracepoint {category}/{name}: {}", chain(&e)))?;
    Ok(())
}

/// Attaches the programs that report how traced threads end or stop
/// (`agent_common::FateRecord`): `sched/sched_process_exit` and `signal/signal_deliver`.
/// Both do nothing for processes the agent does not trace.
fn attach_fates(ebpf: &mut Ebpf) -> Result<(), String> {
    attach_tracepoint(ebpf, "afetm_exit", "sched", "sched_process_exit")?;
    attach_tracepoint(ebpf, "afetm_signal", "signal", "signal_deliver")
}

/// Kernel answers to an attach that mean "not this address" rather than "not at all":
/// ENOTSUPP (524, an instruction uprobes cannot handle) and EINVAL.
fn refused_address(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(524) | Some(22))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}

impl Tracer {
    /// Loads the eBPF object for `target` with a ring buffer of `ring_bytes` (a power-of-two
    /// multiple of the page size). A call-stack event covers `stack_window` bytes of
    /// stack; with `kernel_unwind` the kernel unwinds it itself once the reader has learnt the
    /// steps (see `agent_common::UnwindStep`), else every such event carries a stack copy.
    pub fn load(
        target: Target,
        stack_window: u32,
        kernel_unwind: bool,
        ring_bytes: u32,
    ) -> Result<(Tracer, ReaderMaps, FnTable), TraceError> {
        if !(64..=MAX_STACK_WINDOW as u32).contains(&stack_window) {
            return Err(TraceError::StackWindow(stack_window));
        }
        let kernel_unwind = kernel_unwind as u32;
        let exit_code_offset = match exit_code_offset() {
            Ok(off) => off,
            Err(e) => {
                tracing::warn!(error = %e, "thread exits will not be reported");
                0
            }
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("STACK_WINDOW", &stack_window, true)
            .override_global("EXIT_CODE_OFFSET", &exit_code_offset, true)
            .override_global("KERNEL_UNWIND", &kernel_unwind, true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/afetm.bpf.o")))
            .map_err(|e| TraceError::Load(e.to_string()))?;
        let prog: &mut UProbe = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| TraceError::Load(format!("program {PROGRAM} missing from the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| TraceError::Load(e.to_string()))?;
        prog.load().map_err(|e| TraceError::Load(e.to_string()))?;
        let fates = match attach_fates(&mut ebpf) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "thread fates are off: exits and stops of traced threads will not be reported"
                );
                false
            }
        };
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| TraceError::Load(format!("map {name} missing from the object")))
        };
        let modes = Array::try_from(take("MODES")?)?;
        let maps = ReaderMaps {
            events: RingBuf::try_from(take("EVENTS")?)?,
            unwind: aya::maps::HashMap::try_from(take("UNWIND")?)?,
            counts: PerCpuArray::try_from(take("COUNTS")?)?,
            stats: PerCpuArray::try_from(take("STATS")?)?,
            traced: fates.then(|| take("TRACED")).transpose()?.map(aya::maps::HashMap::try_from).transpose()?,
        };
        let table: FnTable = Arc::new(RwLock::new(vec![None; MAX_FUNCS as usize]));
        let tracer = Tracer {
            ebpf,
            modes,
            target,
            ids: HashMap::new(),
            links: HashMap::new(),
            next_generation: 1,
            attached: HashMap::new(),
            unprobeable: HashMap::new(),
            table: table.clone(),
            handover_hold: std::time::Duration::ZERO,
            demoted: HashMap::new(),
            last_report: pb::PlanReport::default(),
        };
        Ok((tracer, maps, table))
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Keep each handover in its middle phase (both links attached, marks in use) this long; a
    /// test knob, 0 in normal use.
    pub fn set_handover_hold(&mut self, hold: std::time::Duration) {
        self.handover_hold = hold;
    }

    /// Number of live uprobe_multi links (for tests and reports).
    pub fn links(&self) -> usize {
        self.links.len()
    }

    fn id_for(&mut self, f: &Function) -> Result<u32, TraceError> {
        if let Some(id) = self.ids.get(&f.start) {
            return Ok(*id);
        }
        let id = self.ids.len() as u32 + 1; // 0 stays unused: a missing cookie reads as 0
        if id >= MAX_FUNCS {
            return Err(TraceError::TooMany(id as usize));
        }
        self.ids.insert(f.start, id);
        Ok(id)
    }

    fn set_slot(&mut self, id: u32, slot: Slot) -> Result<(), TraceError> {
        self.modes.set(id, &slot.encode(), 0)?;
        Ok(())
    }

    fn program(&mut self) -> Result<&mut UProbe, TraceError> {
        self.ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| TraceError::Load("program vanished".into()))
    }

    /// One uprobe_multi link on `points` (fn_id, file offset) with cookies of `generation`.
    fn attach(&mut self, points: &[(u32, u64)], generation: u32) -> Result<UProbeLinkId, aya::programs::ProgramError> {
        let scope = match self.target.pid.and_then(NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let path = self.target.attach_path.clone();
        let prog = self.program().map_err(|_| aya::programs::ProgramError::NotLoaded)?;
        let pts = points.iter().map(|(id, off)| UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(*off),
            cookie: Some(cookie(*id, generation)),
        });
        prog.attach(pts, &path, scope)
    }

    fn detach(&mut self, link: UProbeLinkId) {
        match self.program() {
            Ok(prog) => {
                if let Err(e) = prog.detach(link) {
                    tracing::warn!(error = %e, "detaching a uprobe link");
                }
            }
            Err(e) => tracing::warn!(error = %e, "detaching a uprobe link"),
        }
    }

    /// The points of `points` the kernel refuses to probe, found by bisection with throwaway
    /// links whose probes record nothing (at most ~2 k log n attaches for k refused points).
    fn refused(&mut self, points: &[(u32, u64)]) -> Vec<((u32, u64), String)> {
        match self.attach(points, PROBE_GENERATION) {
            Ok(link) => {
                self.detach(link);
                Vec::new()
            }
            Err(e) if points.len() == 1 => vec![(points[0], chain(&e))],
            Err(_) => {
                let (a, b) = points.split_at(points.len() / 2);
                let mut out = self.refused(a);
                out.extend(self.refused(b));
                out
            }
        }
    }

    /// Applies `plan`: attaches what is new, switches modes, detaches what left. On error the
    /// previous plan stays in force.
    ///
    /// Links whose functions all stay are untouched. A link that loses functions is rebuilt:
    /// its remaining functions move, together with the new ones, to one new link (handover in
    /// [`Slot`]: no call lost or recorded twice), and the old link is detached, so a function
    /// that left the plan costs nothing afterwards. Functions the kernel cannot probe are left
    /// out and named in the report (`unprobeable`).
    pub fn apply(&mut self, plan: &plan::PlanFile) -> Result<pb::PlanReport, TraceError> {
        if plan.target != self.target.spec {
            return Err(TraceError::TargetChanged(format!("{:?} -> {:?}", self.target.spec, plan.target)));
        }
        let started = std::time::Instant::now();
        let resolved = resolve(&self.target.module, &plan.points)?;
        self.undo_demotions()?;
        let mut desired: HashMap<u32, Resolved> = HashMap::new();
        let mut skipped: Vec<String> = Vec::new();
        for r in resolved {
            if self.unprobeable.contains_key(&r.func.start) {
                skipped.push(r.func.name.to_string());
                continue;
            }
            let id = self.id_for(&r.func)?;
            desired.insert(id, r);
        }
        let gone: Vec<u32> = self.attached.keys().filter(|id| !desired.contains_key(id)).copied().collect();
        let affected: HashSet<u32> = gone.iter().map(|id| self.attached[id].0).collect();
        let moved: Vec<u32> = affected
            .iter()
            .flat_map(|g| self.links[g].members.iter().copied())
            .filter(|id| desired.contains_key(id))
            .collect();
        let point = |id: u32| -> Result<(u32, u64), TraceError> {
            let r = &desired[&id];
            let off = self
                .target
                .module
                .vaddr_to_offset(r.site.vaddr)
                .ok_or_else(|| TraceError::NoOffset(r.func.name.to_string()))?;
            Ok((id, off))
        };
        let mut new: Vec<(u32, u64)> = desired
            .keys()
            .filter(|id| !self.attached.contains_key(id))
            .map(|id| point(*id))
            .collect::<Result<_, _>>()?;
        new.sort_unstable();
        let mut link_points: Vec<(u32, u64)> = new.clone();
        for id in &moved {
            link_points.push(point(*id)?);
        }
        link_points.sort_unstable();

        let mut generation = 0;
        if !link_points.is_empty() {
            if self.next_generation >= PROBE_GENERATION {
                return Err(TraceError::Load("uprobe link generations exhausted; restart the agent".into()));
            }
            generation = self.next_generation;
            self.next_generation += 1;
            // New functions are owned by the new link from its first hit; moved ones keep their
            // old owner until the handover below.
            for (id, _) in &new {
                let slot = Slot { mode: desired[id].mode, owner: generation, incoming: 0 };
                self.set_slot(*id, slot)?;
            }
            let link = match self.attach(&link_points, generation) {
                Ok(link) => link,
                Err(e) if refused_address(&e) => {
                    for (id, _) in &new {
                        self.set_slot(*id, Slot::OFF)?;
                    }
                    let bad = self.refused(&new);
                    if bad.is_empty() {
                        return Err(TraceError::Attach { path: self.target.attach_path.clone(), error: chain(&e) });
                    }
                    let bad_ids: HashSet<u32> = bad.iter().map(|((id, _), _)| *id).collect();
                    for ((id, _), why) in &bad {
                        let r = &desired[id];
                        tracing::warn!(function = %r.func.name, probe = format_args!("{:#x}", r.site.vaddr), instruction = %r.site.instruction, error = %why, "the kernel cannot probe this function; left out");
                        self.unprobeable.insert(r.func.start, why.clone());
                        skipped.push(r.func.name.to_string());
                    }
                    new.retain(|(id, _)| !bad_ids.contains(id));
                    link_points.retain(|(id, _)| !bad_ids.contains(id));
                    for id in &bad_ids {
                        desired.remove(id);
                    }
                    for (id, _) in &new {
                        let slot = Slot { mode: desired[id].mode, owner: generation, incoming: 0 };
                        self.set_slot(*id, slot)?;
                    }
                    match self.attach(&link_points, generation) {
                        Ok(link) => link,
                        Err(e) => {
                            for (id, _) in &new {
                                self.set_slot(*id, Slot::OFF)?;
                            }
                            return Err(TraceError::Attach { path: self.target.attach_path.clone(), error: chain(&e) });
                        }
                    }
                }
                Err(e) => {
                    for (id, _) in &new {
                        self.set_slot(*id, Slot::OFF)?;
                    }
                    return Err(TraceError::Attach { path: self.target.attach_path.clone(), error: chain(&e) });
                }
            };
            self.links.insert(generation, Link { id: link, members: link_points.iter().map(|(id, _)| *id).collect() });
        }
        // Handover step 2: the new link records moved functions, the old one skips what it marked.
        for id in &moved {
            let owner = self.attached[id].0;
            self.set_slot(*id, Slot { mode: desired[id].mode, owner, incoming: generation })?;
        }
        if !moved.is_empty() && !self.handover_hold.is_zero() {
            std::thread::sleep(self.handover_hold);
        }
        // Functions that left: silent at once.
        for id in &gone {
            self.set_slot(*id, Slot::OFF)?;
        }
        // Step 3: old links go; then the new link owns the moved functions.
        for g in &affected {
            if let Some(link) = self.links.remove(g) {
                self.detach(link.id);
            }
        }
        for id in &moved {
            self.set_slot(*id, Slot { mode: desired[id].mode, owner: generation, incoming: 0 })?;
            self.attached.insert(*id, (generation, desired[id].mode));
        }
        for (id, _) in &new {
            self.attached.insert(*id, (generation, desired[id].mode));
        }
        // Mode changes of functions that stay in untouched links.
        let changed: Vec<(u32, u32, Mode)> = desired
            .iter()
            .filter_map(|(id, r)| {
                let (g, m) = *self.attached.get(id)?;
                (m != r.mode).then_some((*id, g, r.mode))
            })
            .collect();
        for (id, owner, mode) in changed {
            self.set_slot(id, Slot { mode, owner, incoming: 0 })?;
            self.attached.insert(id, (owner, mode));
        }
        for id in &gone {
            self.attached.remove(id);
        }
        // Publish names and modes for the reader.
        {
            let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
            for id in &gone {
                if let Some(Some(e)) = table.get_mut(*id as usize) {
                    e.mode = Mode::Off;
                }
            }
            for (id, r) in &desired {
                let counted = table[*id as usize].as_ref().is_some_and(|e| e.counted) || r.mode == Mode::Count;
                table[*id as usize] = Some(FnEntry {
                    module: self.target.module.name.as_str().into(),
                    name: r.func.name.clone(),
                    mode: r.mode,
                    probe_vaddr: r.site.vaddr,
                    counted,
                });
            }
        }
        let mut probes: Vec<pb::PlacedProbe> = desired.values().map(Resolved::placed).collect();
        probes.sort_by_key(|p| p.entry);
        let mut points: Vec<pb::TracePoint> = desired.values().map(Resolved::point).collect();
        points.sort_by(|a, b| a.function.cmp(&b.function));
        skipped.sort();
        let report = pb::PlanReport {
            version: plan.version,
            ok: true,
            error: String::new(),
            probes,
            attached: new.len() as u32,
            detached: gone.len() as u32,
            unprobeable: skipped,
            relinked: moved.len() as u32,
            apply_us: started.elapsed().as_micros() as u64,
            module: self.target.module.name.to_string(),
            points,
            demoted: Vec::new(),
        };
        self.last_report = report.clone();
        Ok(report)
    }

    /// Undoes every overload demotion (before a new plan sets the modes).
    fn undo_demotions(&mut self) -> Result<(), TraceError> {
        for (id, _) in std::mem::take(&mut self.demoted) {
            if let Some(&(owner, planned)) = self.attached.get(&id) {
                self.set_effective(id, owner, planned)?;
            }
        }
        Ok(())
    }

    /// Runs function `id` in `mode` without changing its plan (overload control).
    fn set_effective(&mut self, id: u32, owner: u32, mode: Mode) -> Result<(), TraceError> {
        self.set_slot(id, Slot { mode, owner, incoming: 0 })?;
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(e)) = table.get_mut(id as usize) {
            e.mode = mode;
            e.counted |= mode == Mode::Count;
        }
        Ok(())
    }

    /// The mode function `id` runs in now (its plan's, or lower while demoted).
    pub fn effective_mode(&self, id: u32) -> Option<Mode> {
        let (_, planned) = self.attached.get(&id)?;
        Some(self.demoted.get(&id).copied().unwrap_or(*planned))
    }

    /// One mode down (call stack -> event -> count); the new mode, or None when it cannot go
    /// lower or is not attached.
    pub fn demote(&mut self, id: u32) -> Result<Option<Mode>, TraceError> {
        let Some(&(owner, _)) = self.attached.get(&id) else { return Ok(None) };
        let to = match self.effective_mode(id) {
            Some(Mode::CallStack) => Mode::Event,
            Some(Mode::Event) => Mode::Count,
            _ => return Ok(None),
        };
        self.set_effective(id, owner, to)?;
        self.demoted.insert(id, to);
        Ok(Some(to))
    }

    /// One mode up, never above the plan's; the new mode, or None when nothing changed.
    pub fn restore(&mut self, id: u32) -> Result<Option<Mode>, TraceError> {
        let (Some(&(owner, planned)), Some(&now)) = (self.attached.get(&id), self.demoted.get(&id)) else {
            return Ok(None);
        };
        let up = match now {
            Mode::Count => Mode::Event,
            _ => Mode::CallStack,
        };
        let to = if rank(up) > rank(planned) { planned } else { up };
        self.set_effective(id, owner, to)?;
        if to == planned {
            self.demoted.remove(&id);
        } else {
            self.demoted.insert(id, to);
        }
        Ok(Some(to))
    }

    /// Name of a function by id.
    pub fn function_name(&self, id: u32) -> Option<String> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        Some(table.get(id as usize)?.as_ref()?.name.to_string())
    }

    /// The last plan's report with the current demotions.
    pub fn report(&self) -> pb::PlanReport {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let mut demoted: Vec<pb::Demotion> = self
            .demoted
            .iter()
            .filter_map(|(id, now)| {
                let name = table.get(*id as usize)?.as_ref()?.name.to_string();
                let planned = self.attached.get(id)?.1;
                Some(pb::Demotion { function: name, planned: pb_mode(planned) as i32, now: pb_mode(*now) as i32 })
            })
            .collect();
        demoted.sort_by(|a, b| a.function.cmp(&b.function));
        pb::PlanReport { demoted, ..self.last_report.clone() }
    }
}

/// Detail order of the modes: count < event < call stack.
fn rank(m: Mode) -> u8 {
    match m {
        Mode::Off => 0,
        Mode::Count => 1,
        Mode::Event => 2,
        Mode::CallStack => 3,
    }
}

fn pb_mode(m: Mode) -> pb::TraceMode {
    match m {
        Mode::Event => pb::TraceMode::Event,
        Mode::CallStack => pb::TraceMode::Callstack,
        Mode::Count => pb::TraceMode::Count,
        Mode::Off => pb::TraceMode::Unspecified,
    }
}
