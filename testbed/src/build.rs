//! Source builds of the traced servers with symbols and frame pointers (`-g
//! -fno-omit-frame-pointer`) from Debian's source packages, cached by content: each build lives
//! in `<cache>/<package>-<source version>-<recipe hash>/` and is skipped when its `done` marker
//! exists. Facts behind the recipes: ../shared/notes/testbed.md.
//!
//! Source packages come through `apt-get source` with a deb-src entry for the machine's Debian
//! mirror (`/etc/apt/sources.list.d/afetm-src.sources`); versions are tried newest first, since
//! a mirror may lack the sources of some (security) versions.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::Binaries;

const CFLAGS: &str = "-g -O2 -fno-omit-frame-pointer";

/// Debian's SQLite compile options (debian/rules of sqlite3 3.40), so PHP's pdo_sqlite finds
/// every symbol it links against.
const SQLITE_DEFINES: &[&str] = &[
    "-fno-strict-aliasing",
    "-DSQLITE_SECURE_DELETE",
    "-DSQLITE_ENABLE_COLUMN_METADATA",
    "-DSQLITE_ENABLE_FTS3",
    "-DSQLITE_ENABLE_FTS3_PARENTHESIS",
    "-DSQLITE_ENABLE_FTS4",
    "-DSQLITE_ENABLE_FTS5",
    "-DSQLITE_ENABLE_RTREE=1",
    "-DSQLITE_SOUNDEX=1",
    "-DSQLITE_ENABLE_UNLOCK_NOTIFY",
    "-DSQLITE_OMIT_LOOKASIDE=1",
    "-DSQLITE_ENABLE_DBSTAT_VTAB",
    "-DSQLITE_ALLOW_ROWID_IN_VIEW",
    "-DSQLITE_ENABLE_UPDATE_DELETE_LIMIT=1",
    "-DSQLITE_ENABLE_LOAD_EXTENSION",
    "-DSQLITE_ENABLE_JSON1",
    "-DSQLITE_LIKE_DOESNT_MATCH_BLOBS",
    "-DSQLITE_THREADSAFE=1",
    "-DSQLITE_ENABLE_FTS3_TOKENIZER=1",
    "-DSQLITE_USE_URI=1",
    "-DSQLITE_MAX_SCHEMA_RETRY=25",
    "-DSQLITE_ENABLE_PREUPDATE_HOOK",
    "-DSQLITE_ENABLE_SESSION",
    "-DSQLITE_ENABLE_STMTVTAB",
    "-DSQLITE_MAX_VARIABLE_NUMBER=250000",
    // What `configure` detects for Debian's build. Without HAVE_USLEEP the busy handler sleeps
    // in whole seconds, which showed up as multi-second requests under write contention.
    "-DHAVE_USLEEP=1",
    "-DHAVE_FDATASYNC=1",
    "-DHAVE_LOCALTIME_R=1",
    "-DHAVE_GMTIME_R=1",
    "-DHAVE_POSIX_FALLOCATE=1",
    "-DHAVE_MALLOC_USABLE_SIZE=1",
    "-DHAVE_STRCHRNUL=1",
];

/// Debian packages the builds need besides gcc/make.
pub const BUILD_DEPS: &[&str] = &["dpkg-dev", "make", "tcl", "libapr1-dev", "libaprutil1-dev", "libpcre2-dev"];

/// The four builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Package {
    Redis,
    Nginx,
    Apache2,
    Sqlite3,
}

impl Package {
    pub const ALL: [Package; 4] = [Package::Redis, Package::Nginx, Package::Apache2, Package::Sqlite3];

    pub fn source_name(self) -> &'static str {
        match self {
            Package::Redis => "redis",
            Package::Nginx => "nginx",
            Package::Apache2 => "apache2",
            Package::Sqlite3 => "sqlite3",
        }
    }

    /// The recipe, as text: part of the cache key, so changing it rebuilds.
    fn recipe(self) -> String {
        match self {
            Package::Redis => format!("make MALLOC=libc REDIS_CFLAGS={CFLAGS:?}"),
            Package::Nginx => format!(
                "configure --with-cc-opt={CFLAGS:?} --without-http_rewrite_module --without-http_gzip_module; make"
            ),
            Package::Apache2 => format!(
                "configure --with-mpm=prefork --enable-mpms-shared=prefork --enable-modules=none --enable-mods-static='unixd log_config logio version' --enable-mods-shared='authz_core dir mime env' CFLAGS={CFLAGS:?}; make EXTRA_CPPFLAGS=-DBUILD_DATETIME; make install"
            ),
            Package::Sqlite3 => {
                format!("configure; make sqlite3.c; gcc {CFLAGS} -fPIC -shared {}", SQLITE_DEFINES.join(" "))
            }
        }
    }
}

