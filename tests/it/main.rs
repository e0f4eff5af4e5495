//! The one integration-test binary. Every test runs the real server (or the real store)
//! against a real SQLite file in a temp directory.

mod support;

mod api;
mod architecture;
mod celery;
mod cli;
mod config_errors;
mod crash;
mod delivery;
mod delivery_conformance;
mod delivery_tls;
mod file_races;
mod hygiene;
mod idempotency_conformance;
mod idempotent_create;
mod import;
mod lifecycle;
mod listing_memory;
mod morag_client;
mod postgres;
mod race;
mod readme;
mod replicas;
mod store_conformance;
mod test_script;
mod worker;
