//! The fault diagnosis database (AFETM, 004_eb31801e7dc37aff.txt, sec. III.C.1): for each
//! (function, fault), the FCTs of a **full** trace of the target, labelled tree by tree, plus
//! how each injection manifested and what the servers logged.
//!
//! Tables: `targets` (with the campaign's [`Settings`]), `traced` (the functions the full trace
//! covered: [`dataset`] colors only against plans inside that set), `functions` (DWARF
//! parameter counts, calls per second), `faults` (one row per (function, [`Fault`])), `fcts`
//! (unique per target by [`Forest::hash`]), `runs` (one injection or normal run, its
//! [`Role`], [`RunStatus`], manifestation, drops and phase timings), `run_trees` (every tree of
//! a run: process, thread, window start, whether the fault reached it, whether it equals a
//! normal tree, and its own calls per node, [`Forest::canonical_calls`]: the tree is its
//! structure's FCT with these calls), `applications` (where and when the injector applied the fault) and `logs`.
//!
//! Labels: a tree of a fault run is *faulty* when the runner says the fault reached its thread
//! and window; every other tree is normal. A faulty tree whose structure equals a tree of a
//! normal run is kept but marked `normal_like`. Novelty is per (function, fault) (the paper's
//! stopping rule): a run's new FCTs are its faulty, not normal-like trees that no earlier
//! training run of the same fault produced.
//!
//! Resuming: a run is written in one transaction ([`Fddb::record_run`]) together with its
//! fault's done flag, so an interrupted campaign leaves no half run. [`exchange`] moves the
//! content between databases as JSON lines; [`dataset`] writes the trees for training.
#![deny(missing_docs)]

use std::{collections::HashSet, path::Path, str::FromStr};

use afetm_calltree::tree::{Forest, FuncTable};
pub use afetm_fault::{Applied, Fault, FaultKind};
use afetm_proto as pb;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// Length of the analyzer windows the campaign cuts runs into, ms: every FCT of the FDDB is
/// one thread's tree of a window this long, and a model trained on them expects the same.
pub const WINDOW_MS: u64 = 1000;

pub mod dataset;
pub mod exchange;

/// What can go wrong with an FDDB.
#[derive(Debug, thiserror::Error)]
pub enum FddbError {
    /// SQLite said no.
    #[error("FDDB: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A file could not be read or written.
    #[error("FDDB file {0}: {1}")]
    Io(String, std::io::Error),
    /// A line of an export could not be imported.
    #[error("FDDB export line {0}: {1}")]
    Import(usize, String),
    /// The database was written by another version of afetm.
    #[error(
        "FDDB {path}: schema version {found}, this afetm reads {SCHEMA_VERSION}; re-run the campaign into a new --db"
    )]
    Schema {
        /// The database file.
        path: String,
        /// Its `user_version`.
        found: i64,
    },
    /// A stored value does not parse (a fault spec, a tree).
    #[error("FDDB: stored {0}")]
    Stored(String),
    /// A plan asks for something the stored data cannot give.
    #[error("{0}")]
    Plan(String),
    /// A lookup that names nothing or more than one thing (an FCT hash prefix).
    #[error("FDDB: {0}")]
    Lookup(String),
}

/// The schema this code reads and writes (`PRAGMA user_version`). Version 2 to 6 databases
/// are upgraded in place ([`MIGRATE_2_3`], [`MIGRATE_3_4`], [`MIGRATE_4_5`], [`MIGRATE_5_6`],
/// [`MIGRATE_6_7`]).
pub const SCHEMA_VERSION: i64 = 7;

/// Version 6 -> 7: each window's own calls (`run_trees.calls`). `fcts` keeps one tree per
/// structure (`Forest::hash`, calls left out), so a window used to read the calls of the first
/// window of its shape: on a redis campaign 18 of 28 normal windows did. Trees recorded before
/// have none and read their FCT's calls, as they did.
const MIGRATE_6_7: &str = "
ALTER TABLE run_trees ADD COLUMN calls BLOB;
";

/// Version 5 -> 6: where each thread was when it took its fate's signal (fates recorded
/// before have no stack).
const MIGRATE_5_6: &str = "
ALTER TABLE run_fates ADD COLUMN stack TEXT NOT NULL DEFAULT '[]';
";

/// Version 4 -> 5: how a run's tier started (runs recorded before were all warmed up).
const MIGRATE_4_5: &str = "
ALTER TABLE runs ADD COLUMN start TEXT NOT NULL DEFAULT 'warm';
";

/// Version 3 -> 4: thread fates (runs recorded before have none).
const MIGRATE_3_4: &str = "
CREATE TABLE IF NOT EXISTS run_fates (run_id INTEGER NOT NULL REFERENCES runs(id), pid INTEGER NOT NULL,
  tid INTEGER NOT NULL, window_start_ns INTEGER NOT NULL, ts_ns INTEGER NOT NULL, kind TEXT NOT NULL,
  code INTEGER NOT NULL, took_signal INTEGER NOT NULL, last_calls TEXT NOT NULL,
  PRIMARY KEY (run_id, pid, tid, window_start_ns));
";

/// Version 2 -> 3: faults held out of training (`held_out`) and window ends (`end_ns`; NULL
/// for trees recorded before, read as "ended after the injection": the campaign cut every
/// run's windows at the run's start and closed them at its end).
const MIGRATE_2_3: &str = "
ALTER TABLE faults ADD COLUMN held_out TEXT;
ALTER TABLE run_trees ADD COLUMN end_ns INTEGER;
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS targets (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, module TEXT NOT NULL,
  settings TEXT);
CREATE TABLE IF NOT EXISTS traced (target_id INTEGER NOT NULL REFERENCES targets(id), name TEXT NOT NULL,
  PRIMARY KEY (target_id, name));
CREATE TABLE IF NOT EXISTS functions (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL REFERENCES targets(id),
  name TEXT NOT NULL, params INTEGER, returns_value INTEGER, calls_per_sec REAL NOT NULL DEFAULT 0,
  UNIQUE(target_id, name));
CREATE TABLE IF NOT EXISTS faults (id INTEGER PRIMARY KEY, function_id INTEGER NOT NULL REFERENCES functions(id),
  kind TEXT NOT NULL, spec TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, held_out TEXT, UNIQUE(function_id, spec));
CREATE TABLE IF NOT EXISTS fcts (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL REFERENCES targets(id),
  hash TEXT NOT NULL, nodes INTEGER NOT NULL, truncated INTEGER NOT NULL DEFAULT 0, tree BLOB NOT NULL,
  UNIQUE(target_id, hash));
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL REFERENCES targets(id),
  fault_id INTEGER REFERENCES faults(id), role TEXT NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL,
  manifestation TEXT NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL, mean_latency_us REAL NOT NULL,
  applied INTEGER NOT NULL, kernel_drops INTEGER NOT NULL, queue_drops INTEGER NOT NULL,
  restart_ms INTEGER NOT NULL, inject_ms INTEGER NOT NULL, load_ms INTEGER NOT NULL, collect_ms INTEGER NOT NULL,
  wall_ms INTEGER NOT NULL, new_fcts INTEGER NOT NULL, start TEXT NOT NULL DEFAULT 'warm');
