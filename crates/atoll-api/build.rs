//! Generates the config-stream and registry protocol code. `protoc` comes from the PROTOC that
//! `.cargo/config.toml` sets (see `tools/protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Resource JSON is shared by every stream: `Bytes` clones without copying.
        .bytes(".atoll.config.v1.Resource.json")
        .compile_protos(&["proto/config.proto", "proto/registry.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/config.proto");
    println!("cargo:rerun-if-changed=proto/registry.proto");
    Ok(())
}
