//! The NHSR-OSW workload: the paper's CRUD mix against L1, measured with an HDR histogram.
//!
//! Each connection is a thread with its own keep-alive HTTP connection. Without a rate the
//! generator is closed-loop (a connection sends its next request when the previous answer
//! arrived; latencies then understate queueing under overload). With `rate` requests are
//! scheduled at fixed intervals per connection and latency is measured from the scheduled
//! send time, so a stall is charged to every request it delayed (coordinated omission
//! corrected). Requests during `warmup` are sent but not recorded. A fixed `seed` makes the
//! operation sequence reproducible.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde::Serialize;

/// Relative weights of the shop's operations.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Mix {
    pub find: u32,
    pub search: u32,
    pub buy: u32,
    pub modify: u32,
    pub add: u32,
    pub delete: u32,
}

impl Default for Mix {
    /// 60% find, 10% search, 10% buy, 8% modify, 7% add, 5% delete.
    fn default() -> Self {
        Mix { find: 60, search: 10, buy: 10, modify: 8, add: 7, delete: 5 }
    }
}

impl Mix {
    /// Parses `find=60,search=10,...`; unnamed operations get 0.
    pub fn parse(text: &str) -> Result<Mix> {
        let mut m = Mix { find: 0, search: 0, buy: 0, modify: 0, add: 0, delete: 0 };
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else { bail!("mix entry {part:?} is not op=weight") };
            let v: u32 = v.trim().parse().map_err(|_| anyhow::anyhow!("mix weight {v:?} is not a number"))?;
            match k.trim() {
                "find" => m.find = v,
                "search" => m.search = v,
                "buy" => m.buy = v,
                "modify" => m.modify = v,
                "add" => m.add = v,
                "delete" => m.delete = v,
                other => bail!("unknown operation {other:?} in mix (find, search, buy, modify, add, delete)"),
            }
        }
        if m.total() == 0 {
            bail!("the mix has no weight");
        }
        Ok(m)
    }

    fn total(&self) -> u32 {
        self.find + self.search + self.buy + self.modify + self.add + self.delete
    }

    fn pick(&self, r: u32) -> &'static str {
        let mut r = r % self.total();
        for (w, op) in [
            (self.find, "find"),
            (self.search, "search"),
            (self.buy, "buy"),
            (self.modify, "modify"),
            (self.add, "add"),
            (self.delete, "delete"),
        ] {
            if r < w {
                return op;
            }
            r -= w;
        }
        "find"
    }
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL of L1, e.g. http://127.0.0.1:18080
    pub url: String,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Total requests per second over all connections; None = closed loop.
    pub rate: Option<f64>,
    pub mix: Mix,
    pub seed: u64,
    /// Items the shop was seeded with (ids 1..=items).
    pub items: u32,
    /// A request without an answer after this long counts as an error (a hung server).
    pub request_timeout: Duration,
}

