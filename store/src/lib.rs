//! The analyzer's database: agents, their symbols, per-process windows, the caller->callee edges
//! of each (window, thread), and the AFCT built when a window closes. SQLite in WAL mode.
//!
//! A batch is applied in one transaction and acknowledged only after the commit, so whatever an
//! agent was told is stored survives a crash or restart of the analyzer; the agent resends what
//! was not acknowledged and batches at or below the stored sequence number are ignored.

#![deny(missing_docs)]

use std::{
    collections::HashMap,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use afetm_proto as pb;
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use afetm_calltree::{
    afct::TraceData,
    tree::{Forest, FuncId, FuncTable},
};

mod diagnoses;
mod fates;
mod logs;
pub use diagnoses::WindowTrees;
pub use logs::Feedback;

/// Limits that make the analyzer refuse input rather than store nonsense.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Events in one batch.
    pub max_events_per_batch: usize,
    /// Symbol definitions in one batch.
    pub max_symbols_per_batch: usize,
    /// Frames of one event's call stack (F^callstack).
    pub max_stack_depth: usize,
    /// Bytes of a module or function name.
    pub max_name_len: usize,
    /// How far an event's timestamp may lie after the agent clock of its batch.
    pub max_future_ns: u64,
    /// Log lines per batch.
    pub max_logs_per_batch: usize,
    /// Log lines kept in the database (the oldest are deleted).
    pub max_log_lines: usize,
    /// Largest step of a batch's seq over the last stored one. An agent skips seqs only for
    /// batches its full queue dropped, so a bigger jump is a broken or hostile agent: accepted,
    /// it would make every later batch look like a duplicate.
    pub max_seq_gap: u64,
    /// Largest `hostname` and `target` of a Hello, bytes.
    pub max_hello_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_events_per_batch: 1 << 20,
            max_symbols_per_batch: 1 << 20,
            max_stack_depth: 512,
            max_name_len: 4096,
            max_future_ns: 60_000_000_000,
            max_logs_per_batch: 100_000,
            max_log_lines: 2_000_000,
            max_seq_gap: 1 << 24,
            max_hello_len: 4096,
        }
    }
}

/// Windowing of trace data.
#[derive(Clone, Debug)]
pub struct WindowConfig {
    /// Window length; window k of a process spans [first + k*len, first + (k+1)*len) of its events.
    pub len_ns: u64,
    /// A window closes once the agent clock passes its end by this much.
    pub grace_ns: u64,
    /// Cap on AFCT nodes (see `afct::DEFAULT_NODE_CAP`).
    pub node_cap: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            len_ns: 10_000_000_000,
            grace_ns: 1_000_000_000,
            node_cap: afetm_calltree::afct::DEFAULT_NODE_CAP,
        }
    }
}

/// Why the store refused input or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The input broke the contract; `reason` is a short stable label used in counters.
    #[error("invalid {reason}: {detail}")]
    Invalid {
        /// The counter label, e.g. `seq` or `unknown_symbol`.
        reason: &'static str,
        /// What exactly was wrong, for the agent's log.
        detail: String,
    },
    /// SQLite failed (busy, disk full, I/O).
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// Something read back from the database does not decode.
    #[error("stored tree is corrupt: {0}")]
    Corrupt(String),
}

fn invalid(reason: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Invalid { reason, detail: detail.into() }
}

/// An agent process as the analyzer knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AgentKey {
    /// The agent's stable id (its Hello's `agent_id`).
    pub agent_id: String,
    /// Which start of that agent: a new instance begins a new seq space.
    pub instance: u64,
}

/// What applying a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The batch's seq was already stored: nothing changed.
    pub duplicate: bool,
    /// Events stored.
    pub events: u64,
    /// Events for windows already closed, dropped.
    pub late_events: u64,
    /// Events older than their process's last cut ([`Store::cut`]), dropped.
    pub cut_events: u64,
    /// Windows this batch closed.
    pub windows_closed: u64,
    /// Windows this batch opened.
    pub windows_opened: u64,
    /// AFCTs built for the closed windows (one per thread).
    pub afcts: u64,
    /// How long the batch's transaction took to commit.
    pub commit: std::time::Duration,
    /// The windows this batch closed (their AFCTs are stored).
    pub closed: Vec<i64>,
}

/// Per-connection state: the agent's symbol ids mapped to analyzer functions.
#[derive(Debug, Default)]
pub struct Session {
    symbols: HashMap<u32, FuncId>,
}

