//! Reads that list or summarise jobs never load results: the real server binary, holding
//! jobs with large results, answers concurrent listings and status reads without its
//! resident memory growing by anything like the results' size (issue 8, item 4).

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{complete_document_job, free_port, get_json, PgDatabase, ServerProcess};

const JOBS: usize = 20;
const RESULT_BYTES: usize = 10 * 1024 * 1024;
const CONCURRENT_READERS: usize = 4;
/// How much the server's peak resident memory may grow while the readers run. The old
/// code read every job's result into each listing: 4 x 20 x 10 MB = 800 MB at once.
const GROWTH_BOUND_BYTES: u64 = 64 * 1024 * 1024;

/// A field of `/proc/<pid>/status` in bytes (the file gives kB).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_and_status_reads_do_not_load_results() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let client = reqwest::Client::new();
    // With `MORAG_TEST_STORE=postgres` the server runs on a fresh PostgreSQL database.
    let database = match std::env::var("MORAG_TEST_STORE").as_deref() {
        Ok("postgres") => Some(PgDatabase::create().await),
        _ => None,
    };
    let mut env = vec![("MORAG_REMOTE_JOB_TIMEOUT_DOCUMENT", "3600")];
    if let Some(database) = &database {
        env.push(("MORAG_DATABASE_URL", database.url.as_str()));
    }
    let server = ServerProcess::start(data.path(), port, &env);
    server.wait_healthy(&client).await;
    let base = server.base.clone();
    let source = data.path().canonicalize().unwrap().join("files/source.pdf");
    std::fs::write(&source, b"%PDF").unwrap();

    let content = "x".repeat(RESULT_BYTES);
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let create = json!({"source_file_path": source, "content_type": "document", "ingestion_task_id": format!("t{i}")});
        let result = json!({"success": true, "content": content, "metadata": {"pages": i}});
        let id = complete_document_job(&client, &base, create, result).await;
        ids.push(id);
    }
    drop(content);

    // Peak memory from here on: writing 5 to clear_refs resets VmHWM to the current RSS.
    let pid = server.child.id();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let before = proc_status_bytes(pid, "VmRSS:");
    let mut readers = Vec::new();
    for _ in 0..CONCURRENT_READERS {
        let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
        readers.push(tokio::spawn(async move {
            for _ in 0..3 {
                let answer = client
                    .get(format!("{base}/api/v1/remote-jobs?limit=500"))
                    .send()
                    .await
                    .unwrap();
                let status = answer.status();
                let page: Value = answer.json().await.unwrap();
                assert_eq!(status, 200, "{page}");
                assert_eq!(page["jobs"].as_array().map(Vec::len), Some(JOBS));
            }
            for id in &ids {
                let status: Value =
                    get_json(&client, format!("{base}/api/v1/remote-jobs/{id}/status")).await;
                assert_eq!(status["status"], "completed");
            }
        }));
    }
    for reader in readers {
        reader.await.unwrap();
    }
    let peak = proc_status_bytes(pid, "VmHWM:");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "listing memory: RSS before {} MB, peak during {} MB, growth {} MB (bound {} MB)",
        before >> 20,
        peak >> 20,
        growth >> 20,
        GROWTH_BOUND_BYTES >> 20
    );
    assert!(
        growth < GROWTH_BOUND_BYTES,
        "{CONCURRENT_READERS} concurrent listings of {JOBS} jobs with {} MB results grew the peak RSS by {} MB",
        RESULT_BYTES >> 20,
        growth >> 20
    );

    // The detail endpoint is the one read that returns the result, whole and as stored.
    let detail: Value = get_json(&client, format!("{base}/api/v1/remote-jobs/{}", ids[3])).await;
    assert_eq!(
        detail["result"]["content"].as_str().map(str::len),
        Some(RESULT_BYTES)
    );
    assert_eq!(detail["result"]["metadata"], json!({"pages": 3}));
    drop(server);
}
