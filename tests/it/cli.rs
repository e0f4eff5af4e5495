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

/// Runs the CLI with exactly these arguments (no `--url` or key added).
fn cli_raw(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
        .args(args)
        .env_remove("MORAG_JOBS_URL")
        .env_remove("MORAG_JOBS_API_KEY")
        .output()
        .expect("cli runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn server_errors_are_readable_sentences_and_json_under_json() {
    let running = start().await;
    let check = |args: &[&str], expected: &[&str]| {
        let (ok, _, err) = running.cli(args);
        assert!(!ok, "{args:?} must fail");
        for part in expected {
            assert!(err.contains(part), "{part:?} in:\n{err}");
        }
        assert!(!err.contains("\"loc\""), "no raw JSON:\n{err}");
    };
    check(
        &["jobs", "list", "--status", "bogus"],
        &["--status bogus: expected one of pending, processing, completed, failed, timeout, cancelled, retrying"],
    );
    check(
        &["jobs", "list", "--content-type", "Not A Type"],
        &["the server answered 422 Unprocessable Entity: content_type: "],
    );
    check(
        &["cleanup", "--days-old", "99999"],
        &["422 Unprocessable Entity: days_old: must be a whole number of days from 0 to 36500"],
    );
    check(&["jobs", "show", "no-such-job"], &["the server answered 4"]);

    // Under --json the error is JSON too, with the server's status and detail.
    let id = running.create("audio").await;
    running.cli(&["jobs", "cancel", &id]);
    let (ok, out, _) = running.cli(&["jobs", "retry", &id, "--json"]);
    assert!(!ok);
    let error: Value = serde_json::from_str(&out).expect("a JSON error on stdout");
    assert_eq!(error["status"], 409);
    assert!(
        error["error"].as_str().unwrap().contains("cancelled"),
        "{error}"
    );
    let (ok, out, _) = running.cli(&["jobs", "list", "--content-type", "Not A Type", "--json"]);
    assert!(!ok);
    let error: Value = serde_json::from_str(&out).expect("a JSON error on stdout");
    assert_eq!(error["status"], 422);
    assert_eq!(error["detail"][0]["loc"], json!(["query", "content_type"]));
    let (ok, out, _) = running.cli(&["jobs", "list", "--status", "bogus", "--json"]);
    assert!(!ok);
    let error: Value = serde_json::from_str(&out).expect("a JSON error on stdout");
    assert!(
        error["error"].as_str().unwrap().contains("retrying"),
        "{error}"
    );

    // A wrong key says which key is wanted.
    let (ok, _, err) = cli_raw(&["stats", "--url", &running.server.base]);
    assert!(!ok);
    assert!(
        err.contains("401") && err.contains("MORAG_JOBS_API_KEY"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_server_suggests_url_and_urls_need_no_scheme() {
    let nothing_there = format!("127.0.0.1:{}", free_port());
    let (ok, _, err) = cli_raw(&["stats", "--url", &nothing_there]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "cannot reach the morag-jobs server at http://{nothing_there}"
        )) && err.contains("--url or MORAG_JOBS_URL"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let (ok, out, _) = cli_raw(&["stats", "--url", &nothing_there, "--json"]);
    assert!(!ok);
    let error: Value = serde_json::from_str(&out).expect("a JSON error on stdout");
    assert!(error["error"].as_str().unwrap().contains("MORAG_JOBS_URL"));

    let running = start().await;
    let without_scheme = running.server.base.trim_start_matches("http://").to_owned();
    let (ok, out, err) = cli_raw(&["stats", "--url", &without_scheme, "--api-key", ADMIN_KEY]);
    assert!(ok, "{err}");
    assert!(out.contains("total 0"), "{out}");
}

#[tokio::test]
async fn cleanup_dry_run_counts_and_deletes_nothing() {
    let running = start().await;
    let cancelled = running.create("audio").await;
    let kept = running.create("video").await;
    running.cli(&["jobs", "cancel", &cancelled]);

    let (ok, out, err) = running.cli(&["cleanup", "--days-old", "0", "--dry-run"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "would clean 1 jobs older than 0 days (dry run: nothing deleted)"
    );
    let (ok, out, _) = running.cli(&["cleanup", "--days-old", "0", "--dry-run", "--json"]);
    assert!(ok);
    let body: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        body,
        json!({"dry_run": true, "would_clean_jobs": 1, "days_old": 0})
    );
    let (ok, _, _) = running.cli(&["jobs", "show", &cancelled]);
    assert!(ok, "the dry run deleted nothing");

    let (ok, out, _) = running.cli(&["cleanup", "--days-old", "0"]);
    assert!(ok);
    assert_eq!(out.trim(), "cleaned 1 jobs older than 0 days");
    assert!(!running.cli(&["jobs", "show", &cancelled]).0);
    assert!(running.cli(&["jobs", "show", &kept]).0);
}

#[tokio::test]
async fn a_source_outside_the_roots_is_refused_naming_the_roots_and_their_variable() {
    let running = start().await;
    let outside = tempfile::NamedTempFile::new().unwrap();
    let response = running
        .client
        .post(format!("{}/api/v1/remote-jobs", running.server.base))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"source_file_path": outside.path(), "content_type": "audio", "ingestion_task_id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let message = body["detail"][0]["msg"].as_str().unwrap();
    let files = running.data.path().canonicalize().unwrap().join("files");
    assert!(
        message.contains(files.to_str().unwrap()) && message.contains("MORAG_REMOTE_ALLOWED_ROOTS"),
        "{message}"
    );
}