/// The database: one SQLite connection, and the function table every agent's symbols map into.
pub struct Store {
    conn: Connection,
    funcs: FuncTable,
    limits: Limits,
    window: WindowConfig,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY CHECK (id = 1), at_unix INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS functions (id INTEGER PRIMARY KEY, module TEXT NOT NULL, name TEXT NOT NULL, UNIQUE(module, name));
CREATE TABLE IF NOT EXISTS agents (
  agent_id TEXT NOT NULL, instance INTEGER NOT NULL, hostname TEXT NOT NULL, target TEXT NOT NULL,
  last_seq INTEGER NOT NULL DEFAULT 0, events INTEGER NOT NULL DEFAULT 0,
  kernel_drops INTEGER NOT NULL DEFAULT 0, queue_drops INTEGER NOT NULL DEFAULT 0,
  last_seen_unix INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(agent_id, instance));
CREATE TABLE IF NOT EXISTS symbols (agent_id TEXT NOT NULL, instance INTEGER NOT NULL, sym_id INTEGER NOT NULL,
  function_id INTEGER NOT NULL REFERENCES functions(id), PRIMARY KEY(agent_id, instance, sym_id));
CREATE TABLE IF NOT EXISTS processes (agent_id TEXT NOT NULL, instance INTEGER NOT NULL, pid INTEGER NOT NULL,
  first_ts_ns INTEGER NOT NULL, exited INTEGER NOT NULL DEFAULT 0, cut_ns INTEGER NOT NULL DEFAULT 0,
  idx_base INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(agent_id, instance, pid));
CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, instance INTEGER NOT NULL,
  pid INTEGER NOT NULL, idx INTEGER NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
  events INTEGER NOT NULL DEFAULT 0, closed INTEGER NOT NULL DEFAULT 0, UNIQUE(agent_id, instance, pid, idx));
CREATE INDEX IF NOT EXISTS windows_open ON windows(agent_id, instance, closed);
CREATE TABLE IF NOT EXISTS edges (window_id INTEGER NOT NULL, tid INTEGER NOT NULL, caller INTEGER NOT NULL,
  callee INTEGER NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY(window_id, tid, caller, callee));
CREATE TABLE IF NOT EXISTS afcts (window_id INTEGER NOT NULL, tid INTEGER NOT NULL, nodes INTEGER NOT NULL,
  truncated INTEGER NOT NULL, tree BLOB NOT NULL, PRIMARY KEY(window_id, tid));
