//! The relay-permission check: may *this* client send *this* envelope from
//! *this* network?
//!
//! Authentication says who the client is; it never by itself grants
//! relaying. That separate authorization step is the one Exchange 2000's
//! MS02-011 skipped, and the reason this module exists. The gateway calls
//! [`Policy::check_sender`] at MAIL FROM and [`Policy::check_recipient`] at
//! each RCPT TO; both are pure functions of the policy, the request and the
//! time they are handed (plus the [`RateLimiter`] counters).
//!
//! ```text
//!  raw path ──► address::parse_path ──► canonical Path ──┐
//!                                                        ▼
//!  local domain, no routing in local part? ── yes ──► AcceptLocal
//!        │ no (relay, or a local part that routes elsewhere)
//!        ▼
//!  rules (authenticated), then trusted_networks: first match wins
//!        │ none ──► 550 5.7.1 (default deny)
//!        ▼
//!  settings of the winner: address literals, sender binding (553),
//!  recipients per message (452), rates (451) ──► AcceptRelay
//! ```
//!
//! The policy language is documented on [`Policy::from_yaml`].

pub mod address;
mod explain;
mod file;
mod rate;
mod rules;

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::Path as FsPath;
use std::time::{Duration, SystemTime};

pub use address::{normalize_domain, AddressError, DomainPattern, PatternError};
pub use explain::{Explanation, Step, StepOutcome};
pub use file::{KnownPrincipals, Per, PolicyError};
pub use rate::RateLimiter;

use address::{Host, Path, Role};
use file::{RawPolicy, RawRate, SenderPattern};
use rate::{Charge, Kind, RateKey, Subject};
use rules::{Index, Prepared, Rule, RuleKind, Who};

/// The demo's relay policy (for `relayguard demo`): `example.test` is local;
/// `DEMO\alice` (group `relay-senders`) may relay anywhere as herself;
/// `DEMO\bob` may only send to `example.test`; nobody relays without AUTH.
pub const DEMO_POLICY: &str = include_str!("demo.yaml");

/// The SASL mechanism a principal authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Ntlm,
    Plain,
    Login,
}

impl Mechanism {
    /// Case-insensitive, as SASL mechanism names are.
    pub fn from_name(name: &str) -> Option<Self> {
        [Mechanism::Ntlm, Mechanism::Plain, Mechanism::Login]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(name))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Ntlm => "ntlm",
            Mechanism::Plain => "plain",
            Mechanism::Login => "login",
        }
    }
}

/// An authenticated client, as the identity source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    /// NetBIOS domain (`DEMO`); empty when the source has none.
    pub domain: String,
    pub groups: Vec<String>,
    pub mechanism: Mechanism,
    /// The principal's own addresses: users-file `mail`, AD `mail` and
    /// `proxyAddresses` (`SMTP:`/`smtp:` prefixes are understood, other
    /// address types ignored). What `senders: [directory]` allows.
    pub addresses: Vec<String>,
}

impl fmt::Display for Principal {
    /// `DOMAIN\user`, the form rules and logs use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.domain.is_empty() {
            f.write_str(&self.user)
        } else {
            write!(f, "{}\\{}", self.domain, self.user)
        }
    }
}

/// What the session knows about the client when it asks.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// `None` until AUTH succeeded.
    pub principal: Option<&'a Principal>,
    pub client_ip: IpAddr,
    /// The listener's name from the gateway configuration.
    pub listener: &'a str,
    pub tls: bool,
    /// The message size the client declared with `SIZE=` at MAIL FROM
    /// (RFC 1870), if it did: a recipient whose rule allows less is refused
    /// at RCPT (552 5.3.4) instead of the whole message after its data.
    pub declared_size: Option<u64>,
}

/// The answer at MAIL FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderDecision {
    Accept,
    Deny(Refusal),
    /// `451 4.7.1`; see [`SenderDecision::reply`].
    RateLimited {
        retry_after: Duration,
        rule: Option<String>,
    },
}

/// The answer at each RCPT TO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptDecision {
    /// Inbound mail to a domain we serve.
    AcceptLocal {
        /// Whether the gateway should hold the header `From:` to the same
        /// sender binding as MAIL FROM (authenticated clients only).
        check_header_from: bool,
    },
    /// Relaying, allowed by the named rule or trusted network.
    AcceptRelay {
        rule: String,
        /// The rule's limit; the gateway applies the smallest over the
        /// message's recipients.
        max_message_size: Option<u64>,
        check_header_from: bool,
    },
    Deny(Refusal),
    RateLimited {
        retry_after: Duration,
        rule: Option<String>,
    },
}

