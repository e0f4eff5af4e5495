//! Running on PostgreSQL: backend selection, migrations, and wake-ups across replicas.
//! Each test gets its own freshly created database (`support::PgDatabase`).

use std::process::Command;
use std::time::{Duration, Instant};

use morag_jobs::clock::Timestamp;
use morag_jobs::domain::{
    ContentType, JobId, JobStatus, LifecyclePolicy, RetentionPolicy, TimeoutPolicy, WorkerId,
};
use morag_jobs::store::postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};
use morag_jobs::store::{
    AttemptOutcome, ClaimParams, CleanupParams, CreateJobParams, Store, StoreError,
    SubmitResultParams,
};

use crate::support::{get_json, spawn_app_with, PgDatabase};

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
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let migrated = format!("from version 0 to {SCHEMA_VERSION}");
    assert!(String::from_utf8_lossy(&first.stdout).contains(&migrated));
    let again = morag_jobs(&["migrate", "--database-url", &database.url]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));

    // A newer replica migrated the database further: this one must not touch it.
    database
        .admin_execute_in_own_database(&format!(
            "INSERT INTO morag_jobs_schema_migrations (version) VALUES ({})",
            SCHEMA_VERSION + 1
        ))
        .await;
    match PostgresStore::open(PostgresOptions::new(database.url.clone())).await {
        Err(StoreError::SchemaTooNew { found, known })
            if found == SCHEMA_VERSION + 1 && known == SCHEMA_VERSION => {}
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
    assert!(
        stderr.contains(&format!("schema version {} is newer", SCHEMA_VERSION + 1))
            && stderr.contains("upgrade morag-jobs"),
        "{stderr}"
    );
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
        let body: serde_json::Value = get_json(&client, poll_url).await;
        (body, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = creator.create("audio").await;
    let (body, waited) = poll.await.unwrap();
    assert_eq!(body["job_id"].as_str(), Some(id.as_str()), "{body}");
    // Well under the 5 s fallback tick: the notification did it.
    assert!(
        waited < Duration::from_millis(2500),
        "woken after {waited:?}"
    );
    assert_eq!(creator.status_of(&id).await, "processing");
}

/// Sends `request` and checks it answers with `expected` within a few seconds.
async fn answers_quickly(
    app: &crate::support::TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
    expected: u16,
) {
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        app.send(method.clone(), path, body),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {path} hung"));
    let took = started.elapsed();
    assert_eq!(status, expected, "{method} {path}: {body}");
    assert!(
        took < Duration::from_secs(8),
        "{method} {path} took {took:?}"
    );
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
    database
        .admin_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            database.name
        ))
        .await;
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
        answers_quickly(
            &app,
            Method::POST,
            "/api/v1/remote-jobs/",
            Some(create.clone()),
            503,
        )
        .await;
        answers_quickly(
            &app,
            Method::GET,
            "/api/v1/remote-jobs/poll?worker_id=w1&content_types=audio",
            None,
            503,
        )
        .await;
        answers_quickly(
            &app,
            Method::GET,
            &format!("/api/v1/remote-jobs/{first}/status"),
            None,
            503,
        )
        .await;
    }

    // It comes back: the server recovers without a restart.
    database
        .admin_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            database.name
        ))
        .await;
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
            assert_eq!(
                app.status_of(&id).await,
                "pending",
                "an acknowledged job survived"
            );
        }
    }
    assert!(
        n_ok > 0 && n_unavailable > 0,
        "{n_ok} ok, {n_unavailable} unavailable"
    );

    // A database that hangs (a table locked by someone else) also answers 503 after the
    // statement timeout, instead of holding the request open.
    let (locker, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    answers_quickly(
        &app,
        Method::POST,
        "/api/v1/remote-jobs/",
        Some(create.clone()),
        503,
    )
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    answers_quickly(
        &app,
        Method::POST,
        "/api/v1/remote-jobs/",
        Some(create),
        200,
    )
    .await;
    app.stop().await;
}

