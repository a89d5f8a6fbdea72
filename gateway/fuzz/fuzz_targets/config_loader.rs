//! Any text as a configuration file: parsing and validation must not panic,
//! and when a configuration is accepted, its inline `policy:` section (cut
//! out and dedented by `policy_source::inline_section`, as
//! `policy_source::load` does) must load or be refused without panicking,
//! with and without a users file's principals to check names against.
//! Nothing here touches the file system: `Config::load`'s reading of the
//! file, the users file and a `policy_file` is left out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::relay::{KnownPrincipals, Policy};
use relayguard::config::Config;
use relayguard::policy_source::{inline_section, PolicyLocation};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::from_yaml(text, "fuzz") {
        Ok(config) => config,
        Err(e) => {
            // Errors render (file, line, column, field) without panicking.
            let _ = e.to_string();
            return;
        }
    };
    // `from_yaml` only accepts a configuration that says where its policy is.
    let location = config
        .policy_location
        .as_ref()
        .expect("an accepted configuration has a policy location");
    let _ = location.watched(Some(std::path::Path::new("fuzz")));
    let section = match location {
        PolicyLocation::File(_) => return,
        PolicyLocation::Inline { section, .. } => section,
    };
    // Cutting the section again gives the same result.
    assert_eq!(inline_section(text, "policy").as_ref(), Some(section));

    let mut known = KnownPrincipals::default();
    known.users.insert("demo\\alice".into());
    known.users.insert("alice".into());
    known.groups.insert("relay-senders".into());
    let listeners: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
    for known in [None, Some(&known)] {
        match Policy::from_yaml(&section.text, "fuzz", known) {
            Ok(policy) => {
                let _ = policy.warnings();
                if let Err(e) = policy.check_listeners(&listeners) {
                    let _ = e.to_string();
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
