//! The policy file as an operator writes it, parsed strictly.
//!
//! Every check that can fail runs *while* the YAML is being deserialized,
//! not afterwards, because only then does serde_norway know the line and
//! column to report: a typo in a relay rule must stop start-up with the
//! file, line and field in the message. That includes the checks that need
//! outside knowledge (does any identity source know this group?), which is
//! why the known principals travel in a thread-local for the duration of
//! one parse instead of as an argument serde's derive cannot pass down.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::address::{self, DomainPattern, Role};
use super::Mechanism;
use crate::identity::{fold_case, Account};
use crate::located::Located;

/// Which users and groups the identity sources know, so that a rule naming
/// one that does not exist — usually a typo that would silently never
/// match — is refused at load time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownPrincipals {
    /// `DOMAIN\user` and bare `user`; case is ignored.
    pub users: BTreeSet<String>,
    /// Case is ignored.
    pub groups: BTreeSet<String>,
}

impl KnownPrincipals {
    /// The principals of a users file (or any list of accounts).
    pub fn from_accounts<'a>(accounts: impl IntoIterator<Item = &'a Account>) -> Self {
        let mut known = KnownPrincipals::default();
        for a in accounts {
            known
                .users
                .insert(format!("{}\\{}", a.domain, a.user).to_lowercase());
            known.users.insert(a.user.to_lowercase());
            known
                .groups
                .extend(a.groups.iter().map(|g| g.to_lowercase()));
        }
        known
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{origin}: cannot read policy file: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// `field` is the path inside the document, such as
    /// `rules[2].groups[0]`.
    #[error(transparent)]
    Invalid(Located),
}

impl PolicyError {
    /// The field path, for tests and for `relayguard check`.
    pub fn field(&self) -> Option<&str> {
        match self {
            PolicyError::Invalid(e) => Some(&e.field),
            PolicyError::Io { .. } => None,
        }
    }

    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::Invalid(e) => e.line,
            PolicyError::Io { .. } => None,
        }
    }
}

/// What one parse needs to know beyond the text.
struct ParseCx {
    /// Folded with [`fold_case`], as the rules are.
    known: Option<(HashSet<String>, HashSet<String>)>,
    /// Rule and trusted-network names seen so far: explanations and metrics
    /// name rules, so two with one name would make both ambiguous.
    names: HashSet<String>,
}

thread_local! {
    static CX: RefCell<Option<ParseCx>> = const { RefCell::new(None) };
}

/// Clears the thread-local even if deserialization panics.
struct CxGuard;

impl CxGuard {
    fn install(known: Option<&KnownPrincipals>) -> CxGuard {
        let known = known.map(|k| {
            (
                k.users.iter().map(|u| fold_case(u)).collect(),
                k.groups.iter().map(|g| fold_case(g)).collect(),
            )
        });
        CX.with(|cx| {
            *cx.borrow_mut() = Some(ParseCx {
                known,
                names: HashSet::new(),
            })
        });
        CxGuard
    }
}

impl Drop for CxGuard {
    fn drop(&mut self) {
        CX.with(|cx| *cx.borrow_mut() = None);
    }
}

fn with_cx<R>(f: impl FnOnce(&mut ParseCx) -> R) -> Option<R> {
    CX.with(|cx| cx.borrow_mut().as_mut().map(f))
}

/// Parses the policy text. `origin` names it in errors.
pub(crate) fn parse(
    text: &str,
    origin: &str,
    known: Option<&KnownPrincipals>,
) -> Result<RawPolicy, PolicyError> {
    // A file truncated while being rewritten must not become a policy that
    // refuses all mail at the next reload.
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank {
        return Err(PolicyError::Invalid(Located::new(
            origin,
            None,
            None,
            "",
            "the policy file is empty",
        )));
    }
    let _cx = CxGuard::install(known);
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut e = Located::from_yaml_error(origin, e);
        // serde_norway prefixes its own (shorter) path; ours is reported
        // separately.
        if let Some((head, rest)) = e.message.split_once(": ") {
            if !head.contains(' ') && e.field.starts_with(head) {
                e.message = rest.to_owned();
            }
        }
        PolicyError::Invalid(e)
    })
}

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    #[serde(default)]
    pub local_domains: Vec<LocalDomain>,
    #[serde(default)]
    pub listeners: BTreeMap<ListenerName, RawListener>,
    #[serde(default)]
    pub sender_binding: RawBinding,
    #[serde(default)]
    pub rates: Vec<RawRate>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub trusted_networks: Vec<RawTrusted>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    /// Refuse MAIL FROM without AUTH on this listener, even for mail to
    /// local domains (a submission port).
    #[serde(default)]
    pub require_auth: bool,
}

