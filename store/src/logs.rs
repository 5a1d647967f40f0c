//! Log lines the agents tailed (`afetm-agent --log`) and engineers' feedback.
//!
//! A line belongs to its agent instance and carries the agent clock at which it was read; a
//! window's lines are those of its agent read during the window. The table keeps at most
//! [`super::Limits::max_log_lines`] lines: the oldest go first, counted in the log.

use afetm_proto as pb;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{AgentKey, Store, StoreError, invalid};

/// The tables (created with the rest of the schema).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS logs (id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, instance INTEGER NOT NULL,
  ts_ns INTEGER NOT NULL, unix_ms INTEGER NOT NULL, file TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS logs_time ON logs(agent_id, instance, ts_ns);
CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY, window_id INTEGER NOT NULL REFERENCES windows(id),
  line TEXT NOT NULL, confirm INTEGER NOT NULL, note TEXT NOT NULL, unix_ms INTEGER NOT NULL,
  cause TEXT NOT NULL DEFAULT '');
"#;

/// Adds what tables created by earlier versions lack.
pub fn migrate(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    let has: i64 =
        conn.query_row("SELECT COUNT(*) FROM pragma_table_info('feedback') WHERE name = 'cause'", [], |r| r.get(0))?;
    if has == 0 {
        conn.execute_batch("ALTER TABLE feedback ADD COLUMN cause TEXT NOT NULL DEFAULT '';")?;
    }
    Ok(())
}

/// Longest line accepted, bytes (the agent cuts at 4 KiB).
pub const MAX_LINE: usize = 64 * 1024;

/// One stored verdict of an engineer.
#[derive(Clone, Debug, PartialEq)]
pub struct Feedback {
    /// Its id.
    pub id: i64,
    /// The window.
    pub window_id: u64,
    /// The line judged (empty: the window).
    pub line: String,
    /// Confirmed (a root cause / in error) or rejected.
    pub confirm: bool,
    /// Free text.
    pub note: String,
    /// The root cause named, `function/kind` (empty: none).
    pub cause: String,
}

/// Checks a batch's log lines against the limits.
pub fn validate(batch: &pb::Batch, max_lines: usize) -> Result<(), StoreError> {
    if batch.logs.len() > max_lines {
        return Err(invalid("log_lines", format!("{} log lines in one batch (limit {max_lines})", batch.logs.len())));
    }
    if let Some(l) = batch.logs.iter().find(|l| l.text.len() > MAX_LINE || l.file.len() > 4096) {
        return Err(invalid(
            "log_line",
            format!("a log line of {} bytes from {:?} (limit {MAX_LINE})", l.text.len(), l.file),
        ));
    }
    Ok(())
}

/// Stores a batch's lines in its transaction and bumps the agent's counters.
pub fn put(tx: &Transaction, agent: &AgentKey, batch: &pb::Batch, keep: usize) -> Result<(), StoreError> {
    if !batch.logs.is_empty() {
        let mut ins = tx.prepare_cached(
            "INSERT INTO logs(agent_id, instance, ts_ns, unix_ms, file, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for l in &batch.logs {
            ins.execute(params![agent.agent_id, agent.instance as i64, l.ts_ns as i64, l.unix_ms, l.file, l.text])?;
        }
        let top: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM logs", [], |r| r.get(0))?;
        let gone = tx.execute("DELETE FROM logs WHERE id <= ?1", params![top - keep as i64])?;
        if gone > 0 {
            tracing::warn!(deleted = gone, keep, "log table full: the oldest lines were deleted");
        }
    }
    tx.execute(
        "UPDATE agents SET log_lines = log_lines + ?3, log_drops = ?4 WHERE agent_id = ?1 AND instance = ?2",
        params![agent.agent_id, agent.instance as i64, batch.logs.len() as i64, batch.log_drops as i64],
    )?;
    Ok(())
}

impl Store {
    /// The lines of a window's agent read during the window, in order.
    pub fn window_logs(&self, window_id: u64) -> Result<Vec<pb::LogRecord>, StoreError> {
        let (agent, instance, start, end) = self.window_span(window_id)?;
        self.agent_logs(&agent, instance, start, end)
    }

    /// The lines of a window's agent read in the `span_ns` after the window's end, in order:
    /// what clients logged once a process had exited (a crashed server's callers fail after
    /// its last window has closed, so their errors fall in no window of that process).
    pub fn logs_after_window(&self, window_id: u64, span_ns: u64) -> Result<Vec<pb::LogRecord>, StoreError> {
        let (agent, instance, _, end) = self.window_span(window_id)?;
        self.agent_logs(&agent, instance, end, end.saturating_add(span_ns.min(i64::MAX as u64) as i64))
    }

    /// A window's agent, instance, start and end (agent clock).
    fn window_span(&self, window_id: u64) -> Result<(String, i64, i64, i64), StoreError> {
        self.conn
            .query_row(
                "SELECT agent_id, instance, start_ns, end_ns FROM windows WHERE id = ?1",
                params![window_id as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?
            .ok_or_else(|| invalid("window", format!("no window {window_id}")))
    }

    /// An agent instance's lines read in `[start, end)`, in order.
    fn agent_logs(&self, agent: &str, instance: i64, start: i64, end: i64) -> Result<Vec<pb::LogRecord>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT file, ts_ns, unix_ms, text FROM logs WHERE agent_id = ?1 AND instance = ?2 AND ts_ns >= ?3 AND ts_ns < ?4 ORDER BY id",
        )?;
        let rows = st.query_map(params![agent, instance, start, end], |r| {
            Ok(pb::LogRecord {
                file: r.get(0)?,
                ts_ns: r.get::<_, i64>(1)? as u64,
                unix_ms: r.get(2)?,
                text: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores an engineer's verdict; the window must exist.
    pub fn put_feedback(&mut self, f: &pb::FeedbackRequest) -> Result<i64, StoreError> {
        let exists: bool = self
            .conn
            .query_row("SELECT 1 FROM windows WHERE id = ?1", params![f.window_id as i64], |_| Ok(true))
            .optional()?
            .unwrap_or(false);
        if !exists {
            return Err(invalid("window", format!("no window {}", f.window_id)));
        }
        if !f.cause.is_empty() {
            let kind = f.cause.rsplit_once('/').map(|(_, k)| k).unwrap_or("");
            if f.cause.split('/').next().is_none_or(str::is_empty) || kind.parse::<afetm_fault::FaultKind>().is_err() {
                return Err(invalid(
                    "cause",
                    format!("cause {:?}: expected function/kind (kind: crash, deadlock, ip+n, input, output)", f.cause),
                ));
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.conn.execute(
            "INSERT INTO feedback(window_id, line, confirm, note, unix_ms, cause) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![f.window_id as i64, f.line, f.confirm, f.note, now, f.cause],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Every verdict, oldest first (a later one on the same line or window overrides).
    pub fn feedback(&self) -> Result<Vec<Feedback>, StoreError> {
        let mut st = self.conn.prepare("SELECT id, window_id, line, confirm, note, cause FROM feedback ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(Feedback {
                id: r.get(0)?,
                window_id: r.get::<_, i64>(1)? as u64,
                line: r.get(2)?,
                confirm: r.get(3)?,
                note: r.get(4)?,
                cause: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
