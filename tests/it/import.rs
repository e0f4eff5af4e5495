//! `morag-jobs import-morag-dir`: MoRAG's `remote_jobs/<status>/<id>.json` files become
//! jobs in the configured store (SQLite or PostgreSQL), once.

use std::path::Path;
use std::process::Command;

use morag_jobs::clock::{Clock, SystemClock};
use serde_json::json;

use crate::support::{spawn_app_with, PgDatabase};

/// Naive UTC, the way MoRAG writes it (`datetime.utcnow().isoformat()`).
fn morag_time(seconds_ago: u64) -> String {
    let text = SystemClock
        .now()
        .minus(std::time::Duration::from_secs(seconds_ago))
        .to_rfc3339();
    text.trim_end_matches('Z').to_owned()
}

fn write_job(dir: &Path, folder: &str, job: serde_json::Value) -> String {
    let id = job["id"].as_str().unwrap_or("broken").to_owned();
    std::fs::create_dir_all(dir.join(folder)).unwrap();
    std::fs::write(
        dir.join(folder).join(format!("{id}.json")),
        serde_json::to_string_pretty(&job).unwrap(),
    )
    .unwrap();
    id
}

fn morag_job(status: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut job = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "ingestion_task_id": format!("ingest-{status}"),
        "source_file_path": "/app/uploads/talk.mp3",
        "content_type": "audio",
        "task_options": {"language": "de"},
        "status": status,
        "worker_id": null,
        "created_at": morag_time(600),
        "started_at": null,
        "completed_at": null,
        "error_message": null,
        "result_data": null,
        "retry_count": 0,
        "max_retries": 3,
        "timeout_at": morag_time(0),
    });
    for (key, value) in extra.as_object().unwrap() {
        job[key] = value.clone();
    }
    job
}

fn import(dir: &Path, data_dir: &Path, database_url: &str) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
        .args([
            "import-morag-dir",
            dir.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--database-url",
            database_url,
        ])
        .env_remove("MORAG_DATABASE_URL")
        .output()
        .expect("morag-jobs runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn check(database_url: &str) {
    let morag = tempfile::tempdir().unwrap();
    let remote_jobs = morag.path().join("remote_jobs");
    let pending = write_job(&remote_jobs, "pending", morag_job("pending", json!({})));
    let running = write_job(
        &remote_jobs,
        "processing",
        morag_job(
            "processing",
            json!({"worker_id": "gpu-1", "started_at": morag_time(300)}),
        ),
    );
    let done = write_job(
        &remote_jobs,
        "completed",
        morag_job(
            "completed",
            json!({"worker_id": "gpu-1", "started_at": morag_time(500), "completed_at": morag_time(400),
            "result_data": {"content": "Hallo Welt", "metadata": {"duration": 12.5}, "processing_time": 100.0}}),
        ),
    );
    let failed = write_job(
        &remote_jobs,
        "failed",
        morag_job(
            "failed",
            json!({"started_at": morag_time(500), "completed_at": morag_time(450), "error_message": "whisper crashed", "retry_count": 1}),
        ),
    );
    let timed_out = write_job(
        &remote_jobs,
        "timeout",
        morag_job(
            "timeout",
            json!({"completed_at": morag_time(10), "error_message": "Job exceeded maximum processing time"}),
        ),
    );
    let cancelled = write_job(&remote_jobs, "cancelled", morag_job("cancelled", json!({})));
    // Malformed files are reported, and do not stop the import.
    std::fs::write(
        remote_jobs.join("pending").join("truncated.json"),
        "{\"id\": ",
    )
    .unwrap();
    write_job(
        &remote_jobs,
        "pending",
        morag_job("pending", json!({"id": "not-a-uuid"})),
    );
    write_job(
        &remote_jobs,
        "failed",
        morag_job("failed", json!({"content_type": "Audio Files"})),
    );
    std::fs::write(remote_jobs.join("pending").join("README.txt"), "not a job").unwrap();

    let data = tempfile::tempdir().unwrap();
    // Given the folder that contains remote_jobs, as MoRAG's data directory is laid out.
    let (ok, stdout, stderr) = import(morag.path(), data.path(), database_url);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("imported 6 jobs, skipped 0 already present, 3 malformed files"),
        "{stdout}"
    );
    assert!(
        stderr.contains("truncated.json")
            && stderr.contains("not-a-uuid")
            && stderr.contains("content_type"),
        "{stderr}"
    );
    let (ok, stdout, _) = import(&remote_jobs, data.path(), database_url);
    assert!(ok);
    assert!(
        stdout.contains("imported 0 jobs, skipped 6 already present, 3 malformed files"),
        "running it again changes nothing: {stdout}"
    );

    let app = spawn_app_with(&["--database-url", database_url]).await;
    for (id, status) in [
        (&pending, "pending"),
        (&running, "processing"),
        (&done, "completed"),
        (&failed, "failed"),
        (&timed_out, "timeout"),
        (&cancelled, "cancelled"),
    ] {
        assert_eq!(app.status_of(id).await, status, "{id}");
    }
    let detail = app.detail(&done).await;
    assert_eq!(detail["ingestion_task_id"], "ingest-completed");
    assert_eq!(detail["task_options"], json!({"language": "de"}));
    let history = app.history(&done).await;
    assert_eq!(history.len(), 1);
    assert_eq!(
        (history[0].1.as_str(), history[0].2.as_str()),
        ("completed", "admin")
    );

    // The imported pending job is claimed like any other; MoRAG's worker, which never
    // sends a lease, can still deliver the job it was running when the import happened.
    let (claimed, _) = app.claim("w1", "audio").await;
    assert_eq!(claimed, pending);
    let (status, body) = app.succeed(&running, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.status_of(&running).await, "completed");
    let (status, stats) = app.get("/api/v1/remote-jobs/statistics").await;
    assert_eq!(status, 200);
    assert_eq!(stats["total_jobs"], 6, "{stats}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn morag_jobs_are_imported_once_into_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    check(&format!(
        "sqlite://{}",
        dir.path().join("jobs.sqlite3").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn morag_jobs_are_imported_once_into_postgres() {
    let database = PgDatabase::create().await;
    check(&database.url).await;
}
