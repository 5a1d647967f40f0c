//! Loads the eBPF program and applies plans: resolves trace points to functions and probe
//! sites, attaches new functions through one uprobe_multi link per plan change, and detaches
//! only what left the plan.
//!
//! Each function gets a small id (the attach cookie) and its mode lives in the `MODES` map, so
//! a function that stays in the plan keeps its link and never misses an event, and a mode change
//! (event <-> callstack <-> count) is a map write. A function that leaves the plan is switched
//! off at once; its link is released when every function of that link has left.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use afetm_proto::{self as pb, plan};
use agent_common::{MAX_FUNCS, MAX_STACK_WINDOW, Mode};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        UProbe,
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

/// Resolves the plan's points against the target module. `*` means every function.
pub fn resolve(module: &Module, points: &[plan::Point]) -> Result<Vec<Resolved>, TraceError> {
    fn rank(m: Mode) -> u8 {
        match m {
            Mode::CallStack => 3,
            Mode::Event => 2,
            Mode::Count => 1,
            Mode::Off => 0,
        }
    }
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

struct Group {
    link: Option<UProbeLinkId>,
    live: usize,
}

/// The maps the ring buffer reader takes over.
pub struct ReaderMaps {
    pub events: RingBuf<MapData>,
    pub counts: PerCpuArray<MapData, u64>,
    pub stats: PerCpuArray<MapData, u64>,
}

pub struct Tracer {
    ebpf: Ebpf,
    modes: Array<MapData, u32>,
    target: Target,
    ids: HashMap<u64, u32>,
    groups: Vec<Group>,
    /// fn_id -> (group, current mode) for attached functions.
    attached: HashMap<u32, (usize, Mode)>,
    table: FnTable,
}

const PROGRAM: &str = "afetm_probe";

impl Tracer {
    /// Loads the eBPF object for `target`, copying `stack_window` bytes of stack per call-stack event.
    pub fn load(target: Target, stack_window: u32) -> Result<(Tracer, ReaderMaps, FnTable), TraceError> {
        if !(64..=MAX_STACK_WINDOW as u32).contains(&stack_window) {
            return Err(TraceError::StackWindow(stack_window));
        }
        let mut ebpf = EbpfLoader::new()
            .override_global("STACK_WINDOW", &stack_window, true)
            .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/afetm.bpf.o")))
            .map_err(|e| TraceError::Load(e.to_string()))?;
        let prog: &mut UProbe = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| TraceError::Load(format!("program {PROGRAM} missing from the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| TraceError::Load(e.to_string()))?;
        prog.load().map_err(|e| TraceError::Load(e.to_string()))?;
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| TraceError::Load(format!("map {name} missing from the object")))
        };
        let modes = Array::try_from(take("MODES")?)?;
        let maps = ReaderMaps {
            events: RingBuf::try_from(take("EVENTS")?)?,
            counts: PerCpuArray::try_from(take("COUNTS")?)?,
            stats: PerCpuArray::try_from(take("STATS")?)?,
        };
        let table: FnTable = Arc::new(RwLock::new(vec![None; MAX_FUNCS as usize]));
        let tracer = Tracer {
            ebpf,
            modes,
            target,
            ids: HashMap::new(),
            groups: Vec::new(),
            attached: HashMap::new(),
            table: table.clone(),
        };
        Ok((tracer, maps, table))
    }

    pub fn target(&self) -> &Target {
        &self.target
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

    fn set_mode(&mut self, id: u32, mode: Mode) -> Result<(), TraceError> {
        self.modes.set(id, &(mode as u32), 0)?;
        Ok(())
    }

    /// Applies `plan`: attaches what is new, switches modes, detaches what left. On error the
    /// previous plan stays in force.
    pub fn apply(&mut self, plan: &plan::PlanFile) -> Result<pb::PlanReport, TraceError> {
        if plan.target != self.target.spec {
            return Err(TraceError::TargetChanged(format!("{:?} -> {:?}", self.target.spec, plan.target)));
        }
        let resolved = resolve(&self.target.module, &plan.points)?;
        let mut desired: HashMap<u32, (Resolved, u32)> = HashMap::new();
        for r in resolved {
            let id = self.id_for(&r.func)?;
            desired.insert(id, (r, id));
        }
        // New functions: set their mode first so the first hit already counts, then one link.
        let mut new: Vec<(u32, u64)> = Vec::new();
        for (id, (r, _)) in &desired {
            if !self.attached.contains_key(id) {
                let off = self
                    .target
                    .module
                    .vaddr_to_offset(r.site.vaddr)
                    .ok_or_else(|| TraceError::NoOffset(r.func.name.to_string()))?;
                new.push((*id, off));
            }
        }
        new.sort_unstable();
        for (id, _) in &new {
            let mode = desired[id].0.mode;
            self.set_mode(*id, mode)?;
        }
        if !new.is_empty() {
            let scope = match self.target.pid.and_then(NonZeroU32::new) {
                Some(pid) => UProbeScope::OneProcess(pid),
                None => UProbeScope::AllProcesses,
            };
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(PROGRAM)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| TraceError::Load("program vanished".into()))?;
            let points = new.iter().map(|(id, off)| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(*off),
                cookie: Some(*id as u64),
            });
            match prog.attach(points, &self.target.attach_path, scope) {
                Ok(link) => {
                    let g = self.groups.len();
                    self.groups.push(Group { link: Some(link), live: new.len() });
                    for (id, _) in &new {
                        self.attached.insert(*id, (g, desired[id].0.mode));
                    }
                }
                Err(e) => {
                    for (id, _) in &new {
                        let _ = self.set_mode(*id, Mode::Off);
                    }
                    return Err(TraceError::Attach { path: self.target.attach_path.clone(), error: format!("{e:#}") });
                }
            }
        }
        // Mode changes of functions that stay.
        let stay: Vec<(u32, Mode)> = desired
            .iter()
            .filter(|(id, (r, _))| self.attached.get(id).is_some_and(|(_, m)| *m != r.mode))
            .map(|(id, (r, _))| (*id, r.mode))
            .collect();
        for (id, mode) in stay {
            self.set_mode(id, mode)?;
            if let Some(a) = self.attached.get_mut(&id) {
                a.1 = mode;
            }
        }
        // Functions that left: off at once, link released with its last function.
        let gone: Vec<u32> = self.attached.keys().filter(|id| !desired.contains_key(id)).copied().collect();
        let mut detached = 0u32;
        for id in &gone {
            self.set_mode(*id, Mode::Off)?;
            if let Some((g, _)) = self.attached.remove(id) {
                let group = &mut self.groups[g];
                group.live -= 1;
                detached += 1;
                if group.live == 0
                    && let Some(link) = group.link.take()
                {
                    let prog: Option<&mut UProbe> = self.ebpf.program_mut(PROGRAM).and_then(|p| p.try_into().ok());
                    if let Some(prog) = prog
                        && let Err(e) = prog.detach(link)
                    {
                        tracing::warn!(error = %e, "detaching a uprobe link");
                    }
                }
            }
        }
        // Publish names and modes for the reader.
        {
            let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
            for id in &gone {
                if let Some(Some(e)) = table.get_mut(*id as usize) {
                    e.mode = Mode::Off;
                }
            }
            for (id, (r, _)) in &desired {
                table[*id as usize] = Some(FnEntry {
                    module: self.target.module.name.as_str().into(),
                    name: r.func.name.clone(),
                    mode: r.mode,
                    probe_vaddr: r.site.vaddr,
                });
            }
        }
        let mut probes: Vec<pb::PlacedProbe> = desired
            .values()
            .map(|(r, _)| pb::PlacedProbe {
                function: r.func.name.to_string(),
                entry: r.func.start,
                probe: r.site.vaddr,
                instruction: r.site.instruction.clone(),
                emulated: r.site.emulated,
            })
            .collect();
        probes.sort_by_key(|p| p.entry);
        Ok(pb::PlanReport {
            version: plan.version,
            ok: true,
            error: String::new(),
            probes,
            attached: new.len() as u32,
            detached,
        })
    }
}