/// Every replica runs the monitor. Concurrent passes over the same expired jobs and the
/// same finished jobs split the work (SKIP LOCKED) and apply each change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_of_several_replicas_apply_each_timeout_and_deletion_once() {
    use morag_jobs::clock::Timestamp;
    use morag_jobs::domain::{LifecyclePolicy, RetentionPolicy, RetryPolicy, WorkerId};
    use morag_jobs::store::*;
    use std::sync::Arc;

    let database = PgDatabase::create().await;
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(
            PostgresStore::open(PostgresOptions::new(database.url.clone()))
                .await
                .unwrap(),
        ));
    }
    let t0 = Timestamp::from_micros(1_800_000_000_000_000);
    let at = move |secs: u64| t0.plus(Duration::from_secs(secs));
    // One retry, then final: every job times out twice.
    let policy = LifecyclePolicy {
        retry: RetryPolicy {
            max_retries: 1,
            jitter_fraction: 0.0,
            ..RetryPolicy::default()
        },
        ..LifecyclePolicy::default()
    };
    let n = 300;
    for i in 0..n {
        let path = format!("/data/files/{i}");
        crate::store_conformance::create_with(&*stores[i % 3], "image", t0, None, &path).await;
    }
    let claim_all = |now: Timestamp| {
        let stores = stores.clone();
        let timeouts = policy.timeouts.clone();
        async move {
            let mut claimed = 0;
            while stores[claimed % 3]
                .claim_job(ClaimParams {
                    worker_id: WorkerId::parse("w").unwrap(),
                    content_types: vec![],
                    timeouts: timeouts.clone(),
                    now,
                })
                .await
                .unwrap()
                .is_some()
            {
                claimed += 1;
            }
            claimed
        }
    };
    // All three monitors at once, in small batches, until nothing is left.
    let rescue_all = |now: Timestamp| {
        let stores = stores.clone();
        let policy = policy.clone();
        async move {
            let passes: Vec<_> = stores
                .iter()
                .cloned()
                .map(|store| {
                    let policy = policy.clone();
                    tokio::spawn(async move {
                        let mut total = RescueReport::default();
                        loop {
                            let report = store
                                .rescue_expired(RescueParams {
                                    policy: policy.clone(),
                                    limit: 7,
                                    jitter_seed: 1,
                                    now,
                                })
                                .await
                                .unwrap();
                            total.n_attempts_timed_out += report.n_attempts_timed_out;
                            total.n_retries_scheduled += report.n_retries_scheduled;
                            total.n_retries_due += report.n_retries_due;
                            if !report.changed_anything() {
                                return total;
                            }
                        }
                    })
                })
                .collect();
            let mut total = RescueReport::default();
            for pass in passes {
                let report = pass.await.unwrap();
                total.n_attempts_timed_out += report.n_attempts_timed_out;
                total.n_retries_scheduled += report.n_retries_scheduled;
                total.n_retries_due += report.n_retries_due;
            }
            total
        }
    };

    assert_eq!(claim_all(at(0)).await, n);
    let first = rescue_all(at(300)).await; // image: 300 s execution timeout
    assert_eq!(
        (first.n_attempts_timed_out, first.n_retries_scheduled),
        (n, n),
        "each job timed out once"
    );
    let due = rescue_all(at(360)).await; // 60 s backoff
    assert_eq!(due.n_retries_due, n);
    assert_eq!(claim_all(at(360)).await, n);
    let last = rescue_all(at(660)).await;
    assert_eq!(
        (last.n_attempts_timed_out, last.n_retries_scheduled),
        (n, 0),
        "then finally"
    );
    assert_eq!(
        stores[0].pending_handoffs(1000).await.unwrap().len(),
        n,
        "one hand-off each"
    );
    for job in stores[1]
        .list_jobs(ListParams {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .jobs
    {
        let history = stores[2]
            .get_job_detail(job.id)
            .await
            .unwrap()
            .unwrap()
            .history;
        let timeouts = history
            .iter()
            .filter(|h| h.to == morag_jobs::domain::JobStatus::Timeout)
            .count();
        assert_eq!(timeouts, 2, "{:?}", history);
    }

    // Three cleaners at once delete every job once and report each file once. A hand-off
    // keeps its job until fanned out (here to no sink: outcomes are only stored).
    let cleanup_at = at(3 * 86_400);
    stores[0]
        .fan_out_handoffs(morag_jobs::store::deliveries::FanOutParams {
            sinks: vec![],
            webhooks: false,
            limit: 10_000,
            now: cleanup_at,
        })
        .await
        .unwrap();
    let cleaners: Vec<_> = stores
        .iter()
        .cloned()
        .map(|store| {
            tokio::spawn(async move {
                let mut deleted = 0;
                let mut files = Vec::new();
                loop {
                    let report = store
                        .cleanup_finished(CleanupParams {
                            retention: RetentionPolicy::uniform(1),
                            limit: 9,
                            now: cleanup_at,
                        })
                        .await
                        .unwrap();
                    if report.n_deleted == 0 {
                        return (deleted, files);
                    }
                    deleted += report.n_deleted;
                    files.extend(report.orphaned_source_files);
                }
            })
        })
        .collect();
    let mut deleted = 0;
    let mut files = Vec::new();
    for cleaner in cleaners {
        let (n_deleted, orphaned) = cleaner.await.unwrap();
        deleted += n_deleted;
        files.extend(orphaned);
    }
    assert_eq!(deleted, n);
    files.sort();
    files.dedup();
    assert_eq!(files.len(), n, "each file reported once");
    assert_eq!(
        stores[0]
            .statistics(at(3 * 86_400))
            .await
            .unwrap()
            .total_jobs,
        0
    );
}

/// Statistics stay exact while counter deltas are folded into totals in batches, and
/// whatever is not folded yet is still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_stay_exact_across_batched_compaction() {
    use morag_jobs::clock::Timestamp;
    use morag_jobs::domain::JobStatus;
    use morag_jobs::store::Store;

    let database = PgDatabase::create().await;
    let store = PostgresStore::open(PostgresOptions::new(database.url.clone()))
        .await
        .unwrap();
    let now = Timestamp::from_micros(1_800_000_000_000_000);
    // 45,000 jobs written behind the store's back: 90,000 deltas, several batches.
    database
        .admin_execute_in_own_database(&format!(
            "INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, status, \
                 created_at, updated_at, available_at) \
             SELECT gen_random_uuid()::text, CASE WHEN n % 3 = 0 THEN 'video' ELSE 'audio' END, '/f', '{{}}', 'i', \
                 'pending', {t}, {t}, {t} FROM generate_series(1, 45000) AS n; \
             UPDATE jobs SET status = 'cancelled', completed_at = {t} WHERE seq % 5 = 0",
            t = now.as_micros()
        ))
        .await;
    for _ in 0..3 {
        let stats = store.statistics(now).await.unwrap();
        assert_eq!(stats.total_jobs, 45_000);
        assert_eq!(
            (
                stats.status_counts[&JobStatus::Pending],
                stats.status_counts[&JobStatus::Cancelled]
            ),
            (36_000, 9_000)
        );
        assert_eq!(
            (
                stats.content_type_counts["audio"],
                stats.content_type_counts["video"]
            ),
            (30_000, 15_000)
        );
        assert_eq!(stats.created_last_24h, 45_000);
    }
}

