//! Every reply the gateway itself sends, in one table.
//!
//! Keeping them here makes the wording and the enhanced status codes
//! (RFC 3463, RFC 5248) reviewable in one place and keeps handlers free of
//! byte literals. Per RFC 2034 the greeting and the EHLO reply carry no
//! enhanced code; everything else does.

use crate::smtp::command::CommandError;
use crate::smtp::data::DataViolation;
use crate::smtp::reply::{EnhancedCode as E, Reply};

pub fn greeting(host: &str) -> Reply {
    Reply::multi(220, None, vec![format!("{host} ESMTP RelayGuard")])
}
pub fn early_talker() -> Reply {
    Reply::new(
        554,
        E(5, 5, 1),
        "Protocol error: client talked before the greeting",
    )
}
pub fn too_many_connections() -> Reply {
    Reply::new(421, E(4, 7, 0), "Too many connections, try again later")
}
pub fn too_many_from_ip() -> Reply {
    Reply::new(
        421,
        E(4, 7, 0),
        "Too many connections from your address, try again later",
    )
}
pub fn shutting_down(host: &str) -> Reply {
    Reply::new(
        421,
        E(4, 3, 2),
        format!("{host} Service shutting down, try again later"),
    )
}
pub fn timeout(host: &str) -> Reply {
    Reply::new(
        421,
        E(4, 4, 2),
        format!("{host} Timeout waiting for input, closing connection"),
    )
}
pub fn too_many_errors() -> Reply {
    Reply::new(421, E(4, 7, 0), "Too many errors, closing connection")
}
pub fn too_many_junk() -> Reply {
    Reply::new(
        421,
        E(4, 7, 0),
        "Too many commands without a transaction, closing connection",
    )
}
pub fn helo_ok(host: &str, client: &str) -> Reply {
    Reply::new(250, E(2, 0, 0), format!("{host} Hello {client}"))
}
pub fn ok() -> Reply {
    Reply::new(250, E(2, 0, 0), "Ok")
}
pub fn sender_ok() -> Reply {
    Reply::new(250, E(2, 1, 0), "Sender ok")
}
pub fn bye(host: &str) -> Reply {
    Reply::new(221, E(2, 0, 0), format!("{host} Bye"))
}
pub fn help() -> Reply {
    Reply::new(
        214,
        E(2, 0, 0),
        "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY EXPN STARTTLS AUTH",
    )
}
pub fn vrfy_cannot() -> Reply {
    Reply::new(
        252,
        E(2, 5, 0),
        "Cannot VRFY user, but will accept message and attempt delivery",
    )
}
pub fn not_implemented() -> Reply {
    Reply::new(502, E(5, 5, 1), "Command not implemented")
}
pub fn bdat_refused() -> Reply {
    Reply::new(502, E(5, 5, 1), "BDAT not supported here, use DATA")
}
pub fn ready_for_tls() -> Reply {
    Reply::new(220, E(2, 0, 0), "Ready to start TLS")
}
pub fn tls_unavailable() -> Reply {
    Reply::new(502, E(5, 5, 1), "STARTTLS not available")
}
pub fn tls_already() -> Reply {
    Reply::new(503, E(5, 5, 1), "TLS already active")
}
pub fn pipelined_after_starttls() -> Reply {
    Reply::new(
        554,
        E(5, 5, 1),
        "Commands pipelined after STARTTLS are refused",
    )
}
pub fn need_helo() -> Reply {
    Reply::new(503, E(5, 5, 1), "Send EHLO or HELO first")
}
pub fn nested_mail() -> Reply {
    Reply::new(503, E(5, 5, 1), "Sender already specified")
}
pub fn need_mail() -> Reply {
    Reply::new(503, E(5, 5, 1), "Need MAIL command")
}
pub fn need_rcpt() -> Reply {
    Reply::new(503, E(5, 5, 1), "Need RCPT command")
}
pub fn no_valid_recipients() -> Reply {
    Reply::new(554, E(5, 5, 1), "No valid recipients")
}
pub fn in_transaction() -> Reply {
    Reply::new(503, E(5, 5, 1), "Not allowed during a mail transaction")
}
pub fn too_many_recipients() -> Reply {
    Reply::new(452, E(4, 5, 3), "Too many recipients")
}
pub fn size_exceeded(max: u64) -> Reply {
    Reply::new(
        552,
        E(5, 3, 4),
        format!("Message size exceeds fixed maximum of {max} bytes"),
    )
}
pub fn relay_denied() -> Reply {
    Reply::new(550, E(5, 7, 1), "Relaying denied")
}
pub fn start_data() -> Reply {
    Reply::new(354, E(2, 0, 0), "End data with <CR><LF>.<CR><LF>")
}
pub fn backend_unavailable() -> Reply {
    Reply::new(
        451,
        E(4, 4, 1),
        "Backend temporarily unavailable, try again later",
    )
}
pub fn backend_failed_in_data() -> Reply {
    Reply::new(
        451,
        E(4, 4, 2),
        "Backend connection lost, message not delivered, try again later",
    )
}
pub fn auth_ok() -> Reply {
    Reply::new(235, E(2, 7, 0), "Authentication successful")
}
/// One reply for every refused attempt: unknown user, wrong password,
/// disabled account, replay… an attacker learns nothing from it.
pub fn auth_failed() -> Reply {
    Reply::new(535, E(5, 7, 3), "Authentication unsuccessful")
}
pub fn auth_malformed() -> Reply {
    Reply::new(501, E(5, 5, 2), "Malformed authentication data")
}
pub fn auth_cancelled() -> Reply {
    Reply::new(501, E(5, 7, 0), "Authentication cancelled")
}
pub fn auth_locked_out() -> Reply {
    Reply::new(
        454,
        E(4, 7, 0),
        "Too many authentication failures, try again later",
    )
}
pub fn auth_temporary() -> Reply {
    Reply::new(
        454,
        E(4, 7, 0),
        "Temporary authentication failure, try again later",
    )
}
pub fn already_authenticated() -> Reply {
    Reply::new(503, E(5, 5, 1), "Already authenticated")
}
pub fn starttls_first() -> Reply {
    Reply::new(530, E(5, 7, 0), "Must issue a STARTTLS command first")
}
pub fn auth_needs_tls_listener() -> Reply {
    Reply::new(
        502,
        E(5, 7, 0),
        "AUTH requires TLS, which this listener does not offer",
    )
}
pub fn starttls_after_auth() -> Reply {
    Reply::new(503, E(5, 5, 1), "STARTTLS is not allowed after AUTH")
}
pub fn encryption_required() -> Reply {
    Reply::new(
        538,
        E(5, 7, 11),
        "Encryption required for requested authentication mechanism",
    )
}
pub fn unknown_mechanism() -> Reply {
    Reply::new(504, E(5, 5, 4), "Unrecognized authentication mechanism")
}
pub fn line_too_long() -> Reply {
    Reply::new(500, E(5, 5, 2), "Line too long")
}
pub fn bare_lf() -> Reply {
    Reply::new(500, E(5, 5, 2), "Bare LF in command, use CRLF")
}
pub fn nul_in_command() -> Reply {
    Reply::new(500, E(5, 5, 2), "NUL character in command")
}

