//! The lifecycle over HTTP with a manual clock: timeouts, heartbeats, retries with
//! backoff, exhaustion, cancel, cleanup, and the monitor's own loop.

use std::time::Duration;

use serde_json::json;

use crate::support::{spawn_app, spawn_app_with, step};

#[tokio::test]
async fn execution_timeout_retries_with_backoff_then_exhausts() {
    let app = spawn_app_with(&[
        // A sink that never answers (port 9 refuses), so the hand-off stays pending: with
        // no sink at all it would be settled as soon as the dispatcher fanned it out.
        "--ingestion-callback-url",
        "http://127.0.0.1:9/outcomes",
        "--max-retries",
        "2",
        "--retry-backoff-base",
        "10",
        "--retry-backoff-max",
        "15",
    ])
    .await;
    let id = app.create("image").await;
    let (_, first_lease) = app.claim("w1", "image").await;
    app.advance(299);
    assert_eq!(
        app.monitor()
            .rescue_once()
            .await
            .unwrap()
            .n_attempts_timed_out,
        0
    );
    app.advance(1);
    let report = app.monitor().rescue_once().await.unwrap();
    assert_eq!(
        (report.n_attempts_timed_out, report.n_retries_scheduled),
        (1, 1)
    );
    assert_eq!(app.status_of(&id).await, "retrying");
    // Backoff: the first retry waits up to 10 s (less jitter of at most 10%).
    app.advance(8);
    assert!(
        app.poll("w2", "image").await["job_id"].is_null(),
        "not due before the backoff (>= 9 s)"
    );
    app.advance(2);
    let (again, second_lease) = app.claim("w2", "image").await;
    assert_eq!(again, id);
    assert_ne!(first_lease, second_lease);
    // The first worker's late heartbeat is fenced off.
    let (status, body) = app.heartbeat(&id, &first_lease).await;
    assert_eq!(status, 409, "{body}");
    app.advance(300);
    app.monitor().rescue_once().await.unwrap();
    app.advance(15);
    app.claim("w3", "image").await;
    app.advance(300);
    app.monitor().rescue_once().await.unwrap();
    let (_, status) = app.get(&format!("/api/v1/remote-jobs/{id}/status")).await;
    assert_eq!(status["status"], "timeout");
    assert_eq!(status["retry_count"], 2);
    assert!(status["error_message"]
        .as_str()
        .unwrap()
        .contains("execution timeout"));
    assert_eq!(
        app.history(&id).await,
        vec![
            step("-", "pending", "client"),
            step("pending", "processing", "worker"),
            step("processing", "timeout", "monitor"),
            step("timeout", "retrying", "monitor"),
            step("retrying", "processing", "worker"),
            step("processing", "timeout", "monitor"),
            step("timeout", "retrying", "monitor"),
            step("retrying", "processing", "worker"),
            step("processing", "timeout", "monitor"),
        ]
    );
    let handoffs = app.context.store.pending_handoffs(10).await.unwrap();
    assert_eq!(
        handoffs.len(),
        1,
        "the final timeout is recorded for hand-off"
    );
    assert_eq!(handoffs[0].payload["status"], "timeout");
}

#[tokio::test]
async fn heartbeat_timeout_applies_only_after_the_first_heartbeat() {
    let app = spawn_app_with(&["--heartbeat-timeout", "30"]).await;
    // MoRAG's client never heartbeats: only the execution timeout (document: 600 s) applies.
    let quiet = app.create("document").await;
    app.claim("morag-client", "document").await;
    app.advance(120);
    app.monitor().rescue_once().await.unwrap();
    assert_eq!(app.status_of(&quiet).await, "processing");
    // A worker that heartbeats once and then goes silent is timed out 30 s later.
    let beating = app.create("document").await;
    let (_, lease) = app.claim("w1", "document").await;
    let (status, body) = app.heartbeat(&beating, &lease).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cancelled"], false);
    app.advance(29);
    app.monitor().rescue_once().await.unwrap();
    assert_eq!(app.status_of(&beating).await, "processing");
    let (status, _) = app.heartbeat(&beating, &lease).await;
    assert_eq!(status, 200);
    app.advance(30);
    app.monitor().rescue_once().await.unwrap();
    assert_eq!(app.status_of(&beating).await, "retrying");
    let detail = app.detail(&beating).await;
    assert!(
        detail["error_message"]
            .as_str()
            .unwrap()
            .contains("heartbeat"),
        "{detail}"
    );
    assert_eq!(app.status_of(&quiet).await, "processing");
}

