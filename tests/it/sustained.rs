//! Sustained operation: what cleanup deletes under a steady stream of jobs (jobs, their
//! history, hand-offs and deliveries once every outcome is settled; nothing of a job whose
//! delivery is pending or dead), and that a cleanup pass over a large backlog deletes only
//! what was past retention when it started, spread over its interval, yielding to
//! requests. Both run on the backend of the suite (`MORAG_TEST_STORE`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use morag_jobs::clock::Timestamp;
use morag_jobs::domain::{ContentType, Job, JobId, JobStatus};
use morag_jobs::monitor::{Cleaner, Pacing, MAX_STORE_SHARE};
use morag_jobs::store::{CountCleanableParams, DatabaseTarget, ImportJobParams};
use serde_json::{json, Value};

use crate::delivery::Receiver;
use crate::support::{spawn_app_with, TestApp};

const JOBS: &str = "/api/v1/remote-jobs";
/// Every table a job leaves rows in.
const TABLES: [&str; 5] = [
    "jobs",
    "job_history",
    "handoffs",
    "deliveries",
    "delivery_attempts",
];

/// Row counts of `TABLES`, read straight from the server's database.
async fn row_counts(app: &TestApp) -> BTreeMap<&'static str, i64> {
    match (&app.context.config.database, app.postgres()) {
        (_, Some(database)) => {
            let (client, connection) =
                tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to the test database");
            tokio::spawn(connection);
            let mut counts = BTreeMap::new();
            for table in TABLES {
                let row = client
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await
                    .expect("count rows");
                counts.insert(table, row.get::<_, i64>(0));
            }
            counts
        }
        (DatabaseTarget::Sqlite(path), None) => {
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("open the database");
            TABLES
                .into_iter()
                .map(|table| {
                    let n: i64 = conn
                        .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                            row.get(0)
                        })
                        .expect("count rows");
                    (table, n)
                })
                .collect()
        }
        (DatabaseTarget::Postgres(_), None) => unreachable!("a PostgreSQL app has its database"),
    }
}

