//! Configuration layers for afetm's daemons: a TOML file (`--config FILE` or `AFETM_CONFIG`),
//! `AFETM_*` environment variables, and the command line, later layers winning:
//! defaults < file < environment < flags.
//!
//! Every flag is a key: `--queue-events 5` is `queue_events = 5` in the file and
//! `AFETM_QUEUE_EVENTS=5` in the environment; a repeatable flag takes a list
//! (`log = ["/var/log/a.log", "/var/log/b.log"]`). The layers are merged with [`figment`], and
//! the result becomes command-line arguments in front of the real ones, so clap still parses
//! and checks every value, with one set of rules and one set of error messages whatever the
//! source. A key given as a flag is left out of the layers entirely (flags win, a list
//! included). An unknown key in the file is an error (a typo must not be silently ignored);
//! an unknown `AFETM_*` variable is ignored, since other tools share the prefix.
//!
//! [`effective`] prints the configuration a command will run with (`--print-config`), each
//! value with where it came from.
#![deny(missing_docs)]

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    path::PathBuf,
};

use clap::{ArgAction, ArgMatches, Command};
use figment::{
    Figment,
    providers::{Env, Format, Toml},
};

/// The environment variables' prefix.
pub const ENV_PREFIX: &str = "AFETM_";
/// The flag (and key) naming the config file.
pub const CONFIG_FLAG: &str = "config";

/// Why the layers could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The named config file does not exist.
    #[error("config file {0}: no such file")]
    Missing(PathBuf),
    /// The file or the environment did not parse.
    #[error("config: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// The file names a key that is no flag of this command.
    #[error("config file {file}: unknown key `{key}` (keys are the flags' long names, e.g. `queue_events`)")]
    UnknownKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
    },
    /// A value of a type no flag takes (a table, or a list for a flag given once).
    #[error("config: `{key}`: {why}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
}

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The config file.
    File,
    /// An `AFETM_*` variable.
    Env,
}

/// The command line with the file's and the environment's values put in front of the user's
/// flags, and where each key came from.
#[derive(Debug, Default)]
pub struct Layered {
    /// Arguments to parse (program name first).
    pub args: Vec<OsString>,
    /// Origin of each key taken from the layers.
    pub origins: BTreeMap<String, Origin>,
}

fn key_of(long: &str) -> String {
    long.replace('-', "_")
}

/// The value of `--config` (or `--config=`) in `args`, else `AFETM_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let flag = format!("--{CONFIG_FLAG}");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == flag {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os(format!("{ENV_PREFIX}CONFIG")).map(PathBuf::from)
}

/// The subcommand `args` run (the first argument naming one), and where it is in `args`.
fn target<'a>(cmd: &'a Command, args: &[OsString]) -> (&'a Command, usize) {
    for (i, a) in args.iter().enumerate().skip(1) {
        if let Some(sub) = cmd.find_subcommand(a) {
            return (sub, i);
        }
    }
    (cmd, 0)
}

/// Long flags the user gave on the command line.
fn given(args: &[OsString]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.to_str()?.strip_prefix("--").map(|f| key_of(f.split('=').next().unwrap_or(f))))
        .collect()
}

fn scalar(key: &str, v: &serde_json::Value) -> Result<String, ConfigError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(ConfigError::BadValue {
            key: key.into(),
            why: format!("expected a string, number or bool, got {other}"),
        }),
    }
}

/// Turns one key's value into flags for `arg`.
fn flags(arg: &clap::Arg, key: &str, v: &serde_json::Value) -> Result<Vec<OsString>, ConfigError> {
    let long = format!("--{}", arg.get_long().unwrap_or(key));
    match (arg.get_action(), v) {
        (ArgAction::SetTrue, serde_json::Value::Bool(b)) => Ok(if *b { vec![long.into()] } else { vec![] }),
        (ArgAction::SetTrue, other) => {
            Err(ConfigError::BadValue { key: key.into(), why: format!("a switch takes true or false, not {other}") })
        }
        (ArgAction::Append, serde_json::Value::Array(items)) => {
            items.iter().map(|i| Ok(format!("{long}={}", scalar(key, i)?).into())).collect()
        }
        (_, serde_json::Value::Array(items)) if arg.get_num_args().is_some_and(|n| n.max_values() > 1) => {
            let mut out = vec![OsString::from(long)];
            for i in items {
                out.push(scalar(key, i)?.into());
            }
            Ok(out)
        }
        (_, v) => Ok(vec![format!("{long}={}", scalar(key, v)?).into()]),
    }
}

