//! Workload certificates held by the agent on behalf of its pods.
//!
//! The agent generates an ECDSA P-256 key per identity (it never leaves the node), sends a CSR
//! to the controller's CA, and caches the result per identity. Certificates are fetched on
//! demand, renewed at half-life (with jitter, so a node's certificates do not all renew at
//! once), and retried with backoff while the CA is unreachable; a certificate keeps being
//! served until it expires. When the mesh's trust bundle changes (a root rotation), every held
//! certificate is renewed within seconds instead of at half-life
//! ([`CertManager::renew_all_soon`]). Time is measured with tokio's clock, so tests can pause it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, SanType};
use serde::Serialize;
use tokio::time::Instant;
use weft_api::wire::pb::{self, certificates_client::CertificatesClient};

use crate::discovery::{Connection, ControllerOptions};

/// Why a certificate could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("cannot create a key or CSR for {identity}: {detail}")]
    Csr { identity: String, detail: String },
    #[error("the CA refused a certificate for {identity}: {detail}")]
    Refused { identity: String, detail: String },
    #[error("the CA is unreachable ({detail}); no valid certificate for {identity}")]
    Unavailable { identity: String, detail: String },
    #[error("the CA answered for {identity} with an unusable certificate: {detail}")]
    BadResponse { identity: String, detail: String },
    #[error("the controller does not issue {identity}: {detail}")]
    Unsupported { identity: String, detail: String },
}

/// A certificate and its private key.
#[derive(Clone)]
pub struct Certified {
    pub identity: String,
    /// Leaf first (PEM).
    pub chain_pem: Vec<String>,
    /// PKCS#8 PEM; never leaves the agent.
    pub key_pem: String,
    pub trust_bundle_pem: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
    issued: Instant,
    expires: Instant,
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Certified {
    /// Whether the certificate is still valid (tokio clock).
    pub fn valid(&self) -> bool {
        Instant::now() < self.expires
    }

    /// When to renew: half-life, shifted by `jitter` (a fraction in [-0.1, 0.1] of the
    /// lifetime).
    fn renew_at(&self, jitter: f64) -> Instant {
        let lifetime = self.expires.saturating_duration_since(self.issued);
        let half = lifetime.mul_f64((0.5 + jitter).clamp(0.1, 0.9));
        self.issued + half
    }
}

/// The CA as the agent sees it (a trait so tests can use a fake, as ztunnel's `CaClient`).
#[tonic::async_trait]
pub trait CaClient: Send + Sync + 'static {
    async fn sign(&self, identity: &str, csr_pem: &str) -> Result<pb::SignResponse, CertError>;
}

/// `spiffe://<trust-domain>/weft/node/<node>`: the identity of a node certificate.
pub fn node_spiffe_id(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/weft/node/{node}")
}

/// The controller's Certificates gRPC service, for workload certificates: over mutual TLS with
/// the node certificate (or the bearer credential when there is none).
pub struct GrpcCaClient {
    opts: ControllerOptions,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

impl GrpcCaClient {
    pub fn new(opts: ControllerOptions) -> Self {
        Self {
            opts,
            conn: tokio::sync::Mutex::new(None),
        }
    }
}

#[tonic::async_trait]
impl CaClient for GrpcCaClient {
    async fn sign(&self, identity: &str, csr_pem: &str) -> Result<pb::SignResponse, CertError> {
        let unavailable = |detail: String| CertError::Unavailable {
            identity: identity.to_string(),
            detail,
        };
        let Connection { channel, auth, .. } = {
            let mut conn = self.conn.lock().await;
            // A renewed (or dropped) node certificate: reconnect with the current one.
            let current = self
                .opts
                .node_identity
                .as_ref()
                .and_then(|n| n.certs.current(&n.id));
            if let Some(c) = conn.as_ref() {
                let same = match (&c.node_cert, &current) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                if !same {
                    *conn = None;
                }
            }
            if conn.is_none() {
                *conn = Some(
                    crate::discovery::connect(&self.opts)
                        .await
                        .map_err(|e| unavailable(e.to_string()))?,
                );
            }
            conn.clone()
                .ok_or_else(|| unavailable("no connection".into()))?
        };
        let mut req = tonic::Request::new(pb::SignRequest {
            identity: identity.to_string(),
            csr_pem: csr_pem.to_string(),
            ttl_seconds: 0,
        });
        if let Some(v) = auth {
            req.metadata_mut().insert("authorization", v);
        }
        match CertificatesClient::new(channel).sign(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    *self.conn.lock().await = None;
                    Err(unavailable(s.to_string()))
                } else {
                    Err(CertError::Refused {
                        identity: identity.to_string(),
                        detail: s.message().to_string(),
                    })
                }
            }
        }
    }
}

