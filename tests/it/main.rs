//! The one integration-test binary. Every test runs the real server (or the real store)
//! against a real SQLite file in a temp directory.

/// Runs each named conformance case, an `async fn(TestStore)` of the calling module, once
/// on a fresh SQLite store and once on a fresh PostgreSQL database (`open_sqlite` and
/// `open_postgres` must be in scope there): one suite, both backends.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::open_sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::open_postgres().await).await
                }
            )*
        }
    };
}

mod support;

mod api;
mod architecture;
mod celery;
mod cli;
mod client_library;
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
mod python_client;
mod race;
mod readme;
mod replicas;
mod store_conformance;
mod sustained;
mod test_script;
mod worker;
mod worker_registry_conformance;
mod workers;
