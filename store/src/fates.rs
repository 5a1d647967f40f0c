//! How each thread of a window ended or stopped, and its last traced calls.
//!
//! A fault that kills or stops a thread shows in its calls only as a tree cut short, which a
//! normal window near a quiet moment also gives. The agent reports what the kernel saw (the
//! thread left `do_exit` with a status or a signal, or took a stop signal); the store adds
//! *silent*: a thread that made calls in the window before and none in this one while its
//! process lives. Each (window, thread) row also keeps the thread's last [`LAST_CALLS`] traced
//! calls in order up to the window's end (carried over from its earlier windows), so a fate
//! comes with where the thread was.

use std::collections::HashMap;

use afetm_calltree::tree::{FuncId, FuncTable};
use afetm_proto as pb;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{AgentKey, StoreError, invalid};

/// The table (created with the rest of the schema). `fate` is a [`pb::FateKind`] (0: none);
/// `last_calls` analyzer function ids, oldest first, space separated; `calls` the thread's
/// calls in the window; `stack` where the thread was when it took its fate's signal (function
/// ids, innermost first, space separated; `pb::ThreadFate::stack_ids`).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS threads (window_id INTEGER NOT NULL, tid INTEGER NOT NULL,
  calls INTEGER NOT NULL DEFAULT 0, last_calls TEXT NOT NULL DEFAULT '',
  fate INTEGER NOT NULL DEFAULT 0, code INTEGER NOT NULL DEFAULT 0, fate_ts_ns INTEGER NOT NULL DEFAULT 0,
  took_signal INTEGER NOT NULL DEFAULT 0, stack TEXT NOT NULL DEFAULT '', PRIMARY KEY(window_id, tid));
"#;

/// Adds the `stack` column to a database from before fate stacks (its fates keep no stack).
pub fn migrate(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    let has: i64 =
        conn.query_row("SELECT COUNT(*) FROM pragma_table_info('threads') WHERE name = 'stack'", [], |r| r.get(0))?;
    if has == 0 {
        conn.execute_batch("ALTER TABLE threads ADD COLUMN stack TEXT NOT NULL DEFAULT '';")?;
    }
    Ok(())
}

/// Traced calls kept per (window, thread) (the agent's `lastcalls::KEPT` as many).
pub const LAST_CALLS: usize = 32;

/// Frames of a fate's stack, at most (the agent unwinds at most 128).
pub const MAX_STACK: usize = 128;

/// Fates in one batch, at most (a process has at most a few thousand threads).
pub const MAX_FATES_PER_BATCH: usize = 1 << 16;

/// Checks a batch's fates: known kinds only (the agent never sends silent), ids set.
pub fn validate(batch: &pb::Batch) -> Result<(), StoreError> {
    if batch.fates.len() > MAX_FATES_PER_BATCH {
        return Err(invalid("batch_size", format!("{} fates > {MAX_FATES_PER_BATCH}", batch.fates.len())));
    }
    for (i, f) in batch.fates.iter().enumerate() {
        let kind = pb::FateKind::try_from(f.kind).unwrap_or(pb::FateKind::Unspecified);
        if !matches!(kind, pb::FateKind::Exited | pb::FateKind::Killed | pb::FateKind::Stopped) {
            return Err(invalid("fate", format!("fate {i}: kind {} is not one an agent reports", f.kind)));
        }
        if f.pid == 0 || f.tid == 0 || f.ts_ns == 0 || f.ts_ns > i64::MAX as u64 {
            return Err(invalid("fate", format!("fate {i}: pid, tid and ts must be set (ts <= i64::MAX)")));
        }
        if f.stack_ids.len() > MAX_STACK {
            return Err(invalid("fate", format!("fate {i}: {} stack frames > {MAX_STACK}", f.stack_ids.len())));
        }
        if f.fault_calls.len() > LAST_CALLS || (!f.fault_calls.is_empty() && !f.took_signal) {
            return Err(invalid(
                "fate",
                format!("fate {i}: fault calls come only with took_signal, at most {LAST_CALLS}"),
            ));
        }
    }
    Ok(())
}

