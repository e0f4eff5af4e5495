//! Idempotent creates over HTTP: a client whose create answer was lost sends it again, with
//! the same `Idempotency-Key` or simply the same ingestion task, and gets the same job.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, TestApp};

const JOBS: &str = "/api/v1/remote-jobs";

struct Answer {
    status: u16,
    body: Value,
    replayed: bool,
}

async fn create(app: &TestApp, body: &Value, key: Option<&str>) -> Answer {
    let mut request = app
        .client
        .request(Method::POST, app.url(&format!("{JOBS}/")))
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        body,
        replayed,
    }
}

async fn job_ids(app: &TestApp) -> Vec<String> {
    let (status, body) = app.get(&format!("{JOBS}?limit=100")).await;
    assert_eq!(status, 200, "{body}");
    body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["job_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_same_create_sent_twice_with_an_idempotency_key_makes_one_job() {
    let app = spawn_app_with(&["--create-match-unfinished", "false"]).await;
    let path = app.source_file("talk.mp3", b"audio");
    let body = json!({"source_file_path": path, "content_type": "audio", "task_options": {"lang": "de"}, "ingestion_task_id": "ingest-k"});

    let first = create(&app, &body, Some("create-ingest-k")).await;
    assert_eq!(
        (first.status, first.replayed),
        (200, false),
        "{}",
        first.body
    );
    // The job moves on; the repeat still gets the original answer.
    app.claim("w1", "audio").await;
    let again = create(&app, &body, Some("create-ingest-k")).await;
    assert_eq!((again.status, again.replayed), (200, true));
    assert_eq!(again.body, first.body);
    assert_eq!(
        job_ids(&app).await,
        vec![first.body["job_id"].as_str().unwrap()]
    );

    // The same key with another request is refused and changes nothing.
    let mut other = body.clone();
    other["task_options"] = json!({"lang": "en"});
    let refused = create(&app, &other, Some("create-ingest-k")).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(
        refused.body["detail"][0]["loc"],
        json!(["header", "Idempotency-Key"])
    );
    assert_eq!(job_ids(&app).await.len(), 1);

    // Without a key (and with matching off) the same request is a second job.
    let unkeyed = create(&app, &body, None).await;
    assert_eq!((unkeyed.status, unkeyed.replayed), (200, false));
    assert_eq!(job_ids(&app).await.len(), 2);

    for bad in ["", &"k".repeat(256), "tab\tkey"] {
        let answer = create(&app, &body, Some(bad)).await;
        assert_eq!(answer.status, 422, "{bad:?}: {}", answer.body);
    }
    assert_eq!(job_ids(&app).await.len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn the_same_create_sent_twice_for_an_unfinished_ingestion_task_makes_one_job() {
    let app = spawn_app().await;
    let path = app.source_file("report.pdf", b"pdf");
    let body = json!({"source_file_path": path, "content_type": "document", "ingestion_task_id": "ingest-t"});

    let first = create(&app, &body, None).await;
    assert_eq!(
        (first.status, first.replayed),
        (200, false),
        "{}",
        first.body
    );
    let id = first.body["job_id"].as_str().unwrap().to_owned();
    let again = create(&app, &body, None).await;
    assert_eq!((again.status, again.replayed), (200, true));
    assert_eq!(again.body["job_id"], id.as_str());

    // While it is processing it is still the same job, answered with its status.
    let (claimed, lease) = app.claim("w1", "document").await;
    assert_eq!(claimed, id);
    let during = create(&app, &body, None).await;
    assert_eq!(during.body["job_id"], id.as_str());
    assert_eq!(during.body["status"], "processing");
    assert_eq!(job_ids(&app).await, vec![id.clone()]);

    // Once it finished, the same request is new work.
    let (status, _) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 200);
    let after = create(&app, &body, None).await;
    assert_eq!((after.status, after.replayed), (200, false));
    assert_ne!(after.body["job_id"], id.as_str());
    assert_eq!(job_ids(&app).await.len(), 2);
    app.stop().await;
}