/// Claims for any type take another path (the `jobs_queue` index) than claims for some
/// types; neither hands a job to two of many concurrent claimers on several replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_any_or_some_types_never_share_a_job() {
    use morag_jobs::clock::Timestamp;
    use morag_jobs::domain::{ContentType, JobId, TimeoutPolicy, WorkerId};
    use morag_jobs::store::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    let database = PgDatabase::create().await;
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        stores.push(Arc::new(
            PostgresStore::open(PostgresOptions::new(database.url.clone()))
                .await
                .unwrap(),
        ));
    }
    let now = Timestamp::from_micros(1_800_000_000_000_000);
    let mut created = HashSet::new();
    for i in 0..400 {
        let content_type = ["audio", "video", "pdf"][i % 3];
        created.insert(crate::store_conformance::create(&*stores[0], content_type, now).await);
    }
    let tasks: Vec<_> = (0..12)
        .map(|w| {
            let store = stores[w % 2].clone();
            // A third claim any type, the others two of the three.
            let types: Vec<ContentType> = match w % 3 {
                0 => vec![],
                1 => vec![
                    ContentType::parse("audio").unwrap(),
                    ContentType::parse("pdf").unwrap(),
                ],
                _ => vec![
                    ContentType::parse("video").unwrap(),
                    ContentType::parse("pdf").unwrap(),
                ],
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(job) = store
                    .claim_job(ClaimParams {
                        worker_id: WorkerId::parse(&format!("w{w}")).unwrap(),
                        content_types: types.clone(),
                        timeouts: TimeoutPolicy::default(),
                        now,
                    })
                    .await
                    .unwrap()
                {
                    got.push(job.id);
                }
                got
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    let distinct: HashSet<JobId> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), distinct.len(), "a job was claimed twice");
    assert_eq!(distinct, created, "every job was claimed");
}

