//! The one `Received:` header RelayGuard adds (RFC 5321 §4.4, RFC 3848).
//!
//! It records what the backend cannot know: the real client address, the
//! TLS parameters, whether the client authenticated, and the session id
//! that ties the message to RelayGuard's logs.

use std::net::IpAddr;

use chrono::{DateTime, FixedOffset};

use crate::tls::TlsInfo;

/// What the header says about the session.
#[derive(Debug)]
pub struct Trace<'a> {
    pub helo: &'a str,
    pub client: IpAddr,
    pub tls: Option<&'a TlsInfo>,
    /// Authenticated identity (e.g. `DEMO\alice`), once AUTH exists.
    pub authenticated: Option<&'a str>,
    pub esmtp: bool,
    pub host: &'a str,
    pub session_id: &'a str,
    pub date: DateTime<FixedOffset>,
}

/// The RFC 3848 "with" keyword.
fn protocol(esmtp: bool, tls: bool, auth: bool) -> &'static str {
    match (esmtp, tls, auth) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    }
}

/// Client-supplied text goes into a comment or a domain slot; anything that
/// could end the comment or the header is replaced.
fn clean(text: &str) -> String {
    text.chars()
        .take(255)
        .map(|c| match c {
            '(' | ')' | '\\' | ';' => '_',
            c if c.is_ascii_graphic() => c,
            _ => '_',
        })
        .collect()
}

/// Text inside a comment: `(`, `)` and `\\` become quoted-pairs (RFC 5322
/// §3.2.4), so `DEMO\\alice` stays readable and cannot close the comment.
fn comment_text(text: &str) -> String {
    let mut out = String::new();
    for c in clean_chars(text) {
        if matches!(c, '(' | ')' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn clean_chars(text: &str) -> impl Iterator<Item = char> + '_ {
    text.chars()
        .take(255)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
}

impl Trace<'_> {
    /// The header with CRLF line ends, folded, ending in CRLF.
    pub fn header(&self) -> String {
        let mut h = format!("Received: from {} ([{}])", clean(self.helo), self.client);
        if let Some(tls) = self.tls {
            h.push_str(&format!(
                "\r\n\t(using {} with cipher {})",
                tls.version,
                clean(&tls.cipher)
            ));
        }
        if let Some(who) = self.authenticated {
            h.push_str(&format!("\r\n\t(authenticated as {})", comment_text(who)));
        }
        h.push_str(&format!(
            "\r\n\tby {} (RelayGuard) with {} id {};\r\n\t{}\r\n",
            self.host,
            protocol(self.esmtp, self.tls.is_some(), self.authenticated.is_some()),
            self.session_id,
            self.date.to_rfc2822()
        ));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date() -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc2822("Thu, 26 Nov 2026 09:32:14 +0000").unwrap()
    }

    #[test]
    fn plain_esmtp() {
        let t = Trace {
            helo: "client.test",
            client: "192.0.2.7".parse().unwrap(),
            tls: None,
            authenticated: None,
            esmtp: true,
            host: "relay.test",
            session_id: "abc123",
            date: date(),
        };
        assert_eq!(
            t.header(),
            "Received: from client.test ([192.0.2.7])\r\n\tby relay.test (RelayGuard) with ESMTP id abc123;\r\n\tThu, 26 Nov 2026 09:32:14 +0000\r\n"
        );
    }

    #[test]
    fn tls_and_auth_and_hostile_helo() {
        let tls = TlsInfo {
            version: "TLSv1.3",
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            end_point: None,
        };
        let t = Trace {
            helo: "evil)\r\nX-Injected: yes",
            client: "2001:db8::1".parse().unwrap(),
            tls: Some(&tls),
            authenticated: Some("DEMO\\alice"),
            esmtp: true,
            host: "relay.test",
            session_id: "id1",
            date: date(),
        };
        let h = t.header();
        assert!(h.starts_with("Received: from evil_"), "{h}");
        assert!(!h.contains("\r\nX-Injected"), "{h}");
        assert!(h.contains("(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)"));
        assert!(h.contains("(authenticated as DEMO\\\\alice)"), "{h}");
        assert!(h.contains("with ESMTPSA id id1;"));
        assert!(h.contains("[2001:db8::1]"));
    }

    #[test]
    fn protocol_keywords() {
        assert_eq!(protocol(false, true, true), "SMTP");
        assert_eq!(protocol(true, true, false), "ESMTPS");
        assert_eq!(protocol(true, false, true), "ESMTPA");
    }
}
