//! Moving an FDDB's content between databases: JSON lines without row ids, in a stable order.
//! [`Fddb::import`] merges by natural keys (target name; function name; (function, fault);
//! FCT hash; (fault, role, attempt) for runs), so importing twice changes nothing. Trees are
//! stored once, as `fct` lines carrying the deflated protobuf tree in hex (lossless); runs name them by
//! hash. For a readable form of the trees, see [`crate::dataset`].

use std::{io::Write, path::Path};

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::{
    Applied, Fault, Fddb, FddbError, FunctionRow, Phases, RunFate, RunRow, Settings, Start, decode_tree, insert_fates,
    insert_run,
};

/// A tree of a run, by its FCT's hash.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct RunTree {
    hash: String,
    pid: u32,
    tid: u32,
    start_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end_ns: Option<u64>,
    faulty: bool,
    normal_like: bool,
    /// The window's own calls as stored (`run_trees.calls`, hex); absent for trees recorded
    /// before FDDB schema 7, which read their FCT's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    calls: Option<String>,
}

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line {
    Target {
        name: String,
        module: String,
        settings: Option<Settings>,
        traced: Vec<String>,
    },
    Function {
        target: String,
        #[serde(flatten)]
        function: FunctionRow,
    },
    Fault {
        target: String,
        function: String,
        fault: Fault,
        done: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_out: Option<crate::HeldOut>,
    },
    Fct {
        target: String,
        hash: String,
        /// Protobuf `afetm.v1.Tree`, deflated, hex.
        tree: String,
    },
    Run {
        target: String,
        function: Option<String>,
        fault: Option<Fault>,
        role: String,
        attempt: i64,
        status: String,
        manifestation: String,
        requests: i64,
        errors: i64,
        mean_latency_us: f64,
        applied: i64,
        kernel_drops: i64,
        queue_drops: i64,
        phases: Phases,
        wall_ms: i64,
        new_fcts: i64,
        trees: Vec<RunTree>,
        logs: Vec<(String, String)>,
        applications: Vec<Applied>,
        /// Absent in exports of schema 3.
        #[serde(default)]
        fates: Vec<RunFate>,
        /// Absent in exports of schema 4 and before (warm: every run then was).
        #[serde(default)]
        start: Start,
    },
}

fn json(l: &Line) -> String {
    // Serializing these plain types cannot fail.
    serde_json::to_string(l).unwrap_or_default()
}

impl Fddb {
    /// The whole content as JSON lines, in a stable order: what [`Fddb::import`] reads and
    /// what tests compare.
    pub fn export_lines(&self) -> Result<Vec<String>, FddbError> {
        let mut out = Vec::new();
        let mut st = self.conn.prepare("SELECT id, name, module FROM targets ORDER BY name")?;
        let targets: Vec<(i64, String, String)> =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
        for (id, name, module) in targets {
            let mut traced: Vec<String> = self.traced(id)?.into_iter().collect();
            traced.sort();
            out.push(json(&Line::Target { name, module, settings: self.settings(id)?, traced }));
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
            out.push(json(&r?));
        }
        let mut st = self.conn.prepare(
            "SELECT t.name, fu.name, fa.spec, fa.done, fa.held_out FROM faults fa JOIN functions fu ON fu.id = fa.function_id
             JOIN targets t ON t.id = fu.target_id ORDER BY t.name, fu.name, fa.spec",
        )?;
        type FaultRow = (String, String, String, bool, Option<String>);
        let faults: Vec<FaultRow> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<Result<_, _>>()?;
        for (target, function, spec, done, held) in faults {
            let (fault, held_out) = (crate::parse_fault(&spec)?, crate::held_out_of(held)?);
            out.push(json(&Line::Fault { target, function, fault, done, held_out }));
        }
        let mut st = self.conn.prepare(
            "SELECT t.name, f.hash, f.tree FROM fcts f JOIN targets t ON t.id = f.target_id ORDER BY t.name, f.hash",
        )?;
        for r in st.query_map([], |r| {
            Ok(Line::Fct { target: r.get(0)?, hash: r.get(1)?, tree: hex(&r.get::<_, Vec<u8>>(2)?) })
        })? {
            out.push(json(&r?));
        }
        self.export_runs(&mut out)?;
        Ok(out)
    }

