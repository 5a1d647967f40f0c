//! kill -9 of the analyzer mid-ingest, 20 times under a steady stream of batches: every
//! acknowledged batch is in the database after each kill, the database passes
//! `PRAGMA integrity_check` every time, and after the last restart every batch is stored
//! exactly once (the agent's resends after each reconnect are recognized as duplicates).
mod common;

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use afetm_proto::{self as pb, ingest_client::IngestClient};
use common::{Kill, bin};
use tokio_stream::wrappers::ReceiverStream;

const PORT: u16 = 28996;
const EVENTS: u64 = 200;
const INSTANCE: u64 = 77;

/// Batch `seq`, always the same (a resend is byte for byte the batch first sent).
fn batch(seq: u64) -> pb::Batch {
    let events = (0..EVENTS)
        .map(|i| pb::CallEvent {
            pid: 42,
            tid: 42 + (i % 4) as u32,
            ts_ns: seq * 10_000 + i,
            function: 1 + (i % 3) as u32,
            caller: if i % 3 == 0 { 0 } else { 1 },
            callstack: vec![],
        })
        .collect();
    let symbols = ["main", "work", "leaf"]
        .iter()
        .enumerate()
        .map(|(i, n)| pb::Symbol { id: i as u32 + 1, module: "prog".into(), name: n.to_string() })
        .collect();
    pb::Batch { seq, agent_clock_ns: seq * 10_000 + EVENTS, symbols, events, ..Default::default() }
}

fn start(db: &std::path::Path) -> Child {
    Command::new(bin("afetm-analyzer"))
        .args(["serve", "--listen", &format!("127.0.0.1:{PORT}"), "--window", "1h", "--db"])
        .arg(db)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("afetm-analyzer")
}

/// Streams batches from the analyzer's last acknowledged one on until the stream breaks;
/// the highest ack goes to `acked`.
async fn stream_until_broken(acked: Arc<AtomicU64>) {
    // The analyzer was just started: retry until it listens.
    let t = Instant::now();
    let mut client = loop {
        match IngestClient::connect(format!("http://127.0.0.1:{PORT}")).await {
            Ok(c) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("the analyzer did not come up: {e}"),
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let hello = pb::Hello { agent_id: "crash".into(), instance: INSTANCE, hostname: "h".into(), target: "prog".into() };
    if tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) }).await.is_err() {
        return;
    }
    let Ok(resp) = client.stream(ReceiverStream::new(rx)).await else { return };
    let mut inbound = resp.into_inner();
    let last = match inbound.message().await {
        Ok(Some(pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Welcome(w)) })) => w.last_acked_seq,
        _ => return,
    };
    assert!(last >= acked.load(Ordering::SeqCst), "the analyzer forgot acknowledged batches: welcome {last}");
    let sender = tokio::spawn(async move {
        for seq in last + 1.. {
            if tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Batch(batch(seq))) }).await.is_err() {
                break;
            }
        }
    });
    while let Ok(Some(m)) = inbound.message().await {
        if let Some(pb::analyzer_message::Msg::Ack(a)) = m.msg {
            acked.fetch_max(a.seq, Ordering::SeqCst);
        }
    }
    sender.abort();
}

/// (last_seq, events) stored for the agent, after checking the file's integrity.
fn stored(db: &std::path::Path) -> (u64, u64) {
    let c = rusqlite::Connection::open(db).unwrap();
    let check: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    c.query_row("SELECT last_seq, events FROM agents WHERE agent_id = 'crash'", [], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
    })
    .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_ingest_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.sqlite");
    let acked = Arc::new(AtomicU64::new(0));
    for round in 0..20u64 {
        let mut guard = Kill(vec![start(&db)]);
        let child = &mut guard.0[0];
        let client = tokio::spawn(stream_until_broken(acked.clone()));
        // Kill at a different point of the stream each round (150..530 ms after the start).
        let until = Instant::now() + Duration::from_millis(150 + round * 19);
        let before = acked.load(Ordering::SeqCst);
        while Instant::now() < until || acked.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(Instant::now() < until + Duration::from_secs(30), "round {round}: no batch acknowledged");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        client.await.unwrap();
        let (last_seq, events) = stored(&db);
        let acked_now = acked.load(Ordering::SeqCst);
        assert!(last_seq >= acked_now, "round {round}: acked {acked_now} but only {last_seq} stored");
        assert_eq!(events, last_seq * EVENTS, "round {round}: a batch was stored partly or twice");
    }
    // A last clean run delivers the rest and every batch is there once.
    let mut guard = Kill(vec![start(&db)]);
    let child = &mut guard.0[0];
    let client = tokio::spawn(stream_until_broken(acked.clone()));
    let target = acked.load(Ordering::SeqCst) + 50;
    let t = Instant::now();
    while acked.load(Ordering::SeqCst) < target {
        assert!(t.elapsed() < Duration::from_secs(30), "no progress after the last restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SIGTERM: a clean stop.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    client.await.unwrap();
    let (last_seq, events) = stored(&db);
    assert!(last_seq >= target);
    assert_eq!(events, last_seq * EVENTS);
    eprintln!("20 kills: {last_seq} batches, {events} events, each stored once; integrity ok every time");
}
