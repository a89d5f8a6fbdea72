//! Helpers for RelayGuard's end-to-end tests.
//!
//! Every test starts the real `relayguard` binary on port 0 in front of a
//! real backend (Postfix's `smtp-sink`, or a [`FakeBackend`] for failures
//! smtp-sink cannot stage) and talks to it with real clients (`swaks`,
//! `curl`) or with the raw [`Client`] for protocol edge cases. Assertions
//! are made on what the backend actually received.
//!
//! Everything here is blocking std code: one test, a few threads.

mod certs;
mod client;
mod config;
mod fake_backend;
mod gateway;
mod sink;
mod tools;

pub use certs::test_cert;
pub use client::{dot_stuff, Client, Reply};
pub use config::{config, Config};
pub use fake_backend::{DataBehaviour, FakeBackend, FakeMessage};
pub use gateway::{relayguard_bin, Gateway};
pub use sink::{Sink, SinkMessage};
pub use tools::{closed_port, curl, free_port, swaks, wait_until, words, write_file, TIMEOUT};
