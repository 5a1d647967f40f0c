//! Log collection beside the traces (`afetm-agent --log FILE`): a thread tails each file like
//! `tail -F` (from its end at start; again from the start after a rotation or truncation) and
//! queues complete lines, stamped with the agent clock the windows use; the reader takes
//! them into its next batch, so they travel in the same stream, acknowledged and resent like
//! events.
//!
//! Bounded: at most [`MAX_LINE`] bytes per line (the rest is cut and counted), at most
//! [`READ_PER_POLL`] bytes per file per poll, at most `max_pending` lines waiting for a batch
//! (the oldest are dropped and counted; the count goes out as `Batch.log_drops`).

use std::{
    collections::VecDeque,
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use afetm_proto as pb;

/// Longest line kept, bytes.
pub const MAX_LINE: usize = 4096;
/// Most bytes read from one file per poll.
pub const READ_PER_POLL: u64 = 1 << 20;

/// Lines waiting for the next batch.
pub struct LogQueue {
    state: Mutex<(VecDeque<pb::LogRecord>, u64)>,
    max_pending: usize,
}

impl LogQueue {
    /// A queue of at most `max_pending` lines.
    pub fn new(max_pending: usize) -> Arc<LogQueue> {
        Arc::new(LogQueue { state: Mutex::new((VecDeque::new(), 0)), max_pending: max_pending.max(1) })
    }

    fn push(&self, line: pb::LogRecord) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0.len() >= self.max_pending {
            s.0.pop_front();
            s.1 += 1;
            if s.1 == 1 || s.1.is_power_of_two() {
                tracing::warn!(dropped = s.1, "log queue full: dropping the oldest lines");
            }
        }
        s.0.push_back(line);
    }

    /// Lines waiting.
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Up to `max` lines, oldest first, and the lines dropped so far.
    pub fn take(&self, max: usize) -> (Vec<pb::LogRecord>, u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.0.len().min(max);
        (s.0.drain(..n).collect(), s.1)
    }
}

/// One tailed file.
struct Tailed {
    path: PathBuf,
    name: String,
    inode: Option<u64>,
    offset: u64,
    partial: Vec<u8>,
    missing_warned: bool,
}

impl Tailed {
    fn new(path: PathBuf) -> Tailed {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut t = Tailed { path, name, inode: None, offset: 0, partial: Vec::new(), missing_warned: false };
        // Start at the end: the history before the agent started is not this agent's to send.
        if let Ok(m) = std::fs::metadata(&t.path) {
            t.inode = Some(m.ino());
            t.offset = m.len();
        }
        t
    }

    /// Reads what was appended, returning complete lines.
    fn poll(&mut self) -> Vec<String> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                if !self.missing_warned {
                    tracing::warn!(file = %self.path.display(), error = %e, "log file not readable yet; still watching");
                    self.missing_warned = true;
                }
                return Vec::new();
            }
        };
        self.missing_warned = false;
        if self.inode != Some(meta.ino()) || meta.len() < self.offset {
            // Rotated or truncated: the new file is read from its start.
            self.inode = Some(meta.ino());
            self.offset = 0;
            self.partial.clear();
        }
        if meta.len() == self.offset {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let read = File::open(&self.path).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.offset))?;
            f.take(READ_PER_POLL).read_to_end(&mut buf)
        });
        let Ok(n) = read else { return Vec::new() };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let mut lines = Vec::new();
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let rest = self.partial.split_off(i + 1);
            let mut line = std::mem::replace(&mut self.partial, rest);
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            line.truncate(MAX_LINE);
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        if self.partial.len() > MAX_LINE {
            // A line longer than the bound with no end yet: keep its start only.
            self.partial.truncate(MAX_LINE);
        }
        lines
    }
}

fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Tails `files` every `poll` into `queue` until `stop`.
pub fn run(files: Vec<PathBuf>, queue: Arc<LogQueue>, poll: Duration, stop: Arc<AtomicBool>) {
    let mut tailed: Vec<Tailed> = files.into_iter().map(Tailed::new).collect();
    loop {
        let last = stop.load(Ordering::Relaxed);
        for t in &mut tailed {
            let lines = t.poll();
            if lines.is_empty() {
                continue;
            }
            let ts_ns = now_ns(libc::CLOCK_MONOTONIC);
            let unix_ms = (now_ns(libc::CLOCK_REALTIME) / 1_000_000) as i64;
            for text in lines {
                queue.push(pb::LogRecord { file: t.name.clone(), ts_ns, unix_ms, text });
            }
        }
        if last {
            break;
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn tails_appends_rotations_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redis.log");
        std::fs::write(&path, "old line before the agent\n").unwrap();
        let mut t = Tailed::new(path.clone());
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "one\ntwo\npart").unwrap();
        assert_eq!(t.poll(), ["one", "two"]);
        write!(f, "ial\n{}\n", "x".repeat(MAX_LINE + 10)).unwrap();
        let got = t.poll();
        assert_eq!(got[0], "partial");
        assert_eq!(got[1].len(), MAX_LINE);
        // Rotation: a new file under the same name is read from its start.
        std::fs::rename(&path, dir.path().join("redis.log.1")).unwrap();
        std::fs::write(&path, "fresh\n").unwrap();
        assert_eq!(t.poll(), ["fresh"]);
        // A missing file is watched until it appears.
        let mut m = Tailed::new(dir.path().join("later.log"));
        assert!(m.poll().is_empty());
        std::fs::write(dir.path().join("later.log"), "hello\n").unwrap();
        assert_eq!(m.poll(), ["hello"]);
    }

    #[test]
    fn the_queue_drops_the_oldest_and_counts() {
        let q = LogQueue::new(2);
        for i in 0..5 {
            q.push(pb::LogRecord { text: i.to_string(), ..Default::default() });
        }
        let (lines, dropped) = q.take(10);
        assert_eq!(lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["3", "4"]);
        assert_eq!(dropped, 3);
    }
}
