//! Prometheus metrics over HTTP for afetm's daemons (`--metrics-listen`).
//!
//! Each daemon keeps its metrics in a [`prometheus_client`] [`Registry`] (the official Rust
//! client; names get the `_total` suffix and the unit from it, so they follow the Prometheus
//! conventions). This crate only serves that registry: `GET /metrics` answers the OpenMetrics
//! text format, `GET /healthz` answers what the daemon's health function says. The listener is
//! bound before [`serve`] returns, so a bad address or a port in use is an error at start-up,
//! not a log line later.
#![deny(missing_docs)]

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
pub use prometheus_client;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("metrics: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Says whether the daemon is healthy (`Ok`) or why not (`Err`), for `/healthz`.
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    health: Health,
}

/// The registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoding error would be a bug in a metric.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], encode(&s.registry))
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    match (s.health)() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// `/metrics` and `/healthz` as a router, for a daemon that serves other pages too.
pub fn router(registry: Arc<Registry>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(Shared { registry, health })
}

/// Binds `addr` and serves `/metrics` and `/healthz` on the current tokio runtime until the
/// process ends. Returns the bound address (port 0 picks a free one).
pub async fn serve(addr: &str, registry: Arc<Registry>, health: Health) -> Result<SocketAddr, MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr: addr.to_string(), source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let app = router(registry, health);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %local, "serving Prometheus metrics on /metrics");
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_registry_and_health_over_real_http() {
        let mut r = Registry::with_prefix("afetm_test");
        let c = Counter::<u64>::default();
        r.register("things", "Things seen", c.clone());
        c.inc_by(41);
        c.inc();
        let sick = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = sick.clone();
        let health: Health = Arc::new(move || {
            if s2.load(std::sync::atomic::Ordering::Relaxed) { Err("database unusable".into()) } else { Ok(()) }
        });
        let addr = serve("127.0.0.1:0", Arc::new(r), health).await.unwrap();
        let body = get(addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("application/openmetrics-text"), "{body}");
        assert!(body.contains("# TYPE afetm_test_things counter"), "{body}");
        assert!(body.contains("afetm_test_things_total 42"), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        sick.store(true, std::sync::atomic::Ordering::Relaxed);
        let h = get(addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 503") && h.contains("database unusable"), "{h}");
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_at_start() {
        let held = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let health: Health = Arc::new(|| Ok(()));
        let err = serve(&addr, Arc::new(Registry::default()), health).await.unwrap_err();
        assert!(err.to_string().contains(&addr), "{err}");
    }
}
