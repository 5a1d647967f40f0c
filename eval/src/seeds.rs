//! Figures over several campaign seeds, side by side (issue 23: "report each figure over at
//! least two campaign seeds (each seed's value and the spread), and meet the targets on
//! every seed, not on the best"). Each seed is one `cargo xtask eval --seed N` folder; its
//! rows pair with the other seeds' by (target, budget, condition, method).

use std::fmt::Write as _;

use crate::report::Row;

/// One seed's rows, named as the report prints it (its folder, say).
pub struct Seeded {
    /// The seed's name.
    pub name: String,
    /// Its rows (`rows-*.json`).
    pub rows: Vec<Row>,
}

/// A figure of a row: (hits, of how many).
type Figure = fn(&Row) -> (u64, u64);

/// The figures compared, as (column, figure).
const FIGURES: [(&str, Figure); 5] = [
    ("EDR", |r| (r.scores.counts.detected, r.scores.fault_runs)),
    ("FLR top-1 fn", |r| (r.scores.counts.top1_function, r.scores.fault_runs)),
    ("FLR top-3 fn", |r| (r.scores.counts.top3_function, r.scores.fault_runs)),
    ("FLR top-1 (fn, kind)", |r| (r.scores.counts.top1_class, r.scores.fault_runs)),
    ("FAR", |r| (r.scores.counts.false_alarms, r.scores.normal_runs)),
];

fn key(r: &Row) -> (&str, &str, &str, &str) {
    (&r.target, &r.budget, &r.condition, &r.method)
}

fn pct(k: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| 100.0 * k as f64 / n as f64)
}

/// One cell: each seed's k/n, then the spread in points and the worst seed's value (for FAR
/// the highest, for the others the lowest).
fn cell(rows: &[&Row], figure: Figure, higher_is_worse: bool) -> String {
    let values: Vec<(u64, u64)> = rows.iter().map(|r| figure(r)).collect();
    let each: Vec<String> = values.iter().map(|(k, n)| format!("{k}/{n}")).collect();
    let p: Vec<f64> = values.iter().filter_map(|(k, n)| pct(*k, *n)).collect();
    if p.len() < 2 {
        return each.join(" · ");
    }
    let (lo, hi) = p.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let worst = if higher_is_worse { hi } else { lo };
    format!("{} (spread {:.0} pts, worst {worst:.0}%)", each.join(" · "), hi - lo)
}

/// The markdown table: per row present in every seed, each figure per seed, its spread and
/// its worst seed; then the rows some seed lacks.
pub fn table(seeds: &[Seeded]) -> String {
    let mut out = String::new();
    let names: Vec<&str> = seeds.iter().map(|s| s.name.as_str()).collect();
    let _ = writeln!(out, "# Figures per campaign seed\n");
    let _ = writeln!(out, "Seeds, in each cell's order: {}. Each figure: runs hit / runs scored.\n", names.join(", "));
    let columns: Vec<&str> = FIGURES.iter().map(|(c, _)| *c).collect();
    let _ = writeln!(out, "| target | P | condition | method | {} |", columns.join(" | "));
    let _ = writeln!(out, "|---|---|---|---|{}", "---|".repeat(columns.len()));
    let mut missing = Vec::new();
    let Some(first) = seeds.first() else { return out };
    for row in &first.rows {
        let matched: Vec<&Row> = seeds.iter().filter_map(|s| s.rows.iter().find(|r| key(r) == key(row))).collect();
        if matched.len() < seeds.len() {
            missing.push(format!("{} {} {} {}", row.target, row.budget, row.condition, row.method));
            continue;
        }
        let cells: Vec<String> = FIGURES.iter().map(|(c, f)| cell(&matched, *f, *c == "FAR")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.target,
            row.budget,
            row.condition,
            row.method,
            cells.join(" | ")
        );
    }
    for s in &seeds[1..] {
        for row in s.rows.iter().filter(|r| !first.rows.iter().any(|f| key(f) == key(r))) {
            missing.push(format!("{} {} {} {}", row.target, row.budget, row.condition, row.method));
        }
    }
    if !missing.is_empty() {
        let _ = writeln!(out, "\nRows not scored on every seed (left out above): {}.", missing.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{method::Input, metrics::Scores};

    fn row(method: &str, detected: u64, top1: u64, false_alarms: u64) -> Row {
        let mut scores = Scores { fault_runs: 20, normal_runs: 30, ..Default::default() };
        scores.counts.detected = detected;
        scores.counts.top1_function = top1;
        scores.counts.false_alarms = false_alarms;
        Row {
            target: "redis".into(),
            budget: "10%".into(),
            condition: "fddb: unseen spec".into(),
            method: method.into(),
            input: Input::Afct,
            scores,
            mo_kib: None,
            notes: String::new(),
            excluded: None,
            chance: None,
        }
    }

    #[test]
    fn each_seed_its_spread_and_its_worst() {
        let seeds = [
            Seeded { name: "seed-1".into(), rows: vec![row("AFETM", 19, 10, 0), row("Bag", 10, 5, 1)] },
            Seeded { name: "seed-2".into(), rows: vec![row("AFETM", 15, 12, 3)] },
        ];
        let t = table(&seeds);
        let afetm = t.lines().find(|l| l.contains("| AFETM |")).expect(&t);
        assert!(afetm.contains("19/20 · 15/20 (spread 20 pts, worst 75%)"), "{afetm}");
        assert!(afetm.contains("10/20 · 12/20 (spread 10 pts, worst 50%)"), "{afetm}");
        assert!(afetm.contains("0/30 · 3/30 (spread 10 pts, worst 10%)"), "FAR's worst is the highest: {afetm}");
        assert!(!t.contains("| Bag |") && t.contains("left out above): redis 10% fddb: unseen spec Bag"), "{t}");
    }
}
