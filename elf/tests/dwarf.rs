//! Signatures read from the DWARF of programs whose sources say what they must be, at -O0 and
//! -O2 (where out-of-line copies refer to abstract origins), and none without debug info.
use std::{path::Path, process::Command};

use afetm_elf::{
    dwarf::{Signature, ValueClass::*, signatures},
    symbols::Module,
};

const SRC: &str = r#"
#include <stdlib.h>
struct pair { long a, b, c; };
__attribute__((noinline)) long f(long a, double d, char *p) { return a + (long)d + (p ? *p : 0); }
__attribute__((noinline)) void g(int x) { if (x == 42) abort(); }
__attribute__((noinline)) double h(struct pair s, long k) { return (double)(s.a + s.b + s.c + k); }
__attribute__((noinline)) static unsigned char u(unsigned char c, const char *const *v) { return c + (v != 0); }
int main(int argc, char **argv) {
    struct pair s = {1, 2, 3};
    g(argc);
    return (int)(f(argc, 1.5, argv[0]) + h(s, 2) + u((unsigned char)argc, (const char *const *)argv));
}
"#;

fn build(dir: &Path, opt: &str, debug: bool) -> std::path::PathBuf {
    let src = dir.join("sig.c");
    std::fs::write(&src, SRC).unwrap();
    let out = dir.join(format!("sig{opt}{debug}"));
    let mut c = Command::new("gcc");
    c.arg(opt);
    if debug {
        c.arg("-g");
    }
    assert!(c.arg("-o").arg(&out).arg(&src).status().unwrap().success());
    out
}

fn by_name(path: &Path) -> std::collections::HashMap<String, Signature> {
    let m = Module::load(path).unwrap();
    let sigs = signatures(path).unwrap();
    m.functions().iter().filter_map(|f| sigs.get(&f.start).map(|s| (f.name.to_string(), s.clone()))).collect()
}

#[test]
fn parameters_and_return_types_from_dwarf() {
    let dir = tempfile::tempdir().unwrap();
    for opt in ["-O0", "-O2"] {
        let s = by_name(&build(dir.path(), opt, true));
        assert_eq!(s["f"].params, vec![Integer, Float, Integer], "{opt}");
        assert_eq!(s["f"].returns, Some(Integer), "{opt}");
        assert_eq!(s["f"].register_params(), vec![(0, 0), (2, 1)], "{opt}: rdi and rsi; the double goes in xmm0");
        assert_eq!((s["g"].params.clone(), s["g"].returns), (vec![Integer], None), "{opt}: void g(int)");
        assert_eq!(s["h"].params, vec![Other, Integer], "{opt}: a struct by value");
        assert_eq!(s["h"].returns, Some(Float), "{opt}");
        assert!(s["h"].register_params().is_empty(), "{opt}: after a struct, registers are unknown");
        let u = s
            .iter()
            .find(|(n, _)| n.starts_with("u"))
            .unwrap_or_else(|| panic!("{opt}: u missing from {:?}", s.keys().collect::<Vec<_>>()))
            .1;
        assert_eq!(u.params, vec![Integer, Integer], "{opt}: typedef/const chains resolve");
        assert_eq!(s["main"].params, vec![Integer, Integer], "{opt}");
    }
    let stripped = build(dir.path(), "-O2", false);
    assert!(signatures(&stripped).unwrap().is_empty(), "no debug info, no signatures");
}
