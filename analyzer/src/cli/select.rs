//! `afetm-analyzer select`: structure + weights -> MWSCP-UBC instance -> Alg. 1 (and greedy,
//! for comparison) -> plan; with normal FCTs, Alg. 2 colors them against the selection for
//! F^callstack. With `--costs` the weights are probe CPU time (`afetm_selection::costs`) and
//! the budget is P of the full trace's cost, or `--max-overhead` of one core.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::PathBuf,
};

use afetm_analyzer::{
    coloring,
    store::{Limits, Store, WindowConfig},
    tree::{Forest, FuncId, FuncTable},
};
use afetm_fddb::{Fddb, Role, dataset::DatasetOptions};
use afetm_proto::{
    self as pb,
    costs::ProbeCosts,
    plan::{Mode, PlanFile, Point, Predicted, SelectionSummary, Target},
};
use afetm_selection::{
    self as selection, Instance, Params, Selection,
    costs::{self as cost, CostModel, Prediction},
    infogain,
    weights::Weights,
};
use anyhow::{Context, Result, bail};

/// Which algorithm chooses the points.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Algorithm {
    /// Max-Min Ant System, AFETM Alg. 1.
    Mmas,
    /// Greedy weighted set cover (baseline).
    Greedy,
    /// Fault-aware: the fewest functions whose anomaly flags tell the FDDB's faults apart
    /// (information gain, `afetm_selection::infogain`); needs `--fddb`.
    Infogain,
}

/// `afetm-analyzer select`.
#[derive(clap::Args)]
pub struct SelectArgs {
    /// ELF file to select in (its structure is read from the machine code).
    #[arg(long, required_unless_present = "structure", conflicts_with = "structure")]
    pub elf: Option<PathBuf>,
    /// Or a structure file written by `afetm-analyzer structure --out` (needs `--target`).
    #[arg(long)]
    pub structure: Option<PathBuf>,
    /// Weights file (`afetm-analyzer weights`, `cargo xtask testbed sample`).
    #[arg(long)]
    pub weights: PathBuf,
    /// P = w_ub / w_total: the share of the total call rate the plan may trace, as `10%` or
    /// `0.1`; with `--costs`, the share of what tracing every function would cost.
    #[arg(long, default_value = "10%", value_parser = crate::parse_budget)]
    pub budget: f64,
    /// Probe costs measured on the host (`afetm-agent --calibrate FILE`): functions then
    /// weigh their calls per second times the cost of a call in their mode at their probe
    /// site, and the predicted CPU of the plan is printed next to the bound.
    #[arg(long)]
    pub costs: Option<PathBuf>,
    /// Instead of P: the most CPU the probes may add, as a share of one core (`5%`); needs
    /// `--costs`.
    #[arg(long, value_parser = crate::parse_budget, requires = "costs")]
    pub max_overhead: Option<f64>,
    #[arg(long, value_enum, default_value_t = Algorithm::Mmas)]
    pub algorithm: Algorithm,
    #[command(flatten)]
    pub params: MmasArgs,
    /// Plan target path (default: `--elf`).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Analyzer database holding the normal FCTs.
    #[arg(long, requires = "normal_agent")]
    pub db: Option<PathBuf>,
    /// Agent whose closed windows are the normal FCTs (a full trace under normal load).
    #[arg(long, requires = "db")]
    pub normal_agent: Option<String>,
    /// The FDDB whose training runs' flags `--algorithm infogain` selects by (eval-role runs
    /// are never read).
    #[arg(long)]
    pub fddb: Option<PathBuf>,
    /// The target's name in the FDDB (`redis`, `nginx`, ...).
    #[arg(long)]
    pub fddb_target: Option<String>,
    /// Where to write the plan (JSON); `-` for stdout.
    #[arg(long, default_value = "-")]
    pub out: String,
}

