//! The `morag-jobs` binary itself: the admin CLI against a running server, and a clean
//! shutdown on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{free_port, ServerProcess};

const ADMIN_KEY: &str = "admin-secret";

struct Running {
    server: ServerProcess,
    client: reqwest::Client,
    data: tempfile::TempDir,
}

async fn start() -> Running {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        data.path(),
        free_port(),
        &[
            ("MORAG_ADMIN_API_KEYS", ADMIN_KEY),
            ("MORAG_WORKER_API_KEYS", "worker-secret"),
        ],
    );
    let client = reqwest::Client::new();
    server.wait_healthy(&client).await;
    Running {
        server,
        client,
        data,
    }
}

impl Running {
    async fn create(&self, content_type: &str) -> String {
        let path = self
            .data
            .path()
            .canonicalize()
            .unwrap()
            .join(format!("files/{content_type}.bin"));
        std::fs::write(&path, b"x").unwrap();
        let response = self
            .client
            .post(format!("{}/api/v1/remote-jobs", self.server.base))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"source_file_path": path, "content_type": content_type, "ingestion_task_id": "cli"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Runs the CLI with the server's URL and key; returns (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
            .args(args)
            .args(["--url", &self.server.base, "--api-key", ADMIN_KEY])
            .output()
            .expect("cli runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

#[tokio::test]
async fn admin_cli_lists_shows_cancels_retries_and_reports() {
    let running = start().await;
    let audio = running.create("audio").await;
    let video = running.create("video").await;

    let (ok, out, err) = running.cli(&["jobs", "list"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("JOB ID") && lines[0].contains("STATUS"),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&video) && lines[2].starts_with(&audio),
        "newest first:\n{out}"
    );

    let (ok, out, _) = running.cli(&[
        "jobs",
        "list",
        "--status",
        "pending",
        "--content-type",
        "audio",
        "--json",
    ]);
    assert!(ok);
    let body: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(body["jobs"][0]["job_id"], audio.as_str());

    let (ok, out, _) = running.cli(&["jobs", "show", &audio]);
    assert!(ok);
    assert!(
        out.contains("content_type") && out.contains("audio") && out.contains("created"),
        "{out}"
    );

    let (ok, out, _) = running.cli(&["jobs", "cancel", &audio, "--reason", "wrong file"]);
    assert!(ok);
    assert!(out.contains("cancelled"), "{out}");
    let (ok, _, err) = running.cli(&["jobs", "retry", &audio]);
    assert!(!ok, "retrying a cancelled job must fail");
    assert!(err.contains("409") && err.contains("cancelled"), "{err}");

    let (ok, out, _) = running.cli(&["stats"]);
    assert!(ok);
    assert!(
        out.contains("pending") && out.contains("cancelled") && out.contains("total 2"),
        "{out}"
    );
    let (ok, out, _) = running.cli(&["stats", "--json"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["total_jobs"],
        2
    );

    let (ok, out, _) = running.cli(&["cleanup", "--days-old", "0"]);
    assert!(ok);
    assert_eq!(out.trim(), "cleaned 1 jobs older than 0 days");

    let output = Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
        .args([
            "stats",
            "--url",
            &running.server.base,
            "--api-key",
            "worker-secret",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("401"),
        "a worker key is not an admin key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_closes_the_store() {
    let mut running = start().await;
    let kept = running.create("document").await;
    let poll = {
        let url = format!(
            "{}/api/v1/remote-jobs/poll?worker_id=w&content_types=image&wait=20",
            running.server.base
        );
        let client = running.client.clone();
        tokio::spawn(async move { client.get(url).bearer_auth("worker-secret").send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| running.server.terminate());
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown does not wait for the 20 s long poll"
    );
    let response = poll
        .await
        .unwrap()
        .expect("the in-flight long poll got an answer");
    assert_eq!(response.status(), 200);
    assert!(response.json::<Value>().await.unwrap()["job_id"].is_null());
    // The store was closed cleanly: the WAL is checkpointed away and the job is there.
    let wal = running.data.path().join("morag-jobs.sqlite3-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "WAL folded back at close"
    );
    let restarted = ServerProcess::start(
        running.data.path(),
        free_port(),
        &[("MORAG_ADMIN_API_KEYS", ADMIN_KEY)],
    );
    restarted.wait_healthy(&running.client).await;
    let response = running
        .client
        .get(format!(
            "{}/api/v1/remote-jobs/{kept}/status",
            restarted.base
        ))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "pending");
}
