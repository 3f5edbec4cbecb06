//! Generates the wire types and gRPC stubs from proto/ (needs `protoc`: `cargo xtask setup`
//! installs Debian's protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Deterministic encoding (content versions are hashes of encoded resources).
        .btree_map(".")
        .compile_protos(&["proto/weft/discovery/v1/discovery.proto"], &["proto"])
        .map_err(|e| format!("protoc failed: {e} (install it with `cargo xtask setup`)").into())
}