/// The controller's Certificates gRPC service, for this node's own certificate: SignNode,
/// authenticated by the bearer credential (bootstrap or service-account token) over TLS.
pub struct NodeCaClient {
    opts: ControllerOptions,
}

impl NodeCaClient {
    /// `opts.token_file` is the credential exchanged; `opts.node_identity` is not used.
    pub fn new(mut opts: ControllerOptions) -> Self {
        opts.node_identity = None;
        Self { opts }
    }
}

#[tonic::async_trait]
impl CaClient for NodeCaClient {
    async fn sign(&self, identity: &str, csr_pem: &str) -> Result<pb::SignResponse, CertError> {
        let Connection { channel, auth, .. } = crate::discovery::connect_with(&self.opts, None)
            .await
            .map_err(|e| CertError::Unavailable {
                identity: identity.to_string(),
                detail: e.to_string(),
            })?;
        let mut req = tonic::Request::new(pb::SignNodeRequest {
            node: self.opts.node.clone(),
            csr_pem: csr_pem.to_string(),
        });
        if let Some(v) = auth {
            req.metadata_mut().insert("authorization", v);
        }
        match CertificatesClient::new(channel).sign_node(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                let (identity, detail) = (identity.to_string(), s.message().to_string());
                Err(match s.code() {
                    // An older controller, or one run with --insecure-no-auth.
                    tonic::Code::Unimplemented | tonic::Code::FailedPrecondition => {
                        CertError::Unsupported { identity, detail }
                    }
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                        CertError::Unavailable { identity, detail }
                    }
                    _ => CertError::Refused { identity, detail },
                })
            }
        }
    }
}

/// What `/config_dump` shows per certificate.
#[derive(Clone, Debug, Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub not_after: i64,
    pub valid: bool,
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Slot {
    cert: Option<Arc<Certified>>,
    renewing: bool,
    last_error: Option<String>,
    /// The renewal task, aborted when the identity is no longer needed on this node.
    task: Option<tokio::task::AbortHandle>,
    /// Serialises first fetches of this identity, so concurrent callers share one CSR.
    fetching: Arc<tokio::sync::Mutex<()>>,
    /// An early renewal asked for (trust bundle change): renew at this time instead of at
    /// half-life.
    early: Option<Instant>,
    /// Wakes the renewal task when `early` is set.
    wake: Arc<tokio::sync::Notify>,
}

/// Why a renewal happens (the `reason` of the log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    HalfLife,
    TrustBundle,
}

/// Certificates by identity.
pub struct CertManager {
    ca: Arc<dyn CaClient>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Where certificates and keys are kept across agent restarts (0600 files), so an agent
    /// restarted during a CA outage still serves its pods until their certificates expire.
    store: Option<crate::certstore::CertStore>,
}

const RETRY_MIN: Duration = Duration::from_secs(1);
/// `last_error` placeholder while a first fetch is under way.
const IN_FLIGHT: &str = "requesting";
const RETRY_MAX: Duration = Duration::from_secs(60);

impl CertManager {
    pub fn new(ca: Arc<dyn CaClient>) -> Arc<Self> {
        Self::with_store(ca, None)
    }

