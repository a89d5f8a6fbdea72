//! Envelope addresses in the one form every rule compares.
//!
//! The classic open-relay tricks all work the same way: the gateway decides
//! on one reading of an address and the MTA behind it acts on another. A
//! local-looking address whose local part routes elsewhere
//! (`user%ext.test@corp.test`, `ext.test!user@corp.test`,
//! `"user@ext.test"@corp.test`), a domain that differs from a local one only
//! in case, a trailing dot or a look-alike character, an IP address without
//! brackets: each must be decided on what it will finally do. So this module
//! parses exactly the RFC 5321 §4.1.2 grammar, refuses anything outside it
//! rather than guessing, and hands the policy a canonical form — lower-case
//! A-label domains, unquoted local parts, IP literals as addresses — together
//! with every host the local part would route through.
//!
//! It never rewrites what is forwarded: the gateway forwards the path as the
//! client sent it, and only if the canonical form was allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use unicode_security::{RestrictionLevel, RestrictionLevelDetection};

/// RFC 5321 §4.5.3.1 limits, in octets. Public, with the grammar helpers
/// below, for the gateway's command parser: both layers must agree on what
/// an address is.
pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;
/// The whole path without its angle brackets (256 with them).
pub const MAX_PATH: usize = 254;
/// RFC 1035 §2.3.4.
const MAX_LABEL: usize = 63;
/// A quoted local part may hold a whole address, which may hold another:
/// nesting this deep is an attack, not mail.
const MAX_NESTING: usize = 4;

/// Which command an address came from: the reply codes differ (5.1.7 for a
/// bad sender, 5.1.3 for a bad recipient) and only RCPT may name a bare
/// `postmaster` (RFC 5321 §4.1.1.3), only MAIL the null path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Recipient,
}

/// Why an address was refused before any rule was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not RFC 5321 syntax. Answered 501.
    #[error("{0}")]
    Syntax(&'static str),
    /// A non-ASCII local part needs SMTPUTF8, which the gateway does not
    /// offer. Answered 553 5.6.7.
    #[error("non-ASCII local part (SMTPUTF8 is not offered)")]
    NonAsciiLocalPart,
    /// An internationalised domain that is invalid, not in normalised form,
    /// or mixes scripts in a way that makes it a look-alike. Answered 553.
    #[error("{0}")]
    Idn(&'static str),
    /// The local part of an address at a local domain names further hops
    /// (`%`, `!`, a quoted `@`) that cannot be parsed. A relay attempt that
    /// cannot be read is refused, not guessed at. Answered 553.
    #[error("cannot parse the routing in the local part: {0}")]
    Routing(&'static str),
}

impl AddressError {
    /// The basic reply code.
    pub fn code(&self) -> u16 {
        match self {
            AddressError::Syntax(_) => 501,
            _ => 553,
        }
    }

    /// RFC 3463 enhanced status code.
    pub fn enhanced(&self, role: Role) -> (u8, u16, u16) {
        match (self, role) {
            (AddressError::NonAsciiLocalPart, _) => (5, 6, 7),
            (AddressError::Routing(_), _) => (5, 7, 1),
            (_, Role::Sender) => (5, 1, 7),
            (_, Role::Recipient) => (5, 1, 3),
        }
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            AddressError::Syntax(_) => "syntax",
            AddressError::NonAsciiLocalPart => "non_ascii",
            AddressError::Idn(_) => "idn",
            AddressError::Routing(_) => "routing",
        }
    }
}

use AddressError::{Idn, Syntax};

/// The part after `@`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// Lower-case A-labels, no trailing dot.
    Name(String),
    /// `[192.0.2.1]` or `[IPv6:2001:db8::1]`. IPv4-mapped IPv6 literals are
    /// stored as IPv4 so one rule covers both spellings.
    Literal(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Literal(IpAddr::V4(a)) => write!(f, "[{a}]"),
            Host::Literal(IpAddr::V6(a)) => write!(f, "[IPv6:{a}]"),
        }
    }
}