/// The last calls of each (window, thread) of one batch, in time order, to merge into the rows.
#[derive(Default)]
pub struct LastCalls {
    per_thread: HashMap<(i64, u32, u32), Vec<(u64, FuncId)>>,
}

impl LastCalls {
    /// Notes one call of thread `tid` of process `pid` in window `wid` at `ts_ns`.
    pub fn add(&mut self, wid: i64, pid: u32, tid: u32, ts_ns: u64, function: FuncId) {
        self.per_thread.entry((wid, pid, tid)).or_default().push((ts_ns, function));
    }

    /// Merges into the rows: counts add up, the thread's newest [`LAST_CALLS`] calls stay (a
    /// thread's first row in a window starts from its last calls before it).
    pub fn store(self, tx: &Transaction, agent: &AgentKey) -> Result<(), StoreError> {
        let mut get = tx.prepare_cached("SELECT last_calls FROM threads WHERE window_id = ?1 AND tid = ?2")?;
        let mut put = tx.prepare_cached(
            "INSERT INTO threads(window_id, tid, calls, last_calls) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT DO UPDATE SET calls = calls + excluded.calls, last_calls = excluded.last_calls",
        )?;
        for ((wid, pid, tid), mut calls) in self.per_thread {
            calls.sort_by_key(|(ts, _)| *ts);
            let stored: Option<String> = get.query_row(params![wid, tid], |r| r.get(0)).optional()?;
            let stored = match stored {
                Some(s) => s,
                None => earlier_calls(tx, agent, pid, tid)?,
            };
            let mut ids = parse(&stored);
            ids.extend(calls.iter().map(|(_, f)| *f));
            let keep = ids.len().saturating_sub(LAST_CALLS);
            put.execute(params![wid, tid, calls.len() as i64, format(&ids[keep..])])?;
        }
        Ok(())
    }
}

fn parse(text: &str) -> Vec<FuncId> {
    text.split_ascii_whitespace().filter_map(|w| w.parse().ok()).map(FuncId).collect()
}

fn format(ids: &[FuncId]) -> String {
    ids.iter().map(|f| f.0.to_string()).collect::<Vec<_>>().join(" ")
}

/// The last calls of `tid` in its process's latest window that has any ('' if none).
fn earlier_calls(tx: &Transaction, agent: &AgentKey, pid: u32, tid: u32) -> Result<String, StoreError> {
    let earlier: Option<String> = tx
        .prepare_cached(
            "SELECT t.last_calls FROM threads t JOIN windows w ON w.id = t.window_id
             WHERE w.agent_id = ?1 AND w.instance = ?2 AND w.pid = ?3 AND t.tid = ?4 AND t.last_calls != ''
             ORDER BY w.idx DESC LIMIT 1",
        )?
        .query_row(params![agent.agent_id, agent.instance as i64, pid, tid], |r| r.get(0))
        .optional()?;
    Ok(earlier.unwrap_or_default())
}

/// Stores a fate of `tid` in window `wid` (a later fate of the same thread replaces an earlier
/// one: stopped, then killed). A thread without calls in that window takes its last calls from
/// its latest earlier window; `at_fault`, the calls the agent saw before the thread took its
/// fault's signal, replace them when given (a crash handler's calls came after). `stack` is
/// where the thread was when it took its fate's signal (innermost first; empty: unknown).
pub fn put(
    tx: &Transaction,
    agent: &AgentKey,
    pid: u32,
    wid: i64,
    f: &pb::ThreadFate,
    at_fault: &[FuncId],
    stack: &[FuncId],
) -> Result<(), StoreError> {
    let (calls, replace) = match at_fault.is_empty() {
        true => (earlier_calls(tx, agent, pid, f.tid)?, false),
        false => (format(at_fault), true),
    };
    tx.execute(
        "INSERT INTO threads(window_id, tid, last_calls, fate, code, fate_ts_ns, took_signal, stack)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?9)
         ON CONFLICT DO UPDATE SET fate = excluded.fate, code = excluded.code, fate_ts_ns = excluded.fate_ts_ns,
           took_signal = excluded.took_signal, stack = excluded.stack,
           last_calls = CASE WHEN ?8 THEN excluded.last_calls ELSE last_calls END",
        params![wid, f.tid, calls, f.kind, f.code, f.ts_ns as i64, f.took_signal, replace, format(stack)],
    )?;
    Ok(())
}

