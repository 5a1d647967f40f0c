//! FILE without an LLM (LogSage sec. 3.1.1): DBSCAN over a window's lines and the
//! fault-indicating cluster.
//!
//! A line is a point: its template's embedding (`afetm_logs::embed`) and its time in the
//! window. The distance of two lines is `1 - cos(embeddings) + time_weight * |Δt| / span`.
//! DBSCAN (Ester et al., 1996; `eps`, `min_pts`) groups them; noise lines belong to no
//! cluster. The paper keeps the cluster with the latest timestamp, because a kernel's last
//! words come right before its panic. A server keeps logging after a fault (its clients'
//! errors, its own restart), so here the cluster with the most severe line wins, and the
//! latest only breaks ties; without any cluster, the most severe lines are the region. The
//! region's lines come back in time order. A window is cut to its last [`MAX_LINES`] lines:
//! DBSCAN here is quadratic.

use std::collections::HashMap;

use afetm_logs::{Embedder, Level, LogLine, Templates, embed::cosine};

/// Lines clustered per window (the last ones).
pub const MAX_LINES: usize = 400;

/// DBSCAN's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Neighbourhood radius.
    pub eps: f32,
    /// Points (the line itself included) a core point needs within `eps`.
    pub min_pts: usize,
    /// Weight of the time distance (a window's whole span counts as this much).
    pub time_weight: f32,
}

impl Default for Config {
    fn default() -> Self {
        Config { eps: 0.3, min_pts: 3, time_weight: 0.2 }
    }
}

/// DBSCAN labels of points under `dist`: `Some(cluster)` or `None` for noise.
pub fn dbscan(n: usize, eps: f32, min_pts: usize, dist: impl Fn(usize, usize) -> f32) -> Vec<Option<usize>> {
    let neighbours = |i: usize| -> Vec<usize> { (0..n).filter(|&j| dist(i, j) <= eps).collect() };
    let mut label: Vec<Option<usize>> = vec![None; n];
    let mut visited = vec![false; n];
    let mut clusters = 0;
    for i in 0..n {
        if visited[i] {
            continue;
        }
        visited[i] = true;
        let seeds = neighbours(i);
        if seeds.len() < min_pts {
            continue;
        }
        let c = clusters;
        clusters += 1;
        label[i] = Some(c);
        let mut queue = seeds;
        while let Some(j) = queue.pop() {
            if label[j].is_none() {
                label[j] = Some(c);
            }
            if visited[j] {
                continue;
            }
            visited[j] = true;
            let more = neighbours(j);
            if more.len() >= min_pts {
                queue.extend(more.into_iter().filter(|&k| !visited[k] || label[k].is_none()));
            }
        }
    }
    label
}

/// The fault-indicating region of `lines` (in time order): indices into `lines`, in order.
pub fn extract(lines: &[LogLine], templates: &Templates, embedder: &Embedder, cfg: Config) -> Vec<usize> {
    let from = lines.len().saturating_sub(MAX_LINES);
    let lines = &lines[from..];
    if lines.is_empty() {
        return Vec::new();
    }
    let mut cache: HashMap<u64, Vec<f32>> = HashMap::new();
    let emb: Vec<Vec<f32>> = lines
        .iter()
        .map(|l| {
            let id = templates.learn(&l.message);
            cache.entry(id).or_insert_with(|| embedder.embed(&templates.text(id).unwrap_or_default())).clone()
        })
        .collect();
    let times: Vec<f32> = lines.iter().map(|l| l.unix_ms.unwrap_or(0) as f32).collect();
    let lo = times.iter().cloned().fold(f32::INFINITY, f32::min);
    let span = (times.iter().cloned().fold(f32::NEG_INFINITY, f32::max) - lo).max(1.0);
    let dist =
        |i: usize, j: usize| 1.0 - cosine(&emb[i], &emb[j]) + cfg.time_weight * (times[i] - times[j]).abs() / span;
    let labels = dbscan(lines.len(), cfg.eps, cfg.min_pts, dist);
    // Rank clusters by (most severe line, latest line).
    let mut best: HashMap<usize, (Level, usize)> = HashMap::new();
    for (i, l) in labels.iter().enumerate() {
        if let Some(c) = l {
            let e = best.entry(*c).or_insert((Level::Info, 0));
            *e = (e.0.max(lines[i].level), e.1.max(i));
        }
    }
    let chosen = best.iter().max_by_key(|(c, v)| (**v, std::cmp::Reverse(**c))).map(|(c, _)| *c);
    let top = lines.iter().map(|l| l.level).max().unwrap_or(Level::Info);
    let region: Vec<usize> = match chosen {
        Some(c) if best[&c].0 >= top => (0..lines.len()).filter(|&i| labels[i] == Some(c)).collect(),
        _ => (0..lines.len()).filter(|&i| lines[i].level == top).collect(),
    };
    region.into_iter().map(|i| i + from).collect()
}

#[cfg(test)]
mod tests {
    use afetm_logs::line::lines_of;

    use super::*;

    #[test]
    fn dbscan_finds_two_groups_and_noise() {
        let x = [0.0f32, 0.1, 0.2, 5.0, 5.1, 5.2, 9.0];
        let l = dbscan(x.len(), 0.15, 2, |i, j| (x[i] - x[j]).abs());
        assert_eq!(l, [Some(0), Some(0), Some(0), Some(1), Some(1), Some(1), None]);
    }

    #[test]
    fn extracts_the_failure_among_ordinary_lines() {
        let mut access = String::new();
        for s in 0..40 {
            access.push_str(&format!(
                "127.0.0.1 [29/Nov/2026:01:25:{s:02} +0000] \"GET /shop.php?op=find&id={s} HTTP/1.1\" 200 53 2333\n"
            ));
        }
        let mut php = String::new();
        for s in 30..34 {
            php.push_str(&format!("[29-Nov-2026 01:25:{s} UTC] shop: Connection refused\n"));
        }
        let logs = vec![("nginx-access.log".to_string(), access), ("php-error.log".to_string(), php)];
        let lines = lines_of(&logs);
        let t = Templates::new();
        let e = Embedder::default();
        let got = extract(&lines, &t, &e, Config::default());
        let texts: Vec<&str> = got.iter().map(|&i| lines[i].message.as_str()).collect();
        assert_eq!(texts, ["shop: Connection refused"; 4]);
    }
}