CREATE TABLE IF NOT EXISTS diagnoses (window_id INTEGER PRIMARY KEY REFERENCES windows(id), tid INTEGER NOT NULL,
  p_normal REAL NOT NULL, error INTEGER NOT NULL, stale INTEGER NOT NULL, model TEXT NOT NULL, top TEXT NOT NULL,
  threads INTEGER NOT NULL, diagnosed_unix_ms INTEGER NOT NULL, latency_us INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS diagnoses_errors ON diagnoses(error, window_id);
CREATE TABLE IF NOT EXISTS counts (agent_id TEXT NOT NULL, instance INTEGER NOT NULL, function_id INTEGER NOT NULL,
  agent_clock_ns INTEGER NOT NULL, calls INTEGER NOT NULL, interval_ns INTEGER NOT NULL);
"#;

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path, window: WindowConfig, limits: Limits) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives a crash of this process (not a power cut).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(logs::SCHEMA)?;
        conn.execute_batch(fates::SCHEMA)?;
        logs::migrate(&conn)?;
        // Databases from before window cuts: add the columns (their windows keep working).
        let has_cut: i64 =
            conn.query_row("SELECT COUNT(*) FROM pragma_table_info('processes') WHERE name = 'cut_ns'", [], |r| {
                r.get(0)
            })?;
        let has_logs: i64 =
            conn.query_row("SELECT COUNT(*) FROM pragma_table_info('agents') WHERE name = 'log_lines'", [], |r| {
                r.get(0)
            })?;
        if has_logs == 0 {
            conn.execute_batch(
                "ALTER TABLE agents ADD COLUMN log_lines INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE agents ADD COLUMN log_drops INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        fates::migrate(&conn)?;
        if has_cut == 0 {
            conn.execute_batch(
                "ALTER TABLE processes ADD COLUMN cut_ns INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE processes ADD COLUMN idx_base INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        let mut funcs = FuncTable::default();
        {
            let mut stmt = conn.prepare("SELECT id, module, name FROM functions ORDER BY id")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
            for row in rows {
                let (id, module, name) = row?;
                let got = funcs.intern(&module, &name);
                if got.0 as i64 != id {
                    return Err(StoreError::Corrupt(format!("function ids are not dense at {id}")));
                }
            }
        }
        Ok(Store { conn, funcs, limits, window })
    }

    /// Every function any agent has defined, by analyzer id.
    pub fn funcs(&self) -> &FuncTable {
        &self.funcs
    }

    /// How trace data is cut into windows.
    pub fn window_config(&self) -> &WindowConfig {
        &self.window
    }

    fn intern(&mut self, module: &str, name: &str) -> Result<FuncId, StoreError> {
        if let Some(id) = self.funcs.lookup(module, name) {
            return Ok(id);
        }
        let id = self.funcs.intern(module, name);
        self.conn
            .execute("INSERT INTO functions(id, module, name) VALUES (?1, ?2, ?3)", params![id.0, module, name])?;
        Ok(id)
    }

    /// Registers an agent connection. Returns the last durable batch of this instance and the
    /// session with its known symbols. A new instance of an agent id means the old process is
    /// gone: its open windows are closed.
    pub fn hello(&mut self, hello: &pb::Hello) -> Result<(u64, Session, u64), StoreError> {
        if hello.agent_id.is_empty() || hello.agent_id.len() > 256 {
            return Err(invalid("hello", "agent_id must have 1 to 256 bytes"));
        }
        if hello.instance == 0 {
            return Err(invalid("hello", "instance must not be 0"));
        }
        let max = self.limits.max_hello_len;
        if hello.hostname.len() > max || hello.target.len() > max {
            return Err(invalid("hello", format!("hostname and target must have at most {max} bytes")));
        }
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO agents(agent_id, instance, hostname, target, last_seen_unix) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(agent_id, instance) DO UPDATE SET last_seen_unix = excluded.last_seen_unix",
            params![hello.agent_id, hello.instance as i64, hello.hostname, hello.target, now_unix()],
        )?;
        let last_seq: i64 = tx.query_row(
            "SELECT last_seq FROM agents WHERE agent_id = ?1 AND instance = ?2",
            params![hello.agent_id, hello.instance as i64],
            |r| r.get(0),
        )?;
        let mut session = Session::default();
        {
            let mut stmt =
                tx.prepare("SELECT sym_id, function_id FROM symbols WHERE agent_id = ?1 AND instance = ?2")?;
            let rows = stmt.query_map(params![hello.agent_id, hello.instance as i64], |r| {
                Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?))
            })?;
            for row in rows {
                let (sym, f) = row?;
                session.symbols.insert(sym, FuncId(f));
            }
        }
        let stale: Vec<i64> = {
            let mut stmt =
                tx.prepare("SELECT id FROM windows WHERE agent_id = ?1 AND instance != ?2 AND closed = 0")?;
            stmt.query_map(params![hello.agent_id, hello.instance as i64], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let mut closed = 0;
        for w in stale {
            close_window(&tx, &self.funcs, w, self.window.node_cap, false)?;
            closed += 1;
        }
        tx.commit()?;
        Ok((last_seq as u64, session, closed))
    }

    /// Checks a batch against the contract without touching the database.
    fn validate(&self, session: &Session, batch: &pb::Batch) -> Result<(), StoreError> {
        let l = &self.limits;
        if batch.seq == 0 {
            return Err(invalid("seq", "batch seq must start at 1"));
        }
        // SQLite stores these as i64; a larger value would come back negative.
        if batch.agent_clock_ns == 0 || batch.agent_clock_ns > i64::MAX as u64 {
            return Err(invalid("clock", format!("agent clock {} out of 1..=i64::MAX", batch.agent_clock_ns)));
        }
        if batch.events.len() > l.max_events_per_batch {
            return Err(invalid("batch_size", format!("{} events > {}", batch.events.len(), l.max_events_per_batch)));
        }
        logs::validate(batch, l.max_logs_per_batch)?;
        fates::validate(batch)?;
        if batch.symbols.len() > l.max_symbols_per_batch {
            return Err(invalid(
                "batch_size",
                format!("{} symbols > {}", batch.symbols.len(), l.max_symbols_per_batch),
            ));
        }
        let mut defined: std::collections::HashSet<u32> = std::collections::HashSet::new();
        for s in &batch.symbols {
            if s.id == 0 {
                return Err(invalid("symbol", "symbol id 0 is reserved for 'unknown'"));
            }
            if s.name.is_empty()
                || s.module.is_empty()
                || s.name.len() > l.max_name_len
                || s.module.len() > l.max_name_len
            {
                return Err(invalid(
                    "symbol",
                    format!("symbol {}: module and name must have 1 to {} bytes", s.id, l.max_name_len),
                ));
            }
            defined.insert(s.id);
        }
        let known = |id: u32| defined.contains(&id) || session.symbols.contains_key(&id);
        for (i, e) in batch.events.iter().enumerate() {
            if e.pid == 0 || e.tid == 0 {
                return Err(invalid("event", format!("event {i}: pid and tid must be non-zero")));
            }
            if e.ts_ns == 0 || e.ts_ns > batch.agent_clock_ns.saturating_add(l.max_future_ns) {
                return Err(invalid(
                    "timestamp",
                    format!("event {i}: ts {} out of range (agent clock {})", e.ts_ns, batch.agent_clock_ns),
                ));
            }
            if !known(e.function) || (e.caller != 0 && !known(e.caller)) {
                return Err(invalid(
                    "unknown_symbol",
                    format!("event {i}: function {} / caller {} not defined", e.function, e.caller),
                ));
            }
            if e.callstack.len() > l.max_stack_depth {
                return Err(invalid(
                    "stack_depth",
                    format!("event {i}: {} frames > {}", e.callstack.len(), l.max_stack_depth),
                ));
            }
            if let Some(bad) = e.callstack.iter().find(|id| !known(**id)) {
                return Err(invalid("unknown_symbol", format!("event {i}: stack frame symbol {bad} not defined")));
            }
        }
        for c in &batch.counts {
            if !known(c.function) {
                return Err(invalid("unknown_symbol", format!("count for undefined symbol {}", c.function)));
            }
        }
        for (i, f) in batch.fates.iter().enumerate() {
            if let Some(bad) = f.fault_calls.iter().find(|id| !known(**id)) {
                return Err(invalid("unknown_symbol", format!("fate {i}: fault call symbol {bad} not defined")));
            }
            if let Some(bad) = f.stack_ids.iter().find(|id| !known(**id)) {
                return Err(invalid("unknown_symbol", format!("fate {i}: stack symbol {bad} not defined")));
            }
        }
        Ok(())
    }

    /// Applies one batch atomically. Batches at or below the stored seq are duplicates (resent
    /// after a reconnect) and change nothing.
    pub fn apply_batch(
        &mut self,
        agent: &AgentKey,
        session: &mut Session,
        batch: &pb::Batch,
    ) -> Result<Applied, StoreError> {
        self.validate(session, batch)?;
        let last_seq: i64 = self.conn.query_row(
            "SELECT last_seq FROM agents WHERE agent_id = ?1 AND instance = ?2",
            params![agent.agent_id, agent.instance as i64],
            |r| r.get(0),
        )?;
        if batch.seq <= last_seq as u64 {
            return Ok(Applied { duplicate: true, ..Default::default() });
        }
        if batch.seq - last_seq as u64 > self.limits.max_seq_gap {
            return Err(invalid(
                "seq",
                format!(
                    "seq {} jumps more than {} past the last stored {last_seq}",
                    batch.seq, self.limits.max_seq_gap
                ),
            ));
        }
        // Functions only ever grow; interning them ahead of the batch transaction is harmless.
        let mut new_syms = Vec::new();
        for s in &batch.symbols {
            let f = self.intern(&s.module, &s.name)?;
            if session.symbols.get(&s.id) != Some(&f) {
                new_syms.push((s.id, f));
            }
        }
        let tx = self.conn.transaction()?;
        let mut applied = Applied::default();
        for (sym, f) in &new_syms {
            tx.execute(
                "INSERT INTO symbols(agent_id, instance, sym_id, function_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO UPDATE SET function_id = excluded.function_id",
                params![agent.agent_id, agent.instance as i64, sym, f.0],
            )?;
        }
        let resolve = |id: u32| -> FuncId {
            new_syms
                .iter()
                .rev()
                .find(|(s, _)| *s == id)
                .map(|(_, f)| *f)
                .or_else(|| session.symbols.get(&id).copied())
                .unwrap_or(FuncId(u32::MAX))
        };

        // Per-process first timestamps anchor the windows.
        let mut first_ts: HashMap<u32, u64> = HashMap::new();
        for e in &batch.events {
            let t = first_ts.entry(e.pid).or_insert(e.ts_ns);
            *t = (*t).min(e.ts_ns);
        }
        let mut anchors: HashMap<u32, Anchor> = HashMap::new();
        for (pid, ts) in first_ts {
            tx.execute(
                "INSERT INTO processes(agent_id, instance, pid, first_ts_ns) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![agent.agent_id, agent.instance as i64, pid, ts as i64],
            )?;
            let anchor = anchor_of(&tx, agent, pid)?
                .ok_or_else(|| StoreError::Corrupt(format!("process {pid} vanished inside its batch")))?;
            anchors.insert(pid, anchor);
        }

        // Group events by (window, thread) into Alg. 3 trace data.
        let mut windows: HashMap<(u32, u64), (i64, bool)> = HashMap::new();
        let mut per_thread: HashMap<(i64, u32), TraceData> = HashMap::new();
        let mut window_events: HashMap<i64, u64> = HashMap::new();
        let mut last_calls = fates::LastCalls::default();
        let len = self.window.len_ns.max(1);
        for e in &batch.events {
            let a = anchors[&e.pid];
            if e.ts_ns < a.cut {
                applied.cut_events += 1;
                continue;
            }
            let rel = e.ts_ns.saturating_sub(a.origin) / len;
            let idx = a.base + rel;
            let (wid, closed) = match windows.get(&(e.pid, idx)) {
                Some(w) => *w,
                None => {
                    let (start, end) = (a.origin + rel * len, a.origin + (rel + 1) * len);
                    let w = window_for(&tx, agent, e.pid, idx, start, end, &mut applied.windows_opened)?;
                    windows.insert((e.pid, idx), w);
                    w
                }
            };
            if closed {
                applied.late_events += 1;
                continue;
            }
            let caller = (e.caller != 0).then(|| resolve(e.caller));
            let stack: Vec<FuncId> = e.callstack.iter().map(|s| resolve(*s)).collect();
            per_thread.entry((wid, e.tid)).or_default().add_call(resolve(e.function), caller, &stack);
            last_calls.add(wid, e.pid, e.tid, e.ts_ns, resolve(e.function));
            *window_events.entry(wid).or_insert(0) += 1;
            applied.events += 1;
        }
        {
            let mut up = tx.prepare_cached(
                "INSERT INTO edges(window_id, tid, caller, callee, calls) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT DO UPDATE SET calls = calls + excluded.calls",
            )?;
            for ((wid, tid), data) in &per_thread {
                for (caller, callee, calls) in data.edges() {
                    let caller = caller.map(|c| c.0 as i64).unwrap_or(-1);
                    up.execute(params![wid, tid, caller, callee.0, calls as i64])?;
                }
            }
            let mut ev = tx.prepare_cached("UPDATE windows SET events = events + ?2 WHERE id = ?1")?;
            for (wid, n) in &window_events {
                ev.execute(params![wid, *n as i64])?;
            }
        }
        last_calls.store(&tx, agent)?;
        for f in &batch.fates {
            match fate_window(&tx, agent, f, len, &mut applied.windows_opened)? {
                Some(wid) => {
                    let at_fault: Vec<FuncId> = f.fault_calls.iter().map(|s| resolve(*s)).collect();
                    let stack: Vec<FuncId> = f.stack_ids.iter().map(|s| resolve(*s)).collect();
                    fates::put(&tx, agent, f.pid, wid, f, &at_fault, &stack)?
                }
                None => applied.late_events += 1,
            }
        }
        for c in &batch.counts {
            tx.execute(
                "INSERT INTO counts(agent_id, instance, function_id, agent_clock_ns, calls, interval_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![agent.agent_id, agent.instance as i64, resolve(c.function).0, batch.agent_clock_ns as i64, c.calls as i64, c.interval_ns as i64],
            )?;
        }
        logs::put(&tx, agent, batch, self.limits.max_log_lines)?;
        tx.execute(
            "UPDATE agents SET last_seq = ?3, events = events + ?4, kernel_drops = ?5, queue_drops = ?6, last_seen_unix = ?7
             WHERE agent_id = ?1 AND instance = ?2",
            params![agent.agent_id, agent.instance as i64, batch.seq as i64, applied.events as i64, batch.kernel_drops as i64, batch.queue_drops as i64, now_unix()],
        )?;

        // Close what this batch finished: exited processes and windows the agent clock passed.
        let mut to_close: Vec<i64> = Vec::new();
        for exit in &batch.exits {
            tx.execute(
                "UPDATE processes SET exited = 1 WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3",
                params![agent.agent_id, agent.instance as i64, exit.pid],
            )?;
            to_close.extend(open_windows(&tx, agent, Some(exit.pid), None)?);
        }
        if batch.final_batch {
            // The agent is stopping: nothing more will arrive for this instance.
            to_close.extend(open_windows(&tx, agent, None, None)?);
        }
        let horizon = batch.agent_clock_ns.saturating_sub(self.window.grace_ns) as i64;
        // Only windows the agent clock passed are whole: silence is judged in those alone (a
        // window cut short by the agent's stop holds no call of a thread that was about to).
        let whole: std::collections::HashSet<i64> =
            open_windows(&tx, agent, None, Some(horizon))?.into_iter().collect();
        to_close.extend(whole.iter().copied());
        to_close.sort_unstable();
        to_close.dedup();
        for w in to_close {
            applied.afcts += close_window(&tx, &self.funcs, w, self.window.node_cap, whole.contains(&w))?;
            applied.windows_closed += 1;
            applied.closed.push(w);
        }
        let committing = std::time::Instant::now();
        tx.commit()?;
        applied.commit = committing.elapsed();
        for (sym, f) in new_syms {
            session.symbols.insert(sym, f);
        }
        Ok(applied)
    }

    /// Cuts the windows of `pids` of the agent `agent_id` (its newest instance) at `at_ns` on
    /// the agent clock: their open windows are discarded with their events, events older than
    /// `at_ns` that still arrive are dropped, and new windows start at `at_ns`. The campaign
    /// cuts each run's restarted processes when it injects, so that no window mixes a
    /// process's start-up with the run. Returns the windows discarded.
    pub fn cut(&mut self, agent_id: &str, pids: &[u32], at_ns: u64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let instance: Option<i64> =
            tx.query_row("SELECT MAX(instance) FROM agents WHERE agent_id = ?1", [agent_id], |r| r.get(0))?;
        let instance = instance.ok_or_else(|| invalid("agent", format!("no agent {agent_id:?} has connected")))?;
        let mut discarded = 0;
        for pid in pids {
            let key = params![agent_id, instance, pid];
            tx.execute(
                "INSERT INTO processes(agent_id, instance, pid, first_ts_ns) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![agent_id, instance, pid, at_ns as i64],
            )?;
            tx.execute(
                "DELETE FROM edges WHERE window_id IN
                   (SELECT id FROM windows WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3 AND closed = 0)",
                key,
            )?;
            discarded += tx
                .execute("DELETE FROM windows WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3 AND closed = 0", key)?
                as u64;
            let base: i64 = tx.query_row(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM windows WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3",
                key,
                |r| r.get(0),
            )?;
            tx.execute(
                "UPDATE processes SET first_ts_ns = ?4, cut_ns = ?4, idx_base = ?5
                 WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3",
                params![agent_id, instance, pid, at_ns as i64, base.max(0)],
            )?;
        }
        tx.commit()?;
        Ok(discarded)
    }

    /// Checks that the database takes writes: one small write transaction (a lock held by
    /// another process, a full disk or an I/O error fail it). Backs gRPC health.
    pub fn probe(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("INSERT OR REPLACE INTO health(id, at_unix) VALUES (1, ?1)", params![now_unix()])?;
        tx.commit()?;
        Ok(())
    }

    /// Closes every open window whose agent was last seen more than `idle_secs` ago; returns
    /// their ids and the number of AFCTs built.
    pub fn close_stale(&mut self, idle_secs: i64) -> Result<(Vec<i64>, u64), StoreError> {
        let tx = self.conn.transaction()?;
        let ids: Vec<i64> = {
            let mut stmt = tx.prepare(
                "SELECT w.id FROM windows w JOIN agents a ON a.agent_id = w.agent_id AND a.instance = w.instance
                 WHERE w.closed = 0 AND a.last_seen_unix < ?1",
            )?;
            stmt.query_map(params![now_unix() - idle_secs], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let mut afcts = 0;
        for w in &ids {
            afcts += close_window(&tx, &self.funcs, *w, self.window.node_cap, false)?;
        }
        tx.commit()?;
        Ok((ids, afcts))
    }

    /// Every agent instance that has said Hello, with its counters.
    pub fn list_agents(&self) -> Result<Vec<pb::AgentInfo>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT agent_id, instance, hostname, target, last_seq, events, kernel_drops, queue_drops, log_lines, log_drops FROM agents ORDER BY agent_id, instance",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(pb::AgentInfo {
                agent_id: r.get(0)?,
                instance: r.get::<_, i64>(1)? as u64,
                hostname: r.get(2)?,
                target: r.get(3)?,
                last_seq: r.get::<_, i64>(4)? as u64,
                events: r.get::<_, i64>(5)? as u64,
                kernel_drops: r.get::<_, i64>(6)? as u64,
                queue_drops: r.get::<_, i64>(7)? as u64,
                connected: false,
                last_plan: None,
                log_lines: r.get::<_, i64>(8)? as u64,
                log_drops: r.get::<_, i64>(9)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Windows matching `req` (agent, pid, closed only, one id, the newest N) in id order, with
    /// their threads.
    pub fn list_windows(&self, req: &pb::ListWindowsRequest) -> Result<Vec<pb::WindowInfo>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, agent_id, pid, start_ns, end_ns, events, closed FROM windows
             WHERE (?1 = '' OR agent_id = ?1) AND (?2 = 0 OR pid = ?2) AND (?3 = 0 OR closed = 1)
               AND (?4 = 0 OR id = ?4) ORDER BY id DESC LIMIT ?5",
        )?;
        // SQLite reads a negative LIMIT as none.
        let limit = if req.latest == 0 { -1 } else { i64::from(req.latest) };
        let id = i64::try_from(req.window_id).unwrap_or(-1);
        let mut out: Vec<pb::WindowInfo> = stmt
            .query_map(params![req.agent_id, req.pid, req.closed_only as i64, id, limit], |r| {
                Ok(pb::WindowInfo {
                    id: r.get::<_, i64>(0)? as u64,
                    agent_id: r.get(1)?,
                    pid: r.get(2)?,
                    start_ns: r.get::<_, i64>(3)? as u64,
                    end_ns: r.get::<_, i64>(4)? as u64,
                    events: r.get::<_, i64>(5)? as u64,
                    closed: r.get::<_, i64>(6)? != 0,
                    tids: Vec::new(),
                    fates: Vec::new(),
                })
            })?
            .collect::<Result<_, _>>()?;
        out.reverse();
        let mut tids = self.conn.prepare("SELECT DISTINCT tid FROM edges WHERE window_id = ?1 ORDER BY tid")?;
        for w in &mut out {
            w.tids = tids.query_map(params![w.id as i64], |r| r.get(0))?.collect::<Result<_, _>>()?;
            w.fates = fates::of_window(&self.conn, &self.funcs, w.pid, w.id)?;
        }
        Ok(out)
    }

    /// The stored AFCT of a closed window's thread, or None.
    pub fn afct(&self, window_id: u64, tid: u32) -> Result<Option<pb::Tree>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT tree FROM afcts WHERE window_id = ?1 AND tid = ?2",
                params![window_id as i64, tid],
                |r| r.get(0),
            )
            .optional()?;
        blob.map(|b| pb::Tree::decode(b.as_slice()).map_err(|e| StoreError::Corrupt(e.to_string()))).transpose()
    }

    /// Calls counted in count-only mode, per function.
    pub fn counts(&self, agent_id: &str) -> Result<Vec<pb::FunctionCount>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT f.module, f.name, SUM(c.calls), SUM(c.interval_ns) FROM counts c JOIN functions f ON f.id = c.function_id
             WHERE (?1 = '' OR c.agent_id = ?1) GROUP BY f.id ORDER BY f.module, f.name",
        )?;
        let rows = stmt.query_map(params![agent_id], |r| {
            Ok(pb::FunctionCount {
                module: r.get(0)?,
                function: r.get(1)?,
                calls: r.get::<_, i64>(2)? as u64,
                interval_ns: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Aggregate counters over the whole database.
    pub fn totals(&self) -> Result<(u64, u64), StoreError> {
        let closed: i64 = self.conn.query_row("SELECT COUNT(*) FROM windows WHERE closed = 1", [], |r| r.get(0))?;
        let afcts: i64 = self.conn.query_row("SELECT COUNT(*) FROM afcts", [], |r| r.get(0))?;
        Ok((closed as u64, afcts as u64))
    }
}

/// Where a process's windows start: `origin` (its first event, or its last cut), the window
/// index at the origin (`base`), and events before `cut` are dropped.
#[derive(Clone, Copy, Debug)]
struct Anchor {
    origin: u64,
    cut: u64,
    base: u64,
}

/// Where `pid`'s windows start (None: the process never made a traced call here).
fn anchor_of(tx: &Transaction, agent: &AgentKey, pid: u32) -> Result<Option<Anchor>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT first_ts_ns, cut_ns, idx_base FROM processes WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3",
        )?
        .query_row(params![agent.agent_id, agent.instance as i64, pid], |r| {
            Ok(Anchor {
                origin: r.get::<_, i64>(0)? as u64,
                cut: r.get::<_, i64>(1)? as u64,
                base: r.get::<_, i64>(2)? as u64,
            })
        })
        .optional()?)
}

