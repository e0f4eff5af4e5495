//! Running on PostgreSQL: backend selection, migrations, and wake-ups across replicas.
//! Each test gets its own freshly created database (`support::PgDatabase`).

use std::process::Command;
use std::time::{Duration, Instant};

use morag_jobs::store::postgres::{PostgresOptions, PostgresStore};
use morag_jobs::store::StoreError;

use crate::support::{spawn_app_with, PgDatabase};

fn morag_jobs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
        .args(args)
        .env_remove("MORAG_DATABASE_URL")
        .output()
        .expect("morag-jobs runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_once_and_a_newer_schema_is_refused() {
    let database = PgDatabase::create().await;
    let first = morag_jobs(&["migrate", "--database-url", &database.url]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("from version 0 to 1"));
    let again = morag_jobs(&["migrate", "--database-url", &database.url]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));

    // A newer replica migrated the database further: this one must not touch it.
    database
        .admin_execute_in_own_database("INSERT INTO morag_jobs_schema_migrations (version) VALUES (2)")
        .await;
    match PostgresStore::open(PostgresOptions::new(database.url.clone())).await {
        Err(StoreError::SchemaTooNew { found: 2, known: 1 }) => {}
        Err(other) => panic!("expected SchemaTooNew, got {other:?}"),
        Ok(_) => panic!("expected SchemaTooNew, the store opened"),
    }
    let data = tempfile::tempdir().unwrap();
    let serve = morag_jobs(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--database-url",
        &database.url,
    ]);
    assert!(!serve.status.success());
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(stderr.contains("schema version 2 is newer") && stderr.contains("upgrade morag-jobs"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_created_on_one_replica_wakes_a_long_poll_on_another_at_once() {
    let database = PgDatabase::create().await;
    let creator = spawn_app_with(&["--database-url", &database.url]).await;
    let poller = spawn_app_with(&["--database-url", &database.url]).await;
    // The two test clocks start a moment apart; the poller's must not be behind.
    poller.advance(60);
    // Let the poller's listener connect before the job is created.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let poll_url = poller.url("/api/v1/remote-jobs/poll?worker_id=w1&content_types=audio&wait=20");
    let client = poller.client.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        let body: serde_json::Value = client.get(poll_url).send().await.unwrap().json().await.unwrap();
        (body, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = creator.create("audio").await;
    let (body, waited) = poll.await.unwrap();
    assert_eq!(body["job_id"].as_str(), Some(id.as_str()), "{body}");
    // Well under the 5 s fallback tick: the notification did it.
    assert!(waited < Duration::from_millis(1500), "woken after {waited:?}");
    assert_eq!(creator.status_of(&id).await, "processing");
}