/// Reads the layers for `cmd` and puts them in front of `args` (see the module doc).
pub fn layered(cmd: &Command, args: Vec<OsString>) -> Result<Layered, ConfigError> {
    let mut fig = Figment::new();
    let path = config_path(&args);
    if let Some(p) = &path {
        if !p.is_file() {
            return Err(ConfigError::Missing(p.clone()));
        }
        fig = fig.merge(Toml::file_exact(p));
    }
    let fig = fig.merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]));
    let values: BTreeMap<String, serde_json::Value> = fig.extract().map_err(Box::new)?;
    let (sub, at) = target(cmd, &args);
    let user = given(&args[at + 1..]);
    let known_anywhere = |key: &str| {
        std::iter::once(cmd)
            .chain(cmd.get_subcommands())
            .any(|c| c.get_arguments().any(|a| a.get_long().map(key_of).as_deref() == Some(key)))
    };
    let mut out = Layered::default();
    let mut inserted = Vec::new();
    for (key, v) in &values {
        let from_file = fig.find_metadata(key).is_some_and(|m| matches!(m.source, Some(figment::Source::File(_))));
        // The subcommand's own flags first, then global ones of the root.
        let named = |c: &'_ Command| {
            c.get_arguments().find(|a| a.get_long().map(key_of).as_deref() == Some(key.as_str())).cloned()
        };
        let arg = named(sub).or_else(|| named(cmd).filter(|a| a.is_global_set()));
        let Some(arg) = arg else {
            if from_file && !known_anywhere(key) {
                return Err(ConfigError::UnknownKey { file: path.clone().unwrap_or_default(), key: key.clone() });
            }
            continue;
        };
        if key == CONFIG_FLAG || user.contains(key) {
            continue;
        }
        inserted.extend(flags(&arg, key, v)?);
        out.origins.insert(key.clone(), if from_file { Origin::File } else { Origin::Env });
    }
    out.args = args[..=at].to_vec();
    out.args.extend(inserted);
    out.args.extend_from_slice(&args[at + 1..]);
    Ok(out)
}

/// The effective configuration of the (sub)command `matches` parsed, as TOML: every flag with
/// its value, marked with where it came from (`default`, `file`, `env`, `flag`); flags without
/// a value are listed as comments.
pub fn effective(cmd: &Command, matches: &ArgMatches, layered: &Layered) -> String {
    let (cmd, matches) = match matches.subcommand() {
        Some((name, m)) => (cmd.find_subcommand(name).unwrap_or(cmd), m),
        None => (cmd, matches),
    };
    let mut out = String::new();
    for arg in cmd.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
        if ["help", "version", CONFIG_FLAG, "print_config"].contains(&key_of(long).as_str()) || arg.is_hide_set() {
            continue;
        }
        let key = key_of(long);
        let origin = match (layered.origins.get(&key), matches.value_source(id)) {
            (Some(Origin::File), _) => "file",
            (Some(Origin::Env), _) => "env",
            (None, Some(clap::parser::ValueSource::CommandLine)) => "flag",
            (None, Some(clap::parser::ValueSource::EnvVariable)) => "env",
            _ => "default",
        };
        let raw: Vec<&OsStr> = matches.get_raw(id).map(|v| v.collect()).unwrap_or_default();
        let quoted: Vec<String> = raw.iter().map(|v| toml_string(&v.to_string_lossy())).collect();
        let line = match (arg.get_action(), quoted.as_slice()) {
            (ArgAction::SetTrue, _) => format!("{key} = {}", matches.get_flag(id)),
            (_, []) => format!("# {key} = (unset)"),
            (ArgAction::Append, q) => format!("{key} = [{}]", q.join(", ")),
            (_, [one]) => format!("{key} = {one}"),
            (_, q) => format!("{key} = [{}]", q.join(", ")),
        };
        out.push_str(&format!("{line:<60} # {origin}\n"));
    }
    out
}

fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// [`layered`] over the process's own arguments; on error prints it and exits 2, as clap does
/// for a bad flag.
pub fn layered_args(cmd: &Command) -> Layered {
    match layered(cmd, std::env::args_os().collect()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e}", cmd.get_name());
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Agent {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        queue_events: usize,
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        analyzer: String,
        #[arg(long = "log")]
        logs: Vec<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        overload_control: bool,
    }

    fn parse<P: Parser>(args: &[&str]) -> Result<(P, Layered, ArgMatches), ConfigError> {
        let l = layered(&P::command(), args.iter().map(OsString::from).collect())?;
        let m = P::command().try_get_matches_from(&l.args).expect("clap accepts the layered arguments");
        Ok((P::from_arg_matches(&m).unwrap(), l, m))
    }

    #[test]
    fn defaults_then_file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "a.toml",
                "queue_events = 7\nanalyzer = \"http://file:1\"\nlog = [\"/a.log\", \"/b.log\"]\ndry_run = true\noverload_control = false\n",
            )?;
            let (a, _, _) = parse::<Agent>(&["agent", "--config", "a.toml"]).unwrap();
            assert_eq!((a.queue_events, a.analyzer.as_str()), (7, "http://file:1"));
            assert_eq!(a.logs, vec!["/a.log", "/b.log"]);
            assert!(a.dry_run && !a.overload_control);
            jail.set_env("AFETM_QUEUE_EVENTS", "8");
            jail.set_env("AFETM_UNRELATED_TOOL_SETTING", "x");
            let (a, _, _) = parse::<Agent>(&["agent", "--config=a.toml"]).unwrap();
            assert_eq!(a.queue_events, 8, "env beats the file");
            let (a, l, m) =
                parse::<Agent>(&["agent", "--config", "a.toml", "--queue-events", "9", "--log", "/c.log"]).unwrap();
            assert_eq!(a.queue_events, 9, "a flag beats env and file");
            assert_eq!(a.logs, vec!["/c.log"], "a repeated flag replaces the file's list");
            let shown = effective(&Agent::command(), &m, &l);
            assert!(shown.contains("queue_events = \"9\""), "{shown}");
            assert!(shown.lines().any(|x| x.starts_with("queue_events") && x.ends_with("# flag")), "{shown}");
            assert!(shown.lines().any(|x| x.starts_with("analyzer") && x.ends_with("# file")), "{shown}");
            assert!(
                shown.lines().any(|x| x.starts_with("overload_control = \"false\"") && x.ends_with("# file")),
                "{shown}"
            );
            assert!(!shown.contains("config ="), "{shown}");
            Ok(())
        });
    }

    #[test]
    fn env_alone_and_defaults_are_reported_as_such() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AFETM_ANALYZER", "http://env:2");
            let (a, l, m) = parse::<Agent>(&["agent"]).unwrap();
            assert_eq!(a.analyzer, "http://env:2");
            let shown = effective(&Agent::command(), &m, &l);
            assert!(shown.lines().any(|x| x.starts_with("analyzer") && x.ends_with("# env")), "{shown}");
            assert!(
                shown.lines().any(|x| x.starts_with("queue_events = \"10\"") && x.ends_with("# default")),
                "{shown}"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_files_are_errors_that_name_the_problem() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "queue_event = 7\n")?;
            let e = parse::<Agent>(&["agent", "--config", "typo.toml"]).unwrap_err().to_string();
            assert!(e.contains("unknown key `queue_event`") && e.contains("typo.toml"), "{e}");
            let e = parse::<Agent>(&["agent", "--config", "nope.toml"]).unwrap_err().to_string();
            assert!(e.contains("nope.toml") && e.contains("no such file"), "{e}");
            jail.create_file("broken.toml", "queue_events = [\n")?;
            assert!(parse::<Agent>(&["agent", "--config", "broken.toml"]).is_err());
            jail.create_file("table.toml", "[analyzer]\nx = 1\n")?;
            let e = parse::<Agent>(&["agent", "--config", "table.toml"]).unwrap_err().to_string();
            assert!(e.contains("analyzer"), "{e}");
            jail.create_file("switch.toml", "dry_run = \"yes\"\n")?;
            let e = parse::<Agent>(&["agent", "--config", "switch.toml"]).unwrap_err().to_string();
            assert!(e.contains("dry_run"), "{e}");
            Ok(())
        });
    }

    #[derive(Parser, Debug)]
    struct Analyzer {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Serve {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, default_value = "127.0.0.1:50051")]
            listen: String,
        },
        Report {
            #[arg(long, default_value = "http://127.0.0.1:50051")]
            server: String,
        },
    }

    #[test]
    fn keys_apply_to_the_subcommand_that_has_them() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("an.toml", "listen = \"0.0.0.0:1\"\nserver = \"http://s:1\"\n")?;
            jail.set_env("AFETM_CONFIG", "an.toml");
            let (a, _, _) = parse::<Analyzer>(&["analyzer", "serve"]).unwrap();
            assert!(matches!(a.cmd, Cmd::Serve { ref listen, .. } if listen == "0.0.0.0:1"), "{a:?}");
            let (a, _, _) = parse::<Analyzer>(&["analyzer", "report"]).unwrap();
            assert!(matches!(a.cmd, Cmd::Report { ref server } if server == "http://s:1"), "{a:?}");
            Ok(())
        });
    }
}