/// Parameters of Algorithm 1; defaults in `selection::Params`.
#[derive(clap::Args)]
pub struct MmasArgs {
    /// N_ant, ants per iteration.
    #[arg(long, default_value_t = Params::default().ants)]
    ants: usize,
    /// N_run, iterations.
    #[arg(long, default_value_t = Params::default().runs)]
    runs: usize,
    #[arg(long, default_value_t = Params::default().alpha)]
    alpha: f64,
    #[arg(long, default_value_t = Params::default().beta)]
    beta: f64,
    /// Evaporation rate rho.
    #[arg(long, default_value_t = Params::default().rho)]
    rho: f64,
    #[arg(long, default_value_t = Params::default().tau_ini)]
    tau_ini: f64,
    /// Heuristic of a zero-weight function (eq 8).
    #[arg(long, default_value_t = Params::default().eta_max)]
    eta_max: f64,
    /// Pheromone deposited per update (eq 7).
    #[arg(long, default_value_t = Params::default().q)]
    q: f64,
    /// tau_min = tau_max / l.
    #[arg(long, default_value_t = Params::default().l)]
    l: f64,
    /// Stop after this many iterations without a better solution (0: run all N_run).
    #[arg(long, default_value_t = Params::default().patience)]
    patience: usize,
    #[arg(long, default_value_t = Params::default().seed)]
    seed: u64,
}

impl MmasArgs {
    pub fn params(&self) -> Params {
        Params {
            ants: self.ants,
            runs: self.runs,
            alpha: self.alpha,
            beta: self.beta,
            rho: self.rho,
            tau_ini: self.tau_ini,
            eta_max: self.eta_max,
            q: self.q,
            l: self.l,
            patience: self.patience,
            seed: self.seed,
        }
    }
}

/// The normal FCTs behind coloring, with each function's deepest node (the length of its call
/// chains, for the cost of its call-stack events).
struct Normal {
    table: FuncTable,
    fcts: Vec<Forest>,
    depth: HashMap<String, u32>,
}

impl Normal {
    fn load(db: &std::path::Path, agent: &str) -> Result<Normal> {
        let store = Store::open(db, WindowConfig::default(), Limits::default())
            .with_context(|| format!("opening database {}", db.display()))?;
        let windows = store.list_windows(&pb::ListWindowsRequest {
            agent_id: agent.to_string(),
            closed_only: true,
            ..Default::default()
        })?;
        let mut table = FuncTable::default();
        let mut fcts = Vec::new();
        for w in &windows {
            for tid in &w.tids {
                if let Some(t) = store.afct(w.id, *tid)? {
                    fcts.push(Forest::from_proto(&t, &mut table).map_err(|e| anyhow::anyhow!(e))?);
                }
            }
        }
        if fcts.is_empty() {
            bail!("agent {agent:?} has no closed windows in {}: no normal FCTs to color", db.display());
        }
        let mut depth: HashMap<String, u32> = HashMap::new();
        for f in &fcts {
            for (i, d) in f.depths().into_iter().enumerate() {
                let name = table.get(f.nodes[i].func).name.to_string();
                let e = depth.entry(name).or_default();
                *e = (*e).max(d);
            }
        }
        Ok(Normal { table, fcts, depth })
    }

    /// F^callstack of a selection (Alg. 2), by structure index.
    fn callstack(&self, names: &[&str], selected: &[usize]) -> Vec<bool> {
        let chosen: Vec<&str> = selected.iter().map(|j| names[*j]).collect();
        let traced: HashSet<FuncId> = chosen.iter().flat_map(|n| self.table.matching(n).collect::<Vec<_>>()).collect();
        let out = coloring::color(&self.fcts, &traced);
        let cs: HashSet<&str> = out.callstack.iter().map(|f| &*self.table.get(*f).name).collect();
        names.iter().map(|n| cs.contains(n)).collect()
    }
}

fn structure_and_target(a: &SelectArgs) -> Result<(afetm_elf::structure::Structure, PathBuf)> {
    match (&a.elf, &a.structure) {
        (Some(elf), _) => {
            let module = afetm_elf::symbols::Module::load(elf).with_context(|| format!("reading {}", elf.display()))?;
            Ok((afetm_elf::structure::analyze(&module), a.target.clone().unwrap_or_else(|| elf.clone())))
        }
        (None, Some(path)) => {
            let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let s: afetm_elf::structure::Structure =
                serde_json::from_slice(&text).with_context(|| format!("parsing structure {}", path.display()))?;
            let t = a.target.clone().context("--structure needs --target (the binary the plan traces)")?;
            Ok((s, t))
        }
        (None, None) => bail!("give --elf or --structure"),
    }
}

