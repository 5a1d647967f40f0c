//! What a thread's fate says about a fault, beside what its call tree says.
//!
//! A crash or a hang leaves a thread's tree looking like a normal tree cut short: the GCN,
//! which sees only calls, cannot tell a killed thread from one that was quiet (the held-out
//! figures: 0 of 12 crashes and deadlocks detected on redis). The kernel can: the agent reports
//! how each thread ended or stopped (`afetm-agent`'s fate records) with its last traced calls.
//! A thread killed by a signal a fault raises is a crash, one stopped by a stop signal a
//! deadlock, and the function behind it is where the thread was: its last traced calls, the
//! most recent first (with the injected function traced, the first; otherwise a function the
//! thread called just before it).
//!
//! An orderly end is not a fault: an exit with any status, a termination asked for (SIGTERM,
//! SIGINT, SIGHUP), or a thread gone silent (an idle server's threads go quiet all the time).
//! Silent threads are recorded for the model's features, not alarmed on here.

use afetm_fault::FaultKind;
use afetm_proto as pb;

use crate::{Diagnosis, Suspect};

/// How a thread ended or stopped, as the analyzer knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Left on its own with this exit status.
    Exited {
        /// The status (0-255).
        status: i32,
    },
    /// Ended by this signal.
    Killed {
        /// The signal number.
        signal: i32,
    },
    /// Stopped by this signal.
    Stopped {
        /// The signal number.
        signal: i32,
    },
    /// Made calls in the window before and none in this one while its process lived.
    Silent,
}

/// Signals whose default action ends a process and that a fault, not an operator, sends:
/// SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGKILL (the injector's crash, the OOM killer),
/// SIGSEGV, SIGSYS.
const FAULT_SIGNALS: [i32; 8] = [4, 5, 6, 7, 8, 9, 11, 31];

impl Fate {
    /// The fault kind this fate shows, if it shows one.
    pub fn fault_kind(self) -> Option<FaultKind> {
        match self {
            Fate::Killed { signal } if FAULT_SIGNALS.contains(&signal) => Some(FaultKind::Crash),
            Fate::Stopped { .. } => Some(FaultKind::Deadlock),
            _ => None,
        }
    }
}

/// One thread's fate in a window and its last traced calls, oldest first (function names as
/// the model's classes name them, without the module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadFate {
    /// The thread.
    pub tid: u32,
    /// What happened to it.
    pub fate: Fate,
    /// Its last traced calls, oldest first.
    pub last_calls: Vec<String>,
    /// Where it was when the kernel delivered the signal behind its fate: the function it was
    /// in, then its callers outwards (empty when unknown). The kernel's view, whatever the plan
    /// traces.
    pub stack: Vec<String>,
    /// The thread took a fault's signal itself (the others of its process died of it), with
    /// the default action or into a crash handler of its own.
    pub took_signal: bool,
}

impl ThreadFate {
    /// The fault kind this thread's end shows: its fate's, or a crash when it took a fault's
    /// signal into its own handler and then exited with a failure status (a crash reporter
    /// that ends with `_exit(1)` instead of re-raising).
    pub fn fault_kind(&self) -> Option<FaultKind> {
        match self.fate {
            Fate::Exited { status } if self.took_signal && status != 0 => Some(FaultKind::Crash),
            fate => fate.fault_kind(),
        }
    }
}

/// Fates as the analyzer serves them (a window's `fates`), as the diagnosis reads them: kinds
/// typed, calls named without their module (as the model's classes name functions). A fate of
/// no known kind is left out.
pub fn from_proto(fates: &[pb::ThreadFate]) -> Vec<ThreadFate> {
    fates
        .iter()
        .filter_map(|f| {
            let fate = match pb::FateKind::try_from(f.kind).ok()? {
                pb::FateKind::Exited => Fate::Exited { status: f.code },
                pb::FateKind::Killed => Fate::Killed { signal: f.code },
                pb::FateKind::Stopped => Fate::Stopped { signal: f.code },
                pb::FateKind::Silent => Fate::Silent,
                pb::FateKind::Unspecified => return None,
            };
            let bare = |calls: &[String]| -> Vec<String> {
                calls.iter().map(|c| c.split_once(':').map_or(c.as_str(), |(_, n)| n).to_string()).collect()
            };
            Some(ThreadFate {
                tid: f.tid,
                fate,
                last_calls: bare(&f.last_calls),
                stack: bare(&f.stack),
                took_signal: f.took_signal,
            })
        })
        .collect()
}

