//! Compiles the .proto files with protox (pure Rust, no system `protoc`),
//! generates tonic clients and servers, canonical-JSON serde impls (pbjson)
//! for torchwire.v1, and a file descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["torchwire/v1/inference.proto", "keda/externalscaler.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(files, ["."])?;
    let descriptor_path = out.join("descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_fds(descriptors)?;

    let set = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".torchwire.v1"])?;
    Ok(())
}
