//! `afetm-analyzer export`: a stored window's AFCTs as Graphviz DOT, SVG or a Chrome trace
//! (`afetm_calltree::export` says what each shows and what the trace approximates);
//! `afetm-analyzer fddb fct`: one FCT of the FDDB as DOT or SVG.
use std::{collections::HashSet, path::PathBuf};

use afetm_calltree::{
    export,
    tree::{Forest, FuncTable},
};
use afetm_proto as pb;
use anyhow::{Context, Result, bail};

/// Output formats.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// Graphviz (`dot -Tsvg`), one graph per thread.
    Dot,
    /// A drawing, one per thread, stacked.
    Svg,
    /// Chrome trace JSON for ui.perfetto.dev (one track per thread).
    Chrome,
}

/// The flags of `export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,
    #[arg(long)]
    pub window: u64,
    /// Only this thread (default: every thread of the window).
    #[arg(long)]
    pub tid: Option<u32>,
    #[arg(long, value_enum, default_value = "dot")]
    pub format: Format,
    /// Functions to mark (default: the window diagnosis's top suspect, if any).
    #[arg(long, value_delimiter = ',')]
    pub highlight: Vec<String>,
    /// Output file; `-` for stdout.
    #[arg(long, default_value = "-")]
    pub out: String,
}

/// Fetches the window's AFCTs and writes them in the asked format.
pub async fn run(a: ExportArgs) -> Result<()> {
    let mut q = crate::cli_client::query(&a.server).await?;
    let req = pb::ListWindowsRequest { window_id: a.window, ..Default::default() };
    let windows = q.list_windows(req).await?.into_inner().windows;
    let Some(w) = windows.into_iter().next() else {
        bail!("no window {} at {}", a.window, a.server);
    };
    if !w.closed {
        bail!("window {} is still open: its AFCTs are built when it closes", w.id);
    }
    let mut highlight: HashSet<String> = a.highlight.iter().cloned().collect();
    if highlight.is_empty() {
        let d = q
            .list_diagnoses(pb::ListDiagnosesRequest { window_id: w.id, limit: 1, ..Default::default() })
            .await?
            .into_inner()
            .diagnoses;
        highlight.extend(d.first().and_then(|d| d.top.first()).map(|s| s.function.clone()));
    }
    let mut table = FuncTable::default();
    let mut trees: Vec<(u32, Forest)> = Vec::new();
    for tid in w.tids.iter().copied().filter(|t| a.tid.is_none_or(|want| want == *t)) {
        let t = q.get_afct(pb::GetAfctRequest { window_id: w.id, tid }).await?.into_inner().tree;
        let t = t.with_context(|| format!("window {} has no AFCT for thread {tid}", w.id))?;
        trees.push((tid, Forest::from_proto(&t, &mut table).map_err(anyhow::Error::msg)?));
    }
    if trees.is_empty() {
        bail!("window {} has no thread {}", w.id, a.tid.map(|t| t.to_string()).unwrap_or_default());
    }
    let text = match a.format {
        Format::Dot => trees.iter().map(|(_, f)| export::dot(f, &table, &highlight)).collect::<String>(),
        Format::Svg => trees.iter().map(|(_, f)| export::svg(f, &table, &highlight)).collect::<String>(),
        Format::Chrome => {
            let tracks: Vec<export::Track> =
                trees.iter().map(|(tid, f)| export::Track { pid: w.pid, tid: *tid, forest: f }).collect();
            export::chrome_trace(&tracks, &table, w.start_ns, w.end_ns)
        }
    };
    write_out(&text, &a.out)
}

fn write_out(text: &str, out: &str) -> Result<()> {
    if out == "-" {
        print!("{text}");
    } else {
        let out = PathBuf::from(out);
        std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// The flags of `fddb fct`.
#[derive(clap::Args, Debug)]
pub struct FctArgs {
    /// The FDDB target (e.g. `redis`).
    #[arg(long)]
    pub target: String,
    /// The FCT's hash or a prefix of it (6 hex digits at least), as `fddb export` and
    /// `fddb dataset` print them.
    #[arg(long)]
    pub hash: String,
    /// `dot` or `svg` (an FCT has no timestamps, so no Chrome trace).
    #[arg(long, value_enum, default_value = "dot")]
    pub format: Format,
    /// Functions to mark.
    #[arg(long, value_delimiter = ',')]
    pub highlight: Vec<String>,
    /// Output file; `-` for stdout.
    #[arg(long, default_value = "-")]
    pub out: String,
}

/// Writes one FCT of the FDDB (a full-trace tree of the campaign) in the asked format.
pub fn fct(db: &afetm_fddb::Fddb, a: &FctArgs) -> Result<()> {
    if matches!(a.format, Format::Chrome) {
        bail!("an FCT has no timestamps: export it as dot or svg");
    }
    let tree = db.fct(&a.target, &a.hash)?.with_context(|| format!("no FCT of {} has hash {}", a.target, a.hash))?;
    let mut table = FuncTable::default();
    let forest = Forest::from_proto(&tree, &mut table).map_err(anyhow::Error::msg)?;
    let highlight: HashSet<String> = a.highlight.iter().cloned().collect();
    let text = match a.format {
        Format::Svg => export::svg(&forest, &table, &highlight),
        _ => export::dot(&forest, &table, &highlight),
    };
    write_out(&text, &a.out)
}