#[tokio::test]
async fn pending_timeout_is_final_and_says_no_worker_claimed_it() {
    let app = spawn_app_with(&["--fallback-timeout", "60"]).await;
    let id = app.create("youtube").await;
    app.advance(59);
    app.monitor().rescue_once().await.unwrap();
    assert_eq!(app.status_of(&id).await, "pending");
    app.advance(1);
    assert_eq!(
        app.monitor()
            .rescue_once()
            .await
            .unwrap()
            .n_pending_timed_out,
        1
    );
    let (_, status) = app.get(&format!("/api/v1/remote-jobs/{id}/status")).await;
    assert_eq!(status["status"], "timeout");
    assert!(status["error_message"]
        .as_str()
        .unwrap()
        .contains("no worker claimed"));
    app.advance(100_000);
    app.monitor().rescue_once().await.unwrap();
    assert_eq!(
        app.status_of(&id).await,
        "timeout",
        "no automatic retry after a pending timeout"
    );
    assert!(app.poll("w1", "youtube").await["job_id"].is_null());
}

#[tokio::test]
async fn worker_failures_retry_until_the_budget_is_spent_and_a_manual_retry_resets_it() {
    let app = spawn_app_with(&[
        "--max-retries",
        "1",
        "--retry-backoff-base",
        "5",
        "--retry-backoff-max",
        "5",
    ])
    .await;
    let id = app.create("audio").await;
    app.claim("w1", "audio").await;
    let (status, body) = app.fail(&id, None, true).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("retrying")));
    assert_eq!(body["ingestion_continued"], false);
    app.advance(5);
    app.monitor().rescue_once().await.unwrap();
    app.claim("w1", "audio").await;
    let (_, body) = app.fail(&id, None, true).await;
    assert_eq!(
        (
            body["status"].as_str(),
            body["ingestion_continued"].as_bool()
        ),
        (Some("failed"), Some(false)),
        "final, but no sink is configured: the outcome is only stored"
    );
    // Manual retry: claimable at once with a fresh budget.
    let (status, body) = app
        .post(&format!("/api/v1/remote-jobs/{id}/retry"), json!({}))
        .await;
    assert_eq!(
        (
            status,
            body["status"].as_str(),
            body["retry_count"].as_u64()
        ),
        (200, Some("retrying"), Some(0))
    );
    let (_, lease) = app.claim("w2", "audio").await;
    let (_, body) = app.fail(&id, Some(&lease), true).await;
    assert_eq!(
        body["status"], "retrying",
        "the reset budget allows another automatic retry"
    );
    let history = app.history(&id).await;
    assert!(
        history.contains(&step("failed", "retrying", "admin")),
        "{history:?}"
    );
}

#[tokio::test]
async fn cancel_during_processing_is_seen_by_the_next_heartbeat() {
    let app = spawn_app().await;
    let id = app.create("video").await;
    let (_, lease) = app.claim("w1", "video").await;
    let (status, body) = app
        .post(
            &format!("/api/v1/remote-jobs/{id}/cancel"),
            json!({"reason": "user aborted"}),
        )
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")));
    let (status, body) = app.heartbeat(&id, &lease).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["cancelled"].as_bool(), body["status"].as_str()),
        (Some(true), Some("cancelled"))
    );
    let (status, body) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(
        (status, body["current_status"].as_str()),
        (409, Some("cancelled"))
    );
    let (status, body) = app
        .post(&format!("/api/v1/remote-jobs/{id}/retry"), json!({}))
        .await;
    assert_eq!(
        (status, body["current_status"].as_str()),
        (409, Some("cancelled")),
        "invalid transition is 409, not 404"
    );
}

