//! The client library (`morag-jobs-client`) against the real server: every request of the
//! protocol through `ServerClient`'s typed API, and the embedded worker loop
//! (`worker::run_until`) running a real command. Keys are on, so the bearer tokens are
//! exercised too: the worker key for the worker's requests, the admin key for ingestion's.

use std::time::Duration;

use morag_jobs_client::wire::{CreateJobRequest, JobStatus, SubmitResultRequest};
use morag_jobs_client::worker::WorkerArgs;
use morag_jobs_client::{ClaimedJob, ClientError, ServerClient};
use serde_json::{json, Map};

use crate::support::{spawn_app_with, uuid_like, TestApp};

const KEYS: &[&str] = &["--worker-api-keys", "wk", "--admin-api-keys", "ak"];

/// The server with keys on; the test app's own requests (`detail`) use the admin key.
async fn keyed_app() -> TestApp {
    let mut app = spawn_app_with(KEYS).await;
    app.api_key = Some("ak".into());
    app
}

fn clients(app: &TestApp) -> (ServerClient, ServerClient) {
    (
        ServerClient::new(&app.base, Some("ak".into())).unwrap(),
        ServerClient::new(&app.base, Some("wk".into())).unwrap(),
    )
}

fn create_request(app: &TestApp, content_type: &str, bytes: &[u8]) -> CreateJobRequest {
    let mut task_options = Map::new();
    task_options.insert("language".into(), json!("en"));
    CreateJobRequest {
        source_file_path: app.source_file(&format!("{}.src", uuid_like()), bytes),
        content_type: content_type.into(),
        task_options,
        ingestion_task_id: "ingest-client".into(),
    }
}

async fn poll_one(worker: &ServerClient, content_type: &str) -> ClaimedJob {
    worker
        .poll(
            "rust-worker",
            &[content_type.to_owned()],
            Duration::from_secs(2),
        )
        .await
        .expect("poll answered")
        .expect("a job was due")
}

#[tokio::test]
async fn a_job_runs_through_the_typed_client() {
    let app = keyed_app().await;
    let (admin, worker) = clients(&app);

    let created = admin
        .create_job(&create_request(&app, "audio", b"the source bytes"))
        .await
        .unwrap();
    assert_eq!(created.status, JobStatus::Pending);

    // The worker key cannot create: a refusal (401), not a transient error to retry.
    let refused = worker
        .create_job(&create_request(&app, "audio", b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ClientError::Refused { status: 401, .. }),
        "{refused:?}"
    );

    let job = poll_one(&worker, "audio").await;
    assert_eq!(job.job_id, created.job_id);
    assert_eq!(job.content_type, "audio");
    assert_eq!(job.task_options, json!({"language": "en"}));
    assert_eq!(job.attempt, Some(1));
    assert!(job.heartbeat_interval_seconds.is_some() && job.execution_deadline.is_some());

    let download = tempfile::tempdir().unwrap();
    let input = download.path().join("input");
    worker.download(&job, &input).await.unwrap();
    assert_eq!(std::fs::read(&input).unwrap(), b"the source bytes");

    let beat = worker
        .heartbeat(&job, Some(50.0), Some("halfway"))
        .await
        .unwrap();
    assert_eq!(beat.status, JobStatus::Processing);
    assert!(!beat.cancelled);
    assert!(beat.heartbeat_deadline.is_some());

    let mut metadata = Map::new();
    metadata.insert("pages".into(), json!(2));
    let submitted = worker
        .submit_result(
            &job,
            SubmitResultRequest {
                success: true,
                content: Some("converted text".into()),
                metadata: Some(metadata),
                processing_time: Some(0.25),
                ..Default::default()
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(submitted.status, JobStatus::Completed);

    let status = admin.job_status(&job.job_id).await.unwrap();
    assert_eq!(status.status, JobStatus::Completed);
    assert_eq!(status.worker_id.as_deref(), Some("rust-worker"));
    assert!(status.started_at.unwrap() <= status.completed_at.unwrap());
    let detail = app.detail(&job.job_id).await;
    assert_eq!(detail["result"]["content"], "converted text");
    assert_eq!(detail["result"]["metadata"], json!({"pages": 2}));

    // The attempt is over: its lease is refused, which the client calls a lost attempt.
    let late = worker.heartbeat(&job, None, None).await.unwrap_err();
    assert!(late.attempt_lost(), "{late:?}");
}

#[tokio::test]
async fn a_release_and_a_cancel_through_the_typed_client() {
    let app = keyed_app().await;
    let (admin, worker) = clients(&app);
    let created = admin
        .create_job(&create_request(&app, "video", b"frames"))
        .await
        .unwrap();

    let first = poll_one(&worker, "video").await;
    let released = worker
        .release(&first, "shutting down", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(released.status, JobStatus::Pending);
    assert_eq!(released.retry_count, 0);

    // Claimable again at once, with a new lease; the old one is refused.
    let second = poll_one(&worker, "video").await;
    assert_eq!(second.job_id, created.job_id);
    assert_ne!(second.lease_id, first.lease_id);
    let stale = worker.heartbeat(&first, None, None).await.unwrap_err();
    assert!(
        matches!(stale, ClientError::Refused { status: 409, .. }),
        "{stale:?}"
    );

    let cancelled = admin
        .cancel_job(&created.job_id, Some("not needed"))
        .await
        .unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    let beat = worker.heartbeat(&second, None, None).await.unwrap();
    assert!(beat.cancelled, "{beat:?}");

    // An unknown job is a refusal the caller can read.
    let missing = admin.job_status(&uuid_like()).await.unwrap_err();
    assert!(
        matches!(
            missing,
            ClientError::Refused {
                status: 404 | 422,
                ..
            }
        ),
        "{missing:?}"
    );
}

#[tokio::test]
async fn the_embedded_worker_loop_runs_a_command_on_each_job() {
    let app = keyed_app().await;
    let (admin, _) = clients(&app);
    let mut ids = Vec::new();
    for n in 0..3 {
        let text = format!("document {n}");
        let created = admin
            .create_job(&create_request(&app, "text", text.as_bytes()))
            .await
            .unwrap();
        ids.push((created.job_id, text));
    }
    let temp = tempfile::tempdir().unwrap();
    let args = WorkerArgs {
        url: app.base.clone(),
        api_key: Some("wk".into()),
        worker_id: "embedded".into(),
        content_types: vec!["text".into()],
        concurrency: 2,
        exec: r#"cat {input}; printf '{"type": "%s"}' "$MORAG_JOB_CONTENT_TYPE" > "$MORAG_JOB_METADATA_OUT""#.into(),
        permanent_exit_codes: vec![3],
        kill_grace: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        poll_wait: Duration::from_secs(1),
        temp_dir: Some(temp.path().to_owned()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(morag_jobs_client::worker::run_until(args, async move {
        let _ = stopped.await;
    }));

    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    for (id, text) in &ids {
        loop {
            let status = admin.job_status(id).await.unwrap();
            if status.status == JobStatus::Completed {
                break;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "job {id} is still {}",
                status.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let detail = app.detail(id).await;
        assert_eq!(detail["result"]["content"], text.as_str());
        assert_eq!(detail["result"]["metadata"], json!({"type": "text"}));
        assert_eq!(detail["worker_id"], "embedded");
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker stops when told")
        .unwrap()
        .unwrap();
    // Every job's private directory is gone.
    assert_eq!(std::fs::read_dir(temp.path()).unwrap().count(), 0);
}
