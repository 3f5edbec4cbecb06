//! Generates the wire types and gRPC stubs from proto/. Uses the `protoc` shipped in the
//! protoc-bin-vendored crate (unless PROTOC is set), so a fresh machine needs nothing installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()
            .map_err(|e| format!("no vendored protoc for this platform ({e}); set PROTOC"))?;
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    tonic_prost_build::configure()
        // Deterministic encoding (content versions are hashes of encoded resources).
        .btree_map(".")
        .compile_protos(&["proto/weft/discovery/v1/discovery.proto"], &["proto"])
        .map_err(|e| format!("protoc failed: {e}").into())
}