    /// A manager that keeps certificates in `store` and starts with the valid ones found there.
    pub fn with_store(
        ca: Arc<dyn CaClient>,
        store: Option<crate::certstore::CertStore>,
    ) -> Arc<Self> {
        let mut slots = HashMap::new();
        if let Some(store) = &store {
            for p in store.load() {
                let now_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let remaining = p.not_after - now_unix;
                if remaining <= 0 {
                    store.remove(&p.identity);
                    continue;
                }
                let issued = Instant::now();
                metrics::gauge!("weft_certificate_expiry_timestamp_seconds", "identity" => p.identity.clone())
                    .set(p.not_after as f64);
                tracing::info!(identity = %p.identity, not_after = p.not_after, "certificate restored from the state directory");
                slots.insert(
                    p.identity.clone(),
                    Slot {
                        cert: Some(Arc::new(Certified {
                            identity: p.identity,
                            chain_pem: p.chain_pem,
                            key_pem: p.key_pem,
                            trust_bundle_pem: p.trust_bundle_pem,
                            not_after: p.not_after,
                            issued,
                            expires: issued + Duration::from_secs(remaining as u64),
                        })),
                        ..Default::default()
                    },
                );
            }
        }
        Arc::new(Self {
            ca,
            slots: Mutex::new(slots),
            store,
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn cached(&self, identity: &str) -> Option<Arc<Certified>> {
        self.slots()
            .get(identity)
            .and_then(|s| s.cert.clone())
            .filter(|c| c.valid())
    }

    /// The current valid certificate of `identity`, if any (never fetches).
    pub fn current(&self, identity: &str) -> Option<Arc<Certified>> {
        self.cached(identity)
    }

    /// Drops `identity`'s certificate and stops renewing it; the next [`CertManager::get`]
    /// obtains a new one.
    pub fn forget(&self, identity: &str) {
        if let Some(mut slot) = self.slots().remove(identity)
            && let Some(t) = slot.task.take()
        {
            t.abort();
        }
    }

    /// The certificate for `identity`: cached, or fetched now (and then kept renewed).
    pub async fn get(self: &Arc<Self>, identity: &str) -> Result<Arc<Certified>, CertError> {
        if let Some(c) = self.cached(identity) {
            return Ok(c);
        }
        let lock = self
            .slots()
            .entry(identity.to_string())
            .or_default()
            .fetching
            .clone();
        let _one = lock.lock().await;
        if let Some(c) = self.cached(identity) {
            return Ok(c);
        }
        let result = fetch(self.ca.as_ref(), identity).await;
        let cert = self.store(identity, result)?;
        self.keep_renewed(identity);
        Ok(cert)
    }

    /// Starts the renewal task of `identity` unless it runs already.
    fn keep_renewed(self: &Arc<Self>, identity: &str) {
        let start_renewal = {
            let mut slots = self.slots();
            let slot = slots.entry(identity.to_string()).or_default();
            !std::mem::replace(&mut slot.renewing, true)
        };
        if start_renewal {
            let me = self.clone();
            let id = identity.to_string();
            let handle = tokio::spawn(async move { me.renew_forever(id).await }).abort_handle();
            if let Some(slot) = self.slots().get_mut(identity) {
                slot.task = Some(handle);
            }
        }
    }

    fn store(
        &self,
        identity: &str,
        result: Result<Certified, CertError>,
    ) -> Result<Arc<Certified>, CertError> {
        let mut slots = self.slots();
        let slot = slots.entry(identity.to_string()).or_default();
        match result {
            Ok(c) => {
                let c = Arc::new(c);
                if let Some(store) = &self.store {
                    store.save(&c);
                }
                metrics::gauge!("weft_certificate_expiry_timestamp_seconds", "identity" => identity.to_string())
                    .set(c.not_after as f64);
                slot.cert = Some(c.clone());
                slot.last_error = None;
                Ok(c)
            }
            Err(e) => {
                slot.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// The current certificate of `identity` (even expired), and the renewal task's wake-up.
    fn renewal_state(&self, identity: &str) -> Option<(Arc<Certified>, Arc<tokio::sync::Notify>)> {
        let slots = self.slots();
        let slot = slots.get(identity)?;
        Some((slot.cert.clone()?, slot.wake.clone()))
    }

    /// An early renewal due now (taken, so it happens once), if any.
    fn take_early(&self, identity: &str) -> Option<Instant> {
        let mut slots = self.slots();
        let slot = slots.get_mut(identity)?;
        match slot.early {
            Some(at) if at <= Instant::now() => slot.early.take(),
            _ => None,
        }
    }

    fn early(&self, identity: &str) -> Option<Instant> {
        self.slots().get(identity).and_then(|s| s.early)
    }

    async fn renew_forever(self: Arc<Self>, identity: String) {
        loop {
            let Some((current, wake)) = self.renewal_state(&identity) else {
                return;
            };
            let jitter = (rand::random::<f64>() - 0.5) * 0.2;
            let due = current.renew_at(jitter);
            // Until half-life, or an earlier renewal asked for in the meantime.
            let reason = loop {
                let at = self.early(&identity).map_or(due, |e| e.min(due));
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => continue,
                }
                if self.take_early(&identity).is_some() {
                    break Reason::TrustBundle;
                }
                if Instant::now() >= due {
                    break Reason::HalfLife;
                }
            };
            self.renew_now(&identity, &current, &wake, reason).await;
        }
    }

    /// Renews `identity` until it succeeds (retrying with backoff); `current` stays in use
    /// meanwhile.
    async fn renew_now(
        &self,
        identity: &str,
        current: &Certified,
        wake: &tokio::sync::Notify,
        mut reason: Reason,
    ) {
        let mut retry = RETRY_MIN;
        loop {
            let result = fetch(self.ca.as_ref(), identity).await;
            let outcome = if result.is_ok() { "ok" } else { "error" };
            metrics::counter!("weft_certificate_renewals_total", "result" => outcome).increment(1);
            if reason == Reason::TrustBundle {
                metrics::counter!("weft_certificate_trust_bundle_renewals_total", "result" => outcome)
                    .increment(1);
            }
            match result {
                Ok(c) => {
                    tracing::info!(%identity, not_after = c.not_after, reason = ?reason, "certificate renewed");
                    let _ = self.store(identity, Ok(c));
                    return;
                }
                Err(e) => {
                    let still_valid = current.valid();
                    tracing::warn!(%identity, error = %e, still_valid, retry_in_s = retry.as_secs(), reason = ?reason, "certificate renewal failed; the current certificate stays in use until it expires");
                    let _ = self.store(identity, Err(e));
                    // A trust bundle change during the backoff: one early retry (the CA may
                    // have been replaced by a reachable one), then the backoff goes on.
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = wake.notified() => {
                            // A stale wake-up (no early renewal pending) keeps the backoff.
                            match self.early(identity) {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => tokio::time::sleep(retry).await,
                            }
                            if self.take_early(identity).is_some() {
                                reason = Reason::TrustBundle;
                            }
                        }
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Renews every certificate this manager keeps renewed `settle` from now plus a random
    /// delay up to `spread` (so a node's identities do not all reach the CA at once), instead
    /// of at half-life: after a trust bundle change, so that certificates issued by a new CA
    /// are in use within seconds. Current certificates stay in use until their successors
    /// arrive; failures retry with the usual backoff. Returns how many certificates are to be
    /// renewed.
    pub fn renew_all_soon(&self, settle: Duration, spread: Duration) -> usize {
        let now = Instant::now() + settle;
        let mut n = 0;
        for (identity, slot) in self.slots().iter_mut() {
            // Only certificates under renewal: a first fetch under way asks the current CA.
            if !slot.renewing || slot.cert.is_none() {
                continue;
            }
            let at = now + spread.mul_f64(rand::random::<f64>());
            slot.early = Some(slot.early.map_or(at, |e| e.min(at)));
            slot.wake.notify_one();
            tracing::debug!(%identity, in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64, "early renewal scheduled");
            n += 1;
        }
        n
    }

    /// Makes sure every identity in `identities` has (or is getting) a certificate, and drops
    /// (stops renewing) every other one; failures are retried on the next call. Returns
    /// immediately.
    pub fn ensure(self: &Arc<Self>, identities: impl IntoIterator<Item = String>) {
        let wanted: std::collections::HashSet<String> = identities.into_iter().collect();
        self.slots().retain(|id, slot| {
            let keep = wanted.contains(id);
            if !keep {
                if let Some(t) = slot.task.take() {
                    t.abort();
                }
                if let Some(store) = &self.store {
                    store.remove(id);
                }
                tracing::info!(identity = %id, "certificate no longer needed on this node");
            }
            keep
        });
        for id in wanted {
            if self.cached(&id).is_some() {
                // Restored from the state directory: keep it renewed.
                self.keep_renewed(&id);
                continue;
            }
            {
                let mut slots = self.slots();
                let slot = slots.entry(id.clone()).or_default();
                if slot.renewing || slot.last_error.as_deref() == Some(IN_FLIGHT) {
                    continue;
                }
                slot.last_error = Some(IN_FLIGHT.into());
            }
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.get(&id).await {
                    tracing::warn!(identity = %id, error = %e, "cannot obtain a workload certificate; will retry");
                }
            });
        }
    }

    /// Every certificate, for `/config_dump`.
    pub fn status(&self) -> Vec<CertStatus> {
        let mut v: Vec<CertStatus> = self
            .slots()
            .iter()
            .map(|(id, s)| CertStatus {
                identity: id.clone(),
                not_after: s.cert.as_ref().map_or(0, |c| c.not_after),
                valid: s.cert.as_ref().is_some_and(|c| c.valid()),
                last_error: s.last_error.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }
}

/// New key, CSR, signature.
async fn fetch(ca: &dyn CaClient, identity: &str) -> Result<Certified, CertError> {
    let csr_err = |detail: String| CertError::Csr {
        identity: identity.to_string(),
        detail,
    };
    let key = KeyPair::generate().map_err(|e| csr_err(e.to_string()))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| csr_err(e.to_string()))?;
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| csr_err(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| csr_err(e.to_string()))?;
    let issued = Instant::now();
    let resp = ca.sign(identity, &csr).await?;
    if resp.chain_pem.is_empty() {
        return Err(CertError::BadResponse {
            identity: identity.to_string(),
            detail: "empty certificate chain".into(),
        });
    }
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let remaining = resp.not_after - now_unix;
    if remaining <= 0 {
        return Err(CertError::BadResponse {
            identity: identity.to_string(),
            detail: format!("already expired (not_after {})", resp.not_after),
        });
    }
    Ok(Certified {
        identity: identity.to_string(),
        chain_pem: resp.chain_pem,
        key_pem: key.serialize_pem(),
        trust_bundle_pem: resp.trust_bundle_pem,
        not_after: resp.not_after,
        issued,
        expires: issued + Duration::from_secs(remaining as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A CA that issues `ttl`-long certificates (no real crypto: the manager only tracks
    /// lifetimes), can be switched off, and counts requests.
    struct FakeCa {
        ttl: Duration,
        up: AtomicBool,
        calls: AtomicUsize,
    }

    #[tonic::async_trait]
    impl CaClient for FakeCa {
        async fn sign(&self, identity: &str, csr_pem: &str) -> Result<pb::SignResponse, CertError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert!(csr_pem.contains("CERTIFICATE REQUEST"));
            // A real CA takes a while: concurrent callers overlap.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if !self.up.load(Ordering::SeqCst) {
                return Err(CertError::Unavailable {
                    identity: identity.into(),
                    detail: "connection refused".into(),
                });
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            Ok(pb::SignResponse {
                chain_pem: vec!["leaf".into()],
                trust_bundle_pem: vec!["root".into()],
                not_after: now + self.ttl.as_secs() as i64,
            })
        }
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn fake(ttl_s: u64) -> Arc<FakeCa> {
        Arc::new(FakeCa {
            ttl: Duration::from_secs(ttl_s),
            up: AtomicBool::new(true),
            calls: AtomicUsize::new(0),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn identity_certificates_are_fetched_once_and_cached() {
        let ca = fake(3600);
        let m = CertManager::new(ca.clone());
        let (a, b) = tokio::join!(m.get(ID), m.get(ID));
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(
            ca.calls.load(Ordering::SeqCst),
            1,
            "concurrent callers share one CSR"
        );
        assert!(a.expect("cert").key_pem.contains("PRIVATE KEY"));
    }

    #[tokio::test(start_paused = true)]
    async fn identity_renewal_happens_at_half_life() {
        let ca = fake(3600);
        let m = CertManager::new(ca.clone());
        m.get(ID).await.expect("first");
        // Before 40% of the lifetime (half-life minus the largest jitter): no renewal.
        tokio::time::sleep(Duration::from_secs(1430)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        // By 60% (half-life plus the largest jitter): renewed exactly once.
        tokio::time::sleep(Duration::from_secs(740)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn identity_certificates_survive_a_ca_outage_until_expiry() {
        let ca = fake(3600);
        let m = CertManager::new(ca.clone());
        let first = m.get(ID).await.expect("first");
        ca.up.store(false, Ordering::SeqCst);
        // Past half-life the renewal fails and is retried, but the certificate is still served.
        tokio::time::sleep(Duration::from_secs(3000)).await;
        assert!(
            ca.calls.load(Ordering::SeqCst) > 2,
            "renewal retried with backoff"
        );
        let still = m.get(ID).await.expect("still valid");
        assert_eq!(still.not_after, first.not_after);
        assert!(
            m.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("unreachable"))
        );
        // After expiry there is no certificate to serve, with a clear reason.
        tokio::time::sleep(Duration::from_secs(700)).await;
        let e = m.get(ID).await.expect_err("expired and CA down");
        assert!(e.to_string().contains("unreachable"), "{e}");
        // The CA comes back: the next retry (at most a minute later) restores service.
        ca.up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(61)).await;
        // Recovered by the renewal loop itself, without anyone asking.
        let s = &m.status()[0];
        assert!(s.valid && s.last_error.is_none(), "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn identity_certificates_no_longer_needed_stop_renewing() {
        let ca = fake(3600);
        let m = CertManager::new(ca.clone());
        m.ensure([ID.to_string()]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(m.status().len(), 1);
        m.ensure(Vec::<String>::new());
        assert!(m.status().is_empty());
        tokio::time::sleep(Duration::from_secs(7200)).await;
        assert_eq!(
            ca.calls.load(Ordering::SeqCst),
            1,
            "no renewal for a dropped identity"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn identity_forgotten_node_certificate_is_obtained_again() {
        let ca = fake(3600);
        let m = CertManager::new(ca.clone());
        let id = node_spiffe_id("cluster.local", "n1");
        assert_eq!(id, "spiffe://cluster.local/weft/node/n1");
        let first = m.get(&id).await.expect("first");
        assert!(m.current(&id).is_some_and(|c| Arc::ptr_eq(&c, &first)));
        m.forget(&id);
        assert!(m.current(&id).is_none());
        let again = m.get(&id).await.expect("again");
        assert!(!Arc::ptr_eq(&first, &again), "a new key and certificate");
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
        // The forgotten certificate's renewal stopped: only the new one renews.
        tokio::time::sleep(Duration::from_secs(2200)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn identity_trust_bundle_change_renews_every_certificate_promptly() {
        let ca = fake(3600);
        let m = CertManager::new(ca.clone());
        assert_eq!(
            m.renew_all_soon(Duration::ZERO, Duration::from_secs(1)),
            0,
            "nothing held, nothing to renew"
        );
        const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
        let web = m.get(ID).await.expect("web");
        let api = m.get(API).await.expect("api");
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            m.renew_all_soon(Duration::from_secs(2), Duration::from_secs(1)),
            2
        );
        // Before the settle delay: nothing asked yet, the old certificates are served.
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
        assert!(m.current(ID).is_some_and(|c| Arc::ptr_eq(&c, &web)));
        // Within settle + spread: both renewed once, with new keys.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 4);
        let web2 = m.current(ID).expect("renewed web");
        assert!(!Arc::ptr_eq(&web2, &web));
        assert_ne!(web2.key_pem, web.key_pem, "a new key");
        assert!(m.current(API).is_some_and(|c| !Arc::ptr_eq(&c, &api)));
        // Half-life now counts from the new certificates (40% of an hour after ~3 s).
        tokio::time::sleep(Duration::from_secs(1400)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 4);
        tokio::time::sleep(Duration::from_secs(800)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn identity_trust_bundle_renewal_keeps_the_old_certificate_while_the_ca_fails() {
        let ca = fake(3600);
        let m = CertManager::new(ca.clone());
        let first = m.get(ID).await.expect("first");
        ca.up.store(false, Ordering::SeqCst);
        // No spread: the early renewal is due at once (a random spread would let the first
        // backoff retry land inside the window too).
        assert_eq!(m.renew_all_soon(Duration::ZERO, Duration::ZERO), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2, "asked promptly");
        assert!(m.current(ID).is_some_and(|c| Arc::ptr_eq(&c, &first)));
        assert!(
            m.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("unreachable"))
        );
        // The usual backoff (1 s, then 2 s) brings the new certificate once the CA is back.
        ca.up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s = &m.status()[0];
        assert!(s.valid && s.last_error.is_none(), "{s:?}");
        assert!(m.current(ID).is_some_and(|c| !Arc::ptr_eq(&c, &first)));
        assert_eq!(ca.calls.load(Ordering::SeqCst), 3);
    }
}
