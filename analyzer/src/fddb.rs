//! The fault diagnosis database (AFETM sec. III.C.1): what the injection campaign learnt, as
//! (function, fault, FCTs) plus how each injection manifested, in SQLite.
//!
//! Normalized: `targets`, `functions` (with their DWARF parameter counts), `faults` (one row
//! per (function, fault spec), never two), `fcts` (unique per target by the SHA-256 of their
//! canonical form, `Forest::canonical`), `runs` (one injection, or a normal run when
//! `fault_id` is NULL, with its manifestation and workload outcome), `run_fcts` (which FCTs a
//! run produced) and `logs` (server log excerpts of a run).
//!
//! Resuming: a run is written in one transaction when it is over ([`Fddb::record_run`]), and a
//! fault is marked done in the same transaction as its last run, so an interrupted campaign
//! leaves no half run and picks up at the first fault not done. [`Fddb::export`] and
//! [`Fddb::import`] move the content between databases as JSON lines (ids are not exported;
//! imports merge by the natural keys, so importing twice changes nothing).

use std::{
    io::{BufRead, Write},
    path::Path,
};

use afetm_proto as pb;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tree::{Forest, FuncTable};

#[derive(Debug, thiserror::Error)]
pub enum FddbError {
    #[error("FDDB: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("FDDB file {0}: {1}")]
    Io(String, std::io::Error),
    #[error("FDDB export line {0}: {1}")]
    Import(usize, String),
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS targets (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, module TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS functions (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL REFERENCES targets(id),
  name TEXT NOT NULL, params INTEGER, returns_value INTEGER, calls_per_sec REAL NOT NULL DEFAULT 0,
  UNIQUE(target_id, name));
CREATE TABLE IF NOT EXISTS faults (id INTEGER PRIMARY KEY, function_id INTEGER NOT NULL REFERENCES functions(id),
  kind TEXT NOT NULL, spec TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, UNIQUE(function_id, spec));
CREATE TABLE IF NOT EXISTS fcts (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL REFERENCES targets(id),
  hash TEXT NOT NULL, nodes INTEGER NOT NULL, tree BLOB NOT NULL, UNIQUE(target_id, hash));
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL REFERENCES targets(id),
  fault_id INTEGER REFERENCES faults(id), attempt INTEGER NOT NULL, manifestation TEXT NOT NULL,
  requests INTEGER NOT NULL, errors INTEGER NOT NULL, mean_latency_us REAL NOT NULL, applied INTEGER NOT NULL,
  wall_ms INTEGER NOT NULL, new_fcts INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS run_fcts (run_id INTEGER NOT NULL REFERENCES runs(id), fct_id INTEGER NOT NULL REFERENCES fcts(id),
  count INTEGER NOT NULL, PRIMARY KEY (run_id, fct_id));
CREATE TABLE IF NOT EXISTS logs (run_id INTEGER NOT NULL REFERENCES runs(id), source TEXT NOT NULL, excerpt TEXT NOT NULL);
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

/// A function of a target and what its signature allows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionRow {
    pub name: String,
    /// Parameters from DWARF (None without debug info).
    pub params: Option<u32>,
    /// Whether it returns a value (None without debug info).
    pub returns_value: Option<bool>,
    pub calls_per_sec: f64,
}

/// A fault still to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingFault {
    pub id: i64,
    pub function: String,
    pub kind: String,
    pub spec: String,
}

/// Whether recording a run finishes its fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    Yes,
    No,
    /// Done when the run added no new unique FCT (AFETM: inject until nothing new appears).
    IfNothingNew,
}

/// One finished run: what happened and which FCTs it produced.
#[derive(Clone, Debug)]
pub struct Run {
    pub manifestation: Manifestation,
    pub requests: u64,
    pub errors: u64,
    pub mean_latency_us: f64,
    pub applied: u64,
    pub wall_ms: u64,
    /// (log source, excerpt)
    pub logs: Vec<(String, String)>,
}

