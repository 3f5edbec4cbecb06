//! Builds the kernel programs (ebpf/programs) with the pinned nightly toolchain and bpf-linker,
//! and leaves the object in OUT_DIR for `include_bytes_aligned!`.
use anyhow::Context as _;

/// The nightly that builds the eBPF object (its LLVM must match bpf-linker's). Keep in sync with
/// xtask's setup step and docs/development.md.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest).join("../ebpf/programs");
    let root = root
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", root.display()))?;
    let root = root.to_str().context("eBPF crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weft-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` (installs the pinned \
         nightly with rust-src and bpf-linker 0.10.4), then retry",
    )
}