CREATE TABLE IF NOT EXISTS run_trees (run_id INTEGER NOT NULL REFERENCES runs(id),
  fct_id INTEGER NOT NULL REFERENCES fcts(id), pid INTEGER NOT NULL, tid INTEGER NOT NULL, start_ns INTEGER NOT NULL,
  faulty INTEGER NOT NULL, normal_like INTEGER NOT NULL, end_ns INTEGER, calls BLOB,
  PRIMARY KEY (run_id, pid, tid, start_ns));
CREATE TABLE IF NOT EXISTS applications (run_id INTEGER NOT NULL REFERENCES runs(id), pid INTEGER NOT NULL,
  tid INTEGER NOT NULL, first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS logs (run_id INTEGER NOT NULL REFERENCES runs(id), source TEXT NOT NULL, excerpt TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS run_fates (run_id INTEGER NOT NULL REFERENCES runs(id), pid INTEGER NOT NULL,
  tid INTEGER NOT NULL, window_start_ns INTEGER NOT NULL, ts_ns INTEGER NOT NULL, kind TEXT NOT NULL,
  code INTEGER NOT NULL, took_signal INTEGER NOT NULL, last_calls TEXT NOT NULL, stack TEXT NOT NULL DEFAULT '[]',
  PRIMARY KEY (run_id, pid, tid, window_start_ns));
CREATE INDEX IF NOT EXISTS runs_fault ON runs(fault_id, role);
CREATE INDEX IF NOT EXISTS run_trees_fct ON run_trees(fct_id);
";

/// How an injection showed from outside (AFETM's manifestation classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Manifestation {
    /// No fault (a normal run).
    Normal,
    /// The target process died.
    Crash,
    /// The target process stopped or stopped answering.
    Hang,
    /// Requests failed.
    Errors,
    /// Requests succeeded but clearly slower than in the normal runs.
    Slow,
    /// Nothing visible from outside.
    Nothing,
}

impl Manifestation {
    /// The name stored in the FDDB.
    pub fn as_str(&self) -> &'static str {
        match self {
            Manifestation::Normal => "normal",
            Manifestation::Crash => "crash",
            Manifestation::Hang => "hang",
            Manifestation::Errors => "errors",
            Manifestation::Slow => "slow",
            Manifestation::Nothing => "nothing",
        }
    }
}

/// Which side of the train/evaluation split a run is on. Evaluation runs are fresh injections
/// made after a fault's training runs; nothing that trains or tunes a model may read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Training (and validation) data.
    Train,
    /// Held out for the evaluation.
    Eval,
}

impl Role {
    /// The name stored in the FDDB.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Train => "train",
            Role::Eval => "eval",
        }
    }
}

/// How a run's tier started: warmed up before its windows begin, or cold, its first windows
/// holding the first requests a freshly started server serves (its tables growing, its
/// per-command state made on first use), as after every restart in production (issue 23:
/// "held-out normal runs must include restarts and start-up windows").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// Half a second of the workload before the run's windows begin.
    #[default]
    Warm,
    /// The run's windows begin as the tier starts serving.
    Cold,
}

impl Start {
    /// The name stored in the FDDB.
    pub fn as_str(&self) -> &'static str {
        match self {
            Start::Warm => "warm",
            Start::Cold => "cold",
        }
    }
}

impl FromStr for Start {
    type Err = String;

    fn from_str(s: &str) -> Result<Start, String> {
        match s {
            "warm" => Ok(Start::Warm),
            "cold" => Ok(Start::Cold),
            _ => Err(format!("start {s:?}: expected warm or cold")),
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "train" => Ok(Role::Train),
            "eval" => Ok(Role::Eval),
            _ => Err(format!("role {s:?}: expected train or eval")),
        }
    }
}

/// Why a fault has no training runs: the evaluation's unseen specs (issue 23, "Unseen specs").
/// A fault without one is a training fault, scored on its own spec again ("same spec").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldOut {
    /// Another argument, bit or N of a (function, kind) that training did see.
    Spec,
    /// A function no training run injected into.
    Function,
}

impl HeldOut {
    /// The name stored in the FDDB.
    pub fn as_str(&self) -> &'static str {
        match self {
            HeldOut::Spec => "spec",
            HeldOut::Function => "function",
        }
    }
}

impl FromStr for HeldOut {
    type Err = String;

    fn from_str(s: &str) -> Result<HeldOut, String> {
        match s {
            "spec" => Ok(HeldOut::Spec),
            "function" => Ok(HeldOut::Function),
            _ => Err(format!("held_out {s:?}: expected spec or function")),
        }
    }
}

fn held_out_of(stored: Option<String>) -> Result<Option<HeldOut>, FddbError> {
    stored.map(|s| s.parse().map_err(FddbError::Stored)).transpose()
}

/// Whether a run's trees can be trusted as labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// A valid run: nothing lost, and (for a fault run) the fault was applied.
    Ok,
    /// The injector never applied the fault (the function was not called in the victims).
    NotActivated,
    /// Events were lost (kernel ring or agent queue): its trees would be wrong labels.
    Dropped,
}

impl RunStatus {
    /// The name stored in the FDDB.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::NotActivated => "not_activated",
            RunStatus::Dropped => "dropped",
        }
    }
}

/// A campaign's settings, stored with its target so that a resumed campaign can say what
/// changed instead of silently ignoring it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The scope the fault plan was made for (`all`, `top:N`, ...).
    pub scope: String,
    /// Seed of the scope's sample and of the flipped bits.
    pub seed: u64,
    /// Training runs per fault at most.
    pub cap: u32,
    /// Evaluation runs per fault (and normal evaluation runs).
    pub eval_runs: u32,
    /// Normal training runs.
    pub normal_runs: u32,
    /// Load per run after its fault-free lead, ms.
    pub window_ms: u64,
    /// The workload's fixed rate, requests per second.
    pub rate: f64,
    /// Items the campaign's shop is seeded with; the workload draws its ids from them, so they
    /// set how many of its finds miss the Redis cache (and go on to SQLite and a `SETEX`).
    /// The shops that serve (the tests', the demo's, `cargo xtask eval`'s live runs) hold
    /// `testbed::Config`'s default 200; FDDBs written before this field held 50.
    #[serde(default = "items_before_stored")]
    pub items: u32,
}

/// The shop's items in campaigns whose settings did not store them.
fn items_before_stored() -> u32 {
    50
}

/// A function of a target and what its signature allows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionRow {
    /// Symbol name.
    pub name: String,
    /// Parameters from DWARF (None without debug info).
    pub params: Option<u32>,
    /// Whether it returns a value (None without debug info).
    pub returns_value: Option<bool>,
    /// Calls per second while sampling.
    pub calls_per_sec: f64,
}

