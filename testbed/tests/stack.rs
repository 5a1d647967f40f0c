//! The shop end to end on real servers: every operation through nginx, its effects checked in
//! the SQLite file and in Redis, then `down` leaves no process behind. Root only (the servers
//! drop to www-data).
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use testbed::{Config, down, group_members, http_get, servers, status, up};

fn redis_get(host: &str, port: u16, key: &str) -> Option<String> {
    let mut s = TcpStream::connect((host, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    if text.starts_with("$-1") { None } else { text.split("\r\n").nth(1).map(str::to_string) }
}

fn get(cfg: &Config, path: &str) -> (u16, String) {
    let (code, raw) = http_get(&cfg.tier_host(1), cfg.nginx_port(), path).unwrap();
    (code, raw.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

fn header(cfg: &Config, path: &str, name: &str) -> Option<String> {
    let (_, raw) = http_get(&cfg.tier_host(1), cfg.nginx_port(), path).unwrap();
    raw.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
}

#[test]
fn every_operation_end_to_end_and_down_leaves_nothing() {
    if testbed::skip::needs_root("starting the servers (they drop to www-data)") {
        return;
    }
    shop(false);
}

/// The same with each tier in a network namespace of its own.
#[test]
fn tiers_in_network_namespaces() {
    if testbed::skip::needs_root("creating network namespaces") {
        return;
    }
    shop(true);
}

fn shop(netns: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path().join("run"));
    cfg.netns = netns;
    cfg.base_port = if netns { 29080 } else { 28080 };
    cfg.apaches = 2;
    cfg.children = 3;
    cfg.seed_items = 20;
    let started = match up(&cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = down(&cfg);
            panic!("up failed: {e:#}");
        }
    };
    assert_eq!(started.len(), 4, "redis, 2 apaches, nginx");
    assert!(status(&cfg).unwrap().iter().all(|s| s.healthy), "{:?}", status(&cfg));
    if netns {
        // Each tier really is in its own namespace, with its own address.
        for s in servers(&cfg).unwrap() {
            let tier = match s.name.as_str() {
                "nginx" => 1,
                "redis" => 3,
                _ => 2,
            };
            let ns = std::fs::read_link(format!("/proc/{}/ns/net", s.pid)).unwrap();
            let want = std::fs::metadata(format!("/run/netns/{}", cfg.tier_netns(tier))).unwrap();
            let inode = std::os::unix::fs::MetadataExt::ino(&want);
            assert_eq!(ns.to_string_lossy(), format!("net:[{inode}]"), "{} in the wrong namespace", s.name);
        }
        assert!(cfg.url().starts_with("http://10.203."), "{}", cfg.url());
    }
    let db = rusqlite::Connection::open(cfg.db_path()).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(count("SELECT COUNT(*) FROM items"), 20, "seeded through nginx");

    // find: miss, then served from Redis.
    assert_eq!(header(&cfg, "/shop.php?op=find&id=5", "X-Cache").as_deref(), Some("MISS"));
    assert!(redis_get(&cfg.tier_host(3), cfg.redis_port(), "item:5").unwrap().contains("\"name\":\"item-5\""));
    assert_eq!(header(&cfg, "/shop.php?op=find&id=5", "X-Cache").as_deref(), Some("HIT"));
    // buy: stock decremented, order written, cache entry dropped.
    let stock = || -> i64 { db.query_row("SELECT stock FROM items WHERE id = 5", [], |r| r.get(0)).unwrap() };
    let before = stock();
    let (code, body) = get(&cfg, "/shop.php?op=buy&id=5&qty=3");
    assert_eq!(code, 200, "{body}");
    assert_eq!(stock(), before - 3);
    assert_eq!(count("SELECT COUNT(*) FROM orders WHERE item_id = 5 AND qty = 3"), 1);
    assert_eq!(redis_get(&cfg.tier_host(3), cfg.redis_port(), "item:5"), None, "buy invalidates the cache");
    // add, modify, search, delete.
    let (code, body) = get(&cfg, "/shop.php?op=add&name=widget&price=9.5&stock=7");
    assert_eq!(code, 200, "{body}");
    let id: i64 = body.split("\"id\":").nth(1).unwrap().trim_end_matches('}').parse().unwrap();
    assert_eq!(
        db.query_row("SELECT name, stock FROM items WHERE id = ?1", [id], |r| Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?
        )))
        .unwrap(),
        ("widget".into(), 7)
    );
    assert_eq!(get(&cfg, &format!("/shop.php?op=modify&id={id}&price=12")).0, 200);
    assert_eq!(db.query_row("SELECT price FROM items WHERE id = ?1", [id], |r| r.get::<_, f64>(0)).unwrap(), 12.0);
    let (code, body) = get(&cfg, "/shop.php?op=search&q=widget");
    assert_eq!(code, 200);
    assert!(body.contains("widget"), "{body}");
    assert_eq!(get(&cfg, &format!("/shop.php?op=delete&id={id}")).0, 200);
    assert_eq!(count(&format!("SELECT COUNT(*) FROM items WHERE id = {id}")), 0);
    assert_eq!(get(&cfg, &format!("/shop.php?op=find&id={id}")).0, 404);
    // Both Apache instances served through nginx (round robin).
    let logs = cfg.logs_dir();
    for a in ["apache0", "apache1"] {
        let access = std::fs::read_to_string(logs.join(format!("{a}-access.log"))).unwrap_or_default();
        assert!(access.contains("op="), "{a} served nothing");
    }
    for log in ["nginx-access.log", "redis.log"] {
        assert!(logs.join(log).exists(), "{log} missing from the run folder");
    }

    let pgids: Vec<u32> = servers(&cfg).unwrap().iter().map(|s| s.pid).collect();
    let stopped = down(&cfg).unwrap();
    assert_eq!(stopped.len(), 4);
    for pgid in pgids {
        assert!(group_members(pgid).is_empty(), "process group {pgid} still has members");
    }
    assert!(servers(&cfg).unwrap().is_empty());
    assert_eq!(testbed::netns_left(&cfg), Vec::<String>::new(), "namespaces or bridge left behind");
    if !netns {
        // (With namespaces, their addresses are gone with the bridge: no connection attempt,
        // which would otherwise leave through the default route.)
        assert!(std::net::TcpStream::connect((cfg.tier_host(1), cfg.nginx_port())).is_err(), "nginx still listening");
    }
}

