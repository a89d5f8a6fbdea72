//! Compiled relay rules: matching, the lookup index, and the static
//! analysis behind `relayguard check` (shadowed and dead rules).
//!
//! A rule matches on who (principal, or anyone for a trusted network), how
//! (mechanism, TLS, listener), from where (client network) and to where
//! (recipient domains). Everything else on a rule — sender binding, limits,
//! rates — is a setting applied *after* it has won: first match wins, so a
//! rule's settings never make the search continue to a later rule. That
//! keeps "which rule decided" a single, explainable answer.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::address::{DomainPattern, Host, Mailbox};
use super::file::{GroupName, RawRate, RecipientPattern, SenderPattern, UserSpec};
use super::{Mechanism, Principal};
use crate::identity::fold_case;

/// Where a rule came from: authenticated relay rules are consulted first,
/// then trusted networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RuleKind {
    Rule,
    Trusted,
}

/// Whose mail a rule is for.
#[derive(Debug, Clone)]
pub(crate) enum Who {
    /// A trusted network: any client, authenticated or not.
    Anyone,
    /// `users: ["*"]`: any authenticated principal.
    Authenticated,
    /// Any listed user, or any member of a listed group.
    Listed {
        users: Vec<UserSpec>,
        groups: Vec<GroupName>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub name: String,
    pub kind: RuleKind,
    /// `rules[3]` or `trusted_networks[0]`, for messages.
    pub path: String,
    pub who: Who,
    pub mechanisms: Option<Vec<Mechanism>>,
    pub networks: Option<Vec<IpNet>>,
    pub listeners: Option<Vec<String>>,
    pub tls: Option<bool>,
    /// `None` is `*`.
    pub recipients: Option<Vec<DomainPattern>>,
    pub senders: Vec<SenderPattern>,
    pub allow_null_sender: bool,
    pub allow_address_literals: bool,
    pub max_recipients: Option<u32>,
    pub max_message_size: Option<u64>,
    pub check_header_from: bool,
    pub rates: Vec<RawRate>,
}

impl RuleKind {
    pub fn describe(self) -> &'static str {
        match self {
            RuleKind::Rule => "rule",
            RuleKind::Trusted => "trusted network",
        }
    }
}

pub(crate) fn recipients_of(list: &[RecipientPattern]) -> Option<Vec<DomainPattern>> {
    if list.contains(&RecipientPattern::Any) {
        return None;
    }
    Some(
        list.iter()
            .filter_map(|p| match p {
                RecipientPattern::Domain(d) => Some(d.clone()),
                RecipientPattern::Any => None,
            })
            .collect(),
    )
}

/// The parts of a request a rule looks at, folded once per decision.
pub(crate) struct Prepared<'a> {
    pub principal: Option<&'a Principal>,
    /// Folded `(domain, user)`.
    pub user: Option<(String, String)>,
    /// Folded.
    pub groups: Vec<String>,
    /// IPv4-mapped IPv6 addresses are unmapped, so `10.0.0.0/8` matches a
    /// client that a dual-stack socket reports as `::ffff:10.1.2.3`.
    pub ip: IpAddr,
    pub listener: &'a str,
    pub tls: bool,
    pub declared_size: Option<u64>,
}

impl<'a> Prepared<'a> {
    pub fn new(ctx: &super::Context<'a>) -> Self {
        let principal = ctx.principal;
        Prepared {
            principal,
            user: principal.map(|p| (fold_case(&p.domain), fold_case(&p.user))),
            groups: principal
                .map(|p| p.groups.iter().map(|g| fold_case(g)).collect())
                .unwrap_or_default(),
            ip: ctx.client_ip.to_canonical(),
            listener: ctx.listener,
            tls: ctx.tls,
            declared_size: ctx.declared_size,
        }
    }
}

impl Rule {
    /// Whether the rule matches the client, ignoring the recipient (used at
    /// MAIL FROM, where the recipient is not known yet).
    pub fn matches_client(&self, p: &Prepared<'_>) -> bool {
        self.who_matches(p)
            && self
                .mechanisms
                .as_ref()
                .is_none_or(|m| p.principal.is_some_and(|pr| m.contains(&pr.mechanism)))
            && self
                .networks
                .as_ref()
                .is_none_or(|n| n.iter().any(|n| n.contains(&p.ip)))
            && self
                .listeners
                .as_ref()
                .is_none_or(|l| l.iter().any(|l| l == p.listener))
            && self.tls.is_none_or(|t| t == p.tls)
    }

    /// Whether the rule matches the client and every host the recipient
    /// would be routed through.
    pub fn matches(&self, p: &Prepared<'_>, hops: &[Host]) -> bool {
        self.matches_client(p) && hops.iter().all(|h| self.host_matches(h))
    }

