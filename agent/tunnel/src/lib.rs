//! The mesh data path's tunnel: workload identities ([`identity`]), the mutual TLS 1.3 layer
//! ([`tls`]) and HBONE, HTTP/2 CONNECT over it ([`hbone`]). See docs/security.md.

pub mod hbone;
pub mod identity;
pub mod tls;

pub use identity::{Identity, IdentityError, IdentityErrorKind, TrustDomain};
pub use tls::{
    Timestamp, TlsError, TrustBundle, VerifyError, certs_from_pem, client_config, identity_of,
    peer_identity, peer_not_after, private_key_from_pem, server_config,
};
