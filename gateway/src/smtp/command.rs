//! Parser for client commands (RFC 5321 with SIZE, 8BITMIME, BDAT, AUTH and
//! STARTTLS).
//!
//! The gateway forwards envelope addresses to a backend MTA whose parser may
//! be older and more lenient than ours. Anything two parsers could read
//! differently is therefore refused here: addresses must match the RFC 5321
//! §4.1.2 grammar exactly, and the only leniency is the one real clients need
//! (spaces after `MAIL FROM:`/`RCPT TO:`, case-insensitive keywords).

use policy::relay::address::{self, AddressError};

/// A parsed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The argument as sent (trimmed); it is only logged, never trusted.
    Ehlo(String),
    Helo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: Path,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Help(Option<String>),
    Vrfy(String),
    Expn(String),
    StartTls,
    Auth {
        /// Uppercased, so the session can match it against its own list.
        mechanism: String,
        /// As sent; `"="` stands for an empty initial response (RFC 4954 §4)
        /// and is kept so that the SASL layer can tell it from "none".
        initial_response: Option<String>,
    },
}

/// The domain of a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// As sent (case kept). Empty only for `RCPT TO:<postmaster>`, which
    /// RFC 5321 §4.1.1.3 allows without a domain.
    Name(String),
    /// The text inside `[]`, e.g. `192.0.2.1` or `IPv6:2001:db8::1`.
    AddressLiteral(String),
}

/// `local-part@domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// As sent; a quoted local part keeps its quotes and backslashes so that
    /// it is forwarded byte for byte.
    pub local_part: String,
    pub domain: Domain,
}

/// A forward- or reverse-path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Exactly the text between `<` and `>`. This is what gets forwarded, so
    /// the backend sees the address we validated and nothing re-encoded.
    pub raw: String,
    /// The domains of an obsolete source route (`<@a,@b:user@c>` gives
    /// `["a", "b"]`), without the `@`. RFC 5321 §3.3 says to accept and
    /// ignore it; it is kept for logging.
    pub source_route: Vec<String>,
    pub mailbox: Mailbox,
}

/// The argument of `MAIL FROM:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`, used for bounces.
    Null,
    Path(Path),
}

/// The ESMTP parameters of `MAIL FROM:` that we offer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<Body>,
    /// RFC 4954 `AUTH=` value, still xtext-encoded as sent.
    pub auth: Option<String>,
}

/// The `BODY=` parameter (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// Why a command was refused. Each variant maps to one reply, noted on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// -> 500 5.5.1
    #[error("command unrecognized")]
    Unrecognized,
    /// -> 501 5.5.4: the verb is known, its arguments are malformed.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// -> 501 5.1.3 (RCPT) / 501 5.1.7 (MAIL)
    #[error("bad address syntax: {0}")]
    BadAddress(&'static str),
    /// -> 553 5.6.7: we do not offer SMTPUTF8, so 8-bit addresses cannot be
    /// relayed faithfully.
    #[error("non-ASCII address")]
    NonAscii,
    /// -> 555 5.5.4. Holds the parameter keyword, uppercased (for
    /// `BODY=BINARYMIME`, the whole parameter).
    #[error("unsupported parameter {0}")]
    UnsupportedParameter(String),
    /// -> 502 5.5.1: a real SMTP verb that this gateway refuses to carry.
    #[error("command not implemented")]
    NotImplemented,
}

use CommandError::{BadAddress, NonAscii, Syntax, UnsupportedParameter};

/// The policy's grammar helpers (see [`parse_path`]) fail with an
/// [`AddressError`]; here every failure of theirs is a bad address.
impl From<AddressError> for CommandError {
    fn from(e: AddressError) -> Self {
        match e {
            // Unreachable in practice: `split_path` refuses non-ASCII first.
            AddressError::NonAsciiLocalPart => NonAscii,
            AddressError::Syntax(what) | AddressError::Idn(what) | AddressError::Routing(what) => {
                BadAddress(what)
            }
        }
    }
}

/// The verbs this parser understands.
const KNOWN: &[&str] = &[
    "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP", "VRFY", "EXPN",
    "STARTTLS", "AUTH",
];

/// Verbs that exist in some SMTP dialect but that a relay gateway must not
/// carry; answering 502 rather than 500 tells the client it was understood.
const NOT_IMPLEMENTED: &[&str] = &[
    "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML", "BURL", "VERB", "ONEX", "XEXCH50",
];

/// The canonical (uppercase) verb of a command line, if it is one we know,
/// including the ones answered with [`CommandError::NotImplemented`].
///
/// The session needs it when [`parse`] fails: a [`CommandError::BadAddress`]
/// is 5.1.7 after MAIL but 5.1.3 after RCPT, and metrics are labelled by verb
/// without letting clients invent label values.
pub fn verb(line: &[u8]) -> Option<&'static str> {
    let word = line.split(|&b| b == b' ').next().unwrap_or_default();
    KNOWN
        .iter()
        .chain(NOT_IMPLEMENTED)
        .find(|v| word.eq_ignore_ascii_case(v.as_bytes()))
        .copied()
}

