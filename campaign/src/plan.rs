//! The campaign's fault plan (AFETM sec. III.C.1, IV.A): which faults to inject.
//!
//! The injection targets are the functions the workload activates (called at least once while
//! sampling, i.e. weight > 0). Per function: one IP+N, one crash and one deadlock; one input
//! corruption per integer or pointer parameter (in a register or on the stack; float and
//! by-value aggregate parameters are left out); one output corruption if it
//! returns an integer or pointer. Parameters and return types come from DWARF
//! (`afetm_elf::dwarf`); a function without a DWARF signature gets the three faults that need
//! none, and the plan counts how many interface faults were left out that way.
//!
//! Which bit an interface fault flips is drawn from bits 0..32 by a seeded generator, so a
//! campaign is reproducible and still corrupts low and high bits across functions. How each
//! manifested is classified by [`classify`].

use std::{collections::HashMap, fmt, str::FromStr};

use afetm_elf::dwarf::{Signature, ValueClass};
use afetm_fault::Fault;
use afetm_fddb::{HeldOut, Manifestation};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// Which activated functions a campaign covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every activated function.
    All,
    /// These functions (those of them the workload activates).
    Named(Vec<String>),
    /// The N most frequently called.
    Top(usize),
    /// N drawn at random with a seed.
    Random {
        /// How many.
        n: usize,
        /// The sample's seed.
        seed: u64,
    },
}

/// `--scope paper-sample`: 44 activated functions per target, drawn with a fixed seed: about
/// 1,040 faults over the four targets (5.4-6.4 faults per function on the source builds),
/// against 6,730 at scope `all` (the paper's campaign had 6,696). Measured cost per fault on
/// the 2-core machines (README): ~40 min for all four with `--cap 1 --eval-runs 0`, ~75 min
/// with one evaluation run per fault (redis alone, measured: 227 faults, 14.6 min).
pub const PAPER_SAMPLE: Scope = Scope::Random { n: 44, seed: 2026 };

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => write!(f, "all"),
            Scope::Named(names) => write!(f, "functions:{}", names.join(",")),
            Scope::Top(n) => write!(f, "top:{n}"),
            Scope::Random { n, seed } => write!(f, "random:{n}:{seed}"),
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        let bad = || format!("scope {s:?}: expected all, paper-sample, top:N, random:N:SEED or functions:F1,F2,...");
        if s == "paper-sample" {
            return Ok(PAPER_SAMPLE);
        }
        if let Some(list) = s.strip_prefix("functions:") {
            let names: Vec<String> = list.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect();
            return if names.is_empty() { Err(bad()) } else { Ok(Scope::Named(names)) };
        }
        match s.split(':').collect::<Vec<_>>().as_slice() {
            ["all"] => Ok(Scope::All),
            ["top", n] => n.parse().map(Scope::Top).map_err(|_| bad()),
            ["random", n, seed] => {
                Ok(Scope::Random { n: n.parse().map_err(|_| bad())?, seed: seed.parse().map_err(|_| bad())? })
            }
            _ => Err(bad()),
        }
    }
}

/// One fault to inject into one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFault {
    /// The function.
    pub function: String,
    /// The fault.
    pub fault: Fault,
}

/// The campaign's fault plan for one target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Functions in scope, most called first.
    pub functions: Vec<String>,
    /// Their faults, function by function.
    pub faults: Vec<PlannedFault>,
    /// Functions in scope without a DWARF signature (no interface faults for them).
    pub without_signature: usize,
}

