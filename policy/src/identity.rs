//! Who may authenticate: the accounts that NTLM (and any later mechanism)
//! verifies credentials against.
//!
//! The gateway never sees passwords at rest: a users file holds each
//! account's NT hash (MD4 of the UTF-16LE password), which is all NTLM needs.
//! Group membership travels with the account so the relay-permission check,
//! which is separate from authentication, can decide without another lookup.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use md4::{Digest, Md4};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::located::Located;

/// One account as the policy sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    /// Canonical spelling, as written in the users file.
    pub user: String,
    pub domain: String,
    pub nt_hash: [u8; 16],
    pub groups: Vec<String>,
    pub enabled: bool,
    /// Addresses this account may use as envelope sender; empty when the file
    /// gives none.
    pub mail: Vec<String>,
}

impl fmt::Debug for Account {
    // The NT hash is a password equivalent (pass-the-hash), so it must never
    // reach a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("user", &self.user)
            .field("domain", &self.domain)
            .field("nt_hash", &"<redacted>")
            .field("groups", &self.groups)
            .field("enabled", &self.enabled)
            .field("mail", &self.mail)
            .finish()
    }
}

/// A source of accounts. Lookups ignore case in both user and domain, as
/// Windows does.
pub trait CredentialStore: Send + Sync {
    fn lookup(&self, domain: &str, user: &str) -> Option<Account>;
}

/// MD4(UTF-16LE(password)): the NT one-way function (NTOWFv1), used to fill
/// users files from a password.
pub fn nt_hash(password: &str) -> [u8; 16] {
    let mut md4 = Md4::new();
    for unit in password.encode_utf16() {
        md4.update(unit.to_le_bytes());
    }
    md4.finalize().into()
}

/// Windows-style case folding: one-to-one uppercase mapping per character.
///
/// Windows upcases with a per-UTF-16-unit table: it never expands a
/// character (`ß` stays `ß`, where `str::to_uppercase` gives `SS`) and never
/// touches characters outside the BMP (they are surrogate pairs to it).
/// NTOWFv2 hashes the uppercased user name, so matching Windows here decides
/// whether non-ASCII user names can log in at all.
pub(crate) fn upcase_char(c: char) -> char {
    if u32::from(c) > 0xFFFF {
        return c;
    }
    let mut up = c.to_uppercase();
    match (up.next(), up.next()) {
        (Some(u), None) if u32::from(u) <= 0xFFFF => u,
        _ => c,
    }
}

pub(crate) fn fold_case(s: &str) -> String {
    s.chars().map(upcase_char).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{origin}: cannot read users file: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// `field` is the path inside the document, such as `users[2].nt_hash`.
    #[error(transparent)]
    Invalid(Located),
}

/// Accounts loaded from a YAML users file.
///
/// ```yaml
/// users:
///   - user: alice
///     domain: DEMO
///     nt_hash: 0123456789abcdef0123456789abcdef
///     groups: [relay-senders]
///     enabled: true                # optional, default true
///     mail: [alice@example.test]   # optional
/// ```
#[derive(Debug, Clone, Default)]
pub struct UsersFile {
    accounts: Vec<Account>,
    /// (folded domain, folded user) -> index into `accounts`.
    index: HashMap<(String, String), usize>,
}