/// A fault with work left: training runs until done, then evaluation runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingFault {
    /// Row id.
    pub id: i64,
    /// The faulty function.
    pub function: String,
    /// The fault.
    pub fault: Fault,
    /// Whether its training runs are over.
    pub done: bool,
    /// Training runs so far (all statuses).
    pub train_runs: u64,
    /// Evaluation runs so far (all statuses).
    pub eval_runs: u64,
}

/// Whether recording a training run finishes its fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Finished whatever the run brought.
    Yes,
    /// Not finished.
    No,
    /// Finished when the run was valid and added no FCT new for its fault (AFETM: inject until
    /// nothing new appears).
    IfNothingNew,
}

/// Wall time of a run by phase, ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    /// Restarting the target's tier and restoring its data.
    pub restart_ms: u64,
    /// Starting the injectors.
    pub inject_ms: u64,
    /// The workload.
    pub load_ms: u64,
    /// Stopping injectors, closing windows, fetching trees.
    pub collect_ms: u64,
}

/// One finished run: what happened, what was lost, where the fault was applied.
#[derive(Clone, Debug)]
pub struct Run {
    /// Train or eval.
    pub role: Role,
    /// Valid, not activated, or dropped events.
    pub status: RunStatus,
    /// How it showed from outside.
    pub manifestation: Manifestation,
    /// Requests sent.
    pub requests: u64,
    /// Requests failed.
    pub errors: u64,
    /// Mean latency, us.
    pub mean_latency_us: f64,
    /// Calls the fault was applied to.
    pub applied: u64,
    /// Ring buffer records lost during the run.
    pub kernel_drops: u64,
    /// Events the agent's queue dropped during the run.
    pub queue_drops: u64,
    /// Time by phase.
    pub phases: Phases,
    /// How its tier started.
    pub start: Start,
    /// Whole run, ms.
    pub wall_ms: u64,
    /// (log source, excerpt)
    pub logs: Vec<(String, String)>,
    /// Where and when the fault was applied.
    pub applications: Vec<Applied>,
    /// How the run's threads ended or stopped before the harness ended the run (the
    /// analyzer's fates, with the full trace's last calls).
    pub fates: Vec<RunFate>,
}

/// A thread's fate in a run: the analyzer's [`pb::ThreadFate`] (the full trace's last calls,
/// "module:function", oldest first) and the window it fell in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFate {
    /// Start of the window the fate fell in (agent clock, ns): the key of the thread's tree
    /// there, if it made calls in it.
    pub window_start_ns: u64,
    /// Process.
    pub pid: u32,
    /// Thread.
    pub tid: u32,
    /// When (agent clock, ns).
    pub ts_ns: u64,
    /// How it ended or stopped.
    pub kind: FateKind,
    /// Exit status or signal.
    pub code: i32,
    /// The thread took a fault's signal itself.
    pub took_signal: bool,
    /// Its last traced calls, oldest first ("module:function").
    pub last_calls: Vec<String>,
    /// Where it was when it took its fate's signal, innermost first ("module:function";
    /// [`pb::ThreadFate::stack`]): the kernel's view, the same under any plan. Empty when
    /// unknown (an exit without a signal, fates recorded before schema 6).
    #[serde(default)]
    pub stack: Vec<String>,
}

/// How a thread ended or stopped ([`pb::FateKind`] without its unspecified value); stored
/// as its lower-case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FateKind {
    /// Left on its own; `code` is the exit status.
    Exited,
    /// Ended by the signal `code`.
    Killed,
    /// Stopped by the signal `code`.
    Stopped,
    /// Made calls in the window before and none in this one while its process lived.
    Silent,
}

impl FateKind {
    const ALL: [FateKind; 4] = [FateKind::Exited, FateKind::Killed, FateKind::Stopped, FateKind::Silent];

    /// The name stored in the `kind` column.
    pub fn name(self) -> &'static str {
        match self {
            FateKind::Exited => "exited",
            FateKind::Killed => "killed",
            FateKind::Stopped => "stopped",
            FateKind::Silent => "silent",
        }
    }

    fn parse(name: &str) -> Option<FateKind> {
        FateKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl RunFate {
    /// The fate of `f` in the window starting at `window_start_ns`; `None` for a fate of no
    /// known kind.
    pub fn new(window_start_ns: u64, f: &pb::ThreadFate) -> Option<RunFate> {
        let kind = match pb::FateKind::try_from(f.kind).ok()? {
            pb::FateKind::Exited => FateKind::Exited,
            pb::FateKind::Killed => FateKind::Killed,
            pb::FateKind::Stopped => FateKind::Stopped,
            pb::FateKind::Silent => FateKind::Silent,
            pb::FateKind::Unspecified => return None,
        };
        Some(RunFate {
            window_start_ns,
            pid: f.pid,
            tid: f.tid,
            ts_ns: f.ts_ns,
            kind,
            code: f.code,
            took_signal: f.took_signal,
            last_calls: f.last_calls.clone(),
            stack: f.stack.clone(),
        })
    }

    /// As the analyzer serves it in a window's fates.
    pub fn to_proto(&self) -> pb::ThreadFate {
        let kind = match self.kind {
            FateKind::Exited => pb::FateKind::Exited,
            FateKind::Killed => pb::FateKind::Killed,
            FateKind::Stopped => pb::FateKind::Stopped,
            FateKind::Silent => pb::FateKind::Silent,
        };
        pb::ThreadFate {
            pid: self.pid,
            tid: self.tid,
            ts_ns: self.ts_ns,
            kind: kind as i32,
            code: self.code,
            last_calls: self.last_calls.clone(),
            took_signal: self.took_signal,
            fault_calls: Vec::new(),
            stack_ids: Vec::new(),
            stack: self.stack.clone(),
        }
    }
}

/// A stored run as the evaluation reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunInfo {
    /// The run's row id.
    pub id: i64,
    /// The run's fault as (function, kind, fault text); None for a normal run.
    pub fault: Option<(String, String, String)>,
    /// How it showed from outside.
    pub manifestation: String,
    /// Requests failed.
    pub errors: u64,
    /// Requests sent.
    pub requests: u64,
    /// Whether the run's fault was held out of training, and why (None: a training fault, or
    /// a normal run).
    pub held_out: Option<HeldOut>,
    /// How its tier started.
    pub start: Start,
}

/// Runs of one target and role by status, fault runs and normal runs apart: what a score's
/// denominators (valid runs only) leave out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Valid fault runs.
    pub fault_ok: u64,
    /// Fault runs whose fault was never applied.
    pub fault_not_activated: u64,
    /// Fault runs that lost events.
    pub fault_dropped: u64,
    /// Valid normal runs.
    pub normal_ok: u64,
    /// Normal runs that lost events.
    pub normal_dropped: u64,
}

