//! Live connections: counted for graceful drain, and, for connections into local workloads,
//! kept with what their authorization was decided on, so a policy change can close the ones it
//! no longer allows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_api::WorkloadInfo;
use weft_api::model::PolicyInfo;

use crate::policy::{self, Source};

/// What an inbound connection was authorized on.
#[derive(Clone, Debug)]
pub struct Subject {
    /// `namespace/name` of the destination workload.
    pub workload: String,
    pub source: Source,
    pub port: u16,
    /// It came through a mutual-TLS tunnel (a plaintext one is closed if the workload turns
    /// `strict`).
    pub mtls: bool,
}

/// Whether a connection is allowed into `workloads` now: the workload is still here, its mTLS
/// mode admits the connection, and the policies allow it.
pub fn allowed(
    s: &Subject,
    policies: &[PolicyInfo],
    workloads: &HashMap<String, WorkloadInfo>,
) -> bool {
    workloads.get(&s.workload).is_some_and(|w| {
        (s.mtls || !w.capture.strict_mtls)
            && policy::evaluate(policies, w, &s.source, s.port).allowed
    })
}

struct Entry {
    subject: Option<Subject>,
    cancel: CancellationToken,
}

/// The registry.
pub struct Connections {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
    count: watch::Sender<usize>,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            count: watch::Sender::new(0),
        }
    }
}

/// A registered connection; deregisters when dropped.
pub struct Registration {
    id: u64,
    pub cancel: CancellationToken,
    registry: Arc<Connections>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = self.registry.lock();
        live.remove(&self.id);
        // Published under the lock, so concurrent changes cannot publish out of order.
        self.registry.count.send_replace(live.len());
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        match self.live.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        }
    }

    /// Registers a connection (with its authorization subject when it enters a local workload).
    pub fn register(self: &Arc<Self>, subject: Option<Subject>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        {
            let mut live = self.lock();
            live.insert(
                id,
                Entry {
                    subject,
                    cancel: cancel.clone(),
                },
            );
            self.count.send_replace(live.len());
        }
        Registration {
            id,
            cancel,
            registry: self.clone(),
        }
    }

    /// Live connections.
    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every live inbound connection the policies (or the workload's mTLS mode) no
    /// longer allow; returns how many. Evaluates outside the registry's lock, so the data path
    /// is not held up while a large registry is checked.
    pub fn enforce(
        &self,
        policies: &[PolicyInfo],
        workloads: &HashMap<String, WorkloadInfo>,
    ) -> usize {
        let live: Vec<(Subject, CancellationToken)> = self
            .lock()
            .values()
            .filter_map(|e| Some((e.subject.clone()?, e.cancel.clone())))
            .collect();
        let mut closed = 0;
        for (s, cancel) in live {
            if !allowed(&s, policies, workloads) && !cancel.is_cancelled() {
                tracing::info!(
                    target: "weft::access",
                    workload = %s.workload,
                    src = %s.source.ip,
                    src_principal = s.source.principal.as_deref().unwrap_or(""),
                    port = s.port,
                    "closing a live connection the current policies deny"
                );
                cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Waits until no connection is live or `deadline` passes; returns the number left.
    pub async fn drained(&self, deadline: Duration) -> usize {
        let mut rx = self.count.subscribe();
        let _ = tokio::time::timeout(deadline, rx.wait_for(|n| *n == 0)).await;
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::model::{PolicyAction, PolicyRuleInfo};

    #[tokio::test]
    async fn denied_connections_are_cancelled_and_drain_completes() {
        let c = Arc::new(Connections::default());
        let w = WorkloadInfo {
            name: "api".into(),
            namespace: "shop".into(),
            service_account: "api".into(),
            node: "n".into(),
            ip4: "198.18.2.11".parse().ok(),
            ip6: None,
            netns: "/x".into(),
            labels: Default::default(),
            capture: Default::default(),
        };
        let workloads: HashMap<String, WorkloadInfo> = [(w.key(), w)].into();
        let subject = Subject {
            workload: "shop/api".into(),
            source: Source {
                namespace: None,
                principal: None,
                ip: "198.18.1.11".parse().expect("ip"),
            },
            port: 80,
            mtls: false,
        };
        let a = c.register(Some(subject));
        let b = c.register(None);
        assert_eq!(c.enforce(&[], &workloads), 0);
        let deny = PolicyInfo {
            name: "deny".into(),
            namespace: "shop".into(),
            selector: None,
            action: PolicyAction::Deny,
            rules: vec![PolicyRuleInfo::default()],
            dry_run: false,
            targets: vec![],
            agent_workloads: None,
        };
        assert_eq!(c.enforce(&[deny], &workloads), 1);
        assert!(a.cancel.is_cancelled() && !b.cancel.is_cancelled());
        // A plaintext connection is closed when its workload turns strict; a tunnelled one
        // is not.
        let mut strict = workloads.clone();
        if let Some(w) = strict.get_mut("shop/api") {
            w.capture.strict_mtls = true;
        }
        let plain = c.register(Some(Subject {
            workload: "shop/api".into(),
            source: Source {
                namespace: None,
                principal: None,
                ip: "198.18.1.12".parse().expect("ip"),
            },
            port: 80,
            mtls: false,
        }));
        let tunnelled = c.register(Some(Subject {
            workload: "shop/api".into(),
            source: Source {
                namespace: Some("shop".into()),
                principal: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
                ip: "198.18.1.11".parse().expect("ip"),
            },
            port: 80,
            mtls: true,
        }));
        assert_eq!(c.enforce(&[], &strict), 1);
        assert!(plain.cancel.is_cancelled() && !tunnelled.cancel.is_cancelled());
        drop((plain, tunnelled));
        assert_eq!(c.len(), 2);
        drop(a);
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.drained(Duration::from_secs(5)).await })
        };
        drop(b);
        assert_eq!(waiter.await.expect("join"), 0);
    }
}
