//! SMTP replies, both the ones we send to clients and the ones we read from
//! the backend.
//!
//! Replies to clients are built from typed values and encoded here only, so
//! that no handler can emit a malformed or multi-line-injected reply. Backend
//! replies are parsed with hard caps, because a broken or hostile backend must
//! not be able to make the gateway buffer without bound.

use std::fmt;

use bytes::{Buf, BytesMut};

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl EnhancedCode {
    /// Reads `c.s.d` from the start of `text` when `c` equals `class`;
    /// returns the code and the text after it (and after one space).
    fn strip(text: &str, class: u8) -> Option<(EnhancedCode, &str)> {
        let (token, rest) = match text.split_once(' ') {
            Some((token, rest)) => (token, rest),
            None => (text, ""),
        };
        let mut parts = token.split('.');
        let (c, s, d) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        // RFC 3463 §2: class is one digit, subject and detail one to three.
        let num = |p: &str, max: usize| -> Option<u16> {
            if p.is_empty() || p.len() > max || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let c = num(c, 1)?;
        if c != u16::from(class) {
            return None;
        }
        Some((EnhancedCode(class, num(s, 3)?, num(d, 3)?), rest))
    }
}

/// A complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    /// The text of each line, without reply code or enhanced code.
    pub lines: Vec<String>,
}

/// Appends `n` in decimal, zero-padded to at least `width` digits.
fn push_number(out: &mut Vec<u8>, n: u32, width: usize) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    while digits.len() - i < width {
        i -= 1;
        digits[i] = b'0';
    }
    out.extend_from_slice(&digits[i..]);
}

/// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with CRLF.
const MAX_OUT_LINE: usize = 510;

impl Reply {
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    pub fn multi(code: u16, enhanced: Option<EnhancedCode>, lines: Vec<String>) -> Self {
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// Encodes the reply with CRLF line ends and the enhanced code repeated on
    /// every line (RFC 2034 §4).
    ///
    /// The text may come from a backend or echo client input, so it is
    /// sanitised: control characters (CR and LF above all, which would let
    /// text forge extra reply lines) become spaces, and non-ASCII becomes `?`
    /// since reply text is 7-bit (RFC 5321 §4.2). Each line is cut to fit
    /// 512 octets. An empty `lines` is sent as one line without text.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // Written straight into `out`, no temporary strings: every command
        // of every session ends here.
        let count = self.lines.len().max(1);
        for i in 0..count {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let start = out.len();
            let last = i + 1 == count;
            push_number(out, u32::from(self.code), 3);
            if self.enhanced.is_some() || !text.is_empty() || !last {
                out.push(if last { b' ' } else { b'-' });
            }
            if let Some(EnhancedCode(class, subject, detail)) = self.enhanced {
                push_number(out, u32::from(class), 1);
                out.push(b'.');
                push_number(out, u32::from(subject), 1);
                out.push(b'.');
                push_number(out, u32::from(detail), 1);
                if !text.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend(text.chars().map(|c| match c {
                c if c.is_ascii_control() => b' ',
                c if !c.is_ascii() => b'?',
                c => c as u8,
            }));
            // One byte per char now, so the cut cannot split anything.
            out.truncate(start + (out.len() - start).min(MAX_OUT_LINE));
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The encoded reply, see [`Reply::write_to`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// All lines joined with spaces, for logs and for relaying a backend
    /// reply as a single line.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }
}

impl fmt::Display for Reply {
    /// `250 2.0.0 text`, on one line, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        let text = self.text();
        if !text.is_empty() {
            write!(f, " {text}")?;
        }
        Ok(())
    }
}

/// Why a backend reply could not be read. After any of these the connection
/// is out of step with the backend and should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line too long")]
    TooLong,
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
    #[error("reply has too many lines")]
    TooManyLines,
}

/// Longest backend reply line we read, including its line end. RFC 5321 says
/// 512, but real servers (Exchange's EHLO, long rejection texts) exceed it.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one backend reply.
pub const MAX_REPLY_LINES: usize = 200;

/// Reads backend replies out of a buffer, one complete reply at a time.
#[derive(Debug, Clone)]
pub struct ReplyParser {
    enhanced: bool,
    code: Option<u16>,
    enhanced_code: Option<EnhancedCode>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// `enhanced`: whether the server advertised ENHANCEDSTATUSCODES; only
    /// then is a leading `x.y.z` taken to be a code rather than text.
    pub fn new(enhanced: bool) -> Self {
        ReplyParser {
            enhanced,
            code: None,
            enhanced_code: None,
            lines: Vec::new(),
        }
    }

    /// Called after EHLO, once the capabilities are known.
    pub fn set_enhanced(&mut self, on: bool) {
        self.enhanced = on;
    }

    fn reset(&mut self) {
        self.code = None;
        self.enhanced_code = None;
        self.lines.clear();
    }

    /// Consumes whole lines from `buf` and returns the reply once its last
    /// line has arrived; `Ok(None)` means more data is needed (the lines read
    /// so far are kept). Lines may end in CRLF or, from sloppy servers, LF.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        let result = self.parse_inner(buf);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn parse_inner(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
                // The line will be at least one octet longer than what we hold.
                if buf.len() >= MAX_REPLY_LINE {
                    return Err(ReplyError::TooLong);
                }
                return Ok(None);
            };
            if lf + 1 > MAX_REPLY_LINE {
                return Err(ReplyError::TooLong);
            }
            let mut line = &buf[..lf];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let parsed = self.parse_line(line);
            buf.advance(lf + 1);
            if let Some(reply) = parsed? {
                return Ok(Some(reply));
            }
        }
    }

    fn parse_line(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        let code = match line {
            [a @ b'2'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', ..] => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => return Err(ReplyError::Malformed("bad reply code")),
        };
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(ReplyError::Malformed("bad separator after code")),
        };
        if *self.code.get_or_insert(code) != code {
            return Err(ReplyError::Malformed("reply code changed between lines"));
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default());
        let mut text: &str = &text;
        if self.enhanced {
            if let Some((e, rest)) = EnhancedCode::strip(text, (code / 100) as u8) {
                self.enhanced_code.get_or_insert(e);
                text = rest;
            }
        }
        self.lines.push(text.to_string());
        if !last {
            return Ok(None);
        }
        let reply = Reply {
            code,
            enhanced: self.enhanced_code,
            lines: std::mem::take(&mut self.lines),
        };
        self.reset();
        Ok(Some(reply))
    }
}

