//! Helpers for RelayGuard's end-to-end tests.
//!
//! Every test starts the real `relayguard` binary on port 0 in front of a
//! real backend (Postfix's `smtp-sink`, or a [`FakeBackend`] for failures
//! smtp-sink cannot stage) and talks to it with real clients (`swaks`,
//! `curl`, `nmap`, impacket through [`ntlm::impacket`]) or with the raw
//! [`Client`] for protocol edge cases, and [`ntlm`] for `AUTH NTLM` with
//! policy's honest or hostile NTLM client. Assertions are made on what the
//! backend actually received.
//!
//! Everything here is blocking std code: one test, a few threads.

mod auth;
mod certs;
mod client;
mod config;
mod fake_backend;
mod gateway;
mod haproxy;
pub mod ntlm;
pub mod prometheus;
mod samba;
mod sink;
mod tools;

pub use auth::{
    hash_password, run_hash_password, users_yaml, write_users_file, Account, IdentitySource, ALICE,
    BOB, DNS_COMPUTER, DNS_DOMAIN, NETBIOS_COMPUTER, NETBIOS_DOMAIN,
};
pub use certs::{pem_to_der, test_cert};
pub use client::{dot_stuff, Client, Reply};
pub use config::{config, Config};
pub use fake_backend::{DataBehaviour, FakeBackend, FakeMessage, Fault, GARBAGE};
pub use gateway::{relayguard_bin, Gateway};
pub use haproxy::{Frontend, Haproxy, ProxyHeader};
pub use samba::{DcGroup, DcUser, SambaDc};
pub use sink::{Sink, SinkMessage};
pub use tools::{
    closed_port, curl, free_port, nmap, swaks, wait_until, words, write_file, TIMEOUT,
};