/// Defaults for every authenticated principal.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBinding {
    #[serde(default = "default_senders")]
    pub senders: Vec<SenderPattern>,
    #[serde(default)]
    pub allow_null_sender: bool,
    #[serde(default)]
    pub check_header_from: bool,
}

impl Default for RawBinding {
    fn default() -> Self {
        RawBinding {
            senders: default_senders(),
            allow_null_sender: false,
            check_header_from: false,
        }
    }
}

/// Authentication is meant to bind a client to its own addresses; anything
/// looser must be written down.
fn default_senders() -> Vec<SenderPattern> {
    vec![SenderPattern::Directory]
}

/// Who is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// The authenticated principal, whichever address it connects from.
    Principal,
    /// The client address (IPv6 clients by /64: one host usually has the
    /// whole prefix).
    Client,
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Per::Principal => "principal",
            Per::Client => "client",
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateFields {
    per: Per,
    #[serde(with = "humantime_serde")]
    window: Duration,
    messages: Option<u32>,
    recipients: Option<u32>,
}

/// A rate: at most `messages` and/or `recipients` per `window`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RateFields")]
pub(crate) struct RawRate {
    pub per: Per,
    pub window: Duration,
    pub messages: Option<u32>,
    pub recipients: Option<u32>,
}

impl TryFrom<RateFields> for RawRate {
    type Error = String;
    fn try_from(f: RateFields) -> Result<Self, String> {
        if f.window < Duration::from_secs(1) {
            return Err("a rate window must be at least 1s".into());
        }
        if f.messages.is_none() && f.recipients.is_none() {
            return Err("a rate needs `messages`, `recipients` or both".into());
        }
        if f.messages == Some(0) || f.recipients == Some(0) {
            return Err("a rate of 0 refuses everything; remove the rule instead".into());
        }
        Ok(RawRate {
            per: f.per,
            window: f.window,
            messages: f.messages,
            recipients: f.recipients,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFields {
    name: RuleName,
    #[serde(default)]
    users: Vec<UserSpec>,
    #[serde(default)]
    groups: Vec<GroupName>,
    mechanisms: Option<Vec<Mechanism>>,
    networks: Option<Vec<Network>>,
    listeners: Option<Vec<ListenerName>>,
    tls: Option<bool>,
    recipient_domains: Vec<RecipientPattern>,
    senders: Option<Vec<SenderPattern>>,
    allow_null_sender: Option<bool>,
    #[serde(default)]
    allow_address_literals: bool,
    max_recipients: Option<u32>,
    max_message_size: Option<ByteSize>,
    check_header_from: Option<bool>,
    #[serde(default)]
    rates: Vec<RawRate>,
}

/// The settings shared by rules and trusted networks.
#[derive(Debug, Clone)]
pub(crate) struct RawSettings {
    pub senders: Option<Vec<SenderPattern>>,
    pub allow_null_sender: Option<bool>,
    pub allow_address_literals: bool,
    pub max_recipients: Option<u32>,
    pub max_message_size: Option<u64>,
    pub check_header_from: Option<bool>,
    pub rates: Vec<RawRate>,
}

/// One named relay rule for authenticated clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RuleFields")]
pub(crate) struct RawRule {
    pub name: String,
    pub users: Vec<UserSpec>,
    pub groups: Vec<GroupName>,
    pub mechanisms: Option<Vec<Mechanism>>,
    pub networks: Option<Vec<IpNet>>,
    pub listeners: Option<Vec<String>>,
    pub tls: Option<bool>,
    pub recipient_domains: Vec<RecipientPattern>,
    pub settings: RawSettings,
}

impl TryFrom<RuleFields> for RawRule {
    type Error = String;
    fn try_from(f: RuleFields) -> Result<Self, String> {
        if f.users.is_empty() && f.groups.is_empty() {
            return Err(format!(
                "rule `{}` names no `users` or `groups`; a rule is for authenticated \
                 clients (write `users: [\"*\"]` for all of them; relaying without \
                 authentication belongs in `trusted_networks`)",
                f.name.0
            ));
        }
        if f.users.len() > 1 && f.users.iter().any(|u| u.is_any()) {
            return Err("`*` in `users` already means every authenticated client; \
                        list nothing else with it"
                .into());
        }
        non_empty("mechanisms", &f.mechanisms)?;
        non_empty("networks", &f.networks)?;
        non_empty("listeners", &f.listeners)?;
        check_recipients(&f.recipient_domains)?;
        non_empty("senders", &f.senders)?;
        check_limits(f.max_recipients)?;
        claim_name(&f.name.0)?;
        Ok(RawRule {
            name: f.name.0,
            users: f.users,
            groups: f.groups,
            mechanisms: f.mechanisms,
            networks: f.networks.map(|n| n.into_iter().map(|n| n.0).collect()),
            listeners: f.listeners.map(|l| l.into_iter().map(|l| l.0).collect()),
            tls: f.tls,
            recipient_domains: f.recipient_domains,
            settings: RawSettings {
                senders: f.senders,
                allow_null_sender: f.allow_null_sender,
                allow_address_literals: f.allow_address_literals,
                max_recipients: f.max_recipients,
                max_message_size: f.max_message_size.map(|s| s.0),
                check_header_from: f.check_header_from,
                rates: f.rates,
            },
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustedFields {
    name: RuleName,
    networks: Vec<Network>,
    listeners: Option<Vec<ListenerName>>,
    tls: Option<bool>,
    recipient_domains: Vec<RecipientPattern>,
    senders: Option<Vec<SenderPattern>>,
    #[serde(default)]
    allow_null_sender: bool,
    #[serde(default)]
    allow_address_literals: bool,
    max_recipients: Option<u32>,
    max_message_size: Option<ByteSize>,
    #[serde(default)]
    check_header_from: bool,
    #[serde(default)]
    rates: Vec<RawRate>,
}

/// A network allowed to relay without authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "TrustedFields")]
pub(crate) struct RawTrusted {
    pub name: String,
    pub networks: Vec<IpNet>,
    pub listeners: Option<Vec<String>>,
    pub tls: Option<bool>,
    pub recipient_domains: Vec<RecipientPattern>,
    pub settings: RawSettings,
}

impl TryFrom<TrustedFields> for RawTrusted {
    type Error = String;
    fn try_from(f: TrustedFields) -> Result<Self, String> {
        non_empty("networks", &Some(&f.networks))?;
        non_empty("listeners", &f.listeners)?;
        check_recipients(&f.recipient_domains)?;
        non_empty("senders", &f.senders)?;
        if let Some(s) = f.senders.iter().flatten().find(|s| s.needs_principal()) {
            return Err(format!(
                "sender `{s}` needs an authenticated principal, which a trusted network \
                 does not have; list addresses or `*@domain` patterns"
            ));
        }
        if f.rates.iter().any(|r| r.per == Per::Principal) {
            return Err("a trusted network has no principal to count; use `per: client`".into());
        }
        check_limits(f.max_recipients)?;
        claim_name(&f.name.0)?;
        Ok(RawTrusted {
            name: f.name.0,
            networks: f.networks.into_iter().map(|n| n.0).collect(),
            listeners: f.listeners.map(|l| l.into_iter().map(|l| l.0).collect()),
            tls: f.tls,
            recipient_domains: f.recipient_domains,
            settings: RawSettings {
                // The network is what is trusted, not a principal: without a
                // list, any sender.
                senders: Some(f.senders.unwrap_or_else(|| vec![SenderPattern::Any])),
                allow_null_sender: Some(f.allow_null_sender),
                allow_address_literals: f.allow_address_literals,
                max_recipients: f.max_recipients,
                max_message_size: f.max_message_size.map(|s| s.0),
                check_header_from: Some(f.check_header_from),
                rates: f.rates,
            },
        })
    }
}

fn non_empty<T, L: AsRef<[T]>>(what: &str, list: &Option<L>) -> Result<(), String> {
    match list {
        Some(l) if l.as_ref().is_empty() => Err(format!(
            "`{what}: []` would never match; leave `{what}` out to match any"
        )),
        _ => Ok(()),
    }
}

fn check_recipients(list: &[RecipientPattern]) -> Result<(), String> {
    if list.is_empty() {
        return Err("`recipient_domains` is empty; write `[\"*\"]` for any domain".into());
    }
    if list.len() > 1 && list.contains(&RecipientPattern::Any) {
        return Err(
            "`*` in `recipient_domains` already means any domain; list nothing else with it".into(),
        );
    }
    Ok(())
}

fn check_limits(max_recipients: Option<u32>) -> Result<(), String> {
    if max_recipients == Some(0) {
        return Err("`max_recipients: 0` refuses every recipient; remove the rule instead".into());
    }
    Ok(())
}

fn claim_name(name: &str) -> Result<(), String> {
    match with_cx(|cx| cx.names.insert(name.to_owned())) {
        Some(false) => Err(format!(
            "duplicate rule name `{name}` (rules and trusted networks share one namespace)"
        )),
        _ => Ok(()),
    }
}

/// A visitor for values written as strings, with a parse function that
/// says what is wrong. Errors raised here carry the scalar's own line.
struct StrVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

macro_rules! from_str {
    ($ty:ty, $expecting:literal, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(StrVisitor {
                    expecting: $expecting,
                    parse: $parse,
                })
            }
        }
    };
}

/// A rule or listener name: it appears in logs, metrics and replies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RuleName(String);

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

from_str!(RuleName, "a rule name", |s| {
    if is_name(s) {
        Ok(RuleName(s.to_owned()))
    } else {
        Err(format!(
            "`{s}` is not a valid name (1 to 64 letters, digits, `-`, `_`, `.`)"
        ))
    }
});

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ListenerName(pub String);

from_str!(ListenerName, "a listener name", |s| {
    if is_name(s) {
        Ok(ListenerName(s.to_owned()))
    } else {
        Err(format!("`{s}` is not a valid listener name"))
    }
});

/// A `local_domains` entry.
#[derive(Debug, Clone)]
pub(crate) struct LocalDomain(pub DomainPattern);

from_str!(LocalDomain, "a domain or `*.domain`", |s| {
    DomainPattern::parse(s)
        .map(LocalDomain)
        .map_err(|e| format!("{e} (write a domain or `*.domain`)"))
});

/// A `recipient_domains` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecipientPattern {
    /// `*`: any domain, and the only pattern an address literal can match.
    Any,
    Domain(DomainPattern),
}

from_str!(RecipientPattern, "`*`, a domain or `*.domain`", |s| {
    if s == "*" {
        return Ok(RecipientPattern::Any);
    }
    DomainPattern::parse(s)
        .map(RecipientPattern::Domain)
        .map_err(|e| format!("{e} (write `*`, a domain or `*.domain`)"))
});

/// A `users` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UserSpec {
    /// `*`: every authenticated principal.
    Any { text: String },
    /// `DOMAIN\user`; both folded.
    Qualified {
        text: String,
        domain: String,
        user: String,
    },
    /// `user` in any domain; folded.
    Bare { text: String, user: String },
}

impl UserSpec {
    fn is_any(&self) -> bool {
        matches!(self, UserSpec::Any { .. })
    }

    pub fn text(&self) -> &str {
        match self {
            UserSpec::Any { text }
            | UserSpec::Qualified { text, .. }
            | UserSpec::Bare { text, .. } => text,
        }
    }
}

from_str!(UserSpec, "`DOMAIN\\user`, `user` or `*`", |s| {
    if s == "*" {
        return Ok(UserSpec::Any { text: s.into() });
    }
    if s.trim() != s || s.is_empty() || s.chars().any(char::is_control) {
        return Err(format!("`{s}` is not a user name"));
    }
    let spec = match s.split_once('\\') {
        Some((d, u)) if !d.is_empty() && !u.is_empty() && !u.contains('\\') => {
            UserSpec::Qualified {
                text: s.into(),
                domain: fold_case(d),
                user: fold_case(u),
            }
        }
        Some(_) => return Err(format!("`{s}` is not `DOMAIN\\user`")),
        None => UserSpec::Bare {
            text: s.into(),
            user: fold_case(s),
        },
    };
    let key = match &spec {
        UserSpec::Qualified { domain, user, .. } => format!("{domain}\\{user}"),
        UserSpec::Bare { user, .. } => user.clone(),
        UserSpec::Any { .. } => unreachable!("handled above"),
    };
    match with_cx(|cx| cx.known.as_ref().map(|(users, _)| users.contains(&key))) {
        Some(Some(false)) => Err(format!("no identity source knows the user `{s}`")),
        _ => Ok(spec),
    }
});

/// A `groups` entry; `text` as written, `folded` for matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupName {
    pub text: String,
    pub folded: String,
}

from_str!(GroupName, "a group name", |s| {
    if s.trim().is_empty() || s.chars().any(char::is_control) {
        return Err(format!("`{s}` is not a group name"));
    }
    let folded = fold_case(s);
    match with_cx(|cx| {
        cx.known
            .as_ref()
            .map(|(_, groups)| groups.contains(&folded))
    }) {
        Some(Some(false)) => Err(format!("no identity source knows the group `{s}`")),
        _ => Ok(GroupName {
            text: s.into(),
            folded,
        }),
    }
});

from_str!(Mechanism, "`ntlm`, `plain` or `login`", |s| {
    Mechanism::from_name(s).ok_or_else(|| {
        format!("unknown authentication mechanism `{s}` (expected ntlm, plain or login)")
    })
});

/// A `networks` entry: CIDR, or a bare address for one host.
#[derive(Debug, Clone)]
struct Network(IpNet);

from_str!(Network, "a network in CIDR notation", |s| {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(format!("`{s}` is not an address or a CIDR network")),
        },
    };
    if net.trunc() != net {
        // `10.1.2.3/8` is usually a typo for a host or for `10.0.0.0/8`;
        // guessing which would be guessing how far relaying reaches.
        return Err(format!(
            "`{s}` has host bits set; write `{}` for the network or the bare address for one host",
            net.trunc()
        ));
    }
    if let IpNet::V6(v6) = net {
        if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 {
            return Err(format!(
                "`{s}` is an IPv4-mapped network; write it as IPv4 (clients are matched by their IPv4 address)"
            ));
        }
    }
    Ok(Network(net))
});

/// A `senders` entry: which MAIL FROM addresses a principal may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SenderPattern {
    /// `*`: any sender (no binding).
    Any,
    /// `directory`: the principal's own addresses from its identity source
    /// (users file `mail`, AD `mail` and `proxyAddresses`).
    Directory,
    /// One address, in [`address::Mailbox::key`] form.
    Exact(String),
    /// `*@domain` or `*@*.domain`: any local part at the domain.
    AnyAt(DomainPattern),
    /// `{user}@domain`: a local part built from the principal's name.
    Template { local: String, domain: String },
}

