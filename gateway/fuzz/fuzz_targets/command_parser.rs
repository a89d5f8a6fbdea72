//! Any byte string as a command line: the parser must not panic, and what it
//! accepts must be safe to forward.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayguard::smtp::command::{self, Command, CommandError, Path, ReversePath};

fn check_path(p: &Path) {
    // The raw path is forwarded verbatim, so it must be short, ASCII and free
    // of anything that could end or split a command line at the backend.
    assert!(p.raw.len() + 2 <= 256, "{p:?}");
    assert!(p.raw.bytes().all(|b| (0x20..0x7f).contains(&b)), "{p:?}");
    assert!(p.mailbox.local_part.len() <= 64, "{p:?}");
    // Parsing the forwarded form again gives the same result.
    let line = format!("RCPT TO:<{}>", p.raw);
    match command::parse(line.as_bytes()) {
        Ok(Command::Rcpt { to }) => assert_eq!(&to, p),
        other => panic!("{line:?} re-parsed as {other:?}"),
    }
}

fn check_text(s: &str) {
    assert!(!s.chars().any(|c| c.is_control()), "{s:?}");
}

fuzz_target!(|data: &[u8]| {
    let result = command::parse(data);
    match &result {
        Ok(cmd) => {
            assert_eq!(command::verb(data), Some(cmd.verb()));
            match cmd {
                Command::Mail {
                    from: ReversePath::Path(p),
                    ..
                } => check_path(p),
                Command::Rcpt { to } => check_path(to),
                Command::Ehlo(s) | Command::Helo(s) | Command::Vrfy(s) | Command::Expn(s) => {
                    assert!(!s.is_empty());
                    check_text(s);
                }
                Command::Help(Some(s)) => check_text(s),
                Command::Auth {
                    mechanism,
                    initial_response,
                } => {
                    assert!(!mechanism.is_empty() && mechanism.len() <= 20);
                    if let Some(r) = initial_response {
                        check_text(r);
                    }
                }
                _ => {}
            }
        }
        Err(CommandError::Unrecognized) => assert_eq!(command::verb(data), None),
        Err(_) => assert!(command::verb(data).is_some()),
    }
    // Error messages render without panicking.
    if let Err(e) = result {
        let _ = e.to_string();
    }
});
