//! FDDB import (`afetm-analyzer fddb import`): `Fddb::import_from` on any lines.
//!
//! What must hold: an import is all or nothing (a refused input leaves the database as it
//! was), and what was imported exports to lines that import into an empty FDDB and export
//! the same again.

use std::path::Path;

use afetm_fddb::Fddb;

fn empty() -> Fddb {
    Fddb::open(Path::new(":memory:")).expect("in-memory FDDB")
}

/// One input: see the module doc.
pub fn run(data: &[u8]) {
    let mut db = empty();
    match db.import_from(data, "fuzz") {
        Ok(_) => {
            let lines = db.export_lines().expect("exporting what was imported");
            let mut again = empty();
            again.import_from(lines.join("\n").as_bytes(), "export").expect("an export imports");
            assert_eq!(again.export_lines().expect("exporting again"), lines, "export -> import -> export differs");
        }
        Err(_) => assert!(db.export_lines().expect("exporting").is_empty(), "a refused import kept lines"),
    }
}