/// The verdict a window's fates give, when one shows a fault: P(normal) 0 for that thread, its
/// fault kind, and as suspects the functions of its stack when it took the signal (the one it
/// was in, then its callers), then its last calls, most recent first (each half as likely as
/// the one before: a ranking, not a calibrated probability), those `known` names first. When
/// several threads show one, a thread that took the fault's signal itself comes first, then
/// crashes, then hangs. `None` when no fate shows a fault.
///
/// `known` says which functions a diagnosis can name: a model's, those its FDDB injected
/// faults into ([`Model::fault_functions`](crate::model::Model::fault_functions)), as the
/// GCN's classes are; without a model, the functions the agent traces (the daemon takes those
/// among the fates' last calls). A fault seldom stops a thread in the faulty function itself:
/// a corrupted argument or return value, or a skipped instruction, lets it run on into callees, the allocator or a handler that the last calls
/// then end with. In redis's quick campaign (full trace, the 57 training fault runs with a
/// fate) the injected function was among the thread's last 8 calls in 34 and, each time, the
/// most recent of the campaign's functions there, but the most recent call of all in 15. The
/// stack names the enclosing functions the plan does not trace: a corrupted argument that
/// crashes a callee leaves the faulty function among the crash site's callers, and an
/// injected kill or stop at a function's entry leaves the thread in it.
pub fn verdict(fates: &[ThreadFate], top_k: usize, known: &dyn Fn(&str) -> bool) -> Option<(u32, Diagnosis)> {
    let (thread, kind) = fates
        .iter()
        .filter_map(|f| Some((f, f.fault_kind()?)))
        .min_by_key(|(f, k)| (!f.took_signal, *k != FaultKind::Crash))?;
    let mut functions: Vec<&str> = Vec::new();
    for call in thread.stack.iter().chain(thread.last_calls.iter().rev()) {
        if !functions.contains(&call.as_str()) {
            functions.push(call);
        }
    }
    // Stable: recency order within the known and within the rest.
    functions.sort_by_key(|f| !known(f));
    functions.truncate(top_k.max(1));
    let total: f32 = (0..functions.len()).map(|i| 0.5f32.powi(i as i32)).sum();
    let top = functions
        .iter()
        .enumerate()
        .map(|(i, f)| Suspect { function: f.to_string(), kind, probability: 0.5f32.powi(i as i32) / total })
        .collect();
    Some((thread.tid, Diagnosis { p_normal: 0.0, error: true, top }))
}

/// How a window's fate verdict and the GCN's verdict on the same thread's AFCT make one,
/// when the fate shows a fault. Either way the window alarms (P(normal) 0): the kernel's word
/// that the thread was killed or stopped settles detection. What differs is who names the
/// fault. [`Rules::PRIOR`] is fixed in advance, and `afetm-eval` replaces a class's rule only
/// when another names clearly more of the GCN's validation runs right: a corrupted argument
/// that makes the server die of SIGSEGV leaves last calls downstream of the faulty function,
/// which the GCN may know from its training runs, while a kill at the faulty call leaves it
/// first among them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// The fate's suspects alone ([`verdict`]): its kind, its last calls, most recent first.
    #[default]
    Fate,
    /// The GCN's suspects (its fault classes, most likely first), the fate's alarm.
    Gcn,
    /// Half the fate's ranking, half the GCN's: each (function, kind) scores half its weight
    /// among the fate's suspects plus half its probability among the GCN's fault classes
    /// (renormalised over those shown), best first. Equal halves, fixed before any run was
    /// scored: nothing here is fitted.
    Merge,
    /// The fate's functions in its order, each with the fault kind the GCN finds likeliest
    /// for it (its most probable class of that function; the fate's kind where it has
    /// none): a SIGSEGV names where the thread was, but an input, output or IP+N fault of the
    /// function behind it is not a `crash`.
    Kinds,
}

