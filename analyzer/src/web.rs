//! The analyzer's web view (`serve --http-listen`): server-rendered pages, no JavaScript.
//!
//! - `/`: agents with their plans, and the latest windows with their verdicts;
//! - `/window/{id}`: a window's diagnosis: the verdict, the top-k suspects with their
//!   probabilities, the diagnosed thread's AFCT drawn as SVG (paper colors, the top suspect
//!   outlined), and the report (symptoms, causes, resolution) when one can be built;
//! - `/window/{id}/afct.dot` and `/window/{id}/trace.json`: the exports of
//!   `afetm_calltree::export`.
//!
//! Pages are built with `maud` (compile-time checked HTML, escaped by default) from the same
//! calls the gRPC Query service answers, so the view shows exactly what the CLI shows.
use std::{collections::HashSet, sync::Arc};

use afetm_auth::{Service, Tokens};
use afetm_calltree::{
    export,
    tree::{Forest, FuncTable},
};
use afetm_proto::{self as pb, query_server::Query};
use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, header},
    middleware,
    response::{Html, IntoResponse, Response},
    routing::get,
};
use base64::Engine as _;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use tonic::Request;

use crate::service::Analyzer;

/// Windows listed on the index page.
const LATEST: u32 = 50;

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.error{color:#b00;font-weight:bold}\
.ok{color:#070}.afct-box{border:1px solid #ddd;max-height:60em;overflow:auto}\
.legend span{display:inline-block;padding:0 .5em;border:1px solid #333;margin-right:.5em}";

/// The view's routes over `analyzer`; with `tokens` (the analyzer's `--tokens`), every page
/// needs a `read` or `control` token (see [`gate`]).
pub fn router(analyzer: Analyzer, tokens: Option<Arc<Tokens>>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/window/{id}", get(window))
        .route("/window/{id}/afct.dot", get(afct_dot))
        .route("/window/{id}/trace.json", get(trace_json))
        .layer(middleware::from_fn_with_state(tokens, gate))
        .with_state(analyzer)
}

/// The token a request carries: `Authorization: Bearer TOKEN`, or HTTP Basic with the token as
/// the password (what a browser sends after asking; the user name is ignored).
fn token_of(req: &axum::extract::Request) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.trim().to_string());
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.strip_prefix("Basic ")?.trim()).ok()?;
    let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_string())
}

/// Admits a request when no tokens are configured, or when it carries a token whose role may
/// call Query (`read`, `control`): the view shows what Query answers, nothing more.
async fn gate(
    State(tokens): State<Option<Arc<Tokens>>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let Some(tokens) = tokens else { return next.run(req).await };
    match token_of(&req).and_then(|t| tokens.role(&t)) {
        Some(role) if role.covers(Service::Query) => next.run(req).await,
        Some(role) => failed(StatusCode::FORBIDDEN, "not allowed", format!("a {role:?} token may not read the view")),
        None => {
            let mut r = failed(StatusCode::UNAUTHORIZED, "token needed", "this analyzer needs a read token");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"afetm\""));
            r
        }
    }
}

fn page(title: &str, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html {
                head { meta charset="utf-8"; title { (title) " · afetm" } style { (PreEscaped(STYLE)) } }
                body { p { a href="/" { "afetm" } } (body) }
            }
        }
        .into_string(),
    )
}

fn failed(code: StatusCode, what: &str, e: impl std::fmt::Display) -> Response {
    (code, page(what, html! { h1 { (what) } p.error { (e.to_string()) } })).into_response()
}

fn internal(e: tonic::Status) -> Response {
    let code =
        if e.code() == tonic::Code::NotFound { StatusCode::NOT_FOUND } else { StatusCode::INTERNAL_SERVER_ERROR };
    failed(code, "afetm", e.message())
}

