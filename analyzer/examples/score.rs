//! Scores a model on the FDDB's eval-role runs (colored, masked FCTs): per run, detected if any
//! tree alarms, located if the top-1 of its tree with the lowest P(normal) is the run's fault.
//! `cargo run --release --example score -- FDDB TARGET PLAN MODEL`. (The evaluation issue
//! builds the full report; this is the quick check.)
use std::collections::BTreeMap;

use afetm_analyzer::training::labelled_trees;
use afetm_diagnosis::{Class, Model};
use afetm_fddb::{Fddb, Role};
use afetm_proto::plan::PlanFile;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let fddb = Fddb::open(std::path::Path::new(&a[1]))?;
    let plan = PlanFile::parse(&std::fs::read_to_string(&a[3])?)?;
    let model = Model::load(std::path::Path::new(&a[4]))?;
    let set = labelled_trees(&fddb, &a[2], &plan, Role::Eval)?;
    // Per run: its class and, per tree, (P(normal), top-1).
    type Trees = Vec<(f32, Option<String>)>;
    let mut runs: BTreeMap<i64, (Class, Trees)> = BTreeMap::new();
    for s in &set.samples {
        let d = model.diagnose(&s.tree, 3)?;
        let top = d.top.first().map(|t| format!("{}@{}", t.kind, t.function));
        runs.entry(s.run).or_insert_with(|| (s.run_class.clone(), Vec::new())).1.push((d.p_normal, top));
    }
    let t = model.manifest.threshold;
    let (mut faults, mut detected, mut located, mut normals, mut alarms) = (0, 0, 0, 0, 0);
    for (run, (class, trees)) in &runs {
        let worst = trees.iter().min_by(|a, b| a.0.total_cmp(&b.0)).unwrap();
        let alarm = worst.0 < t;
        match class {
            Class::Normal => {
                normals += 1;
                alarms += alarm as u32;
            }
            c => {
                faults += 1;
                detected += alarm as u32;
                let right = worst.1.as_deref() == Some(&c.to_string());
                located += right as u32;
                println!(
                    "run {run} {c}: worst P(normal) {:.3} top-1 {:?} {}",
                    worst.0,
                    worst.1,
                    if right { "RIGHT" } else { "" }
                );
            }
        }
    }
    println!(
        "fault runs {faults}: detected {detected}, top-1 located {located}; normal runs {normals}: {alarms} false alarms; threshold {t}"
    );
    Ok(())
}
