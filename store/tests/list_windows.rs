//! `Store::list_windows` on a real SQLite file: the filters the web view and `export` use to
//! fetch one window or the newest few without reading every window.
use afetm_proto::v1 as pb;
use afetm_store::{AgentKey, Limits, Store, WindowConfig};

const SECOND: u64 = 1_000_000_000;

/// A store holding four windows of one process (one event each, 1 s windows).
fn four_windows(dir: &std::path::Path) -> Store {
    let window = WindowConfig { len_ns: SECOND, grace_ns: 0, node_cap: 100 };
    let mut store = Store::open(&dir.join("w.sqlite"), window, Limits::default()).unwrap();
    let hello = pb::Hello { agent_id: "a".into(), instance: 1, hostname: "h".into(), target: "t".into() };
    let (_, mut session, _) = store.hello(&hello).unwrap();
    let events = (0..4)
        .map(|k| pb::CallEvent { pid: 7, tid: 7, ts_ns: k * SECOND + 1, function: 1, caller: 0, callstack: vec![] })
        .collect();
    let batch = pb::Batch {
        seq: 1,
        agent_clock_ns: 4 * SECOND,
        symbols: vec![pb::Symbol { id: 1, module: "m".into(), name: "f".into() }],
        events,
        ..Default::default()
    };
    let key = AgentKey { agent_id: "a".into(), instance: 1 };
    let applied = store.apply_batch(&key, &mut session, &batch).unwrap();
    assert_eq!(applied.windows_opened, 4);
    store
}

fn ids(w: &[pb::WindowInfo]) -> Vec<u64> {
    w.iter().map(|w| w.id).collect()
}

#[test]
fn one_window_or_the_newest_few_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = four_windows(dir.path());
    let all = store.list_windows(&pb::ListWindowsRequest::default()).unwrap();
    assert_eq!(all.len(), 4);
    let all_ids = ids(&all);
    assert!(all_ids.is_sorted(), "{all_ids:?}");

    let newest = store.list_windows(&pb::ListWindowsRequest { latest: 2, ..Default::default() }).unwrap();
    assert_eq!(ids(&newest), all_ids[2..].to_vec());
    assert_eq!(newest[1].tids, vec![7], "threads are listed with the window");

    let one = store.list_windows(&pb::ListWindowsRequest { window_id: all_ids[1], ..Default::default() }).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!((one[0].id, one[0].start_ns, one[0].events), (all_ids[1], all[1].start_ns, 1));

    let missing = pb::ListWindowsRequest { window_id: all_ids[3] + 100, ..Default::default() };
    assert!(store.list_windows(&missing).unwrap().is_empty());
    let huge = pb::ListWindowsRequest { window_id: u64::MAX, ..Default::default() };
    assert!(store.list_windows(&huge).unwrap().is_empty(), "an id past i64 matches nothing");

    let closed = pb::ListWindowsRequest { closed_only: true, latest: 10, ..Default::default() };
    let closed = store.list_windows(&closed).unwrap();
    assert!(closed.iter().all(|w| w.closed) && !closed.is_empty(), "{closed:?}");
}

#[test]
fn a_windows_lines_and_those_read_just_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = four_windows(dir.path());
    let line =
        |ts_ns: u64, text: &str| pb::LogRecord { file: "php-error.log".into(), ts_ns, unix_ms: 0, text: text.into() };
    let hello = pb::Hello { agent_id: "a".into(), instance: 1, hostname: "h".into(), target: "t".into() };
    let (_, mut session, _) = store.hello(&hello).unwrap();
    let batch = pb::Batch {
        seq: 2,
        agent_clock_ns: 4 * SECOND,
        logs: vec![line(SECOND / 2, "in the first"), line(SECOND + 10, "just after"), line(3 * SECOND, "later")],
        ..Default::default()
    };
    store.apply_batch(&AgentKey { agent_id: "a".into(), instance: 1 }, &mut session, &batch).unwrap();
    let first = store.list_windows(&pb::ListWindowsRequest::default()).unwrap()[0].clone();
    assert_eq!((first.start_ns, first.end_ns), (1, SECOND + 1), "anchored at the first event: {first:?}");
    let texts = |l: Vec<pb::LogRecord>| l.into_iter().map(|l| l.text).collect::<Vec<_>>();
    assert_eq!(texts(store.window_logs(first.id).unwrap()), ["in the first"]);
    assert_eq!(texts(store.logs_after_window(first.id, SECOND).unwrap()), ["just after"]);
    assert_eq!(texts(store.logs_after_window(first.id, u64::MAX).unwrap()), ["just after", "later"]);
    assert!(store.logs_after_window(first.id + 100, SECOND).is_err(), "an unknown window is an error");
}
