//! `afetm-analyzer serve`: the daemon's flags and start-up.
use std::{path::PathBuf, sync::Arc, time::Duration};

use afetm_analyzer::{
    diagnoser::Diagnoser,
    reporting::Reporter,
    service::{self, Analyzer},
    store::{Limits, Store, WindowConfig},
};
use anyhow::{Context, Result, bail};

/// The flags of `serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A TOML file whose keys are these flags' long names with `_` (`stale_after = "5m"`);
    /// `AFETM_<KEY>` variables override it and flags override both. Also `AFETM_CONFIG`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the configuration this command would run with (each value's source marked) and
    /// exit.
    #[arg(long)]
    pub print_config: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// SQLite database file (created if missing; WAL mode).
    #[arg(long, default_value = "afetm.sqlite")]
    pub db: PathBuf,
    /// Window length: each process's events are cut into windows this long, one AFCT per
    /// thread and window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// A window closes when the agent's clock passes its end by this much.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Largest AFCT, in nodes; bigger ones are cut and marked truncated.
    #[arg(long, default_value_t = afetm_analyzer::afct::DEFAULT_NODE_CAP)]
    pub node_cap: usize,
    /// Close the open windows of an agent silent this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    /// A diagnosis model directory (`afetm-analyzer train --out`); repeat for one per
    /// target. Every closed window of an agent tracing that module is diagnosed.
    #[arg(long = "model")]
    pub models: Vec<PathBuf>,
    /// The FDDB the models were trained from: when an agent's plan changes, a model for the
    /// new plan is trained from it in the background; reports list its similar runs.
    #[arg(long)]
    pub fddb: Option<PathBuf>,
    /// Suspects per diagnosis.
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    /// Who names the fault when a thread was killed or stopped by one: `fate` (its last
    /// traced calls, the model's fault functions first, most recent first), `kinds` (those
    /// functions, each with the kind the model finds likeliest for it), `gcn` (the model's
    /// suspects for its AFCT) or `merge` (half each); one for all fates, or per class: `kill=fate,signal=gcn,stop=fate` (kill:
    /// SIGKILL; signal: another fault signal; stop: a hang; a class not named keeps `fate`).
    /// The window alarms either way. `afetm-eval` chooses them on the model's validation runs
    /// (its report's notes, row AFETM).
    #[arg(long, default_value = "fate")]
    pub fate_rule: afetm_diagnosis::fate::Rules,
    /// Chimera's model directory (`afetm-analyzer train-logs --out`): reports weigh the
    /// window's log lines with it.
    #[arg(long)]
    pub log_model: Option<PathBuf>,
    /// The fusion of the GCN and the logs (`afetm-eval fuse --out`); without it the GCN's
    /// alarm decides a report's verdict.
    #[arg(long)]
    pub fusion: Option<PathBuf>,
    /// A folder of SOP files (`report/sop/*.toml`) over the built-in ones.
    #[arg(long)]
    pub sop_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (`afetm_analyzer_*`) and `/healthz` on this address, e.g.
    /// `127.0.0.1:9430`. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// The analyzer's TLS certificate (PEM); with `--tls-key`, gRPC is served over TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A CA (PEM): agents with a client certificate it signed may stream without a token
    /// (mTLS). Needs `--tls-cert`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Bearer tokens with roles, one `ROLE TOKEN` per line (roles: agent = Ingest, read =
    /// Query, control = everything). Without it (and without a client CA) every call is
    /// allowed. The web view then needs a read or control token too (HTTP Basic password or
    /// `Authorization: Bearer`).
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// Serve the web view (agents, windows, diagnoses with their AFCT drawn, reports) on this
    /// address, e.g. `127.0.0.1:9432`. Off by default; plaintext HTTP, so loopback only unless
    /// `--insecure` (put a TLS proxy in front for remote access).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// How often the database is probed with a small write; gRPC health says NOT_SERVING
    /// while the probe fails.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub probe_every: Duration,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs, insecure: bool) -> Result<()> {
    let ServeArgs {
        config: _,
        print_config: _,
        listen,
        db,
        window,
        grace,
        node_cap,
        stale_after,
        models,
        fddb,
        top_k,
        fate_rule,
        log_model,
        fusion,
        sop_dir,
        metrics_listen,
        http_listen,
        probe_every,
        tls_cert,
        tls_key,
        tls_client_ca,
        tokens,
    } = args;
    let security = security(&listen, tls_cert.zip(tls_key), tls_client_ca, tokens, insecure)?;
    if window.is_zero() {
        bail!("--window must be longer than 0");
    }
    let cfg = WindowConfig { len_ns: window.as_nanos() as u64, grace_ns: grace.as_nanos() as u64, node_cap };
    let store =
        Store::open(&db, cfg, Limits::default()).with_context(|| format!("opening database {}", db.display()))?;
    let listener =
        tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
    };
    let reporter = Reporter::new(log_model.as_deref(), fusion.as_deref(), fddb.clone(), sop_dir.as_deref())
        .context("loading what reports draw on")?;
    let mut analyzer = Analyzer::new(store).with_reporter(reporter);
    // Without models the diagnoser still judges windows by their threads' fates.
    let diagnoser =
        Diagnoser::load(&models, fddb, top_k, window.as_millis() as u64).context("loading diagnosis models")?;
    analyzer = analyzer.with_diagnoser(diagnoser.with_fate_rule(fate_rule));
    let analyzer = analyzer.with_probe_every(probe_every);
    if let Some(addr) = &metrics_listen {
        let a = analyzer.clone();
        let health: afetm_metrics::Health = Arc::new(move || a.health());
        afetm_metrics::serve(addr, analyzer.metrics().registry(), health).await?;
    }
    if let Some(addr) = &http_listen {
        afetm_auth::plaintext_listen_ok(addr, insecure)?;
        afetm_analyzer::web::serve(addr, analyzer.clone(), security.policy.tokens.clone())
            .await
            .with_context(|| format!("web view: cannot listen on {addr}"))?;
    }
    service::serve_with(analyzer, listener, stale_after, security, shutdown).await
}

/// TLS and access control from the flags; plaintext on a non-loopback address needs
/// `--insecure`.
fn security(
    listen: &str,
    tls: Option<(PathBuf, PathBuf)>,
    client_ca: Option<PathBuf>,
    token_file: Option<PathBuf>,
    insecure: bool,
) -> Result<service::Security> {
    let tokens = token_file.as_deref().map(afetm_auth::Tokens::load).transpose()?.map(Arc::new);
    let policy = afetm_auth::Policy { tokens, client_certs: client_ca.is_some() };
    let tls = match tls {
        Some((cert, key)) => Some(afetm_auth::server_tls(&cert, &key, client_ca.as_deref())?),
        None => {
            afetm_auth::plaintext_listen_ok(listen, insecure)?;
            if insecure && policy.tokens.is_none() {
                tracing::warn!(%listen, "plaintext gRPC without tokens on a non-loopback address: anyone who reaches it may push plans");
            }
            None
        }
    };
    Ok(service::Security { tls, policy })
}