/// Creates a job with `task_options`, claims it and reports success; returns its id.
async fn complete_one(app: &TestApp, worker: &str, task_options: Value) -> String {
    let path = app.source_file(&format!("{}.bin", crate::support::uuid_like()), b"bytes");
    let (status, body) = app
        .post(
            &format!("{JOBS}/"),
            json!({"source_file_path": path, "content_type": "document",
                   "task_options": task_options, "ingestion_task_id": "ingest-soak"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["job_id"].as_str().unwrap().to_owned();
    let (claimed, lease) = app.claim(worker, "document").await;
    assert_eq!(claimed, id);
    let (status, body) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 200, "{body}");
    id
}

/// Runs dispatcher passes until no delivery is pending but those `kept_pending` expects,
/// then lets time pass so every finished job is past a retention of 0 days.
async fn settle_deliveries(app: &TestApp, kept_pending: usize) {
    let started = Instant::now();
    loop {
        app.context
            .dispatcher
            .run_once()
            .await
            .expect("dispatcher pass");
        let (_, listed) = app.get("/api/v1/deliveries?state=pending&limit=100").await;
        if listed["deliveries"].as_array().unwrap().len() <= kept_pending {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "deliveries did not settle: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.advance(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_deletes_settled_outcomes_and_keeps_pending_and_dead_ones() {
    let receiver = Receiver::start().await;
    // Every job's outcome goes to the callback, which answers 200. One job per round also
    // names a webhook that answers 503 (retried after an hour: pending), and one a webhook
    // that answers 410 Gone (dead at once).
    receiver.fail_next("/pending", usize::MAX, 503);
    receiver.fail_next("/gone", usize::MAX, 410);
    let callback = receiver.url("/callback");
    let app = spawn_app_with(&[
        "--ingestion-callback-url",
        &callback,
        "--retention-days",
        "0",
        "--delivery-backoff-base-ms",
        "3600000",
        "--delivery-poll-interval-ms",
        "60000",
    ])
    .await;
    let rounds = 4;
    let per_round = 15;
    let mut kept = Vec::new();
    for round in 0..rounds {
        for n in 0..per_round {
            complete_one(&app, &format!("w{n}"), json!({})).await;
        }
        kept.push(
            complete_one(
                &app,
                "w-p",
                json!({"webhook_url": receiver.url("/pending")}),
            )
            .await,
        );
        kept.push(complete_one(&app, "w-g", json!({"webhook_url": receiver.url("/gone")})).await);
        settle_deliveries(&app, round + 1).await;
        let summary = app.monitor().cleanup_once().await.expect("cleanup pass");
        assert_eq!(summary.n_jobs_deleted, per_round, "round {round}");
        assert!(summary.caught_up, "round {round}: {summary:?}");

        // What is left is exactly the kept jobs with all of their rows: per job three
        // history entries (created, claimed, completed), one hand-off, two deliveries
        // (callback delivered, webhook pending or dead) and their attempts.
        let kept_jobs = kept.len() as i64;
        let counts = row_counts(&app).await;
        assert_eq!(
            (
                counts["jobs"],
                counts["job_history"],
                counts["handoffs"],
                counts["deliveries"]
            ),
            (kept_jobs, 3 * kept_jobs, kept_jobs, 2 * kept_jobs),
            "round {round}: {counts:?}"
        );
        assert_eq!(
            counts["delivery_attempts"],
            2 * kept_jobs,
            "round {round}: one attempt per delivery ({counts:?})"
        );
    }
    for id in &kept {
        let detail = app.detail(id).await;
        assert_eq!(detail["status"], "completed", "{detail}");
        assert_eq!(detail["history"].as_array().unwrap().len(), 3);
    }
    let (_, stats) = app.get(&format!("{JOBS}/statistics")).await;
    assert_eq!(stats["total_jobs"], json!(kept.len()), "{stats}");
    assert_eq!(
        (
            &stats["cleanup"]["jobs_deleted"],
            &stats["cleanup"]["keeping_up"],
            &stats["cleanup"]["passes_behind"]
        ),
        (&json!(per_round), &json!(true), &json!(0)),
        "{stats}"
    );

    // A cancelled job whose delivery is dead may go; a completed one stays until its
    // delivery is redriven and delivered.
    let dead = kept[1].clone();
    let (_, listed) = app
        .get(&format!("/api/v1/deliveries?job_id={dead}&state=dead"))
        .await;
    let dead_delivery = listed["deliveries"][0]["id"].clone();
    receiver.fail_next("/gone", 0, 410);
    let (status, body) = app
        .post(
            &format!("/api/v1/deliveries/{dead_delivery}/redrive"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    settle_deliveries(&app, kept.len() / 2).await;
    let summary = app.monitor().cleanup_once().await.unwrap();
    assert_eq!(
        summary.n_jobs_deleted, 1,
        "the redriven, delivered job goes"
    );
    let (status, _) = app.get(&format!("{JOBS}/{dead}/status")).await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sinks_cleanup_deletes_every_finished_job_with_its_rows() {
    let app = spawn_app_with(&["--retention-days", "0"]).await;
    for round in 0..3 {
        let mut finished = 0;
        for n in 0..20 {
            complete_one(&app, &format!("w{n}"), json!({})).await;
            finished += 1;
        }
        // A cancelled pending job is handed off too; a running one is not finished.
        let cancelled = app.create("document").await;
        let (status, _) = app
            .post(&format!("{JOBS}/{cancelled}/cancel"), json!({}))
            .await;
        assert_eq!(status, 200);
        finished += 1;
        let running = app.create("document").await;
        let (claimed, _) = app.claim("w-running", "document").await;
        assert_eq!(claimed, running);
        app.advance(1);
        let summary = app.monitor().cleanup_once().await.unwrap();
        assert_eq!(summary.n_jobs_deleted, finished, "round {round}");
        let counts = row_counts(&app).await;
        let running_jobs = round as i64 + 1;
        assert_eq!(
            counts,
            BTreeMap::from([
                ("jobs", running_jobs),
                ("job_history", 2 * running_jobs),
                ("handoffs", 0),
                ("deliveries", 0),
                ("delivery_attempts", 0),
            ]),
            "round {round}: only the running jobs and their history remain"
        );
    }
    app.stop().await;
}

/// Hot-path requests while a cleanup pass deletes a large backlog must answer within
/// this (debug build, a machine shared with other builds): a request waits at most for
/// one small batch, never for the backlog.
const HOT_PATH_P99_BOUND: Duration = Duration::from_millis(100);
/// The margin over the share a pass allowed itself that its measured share may show:
/// the time measurement of short batches.
const STORE_SHARE_MARGIN: f64 = 0.05;

/// The monitor's cleaner (reporting to the statistics) with the app's retention.
fn monitor_cleaner(app: &TestApp) -> Cleaner {
    let context = &app.context;
    Cleaner::new(
        context.store.clone(),
        context.clock.clone(),
        context.config.files_dir.clone(),
    )
    .reporting_to(context.cleanup_progress.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_pass_over_a_large_backlog_leaves_requests_answering_quickly() {
    let app = spawn_app_with(&["--retention-days", "0"]).await;
    let backlog = 4_000;
    import_finished_jobs(&app, backlog).await;

    // A pass as the monitor runs it with a cleanup interval of 6 s: the backlog (about
    // 0.5 s of store time on SQLite in this debug build) spread over 90% of that.
    let budget = Duration::from_secs(6);
    let cleaner = monitor_cleaner(&app);
    let retention = app.context.config.policy.retention;
    let pass = tokio::spawn(async move {
        cleaner
            .cleanup_paced(retention, Pacing::yielding(budget), None)
            .await
    });
    // The pass fixes its cutoff when it starts: the clock moves only once it deleted some.
    let store = app.context.store.clone();
    let count = || {
        store.count_cleanable(CountCleanableParams {
            retention,
            now: app.context.clock.now(),
        })
    };
    while count().await.unwrap() == backlog as u64 && !pass.is_finished() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut latencies = Vec::new();
    let mut n = 0;
    while !pass.is_finished() {
        let sent = Instant::now();
        complete_one(&app, &format!("hot-{}", n % 4), json!({})).await;
        // Three requests: create, poll, result.
        latencies.push(sent.elapsed() / 3);
        n += 1;
        // Each hot job is past its retention of 0 days at once: a pass that looked at
        // the clock again would delete them too.
        app.advance(1);
    }
    let summary = pass.await.unwrap().expect("cleanup pass");
    assert_eq!(
        (summary.n_jobs_eligible, summary.n_jobs_deleted),
        (backlog as u64, backlog),
        "the backlog, and none of the jobs completed during the pass (past retention only \
         after it started)"
    );
    assert!(summary.caught_up, "{summary:?}");
    let share = summary.busy.as_secs_f64() / summary.elapsed.as_secs_f64();
    assert!(
        share <= summary.store_share_allowed + STORE_SHARE_MARGIN
            && summary.store_share_allowed <= MAX_STORE_SHARE + 1e-9,
        "the pass kept the store busy {share:.2} of its time: {summary:?}"
    );
    assert!(
        summary.elapsed >= budget / 2,
        "the pass spread its work rather than deleting the backlog at once: {summary:?}"
    );
    assert!(
        summary.n_batches >= 10,
        "the backlog went in many small batches: {summary:?}"
    );
    assert!(
        latencies.len() >= 20,
        "requests ran beside the pass: {}",
        latencies.len()
    );
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "cleanup of {backlog} jobs: {} batches, store busy {:?} of {:?} ({share:.3}, at most \
         {:.3} allowed); {} hot-path jobs beside it, request p99 {p99:?}, max {:?}",
        summary.n_batches,
        summary.busy,
        summary.elapsed,
        summary.store_share_allowed,
        latencies.len(),
        latencies.last().unwrap()
    );
    assert!(
        p99 < HOT_PATH_P99_BOUND,
        "hot-path requests took up to {p99:?} (p99) during the pass; max {:?}, {} jobs completed",
        latencies.last().unwrap(),
        latencies.len()
    );
    let (_, stats) = app.get(&format!("{JOBS}/statistics")).await;
    assert_eq!(stats["total_jobs"], json!(latencies.len()), "{stats}");
    assert_eq!(stats["cleanup"]["jobs_deleted"], json!(backlog), "{stats}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_runs_out_of_time_says_cleanup_cannot_keep_up() {
    let app = spawn_app_with(&["--retention-days", "0"]).await;
    let backlog = 6_000;
    import_finished_jobs(&app, backlog).await;
    // The monitor's cleaner with a pass budget of a tenth of a second: even at 30% of
    // the store this backlog takes longer than that on either backend (66 ms of store
    // time on PostgreSQL on a quiet machine in this debug build, so 220 ms of pass).
    let cleaner = monitor_cleaner(&app);
    let budget = Duration::from_millis(100);
    let pacing = Pacing::yielding(budget);
    let retention = app.context.config.policy.retention;
    let first = cleaner
        .cleanup_paced(retention, pacing, None)
        .await
        .unwrap();
    assert!(!first.caught_up, "{first:?}");
    assert_eq!(first.n_jobs_eligible, backlog as u64);
    assert!(
        first.n_jobs_deleted > 0 && first.n_jobs_deleted < backlog,
        "{first:?}"
    );
    assert!(
        (first.store_share_allowed - MAX_STORE_SHARE).abs() < 1e-9,
        "work that does not fit takes the most a pass may: {first:?}"
    );
    assert!(first.elapsed < budget * 3, "{first:?}");
    let (_, stats) = app.get(&format!("{JOBS}/statistics")).await;
    assert_eq!(
        (
            &stats["cleanup"]["keeping_up"],
            &stats["cleanup"]["passes_behind"],
            &stats["cleanup"]["store_share_allowed"]
        ),
        (&json!(false), &json!(1), &json!(MAX_STORE_SHARE)),
        "{stats}"
    );
    // Each later pass counts what is left and deletes it, until one catches up.
    let mut deleted = first.n_jobs_deleted;
    let mut passes = 1;
    while deleted < backlog {
        let pass = cleaner
            .cleanup_paced(retention, pacing, None)
            .await
            .unwrap();
        assert_eq!(pass.n_jobs_eligible, (backlog - deleted) as u64, "{pass:?}");
        assert!(
            pass.store_share_allowed <= MAX_STORE_SHARE + 1e-9,
            "{pass:?}"
        );
        deleted += pass.n_jobs_deleted;
        passes += 1;
        let (_, stats) = app.get(&format!("{JOBS}/statistics")).await;
        let behind = if pass.caught_up { 0 } else { passes };
        assert_eq!(stats["cleanup"]["passes_behind"], json!(behind), "{stats}");
        assert!(passes < 200, "cleanup never caught up: {pass:?}");
    }
    assert_eq!(deleted, backlog);
    let (_, stats) = app.get(&format!("{JOBS}/statistics")).await;
    assert_eq!(stats["cleanup"]["keeping_up"], json!(true), "{stats}");
    app.stop().await;
}

/// Stores `n` jobs that completed an hour ago (an import: one row and one history entry
/// each, no hand-off), concurrently (the store batches what arrives together).
async fn import_finished_jobs(app: &TestApp, n: usize) {
    let now = app.context.clock.now();
    let hour_ago = Timestamp::from_micros(now.as_micros() - 3_600_000_000);
    let path = app.source_file("backlog.bin", b"bytes");
    let job = || Job {
        id: JobId::new_random(),
        content_type: ContentType::parse("document").unwrap(),
        source_file_path: path.clone(),
        task_options: json!({"language": "en"}),
        ingestion_task_id: "ingest-backlog".into(),
        status: JobStatus::Completed,
        worker_id: None,
        lease_id: None,
        attempt: 1,
        retry_count: 0,
        created_at: hour_ago,
        started_at: Some(hour_ago),
        completed_at: Some(hour_ago),
        updated_at: hour_ago,
        available_at: hour_ago,
        execution_deadline: None,
        heartbeat_deadline: None,
        last_heartbeat_at: None,
        progress: None,
        progress_message: None,
        error_message: None,
    };
    let mut imports = tokio::task::JoinSet::new();
    for _ in 0..n {
        let store = app.context.store.clone();
        let params = ImportJobParams {
            job: job(),
            result: None,
            deadline_at: None,
            reason: "backlog".into(),
            now,
        };
        imports.spawn(async move { store.import_job(params).await });
    }
    while let Some(outcome) = imports.join_next().await {
        outcome.expect("import task").expect("import");
    }
}
