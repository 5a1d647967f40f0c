//! What `packaging/` ships works with the real binaries: the example configs parse (every key
//! is a flag), the layers' precedence shows in `--print-config`, and the systemd units pass
//! `systemd-analyze verify`.
mod common;

use std::{path::PathBuf, process::Command};

use common::bin;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `cmd`; (success, stdout, stderr).
fn output(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd.output().expect("running a workspace binary");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn line<'a>(shown: &'a str, key: &str) -> &'a str {
    shown.lines().find(|l| l.starts_with(&format!("{key} = "))).unwrap_or_else(|| panic!("no {key} in:\n{shown}"))
}

#[test]
fn example_configs_parse_and_layers_take_precedence_in_order() {
    let agent_toml = repo().join("packaging/agent.toml");
    let (ok, shown, err) = output(
        Command::new(bin("afetm-agent"))
            .arg("--config")
            .arg(&agent_toml)
            .args(["--ring-mib", "32", "--print-config"])
            .env("AFETM_QUEUE_EVENTS", "1234")
            .env("AFETM_SOMETHING_ELSE", "ignored"),
    );
    assert!(ok, "{err}");
    assert!(
        line(&shown, "plan").contains("/etc/afetm/plan.json") && line(&shown, "plan").ends_with("# file"),
        "{shown}"
    );
    assert!(
        line(&shown, "queue_events").contains("1234") && line(&shown, "queue_events").ends_with("# env"),
        "{shown}"
    );
    assert!(line(&shown, "ring_mib").contains("32") && line(&shown, "ring_mib").ends_with("# flag"), "{shown}");
    assert!(line(&shown, "flush").ends_with("# default"), "{shown}");

    let (ok, shown, err) = output(
        Command::new(bin("afetm-analyzer"))
            .args(["serve", "--config"])
            .arg(repo().join("packaging/analyzer.toml"))
            .arg("--print-config"),
    );
    assert!(ok, "{err}");
    assert!(line(&shown, "metrics_listen").contains("127.0.0.1:9430"), "{shown}");
    assert!(line(&shown, "window").contains("10s") && line(&shown, "window").ends_with("# file"), "{shown}");

    // A typo in the file is an error that names it, before anything starts.
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "listen = \"127.0.0.1:0\"\nstale_afer = \"1m\"\n").unwrap();
    let (ok, _, err) = output(Command::new(bin("afetm-analyzer")).args(["serve", "--config"]).arg(&typo));
    assert!(!ok && err.contains("unknown key `stale_afer`"), "{err}");
    // A value clap refuses is refused the same way from the file.
    std::fs::write(&typo, "window = \"ten seconds\"\n").unwrap();
    let (ok, _, err) = output(Command::new(bin("afetm-analyzer")).args(["serve", "--config"]).arg(&typo));
    assert!(!ok && err.contains("--window"), "{err}");
}

#[test]
fn systemd_units_verify() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        testbed::skip::skipped("systemd-analyze is not installed (cargo xtask setup installs systemd)");
        return;
    };
    assert!(probe.status.success());
    let dir = tempfile::tempdir().unwrap();
    for unit in ["afetm-agent.service", "afetm-analyzer.service"] {
        // Point ExecStart at the built binaries: verify checks that they exist.
        let text = std::fs::read_to_string(repo().join("packaging/systemd").join(unit)).unwrap();
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin("").display()));
        std::fs::write(dir.path().join(unit), text).unwrap();
        let (ok, out, err) =
            output(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(dir.path().join(unit)));
        let complaints: Vec<&str> = err.lines().filter(|l| l.contains(unit)).collect();
        assert!(ok && complaints.is_empty(), "{unit}: {out}{err}");
    }
}
