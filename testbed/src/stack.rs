use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// The servers' executables. Defaults are Debian's stock binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub nginx: PathBuf,
    pub apache2: PathBuf,
    pub redis: PathBuf,
    /// Apache's shared modules (mod_mpm_prefork, mod_authz_core, mod_dir, mod_mime, mod_env).
    /// mod_php always comes from Debian's /usr/lib/apache2/modules.
    pub apache_modules: PathBuf,
    /// Directory holding a libsqlite3.so.0 to load in the Apache workers instead of the
    /// system one (source builds); `None` = the system library.
    pub sqlite_lib_dir: Option<PathBuf>,
}

impl Default for Binaries {
    fn default() -> Self {
        Binaries {
            nginx: "/usr/sbin/nginx".into(),
            apache2: "/usr/sbin/apache2".into(),
            redis: "/usr/bin/redis-server".into(),
            apache_modules: "/usr/lib/apache2/modules".into(),
            sqlite_lib_dir: None,
        }
    }
}

/// Where and how the shop runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub run_dir: PathBuf,
    /// Address of every tier on loopback (the default).
    pub host: String,
    /// Put L1, L2 and L3 each in a network namespace of its own, joined by veth pairs on a
    /// bridge, with addresses 10.203.N.1/.2/.3 (N from the base port); the client reaches L1
    /// from the root namespace through the bridge (.254). The paper's tiers are separate VMs.
    pub netns: bool,
    /// nginx listens here; Apache instance i on base_port + 1 + i; Redis on base_port + 299.
    /// Keep it below the ephemeral range (32768-60999 by default), where a client socket's
    /// local port can block a server's bind.
    pub base_port: u16,
    pub apaches: usize,
    /// Pre-forked children per Apache instance (16 kept p99 low in ../shared/notes/testbed.md).
    pub children: u32,
    pub seed_items: u32,
    pub binaries: Binaries,
}

impl Config {
    pub fn new(run_dir: impl Into<PathBuf>) -> Config {
        Config {
            run_dir: run_dir.into(),
            host: "127.0.0.1".into(),
            netns: false,
            base_port: 18080,
            apaches: 4,
            children: 8,
            seed_items: 200,
            binaries: Binaries::default(),
        }
    }

    pub fn nginx_port(&self) -> u16 {
        self.base_port
    }

    pub fn apache_port(&self, i: usize) -> u16 {
        self.base_port + 1 + i as u16
    }

    pub fn redis_port(&self) -> u16 {
        self.base_port + 299
    }

    fn subnet(&self) -> String {
        format!("10.203.{}", self.base_port % 251)
    }

    /// Address of tier 1 (nginx), 2 (Apache) or 3 (Redis).
    pub fn tier_host(&self, tier: u8) -> String {
        if self.netns { format!("{}.{tier}", self.subnet()) } else { self.host.clone() }
    }

    /// Network namespace of a tier (when `netns`).
    pub fn tier_netns(&self, tier: u8) -> String {
        format!("afetm{}-l{tier}", self.base_port)
    }

    fn bridge(&self) -> String {
        format!("afb{}", self.base_port)
    }

    /// Fails unless the tiers can be reached without leaving the machine: with namespaces,
    /// their addresses exist only behind this testbed's bridge, and a connection attempt
    /// without it would go out through the default route.
    pub fn check_reachable(&self) -> Result<()> {
        if self.netns && !Path::new(&format!("/sys/class/net/{}", self.bridge())).exists() {
            bail!("the testbed's namespaces are not up (no bridge {}): run `up --netns` first", self.bridge());
        }
        Ok(())
    }

    /// Base URL of L1.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.tier_host(1), self.nginx_port())
    }

    pub fn db_path(&self) -> PathBuf {
        self.run_dir.join("data/shop.sqlite")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.run_dir.join("logs")
    }
}

