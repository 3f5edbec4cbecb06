//! The certificate-signing API: a node agent asks for the SVID of a workload; the CA signs only
//! if the caller is the agent of a node that currently runs a workload with that identity.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use weft_api::wire::pb::{
    SignNodeRequest, SignRequest, SignResponse, certificates_server::Certificates,
};

use crate::ca::{Ca, CaError};
use crate::server::{Authenticator, node_spiffe_id, valid_node_name};
use crate::source::StateRx;

/// Default lifetime of node certificates.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(3600);

/// The service.
pub struct CertificateService {
    ca: Arc<Ca>,
    state: StateRx,
    auth: Authenticator,
    trust_domain: String,
    node_ttl: Duration,
}

impl CertificateService {
    /// Workload identities and node certificates are in `auth`'s trust domain.
    pub fn new(ca: Arc<Ca>, state: StateRx, auth: Authenticator) -> Self {
        Self {
            ca,
            state,
            trust_domain: auth.trust_domain().to_string(),
            auth,
            node_ttl: DEFAULT_NODE_TTL,
        }
    }

    /// Lifetime of node certificates (default one hour).
    pub fn with_node_ttl(mut self, ttl: Duration) -> Self {
        self.node_ttl = ttl;
        self
    }
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// `(namespace, service account)` of a SPIFFE ID in `trust_domain`.
pub fn parse_spiffe_id<'a>(id: &'a str, trust_domain: &str) -> Result<(&'a str, &'a str), String> {
    let rest = id.strip_prefix("spiffe://").ok_or_else(|| {
        format!("`{id}` is not a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")
    })?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [td, "ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => {
            if *td != trust_domain {
                return Err(format!(
                    "trust domain `{td}` is not this mesh's (`{trust_domain}`)"
                ));
            }
            Ok((ns, sa))
        }
        _ => Err(format!(
            "`{id}` is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
        )),
    }
}

#[tonic::async_trait]
impl Certificates for CertificateService {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        if self.auth.is_insecure() {
            return Err(Status::failed_precondition(
                "workload certificates are not issued with --insecure-no-auth: without node credentials anyone could obtain any identity",
            ));
        }
        let caller = self.auth.caller_for(&req).await?;
        let node = caller.node;
        let req = req.into_inner();
        let (ns, sa) =
            parse_spiffe_id(&req.identity, &self.trust_domain).map_err(Status::invalid_argument)?;
        if let Some(own) = &caller.only_identity
            && *own != req.identity
        {
            tracing::warn!(waypoint = %own, identity = %req.identity, "refused a waypoint a certificate for another identity");
            return Err(Status::permission_denied(format!(
                "a waypoint's credential obtains only its own certificate ({own}), not {}",
                req.identity
            )));
        }
        if let Some(node) = &node {
            let state = self.state.borrow().clone();
            let runs_it = state
                .workloads
                .values()
                .any(|w| &w.node == node && w.namespace == ns && w.service_account == sa);
            if !runs_it {
                tracing::warn!(%node, identity = %req.identity, "refused a certificate for a workload not on the caller's node");
                return Err(Status::permission_denied(format!(
                    "node {node} runs no workload with identity {}: an agent may only obtain certificates for pods scheduled on its own node",
                    req.identity
                )));
            }
        }
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(req.ttl_seconds)));
        let signed = self
            .ca
            .sign(&req.csr_pem, &req.identity, ttl)
            .map_err(ca_status)?;
        tracing::info!(node = node.as_deref().unwrap_or("?"), identity = %req.identity, not_after = signed.not_after, "issued a workload certificate");
        Ok(Response::new(SignResponse {
            chain_pem: signed.chain_pem,
            trust_bundle_pem: self.ca.trust_bundle().to_vec(),
            not_after: signed.not_after,
        }))
    }

    async fn sign_node(
        &self,
        req: Request<SignNodeRequest>,
    ) -> Result<Response<SignResponse>, Status> {
        if self.auth.is_insecure() {
            return Err(Status::failed_precondition(
                "node certificates are not issued with --insecure-no-auth: without node credentials anyone could obtain any node's certificate",
            ));
        }
        // Only the bearer credential counts here, never a node certificate: a stolen node
        // certificate cannot be renewed once the node's token is revoked.
        let authorised = self.auth.node_for_bearer(req.metadata()).await?;
        let req = req.into_inner();
        if !valid_node_name(&req.node) {
            return Err(Status::invalid_argument(format!(
                "`{}` is not a node name (1 to 253 of a-z A-Z 0-9 . - _; set the agent's --node)",
                req.node
            )));
        }
        if let Some(n) = &authorised
            && *n != req.node
        {
            tracing::warn!(credential_node = %n, requested = %req.node, "refused a node certificate for another node");
            return Err(Status::permission_denied(format!(
                "this credential belongs to node {n}, not {}: an agent may only obtain its own node's certificate",
                req.node
            )));
        }
        let id = node_spiffe_id(&self.trust_domain, &req.node);
        let signed = self
            .ca
            .sign_node(&req.csr_pem, &id, self.node_ttl)
            .map_err(ca_status)?;
        tracing::info!(node = %req.node, not_after = signed.not_after, "issued a node certificate");
        Ok(Response::new(SignResponse {
            chain_pem: signed.chain_pem,
            trust_bundle_pem: self.ca.trust_bundle().to_vec(),
            not_after: signed.not_after,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_parsed_strictly() {
        assert_eq!(
            parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/web", "cluster.local"),
            Ok(("shop", "web"))
        );
        for bad in [
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/shop/web",
        ] {
            assert!(parse_spiffe_id(bad, "cluster.local").is_err(), "{bad}");
        }
        let e = parse_spiffe_id("spiffe://other.td/ns/a/sa/b", "cluster.local").expect_err("td");
        assert!(e.contains("other.td"), "{e}");
    }
}