/// Open windows of an agent instance, optionally of one process and/or ending by `ended_by`.
fn open_windows(
    tx: &Transaction,
    agent: &AgentKey,
    pid: Option<u32>,
    ended_by: Option<i64>,
) -> Result<Vec<i64>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT id FROM windows WHERE agent_id = ?1 AND instance = ?2 AND closed = 0
         AND (?3 IS NULL OR pid = ?3) AND (?4 IS NULL OR end_ns <= ?4)",
    )?;
    let rows = stmt.query_map(params![agent.agent_id, agent.instance as i64, pid, ended_by], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn window_for(
    tx: &Transaction,
    agent: &AgentKey,
    pid: u32,
    idx: u64,
    start: u64,
    end: u64,
    opened: &mut u64,
) -> Result<(i64, bool), StoreError> {
    *opened += tx.execute(
        "INSERT INTO windows(agent_id, instance, pid, idx, start_ns, end_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        params![agent.agent_id, agent.instance as i64, pid, idx as i64, start as i64, end as i64],
    )? as u64;
    Ok(tx.query_row(
        "SELECT id, closed FROM windows WHERE agent_id = ?1 AND instance = ?2 AND pid = ?3 AND idx = ?4",
        params![agent.agent_id, agent.instance as i64, pid, idx as i64],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? != 0)),
    )?)
}

