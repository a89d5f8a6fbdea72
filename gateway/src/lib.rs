//! RelayGuard: an SMTP relay gateway placed in front of a legacy MTA.
//!
//! Request path: client ─▶ [`server`] (admission, TLS) ─▶ [`session`]
//! (SMTP state machine, asks `policy`) ─▶ [`backend`] (SMTP client) ─▶ MTA.
//! A client greeted and still silent waits in [`idle`], without a task.
//! Parsing lives in [`smtp`] and never touches a socket.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod demo;
pub mod http;
pub mod idle;
pub mod metrics;
pub mod policy_source;
pub mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod session;
pub mod shards;
pub mod smtp;
pub mod tls;
