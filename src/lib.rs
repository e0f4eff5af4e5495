//! morag-jobs: the server that runs MoRAG's remote conversion jobs.
//!
//! A guided tour, in reading order:
//! - `clock`: time as an injectable value, so timeouts are testable without sleeping.
//! - `domain`: the job state machine and the timeout, retry and retention policy; no IO.
//! - `store`: the storage interface, `store::open`, the planning layer (`store::plan`, which
//!   decides every transition once) and the SQLite and PostgreSQL backends that apply its
//!   plans; the only place with SQL.
//! - `files`: source paths from requests, confined to the allowed roots.
//! - `context`: the state request handlers share (config, store, clock, wake-ups).
//! - `api`: the HTTP routes (MoRAG's wire protocol and the admin API); the only place with JSON.
//! - `registry`: the worker registry's in-memory side, flushed to the store in batches.
//! - `monitor`: the background rescuer (timeouts, due retries) and cleaner (retention).
//! - `delivery`: the outbox dispatcher and its sinks, which hand outcomes to ingestion.
//! - `limits`: request, connection and lease limits; `http_server`: the accept loop that
//!   enforces the connection limits.
//! - `config` and `app`: one validated configuration (its flags read by `value_parsers`),
//!   and the wiring that runs it all.
//! - `cli`: the `morag-jobs` command line, including the admin client subcommands.
//! - `import`: reading MoRAG's file-based prototype's jobs into the store.
//!
//! The wire types and `morag-jobs worker` live in the `morag-jobs-client` crate
//! (`crates/morag-jobs-client`), which knows nothing of this one.

pub mod api;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod context;
pub mod delivery;
pub mod domain;
pub mod files;
pub mod http_server;
pub mod import;
pub mod limits;
pub mod monitor;
pub mod registry;
pub mod store;
pub mod value_parsers;
pub mod wakeups;
