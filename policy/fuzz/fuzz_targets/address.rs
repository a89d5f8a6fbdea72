//! Any text as a MAIL FROM or RCPT TO path: canonicalisation must not
//! panic, and what it produces must be a fixed point — the canonical form,
//! parsed again, gives itself — or the policy could decide on one reading
//! of an address and a second pass on another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::relay::address::{canonical_domain, parse_path, Path, Role};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    for role in [Role::Sender, Role::Recipient] {
        let Ok(path) = parse_path(raw, role) else {
            continue;
        };
        let Path::Mailbox { mailbox, .. } = &path else {
            continue;
        };
        let _ = mailbox.key();
        let _ = mailbox.routing();
        let shown = mailbox.to_string();
        // Quoting or A-label encoding can make the canonical form longer
        // than the limits the original fitted; only a successful re-parse
        // is compared.
        if let Ok(again) = parse_path(&shown, role) {
            assert_eq!(again.mailbox(), Some(mailbox), "{raw:?} -> {shown:?}");
        }
    }
    if let Ok(d) = canonical_domain(raw) {
        assert_eq!(canonical_domain(&d), Ok(d.clone()), "{raw:?}");
        assert!(d.is_ascii(), "{raw:?} -> {d:?}");
    }
});