/// Parses one command line, without its CRLF (see [`super::line::LineReader`]).
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let verb = verb(line).ok_or(CommandError::Unrecognized)?;
    if NOT_IMPLEMENTED.contains(&verb) {
        return Err(CommandError::NotImplemented);
    }
    let rest = line.get(verb.len() + 1..).unwrap_or_default();
    // Control characters (TAB included) have no place in any command and are
    // a classic way to make two parsers disagree about where a field ends.
    if rest.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(Syntax("control character in command"));
    }
    let args = trim_sp(rest);

    // MAIL and RCPT look at bytes: a non-ASCII path must be told apart from
    // other malformed input (553 5.6.7 rather than 501).
    match verb {
        "MAIL" => return parse_mail(args),
        "RCPT" => return parse_rcpt(args),
        _ => {}
    }
    let args = std::str::from_utf8(args).map_err(|_| Syntax("command is not valid UTF-8"))?;
    // C1 controls too: U+009B is CSI to many terminals, and these arguments
    // end up in logs.
    if args.chars().any(char::is_control) {
        return Err(Syntax("control character in command"));
    }
    let no_args = |cmd: Command| {
        // Text after DATA in particular must not be mistaken for the start
        // of the message.
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(Syntax("no parameters allowed"))
        }
    };
    let required = |make: fn(String) -> Command, why: &'static str| {
        if args.is_empty() {
            Err(Syntax(why))
        } else {
            Ok(make(args.to_string()))
        }
    };
    match verb {
        "EHLO" => required(Command::Ehlo, "domain or address literal required"),
        "HELO" => required(Command::Helo, "domain or address literal required"),
        "VRFY" => required(Command::Vrfy, "argument required"),
        "EXPN" => required(Command::Expn, "argument required"),
        "HELP" => Ok(Command::Help((!args.is_empty()).then(|| args.to_string()))),
        // RFC 5321 §4.1.1.9: the argument must be ignored.
        "NOOP" => Ok(Command::Noop),
        "BDAT" => parse_bdat(args),
        "AUTH" => parse_auth(args),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        _ => Err(CommandError::Unrecognized),
    }
}

impl Command {
    /// The uppercase verb, for logs and metric labels.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Help(_) => "HELP",
            Command::Vrfy(_) => "VRFY",
            Command::Expn(_) => "EXPN",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
        }
    }
}

impl std::fmt::Display for Domain {
    /// As it appears after the `@`, brackets included for literals.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Domain::Name(name) => f.write_str(name),
            Domain::AddressLiteral(lit) => write!(f, "[{lit}]"),
        }
    }
}

impl std::fmt::Display for Mailbox {
    /// `local@domain`, or the bare local part for `<postmaster>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.domain {
            Domain::Name(name) if name.is_empty() => f.write_str(&self.local_part),
            domain => write!(f, "{}@{domain}", self.local_part),
        }
    }
}

fn trim_sp(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' '] = s {
        s = rest;
    }
    s
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

fn parse_mail(args: &[u8]) -> Result<Command, CommandError> {
    let rest = strip_prefix_ci(args, b"FROM:").ok_or(Syntax("expected FROM:<reverse-path>"))?;
    let (raw, params) = split_path(rest)?;
    let from = if raw.is_empty() {
        ReversePath::Null
    } else {
        ReversePath::Path(parse_path(raw, false)?)
    };
    let mut out = MailParams::default();
    for (keyword, value) in parse_params(params)? {
        match keyword.as_str() {
            "SIZE" => {
                if out.size.is_some() {
                    return Err(Syntax("duplicate SIZE parameter"));
                }
                let value = value.ok_or(Syntax("SIZE needs a value"))?;
                out.size = Some(parse_u64(value).ok_or(Syntax("bad SIZE value"))?);
            }
            "BODY" => {
                if out.body.is_some() {
                    return Err(Syntax("duplicate BODY parameter"));
                }
                let value = value.ok_or(Syntax("BODY needs a value"))?;
                out.body = Some(if value.eq_ignore_ascii_case("7BIT") {
                    Body::SevenBit
                } else if value.eq_ignore_ascii_case("8BITMIME") {
                    Body::EightBitMime
                } else if value.eq_ignore_ascii_case("BINARYMIME") {
                    // Needs CHUNKING (RFC 3030), which we do not offer.
                    return Err(UnsupportedParameter("BODY=BINARYMIME".into()));
                } else {
                    return Err(Syntax("bad BODY value"));
                });
            }
            "AUTH" => {
                if out.auth.is_some() {
                    return Err(Syntax("duplicate AUTH parameter"));
                }
                let value = value.ok_or(Syntax("AUTH needs a value"))?;
                if !is_xtext(value) {
                    return Err(Syntax("bad AUTH value"));
                }
                out.auth = Some(value.to_string());
            }
            // SMTPUTF8, RET, ENVID, ... are refused rather than dropped: the
            // client asked for a behaviour we would not deliver.
            _ => return Err(UnsupportedParameter(keyword)),
        }
    }
    Ok(Command::Mail { from, params: out })
}

fn parse_rcpt(args: &[u8]) -> Result<Command, CommandError> {
    let rest = strip_prefix_ci(args, b"TO:").ok_or(Syntax("expected TO:<forward-path>"))?;
    let (raw, params) = split_path(rest)?;
    if raw.is_empty() {
        return Err(BadAddress("null forward-path"));
    }
    let to = parse_path(raw, true)?;
    // We offer no RCPT parameters (no DSN), so any is refused.
    if let Some((keyword, _)) = parse_params(params)?.into_iter().next() {
        return Err(UnsupportedParameter(keyword));
    }
    Ok(Command::Rcpt { to })
}

/// Splits `<path> params` after `FROM:`/`TO:`. Returns the bytes between the
/// brackets and what follows the `>`.
fn split_path(s: &[u8]) -> Result<(&[u8], &[u8]), CommandError> {
    // Spaces after the colon violate RFC 5321 but are sent by enough
    // clients that refusing them would only cause support calls.
    let s = trim_sp(s);
    if s.first() != Some(&b'<') {
        return Err(BadAddress("angle brackets required"));
    }
    let mut quoted = false;
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b if b >= 0x80 => return Err(NonAscii),
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => {
                let rest = &s[i + 1..];
                if !rest.is_empty() && rest[0] != b' ' {
                    return Err(Syntax("expected space after path"));
                }
                return Ok((&s[1..i], rest));
            }
            _ => {}
        }
        i += 1;
    }
    Err(BadAddress("missing closing '>'"))
}

