//! What the shop's servers logged during a run (a campaign run, a live injection): each log
//! file's size before, and afterwards what it grew by.

use std::{
    collections::HashMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

/// Size of every file in the shop's log folder, to read later what a run added.
pub fn log_sizes(dir: &Path) -> HashMap<PathBuf, u64> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| Some((e.path(), e.metadata().ok()?.len()))).collect())
        .unwrap_or_default()
}

/// Lines the servers logged since `before`: what each log file grew by, the last 4 KiB of it,
/// as (file name, text), by file name.
pub fn read_new_logs(dir: &Path, before: &HashMap<PathBuf, u64>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, len) in log_sizes(dir) {
        let from = before.get(&path).copied().unwrap_or(0).min(len);
        if len == from {
            continue;
        }
        let start = from.max(len.saturating_sub(4096));
        let Ok(mut f) = std::fs::File::open(&path) else { continue };
        let mut buf = String::new();
        if f.seek(SeekFrom::Start(start)).is_ok() && f.take(4096).read_to_string(&mut buf).is_ok() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !buf.trim().is_empty() {
                out.push((name, buf));
            }
        }
    }
    out.sort();
    out
}
