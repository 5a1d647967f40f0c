//! Builds `agent-ebpf` for `bpfel-unknown-none` and hands the object to the agent through
//! `OUT_DIR/afetm.bpf.o`.
//!
//! The eBPF crate needs `-Z build-std=core`, which needs a std source tree matching the compiler:
//! Debian's `rustc-web` + `rust-web-src` provide both (rustup's toolchains here have no rust-src),
//! and `bpf-linker` built against LLVM 22 links it. `cargo xtask setup` installs all three; this
//! script only says what is missing. Facts: ../shared/notes/ebpf-toolchain.md.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("AFETM_TOOLS") {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/afetm/tools")
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../agent-ebpf");
    let common = manifest.join("../agent-common");
    println!("cargo:rerun-if-changed={}", ebpf.join("src").display());
    println!("cargo:rerun-if-changed={}", ebpf.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", common.join("src").display());
    println!("cargo:rerun-if-env-changed=AFETM_TOOLS");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let linker_dir = tools_dir().join("bin");
    for (what, path) in [
        ("Debian's cargo (package cargo-web)", PathBuf::from(DEBIAN_CARGO)),
        ("Debian's rustc (package rustc-web)", PathBuf::from(DEBIAN_RUSTC)),
        ("std sources (package rust-web-src)", PathBuf::from("/usr/lib/rustlib/src/rust/library/core")),
        ("bpf-linker", linker_dir.join("bpf-linker")),
    ] {
        if !path.exists() {
            panic!("{what} is missing at {}: run `cargo xtask setup` first", path.display());
        }
    }

    let target_dir = out.join("ebpf-target");
    let path = format!("{}:{}", linker_dir.display(), env::var("PATH").unwrap_or_default());
    let rustflags = ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(&ebpf)
        .args(["build", "--release", "--ignore-rust-version", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's toolchain and flags must not leak into the nested one.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().to_string();
        if key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("PATH", path)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {DEBIAN_CARGO}: {e}"));
    if !status.success() {
        panic!("building agent-ebpf failed ({status}); see the output above");
    }
    let object = target_dir.join("bpfel-unknown-none/release/afetm");
    copy(&object, &out.join("afetm.bpf.o"));
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}