fn source_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn render(template: &Path, vars: &[(&str, String)]) -> Result<String> {
    let mut text = fs::read_to_string(template).with_context(|| format!("reading {}", template.display()))?;
    for (k, v) in vars {
        text = text.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(i) = text.find("{{") {
        bail!("{}: unrendered placeholder near {:?}", template.display(), &text[i..(i + 30).min(text.len())]);
    }
    Ok(text)
}

fn chown_www(path: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(()); // unprivileged: the servers run as this user anyway
    }
    let status = Command::new("chown").args(["-R", "www-data:www-data"]).arg(path).status()?;
    if !status.success() {
        bail!("chown www-data {} failed", path.display());
    }
    Ok(())
}

/// A server the testbed started: name, pid (= its process group), port.
#[derive(Clone, Debug, Serialize)]
pub struct Server {
    pub name: String,
    pub pid: u32,
    pub port: u16,
    pub exe: PathBuf,
}

fn pid_file(cfg: &Config, name: &str) -> PathBuf {
    cfg.run_dir.join("pids").join(format!("{name}.testbed"))
}

fn spawn(
    cfg: &Config,
    tier: u8,
    name: &str,
    port: u16,
    exe: &Path,
    args: &[String],
    env: &[(&str, String)],
) -> Result<Server> {
    if !exe.exists() {
        bail!("{name}: {} not found (install the Debian package or run `cargo xtask testbed build`)", exe.display());
    }
    if !cfg.netns {
        let held = crate::ports::holders(&crate::ports::listening_inodes(None, port));
        if !held.is_empty() {
            bail!(
                "{name}: port {port} is already served by {} (another shop? `down` it or use another base port)",
                held.join(", ")
            );
        }
    }
    let log = fs::File::create(cfg.logs_dir().join(format!("{name}.stdout.log")))?;
    // `ip netns exec` enters the namespace and execs the server: the pid stays the server's.
    let mut cmd = if cfg.netns {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &cfg.tier_netns(tier)]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A session of its own: the whole server (master and workers) is one process group.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let server = Server { name: name.into(), pid: child.id(), port, exe: exe.into() };
    // Record before waiting on anything: `down` must find it even if `up` dies right here.
    fs::write(pid_file(cfg, name), serde_json::to_string(&server)?)?;
    // The child is reaped by whoever outlives it; `down` works from the pid file.
    std::mem::forget(child);
    Ok(server)
}

/// Waits until `server`'s port is listened on by a process of its group. Fails, naming the
/// holder, when the server exits first or the port stays held by someone else.
fn wait_listening(cfg: &Config, server: &Server, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let inodes = crate::ports::listening_inodes(Some(server.pid), server.port);
        if group_members(server.pid).iter().any(|m| crate::ports::holds(*m, &inodes)) {
            return Ok(());
        }
        let held = || match crate::ports::holders(&inodes).as_slice() {
            [] => String::new(),
            h => format!("; port {} is held by {}", server.port, h.join(", ")),
        };
        if !alive(server.pid) {
            bail!(
                "{} (pid {}) exited during start-up{}; {}",
                server.name,
                server.pid,
                held(),
                log_tail(cfg, &server.name)
            );
        }
        if start.elapsed() > timeout {
            bail!("{} does not listen on port {} after {timeout:?}{}", server.name, server.port, held());
        }
        sleep(Duration::from_millis(10));
    }
}