/// The GCN's suspects [`Combine::Merge`] renormalises over (the GCN's diagnosis handed to
/// [`combine`] should rank every class, so that [`Combine::Kinds`] finds each function's).
pub const RANKED: usize = 8;

impl std::str::FromStr for Combine {
    type Err = String;

    fn from_str(s: &str) -> Result<Combine, String> {
        Combine::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown fate rule {s:?} (expected fate, kinds, merge or gcn)"))
    }
}

impl Combine {
    /// Every rule, in the order a tie between them is broken (the simpler first).
    pub const ALL: [Combine; 4] = [Combine::Fate, Combine::Kinds, Combine::Merge, Combine::Gcn];

    /// The rule's name in notes and manifests.
    pub fn name(self) -> &'static str {
        match self {
            Combine::Fate => "fate",
            Combine::Gcn => "gcn",
            Combine::Merge => "merge",
            Combine::Kinds => "kinds",
        }
    }
}

/// What a fault's fate was, as the fate rules tell them apart: who names the fault may differ
/// between a thread killed from outside where it was, one that died of its own fault, and one
/// that hangs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FateClass {
    /// Killed by SIGKILL: from outside the thread (the OOM killer, a watchdog, the injector's
    /// crash), in whatever call it was making.
    Kill,
    /// Another fault signal (SIGSEGV, SIGABRT, ...) or a crash handler's failing exit: raised
    /// where a corruption hit, which may be downstream of the function that caused it.
    Signal,
    /// Stopped: a hang.
    Stop,
}

impl FateClass {
    /// Every class, in the order rules are chosen and written.
    pub const ALL: [FateClass; 3] = [FateClass::Kill, FateClass::Signal, FateClass::Stop];

    /// The class's name in rules (`kill`, `signal`, `stop`).
    pub fn name(self) -> &'static str {
        match self {
            FateClass::Kill => "kill",
            FateClass::Signal => "signal",
            FateClass::Stop => "stop",
        }
    }
}

impl ThreadFate {
    /// The class of this thread's fault fate; `None` when its end shows no fault.
    pub fn class(&self) -> Option<FateClass> {
        Some(match self.fault_kind()? {
            FaultKind::Deadlock => FateClass::Stop,
            _ if self.fate == (Fate::Killed { signal: SIGKILL }) => FateClass::Kill,
            _ => FateClass::Signal,
        })
    }
}

/// SIGKILL's number.
const SIGKILL: i32 = 9;

/// The class of the fate [`verdict`] chose (that of thread `tid`).
pub fn class_of(fates: &[ThreadFate], tid: u32) -> Option<FateClass> {
    fates.iter().filter(|f| f.tid == tid).find_map(ThreadFate::class)
}

/// How many more validation fault runs another rule must name right at top-1 (function,
/// kind) than [`Rules::PRIOR`]'s before it replaces the prior one: at least this many, and at
/// least a tenth of the validation fault runs. On the 14-17 validation fault runs a campaign of
/// the quick scope gives, a one-run lead is noise (two seeds' choices of `gcn` for `signal` by
/// one run each scored 5 and 9 runs worse held out than `kinds` or `fate`).
pub const RULE_MARGIN: usize = 2;

/// One [`Combine`] rule per [`FateClass`] (`serve --fate-rule`, `afetm-eval`'s choice). Written
/// as one rule for all (`gcn`) or per class (`kill=fate,signal=gcn,stop=fate`; a class not
/// named keeps `fate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// For [`FateClass::Kill`].
    pub kill: Combine,
    /// For [`FateClass::Signal`].
    pub signal: Combine,
    /// For [`FateClass::Stop`].
    pub stop: Combine,
}

impl Rules {
    /// The rules fixed before any run is read, which a choice on validation runs must clearly
    /// beat ([`RULE_MARGIN`]): a SIGKILL or a SIGSTOP says both where the thread was and what
    /// stopped it (the injector's `crash` and `deadlock` are exactly these), so the fate alone;
    /// a fault signal (SIGSEGV, SIGABRT, SIGILL, ...) says where the thread was but not which
    /// fault of the function behind it (a corrupted argument or return value, skipped
    /// instructions, a crash), which is the GCN's to say: [`Combine::Kinds`].
    pub const PRIOR: Rules = Rules { kill: Combine::Fate, signal: Combine::Kinds, stop: Combine::Fate };