impl UsersFile {
    /// Parses a users file already in memory. `origin` names it in errors.
    pub fn parse(yaml: &str, origin: &str) -> Result<Self, IdentityError> {
        let de = serde_norway::Deserializer::from_str(yaml);
        let raw: RawFile = serde_path_to_error::deserialize(de)
            .map_err(|e| IdentityError::Invalid(Located::from_yaml_error(origin, e)))?;
        let mut file = UsersFile::default();
        for entry in raw.users {
            let key = (fold_case(&entry.domain), fold_case(&entry.user));
            // Duplicates were already refused while parsing, where the line
            // number is still known.
            file.index.insert(key, file.accounts.len());
            file.accounts.push(Account {
                user: entry.user.into(),
                domain: entry.domain.into(),
                nt_hash: entry.nt_hash.0,
                groups: entry.groups,
                enabled: entry.enabled,
                mail: entry.mail,
            });
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(&text, &origin)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.iter()
    }

    /// Every group any account belongs to, so relay rules naming an unknown
    /// group can be refused at start-up.
    pub fn groups(&self) -> BTreeSet<String> {
        self.accounts
            .iter()
            .flat_map(|a| a.groups.iter().cloned())
            .collect()
    }
}

impl CredentialStore for UsersFile {
    fn lookup(&self, domain: &str, user: &str) -> Option<Account> {
        self.index
            .get(&(fold_case(domain), fold_case(user)))
            .map(|&i| self.accounts[i].clone())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(deserialize_with = "unique_users")]
    users: Vec<RawAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    user: NonEmpty,
    domain: NonEmpty,
    nt_hash: HexHash,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    mail: Vec<String>,
}

fn default_true() -> bool {
    true
}

/// A non-empty string. Checked inside a visitor so the error carries the
/// scalar's own line (serde_norway attaches the position of the node being
/// deserialized when the error is raised).
struct NonEmpty(String);

impl std::ops::Deref for NonEmpty {
    type Target = String;
    fn deref(&self) -> &String {
        &self.0
    }
}

impl From<NonEmpty> for String {
    fn from(v: NonEmpty) -> String {
        v.0
    }
}

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NonEmpty;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-empty string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NonEmpty, E> {
                if v.trim().is_empty() {
                    Err(E::custom("must not be empty"))
                } else if v.chars().any(char::is_control) {
                    Err(E::custom("must not contain control characters"))
                } else {
                    Ok(NonEmpty(v.to_owned()))
                }
            }
        }
        d.deserialize_str(V)
    }
}

struct HexHash([u8; 16]);

impl<'de> Deserialize<'de> for HexHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HexHash;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an NT hash as 32 hexadecimal characters")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HexHash, E> {
                let mut out = [0u8; 16];
                hex::decode_to_slice(v, &mut out).map_err(|_| {
                    E::custom(format_args!(
                        "expected 32 hexadecimal characters (an NT hash), got {} characters{}",
                        v.chars().count(),
                        if v.bytes().all(|b| b.is_ascii_hexdigit()) {
                            ""
                        } else {
                            " including non-hex ones"
                        }
                    ))
                })?;
                Ok(HexHash(out))
            }
        }
        d.deserialize_str(V)
    }
}

/// Deserializes the `users` list, refusing a second entry for the same
/// (domain, user) pair with that entry's line.
fn unique_users<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RawAccount>, D::Error> {
    struct ListVisitor;
    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<RawAccount>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of accounts")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut seen = HashMap::new();
            let mut out = Vec::new();
            while let Some(entry) = seq.next_element_seed(EntrySeed {
                seen: &mut seen,
                position: out.len(),
            })? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(ListVisitor)
}