/// Polls `ready` until it holds; fails when the server exits first or after `timeout`.
fn wait_until(server: &Server, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        if !alive(server.pid) {
            bail!("{} (pid {}) exited before it answered", server.name, server.pid);
        }
        if start.elapsed() > timeout {
            bail!("{} does not answer after {timeout:?}", server.name);
        }
        sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Reaps a server this process started, once it is gone (a no-op for one another process
/// started): long-running callers such as the campaign restart servers thousands of times.
fn reap(pid: u32) {
    // SAFETY: WNOHANG, no status pointer; fails harmlessly (ECHILD) for a non-child.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
}

/// The last lines of a server's logs (`logs/<name>*`), for start-up errors.
fn log_tail(cfg: &Config, name: &str) -> String {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir(cfg.logs_dir()) {
        for e in dir.filter_map(|e| e.ok()) {
            let file = e.file_name().to_string_lossy().into_owned();
            if !file.starts_with(name) || file.contains("access") {
                continue;
            }
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().rev().take(3).collect();
            if !lines.is_empty() {
                out.push(format!("{file}: {}", lines.into_iter().rev().collect::<Vec<_>>().join(" | ")));
            }
        }
    }
    if out.is_empty() { "its logs are empty".into() } else { out.join("; ") }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).is_some_and(|st| st != "Z" && st != "X")
        }
        Err(_) => false,
    }
}

/// Live processes of process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_string();
                let mut f = rest.split_whitespace();
                let state = f.next()?.to_string();
                let _ppid = f.next()?;
                let pgrp: u32 = f.next()?.parse().ok()?;
                Some(pgrp == pgid && state != "Z" && state != "X")
            }) == Some(true)
        })
        .collect()
}

/// HTTP GET through a fresh connection; returns (status, headers+body).
pub fn http_get(host: &str, port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&format!("{host}:{port}").parse()?, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed HTTP answer")?;
    Ok((status, out))
}

/// Redis PING.
pub fn redis_ping(host: &str, port: u16) -> bool {
    let Ok(addr) = format!("{host}:{port}").parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).map(|n| buf[..n].starts_with(b"+PONG")).unwrap_or(false)
}

/// A tier of the shop: what a campaign restarts after a fault in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// L1, nginx.
    Nginx,
    /// L2, the Apache + mod_php instances (and the libsqlite3 inside them).
    Apache,
    /// L3, Redis.
    Redis,
}

impl Tier {
    fn owns(&self, server: &str) -> bool {
        match self {
            Tier::Nginx => server == "nginx",
            Tier::Apache => server.starts_with("apache"),
            Tier::Redis => server == "redis",
        }
    }
}

/// Renders the configs into the run folder (idempotent); returns the folder, canonical.
fn prepare(cfg: &Config) -> Result<PathBuf> {
    for d in ["conf", "data", "logs", "pids", "tmp", "www"] {
        fs::create_dir_all(cfg.run_dir.join(d))?;
    }
    let run = cfg.run_dir.canonicalize()?;
    let upstreams: String =
        (0..cfg.apaches).map(|i| format!("        server {}:{};\n", cfg.tier_host(2), cfg.apache_port(i))).collect();
    let vars = [
        ("RUN_DIR", run.display().to_string()),
        ("REDIS_HOST", cfg.tier_host(3)),
        ("REDIS_PORT", cfg.redis_port().to_string()),
        ("APACHE_HOST", cfg.tier_host(2)),
        ("NGINX_HOST", cfg.tier_host(1)),
        ("NGINX_PORT", cfg.nginx_port().to_string()),
        ("CHILDREN", cfg.children.to_string()),
        ("APACHE_MODULES", cfg.binaries.apache_modules.display().to_string()),
        ("UPSTREAMS", upstreams.trim_end().to_string()),
    ];
    for f in ["redis.conf", "apache2.conf", "php.ini", "nginx.conf"] {
        fs::write(run.join("conf").join(f), render(&source_dir().join("conf").join(f), &vars)?)?;
    }
    fs::copy(source_dir().join("app/shop.php"), run.join("www/shop.php"))?;
    for d in ["data", "logs", "tmp"] {
        chown_www(&run.join(d))?;
    }
    Ok(run)
}

fn start_redis(cfg: &Config, run: &Path) -> Result<Vec<Server>> {
    let conf = run.join("conf/redis.conf").display().to_string();
    let redis = spawn(cfg, 3, "redis", cfg.redis_port(), &cfg.binaries.redis, &[conf], &[])?;
    wait_listening(cfg, &redis, Duration::from_secs(20))?;
    // Redis listens before it has finished initialising (Lua, functions, background threads);
    // it answers only from its event loop.
    wait_until(&redis, Duration::from_secs(20), || redis_ping(&cfg.tier_host(3), redis.port))?;
    Ok(vec![redis])
}