/// Why MAIL FROM or RCPT TO was refused: one payload for both
/// [`SenderDecision::Deny`] and [`RcptDecision::Deny`], since a refusal is
/// built (and logged, and counted) the same way at either command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub enhanced: (u8, u16, u16),
    pub text: String,
    /// The rule that refused, if one did.
    pub rule: Option<String>,
    /// A bounded label for metrics and logs.
    pub reason: &'static str,
}

impl Refusal {
    fn new(
        code: u16,
        enhanced: (u8, u16, u16),
        text: impl Into<String>,
        rule: Option<&Rule>,
        reason: &'static str,
    ) -> Self {
        Refusal {
            code,
            enhanced,
            text: text.into(),
            rule: rule.map(|r| r.name.clone()),
            reason,
        }
    }

    fn address(e: &AddressError, role: Role) -> Self {
        let what = match role {
            Role::Sender => "sender",
            Role::Recipient => "recipient",
        };
        let text = match e {
            AddressError::Syntax(_) => format!("Bad {what} address syntax: {e}"),
            _ => format!("Bad {what} address: {e}"),
        };
        Refusal::new(e.code(), e.enhanced(role), text, None, e.label())
    }

    fn auth_required() -> Self {
        // RFC 4954 §6.
        Refusal::new(
            530,
            (5, 7, 0),
            "Authentication required",
            None,
            "auth_required",
        )
    }
}

impl From<Refusal> for SenderDecision {
    fn from(r: Refusal) -> Self {
        SenderDecision::Deny(r)
    }
}

impl From<Refusal> for RcptDecision {
    fn from(r: Refusal) -> Self {
        RcptDecision::Deny(r)
    }
}

impl Refusal {
    /// Code, enhanced code and text of the reply to send.
    fn reply(&self) -> (u16, (u8, u16, u16), String) {
        (self.code, self.enhanced, self.text.clone())
    }
}

fn retry_text(retry_after: Duration, rule: &Option<String>) -> String {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let hint = if secs < 120 {
        format!("{secs} seconds")
    } else {
        format!("{} minutes", secs.div_ceil(60))
    };
    match rule {
        Some(r) => format!("Rate limit exceeded (rule {r}); try again in {hint}"),
        None => format!("Rate limit exceeded; try again in {hint}"),
    }
}

impl SenderDecision {
    pub fn is_accept(&self) -> bool {
        matches!(self, SenderDecision::Accept)
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SenderDecision::Accept => "accepted",
            SenderDecision::Deny(r) => r.reason,
            SenderDecision::RateLimited { .. } => "rate_limited",
        }
    }

    /// Code, enhanced code and text of the reply to send.
    pub fn reply(&self) -> (u16, (u8, u16, u16), String) {
        match self {
            SenderDecision::Accept => (250, (2, 1, 0), "Sender OK".into()),
            SenderDecision::Deny(r) => r.reply(),
            SenderDecision::RateLimited { retry_after, rule } => {
                (451, (4, 7, 1), retry_text(*retry_after, rule))
            }
        }
    }
}

impl RcptDecision {
    pub fn is_accept(&self) -> bool {
        matches!(
            self,
            RcptDecision::AcceptLocal { .. } | RcptDecision::AcceptRelay { .. }
        )
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RcptDecision::AcceptLocal { .. } => "local",
            RcptDecision::AcceptRelay { .. } => "relay",
            RcptDecision::Deny(r) => r.reason,
            RcptDecision::RateLimited { .. } => "rate_limited",
        }
    }

    /// The rule that decided, if one did.
    pub fn rule(&self) -> Option<&str> {
        match self {
            RcptDecision::AcceptLocal { .. } => None,
            RcptDecision::AcceptRelay { rule, .. } => Some(rule),
            RcptDecision::Deny(Refusal { rule, .. }) | RcptDecision::RateLimited { rule, .. } => {
                rule.as_deref()
            }
        }
    }

    /// Code, enhanced code and text of the reply to send for a refusal;
    /// for an acceptance, the gateway forwards the backend's reply instead.
    pub fn reply(&self) -> (u16, (u8, u16, u16), String) {
        match self {
            RcptDecision::AcceptLocal { .. } | RcptDecision::AcceptRelay { .. } => {
                (250, (2, 1, 5), "Recipient OK".into())
            }
            RcptDecision::Deny(r) => r.reply(),
            RcptDecision::RateLimited { retry_after, rule } => {
                (451, (4, 7, 1), retry_text(*retry_after, rule))
            }
        }
    }
}

/// Sender binding defaults for authenticated principals.
#[derive(Debug, Clone)]
struct Binding {
    senders: Vec<SenderPattern>,
    allow_null_sender: bool,
    check_header_from: bool,
}

