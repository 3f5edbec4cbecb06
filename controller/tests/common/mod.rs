//! Helpers shared by the controller's integration tests.

use weft_api::{CaptureSettings, WorkloadInfo};

/// A workload of namespace `shop` whose service account is its name.
pub fn workload(name: &str, node: &str, ip: u8) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "shop".into(),
        service_account: name.into(),
        node: node.into(),
        ip4: Some(std::net::Ipv4Addr::new(198, 18, 1, ip)),
        ip6: None,
        netns: "/x".into(),
        labels: Default::default(),
        capture: CaptureSettings::default(),
    }
}

/// A fresh temporary directory (not created), removed on drop.
pub struct Dir(pub std::path::PathBuf);

impl Dir {
    pub fn new(prefix: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
