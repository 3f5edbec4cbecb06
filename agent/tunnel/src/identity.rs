//! Workload identities: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is strict: the scheme is exactly `spiffe://` (lowercase), the trust domain uses only
//! the SPIFFE trust-domain characters (`a-z 0-9 . - _`, so no user info, port or upper case),
//! the path is exactly `/ns/<namespace>/sa/<service-account>` with non-empty segments of
//! `A-Z a-z 0-9 . - _` (not `.` or `..`), and there is no query, fragment or trailing slash.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The URI scheme and authority separator every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";
/// Longest trust domain the SPIFFE specification allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID (URI) the SPIFFE specification allows.
const MAX_ID_LEN: usize = 2048;

/// Why a SPIFFE ID or trust domain was rejected. `Display` names the input and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {input:?}: {kind}")]
pub struct IdentityError {
    input: String,
    kind: IdentityErrorKind,
}

impl IdentityError {
    fn new(input: &str, kind: IdentityErrorKind) -> Self {
        Self {
            input: input.to_owned(),
            kind,
        }
    }

    /// The rejected text.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// The rule it broke.
    pub fn kind(&self) -> &IdentityErrorKind {
        &self.kind
    }
}

/// The rule a SPIFFE ID or trust domain broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityErrorKind {
    #[error("it must start with \"spiffe://\" (lowercase)")]
    Scheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "the trust domain contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are \
         allowed (no port, user info or upper case)"
    )]
    TrustDomainChar(char),
    #[error("it is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("it has a query or fragment ('?' or '#'), which SPIFFE IDs must not carry")]
    QueryOrFragment,
    #[error(
        "it has no path; a workload identity is spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    NoPath,
    #[error(
        "the path {0:?} is not /ns/<namespace>/sa/<service-account> (exactly four segments, no \
         trailing slash)"
    )]
    NotWorkloadPath(String),
    #[error("the {0} is empty")]
    EmptySegment(&'static str),
    #[error(
        "the {what} {segment:?} contains {ch:?}; only letters, digits, '.', '-' and '_' are allowed"
    )]
    SegmentChar {
        what: &'static str,
        segment: String,
        ch: char,
    },
    #[error("the {what} must not be {segment:?}")]
    DotSegment { what: &'static str, segment: String },
}

/// A SPIFFE trust domain, such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks `td` (the bare name, without `spiffe://`); `input` is what errors report.
    fn validate(td: &str, input: &str) -> Result<(), IdentityError> {
        if td.is_empty() {
            return Err(IdentityError::new(
                input,
                IdentityErrorKind::EmptyTrustDomain,
            ));
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdentityError::new(
                input,
                IdentityErrorKind::TrustDomainTooLong,
            ));
        }
        if let Some(ch) = td
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdentityError::new(
                input,
                IdentityErrorKind::TrustDomainChar(ch),
            ));
        }
        Ok(())
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;

    /// Parses a bare trust domain name (`cluster.local`, not `spiffe://cluster.local`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::validate(s, s)?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Equality, ordering and hashing are those of the URI text. Cloning is cheap (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    uri: String,
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&self.0.uri).finish()
    }
}

impl Identity {
    /// Builds an identity from its parts, checking each like [`FromStr`] does.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_segment(namespace, "namespace", &uri)?;
        check_segment(service_account, "service account", &uri)?;
        if uri.len() > MAX_ID_LEN {
            return Err(IdentityError::new(&uri, IdentityErrorKind::TooLong));
        }
        Ok(Self(Arc::new(Parts {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            uri,
        })))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The SPIFFE ID as a URI.
    pub fn as_str(&self) -> &str {
        &self.0.uri
    }
}