/// `local-part@domain` in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Unquoted and unescaped, case kept (it is shown in replies).
    pub local: String,
    pub host: Host,
}

impl Mailbox {
    /// The form sender binding compares: local part folded to lower case.
    ///
    /// RFC 5321 lets a receiving host treat local parts case-sensitively, but
    /// the directories a principal's addresses come from (AD `mail`,
    /// `proxyAddresses`) do not, and Postfix's sender-login maps fold case
    /// too. Folding can only make two spellings of one mailbox equal.
    pub fn key(&self) -> String {
        format!("{}@{}", self.local.to_ascii_lowercase(), self.host)
    }

    /// The hosts beyond this one that the local part would route through, or
    /// `None` when it routes nowhere.
    ///
    /// `user%b%c` (percent hack: `c` is the next hop, `b` the final),
    /// `a!b!user` (bang path, UUCP) and a quoted local part holding a whole
    /// address are all read. Whether any MTA behind us would honour them does
    /// not matter: an address at a local domain that names other hosts is a
    /// relay attempt and must be decided as one.
    pub fn routing(&self) -> Result<Option<Vec<Host>>, AddressError> {
        routing_of(&self.local, 0)
    }
}

fn routing_of(local: &str, depth: usize) -> Result<Option<Vec<Host>>, AddressError> {
    if !local.contains(['%', '!', '@']) {
        return Ok(None);
    }
    if depth >= MAX_NESTING {
        return Err(AddressError::Routing("nested too deeply"));
    }
    let err = AddressError::Routing;
    let mut hops = Vec::new();
    if local.contains('@') {
        // A whole address inside quotes; it may carry a source route and
        // route further itself.
        let inner = parse_path_inner(local, Role::Sender, depth + 1)
            .map_err(|_| err("a quoted `@` that does not make an address"))?;
        let Path::Mailbox { mailbox, route } = inner else {
            return Err(err("a quoted `@` that does not make an address"));
        };
        hops.push(mailbox.host.clone());
        hops.extend(route);
        if let Some(more) = routing_of(&mailbox.local, depth + 1)? {
            hops.extend(more);
        }
        return Ok(Some(hops));
    }
    // `a!b!user%c%d`: hosts before the last `!`, then hosts after the
    // first `%` of what remains.
    let mut bang: Vec<&str> = local.split('!').collect();
    let last = bang.pop().unwrap_or_default();
    let mut percent = last.split('%');
    let user = percent.next().unwrap_or_default();
    if user.is_empty() {
        return Err(err("no user before the routing"));
    }
    let mut after: Vec<&str> = percent.collect();
    after.reverse();
    for host in bang.into_iter().chain(after) {
        if host.is_empty() {
            return Err(err("an empty host"));
        }
        hops.push(parse_host(host).map_err(|_| err("a host that is not a domain"))?);
    }
    Ok(Some(hops))
}

impl fmt::Display for Mailbox {
    /// Re-quotes the local part if it is not a dot-string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local) {
            f.write_str(&self.local)?;
        } else {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        write!(f, "@{}", self.host)
    }
}

/// A reverse- or forward-path, canonicalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// `MAIL FROM:<>`.
    Null,
    /// `RCPT TO:<postmaster>` without a domain.
    Postmaster,
    Mailbox {
        mailbox: Mailbox,
        /// The obsolete source route (`@a,@b:`), validated but ignored as
        /// RFC 5321 §3.3 says: the decision is on the final mailbox.
        route: Vec<Host>,
    },
}

impl Path {
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            Path::Mailbox { mailbox, .. } => Some(mailbox),
            _ => None,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Null => f.write_str("<>"),
            Path::Postmaster => f.write_str("<postmaster>"),
            Path::Mailbox { mailbox, .. } => write!(f, "<{mailbox}>"),
        }
    }
}

