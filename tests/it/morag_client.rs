//! MoRAG's own remote-converter client, replayed request by request as it sends them
//! (`tools/remote-converter/remote_converter.py`): python-requests encodes the comma in
//! `content_types` as `%2C`, the download URL is the base plus `source_file_url`, the
//! failure body is `{success, error_message}` and nothing else, and every call carries the
//! worker key, `/health` included. It never heartbeats and never sends a lease.

use serde_json::{json, Value};

use crate::support::spawn_app_with;

#[tokio::test]
async fn morags_remote_converter_requests_work_unchanged() {
    let mut app = spawn_app_with(&["--worker-api-keys", "wk", "--admin-api-keys", "ak"]).await;
    app.api_key = Some("ak".into());
    let ok = app.create("audio").await;
    let failing = app.create("video").await;
    let client = &app.client;
    let worker_get = |url: String| client.get(url).header("Authorization", "Bearer wk");

    let health = worker_get(app.url("/health")).send().await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "the client refuses to start without a 200 here"
    );

    for (expected, success) in [(&ok, true), (&failing, false)] {
        let poll = worker_get(app.url(
            "/api/v1/remote-jobs/poll?worker_id=gpu-box&content_types=audio%2Cvideo&max_jobs=1",
        ))
        .send()
        .await
        .unwrap();
        assert_eq!(poll.status(), 200);
        let job: Value = poll.json().await.unwrap();
        assert_eq!(
            job["job_id"].as_str(),
            Some(expected.as_str()),
            "oldest first: {job}"
        );
        let download = worker_get(format!(
            "{}{}",
            app.base,
            job["source_file_url"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
        assert_eq!(download.status(), 200);
        assert_eq!(download.bytes().await.unwrap().as_ref(), b"source bytes");
        let payload = if success {
            json!({"success": true, "content": "transcript", "metadata": {}, "processing_time": 3.25})
        } else {
            json!({"success": false, "error_message": "Processing exception: ffmpeg missing"})
        };
        let result = client
            .put(app.url(&format!("/api/v1/remote-jobs/{expected}/result")))
            .header("Content-Type", "application/json")
            .header("Authorization", "Bearer wk")
            .body(payload.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200, "the client only checks for 200");
    }
    let idle: Value =
        worker_get(app.url(
            "/api/v1/remote-jobs/poll?worker_id=gpu-box&content_types=audio%2Cvideo&max_jobs=1",
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(idle["job_id"].is_null(), "{idle}");

    let (_, done) = app.get(&format!("/api/v1/remote-jobs/{ok}")).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"]["content"], "transcript");
    assert_eq!(done["result"]["processing_time"], 3.25);
    let (_, failed) = app
        .get(&format!("/api/v1/remote-jobs/{failing}/status"))
        .await;
    assert_eq!(
        failed["status"], "retrying",
        "a failure without `retryable` is retried"
    );
    assert_eq!(
        failed["error_message"],
        "Processing exception: ffmpeg missing"
    );
}