fn check_segment(segment: &str, what: &'static str, input: &str) -> Result<(), IdentityError> {
    if segment.is_empty() {
        return Err(IdentityError::new(
            input,
            IdentityErrorKind::EmptySegment(what),
        ));
    }
    if segment == "." || segment == ".." {
        return Err(IdentityError::new(
            input,
            IdentityErrorKind::DotSegment {
                what,
                segment: segment.to_owned(),
            },
        ));
    }
    if let Some(ch) = segment
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(IdentityError::new(
            input,
            IdentityErrorKind::SegmentChar {
                what,
                segment: segment.to_owned(),
                ch,
            },
        ));
    }
    Ok(())
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |kind| IdentityError::new(s, kind);
        if s.len() > MAX_ID_LEN {
            return Err(err(IdentityErrorKind::TooLong));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| err(IdentityErrorKind::Scheme))?;
        if rest.contains(['?', '#']) {
            return Err(err(IdentityErrorKind::QueryOrFragment));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::validate(td, s)?;
        if path.is_empty() {
            return Err(err(IdentityErrorKind::NoPath));
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        let (namespace, service_account) = match segments.as_slice() {
            ["ns", ns, "sa", sa] => (*ns, *sa),
            _ => return Err(err(IdentityErrorKind::NotWorkloadPath(path.to_owned()))),
        };
        check_segment(namespace, "namespace", s)?;
        check_segment(service_account, "service account", s)?;
        Ok(Self(Arc::new(Parts {
            uri: s.to_owned(),
            trust_domain: TrustDomain(td.to_owned()),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Identity, IdentityError> {
        s.parse()
    }

    #[test]
    fn identity_parses_a_workload_id() -> Result<(), IdentityError> {
        let id = parse("spiffe://cluster.local/ns/a/sa/web")?;
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "a");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/web");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/a/sa/web");

        let id = parse("spiffe://example_org-1.test/ns/Kube-System/sa/default.v2_x")?;
        assert_eq!(id.trust_domain().as_str(), "example_org-1.test");
        assert_eq!(id.namespace(), "Kube-System");
        assert_eq!(id.service_account(), "default.v2_x");
        Ok(())
    }

    #[test]
    fn identity_new_round_trips_through_display_and_parse() -> Result<(), IdentityError> {
        let td: TrustDomain = "cluster.local".parse()?;
        let id = Identity::new(td.clone(), "shop", "checkout")?;
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
        assert_eq!(parse(id.as_str())?, id);
        assert_eq!(id.trust_domain(), &td);

        assert!(Identity::new(td.clone(), "", "x").is_err());
        assert!(Identity::new(td.clone(), "a/b", "x").is_err());
        assert!(Identity::new(td.clone(), "a", "..").is_err());
        assert!(Identity::new(td, "a", &"x".repeat(MAX_ID_LEN)).is_err());
        Ok(())
    }

    #[test]
    fn identity_rejects_malformed_ids() {
        let long_td = format!("spiffe://{}/ns/a/sa/b", "t".repeat(256));
        let long_id = format!("spiffe://td/ns/a/sa/{}", "b".repeat(MAX_ID_LEN));
        let cases: &[(&str, &str)] = &[
            ("", "spiffe://"),
            ("cluster.local/ns/a/sa/web", "spiffe://"),
            ("SPIFFE://cluster.local/ns/a/sa/web", "spiffe://"),
            ("https://cluster.local/ns/a/sa/web", "spiffe://"),
            ("spiffe:/cluster.local/ns/a/sa/web", "spiffe://"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe:///ns/a/sa/web", "trust domain is empty"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://cluster.local/", "is not /ns/"),
            (
                "spiffe://Cluster.local/ns/a/sa/web",
                "trust domain contains 'C'",
            ),
            (
                "spiffe://cluster.local:8443/ns/a/sa/web",
                "trust domain contains ':'",
            ),
            (
                "spiffe://user@cluster.local/ns/a/sa/web",
                "trust domain contains '@'",
            ),
            ("spiffe://cluster.local/ns/a/sa/web/", "is not /ns/"),
            ("spiffe://cluster.local/ns/a/sa/web/extra", "is not /ns/"),
            ("spiffe://cluster.local/ns/a/sa", "is not /ns/"),
            ("spiffe://cluster.local/ns/a", "is not /ns/"),
            ("spiffe://cluster.local/a/web", "is not /ns/"),
            ("spiffe://cluster.local/sa/web/ns/a", "is not /ns/"),
            ("spiffe://cluster.local/NS/a/sa/web", "is not /ns/"),
            ("spiffe://cluster.local//ns/a/sa/web", "is not /ns/"),
            ("spiffe://cluster.local/ns//sa/web", "namespace is empty"),
            (
                "spiffe://cluster.local/ns/a/sa/",
                "service account is empty",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/web?x=1",
                "query or fragment",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/web#frag",
                "query or fragment",
            ),
            ("spiffe://cluster.local/ns/a/sa/we%62", "contains '%'"),
            ("spiffe://cluster.local/ns/a b/sa/web", "contains ' '"),
            ("spiffe://cluster.local/ns/../sa/web", "must not be \"..\""),
            ("spiffe://cluster.local/ns/a/sa/.", "must not be \".\""),
            (" spiffe://cluster.local/ns/a/sa/web", "spiffe://"),
            ("spiffe://cluster.local/ns/a/sa/web ", "contains ' '"),
            (&long_td, "longer than 255"),
            (&long_id, "longer than 2048"),
        ];
        for (input, want) in cases {
            match parse(input) {
                Ok(id) => panic!("{input:?} was accepted as {id}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{input:?}: {msg:?} lacks {want:?}");
                    assert_eq!(e.input(), *input);
                }
            }
        }
    }

    #[test]
    fn identity_trust_domain_parsing() {
        assert!("cluster.local".parse::<TrustDomain>().is_ok());
        assert!("a-b_c.9".parse::<TrustDomain>().is_ok());
        for bad in ["", "spiffe://cluster.local", "Cluster.local", "td:1", "a/b"] {
            assert!(bad.parse::<TrustDomain>().is_err(), "{bad:?}");
        }
    }
}