/// Parses the text between `<` and `>` as the client sent it.
pub fn parse_path(raw: &str, role: Role) -> Result<Path, AddressError> {
    parse_path_inner(raw, role, 0)
}

fn parse_path_inner(raw: &str, role: Role, depth: usize) -> Result<Path, AddressError> {
    if raw.len() > MAX_PATH {
        return Err(Syntax("path too long"));
    }
    if raw.is_empty() {
        return match role {
            Role::Sender => Ok(Path::Null),
            Role::Recipient => Err(Syntax("null forward-path")),
        };
    }
    if raw.chars().any(char::is_control) {
        return Err(Syntax("control character in address"));
    }
    if role == Role::Recipient && depth == 0 && raw.eq_ignore_ascii_case("postmaster") {
        return Ok(Path::Postmaster);
    }
    let (route, rest) = split_source_route(raw)?;
    let mailbox = parse_mailbox(rest)?;
    Ok(Path::Mailbox { mailbox, route })
}

/// Splits `@a,@b:rest` into its hosts and `rest`.
fn split_source_route(s: &str) -> Result<(Vec<Host>, &str), AddressError> {
    let mut route = Vec::new();
    if !s.starts_with('@') {
        return Ok((route, s));
    }
    let mut rest = s;
    loop {
        let Some(after_at) = rest.strip_prefix('@') else {
            return Err(Syntax("bad source route"));
        };
        // An IPv6 literal contains ':', so a literal runs to its ']'.
        let end = if after_at.starts_with('[') {
            match after_at.find(']') {
                Some(j) => j + 1,
                None => return Err(Syntax("bad source route")),
            }
        } else {
            after_at.find([',', ':']).unwrap_or(after_at.len())
        };
        let (host, tail) = after_at.split_at(end);
        if host.is_empty() {
            return Err(Syntax("empty host in source route"));
        }
        route.push(parse_host(host)?);
        if let Some(next) = tail.strip_prefix(',') {
            rest = next;
        } else if let Some(mailbox) = tail.strip_prefix(':') {
            return Ok((route, mailbox));
        } else {
            return Err(Syntax("bad source route"));
        }
    }
}

fn parse_mailbox(s: &str) -> Result<Mailbox, AddressError> {
    let (local, rest) = if s.starts_with('"') {
        let end = quoted_string_end(s)?;
        let (quoted, rest) = s.split_at(end);
        (unquote(quoted), rest)
    } else {
        let at = s.find('@').ok_or(Syntax("missing domain"))?;
        let local = &s[..at];
        if local.is_empty() {
            return Err(Syntax("missing local part"));
        }
        if !local.is_ascii() {
            return Err(AddressError::NonAsciiLocalPart);
        }
        if !is_dot_string(local) {
            return Err(Syntax("bad local part"));
        }
        (local.to_owned(), &s[at..])
    };
    let domain = match rest.strip_prefix('@') {
        Some(d) => d,
        None if rest.is_empty() => return Err(Syntax("missing domain")),
        None => return Err(Syntax("text after the quoted local part")),
    };
    if local.is_empty() {
        return Err(Syntax("empty local part"));
    }
    if s.len() - rest.len() > MAX_LOCAL_PART {
        return Err(Syntax("local part too long"));
    }
    if domain.is_empty() {
        return Err(Syntax("missing domain"));
    }
    if domain.contains('@') {
        // `user@ext.test@corp.test`: two parsers, two answers. Refuse.
        return Err(Syntax("more than one '@'"));
    }
    Ok(Mailbox {
        local,
        host: parse_host(domain)?,
    })
}

/// Index just past the closing quote of the quoted string starting `s`
/// (RFC 5321 §4.1.2 `Quoted-string`, kept as sent).
pub fn quoted_string_end(s: &str) -> Result<usize, AddressError> {
    let b = s.as_bytes();
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'"' => return Ok(i + 1),
            // quoted-pairSMTP = "\" %d32-126
            b'\\' => match b.get(i + 1) {
                Some(32..=126) => i += 2,
                Some(128..) => return Err(AddressError::NonAsciiLocalPart),
                _ => return Err(Syntax("bad quoted local part")),
            },
            // qtextSMTP = %d32-33 / %d35-91 / %d93-126
            32..=126 => i += 1,
            128.. => return Err(AddressError::NonAsciiLocalPart),
            _ => return Err(Syntax("bad quoted local part")),
        }
    }
    Err(Syntax("unterminated quoted local part"))
}