async fn index(State(a): State<Analyzer>) -> Response {
    let agents = match a.list_agents(Request::new(pb::ListAgentsRequest::default())).await {
        Ok(r) => r.into_inner().agents,
        Err(e) => return internal(e),
    };
    let req = pb::ListWindowsRequest { latest: LATEST, ..Default::default() };
    let mut windows = match a.list_windows(Request::new(req)).await {
        Ok(r) => r.into_inner().windows,
        Err(e) => return internal(e),
    };
    windows.reverse();
    let req = pb::ListDiagnosesRequest { limit: 1000, ..Default::default() };
    let diagnoses = a.list_diagnoses(Request::new(req)).await.map(|r| r.into_inner().diagnoses).unwrap_or_default();
    let verdict = |id: u64| diagnoses.iter().find(|d| d.window_id == id);
    page(
        "agents and windows",
        html! {
            h1 { "Agents" }
            table {
                tr { th { "agent" } th { "instance" } th { "host" } th { "target" } th { "connected" } th { "events" } th { "kernel drops" } th { "queue drops" } th { "plan" } }
                @for ag in &agents {
                    tr {
                        td { (ag.agent_id) } td { (format!("{:x}", ag.instance)) } td { (ag.hostname) } td { (ag.target) }
                        td { (if ag.connected { "yes" } else { "no" }) } td { (ag.events) } td { (ag.kernel_drops) } td { (ag.queue_drops) }
                        td {
                            @if let Some(p) = &ag.last_plan {
                                (format!("v{}: {} functions", p.version, p.points.len()))
                                @if !p.demoted.is_empty() { (format!(", {} demoted", p.demoted.len())) }
                                @if !p.unprobeable.is_empty() { (format!(", {} unprobeable", p.unprobeable.len())) }
                            } @else { "-" }
                        }
                    }
                }
            }
            h1 { "Latest windows" }
            table {
                tr { th { "window" } th { "agent" } th { "pid" } th { "events" } th { "closed" } th { "verdict" } th { "top suspect" } }
                @for w in &windows {
                    tr {
                        td { a href=(format!("/window/{}", w.id)) { (w.id) } }
                        td { (w.agent_id) } td { (w.pid) } td { (w.events) } td { (if w.closed { "yes" } else { "open" }) }
                        @match verdict(w.id) {
                            Some(d) => {
                                td class=(if d.error { "error" } else { "ok" }) { (if d.error { "error" } else { "normal" }) (format!(" (P(normal) {:.2})", d.p_normal)) }
                                td { @if let Some(s) = d.top.first() { (format!("{} / {}", s.function, s.kind)) } }
                            }
                            None => { td { "-" } td {} }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

/// A window, its diagnosis (if any) and the thread to draw (the diagnosed one).
async fn window_parts(a: &Analyzer, id: u64) -> Result<(pb::WindowInfo, Option<pb::Diagnosis>), Response> {
    let req = pb::ListWindowsRequest { window_id: id, ..Default::default() };
    let windows = a.list_windows(Request::new(req)).await.map_err(internal)?;
    let Some(w) = windows.into_inner().windows.into_iter().next() else {
        return Err(failed(StatusCode::NOT_FOUND, "no such window", format!("window {id} is not stored")));
    };
    let req = pb::ListDiagnosesRequest { window_id: id, limit: 1, ..Default::default() };
    let d = a.list_diagnoses(Request::new(req)).await.map_err(internal)?.into_inner().diagnoses.into_iter().next();
    Ok((w, d))
}

async fn forest(a: &Analyzer, window: u64, tid: u32, table: &mut FuncTable) -> Result<Forest, Response> {
    let r = a.get_afct(Request::new(pb::GetAfctRequest { window_id: window, tid })).await.map_err(internal)?;
    let tree = r.into_inner().tree.unwrap_or_default();
    Forest::from_proto(&tree, table).map_err(|e| failed(StatusCode::INTERNAL_SERVER_ERROR, "bad tree", e))
}

fn drawn_tid(w: &pb::WindowInfo, d: Option<&pb::Diagnosis>) -> Option<u32> {
    d.map(|d| d.tid).filter(|t| w.tids.contains(t)).or_else(|| w.tids.first().copied())
}

async fn window(State(a): State<Analyzer>, Path(id): Path<u64>) -> Response {
    let (w, d) = match window_parts(&a, id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut table = FuncTable::default();
    let suspect: HashSet<String> = d.iter().flat_map(|d| d.top.first()).map(|s| s.function.clone()).collect();
    let drawn = match (w.closed, drawn_tid(&w, d.as_ref())) {
        (true, Some(tid)) => match forest(&a, id, tid, &mut table).await {
            Ok(f) => Some((tid, export::svg(&f, &table, &suspect), f.len())),
            Err(r) => return r,
        },
        _ => None,
    };
    let report = match &d {
        Some(_) => {
            a.report(Request::new(pb::ReportRequest { window_id: id, similar: 3 })).await.map(|r| r.into_inner())
        }
        None => Err(tonic::Status::not_found("no diagnosis")),
    };
    page(
        &format!("window {id}"),
        html! {
            h1 { "Window " (id) }
            p { "agent " (w.agent_id) ", pid " (w.pid) ", " (w.events) " events, threads " (format!("{:?}", w.tids)) ", agent clock " (w.start_ns) " to " (w.end_ns) " ns" }
            @match &d {
                Some(d) => {
                    h2 #verdict class=(if d.error { "error" } else { "ok" }) {
                        (if d.error { "Error" } else { "Normal" }) (format!(" - P(normal) {:.3}", d.p_normal))
                    }
                    p { "model " (d.model) ", thread " (d.tid) " of " (d.threads) ", diagnosed " (d.latency_us / 1000) " ms after the window closed"
                        @if d.stale { ", " strong { "stale model" } " (trained under another plan)" } }
                    h2 { "Suspects" }
                    table #suspects {
                        tr { th { "#" } th { "function" } th { "fault" } th { "probability" } }
                        @for (i, s) in d.top.iter().enumerate() {
                            tr { td { (i + 1) } td.function { (s.function) } td.kind { (s.kind) } td.probability { (format!("{:.3}", s.probability)) } }
                        }
                    }
                }
                None => { p { "Not diagnosed (no model for this agent's target, or the window is open)." } }
            }
            @if let Some((tid, svg, nodes)) = &drawn {
                h2 { "AFCT of thread " (tid) " (" (nodes) " nodes)" }
                p.legend { span style="background:#fff" { "white: traced" } span style="background:#9ecae1" { "blue: caller or stack frame" } span style="background:#fc9272" { "red: found by coloring" } span style="border:3px solid crimson" { "top suspect" } }
                div.afct-box { (PreEscaped(svg)) }
                p { a href=(format!("/window/{id}/afct.dot")) { "DOT" } " · " a href=(format!("/window/{id}/trace.json")) { "Chrome trace (ui.perfetto.dev)" } }
            }
            @match &report {
                Ok(r) => {
                    h2 #report { "Report: " (r.title) }
                    h3 { "Symptoms" } ul { @for s in &r.symptoms { li { (s) } } }
                    h3 { "Root causes" } ol { @for c in &r.causes { li { strong { (c.function) " / " (c.kind) } (format!(" (confidence {:.2}): ", c.confidence)) (c.evidence) } } }
                    @if !r.resolution.is_empty() { h3 { "Resolution (" (r.sop) ")" } ol { @for s in &r.resolution { li { (s) } } } }
                }
                Err(e) => { @if d.is_some() { p { "No report: " (e.message()) } } }
            }
        },
    )
    .into_response()
}

async fn afct_dot(State(a): State<Analyzer>, Path(id): Path<u64>) -> Response {
    let (w, d) = match window_parts(&a, id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(tid) = drawn_tid(&w, d.as_ref()) else {
        return failed(StatusCode::NOT_FOUND, "no AFCT", "the window has no thread");
    };
    let mut table = FuncTable::default();
    let f = match forest(&a, id, tid, &mut table).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let suspect: HashSet<String> = d.iter().flat_map(|d| d.top.first()).map(|s| s.function.clone()).collect();
    ([(header::CONTENT_TYPE, "text/vnd.graphviz; charset=utf-8")], export::dot(&f, &table, &suspect)).into_response()
}

async fn trace_json(State(a): State<Analyzer>, Path(id): Path<u64>) -> Response {
    let (w, _) = match window_parts(&a, id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut table = FuncTable::default();
    let mut forests = Vec::new();
    for tid in &w.tids {
        match forest(&a, id, *tid, &mut table).await {
            Ok(f) => forests.push((*tid, f)),
            Err(r) => return r,
        }
    }
    let tracks: Vec<export::Track> =
        forests.iter().map(|(tid, f)| export::Track { pid: w.pid, tid: *tid, forest: f }).collect();
    ([(header::CONTENT_TYPE, "application/json")], export::chrome_trace(&tracks, &table, w.start_ns, w.end_ns))
        .into_response()
}

/// Binds `addr` and serves the view on the current runtime; returns the bound address.
pub async fn serve(
    addr: &str,
    analyzer: Analyzer,
    tokens: Option<Arc<Tokens>>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(analyzer, tokens);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "web view stopped");
        }
    });
    tracing::info!(addr = %local, "web view on http://{local}/");
    Ok(local)
}
