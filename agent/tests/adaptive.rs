//! Adaptive tracing, live (AFETM sec. III.A/B): the analyzer pushes three new plans to an agent
//! on the real redis-server while the NHSR-OSW shop serves the CRUD mix. Each plan's events
//! follow it, `call` (in every plan) never stops, and no request fails. One plan probes every
//! function of redis-server (count mode) and the next drops all but two again.
mod common;

use std::{collections::BTreeSet, thread::sleep, time::Duration};

use afetm_calltree::tree::Color;
use afetm_proto::{self as pb, query_client::QueryClient};
use common::*;
use testbed::{Config, load};

#[test]
fn three_live_plan_changes_under_testbed_load() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path().join("run"));
    cfg.base_port = 26080;
    cfg.apaches = 2;
    cfg.children = 4;
    cfg.seed_items = 50;
    let stack = Stack(cfg.clone());
    testbed::up(&cfg).unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    let redis = cfg.binaries.redis.clone();

    let an =
        AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "300ms", "--grace", "200ms"]);
    let plan = write_plan(dir.path(), "redis", &redis, &[("call", "event"), ("lookupKey", "event")]);
    let agent = AgentProc::start(&plan, &an.url, "redis", dir.path());

    let mut l = load::LoadConfig::new(cfg.url());
    l.connections = 4;
    l.duration = Duration::from_secs(7);
    l.warmup = Duration::ZERO;
    l.items = cfg.seed_items;
    let load = std::thread::spawn(move || load::run(&l));

    use pb::TraceMode::{Callstack, Count, Event};
    let plans: [&[(&str, pb::TraceMode)]; 3] = [
        // lookupKey leaves (call is handed over to a new link), two functions come in.
        &[("call", Event), ("processCommand", Callstack), ("addReply", Event)],
        // Every function of redis-server counted; call still an event.
        &[("*", Count), ("call", Event)],
        // Back to two: ~4,300 functions leave.
        &[("call", Event), ("lookupKey", Event)],
    ];
    let allowed: [&[&str]; 4] =
        [&["call", "lookupKey"], &["call", "processCommand", "addReply"], &["call"], &["call", "lookupKey"]];
    let mut changes = vec![(0u64, monotonic_ns())]; // (start, applied) of each phase
    sleep(Duration::from_millis(1500));
    let mut reports = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let start = monotonic_ns();
        let r = push_plan(&an.url, "redis", &redis, i as u64 + 1, p);
        changes.push((start, monotonic_ns()));
        eprintln!(
            "plan {}: {} functions, attached {}, detached {}, relinked {}, {:.0} ms",
            i + 1,
            r.probes.len(),
            r.attached,
            r.detached,
            r.relinked,
            (monotonic_ns() - start) as f64 / 1e6
        );
        reports.push(r);
        sleep(Duration::from_millis(1500));
    }
    let report = load.join().unwrap().unwrap();
    assert_eq!(report.errors, 0, "requests failed while plans changed: {}", report.text());
    assert!(report.requests > 100, "{}", report.text());
    assert_eq!(reports[0].relinked, 1, "call is handed over when lookupKey leaves its link");
    assert!(reports[1].probes.len() > 4000, "plan 2 probes every function: {}", reports[1].probes.len());
    assert!(reports[2].detached > 4000 && reports[2].probes.len() == 2, "plan 3 drops all but two");
    let log = agent.stop();
    assert!(log.contains("kernel_drops=0"), "{log}");
    drop(stack);

    let (table, trees) = rt().block_on(afcts(&an.url, "redis"));
    let mut per_window: std::collections::BTreeMap<u64, (pb::WindowInfo, BTreeSet<String>)> = Default::default();
    for (w, _, f) in &trees {
        let white = f.nodes.iter().filter(|n| n.color == Color::White).map(|n| table.get(n.func).name.to_string());
        per_window.entry(w.id).or_insert_with(|| (w.clone(), BTreeSet::new())).1.extend(white);
    }
    let mut seen = [BTreeSet::<String>::new(), BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
    let mut windows = [0usize; 4];
    for (w, traced) in per_window.values() {
        // The phase a window lies in entirely (between one plan's application and the next push).
        let phase = (0..4).find(|&p| {
            let from = changes[p].1;
            let to = changes.get(p + 1).map_or(u64::MAX, |c| c.0);
            w.start_ns >= from && w.end_ns <= to
        });
        let Some(p) = phase else { continue };
        assert!(
            traced.iter().all(|n| allowed[p].contains(&n.as_str())),
            "phase {p}: window {} traced {traced:?}, plan allows {:?}",
            w.id,
            allowed[p]
        );
        if w.events > 0 && !traced.is_empty() {
            assert!(traced.contains("call"), "call is in every plan and must never stop: {traced:?}");
        }
        seen[p].extend(traced.iter().cloned());
        windows[p] += 1;
    }
    for p in 0..4 {
        assert!(seen[p].contains("call"), "phase {p}: no call events in {} windows", windows[p]);
    }
    assert!(seen[1].contains("processCommand") && seen[1].contains("addReply"), "phase 1: {:?}", seen[1]);
    assert!(seen[3].contains("lookupKey") && seen[0].contains("lookupKey"), "{seen:?}");
    // Plan 2 counted every function: the counts reached the analyzer.
    let counts = rt().block_on(async {
        let mut q = QueryClient::connect(an.url.clone()).await.unwrap();
        q.counts(pb::CountsRequest { agent_id: "redis".into() }).await.unwrap().into_inner().counts
    });
    assert!(counts.len() > 50, "functions counted during plan 2: {}", counts.len());
}