/// Per-target counts for reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub functions: u64,
    pub faults: u64,
    pub faults_done: u64,
    pub faults_by_kind: Vec<(String, u64)>,
    pub runs: u64,
    pub unique_fcts: u64,
    pub normal_fcts: u64,
    /// Unique FCTs per done fault: mean and max.
    pub fcts_per_fault_mean: f64,
    pub fcts_per_fault_max: u64,
    pub manifestations: Vec<(String, u64)>,
}

/// The SHA-256 of a forest's canonical form: equal for structurally equal FCTs.
pub fn fct_hash(forest: &Forest, table: &FuncTable) -> String {
    let mut h = Sha256::new();
    for line in forest.canonical(table) {
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Fddb {
    conn: Connection,
}

impl Fddb {
    pub fn open(path: &Path) -> Result<Fddb, FddbError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
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

    /// Adds a fault unless that (function, spec) is already there; returns its id.
    pub fn fault(&mut self, function: i64, kind: &str, spec: &str) -> Result<i64, FddbError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO faults(function_id, kind, spec) VALUES (?1, ?2, ?3)",
            params![function, kind, spec],
        )?;
        Ok(self.conn.query_row(
            "SELECT id FROM faults WHERE function_id = ?1 AND spec = ?2",
            params![function, spec],
            |r| r.get(0),
        )?)
    }

    /// Faults of a target not done yet, in insertion order.
    pub fn pending(&self, target: i64) -> Result<Vec<PendingFault>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT fa.id, fu.name, fa.kind, fa.spec FROM faults fa JOIN functions fu ON fu.id = fa.function_id
             WHERE fu.target_id = ?1 AND fa.done = 0 ORDER BY fa.id",
        )?;
        let rows = st.query_map([target], |r| {
            Ok(PendingFault { id: r.get(0)?, function: r.get(1)?, kind: r.get(2)?, spec: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a finished run of `fault` (None: a normal run) with the FCTs it produced, in
    /// one transaction, which also marks the fault done as `done` says. Returns how many of
    /// the FCTs were new for the target.
    pub fn record_run(
        &mut self,
        target: i64,
        fault: Option<i64>,
        run: &Run,
        fcts: &[(Forest, FuncTable)],
        done: Done,
    ) -> Result<usize, FddbError> {
        let tx = self.conn.transaction()?;
        let attempt: i64 = tx.query_row(
            "SELECT COUNT(*) FROM runs WHERE target_id = ?1 AND fault_id IS ?2",
            params![target, fault],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO runs(target_id, fault_id, attempt, manifestation, requests, errors, mean_latency_us, applied, wall_ms, new_fcts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0)",
            params![
                target,
                fault,
                attempt + 1,
                run.manifestation.as_str(),
                run.requests as i64,
                run.errors as i64,
                run.mean_latency_us,
                run.applied as i64,
                run.wall_ms as i64
            ],
        )?;
        let run_id = tx.last_insert_rowid();
        let mut new = 0usize;
        for (forest, table) in fcts {
            let hash = fct_hash(forest, table);
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO fcts(target_id, hash, nodes, tree) VALUES (?1, ?2, ?3, ?4)",
                params![target, hash, forest.nodes.len() as i64, forest.to_proto(table).encode_to_vec()],
            )?;
            new += inserted;
            let fct: i64 =
                tx.query_row("SELECT id FROM fcts WHERE target_id = ?1 AND hash = ?2", params![target, hash], |r| {
                    r.get(0)
                })?;
            tx.execute(
                "INSERT INTO run_fcts(run_id, fct_id, count) VALUES (?1, ?2, 1)
                 ON CONFLICT(run_id, fct_id) DO UPDATE SET count = count + 1",
                params![run_id, fct],
            )?;
        }
        tx.execute("UPDATE runs SET new_fcts = ?1 WHERE id = ?2", params![new as i64, run_id])?;
        for (source, excerpt) in &run.logs {
            tx.execute(
                "INSERT INTO logs(run_id, source, excerpt) VALUES (?1, ?2, ?3)",
                params![run_id, source, excerpt],
            )?;
        }
        let fault_done = match done {
            Done::Yes => true,
            Done::No => false,
            Done::IfNothingNew => new == 0,
        };
        if fault_done && let Some(f) = fault {
            tx.execute("UPDATE faults SET done = 1 WHERE id = ?1", [f])?;
        }
        tx.commit()?;
        Ok(new)
    }

    /// Runs recorded for a fault so far.
    pub fn runs_of_fault(&self, fault: i64) -> Result<u64, FddbError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM runs WHERE fault_id = ?1", [fault], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Names of a target's functions.
    pub fn function_names(&self, target: i64) -> Result<Vec<String>, FddbError> {
        let mut st = self.conn.prepare("SELECT name FROM functions WHERE target_id = ?1 ORDER BY name")?;
        let rows = st.query_map([target], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Normal runs recorded for a target.
    pub fn normal_runs(&self, target: i64) -> Result<u64, FddbError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM runs WHERE target_id = ?1 AND fault_id IS NULL",
            [target],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Mean request latency of the normal runs (0 without any).
    pub fn normal_mean_latency(&self, target: i64) -> Result<f64, FddbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT AVG(mean_latency_us) FROM runs WHERE target_id = ?1 AND fault_id IS NULL",
                [target],
                |r| r.get::<_, Option<f64>>(0),
            )?
            .unwrap_or(0.0))
    }

    /// Unique FCTs produced by a fault's runs so far.
    pub fn fcts_of_fault(&self, fault: i64) -> Result<u64, FddbError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(DISTINCT rf.fct_id) FROM run_fcts rf JOIN runs r ON r.id = rf.run_id WHERE r.fault_id = ?1",
            [fault],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Normal FCTs of a target (from runs without a fault).
    pub fn normal_fcts(&self, target: i64) -> Result<Vec<pb::Tree>, FddbError> {
        let mut st = self.conn.prepare(
            "SELECT DISTINCT f.tree FROM fcts f JOIN run_fcts rf ON rf.fct_id = f.id JOIN runs r ON r.id = rf.run_id
             WHERE r.target_id = ?1 AND r.fault_id IS NULL",
        )?;
        let rows = st.query_map([target], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|b| {
            let b = b?;
            pb::Tree::decode(b.as_slice()).map_err(|e| FddbError::Import(0, format!("stored FCT: {e}")))
        })
        .collect()
    }

    /// Names of the targets in the database.
    pub fn targets(&self) -> Result<Vec<String>, FddbError> {
        let mut st = self.conn.prepare("SELECT name FROM targets ORDER BY name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn target_id(&self, name: &str) -> Result<Option<i64>, FddbError> {
        Ok(self.conn.query_row("SELECT id FROM targets WHERE name = ?1", [name], |r| r.get(0)).optional()?)
    }

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
            "SELECT CAST(fa.id AS TEXT), COUNT(DISTINCT rf.fct_id) FROM faults fa JOIN functions fu ON fu.id = fa.function_id
             JOIN runs r ON r.fault_id = fa.id LEFT JOIN run_fcts rf ON rf.run_id = r.id
             WHERE fu.target_id = ?1 AND fa.done = 1 GROUP BY fa.id",
        )?;
        let n = per_fault.len().max(1) as f64;
        Ok(Summary {
            functions: one("SELECT COUNT(*) FROM functions WHERE target_id = ?1")?,
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
            unique_fcts: one("SELECT COUNT(*) FROM fcts WHERE target_id = ?1")?,
            normal_fcts: one("SELECT COUNT(DISTINCT rf.fct_id) FROM run_fcts rf JOIN runs r ON r.id = rf.run_id
                 WHERE r.target_id = ?1 AND r.fault_id IS NULL")?,
            fcts_per_fault_mean: per_fault.iter().map(|(_, c)| *c as f64).sum::<f64>() / n,
            fcts_per_fault_max: per_fault.iter().map(|(_, c)| *c).max().unwrap_or(0),
            manifestations: pairs(
                "SELECT manifestation, COUNT(*) FROM runs WHERE target_id = ?1 GROUP BY manifestation ORDER BY manifestation",
            )?,
        })
    }

    /// The whole content as JSON lines, without ids or timings, in a stable order: what
    /// [`Fddb::import`] reads and what tests compare.
    pub fn export_lines(&self) -> Result<Vec<String>, FddbError> {
        let mut out = Vec::new();
        let mut st = self.conn.prepare("SELECT name, module FROM targets ORDER BY name")?;
        for r in st.query_map([], |r| Ok(Line::Target { name: r.get(0)?, module: r.get(1)? }))? {
            out.push(serde_json::to_string(&r?).unwrap_or_default());
        }
        let mut st = self.conn.prepare(
            "SELECT t.name, f.name, f.params, f.returns_value, f.calls_per_sec FROM functions f JOIN targets t ON t.id = f.target_id
             ORDER BY t.name, f.name",
        )?;
        for r in st.query_map([], |r| {
            Ok(Line::Function {
                target: r.get(0)?,
                function: FunctionRow {
                    name: r.get(1)?,
                    params: r.get(2)?,
                    returns_value: r.get(3)?,
                    calls_per_sec: r.get(4)?,
                },
            })
        })? {
            out.push(serde_json::to_string(&r?).unwrap_or_default());
        }
        let mut st = self.conn.prepare(
            "SELECT t.name, fu.name, fa.kind, fa.spec, fa.done FROM faults fa JOIN functions fu ON fu.id = fa.function_id
             JOIN targets t ON t.id = fu.target_id ORDER BY t.name, fu.name, fa.spec",
        )?;
        for r in st.query_map([], |r| {
            Ok(Line::Fault {
                target: r.get(0)?,
                function: r.get(1)?,
                kind: r.get(2)?,
                spec: r.get(3)?,
                done: r.get(4)?,
            })
        })? {
            out.push(serde_json::to_string(&r?).unwrap_or_default());
        }
        // Runs with their FCTs (by hash) and logs; attempts order runs of one fault.
        let mut st = self.conn.prepare(
            "SELECT r.id, t.name, fu.name, fa.spec, r.attempt, r.manifestation, r.requests, r.errors, r.applied
             FROM runs r JOIN targets t ON t.id = r.target_id LEFT JOIN faults fa ON fa.id = r.fault_id
             LEFT JOIN functions fu ON fu.id = fa.function_id ORDER BY t.name, fu.name, fa.spec, r.attempt",
        )?;
        let runs: Vec<(i64, Line)> = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    Line::Run {
                        target: r.get(1)?,
                        function: r.get(2)?,
                        spec: r.get(3)?,
                        attempt: r.get(4)?,
                        manifestation: r.get(5)?,
                        requests: r.get(6)?,
                        errors: r.get(7)?,
                        applied: r.get(8)?,
                        fcts: Vec::new(),
                        logs: Vec::new(),
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut fct_st = self.conn.prepare(
            "SELECT f.hash, rf.count, f.tree FROM run_fcts rf JOIN fcts f ON f.id = rf.fct_id WHERE rf.run_id = ?1 ORDER BY f.hash",
        )?;
        let mut log_st =
            self.conn.prepare("SELECT source, excerpt FROM logs WHERE run_id = ?1 ORDER BY source, excerpt")?;
        for (id, mut line) in runs {
            if let Line::Run { fcts, logs, .. } = &mut line {
                for r in fct_st
                    .query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)))?
                {
                    let (hash, count, tree) = r?;
                    fcts.push((hash, count as u64, hex(&tree)));
                }
                for r in log_st.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                    logs.push(r?);
                }
            }
            out.push(serde_json::to_string(&line).unwrap_or_default());
        }
        Ok(out)
    }

    /// Writes [`Fddb::export_lines`] to a file.
    pub fn export(&self, path: &Path) -> Result<usize, FddbError> {
        let lines = self.export_lines()?;
        let p = path.display().to_string();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| FddbError::Io(p.clone(), e))?);
        for l in &lines {
            writeln!(f, "{l}").map_err(|e| FddbError::Io(p.clone(), e))?;
        }
        f.flush().map_err(|e| FddbError::Io(p, e))?;
        Ok(lines.len())
    }

    /// Merges an export into this database: targets, functions and faults by name/spec, runs
    /// by (fault, attempt), FCTs by hash. Returns the number of lines read.
    pub fn import(&mut self, path: &Path) -> Result<usize, FddbError> {
        let p = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| FddbError::Io(p.clone(), e))?;
        let tx = self.conn.transaction()?;
        let mut n = 0;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| FddbError::Io(p.clone(), e))?;
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(&line).map_err(|e| FddbError::Import(i + 1, e.to_string()))?;
            import_line(&tx, &l).map_err(|e| FddbError::Import(i + 1, e.to_string()))?;
            n += 1;
        }
        tx.commit()?;
        Ok(n)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line {
    Target {
        name: String,
        module: String,
    },
    Function {
        target: String,
        #[serde(flatten)]
        function: FunctionRow,
    },
    Fault {
        target: String,
        function: String,
        kind: String,
        spec: String,
        done: bool,
    },
    Run {
        target: String,
        function: Option<String>,
        spec: Option<String>,
        attempt: i64,
        manifestation: String,
        requests: i64,
        errors: i64,
        applied: i64,
        /// (hash, count, protobuf tree as hex)
        fcts: Vec<(String, u64, String)>,
        logs: Vec<(String, String)>,
    },
}

