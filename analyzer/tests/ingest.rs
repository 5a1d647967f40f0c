//! The analyzer's gRPC ingest against a real server on loopback and a real SQLite file:
//! malformed input is refused with InvalidArgument, counted, and never stored; duplicates are
//! acknowledged without being applied twice; stored windows survive a reopen.
use std::time::Duration;

use afetm_analyzer::{
    service::{self, Analyzer, BAD_SEQ_KEY},
    store::{Limits, Store, WindowConfig},
};
use afetm_proto::{self as pb, ingest_client::IngestClient, query_client::QueryClient};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(db: &std::path::Path) -> Server {
    let store = Store::open(
        db,
        WindowConfig { len_ns: 1_000_000_000, grace_ns: 0, node_cap: 1000 },
        Limits { max_stack_depth: 64, ..Limits::default() },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        service::serve(Analyzer::new(store), listener, Duration::from_secs(300), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server { url, stop: Some(tx), task }
}

impl Server {
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.task.await;
    }
}

fn sym(id: u32, name: &str) -> pb::Symbol {
    pb::Symbol { id, module: "prog".into(), name: name.into() }
}

fn ev(function: u32, caller: u32, ts: u64) -> pb::CallEvent {
    pb::CallEvent { pid: 42, tid: 42, ts_ns: ts, function, caller, callstack: vec![] }
}

/// Opens a stream, says hello, sends `batches`, and returns what came back (acks, or the error).
async fn exchange(url: &str, instance: u64, batches: Vec<pb::Batch>) -> (Vec<u64>, Option<tonic::Status>) {
    let mut client = IngestClient::connect(url.to_string()).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello { agent_id: "t".into(), instance, hostname: "h".into(), target: "prog".into() };
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    assert!(matches!(first.msg, Some(pb::analyzer_message::Msg::Welcome(_))));
    let n = batches.len();
    for b in batches {
        tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Batch(b)) }).await.unwrap();
    }
    let mut acks = Vec::new();
    while acks.len() < n {
        match inbound.message().await {
            Ok(Some(pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Ack(a)) })) => acks.push(a.seq),
            Ok(_) => break,
            Err(s) => return (acks, Some(s)),
        }
    }
    (acks, None)
}

fn fate(tid: u32, kind: pb::FateKind, code: i32, ts_ns: u64) -> pb::ThreadFate {
    pb::ThreadFate { pid: 42, tid, ts_ns, kind: kind as i32, code, ..Default::default() }
}

fn good(seq: u64) -> pb::Batch {
    pb::Batch {
        seq,
        agent_clock_ns: 5_000,
        symbols: vec![sym(1, "main"), sym(2, "libc_start"), sym(3, "leaf")],
        events: vec![ev(1, 2, 1_000), ev(3, 1, 1_100), ev(3, 1, 1_200)],
        ..Default::default()
    }
}

async fn stats(url: &str) -> pb::StatsResponse {
    QueryClient::connect(url.to_string()).await.unwrap().stats(pb::StatsRequest {}).await.unwrap().into_inner()
}