/// Parses the text between `<` and `>` (not empty, checked by the caller).
///
/// The grammar's pieces (dot-string, quoted string, domain labels, address
/// literals, the length limits) are the policy's own, from
/// [`policy::relay::address`], so both layers agree on them. The walk over a
/// path is not shared, because the two do different jobs: this one keeps the
/// path as sent (it is what gets forwarded) and answers any syntax error
/// with `501 Bad address syntax` before the policy is asked; the policy's
/// `parse_path` then canonicalises (case, IDN, IP literals as addresses) and
/// refuses more, with its own replies: an empty quoted local part, a last
/// label of digits, a look-alike or malformed A-label. The two walks also
/// word some errors differently (an empty route host, text after a quoted
/// local part, text after a route host's `]`), and the replies carry those
/// words, so one walk could not serve both without changing a reply.
fn parse_path(raw: &[u8], postmaster_ok: bool) -> Result<Path, CommandError> {
    if raw.len() > address::MAX_PATH {
        return Err(BadAddress("path too long"));
    }
    // split_path has rejected non-ASCII, so this cannot fail; still, no panic.
    let raw = std::str::from_utf8(raw).map_err(|_| NonAscii)?;
    if postmaster_ok && raw.eq_ignore_ascii_case("postmaster") {
        return Ok(Path {
            raw: raw.to_string(),
            source_route: Vec::new(),
            mailbox: Mailbox {
                local_part: raw.to_string(),
                domain: Domain::Name(String::new()),
            },
        });
    }
    let (source_route, mailbox) = parse_source_route(raw)?;
    Ok(Path {
        raw: raw.to_string(),
        source_route,
        mailbox: parse_mailbox(mailbox)?,
    })
}

/// Splits `@a,@b:rest` into `(["a", "b"], "rest")`.
fn parse_source_route(s: &str) -> Result<(Vec<String>, &str), CommandError> {
    let mut route = Vec::new();
    if !s.starts_with('@') {
        return Ok((route, s));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    loop {
        if bytes.get(i) != Some(&b'@') {
            return Err(BadAddress("bad source route"));
        }
        let start = i + 1;
        // An address literal may itself contain ':' (IPv6), so skip to ']'.
        let mut end = start;
        if bytes.get(start) == Some(&b'[') {
            end = match s[start..].find(']') {
                Some(j) => start + j + 1,
                None => return Err(BadAddress("bad source route")),
            };
        }
        while end < bytes.len() && bytes[end] != b',' && bytes[end] != b':' {
            end += 1;
        }
        let domain = &s[start..end];
        parse_domain(domain)?;
        route.push(domain.to_string());
        match bytes.get(end) {
            Some(b',') => i = end + 1,
            Some(b':') => return Ok((route, &s[end + 1..])),
            _ => return Err(BadAddress("bad source route")),
        }
    }
}

fn parse_mailbox(s: &str) -> Result<Mailbox, CommandError> {
    let at = if s.starts_with('"') {
        address::quoted_string_end(s)?
    } else {
        let at = s.find('@').ok_or(BadAddress("missing domain"))?;
        if !address::is_dot_string(&s[..at]) {
            return Err(BadAddress(if at == 0 {
                "missing local part"
            } else {
                "bad local part"
            }));
        }
        at
    };
    let (local_part, rest) = s.split_at(at);
    let domain = match rest.strip_prefix('@') {
        Some(domain) => domain,
        None if rest.is_empty() => return Err(BadAddress("missing domain")),
        None => return Err(BadAddress("bad local part")),
    };
    if local_part.len() > address::MAX_LOCAL_PART {
        return Err(BadAddress("local part too long"));
    }
    if domain.is_empty() {
        return Err(BadAddress("missing domain"));
    }
    if domain.contains('@') {
        return Err(BadAddress("more than one '@'"));
    }
    Ok(Mailbox {
        local_part: local_part.to_string(),
        domain: parse_domain(domain)?,
    })
}

fn parse_domain(s: &str) -> Result<Domain, CommandError> {
    if s.len() > address::MAX_DOMAIN {
        return Err(BadAddress("domain too long"));
    }
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(BadAddress("bad address literal"))?;
        address::parse_literal(inner)?;
        return Ok(Domain::AddressLiteral(inner.to_string()));
    }
    // A trailing dot ("user@example.com.") names the same domain in DNS but
    // not in RFC 5321; refusing it (as an empty label) keeps the policy
    // layer from having to decide which form a relay rule meant.
    address::check_labels(s)?;
    Ok(Domain::Name(s.to_string()))
}

/// Splits `SP KEY[=VALUE] SP KEY[=VALUE] ...` (RFC 5321 §4.1.2 esmtp-param),
/// returning uppercased keywords.
fn parse_params(s: &[u8]) -> Result<Vec<(String, Option<&str>)>, CommandError> {
    if !s.is_ascii() {
        return Err(Syntax("parameters are not ASCII"));
    }
    let s = std::str::from_utf8(s).map_err(|_| Syntax("parameters are not ASCII"))?;
    let mut out = Vec::new();
    for param in s.split(' ').filter(|p| !p.is_empty()) {
        let (keyword, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        if keyword.is_empty()
            || !keyword.as_bytes()[0].is_ascii_alphanumeric()
            || !keyword
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Syntax("bad parameter keyword"));
        }
        // esmtp-value = 1*(%d33-60 / %d62-126)
        if let Some(v) = value {
            if v.is_empty() || !v.bytes().all(|b| (33..=126).contains(&b) && b != b'=') {
                return Err(Syntax("bad parameter value"));
            }
        }
        out.push((keyword.to_ascii_uppercase(), value));
    }
    Ok(out)
}

/// xtext (RFC 3461 §4): printable ASCII except `+` and `=`, or `+XX` with
/// two uppercase hex digits.
fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: Option<&u8>| matches!(c, Some(b'0'..=b'9' | b'A'..=b'F'));
                if !hex(b.get(i + 1)) || !hex(b.get(i + 2)) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            33..=126 => i += 1,
            _ => return false,
        }
    }
    !b.is_empty()
}

/// Digits only (no sign, no spaces); `None` on overflow.
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_bdat(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words.next().ok_or(Syntax("BDAT needs a chunk size"))?;
    let size = parse_u64(size).ok_or(Syntax("bad BDAT chunk size"))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(Syntax("expected LAST")),
    };
    if words.next().is_some() {
        return Err(Syntax("too many BDAT arguments"));
    }
    Ok(Command::Bdat { size, last })
}