fn start_apaches(cfg: &Config, run: &Path) -> Result<Vec<Server>> {
    let mut env = vec![("PHP_INI_SCAN_DIR", String::new())];
    if let Some(dir) = &cfg.binaries.sqlite_lib_dir {
        env.push(("LD_LIBRARY_PATH", dir.display().to_string()));
    }
    let mut started = Vec::new();
    for i in 0..cfg.apaches {
        let name = format!("apache{i}");
        // A killed instance leaves its PidFile; Apache refuses to start while that pid exists
        // (a zombie not yet reaped counts).
        let _ = fs::remove_file(run.join("pids").join(format!("{name}.httpd.pid")));
        let args: Vec<String> = vec![
            "-d".into(),
            run.display().to_string(),
            "-f".into(),
            run.join("conf/apache2.conf").display().to_string(),
            "-C".into(),
            format!("Define PORT {}", cfg.apache_port(i)),
            "-C".into(),
            format!("Define NAME {name}"),
            "-DFOREGROUND".into(),
        ];
        started.push(spawn(cfg, 2, &name, cfg.apache_port(i), &cfg.binaries.apache2, &args, &env)?);
    }
    for s in &started {
        wait_listening(cfg, s, Duration::from_secs(30))?;
        let (code, body) = http_get(&cfg.tier_host(2), s.port, "/shop.php?op=ping")?;
        if code != 200 {
            bail!("{} answers {code} to ping: {body}", s.name);
        }
    }
    Ok(started)
}

fn start_nginx(cfg: &Config, run: &Path) -> Result<Vec<Server>> {
    let args: Vec<String> = vec![
        "-p".into(),
        format!("{}/", run.display()),
        "-c".into(),
        run.join("conf/nginx.conf").display().to_string(),
        "-e".into(),
        run.join("logs/nginx-error.log").display().to_string(),
    ];
    let nginx = spawn(cfg, 1, "nginx", cfg.nginx_port(), &cfg.binaries.nginx, &args, &[])?;
    wait_listening(cfg, &nginx, Duration::from_secs(20))?;
    // The master listens before its workers run; an answer comes from a worker.
    wait_until(&nginx, Duration::from_secs(20), || {
        http_get(&cfg.tier_host(1), nginx.port, "/shop.php?op=ping").is_ok_and(|(c, _)| c == 200)
    })?;
    Ok(vec![nginx])
}

/// Starts the whole shop and waits until every tier listens (each port held by the server
/// started for it, never by another process) and answers; seeds the database.
pub fn up(cfg: &Config) -> Result<Vec<Server>> {
    if !servers(cfg)?.is_empty() {
        bail!("{} already has running servers; run `down` first", cfg.run_dir.display());
    }
    let run = prepare(cfg)?;
    if cfg.netns {
        create_netns(cfg)?;
    }
    let mut started = start_redis(cfg, &run)?;
    started.extend(start_apaches(cfg, &run)?);
    started.extend(start_nginx(cfg, &run)?);
    let (code, body) =
        http_get(&cfg.tier_host(1), cfg.nginx_port(), &format!("/shop.php?op=seed&n={}", cfg.seed_items))?;
    if code != 200 {
        bail!("seeding through nginx failed with {code}: {body}");
    }
    Ok(started)
}

/// Kills one tier's servers (SIGKILL to their process groups: a faulty server may be stopped
/// or stuck) and waits until they are gone.
pub fn stop_tier(cfg: &Config, tier: Tier) -> Result<()> {
    let list: Vec<Server> = servers(cfg)?.into_iter().filter(|s| tier.owns(&s.name)).collect();
    stop_servers(cfg, &list, libc::SIGKILL, Duration::from_secs(5))
}

