//! Harness for the agent's end-to-end tests: real analyzer processes, real agents with real
//! uprobes, the real `calltree` program built with gcc.
#![allow(dead_code)]

use std::{
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_calltree::tree::{Forest, FuncTable};
use afetm_proto::{self as pb, control_client::ControlClient, query_client::QueryClient};

/// Root tests share two cores and the uprobe subsystem; one at a time keeps timings sane.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the calling test (returning early) when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if testbed::skip::needs_root("attaching real uprobes") {
            return;
        }
    };
}

pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AFETM_BIN_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_afetm-agent")).parent().expect("binary dir").to_path_buf()
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_afetm-agent"))
}

pub fn analyzer_bin() -> PathBuf {
    let p = bin_dir().join("afetm-analyzer");
    assert!(p.exists(), "{} is missing: build the workspace binaries first (cargo xtask test does)", p.display());
    p
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Builds `testbed/progs/calltree.c` into `dir`, with or without frame pointers.
pub fn build_calltree(dir: &Path, frame_pointers: bool) -> PathBuf {
    let out = dir.join(if frame_pointers { "calltree-fp" } else { "calltree-nofp" });
    let fp = if frame_pointers { "-fno-omit-frame-pointer" } else { "-fomit-frame-pointer" };
    let status = Command::new("gcc")
        .args(["-O1", "-g", "-fno-inline", "-fno-optimize-sibling-calls", fp, "-pthread", "-o"])
        .arg(&out)
        .arg(repo_root().join("testbed/progs/calltree.c"))
        .status()
        .expect("running gcc");
    assert!(status.success(), "gcc failed");
    out
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct AnalyzerProc {
    pub proc: Proc,
    pub port: u16,
    pub url: String,
}

impl AnalyzerProc {
    pub fn start(db: &Path, port: u16, extra: &[&str]) -> AnalyzerProc {
        let child = Command::new(analyzer_bin())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
            .arg(db)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting afetm-analyzer");
        let url = format!("http://127.0.0.1:{port}");
        let a = AnalyzerProc { proc: Proc(Some(child)), port, url };
        let start = Instant::now();
        loop {
            let ok = rt().block_on(async { QueryClient::connect(a.url.clone()).await.is_ok() });
            if ok {
                return a;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "analyzer did not come up");
            sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(mut self) {
        if let Some(mut c) = self.proc.0.take() {
            c.kill().expect("kill analyzer");
            c.wait().expect("reap analyzer");
        }
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

pub fn write_plan(dir: &Path, name: &str, target: &Path, points: &[(&str, &str)]) -> PathBuf {
    let points: Vec<String> = points.iter().map(|(f, m)| format!(r#"{{"function":"{f}","mode":"{m}"}}"#)).collect();
    let text = format!(r#"{{"target":{{"path":"{}"}},"points":[{}]}}"#, target.display(), points.join(","));
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, text).expect("write plan");
    path
}

pub struct AgentProc {
    pub proc: Proc,
    pub stderr_path: PathBuf,
}

impl AgentProc {
    /// Starts an agent and waits until its probes are attached.
    pub fn start(plan: &Path, url: &str, agent_id: &str, dir: &Path) -> AgentProc {
        Self::start_with(plan, url, agent_id, dir, &[])
    }

    /// Starts an agent with extra command-line arguments and waits until it is attached.
    pub fn start_with(plan: &Path, url: &str, agent_id: &str, dir: &Path, extra: &[&str]) -> AgentProc {
        let ready = dir.join(format!("{agent_id}.ready"));
        let _ = std::fs::remove_file(&ready);
        let stderr_path = dir.join(format!("{agent_id}.log"));
        let log = std::fs::File::create(&stderr_path).expect("agent log");
        let child = Command::new(agent_bin())
            .args(["--plan"])
            .arg(plan)
            .args(["--analyzer", url, "--agent-id", agent_id, "--ready-file"])
            .arg(&ready)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting afetm-agent");
        let mut a = AgentProc { proc: Proc(Some(child)), stderr_path };
        let start = Instant::now();
        while !ready.exists() {
            if let Some(status) = a.proc.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("agent exited early ({status}): {}", a.log());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "agent not ready: {}", a.log());
            sleep(Duration::from_millis(20));
        }
        a
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGTERM: the agent drains its ring buffer and queue, then exits 0.
    pub fn stop(mut self) -> String {
        let mut c = self.proc.0.take().expect("agent running");
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().expect("wait agent");
        let log = self.log();
        assert!(status.success(), "agent exited with {status}: {log}");
        log
    }
}

/// Runs `calltree iterations seconds` to completion.
pub fn run_prog(prog: &Path, iterations: u32, seconds: f64) {
    let status = Command::new(prog)
        .args([iterations.to_string(), seconds.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("run calltree");
    assert!(status.success());
}

pub async fn windows(url: &str, agent: &str, closed_only: bool) -> Vec<pb::WindowInfo> {
    let mut q = QueryClient::connect(url.to_string()).await.expect("connect");
    q.list_windows(pb::ListWindowsRequest { agent_id: agent.into(), closed_only, ..Default::default() })
        .await
        .expect("list windows")
        .into_inner()
        .windows
}

/// Every AFCT of an agent's closed windows, as forests over one function table.
pub async fn afcts(url: &str, agent: &str) -> (FuncTable, Vec<(pb::WindowInfo, u32, Forest)>) {
    let mut q = QueryClient::connect(url.to_string()).await.expect("connect");
    let mut table = FuncTable::default();
    let mut out = Vec::new();
    for w in windows(url, agent, true).await {
        for tid in w.tids.clone() {
            let t = q
                .get_afct(pb::GetAfctRequest { window_id: w.id, tid })
                .await
                .expect("get afct")
                .into_inner()
                .tree
                .expect("tree");
            out.push((w.clone(), tid, Forest::from_proto(&t, &mut table).expect("valid tree")));
        }
    }
    (table, out)
}

pub async fn control(url: &str) -> ControlClient<tonic::transport::Channel> {
    ControlClient::connect(url.to_string()).await.expect("connect control")
}

pub async fn agent_info(url: &str, agent: &str) -> Option<pb::AgentInfo> {
    // A plan report of every function of a large binary is several MB.
    let mut q = QueryClient::connect(url.to_string()).await.expect("connect").max_decoding_message_size(64 << 20);
    q.list_agents(pb::ListAgentsRequest { without_plans: false })
        .await
        .expect("list agents")
        .into_inner()
        .agents
        .into_iter()
        .rfind(|a| a.agent_id == agent)
}

/// Whether some node path in `f` spells `names` (parent to child, by function name).
pub fn has_path(f: &Forest, t: &FuncTable, names: &[&str]) -> bool {
    f.nodes.iter().enumerate().any(|(i, n)| {
        if *t.get(n.func).name != *names[0] {
            return false;
        }
        let mut cur = i;
        for want in &names[1..] {
            match f.nodes[cur].children.iter().find(|c| *t.get(f.nodes[**c as usize].func).name == **want) {
                Some(c) => cur = *c as usize,
                None => return false,
            }
        }
        true
    })
}

#[allow(unused_imports)]
pub use afetm_agent::reader::monotonic_ns;

/// Pushes a plan for `target` to a connected agent through the analyzer and waits for the
/// agent's report of it; panics if the agent refuses it.
pub fn push_plan(
    url: &str,
    agent: &str,
    target: &Path,
    version: u64,
    points: &[(&str, pb::TraceMode)],
) -> pb::PlanReport {
    let plan = pb::Plan {
        version,
        points: points.iter().map(|(f, m)| pb::TracePoint { function: f.to_string(), mode: *m as i32 }).collect(),
        target_path: target.display().to_string(),
        target_pid: 0,
    };
    rt().block_on(async {
        control(url)
            .await
            .set_plan(pb::SetPlanRequest { agent_id: agent.into(), plan: Some(plan) })
            .await
            .expect("set plan");
    });
    for _ in 0..400 {
        if let Some(r) =
            rt().block_on(agent_info(url, agent)).and_then(|a| a.last_plan).filter(|r| r.version == version)
        {
            assert!(r.ok, "plan {version} refused: {}", r.error);
            return r;
        }
        sleep(Duration::from_millis(25));
    }
    panic!("plan {version} never applied");
}

/// A testbed stack stopped (by pid) when dropped, whatever way the test leaves.
pub struct Stack(pub testbed::Config);

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = testbed::down(&self.0);
    }
}

/// A `name=value` counter from an agent's final "reader finished" log line.
pub fn reader_counter(log: &str, name: &str) -> u64 {
    let line =
        log.lines().rfind(|l| l.contains("reader finished")).unwrap_or_else(|| panic!("no reader summary: {log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// Canonical trees per (pid, tid).
pub type TreesByThread<T> = std::collections::BTreeMap<(u32, u32), Vec<T>>;

/// Per (pid, tid): the canonical AFCT of each closed window of `agent`, in window order.
pub fn canonical_trees(url: &str, agent: &str) -> TreesByThread<Vec<String>> {
    let (table, all) = rt().block_on(afcts(url, agent));
    let mut out: TreesByThread<(u64, Vec<String>)> = Default::default();
    for (w, tid, f) in all {
        out.entry((w.pid, tid)).or_default().push((w.start_ns, f.canonical(&table)));
    }
    out.into_iter()
        .map(|(k, mut v)| {
            v.sort();
            (k, v.into_iter().map(|(_, t)| t).collect())
        })
        .collect()
}

/// `GET /metrics` from an agent's or analyzer's `--metrics-listen` address.
pub fn scrape(addr: &str) -> String {
    testbed::scrape::scrape(addr).expect("scraping the metrics endpoint")
}

/// One sample of a scrape (see `testbed::scrape::sample`).
#[allow(unused_imports)]
pub use testbed::scrape::sample as metric;