/// What a server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `Some(0)` when SIZE was announced without a (valid) limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
    pub chunking: bool,
    pub smtputf8: bool,
    /// Uppercased SASL mechanisms, from `AUTH` and the pre-standard
    /// `AUTH=` lines, without duplicates.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// The first line is the greeting and is skipped; keywords are
    /// case-insensitive (RFC 5321 §4.1.1.1). A reply that is not 2xx
    /// advertises nothing.
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities::default();
        if !reply.is_positive() {
            return caps;
        }
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "CHUNKING" => caps.chunking = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                _ => {
                    // Old Microsoft and Netscape clients needed "AUTH=LOGIN",
                    // so servers still send both forms.
                    let first = if keyword == "AUTH" {
                        None
                    } else if let Some(m) = keyword.strip_prefix("AUTH=") {
                        Some(m.to_string())
                    } else {
                        continue;
                    };
                    let mechs = first
                        .into_iter()
                        .chain(words.map(|w| w.to_ascii_uppercase()))
                        .filter(|m| !m.is_empty());
                    for m in mechs {
                        if !caps.auth.contains(&m) {
                            caps.auth.push(m);
                        }
                    }
                }
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(code: u16, enhanced: Option<EnhancedCode>, lines: &[&str]) -> String {
        let reply = Reply::multi(
            code,
            enhanced,
            lines.iter().map(|s| s.to_string()).collect(),
        );
        String::from_utf8(reply.to_bytes()).unwrap()
    }

    #[test]
    fn encode_table() {
        let ok = Some(EnhancedCode(2, 0, 0));
        let cases: &[(u16, Option<EnhancedCode>, &[&str], &str)] = &[
            (250, ok, &["OK"], "250 2.0.0 OK\r\n"),
            (250, None, &["OK"], "250 OK\r\n"),
            (250, ok, &["a", "b"], "250-2.0.0 a\r\n250 2.0.0 b\r\n"),
            (
                250,
                None,
                &["gw.example", "PIPELINING", "SIZE 1000"],
                "250-gw.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
            ),
            (
                354,
                None,
                &["End data with <CR><LF>.<CR><LF>"],
                "354 End data with <CR><LF>.<CR><LF>\r\n",
            ),
            (
                550,
                Some(EnhancedCode(5, 7, 1)),
                &["Relaying denied"],
                "550 5.7.1 Relaying denied\r\n",
            ),
            (421, Some(EnhancedCode(4, 4, 2)), &[""], "421 4.4.2\r\n"),
            (250, None, &[""], "250\r\n"),
            (250, None, &[], "250\r\n"),
            (250, None, &["", "x"], "250-\r\n250 x\r\n"),
            (250, ok, &["a", ""], "250-2.0.0 a\r\n250 2.0.0\r\n"),
            // Injection attempts are flattened onto one line.
            (
                550,
                Some(EnhancedCode(5, 1, 1)),
                &["no\r\n250 OK"],
                "550 5.1.1 no  250 OK\r\n",
            ),
            (550, None, &["a\nb\rc\0d\te\x7f"], "550 a b c d e \r\n"),
            (550, None, &["caf\u{e9} \u{1F600}"], "550 caf? ?\r\n"),
            (334, None, &["TlRMTVNTUAACAAAA"], "334 TlRMTVNTUAACAAAA\r\n"),
            (
                235,
                Some(EnhancedCode(2, 7, 0)),
                &["Authentication successful"],
                "235 2.7.0 Authentication successful\r\n",
            ),
        ];
        for (code, e, lines, want) in cases {
            assert_eq!(enc(*code, *e, lines), *want, "{lines:?}");
        }
    }

    #[test]
    fn encode_caps_line_length() {
        let long = "x".repeat(2000);
        for e in [None, Some(EnhancedCode(5, 7, 1))] {
            let out = enc(550, e, &[&long, &long]);
            for line in out.split_terminator("\r\n") {
                assert_eq!(line.len(), 510, "{e:?}");
            }
        }
    }

    #[test]
    fn reply_new_and_predicates() {
        let r = Reply::new(250, EnhancedCode(2, 1, 5), "Recipient OK");
        assert_eq!(r.to_bytes(), b"250 2.1.5 Recipient OK\r\n");
        assert_eq!(r.to_string(), "250 2.1.5 Recipient OK");
        assert_eq!(EnhancedCode(5, 7, 139).to_string(), "5.7.139");
        let classes = [
            (220, [true, false, false, false]),
            (354, [false, true, false, false]),
            (451, [false, false, true, false]),
            (554, [false, false, false, true]),
        ];
        for (code, want) in classes {
            let r = Reply::multi(code, None, vec!["a".into(), "b".into()]);
            assert_eq!(
                [
                    r.is_positive(),
                    r.is_intermediate(),
                    r.is_transient(),
                    r.is_permanent()
                ],
                want
            );
            assert_eq!(r.text(), "a b");
        }
    }

    fn reply(code: u16, e: Option<EnhancedCode>, lines: &[&str]) -> Reply {
        Reply::multi(code, e, lines.iter().map(|s| s.to_string()).collect())
    }

    type Expected = Result<Option<Reply>, ReplyError>;

    #[test]
    fn parse_table() {
        use ReplyError::*;
        let e = |a, b, c| Some(EnhancedCode(a, b, c));
        #[rustfmt::skip]
        let cases: Vec<(bool, &[u8], Expected, &[u8])> = vec![
            // (enhanced, input, result of first parse, left in buffer)
            (false, b"220 mx.example ESMTP Postfix\r\n", Ok(Some(reply(220, None, &["mx.example ESMTP Postfix"]))), b""),
            (false, b"250 2.0.0 Ok\r\n", Ok(Some(reply(250, None, &["2.0.0 Ok"]))), b""),
            (true, b"250 2.0.0 Ok\r\n", Ok(Some(reply(250, e(2, 0, 0), &["Ok"]))), b""),
            (true, b"250 2.0.0\r\n", Ok(Some(reply(250, e(2, 0, 0), &[""]))), b""),
            (true, b"550 5.7.1 Relay denied\r\n", Ok(Some(reply(550, e(5, 7, 1), &["Relay denied"]))), b""),
            (true, b"550 5.7.139 denied\r\n", Ok(Some(reply(550, e(5, 7, 139), &["denied"]))), b""),
            // Class mismatch or malformed: it is text, not a code.
            (true, b"550 4.7.1 odd\r\n", Ok(Some(reply(550, None, &["4.7.1 odd"]))), b""),
            (true, b"550 5.7.1234 odd\r\n", Ok(Some(reply(550, None, &["5.7.1234 odd"]))), b""),
            (true, b"550 5.7 odd\r\n", Ok(Some(reply(550, None, &["5.7 odd"]))), b""),
            (true, b"550 5.7.1.2 odd\r\n", Ok(Some(reply(550, None, &["5.7.1.2 odd"]))), b""),
            (true, b"550 5.x.1 odd\r\n", Ok(Some(reply(550, None, &["5.x.1 odd"]))), b""),
            (true, b"354 Start mail input\r\n", Ok(Some(reply(354, None, &["Start mail input"]))), b""),
            (false, b"250\r\n", Ok(Some(reply(250, None, &[""]))), b""),
            (false, b"250 \r\n", Ok(Some(reply(250, None, &[""]))), b""),
            (false, b"250 OK\n", Ok(Some(reply(250, None, &["OK"]))), b""),
            (false, b"250-a\n250-b\r\n250 c\n", Ok(Some(reply(250, None, &["a", "b", "c"]))), b""),
            (true, b"250-2.1.0 a\r\n250 2.1.0 b\r\n", Ok(Some(reply(250, e(2, 1, 0), &["a", "b"]))), b""),
            (true, b"250-first\r\n250 2.1.0 b\r\n", Ok(Some(reply(250, e(2, 1, 0), &["first", "b"]))), b""),
            (false, b"250-", Ok(None), b"250-"),
            (false, b"250-a\r\n", Ok(None), b""),
            (false, b"250-a\r\n250 b", Ok(None), b"250 b"),
            (false, b"", Ok(None), b""),
            // Pipelined replies come out one at a time.
            (false, b"250 a\r\n250 b\r\n", Ok(Some(reply(250, None, &["a"]))), b"250 b\r\n"),
            (false, b"250 a\r\n550 b\r\n", Ok(Some(reply(250, None, &["a"]))), b"550 b\r\n"),
            // Malformed.
            (false, b"250-a\r\n251 b\r\n", Err(Malformed("reply code changed between lines")), b""),
            (false, b"25\r\n", Err(Malformed("bad reply code")), b""),
            (false, b"\r\n", Err(Malformed("bad reply code")), b""),
            (false, b"199 x\r\n", Err(Malformed("bad reply code")), b""),
            (false, b"600 x\r\n", Err(Malformed("bad reply code")), b""),
            (false, b"2a0 x\r\n", Err(Malformed("bad reply code")), b""),
            (false, b"250x\r\n", Err(Malformed("bad separator after code")), b""),
            (false, b"250_x\r\n", Err(Malformed("bad separator after code")), b""),
            (false, b"HTTP/1.1 400 Bad Request\r\n", Err(Malformed("bad reply code")), b""),
            (false, b"250 caf\xe9\r\n", Ok(Some(reply(250, None, &["caf\u{fffd}"]))), b""),
        ];
        for (enhanced, input, want, rest) in cases {
            let mut p = ReplyParser::new(enhanced);
            let mut buf = BytesMut::from(input);
            assert_eq!(
                p.parse(&mut buf),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(
                &buf[..],
                rest,
                "rest of {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn parse_caps() {
        let mut p = ReplyParser::new(false);
        let long = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE - 6));
        assert_eq!(long.len(), MAX_REPLY_LINE);
        let mut buf = BytesMut::from(long.as_bytes());
        assert!(p.parse(&mut buf).unwrap().is_some());

        let mut buf =
            BytesMut::from(format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE - 5)).as_bytes());
        assert_eq!(p.parse(&mut buf), Err(ReplyError::TooLong));
        // Without a line end in sight, the cap applies as soon as it is reached.
        let mut buf = BytesMut::from(vec![b'x'; MAX_REPLY_LINE].as_slice());
        assert_eq!(p.parse(&mut buf), Err(ReplyError::TooLong));
        let mut buf = BytesMut::from(vec![b'x'; MAX_REPLY_LINE - 1].as_slice());
        assert_eq!(p.parse(&mut buf), Ok(None));

        let mut many = "250-x\r\n".repeat(MAX_REPLY_LINES - 1);
        many.push_str("250 x\r\n");
        let mut buf = BytesMut::from(many.as_bytes());
        assert_eq!(
            p.parse(&mut buf).unwrap().unwrap().lines.len(),
            MAX_REPLY_LINES
        );
        let mut buf = BytesMut::from("250-x\r\n".repeat(MAX_REPLY_LINES + 1).as_bytes());
        assert_eq!(p.parse(&mut buf), Err(ReplyError::TooManyLines));
    }

    #[test]
    fn parse_at_every_split() {
        let input: &[u8] = b"250-mx.example\r\n250-SIZE 1000\n250 2.0.0 OK\r\n354 go\r\n";
        let parse_all = |pieces: &[&[u8]]| {
            let mut p = ReplyParser::new(true);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in pieces {
                buf.extend_from_slice(piece);
                while let Some(r) = p.parse(&mut buf).unwrap() {
                    got.push(r);
                }
            }
            got
        };
        let whole = parse_all(&[input]);
        assert_eq!(
            whole,
            vec![
                reply(250, e2(), &["mx.example", "SIZE 1000", "OK"]),
                reply(354, None, &["go"]),
            ]
        );
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(parse_all(&[a, b]), whole, "split at {i}");
        }
    }

    fn e2() -> Option<EnhancedCode> {
        Some(EnhancedCode(2, 0, 0))
    }

    #[test]
    fn set_enhanced_applies_to_later_replies() {
        let mut p = ReplyParser::new(false);
        let mut buf = BytesMut::from(&b"250 2.0.0 a\r\n250 2.0.0 b\r\n"[..]);
        assert_eq!(p.parse(&mut buf).unwrap().unwrap().enhanced, None);
        p.set_enhanced(true);
        assert_eq!(p.parse(&mut buf).unwrap().unwrap().enhanced, e2());
    }

    #[test]
    fn parser_recovers_after_error() {
        let mut p = ReplyParser::new(false);
        let mut buf = BytesMut::from(&b"250-a\r\n251 b\r\n250 c\r\n"[..]);
        assert!(p.parse(&mut buf).is_err());
        assert_eq!(p.parse(&mut buf), Ok(Some(reply(250, None, &["c"]))));
    }

    fn ehlo(text: &str) -> Reply {
        let mut p = ReplyParser::new(false);
        let mut buf = BytesMut::from(text.as_bytes());
        p.parse(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn capabilities_table() {
        let postfix = "250-mail.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n";
        let exchange = "250-EX01.contoso.local Hello [192.0.2.10]\r\n250-SIZE 37748736\r\n250-PIPELINING\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250-X-ANONYMOUSTLS\r\n250-AUTH NTLM\r\n250-X-EXPS GSSAPI NTLM\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n250-XRDST\r\n250 XSHADOWREQUEST\r\n";
        let exchange_auth = "250-EX01.contoso.local Hello [192.0.2.10]\r\n250-SIZE\r\n250-AUTH GSSAPI NTLM LOGIN\r\n250-AUTH=LOGIN\r\n250 8BITMIME\r\n";
        let lower = "250-mx\n250-size  5000 \n250-starttls\n250-auth=login plain\n250 pipelining\n";
        let cases: Vec<(&str, Capabilities)> = vec![
            (
                postfix,
                Capabilities {
                    pipelining: true,
                    size: Some(10_240_000),
                    eight_bit_mime: true,
                    starttls: true,
                    enhanced_status_codes: true,
                    chunking: true,
                    smtputf8: true,
                    auth: vec!["PLAIN".into(), "LOGIN".into()],
                },
            ),
            (
                exchange,
                Capabilities {
                    pipelining: true,
                    size: Some(37_748_736),
                    eight_bit_mime: true,
                    starttls: true,
                    enhanced_status_codes: true,
                    chunking: true,
                    smtputf8: false,
                    auth: vec!["NTLM".into()],
                },
            ),
            (
                exchange_auth,
                Capabilities {
                    size: Some(0),
                    eight_bit_mime: true,
                    auth: vec!["GSSAPI".into(), "NTLM".into(), "LOGIN".into()],
                    ..Default::default()
                },
            ),
            ("250 mx.example\r\n", Capabilities::default()),
            (
                "250-mx.example says PIPELINING\r\n250 SIZE nope\r\n",
                Capabilities {
                    size: Some(0),
                    ..Default::default()
                },
            ),
            (
                "250-mx\r\n250-\r\n250  \r\n250 AUTH\r\n",
                Capabilities::default(),
            ),
            ("550-no\r\n550 PIPELINING\r\n", Capabilities::default()),
            (
                lower,
                Capabilities {
                    pipelining: true,
                    size: Some(5000),
                    starttls: true,
                    auth: vec!["LOGIN".into(), "PLAIN".into()],
                    ..Default::default()
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Capabilities::from_ehlo(&ehlo(text)), want, "{text}");
        }
    }
}
