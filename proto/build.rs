//! Generates the Rust code for every `.proto` under this crate into OUT_DIR,
//! with a descriptor set for gRPC server reflection. protoc comes from
//! `protoc-bin-vendored`, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "aquila/v1/generation.proto",
        "aquila/worker/v1/worker.proto",
        "aquila/admin/v1/admin.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("aquila_descriptor.bin"))
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