struct EntrySeed<'a> {
    seen: &'a mut HashMap<(String, String), usize>,
    position: usize,
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = RawAccount;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawAccount, D::Error> {
        // The duplicate check runs inside `visit_map` so that the error is
        // raised while the entry's mapping is being deserialized and so
        // carries the entry's line.
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_> {
    type Value = RawAccount;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an account mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawAccount, A::Error> {
        let entry = RawAccount::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let key = (fold_case(&entry.domain), fold_case(&entry.user));
        if let Some(first) = self.seen.insert(key, self.position) {
            return Err(de::Error::custom(format_args!(
                "duplicate account {}\\{} (also users[{first}]; user and domain ignore case)",
                *entry.domain, *entry.user
            )));
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
users:
  - user: alice
    domain: DEMO
    nt_hash: 0123456789abcdef0123456789ABCDEF
    groups: [relay-senders]
    mail: [alice@example.test]
  - user: Bob
    domain: demo
    nt_hash: a4f49c406510bdcab6824ee7c30fd852
    groups: [relay-senders, admins]
    enabled: false
";

    fn err(yaml: &str) -> (String, Option<usize>, String) {
        match UsersFile::parse(yaml, "users.yaml").unwrap_err() {
            IdentityError::Invalid(e) => (e.to_string(), e.line, e.field),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn nt_hash_is_md4_of_utf16le() {
        // [MS-NLMP] 4.2.2.1.2: NTOWFv1("Password").
        assert_eq!(
            hex::encode(nt_hash("Password")),
            "a4f49c406510bdcab6824ee7c30fd852"
        );
        assert_eq!(hex::encode(nt_hash("")), "31d6cfe0d16ae931b73c59d7e0c089c0");
    }

    #[test]
    fn parses_accounts_with_defaults() {
        let f = UsersFile::parse(GOOD, "users.yaml").unwrap();
        let accounts: Vec<_> = f.accounts().collect();
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[0].user, "alice");
        assert!(accounts[0].enabled, "enabled defaults to true");
        assert_eq!(accounts[0].mail, vec!["alice@example.test"]);
        assert_eq!(accounts[0].nt_hash[15], 0xef);
        assert!(!accounts[1].enabled);
        assert!(accounts[1].mail.is_empty());
        assert_eq!(
            f.groups().into_iter().collect::<Vec<_>>(),
            vec!["admins", "relay-senders"]
        );
    }

    #[test]
    fn lookup_ignores_case_and_returns_canonical_spelling() {
        let f = UsersFile::parse(GOOD, "users.yaml").unwrap();
        let a = f.lookup("demo", "ALICE").unwrap();
        assert_eq!((a.user.as_str(), a.domain.as_str()), ("alice", "DEMO"));
        let b = f.lookup("Demo", "bob").unwrap();
        assert_eq!(b.user, "Bob");
        assert!(f.lookup("OTHER", "alice").is_none());
        assert!(f.lookup("DEMO", "carol").is_none());
    }

    #[test]
    fn debug_output_redacts_the_hash() {
        let f = UsersFile::parse(GOOD, "users.yaml").unwrap();
        let dbg = format!("{:?}", f.lookup("DEMO", "alice").unwrap());
        assert!(dbg.contains("redacted"));
        assert!(!dbg.contains("0123456789"));
    }

    #[test]
    fn unknown_key_names_file_line_and_field() {
        let yaml = GOOD.replace("    mail: [alice", "    mial: [alice");
        let (text, line, field) = err(&yaml);
        assert_eq!(line, Some(6), "{text}");
        assert_eq!(field, "users[0].mial", "{text}");
        assert!(text.starts_with("users.yaml:6:"), "{text}");
        assert!(text.contains("unknown field `mial`"), "{text}");
    }

    #[test]
    fn unknown_top_level_key_is_refused() {
        let (text, line, _) = err("users: []\nextra: 1\n");
        assert_eq!(line, Some(2), "{text}");
        assert!(text.contains("unknown field `extra`"), "{text}");
    }

    #[test]
    fn bad_hex_names_its_line() {
        let yaml = GOOD.replace(
            "a4f49c406510bdcab6824ee7c30fd852",
            "a4f49c406510bdcab6824ee7c30fd85z",
        );
        let (text, line, field) = err(&yaml);
        assert_eq!(line, Some(9), "{text}");
        assert_eq!(field, "users[1].nt_hash", "{text}");
        assert!(text.contains("non-hex"), "{text}");

        let short = GOOD.replace("a4f49c406510bdcab6824ee7c30fd852", "a4f4");
        let (text, line, _) = err(&short);
        assert_eq!(line, Some(9), "{text}");
        assert!(text.contains("got 4 characters"), "{text}");
    }

    #[test]
    fn duplicate_account_is_refused_with_its_line() {
        let yaml = format!(
            "{GOOD}  - user: ALICE\n    domain: Demo\n    nt_hash: {}\n",
            "00".repeat(16)
        );
        let (text, line, field) = err(&yaml);
        assert_eq!(line, Some(12), "{text}");
        assert_eq!(field, "users[2]", "{text}");
        assert!(text.contains("duplicate account Demo\\ALICE"), "{text}");
        assert!(text.contains("users[0]"), "{text}");
    }

    #[test]
    fn missing_and_empty_fields_are_refused() {
        let (text, _, _) = err("users:\n  - user: a\n    domain: D\n");
        assert!(text.contains("missing field `nt_hash`"), "{text}");
        let (text, line, field) = err(&format!(
            "users:\n  - user: ''\n    domain: D\n    nt_hash: {}\n",
            "00".repeat(16)
        ));
        assert_eq!((line, field.as_str()), (Some(2), "users[0].user"), "{text}");
        let (text, _, _) = err("");
        assert!(text.starts_with("users.yaml"), "{text}");
    }

    #[test]
    fn load_reports_missing_file_by_path() {
        let e = UsersFile::load(Path::new("/nonexistent/users.yaml")).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/users.yaml: "),
            "{e}"
        );
    }
}
