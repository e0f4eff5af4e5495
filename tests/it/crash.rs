//! Kill -9 the real server binary under load, restart it on the same data directory: no
//! acknowledged job or result is lost, and nothing stays in processing past its timeout.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{free_port, get_json, ServerProcess};

/// Short real-time timeouts so attempts orphaned by the crash come back quickly.
const FAST_RETRY_ENV: &[(&str, &str)] = &[
    ("MORAG_REMOTE_JOB_TIMEOUT_DOCUMENT", "2"),
    ("MORAG_REMOTE_RETRY_BACKOFF_BASE", "0"),
    ("MORAG_REMOTE_RETRY_BACKOFF_MAX", "0"),
    ("MORAG_REMOTE_MAX_RETRIES", "10"),
    ("MORAG_JOB_MONITOR_INTERVAL", "1"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_dash_nine_under_load_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let client = reqwest::Client::new();
    let mut server = ServerProcess::start(data.path(), port, FAST_RETRY_ENV);
    server.wait_healthy(&client).await;
    let base = server.base.clone();
    let source = data.path().canonicalize().unwrap().join("files/source.pdf");
    std::fs::write(&source, b"%PDF").unwrap();

    let created: Arc<Mutex<HashSet<String>>> = Arc::default();
    let completed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for producer in 0..4 {
        let (client, base, created, stop, source) = (
            client.clone(),
            base.clone(),
            created.clone(),
            stop.clone(),
            source.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let body = json!({"source_file_path": source, "content_type": "document", "ingestion_task_id": format!("p{producer}-{i}")});
                let Ok(response) = client.post(format!("{base}/api/v1/remote-jobs/")).json(&body).send().await else { break };
                if response.status() != 200 {
                    break;
                }
                let Ok(value) = response.json::<Value>().await else { break };
                created.lock().unwrap().insert(value["job_id"].as_str().unwrap().to_owned());
            }
        }));
    }
    for worker in 0..4 {
        let (client, base, completed, stop) = (
            client.clone(),
            base.clone(),
            completed.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!(
                    "{base}/api/v1/remote-jobs/poll?worker_id=w{worker}&content_types=document"
                );
                let Ok(response) = client.get(url).send().await else {
                    break;
                };
                let Ok(job) = response.json::<Value>().await else {
                    break;
                };
                let Some(id) = job["job_id"].as_str() else {
                    continue;
                };
                let result =
                    json!({"success": true, "content": "text", "lease_id": job["lease_id"]});
                let Ok(response) = client
                    .put(format!("{base}/api/v1/remote-jobs/{id}/result"))
                    .json(&result)
                    .send()
                    .await
                else {
                    break;
                };
                if response.status() == 200 {
                    completed.lock().unwrap().insert(id.to_owned());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill_9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let created = created.lock().unwrap().clone();
    let completed = completed.lock().unwrap().clone();
    assert!(
        created.len() > 100,
        "the load ran: {} jobs created",
        created.len()
    );

    // Restart on the same data directory.
    let server = ServerProcess::start(data.path(), port, FAST_RETRY_ENV);
    server.wait_healthy(&client).await;
    let status = |id: String| {
        let (client, base) = (client.clone(), server.base.clone());
        async move {
            let response = client
                .get(format!("{base}/api/v1/remote-jobs/{id}/status"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "acknowledged job {id} is lost");
            response.json::<Value>().await.unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    for id in &completed {
        assert_eq!(
            status(id.clone()).await,
            "completed",
            "acknowledged result of {id} is lost"
        );
    }
    // Drain: attempts orphaned by the crash time out (2 s) and are claimed again.
    let started = Instant::now();
    let mut remaining: HashSet<String> = created.difference(&completed).cloned().collect();
    while !remaining.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} jobs never finished",
            remaining.len()
        );
        if let Some(id) = complete_next(&client, &server.base, "&wait=1").await {
            remaining.remove(&id);
        } else {
            // A result the crash cut off after its commit completed the job without the
            // worker hearing so; such jobs are done.
            let mut finished = Vec::new();
            for id in &remaining {
                if status(id.clone()).await == "completed" {
                    finished.push(id.clone());
                }
            }
            for id in finished {
                remaining.remove(&id);
            }
        }
    }
    // A create the crash cut off after its commit left a job nobody heard of: it is
    // there (nothing is lost) and must be worked off like the rest.
    while complete_next(&client, &server.base, "").await.is_some() {}
    let stats: Value = get_json(
        &client,
        format!("{}/api/v1/remote-jobs/statistics", server.base),
    )
    .await;
    assert_eq!(
        stats["status_counts"]["processing"], 0,
        "nothing stuck in processing: {stats}"
    );
    assert_eq!(stats["status_counts"]["pending"], 0, "{stats}");
}

/// Claims the next document job (`extra` is appended to the poll's query) and completes
/// it; returns its id, or `None` when no job was handed out.
async fn complete_next(client: &reqwest::Client, base: &str, extra: &str) -> Option<String> {
    let url =
        format!("{base}/api/v1/remote-jobs/poll?worker_id=drain&content_types=document{extra}");
    let job: Value = get_json(client, url).await;
    let id = job["job_id"].as_str()?.to_owned();
    let result = json!({"success": true, "content": "text", "lease_id": job["lease_id"]});
    let response = client
        .put(format!("{base}/api/v1/remote-jobs/{id}/result"))
        .json(&result)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    Some(id)
}