/// One tree of a run with its label.
#[derive(Clone, Debug)]
pub struct LabelledTree {
    /// The FCT.
    pub forest: Forest,
    /// Its functions.
    pub table: FuncTable,
    /// Process.
    pub pid: u32,
    /// Thread.
    pub tid: u32,
    /// Start of its window (agent clock, ns).
    pub start_ns: u64,
    /// End of its window (agent clock, ns): a window that ended before the injection's first
    /// application is the run's lead, where an alarm is a false alarm.
    pub end_ns: u64,
    /// Whether the fault reached this thread and window.
    pub faulty: bool,
}

/// What recording a run added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The run's row id.
    pub run_id: i64,
    /// FCTs new for the fault (faulty, not normal-like, not produced by an earlier training
    /// run of the fault); for a normal run, trees not seen in earlier normal runs.
    pub new: usize,
    /// Faulty trees equal to a normal tree.
    pub normal_like: usize,
    /// Whether the fault is now done.
    pub done: bool,
}

/// Per-target figures for reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Functions in scope.
    pub functions: u64,
    /// Functions the full trace covered.
    pub traced: u64,
    /// Faults planned.
    pub faults: u64,
    /// Faults whose training runs are over.
    pub faults_done: u64,
    /// Faults per kind.
    pub faults_by_kind: Vec<(String, u64)>,
    /// Runs in all.
    pub runs: u64,
    /// Runs per `role/status`.
    pub runs_by_role_status: Vec<(String, u64)>,
    /// Not-activated fault runs per kind.
    pub not_activated_by_kind: Vec<(String, u64)>,
    /// Unique FCTs.
    pub unique_fcts: u64,
    /// Unique FCTs of valid normal runs.
    pub normal_fcts: u64,
    /// Unique FCTs cut at the analyzer's node cap (Alg. 3 unrolls the window's call graph;
    /// a full trace of a large library can exceed any cap).
    pub truncated_fcts: u64,
    /// Nodes of the unique FCTs: mean and max.
    pub fct_nodes_mean: f64,
    /// See `fct_nodes_mean`.
    pub fct_nodes_max: u64,
    /// Unique faulty, not normal-like FCTs per done fault: mean and max.
    pub fcts_per_fault_mean: f64,
    /// See `fcts_per_fault_mean`.
    pub fcts_per_fault_max: u64,
    /// Faulty trees (valid fault runs).
    pub faulty_trees: u64,
    /// Of those, equal to a normal tree.
    pub normal_like_trees: u64,
    /// Runs per manifestation.
    pub manifestations: Vec<(String, u64)>,
    /// Seconds per run: median and 90th percentile.
    pub seconds_per_run_median: f64,
    /// See `seconds_per_run_median`.
    pub seconds_per_run_p90: f64,
    /// Median time per phase.
    pub phases_median: Phases,
}

/// An open FDDB.
pub struct Fddb {
    conn: Connection,
}

fn parse_fault(spec: &str) -> Result<Fault, FddbError> {
    spec.parse().map_err(|e: afetm_fault::BadFault| FddbError::Stored(e.to_string()))
}

