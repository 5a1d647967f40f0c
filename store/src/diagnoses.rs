//! Diagnoses stored with their windows, and what the diagnosis worker reads of a window.

use afetm_calltree::graph::NamedGraph;
use afetm_proto as pb;
use prost::Message;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// A closed window's identity and its AFCTs, one per thread.
#[derive(Debug)]
pub struct WindowTrees {
    /// The window.
    pub id: i64,
    /// Its agent.
    pub agent_id: String,
    /// Its process.
    pub pid: u32,
    /// Its span on the agent clock.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// (thread, AFCT).
    pub trees: Vec<(u32, pb::Tree)>,
    /// (thread, call graph of the window's events), in thread order: what the model reads.
    pub graphs: Vec<(u32, NamedGraph)>,
    /// The threads that ended, stopped or went silent in the window, with their last calls.
    pub fates: Vec<pb::ThreadFate>,
}

#[derive(Serialize, Deserialize)]
struct Suspect {
    function: String,
    kind: String,
    probability: f32,
}

const SELECT: &str = "SELECT d.window_id, w.agent_id, w.pid, d.tid, w.start_ns, w.end_ns, d.p_normal, d.error, d.top,
    d.stale, d.model, d.diagnosed_unix_ms, d.threads, d.latency_us FROM diagnoses d JOIN windows w ON w.id = d.window_id";

fn row(r: &rusqlite::Row) -> rusqlite::Result<pb::Diagnosis> {
    let top: String = r.get(8)?;
    let top: Vec<Suspect> = serde_json::from_str(&top).unwrap_or_default();
    Ok(pb::Diagnosis {
        window_id: r.get::<_, i64>(0)? as u64,
        agent_id: r.get(1)?,
        pid: r.get(2)?,
        tid: r.get(3)?,
        start_ns: r.get::<_, i64>(4)? as u64,
        end_ns: r.get::<_, i64>(5)? as u64,
        p_normal: r.get::<_, f64>(6)? as f32,
        error: r.get(7)?,
        top: top
            .into_iter()
            .map(|s| pb::Suspect { function: s.function, kind: s.kind, probability: s.probability })
            .collect(),
        stale: r.get(9)?,
        model: r.get(10)?,
        diagnosed_unix_ms: r.get(11)?,
        threads: r.get(12)?,
        latency_us: r.get::<_, i64>(13)? as u64,
    })
}

impl Store {
    /// Whether the window is the last of a process the agent saw exit.
    pub fn ends_exited_process(&self, window_id: u64) -> Result<bool, StoreError> {
        let last: Option<bool> = self
            .conn
            .query_row(
                "SELECT p.exited = 1 AND w.idx = (SELECT MAX(idx) FROM windows x WHERE x.agent_id = w.agent_id
                   AND x.instance = w.instance AND x.pid = w.pid)
                 FROM windows w JOIN processes p ON p.agent_id = w.agent_id AND p.instance = w.instance AND p.pid = w.pid
                 WHERE w.id = ?1",
                params![window_id as i64],
                |r| r.get(0),
            )
            .optional()?;
        Ok(last.unwrap_or(false))
    }

    /// A closed window and its AFCTs; None if the window does not exist or is open.
    pub fn window_trees(&self, window_id: i64) -> Result<Option<WindowTrees>, StoreError> {
        let head = self
            .conn
            .query_row(
                "SELECT agent_id, pid, start_ns, end_ns FROM windows WHERE id = ?1 AND closed = 1",
                [window_id],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)),
            )
            .optional()?;
        let Some((agent_id, pid, start, end)) = head else { return Ok(None) };
        let mut st = self.conn.prepare_cached("SELECT tid, tree FROM afcts WHERE window_id = ?1 ORDER BY tid")?;
        let rows = st.query_map([window_id], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut trees = Vec::new();
        for row in rows {
            let (tid, blob) = row?;
            let tree = pb::Tree::decode(blob.as_slice()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            trees.push((tid, tree));
        }
        let fates = super::fates::of_window(&self.conn, &self.funcs, pid, window_id as u64)?;
        let graphs = self.graphs(window_id)?;
        Ok(Some(WindowTrees {
            id: window_id,
            agent_id,
            pid,
            start_ns: start as u64,
            end_ns: end as u64,
            trees,
            graphs,
            fates,
        }))
    }

    /// The call graph of every thread's events in a window (the edges Alg. 3 unrolls into its
    /// AFCT), in thread order, each with a table of its own functions.
    pub fn graphs(&self, window_id: i64) -> Result<Vec<(u32, NamedGraph)>, StoreError> {
        let mut out: Vec<(u32, NamedGraph)> = super::trace_data(&self.conn, window_id)?
            .into_iter()
            .map(|(tid, data)| (tid, NamedGraph::compact(&data.graph(), &self.funcs)))
            .collect();
        out.sort_by_key(|(tid, _)| *tid);
        Ok(out)
    }

    /// Stores (or replaces) the diagnosis of its window.
    pub fn put_diagnosis(&mut self, d: &pb::Diagnosis) -> Result<(), StoreError> {
        let top: Vec<Suspect> = d
            .top
            .iter()
            .map(|s| Suspect { function: s.function.clone(), kind: s.kind.clone(), probability: s.probability })
            .collect();
        let top = serde_json::to_string(&top).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT OR REPLACE INTO diagnoses(window_id, tid, p_normal, error, stale, model, top, threads, diagnosed_unix_ms, latency_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                d.window_id as i64,
                d.tid,
                d.p_normal as f64,
                d.error,
                d.stale,
                d.model,
                top,
                d.threads,
                d.diagnosed_unix_ms,
                d.latency_us as i64
            ],
        )?;
        Ok(())
    }

    /// Stored diagnoses matching `req`, newest window first.
    pub fn list_diagnoses(&self, req: &pb::ListDiagnosesRequest) -> Result<Vec<pb::Diagnosis>, StoreError> {
        let limit = if req.limit == 0 { 1000 } else { req.limit };
        let mut st = self.conn.prepare(&format!(
            "{SELECT} WHERE (?1 = '' OR w.agent_id = ?1) AND (?2 = 0 OR d.window_id = ?2) AND (?3 = 0 OR w.start_ns >= ?3)
             AND (?4 = 0 OR w.start_ns < ?4) AND (?5 = 0 OR d.error = 1) ORDER BY d.window_id DESC LIMIT ?6"
        ))?;
        let rows = st.query_map(
            params![req.agent_id, req.window_id as i64, req.from_ns as i64, req.to_ns as i64, req.errors_only, limit],
            row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