/// Sends `signal` to each server's process group, SIGKILL to those still there after
/// `grace`; waits until all are gone (failing after twice `grace`), reaps them and forgets
/// their pid files.
fn stop_servers(cfg: &Config, list: &[Server], signal: i32, grace: Duration) -> Result<()> {
    for s in list {
        if s.pid > 1 && !group_members(s.pid).is_empty() {
            // SAFETY: signalling a process group we created.
            unsafe { libc::kill(-(s.pid as i32), signal) };
        }
    }
    let start = Instant::now();
    for s in list {
        while s.pid > 1 && !group_members(s.pid).is_empty() {
            if start.elapsed() > grace {
                // SAFETY: as above.
                unsafe { libc::kill(-(s.pid as i32), libc::SIGKILL) };
                if start.elapsed() > grace * 2 {
                    bail!("{} (process group {}) survived SIGKILL", s.name, s.pid);
                }
            }
            sleep(Duration::from_millis(5));
        }
        reap(s.pid);
        let _ = fs::remove_file(pid_file(cfg, &s.name));
    }
    Ok(())
}

/// Copies an SQLite database with its write-ahead log (no writer may have it open): SQLite
/// replays the log when the copy is opened. Leftover `-wal`/`-shm` files at `to` are removed.
fn copy_db(from: &Path, to: &Path, for_www: bool) -> Result<()> {
    let with = |p: &Path, ext: &str| PathBuf::from(format!("{}{ext}", p.display()));
    for ext in ["-wal", "-shm"] {
        let _ = fs::remove_file(with(to, ext));
    }
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    if with(from, "-wal").exists() {
        fs::copy(with(from, "-wal"), with(to, "-wal"))?;
    }
    if for_www {
        chown_www(to)?;
        if with(to, "-wal").exists() {
            chown_www(&with(to, "-wal"))?;
        }
    }
    Ok(())
}

/// A pristine copy of the shop database, for [`start_tier`] to restore (Apache must be down:
/// [`stop_tier`] first).
pub fn snapshot_db(cfg: &Config, to: &Path) -> Result<()> {
    if servers(cfg)?.iter().any(|s| Tier::Apache.owns(&s.name) && !group_members(s.pid).is_empty()) {
        bail!("Apache is running: stop its tier before taking a copy of the database");
    }
    copy_db(&cfg.db_path(), to, false)
}

/// Starts one tier of a shop whose other tiers run (after [`stop_tier`]); with `restore`,
/// the shop database is first replaced by that pristine copy (only while Apache is down: the
/// workers hold the file open).
pub fn start_tier(cfg: &Config, tier: Tier, restore: Option<&Path>) -> Result<Vec<Server>> {
    let run = cfg.run_dir.canonicalize()?;
    if let Some(pristine) = restore {
        if tier != Tier::Apache {
            bail!("the shop database can only be restored while Apache is down");
        }
        copy_db(pristine, &cfg.db_path(), true)?;
    }
    match tier {
        Tier::Nginx => start_nginx(cfg, &run),
        Tier::Apache => start_apaches(cfg, &run),
        Tier::Redis => start_redis(cfg, &run),
    }
}

