//! Where the relay policy comes from: its own file (`policy_file:`) or the
//! `policy:` section of the configuration, parsed by `policy::relay` with
//! errors that point at the right file and line either way.
//!
//! Loading also checks the policy against the rest of the configuration:
//! every user and group a rule names must exist in the users file (the
//! directory's groups are only known at run time), and every listener it
//! names must be configured.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use policy::relay::{KnownPrincipals, Policy, PolicyError};

use crate::config::Config;

/// The text of an inline `policy:` section, dedented, with where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineSection {
    pub text: String,
    /// Lines before the section's first line in the configuration file.
    pub line_offset: usize,
    /// Columns removed by dedenting.
    pub indent: usize,
}

/// Cuts the block under a top-level `key:` out of a YAML document, so that
/// the policy parser sees it as a document of its own. Flow style on the
/// key's own line (`policy: {…}`) is not supported: a block is expected.
pub fn inline_section(text: &str, key: &str) -> Option<InlineSection> {
    let lines: Vec<&str> = text.lines().collect();
    let head = format!("{key}:");
    let start = lines.iter().position(|l| {
        l.starts_with(&head)
            && l[head.len()..]
                .trim_start()
                .chars()
                .next()
                .is_none_or(|c| c == '#')
    })?;
    let body: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| {
            l.trim().is_empty() || l.starts_with(' ') || l.trim_start().starts_with('#')
        })
        .copied()
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        // YAML indents with spaces only; counting other (possibly
        // multi-byte) whitespace would slice inside a character.
        .map(|l| l.len() - l.trim_start_matches(' ').len())
        .min()?;
    let text = body
        .iter()
        .map(|l| {
            let spaces = l.len() - l.trim_start_matches(' ').len();
            &l[spaces.min(indent)..]
        })
        .collect::<Vec<_>>()
        .join("\n");
    Some(InlineSection {
        text,
        line_offset: start + 1,
        indent,
    })
}

/// Where a configuration's policy lives.
#[derive(Debug, Clone)]
pub enum PolicyLocation {
    File(PathBuf),
    Inline {
        origin: String,
        section: InlineSection,
    },
}

impl PolicyLocation {
    /// The file to watch for changes (the policy file, or the
    /// configuration file for an inline policy).
    pub fn watched(&self, config_path: Option<&Path>) -> Option<PathBuf> {
        match self {
            PolicyLocation::File(p) => Some(p.clone()),
            PolicyLocation::Inline { .. } => config_path.map(Path::to_path_buf),
        }
    }
}

/// The users and groups a policy may name, from the users file; `None`
/// (no check) with Active Directory, whose groups are looked up at run time.
pub fn known_principals(config: &Config) -> Result<Option<KnownPrincipals>, String> {
    let Some(auth) = &config.auth else {
        return Ok(Some(KnownPrincipals::default()));
    };
    match &auth.users_file {
        Some(path) => {
            let users = policy::identity::UsersFile::load(path).map_err(|e| e.to_string())?;
            Ok(Some(KnownPrincipals::from_accounts(users.accounts())))
        }
        None => Ok(None),
    }
}

/// Loads and checks the policy of `config`.
pub fn load(config: &Config) -> Result<Policy, String> {
    let known = known_principals(config)?;
    let policy = match &config.policy_location {
        Some(PolicyLocation::File(path)) => {
            Policy::load(path, known.as_ref()).map_err(|e| e.to_string())?
        }
        Some(PolicyLocation::Inline { origin, section }) => {
            Policy::from_yaml(&section.text, origin, known.as_ref())
                .map_err(|e| relocate(e, section).to_string())?
        }
        None => return Err("no relay policy: set `policy_file` or a `policy:` section".into()),
    };
    let listeners: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
    policy
        .check_listeners(&listeners)
        .map_err(|e| e.to_string())?;
    Ok(policy)
}

/// Moves a position inside the cut-out section back to the configuration file.
fn relocate(e: PolicyError, section: &InlineSection) -> PolicyError {
    match e {
        PolicyError::Invalid(mut e) => {
            e.line = e.line.map(|l| l + section.line_offset);
            e.column = e.column.map(|c| c + section.indent);
            e.field = format!("policy.{}", e.field);
            PolicyError::Invalid(e)
        }
        other => other,
    }
}

/// Modification time of a file, to notice changes without inotify.
pub fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_section_is_cut_and_dedented() {
        let text = "hostname: x\npolicy:\n  # comment\n  local_domains: [a.test]\n  rules:\n    - name: r\n\nshutdown:\n  drain_timeout: 1s\n";
        let s = inline_section(text, "policy").unwrap();
        assert_eq!(s.line_offset, 2);
        assert_eq!(s.indent, 2);
        assert_eq!(
            s.text,
            "# comment\nlocal_domains: [a.test]\nrules:\n  - name: r\n"
        );
        assert!(inline_section("policyx:\n  a: 1\n", "policy").is_none());
    }

    #[test]
    fn errors_in_an_inline_section_point_into_the_config_file() {
        let text = "hostname: x\npolicy:\n  local_domains: [a.test]\n  rulez: []\n";
        let s = inline_section(text, "policy").unwrap();
        let e = Policy::from_yaml(&s.text, "c.yaml", None).unwrap_err();
        let e = relocate(e, &s).to_string();
        assert!(e.starts_with("c.yaml:4:3"), "{e}");
        assert!(e.contains("rulez"), "{e}");
    }

    /// Found while writing the `config_loader` fuzz target (by reading the code):
    /// `inline_section` measures each line's indent with `trim_start`,
    /// which also strips Unicode whitespace such as U+00A0, then slices
    /// every line at the smallest indent in bytes. A flow sequence whose
    /// continuation line starts with " \u{a0}" gives an indent of 2 and a
    /// slice inside the two-byte U+00A0, and `Config::from_yaml` (so
    /// `relayguard check` and start-up) panics instead of reporting.
    #[test]
    fn regression_config_loader_inline_policy_non_ascii_indent() {
        let text = "listeners:\n  - name: smtp\n    address: 127.0.0.1:25\n    tls: none\n\
                    backend:\n  servers: [\"127.0.0.1:25\"]\n\
                    policy:\n  local_domains: [a.test,\n \u{a0}b.test]\n";
        // Must not panic; whether it is accepted is up to the YAML parser.
        let _ = Config::from_yaml(text, "c.yaml");
        let _ = inline_section(text, "policy");
    }
}
