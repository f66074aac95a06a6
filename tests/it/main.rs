//! tollgate's integration tests, as one test binary (one link, one process; the modules run in
//! parallel within it). Run a group with `cargo test --test it <module>::`, e.g.
//! `cargo test --test it routing::`.

mod common;

mod access_log;
mod admin_api;
mod anthropic;
mod apis;
mod auth;
mod budgets;
mod chaos;
mod chat;
mod chat_passthrough;
mod cli;
mod contract;
mod db_pool;
mod docs;
mod embeddings;
mod faults;
mod fuzz;
mod hostile;
mod key_pools;
mod ledger_store;
mod lifecycle;
mod messages;
mod openapi;
mod operator;
mod redis_limits;
mod responses;
mod routing;
mod tracing;