/// The content of a (validated) quoted string without quotes and escapes.
fn unquote(quoted: &str) -> String {
    let inner = &quoted[1..quoted.len() - 1];
    let mut out = String::with_capacity(inner.len());
    let mut escaped = false;
    for c in inner.chars() {
        if escaped || c != '\\' {
            out.push(c);
            escaped = false;
        } else {
            escaped = true;
        }
    }
    out
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// `Dot-string = Atom *("." Atom)`: no empty atoms, so no leading, trailing
/// or doubled dots.
pub fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

/// Parses a domain or an address literal.
pub fn parse_host(s: &str) -> Result<Host, AddressError> {
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(Syntax("bad address literal"))?;
        return parse_literal(inner).map(Host::Literal);
    }
    canonical_domain(s).map(Host::Name)
}

/// Parses the text inside the brackets of an address literal
/// (`192.0.2.1`, `IPv6:2001:db8::1`); general literals (`tag:text`) are
/// refused.
pub fn parse_literal(inner: &str) -> Result<IpAddr, AddressError> {
    let tag = inner.get(..5);
    if tag.is_some_and(|t| t.eq_ignore_ascii_case("IPv6:")) {
        let v6: Ipv6Addr = inner[5..]
            .parse()
            .map_err(|_| Syntax("bad IPv6 address literal"))?;
        // `[IPv6:::ffff:127.0.0.1]` is 127.0.0.1 to any IP stack.
        return Ok(IpAddr::V6(v6).to_canonical());
    }
    if inner.contains(':') {
        return Err(Syntax("general address literals are not supported"));
    }
    // Rust's parser takes only dotted quads without leading zeros, so
    // `[0x7f.1]` and `[0177.0.0.1]`, which inet_aton would accept, fail.
    inner
        .parse::<Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| Syntax("bad IPv4 address literal"))
}

/// The canonical (lower-case A-label) form of a domain in an address.
///
/// Refuses, rather than repairs, what RFC 5321 does not allow: empty
/// labels (so leading, doubled and trailing dots), characters outside
/// letters, digits and hyphen, over-long names. A name whose last label
/// is all digits is refused too: `user@127.0.0.1` without brackets is read
/// as an IP address by some MTAs and as a host name by others.
///
/// Non-ASCII names are mapped with UTS #46 and then checked both ways: the
/// Unicode form of the result must be the name that was sent (modulo case),
/// so compatibility characters that *map* onto another name (fullwidth
/// `ｅｘａｍｐｌｅ`, `。` as a dot) are refused rather than silently made
/// equal to it; and each label must stay within one script (UTS #39
/// "highly restrictive"), so `pаypal` with a Cyrillic `а` is refused.
/// A-labels sent as ASCII (`xn--...`) get the same checks after decoding.
pub fn canonical_domain(s: &str) -> Result<String, AddressError> {
    if s.is_empty() {
        return Err(Syntax("missing domain"));
    }
    if s.len() > MAX_DOMAIN {
        return Err(Syntax("domain too long"));
    }
    if s.ends_with('.') {
        return Err(Syntax("trailing dot in domain"));
    }
    let ascii = if s.is_ascii() {
        s.to_ascii_lowercase()
    } else {
        idn_to_ascii(s)?
    };
    check_ldh(&ascii)?;
    for label in ascii.split('.') {
        if label.starts_with("xn--") {
            check_a_label(label)?;
        }
    }
    Ok(ascii)
}

