//! Getting batches to the analyzer: a bounded queue that drops the oldest batches when full
//! (and counts what it dropped), a gRPC stream that resends whatever the analyzer has not
//! acknowledged, and reconnection with exponential backoff. The eBPF side never waits for any
//! of this: the reader only ever appends to the queue.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::metrics::metrics;
use afetm_proto::{self as pb, ingest_client::IngestClient};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use afetm_proto::BAD_SEQ_KEY;

#[derive(Default)]
struct State {
    queue: VecDeque<pb::Batch>,
    queued_events: usize,
    next_seq: u64,
    dropped_events: u64,
    /// Log lines dropped with their batches (added to every batch's `log_drops`).
    dropped_logs: u64,
    dropped_batches: u64,
    rejected_batches: u64,
    acked_seq: u64,
    acked_symbols: HashSet<u32>,
}

/// What a batch counts for in the queue's bound: its events and its log lines.
fn weight(b: &pb::Batch) -> usize {
    b.events.len() + b.logs.len()
}

/// Batches waiting for an acknowledgement, bounded by a number of events (log lines count as
/// events).
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    max_events: usize,
}

impl Outbox {
    pub fn new(max_events: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(State { next_seq: 1, ..Default::default() }),
            notify: Notify::new(),
            max_events: max_events.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a batch, giving it the next seq. Drops the oldest batches while the queue would
    /// hold more than `max_events` events.
    pub fn push(&self, mut batch: pb::Batch) -> u64 {
        let mut s = self.lock();
        batch.seq = s.next_seq;
        s.next_seq += 1;
        // A log line weighs as much as an event in the bound.
        let n = weight(&batch);
        while s.queued_events + n > self.max_events {
            let Some(old) = s.queue.pop_front() else {
                break;
            };
            s.queued_events -= weight(&old);
            s.dropped_events += old.events.len() as u64;
            s.dropped_logs += old.logs.len() as u64;
            s.dropped_batches += 1;
            metrics().queue_drops.inc_by(old.events.len() as u64);
            if s.dropped_batches == 1 || s.dropped_batches.is_power_of_two() {
                tracing::warn!(
                    dropped_events = s.dropped_events,
                    dropped_batches = s.dropped_batches,
                    "queue full: dropping the oldest events (analyzer slow or unreachable)"
                );
            }
        }
        batch.queue_drops = s.dropped_events;
        // The reader's count (lines its tailer dropped) plus what this queue dropped.
        batch.log_drops += s.dropped_logs;
        s.queued_events += n;
        let seq = batch.seq;
        s.queue.push_back(batch);
        metrics().outbox_batches.set(s.queue.len() as i64);
        drop(s);
        self.notify.notify_one();
        seq
    }

    /// Symbol ids whose definitions the analyzer has stored.
    pub fn acked_symbols(&self) -> HashSet<u32> {
        self.lock().acked_symbols.clone()
    }

    pub fn is_acked(&self, sym: u32) -> bool {
        self.lock().acked_symbols.contains(&sym)
    }

    /// Everything up to `seq` is durable at the analyzer.
    pub fn ack(&self, seq: u64) {
        let mut s = self.lock();
        s.acked_seq = s.acked_seq.max(seq);
        while s.queue.front().is_some_and(|b| b.seq <= seq) {
            if let Some(b) = s.queue.pop_front() {
                metrics().batches_acked.inc();
                s.queued_events -= weight(&b);
                for sym in &b.symbols {
                    s.acked_symbols.insert(sym.id);
                }
            }
        }
        metrics().outbox_batches.set(s.queue.len() as i64);
    }

    /// The analyzer refused batch `seq`; it is dropped for good and counted.
    pub fn reject(&self, seq: u64) {
        let mut s = self.lock();
        if let Some(i) = s.queue.iter().position(|b| b.seq == seq)
            && let Some(b) = s.queue.remove(i)
        {
            s.queued_events -= weight(&b);
            s.dropped_events += b.events.len() as u64;
            s.dropped_logs += b.logs.len() as u64;
            s.rejected_batches += 1;
            metrics().batches_rejected.inc();
            metrics().queue_drops.inc_by(b.events.len() as u64);
            metrics().outbox_batches.set(s.queue.len() as i64);
        }
    }

    /// The analyzer does not know this instance (e.g. its database was replaced): every symbol
    /// must be defined again.
    pub fn forget_symbols(&self) {
        self.lock().acked_symbols.clear();
    }

    /// Copies of the queued batches after `seq`, at most `limit`.
    pub fn after(&self, seq: u64, limit: usize) -> Vec<pb::Batch> {
        self.lock().queue.iter().filter(|b| b.seq > seq).take(limit).cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    /// (queued batches, dropped events, rejected batches, highest acked seq)
    pub fn counters(&self) -> (usize, u64, u64, u64) {
        let s = self.lock();
        (s.queue.len(), s.dropped_events, s.rejected_batches, s.acked_seq)
    }
}

/// Batches sent but not yet acknowledged, at most.
const IN_FLIGHT: usize = 64;

/// Runs until `shutdown` turns true and the outbox is empty (or `drain_timeout` passes after
/// shutdown). Plans pushed by the analyzer go to `plans`; reports from `reports` go back.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    endpoint: String,
    auth: afetm_auth::ClientAuth,
    hello: pb::Hello,
    outbox: Arc<Outbox>,
    plans: mpsc::Sender<pb::Plan>,
    mut reports: mpsc::Receiver<pb::PlanReport>,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    let mut pending_report: Option<pb::PlanReport> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    // Whether a stream was ever opened, and the highest seq ever sent (a batch at or below it
    // is a resend).
    let (mut connected, mut max_sent) = (false, 0u64);
    loop {
        if *shutdown.borrow() {
            let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain_timeout);
            if outbox.is_empty() || tokio::time::Instant::now() >= d {
                break;
            }
        }
        let channel = match auth.endpoint(&endpoint) {
            Ok(ep) => ep.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect().await,
            Err(e) => {
                tracing::error!(%endpoint, error = %e, "bad analyzer address");
                return;
            }
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                metrics().connect_failures.inc();
                if !warned {
                    tracing::warn!(%endpoint, error = %e, "analyzer unreachable; queueing events and retrying");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let channel = afetm_auth::AuthChannel::new(channel, auth.interceptor());
        let mut client =
            IngestClient::new(channel).max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(IN_FLIGHT * 2);
        let msg = |m| pb::AgentMessage { msg: Some(m) };
        if tx.send(msg(pb::agent_message::Msg::Hello(hello.clone()))).await.is_err() {
            continue;
        }
        let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e, "analyzer refused the stream");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let last = match inbound.message().await {
            Ok(Some(pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Welcome(w)) })) => w.last_acked_seq,
            other => {
                tracing::warn!(reply = ?other.err(), "analyzer did not welcome the agent");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (_, _, _, acked) = outbox.counters();
        if last == 0 && acked > 0 {
            tracing::warn!("analyzer does not know this agent instance any more; redefining symbols");
            outbox.forget_symbols();
        }
        outbox.ack(last);
        tracing::info!(%endpoint, last_acked = last, "connected to analyzer");
        if connected {
            metrics().reconnects.inc();
        }
        connected = true;
        warned = false;
        backoff = Duration::from_millis(100);
        let mut sent = last.max(outbox.counters().3);
        if let Some(r) = pending_report.take() {
            let _ = tx.send(msg(pb::agent_message::Msg::PlanReport(r))).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        'conn: loop {
            // Send what is queued beyond what is in flight.
            let acked_now = outbox.counters().3;
            let room = IN_FLIGHT.saturating_sub(sent.saturating_sub(acked_now) as usize);
            if room > 0 {
                for b in outbox.after(sent, room) {
                    sent = b.seq;
                    if sent <= max_sent {
                        metrics().batches_resent.inc();
                    }
                    max_sent = max_sent.max(sent);
                    if tx.send(msg(pb::agent_message::Msg::Batch(b))).await.is_err() {
                        break 'conn;
                    }
                }
            }
            if *shutdown.borrow() {
                let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain_timeout);
                if outbox.is_empty() || tokio::time::Instant::now() >= d {
                    break 'conn;
                }
            }
            tokio::select! {
                _ = outbox.notify.notified() => {}
                _ = tick.tick() => {}
                _ = shutdown.changed() => {}
                report = reports.recv() => {
                    if let Some(r) = report
                        && tx.send(msg(pb::agent_message::Msg::PlanReport(r.clone()))).await.is_err() {
                            pending_report = Some(r);
                            break 'conn;
                        }
                }
                reply = inbound.message() => match reply {
                    Ok(Some(pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Ack(a)) })) => outbox.ack(a.seq),
                    Ok(Some(pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Plan(p)) })) => {
                        if plans.send(p).await.is_err() {
                            tracing::warn!("plan received while shutting down; ignored");
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tracing::warn!("analyzer closed the stream; reconnecting");
                        break 'conn;
                    }
                    Err(status) => {
                        if let Some(seq) = status.metadata().get(BAD_SEQ_KEY).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
                            tracing::error!(seq, error = %status.message(), "analyzer rejected a batch; dropping it");
                            outbox.reject(seq);
                        } else {
                            tracing::warn!(error = %status, "analyzer stream failed; reconnecting");
                        }
                        break 'conn;
                    }
                },
            }
        }
    }
    let (queued, dropped, rejected, acked) = outbox.counters();
    if queued > 0 {
        tracing::warn!(queued, "exiting with batches the analyzer never acknowledged");
    }
    tracing::info!(acked, dropped_events = dropped, rejected_batches = rejected, "transport finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(events: usize) -> pb::Batch {
        pb::Batch { events: vec![pb::CallEvent::default(); events], ..Default::default() }
    }

    #[test]
    fn drops_oldest_when_full_and_counts() {
        let o = Outbox::new(10);
        assert_eq!(o.push(batch(4)), 1);
        assert_eq!(o.push(batch(4)), 2);
        assert_eq!(o.push(batch(4)), 3); // drops seq 1
        let (queued, dropped, _, _) = o.counters();
        assert_eq!((queued, dropped), (2, 4));
        assert_eq!(o.after(0, 10).iter().map(|b| b.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(o.after(0, 10)[1].queue_drops, 4);
    }

    #[test]
    fn log_lines_count_in_the_bound_and_their_drops_are_reported() {
        let o = Outbox::new(10);
        let logs = |n: usize, tail_drops: u64| pb::Batch {
            logs: vec![pb::LogRecord::default(); n],
            log_drops: tail_drops,
            ..Default::default()
        };
        o.push(logs(6, 0));
        o.push(logs(6, 2)); // 12 > 10: the first batch and its 6 lines go
        let kept = o.after(0, 10);
        assert_eq!(kept.len(), 1);
        // The tailer's 2 and the queue's 6.
        assert_eq!(kept[0].log_drops, 8);
    }

    #[test]
    fn ack_pops_and_records_symbols() {
        let o = Outbox::new(100);
        let mut b = batch(1);
        b.symbols.push(pb::Symbol { id: 7, module: "m".into(), name: "f".into() });
        o.push(b);
        o.push(batch(1));
        o.ack(1);
        assert!(o.is_acked(7));
        assert_eq!(o.after(0, 10).len(), 1);
        o.reject(2);
        assert!(o.is_empty());
        assert_eq!(o.counters().2, 1);
    }
}