/// A second shop on ports another one holds must not pass for started (its redis logs
/// "Address already in use" and exits while the other one answers the health checks): `up`
/// fails and names the holder, and `down` of the second leaves the first untouched. Then one
/// tier is restarted alone: new processes, the others the same, and Apache's restart restores
/// the database from a pristine copy.
#[test]
fn ports_held_by_another_shop_and_single_tier_restarts() {
    if testbed::skip::needs_root("starting the servers (they drop to www-data)") {
        return;
    }
    struct Down(Config);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = down(&self.0);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut first = Config::new(dir.path().join("first"));
    first.base_port = 26580;
    first.apaches = 1;
    first.children = 2;
    first.seed_items = 10;
    let _down = Down(first.clone());
    if let Err(e) = up(&first) {
        panic!("up failed: {e:#}");
    }
    let mut second = first.clone();
    second.run_dir = dir.path().join("second");
    let err = up(&second).expect_err("the ports are taken");
    let _ = down(&second);
    let text = format!("{err:#}");
    assert!(text.contains("already served by") && text.contains("redis"), "{text}");
    assert!(status(&first).unwrap().iter().all(|s| s.healthy), "the first shop is untouched");

    // Redis alone: new pid, nginx and Apache the same.
    let before = servers(&first).unwrap();
    let pid = |list: &[testbed::Server], name: &str| list.iter().find(|s| s.name == name).map(|s| s.pid);
    testbed::stop_tier(&first, testbed::Tier::Redis).unwrap();
    testbed::start_tier(&first, testbed::Tier::Redis, None).unwrap();
    let after = servers(&first).unwrap();
    assert_ne!(pid(&before, "redis"), pid(&after, "redis"));
    assert_eq!(pid(&before, "nginx"), pid(&after, "nginx"));
    assert_eq!(pid(&before, "apache0"), pid(&after, "apache0"));
    assert!(status(&first).unwrap().iter().all(|s| s.healthy), "{:?}", status(&first));

    // Apache with the database restored: what was added after the copy is gone.
    let pristine = dir.path().join("pristine.sqlite");
    assert!(testbed::snapshot_db(&first, &pristine).is_err(), "not while Apache runs");
    testbed::stop_tier(&first, testbed::Tier::Apache).unwrap();
    testbed::snapshot_db(&first, &pristine).unwrap();
    testbed::start_tier(&first, testbed::Tier::Apache, None).unwrap();
    let (code, _) = get(&first, "/shop.php?op=add&name=extra&price=3");
    assert_eq!(code, 200);
    let count = || {
        let c = rusqlite::Connection::open(first.db_path()).unwrap();
        c.query_row("SELECT COUNT(*) FROM items", [], |r| r.get::<_, i64>(0)).unwrap()
    };
    assert_eq!(count(), 11);
    testbed::stop_tier(&first, testbed::Tier::Apache).unwrap();
    testbed::start_tier(&first, testbed::Tier::Apache, Some(&pristine)).unwrap();
    assert_eq!(count(), 10, "restored");
    assert!(testbed::start_tier(&first, testbed::Tier::Redis, Some(&pristine)).is_err(), "only with Apache down");
    assert!(status(&first).unwrap().iter().all(|s| s.healthy), "{:?}", status(&first));
    down(&first).unwrap();
}
