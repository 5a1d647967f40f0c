//! Overload control: when the ring buffer overflows, the agent lowers the hottest functions'
//! modes (call stack -> event -> count) until drops stop, and raises them again, one at a time,
//! once it has been calm for a while. A count-mode function still reports its calls, so nothing
//! is lost silently: what was demoted is in the plan report (`PlanReport.demoted`) and the log.
//!
//! This module is the policy only (which function, when); the reader feeds it events and
//! drops, and the agent's main loop applies its actions to the tracer.

use std::time::{Duration, Instant};

use agent_common::MAX_FUNCS;

/// What to do to one function (by the tracer's function id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// One mode down (call stack -> event -> count).
    Demote(u32),
    /// One mode up, never above the plan's.
    Restore(u32),
}

/// Tuning of the [`Governor`].
#[derive(Clone, Debug)]
pub struct GovernorConfig {
    /// Drop-free time before the first restoration, and between restorations.
    pub calm: Duration,
    /// Longest wait before restoring a function demoted again and again (the wait doubles each
    /// time the same function is demoted within two calm periods of its restoration).
    pub max_calm: Duration,
    /// Most functions demoted in one tick.
    pub max_per_tick: usize,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        GovernorConfig { calm: Duration::from_secs(5), max_calm: Duration::from_secs(300), max_per_tick: 8 }
    }
}

/// The policy's state.
pub struct Governor {
    cfg: GovernorConfig,
    /// Events per function id since the last tick.
    events: Vec<u32>,
    touched: Vec<u32>,
    /// Demoted steps, oldest first: (function, when).
    demoted: Vec<(u32, Instant)>,
    /// Per function: the wait before restoring it, and when it was last restored.
    backoff: std::collections::HashMap<u32, (Duration, Instant)>,
    last_drop: Option<Instant>,
    last_restore: Option<Instant>,
}

impl Governor {
    pub fn new(cfg: GovernorConfig) -> Governor {
        Governor {
            cfg,
            events: vec![0; MAX_FUNCS as usize],
            touched: Vec::new(),
            demoted: Vec::new(),
            backoff: Default::default(),
            last_drop: None,
            last_restore: None,
        }
    }

    /// One event of function `fn_id` arrived.
    #[inline]
    pub fn record(&mut self, fn_id: u32) {
        if let Some(c) = self.events.get_mut(fn_id as usize) {
            if *c == 0 {
                self.touched.push(fn_id);
            }
            *c = c.saturating_add(1);
        }
    }

    /// Steps currently demoted.
    pub fn demoted(&self) -> usize {
        self.demoted.len()
    }

    /// Decides after one reader interval in which the kernel dropped `new_drops` events.
    /// `demotable(id)` says whether a function is in a mode that can go down.
    pub fn tick(&mut self, now: Instant, new_drops: u64, demotable: impl Fn(u32) -> bool) -> Vec<Action> {
        let mut hot: Vec<(u32, u32)> = self.touched.iter().map(|id| (self.events[*id as usize], *id)).collect();
        for id in self.touched.drain(..) {
            self.events[id as usize] = 0;
        }
        if new_drops > 0 {
            self.last_drop = Some(now);
            hot.sort_unstable_by(|a, b| b.cmp(a));
            let mut out = Vec::new();
            let mut shed = 0u64;
            // The hottest functions until what they sent covers what was lost.
            for (n, id) in hot.into_iter().filter(|(_, id)| demotable(*id)) {
                if out.len() >= self.cfg.max_per_tick || (shed >= new_drops && !out.is_empty()) {
                    break;
                }
                shed += n as u64;
                self.demoted.push((id, now));
                if let Some((wait, restored)) = self.backoff.get_mut(&id)
                    && now.duration_since(*restored) < 2 * *wait
                {
                    *wait = (*wait * 2).min(self.cfg.max_calm);
                }
                out.push(Action::Demote(id));
            }
            return out;
        }
        let calm_since = [self.last_drop, self.last_restore].into_iter().flatten().max();
        let Some(&(id, _)) = self.demoted.last() else {
            return Vec::new();
        };
        let wait = self.backoff.get(&id).map_or(self.cfg.calm, |b| b.0);
        if calm_since.is_none_or(|t| now.duration_since(t) >= wait) {
            self.demoted.pop();
            self.last_restore = Some(now);
            self.backoff.entry(id).or_insert((self.cfg.calm, now)).1 = now;
            return vec![Action::Restore(id)];
        }
        Vec::new()
    }

    /// Forgets every demotion (a new plan sets every mode).
    pub fn reset(&mut self) {
        self.demoted.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gov() -> Governor {
        Governor::new(GovernorConfig {
            calm: Duration::from_secs(1),
            max_calm: Duration::from_secs(8),
            max_per_tick: 8,
        })
    }

    fn feed(g: &mut Governor, counts: &[(u32, u32)]) {
        for (id, n) in counts {
            for _ in 0..*n {
                g.record(*id);
            }
        }
    }

    #[test]
    fn drops_demote_the_hottest_functions_until_they_cover_the_loss() {
        let mut g = gov();
        let t = Instant::now();
        feed(&mut g, &[(1, 10), (2, 500), (3, 300), (4, 50)]);
        // 600 lost: the two hottest (500 + 300) cover it.
        assert_eq!(g.tick(t, 600, |_| true), vec![Action::Demote(2), Action::Demote(3)]);
        // Not demotable (already count mode): skipped.
        feed(&mut g, &[(2, 500), (3, 300)]);
        assert_eq!(g.tick(t, 1, |id| id != 2), vec![Action::Demote(3)]);
        assert_eq!(g.demoted(), 3);
    }

    #[test]
    fn calm_restores_one_step_at_a_time_last_demoted_first() {
        let mut g = gov();
        let t = Instant::now();
        feed(&mut g, &[(1, 100), (2, 50)]);
        assert_eq!(g.tick(t, 120, |_| true).len(), 2);
        assert!(g.tick(t + Duration::from_millis(500), 0, |_| true).is_empty(), "not calm for long enough");
        assert_eq!(g.tick(t + Duration::from_secs(1), 0, |_| true), vec![Action::Restore(2)]);
        assert!(
            g.tick(t + Duration::from_millis(1500), 0, |_| true).is_empty(),
            "one calm period between restorations"
        );
        assert_eq!(g.tick(t + Duration::from_secs(2), 0, |_| true), vec![Action::Restore(1)]);
        assert!(g.tick(t + Duration::from_secs(10), 0, |_| true).is_empty());
    }

    #[test]
    fn a_function_that_keeps_overflowing_waits_longer_each_time() {
        let mut g = gov();
        let mut t = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..5 {
            feed(&mut g, &[(7, 1000)]);
            assert_eq!(g.tick(t, 10, |_| true), vec![Action::Demote(7)]);
            let demoted_at = t;
            loop {
                t += Duration::from_millis(250);
                if g.tick(t, 0, |_| true) == vec![Action::Restore(7)] {
                    break;
                }
            }
            waits.push(t.duration_since(demoted_at));
            t += Duration::from_millis(100); // drops again right after the restoration
        }
        let secs: Vec<u64> = waits.iter().map(|w| w.as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 8], "backoff doubles up to max_calm: {waits:?}");
    }
}
