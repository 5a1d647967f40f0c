//! Reading a daemon's Prometheus endpoint (`--metrics-listen`) from tests, the soak and the
//! benchmarks: one plain HTTP/1.0 GET over loopback, no client crate needed for that.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// `GET path` from `addr`: the status line and the body.
pub fn get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let (status, _, body) = get_with(addr, path, &[])?;
    Ok((status, body))
}

/// `GET path` from `addr` with extra request `headers`: the status line, the response's
/// header lines, and the body.
pub fn get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(String, Vec<String>, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines().map(str::to_string);
    let status = lines.next().unwrap_or_default();
    Ok((status, lines.collect(), body.to_string()))
}

/// The body of `GET /metrics` from `addr`; an error unless the answer is 200.
pub fn scrape(addr: &str) -> std::io::Result<String> {
    let (status, body) = get(addr, "/metrics")?;
    if !status.contains(" 200") {
        return Err(std::io::Error::other(format!("GET http://{addr}/metrics: {status}")));
    }
    Ok(body)
}

/// The value of one sample, `name` with its labels as exposed (`afetm_agent_events_total`,
/// `afetm_analyzer_batches_total{result="applied"}`).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}