/// Picks the functions in `scope` from the activated ones (name, calls per second; only
/// weight > 0 counts) and lists their faults.
pub fn plan(activated: &[(String, f64)], signatures: &HashMap<String, Signature>, scope: &Scope, seed: u64) -> Plan {
    let mut funcs: Vec<(String, f64)> = activated.iter().filter(|(_, w)| *w > 0.0).cloned().collect();
    funcs.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let chosen: Vec<String> = match scope {
        Scope::All => funcs.into_iter().map(|f| f.0).collect(),
        Scope::Named(names) => funcs.into_iter().map(|f| f.0).filter(|f| names.contains(f)).collect(),
        Scope::Top(n) => funcs.into_iter().take(*n).map(|f| f.0).collect(),
        Scope::Random { n, seed } => {
            let (n, seed) = (*n, *seed);
            let mut rng = StdRng::seed_from_u64(seed);
            let mut v: Vec<String> = funcs.into_iter().map(|f| f.0).collect();
            // Partial Fisher-Yates: the first n are the sample.
            let n = n.min(v.len());
            for i in 0..n {
                let j = rng.random_range(i..v.len());
                v.swap(i, j);
            }
            v.truncate(n);
            v
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Plan::default();
    for f in &chosen {
        for fault in [Fault::IpPlus(None), Fault::Crash, Fault::Deadlock] {
            out.faults.push(PlannedFault { function: f.clone(), fault });
        }
        match signatures.get(f) {
            Some(sig) => {
                // The injector's parameter index: registers 0..6, then 6 + stack slot.
                let params = sig
                    .register_params()
                    .into_iter()
                    .chain(sig.stack_params().into_iter().map(|(i, slot)| (i, 6 + slot)));
                for (_, arg) in params {
                    let bit = rng.random_range(0..32u32);
                    out.faults.push(PlannedFault { function: f.clone(), fault: Fault::Input { arg, bit } });
                }
                if sig.returns == Some(ValueClass::Integer) {
                    let bit = rng.random_range(0..32u32);
                    out.faults.push(PlannedFault { function: f.clone(), fault: Fault::Output { bit } });
                }
            }
            None => out.without_signature += 1,
        }
    }
    out.functions = chosen;
    out
}

/// The plan cut into what training may see and what only the evaluation injects (issue 23,
/// "Unseen specs"): training faults are scored again on their own spec ("same spec"); every
/// parameterised training fault gets one sibling that no training run uses ("unseen spec":
/// another bit of the same argument, another bit of the return value, IP+N skipping two
/// instructions instead of one); and every fault of the held-out functions is evaluation-only
/// ("unseen function"). Crash and deadlock have no parameter, so they have no unseen spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Faults with training runs (and same-spec evaluation runs).
    pub train: Vec<PlannedFault>,
    /// Faults with evaluation runs only, and why.
    pub held_out: Vec<(PlannedFault, HeldOut)>,
}

/// Cuts `plan` (see [`Split`]): `functions` of its functions (at most all but one) are held
/// out, drawn with `seed`; `skip_two` gives, per function, the bytes of its first two
/// instructions (its held-out IP+N; a function missing there gets none).
pub fn split(plan: &Plan, functions: usize, skip_two: &HashMap<String, u32>, seed: u64) -> Split {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4845_4c44_4f55_5421);
    let mut pool = plan.functions.clone();
    let k = functions.min(pool.len().saturating_sub(1));
    for i in 0..k {
        let j = rng.random_range(i..pool.len());
        pool.swap(i, j);
    }
    pool.truncate(k);
    let mut out = Split::default();
    for f in &plan.faults {
        if pool.contains(&f.function) {
            out.held_out.push((f.clone(), HeldOut::Function));
            continue;
        }
        out.train.push(f.clone());
        let other_bit = |rng: &mut StdRng, bit: u32| (bit + rng.random_range(1..32u32)) % 32;
        let sibling = match f.fault {
            Fault::Input { arg, bit } => Some(Fault::Input { arg, bit: other_bit(&mut rng, bit) }),
            Fault::Output { bit } => Some(Fault::Output { bit: other_bit(&mut rng, bit) }),
            Fault::IpPlus(None) => skip_two.get(&f.function).map(|n| Fault::IpPlus(Some(*n))),
            Fault::IpPlus(Some(_)) | Fault::Crash | Fault::Deadlock => None,
        };
        if let Some(fault) = sibling {
            out.held_out.push((PlannedFault { function: f.function.clone(), fault }, HeldOut::Spec));
        }
    }
    out
}

/// Mean latency (us) of a run whose requests all failed above which it counts as a hang: the
/// campaign's requests time out after 500 ms.
pub const HANG_LATENCY_US: f64 = 400_000.0;

/// What a run looked like from outside, for [`classify`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed {
    /// A target process died during the run.
    pub died: bool,
    /// A target process was stopped (state T) at the end of the run.
    pub stopped: bool,
    /// Requests sent.
    pub requests: u64,
    /// Requests failed.
    pub errors: u64,
    /// Mean latency, us.
    pub mean_latency_us: f64,
}

