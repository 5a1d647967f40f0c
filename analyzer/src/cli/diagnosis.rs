//! The diagnosis commands of `afetm-analyzer`: `train` and `diagnoses`.

use std::path::Path;

use afetm_analyzer::training;
use afetm_diagnosis::train::TrainConfig;
use afetm_proto::{self as pb, plan::PlanFile, query_client::QueryClient};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// `afetm-analyzer train`: trains the GCN on the FDDB's training runs of `target` under
/// `plan` and writes the model directory.
pub fn train(fddb: &Path, target: &str, plan: &Path, out: &Path, cfg: &TrainConfig) -> Result<()> {
    let text = std::fs::read_to_string(plan).with_context(|| format!("reading plan {}", plan.display()))?;
    let plan_file = PlanFile::parse(&text).with_context(|| format!("plan {}", plan.display()))?;
    let bar = ProgressBar::new(cfg.epochs as u64);
    bar.set_style(
        ProgressStyle::with_template("training {bar:30} epoch {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let model = training::train_from_fddb(fddb, target, &plan_file, cfg, |e| {
        bar.set_position(e.epoch as u64);
        bar.set_message(format!("loss {:.4} val acc {:.3}", e.loss, e.val_accuracy));
    })
    .with_context(|| format!("training a model for {target} from {}", fddb.display()))?;
    bar.finish_and_clear();
    model.save(out).with_context(|| format!("writing the model to {}", out.display()))?;
    let m = &model.manifest;
    let t = &m.training;
    println!(
        "model for {} ({}) written to {}\n  training set: {} trees of {} runs ({} faulty trees trained as normal: masked equal to a normal tree; {} too large), validation: {} trees of {} runs\n  classes: {} (normal + {} (function, fault kind)), vocabulary: {} functions, plan: {} traced, {} callstack\n  epochs: {} (best {}), {:.1} s\n  validation accuracy {:.3}, threshold P(normal) < {:.4}: {:.1}% of normal validation trees alarm, {:.1}% of faulty ones",
        m.target,
        m.module,
        out.display(),
        t.train_samples,
        t.train_runs,
        t.relabelled_normal,
        t.too_large,
        t.val_samples,
        t.val_runs,
        m.classes.len(),
        m.classes.len() - 1,
        m.vocab.functions().len(),
        m.plan.traced.len(),
        m.plan.callstack.len(),
        t.epochs,
        t.best_epoch,
        t.seconds,
        t.val_accuracy,
        m.threshold,
        100.0 * t.val_false_alarms,
        100.0 * t.val_detection,
    );
    Ok(())
}

/// One line per diagnosis: time, agent, window, verdict, top-3.
pub fn line(d: &pb::Diagnosis) -> String {
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.diagnosed_unix_ms.max(0) as u64);
    let verdict = match (d.error, d.stale) {
        (true, false) => "ERROR",
        (false, false) => "ok",
        (true, true) => "ERROR(stale model)",
        (false, true) => "ok(stale model)",
    };
    let top: Vec<String> = d.top.iter().take(3).map(|s| format!("{}@{} {:.2}", s.kind, s.function, s.probability)).collect();
    format!(
        "{} agent={} window={} pid={} tid={} {verdict} P(normal)={:.3} top: {}",
        humantime::format_rfc3339_seconds(when),
        d.agent_id,
        d.window_id,
        d.pid,
        d.tid,
        d.p_normal,
        top.join(", ")
    )
}

/// `afetm-analyzer diagnoses`: the stored diagnoses (oldest first), then with `follow` each new one.
pub async fn diagnoses(server: &str, agent: String, errors: bool, follow: bool, limit: u32) -> Result<()> {
    let mut q = QueryClient::connect(server.to_string())
        .await
        .with_context(|| format!("cannot reach analyzer at {server}"))?;
    let mut watch = if follow {
        let req = pb::WatchDiagnosesRequest { agent_id: agent.clone(), errors_only: errors };
        Some(q.watch_diagnoses(req).await.context("watching diagnoses")?.into_inner())
    } else {
        None
    };
    let req = pb::ListDiagnosesRequest { agent_id: agent, errors_only: errors, limit, ..Default::default() };
    let mut listed = q.list_diagnoses(req).await.context("listing diagnoses")?.into_inner().diagnoses;
    listed.reverse();
    let newest = listed.last().map(|d| d.window_id).unwrap_or(0);
    for d in &listed {
        println!("{}", line(d));
    }
    if let Some(stream) = watch.as_mut() {
        while let Some(d) = stream.message().await.context("diagnosis stream")? {
            if d.window_id > newest {
                println!("{}", line(&d));
            }
        }
    }
    Ok(())
}
