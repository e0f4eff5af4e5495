//! The worker registry over HTTP, on the real server with a manual clock: what polls,
//! heartbeats, results and releases record per worker process, when a worker turns stale,
//! the statistics' healthy workers per content type, the cleanup of workers gone past
//! retention, and the refusals.

use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, TestApp};

/// Sends a request as `morag-jobs worker` would: with the registry's headers.
async fn as_worker(
    app: &TestApp,
    (worker, instance): (&str, &str),
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = app
        .client
        .request(method, app.url(path))
        .header("X-Morag-Worker-Id", worker)
        .header("X-Morag-Worker-Instance", instance)
        .header("X-Morag-Worker-Version", "9.9.9");
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn claim_as(app: &TestApp, who: (&str, &str), types: &str) -> (String, String) {
    let (status, body) = as_worker(
        app,
        who,
        reqwest::Method::GET,
        &format!(
            "/api/v1/remote-jobs/poll?worker_id={}&content_types={types}&wait=5",
            who.0
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    (
        body["job_id"].as_str().expect("a job").to_owned(),
        body["lease_id"].as_str().unwrap().to_owned(),
    )
}

async fn workers(app: &TestApp) -> Value {
    let (status, body) = app.get("/api/v1/workers").await;
    assert_eq!(status, 200, "{body}");
    body
}

fn record<'a>(listing: &'a Value, worker: &str, instance: Option<&str>) -> &'a Value {
    listing["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == worker && w["instance"].as_str() == instance)
        .unwrap_or_else(|| panic!("no {worker}/{instance:?} in {listing:#}"))
}

fn summary(record: &Value) -> (String, u64, u64, u64) {
    (
        record["status"].as_str().unwrap().to_owned(),
        record["jobs_in_flight"].as_u64().unwrap(),
        record["completed"].as_u64().unwrap(),
        record["failed"].as_u64().unwrap(),
    )
}

fn healthy(n_in_flight: u64, n_completed: u64, n_failed: u64) -> (String, u64, u64, u64) {
    ("healthy".into(), n_in_flight, n_completed, n_failed)
}

fn stale(n_in_flight: u64, n_completed: u64, n_failed: u64) -> (String, u64, u64, u64) {
    ("stale".into(), n_in_flight, n_completed, n_failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_process_is_recorded_with_its_counts_and_turns_stale_when_silent() {
    let app = spawn_app().await;
    let first_life = ("gpu-a", "life-1");
    let second_life = ("gpu-a", "life-2");
    let post = reqwest::Method::POST;
    let put = reqwest::Method::PUT;

    // Our worker's first life: one job completed (with a heartbeat), one failed, one
    // released, one still held when it "dies".
    // Three jobs: the released one is claimed again as the one left held.
    for _ in 0..3 {
        app.create("audio").await;
    }
    let (done, lease) = claim_as(&app, first_life, "audio").await;
    let path = format!("/api/v1/remote-jobs/{done}");
    let (status, _) = as_worker(
        &app,
        first_life,
        post.clone(),
        &format!("{path}/heartbeat"),
        Some(json!({"lease_id": lease})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = as_worker(
        &app,
        first_life,
        put.clone(),
        &format!("{path}/result"),
        Some(json!({"success": true, "content": "text", "lease_id": lease})),
    )
    .await;
    assert_eq!(status, 200);
    let (failed, lease) = claim_as(&app, first_life, "audio").await;
    let (status, _) = as_worker(
        &app,
        first_life,
        put.clone(),
        &format!("/api/v1/remote-jobs/{failed}/result"),
        Some(json!({"success": false, "error_message": "no codec", "lease_id": lease})),
    )
    .await;
    assert_eq!(status, 200);
    let (released, lease) = claim_as(&app, first_life, "audio").await;
    let (status, _) = as_worker(
        &app,
        first_life,
        post.clone(),
        &format!("/api/v1/remote-jobs/{released}/release"),
        Some(json!({"lease_id": lease})),
    )
    .await;
    assert_eq!(status, 200);
    let (_held, _) = claim_as(&app, first_life, "audio").await;

    // Its next life polls for any type and finds nothing.
    let (status, idle) = as_worker(
        &app,
        second_life,
        reqwest::Method::GET,
        "/api/v1/remote-jobs/poll?worker_id=gpu-a&wait=0",
        None,
    )
    .await;
    assert_eq!((status, idle["job_id"].is_null()), (200, true), "{idle}");

    // MoRAG's client: a worker_id in its polls and nothing else.
    let image = app.create("image").await;
    app.claim("gpu-box", "image").await;
    let (status, _) = app.succeed(&image, None).await;
    assert_eq!(status, 200);

    let listing = workers(&app).await;
    assert_eq!(
        (listing["healthy"].as_u64(), listing["stale"].as_u64()),
        (Some(3), Some(0)),
        "{listing:#}"
    );
    let first = record(&listing, "gpu-a", Some("life-1"));
    assert_eq!(summary(first), healthy(1, 1, 1), "{first:#}");
    assert_eq!(first["content_types"], json!(["audio"]));
    assert_eq!(first["version"], "9.9.9");
    assert_eq!(first["address"], "127.0.0.1");
    assert_eq!(first["sends_heartbeats"], true);
    assert_eq!(first["poll_wait_seconds"], 5.0);
    let second = record(&listing, "gpu-a", Some("life-2"));
    assert_eq!(summary(second), healthy(0, 0, 0));
    assert_eq!(second["content_types"], json!([]), "any type");
    let morag = record(&listing, "gpu-box", None);
    assert_eq!(summary(morag), healthy(0, 1, 0), "{morag:#}");
    assert_eq!(morag["sends_heartbeats"], false);

    let (_, statistics) = app.get("/api/v1/remote-jobs/statistics").await;
    assert_eq!(
        statistics["workers"],
        json!({"healthy": 3, "stale": 0, "healthy_by_content_type": {"*": 1, "audio": 1, "image": 1}})
    );

    // Three poll waits without contact (MoRAG's client and a zero wait count as ten
    // seconds each): the idle ones are stale; the first life holds a job and has shown it
    // heartbeats, so it has the heartbeat timeout (300 s by default).
    app.advance(31);
    let listing = workers(&app).await;
    assert_eq!(
        summary(record(&listing, "gpu-a", Some("life-2"))),
        stale(0, 0, 0)
    );
    assert_eq!(summary(record(&listing, "gpu-box", None)), stale(0, 1, 0));
    assert_eq!(
        summary(record(&listing, "gpu-a", Some("life-1"))),
        healthy(1, 1, 1)
    );
    app.advance(270);
    let listing = workers(&app).await;
    // The restart did not hide the job the first life left behind.
    assert_eq!(
        summary(record(&listing, "gpu-a", Some("life-1"))),
        stale(1, 1, 1)
    );
    let (_, statistics) = app.get("/api/v1/remote-jobs/statistics").await;
    assert_eq!(
        statistics["workers"],
        json!({"healthy": 0, "stale": 3, "healthy_by_content_type": {}})
    );

    // The cleaner deletes the records of workers gone past the retention (7 days).
    app.advance(6 * 86_400);
    app.monitor().cleanup_once().await.unwrap();
    assert_eq!(workers(&app).await["workers"].as_array().unwrap().len(), 3);
    app.advance(86_400);
    app.monitor().cleanup_once().await.unwrap();
    assert_eq!(workers(&app).await["workers"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_says_stop_ends_the_job_in_flight() {
    let app = spawn_app().await;
    let who = ("gpu-c", "only");
    let id = app.create("video").await;
    let (_, lease) = claim_as(&app, who, "video").await;
    let (status, _) = app
        .post(
            &format!("/api/v1/remote-jobs/{id}/cancel"),
            json!({"reason": "no"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = as_worker(
        &app,
        who,
        reqwest::Method::POST,
        &format!("/api/v1/remote-jobs/{id}/heartbeat"),
        Some(json!({"lease_id": lease})),
    )
    .await;
    assert_eq!(
        (status, answer["cancelled"].as_bool()),
        (200, Some(true)),
        "{answer}"
    );
    assert_eq!(
        summary(record(&workers(&app).await, "gpu-c", Some("only"))),
        healthy(0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registry_headers_are_refused_and_the_listing_is_an_admin_endpoint() {
    let mut app = spawn_app_with(&["--worker-api-keys", "wk", "--admin-api-keys", "ak"]).await;
    let long = "x".repeat(101);
    for (header, value) in [
        ("X-Morag-Worker-Instance", long.as_str()),
        ("X-Morag-Worker-Version", long.as_str()),
        ("X-Morag-Worker-Id", "   "),
    ] {
        let response = app
            .client
            .get(app.url("/api/v1/remote-jobs/poll?worker_id=w"))
            .bearer_auth("wk")
            .header("X-Morag-Worker-Id", "w")
            .header(header, value)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if value.trim().is_empty() {
            // An empty header is as good as none.
            assert_eq!(status, 200, "{header}: {body}");
        } else {
            assert_eq!(status, 422, "{header}: {body}");
            assert_eq!(
                body["detail"][0]["loc"],
                json!(["header", header.to_lowercase()])
            );
        }
    }
    app.api_key = Some("wk".into());
    let (status, _) = app.get("/api/v1/workers").await;
    assert!(status == 401 || status == 403, "{status}");
    app.api_key = Some("ak".into());
    let (status, body) = app.get("/api/v1/workers").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workers"][0]["worker_id"], "w");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_workers_as_a_table_and_as_json() {
    let app = spawn_app().await;
    let (status, _) = as_worker(
        &app,
        ("gpu-cli", "life-9"),
        reqwest::Method::GET,
        "/api/v1/remote-jobs/poll?worker_id=gpu-cli&content_types=audio,video",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
            .args(args)
            .args(["--url", &app.base])
            .output()
            .expect("cli runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let table = cli(&["workers"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("WORKER") && lines[0].contains("IN FLIGHT"),
        "{table}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..6],
        ["gpu-cli", "life-9", "healthy", "audio,video", "0", "0"],
        "{table}"
    );
    assert!(table.contains("healthy 1  stale 0"), "{table}");
    let json: Value = serde_json::from_str(&cli(&["workers", "--json"])).unwrap();
    assert_eq!(json["workers"][0]["instance"], "life-9");
    let stats = cli(&["stats"]);
    assert!(
        stats.contains("HEALTHY WORKERS") && stats.contains("video"),
        "{stats}"
    );
}
