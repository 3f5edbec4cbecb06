//! Local configuration: a YAML file (or a directory of YAML files) of Namespaces and Workloads.
//! The controller's no-cluster mode reads it (`--config-dir`), and the agent can read it
//! directly instead of streaming from a controller (development, like ztunnel's local config).

use std::path::{Path, PathBuf};

use crate::{MeshState, ModelError, ParseError, parse_documents};

/// Why a configuration could not be used. The previous good state stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source} (check the configuration path)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("invalid configuration:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Model(Vec<ModelError>),
}

/// A file or directory of YAML documents.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    path: PathBuf,
}

impl LocalConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the raw text of every file, in a stable order (for change detection).
    pub fn read(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ConfigError::Read { path, source }
        };
        if self.path.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(&self.path).map_err(err(&self.path))? {
                let entry = entry.map_err(err(&self.path))?;
                let p = entry.path();
                let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
                if yaml && p.is_file() {
                    let text = std::fs::read_to_string(&p).map_err(err(&p))?;
                    files.push((p.display().to_string(), text));
                }
            }
            files.sort();
            Ok(files)
        } else {
            let text = std::fs::read_to_string(&self.path).map_err(err(&self.path))?;
            Ok(vec![(self.path.display().to_string(), text)])
        }
    }

    /// Parses and validates raw files.
    pub fn parse(files: &[(String, String)]) -> Result<MeshState, ConfigError> {
        let mut resources = Vec::new();
        for (name, text) in files {
            resources.extend(parse_documents(text, name)?);
        }
        MeshState::from_resources(&resources).map_err(ConfigError::Model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_names_the_path_and_flag() {
        let e = LocalConfig::new("/nonexistent/weft.yaml")
            .read()
            .expect_err("missing");
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/weft.yaml") && msg.contains("configuration path"),
            "{msg}"
        );
    }

    #[test]
    fn model_errors_are_all_listed() {
        let files = vec![(
            "a.yaml".to_string(),
            r#"
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: a, namespace: x, annotations: {weft.dev/exclude-inbound-ports: "0"}}
spec: {node: n1, ips: [198.18.1.11], netns: /x}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: b, namespace: x}
spec: {node: n1, ips: [198.18.1.12], netns: /y}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: c, namespace: x}
spec: {node: n1, ips: [198.18.1.12], netns: /z}
"#
            .to_string(),
        )];
        let e = LocalConfig::parse(&files).expect_err("invalid");
        let msg = e.to_string();
        assert!(msg.contains("exclude-inbound-ports"), "{msg}");
        assert!(msg.contains("x/b and x/c both claim"), "{msg}");
    }
}
