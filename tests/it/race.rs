//! 16 workers race over 2,000 jobs through the real HTTP server; some attempts fail and
//! are retried at once. Every attempt must be claimed by exactly one worker and every job
//! completed exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use morag_jobs::clock::Clock as _;

use crate::support::spawn_app_with;

const JOBS: usize = 2_000;
const WORKERS: usize = 16;

/// (job, attempt) -> the workers that were handed it.
type ClaimsByAttempt = HashMap<(String, u64), Vec<usize>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_attempt_is_claimed_once_and_every_job_completed_once() {
    let app = Arc::new(
        spawn_app_with(&[
            "--max-retries",
            "5",
            "--retry-backoff-base",
            "0",
            "--retry-backoff-max",
            "0",
        ])
        .await,
    );
    let path = app.source_file("shared.bin", b"payload");
    let mut creators = Vec::new();
    for chunk in 0..8 {
        let app = app.clone();
        let path = path.clone();
        creators.push(tokio::spawn(async move {
            for i in 0..JOBS / 8 {
                let content_type = ["audio", "video", "document"][(chunk + i) % 3];
                let (status, body) = app
                    .post("/api/v1/remote-jobs/", json!({"source_file_path": path, "content_type": content_type, "ingestion_task_id": format!("t{chunk}-{i}")}))
                    .await;
                assert_eq!(status, 200, "{body}");
            }
        }));
    }

    // (job, attempt) -> workers that were handed it; job -> successful result answers.
    let claims: Arc<Mutex<ClaimsByAttempt>> = Arc::default();
    let completions: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let app = app.clone();
        let claims = claims.clone();
        let completions = completions.clone();
        workers.push(tokio::spawn(async move {
            let mut idle_polls = 0;
            while idle_polls < 20 {
                let (_, body): (u16, Value) = app
                    .get(&format!("/api/v1/remote-jobs/poll?worker_id=w{worker}&content_types=audio,video,document&wait=0.05"))
                    .await;
                let Some(id) = body["job_id"].as_str().map(str::to_owned) else {
                    idle_polls += 1;
                    continue;
                };
                idle_polls = 0;
                let attempt = body["attempt"].as_u64().unwrap();
                let lease = body["lease_id"].as_str().unwrap().to_owned();
                claims.lock().unwrap().entry((id.clone(), attempt)).or_default().push(worker);
                // Every fifth first attempt fails; the retry is due at once.
                let fail = attempt == 1 && fastrand::u8(..5) == 0;
                if fail {
                    let (status, body) = app.fail(&id, Some(&lease), true).await;
                    assert_eq!(status, 200, "{body}");
                } else {
                    let (status, body) = app.succeed(&id, Some(&lease)).await;
                    assert_eq!(status, 200, "{body}");
                    *completions.lock().unwrap().entry(id).or_default() += 1;
                }
            }
        }));
    }
    for task in creators {
        task.await.unwrap();
    }
    for task in workers {
        task.await.unwrap();
    }

    // Take the data out, so no lock is held across the awaits below.
    let claims = std::mem::take(&mut *claims.lock().unwrap());
    let completions = std::mem::take(&mut *completions.lock().unwrap());
    for ((id, attempt), workers) in claims.iter() {
        assert_eq!(
            workers.len(),
            1,
            "job {id} attempt {attempt} handed to {workers:?}"
        );
    }
    assert_eq!(completions.len(), JOBS, "every job completed");
    assert!(
        completions.values().all(|n| *n == 1),
        "no job completed twice"
    );
    let stats = app.context.store.statistics(app.clock.now()).await.unwrap();
    assert_eq!(stats.total_jobs as usize, JOBS);
    assert_eq!(
        stats.status_counts[&morag_jobs::domain::JobStatus::Completed] as usize,
        JOBS
    );
    // The history agrees: one claim entry per handed-out attempt.
    let sample: Vec<&String> = completions.keys().take(200).collect();
    for id in sample {
        let history = app.history(id).await;
        let n_claims = history
            .iter()
            .filter(|(_, to, _)| to == "processing")
            .count();
        let handed = claims.keys().filter(|(job, _)| job == id).count();
        assert_eq!(n_claims, handed, "history of {id}: {history:?}");
        assert_eq!(history.last().unwrap().1, "completed");
    }
}