fn instance(a: &SelectArgs, structure: &afetm_elf::structure::Structure) -> Result<Instance> {
    let weights = Weights::load(&a.weights)?;
    if weights.module != structure.module {
        tracing::warn!(weights = %weights.module, structure = %structure.module, "weights were sampled on another module name");
    }
    if let Some(s) = weights.sampling.as_ref().filter(|s| s.slowdown > 1.2) {
        println!(
            "  weights: counts per request scaled from the sample's {:.0} req/s to {:.0} req/s untraced (sampling slowed the workload {:.1}x)",
            s.sample_rps, s.real_rps, s.slowdown
        );
    }
    let (inst, matched) = weights.instance(structure)?;
    if !matched.missing.is_empty() {
        let top: Vec<String> = matched.missing.iter().take(5).map(|(n, w)| format!("{n} ({w:.0}/s)")).collect();
        tracing::warn!(
            missing = matched.missing.len(),
            "weighted functions not in {}: {}",
            structure.module,
            top.join(", ")
        );
    }
    Ok(inst)
}

/// The selection and its F^callstack: plain Alg. 1 on calls (the paper), or cost-bounded.
struct Chosen {
    selection: Selection,
    callstack: Vec<bool>,
    prediction: Prediction,
    bound: f64,
    rounds: usize,
    fits: bool,
}

fn choose(
    a: &SelectArgs,
    inst: &Instance,
    names: &[&str],
    model: Option<&CostModel>,
    normal: Option<&Normal>,
) -> Result<Chosen> {
    let calls = inst.weights.clone();
    let color = |sel: &[usize]| normal.map_or_else(|| vec![false; names.len()], |n| n.callstack(names, sel));
    if let Algorithm::Infogain = a.algorithm {
        return infogain(a, inst, names, model, color);
    }
    let Some(model) = model else {
        let bound = selection::bound_for(inst, a.budget);
        let selection = match a.algorithm {
            Algorithm::Mmas => selection::mmas(inst, bound, &a.params.params())?,
            _ => selection::greedy(inst, bound),
        };
        let callstack = color(&selection.functions);
        let prediction = cost::predict(&calls, &selection.functions, &callstack, None);
        return Ok(Chosen { selection, callstack, prediction, bound, rounds: 1, fits: true });
    };
    let full = Instance { weights: model.weights(&calls, &[]), ..inst.clone() };
    let bound = match a.max_overhead {
        Some(x) => x * 1e9,
        None => selection::bound_for(&full, a.budget) * model.unit_ns(),
    };
    if let Algorithm::Greedy = a.algorithm {
        bail!("--costs works with --algorithm mmas");
    }
    let b = cost::select_within(inst, &calls, model, bound, &a.params.params(), color)?;
    Ok(Chosen {
        selection: b.selection,
        callstack: b.callstack,
        prediction: b.prediction,
        bound,
        rounds: b.rounds,
        fits: b.fits,
    })
}

/// Eq. 3's matrix over the FDDB's training runs of `target`: the normal runs' trees are the
/// profile, each fault run's faulty trees raise its flags.
fn flag_matrix(path: &std::path::Path, target: &str) -> Result<infogain::Matrix> {
    let db = Fddb::open(path).with_context(|| format!("FDDB {}", path.display()))?;
    let runs = db.valid_runs(target, Role::Train)?;
    if runs.is_empty() {
        bail!("the FDDB {} has no valid training run of {target:?} (see --fddb-target)", path.display());
    }
    let class: HashMap<i64, Option<String>> =
        runs.iter().map(|r| (r.id, r.fault.as_ref().map(|(f, k, _)| format!("{f}/{k}")))).collect();
    let mut normal = Vec::new();
    let mut faulty: HashMap<i64, Vec<pb::Tree>> = HashMap::new();
    db.for_each_tree(target, &DatasetOptions { role: Some(Role::Train), plan: None }, |row| {
        match class.get(&row.run) {
            Some(None) => normal.push(row.forest.to_proto(row.table)),
            Some(Some(_)) if row.faulty => faulty.entry(row.run).or_default().push(row.forest.to_proto(row.table)),
            _ => {}
        }
        Ok(())
    })?;
    if normal.is_empty() {
        bail!("the FDDB has no normal training run of {target:?}: no profile to flag against");
    }
    let profile = infogain::Profile::new(&normal);
    let mut by_fault: HashMap<String, Vec<BTreeSet<infogain::Flag>>> = HashMap::new();
    for (run, trees) in &faulty {
        if let Some(Some(c)) = class.get(run) {
            by_fault.entry(c.clone()).or_default().push(trees.iter().flat_map(|t| profile.flags(t)).collect());
        }
    }
    Ok(infogain::Matrix::from_runs(&by_fault))
}

