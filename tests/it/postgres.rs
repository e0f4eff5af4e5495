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

/// Sends `request` and checks it answers with `expected` within a few seconds.
async fn answers_quickly(app: &crate::support::TestApp, method: reqwest::Method, path: &str, body: Option<serde_json::Value>, expected: u16) {
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), app.send(method.clone(), path, body))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} hung"));
    let took = started.elapsed();
    assert_eq!(status, expected, "{method} {path}: {body}");
    assert!(took < Duration::from_secs(8), "{method} {path} took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_quickly_and_the_server_recovers_by_itself() {
    use reqwest::Method;
    let database = PgDatabase::create().await;
    let app = spawn_app_with(&["--database-url", &database.url]).await;
    let first = app.create("audio").await;
    assert_eq!(app.get("/health").await.0, 200);

    // Load runs through the whole outage: each request gets 200 or 503, never a hang or a 500.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for n in 0..4 {
        let (client, base, stop) = (app.client.clone(), app.base.clone(), stop.clone());
        let path = app.source_file(&format!("load-{n}.bin"), b"x");
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut created = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let response = client
                    .post(format!("{base}/api/v1/remote-jobs/"))
                    .json(&serde_json::json!({"source_file_path": path, "content_type": "video", "ingestion_task_id": "load"}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .expect("the server answers");
                assert!(started.elapsed() < Duration::from_secs(8), "a request hung for {:?}", started.elapsed());
                let status = response.status().as_u16();
                if status == 200 {
                    let body: serde_json::Value = response.json().await.unwrap();
                    created.push(body["job_id"].as_str().unwrap().to_owned());
                }
                statuses.push(status);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (statuses, created)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The database goes away mid-run: every connection of the server is killed, and new
    // ones are refused.
    database.admin_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", database.name)).await;
    database
        .admin_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
            database.name
        ))
        .await;
    let path = app.source_file("during-outage.bin", b"x");
    let create = serde_json::json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "i"});
    for _ in 0..3 {
        answers_quickly(&app, Method::GET, "/health", None, 503).await;
        answers_quickly(&app, Method::POST, "/api/v1/remote-jobs/", Some(create.clone()), 503).await;
        answers_quickly(&app, Method::GET, "/api/v1/remote-jobs/poll?worker_id=w1&content_types=audio", None, 503).await;
        answers_quickly(&app, Method::GET, &format!("/api/v1/remote-jobs/{first}/status"), None, 503).await;
    }

    // It comes back: the server recovers without a restart.
    database.admin_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", database.name)).await;
    answers_quickly(&app, Method::GET, "/health", None, 200).await;
    let (id, _lease) = app.claim("w1", "audio").await;
    assert_eq!(id, first, "nothing was lost");
    app.create("audio").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut n_ok, mut n_unavailable) = (0, 0);
    for task in load {
        let (statuses, created) = task.await.unwrap();
        for status in statuses {
            match status {
                200 => n_ok += 1,
                503 => n_unavailable += 1,
                other => panic!("a request during the outage got {other}"),
            }
        }
        for id in created {
            assert_eq!(app.status_of(&id).await, "pending", "an acknowledged job survived");
        }
    }
    assert!(n_ok > 0 && n_unavailable > 0, "{n_ok} ok, {n_unavailable} unavailable");

    // A database that hangs (a table locked by someone else) also answers 503 after the
    // statement timeout, instead of holding the request open.
    let (locker, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker.batch_execute("BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE").await.unwrap();
    answers_quickly(&app, Method::POST, "/api/v1/remote-jobs/", Some(create.clone()), 503).await;
    locker.batch_execute("COMMIT").await.unwrap();
    answers_quickly(&app, Method::POST, "/api/v1/remote-jobs/", Some(create), 200).await;
    app.stop().await;
}
