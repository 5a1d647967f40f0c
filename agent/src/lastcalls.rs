//! Each traced thread's last few calls, kept by the reader so that a thread taking a fault's
//! signal can be sent with the calls it made before it: a crash handler (redis's
//! `sigsegvHandler`, which runs a memory test) makes traced calls of its own between the fault
//! and the thread's exit, and the analyzer, which only sees calls up to the exit, would name
//! the handler.
//!
//! A fixed ring per thread, bounded in threads: one hash lookup per event, no allocation after
//! a thread's first call.

use std::collections::HashMap;

/// Calls kept per thread (the analyzer keeps as many: `afetm_store::fates::LAST_CALLS`): a
/// fault often stops a thread some calls after the faulty function (in its callees, the
/// allocator, a crash handler): under a full trace the last 8 missed it in 23 of redis's 57
/// training fault runs with a fate. 136 bytes a thread, at most [`MAX_THREADS`] (2.2 MB).
pub const KEPT: usize = 32;

/// Threads followed at most; past it the rings start over (a process with more live threads
/// than this is far outside what a plan traces).
pub const MAX_THREADS: usize = 1 << 14;

/// One thread's newest [`KEPT`] symbol ids.
#[derive(Clone, Copy, Default)]
struct Ring {
    ids: [u32; KEPT],
    /// Calls seen in all (the newest is at `(seen - 1) % KEPT`).
    seen: u64,
}

impl Ring {
    fn push(&mut self, id: u32) {
        self.ids[(self.seen % KEPT as u64) as usize] = id;
        self.seen += 1;
    }

    fn oldest_first(&self) -> Vec<u32> {
        let n = self.seen.min(KEPT as u64);
        (self.seen - n..self.seen).map(|i| self.ids[(i % KEPT as u64) as usize]).collect()
    }
}

/// The last calls of every thread that made one, by thread id.
#[derive(Default)]
pub struct LastCalls {
    rings: HashMap<u32, Ring>,
    /// Times the table was full and started over.
    pub resets: u64,
}

impl LastCalls {
    /// Notes a call of symbol `id` by thread `tid`.
    pub fn push(&mut self, tid: u32, id: u32) {
        if self.rings.len() >= MAX_THREADS && !self.rings.contains_key(&tid) {
            self.rings.clear();
            self.resets += 1;
        }
        self.rings.entry(tid).or_default().push(id);
    }

    /// The thread's last calls, oldest first (empty if it made none or was forgotten).
    pub fn of(&self, tid: u32) -> Vec<u32> {
        self.rings.get(&tid).map(Ring::oldest_first).unwrap_or_default()
    }

    /// Forgets a thread that ended (its id may be reused).
    pub fn forget(&mut self, tid: u32) {
        self.rings.remove(&tid);
    }

    /// Threads followed now.
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    /// Whether no thread is followed.
    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_calls_in_order() {
        let mut l = LastCalls::default();
        assert!(l.of(7).is_empty());
        for id in 1..=3 {
            l.push(7, id);
        }
        assert_eq!(l.of(7), vec![1, 2, 3]);
        let last = KEPT as u32 + 12;
        for id in 4..=last {
            l.push(7, id);
        }
        assert_eq!(l.of(7), (last - KEPT as u32 + 1..=last).collect::<Vec<_>>(), "the newest KEPT, oldest first");
        l.push(8, 99);
        assert_eq!(l.of(8), vec![99], "threads are apart");
        l.forget(7);
        assert!(l.of(7).is_empty());
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut l = LastCalls::default();
        for tid in 0..MAX_THREADS as u32 {
            l.push(tid, 1);
        }
        assert_eq!((l.len(), l.resets), (MAX_THREADS, 0));
        l.push(0, 2);
        assert_eq!((l.len(), l.resets), (MAX_THREADS, 0), "a known thread adds nothing");
        l.push(MAX_THREADS as u32, 3);
        assert_eq!((l.len(), l.resets), (1, 1));
        assert_eq!(l.of(MAX_THREADS as u32), vec![3]);
    }
}