/// `--algorithm infogain`: the flags' points in the order Alg. 1 of the logging paper picks
/// them, within the same bound as MMAS (calls at P, or probe CPU with `--costs`).
fn infogain(
    a: &SelectArgs,
    inst: &Instance,
    names: &[&str],
    model: Option<&CostModel>,
    color: impl Fn(&[usize]) -> Vec<bool>,
) -> Result<Chosen> {
    let fddb = a.fddb.as_ref().context("--algorithm infogain needs --fddb (the campaign's FDDB)")?;
    let target =
        a.fddb_target.as_deref().context("--algorithm infogain needs --fddb-target (the target's name in the FDDB)")?;
    let m = flag_matrix(fddb, target)?;
    let order = infogain::select(&m);
    let calls = inst.weights.clone();
    let (weights, bound) = match model {
        None => (calls.clone(), selection::bound_for(inst, a.budget)),
        Some(model) => {
            let full = Instance { weights: model.weights(&calls, &[]), ..inst.clone() };
            let ns = a.max_overhead.map_or(selection::bound_for(&full, a.budget) * model.unit_ns(), |x| x * 1e9);
            (full.weights, ns / model.unit_ns())
        }
    };
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(j, n)| (*n, j)).collect();
    let points = infogain::points_within(&m, &order, bound, |f| index.get(f).map(|&j| weights[j]));
    let functions: Vec<usize> = points.iter().filter_map(|p| index.get(p).copied()).collect();
    println!(
        "  infogain: {} faults, {} flags; {} flags chosen tell {} fault classes apart; {} trace points fit the bound",
        m.faults.len(),
        m.flags.len(),
        order.len(),
        infogain::distinguished(&m, &order),
        functions.len()
    );
    let selection = Instance { weights, ..inst.clone() }.evaluate(&functions, bound);
    let callstack = color(&functions);
    let prediction = cost::predict(&calls, &functions, &callstack, model);
    let bound_out = model.map_or(bound, |m| bound * m.unit_ns());
    let fits = model.is_none_or(|_| prediction.probe_ns_per_s <= bound_out * (1.0 + 1e-9));
    Ok(Chosen { selection, callstack, prediction, bound: bound_out, rounds: 1, fits })
}

pub fn select(a: SelectArgs) -> Result<()> {
    let (structure, target) = structure_and_target(&a)?;
    let inst = instance(&a, &structure)?;
    let names: Vec<&str> = structure.functions.iter().map(|f| f.name.as_str()).collect();
    let normal = match (&a.db, &a.normal_agent) {
        (Some(db), Some(agent)) => Some(Normal::load(db, agent)?),
        _ => {
            eprintln!(
                "no normal FCTs given (--db, --normal-agent): F^callstack is empty, every point is an event point"
            );
            None
        }
    };
    let model = match &a.costs {
        Some(path) => {
            let costs = ProbeCosts::load(path)?;
            let frames =
                names.iter().map(|n| normal.as_ref().and_then(|x| x.depth.get(*n).copied()).unwrap_or(0)).collect();
            Some(CostModel { costs, emulated: structure.functions.iter().map(|f| f.emulated).collect(), frames })
        }
        None if a.max_overhead.is_some() => bail!("--max-overhead needs --costs (afetm-agent --calibrate FILE)"),
        None => None,
    };
    let t = std::time::Instant::now();
    let c = choose(&a, &inst, &names, model.as_ref(), normal.as_ref())?;
    report(&a, &structure, &inst, &c, model.is_some(), t.elapsed());
    if c.selection.functions.is_empty() {
        bail!("the selection is empty: no function covers a block within the budget");
    }
    write_plan(&a, &structure, &inst, &c, target)
}

