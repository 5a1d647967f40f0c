//! Executable mappings of a process (`/proc/<pid>/maps`), to turn a runtime address into a module
//! and the module's virtual address.

use std::{path::PathBuf, sync::Arc};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    /// Path as the process sees it, or a pseudo name like `[vdso]`.
    pub path: Arc<str>,
}

impl Mapping {
    /// Whether `path` names a file (not `[vdso]`, not anonymous).
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/')
    }

    /// Where the agent can read the file from, through the process's root.
    pub fn open_path(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!("/proc/{pid}/root{}", self.path))
    }
}

#[derive(Clone, Debug, Default)]
pub struct ProcMaps {
    maps: Vec<Mapping>,
}

impl ProcMaps {
    pub fn read(pid: u32) -> std::io::Result<ProcMaps> {
        Ok(ProcMaps::parse(&std::fs::read_to_string(format!("/proc/{pid}/maps"))?))
    }

    /// Keeps executable mappings only; malformed lines are skipped.
    pub fn parse(text: &str) -> ProcMaps {
        let mut maps = Vec::new();
        for line in text.lines() {
            let mut it = line.splitn(6, char::is_whitespace);
            let (Some(range), Some(perms), Some(off)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if perms.as_bytes().get(2).is_none_or(|c| *c != b'x') {
                continue;
            }
            let (_dev, _inode) = (it.next(), it.next());
            let path = it.next().map(str::trim).unwrap_or("");
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            let Some((s, e)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end), Ok(offset)) =
                (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16), u64::from_str_radix(off, 16))
            else {
                continue;
            };
            maps.push(Mapping {
                start,
                end,
                offset,
                path: if path.is_empty() { "[anon]".into() } else { path.into() },
            });
        }
        maps.sort_by_key(|m| m.start);
        ProcMaps { maps }
    }

    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.maps.partition_point(|m| m.start <= addr);
        let m = self.maps.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_executable_mappings() {
        let text = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 123 /usr/bin/prog
55d0c0001000-55d0c0005000 r-xp 00001000 08:01 123 /usr/bin/prog
7f0000000000-7f0000020000 r-xp 00028000 08:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
7ffd10000000-7ffd10002000 r-xp 00000000 00:00 0
garbage line
";
        let m = ProcMaps::parse(text);
        let hit = m.find(0x55d0c0001010).unwrap();
        assert_eq!((&*hit.path, hit.offset), ("/usr/bin/prog", 0x1000));
        assert!(m.find(0x55d0c0000010).is_none(), "not executable");
        assert_eq!(&*m.find(0x7ffd00000001).unwrap().path, "[vdso]");
        assert!(!m.find(0x7ffd10000001).unwrap().is_file());
        assert!(m.find(0x1).is_none());
    }
}