    fn export_runs(&self, out: &mut Vec<String>) -> Result<(), FddbError> {
        let mut st = self.conn.prepare(
            "SELECT r.id, t.name, fu.name, fa.spec, r.role, r.attempt, r.status, r.manifestation, r.requests, r.errors,
               r.mean_latency_us, r.applied, r.kernel_drops, r.queue_drops, r.restart_ms, r.inject_ms, r.load_ms,
               r.collect_ms, r.wall_ms, r.new_fcts, r.start
             FROM runs r JOIN targets t ON t.id = r.target_id LEFT JOIN faults fa ON fa.id = r.fault_id
             LEFT JOIN functions fu ON fu.id = fa.function_id ORDER BY t.name, fu.name, fa.spec, r.role, r.attempt",
        )?;
        let runs: Vec<(i64, Line)> = st
            .query_map([], |r| {
                let spec: Option<String> = r.get(3)?;
                let start: String = r.get(20)?;
                Ok((
                    r.get(0)?,
                    spec,
                    start,
                    Line::Run {
                        target: r.get(1)?,
                        function: r.get(2)?,
                        fault: None,
                        role: r.get(4)?,
                        attempt: r.get(5)?,
                        status: r.get(6)?,
                        manifestation: r.get(7)?,
                        requests: r.get(8)?,
                        errors: r.get(9)?,
                        mean_latency_us: r.get(10)?,
                        applied: r.get(11)?,
                        kernel_drops: r.get(12)?,
                        queue_drops: r.get(13)?,
                        phases: Phases {
                            restart_ms: r.get::<_, i64>(14)? as u64,
                            inject_ms: r.get::<_, i64>(15)? as u64,
                            load_ms: r.get::<_, i64>(16)? as u64,
                            collect_ms: r.get::<_, i64>(17)? as u64,
                        },
                        wall_ms: r.get(18)?,
                        new_fcts: r.get(19)?,
                        trees: Vec::new(),
                        logs: Vec::new(),
                        applications: Vec::new(),
                        fates: Vec::new(),
                        start: Start::Warm,
                    },
                ))
            })?
            .map(|r| {
                let (id, spec, stored_start, mut line) = r?;
                if let Line::Run { fault, start, .. } = &mut line {
                    *start = stored_start.parse().map_err(FddbError::Stored)?;
                    if let Some(s) = spec {
                        *fault = Some(crate::parse_fault(&s)?);
                    }
                }
                Ok((id, line))
            })
            .collect::<Result<_, FddbError>>()?;
        let mut tree_st = self.conn.prepare(
            "SELECT f.hash, rt.pid, rt.tid, rt.start_ns, rt.faulty, rt.normal_like, rt.end_ns, rt.calls FROM run_trees rt
             JOIN fcts f ON f.id = rt.fct_id WHERE rt.run_id = ?1 ORDER BY rt.pid, rt.tid, rt.start_ns",
        )?;
        let mut log_st =
            self.conn.prepare("SELECT source, excerpt FROM logs WHERE run_id = ?1 ORDER BY source, excerpt")?;
        for (id, mut line) in runs {
            if let Line::Run { trees, logs, applications, fates, .. } = &mut line {
                for r in tree_st.query_map([id], |r| {
                    Ok(RunTree {
                        hash: r.get(0)?,
                        pid: r.get(1)?,
                        tid: r.get(2)?,
                        start_ns: r.get::<_, i64>(3)? as u64,
                        faulty: r.get(4)?,
                        normal_like: r.get(5)?,
                        end_ns: r.get::<_, Option<i64>>(6)?.map(|e| e as u64),
                        calls: r.get::<_, Option<Vec<u8>>>(7)?.map(|c| hex(&c)),
                    })
                })? {
                    trees.push(r?);
                }
                for r in log_st.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                    logs.push(r?);
                }
                applications.extend(self.run_applications(id)?);
                fates.extend(self.run_fates(id)?);
            }
            out.push(json(&line));
        }
        Ok(())
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