fn report(
    a: &SelectArgs,
    structure: &afetm_elf::structure::Structure,
    inst: &Instance,
    c: &Chosen,
    costed: bool,
    took: std::time::Duration,
) {
    let pct = |n: usize| if inst.blocks == 0 { 100.0 } else { 100.0 * n as f64 / inst.blocks as f64 };
    let called = c.selection.functions.iter().filter(|j| inst.weights[**j] > 0.0).count();
    let bound_text = match (costed, a.max_overhead) {
        (false, _) => {
            format!("P={:.0}% of {:.0} calls/s: bound {:.0} calls/s", a.budget * 100.0, inst.total_weight(), c.bound)
        }
        (true, Some(x)) => format!("max overhead {:.1}% of a core: bound {:.1} ms CPU/s", x * 100.0, c.bound / 1e6),
        (true, None) => {
            format!("P={:.0}% of the full trace's probe cost: bound {:.1} ms CPU/s", a.budget * 100.0, c.bound / 1e6)
        }
    };
    println!(
        "{} {bound_text}: {:?} selected {} functions ({} of them called under the workload, {} in F^callstack), block coverage {:.2}% ({}/{}), fitness {:.6}, {} round(s), {:.1} ms",
        structure.module,
        a.algorithm,
        c.selection.functions.len(),
        called,
        c.callstack.iter().filter(|x| **x).count(),
        pct(c.selection.covered),
        c.selection.covered,
        inst.blocks,
        c.selection.fitness,
        c.rounds,
        took.as_secs_f64() * 1e3
    );
    let p = &c.prediction;
    println!(
        "  predicted: {:.0} events/s ({:.0} with call stacks){}",
        p.events_per_s,
        p.stack_events_per_s,
        if costed {
            format!(
                ", probe CPU {:.1} ms/s = {:.0}% of the bound{}",
                p.probe_ns_per_s / 1e6,
                100.0 * p.probe_ns_per_s / c.bound.max(1e-9),
                if c.fits { "" } else { " (OVER: no selection fitted within the rounds)" }
            )
        } else {
            String::new()
        }
    );
    if !c.fits {
        tracing::warn!("the plan's predicted cost is over the bound");
    }
    let greedy = selection::greedy(inst, selection::bound_for(inst, a.budget));
    println!(
        "  greedy: {} functions, block coverage {:.2}%, weight {:.0} calls/s (on calls at P, for comparison)",
        greedy.functions.len(),
        pct(greedy.covered),
        greedy.weight
    );
}

fn write_plan(
    a: &SelectArgs,
    structure: &afetm_elf::structure::Structure,
    inst: &Instance,
    c: &Chosen,
    target: PathBuf,
) -> Result<()> {
    let name = |j: usize| structure.functions[j].name.clone();
    let callstack: Vec<String> = c.selection.functions.iter().filter(|j| c.callstack[**j]).map(|j| name(*j)).collect();
    if a.db.is_some() {
        println!("  F^callstack: {} functions", callstack.len());
    }
    let plan = PlanFile {
        target: Target { path: Some(target), pid: None },
        version: 0,
        points: c
            .selection
            .functions
            .iter()
            .map(|j| Point { function: name(*j), mode: if c.callstack[*j] { Mode::Callstack } else { Mode::Event } })
            .collect(),
        selection: Some(SelectionSummary {
            algorithm: format!("{:?}", a.algorithm).to_lowercase(),
            budget: a.budget,
            covered: c.selection.covered,
            blocks: inst.blocks,
            weight: c.selection.weight,
            bound: c.bound,
            fitness: c.selection.fitness,
            callstack,
            predicted: Some(Predicted {
                events_per_s: c.prediction.events_per_s,
                stack_events_per_s: c.prediction.stack_events_per_s,
                probe_ns_per_s: (a.costs.is_some()).then_some(c.prediction.probe_ns_per_s),
                max_overhead: a.max_overhead,
            }),
        }),
    };
    let json = serde_json::to_string_pretty(&plan)?;
    if a.out == "-" {
        println!("{json}");
    } else {
        std::fs::write(&a.out, json + "\n").with_context(|| format!("writing {}", a.out))?;
    }
    Ok(())
}