/// Where a recipient goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    Local,
    /// Every host the mail would pass beyond us; a rule must allow each.
    Relay {
        hops: Vec<Host>,
        /// The address was at a local domain but its local part routes on.
        via_local_part: bool,
    },
}

impl Dest {
    fn describe(&self) -> String {
        match self {
            Dest::Local => "local".into(),
            Dest::Relay {
                hops,
                via_local_part,
            } => {
                let hops: Vec<String> = hops.iter().map(ToString::to_string).collect();
                if *via_local_part {
                    format!(
                        "{} (routed through the local part of a local address)",
                        hops.join(", ")
                    )
                } else {
                    hops.join(", ")
                }
            }
        }
    }
}

/// The policy in force. Immutable: a reload builds a new one and swaps it
/// in whole, so a transaction keeps the policy it started with.
#[derive(Debug)]
pub struct Policy {
    origin: String,
    local: Vec<DomainPattern>,
    local_exact: HashSet<String>,
    /// `*.corp.test` is stored as `corp.test`.
    local_parents: HashSet<String>,
    /// UTS #39 skeletons of local domains, to refuse look-alikes of them.
    local_skeletons: Vec<(String, DomainPattern)>,
    /// Every listener the `listeners` section names.
    listener_names: Vec<String>,
    require_auth: HashSet<String>,
    binding: Binding,
    rates: Vec<RawRate>,
    /// `rules` in file order, then `trusted_networks` in file order.
    rules: Vec<Rule>,
    index: Index,
    warnings: Vec<String>,
}