#[tokio::test]
async fn cleanup_removes_old_finished_jobs_and_their_files() {
    let app = spawn_app_with(&["--retention-days", "1"]).await;
    let done = app.create("audio").await;
    app.claim("w1", "audio").await;
    app.succeed(&done, None).await;
    let source = app.detail(&done).await["source_file_path"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = app.create("audio").await;
    app.claim("w1", "audio").await;
    app.fail(&failed, None, false).await;
    let failed_source = app.detail(&failed).await["source_file_path"]
        .as_str()
        .unwrap()
        .to_owned();
    // A file outside the server's own files/ directory is the operator's, never deleted.
    let live = app.create("audio").await;
    assert!(std::path::Path::new(&source).exists());

    app.advance(86_401);
    let summary = app.monitor().cleanup_once().await.unwrap();
    assert_eq!(
        (summary.n_jobs_deleted, summary.n_files_deleted),
        (1, 1),
        "failures are kept twice as long"
    );
    assert!(
        !std::path::Path::new(&source).exists(),
        "the completed job's file is gone"
    );
    let (status, _) = app.get(&format!("/api/v1/remote-jobs/{done}")).await;
    assert_eq!(status, 404);
    assert_eq!(app.status_of(&failed).await, "failed");
    app.advance(86_400);
    let summary = app.monitor().cleanup_once().await.unwrap();
    assert_eq!(summary.n_jobs_deleted, 1);
    assert!(!std::path::Path::new(&failed_source).exists());
    assert_eq!(
        app.status_of(&live).await,
        "pending",
        "unfinished jobs stay"
    );
}

#[tokio::test]
async fn cleanup_never_deletes_files_outside_the_servers_files_directory() {
    let outside = tempfile::tempdir().unwrap();
    let roots = format!("{}", outside.path().display());
    let app = spawn_app_with(&["--allowed-roots", &roots]).await;
    let path = outside.path().join("operator-owned.wav");
    std::fs::write(&path, b"x").unwrap();
    let (status, body) = app
        .post(
            "/api/v1/remote-jobs",
            json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "t"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["job_id"].as_str().unwrap().to_owned();
    app.claim("w1", "audio").await;
    app.succeed(&id, None).await;
    app.advance(30 * 86_400);
    let summary = app.monitor().cleanup_once().await.unwrap();
    assert_eq!((summary.n_jobs_deleted, summary.n_files_deleted), (1, 0));
    assert!(path.exists());
}

/// The monitor's loop, in real time: a deadline that passed is handled within about a
/// second even when the monitor interval is an hour.
#[tokio::test]
async fn the_monitor_loop_acts_on_a_passed_deadline_within_about_a_second() {
    let app = spawn_app_with(&["--monitor-interval", "3600"]).await;
    let id = app.create("image").await;
    app.claim("w1", "image").await;
    // Let the loop settle into its long sleep, then move past the deadline.
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.advance(301);
    let started = std::time::Instant::now();
    while app.status_of(&id).await == "processing" {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "not handled within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.status_of(&id).await, "retrying");
    app.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_when_a_retry_becomes_due() {
    let app = spawn_app_with(&["--retry-backoff-base", "5", "--retry-backoff-max", "5"]).await;
    let id = app.create("web").await;
    app.claim("w1", "web").await;
    app.fail(&id, None, true).await;
    let poller = {
        let client = app.client.clone();
        let url = app.url("/api/v1/remote-jobs/poll?worker_id=w2&content_types=web&wait=10");
        tokio::spawn(async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.advance(5);
    app.monitor().rescue_once().await.unwrap();
    let started = std::time::Instant::now();
    let body = poller.await.unwrap();
    assert_eq!(body["job_id"].as_str(), Some(id.as_str()));
    assert!(started.elapsed() < Duration::from_secs(2));
}
