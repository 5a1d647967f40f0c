//! The agent on the real NHSR-OSW servers (stock Debian binaries: stripped, no frame pointers)
//! under the shop workload: redis, nginx, Apache httpd, and libsqlite3 inside the httpd workers.
mod common;

use std::time::Duration;

use afetm_calltree::tree::Color;
use common::*;
use testbed::{Config, group_members, load};

#[test]
fn agent_traces_the_stock_testbed_servers_under_load() {
    require_root!();
    traced_servers(false);
}

/// The same on the source builds with symbols and frame pointers (`cargo xtask testbed build`,
/// which `cargo xtask test` runs first).
#[test]
fn agent_traces_the_source_built_testbed_servers_under_load() {
    require_root!();
    traced_servers(true);
}

fn traced_servers(built: bool) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path().join("run"));
    // Below the ephemeral port range (32768-60999).
    cfg.base_port = if built { 25080 } else { 24080 };
    if built {
        cfg.binaries = testbed::build::binaries(&testbed::build::cache_dir())
            .expect("source builds missing: run `cargo xtask testbed build`");
    }
    cfg.apaches = 2;
    cfg.children = 4;
    cfg.seed_items = 50;
    let stack = Stack(cfg.clone());
    testbed::up(&cfg).unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    let apache_pids: std::collections::HashSet<u32> = testbed::servers(&cfg)
        .unwrap()
        .iter()
        .filter(|s| s.name.starts_with("apache"))
        .flat_map(|s| group_members(s.pid))
        .collect();

    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "60s"]);
    // (agent id, traced file, plan points, function that must show up in the AFCTs)
    let bins = &cfg.binaries;
    let sqlite = bins
        .sqlite_lib_dir
        .clone()
        .map(|d| d.join("libsqlite3.so.0"))
        .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0".into());
    type Target<'a> = (&'a str, std::path::PathBuf, &'a [(&'a str, &'a str)], &'a str);
    let targets: [Target; 4] = [
        ("redis", bins.redis.clone(), &[("call", "event"), ("processCommand", "callstack")], "call"),
        // ngx_http_process_request is inlined everywhere in the -O2 source build; ngx_http_handler
        // stays a call in both builds.
        (
            "nginx",
            bins.nginx.clone(),
            &[("ngx_http_process_request", "event"), ("ngx_http_handler", "callstack")],
            "ngx_http_handler",
        ),
        ("httpd", bins.apache2.clone(), &[("ap_process_request", "callstack")], "ap_process_request"),
        ("sqlite", sqlite, &[("sqlite3_step", "callstack")], "sqlite3_step"),
    ];
    let agents: Vec<AgentProc> = targets
        .iter()
        .map(|(id, path, points, _)| {
            AgentProc::start(&write_plan(dir.path(), id, path, points), &an.url, id, dir.path())
        })
        .collect();
    let mut l = load::LoadConfig::new(cfg.url());
    l.connections = 4;
    l.duration = Duration::from_secs(3);
    l.warmup = Duration::from_millis(200);
    l.items = cfg.seed_items;
    let report = load::run(&l).unwrap();
    assert_eq!(report.errors, 0, "{}", report.text());
    let logs: Vec<String> = agents.into_iter().map(|a| a.stop()).collect();
    for log in &logs {
        assert!(log.contains("kernel_drops=0"), "{log}");
    }
    // Every traced process has exited or is still running; close what is open by stopping the stack.
    drop(stack);
    // Windows close on process exit (reported by the stopped agents) or by the analyzer's
    // stale sweep; the agents were stopped first, so close through a fresh agent-less query.
    for ((id, _, _, func), log) in targets.into_iter().zip(&logs) {
        let wins = rt().block_on(windows(&an.url, id, false));
        assert!(!wins.is_empty(), "{id}: no windows; agent log:\n{log}");
        let events: u64 = wins.iter().map(|w| w.events).sum();
        eprintln!("{id}: {} windows, {events} events", wins.len());
        assert!(events > 0, "{id}: no events");
        if id == "sqlite" {
            assert!(
                wins.iter().all(|w| apache_pids.contains(&w.pid)),
                "sqlite3_step must be traced inside the httpd workers"
            );
        }
        let (table, trees) = rt().block_on(afcts(&an.url, id));
        let found = trees.iter().any(|(_, _, f)| {
            f.nodes.iter().any(|n| &*table.get(n.func).name == func && n.color == Color::White && n.parent.is_some())
        });
        assert!(found, "{id}: {func} should be a white node with a caller in a closed AFCT; {} trees", trees.len());
    }
}