/// Cache root: `$AFETM_CACHE` or `~/.cache/afetm`, then `testbed-build`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("AFETM_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/afetm")
    });
    base.join("testbed-build")
}

fn sh(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let status =
        cmd.stdout(out.try_clone()?).stderr(out).status().with_context(|| format!("{what}: cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); see {}", log.display());
    }
    Ok(())
}

fn ensure_deb_src() -> Result<()> {
    let path = Path::new("/etc/apt/sources.list.d/afetm-src.sources");
    if path.exists() {
        return Ok(());
    }
    // Reuse the machine's own mirrors for the sources.
    let main = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let uri = |suffix: &str| {
        main.lines()
            .filter_map(|l| l.strip_prefix("URIs:"))
            .map(str::trim)
            .find(|u| u.ends_with(suffix))
            .map(str::to_string)
    };
    let debian = uri("/debian").unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let security = uri("/debian-security").unwrap_or_else(|| "http://deb.debian.org/debian-security".into());
    let text = format!(
        "Types: deb-src\nURIs: {debian}\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
         Types: deb-src\nURIs: {security}\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    let status = Command::new("apt-get")
        .args(["-q", "-o", "DPkg::Lock::Timeout=600", "update"])
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("apt-get update after adding deb-src failed");
    }
    Ok(())
}

fn versions(pkg: &str) -> Result<Vec<String>> {
    let out = Command::new("apt-cache").args(["showsrc", pkg]).output()?;
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("Version: "))
        .map(str::to_string)
        .collect();
    v.sort_by(|a, b| {
        let ok = Command::new("dpkg")
            .args(["--compare-versions", a, "gt", b])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok { std::cmp::Ordering::Less } else { std::cmp::Ordering::Greater }
    });
    v.dedup();
    if v.is_empty() {
        bail!("no source package {pkg} (is the deb-src entry there? apt-get update?)");
    }
    Ok(v)
}

