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
    pub host: String,
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

    /// Base URL of L1.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.nginx_port())
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

fn spawn(cfg: &Config, name: &str, port: u16, exe: &Path, args: &[String], env: &[(&str, String)]) -> Result<Server> {
    if !exe.exists() {
        bail!("{name}: {} not found (install the Debian package or run `cargo xtask testbed build`)", exe.display());
    }
    let log = fs::File::create(cfg.logs_dir().join(format!("{name}.stdout.log")))?;
    let mut cmd = Command::new(exe);
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

fn wait_port(host: &str, port: u16, name: &str, pid: u32, timeout: Duration) -> Result<()> {
    let addr: SocketAddr = format!("{host}:{port}").parse()?;
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !alive(pid) {
            bail!("{name} (pid {pid}) exited during start-up; see its logs");
        }
        if start.elapsed() > timeout {
            bail!("{name} did not open {addr} within {timeout:?}");
        }
        sleep(Duration::from_millis(50));
    }
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

/// Starts the whole shop and waits until every tier answers; seeds the database.
pub fn up(cfg: &Config) -> Result<Vec<Server>> {
    if !servers(cfg)?.is_empty() {
        bail!("{} already has running servers; run `down` first", cfg.run_dir.display());
    }
    for d in ["conf", "data", "logs", "pids", "tmp", "www"] {
        fs::create_dir_all(cfg.run_dir.join(d))?;
    }
    let run = cfg.run_dir.canonicalize()?;
    let upstreams: String =
        (0..cfg.apaches).map(|i| format!("        server {}:{};\n", cfg.host, cfg.apache_port(i))).collect();
    let vars = [
        ("RUN_DIR", run.display().to_string()),
        ("REDIS_HOST", cfg.host.clone()),
        ("REDIS_PORT", cfg.redis_port().to_string()),
        ("APACHE_HOST", cfg.host.clone()),
        ("NGINX_HOST", cfg.host.clone()),
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

    let mut started = Vec::new();
    let redis = spawn(
        cfg,
        "redis",
        cfg.redis_port(),
        &cfg.binaries.redis,
        &[run.join("conf/redis.conf").display().to_string()],
        &[],
    )?;
    wait_port(&cfg.host, redis.port, "redis", redis.pid, Duration::from_secs(20))?;
    started.push(redis);
    let mut apache_env = vec![("PHP_INI_SCAN_DIR", String::new())];
    if let Some(dir) = &cfg.binaries.sqlite_lib_dir {
        apache_env.push(("LD_LIBRARY_PATH", dir.display().to_string()));
    }
    for i in 0..cfg.apaches {
        let name = format!("apache{i}");
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
        let s = spawn(cfg, &name, cfg.apache_port(i), &cfg.binaries.apache2, &args, &apache_env)?;
        started.push(s);
    }
    for s in started.iter().filter(|s| s.name.starts_with("apache")) {
        wait_port(&cfg.host, s.port, &s.name, s.pid, Duration::from_secs(30))?;
    }
    let nginx_args: Vec<String> = vec![
        "-p".into(),
        format!("{}/", run.display()),
        "-c".into(),
        run.join("conf/nginx.conf").display().to_string(),
        "-e".into(),
        run.join("logs/nginx-error.log").display().to_string(),
    ];
    let nginx = spawn(cfg, "nginx", cfg.nginx_port(), &cfg.binaries.nginx, &nginx_args, &[])?;
    wait_port(&cfg.host, nginx.port, "nginx", nginx.pid, Duration::from_secs(20))?;
    started.push(nginx);

    // Every Apache answers PHP, then the shop is seeded through L1.
    for s in started.iter().filter(|s| s.name.starts_with("apache")) {
        let (code, body) = http_get(&cfg.host, s.port, "/shop.php?op=ping")?;
        if code != 200 {
            bail!("{} answers {code} to ping: {body}", s.name);
        }
    }
    let (code, body) = http_get(&cfg.host, cfg.nginx_port(), &format!("/shop.php?op=seed&n={}", cfg.seed_items))?;
    if code != 200 {
        bail!("seeding through nginx failed with {code}: {body}");
    }
    Ok(started)
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

/// Stops every server `up` recorded: SIGTERM to its process group, SIGKILL after `grace`.
/// Returns the names stopped.
pub fn down(cfg: &Config) -> Result<Vec<String>> {
    let grace = Duration::from_secs(10);
    let mut stopped = Vec::new();
    let list = servers(cfg)?;
    for s in &list {
        if s.pid > 1 && !group_members(s.pid).is_empty() {
            // SAFETY: signalling a process group we created.
            unsafe { libc::kill(-(s.pid as i32), libc::SIGTERM) };
        }
    }
    let start = Instant::now();
    for s in &list {
        while s.pid > 1 && !group_members(s.pid).is_empty() {
            if start.elapsed() > grace {
                // SAFETY: as above.
                unsafe { libc::kill(-(s.pid as i32), libc::SIGKILL) };
                sleep(Duration::from_millis(100));
                if start.elapsed() > grace * 2 {
                    bail!("{} (process group {}) survived SIGKILL", s.name, s.pid);
                }
            }
            sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_file(pid_file(cfg, &s.name));
        stopped.push(s.name.clone());
    }
    Ok(stopped)
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
    Ok(servers(cfg)?
        .into_iter()
        .map(|s| {
            let processes = group_members(s.pid).len();
            let healthy = processes > 0
                && if s.name == "redis" {
                    redis_ping(&cfg.host, s.port)
                } else {
                    http_get(&cfg.host, s.port, "/shop.php?op=ping").map(|(c, _)| c == 200).unwrap_or(false)
                };
            Status { name: s.name, pid: s.pid, port: s.port, processes, healthy }
        })
        .collect())
}