    /// The same rule for every class.
    pub fn all(rule: Combine) -> Rules {
        Rules { kill: rule, signal: rule, stop: rule }
    }

    /// The rule for `class`.
    pub fn get(&self, class: FateClass) -> Combine {
        match class {
            FateClass::Kill => self.kill,
            FateClass::Signal => self.signal,
            FateClass::Stop => self.stop,
        }
    }

    /// Sets the rule for `class`.
    pub fn set(&mut self, class: FateClass, rule: Combine) {
        match class {
            FateClass::Kill => self.kill = rule,
            FateClass::Signal => self.signal = rule,
            FateClass::Stop => self.stop = rule,
        }
    }
}

impl std::fmt::Display for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Rules::all(self.kill) {
            return f.write_str(self.kill.name());
        }
        let parts: Vec<String> =
            FateClass::ALL.iter().map(|c| format!("{}={}", c.name(), self.get(*c).name())).collect();
        f.write_str(&parts.join(","))
    }
}

impl std::str::FromStr for Rules {
    type Err = String;

    fn from_str(s: &str) -> Result<Rules, String> {
        if !s.contains('=') {
            return s.parse().map(Rules::all);
        }
        let mut rules = Rules::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (class, rule) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected class=rule"))?;
            let class = FateClass::ALL
                .into_iter()
                .find(|c| c.name() == class.trim())
                .ok_or_else(|| format!("unknown fate class {class:?} (expected kill, signal or stop)"))?;
            rules.set(class, rule.trim().parse()?);
        }
        Ok(rules)
    }
}

/// One verdict from a fate's (`fate`, from [`verdict`]) and the GCN's (`gcn`: its diagnosis of
/// the same thread's AFCT with enough suspects to rank, `None` when the thread has no tree),
/// by `rule`, with at most `top_k` suspects. Without a GCN verdict the fate's stands.
pub fn combine(rule: Combine, fate: Diagnosis, gcn: Option<&Diagnosis>, top_k: usize) -> Diagnosis {
    let Some(gcn) = gcn.filter(|g| !g.top.is_empty()) else { return fate };
    let mut top = match rule {
        Combine::Fate => return fate,
        Combine::Gcn => gcn.top.clone(),
        Combine::Merge => merge(&fate.top, &gcn.top[..gcn.top.len().min(RANKED)]),
        Combine::Kinds => kinds(fate.top, &gcn.top),
    };
    top.truncate(top_k.max(1));
    Diagnosis { p_normal: 0.0, error: true, top }
}

/// [`Combine::Kinds`]'s suspects: the fate's, each with the kind of the GCN's likeliest
/// class of its function (`gcn` is ranked most likely first).
fn kinds(fate: Vec<Suspect>, gcn: &[Suspect]) -> Vec<Suspect> {
    fate.into_iter()
        .map(|s| match gcn.iter().find(|g| g.function == s.function) {
            Some(g) => Suspect { kind: g.kind, ..s },
            None => s,
        })
        .collect()
}

