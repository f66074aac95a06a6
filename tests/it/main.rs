//! tollgate's integration tests, as one test binary (one link, one process; the modules run in
//! parallel within it). Run a group with `cargo test --test it <module>::`, e.g.
//! `cargo test --test it routing::`.

mod common;

mod access_log;
mod anthropic;
mod apis;
mod auth;
mod budgets;
mod chat;
mod cli;
mod contract;
mod embeddings;
mod faults;
mod key_pools;
mod lifecycle;
mod messages;
mod operator;
mod responses;
mod routing;
