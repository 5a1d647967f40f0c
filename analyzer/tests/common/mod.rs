//! What the analyzer's end-to-end tests share: finding the binaries, stopping children and the
//! shop however a test ends, waiting for the daemon, and the shop's load at a fixed rate.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use afetm_proto::query_client::QueryClient;

/// A binary of the workspace (`AFETM_BIN_DIR`, or next to this test's analyzer).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("AFETM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_afetm-analyzer")).parent().unwrap().to_path_buf());
    dir.join(name)
}

/// Kills its children when dropped.
pub struct Kill(pub Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Stops the shop when dropped.
pub struct Down(pub testbed::Config);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = testbed::down(&self.0);
    }
}

/// Runs a command that must succeed; its stdout.
pub fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The shop's CRUD mix at `rate` req/s for `secs` (4 connections).
pub fn load(cfg: &testbed::Config, secs: u64, rate: f64) -> testbed::load::Report {
    let mut l = testbed::load::LoadConfig::new(cfg.url());
    l.items = cfg.seed_items;
    l.connections = 4;
    l.rate = Some(rate);
    l.duration = Duration::from_secs(secs);
    l.warmup = Duration::ZERO;
    testbed::load::run(&l).unwrap()
}

/// A Query client once the daemon `child` listens on `port`.
pub async fn connect(port: u16, child: &mut Child) -> QueryClient<tonic::transport::Channel> {
    let t = Instant::now();
    loop {
        if let Ok(c) = QueryClient::connect(format!("http://127.0.0.1:{port}")).await {
            return c;
        }
        assert!(child.try_wait().unwrap().is_none(), "the analyzer exited");
        assert!(t.elapsed() < Duration::from_secs(30), "the analyzer did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the agent started by [`agent`] serves its metrics.
pub const AGENT_METRICS: &str = "127.0.0.1:27435";

/// An agent `live` tracing `plan` to the daemon on `port`, tailing `logs`, once its probes
/// are attached (its log in `dir/agent.log`).
pub fn agent(plan: &std::path::Path, port: u16, dir: &std::path::Path, logs: &[PathBuf]) -> Child {
    let ready = dir.join("agent.ready");
    let mut c = Command::new(bin("afetm-agent"));
    c.arg("--plan").arg(plan).args(["--analyzer", &format!("http://127.0.0.1:{port}"), "--agent-id", "live"]);
    c.args(["--metrics-listen", AGENT_METRICS]);
    for l in logs {
        c.arg("--log").arg(l);
    }
    let child = c
        .arg("--ready-file")
        .arg(&ready)
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ready.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "agent not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}