fn check_ldh(ascii: &str) -> Result<(), AddressError> {
    if ascii.len() > MAX_DOMAIN {
        return Err(Syntax("domain too long"));
    }
    check_labels(ascii)?;
    let last = ascii.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Syntax(
            "domain looks like an IP address; use an address literal in brackets",
        ));
    }
    Ok(())
}

/// Checks each label of an ASCII domain name (RFC 1035 §2.3.1 letters,
/// digits and hyphen; no empty labels, so no leading, doubled or trailing
/// dots). Case does not matter, so the name may be as sent.
pub fn check_labels(name: &str) -> Result<(), AddressError> {
    for label in name.split('.') {
        if label.is_empty() {
            return Err(Syntax("empty domain label"));
        }
        if label.len() > MAX_LABEL {
            return Err(Syntax("domain label too long"));
        }
        let b = label.as_bytes();
        // Underscores are not valid in host names either.
        if !b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
        {
            return Err(Syntax("bad domain label"));
        }
    }
    Ok(())
}

fn idn_to_ascii(s: &str) -> Result<String, AddressError> {
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Syntax("bad domain label"));
    }
    let ascii =
        idna::domain_to_ascii_strict(s).map_err(|_| Idn("invalid internationalised domain"))?;
    let sent: Vec<&str> = s.split('.').collect();
    let mapped: Vec<&str> = ascii.split('.').collect();
    if sent.len() != mapped.len() {
        // Some other character (`。`, `．`) was mapped to a dot.
        return Err(Idn("domain uses a label separator other than '.'"));
    }
    for (sent, mapped) in sent.iter().zip(&mapped) {
        if !sent.is_ascii() && !mapped.starts_with("xn--") {
            // Fullwidth or other compatibility forms of an ASCII name.
            return Err(Idn("domain label is a look-alike of an ASCII label"));
        }
    }
    let (unicode, result) = idna::domain_to_unicode(&ascii);
    if result.is_err() || unicode != s.to_lowercase() {
        return Err(Idn("internationalised domain is not in normalised form"));
    }
    Ok(ascii)
}

/// Decodes an A-label and applies the checks a U-label gets.
fn check_a_label(label: &str) -> Result<(), AddressError> {
    let (unicode, result) = idna::domain_to_unicode(label);
    if result.is_err() {
        return Err(Idn("invalid A-label"));
    }
    // Must round-trip: `xn--` followed by something that decodes to ASCII,
    // or a non-canonical encoding, names nothing a client should send.
    match idna::domain_to_ascii_strict(&unicode) {
        Ok(back) if back == label && unicode != label => {}
        _ => return Err(Idn("invalid A-label")),
    }
    if !(*unicode).check_restriction_level(RestrictionLevel::HighlyRestrictive) {
        return Err(Idn("domain label mixes scripts (possible look-alike)"));
    }
    Ok(())
}

/// The UTS #39 skeleton of a canonical domain: two names with the same
/// skeleton look alike. Used to refuse a look-alike of a local domain.
pub fn skeleton(ascii_domain: &str) -> String {
    let (unicode, _) = idna::domain_to_unicode(ascii_domain);
    unicode_security::skeleton(&unicode).collect()
}

/// A domain name or a `*.domain` wildcard, stored as lower-case A-labels so
/// that comparison is a plain string comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

    /// `domain` must already be canonical (see [`canonical_domain`]).
    pub fn matches(&self, domain: &str) -> bool {
        match self {
            DomainPattern::Exact(d) => d == domain,
            DomainPattern::Subdomains(d) => is_strict_subdomain(domain, d),
        }
    }

    /// Whether every domain `other` matches is matched by `self` too.
    pub fn covers(&self, other: &DomainPattern) -> bool {
        match (self, other) {
            (DomainPattern::Exact(a), DomainPattern::Exact(b)) => a == b,
            (DomainPattern::Exact(_), DomainPattern::Subdomains(_)) => false,
            (DomainPattern::Subdomains(a), DomainPattern::Exact(b)) => is_strict_subdomain(b, a),
            (DomainPattern::Subdomains(a), DomainPattern::Subdomains(b)) => {
                a == b || is_strict_subdomain(b, a)
            }
        }
    }

    /// The name without any wildcard.
    pub fn base(&self) -> &str {
        match self {
            DomainPattern::Exact(d) | DomainPattern::Subdomains(d) => d,
        }
    }
}