async fn windows(url: &str) -> Vec<pb::WindowInfo> {
    QueryClient::connect(url.to_string())
        .await
        .unwrap()
        .list_windows(pb::ListWindowsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .windows
}

#[tokio::test]
async fn malformed_batches_are_refused_counted_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("a.sqlite")).await;
    let cases: Vec<(&str, pb::Batch)> = vec![
        (
            "unknown_symbol",
            pb::Batch { seq: 1, agent_clock_ns: 5_000, events: vec![ev(9, 0, 1_000)], ..Default::default() },
        ),
        ("event", pb::Batch { events: vec![pb::CallEvent { pid: 0, ..ev(1, 2, 1_000) }], ..good(1) }),
        ("timestamp", pb::Batch { events: vec![ev(1, 2, u64::MAX)], ..good(1) }),
        (
            "stack_depth",
            pb::Batch { events: vec![pb::CallEvent { callstack: vec![2; 65], ..ev(1, 2, 1_000) }], ..good(1) },
        ),
        ("symbol", pb::Batch { symbols: vec![sym(0, "zero")], ..good(1) }),
        ("seq", pb::Batch { seq: 0, ..good(1) }),
        // Stored as last_seq, u64::MAX would read back as -1 and make every later batch a
        // "duplicate": refused instead.
        ("seq", good(u64::MAX)),
        ("clock", pb::Batch { agent_clock_ns: u64::MAX, ..good(1) }),
        // Silence is the analyzer's judgement; an agent reports only what the kernel saw.
        ("fate", pb::Batch { fates: vec![fate(42, pb::FateKind::Silent, 0, 1_300)], ..good(1) }),
        (
            "fate",
            pb::Batch { fates: vec![pb::ThreadFate { tid: 0, ..fate(42, pb::FateKind::Killed, 9, 1_300) }], ..good(1) },
        ),
        (
            "fate",
            pb::Batch {
                fates: vec![pb::ThreadFate { stack_ids: vec![2; 129], ..fate(42, pb::FateKind::Killed, 9, 1_300) }],
                ..good(1)
            },
        ),
        (
            "unknown_symbol",
            pb::Batch {
                fates: vec![pb::ThreadFate { stack_ids: vec![2, 77], ..fate(42, pb::FateKind::Killed, 9, 1_300) }],
                ..good(1)
            },
        ),
    ];
    for (i, (reason, batch)) in cases.iter().enumerate() {
        let seq = batch.seq;
        let (acks, err) = exchange(&server.url, 100 + i as u64, vec![batch.clone()]).await;
        assert!(acks.is_empty(), "{reason}: must not be acknowledged");
        let err = err.unwrap_or_else(|| panic!("{reason}: expected an error status"));
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{reason}: {err:?}");
        assert!(err.message().starts_with(reason), "{reason}: {}", err.message());
        assert_eq!(err.metadata().get(BAD_SEQ_KEY).unwrap().to_str().unwrap(), seq.to_string());
    }
    let s = stats(&server.url).await;
    assert_eq!(s.rejected, cases.len() as u64);
    for (reason, _) in &cases {
        assert!(
            s.rejected_by_reason.get(*reason).copied().unwrap_or(0) >= 1,
            "{reason} not counted: {:?}",
            s.rejected_by_reason
        );
    }
    assert!(windows(&server.url).await.is_empty(), "nothing malformed may be stored");
    assert_eq!(s.events, 0);

    // The first message must be a Hello.
    let mut client = IngestClient::connect(server.url.clone()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Batch(good(1))) }).await.unwrap();
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert_eq!(inbound.message().await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Hello strings are bounded.
    let mut client = IngestClient::connect(server.url.clone()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello { agent_id: "t".into(), instance: 7, hostname: "h".repeat(5000), target: "prog".into() };
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let err = inbound.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hostname"), "{}", err.message());
    server.shutdown().await;
}

// Multi-threaded: the export CLI runs as a blocking child process while this process serves.
#[tokio::test(flavor = "multi_thread")]
async fn duplicates_are_acked_once_and_windows_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("b.sqlite");
    let server = start(&db).await;
    let (acks, err) = exchange(&server.url, 7, vec![good(1)]).await;
    assert_eq!((acks, err.map(|e| e.code())), (vec![1], None));
    // A resend after a reconnect: acknowledged, not applied again.
    let (acks, _) = exchange(&server.url, 7, vec![good(1)]).await;
    assert_eq!(acks, vec![1]);
    let s = stats(&server.url).await;
    assert_eq!((s.events, s.duplicate_batches), (3, 1));
    let w = windows(&server.url).await;
    assert_eq!((w.len(), w[0].events, w[0].closed), (1, 3, false));
    server.shutdown().await;

    // Reopen the same file: the open window is still there and a process exit closes it into
    // an AFCT built from the stored edges.
    let server = start(&db).await;
    let exit = pb::Batch {
        seq: 2,
        agent_clock_ns: 6_000,
        exits: vec![pb::ProcessExit { pid: 42, ts_ns: 6_000 }],
        ..Default::default()
    };
    let (acks, _) = exchange(&server.url, 7, vec![exit]).await;
    assert_eq!(acks, vec![2]);
    let w = windows(&server.url).await;
    assert!(w[0].closed);
    let mut q = QueryClient::connect(server.url.clone()).await.unwrap();
    let afct = q.get_afct(pb::GetAfctRequest { window_id: w[0].id, tid: 42 }).await.unwrap().into_inner();
    let names: Vec<(String, i32, i32)> =
        afct.tree.unwrap().nodes.iter().map(|n| (n.function.clone(), n.parent, n.color)).collect();
    assert_eq!(
        names,
        vec![
            ("libc_start".into(), -1, pb::Color::Blue as i32),
            ("main".into(), 0, pb::Color::White as i32),
            ("leaf".into(), 1, pb::Color::White as i32)
        ]
    );
    assert!(afct.text.contains("prog!leaf [white] calls=2"), "{}", afct.text);
    export_the_window(&server.url, w[0].id, dir.path());
    // An agent's final batch closes whatever it still had open.
    let (acks, _) = exchange(&server.url, 8, vec![good(1)]).await;
    assert_eq!(acks, vec![1]);
    let open = windows(&server.url).await.into_iter().filter(|w| !w.closed).count();
    assert_eq!(open, 1);
    let last = pb::Batch { seq: 2, agent_clock_ns: 6_000, final_batch: true, ..Default::default() };
    assert_eq!(exchange(&server.url, 8, vec![last]).await.0, vec![2]);
    assert!(windows(&server.url).await.iter().all(|w| w.closed), "final batch closes the instance's windows");
    // Unknown window: NotFound, not a crash.
    let e = q.get_afct(pb::GetAfctRequest { window_id: 999, tid: 1 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    server.shutdown().await;
}

/// What grpcurl needs: reflection lists the services, health says they serve.
#[tokio::test]
async fn reflection_and_health_answer() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("r.sqlite")).await;
    let channel = tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let services: Vec<String> = match resp.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    };
    for want in ["afetm.v1.Ingest", "afetm.v1.Query", "afetm.v1.Control", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == want), "{want} not listed: {services:?}");
    }
    let mut health = HealthClient::new(channel);
    let st = health.check(HealthCheckRequest { service: "afetm.v1.Query".into() }).await.unwrap().into_inner();
    assert_eq!(st.status, ServingStatus::Serving as i32);
    server.shutdown().await;
}

