//! The one integration-test binary. Every test runs the real server (or the real store)
//! against a real SQLite file in a temp directory.

mod support;

mod api;
mod celery;
mod cli;
mod crash;
mod idempotency_conformance;
mod idempotent_create;
mod import;
mod lifecycle;
mod morag_client;
mod postgres;
mod race;
mod replicas;
mod store_conformance;
