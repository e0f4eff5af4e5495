//! The Python integration kit's own tests, run by pytest in the virtual environment
//! `scripts/test.sh` keeps (`MORAG_TEST_PYTHON`): the client package
//! (`clients/python/tests`) and the Celery end-to-end example (`examples/celery-ingestion`),
//! both against the server binary cargo built (`MORAG_JOBS_BIN`). The Python code is
//! imported from this checkout (`PYTHONPATH`), never from an older installed copy.
//!
//! With `MORAG_TEST_STORE=postgres`, each server the Python tests start gets a fresh
//! PostgreSQL database created here (`MORAG_JOBS_TEST_DATABASE_URLS`) and dropped at the
//! end, so both suites run on both backends.

use std::path::Path;
use std::process::Command;

use crate::support::PgDatabase;

/// Runs pytest on `target` (relative to the repository) and fails with its output unless
/// every test passed. `servers` is how many servers the target starts (each needs a
/// database of its own on PostgreSQL).
async fn pytest(target: &str, servers: usize) {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut databases = Vec::new();
    if std::env::var("MORAG_TEST_STORE").as_deref() == Ok("postgres") {
        for _ in 0..servers {
            databases.push(PgDatabase::create().await);
        }
    }
    let database_urls: Vec<&str> = databases.iter().map(|db| db.url.as_str()).collect();
    let python_path = [
        repository.join("clients/python/src"),
        repository.join("tests/python"),
    ]
    .map(|path| path.to_string_lossy().into_owned())
    .join(":");
    let mut command = Command::new(crate::celery::python());
    command
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "console_output_style=classic",
        ])
        .arg(repository.join(target))
        .current_dir(repository)
        .env("MORAG_JOBS_BIN", env!("CARGO_BIN_EXE_morag-jobs"))
        .env("MORAG_JOBS_TEST_DATABASE_URLS", database_urls.join(","))
        .env("MORAG_TEST_REDIS_URL", crate::celery::redis_url())
        .env("PYTHONPATH", python_path)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // The tests set every server setting themselves.
        .env_remove("MORAG_JOBS_URL")
        .env_remove("MORAG_JOBS_API_KEY")
        .env_remove("MORAG_DATABASE_URL");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("pytest task")
        .expect("pytest starts (is the test virtual environment there? run scripts/test.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // pytest's last line, e.g. "32 passed in 3.65s", for the test's own output.
    println!("{}", stdout.lines().last().unwrap_or(""));
    assert!(
        output.status.success(),
        "pytest {target} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains(" passed"),
        "pytest {target} ran no test:\n{stdout}\n{stderr}"
    );
    drop(databases);
}

/// Every call of the client, every error mapping, the idempotent create and the drop-in
/// adapter, against the real server (three servers: the shared one, the cleanup test's
/// and the connection-cap test's).
#[tokio::test]
async fn the_python_client_passes_its_tests_against_the_real_server() {
    pytest("clients/python/tests", 3).await;
}

/// The Celery example end to end: ingest tasks, jobs, the converter, the continuation
/// and failure tasks, a SIGKILL of the server in the middle, and MoRAG's own
/// remote-converter requests, on one server.
#[tokio::test]
async fn the_celery_ingestion_example_runs_end_to_end() {
    pytest("examples/celery-ingestion", 1).await;
}