    fn who_matches(&self, p: &Prepared<'_>) -> bool {
        match &self.who {
            Who::Anyone => true,
            Who::Authenticated => p.principal.is_some(),
            Who::Listed { users, groups } => {
                let Some((domain, user)) = &p.user else {
                    return false;
                };
                users.iter().any(|u| match u {
                    UserSpec::Qualified {
                        domain: d, user: n, ..
                    } => d == domain && n == user,
                    UserSpec::Bare { user: n, .. } => n == user,
                    UserSpec::Any { .. } => true,
                }) || groups.iter().any(|g| p.groups.contains(&g.folded))
            }
        }
    }

    fn host_matches(&self, host: &Host) -> bool {
        match (&self.recipients, host) {
            (None, _) => true,
            // Only `*` reaches an address literal: a literal names no domain.
            (Some(_), Host::Literal(_)) => false,
            (Some(pats), Host::Name(d)) => pats.iter().any(|p| p.matches(d)),
        }
    }

    /// Why the rule does not match, in words, for `policy explain`; empty if
    /// it does. Must agree with [`Rule::matches`] (a test checks that on
    /// every row of the decision table).
    pub fn why_not(&self, p: &Prepared<'_>, hops: &[Host]) -> Vec<String> {
        let mut why = Vec::new();
        let who = p
            .principal
            .map(|pr| pr.to_string())
            .unwrap_or_else(|| "an unauthenticated client".into());
        if !self.who_matches(p) {
            why.push(match &self.who {
                Who::Authenticated => "the client did not authenticate".to_owned(),
                Who::Listed { .. } if p.principal.is_none() => {
                    "the client did not authenticate".to_owned()
                }
                Who::Listed { users, groups } => {
                    let users: Vec<&str> = users.iter().map(UserSpec::text).collect();
                    let groups: Vec<&str> = groups.iter().map(|g| g.text.as_str()).collect();
                    format!(
                        "{who} is not in users [{}] nor in groups [{}]",
                        users.join(", "),
                        groups.join(", ")
                    )
                }
                Who::Anyone => unreachable!("matches everyone"),
            });
        }
        // Without a principal the first reason already says it all.
        if let (Some(m), Some(pr)) = (&self.mechanisms, p.principal) {
            if !m.contains(&pr.mechanism) {
                let names: Vec<&str> = m.iter().map(|m| m.as_str()).collect();
                why.push(format!(
                    "authenticated with {} but the rule needs [{}]",
                    pr.mechanism.as_str(),
                    names.join(", ")
                ));
            }
        }
        if let Some(n) = &self.networks {
            if !n.iter().any(|n| n.contains(&p.ip)) {
                let nets: Vec<String> = n.iter().map(ToString::to_string).collect();
                why.push(format!("client {} is not in [{}]", p.ip, nets.join(", ")));
            }
        }
        if let Some(l) = &self.listeners {
            if !l.iter().any(|l| l == p.listener) {
                why.push(format!(
                    "listener `{}` is not in [{}]",
                    p.listener,
                    l.join(", ")
                ));
            }
        }
        if let Some(t) = self.tls {
            if t != p.tls {
                why.push(if t {
                    "the session is not using TLS".to_owned()
                } else {
                    "the rule is for sessions without TLS".to_owned()
                });
            }
        }
        for h in hops {
            if !self.host_matches(h) {
                let pats: Vec<String> = self
                    .recipients
                    .iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect();
                why.push(match h {
                    Host::Literal(_) => format!(
                        "{h} is an address literal and only `*` matches those (recipient_domains: [{}])",
                        pats.join(", ")
                    ),
                    Host::Name(_) => {
                        format!("{h} is not in recipient_domains [{}]", pats.join(", "))
                    }
                });
            }
        }
        why
    }

    /// Whether this rule's sender binding lets the client use `sender`.
    pub fn sender_allowed(&self, principal: Option<&Principal>, sender: &Mailbox) -> bool {
        senders_allow(&self.senders, principal, sender)
    }
}

/// Whether any pattern in `list` lets `principal` use `sender`.
pub(crate) fn senders_allow(
    list: &[SenderPattern],
    principal: Option<&Principal>,
    sender: &Mailbox,
) -> bool {
    let mut key: Option<String> = None;
    let mut key = || key.get_or_insert_with(|| sender.key()).clone();
    list.iter().any(|pat| match pat {
        SenderPattern::Any => true,
        SenderPattern::Exact(a) => *a == key(),
        SenderPattern::AnyAt(d) => matches!(&sender.host, Host::Name(n) if d.matches(n)),
        SenderPattern::Directory => principal.is_some_and(|p| {
            let want = key();
            p.addresses
                .iter()
                .filter_map(|a| directory_address(a))
                .any(|a| a == want)
        }),
        SenderPattern::Template { local, domain } => principal.is_some_and(|p| {
            let local = local
                .replace("{user}", &p.user.to_ascii_lowercase())
                .replace("{domain}", &p.domain.to_ascii_lowercase());
            format!("{local}@{domain}") == key()
        }),
    })
}