impl Fddb {
    /// Opens (creating if new) the FDDB at `path`; refuses one of another schema version.
    pub fn open(path: &Path) -> Result<Fddb, FddbError> {
        let conn = Connection::open(path)?;
        // A campaign writes while reports and tests read: wait for each other's locks.
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON;")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let tables: i64 =
            conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))?;
        let steps = match version {
            2 => Some([MIGRATE_2_3, MIGRATE_3_4, MIGRATE_4_5, MIGRATE_5_6, MIGRATE_6_7].concat()),
            3 => Some([MIGRATE_3_4, MIGRATE_4_5, MIGRATE_5_6, MIGRATE_6_7].concat()),
            4 => Some([MIGRATE_4_5, MIGRATE_5_6, MIGRATE_6_7].concat()),
            5 => Some([MIGRATE_5_6, MIGRATE_6_7].concat()),
            6 => Some(MIGRATE_6_7.to_string()),
            _ => None,
        };
        if let Some(steps) = steps
            && tables > 0
        {
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"))?;
        } else if version != SCHEMA_VERSION && (version != 0 || tables > 0) {
            return Err(FddbError::Schema { path: path.display().to_string(), found: version });
        }
        if version == 0 {
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"))?;
        }
        Ok(Fddb { conn })
    }

    /// The target's id, created if new.
    pub fn target(&mut self, name: &str, module: &str) -> Result<i64, FddbError> {
        self.conn.execute(
            "INSERT INTO targets(name, module) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET module = ?2",
            params![name, module],
        )?;
        Ok(self.conn.query_row("SELECT id FROM targets WHERE name = ?1", [name], |r| r.get(0))?)
    }

    /// The module (file name) of a target.
    pub fn module(&self, target: i64) -> Result<String, FddbError> {
        Ok(self.conn.query_row("SELECT module FROM targets WHERE id = ?1", [target], |r| r.get(0))?)
    }

    /// The campaign settings stored with a target (None before its first campaign).
    pub fn settings(&self, target: i64) -> Result<Option<Settings>, FddbError> {
        let text: Option<String> =
            self.conn.query_row("SELECT settings FROM targets WHERE id = ?1", [target], |r| r.get(0))?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| FddbError::Stored(format!("settings: {e}")))).transpose()
    }

    /// Stores a target's campaign settings.
    pub fn set_settings(&mut self, target: i64, s: &Settings) -> Result<(), FddbError> {
        let text = serde_json::to_string(s).map_err(|e| FddbError::Stored(e.to_string()))?;
        self.conn.execute("UPDATE targets SET settings = ?1 WHERE id = ?2", params![text, target])?;
        Ok(())
    }

    /// Records the functions the campaign's full trace covers (added to those already there).
    pub fn add_traced(&mut self, target: i64, names: &[String]) -> Result<(), FddbError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for n in names {
            tx.execute("INSERT OR IGNORE INTO traced(target_id, name) VALUES (?1, ?2)", params![target, n])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The functions the campaign's full trace covers.
    pub fn traced(&self, target: i64) -> Result<HashSet<String>, FddbError> {
        let mut st = self.conn.prepare("SELECT name FROM traced WHERE target_id = ?1")?;
        let rows = st.query_map([target], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a function (updating its signature and weight) and returns its id.
    pub fn function(&mut self, target: i64, f: &FunctionRow) -> Result<i64, FddbError> {
        self.conn.execute(
            "INSERT INTO functions(target_id, name, params, returns_value, calls_per_sec) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(target_id, name) DO UPDATE SET params = ?3, returns_value = ?4, calls_per_sec = ?5",
            params![target, f.name, f.params, f.returns_value, f.calls_per_sec],
        )?;
        Ok(self.conn.query_row(
            "SELECT id FROM functions WHERE target_id = ?1 AND name = ?2",
            params![target, f.name],
            |r| r.get(0),
        )?)
    }

    /// Adds a fault unless that (function, fault) is already there; returns its id.
    pub fn fault(&mut self, function: i64, fault: Fault) -> Result<i64, FddbError> {
        let spec = fault.to_string();
        self.conn.execute(
            "INSERT OR IGNORE INTO faults(function_id, kind, spec) VALUES (?1, ?2, ?3)",
            params![function, fault.kind().as_str(), spec],
        )?;
        Ok(self.conn.query_row(
            "SELECT id FROM faults WHERE function_id = ?1 AND spec = ?2",
            params![function, spec],
            |r| r.get(0),
        )?)
    }

    /// Adds a fault held out of training (see [`HeldOut`]): it is done from the start, so it
    /// only gets evaluation runs. A spec already planned for training stays a training fault
    /// (the two never share a row). Returns its id.
    pub fn held_out_fault(&mut self, function: i64, fault: Fault, why: HeldOut) -> Result<i64, FddbError> {
        let spec = fault.to_string();
        self.conn.execute(
            "INSERT OR IGNORE INTO faults(function_id, kind, spec, done, held_out) VALUES (?1, ?2, ?3, 1, ?4)",
            params![function, fault.kind().as_str(), spec, why.as_str()],
        )?;
        Ok(self.conn.query_row(
            "SELECT id FROM faults WHERE function_id = ?1 AND spec = ?2",
            params![function, spec],
            |r| r.get(0),
        )?)
    }

    /// Faults of a target with work left (not done, or fewer than `eval_runs` evaluation
    /// runs), in insertion order.
    pub fn pending(&self, target: i64, eval_runs: u64) -> Result<Vec<PendingFault>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT fa.id, fu.name, fa.spec, fa.done,
               (SELECT COUNT(*) FROM runs r WHERE r.fault_id = fa.id AND r.role = 'train'),
               (SELECT COUNT(*) FROM runs r WHERE r.fault_id = fa.id AND r.role = 'eval')
             FROM faults fa JOIN functions fu ON fu.id = fa.function_id WHERE fu.target_id = ?1 ORDER BY fa.id",
        )?;
        let rows = st.query_map([target], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, i64>(4)? as u64,
                r.get::<_, i64>(5)? as u64,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, function, spec, done, train_runs, evals) = row?;
            if !done || evals < eval_runs {
                out.push(PendingFault { id, function, fault: parse_fault(&spec)?, done, train_runs, eval_runs: evals });
            }
        }
        Ok(out)
    }

    /// Records a finished run of `fault` (None: a normal run) with its labelled trees, in one
    /// transaction, which also marks the fault done as `done` says (training runs only).
    pub fn record_run(
        &mut self,
        target: i64,
        fault: Option<i64>,
        run: &Run,
        trees: &[LabelledTree],
        done: Done,
    ) -> Result<Recorded, FddbError> {
        // IMMEDIATE: a deferred transaction that reads first cannot wait for another writer.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let attempt: i64 = tx.query_row(
            "SELECT COUNT(*) FROM runs WHERE target_id = ?1 AND fault_id IS ?2 AND role = ?3",
            params![target, fault, run.role.as_str()],
            |r| r.get(0),
        )?;
        let row = RunRow {
            target,
            fault,
            role: run.role.as_str(),
            attempt: attempt + 1,
            status: run.status.as_str(),
            manifestation: run.manifestation.as_str(),
            requests: run.requests as i64,
            errors: run.errors as i64,
            mean_latency_us: run.mean_latency_us,
            applied: run.applied as i64,
            kernel_drops: run.kernel_drops as i64,
            queue_drops: run.queue_drops as i64,
            phases: run.phases,
            start: run.start.as_str(),
            wall_ms: run.wall_ms as i64,
            new_fcts: 0,
        };
        let run_id = insert_run(&tx, &row, &run.logs, &run.applications)?;
        insert_fates(&tx, run_id, &run.fates)?;
        let normal: HashSet<i64> = ids(
            &tx,
            "SELECT DISTINCT rt.fct_id FROM run_trees rt JOIN runs r ON r.id = rt.run_id
             WHERE r.target_id = ?1 AND r.fault_id IS NULL AND r.status = 'ok' AND r.id != ?2",
            params![target, run_id],
        )?;
        // What earlier training runs of the same fault (or earlier normal runs) produced.
        let seen: HashSet<i64> = match fault {
            Some(f) => ids(
                &tx,
                "SELECT DISTINCT rt.fct_id FROM run_trees rt JOIN runs r ON r.id = rt.run_id
                 WHERE r.fault_id = ?1 AND r.role = 'train' AND r.status = 'ok' AND rt.faulty = 1 AND rt.normal_like = 0
                   AND r.id != ?2",
                params![f, run_id],
            )?,
            None => normal.clone(),
        };
        let mut new: HashSet<i64> = HashSet::new();
        let mut normal_like = 0;
        for t in trees {
            let fct = store_fct(&tx, target, &t.forest, &t.table)?;
            let faulty = fault.is_some() && t.faulty;
            let like = faulty && normal.contains(&fct);
            normal_like += like as usize;
            let counts = if fault.is_some() { faulty && !like } else { true };
            if run.status == RunStatus::Ok && counts && !seen.contains(&fct) {
                new.insert(fct);
            }
            tx.execute(
                "INSERT OR REPLACE INTO run_trees(run_id, fct_id, pid, tid, start_ns, faulty, normal_like, end_ns, calls)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    run_id,
                    fct,
                    t.pid,
                    t.tid,
                    t.start_ns as i64,
                    faulty,
                    like,
                    t.end_ns as i64,
                    encode_calls(&t.forest.canonical_calls(&t.table))
                ],
            )?;
        }
        tx.execute("UPDATE runs SET new_fcts = ?1 WHERE id = ?2", params![new.len() as i64, run_id])?;
        let fault_done = run.role == Role::Train
            && match done {
                Done::Yes => true,
                Done::No => false,
                Done::IfNothingNew => run.status == RunStatus::Ok && new.is_empty(),
            };
        if fault_done && let Some(f) = fault {
            tx.execute("UPDATE faults SET done = 1 WHERE id = ?1", [f])?;
        }
        tx.commit()?;
        Ok(Recorded { run_id, new: new.len(), normal_like, done: fault_done })
    }

    /// Marks a fault's training runs over.
    pub fn mark_done(&mut self, fault: i64) -> Result<(), FddbError> {
        self.conn.execute("UPDATE faults SET done = 1 WHERE id = ?1", [fault])?;
        Ok(())
    }

    /// The fault of target `name` whose valid training runs most often manifested as
    /// `manifestation` (ties, and no such run at all: plan order), as (function, fault); None
    /// if no fault has a valid training run.
    pub fn fault_most_manifesting(
        &self,
        name: &str,
        manifestation: Manifestation,
    ) -> Result<Option<(String, String)>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT fu.name, fa.spec FROM runs r JOIN faults fa ON fa.id = r.fault_id
             JOIN functions fu ON fu.id = fa.function_id JOIN targets t ON t.id = r.target_id
             WHERE t.name = ?1 AND r.role = 'train' AND r.status = 'ok'
             GROUP BY fa.id ORDER BY SUM(r.manifestation = ?2) DESC, fa.id LIMIT 1",
        )?;
        Ok(st.query_row(params![name, manifestation.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional()?)
    }

    /// Every fault planned for target `name` as (function, fault, why it was held out of
    /// training), in plan order.
    pub fn faults_of(&self, name: &str) -> Result<Vec<(String, Fault, Option<HeldOut>)>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT fu.name, fa.spec, fa.held_out FROM faults fa JOIN functions fu ON fu.id = fa.function_id
             JOIN targets t ON t.id = fu.target_id WHERE t.name = ?1 ORDER BY fa.id",
        )?;
        let rows = st.query_map([name], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (function, spec, held) = row?;
            out.push((function, parse_fault(&spec)?, held_out_of(held)?));
        }
        Ok(out)
    }

    /// Normal runs recorded for a target in `role`: (all, valid).
    pub fn normal_runs(&self, target: i64, role: Role) -> Result<(u64, u64), FddbError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COUNT(CASE WHEN status = 'ok' THEN 1 END) FROM runs
             WHERE target_id = ?1 AND fault_id IS NULL AND role = ?2",
            params![target, role.as_str()],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Mean request latency of the valid normal training runs (0 without any).
    pub fn normal_mean_latency(&self, target: i64) -> Result<f64, FddbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT AVG(mean_latency_us) FROM runs
                 WHERE target_id = ?1 AND fault_id IS NULL AND role = 'train' AND status = 'ok'",
                [target],
                |r| r.get::<_, Option<f64>>(0),
            )?
            .unwrap_or(0.0))
    }

    /// Distinct FCTs of valid normal runs of a target (any role).
    pub fn normal_fcts(&self, target: i64) -> Result<Vec<pb::Tree>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT DISTINCT f.id, f.tree FROM fcts f JOIN run_trees rt ON rt.fct_id = f.id JOIN runs r ON r.id = rt.run_id
             WHERE r.target_id = ?1 AND r.fault_id IS NULL AND r.status = 'ok' ORDER BY f.id",
        )?;
        let rows = st.query_map([target], |r| r.get::<_, Vec<u8>>(1))?;
        rows.map(|b| decode_tree(&b?)).collect()
    }

    /// The FCT of target `name` whose hash starts with `prefix` (at least 6 hex digits, as
    /// `export` and `dataset` print them): `None` when none does; an error when several do.
    pub fn fct(&self, name: &str, prefix: &str) -> Result<Option<pb::Tree>, FddbError> {
        if prefix.len() < 6 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FddbError::Lookup(format!("FCT hash prefix {prefix:?}: give at least 6 hex digits")));
        }
        let mut st = self.conn.prepare(
            "SELECT f.hash, f.tree FROM fcts f JOIN targets t ON t.id = f.target_id
             WHERE t.name = ?1 AND substr(f.hash, 1, length(?2)) = lower(?2) LIMIT 2",
        )?;
        let rows: Vec<(String, Vec<u8>)> =
            st.query_map(params![name, prefix], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        match rows.as_slice() {
            [] => Ok(None),
            [(_, tree)] => decode_tree(tree).map(Some),
            [(a, _), (b, _), ..] => {
                Err(FddbError::Lookup(format!("FCT hash prefix {prefix:?} is ambiguous ({a}, {b}, ...)")))
            }
        }
    }

    /// The valid runs (status `ok`) of target `name` in `role`, in run order.
    pub fn valid_runs(&self, name: &str, role: Role) -> Result<Vec<RunInfo>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT r.id, fu.name, fa.kind, fa.spec, r.manifestation, r.errors, r.requests, fa.held_out, r.start
             FROM runs r JOIN targets t ON t.id = r.target_id LEFT JOIN faults fa ON fa.id = r.fault_id
             LEFT JOIN functions fu ON fu.id = fa.function_id
             WHERE t.name = ?1 AND r.role = ?2 AND r.status = 'ok' ORDER BY r.id",
        )?;
        let rows = st.query_map(params![name, role.as_str()], |r| {
            let fault = match r.get::<_, Option<String>>(1)? {
                Some(function) => Some((function, r.get(2)?, r.get(3)?)),
                None => None,
            };
            Ok(RunInfo {
                id: r.get(0)?,
                fault,
                manifestation: r.get(4)?,
                errors: r.get::<_, i64>(5)? as u64,
                requests: r.get::<_, i64>(6)? as u64,
                held_out: None,
                start: Start::default(),
            })
            .map(|info| (info, r.get::<_, Option<String>>(7), r.get::<_, String>(8)))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut info, held, start) = row?;
            info.held_out = held_out_of(held?)?;
            info.start = start?.parse().map_err(FddbError::Stored)?;
            out.push(info);
        }
        Ok(out)
    }

    /// Runs of target `name` in `role` by status (see [`RunCounts`]).
    pub fn run_counts(&self, name: &str, role: Role) -> Result<RunCounts, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT r.fault_id IS NULL, r.status, COUNT(*) FROM runs r JOIN targets t ON t.id = r.target_id
             WHERE t.name = ?1 AND r.role = ?2 GROUP BY 1, 2",
        )?;
        let rows = st.query_map(params![name, role.as_str()], |r| {
            Ok((r.get::<_, bool>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        let mut c = RunCounts::default();
        for row in rows {
            let (normal, status, n) = row?;
            let slot = match (normal, status.as_str()) {
                (false, "ok") => &mut c.fault_ok,
                (false, "not_activated") => &mut c.fault_not_activated,
                (false, "dropped") => &mut c.fault_dropped,
                (true, "ok") => &mut c.normal_ok,
                (true, "dropped") => &mut c.normal_dropped,
                (_, other) => return Err(FddbError::Stored(format!("run status {other:?}"))),
            };
            *slot += n;
        }
        Ok(c)
    }

    /// Where and when a run's fault was applied, earliest first.
    pub fn run_applications(&self, run: i64) -> Result<Vec<Applied>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT pid, tid, first_ns, last_ns, count FROM applications WHERE run_id = ?1 ORDER BY first_ns, tid",
        )?;
        let rows = st.query_map([run], |r| {
            Ok(Applied {
                pid: r.get(0)?,
                tid: r.get(1)?,
                first_ns: r.get::<_, i64>(2)? as u64,
                last_ns: r.get::<_, i64>(3)? as u64,
                count: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How a run's threads ended or stopped, by process, thread and window.
    pub fn run_fates(&self, run: i64) -> Result<Vec<RunFate>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT window_start_ns, pid, tid, ts_ns, kind, code, took_signal, last_calls, stack FROM run_fates
             WHERE run_id = ?1 ORDER BY pid, tid, window_start_ns",
        )?;
        let rows = st.query_map([run], |r| {
            Ok((
                RunFate {
                    window_start_ns: r.get::<_, i64>(0)? as u64,
                    pid: r.get(1)?,
                    tid: r.get(2)?,
                    ts_ns: r.get::<_, i64>(3)? as u64,
                    kind: FateKind::Exited,
                    code: r.get(5)?,
                    took_signal: r.get(6)?,
                    last_calls: Vec::new(),
                    stack: Vec::new(),
                },
                r.get::<_, String>(4)?,
                r.get::<_, String>(7)?,
                r.get::<_, String>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut f, kind, calls, stack) = row?;
            f.kind = FateKind::parse(&kind)
                .ok_or_else(|| FddbError::Stored(format!("fate of run {run} thread {}: kind {kind:?}", f.tid)))?;
            f.last_calls = serde_json::from_str(&calls)
                .map_err(|e| FddbError::Stored(format!("last calls of run {run} thread {}: {e}", f.tid)))?;
            f.stack = serde_json::from_str(&stack)
                .map_err(|e| FddbError::Stored(format!("stack of run {run} thread {}: {e}", f.tid)))?;
            out.push(f);
        }
        Ok(out)
    }

    /// A run's log excerpts as (source, text), by source.
    pub fn run_logs(&self, run: i64) -> Result<Vec<(String, String)>, FddbError> {
        let mut st = self.conn.prepare("SELECT source, excerpt FROM logs WHERE run_id = ?1 ORDER BY source")?;
        let rows = st.query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Names of the targets in the database.
    pub fn targets(&self) -> Result<Vec<String>, FddbError> {
        let mut st = self.conn.prepare("SELECT name FROM targets ORDER BY name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A target's id by name.
    pub fn target_id(&self, name: &str) -> Result<Option<i64>, FddbError> {
        Ok(self.conn.query_row("SELECT id FROM targets WHERE name = ?1", [name], |r| r.get(0)).optional()?)
    }

    /// Figures of one target.
    pub fn summary(&self, target: i64) -> Result<Summary, FddbError> {
        let one = |sql: &str| -> Result<u64, FddbError> {
            Ok(self.conn.query_row(sql, [target], |r| r.get::<_, i64>(0))? as u64)
        };
        let pairs = |sql: &str| -> Result<Vec<(String, u64)>, FddbError> {
            let mut st = self.conn.prepare(sql)?;
            let rows = st.query_map([target], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        };
        let per_fault: Vec<(String, u64)> = pairs(
            "SELECT CAST(fa.id AS TEXT), COUNT(DISTINCT CASE WHEN rt.faulty = 1 AND rt.normal_like = 0 AND r.status = 'ok'
                 THEN rt.fct_id END)
             FROM faults fa JOIN functions fu ON fu.id = fa.function_id
             JOIN runs r ON r.fault_id = fa.id AND r.role = 'train' LEFT JOIN run_trees rt ON rt.run_id = r.id
             WHERE fu.target_id = ?1 AND fa.done = 1 GROUP BY fa.id",
        )?;
        let n = per_fault.len().max(1) as f64;
        let mut walls: Vec<Phases> = Vec::new();
        let mut totals: Vec<u64> = Vec::new();
        {
            let mut st = self.conn.prepare(
                "SELECT restart_ms, inject_ms, load_ms, collect_ms, wall_ms FROM runs WHERE target_id = ?1 AND wall_ms > 0",
            )?;
            let rows = st.query_map([target], |r| {
                Ok((
                    Phases {
                        restart_ms: r.get::<_, i64>(0)? as u64,
                        inject_ms: r.get::<_, i64>(1)? as u64,
                        load_ms: r.get::<_, i64>(2)? as u64,
                        collect_ms: r.get::<_, i64>(3)? as u64,
                    },
                    r.get::<_, i64>(4)? as u64,
                ))
            })?;
            for row in rows {
                let (p, w) = row?;
                walls.push(p);
                totals.push(w);
            }
        }
        let median = |mut v: Vec<u64>| -> u64 { quantile(&mut v, 0.5) };
        Ok(Summary {
            functions: one("SELECT COUNT(*) FROM functions WHERE target_id = ?1")?,
            traced: one("SELECT COUNT(*) FROM traced WHERE target_id = ?1")?,
            faults: one(
                "SELECT COUNT(*) FROM faults fa JOIN functions fu ON fu.id = fa.function_id WHERE fu.target_id = ?1",
            )?,
            faults_done: one(
                "SELECT COUNT(*) FROM faults fa JOIN functions fu ON fu.id = fa.function_id WHERE fu.target_id = ?1 AND fa.done = 1",
            )?,
            faults_by_kind: pairs(
                "SELECT fa.kind, COUNT(*) FROM faults fa JOIN functions fu ON fu.id = fa.function_id
                 WHERE fu.target_id = ?1 GROUP BY fa.kind ORDER BY fa.kind",
            )?,
            runs: one("SELECT COUNT(*) FROM runs WHERE target_id = ?1")?,
            runs_by_role_status: pairs(
                "SELECT role || '/' || status, COUNT(*) FROM runs WHERE target_id = ?1 GROUP BY role, status ORDER BY 1",
            )?,
            not_activated_by_kind: pairs(
                "SELECT fa.kind, COUNT(*) FROM runs r JOIN faults fa ON fa.id = r.fault_id
                 WHERE r.target_id = ?1 AND r.status = 'not_activated' GROUP BY fa.kind ORDER BY fa.kind",
            )?,
            unique_fcts: one("SELECT COUNT(*) FROM fcts WHERE target_id = ?1")?,
            normal_fcts: one("SELECT COUNT(DISTINCT rt.fct_id) FROM run_trees rt JOIN runs r ON r.id = rt.run_id
                 WHERE r.target_id = ?1 AND r.fault_id IS NULL AND r.status = 'ok'")?,
            truncated_fcts: one("SELECT COUNT(*) FROM fcts WHERE target_id = ?1 AND truncated = 1")?,
            fct_nodes_mean: self.conn.query_row(
                "SELECT COALESCE(AVG(nodes), 0) FROM fcts WHERE target_id = ?1",
                [target],
                |r| r.get(0),
            )?,
            fct_nodes_max: one("SELECT COALESCE(MAX(nodes), 0) FROM fcts WHERE target_id = ?1")?,
            fcts_per_fault_mean: per_fault.iter().map(|(_, c)| *c as f64).sum::<f64>() / n,
            fcts_per_fault_max: per_fault.iter().map(|(_, c)| *c).max().unwrap_or(0),
            faulty_trees: one("SELECT COUNT(*) FROM run_trees rt JOIN runs r ON r.id = rt.run_id
                 WHERE r.target_id = ?1 AND r.status = 'ok' AND rt.faulty = 1")?,
            normal_like_trees: one("SELECT COUNT(*) FROM run_trees rt JOIN runs r ON r.id = rt.run_id
                 WHERE r.target_id = ?1 AND r.status = 'ok' AND rt.faulty = 1 AND rt.normal_like = 1")?,
            manifestations: pairs(
                "SELECT manifestation, COUNT(*) FROM runs WHERE target_id = ?1 GROUP BY manifestation ORDER BY manifestation",
            )?,
            seconds_per_run_median: quantile(&mut totals.clone(), 0.5) as f64 / 1000.0,
            seconds_per_run_p90: quantile(&mut totals, 0.9) as f64 / 1000.0,
            phases_median: Phases {
                restart_ms: median(walls.iter().map(|p| p.restart_ms).collect()),
                inject_ms: median(walls.iter().map(|p| p.inject_ms).collect()),
                load_ms: median(walls.iter().map(|p| p.load_ms).collect()),
                collect_ms: median(walls.iter().map(|p| p.collect_ms).collect()),
            },
        })
    }
}

/// The `q` quantile (nearest rank) of `v`; 0 for none.
fn quantile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn ids(tx: &rusqlite::Transaction, sql: &str, p: impl rusqlite::Params) -> Result<HashSet<i64>, FddbError> {
    let mut st = tx.prepare(sql)?;
    let rows = st.query_map(p, |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A `runs` row as written, by [`Fddb::record_run`] and by an import.
struct RunRow<'a> {
    target: i64,
    fault: Option<i64>,
    role: &'a str,
    attempt: i64,
    status: &'a str,
    manifestation: &'a str,
    requests: i64,
    errors: i64,
    mean_latency_us: f64,
    applied: i64,
    kernel_drops: i64,
    queue_drops: i64,
    phases: Phases,
    start: &'a str,
    wall_ms: i64,
    new_fcts: i64,
}

/// Inserts a run with its log excerpts and applications; returns its id.
fn insert_run(
    tx: &rusqlite::Transaction,
    r: &RunRow,
    logs: &[(String, String)],
    applications: &[Applied],
) -> Result<i64, rusqlite::Error> {
    tx.execute(
        "INSERT INTO runs(target_id, fault_id, role, attempt, status, manifestation, requests, errors, mean_latency_us,
           applied, kernel_drops, queue_drops, restart_ms, inject_ms, load_ms, collect_ms, wall_ms, new_fcts, start)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
        params![
            r.target,
            r.fault,
            r.role,
            r.attempt,
            r.status,
            r.manifestation,
            r.requests,
            r.errors,
            r.mean_latency_us,
            r.applied,
            r.kernel_drops,
            r.queue_drops,
            r.phases.restart_ms as i64,
            r.phases.inject_ms as i64,
            r.phases.load_ms as i64,
            r.phases.collect_ms as i64,
            r.wall_ms,
            r.new_fcts,
            r.start
        ],
    )?;
    let run = tx.last_insert_rowid();
    for (source, excerpt) in logs {
        tx.execute("INSERT INTO logs(run_id, source, excerpt) VALUES (?1, ?2, ?3)", params![run, source, excerpt])?;
    }
    for a in applications {
        tx.execute(
            "INSERT INTO applications(run_id, pid, tid, first_ns, last_ns, count) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![run, a.pid, a.tid, a.first_ns as i64, a.last_ns as i64, a.count as i64],
        )?;
    }
    Ok(run)
}

/// A run's fates; a second fate of one thread in one window replaces the first (the store
/// keeps one per thread and window too).
fn insert_fates(tx: &rusqlite::Transaction, run: i64, fates: &[RunFate]) -> Result<(), FddbError> {
    for f in fates {
        let calls = serde_json::to_string(&f.last_calls).map_err(|e| FddbError::Stored(e.to_string()))?;
        let stack = serde_json::to_string(&f.stack).map_err(|e| FddbError::Stored(e.to_string()))?;
        tx.execute(
            "INSERT OR REPLACE INTO run_fates(run_id, pid, tid, window_start_ns, ts_ns, kind, code, took_signal, last_calls, stack)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![run, f.pid, f.tid, f.window_start_ns as i64, f.ts_ns as i64, f.kind.name(), f.code, f.took_signal, calls, stack],
        )?;
    }
    Ok(())
}

/// Stores an FCT unless its structure is there already; its id either way.
fn store_fct(tx: &rusqlite::Transaction, target: i64, forest: &Forest, table: &FuncTable) -> Result<i64, FddbError> {
    let hash = forest.hash(table);
    tx.execute(
        "INSERT OR IGNORE INTO fcts(target_id, hash, nodes, truncated, tree) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![target, hash, forest.nodes.len() as i64, forest.truncated, encode_tree(&forest.to_proto(table))],
    )?;
    Ok(tx.query_row("SELECT id FROM fcts WHERE target_id = ?1 AND hash = ?2", params![target, hash], |r| r.get(0))?)
}

/// A tree as stored: its protobuf form, deflated (full-trace FCTs repeat the same function
/// and module names on every node; libsqlite3's reach 100,000+ nodes and shrink ~20x).
fn encode_tree(tree: &pb::Tree) -> Vec<u8> {
    use std::io::Write as _;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = z.write_all(&tree.encode_to_vec());
    z.finish().unwrap_or_default()
}

/// A window's calls as stored (`run_trees.calls`): [`Forest::canonical_calls`] as protobuf
/// varints (`prost::encoding`), deflated (most counts are small and repeat).
fn encode_calls(calls: &[u64]) -> Vec<u8> {
    use std::io::Write as _;
    let mut raw = Vec::with_capacity(calls.len() * 2);
    for &c in calls {
        prost::encoding::encode_varint(c, &mut raw);
    }
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = z.write_all(&raw);
    z.finish().unwrap_or_default()
}

/// Reads [`encode_calls`]'s bytes back.
fn decode_calls(bytes: &[u8]) -> Result<Vec<u64>, FddbError> {
    use std::io::Read as _;
    let mut raw = Vec::new();
    flate2::read::DeflateDecoder::new(bytes)
        .read_to_end(&mut raw)
        .map_err(|e| FddbError::Stored(format!("window calls (deflate): {e}")))?;
    let mut buf = raw.as_slice();
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(
            prost::encoding::decode_varint(&mut buf).map_err(|e| FddbError::Stored(format!("window calls: {e}")))?,
        );
    }
    Ok(out)
}

fn decode_tree(bytes: &[u8]) -> Result<pb::Tree, FddbError> {
    use std::io::Read as _;
    let mut raw = Vec::new();
    flate2::read::DeflateDecoder::new(bytes)
        .read_to_end(&mut raw)
        .map_err(|e| FddbError::Stored(format!("FCT (deflate): {e}")))?;
    pb::Tree::decode(raw.as_slice()).map_err(|e| FddbError::Stored(format!("FCT: {e}")))
}

#[cfg(test)]
mod tests;
