//! Generates the prost/tonic code and the descriptor set used for gRPC reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build independent of the host's packages.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("afetm_descriptor.bin"))
        .compile_protos(&["proto/afetm.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/afetm.proto");
    Ok(())
}