/// The key of one of a principal's directory addresses. AD
/// `proxyAddresses` values carry a type prefix (`SMTP:` primary, `smtp:`
/// alias, `X500:`...): SMTP ones count, others name no mailbox.
fn directory_address(a: &str) -> Option<String> {
    let a = match a.split_once(':') {
        Some((kind, rest)) if kind.eq_ignore_ascii_case("smtp") => rest,
        Some((kind, _)) if !kind.contains('@') && !kind.starts_with('"') => return None,
        _ => a,
    };
    match super::address::parse_path(a, super::address::Role::Sender) {
        Ok(super::address::Path::Mailbox { mailbox, .. }) => Some(mailbox.key()),
        _ => None,
    }
}

/// Rule ids by what they match on, so a decision looks at the few rules
/// that can concern this principal and this domain instead of all of them.
#[derive(Debug, Default)]
pub(crate) struct Index {
    words: usize,
    by_user: HashMap<(String, String), Vec<u32>>,
    by_bare_user: HashMap<String, Vec<u32>>,
    by_group: HashMap<String, Vec<u32>>,
    authenticated: Vec<u32>,
    anyone: Vec<u32>,
    by_domain: HashMap<String, Vec<u32>>,
    /// `*.corp.test` is filed under `corp.test`.
    by_parent: HashMap<String, Vec<u32>>,
    any_domain: Vec<u32>,
}

/// A set of rule ids, iterated in rule order (first match wins).
struct Bits(Vec<u64>);

impl Bits {
    fn new(words: usize) -> Self {
        Bits(vec![0; words])
    }
    fn add(&mut self, ids: &[u32]) {
        for &i in ids {
            self.0[i as usize / 64] |= 1 << (i % 64);
        }
    }
    fn and(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a &= b;
        }
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + b)
            })
        })
    }
}

impl Index {
    pub fn build(rules: &[Rule]) -> Self {
        let mut ix = Index {
            words: rules.len().div_ceil(64),
            ..Index::default()
        };
        for (i, r) in rules.iter().enumerate() {
            let i = i as u32;
            match &r.who {
                Who::Anyone => ix.anyone.push(i),
                Who::Authenticated => ix.authenticated.push(i),
                Who::Listed { users, groups } => {
                    for u in users {
                        match u {
                            UserSpec::Qualified { domain, user, .. } => ix
                                .by_user
                                .entry((domain.clone(), user.clone()))
                                .or_default()
                                .push(i),
                            UserSpec::Bare { user, .. } => {
                                ix.by_bare_user.entry(user.clone()).or_default().push(i)
                            }
                            UserSpec::Any { .. } => ix.authenticated.push(i),
                        }
                    }
                    for g in groups {
                        ix.by_group.entry(g.folded.clone()).or_default().push(i);
                    }
                }
            }
            match &r.recipients {
                None => ix.any_domain.push(i),
                Some(pats) => {
                    for p in pats {
                        match p {
                            DomainPattern::Exact(d) => {
                                ix.by_domain.entry(d.clone()).or_default().push(i)
                            }
                            DomainPattern::Subdomains(d) => {
                                ix.by_parent.entry(d.clone()).or_default().push(i)
                            }
                        }
                    }
                }
            }
        }
        ix
    }

    /// The rules that may concern this client (by who it is), in order.
    fn client_bits(&self, p: &Prepared<'_>) -> Bits {
        let mut bits = Bits::new(self.words);
        bits.add(&self.anyone);
        if let Some((domain, user)) = &p.user {
            bits.add(&self.authenticated);
            // One lookup key per call: the map is keyed by owned pairs.
            if let Some(ids) = self.by_user.get(&(domain.clone(), user.clone())) {
                bits.add(ids);
            }
            if let Some(ids) = self.by_bare_user.get(user) {
                bits.add(ids);
            }
            for g in &p.groups {
                if let Some(ids) = self.by_group.get(g) {
                    bits.add(ids);
                }
            }
        }
        bits
    }

    /// Ids of rules that may match the client, in order.
    pub fn client_candidates(&self, p: &Prepared<'_>) -> Vec<usize> {
        self.client_bits(p).iter().collect()
    }

