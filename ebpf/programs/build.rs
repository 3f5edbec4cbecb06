//! Rebuild the kernel programs whenever bpf-linker changes (it is part of the toolchain).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!(
            "cargo:warning=bpf-linker not found ({e}); install it with `cargo xtask setup` \
             (cargo install bpf-linker --version 0.10.4 --locked)"
        ),
    }
}
