//! The relay decision: may this recipient be accepted from this client?
//!
//! Default deny. Mail to a local domain is inbound and accepted; anything
//! else is relaying and refused unless a rule allows it. Authentication on
//! its own never grants relaying — that is the MS02-011 lesson this crate
//! exists to keep.

use std::fmt;

/// A domain name or a `*.domain` wildcard, stored as lower-case A-labels so
/// that comparison is a plain string comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    Exact(String),
    /// `*.example.test`: every subdomain, not `example.test` itself.
    Subdomains(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("`{0}` is not a valid domain name")]
    InvalidDomain(String),
}

impl DomainPattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let (wild, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name =
            normalize_domain(name).ok_or_else(|| PatternError::InvalidDomain(text.into()))?;
        Ok(if wild {
            DomainPattern::Subdomains(name)
        } else {
            DomainPattern::Exact(name)
        })
    }

    /// `domain` must already be normalised with [`normalize_domain`].
    pub fn matches(&self, domain: &str) -> bool {
        match self {
            DomainPattern::Exact(d) => d == domain,
            DomainPattern::Subdomains(d) => domain
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Subdomains(d) => write!(f, "*.{d}"),
        }
    }
}

/// Lower-case A-label form of a domain, or `None` if it is not a valid
/// host name. IDN U-labels are converted (UTS #46), so `bücher.example`
/// and `xn--bcher-kva.example` are the same domain to every rule.
pub fn normalize_domain(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let ascii = idna::domain_to_ascii_strict(name).ok()?;
    let valid = ascii.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    valid.then_some(ascii)
}

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

/// The relay policy in force. Immutable once built: a reload builds a new
/// one and swaps it in whole.
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

    #[test]
    fn patterns_parse_and_refuse() {
        assert_eq!(
            DomainPattern::parse("Example.TEST").unwrap().to_string(),
            "example.test"
        );
        assert!(DomainPattern::parse("exa mple.test").is_err());
        assert!(DomainPattern::parse("").is_err());
        assert!(DomainPattern::parse("-a.test").is_err());
        assert!(DomainPattern::parse("*.").is_err());
    }
}
