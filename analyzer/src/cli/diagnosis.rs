//! The diagnosis commands of `afetm-analyzer`: `train` and `diagnoses`.

use std::path::Path;

use afetm_analyzer::training::{self, SetOptions};
use afetm_diagnosis::train::TrainConfig;
use afetm_proto::{self as pb, plan::PlanFile, query_client::QueryClient};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// `afetm-analyzer train`: trains the GCN on the FDDB's training runs of `target` under
/// `plan` and writes the model directory.
pub fn train(fddb: &Path, target: &str, plan: &Path, out: &Path, set: &SetOptions, cfg: &TrainConfig) -> Result<()> {
    let text = std::fs::read_to_string(plan).with_context(|| format!("reading plan {}", plan.display()))?;
    let plan_file = PlanFile::parse(&text).with_context(|| format!("plan {}", plan.display()))?;
    let bar = ProgressBar::new(cfg.epochs as u64);
    bar.set_style(
        ProgressStyle::with_template("training {bar:30} epoch {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let model = training::train_from_fddb(fddb, target, &plan_file, set, cfg, |e| {
        bar.set_position(e.epoch as u64);
        bar.set_message(format!("loss {:.4} val acc {:.3}", e.loss, e.val_accuracy));
    })
    .with_context(|| format!("training a model for {target} from {}", fddb.display()))?;
    bar.finish_and_clear();
    model.save(out).with_context(|| format!("writing the model to {}", out.display()))?;
    let m = &model.manifest;
    let t = &m.training;
    println!(
        "model for {} ({}) written to {}\n  training set: {} trees of {} runs ({} faulty trees trained as normal: masked equal to a normal tree; {} too large), validation: {} trees of {} runs\n  classes: {} (normal + {} (function, fault kind)), vocabulary: {} functions, plan: {} traced, {} callstack\n  epochs: {} (best {}), {:.1} s\n  validation accuracy {:.3}, threshold P(normal) < {:.4}: {:.1}% of validation trees of normal runs alarm, {:.1}% of faulty ones",
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
    let z = &t.sizes;
    println!(
        "  windows: {} call graphs of {:.1} functions on average, {} at most (unrolled as AFCTs: {:.1} and {} nodes)",
        z.windows, z.graph_mean, z.graph_max, z.tree_mean, z.tree_max
    );
    if !t.thin_classes.is_empty() {
        let thin: Vec<String> = t.thin_classes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!(
            "  {} of {} classes have fewer than {} training trees: {}",
            t.thin_classes.len(),
            m.classes.len(),
            afetm_diagnosis::train::THIN_CLASS,
            thin.join(", ")
        );
    }
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
    let top: Vec<String> =
        d.top.iter().take(3).map(|s| format!("{}@{} {:.2}", s.kind, s.function, s.probability)).collect();
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

/// What `afetm-analyzer diagnoses` prints.
pub struct Listing {
    /// Only this agent (empty: all).
    pub agent: String,
    /// Only this window (0: all).
    pub window: u64,
    /// Only windows in error.
    pub errors: bool,
    /// Then each new diagnosis as it comes.
    pub follow: bool,
    /// Stored diagnoses printed first (newest).
    pub last: u32,
    /// Print each diagnosed thread's AFCT with the suspects marked.
    pub tree: bool,
}

/// `afetm-analyzer diagnoses`: the stored diagnoses (oldest first), then with `follow` each new one.
pub async fn diagnoses(server: &str, l: Listing) -> Result<()> {
    let mut q = crate::cli_client::query(server).await?;
    let mut watch = if l.follow {
        let req = pb::WatchDiagnosesRequest { agent_id: l.agent.clone(), errors_only: l.errors };
        Some(q.watch_diagnoses(req).await.context("watching diagnoses")?.into_inner())
    } else {
        None
    };
    let req = pb::ListDiagnosesRequest {
        agent_id: l.agent,
        window_id: l.window,
        errors_only: l.errors,
        limit: l.last,
        ..Default::default()
    };
    let mut listed = q.list_diagnoses(req).await.context("listing diagnoses")?.into_inner().diagnoses;
    listed.reverse();
    let newest = listed.last().map(|d| d.window_id).unwrap_or(0);
    for d in &listed {
        show(&mut q, d, l.tree).await?;
    }
    if let Some(stream) = watch.as_mut() {
        while let Some(d) = stream.message().await.context("diagnosis stream")? {
            if d.window_id > newest {
                show(&mut q, &d, l.tree).await?;
            }
        }
    }
    Ok(())
}

async fn show(q: &mut QueryClient<afetm_auth::AuthChannel>, d: &pb::Diagnosis, tree: bool) -> Result<()> {
    println!("{}", line(d));
    if tree {
        let afct = q.get_afct(pb::GetAfctRequest { window_id: d.window_id, tid: d.tid }).await.context("GetAfct")?;
        match afct.into_inner().tree {
            Some(t) => print!("{}", marked(&t, d, 80)),
            None => println!("  (no AFCT stored)"),
        }
    }
    Ok(())
}

/// The AFCT as an indented tree with the suspects marked. Trees longer than `max_lines` show
/// the first two levels and every path to a suspect (with the suspect's children).
pub fn marked(tree: &pb::Tree, d: &pb::Diagnosis, max_lines: usize) -> String {
    let n = tree.nodes.len();
    let mut depth = vec![0usize; n];
    for (i, node) in tree.nodes.iter().enumerate() {
        if node.parent >= 0 && (node.parent as usize) < i {
            depth[i] = depth[node.parent as usize] + 1;
        }
    }
    let rank = |f: &str| d.top.iter().position(|s| s.function == f);
    let mut show = vec![n <= max_lines; n];
    if n > max_lines {
        for (i, (node, level)) in tree.nodes.iter().zip(&depth).enumerate() {
            let parent_suspect = node.parent >= 0 && rank(&tree.nodes[node.parent as usize].function).is_some();
            if *level <= 1 || rank(&node.function).is_some() || parent_suspect {
                // The node and its ancestors.
                let mut j = i as i32;
                while j >= 0 && !show[j as usize] {
                    show[j as usize] = true;
                    j = tree.nodes[j as usize].parent;
                }
            }
        }
    }
    let mut out = String::new();
    for (i, node) in tree.nodes.iter().enumerate().filter(|(i, _)| show[*i]) {
        let color = match pb::Color::try_from(node.color).unwrap_or(pb::Color::Unspecified) {
            pb::Color::White => "",
            pb::Color::Blue => " [blue: from call stacks]",
            _ => " [?]",
        };
        let mark = match rank(&node.function) {
            Some(r) => format!("   <== suspect {}: {} ({:.2})", r + 1, d.top[r].kind, d.top[r].probability),
            None => String::new(),
        };
        out.push_str(&format!("  {}{} x{}{color}{mark}\n", "  ".repeat(depth[i]), node.function, node.calls));
    }
    let hidden = show.iter().filter(|s| !**s).count();
    if hidden > 0 {
        out.push_str(&format!("  ({hidden} of {n} nodes not shown)\n"));
    }
    if let Some(s) = d.top.first()
        && !tree.nodes.iter().any(|node| node.function == s.function)
    {
        out.push_str(&format!(
            "  suspect 1 ({}) is not in the AFCT: the plan does not trace it and none of its callees\n",
            s.function
        ));
    }
    out
}

/// `afetm-analyzer diagnose`: stored AFCTs of a window through `Query.Diagnose`.
pub async fn diagnose_stored(server: &str, window: u64, tid: Option<u32>, model: String, top_k: u32) -> Result<()> {
    let mut q = crate::cli_client::query(server).await?;
    let windows =
        q.list_windows(pb::ListWindowsRequest { closed_only: true, ..Default::default() }).await?.into_inner().windows;
    let w = windows.iter().find(|w| w.id == window).with_context(|| format!("no closed window {window}"))?;
    for t in w.tids.iter().filter(|t| tid.is_none_or(|x| x == **t)) {
        let tree = q.get_afct(pb::GetAfctRequest { window_id: window, tid: *t }).await?.into_inner().tree;
        let req = pb::DiagnoseRequest { model: model.clone(), tree: tree.clone(), top_k };
        let mut d = q.diagnose(req).await.context("Query.Diagnose")?.into_inner();
        (d.window_id, d.agent_id, d.pid, d.tid, d.start_ns, d.end_ns) =
            (w.id, w.agent_id.clone(), w.pid, *t, w.start_ns, w.end_ns);
        println!("{}", line(&d));
        if let Some(tree) = tree {
            print!("{}", marked(&tree, &d, 40));
        }
    }
    Ok(())
}
