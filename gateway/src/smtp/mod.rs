//! The SMTP wire protocol, without I/O.
//!
//! Everything here turns bytes into typed values and back and never touches
//! a socket, a clock or a runtime, so that every edge case of the protocol can
//! be pinned by a table-driven unit test and explored by a fuzzer
//! (`gateway/fuzz/`). The session code owns the buffers and the sockets and
//! drives these parsers:
//!
//! ```text
//! client ──bytes──▶ line::LineReader ──line──▶ command::parse ──Command──▶ session
//!        ──bytes──▶ data::DataReceiver::ingest_stuffed (after 354) ──checked, stuffed message──▶ backend
//! backend ──bytes──▶ reply::ReplyParser ──Reply──▶ session ──Reply::write_to──▶ client
//! ```
//!
//! The body is checked and relayed in one pass: a compliant client's bytes are
//! already dot-stuffed, so the receiver copies them through and only rewrites
//! what a non-compliant client got wrong. `data::DotStuffer` is the reference
//! the tests and the fuzzer hold that output to.
//!
//! Parsers are deliberately strict: the gateway sits in front of a legacy MTA
//! whose own parser we do not control, so anything ambiguous is refused here
//! rather than forwarded for the backend to interpret differently.

pub mod command;
pub mod data;
pub mod header_from;
pub mod line;
pub mod reply;
