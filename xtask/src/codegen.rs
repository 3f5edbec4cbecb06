//! `cargo xtask codegen [--check]`: files generated from the code and checked into the
//! repository. Today: the CRD manifests, rendered from `weft_controller::crd`. `--check` (CI)
//! writes nothing and fails when a file is missing or differs from what the code generates.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The AuthorizationPolicy CRD, relative to the workspace root.
pub const CRD_FILE: &str = "manifests/crds/authorizationpolicies.weft.dev.yaml";

/// Every generated file: (path relative to the workspace root, contents).
fn generated() -> anyhow::Result<Vec<(&'static str, String)>> {
    let crds = weft_controller::crd::crds_yaml().context("rendering the CRDs")?;
    Ok(vec![(CRD_FILE, crds)])
}

/// The workspace root (xtask lives one directory below it).
fn root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// Writes every generated file, or with `check` only verifies that each is up to date.
pub fn run(check: bool) -> anyhow::Result<()> {
    let root = root();
    let mut stale = Vec::new();
    for (rel, want) in generated()? {
        let path = root.join(rel);
        let have = std::fs::read_to_string(&path).ok();
        if have.as_deref() == Some(want.as_str()) {
            println!("up to date: {rel}");
            continue;
        }
        if check {
            stale.push(rel);
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, want).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {rel}");
    }
    if !stale.is_empty() {
        bail!(
            "generated files are missing or stale: {}; run `cargo xtask codegen` and commit the result",
            stale.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_files_are_up_to_date() {
        run(true).expect("run `cargo xtask codegen`");
    }
}
