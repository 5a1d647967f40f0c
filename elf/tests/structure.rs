//! Structure of the calltree test program, whose calls are known from its source.
use std::{path::PathBuf, process::Command};

use afetm_elf::{structure::analyze, symbols::Module};

fn build(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("calltree");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testbed/progs/calltree.c");
    let ok = Command::new("gcc")
        .args(["-O1", "-g", "-fno-inline", "-fno-optimize-sibling-calls", "-pthread", "-o"])
        .arg(&out)
        .arg(src)
        .status()
        .expect("gcc")
        .success();
    assert!(ok);
    out
}

#[test]
fn calls_blocks_plt_and_indirect_calls_of_calltree() {
    let dir = tempfile::tempdir().unwrap();
    let m = Module::load(&build(dir.path())).unwrap();
    let s = analyze(&m);
    let idx = |name: &str| s.functions.iter().position(|f| f.name == name).unwrap_or_else(|| panic!("{name} missing"));
    let owner = |block: u32| {
        let f = s.functions.iter().find(|f| block >= f.first_block && block < f.first_block + f.blocks).unwrap();
        f.name.clone()
    };
    let callers = |name: &str| -> Vec<String> {
        let mut v: Vec<String> = s.covers[idx(name)].iter().map(|b| owner(*b)).collect();
        v.sort();
        v.dedup();
        v
    };
    // From the source: leaf is called by chain3, op_add and fib; chain3 by chain2 and op_mul.
    assert_eq!(callers("leaf"), vec!["chain3", "fib", "op_add"]);
    assert_eq!(callers("chain3"), vec!["chain2", "op_mul"]);
    assert_eq!(callers("fib"), vec!["fib", "run_main", "worker_round"]);
    // op_add and op_mul are only reached through the function pointer table.
    assert!(s.covers[idx("op_add")].is_empty() && s.covers[idx("op_mul")].is_empty());
    assert!(s.counts.indirect_calls >= 1, "dispatch calls through a pointer: {:?}", s.counts);
    // pthread_create and friends come through the PLT.
    let imports: Vec<&str> = s.imports.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["pthread_create", "pthread_join", "clock_gettime"] {
        assert!(imports.contains(&want), "{want} not among PLT calls {imports:?}");
    }
    // fib branches (n < 2): more than one block; leaf is straight-line.
    assert!(s.functions[idx("fib")].blocks >= 2);
    assert_eq!(s.functions[idx("leaf")].blocks, 1);
    assert_eq!(s.counts.blocks, s.functions.iter().map(|f| f.blocks as usize).sum::<usize>());
    assert!(s.covers.iter().flatten().all(|b| (*b as usize) < s.blocks));
}