impl SenderPattern {
    fn needs_principal(&self) -> bool {
        matches!(
            self,
            SenderPattern::Directory | SenderPattern::Template { .. }
        )
    }
}

impl fmt::Display for SenderPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SenderPattern::Any => f.write_str("*"),
            SenderPattern::Directory => f.write_str("directory"),
            SenderPattern::Exact(a) => f.write_str(a),
            SenderPattern::AnyAt(d) => write!(f, "*@{d}"),
            SenderPattern::Template { local, domain } => write!(f, "{local}@{domain}"),
        }
    }
}

from_str!(
    SenderPattern,
    "`directory`, `*`, an address, `*@domain` or `{user}@domain`",
    |s| {
        match s {
            "*" => return Ok(SenderPattern::Any),
            "directory" => return Ok(SenderPattern::Directory),
            _ => {}
        }
        if let Some(domain) = s.strip_prefix("*@") {
            return DomainPattern::parse(domain)
                .map(SenderPattern::AnyAt)
                .map_err(|e| e.to_string());
        }
        if s.contains('{') {
            let (local, domain) = s
                .rsplit_once('@')
                .ok_or_else(|| format!("`{s}` has no domain"))?;
            let rest = local.replace("{user}", "").replace("{domain}", "");
            if rest.contains(['{', '}']) {
                return Err(format!(
                    "`{s}`: the only placeholders are `{{user}}` and `{{domain}}`"
                ));
            }
            let domain = address::canonical_domain(domain).map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(SenderPattern::Template {
                local: local.to_ascii_lowercase(),
                domain,
            });
        }
        match address::parse_path(s, Role::Sender) {
            Ok(address::Path::Mailbox { mailbox, route }) if route.is_empty() => {
                Ok(SenderPattern::Exact(mailbox.key()))
            }
            Ok(_) => Err(format!("`{s}` is not a plain address")),
            Err(e) => Err(format!("`{s}` is not an address: {e}")),
        }
    }
);

/// A size in bytes: an integer, or a string with a unit (`25 MiB`, `10MB`).
#[derive(Debug, Clone, Copy)]
struct ByteSize(u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, or a number with a unit such as `25 MiB`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                if v == 0 {
                    return Err(E::custom("a size limit of 0 refuses every message"));
                }
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a size cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                let t = v.trim();
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (num, unit) = t.split_at(split);
                let mult: u64 = match unit.trim() {
                    "" | "B" => 1,
                    "kB" | "KB" => 1_000,
                    "KiB" => 1 << 10,
                    "MB" => 1_000_000,
                    "MiB" => 1 << 20,
                    "GB" => 1_000_000_000,
                    "GiB" => 1 << 30,
                    other => {
                        return Err(E::custom(format_args!(
                            "unknown size unit `{other}` (use B, kB, KiB, MB, MiB, GB or GiB)"
                        )))
                    }
                };
                let n: u64 = num
                    .parse()
                    .map_err(|_| E::custom(format_args!("`{v}` is not a size")))?;
                let bytes = n
                    .checked_mul(mult)
                    .ok_or_else(|| E::custom("size too large"))?;
                self.visit_u64(bytes)
            }
        }
        d.deserialize_any(V)
    }
}
