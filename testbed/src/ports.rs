//! Who listens on a TCP port: `/proc/<pid>/net/tcp{,6}` (the listening sockets of that
//! process's network namespace) and `/proc/*/fd` (which process holds a socket inode).
//!
//! A server that fails to bind its port can still look healthy from outside when another
//! process already serves that port (another checkout's shop, say): a connection succeeds and
//! is answered by the other one. `up` therefore checks that the listening socket belongs to the
//! process group it started, and names the holder otherwise. Written by hand: the few lines
//! of `/proc` parsing are smaller than any crate that does it.

use std::{collections::HashSet, fs};

/// Inodes of the sockets listening on `port` in the network namespace of `pid` (`self` for
/// this process's).
pub fn listening_inodes(pid: Option<u32>, port: u16) -> HashSet<u64> {
    let base = pid.map(|p| format!("/proc/{p}/net")).unwrap_or_else(|| "/proc/self/net".into());
    let mut out = HashSet::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("{base}/{file}")) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let port_hex = local.rsplit(':').next().unwrap_or_default();
            if *state == "0A"
                && u16::from_str_radix(port_hex, 16).ok() == Some(port)
                && let Ok(i) = inode.parse()
            {
                out.insert(i);
            }
        }
    }
    out
}

/// Whether process `pid` holds one of the socket `inodes`.
pub fn holds(pid: u32, inodes: &HashSet<u64>) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok())
        .any(|i| inodes.contains(&i))
}

/// Processes holding one of `inodes`, as `name (pid N)`.
pub fn holders(inodes: &HashSet<u64>) -> Vec<String> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| holds(*pid, inodes))
        .map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{} (pid {pid})", comm.trim())
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_as_the_holder_of_its_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let inodes = listening_inodes(None, port);
        assert_eq!(inodes.len(), 1);
        assert!(holds(std::process::id(), &inodes));
        assert!(holders(&inodes).iter().any(|h| h.contains(&format!("pid {}", std::process::id()))));
        drop(l);
        assert!(listening_inodes(None, port).is_empty());
    }
}