/// The open window a thread's fate belongs to: its process's window at the fate's time
/// (opened if the process made no call in it, as when it stopped). None when the process never
/// made a traced call, the fate is older than its last cut, or that window is closed already.
fn fate_window(
    tx: &Transaction,
    agent: &AgentKey,
    f: &pb::ThreadFate,
    len: u64,
    opened: &mut u64,
) -> Result<Option<i64>, StoreError> {
    let Some(a) = anchor_of(tx, agent, f.pid)?.filter(|a| f.ts_ns >= a.cut && f.ts_ns >= a.origin) else {
        return Ok(None);
    };
    let rel = (f.ts_ns - a.origin) / len;
    let (start, end) = (a.origin + rel * len, a.origin + (rel + 1) * len);
    let (wid, closed) = window_for(tx, agent, f.pid, a.base + rel, start, end, opened)?;
    Ok((!closed).then_some(wid))
}

/// The stored events of a window as Alg. 3's trace data, per thread.
fn trace_data(conn: &rusqlite::Connection, window_id: i64) -> Result<HashMap<u32, TraceData>, StoreError> {
    let mut per_thread: HashMap<u32, TraceData> = HashMap::new();
    let mut stmt = conn.prepare_cached("SELECT tid, caller, callee, calls FROM edges WHERE window_id = ?1")?;
    let rows = stmt.query_map(params![window_id], |r| {
        Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?, r.get::<_, u32>(2)?, r.get::<_, i64>(3)?))
    })?;
    for row in rows {
        let (tid, caller, callee, calls) = row?;
        let caller = (caller >= 0).then_some(FuncId(caller as u32));
        per_thread.entry(tid).or_default().add_edge(caller, FuncId(callee), calls as u64);
    }
    Ok(per_thread)
}

/// Builds and stores the AFCT of every thread of a window, marks its silent threads when it is
/// whole (`judge_silence`: the agent clock passed its end; [`fates::mark_silent`]) and marks it
/// closed. Returns the number of AFCTs written.
fn close_window(
    tx: &Transaction,
    funcs: &FuncTable,
    window_id: i64,
    node_cap: usize,
    judge_silence: bool,
) -> Result<u64, StoreError> {
    if judge_silence {
        fates::mark_silent(tx, window_id)?;
    }
    let per_thread = trace_data(tx, window_id)?;
    let mut n = 0;
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO afcts(window_id, tid, nodes, truncated, tree) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (tid, data) in per_thread {
        let forest: Forest = data.build(node_cap);
        if forest.truncated {
            tracing::warn!(window_id, tid, nodes = forest.len(), "AFCT hit the node cap and was truncated");
        }
        let tree = forest.to_proto(funcs);
        ins.execute(params![window_id, tid, forest.len() as i64, forest.truncated as i64, tree.encode_to_vec()])?;
        n += 1;
    }
    tx.execute("UPDATE windows SET closed = 1 WHERE id = ?1", params![window_id])?;
    Ok(n)
}