/// `a.b.example.test` is a strict subdomain of `example.test`;
/// `xexample.test` and `example.test` are not.
fn is_strict_subdomain(domain: &str, parent: &str) -> bool {
    domain
        .strip_suffix(parent)
        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
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
///
/// This is the lenient form used for names an operator wrote in
/// configuration; addresses from clients go through [`canonical_domain`].
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(s: &str) -> Result<Path, AddressError> {
        parse_path(s, Role::Recipient)
    }

    fn mbox(s: &str) -> Mailbox {
        match rcpt(s) {
            Ok(Path::Mailbox { mailbox, .. }) => mailbox,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn hops(s: &str) -> Result<Option<Vec<String>>, AddressError> {
        mbox(s)
            .routing()
            .map(|h| h.map(|v| v.iter().map(ToString::to_string).collect()))
    }

    #[test]
    fn canonical_forms() {
        let cases = [
            (
                "User@Example.TEST",
                "User@example.test",
                "user@example.test",
            ),
            (
                "\"user\"@example.test",
                "user@example.test",
                "user@example.test",
            ),
            (
                "\"a b\"@example.test",
                "\"a b\"@example.test",
                "a b@example.test",
            ),
            ("\"a\\\"b\"@x.test", "\"a\\\"b\"@x.test", "a\"b@x.test"),
            ("u@[192.0.2.1]", "u@[192.0.2.1]", "u@[192.0.2.1]"),
            (
                "u@[IPv6:2001:DB8::1]",
                "u@[IPv6:2001:db8::1]",
                "u@[IPv6:2001:db8::1]",
            ),
            (
                "u@[ipv6:::ffff:127.0.0.1]",
                "u@[127.0.0.1]",
                "u@[127.0.0.1]",
            ),
            (
                "u@bücher.test",
                "u@xn--bcher-kva.test",
                "u@xn--bcher-kva.test",
            ),
            (
                "u@BÜCHER.test",
                "u@xn--bcher-kva.test",
                "u@xn--bcher-kva.test",
            ),
            (
                "u@xn--bcher-kva.test",
                "u@xn--bcher-kva.test",
                "u@xn--bcher-kva.test",
            ),
            ("@a.test,@[10.0.0.1]:u@c.test", "u@c.test", "u@c.test"),
        ];
        for (raw, shown, key) in cases {
            let m = mbox(raw);
            assert_eq!(m.to_string(), shown, "{raw}");
            assert_eq!(m.key(), key, "{raw}");
        }
        assert_eq!(rcpt("PostMaster"), Ok(Path::Postmaster));
        assert_eq!(parse_path("", Role::Sender), Ok(Path::Null));
        assert!(parse_path("postmaster", Role::Sender).is_err());
    }

    #[test]
    fn refusals() {
        let cases: &[(&str, &str)] = &[
            ("", "null forward-path"),
            ("user", "missing domain"),
            ("user@", "missing domain"),
            ("@example.test", "bad source route"),
            ("a@b@c.test", "more than one '@'"),
            ("u@example.test.", "trailing dot in domain"),
            ("u@example..test", "empty domain label"),
            ("u@.example.test", "empty domain label"),
            ("u@exa_mple.test", "bad domain label"),
            ("u@-a.test", "bad domain label"),
            ("u@127.0.0.1", "domain looks like an IP address"),
            ("u@0x7f.1", "domain looks like an IP address"),
            ("u@[127.1]", "bad IPv4 address literal"),
            ("u@[0177.0.0.1]", "bad IPv4 address literal"),
            ("u@[IPv6:zz]", "bad IPv6 address literal"),
            ("u@[tag:stuff]", "general address literals"),
            ("u@[1.2.3.4", "bad address literal"),
            (".u@x.test", "bad local part"),
            ("u..v@x.test", "bad local part"),
            ("\"u@x.test", "unterminated quoted local part"),
            ("\"u\"x@y.test", "text after the quoted local part"),
            ("\"\"@y.test", "empty local part"),
            ("u\u{0}@x.test", "control character"),
            ("ü@x.test", "non-ASCII local part"),
            ("u@ｅｘａｍｐｌｅ.test", "look-alike of an ASCII label"),
            ("u@example。test", "label separator"),
            ("u@pаypal.test", "mixes scripts"),
            ("u@xn--pypal-4ve.test", "mixes scripts"),
            ("u@xn--zz.test", "invalid A-label"),
            ("u@xn--abc.test", "invalid A-label"),
            ("@:u@x.test", "empty host in source route"),
            ("@a.test;u@x.test", "bad domain label"),
        ];
        for (raw, want) in cases {
            let err = rcpt(raw).expect_err(raw).to_string();
            assert!(err.contains(want), "{raw:?}: {err}");
        }
        let long = format!("{}@x.test", "a".repeat(65));
        assert!(rcpt(&long).is_err());
        let long = format!("u@{}.test", "a".repeat(64));
        assert!(rcpt(&long).is_err());
    }

    #[test]
    fn routing_in_local_parts() {
        let h = |v: &[&str]| Ok(Some(v.iter().map(|s| s.to_string()).collect()));
        assert_eq!(hops("user@corp.test"), Ok(None));
        assert_eq!(hops("\"a b\"@corp.test"), Ok(None));
        assert_eq!(hops("user%ext.test@corp.test"), h(&["ext.test"]));
        assert_eq!(
            hops("user%final.test%next.test@corp.test"),
            h(&["next.test", "final.test"])
        );
        assert_eq!(hops("ext.test!user@corp.test"), h(&["ext.test"]));
        assert_eq!(
            hops("a.test!b.test!user@corp.test"),
            h(&["a.test", "b.test"])
        );
        assert_eq!(hops("\"user@ext.test\"@corp.test"), h(&["ext.test"]));
        assert_eq!(hops("\"user%x.test\"@corp.test"), h(&["x.test"]));
        assert_eq!(
            hops("\"u%a.test@b.test\"@corp.test"),
            h(&["b.test", "a.test"])
        );
        assert_eq!(hops("\"user%[192.0.2.1]\"@corp.test"), h(&["[192.0.2.1]"]));
        assert_eq!(hops("EXT.Test!user@corp.test"), h(&["ext.test"]));
        for bad in [
            "user%@corp.test",
            "%ext.test@corp.test",
            "!user@corp.test",
            "wow!@corp.test",
            "\"@\"@corp.test",
            "\"u@x.test@y.test\"@corp.test",
            "user%ex_t.test@corp.test",
        ] {
            assert!(
                matches!(hops(bad), Err(AddressError::Routing(_))),
                "{bad}: {:?}",
                hops(bad)
            );
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
        assert!(DomainPattern::parse("*").is_err());
        let sub = DomainPattern::parse("*.corp.test").unwrap();
        assert!(sub.matches("a.corp.test"));
        assert!(!sub.matches("corp.test"));
        assert!(!sub.matches("xcorp.test"));
        assert!(sub.covers(&DomainPattern::parse("*.a.corp.test").unwrap()));
        assert!(sub.covers(&DomainPattern::parse("a.corp.test").unwrap()));
        assert!(!sub.covers(&DomainPattern::parse("corp.test").unwrap()));
    }

    #[test]
    fn lookalike_skeletons_match() {
        let cyrillic = "\u{0435}xample.test"; // Cyrillic е
        assert_eq!(
            skeleton("example.test"),
            unicode_security::skeleton(cyrillic).collect::<String>()
        );
    }
}