/// Fetches and unpacks the newest obtainable source of `pkg` into `work`; returns (version, dir).
fn fetch(pkg: &str, work: &Path, log: &Path) -> Result<(String, PathBuf)> {
    for v in versions(pkg)? {
        let _ = fs::remove_dir_all(work);
        fs::create_dir_all(work)?;
        let ok = Command::new("apt-get")
            .current_dir(work)
            .args(["source", "-q", &format!("{pkg}={v}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?
            .success();
        if ok {
            let dir = fs::read_dir(work)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.is_dir())
                .context("apt-get source unpacked nothing")?;
            return Ok((v, dir));
        }
        fs::write(log, format!("source {pkg}={v} not obtainable; trying an older version\n"))?;
    }
    bail!("no version of the {pkg} source package could be fetched")
}

fn key(pkg: Package, version: &str) -> String {
    let mut h = DefaultHasher::new();
    (pkg.recipe(), version).hash(&mut h);
    format!("{}-{}-{:016x}", pkg.source_name(), version.replace(['~', '+', ':'], "_"), h.finish())
}

/// Where the finished build of `pkg` with the current recipe is, if any (the `done` marker
/// holds the source version and the recipe).
pub fn installed(cache: &Path, pkg: Package) -> Option<PathBuf> {
    let prefix = format!("{}-", pkg.source_name());
    let recipe = pkg.recipe();
    fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
        .filter(|p| fs::read_to_string(p.join("done")).is_ok_and(|d| d.lines().nth(1) == Some(recipe.as_str())))
        .max_by_key(|p| fs::metadata(p.join("done")).and_then(|m| m.modified()).ok())
}

/// The servers from the cache, when all four are built.
pub fn binaries(cache: &Path) -> Option<Binaries> {
    let redis = installed(cache, Package::Redis)?;
    let nginx = installed(cache, Package::Nginx)?;
    let httpd = installed(cache, Package::Apache2)?;
    let sqlite = installed(cache, Package::Sqlite3)?;
    Some(Binaries {
        redis: redis.join("redis-server"),
        nginx: nginx.join("nginx"),
        apache2: httpd.join("httpd/bin/httpd"),
        apache_modules: httpd.join("httpd/modules"),
        sqlite_lib_dir: Some(sqlite),
    })
}

/// Builds what is missing from the cache; returns (package, where, seconds; 0 = cached).
pub fn build_all(cache: &Path) -> Result<Vec<(Package, PathBuf, f64)>> {
    fs::create_dir_all(cache)?;
    let mut out = Vec::new();
    let mut fetched_index = false;
    for pkg in Package::ALL {
        let name = pkg.source_name();
        let log = cache.join(format!("{name}.log"));
        if !fetched_index {
            ensure_deb_src()?;
            fetched_index = true;
        }
        let newest = versions(name)?;
        // Any cached build of an obtainable version with this recipe will do.
        if let Some(hit) = newest.iter().map(|v| cache.join(key(pkg, v))).find(|d| d.join("done").exists()) {
            out.push((pkg, hit, 0.0));
            continue;
        }
        let start = Instant::now();
        eprintln!("testbed build: {name} from source (log: {})", log.display());
        let _ = fs::remove_file(&log);
        let work = cache.join(format!("work-{name}"));
        let (version, src) = fetch(name, &work, &log)?;
        let dest = cache.join(key(pkg, &version));
        let _ = fs::remove_dir_all(&dest);
        fs::create_dir_all(&dest)?;
        match pkg {
            Package::Redis => {
                sh(
                    Command::new("make").current_dir(&src).args([
                        "-j2",
                        "MALLOC=libc",
                        &format!("REDIS_CFLAGS={CFLAGS}"),
                    ]),
                    &log,
                    "redis make",
                )?;
                fs::copy(src.join("src/redis-server"), dest.join("redis-server"))?;
            }
            Package::Nginx => {
                sh(
                    Command::new("./configure").current_dir(&src).args([
                        &format!("--with-cc-opt={CFLAGS}"),
                        "--without-http_rewrite_module",
                        "--without-http_gzip_module",
                    ]),
                    &log,
                    "nginx configure",
                )?;
                sh(Command::new("make").current_dir(&src).arg("-j2"), &log, "nginx make")?;
                fs::copy(src.join("objs/nginx"), dest.join("nginx"))?;
            }
            Package::Apache2 => {
                sh(
                    Command::new("./configure")
                        .current_dir(&src)
                        .arg(format!("--prefix={}", dest.join("httpd").display()))
                        .args([
                            "--with-apr=/usr/bin/apr-1-config",
                            "--with-apr-util=/usr/bin/apu-1-config",
                            "--with-pcre=/usr/bin/pcre2-config",
                            "--with-mpm=prefork",
                            "--enable-mpms-shared=prefork",
                            "--enable-modules=none",
                            "--enable-mods-static=unixd log_config logio version",
                            "--enable-mods-shared=authz_core dir mime env",
                            &format!("CFLAGS={CFLAGS}"),
                        ]),
                    &log,
                    "httpd configure",
                )?;
                // A Debian patch (reproducible builds) expects BUILD_DATETIME from debian/rules.
                // make hands the value to a shell, hence the escaped quotes.
                sh(
                    Command::new("make")
                        .current_dir(&src)
                        .args(["-j2", r#"EXTRA_CPPFLAGS=-DBUILD_DATETIME=\"afetm\""#]),
                    &log,
                    "httpd make",
                )?;
                sh(Command::new("make").current_dir(&src).arg("install"), &log, "httpd make install")?;
            }
            Package::Sqlite3 => {
                let bld = src.join("afetm-build");
                fs::create_dir_all(&bld)?;
                sh(Command::new("../configure").current_dir(&bld), &log, "sqlite configure")?;
                sh(Command::new("make").current_dir(&bld).arg("sqlite3.c"), &log, "sqlite amalgamation")?;
                sh(
                    Command::new("gcc")
                        .current_dir(&bld)
                        .args(CFLAGS.split(' '))
                        .args(["-fPIC", "-shared"])
                        .args(SQLITE_DEFINES)
                        .args(["-Wl,-soname,libsqlite3.so.0", "-o"])
                        .arg(dest.join("libsqlite3.so.0"))
                        .args(["sqlite3.c", "-lpthread", "-ldl", "-lm"]),
                    &log,
                    "sqlite compile",
                )?;
            }
        }
        fs::write(dest.join("done"), format!("{version}\n{}\n", pkg.recipe()))?;
        let _ = fs::remove_dir_all(&work);
        // Superseded builds of this package (other version or recipe) go.
        for old in fs::read_dir(cache)?.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = old.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if old != dest
                && old.is_dir()
                && name.starts_with(&format!("{}-", pkg.source_name()))
                && !name.starts_with("work-")
            {
                let _ = fs::remove_dir_all(&old);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!("testbed build: {name} {version} done in {secs:.0} s");
        out.push((pkg, dest, secs));
    }
    Ok(out)
}