/// A cut (Control.Cut) discards a process's open windows and restarts its windows at the cut:
/// start-up events before it never reach a tree, in-flight ones are dropped, later events land
/// in windows that start at the cut. Unknown agents are refused.
#[tokio::test]
async fn a_cut_discards_open_windows_and_restarts_them_at_its_instant() {
    use afetm_proto::control_client::ControlClient;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("cut.sqlite")).await;
    // Start-up: main -> leaf at 1 us.
    let (acks, err) = exchange(&server.url, 1, vec![good(1)]).await;
    assert_eq!((acks, err.map(|e| e.code())), (vec![1], None));
    let mut control = ControlClient::connect(server.url.clone()).await.unwrap();
    let at = 2_000_000; // 2 ms
    let r = control.cut(pb::CutRequest { agent_id: "t".into(), pids: vec![42], at_ns: at }).await.unwrap().into_inner();
    assert_eq!(r.windows_discarded, 1, "the start-up window");
    let missing = control.cut(pb::CutRequest { agent_id: "nobody".into(), pids: vec![42], at_ns: at }).await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::InvalidArgument);
    // A late start-up event and the run's events after the cut, then the process exits.
    let run = pb::Batch {
        seq: 2,
        agent_clock_ns: at + 10_000,
        symbols: vec![sym(1, "main"), sym(2, "libc_start"), sym(3, "leaf"), sym(4, "serve")],
        events: vec![ev(3, 1, 1_500), ev(4, 1, at + 1_000), ev(3, 4, at + 2_000)],
        exits: vec![pb::ProcessExit { pid: 42, ts_ns: at + 5_000 }],
        ..Default::default()
    };
    let (acks, err) = exchange(&server.url, 1, vec![run]).await;
    assert_eq!((acks, err.map(|e| e.code())), (vec![2], None));
    let ws = windows(&server.url).await;
    assert_eq!(ws.len(), 1, "{ws:?}");
    assert!(ws[0].closed && ws[0].start_ns == at && ws[0].events == 2, "{:?}", ws[0]);
    let tree = QueryClient::connect(server.url.clone())
        .await
        .unwrap()
        .get_afct(pb::GetAfctRequest { window_id: ws[0].id, tid: 42 })
        .await
        .unwrap()
        .into_inner()
        .tree
        .unwrap();
    let names: Vec<&str> = tree.nodes.iter().map(|n| n.function.as_str()).collect();
    assert_eq!(names, ["main", "serve", "leaf"], "main -> leaf of the start-up is gone");
    server.shutdown().await;
}

/// `GET path` over real HTTP; (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &'static str) -> (String, String) {
    tokio::task::spawn_blocking(move || testbed::scrape::get(&addr.to_string(), path)).await.unwrap().unwrap()
}

use testbed::scrape::sample;