/// The manifestation of a faulty run, against the mean latency of the normal runs: crash,
/// then hang (stopped, or every request failed after a mean wait of at least
/// [`HANG_LATENCY_US`]: timeouts, not quick error answers), then errors, then slow (mean
/// latency above `slow_factor` x normal), else nothing.
pub fn classify(o: &Observed, normal_mean_latency_us: f64, slow_factor: f64) -> Manifestation {
    if o.died {
        Manifestation::Crash
    } else if o.stopped || (o.requests > 0 && o.errors == o.requests && o.mean_latency_us >= HANG_LATENCY_US) {
        Manifestation::Hang
    } else if o.errors > 0 {
        Manifestation::Errors
    } else if normal_mean_latency_us > 0.0 && o.mean_latency_us > slow_factor * normal_mean_latency_us {
        Manifestation::Slow
    } else {
        Manifestation::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(params: Vec<ValueClass>, returns: Option<ValueClass>) -> Signature {
        Signature { name: String::new(), params, returns }
    }

    #[test]
    fn faults_per_function_follow_the_paper() {
        use ValueClass::*;
        let activated =
            vec![("a".to_string(), 10.0), ("b".to_string(), 50.0), ("c".to_string(), 0.0), ("d".into(), 1.0)];
        let sigs: HashMap<String, Signature> = [
            ("a".to_string(), sig(vec![Integer, Float, Integer], Some(Integer))),
            ("b".to_string(), sig(vec![], None)),
        ]
        .into();
        let p = plan(&activated, &sigs, &Scope::All, 7);
        assert_eq!(p.functions, vec!["b", "a", "d"], "most called first; c was never called");
        let kinds =
            |f: &str| p.faults.iter().filter(|x| x.function == f).map(|x| x.fault.kind().as_str()).collect::<Vec<_>>();
        assert_eq!(kinds("a"), vec!["ip+n", "crash", "deadlock", "input", "input", "output"]);
        assert_eq!(kinds("b"), vec!["ip+n", "crash", "deadlock"], "void, no parameters");
        assert_eq!(kinds("d"), vec!["ip+n", "crash", "deadlock"]);
        assert_eq!(p.without_signature, 1);
        let specs: Vec<String> =
            p.faults.iter().filter(|x| matches!(x.fault, Fault::Input { .. })).map(|x| x.fault.to_string()).collect();
        assert!(specs[0].starts_with("input:0:") && specs[1].starts_with("input:1:"), "registers rdi, rsi: {specs:?}");
        assert_eq!(plan(&activated, &sigs, &Scope::All, 7), p, "same seed, same plan");
        assert_eq!(plan(&activated, &sigs, &Scope::Top(1), 7).functions, vec!["b"]);
        let r = plan(&activated, &sigs, &Scope::Random { n: 2, seed: 3 }, 7);
        assert_eq!(r.functions.len(), 2);
        assert_eq!(r, plan(&activated, &sigs, &Scope::Random { n: 2, seed: 3 }, 7));
        assert_eq!("top:5".parse::<Scope>().unwrap(), Scope::Top(5));
        assert_eq!("random:3:9".parse::<Scope>().unwrap(), Scope::Random { n: 3, seed: 9 });
        assert!("top".parse::<Scope>().is_err() && "some".parse::<Scope>().is_err());
        for s in ["all", "top:5", "random:3:9", "functions:a,b"] {
            assert_eq!(s.parse::<Scope>().unwrap().to_string(), s, "scopes are stored as text");
        }
        assert_eq!("paper-sample".parse::<Scope>().unwrap(), PAPER_SAMPLE);
        let eight: HashMap<String, Signature> = [("a".to_string(), sig(vec![Integer; 8], None))].into();
        let args: Vec<String> = plan(&activated, &eight, &Scope::Named(vec!["a".into()]), 1)
            .faults
            .iter()
            .filter_map(|x| match x.fault {
                Fault::Input { arg, .. } => Some(arg.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(args, ["0", "1", "2", "3", "4", "5", "6", "7"], "six registers, then stack slots 0 and 1");
        let named = "functions:a,c,x".parse::<Scope>().unwrap();
        assert_eq!(plan(&activated, &sigs, &named, 7).functions, vec!["a"], "c was never called, x does not exist");
    }

    #[test]
    fn held_out_specs_and_functions_are_never_trained() {
        use ValueClass::*;
        let activated: Vec<(String, f64)> = ["a", "b", "c", "d", "e"].iter().map(|f| (f.to_string(), 1.0)).collect();
        let sigs: HashMap<String, Signature> =
            activated.iter().map(|(f, _)| (f.clone(), sig(vec![Integer, Integer], Some(Integer)))).collect();
        let p = plan(&activated, &sigs, &Scope::All, 7);
        let skip_two: HashMap<String, u32> = activated.iter().map(|(f, _)| (f.clone(), 5)).collect();
        let s = split(&p, 2, &skip_two, 7);
        assert_eq!(s, split(&p, 2, &skip_two, 7), "same seed, same split");
        let unseen_fns: std::collections::BTreeSet<&str> =
            s.held_out.iter().filter(|(_, h)| *h == HeldOut::Function).map(|(f, _)| f.function.as_str()).collect();
        assert_eq!(unseen_fns.len(), 2);
        assert!(s.train.iter().all(|f| !unseen_fns.contains(f.function.as_str())), "no training run of them");
        assert_eq!(s.held_out.iter().filter(|(_, h)| *h == HeldOut::Function).count(), 2 * 6, "all their faults");
        let trained: std::collections::HashSet<(String, Fault)> =
            s.train.iter().map(|f| (f.function.clone(), f.fault)).collect();
        let specs: Vec<&PlannedFault> =
            s.held_out.iter().filter(|(_, h)| *h == HeldOut::Spec).map(|(f, _)| f).collect();
        // Per trained function: two inputs, one output and IP+N get a sibling; crash and
        // deadlock do not.
        assert_eq!(specs.len(), 3 * 4);
        for f in &specs {
            assert!(!trained.contains(&(f.function.clone(), f.fault)), "{} {} is unseen", f.function, f.fault);
            let same_kind = |t: &&PlannedFault| t.function == f.function && t.fault.kind() == f.fault.kind();
            assert!(s.train.iter().any(|t| same_kind(&t)), "{} {}: a known (function, kind)", f.function, f.fault);
            if let Fault::Input { arg, .. } = f.fault {
                assert!(s.train.iter().any(|t| t.function == f.function && matches!(t.fault, Fault::Input { arg: a, .. } if a == arg)));
            }
        }
        assert!(specs.iter().any(|f| f.fault == Fault::IpPlus(Some(5))));
        assert_eq!(
            split(&p, 9, &skip_two, 7)
                .train
                .iter()
                .map(|f| &f.function)
                .collect::<std::collections::HashSet<_>>()
                .len(),
            1,
            "one function is always trained"
        );
        assert!(
            split(&p, 0, &HashMap::new(), 7)
                .held_out
                .iter()
                .all(|(f, h)| *h == HeldOut::Spec && f.fault.kind() != afetm_fault::FaultKind::IpPlusN)
        );
    }

    #[test]
    fn manifestations() {
        let o =
            |died, stopped, requests, errors, lat| Observed { died, stopped, requests, errors, mean_latency_us: lat };
        assert_eq!(classify(&o(true, false, 10, 10, 5.0), 100.0, 2.0), Manifestation::Crash);
        assert_eq!(classify(&o(false, true, 10, 0, 5.0), 100.0, 2.0), Manifestation::Hang);
        assert_eq!(classify(&o(false, false, 4, 4, 2e6), 100.0, 2.0), Manifestation::Hang);
        assert_eq!(classify(&o(false, false, 4, 4, 5e5), 100.0, 2.0), Manifestation::Hang);
        assert_eq!(classify(&o(false, false, 4, 4, 900.0), 100.0, 2.0), Manifestation::Errors, "quick 5xx");
        assert_eq!(classify(&o(false, false, 10, 1, 100.0), 100.0, 2.0), Manifestation::Errors);
        assert_eq!(classify(&o(false, false, 10, 0, 300.0), 100.0, 2.0), Manifestation::Slow);
        assert_eq!(classify(&o(false, false, 10, 0, 150.0), 100.0, 2.0), Manifestation::Nothing);
    }
}
