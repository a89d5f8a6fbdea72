//! `relayguard policy explain`: a decision with its reasons.
//!
//! An operator asking "why was bob refused?" needs more than the verdict:
//! which rule decided, and for every rule consulted before it, which
//! condition failed. Explanations scan the rules in order instead of using
//! the index, so they also serve as the reference the indexed lookup is
//! tested against.

use std::fmt;

use super::{RcptDecision, SenderDecision};

/// The outcome of one rule while looking for the first match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    Matched,
    /// Each condition that failed, in words.
    NotMatched(Vec<String>),
}

/// One rule consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub rule: String,
    /// `rules[2]` or `trusted_networks[0]`.
    pub path: String,
    /// `rule` or `trusted network`.
    pub kind: &'static str,
    pub outcome: StepOutcome,
}

/// See [`super::Policy::explain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Who is asking, from where, on which listener.
    pub client: String,
    /// Canonical sender and recipient (or the raw text if unparseable).
    pub from: String,
    pub to: String,
    /// What the recipient is, once canonicalised: local, or the hosts a
    /// relay would reach. `None` if the recipient was refused first.
    pub destination: Option<String>,
    /// The MAIL FROM decision (without rates).
    pub sender: SenderDecision,
    /// Rules consulted, in order, up to and including the one that matched.
    pub steps: Vec<Step>,
    /// The RCPT TO decision (without rates).
    pub decision: RcptDecision,
}

impl Explanation {
    /// Whether the envelope would be accepted: both MAIL FROM and RCPT TO.
    /// `relayguard policy explain` exits with this.
    pub fn is_allowed(&self) -> bool {
        self.sender.is_accept() && self.decision.is_accept()
    }

    /// The rule that matched, if one did.
    pub fn matched_rule(&self) -> Option<&str> {
        self.steps
            .iter()
            .find(|s| s.outcome == StepOutcome::Matched)
            .map(|s| s.rule.as_str())
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "client:    {}", self.client)?;
        write!(f, "sender:    {}: ", self.from)?;
        match &self.sender {
            SenderDecision::Accept => writeln!(f, "accepted")?,
            other => {
                let (code, (a, b, c), text) = other.reply();
                writeln!(f, "refused at MAIL FROM: {code} {a}.{b}.{c} {text}")?;
            }
        }
        write!(f, "recipient: {}", self.to)?;
        match &self.destination {
            Some(d) => writeln!(f, ": {d}")?,
            None => writeln!(f)?,
        }
        for s in &self.steps {
            match &s.outcome {
                StepOutcome::Matched => {
                    writeln!(f, "  {} `{}` ({}): MATCHED", s.path, s.rule, s.kind)?
                }
                StepOutcome::NotMatched(why) => writeln!(
                    f,
                    "  {} `{}` ({}): no match: {}",
                    s.path,
                    s.rule,
                    s.kind,
                    why.join("; ")
                )?,
            }
        }
        let relayed = self
            .destination
            .as_deref()
            .is_some_and(|d| d.starts_with("relay"));
        if relayed && self.matched_rule().is_none() {
            writeln!(f, "  no rule matched: default deny")?;
        }
        let final_reply = if self.sender.is_accept() {
            self.decision.reply()
        } else {
            self.sender.reply()
        };
        let (code, (a, b, c), text) = final_reply;
        if self.is_allowed() {
            let how = match &self.decision {
                RcptDecision::AcceptRelay { rule, .. } => format!("relay by `{rule}`"),
                _ => "local delivery".into(),
            };
            write!(f, "decision:  ALLOW ({how})")
        } else {
            write!(f, "decision:  DENY {code} {a}.{b}.{c} {text}")
        }
    }
}