    /// Ids of rules that may match the client and `first_hop`, in order.
    pub fn candidates(&self, p: &Prepared<'_>, first_hop: &Host) -> impl Iterator<Item = usize> {
        let mut bits = self.client_bits(p);
        let mut dom = Bits::new(self.words);
        dom.add(&self.any_domain);
        if let Host::Name(d) = first_hop {
            if let Some(ids) = self.by_domain.get(d.as_str()) {
                dom.add(ids);
            }
            let mut rest = d.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(ids) = self.by_parent.get(parent) {
                    dom.add(ids);
                }
                rest = parent;
            }
        }
        bits.and(&dom);
        let ids: Vec<usize> = bits.iter().collect();
        ids.into_iter()
    }
}

/// Per-rule lookup sets for the shadowing analysis, so comparing 1,000
/// rules pairwise stays cheap.
struct Sets {
    users: HashSet<(String, String)>,
    bare: HashSet<String>,
    groups: HashSet<String>,
}

fn sets(r: &Rule) -> Sets {
    let mut s = Sets {
        users: HashSet::new(),
        bare: HashSet::new(),
        groups: HashSet::new(),
    };
    if let Who::Listed { users, groups } = &r.who {
        for u in users {
            match u {
                UserSpec::Qualified { domain, user, .. } => {
                    s.users.insert((domain.clone(), user.clone()));
                }
                UserSpec::Bare { user, .. } => {
                    s.bare.insert(user.clone());
                }
                UserSpec::Any { .. } => {}
            }
        }
        s.groups.extend(groups.iter().map(|g| g.folded.clone()));
    }
    s
}

/// Whether `a` matches every request `b` matches, so that `b`, coming
/// later, can never be the first match.
fn covers(a: &Rule, sa: &Sets, b: &Rule) -> bool {
    let who = match (&a.who, &b.who) {
        (Who::Anyone, _) => true,
        (Who::Authenticated, Who::Anyone) => false,
        (Who::Authenticated, _) => true,
        (Who::Listed { .. }, Who::Listed { users, groups }) => {
            users.iter().all(|u| match u {
                UserSpec::Qualified { domain, user, .. } => {
                    sa.users.contains(&(domain.clone(), user.clone())) || sa.bare.contains(user)
                }
                UserSpec::Bare { user, .. } => sa.bare.contains(user),
                UserSpec::Any { .. } => false,
            }) && groups.iter().all(|g| sa.groups.contains(&g.folded))
        }
        (Who::Listed { .. }, _) => false,
    };
    fn subset<T: PartialEq>(a: &Option<Vec<T>>, b: &Option<Vec<T>>) -> bool {
        match (a, b) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b.iter().all(|x| a.contains(x)),
        }
    }
    who && subset(&a.mechanisms, &b.mechanisms)
        && subset(&a.listeners, &b.listeners)
        && match (&a.networks, &b.networks) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(an), Some(bn)) => bn.iter().all(|n| an.iter().any(|m| m.contains(n))),
        }
        && (a.tls.is_none() || a.tls == b.tls)
        && match (&a.recipients, &b.recipients) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ap), Some(bp)) => bp.iter().all(|p| ap.iter().any(|q| q.covers(p))),
        }
}

/// Problems that do not stop loading but that `relayguard check` reports.
pub(crate) fn analyse(
    rules: &[Rule],
    local: &[DomainPattern],
    auth_only_listeners: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    let sets: Vec<Sets> = rules.iter().map(sets).collect();
    for (j, b) in rules.iter().enumerate() {
        let label = |r: &Rule| format!("{} `{}`", r.path, r.name);
        if let Some(i) = (0..j).find(|&i| covers(&rules[i], &sets[i], b)) {
            out.push(format!(
                "{} is shadowed by {}: every request it matches is decided by that earlier {} first",
                label(b),
                label(&rules[i]),
                rules[i].kind.describe(),
            ));
            continue;
        }
        if let Some(pats) = &b.recipients {
            if pats.iter().all(|p| local.iter().any(|l| l.covers(p))) {
                out.push(format!(
                    "{} can never match: every domain in its recipient_domains is local, \
                     and mail to local domains is accepted without consulting rules",
                    label(b)
                ));
                continue;
            }
            if b.allow_address_literals {
                out.push(format!(
                    "{}: allow_address_literals has no effect, only recipient_domains [\"*\"] \
                     matches address literals",
                    label(b)
                ));
            }
        }
        if b.kind == RuleKind::Trusted {
            if let Some(l) = &b.listeners {
                if l.iter().all(|l| auth_only_listeners.contains(l)) {
                    out.push(format!(
                        "{} only names listeners that require AUTH, where unauthenticated \
                         clients are refused before any rule is consulted",
                        label(b)
                    ));
                }
            }
        }
    }
    out
}
