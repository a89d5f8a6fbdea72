//! The local-domains-only check the gateway used before the relay rules
//! existed, kept so the gateway builds while it moves to [`super::Policy`].
//!
//! Default deny: mail to a local domain is accepted, anything else refused.

use super::address::{normalize_domain, DomainPattern, PatternError};

/// What the session knows about a recipient when it asks.
#[derive(Debug, Clone, Copy)]
pub enum RecipientDomain<'a> {
    /// A domain name as the client sent it.
    Name(&'a str),
    /// `user@[192.0.2.1]`: never local, refused unless a rule allows it.
    AddressLiteral(&'a str),
    /// `postmaster` without a domain (RFC 5321 §4.1.1.3): always local.
    Postmaster,
}

/// Why a recipient was accepted or refused; the gateway turns this into a
/// reply, a log line and a metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Inbound mail to a domain we serve.
    AcceptLocal,
    /// Relaying is not allowed for this client and recipient.
    DenyRelay { reason: &'static str },
}

impl Decision {
    pub fn is_accept(&self) -> bool {
        matches!(self, Decision::AcceptLocal)
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::AcceptLocal => "local",
            Decision::DenyRelay { .. } => "relay_denied",
        }
    }
}

/// Local domains only; superseded by [`super::Policy`].
#[derive(Debug, Clone, Default)]
pub struct RelayPolicy {
    local_domains: Vec<DomainPattern>,
}

impl RelayPolicy {
    pub fn new(local_domains: &[String]) -> Result<Self, PatternError> {
        let local_domains = local_domains
            .iter()
            .map(|d| DomainPattern::parse(d))
            .collect::<Result<_, _>>()?;
        Ok(RelayPolicy { local_domains })
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        match normalize_domain(domain.trim_end_matches('.')) {
            Some(d) => self.local_domains.iter().any(|p| p.matches(&d)),
            None => false,
        }
    }

    /// Decides on one recipient.
    pub fn check_recipient(&self, domain: RecipientDomain<'_>) -> Decision {
        match domain {
            RecipientDomain::Postmaster => Decision::AcceptLocal,
            RecipientDomain::Name(d) if self.is_local_domain(d) => Decision::AcceptLocal,
            RecipientDomain::Name(_) => Decision::DenyRelay {
                reason: "recipient domain is not local and no rule allows relaying",
            },
            RecipientDomain::AddressLiteral(_) => Decision::DenyRelay {
                reason: "address literals are never local",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RelayPolicy {
        RelayPolicy::new(&[
            "example.test".into(),
            "*.corp.test".into(),
            "bücher.test".into(),
        ])
        .unwrap()
    }

    #[test]
    fn local_domain_decisions() {
        let p = policy();
        let cases: &[(RecipientDomain, bool)] = &[
            (RecipientDomain::Name("example.test"), true),
            (RecipientDomain::Name("EXAMPLE.Test"), true),
            (RecipientDomain::Name("example.test."), true),
            (RecipientDomain::Name("sub.example.test"), false),
            (RecipientDomain::Name("corp.test"), false),
            (RecipientDomain::Name("a.corp.test"), true),
            (RecipientDomain::Name("a.b.corp.test"), true),
            (RecipientDomain::Name("xcorp.test"), false),
            (RecipientDomain::Name("xn--bcher-kva.test"), true),
            (RecipientDomain::Name("ext.test"), false),
            (RecipientDomain::Name("example.test.ext.test"), false),
            (RecipientDomain::AddressLiteral("127.0.0.1"), false),
            (RecipientDomain::Postmaster, true),
        ];
        for (d, local) in cases {
            assert_eq!(p.check_recipient(*d).is_accept(), *local, "{d:?}");
        }
    }
}