impl LoadConfig {
    pub fn new(url: impl Into<String>) -> LoadConfig {
        LoadConfig {
            url: url.into(),
            connections: 8,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            rate: None,
            mix: Mix::default(),
            seed: 1,
            items: 200,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub throughput_rps: f64,
    /// Transport failures and 5xx answers.
    pub errors: u64,
    /// Answers by status code (404/409 are business outcomes: deleted items, sold out).
    pub by_status: BTreeMap<u16, u64>,
    pub by_op: BTreeMap<String, u64>,
    pub latency: Latency,
}

impl Report {
    pub fn text(&self) -> String {
        format!(
            "{} requests in {:.1} s ({}, {} connections): {:.0} req/s, {} errors\n\
             latency us: mean {:.0}  p50 {}  p90 {}  p99 {}  max {}\n\
             by status: {:?}\nby op: {:?}",
            self.requests,
            self.seconds,
            self.mode,
            self.connections,
            self.throughput_rps,
            self.errors,
            self.latency.mean_us,
            self.latency.p50_us,
            self.latency.p90_us,
            self.latency.p99_us,
            self.latency.max_us,
            self.by_status,
            self.by_op
        )
    }
}

struct ThreadResult {
    hist: Histogram<u64>,
    by_status: BTreeMap<u16, u64>,
    by_op: BTreeMap<String, u64>,
    errors: u64,
}

/// The request for `op`. Deletes remove items this connection added (so the seeded catalogue
/// stays), or miss when it has added none.
fn path_for(op: &str, rng: &mut StdRng, items: u32, added: &mut Vec<u64>) -> String {
    let id = rng.random_range(1..=items.max(1));
    match op {
        "find" => format!("/shop.php?op=find&id={id}"),
        "search" => format!("/shop.php?op=search&q=item-{}", rng.random_range(1..=99)),
        "buy" => format!("/shop.php?op=buy&id={id}&qty=1"),
        "modify" => format!("/shop.php?op=modify&id={id}&price={}", rng.random_range(1..=500)),
        "add" => format!("/shop.php?op=add&name=new-{}&price=3&stock=100", rng.random::<u32>()),
        _ => match added.pop() {
            Some(mine) => format!("/shop.php?op=delete&id={mine}"),
            None => format!("/shop.php?op=delete&id={}", u32::MAX / 2),
        },
    }
}

/// Runs the workload and returns its report.
pub fn run(cfg: &LoadConfig) -> Result<Report> {
    if cfg.connections == 0 {
        bail!("connections must be at least 1");
    }
    if cfg.rate.is_some_and(|r| r <= 0.0) {
        bail!("rate must be positive");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let record_from = start + cfg.warmup;
    let end = record_from + cfg.duration;
    let mut handles = Vec::new();
    for t in 0..cfg.connections {
        let cfg = cfg.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || -> Result<ThreadResult> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(cfg.request_timeout))
                .build()
                .into();
            let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(t as u64));
            let mut res = ThreadResult {
                hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                by_status: BTreeMap::new(),
                by_op: BTreeMap::new(),
                errors: 0,
            };
            let interval = cfg.rate.map(|r| Duration::from_secs_f64(cfg.connections as f64 / r));
            let mut added: Vec<u64> = Vec::new();
            let mut next = start + interval.map(|i| i.mul_f64(t as f64 / cfg.connections as f64)).unwrap_or_default();
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if interval.is_some() && next > now {
                    std::thread::sleep(next - now);
                }
                let sent = if interval.is_some() { next } else { Instant::now() };
                if sent >= end {
                    break;
                }
                let op = cfg.mix.pick(rng.random());
                let url = format!("{}{}", cfg.url, path_for(op, &mut rng, cfg.items, &mut added));
                let status = match agent.get(&url).call() {
                    Ok(mut resp) => {
                        let body = resp.body_mut().read_to_string().unwrap_or_default();
                        if let Some(id) = (op == "add")
                            .then(|| body.split("\"id\":").nth(1).and_then(|r| r.trim_end_matches('}').parse().ok()))
                            .flatten()
                        {
                            added.push(id);
                        }
                        Some(resp.status().as_u16())
                    }
                    Err(_) => None,
                };
                let done = Instant::now();
                if let Some(i) = interval {
                    next += i;
                }
                if sent < record_from {
                    continue;
                }
                let us = done.duration_since(sent).as_micros().max(1) as u64;
                let _ = res.hist.record(us.min(60_000_000));
                *res.by_op.entry(op.to_string()).or_insert(0) += 1;
                match status {
                    Some(code) => {
                        *res.by_status.entry(code).or_insert(0) += 1;
                        if code >= 500 {
                            res.errors += 1;
                        }
                    }
                    None => res.errors += 1,
                }
                // A slow or hung server must not stretch a fixed-rate run: once the run's time
                // is over, the slots still due are failed requests whose latency is at least
                // how late they are (coordinated omission corrected), and nothing more is sent.
                if let Some(i) = interval {
                    let now = Instant::now();
                    if now >= end {
                        while next < end {
                            if next >= record_from {
                                let late = now.duration_since(next).as_micros().max(1) as u64;
                                let _ = res.hist.record(late.min(60_000_000));
                                res.errors += 1;
                            }
                            next += i;
                        }
                        break;
                    }
                }
            }
            Ok(res)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut by_status, mut by_op, mut errors) = (BTreeMap::new(), BTreeMap::new(), 0);
    for h in handles {
        let r = h.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        hist.add(&r.hist)?;
        errors += r.errors;
        for (k, v) in r.by_status {
            *by_status.entry(k).or_insert(0) += v;
        }
        for (k, v) in r.by_op {
            *by_op.entry(k).or_insert(0) += v;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = cfg.duration.as_secs_f64();
    Ok(Report {
        mode: if cfg.rate.is_some() { "fixed rate, coordinated-omission corrected" } else { "closed loop" },
        connections: cfg.connections,
        seconds,
        requests: hist.len(),
        throughput_rps: hist.len() as f64 / seconds,
        errors,
        by_status,
        by_op,
        latency: Latency {
            mean_us: hist.mean(),
            p50_us: hist.value_at_quantile(0.5),
            p90_us: hist.value_at_quantile(0.9),
            p99_us: hist.value_at_quantile(0.99),
            max_us: hist.max(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_picks_by_weight() {
        let m = Mix::parse("find=3,buy=1").unwrap();
        let picks: Vec<&str> = (0..4).map(|r| m.pick(r)).collect();
        assert_eq!(picks, vec!["find", "find", "find", "buy"]);
        assert!(Mix::parse("find=x").is_err());
        assert!(Mix::parse("fly=1").is_err());
        assert!(Mix::parse("find=0").is_err());
        assert_eq!(Mix::default().total(), 100);
    }
}