impl Policy {
    /// Parses a policy file. `origin` names it in errors and warnings.
    ///
    /// `known` tells which users and groups the identity sources know, so
    /// that a rule naming an unknown one is an error; `None` skips that
    /// check (Active Directory, where groups are looked up at run time).
    ///
    /// # The policy language
    ///
    /// ```yaml
    /// # Mail to these is inbound: accepted without authentication
    /// # (unless the listener requires it). Exact names or `*.sub`
    /// # (subdomains only); IDNs may be written in Unicode.
    /// local_domains: [example.test, "*.example.test"]
    ///
    /// listeners:                 # by the gateway's listener names
    ///   submission:
    ///     require_auth: true     # 530 5.7.0 without AUTH, even for local mail
    ///
    /// sender_binding:            # defaults for authenticated principals
    ///   senders: [directory]     # the default: own addresses only
    ///   allow_null_sender: false # MAIL FROM:<> (default false)
    ///   check_header_from: false # ask the gateway to check header From: too
    ///
    /// rates:                     # for every client, all mail
    ///   - { per: client, window: 1h, messages: 500 }
    ///
    /// rules:                     # authenticated relaying; first match wins
    ///   - name: helpdesk-shared
    ///     groups: [helpdesk]     # and/or users: ['DEMO\alice', bob]
    ///                            #   (users: ["*"] = any authenticated client)
    ///     mechanisms: [ntlm]     # optional conditions: mechanisms,
    ///     networks: [10.0.0.0/8] #   networks, listeners, tls
    ///     tls: true
    ///     recipient_domains: ["*"]      # required; "*" or domains
    ///     senders: [directory, helpdesk@example.test, "{user}@example.test"]
    ///     max_recipients: 50
    ///     max_message_size: 25 MiB
    ///     allow_address_literals: false
    ///     rates:
    ///       - { per: principal, window: 1h, messages: 100, recipients: 1000 }
    ///
    /// trusted_networks:          # relaying WITHOUT authentication
    ///   - name: scanner
    ///     networks: [10.9.0.0/24]
    ///     recipient_domains: [internal.test]   # "may relay to internal only"
    ///     senders: ["*@example.test"]   # default "*": the network is trusted
    /// ```
    ///
    /// Rules are consulted only for recipients that are not local (or whose
    /// local part routes elsewhere); `rules` before `trusted_networks`. No
    /// match is a refusal. A rule with no `senders` uses
    /// `sender_binding.senders`. Quote `*`, `*.domain` and `{user}@...`:
    /// unquoted, YAML reads them as an alias or a mapping.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        known: Option<&KnownPrincipals>,
    ) -> Result<Policy, PolicyError> {
        let raw = file::parse(text, origin, known)?;
        Ok(Policy::compile(raw, origin))
    }

    /// Reads and parses a policy file.
    pub fn load(path: &FsPath, known: Option<&KnownPrincipals>) -> Result<Policy, PolicyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            origin: origin.clone(),
            source,
        })?;
        Policy::from_yaml(&text, &origin, known)
    }

    fn compile(raw: RawPolicy, origin: &str) -> Policy {
        let binding = Binding {
            senders: raw.sender_binding.senders,
            allow_null_sender: raw.sender_binding.allow_null_sender,
            check_header_from: raw.sender_binding.check_header_from,
        };
        let mut rules = Vec::with_capacity(raw.rules.len() + raw.trusted_networks.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let who = if r
                .users
                .iter()
                .any(|u| matches!(u, file::UserSpec::Any { .. }))
            {
                Who::Authenticated
            } else {
                Who::Listed {
                    users: r.users,
                    groups: r.groups,
                }
            };
            let s = r.settings;
            rules.push(Rule {
                name: r.name,
                kind: RuleKind::Rule,
                path: format!("rules[{i}]"),
                who,
                mechanisms: r.mechanisms,
                networks: r.networks,
                listeners: r.listeners,
                tls: r.tls,
                recipients: rules::recipients_of(&r.recipient_domains),
                senders: s.senders.unwrap_or_else(|| binding.senders.clone()),
                allow_null_sender: s.allow_null_sender.unwrap_or(binding.allow_null_sender),
                allow_address_literals: s.allow_address_literals,
                max_recipients: s.max_recipients,
                max_message_size: s.max_message_size,
                check_header_from: s.check_header_from.unwrap_or(binding.check_header_from),
                rates: s.rates,
            });
        }
        for (i, t) in raw.trusted_networks.into_iter().enumerate() {
            let s = t.settings;
            rules.push(Rule {
                name: t.name,
                kind: RuleKind::Trusted,
                path: format!("trusted_networks[{i}]"),
                who: Who::Anyone,
                mechanisms: None,
                networks: Some(t.networks),
                listeners: t.listeners,
                tls: t.tls,
                recipients: rules::recipients_of(&t.recipient_domains),
                senders: s.senders.unwrap_or_else(|| vec![SenderPattern::Any]),
                allow_null_sender: s.allow_null_sender.unwrap_or(false),
                allow_address_literals: s.allow_address_literals,
                max_recipients: s.max_recipients,
                max_message_size: s.max_message_size,
                check_header_from: s.check_header_from.unwrap_or(false),
                rates: s.rates,
            });
        }
        let local: Vec<DomainPattern> = raw.local_domains.into_iter().map(|d| d.0).collect();
        let listener_names: Vec<String> = raw.listeners.keys().map(|n| n.0.clone()).collect();
        let require_auth: HashSet<String> = raw
            .listeners
            .into_iter()
            .filter(|(_, l)| l.require_auth)
            .map(|(n, _)| n.0)
            .collect();
        let auth_only: Vec<String> = require_auth.iter().cloned().collect();
        let warnings = rules::analyse(&rules, &local, &auth_only)
            .into_iter()
            .map(|w| format!("{origin}: {w}"))
            .collect();
        Policy {
            origin: origin.to_owned(),
            local_exact: local
                .iter()
                .filter_map(|p| match p {
                    DomainPattern::Exact(d) => Some(d.clone()),
                    DomainPattern::Subdomains(_) => None,
                })
                .collect(),
            local_parents: local
                .iter()
                .filter_map(|p| match p {
                    DomainPattern::Subdomains(d) => Some(d.clone()),
                    DomainPattern::Exact(_) => None,
                })
                .collect(),
            local_skeletons: local
                .iter()
                .map(|p| (address::skeleton(p.base()), p.clone()))
                .collect(),
            local,
            listener_names,
            require_auth,
            binding,
            rates: raw.rates,
            index: Index::build(&rules),
            rules,
            warnings,
        }
    }

    /// The file this policy came from, as given to [`Policy::from_yaml`].
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn local_domains(&self) -> &[DomainPattern] {
        &self.local
    }

    /// Whether `domain` (any spelling a client might send that canonicalises
    /// to it) is local.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        address::canonical_domain(domain).is_ok_and(|d| self.is_local(&d))
    }

    fn is_local(&self, canonical: &str) -> bool {
        if self.local_exact.contains(canonical) {
            return true;
        }
        let mut rest = canonical;
        while let Some((_, parent)) = rest.split_once('.') {
            if self.local_parents.contains(parent) {
                return true;
            }
            rest = parent;
        }
        false
    }

    /// Whether the listener refuses clients that have not authenticated.
    pub fn requires_auth(&self, listener: &str) -> bool {
        self.require_auth.contains(listener)
    }

    /// Rule and trusted-network names, in the order they are consulted.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The longest rate window, to size [`RateLimiter::with_capacity`].
    pub fn longest_window(&self) -> Option<Duration> {
        self.rates
            .iter()
            .chain(self.rules.iter().flat_map(|r| &r.rates))
            .map(|r| r.window)
            .max()
    }

    /// Problems that do not stop loading but that `relayguard check`
    /// reports: rules shadowed by an earlier rule, rules that can never
    /// match, settings without effect.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// Refuses listener names the gateway does not have: a rule for a
    /// misspelt listener would silently never match. The policy cannot
    /// check this itself because listeners live in the gateway's
    /// configuration.
    pub fn check_listeners(&self, known: &[&str]) -> Result<(), PolicyError> {
        let unknown = |field: String, name: &str| {
            PolicyError::Invalid(crate::located::Located::new(
                self.origin.clone(),
                None,
                None,
                field,
                format!(
                    "no listener is named `{name}` (listeners: {})",
                    known.join(", ")
                ),
            ))
        };
        for name in &self.listener_names {
            if !known.contains(&name.as_str()) {
                return Err(unknown(format!("listeners.{name}"), name));
            }
        }
        for r in &self.rules {
            for (i, l) in r.listeners.iter().flatten().enumerate() {
                if !known.contains(&l.as_str()) {
                    return Err(unknown(format!("{}.listeners[{i}]", r.path), l));
                }
            }
        }
        Ok(())
    }

    /// At MAIL FROM: may this client use this sender?
    ///
    /// `from` is the raw path between `<` and `>` as sent (empty for the
    /// null sender). Checks the listener's AUTH requirement, sender binding
    /// for authenticated clients, and counts the message against the
    /// top-level rates.
    ///
    /// Sender binding here cannot know which rule will relay (there is no
    /// recipient yet), so the sender is accepted if `sender_binding` or any
    /// rule that matches this client allows it; at RCPT the rule that
    /// actually relays must allow it too.
    pub fn check_sender(
        &self,
        ctx: &Context<'_>,
        from: &str,
        now: SystemTime,
        limits: &RateLimiter,
    ) -> SenderDecision {
        self.sender_decision(ctx, from, Some((now, limits)))
    }

    /// Whether `ctx` may use `from` as a sender, without counting anything
    /// against a rate: for the header `From:` check, after MAIL FROM
    /// already counted the message.
    pub fn sender_allowed(&self, ctx: &Context<'_>, from: &str) -> SenderDecision {
        self.sender_decision(ctx, from, None)
    }

    fn sender_decision(
        &self,
        ctx: &Context<'_>,
        from: &str,
        limits: Option<(SystemTime, &RateLimiter)>,
    ) -> SenderDecision {
        let from = match address::parse_path(from, Role::Sender) {
            Ok(p) => p,
            Err(e) => return Refusal::address(&e, Role::Sender).into(),
        };
        if self.requires_auth(ctx.listener) && ctx.principal.is_none() {
            return Refusal::auth_required().into();
        }
        let p = Prepared::new(ctx);
        if let Err(r) = self.sender_bound(&p, &from) {
            return r.into();
        }
        if let Some((now, limiter)) = limits {
            let charges = self.charges(&p, None, &self.rates, 1, 0);
            if let Err((retry_after, i)) = limiter.charge(now, &charges) {
                return SenderDecision::RateLimited {
                    retry_after,
                    rule: rule_of(&charges[i]),
                };
            }
        }
        SenderDecision::Accept
    }

    /// Sender binding for an authenticated client, whatever the recipient:
    /// `sender_binding` or any rule matching the client must allow it.
    /// Unauthenticated clients send inbound mail, whose sender is not ours
    /// to bind; what a trusted network may relay is decided at RCPT.
    fn sender_bound(&self, p: &Prepared<'_>, from: &Path) -> Result<(), Refusal> {
        let Some(principal) = p.principal else {
            return Ok(());
        };
        let candidates = || {
            self.index
                .client_candidates(p)
                .into_iter()
                .map(|i| &self.rules[i])
                .filter(|r| r.matches_client(p))
        };
        match from {
            Path::Null => {
                if self.binding.allow_null_sender || candidates().any(|r| r.allow_null_sender) {
                    Ok(())
                } else {
                    Err(Refusal::new(
                        553,
                        (5, 7, 1),
                        format!("Null sender not permitted for {principal}"),
                        None,
                        "null_sender",
                    ))
                }
            }
            Path::Mailbox { mailbox, .. } => {
                if rules::senders_allow(&self.binding.senders, Some(principal), mailbox)
                    || candidates().any(|r| r.sender_allowed(Some(principal), mailbox))
                {
                    Ok(())
                } else {
                    Err(Refusal::new(
                        553,
                        (5, 7, 1),
                        format!("Sender address rejected: <{mailbox}> is not owned by {principal}"),
                        None,
                        "sender_mismatch",
                    ))
                }
            }
            Path::Postmaster => Err(Refusal::address(
                &AddressError::Syntax("missing domain"),
                Role::Sender,
            )),
        }
    }

    /// At each RCPT TO: may this recipient be accepted?
    ///
    /// `from` and `to` are the raw paths as sent; `rcpt_index` is the number
    /// of recipients already accepted in this transaction (so the first
    /// accepted recipient has 0): it enforces `max_recipients`, and a
    /// rule's `messages` rate counts a message when its first recipient is
    /// accepted.
    pub fn check_recipient(
        &self,
        ctx: &Context<'_>,
        from: &str,
        to: &str,
        rcpt_index: usize,
        now: SystemTime,
        limits: &RateLimiter,
    ) -> RcptDecision {
        self.rcpt_decision(ctx, from, to, rcpt_index, Some((now, limits)), None, None)
            .0
    }

    /// [`Policy::check_recipient`] for a gateway that keeps, per
    /// transaction, the names of the rules that already counted this
    /// message (`charged`, empty at MAIL FROM): a rule's `messages` rate
    /// then counts the message at the first recipient *that rule* relays,
    /// whatever recipients came before it.
    #[allow(clippy::too_many_arguments)]
    pub fn check_recipient_in_transaction(
        &self,
        ctx: &Context<'_>,
        from: &str,
        to: &str,
        rcpt_index: usize,
        charged: &mut std::collections::BTreeSet<String>,
        now: SystemTime,
        limits: &RateLimiter,
    ) -> RcptDecision {
        self.rcpt_decision(
            ctx,
            from,
            to,
            rcpt_index,
            Some((now, limits)),
            None,
            Some(charged),
        )
        .0
    }

    /// The recipient decision, optionally recording why each rule before
    /// the winner did not match (`trace`, for explanations; then every rule
    /// is scanned in order instead of using the index).
    #[allow(clippy::too_many_arguments)]
    fn rcpt_decision(
        &self,
        ctx: &Context<'_>,
        from: &str,
        to: &str,
        rcpt_index: usize,
        limits: Option<(SystemTime, &RateLimiter)>,
        trace: Option<&mut Vec<Step>>,
        charged: Option<&mut std::collections::BTreeSet<String>>,
    ) -> (RcptDecision, Option<Dest>) {
        let to = match address::parse_path(to, Role::Recipient) {
            Ok(p) => p,
            Err(e) => return (Refusal::address(&e, Role::Recipient).into(), None),
        };
        let from = match address::parse_path(from, Role::Sender) {
            Ok(p) => p,
            Err(e) => return (Refusal::address(&e, Role::Sender).into(), None),
        };
        if self.requires_auth(ctx.listener) && ctx.principal.is_none() {
            return (Refusal::auth_required().into(), None);
        }
        let dest = match self.classify(&to) {
            Ok(d) => d,
            Err(r) => return (r.into(), None),
        };
        let p = Prepared::new(ctx);
        let decision = match &dest {
            Dest::Local => self.accept_local(&p, &from, limits),
            Dest::Relay {
                hops,
                via_local_part,
            } => {
                let rule = match (trace, hops.first()) {
                    (Some(steps), _) => self.scan(&p, hops, steps),
                    (None, Some(first)) => self
                        .index
                        .candidates(&p, first)
                        .map(|i| &self.rules[i])
                        .find(|r| r.matches(&p, hops)),
                    (None, None) => None,
                };
                match rule {
                    Some(rule) => self.relay(&p, rule, &from, hops, rcpt_index, limits, charged),
                    None => no_rule(&p, &dest, *via_local_part).into(),
                }
            }
        };
        (decision, Some(dest))
    }

    fn scan<'r>(
        &'r self,
        p: &Prepared<'_>,
        hops: &[Host],
        steps: &mut Vec<Step>,
    ) -> Option<&'r Rule> {
        for r in &self.rules {
            let why = r.why_not(p, hops);
            let matched = why.is_empty();
            steps.push(Step {
                rule: r.name.clone(),
                path: r.path.clone(),
                kind: r.kind.describe(),
                outcome: if matched {
                    StepOutcome::Matched
                } else {
                    StepOutcome::NotMatched(why)
                },
            });
            if matched {
                return Some(r);
            }
        }
        None
    }

    fn classify(&self, to: &Path) -> Result<Dest, Refusal> {
        let mailbox = match to {
            // RFC 5321 §4.1.1.3: always accepted, and it names no host.
            Path::Postmaster => return Ok(Dest::Local),
            Path::Mailbox { mailbox, .. } => mailbox,
            Path::Null => {
                return Err(Refusal::address(
                    &AddressError::Syntax("null forward-path"),
                    Role::Recipient,
                ))
            }
        };
        match &mailbox.host {
            Host::Name(d) if self.is_local(d) => match mailbox.routing() {
                Ok(None) => Ok(Dest::Local),
                Ok(Some(hops)) => Ok(Dest::Relay {
                    hops,
                    via_local_part: true,
                }),
                Err(e) => Err(Refusal::address(&e, Role::Recipient)),
            },
            Host::Name(d) => {
                if let Some(like) = self.lookalike_of_local(d) {
                    return Err(Refusal::new(
                        553,
                        (5, 7, 1),
                        format!("Bad recipient address: {d} looks like the local domain {like}"),
                        None,
                        "lookalike",
                    ));
                }
                Ok(Dest::Relay {
                    hops: vec![mailbox.host.clone()],
                    via_local_part: false,
                })
            }
            Host::Literal(_) => Ok(Dest::Relay {
                hops: vec![mailbox.host.clone()],
                via_local_part: false,
            }),
        }
    }

    /// An internationalised domain that is not local but looks like one that
    /// is (whole-script confusables such as an all-Cyrillic `ехаmple`, which
    /// the mixed-script check cannot see).
    fn lookalike_of_local(&self, domain: &str) -> Option<&DomainPattern> {
        if !domain.split('.').any(|l| l.starts_with("xn--")) {
            return None;
        }
        let skel = address::skeleton(domain);
        self.local_skeletons
            .iter()
            .find(|(s, p)| match p {
                DomainPattern::Exact(_) => skel == *s,
                DomainPattern::Subdomains(_) => skel
                    .strip_suffix(s.as_str())
                    .is_some_and(|h| h.len() > 1 && h.ends_with('.')),
            })
            .map(|(_, p)| p)
    }

    fn accept_local(
        &self,
        p: &Prepared<'_>,
        from: &Path,
        limits: Option<(SystemTime, &RateLimiter)>,
    ) -> RcptDecision {
        // Re-checked here so that a caller that skipped check_sender, or an
        // explanation, still gets the binding.
        if let Err(r) = self.sender_bound(p, from) {
            return r.into();
        }
        if let Some((now, limiter)) = limits {
            let charges = self.charges(p, None, &self.rates, 0, 1);
            if let Err((retry_after, i)) = limiter.charge(now, &charges) {
                return RcptDecision::RateLimited {
                    retry_after,
                    rule: rule_of(&charges[i]),
                };
            }
        }
        RcptDecision::AcceptLocal {
            check_header_from: p.principal.is_some() && self.binding.check_header_from,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn relay(
        &self,
        p: &Prepared<'_>,
        rule: &Rule,
        from: &Path,
        hops: &[Host],
        rcpt_index: usize,
        limits: Option<(SystemTime, &RateLimiter)>,
        charged: Option<&mut std::collections::BTreeSet<String>>,
    ) -> RcptDecision {
        let r = Some(rule);
        if !rule.allow_address_literals && hops.iter().any(|h| matches!(h, Host::Literal(_))) {
            return Refusal::new(
                550,
                (5, 7, 1),
                format!(
                    "Relaying to address literals is not permitted (rule {})",
                    rule.name
                ),
                r,
                "address_literal",
            )
            .into();
        }
        let who = p
            .principal
            .map(ToString::to_string)
            .unwrap_or_else(|| "this network".into());
        match from {
            Path::Null if !rule.allow_null_sender => {
                return Refusal::new(
                    553,
                    (5, 7, 1),
                    format!("Null sender not permitted for {who} (rule {})", rule.name),
                    r,
                    "null_sender",
                )
                .into();
            }
            Path::Mailbox { mailbox, .. } if !rule.sender_allowed(p.principal, mailbox) => {
                return Refusal::new(
                    553,
                    (5, 7, 1),
                    format!(
                        "Sender address rejected: rule {} does not let {who} send as <{mailbox}>",
                        rule.name
                    ),
                    r,
                    "sender_mismatch",
                )
                .into();
            }
            _ => {}
        }
        if let Some(max) = rule.max_recipients {
            if rcpt_index >= max as usize {
                // RFC 5321 §4.5.3.1.10: 452, so the client sends the rest in
                // another transaction.
                return Refusal::new(
                    452,
                    (4, 5, 3),
                    format!(
                        "Too many recipients (rule {} allows {max} per message)",
                        rule.name
                    ),
                    r,
                    "too_many_recipients",
                )
                .into();
            }
        }
        if let (Some(max), Some(size)) = (rule.max_message_size, p.declared_size) {
            if size > max {
                // RFC 1870 §6.1: 552 for a declared size the server will
                // not take; for this recipient only, so the client can send
                // to the others.
                return Refusal::new(
                    552,
                    (5, 3, 4),
                    format!(
                        "Message size {size} exceeds the limit of rule {} ({max} bytes) for this recipient",
                        rule.name
                    ),
                    r,
                    "message_too_large",
                )
                .into();
            }
        }
        if let Some((now, limiter)) = limits {
            let first_for_rule = match &charged {
                Some(c) => !c.contains(&rule.name),
                None => rcpt_index == 0,
            };
            let mut charges = self.charges(p, None, &self.rates, 0, 1);
            charges.extend(self.charges(p, r, &rule.rates, u32::from(first_for_rule), 1));
            if let Err((retry_after, i)) = limiter.charge(now, &charges) {
                return RcptDecision::RateLimited {
                    retry_after,
                    rule: rule_of(&charges[i]),
                };
            }
            if let Some(c) = charged {
                c.insert(rule.name.clone());
            }
        }
        RcptDecision::AcceptRelay {
            rule: rule.name.clone(),
            max_message_size: rule.max_message_size,
            check_header_from: rule.check_header_from,
        }
    }

    /// The counters an event touches under `rates`.
    fn charges(
        &self,
        p: &Prepared<'_>,
        rule: Option<&Rule>,
        rates: &[RawRate],
        messages: u32,
        recipients: u32,
    ) -> Vec<Charge> {
        let mut out = Vec::new();
        for rate in rates {
            let subject = match rate.per {
                Per::Principal => match &p.user {
                    Some((d, u)) => Subject::Principal(format!("{d}\\{u}")),
                    None => continue,
                },
                Per::Client => Subject::client(p.ip),
            };
            let mut push = |kind, limit: Option<u32>, cost: u32| {
                if let (Some(limit), true) = (limit, cost > 0) {
                    out.push(Charge {
                        key: RateKey {
                            rule: rule.map(|r| r.name.clone()).unwrap_or_default(),
                            subject: subject.clone(),
                            kind,
                            window: rate.window,
                        },
                        limit,
                        cost,
                    });
                }
            };
            push(Kind::Messages, rate.messages, messages);
            push(Kind::Recipients, rate.recipients, recipients);
        }
        out
    }

    /// The decision for `from` → `to`, plus for each rule before the one
    /// that matched why it did not: for `relayguard policy explain`.
    /// Rates are not applied (an explanation must not use up a quota).
    pub fn explain(&self, ctx: &Context<'_>, from: &str, to: &str) -> Explanation {
        let sender = self.sender_decision(ctx, from, None);
        let mut steps = Vec::new();
        let (decision, dest) = self.rcpt_decision(ctx, from, to, 0, None, Some(&mut steps), None);
        Explanation {
            client: describe_client(ctx),
            from: canonical_or_raw(from, Role::Sender),
            to: canonical_or_raw(to, Role::Recipient),
            destination: dest.map(|d| match d {
                Dest::Local => "local domain: accepted without consulting rules".into(),
                d => format!("relay to {}", d.describe()),
            }),
            sender,
            steps,
            decision,
        }
    }
}

fn rule_of(c: &Charge) -> Option<String> {
    (!c.key.rule.is_empty()).then(|| c.key.rule.clone())
}

/// The default-deny refusal: no rule lets this client relay there.
fn no_rule(p: &Prepared<'_>, dest: &Dest, via_local_part: bool) -> Refusal {
    let to = dest.describe();
    match p.principal {
        // The MS02-011 case: authenticated, and still not allowed to relay.
        Some(principal) => Refusal::new(
            550,
            (5, 7, 1),
            format!(
                "Relaying denied: {principal} is authenticated but not permitted to relay to {to}"
            ),
            None,
            "relay_not_permitted",
        ),
        None if via_local_part => Refusal::new(
            550,
            (5, 7, 1),
            format!("Relaying denied: the address routes mail to {to}"),
            None,
            "relay_denied",
        ),
        None => Refusal::new(
            550,
            (5, 7, 1),
            format!("Relaying denied: {to} is not a local domain; authenticate to relay"),
            None,
            "relay_denied",
        ),
    }
}

fn describe_client(ctx: &Context<'_>) -> String {
    let who = match ctx.principal {
        Some(p) => format!("{p} ({})", p.mechanism.as_str()),
        None => "unauthenticated".into(),
    };
    format!(
        "{who} from {}, listener {}, {}",
        ctx.client_ip,
        ctx.listener,
        if ctx.tls { "TLS" } else { "no TLS" }
    )
}

fn canonical_or_raw(raw: &str, role: Role) -> String {
    match address::parse_path(raw, role) {
        Ok(p) => p.to_string(),
        Err(_) => format!("<{raw}>"),
    }
}

#[cfg(test)]
mod tests;