/// Metrics count what ingest did; while another process holds the database's write lock,
/// gRPC health and /healthz say NOT_SERVING, and SERVING again once it lets go.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_ingest_and_health_follows_the_database() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.sqlite");
    let store =
        Store::open(&db, WindowConfig { len_ns: 1_000_000_000, grace_ns: 0, node_cap: 1000 }, Limits::default())
            .unwrap();
    let analyzer = Analyzer::new(store).with_probe_every(Duration::from_millis(100));
    let a = analyzer.clone();
    let health_fn: afetm_metrics::Health = std::sync::Arc::new(move || a.health());
    let maddr = afetm_metrics::serve("127.0.0.1:0", analyzer.metrics().registry(), health_fn).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(service::serve(analyzer, listener, Duration::from_secs(300), async {
        let _ = stopped.await;
    }));

    let (acks, err) = exchange(&url, 1, vec![good(1), good(1)]).await;
    assert_eq!((acks, err.map(|e| e.code())), (vec![1, 1], None));
    let (_, err) = exchange(&url, 2, vec![good(u64::MAX)]).await;
    assert!(err.is_some());
    let (status, m) = http_get(maddr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(sample(&m, r#"afetm_analyzer_batches_total{result="applied"}"#), Some(1.0), "{m}");
    assert_eq!(sample(&m, r#"afetm_analyzer_batches_total{result="duplicate"}"#), Some(1.0), "{m}");
    assert_eq!(sample(&m, "afetm_analyzer_events_total"), Some(3.0), "{m}");
    assert_eq!(sample(&m, "afetm_analyzer_windows_opened_total"), Some(1.0), "{m}");
    assert_eq!(sample(&m, r#"afetm_analyzer_rejected_total{reason="seq"}"#), Some(1.0), "{m}");
    assert_eq!(sample(&m, "afetm_analyzer_sqlite_commit_seconds_count"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "afetm_analyzer_database_up"), Some(1.0), "{m}");

    let channel = tonic::transport::Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let health = HealthClient::new(channel);
    let status_of = |service: &'static str| {
        let mut h = health.clone();
        async move { h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status }
    };
    assert_eq!(status_of("afetm.v1.Ingest").await, ServingStatus::Serving as i32);

    // Another process (here: another connection) takes the write lock and keeps it.
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut down = false;
    for _ in 0..200 {
        if status_of("").await == ServingStatus::NotServing as i32 {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "health must say NOT_SERVING while the database is locked");
    assert_eq!(status_of("afetm.v1.Ingest").await, ServingStatus::NotServing as i32);
    let (status, body) = http_get(maddr, "/healthz").await;
    assert!(status.contains("503") && body.contains("locked"), "{status} {body}");
    assert_eq!(sample(&http_get(maddr, "/metrics").await.1, "afetm_analyzer_database_up"), Some(0.0));

    other.execute_batch("ROLLBACK").unwrap();
    let mut up = false;
    for _ in 0..200 {
        if status_of("afetm.v1.Query").await == ServingStatus::Serving as i32 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "health must say SERVING once the lock is gone");
    assert!(http_get(maddr, "/healthz").await.0.contains("200"));
    let _ = stop.send(());
    let _ = task.await;
}

/// `afetm-analyzer export` of a closed window (libc_start -> main -> leaf x2) in each format.
fn export_the_window(url: &str, window: u64, dir: &std::path::Path) {
    let export = |format: &str, extra: &[&str]| {
        let out = dir.join(format!("w.{format}"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_afetm-analyzer"))
            .args(["export", "--server", url, "--window", &window.to_string(), "--format", format, "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out).unwrap()
    };
    let dot = export("dot", &["--highlight", "leaf"]);
    assert!(dot.contains("label=\"main\"") && dot.contains("-> n2 [label=\"2\"]"), "{dot}");
    assert_eq!(dot.matches("crimson").count(), 1, "{dot}");
    let svg = export("svg", &["--highlight", "leaf"]);
    assert_eq!(svg.matches("class=\"node suspect\"").count(), 1, "{svg}");
    assert!(svg.contains("data-function=\"libc_start\" data-color=\"blue\""), "{svg}");
    let trace: serde_json::Value = serde_json::from_str(&export("chrome", &[])).unwrap();
    let slices: Vec<&serde_json::Value> =
        trace["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(slices.len(), 3);
    let leaf = slices.iter().find(|e| e["name"] == "leaf").unwrap();
    assert_eq!(
        (leaf["pid"].as_u64(), leaf["tid"].as_u64(), leaf["args"]["calls"].as_u64()),
        (Some(42), Some(42), Some(2))
    );
    // When Graphviz is installed, the DOT renders.
    if let Ok(o) = std::process::Command::new("dot").arg("-Tsvg").arg(dir.join("w.dot")).output() {
        assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("<svg"), "dot -Tsvg failed");
    }
}

/// Thread fates on hand-made batches (windows of 1 s, no grace): a fate lands in its process's
/// window at its time with the thread's last calls, also in a window the thread made no call
/// in; a thread with calls in one window and none in the next, its process alive, is silent
/// there; after its process exits nothing is silent.
#[tokio::test]
async fn fates_land_in_their_windows_with_the_last_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("f.sqlite")).await;
    // Windows start at the process's first call (t0) and last 1 s.
    let (s, t0) = (1_000_000_000u64, 1_000u64);
    let worker = |function: u32, ts: u64| pb::CallEvent { tid: 43, ..ev(function, 1, ts) };
    let batches = vec![
        // Window 0: both threads call; the worker's last call is leaf.
        pb::Batch {
            agent_clock_ns: s / 2,
            events: vec![ev(1, 2, t0), worker(1, t0 + 1_000), worker(3, t0 + 2_000), ev(3, 1, t0 + 3_000)],
            ..good(1)
        },
        // Window 1: only main calls: the worker is silent. Window 2 opens with main's call.
        pb::Batch { seq: 2, agent_clock_ns: t0 + s + s / 2, events: vec![ev(3, 1, t0 + s + 10)], ..Default::default() },
        pb::Batch {
            seq: 3,
            agent_clock_ns: t0 + 2 * s + 100,
            events: vec![ev(1, 2, t0 + 2 * s + 50)],
            ..Default::default()
        },
        // Window 2: main is killed by SIGSEGV; the worker, with no call here, is stopped.
        pb::Batch {
            seq: 4,
            agent_clock_ns: t0 + 2 * s + 500,
            fates: vec![
                fate(43, pb::FateKind::Stopped, 19, t0 + 2 * s + 200),
                fate(42, pb::FateKind::Killed, 11, t0 + 2 * s + 300),
            ],
            exits: vec![pb::ProcessExit { pid: 42, ts_ns: t0 + 2 * s + 400 }],
            ..Default::default()
        },
    ];
    let (acks, err) = exchange(&server.url, 1, batches).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(acks, vec![1, 2, 3, 4]);
    let w = windows(&server.url).await;
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(w.iter().all(|w| w.closed), "the exit closes every window: {w:#?}");
    assert!(w[0].fates.is_empty(), "nothing happened to a thread in window 0: {:?}", w[0].fates);
    let silent = &w[1].fates;
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!((silent[0].tid, silent[0].kind), (43, pb::FateKind::Silent as i32));
    assert_eq!(silent[0].ts_ns, w[1].start_ns);
    assert_eq!(silent[0].last_calls, vec!["prog:main", "prog:leaf"], "the worker's calls, oldest first");
    let mut ended = w[2].fates.clone();
    ended.sort_by_key(|f| f.tid);
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_eq!((ended[0].tid, ended[0].kind, ended[0].code), (42, pb::FateKind::Killed as i32, 11));
    // main's calls up to its death, over windows 0-2.
    assert_eq!(ended[0].last_calls, vec!["prog:main", "prog:leaf", "prog:leaf", "prog:main"]);
    assert_eq!((ended[1].tid, ended[1].kind, ended[1].code), (43, pb::FateKind::Stopped as i32, 19));
    assert_eq!(ended[1].last_calls, vec!["prog:main", "prog:leaf"], "from the worker's last window with calls");

    // An agent's stop cuts its last window short: nobody is silent in it.
    let stop = vec![
        pb::Batch { agent_clock_ns: s / 2, events: vec![ev(1, 2, t0), worker(1, t0 + 1_000)], ..good(1) },
        pb::Batch { seq: 2, agent_clock_ns: t0 + s + s / 2, events: vec![ev(3, 1, t0 + s + 10)], ..Default::default() },
        pb::Batch { seq: 3, agent_clock_ns: t0 + s + s / 2 + 1, final_batch: true, ..Default::default() },
    ];
    let (acks, err) = exchange(&server.url, 2, stop).await;
    assert!(err.is_none() && acks == vec![1, 2, 3], "{acks:?} {err:?}");
    let w: Vec<pb::WindowInfo> = windows(&server.url).await.into_iter().skip(3).collect();
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(w.iter().all(|w| w.closed && w.fates.is_empty()), "{w:#?}");
    server.shutdown().await;
}