fn import_line(tx: &rusqlite::Transaction, l: &Line) -> Result<(), Box<dyn std::error::Error>> {
    let target_id = |name: &str| -> Result<i64, rusqlite::Error> {
        tx.query_row("SELECT id FROM targets WHERE name = ?1", [name], |r| r.get(0))
    };
    let fault_id = |target: &str, function: &str, spec: &str| -> Result<i64, rusqlite::Error> {
        tx.query_row(
            "SELECT fa.id FROM faults fa JOIN functions fu ON fu.id = fa.function_id JOIN targets t ON t.id = fu.target_id
             WHERE t.name = ?1 AND fu.name = ?2 AND fa.spec = ?3",
            params![target, function, spec],
            |r| r.get(0),
        )
    };
    match l {
        Line::Target { name, module } => {
            tx.execute("INSERT OR IGNORE INTO targets(name, module) VALUES (?1, ?2)", params![name, module])?;
        }
        Line::Function { target, function: f } => {
            tx.execute(
                "INSERT OR IGNORE INTO functions(target_id, name, params, returns_value, calls_per_sec) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![target_id(target)?, f.name, f.params, f.returns_value, f.calls_per_sec],
            )?;
        }
        Line::Fault { target, function, kind, spec, done } => {
            let fid: i64 = tx.query_row(
                "SELECT id FROM functions WHERE target_id = ?1 AND name = ?2",
                params![target_id(target)?, function],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO faults(function_id, kind, spec) VALUES (?1, ?2, ?3)",
                params![fid, kind, spec],
            )?;
            if *done {
                tx.execute("UPDATE faults SET done = 1 WHERE function_id = ?1 AND spec = ?2", params![fid, spec])?;
            }
        }
        Line::Run { target, function, spec, attempt, manifestation, requests, errors, applied, fcts, logs } => {
            let t = target_id(target)?;
            let fault = match (function, spec) {
                (Some(f), Some(s)) => Some(fault_id(target, f, s)?),
                _ => None,
            };
            let exists: Option<i64> = tx
                .query_row(
                    "SELECT id FROM runs WHERE target_id = ?1 AND fault_id IS ?2 AND attempt = ?3",
                    params![t, fault, attempt],
                    |r| r.get(0),
                )
                .optional()?;
            if exists.is_some() {
                return Ok(());
            }
            tx.execute(
                "INSERT INTO runs(target_id, fault_id, attempt, manifestation, requests, errors, mean_latency_us, applied, wall_ms, new_fcts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, 0, 0)",
                params![t, fault, attempt, manifestation, requests, errors, applied],
            )?;
            let run = tx.last_insert_rowid();
            for (hash, count, tree) in fcts {
                let tree = unhex(tree).ok_or("bad tree hex")?;
                let nodes = pb::Tree::decode(tree.as_slice())?.nodes.len() as i64;
                tx.execute(
                    "INSERT OR IGNORE INTO fcts(target_id, hash, nodes, tree) VALUES (?1, ?2, ?3, ?4)",
                    params![t, hash, nodes, tree],
                )?;
                let fct: i64 =
                    tx.query_row("SELECT id FROM fcts WHERE target_id = ?1 AND hash = ?2", params![t, hash], |r| {
                        r.get(0)
                    })?;
                tx.execute(
                    "INSERT INTO run_fcts(run_id, fct_id, count) VALUES (?1, ?2, ?3)",
                    params![run, fct, *count as i64],
                )?;
            }
            for (source, excerpt) in logs {
                tx.execute(
                    "INSERT INTO logs(run_id, source, excerpt) VALUES (?1, ?2, ?3)",
                    params![run, source, excerpt],
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Color;

    fn forest(names: &[&str]) -> (Forest, FuncTable) {
        let mut t = FuncTable::default();
        let mut f = Forest::default();
        let mut parent = None;
        for n in names {
            let id = t.intern("m", n);
            parent = Some(f.push(id, Color::White, parent, 1));
        }
        (f, t)
    }

    fn run(m: Manifestation) -> Run {
        Run {
            manifestation: m,
            requests: 10,
            errors: 0,
            mean_latency_us: 1.0,
            applied: 3,
            wall_ms: 5,
            logs: vec![("redis.log".into(), "line".into())],
        }
    }

    #[test]
    fn faults_are_unique_fcts_deduplicated_and_runs_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Fddb::open(&dir.path().join("f.sqlite")).unwrap();
        let t = db.target("redis", "redis-server").unwrap();
        let f = db
            .function(
                t,
                &FunctionRow { name: "call".into(), params: Some(2), returns_value: Some(false), calls_per_sec: 5.0 },
            )
            .unwrap();
        let a = db.fault(f, "crash", "crash").unwrap();
        assert_eq!(db.fault(f, "crash", "crash").unwrap(), a, "never two rows for one fault");
        let b = db.fault(f, "input", "input:0:3").unwrap();
        assert_eq!(db.pending(t).unwrap().len(), 2);
        assert_eq!(
            db.record_run(t, None, &run(Manifestation::Normal), &[forest(&["main", "call"])], Done::No).unwrap(),
            1
        );
        let new = db
            .record_run(
                t,
                Some(a),
                &run(Manifestation::Crash),
                &[forest(&["main", "call"]), forest(&["main"])],
                Done::IfNothingNew,
            )
            .unwrap();
        assert_eq!(new, 1, "main->call is known from the normal run");
        assert_eq!(
            db.record_run(t, Some(a), &run(Manifestation::Crash), &[forest(&["main"])], Done::IfNothingNew).unwrap(),
            0
        );
        assert_eq!(db.fcts_of_fault(a).unwrap(), 2);
        assert_eq!(db.pending(t).unwrap().iter().map(|p| p.id).collect::<Vec<_>>(), vec![b]);
        let s = db.summary(t).unwrap();
        assert_eq!((s.faults, s.faults_done, s.runs, s.unique_fcts, s.normal_fcts), (2, 1, 3, 2, 1));
        assert_eq!(s.fcts_per_fault_max, 2);
        assert_eq!(db.normal_fcts(t).unwrap().len(), 1);

        // Export, import into an empty database, and again: same content both times.
        let out = dir.path().join("export.jsonl");
        let n = db.export(&out).unwrap();
        let mut other = Fddb::open(&dir.path().join("g.sqlite")).unwrap();
        assert_eq!(other.import(&out).unwrap(), n);
        assert_eq!(other.export_lines().unwrap(), db.export_lines().unwrap());
        other.import(&out).unwrap();
        assert_eq!(other.export_lines().unwrap(), db.export_lines().unwrap(), "import is idempotent");
        std::fs::write(&out, "{\"type\":\"fault\",\"target\":\"nope\"}\n").unwrap();
        assert!(matches!(other.import(&out), Err(FddbError::Import(1, _))));
    }
}