/// Marks the threads of a closing window that went silent: calls in the process's window just
/// before, none in this one, no exit in between, the process alive. A thread stopped before
/// stays stopped.
pub fn mark_silent(tx: &Transaction, window_id: i64) -> Result<u64, StoreError> {
    let Some((agent_id, instance, pid, idx, start)) = tx
        .query_row(
            "SELECT agent_id, instance, pid, idx, start_ns FROM windows WHERE id = ?1",
            params![window_id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional()?
    else {
        return Ok(0);
    };
    let exited: bool = tx
        .query_row(
            "SELECT exited FROM processes WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3",
            params![agent_id, instance, pid],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .is_some_and(|e| e != 0);
    if exited {
        return Ok(0);
    }
    let n = tx.execute(
        "INSERT INTO threads(window_id, tid, last_calls, fate, code, fate_ts_ns)
         SELECT ?1, p.tid, p.last_calls, CASE WHEN p.fate = ?6 THEN ?6 ELSE ?7 END, p.code, ?5
         FROM threads p JOIN windows pw ON pw.id = p.window_id
         WHERE pw.agent_id = ?2 AND pw.instance = ?3 AND pw.pid = ?4 AND pw.idx = ?8 AND p.calls > 0
           AND p.fate NOT IN (?9, ?10)
           AND NOT EXISTS (SELECT 1 FROM threads c WHERE c.window_id = ?1 AND c.tid = p.tid AND (c.calls > 0 OR c.fate != 0))
         ON CONFLICT DO NOTHING",
        params![
            window_id,
            agent_id,
            instance,
            pid,
            start,
            pb::FateKind::Stopped as i32,
            pb::FateKind::Silent as i32,
            idx - 1,
            pb::FateKind::Exited as i32,
            pb::FateKind::Killed as i32,
        ],
    )?;
    Ok(n as u64)
}

/// The fates of a window's threads, with their last calls named as `module:function`.
pub fn of_window(
    conn: &rusqlite::Connection,
    funcs: &FuncTable,
    pid: u32,
    window_id: u64,
) -> Result<Vec<pb::ThreadFate>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT tid, fate, code, fate_ts_ns, last_calls, took_signal, stack FROM threads
         WHERE window_id = ?1 AND fate != 0 ORDER BY tid",
    )?;
    let rows = stmt.query_map(params![window_id as i64], |r| {
        Ok((
            r.get::<_, u32>(0)?,
            r.get::<_, i32>(1)?,
            r.get::<_, i32>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, bool>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    let names = |text: &str| -> Vec<String> {
        parse(text)
            .into_iter()
            .filter(|f| (f.0 as usize) < funcs.len())
            .map(|f| {
                let func = funcs.get(f);
                format!("{}:{}", func.module, func.name)
            })
            .collect()
    };
    let mut out = Vec::new();
    for row in rows {
        let (tid, kind, code, ts, last, took_signal, stack) = row?;
        out.push(pb::ThreadFate {
            pid,
            tid,
            ts_ns: ts as u64,
            kind,
            code,
            last_calls: names(&last),
            took_signal,
            fault_calls: vec![],
            stack_ids: vec![],
            stack: names(&stack),
        });
    }
    Ok(out)
}