/// The reply for a message whose data broke a rule; nothing was delivered.
pub fn data_violation(v: DataViolation, max_size: u64, max_line: usize) -> Reply {
    match v {
        DataViolation::TooLarge => size_exceeded(max_size),
        DataViolation::LineTooLong => Reply::new(
            550,
            E(5, 6, 0),
            format!("Message line longer than {max_line} bytes, message refused"),
        ),
        DataViolation::BareLf => Reply::new(
            550,
            E(5, 6, 0),
            "Message contains a bare LF, use CRLF line endings; message refused",
        ),
        DataViolation::BareCr => Reply::new(
            550,
            E(5, 6, 0),
            "Message contains a bare CR, use CRLF line endings; message refused",
        ),
        DataViolation::Nul => Reply::new(
            550,
            E(5, 6, 0),
            "Message contains NUL characters; message refused",
        ),
    }
}

/// Maps a command parse failure to its reply (RFC 5321 §4.2.4, RFC 3463).
pub fn command_error(e: &CommandError, in_mail: bool) -> Reply {
    match e {
        CommandError::Unrecognized => Reply::new(500, E(5, 5, 1), "Command unrecognized"),
        CommandError::Syntax(what) => Reply::new(501, E(5, 5, 4), format!("Syntax error: {what}")),
        CommandError::BadAddress(what) => {
            let code = if in_mail { E(5, 1, 7) } else { E(5, 1, 3) };
            Reply::new(501, code, format!("Bad address syntax: {what}"))
        }
        CommandError::NonAscii => Reply::new(
            553,
            E(5, 6, 7),
            "Non-ASCII address not supported (no SMTPUTF8)",
        ),
        CommandError::UnsupportedParameter(p) => {
            Reply::new(555, E(5, 5, 4), format!("Unsupported parameter {p}"))
        }
        CommandError::NotImplemented => not_implemented(),
    }
}

/// A reply from the backend passed on to the client. Legacy backends may
/// send enhanced codes without announcing ENHANCEDSTATUSCODES (so the
/// parser left them in the text): those are taken over, not doubled. A
/// backend that sends none still yields one, derived from the class.
pub fn mirror(reply: &Reply, default_detail: (u16, u16)) -> Reply {
    let mut r = reply.clone();
    if r.enhanced.is_none() {
        let class = (r.code / 100) as u8;
        if let Some((code, rest)) = r.lines.first().and_then(|l| leading_enhanced(l, class)) {
            r.enhanced = Some(code);
            r.lines[0] = rest;
            for line in r.lines.iter_mut().skip(1) {
                if let Some((_, rest)) = leading_enhanced(line, class) {
                    *line = rest;
                }
            }
        } else {
            r.enhanced = Some(if class == 2 {
                E(2, default_detail.0, default_detail.1)
            } else {
                E(class, 0, 0)
            });
        }
    }
    r
}

/// `"2.1.5 Ok"` → (2.1.5, "Ok") when the class matches the reply code.
fn leading_enhanced(text: &str, class: u8) -> Option<(E, String)> {
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = word.split('.');
    let c: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || c != class || subject > 999 || detail > 999 {
        return None;
    }
    Some((E(c, subject, detail), rest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_takes_over_unannounced_enhanced_codes() {
        let r = Reply::multi(250, None, vec!["2.1.5 Ok".into()]);
        let m = mirror(&r, (1, 5));
        assert_eq!(m.enhanced, Some(E(2, 1, 5)));
        assert_eq!(m.lines, vec!["Ok".to_string()]);
        let r = Reply::multi(550, None, vec!["2.1.5 odd".into()]);
        assert_eq!(mirror(&r, (0, 0)).enhanced, Some(E(5, 0, 0)));
        let r = Reply::multi(250, None, vec!["Ok".into()]);
        assert_eq!(mirror(&r, (1, 5)).enhanced, Some(E(2, 1, 5)));
    }
}