/// Servers recorded in the run folder (running or not).
pub fn servers(cfg: &Config) -> Result<Vec<Server>> {
    let dir = cfg.run_dir.join("pids");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "testbed") {
            let text = fs::read_to_string(&p)?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
            out.push(Server {
                name: v["name"].as_str().unwrap_or_default().into(),
                pid: v["pid"].as_u64().unwrap_or(0) as u32,
                port: v["port"].as_u64().unwrap_or(0) as u16,
                exe: v["exe"].as_str().unwrap_or_default().into(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Stops every server `up` recorded: SIGTERM to its process group, SIGKILL after 10 s.
/// Returns the names stopped.
pub fn down(cfg: &Config) -> Result<Vec<String>> {
    let list = servers(cfg)?;
    stop_servers(cfg, &list, libc::SIGTERM, Duration::from_secs(10))?;
    remove_netns(cfg)?;
    Ok(list.into_iter().map(|s| s.name).collect())
}

/// One line of `status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub name: String,
    pub pid: u32,
    pub port: u16,
    pub processes: usize,
    pub healthy: bool,
}

pub fn status(cfg: &Config) -> Result<Vec<Status>> {
    let reachable = cfg.check_reachable().is_ok();
    Ok(servers(cfg)?
        .into_iter()
        .map(|s| {
            let processes = group_members(s.pid).len();
            let healthy = processes > 0
                && reachable
                && if s.name == "redis" {
                    redis_ping(&cfg.tier_host(3), s.port)
                } else {
                    http_get(&cfg.tier_host(if s.name == "nginx" { 1 } else { 2 }), s.port, "/shop.php?op=ping")
                        .map(|(c, _)| c == 200)
                        .unwrap_or(false)
                };
            Status { name: s.name, pid: s.pid, port: s.port, processes, healthy }
        })
        .collect())
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn netns_record(cfg: &Config) -> PathBuf {
    cfg.run_dir.join("pids/netns.testbed-net")
}

/// Creates the bridge and one namespace per tier; recorded before use so `down` removes them.
fn create_netns(cfg: &Config) -> Result<()> {
    let bridge = cfg.bridge();
    let names: Vec<String> = (1..=3).map(|t| cfg.tier_netns(t)).collect();
    fs::write(netns_record(cfg), format!("{bridge}\n{}\n", names.join("\n")))?;
    ip(&["link", "add", &bridge, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{}.254/24", cfg.subnet()), "dev", &bridge])?;
    ip(&["link", "set", &bridge, "up"])?;
    for tier in 1..=3u8 {
        let ns = cfg.tier_netns(tier);
        let (inner, outer) = (format!("af{}l{tier}", cfg.base_port), format!("af{}l{tier}p", cfg.base_port));
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer])?;
        ip(&["link", "set", &outer, "master", &bridge])?;
        ip(&["link", "set", &outer, "up"])?;
        ip(&["link", "set", &inner, "netns", &ns])?;
        ip(&["-n", &ns, "addr", "add", &format!("{}.{tier}/24", cfg.subnet()), "dev", &inner])?;
        ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // phpredis opens a connection per request: without TIME_WAIT reuse (the root
        // namespace's default `2` reuses it for loopback only) L2 runs out of ephemeral ports
        // after ~20 s at 1,400 req/s. A namespaced sysctl: the host keeps its own setting.
        ip(&["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    }
    Ok(())
}

/// Removes what `create_netns` recorded (namespaces take their veth ends with them).
fn remove_netns(cfg: &Config) -> Result<()> {
    let Ok(text) = fs::read_to_string(netns_record(cfg)) else { return Ok(()) };
    let mut lines = text.lines();
    let bridge = lines.next().unwrap_or_default().to_string();
    for ns in lines.filter(|l| !l.is_empty()) {
        if Path::new(&format!("/run/netns/{ns}")).exists() {
            ip(&["netns", "del", ns])?;
        }
    }
    if !bridge.is_empty() && Path::new(&format!("/sys/class/net/{bridge}")).exists() {
        ip(&["link", "del", &bridge])?;
    }
    fs::remove_file(netns_record(cfg))?;
    Ok(())
}

/// Namespaces and bridge of this configuration that exist now.
pub fn netns_left(cfg: &Config) -> Vec<String> {
    let mut out: Vec<String> =
        (1..=3).map(|t| cfg.tier_netns(t)).filter(|ns| Path::new(&format!("/run/netns/{ns}")).exists()).collect();
    if Path::new(&format!("/sys/class/net/{}", cfg.bridge())).exists() {
        out.push(cfg.bridge());
    }
    out
}
