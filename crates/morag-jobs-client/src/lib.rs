//! morag-jobs-client: the client side of morag-jobs, with no database or server code.
//!
//! - `wire`: the protocol's request and response bodies, defined once and used by the
//!   server (its `api` module re-exports them) and by this crate.
//! - `client`: `ServerClient`, a typed HTTP client for every request of the protocol, with
//!   retries and backoff for the requests whose loss would cost work.
//! - `worker`: the worker that runs a converter command on a server's jobs (long-poll,
//!   download, heartbeats with progress, result or failure, cancellation, release on
//!   shutdown). `morag-jobs worker` is this worker; `worker::run_until` embeds it.

pub mod client;
pub mod wire;
pub mod worker;

pub use client::{ClaimedJob, ClientError, ServerClient};