    /// Merges an export into this database, all or nothing. Returns the number of lines read.
    pub fn import(&mut self, path: &Path) -> Result<usize, FddbError> {
        let p = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| FddbError::Io(p.clone(), e))?;
        self.import_from(std::io::BufReader::new(file), &p)
    }

    /// [`Fddb::import`] from any reader; `p` names the source in errors. All or nothing: on an
    /// error nothing of the input is kept.
    pub fn import_from(&mut self, input: impl std::io::BufRead, p: &str) -> Result<usize, FddbError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut n = 0;
        for (i, line) in input.lines().enumerate() {
            let line = line.map_err(|e| FddbError::Io(p.to_string(), e))?;
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
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

type BoxError = Box<dyn std::error::Error>;

fn target_id(tx: &rusqlite::Transaction, name: &str) -> Result<i64, BoxError> {
    tx.query_row("SELECT id FROM targets WHERE name = ?1", [name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| format!("target {name:?} not defined before this line").into())
}

fn import_line(tx: &rusqlite::Transaction, l: &Line) -> Result<(), BoxError> {
    match l {
        Line::Target { name, module, settings, traced } => {
            tx.execute("INSERT OR IGNORE INTO targets(name, module) VALUES (?1, ?2)", params![name, module])?;
            let t = target_id(tx, name)?;
            if let Some(s) = settings {
                tx.execute(
                    "UPDATE targets SET settings = ?1 WHERE id = ?2 AND settings IS NULL",
                    params![serde_json::to_string(s)?, t],
                )?;
            }
            for f in traced {
                tx.execute("INSERT OR IGNORE INTO traced(target_id, name) VALUES (?1, ?2)", params![t, f])?;
            }
        }
        Line::Function { target, function: f } => {
            tx.execute(
                "INSERT OR IGNORE INTO functions(target_id, name, params, returns_value, calls_per_sec) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![target_id(tx, target)?, f.name, f.params, f.returns_value, f.calls_per_sec],
            )?;
        }
        Line::Fault { target, function, fault, done, held_out } => {
            let fid: i64 = tx.query_row(
                "SELECT id FROM functions WHERE target_id = ?1 AND name = ?2",
                params![target_id(tx, target)?, function],
                |r| r.get(0),
            )?;
            let spec = fault.to_string();
            tx.execute(
                "INSERT OR IGNORE INTO faults(function_id, kind, spec, held_out) VALUES (?1, ?2, ?3, ?4)",
                params![fid, fault.kind().as_str(), spec, held_out.map(|h| h.as_str())],
            )?;
            if *done {
                tx.execute("UPDATE faults SET done = 1 WHERE function_id = ?1 AND spec = ?2", params![fid, spec])?;
            }
        }
        Line::Fct { target, hash, tree } => {
            let bytes = unhex(tree).ok_or("bad tree hex")?;
            let tree = decode_tree(&bytes)?;
            tx.execute(
                "INSERT OR IGNORE INTO fcts(target_id, hash, nodes, truncated, tree) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![target_id(tx, target)?, hash, tree.nodes.len() as i64, tree.truncated, bytes],
            )?;
        }
        Line::Run { .. } => import_run(tx, l)?,
    }
    Ok(())
}

fn import_run(tx: &rusqlite::Transaction, l: &Line) -> Result<(), BoxError> {
    let Line::Run {
        target,
        function,
        fault,
        role,
        attempt,
        status,
        manifestation,
        requests,
        errors,
        mean_latency_us,
        applied,
        kernel_drops,
        queue_drops,
        phases,
        wall_ms,
        new_fcts,
        trees,
        logs,
        applications,
        fates,
        start,
    } = l
    else {
        return Ok(());
    };
    let t = target_id(tx, target)?;
    let fault_id: Option<i64> = match (function, fault) {
        (Some(f), Some(x)) => Some(tx.query_row(
            "SELECT fa.id FROM faults fa JOIN functions fu ON fu.id = fa.function_id WHERE fu.target_id = ?1 AND fu.name = ?2 AND fa.spec = ?3",
            params![t, f, x.to_string()],
            |r| r.get(0),
        )?),
        (None, None) => None,
        _ => return Err("a run names a function without a fault or the other way round".into()),
    };
    let exists: Option<i64> = tx
        .query_row(
            "SELECT id FROM runs WHERE target_id = ?1 AND fault_id IS ?2 AND role = ?3 AND attempt = ?4",
            params![t, fault_id, role, attempt],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_some() {
        return Ok(());
    }
    let row = RunRow {
        target: t,
        fault: fault_id,
        role,
        attempt: *attempt,
        status,
        manifestation,
        requests: *requests,
        errors: *errors,
        mean_latency_us: *mean_latency_us,
        applied: *applied,
        kernel_drops: *kernel_drops,
        queue_drops: *queue_drops,
        phases: *phases,
        start: start.as_str(),
        wall_ms: *wall_ms,
        new_fcts: *new_fcts,
    };
    let run = insert_run(tx, &row, logs, applications)?;
    insert_fates(tx, run, fates)?;
    for rt in trees {
        let fct: i64 = tx
            .query_row("SELECT id FROM fcts WHERE target_id = ?1 AND hash = ?2", params![t, rt.hash], |r| r.get(0))
            .optional()?
            .ok_or_else(|| format!("FCT {} not defined before this run", rt.hash))?;
        let calls = rt.calls.as_deref().map(|c| unhex(c).ok_or("bad window calls hex")).transpose()?;
        if let Some(c) = &calls {
            crate::decode_calls(c)?;
        }
        tx.execute(
            "INSERT INTO run_trees(run_id, fct_id, pid, tid, start_ns, faulty, normal_like, end_ns, calls)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                run,
                fct,
                rt.pid,
                rt.tid,
                rt.start_ns as i64,
                rt.faulty,
                rt.normal_like,
                rt.end_ns.map(|e| e as i64),
                calls
            ],
        )?;
    }
    Ok(())
}