/// A database made by schema version 1 (statistics counted by a per-row trigger) keeps
/// exact statistics across the upgrade to per-statement counting, for the jobs counted
/// before it and the changes made after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_schema_1_keeps_the_statistics_exact() {
    let database = PgDatabase::create().await;
    database
        .admin_execute_in_own_database(include_str!("../../migrations/postgres/0001_jobs.sql"))
        .await;
    // What version 1 left: its bookkeeping, 3 pending audio jobs and 2 completed videos,
    // counted by its row trigger.
    database
        .admin_execute_in_own_database(
            "CREATE TABLE morag_jobs_schema_migrations (version INTEGER PRIMARY KEY, \
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()); \
             INSERT INTO morag_jobs_schema_migrations (version) VALUES (1); \
             INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, \
                 status, created_at, updated_at, available_at) \
             SELECT gen_random_uuid()::text, CASE WHEN n <= 3 THEN 'audio' ELSE 'video' END, '/f', '{}', 'i', \
                 'pending', 1000000 * n, 1000000 * n, 1000000 * n \
             FROM generate_series(1, 5) AS n; \
             UPDATE jobs SET status = 'completed', started_at = created_at, \
                 completed_at = created_at + 4000000 WHERE content_type = 'video'",
        )
        .await;
    let store = PostgresStore::open(PostgresOptions::new(database.url.clone()))
        .await
        .expect("the store opens and migrates");
    let now = Timestamp::from_micros(60_000_000);
    let created = store
        .create_job(CreateJobParams {
            id: JobId::new_random(),
            content_type: ContentType::parse("video").unwrap(),
            source_file_path: "/f".into(),
            task_options: serde_json::json!({}),
            ingestion_task_id: "i".into(),
            pending_deadline: None,
            now,
        })
        .await
        .unwrap();
    let claimed = store
        .claim_job(ClaimParams {
            worker_id: WorkerId::parse("w").unwrap(),
            content_types: vec![ContentType::parse("audio").unwrap()],
            timeouts: TimeoutPolicy::default(),
            now,
        })
        .await
        .unwrap()
        .expect("an audio job is due");
    store
        .submit_result(SubmitResultParams {
            job_id: claimed.id,
            lease_id: claimed.lease_id,
            outcome: AttemptOutcome::Success {
                content: "text".into(),
                metadata: serde_json::json!({}),
                processing_time: None,
            },
            policy: LifecyclePolicy::default(),
            jitter: 0.0,
            now: now.plus(Duration::from_secs(2)),
        })
        .await
        .unwrap();
    let stats = store
        .statistics(now.plus(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(stats.total_jobs, 6);
    assert_eq!(
        stats.status_counts[&JobStatus::Pending],
        3,
        "2 old audio and the new video"
    );
    assert_eq!(stats.status_counts[&JobStatus::Completed], 3);
    assert_eq!(stats.status_counts[&JobStatus::Processing], 0);
    assert_eq!(stats.content_type_counts["audio"], 3);
    assert_eq!(stats.content_type_counts["video"], 3);
    assert_eq!(
        stats.avg_processing_secs["video"], 4.0,
        "counted by version 1"
    );
    assert_eq!(
        stats.avg_processing_secs["audio"], 2.0,
        "counted after the upgrade"
    );
    assert_eq!(stats.created_last_24h, 6);
    assert_eq!(created.status, JobStatus::Pending);

    // History has no foreign key since version 2: cleanup deletes it with its jobs. A
    // hand-off keeps its job until fanned out (here to no sink: outcomes are only stored).
    morag_jobs::store::DeliveryStore::fan_out_handoffs(
        &store,
        morag_jobs::store::deliveries::FanOutParams {
            sinks: vec![],
            webhooks: false,
            limit: 100,
            now,
        },
    )
    .await
    .unwrap();
    let report = store
        .cleanup_finished(CleanupParams {
            retention: RetentionPolicy::from_days(1, None),
            limit: 100,
            now: now.plus(Duration::from_secs(3 * 86_400)),
        })
        .await
        .unwrap();
    assert_eq!(report.n_deleted, 3, "the three completed jobs");
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM job_history h WHERE NOT EXISTS \
             (SELECT 1 FROM jobs j WHERE j.seq = h.job_seq)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "no history outlives its job");
    let kept: i64 = client
        .query_one("SELECT count(*) FROM job_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept, 1,
        "the created row of the pending job made through the store"
    );
    store.close().await.unwrap();
}
