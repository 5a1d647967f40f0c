//! The SOP library: one TOML file per fault kind (`report/sop/<kind>.toml`: `kind`, `title`,
//! `symptoms`, `checks`, `resolution`), compiled in; [`Library::load_dir`] reads a folder of
//! the same files over them, so an operator can edit the procedures without a rebuild.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use crate::ReportError;

/// One procedure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sop {
    /// The fault kind (`crash`, `deadlock`, `ip+n`, `input`, `output`) or `unknown`.
    pub kind: String,
    /// A short name of the failure.
    pub title: String,
    /// How the failure usually shows.
    pub symptoms: Vec<String>,
    /// What to check to confirm it.
    pub checks: Vec<String>,
    /// What to do.
    pub resolution: Vec<String>,
}

const BUILT_IN: [(&str, &str); 6] = [
    ("crash.toml", include_str!("../sop/crash.toml")),
    ("deadlock.toml", include_str!("../sop/deadlock.toml")),
    ("ip+n.toml", include_str!("../sop/ip+n.toml")),
    ("input.toml", include_str!("../sop/input.toml")),
    ("output.toml", include_str!("../sop/output.toml")),
    ("unknown.toml", include_str!("../sop/unknown.toml")),
];

/// The procedures by kind.
#[derive(Clone, Debug, PartialEq)]
pub struct Library {
    by_kind: BTreeMap<String, Sop>,
}

fn parse(name: &str, text: &str) -> Result<Sop, ReportError> {
    toml::from_str(text).map_err(|e| ReportError::Sop { path: name.to_string(), message: e.to_string() })
}

impl Library {
    /// The procedures shipped in `report/sop/`.
    pub fn built_in() -> Result<Library, ReportError> {
        let mut by_kind = BTreeMap::new();
        for (name, text) in BUILT_IN {
            let s = parse(name, text)?;
            by_kind.insert(s.kind.clone(), s);
        }
        Ok(Library { by_kind })
    }

    /// No procedure (reports then have no resolution steps).
    pub fn empty() -> Library {
        Library { by_kind: BTreeMap::new() }
    }

    /// The built-in procedures with every `*.toml` of `dir` over them.
    pub fn load_dir(dir: &Path) -> Result<Library, ReportError> {
        let mut lib = Library::built_in()?;
        let err = |e: std::io::Error| ReportError::Sop { path: dir.display().to_string(), message: e.to_string() };
        for entry in std::fs::read_dir(dir).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).map_err(err)?;
                let s = parse(&path.display().to_string(), &text)?;
                lib.by_kind.insert(s.kind.clone(), s);
            }
        }
        Ok(lib)
    }

    /// The procedure for `kind`, or the `unknown` one.
    pub fn get(&self, kind: Option<&str>) -> Option<&Sop> {
        kind.and_then(|k| self.by_kind.get(k)).or_else(|| self.by_kind.get("unknown"))
    }
}

#[cfg(test)]
mod tests {
    use afetm_fault::FaultKind;

    use super::*;

    #[test]
    fn every_fault_kind_has_a_procedure_and_a_folder_overrides() {
        let lib = Library::built_in().unwrap();
        for k in FaultKind::ALL {
            let s = lib.get(Some(k.as_str())).unwrap();
            assert_eq!(s.kind, k.as_str());
            assert!(!s.checks.is_empty() && !s.resolution.is_empty());
        }
        assert_eq!(lib.get(None).unwrap().kind, "unknown");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("crash.toml"),
            "kind = \"crash\"\ntitle = \"ours\"\nsymptoms = []\nchecks = [\"a\"]\nresolution = [\"b\"]\n",
        )
        .unwrap();
        let lib = Library::load_dir(dir.path()).unwrap();
        assert_eq!(lib.get(Some("crash")).unwrap().title, "ours");
        std::fs::write(dir.path().join("bad.toml"), "kind = ").unwrap();
        assert!(matches!(Library::load_dir(dir.path()), Err(ReportError::Sop { .. })));
    }
}
