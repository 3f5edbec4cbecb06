//! No-cluster mode: a directory of YAML files (the same kinds as Kubernetes mode, with
//! `Workload` standing in for Pods). Re-read on change; an invalid file is reported with file
//! name, document index and field path, and the last good state stays in force.

use std::sync::Arc;
use std::time::Duration;

use weft_api::local::LocalConfig;

use crate::source::StateTx;

/// Follows `dir` forever, publishing every valid change on `out`.
pub async fn run(dir: LocalConfig, every: Duration, out: StateTx) {
    let mut last_files = None;
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let files = match dir.read() {
            Ok(f) => f,
            Err(e) => {
                report(&mut last_error, e.to_string());
                continue;
            }
        };
        if last_files.as_ref() == Some(&files) {
            continue;
        }
        match LocalConfig::parse(&files) {
            Ok(state) => {
                tracing::info!(
                    workloads = state.workloads.len(),
                    namespaces = state.namespaces.len(),
                    "configuration applied"
                );
                out.send_replace(Arc::new(state));
                last_error = None;
            }
            Err(e) => report(&mut last_error, e.to_string()),
        }
        last_files = Some(files);
    }
}

fn report(last: &mut Option<String>, msg: String) {
    if last.as_ref() != Some(&msg) {
        tracing::error!(error = %msg, "configuration rejected; keeping the last good state");
    }
    *last = Some(msg);
}