/// [`Combine::Merge`]'s ranking.
fn merge(fate: &[Suspect], gcn: &[Suspect]) -> Vec<Suspect> {
    let share = |list: &[Suspect]| -> Vec<(String, FaultKind, f32)> {
        let total: f32 = list.iter().map(|s| s.probability.max(0.0)).sum();
        let total = if total > 0.0 { total } else { 1.0 };
        list.iter().map(|s| (s.function.clone(), s.kind, 0.5 * s.probability.max(0.0) / total)).collect()
    };
    let mut scored: Vec<Suspect> = Vec::new();
    for (function, kind, p) in share(fate).into_iter().chain(share(gcn)) {
        match scored.iter_mut().find(|s| s.function == function && s.kind == kind) {
            Some(s) => s.probability += p,
            None => scored.push(Suspect { function, kind, probability: p }),
        }
    }
    // Stable: on a tie the fate's suspect (listed first) stays first.
    scored.sort_by(|a, b| b.probability.total_cmp(&a.probability));
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fate(tid: u32, fate: Fate, calls: &[&str]) -> ThreadFate {
        ThreadFate {
            tid,
            fate,
            last_calls: calls.iter().map(|c| c.to_string()).collect(),
            stack: Vec::new(),
            took_signal: false,
        }
    }

    #[test]
    fn faults_are_crashes_and_hangs_orderly_ends_are_not() {
        assert_eq!(Fate::Killed { signal: 11 }.fault_kind(), Some(FaultKind::Crash));
        assert_eq!(Fate::Killed { signal: 9 }.fault_kind(), Some(FaultKind::Crash));
        assert_eq!(Fate::Stopped { signal: 19 }.fault_kind(), Some(FaultKind::Deadlock));
        for orderly in
            [Fate::Killed { signal: 15 }, Fate::Killed { signal: 2 }, Fate::Exited { status: 1 }, Fate::Silent]
        {
            assert_eq!(orderly.fault_kind(), None, "{orderly:?}");
        }
        let quiet = [fate(1, Fate::Silent, &["a"]), fate(2, Fate::Exited { status: 0 }, &["b"])];
        assert_eq!(verdict(&quiet, 3, &|_| true), None);
        // A crash handler that ends with a failure status: a crash where the signal came.
        let handled = ThreadFate { took_signal: true, ..fate(3, Fate::Exited { status: 1 }, &["boom"]) };
        assert_eq!(handled.fault_kind(), Some(FaultKind::Crash));
        let recovered = ThreadFate { took_signal: true, ..fate(3, Fate::Exited { status: 0 }, &["boom"]) };
        assert_eq!(recovered.fault_kind(), None, "a handler that recovered and a clean exit");
    }

    #[test]
    fn the_last_calls_are_the_suspects_most_recent_first() {
        let fates = [
            fate(7, Fate::Stopped { signal: 19 }, &["x"]),
            fate(8, Fate::Killed { signal: 11 }, &["main", "parse", "leaf", "parse", "get"]),
        ];
        let (tid, d) = verdict(&fates, 3, &|_| true).expect("a verdict");
        assert_eq!(tid, 8, "a crash comes before a hang");
        assert!(d.error && d.p_normal == 0.0);
        let names: Vec<&str> = d.top.iter().map(|s| s.function.as_str()).collect();
        assert_eq!(names, ["get", "parse", "leaf"], "distinct, most recent first, top_k of them");
        assert!(d.top.iter().all(|s| s.kind == FaultKind::Crash));
        assert!(d.top.windows(2).all(|w| w[0].probability > w[1].probability));
        assert!((d.top.iter().map(|s| s.probability).sum::<f32>() - 1.0).abs() < 1e-6);
        let (_, hang) = verdict(&fates[..1], 3, &|_| true).expect("a verdict");
        assert_eq!(hang.top[0].kind, FaultKind::Deadlock);
        // Of two threads killed by one SIGSEGV, the one that took it names the function.
        let segv = [
            fate(1, Fate::Killed { signal: 11 }, &["tick"]),
            ThreadFate { took_signal: true, ..fate(2, Fate::Killed { signal: 11 }, &["tick", "boom"]) },
        ];
        let (tid, d) = verdict(&segv, 3, &|_| true).expect("a verdict");
        assert_eq!((tid, d.top[0].function.as_str()), (2, "boom"));
    }

    #[test]
    fn the_functions_a_model_knows_come_first_among_the_last_calls() {
        // A corrupted argument of `parse` crashes in the allocator it calls on.
        let fates = [fate(8, Fate::Killed { signal: 11 }, &["main", "parse", "malloc", "memcpy", "malloc"])];
        let known = |f: &str| matches!(f, "parse" | "main");
        let (_, d) = verdict(&fates, 3, &known).expect("a verdict");
        let names: Vec<&str> = d.top.iter().map(|s| s.function.as_str()).collect();
        assert_eq!(names, ["parse", "main", "malloc"], "known ones first, each group most recent first");
        let (_, none) = verdict(&fates, 2, &|_| false).expect("a verdict");
        let names: Vec<&str> = none.top.iter().map(|s| s.function.as_str()).collect();
        assert_eq!(names, ["malloc", "memcpy"], "nothing known: most recent first");
    }

    #[test]
    fn the_stack_at_the_signal_comes_before_the_last_calls() {
        // `set` corrupted the key it passed on; `lookup` (traced) returned, and the hash it
        // calls (not traced) crashed: the stack names `set`, which the last calls cannot.
        let crashed = ThreadFate {
            stack: ["siphash", "dictFind", "set", "call", "main"].map(String::from).to_vec(),
            ..fate(8, Fate::Killed { signal: 11 }, &["main", "lookup"])
        };
        let known = |f: &str| matches!(f, "set" | "lookup" | "main");
        let (_, d) = verdict(std::slice::from_ref(&crashed), 3, &known).expect("a verdict");
        let names: Vec<&str> = d.top.iter().map(|s| s.function.as_str()).collect();
        assert_eq!(names, ["set", "main", "lookup"], "known first: the stack innermost first, then the last calls");
        let (_, any) = verdict(&[crashed], 6, &|_| true).expect("a verdict");
        let names: Vec<&str> = any.top.iter().map(|s| s.function.as_str()).collect();
        assert_eq!(names, ["siphash", "dictFind", "set", "call", "main", "lookup"], "each function once");
        let served = pb::ThreadFate {
            kind: pb::FateKind::Killed as i32,
            code: 9,
            tid: 3,
            stack: vec!["redis-server:createClient".into(), "libc.so.6:start_thread".into()],
            ..Default::default()
        };
        assert_eq!(from_proto(&[served])[0].stack, ["createClient", "start_thread"]);
    }

    #[test]
    fn served_fates_are_typed_and_named_without_their_module() {
        let served = |kind: pb::FateKind, code| pb::ThreadFate {
            pid: 1,
            tid: 5,
            kind: kind as i32,
            code,
            last_calls: vec!["redis-server:main".into(), "plain".into()],
            took_signal: true,
            ..Default::default()
        };
        let fates = from_proto(&[
            served(pb::FateKind::Killed, 11),
            served(pb::FateKind::Stopped, 19),
            served(pb::FateKind::Exited, 3),
            served(pb::FateKind::Silent, 0),
            served(pb::FateKind::Unspecified, 0),
        ]);
        let kinds: Vec<Fate> = fates.iter().map(|f| f.fate).collect();
        assert_eq!(
            kinds,
            [Fate::Killed { signal: 11 }, Fate::Stopped { signal: 19 }, Fate::Exited { status: 3 }, Fate::Silent],
            "an unspecified fate is left out"
        );
        assert_eq!(fates[0].last_calls, ["main", "plain"]);
        assert!(fates[0].took_signal && fates[0].tid == 5);
    }
    fn suspect(function: &str, kind: FaultKind, probability: f32) -> Suspect {
        Suspect { function: function.into(), kind, probability }
    }

    #[test]
    fn the_rules_keep_the_alarm_and_differ_in_who_names_the_fault() {
        let fates = [fate(8, Fate::Killed { signal: 11 }, &["main", "parse", "get"])];
        let (_, by_fate) = verdict(&fates, 3, &|_| true).expect("a verdict");
        let gcn = Diagnosis {
            p_normal: 0.7,
            error: false,
            top: vec![
                suspect("parse", FaultKind::Input, 0.2),
                suspect("get", FaultKind::Crash, 0.05),
                suspect("other", FaultKind::Output, 0.05),
            ],
        };
        let names = |d: &Diagnosis| d.top.iter().map(|s| (s.function.clone(), s.kind)).collect::<Vec<_>>();
        for rule in Combine::ALL {
            let d = combine(rule, by_fate.clone(), Some(&gcn), 3);
            assert!(d.error && d.p_normal == 0.0, "{rule:?}: the fate's alarm stands");
            assert!(d.top.len() <= 3);
            assert_eq!(combine(rule, by_fate.clone(), None, 3), by_fate, "{rule:?} without a tree");
        }
        assert_eq!(combine(Combine::Fate, by_fate.clone(), Some(&gcn), 3), by_fate);
        let g = combine(Combine::Gcn, by_fate.clone(), Some(&gcn), 2);
        assert_eq!(names(&g), [("parse".into(), FaultKind::Input), ("get".into(), FaultKind::Crash)]);
        // Merge: get/crash is half the fate's 4/7 plus half the GCN's 1/6 (0.05 of 0.3 shown):
        // 0.369; parse/input half the GCN's 2/3: 0.333; parse/crash half the fate's 2/7: 0.143.
        let m = combine(Combine::Merge, by_fate.clone(), Some(&gcn), 3);
        assert_eq!(
            names(&m),
            [("get".into(), FaultKind::Crash), ("parse".into(), FaultKind::Input), ("parse".into(), FaultKind::Crash)]
        );
        assert!((m.top[0].probability - (0.5 * 4.0 / 7.0 + 0.5 / 6.0)).abs() < 1e-5, "{m:?}");
        assert!(m.top.windows(2).all(|w| w[0].probability >= w[1].probability));
        // Kinds: the fate's functions, each with its likeliest class's kind in the GCN.
        let k = combine(Combine::Kinds, by_fate.clone(), Some(&gcn), 3);
        assert_eq!(
            names(&k),
            [("get".into(), FaultKind::Crash), ("parse".into(), FaultKind::Input), ("main".into(), FaultKind::Crash)],
            "main has no class: the fate's kind"
        );
        assert_eq!(
            k.top.iter().map(|s| s.probability).collect::<Vec<_>>(),
            by_fate.top.iter().map(|s| s.probability).collect::<Vec<_>>()
        );
    }

    #[test]
    fn fates_are_classed_and_rules_read_as_written() {
        let class = |f: Fate| fate(1, f, &[]).class();
        assert_eq!(class(Fate::Killed { signal: 9 }), Some(FateClass::Kill));
        assert_eq!(class(Fate::Killed { signal: 11 }), Some(FateClass::Signal));
        assert_eq!(class(Fate::Stopped { signal: 19 }), Some(FateClass::Stop));
        assert_eq!(class(Fate::Killed { signal: 15 }), None);
        let handled = ThreadFate { took_signal: true, ..fate(2, Fate::Exited { status: 1 }, &[]) };
        assert_eq!(handled.class(), Some(FateClass::Signal));
        assert_eq!(class_of(&[fate(1, Fate::Silent, &[]), handled], 2), Some(FateClass::Signal));

        let per: Rules = "kill=fate, signal=gcn".parse().unwrap();
        assert_eq!(per, Rules { kill: Combine::Fate, signal: Combine::Gcn, stop: Combine::Fate });
        assert_eq!(per.to_string(), "kill=fate,signal=gcn,stop=fate");
        assert_eq!(per.to_string().parse::<Rules>(), Ok(per));
        assert_eq!("merge".parse::<Rules>(), Ok(Rules::all(Combine::Merge)));
        assert_eq!(Rules::all(Combine::Gcn).to_string(), "gcn");
        assert!("boom=gcn".parse::<Rules>().unwrap_err().contains("expected kill, signal or stop"));
        assert!("kill=vote".parse::<Rules>().unwrap_err().contains("expected fate, kinds, merge or gcn"));
        assert_eq!("signal=kinds".parse::<Rules>().map(|r| r.signal), Ok(Combine::Kinds));
    }

    #[test]
    fn rules_are_named_as_manifests_write_them() {
        for rule in Combine::ALL {
            let json = serde_json::to_string(&rule).unwrap();
            assert_eq!(json, format!("\"{}\"", rule.name()));
            assert_eq!(serde_json::from_str::<Combine>(&json).unwrap(), rule);
        }
        assert!(serde_json::from_str::<Combine>("\"vote\"").is_err());
        assert_eq!("merge".parse::<Combine>(), Ok(Combine::Merge));
        assert!("vote".parse::<Combine>().unwrap_err().contains("expected fate, kinds, merge or gcn"));
    }
}
