//! Where the mesh state comes from. Every source publishes complete, validated snapshots on a
//! watch channel; a source that meets invalid input keeps the last good snapshot and reports
//! the problem.

use std::sync::Arc;

use tokio::sync::watch;
use weft_api::MeshState;

/// The channel every source publishes on.
pub type StateTx = watch::Sender<Arc<MeshState>>;
/// The receiving side (the node-view computation).
pub type StateRx = watch::Receiver<Arc<MeshState>>;

/// A new channel holding an empty state.
pub fn channel() -> (StateTx, StateRx) {
    watch::channel(Arc::new(MeshState::default()))
}