fn parse_auth(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = words.next().ok_or(Syntax("AUTH needs a mechanism"))?;
    // sasl-mech = 1*20mech-char (RFC 4422 §3.1), matched case-insensitively.
    if mechanism.len() > 20
        || !mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Syntax("bad SASL mechanism name"));
    }
    let initial_response = match words.next() {
        None => None,
        Some(r) if is_base64_or_empty(r) => Some(r.to_string()),
        Some(_) => return Err(Syntax("initial response is not base64")),
    };
    if words.next().is_some() {
        return Err(Syntax("too many AUTH arguments"));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial_response,
    })
}

/// Only the alphabet is checked; decoding (and its errors) belongs to the
/// SASL layer, which can answer with the right 501 5.5.2.
fn is_base64_or_empty(s: &str) -> bool {
    s == "="
        || s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

#[cfg(test)]
mod tests {
    use super::*;
    use Command as C;
    use CommandError as E;

    fn name(s: &str) -> Domain {
        Domain::Name(s.into())
    }

    fn lit(s: &str) -> Domain {
        Domain::AddressLiteral(s.into())
    }

    fn path(raw: &str, route: &[&str], local: &str, domain: Domain) -> Path {
        Path {
            raw: raw.into(),
            source_route: route.iter().map(|s| s.to_string()).collect(),
            mailbox: Mailbox {
                local_part: local.into(),
                domain,
            },
        }
    }

    fn mail(raw: &str, local: &str, domain: &str) -> Command {
        C::Mail {
            from: ReversePath::Path(path(raw, &[], local, name(domain))),
            params: MailParams::default(),
        }
    }

    fn mail_p(raw: &str, local: &str, domain: &str, params: MailParams) -> Command {
        C::Mail {
            from: ReversePath::Path(path(raw, &[], local, name(domain))),
            params,
        }
    }

    fn rcpt(raw: &str, local: &str, domain: Domain) -> Command {
        C::Rcpt {
            to: path(raw, &[], local, domain),
        }
    }

    fn unsupported(s: &str) -> E {
        E::UnsupportedParameter(s.into())
    }

    #[test]
    fn table() {
        let null = || C::Mail {
            from: ReversePath::Null,
            params: MailParams::default(),
        };
        let long_local = format!("RCPT TO:<{}@x.test>", "a".repeat(64));
        let too_long_local = format!("RCPT TO:<{}@x.test>", "a".repeat(65));
        let label63 = "d".repeat(63);
        let long_label = format!("RCPT TO:<u@{label63}.test>");
        let too_long_label = format!("RCPT TO:<u@{}d.test>", label63);
        // 4 labels of 63 + 3 dots = 255 octets: the longest domain.
        let dom255 = [label63.as_str(); 4].join(".");
        let dom256 = format!("{dom255}x");
        let path_ok = format!("RCPT TO:<@a:u@{dom255}>"); // > 256 with route
        let dom_too_long = format!("RCPT TO:<u@{dom256}>");
        let path_len_254 = format!("RCPT TO:<{}@{}>", "l".repeat(60), &dom255[..193]);

        #[rustfmt::skip]
        let cases: Vec<(&[u8], Result<Command, E>)> = vec![
            // --- HELO / EHLO
            (b"EHLO client.example", Ok(C::Ehlo("client.example".into()))),
            (b"ehlo client.example", Ok(C::Ehlo("client.example".into()))),
            (b"EhLo [192.0.2.1]", Ok(C::Ehlo("[192.0.2.1]".into()))),
            (b"EHLO   spaced.example   ", Ok(C::Ehlo("spaced.example".into()))),
            (b"EHLO two words", Ok(C::Ehlo("two words".into()))),
            (b"EHLO", Err(E::Syntax("domain or address literal required"))),
            (b"EHLO ", Err(E::Syntax("domain or address literal required"))),
            (b"HELO host", Ok(C::Helo("host".into()))),
            (b"helo", Err(E::Syntax("domain or address literal required"))),
            (b"EHLO a\tb", Err(E::Syntax("control character in command"))),
            (b"EHLO a\xffb", Err(E::Syntax("command is not valid UTF-8"))),
            (b"EHLO h\xc3\xa9.example", Ok(C::Ehlo("h\u{e9}.example".into()))),
            // Found by fuzzing: U+0085 (NEL), a C1 control.
            (b"EHLO x\xc2\x85y", Err(E::Syntax("control character in command"))),
            (b"HELP \xc2\x9b31m", Err(E::Syntax("control character in command"))),
            // --- MAIL
            (b"MAIL FROM:<user@example.com>", Ok(mail("user@example.com", "user", "example.com"))),
            (b"mail from:<User@Example.COM>", Ok(mail("User@Example.COM", "User", "Example.COM"))),
            (b"MAIL FROM: <a@b.example>", Ok(mail("a@b.example", "a", "b.example"))),
            (b"MAIL FROM:   <a@b.example>  ", Ok(mail("a@b.example", "a", "b.example"))),
            (b"MAIL  FROM:<a@b.example>", Ok(mail("a@b.example", "a", "b.example"))),
            (b"MAIL FROM:<>", Ok(null())),
            (b"MAIL FROM:<> SIZE=0", Ok(C::Mail { from: ReversePath::Null, params: MailParams { size: Some(0), ..Default::default() } })),
            (b"MAIL FROM:a@b.example", Err(E::BadAddress("angle brackets required"))),
            (b"MAIL FROM:<a@b.example", Err(E::BadAddress("missing closing '>'"))),
            (b"MAIL FROM:", Err(E::BadAddress("angle brackets required"))),
            (b"MAIL FROM <a@b.example>", Err(E::Syntax("expected FROM:<reverse-path>"))),
            (b"MAIL FROM :<a@b.example>", Err(E::Syntax("expected FROM:<reverse-path>"))),
            (b"MAIL TO:<a@b.example>", Err(E::Syntax("expected FROM:<reverse-path>"))),
            (b"MAIL", Err(E::Syntax("expected FROM:<reverse-path>"))),
            (b"MAIL FROM:<a@b.example>SIZE=1", Err(E::Syntax("expected space after path"))),
            (b"MAIL FROM:<a.b.c+tag@sub.b-c.example>", Ok(mail("a.b.c+tag@sub.b-c.example", "a.b.c+tag", "sub.b-c.example"))),
            (b"MAIL FROM:<a%b@relay.example>", Ok(mail("a%b@relay.example", "a%b", "relay.example"))),
            (b"MAIL FROM:<!#$%&'*+-/=?^_`{|}~@x.example>", Ok(mail("!#$%&'*+-/=?^_`{|}~@x.example", "!#$%&'*+-/=?^_`{|}~", "x.example"))),
            (b"MAIL FROM:<\"john doe\"@x.example>", Ok(mail("\"john doe\"@x.example", "\"john doe\"", "x.example"))),
            (b"MAIL FROM:<\"a@b\"@x.example>", Ok(mail("\"a@b\"@x.example", "\"a@b\"", "x.example"))),
            (b"MAIL FROM:<\"a>b\"@x.example>", Ok(mail("\"a>b\"@x.example", "\"a>b\"", "x.example"))),
            (b"MAIL FROM:<\"a\\\"b\\\\c\"@x.example>", Ok(mail("\"a\\\"b\\\\c\"@x.example", "\"a\\\"b\\\\c\"", "x.example"))),
            (b"MAIL FROM:<\"\"@x.example>", Ok(mail("\"\"@x.example", "\"\"", "x.example"))),
            (b"MAIL FROM:<\"unterminated@x.example>", Err(E::BadAddress("missing closing '>'"))),
            (b"MAIL FROM:<\"a\"b@x.example>", Err(E::BadAddress("bad local part"))),
            (b"MAIL FROM:<\"a\">", Err(E::BadAddress("missing domain"))),
            (b"MAIL FROM:<user>", Err(E::BadAddress("missing domain"))),
            (b"MAIL FROM:<postmaster>", Err(E::BadAddress("missing domain"))),
            (b"MAIL FROM:<user@>", Err(E::BadAddress("missing domain"))),
            (b"MAIL FROM:<@x.example>", Err(E::BadAddress("bad source route"))),
            (b"MAIL FROM:<a@b@c.example>", Err(E::BadAddress("more than one '@'"))),
            (b"MAIL FROM:<.a@x.example>", Err(E::BadAddress("bad local part"))),
            (b"MAIL FROM:<a.@x.example>", Err(E::BadAddress("bad local part"))),
            (b"MAIL FROM:<a..b@x.example>", Err(E::BadAddress("bad local part"))),
            (b"MAIL FROM:<a b@x.example>", Err(E::BadAddress("bad local part"))),
            (b"MAIL FROM:<a(comment)@x.example>", Err(E::BadAddress("bad local part"))),
            (b"MAIL FROM:<a@x.example.>", Err(E::BadAddress("empty domain label"))),
            (b"MAIL FROM:<a@.x.example>", Err(E::BadAddress("empty domain label"))),
            (b"MAIL FROM:<a@x..example>", Err(E::BadAddress("empty domain label"))),
            (b"MAIL FROM:<a@-x.example>", Err(E::BadAddress("bad domain label"))),
            (b"MAIL FROM:<a@x-.example>", Err(E::BadAddress("bad domain label"))),
            (b"MAIL FROM:<a@x_y.example>", Err(E::BadAddress("bad domain label"))),
            (b"MAIL FROM:<a@x y.example>", Err(E::BadAddress("bad domain label"))),
            (b"MAIL FROM:<a@123.example>", Ok(mail("a@123.example", "a", "123.example"))),
            (b"MAIL FROM:<j\xc3\xb6rg@x.example>", Err(E::NonAscii)),
            (b"MAIL FROM:<jorg@\xc3\xa9.example>", Err(E::NonAscii)),
            (b"MAIL FROM:<\xff@x.example>", Err(E::NonAscii)),
            (b"MAIL FROM:<j\xc3\xb6rg@x.example", Err(E::NonAscii)),
            (b"MAIL FROM:<a\x01@x.example>", Err(E::Syntax("control character in command"))),
            (b"MAIL FROM:<a@x.example>\x00", Err(E::Syntax("control character in command"))),
            // --- MAIL parameters
            (b"MAIL FROM:<a@x.example> SIZE=12345", Ok(mail_p("a@x.example", "a", "x.example", MailParams { size: Some(12345), ..Default::default() }))),
            (b"MAIL FROM:<a@x.example> size=0", Ok(mail_p("a@x.example", "a", "x.example", MailParams { size: Some(0), ..Default::default() }))),
            (b"MAIL FROM:<a@x.example> SIZE=18446744073709551615", Ok(mail_p("a@x.example", "a", "x.example", MailParams { size: Some(u64::MAX), ..Default::default() }))),
            (b"MAIL FROM:<a@x.example> SIZE=18446744073709551616", Err(E::Syntax("bad SIZE value"))),
            (b"MAIL FROM:<a@x.example> SIZE=-1", Err(E::Syntax("bad SIZE value"))),
            (b"MAIL FROM:<a@x.example> SIZE=+1", Err(E::Syntax("bad SIZE value"))),
            (b"MAIL FROM:<a@x.example> SIZE=1k", Err(E::Syntax("bad SIZE value"))),
            (b"MAIL FROM:<a@x.example> SIZE", Err(E::Syntax("SIZE needs a value"))),
            (b"MAIL FROM:<a@x.example> SIZE=", Err(E::Syntax("bad parameter value"))),
            (b"MAIL FROM:<a@x.example> SIZE=1 SIZE=1", Err(E::Syntax("duplicate SIZE parameter"))),
            (b"MAIL FROM:<a@x.example> BODY=8BITMIME", Ok(mail_p("a@x.example", "a", "x.example", MailParams { body: Some(Body::EightBitMime), ..Default::default() }))),
            (b"MAIL FROM:<a@x.example> body=7bit", Ok(mail_p("a@x.example", "a", "x.example", MailParams { body: Some(Body::SevenBit), ..Default::default() }))),
            (b"MAIL FROM:<a@x.example> BODY=BINARYMIME", Err(unsupported("BODY=BINARYMIME"))),
            (b"MAIL FROM:<a@x.example> BODY=8BIT", Err(E::Syntax("bad BODY value"))),
            (b"MAIL FROM:<a@x.example> BODY=7BIT BODY=7BIT", Err(E::Syntax("duplicate BODY parameter"))),
            (b"MAIL FROM:<a@x.example> AUTH=<>", Ok(mail_p("a@x.example", "a", "x.example", MailParams { auth: Some("<>".into()), ..Default::default() }))),
            (b"MAIL FROM:<a@x.example> AUTH=e+2Bmc@x.example", Ok(mail_p("a@x.example", "a", "x.example", MailParams { auth: Some("e+2Bmc@x.example".into()), ..Default::default() }))),
            (b"MAIL FROM:<a@x.example> AUTH=a+2b", Err(E::Syntax("bad AUTH value"))),
            (b"MAIL FROM:<a@x.example> AUTH=a+", Err(E::Syntax("bad AUTH value"))),
            (b"MAIL FROM:<a@x.example> AUTH=<> AUTH=<>", Err(E::Syntax("duplicate AUTH parameter"))),
            (b"MAIL FROM:<a@x.example>  SIZE=10   BODY=8BITMIME AUTH=<> ", Ok(mail_p("a@x.example", "a", "x.example", MailParams { size: Some(10), body: Some(Body::EightBitMime), auth: Some("<>".into()) }))),
            (b"MAIL FROM:<a@x.example> SMTPUTF8", Err(unsupported("SMTPUTF8"))),
            (b"MAIL FROM:<a@x.example> RET=HDRS", Err(unsupported("RET"))),
            (b"MAIL FROM:<a@x.example> envid=QQ314159", Err(unsupported("ENVID"))),
            (b"MAIL FROM:<a@x.example> X-UNKNOWN=1", Err(unsupported("X-UNKNOWN"))),
            (b"MAIL FROM:<a@x.example> =1", Err(E::Syntax("bad parameter keyword"))),
            (b"MAIL FROM:<a@x.example> -X=1", Err(E::Syntax("bad parameter keyword"))),
            (b"MAIL FROM:<a@x.example> SIZE=1=2", Err(E::Syntax("bad parameter value"))),
            (b"MAIL FROM:<a@x.example> ENVID=\xc3\xa9", Err(E::Syntax("parameters are not ASCII"))),
            // --- RCPT
            (b"RCPT TO:<bob@example.org>", Ok(rcpt("bob@example.org", "bob", name("example.org")))),
            (b"rcpt to:<bob@example.org>", Ok(rcpt("bob@example.org", "bob", name("example.org")))),
            (b"RCPT To: <bob@example.org>", Ok(rcpt("bob@example.org", "bob", name("example.org")))),
            (b"RCPT TO:<postmaster>", Ok(rcpt("postmaster", "postmaster", name("")))),
            (b"RCPT TO:<PostMaster>", Ok(rcpt("PostMaster", "PostMaster", name("")))),
            (b"RCPT TO:<postmaster@x.example>", Ok(rcpt("postmaster@x.example", "postmaster", name("x.example")))),
            (b"RCPT TO:<bob>", Err(E::BadAddress("missing domain"))),
            (b"RCPT TO:<>", Err(E::BadAddress("null forward-path"))),
            (b"RCPT TO:bob@example.org", Err(E::BadAddress("angle brackets required"))),
            (b"RCPT TO <bob@example.org>", Err(E::Syntax("expected TO:<forward-path>"))),
            (b"RCPT FROM:<bob@example.org>", Err(E::Syntax("expected TO:<forward-path>"))),
            (b"RCPT TO:<bob@example.org> NOTIFY=NEVER", Err(unsupported("NOTIFY"))),
            (b"RCPT TO:<bob@example.org> orcpt=rfc822;bob@example.org", Err(unsupported("ORCPT"))),
            (b"RCPT TO:<bob@example.org> !!", Err(E::Syntax("bad parameter keyword"))),
            (b"RCPT TO:<\"bob smith\"@example.org>", Ok(rcpt("\"bob smith\"@example.org", "\"bob smith\"", name("example.org")))),
            (b"RCPT TO:<\"a%b@c\"@example.org>", Ok(rcpt("\"a%b@c\"@example.org", "\"a%b@c\"", name("example.org")))),
            (b"RCPT TO:<\"bad\x7f\"@example.org>", Err(E::Syntax("control character in command"))),
            (b"RCPT TO:<b\xc3\xb6b@example.org>", Err(E::NonAscii)),
            // Address literals.
            (b"RCPT TO:<u@[192.0.2.1]>", Ok(rcpt("u@[192.0.2.1]", "u", lit("192.0.2.1")))),
            (b"RCPT TO:<u@[IPv6:2001:db8::1]>", Ok(rcpt("u@[IPv6:2001:db8::1]", "u", lit("IPv6:2001:db8::1")))),
            (b"RCPT TO:<u@[ipv6:::1]>", Ok(rcpt("u@[ipv6:::1]", "u", lit("ipv6:::1")))),
            (b"RCPT TO:<u@[IPv6:::ffff:192.0.2.1]>", Ok(rcpt("u@[IPv6:::ffff:192.0.2.1]", "u", lit("IPv6:::ffff:192.0.2.1")))),
            (b"RCPT TO:<u@[192.0.2.256]>", Err(E::BadAddress("bad IPv4 address literal"))),
            (b"RCPT TO:<u@[192.0.2]>", Err(E::BadAddress("bad IPv4 address literal"))),
            (b"RCPT TO:<u@[010.0.2.1]>", Err(E::BadAddress("bad IPv4 address literal"))),
            (b"RCPT TO:<u@[2001:db8::1]>", Err(E::BadAddress("general address literals are not supported"))),
            (b"RCPT TO:<u@[IPv6:2001:db8::g]>", Err(E::BadAddress("bad IPv6 address literal"))),
            (b"RCPT TO:<u@[IPv6:fe80::1%eth0]>", Err(E::BadAddress("bad IPv6 address literal"))),
            (b"RCPT TO:<u@[x400:c=us;a=att]>", Err(E::BadAddress("general address literals are not supported"))),
            (b"RCPT TO:<u@[192.0.2.1>", Err(E::BadAddress("bad address literal"))),
            (b"RCPT TO:<u@[]>", Err(E::BadAddress("bad IPv4 address literal"))),
            (b"RCPT TO:<u@x.example[1]>", Err(E::BadAddress("bad domain label"))),
            // Source routes.
            (b"RCPT TO:<@relay.example:bob@example.org>", Ok(C::Rcpt { to: path("@relay.example:bob@example.org", &["relay.example"], "bob", name("example.org")) })),
            (b"RCPT TO:<@a.example,@b.example:bob@example.org>", Ok(C::Rcpt { to: path("@a.example,@b.example:bob@example.org", &["a.example", "b.example"], "bob", name("example.org")) })),
            (b"RCPT TO:<@[IPv6:::1],@[192.0.2.1]:bob@[192.0.2.2]>", Ok(C::Rcpt { to: path("@[IPv6:::1],@[192.0.2.1]:bob@[192.0.2.2]", &["[IPv6:::1]", "[192.0.2.1]"], "bob", lit("192.0.2.2")) })),
            (b"MAIL FROM:<@a.example:a@x.example>", Ok(C::Mail { from: ReversePath::Path(path("@a.example:a@x.example", &["a.example"], "a", name("x.example"))), params: MailParams::default() })),
            (b"RCPT TO:<@a.example,b.example:bob@example.org>", Err(E::BadAddress("bad source route"))),
            (b"RCPT TO:<@a.example;bob@example.org>", Err(E::BadAddress("bad domain label"))),
            (b"RCPT TO:<@a.example>", Err(E::BadAddress("bad source route"))),
            (b"RCPT TO:<@:bob@example.org>", Err(E::BadAddress("empty domain label"))),
            (b"RCPT TO:<@a..example:bob@example.org>", Err(E::BadAddress("empty domain label"))),
            (b"RCPT TO:<@a.example:>", Err(E::BadAddress("missing domain"))),
            (b"RCPT TO:<@a.example:@b.example>", Err(E::BadAddress("missing local part"))),
            (b"RCPT TO:<@[::1:bob@example.org>", Err(E::BadAddress("bad source route"))),
            // Length limits.
            (long_local.as_bytes(), Ok(rcpt(&long_local[9..long_local.len() - 1], &"a".repeat(64), name("x.test")))),
            (too_long_local.as_bytes(), Err(E::BadAddress("local part too long"))),
            (long_label.as_bytes(), Ok(rcpt(&long_label[9..long_label.len() - 1], "u", name(&format!("{label63}.test"))))),
            (too_long_label.as_bytes(), Err(E::BadAddress("domain label too long"))),
            (dom_too_long.as_bytes(), Err(E::BadAddress("path too long"))),
            (path_ok.as_bytes(), Err(E::BadAddress("path too long"))),
            (path_len_254.as_bytes(), Ok(rcpt(&path_len_254[9..path_len_254.len() - 1], &"l".repeat(60), name(&dom255[..193])))),
            // --- DATA, BDAT, RSET, NOOP, QUIT, STARTTLS
            (b"DATA", Ok(C::Data)),
            (b"data", Ok(C::Data)),
            (b"DATA ", Ok(C::Data)),
            (b"DATA now", Err(E::Syntax("no parameters allowed"))),
            (b"BDAT 100", Ok(C::Bdat { size: 100, last: false })),
            (b"BDAT 0 LAST", Ok(C::Bdat { size: 0, last: true })),
            (b"bdat 100 last", Ok(C::Bdat { size: 100, last: true })),
            (b"BDAT", Err(E::Syntax("BDAT needs a chunk size"))),
            (b"BDAT x", Err(E::Syntax("bad BDAT chunk size"))),
            (b"BDAT 99999999999999999999", Err(E::Syntax("bad BDAT chunk size"))),
            (b"BDAT 1 FIRST", Err(E::Syntax("expected LAST"))),
            (b"BDAT 1 LAST LAST", Err(E::Syntax("too many BDAT arguments"))),
            (b"RSET", Ok(C::Rset)),
            (b"RSET x", Err(E::Syntax("no parameters allowed"))),
            (b"NOOP", Ok(C::Noop)),
            (b"noop anything at all", Ok(C::Noop)),
            (b"NOOP \x1b[31m", Err(E::Syntax("control character in command"))),
            (b"QUIT", Ok(C::Quit)),
            (b"Quit", Ok(C::Quit)),
            (b"QUIT now", Err(E::Syntax("no parameters allowed"))),
            (b"STARTTLS", Ok(C::StartTls)),
            (b"starttls", Ok(C::StartTls)),
            (b"STARTTLS x", Err(E::Syntax("no parameters allowed"))),
            // --- HELP, VRFY, EXPN
            (b"HELP", Ok(C::Help(None))),
            (b"HELP ", Ok(C::Help(None))),
            (b"HELP MAIL", Ok(C::Help(Some("MAIL".into())))),
            (b"VRFY bob", Ok(C::Vrfy("bob".into()))),
            (b"vrfy <bob@example.org>", Ok(C::Vrfy("<bob@example.org>".into()))),
            (b"VRFY", Err(E::Syntax("argument required"))),
            (b"EXPN staff", Ok(C::Expn("staff".into()))),
            (b"EXPN", Err(E::Syntax("argument required"))),
            // --- AUTH
            (b"AUTH NTLM", Ok(C::Auth { mechanism: "NTLM".into(), initial_response: None })),
            (b"auth ntlm TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw==", Ok(C::Auth { mechanism: "NTLM".into(), initial_response: Some("TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw==".into()) })),
            (b"AUTH PLAIN =", Ok(C::Auth { mechanism: "PLAIN".into(), initial_response: Some("=".into()) })),
            (b"AUTH login", Ok(C::Auth { mechanism: "LOGIN".into(), initial_response: None })),
            (b"AUTH SCRAM-SHA-256", Ok(C::Auth { mechanism: "SCRAM-SHA-256".into(), initial_response: None })),
            (b"AUTH", Err(E::Syntax("AUTH needs a mechanism"))),
            (b"AUTH PL@IN", Err(E::Syntax("bad SASL mechanism name"))),
            (b"AUTH ABCDEFGHIJKLMNOPQRSTU", Err(E::Syntax("bad SASL mechanism name"))),
            (b"AUTH PLAIN not*base64", Err(E::Syntax("initial response is not base64"))),
            (b"AUTH PLAIN AAAA BBBB", Err(E::Syntax("too many AUTH arguments"))),
            // --- unknown and refused verbs
            (b"", Err(E::Unrecognized)),
            (b" ", Err(E::Unrecognized)),
            (b" EHLO x", Err(E::Unrecognized)),
            (b"EHLOx", Err(E::Unrecognized)),
            (b"QUIT\t", Err(E::Unrecognized)),
            (b"GET / HTTP/1.1", Err(E::Unrecognized)),
            (b"XCLIENT ADDR=1.2.3.4", Err(E::Unrecognized)),
            (b"LHLO x", Err(E::Unrecognized)),
            (b"\xff\xfe", Err(E::Unrecognized)),
            (b"TURN", Err(E::NotImplemented)),
            (b"etrn example.org", Err(E::NotImplemented)),
            (b"ATRN", Err(E::NotImplemented)),
            (b"SEND FROM:<a@b.example>", Err(E::NotImplemented)),
            (b"SOML FROM:<a@b.example>", Err(E::NotImplemented)),
            (b"SAML FROM:<a@b.example>", Err(E::NotImplemented)),
            (b"XEXCH50 1 2", Err(E::NotImplemented)),
        ];
        assert!(cases.len() > 60);
        let mut failures = Vec::new();
        for (input, expected) in &cases {
            let got = parse(input);
            if &got != expected {
                failures.push(format!(
                    "{:?}\n   got      {:?}\n   expected {:?}",
                    String::from_utf8_lossy(input),
                    got,
                    expected
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn every_error_variant_is_reachable() {
        let cases: &[&[u8]] = &[
            b"FOO",
            b"DATA x",
            b"RCPT TO:<a>",
            b"RCPT TO:<\xc3\xa4@x.example>",
            b"RCPT TO:<a@x.example> NOTIFY=NEVER",
            b"TURN",
        ];
        let names: Vec<&str> = cases
            .iter()
            .map(|c| match parse(c) {
                Err(E::Unrecognized) => "Unrecognized",
                Err(E::Syntax(_)) => "Syntax",
                Err(E::BadAddress(_)) => "BadAddress",
                Err(E::NonAscii) => "NonAscii",
                Err(E::UnsupportedParameter(_)) => "UnsupportedParameter",
                Err(E::NotImplemented) => "NotImplemented",
                Ok(_) => "Ok",
            })
            .collect();
        assert_eq!(
            names,
            [
                "Unrecognized",
                "Syntax",
                "BadAddress",
                "NonAscii",
                "UnsupportedParameter",
                "NotImplemented"
            ]
        );
    }

    #[test]
    fn verbs() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"mail FROM:<bad", Some("MAIL")),
            (b"Rcpt TO:<\xff>", Some("RCPT")),
            (b"starttls", Some("STARTTLS")),
            (b"etrn x", Some("ETRN")),
            (b"MAILX", None),
            (b"", None),
            (b" QUIT", None),
        ];
        for (line, want) in cases {
            assert_eq!(verb(line), *want, "{line:?}");
            if let Ok(cmd) = parse(line) {
                assert_eq!(Some(cmd.verb()), *want);
            }
        }
        for line in [
            &b"EHLO x"[..],
            b"HELO x",
            b"MAIL FROM:<>",
            b"RCPT TO:<postmaster>",
            b"DATA",
            b"BDAT 1",
            b"RSET",
            b"NOOP",
            b"QUIT",
            b"HELP",
            b"VRFY x",
            b"EXPN x",
            b"STARTTLS",
            b"AUTH X",
        ] {
            let cmd = parse(line).unwrap();
            assert_eq!(Some(cmd.verb()), verb(line));
        }
    }

    #[test]
    fn display() {
        let show = |line: &[u8]| match parse(line).unwrap() {
            C::Rcpt { to } => to.mailbox.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            show(b"RCPT TO:<@r.example:Bob@Example.org>"),
            "Bob@Example.org"
        );
        assert_eq!(show(b"RCPT TO:<\"a b\"@[IPv6:::1]>"), "\"a b\"@[IPv6:::1]");
        assert_eq!(show(b"RCPT TO:<Postmaster>"), "Postmaster");
    }

    #[test]
    fn raw_path_is_exactly_what_was_between_the_brackets() {
        // The forwarded text must be byte-identical to what was validated.
        for line in [
            &b"RCPT TO:<\"a b\\\"c\"@X.Example>"[..],
            b"RCPT TO: <@r.example:u@[IPv6:::1]>",
            b"MAIL FROM:<u@x.example> SIZE=1",
        ] {
            let start = line.iter().position(|&b| b == b'<').unwrap() + 1;
            let end = line.iter().rposition(|&b| b == b'>').unwrap();
            let expected = std::str::from_utf8(&line[start..end]).unwrap();
            let raw = match parse(line).unwrap() {
                C::Rcpt { to } => to.raw,
                C::Mail {
                    from: ReversePath::Path(p),
                    ..
                } => p.raw,
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(raw, expected);
        }
    }

    #[test]
    fn never_panics_on_prefixes_of_valid_commands() {
        let lines: &[&[u8]] = &[
            b"MAIL FROM:<@a.example,@[IPv6:::1]:\"q\\\"x\"@[192.0.2.1]> SIZE=1 BODY=8BITMIME AUTH=+2B",
            b"RCPT TO:<postmaster>",
            b"AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=",
            b"BDAT 12 LAST",
        ];
        for line in lines {
            for i in 0..=line.len() {
                let _ = parse(&line[..i]);
            }
        }
    }
}
