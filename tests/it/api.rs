//! The HTTP surface against the running server: every endpoint of MoRAG's wire protocol
//! and of the admin API, the API keys, and bad input, which must always get a 4xx JSON
//! answer and never a 500. Similar requests go through one `check` funnel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use morag_jobs::clock::Clock as _;
use reqwest::header::{
    HeaderMap, AUTHORIZATION, CONTENT_DISPOSITION, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, step, TestApp};

const JOBS: &str = "/api/v1/remote-jobs";

/// The fields of MoRAG's `JobStatusResponse`, exactly.
const STATUS_FIELDS: [&str; 9] = [
    "job_id",
    "status",
    "worker_id",
    "created_at",
    "started_at",
    "completed_at",
    "error_message",
    "retry_count",
    "estimated_completion",
];

// ---------------------------------------------------------------------------------------
// The funnel: one request, what it must get back, and a checker that runs a whole table.

enum Body {
    None,
    Json(Value),
    /// Sent as-is with `Content-Type: application/json`.
    Raw(String),
}

enum Auth {
    /// Whatever `app.api_key` says.
    App,
    /// No `Authorization` header at all.
    Nothing,
    /// This exact `Authorization` header value.
    Header(String),
}

struct Case {
    method: Method,
    path: String,
    body: Body,
    auth: Auth,
    status: u16,
    detail: Option<Value>,
    loc: Option<Vec<String>>,
    current_status: Option<&'static str>,
}

fn case(method: Method, path: impl Into<String>) -> Case {
    Case {
        method,
        path: path.into(),
        body: Body::None,
        auth: Auth::App,
        status: 200,
        detail: None,
        loc: None,
        current_status: None,
    }
}

fn get(path: impl Into<String>) -> Case {
    case(Method::GET, path)
}

fn post(path: impl Into<String>) -> Case {
    case(Method::POST, path)
}

fn put(path: impl Into<String>) -> Case {
    case(Method::PUT, path)
}

impl Case {
    fn json(mut self, body: Value) -> Self {
        self.body = Body::Json(body);
        self
    }

    fn raw(mut self, body: impl Into<String>) -> Self {
        self.body = Body::Raw(body.into());
        self
    }

    fn no_key(mut self) -> Self {
        self.auth = Auth::Nothing;
        self
    }

    fn bearer(mut self, key: &str) -> Self {
        self.auth = Auth::Header(format!("Bearer {key}"));
        self
    }

    fn authorization(mut self, value: &str) -> Self {
        self.auth = Auth::Header(value.to_owned());
        self
    }

    fn expect(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// The exact `detail` of the error body.
    fn detail(mut self, detail: impl Into<Value>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// A 422 whose first error names this location, e.g. `["body", "content_type"]`.
    fn invalid(mut self, loc: &[&str]) -> Self {
        self.status = 422;
        self.loc = Some(loc.iter().map(|s| s.to_string()).collect());
        self
    }

    /// A 409 that names the job's current status.
    fn conflict(mut self, current: &'static str) -> Self {
        self.status = 409;
        self.current_status = Some(current);
        self
    }

    fn describe(&self) -> String {
        let body = match &self.body {
            Body::None => String::new(),
            Body::Json(value) => format!(" {}", truncated(&value.to_string())),
            Body::Raw(text) => format!(" raw {:?}", truncated(text)),
        };
        let auth = match &self.auth {
            Auth::App => String::new(),
            Auth::Nothing => " [no key]".into(),
            Auth::Header(value) => format!(" [Authorization: {value}]"),
        };
        format!("{} {}{}{}", self.method, self.path, body, auth)
    }
}

fn truncated(text: &str) -> String {
    if text.chars().count() > 120 {
        format!("{}...", text.chars().take(120).collect::<String>())
    } else {
        text.to_owned()
    }
}

/// A response with everything a test may look at.
struct Reply {
    status: u16,
    headers: HeaderMap,
    bytes: Vec<u8>,
    json: Value,
}

impl Reply {
    fn header(&self, name: reqwest::header::HeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn send(app: &TestApp, method: Method, path: &str, body: &Body, auth: &Auth) -> Reply {
    let mut request = app.client.request(method, app.url(path));
    match auth {
        Auth::App => {
            if let Some(key) = &app.api_key {
                request = request.bearer_auth(key);
            }
        }
        Auth::Nothing => {}
        Auth::Header(value) => request = request.header(AUTHORIZATION, value),
    }
    match body {
        Body::None => {}
        Body::Json(value) => request = request.json(value),
        Body::Raw(text) => {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(text.clone())
        }
    }
    let response = request.send().await.expect("request reaches the server");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body").to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        bytes,
        json,
    }
}

/// Runs every case in order and reports all mismatches at once. Beyond the status, every
/// error must be JSON with a `detail`; a 422 must be in FastAPI's list format, a 401 must
/// ask for a bearer token, and a 409 must name the job's current status.
async fn check(app: &TestApp, cases: Vec<Case>) {
    let n_cases = cases.len();
    let mut failures = Vec::new();
    for case in &cases {
        let reply = send(app, case.method.clone(), &case.path, &case.body, &case.auth).await;
        let mut problems = Vec::new();
        if reply.status != case.status {
            problems.push(format!(
                "status {} (expected {})",
                reply.status, case.status
            ));
        }
        if reply.status >= 400 {
            if !reply.header(CONTENT_TYPE).starts_with("application/json") {
                problems.push(format!(
                    "error Content-Type {:?} is not JSON",
                    reply.header(CONTENT_TYPE)
                ));
            }
            if reply.json.get("detail").is_none() {
                problems.push("error body has no detail".into());
            }
        }
        if reply.status == 422 {
            let first = &reply.json["detail"][0];
            if !first["loc"].is_array() || !first["msg"].is_string() {
                problems.push("422 detail is not a list of {loc, msg}".into());
            }
        }
        if reply.status == 401 && reply.header(WWW_AUTHENTICATE) != "Bearer" {
            problems.push("401 without WWW-Authenticate: Bearer".into());
        }
        if let Some(detail) = &case.detail {
            if reply.json["detail"] != *detail {
                problems.push(format!("detail is not {detail}"));
            }
        }
        if let Some(loc) = &case.loc {
            if reply.json["detail"][0]["loc"] != json!(loc) {
                problems.push(format!("loc is not {loc:?}"));
            }
        }
        if let Some(current) = case.current_status {
            if reply.json["current_status"] != current {
                problems.push(format!("current_status is not {current:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}\n    {}\n    got: {}",
                case.describe(),
                problems.join("; "),
                truncated(&String::from_utf8_lossy(&reply.bytes))
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n_cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Small helpers on top of `support`.

fn job(id: &str, rest: &str) -> String {
    format!("{JOBS}/{id}{rest}")
}

fn random_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The manual clock's time `secs` from now, as the server writes timestamps.
fn at(app: &TestApp, secs: u64) -> String {
    app.clock.now().plus(Duration::from_secs(secs)).to_rfc3339()
}

fn is_uuid(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
}

fn keys_of(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

async fn create_from(app: &TestApp, path: &str, content_type: &str) -> String {
    let (status, body) = app
        .post(
            &format!("{JOBS}/"),
            json!({"source_file_path": path, "content_type": content_type, "ingestion_task_id": "ingest-1"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["job_id"].as_str().expect("job_id").to_owned()
}

async fn status_view(app: &TestApp, id: &str) -> Value {
    let (status, body) = app.get(&job(id, "/status")).await;
    assert_eq!(status, 200, "{body}");
    body
}

// ---------------------------------------------------------------------------------------
// Create.

#[tokio::test]
async fn create_answers_200_with_morags_fields_with_and_without_trailing_slash() {
    let app = spawn_app().await;
    let path = app.source_file("talk.mp3", b"audio");
    for url in [format!("{JOBS}/"), JOBS.to_owned()] {
        let (status, body) = app
            .post(
                &url,
                json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "ingest-7"}),
            )
            .await;
        assert_eq!(status, 200, "{url}: {body}");
        assert_eq!(
            keys_of(&body),
            ["created_at", "job_id", "status"].map(String::from).into(),
            "{body}"
        );
        assert!(is_uuid(&body["job_id"]), "{body}");
        assert_eq!(body["status"], "pending");
        assert_eq!(body["created_at"], at(&app, 0));

        let detail = app.detail(body["job_id"].as_str().unwrap()).await;
        assert_eq!(
            detail["task_options"],
            json!({}),
            "absent task_options means {{}}"
        );
        assert_eq!(detail["ingestion_task_id"], "ingest-7");
        assert_eq!(detail["content_type"], "audio");
        assert_eq!(
            detail["source_file_path"],
            std::fs::canonicalize(&path).unwrap().to_str().unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Poll.

#[tokio::test]
async fn poll_answers_200_with_null_fields_when_nothing_is_due() {
    let app = spawn_app().await;
    let video = app.create("video").await;
    for types in ["audio", "audio,image", ""] {
        let body = if types.is_empty() {
            // Claim the only job first, so that nothing at all is due.
            app.claim("w1", "video").await;
            app.poll("w1", "").await
        } else {
            app.poll("w1", types).await
        };
        assert_eq!(
            body,
            json!({"job_id": null, "source_file_url": null, "content_type": null, "task_options": null}),
            "content_types={types}"
        );
    }
    assert_eq!(app.status_of(&video).await, "processing");
}

#[tokio::test]
async fn poll_hands_out_the_oldest_job_of_the_requested_types_with_its_lease() {
    let app = spawn_app_with(&["--heartbeat-timeout", "90"]).await;
    let audio_1 = app.create("audio").await;
    app.advance(1);
    let video = app.create("video").await;
    app.advance(1);
    let audio_2 = app.create("audio").await;
    let image = app.create("image").await;

    // The type list is split on commas and trimmed; types not asked for are left alone.
    let body = app.poll("w1", "%20video%20,%20web%20").await;
    assert_eq!(body["job_id"], video.as_str(), "{body}");
    assert_eq!(body["content_type"], "video");
    assert_eq!(body["source_file_url"], job(&video, "/download"));
    assert_eq!(body["task_options"], json!({"lang": "en"}));
    assert!(is_uuid(&body["lease_id"]), "{body}");
    assert_eq!(body["attempt"], 1);
    assert_eq!(
        body["execution_deadline"],
        at(&app, 3600),
        "video's timeout"
    );
    assert_eq!(body["heartbeat_timeout_seconds"], 90);
    assert_eq!(body["heartbeat_interval_seconds"], 30);

    let body = app.poll("w2", "audio").await;
    assert_eq!(
        body["job_id"],
        audio_1.as_str(),
        "oldest audio first: {body}"
    );
    assert_eq!(
        body["execution_deadline"],
        at(&app, 1800),
        "audio's timeout"
    );
    let body = app.poll("w2", "image,audio").await;
    assert_eq!(
        body["job_id"],
        audio_2.as_str(),
        "created before the image job: {body}"
    );
    // No type list means any type.
    let body = app.poll("w3", "").await;
    assert_eq!(body["job_id"], image.as_str(), "{body}");
    assert_eq!(app.poll("w3", "").await["job_id"], Value::Null);

    let status = status_view(&app, &audio_1).await;
    assert_eq!(status["worker_id"], "w2");
    assert_eq!(status["status"], "processing");
}

#[tokio::test]
async fn poll_claims_one_job_whatever_max_jobs_asks_for() {
    let app = spawn_app().await;
    let first = app.create("audio").await;
    let second = app.create("audio").await;
    let (status, body) = app
        .get(&format!(
            "{JOBS}/poll?worker_id=w&content_types=audio&max_jobs=2"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["job_id"], first.as_str());
    // The prototype claimed both and returned one, stranding the other in processing.
    assert_eq!(app.status_of(&second).await, "pending");
    check(
        &app,
        ["0", "101", "-1", "abc", "1.5", ""]
            .into_iter()
            .map(|n| {
                get(format!("{JOBS}/poll?worker_id=w&max_jobs={n}")).invalid(&["query", "max_jobs"])
            })
            .collect(),
    )
    .await;
    assert_eq!(
        app.status_of(&second).await,
        "pending",
        "a refused poll claims nothing"
    );
}

#[tokio::test]
async fn long_poll_returns_as_soon_as_a_job_is_created() {
    let app = spawn_app().await;
    let client = app.client.clone();
    let url = app.url(&format!(
        "{JOBS}/poll?worker_id=w&content_types=audio&wait=30"
    ));
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        let response = client
            .get(url)
            .send()
            .await
            .expect("poll reaches the server");
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().await.expect("JSON"),
            started.elapsed(),
        )
    });
    // Only lets the poll reach the server and park; if it has not yet, the job is found
    // on its first look and the test still passes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !poll.is_finished(),
        "a poll with wait=30 answered before any job existed"
    );

    let id = app.create("audio").await;
    let (status, body, elapsed) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll returns well before its 30 s")
        .expect("poll task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["job_id"], id.as_str(), "{body}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

// ---------------------------------------------------------------------------------------
// Download.

#[tokio::test]
async fn download_serves_the_bytes_only_while_the_job_is_processing() {
    let app = spawn_app().await;
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let path = app.source_file("my talk.mp3", &content);
    let id = create_from(&app, &path, "audio").await;
    let download = job(&id, "/download");

    check(&app, vec![get(&download).expect(403)]).await;
    let (_, lease) = app.claim("w", "audio").await;

    for query in [String::new(), format!("?lease_id={lease}")] {
        let reply = send(
            &app,
            Method::GET,
            &format!("{download}{query}"),
            &Body::None,
            &Auth::App,
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.bytes)
        );
        assert!(
            reply.bytes == content,
            "the served bytes differ from the file"
        );
        assert_eq!(reply.header(CONTENT_TYPE), "application/octet-stream");
        assert_eq!(
            reply.header(CONTENT_DISPOSITION),
            "attachment; filename=\"my_talk.mp3\""
        );
    }
    let unknown = random_uuid();
    check(
        &app,
        vec![
            get(format!("{download}?lease_id={}", random_uuid())).conflict("processing"),
            get(format!("{download}?lease_id=nope")).invalid(&["query", "lease_id"]),
            get(job(&unknown, "/download"))
                .expect(404)
                .detail(format!("Job {unknown} not found")),
        ],
    )
    .await;

    // A file that disappeared, or was swapped for a link out of the roots, is not served.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"secret").unwrap();
    std::fs::remove_file(&path).unwrap();
    check(&app, vec![get(&download).expect(404)]).await;
    std::os::unix::fs::symlink(&secret, &path).unwrap();
    check(&app, vec![get(&download).expect(404)]).await;

    let (status, body) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 200, "{body}");
    check(&app, vec![get(&download).expect(403)]).await;
}

// ---------------------------------------------------------------------------------------
// Heartbeat.

#[tokio::test]
async fn heartbeats_move_the_deadline_report_cancels_and_refuse_stale_leases() {
    let app = spawn_app_with(&["--heartbeat-timeout", "60", "--retry-backoff-base", "10"]).await;
    let id = app.create("audio").await;
    let (_, lease) = app.claim("w1", "audio").await;
    app.advance(5);
    let (status, body) = app
        .post(
            &job(&id, "/heartbeat"),
            json!({"lease_id": lease, "progress": 42.5, "message": "transcribing"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "processing");
    assert_eq!(body["cancelled"], false);
    assert_eq!(body["heartbeat_deadline"], at(&app, 60));
    assert_eq!(body["execution_deadline"], at(&app, 1800 - 5));
    let detail = app.detail(&id).await;
    assert_eq!(detail["progress"], 42.5);
    assert_eq!(detail["progress_message"], "transcribing");
    assert_eq!(detail["last_heartbeat_at"], at(&app, 0));

    let hb = job(&id, "/heartbeat");
    check(
        &app,
        vec![
            post(&hb)
                .json(json!({"lease_id": "nope"}))
                .invalid(&["body", "lease_id"]),
            post(&hb).json(json!({})).invalid(&["body", "lease_id"]),
            // A wrong type is refused without naming its value as the field.
            post(&hb).json(json!({"lease_id": 5})).invalid(&["body"]),
            post(&hb)
                .json(json!({"lease_id": lease, "progress": 101}))
                .invalid(&["body", "progress"]),
            post(&hb)
                .json(json!({"lease_id": lease, "progress": -1}))
                .invalid(&["body", "progress"]),
            post(&hb)
                .json(json!({"lease_id": lease, "progress": "half"}))
                .invalid(&["body"]),
            post(&hb)
                .json(json!({"lease_id": lease, "message": "m".repeat(1001)}))
                .invalid(&["body", "message"]),
            post(&hb).invalid(&["body"]),
            post(&hb)
                .json(json!({"lease_id": random_uuid()}))
                .conflict("processing"),
        ],
    )
    .await;

    // The attempt times out without heartbeats and another worker gets the job: the first
    // worker's lease is stale from then on.
    app.advance(61);
    app.monitor().rescue_once().await.unwrap();
    assert_eq!(app.status_of(&id).await, "retrying");
    check(
        &app,
        vec![post(&hb)
            .json(json!({"lease_id": lease}))
            .conflict("retrying")],
    )
    .await;
    app.advance(10);
    let (_, new_lease) = app.claim("w2", "audio").await;
    assert_ne!(new_lease, lease);
    check(
        &app,
        vec![
            post(&hb)
                .json(json!({"lease_id": lease}))
                .conflict("processing"),
            put(job(&id, "/result"))
                .json(json!({"success": true, "content": "stale", "lease_id": lease}))
                .conflict("processing"),
            post(&hb).json(json!({"lease_id": new_lease})),
        ],
    )
    .await;

    // An admin cancels: the current worker learns it from its next heartbeat.
    let (status, body) = app
        .post(&job(&id, "/cancel"), json!({"reason": "not needed"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.heartbeat(&id, &new_lease).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cancelled"], true);
    assert_eq!(body["status"], "cancelled");
    let (status, body) = app.succeed(&id, Some(&new_lease)).await;
    assert_eq!(
        (status, &body["current_status"]),
        (409, &json!("cancelled")),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------
// Result.

#[tokio::test]
async fn results_are_accepted_once_and_only_for_claimed_jobs() {
    let app = spawn_app().await;
    let id = app.create("document").await;
    let result = job(&id, "/result");
    let morag_success = json!({"success": true, "content": "# Title", "metadata": {"pages": 3}, "processing_time": 2.5});
    check(
        &app,
        vec![put(&result).json(morag_success.clone()).conflict("pending")],
    )
    .await;

    app.claim("w", "document").await;
    check(
        &app,
        vec![
            put(&result)
                .json(json!({"content": "x"}))
                .invalid(&["body", "success"]),
            put(&result)
                .json(json!({"success": "yes"}))
                .invalid(&["body"]),
            put(&result)
                .json(json!({"success": true, "metadata": [1]}))
                .invalid(&["body"]),
            put(&result)
                .json(json!({"success": true, "processing_time": -1}))
                .invalid(&["body", "processing_time"]),
            put(&result)
                .json(json!({"success": true, "lease_id": "x"}))
                .invalid(&["body", "lease_id"]),
            put(&result)
                .json(json!({"success": true, "lease_id": random_uuid()}))
                .conflict("processing"),
            // MoRAG's client sends no lease.
            put(&result).json(morag_success.clone()),
            put(&result)
                .json(morag_success.clone())
                .conflict("completed"),
            put(&result)
                .json(json!({"success": false, "error_message": "late failure"}))
                .conflict("completed"),
        ],
    )
    .await;
    let detail = app.detail(&id).await;
    assert_eq!(
        detail["status"], "completed",
        "a second result changes nothing"
    );
    assert_eq!(detail["result"]["content"], "# Title");
    assert_eq!(detail["result"]["metadata"], json!({"pages": 3}));
    assert_eq!(detail["result"]["processing_time"], 2.5);
    assert_eq!(detail["error_message"], Value::Null);

    let unknown = random_uuid();
    check(
        &app,
        vec![put(job(&unknown, "/result"))
            .json(morag_success)
            .expect(404)
            .detail(format!("Job {unknown} not found"))],
    )
    .await;
}

#[tokio::test]
async fn failures_are_retried_unless_marked_not_retryable() {
    let app = spawn_app().await;
    let retried = app.create("audio").await;
    app.claim("w", "audio").await;
    // MoRAG's failure body: success false and a message, nothing else.
    let (status, body) = app
        .put(
            &job(&retried, "/result"),
            json!({"success": false, "error_message": "ffmpeg died"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"status": "retrying", "ingestion_continued": false})
    );
    let view = status_view(&app, &retried).await;
    assert_eq!(view["retry_count"], 1);
    assert_eq!(view["error_message"], "ffmpeg died");
    assert_eq!(view["completed_at"], Value::Null);

    let final_job = app.create("audio").await;
    app.advance(3600);
    app.monitor().rescue_once().await.unwrap();
    // Jobs are handed out in the order they became claimable: the new job at once, the
    // failed one only after its backoff.
    let (claimed, final_lease) = app.claim("w", "audio").await;
    assert_eq!(claimed, final_job);
    let (claimed, _) = app.claim("w", "audio").await;
    assert_eq!(claimed, retried);
    let (status, body) = app.fail(&final_job, Some(&final_lease), false).await;
    assert_eq!(status, 200, "{body}");
    // No sink is configured (tests/it/delivery.rs configures them): the outcome is
    // only stored.
    assert_eq!(
        body,
        json!({"status": "failed", "ingestion_continued": false})
    );
    let view = status_view(&app, &final_job).await;
    assert_eq!(view["status"], "failed");
    assert_eq!(view["retry_count"], 0);
    assert_eq!(view["completed_at"], at(&app, 0));
    assert_eq!(view["error_message"], "converter crashed");
    assert_eq!(
        app.poll("w", "audio").await["job_id"],
        Value::Null,
        "a final failure is not retried"
    );
}

// ---------------------------------------------------------------------------------------
// Status, detail, health.

#[tokio::test]
async fn status_has_exactly_morags_fields_through_the_lifecycle() {
    let app = spawn_app().await;
    let id = app.create("image").await;
    let created = at(&app, 0);
    let pending = status_view(&app, &id).await;
    assert_eq!(
        keys_of(&pending),
        STATUS_FIELDS.map(String::from).into(),
        "{pending}"
    );
    assert_eq!(
        pending,
        json!({"job_id": id, "status": "pending", "worker_id": null, "created_at": created,
               "started_at": null, "completed_at": null, "error_message": null, "retry_count": 0,
               "estimated_completion": null})
    );

    app.advance(10);
    app.claim("gpu-1", "image").await;
    let processing = status_view(&app, &id).await;
    assert_eq!(processing["status"], "processing");
    assert_eq!(processing["worker_id"], "gpu-1");
    assert_eq!(processing["started_at"], at(&app, 0));
    assert_eq!(
        processing["estimated_completion"],
        at(&app, 300),
        "image's execution deadline"
    );

    app.advance(20);
    let (status, body) = app.succeed(&id, None).await;
    assert_eq!(status, 200, "{body}");
    // No sink is configured: the outcome is only stored.
    assert_eq!(
        body,
        json!({"status": "completed", "ingestion_continued": false})
    );
    let completed = status_view(&app, &id).await;
    assert_eq!(
        keys_of(&completed),
        STATUS_FIELDS.map(String::from).into(),
        "no result content: {completed}"
    );
    assert_eq!(completed["completed_at"], at(&app, 0));
    assert_eq!(completed["estimated_completion"], Value::Null);
}

#[tokio::test]
async fn detail_shows_the_job_its_result_and_its_history() {
    let app = spawn_app().await;
    let id = app.create("web").await;
    let (_, lease) = app.claim("w", "web").await;
    let (status, _) = app.heartbeat(&id, &lease).await;
    assert_eq!(status, 200);
    app.succeed(&id, Some(&lease)).await;

    let detail = app.detail(&id).await;
    assert_eq!(detail["job_id"], id.as_str());
    assert_eq!(detail["content_type"], "web");
    assert_eq!(detail["task_options"], json!({"lang": "en"}));
    assert_eq!(detail["ingestion_task_id"], "ingest-1");
    assert_eq!(detail["attempt"], 1);
    assert_eq!(detail["worker_id"], "w");
    assert_eq!(detail["progress"], 100.0);
    assert_eq!(
        detail["result"],
        json!({"content": "converted text", "metadata": {"pages": 1}, "processing_time": 0.5})
    );
    assert_eq!(
        app.history(&id).await,
        vec![
            step("-", "pending", "client"),
            step("pending", "processing", "worker"),
            step("processing", "completed", "worker"),
        ]
    );
    assert!(detail["history"][1]["reason"]
        .as_str()
        .unwrap()
        .contains("worker w"));
}

#[tokio::test]
async fn health_answers_200_while_the_store_answers() {
    let app = spawn_app().await;
    let (status, body) = app.get("/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["timestamp"], at(&app, 0));
}

// ---------------------------------------------------------------------------------------
// Cancel and retry.

#[tokio::test]
async fn cancel_and_retry_answer_409_with_the_current_status_when_not_allowed() {
    let app = spawn_app_with(&["--max-retries", "0"]).await;
    let processing = app.create("audio").await;
    let failed = app.create("video").await;
    app.claim("w", "audio").await;
    let (_, failed_lease) = app.claim("w", "video").await;
    let pending = app.create("audio").await;
    app.fail(&failed, Some(&failed_lease), true).await;
    assert_eq!(app.status_of(&failed).await, "failed", "no retries left");

    let unknown = random_uuid();
    check(
        &app,
        vec![
            post(job(&pending, "/retry")).conflict("pending"),
            post(job(&processing, "/retry")).conflict("processing"),
            post(job(&unknown, "/retry"))
                .expect(404)
                .detail(format!("Job {unknown} not found")),
            post(job(&unknown, "/cancel"))
                .expect(404)
                .detail(format!("Job {unknown} not found")),
            post(job(&pending, "/cancel"))
                .raw("{not json")
                .invalid(&["body"]),
            // The body is optional.
            post(job(&pending, "/cancel")),
            post(job(&pending, "/cancel")).conflict("cancelled"),
            post(job(&pending, "/retry")).conflict("cancelled"),
            post(job(&processing, "/cancel")).json(json!({"reason": "duplicate upload"})),
            post(job(&failed, "/retry")),
            post(job(&failed, "/retry")).conflict("retrying"),
        ],
    )
    .await;
    let history = app.detail(&processing).await["history"].clone();
    let last = history.as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["to"].as_str(), last["actor"].as_str()),
        (Some("cancelled"), Some("admin"))
    );
    assert_eq!(last["reason"], "duplicate upload");

    let view = status_view(&app, &failed).await;
    assert_eq!(
        (view["status"].as_str(), &view["retry_count"]),
        (Some("retrying"), &json!(0))
    );
    let (claimed, _) = app.claim("w2", "video").await;
    assert_eq!(claimed, failed, "a manual retry is claimable at once");
}

// ---------------------------------------------------------------------------------------
// Statistics, cleanup, listing.

#[tokio::test]
async fn statistics_count_jobs_by_status_and_type_with_processing_times() {
    let app = spawn_app().await;
    let empty = app.get(&format!("{JOBS}/statistics")).await.1;
    assert_eq!(empty["total_jobs"], 0, "{empty}");

    let audio_fast = app.create("audio").await;
    let audio_slow = app.create("audio").await;
    let video_failed = app.create("video").await;
    let _video_pending = app.create("video").await;
    let audio_cancelled = app.create("audio").await;
    let (_, lease_fast) = app.claim("w", "audio").await;
    let (_, lease_slow) = app.claim("w", "audio").await;
    app.advance(20);
    app.succeed(&audio_fast, Some(&lease_fast)).await;
    app.advance(20);
    app.succeed(&audio_slow, Some(&lease_slow)).await;
    let (_, lease_video) = app.claim("w", "video").await;
    app.fail(&video_failed, Some(&lease_video), false).await;
    app.post(&job(&audio_cancelled, "/cancel"), json!({})).await;

    let (status, stats) = app.get(&format!("{JOBS}/statistics")).await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        keys_of(&stats),
        [
            "avg_processing_times",
            "cleanup",
            "content_type_counts",
            "deliveries",
            "recent_jobs_24h",
            "status_counts",
            "storage_size_mb",
            "timestamp",
            "total_jobs",
            "workers"
        ]
        .map(String::from)
        .into()
    );
    // Worker "w" polled last for video: one healthy worker, of that type.
    assert_eq!(
        stats["workers"],
        json!({"healthy": 1, "stale": 0, "healthy_by_content_type": {"video": 1}})
    );
    assert_eq!(
        stats["status_counts"],
        json!({"pending": 1, "processing": 0, "completed": 2, "failed": 1, "timeout": 0,
               "cancelled": 1, "retrying": 0})
    );
    assert_eq!(
        stats["content_type_counts"],
        json!({"audio": 3, "video": 2})
    );
    assert_eq!(stats["total_jobs"], 5);
    assert_eq!(stats["recent_jobs_24h"], 5);
    // Seconds from claim to completion, measured by the server: 20 and 40.
    assert_eq!(stats["avg_processing_times"], json!({"audio": 30.0}));
    assert!(
        stats["storage_size_mb"]
            .as_f64()
            .is_some_and(|mb| mb >= 0.0),
        "{stats}"
    );
    assert_eq!(stats["timestamp"], at(&app, 0));

    app.advance(25 * 3600);
    app.create("image").await;
    let stats = app.get(&format!("{JOBS}/statistics")).await.1;
    assert_eq!(stats["recent_jobs_24h"], 1, "{stats}");
    assert_eq!(stats["total_jobs"], 6);
}

#[tokio::test]
async fn cleanup_deletes_old_finished_jobs_and_the_files_only_they_used() {
    let app = spawn_app().await;
    let completed = app.create("audio").await;
    let (_, lease) = app.claim("w", "audio").await;
    app.succeed(&completed, Some(&lease)).await;
    let failed = app.create("video").await;
    let (_, lease) = app.claim("w", "video").await;
    app.fail(&failed, Some(&lease), false).await;
    let pending = app.create("image").await;
    // Two jobs on one file: the file stays while one of them remains.
    let shared_file = app.source_file("shared.pdf", b"pdf");
    let shared_done = create_from(&app, &shared_file, "document").await;
    let shared_pending = create_from(&app, &shared_file, "spreadsheet").await;
    app.post(&job(&shared_done, "/cancel"), json!({})).await;

    let file_of = |detail: Value| detail["source_file_path"].as_str().unwrap().to_owned();
    let completed_file = file_of(app.detail(&completed).await);
    let failed_file = file_of(app.detail(&failed).await);
    let pending_file = file_of(app.detail(&pending).await);

    app.advance(2 * 86_400);
    let (status, body) = app
        .post(&format!("{JOBS}/cleanup?days_old=3"), json!(null))
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"cleaned_jobs": 0, "days_old": 3}))
    );
    let (status, body) = app
        .post(&format!("{JOBS}/cleanup?days_old=1"), json!(null))
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"cleaned_jobs": 3, "days_old": 1}))
    );

    for gone in [&completed, &failed, &shared_done] {
        let (status, _) = app.get(&job(gone, "/status")).await;
        assert_eq!(status, 404, "{gone} was cleaned up");
    }
    for kept in [&pending, &shared_pending] {
        app.status_of(kept).await;
    }
    assert!(!std::path::Path::new(&completed_file).exists());
    assert!(!std::path::Path::new(&failed_file).exists());
    assert!(std::path::Path::new(&pending_file).exists());
    assert!(std::path::Path::new(&shared_file).exists());
    assert_eq!(
        app.get(&format!("{JOBS}/statistics")).await.1["total_jobs"],
        2
    );

    let (status, body) = app.post(&format!("{JOBS}/cleanup"), json!(null)).await;
    assert_eq!(
        (status, body),
        (200, json!({"cleaned_jobs": 0, "days_old": 7}))
    );
}

#[tokio::test]
async fn listing_pages_through_every_job_once_newest_first_with_filters() {
    let app = spawn_app().await;
    let mut created = Vec::new();
    for content_type in [
        "audio", "video", "audio", "audio", "video", "audio", "audio",
    ] {
        created.push(app.create(content_type).await);
    }
    let (claimed, _) = app.claim("w", "audio").await;
    assert_eq!(claimed, created[0]);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut n_pages = 0;
    loop {
        let query = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".into(),
        };
        let (status, page) = app.get(&format!("{JOBS}{query}")).await;
        assert_eq!(status, 200, "{page}");
        n_pages += 1;
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 3);
        seen.extend(
            jobs.iter()
                .map(|j| j["job_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(n_pages < 10, "paging does not end");
    }
    assert_eq!(n_pages, 3);
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first, "every job once, newest first");

    let ids = |page: Value| -> Vec<String> {
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, page) = app
        .get(&format!("{JOBS}/?status=pending&content_type=audio"))
        .await;
    assert_eq!(
        ids(page.clone()),
        vec![
            created[6].clone(),
            created[5].clone(),
            created[3].clone(),
            created[2].clone()
        ]
    );
    assert_eq!(page["next_cursor"], Value::Null);
    let first = &page["jobs"][0];
    for field in STATUS_FIELDS
        .iter()
        .chain(&["content_type", "ingestion_task_id", "attempt"])
    {
        assert!(
            first.get(*field).is_some(),
            "listing lacks {field}: {first}"
        );
    }
    let (_, page) = app.get(&format!("{JOBS}?status=processing")).await;
    assert_eq!(ids(page), vec![created[0].clone()]);
    let (_, page) = app.get(&format!("{JOBS}?content_type=video&limit=1")).await;
    assert_eq!(ids(page.clone()), vec![created[4].clone()]);
    let (_, page) = app
        .get(&format!(
            "{JOBS}?content_type=video&limit=1&cursor={}",
            page["next_cursor"].as_str().unwrap()
        ))
        .await;
    assert_eq!(ids(page.clone()), vec![created[1].clone()]);
    assert_eq!(page["next_cursor"], Value::Null);
    let (_, page) = app.get(&format!("{JOBS}?status=timeout")).await;
    assert_eq!(page, json!({"jobs": [], "next_cursor": null}));
}

// ---------------------------------------------------------------------------------------
// API keys.

#[tokio::test]
async fn api_keys_separate_workers_from_admins_and_health_stays_open() {
    let mut app = spawn_app_with(&["--worker-api-keys", "wk", "--admin-api-keys", "ak"]).await;
    app.api_key = Some("ak".into());
    let worker_job = app.create("audio").await;
    let admin_job = app.create("audio").await;
    let id = &worker_job;
    let unauthorized = |c: Case| c.expect(401).detail("Invalid or missing API key");

    let every_endpoint = || {
        vec![
            post(format!("{JOBS}/")).json(json!({})),
            post(JOBS).json(json!({})),
            get(JOBS),
            get(format!("{JOBS}/poll?worker_id=w")),
            get(format!("{JOBS}/statistics")),
            post(format!("{JOBS}/cleanup")),
            get(job(id, "")),
            get(job(id, "/status")),
            post(job(id, "/cancel")),
            post(job(id, "/retry")),
            post(job(id, "/heartbeat")).json(json!({"lease_id": random_uuid()})),
            post(job(id, "/release")).json(json!({"lease_id": random_uuid()})),
            put(job(id, "/result")).json(json!({"success": true})),
            get(job(id, "/download")),
        ]
    };
    let mut cases: Vec<Case> = every_endpoint()
        .into_iter()
        .map(|c| unauthorized(c.no_key()))
        .collect();
    cases.extend(
        every_endpoint()
            .into_iter()
            .map(|c| unauthorized(c.bearer("nope"))),
    );
    cases.extend([
        unauthorized(get(JOBS).authorization("ak")),
        unauthorized(get(JOBS).authorization("Basic ak")),
        unauthorized(get(JOBS).authorization("Bearer ")),
        unauthorized(get(JOBS).bearer("akak")),
        get("/health").no_key(),
        get("/health").bearer("nope"),
    ]);
    // Worker keys reach none of the admin endpoints, even with good input.
    let path = app.source_file("w.mp3", b"x");
    cases.extend(
        [
            post(format!("{JOBS}/"))
                .json(json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "i"})),
            get(JOBS),
            get(format!("{JOBS}/statistics")),
            post(format!("{JOBS}/cleanup?days_old=1")),
            get(job(id, "")),
            get(job(id, "/status")),
            post(job(id, "/cancel")),
            post(job(id, "/retry")),
        ]
        .into_iter()
        .map(|c| unauthorized(c.bearer("wk"))),
    );
    check(&app, cases).await;
    assert_eq!(
        app.status_of(id).await,
        "pending",
        "nothing above changed the job"
    );
    assert_eq!(
        app.get(&format!("{JOBS}/statistics")).await.1["total_jobs"],
        2
    );

    // A worker runs the whole protocol with its key.
    app.api_key = Some("wk".into());
    let (claimed, lease) = app.claim("w", "audio").await;
    assert_eq!(&claimed, id);
    check(
        &app,
        vec![
            post(job(id, "/heartbeat")).json(json!({"lease_id": lease})),
            get(job(id, "/download")),
            put(job(id, "/result")).json(json!({"success": true, "content": "text"})),
        ],
    )
    .await;

    // An admin may do everything, the worker endpoints included.
    app.api_key = Some("ak".into());
    let (claimed, lease) = app.claim("w", "audio").await;
    assert_eq!(claimed, admin_job);
    let id = &admin_job;
    check(
        &app,
        vec![
            post(format!("{JOBS}/"))
                .json(json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "i"})),
            get(JOBS),
            get(format!("{JOBS}/statistics")),
            get(job(id, "")),
            get(job(id, "/status")),
            post(job(id, "/heartbeat")).json(json!({"lease_id": lease})),
            get(job(id, "/download")),
            put(job(id, "/result")).json(json!({"success": false, "error_message": "bad", "retryable": false})),
            post(job(id, "/retry")),
            post(job(id, "/cancel")),
            post(format!("{JOBS}/cleanup?days_old=0")),
            get("/health"),
        ],
    )
    .await;
    assert_eq!(app.status_of(&worker_job).await, "completed");
}

// ---------------------------------------------------------------------------------------
// Bad input: always a 4xx JSON answer, never a 500.

#[tokio::test]
async fn malformed_create_bodies_get_422() {
    // Every accepted create counts as a job of its own here, though some repeat the same
    // ingestion task and source; matching repeats is tested in idempotent_create.rs.
    let app = spawn_app_with(&["--create-match-unfinished", "false"]).await;
    let path = app.source_file("a.mp3", b"x");
    let good = json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "i"});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        post(format!("{JOBS}/")).json(body)
    };
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        post(format!("{JOBS}/")).json(body)
    };
    let create = || post(format!("{JOBS}/"));
    check(
        &app,
        vec![
            create().raw("{").invalid(&["body"]),
            create().raw("not json").invalid(&["body"]),
            create().raw("").invalid(&["body"]),
            create().raw("[]").invalid(&["body"]),
            create().raw("null").invalid(&["body"]),
            create().raw(format!("{good} trailing")).invalid(&["body"]),
            without("source_file_path").invalid(&["body", "source_file_path"]),
            without("content_type").invalid(&["body", "content_type"]),
            without("ingestion_task_id").invalid(&["body", "ingestion_task_id"]),
            // Wrong types: serde does not say which field, and the value is no field name.
            with("source_file_path", json!(5)).invalid(&["body"]),
            with("content_type", json!(["audio"])).invalid(&["body"]),
            with("ingestion_task_id", json!(7)).invalid(&["body"]),
            with("ingestion_task_id", json!("  ")).invalid(&["body", "ingestion_task_id"]),
            with("ingestion_task_id", json!("i".repeat(257)))
                .invalid(&["body", "ingestion_task_id"]),
            with("task_options", Value::Null).invalid(&["body"]),
            with("task_options", json!("fast")).invalid(&["body"]),
            with("task_options", json!([1, 2])).invalid(&["body"]),
            with("content_type", json!("Audio")).invalid(&["body", "content_type"]),
            with("content_type", json!("../x")).invalid(&["body", "content_type"]),
            with("content_type", json!("a b")).invalid(&["body", "content_type"]),
            with("content_type", json!("")).invalid(&["body", "content_type"]),
            with("content_type", json!("a".repeat(33))).invalid(&["body", "content_type"]),
            create().raw("  \n ").invalid(&["body"]),
            create()
                .raw(format!("{{\"pad\": \"{}\"}}", "x".repeat(3 * 1024 * 1024)))
                .expect(413),
            // Well-formed but unusual values are fine.
            with("content_type", json!("a".repeat(32))),
            with("task_options", json!({"nested": {"list": [1, null]}})),
            with("extra_field", json!(true)),
        ],
    )
    .await;
    assert_eq!(
        app.get(&format!("{JOBS}/statistics")).await.1["total_jobs"],
        3
    );
}

#[tokio::test]
async fn source_paths_outside_the_allowed_roots_are_refused() {
    // The two accepted paths name the same file: with matching on, the second create
    // would be answered with the first job (see idempotent_create.rs).
    let app = spawn_app_with(&["--create-match-unfinished", "false"]).await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, b"secret").unwrap();
    let files = app.files_dir.clone();
    std::os::unix::fs::symlink(&secret, files.join("link.mp3")).unwrap();
    std::fs::create_dir(files.join("sub")).unwrap();
    let inside = app.source_file("sub-file.mp3", b"x");
    std::os::unix::fs::symlink(&inside, files.join("sub/inner-link.mp3")).unwrap();
    let escape = format!(
        "{}/sub/../../{}",
        files.display(),
        secret.strip_prefix("/").unwrap().display()
    );
    let escape_by_dots = format!(
        "{}/../../../../../../../../../etc/hostname",
        files.display()
    );

    let create = |path: &str| {
        post(format!("{JOBS}/")).json(
            json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "i"}),
        )
    };
    let refused = |path: &str| create(path).invalid(&["body", "source_file_path"]);
    check(
        &app,
        vec![
            refused(secret.to_str().unwrap()),
            refused("/etc/hostname"),
            refused("relative/a.mp3"),
            refused("a.mp3"),
            refused(""),
            refused(files.join("missing.mp3").to_str().unwrap()),
            refused(&escape),
            refused(&escape_by_dots),
            refused(files.join("link.mp3").to_str().unwrap()),
            refused(files.to_str().unwrap()),
            refused(files.join("sub").to_str().unwrap()),
            refused(&format!("{inside}\u{0}.txt")),
            // Links and dots that stay inside the roots are fine.
            create(files.join("sub/inner-link.mp3").to_str().unwrap()),
            create(&format!("{}/sub/../sub-file.mp3", files.display())),
        ],
    )
    .await;
    assert_eq!(
        app.get(&format!("{JOBS}/statistics")).await.1["total_jobs"],
        2
    );
}

#[tokio::test]
async fn bad_job_ids_get_422_and_unknown_jobs_404() {
    let app = spawn_app().await;
    let unknown = random_uuid();
    let not_found = format!("Job {unknown} not found");
    let lease = json!({"lease_id": random_uuid()});
    let result = json!({"success": true});
    let mut cases = Vec::new();
    for bad in [
        "not-a-uuid",
        "123",
        "00000000-0000-0000-0000-00000000000g",
        &format!("{unknown}0"),
    ] {
        cases.extend([
            get(job(bad, "")).invalid(&["path", "job_id"]),
            get(job(bad, "/status")).invalid(&["path", "job_id"]),
            get(job(bad, "/download")).invalid(&["path", "job_id"]),
            post(job(bad, "/cancel")).invalid(&["path", "job_id"]),
            post(job(bad, "/retry")).invalid(&["path", "job_id"]),
            post(job(bad, "/heartbeat"))
                .json(lease.clone())
                .invalid(&["path", "job_id"]),
            put(job(bad, "/result"))
                .json(result.clone())
                .invalid(&["path", "job_id"]),
        ]);
    }
    cases.extend([
        get(job(&unknown, ""))
            .expect(404)
            .detail(not_found.as_str()),
        get(job(&unknown, "/status"))
            .expect(404)
            .detail(not_found.as_str()),
        get(job(&unknown, "/download"))
            .expect(404)
            .detail(not_found.as_str()),
        post(job(&unknown, "/cancel"))
            .expect(404)
            .detail(not_found.as_str()),
        post(job(&unknown, "/retry"))
            .expect(404)
            .detail(not_found.as_str()),
        post(job(&unknown, "/heartbeat"))
            .json(lease.clone())
            .expect(404)
            .detail(not_found.as_str()),
        put(job(&unknown, "/result"))
            .json(result.clone())
            .expect(404)
            .detail(not_found.as_str()),
        // An upper-case UUID names the same job.
        get(job(&unknown.to_uppercase(), "/status"))
            .expect(404)
            .detail(not_found.as_str()),
    ]);
    check(&app, cases).await;

    let id = app.create("audio").await;
    check(&app, vec![get(job(&id.to_uppercase(), "/status"))]).await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json() {
    let app = spawn_app().await;
    let id = app.create("audio").await;
    check(
        &app,
        vec![
            get("/").expect(404),
            get("/nope").expect(404),
            get("/api/v1/remote-jobs-x").expect(404),
            get("/api/v2/remote-jobs/").expect(404),
            get(job(&id, "/nope")).expect(404),
            get(job(&id, "/status/")).expect(404),
            get(job(&id, "/status/extra")).expect(404),
            post("/health").expect(405).detail("Method Not Allowed"),
            case(Method::DELETE, job(&id, "")).expect(405),
            case(Method::DELETE, JOBS).expect(405),
            case(Method::PATCH, format!("{JOBS}/")).expect(405),
            put(format!("{JOBS}/poll")).expect(405),
            post(format!("{JOBS}/statistics")).expect(405),
            get(format!("{JOBS}/cleanup")).expect(405),
            get(job(&id, "/heartbeat")).expect(405),
            get(job(&id, "/cancel")).expect(405),
            get(job(&id, "/retry")).expect(405),
            post(job(&id, "/result"))
                .json(json!({"success": true}))
                .expect(405),
            put(job(&id, "/status")).expect(405),
            post(job(&id, "/download")).expect(405),
        ],
    )
    .await;
    assert_eq!(app.status_of(&id).await, "pending");
}

#[tokio::test]
async fn bad_query_values_get_422() {
    let app = spawn_app().await;
    let poll = |query: &str| get(format!("{JOBS}/poll?{query}"));
    let list = |query: &str| get(format!("{JOBS}?{query}"));
    let cleanup = |query: &str| post(format!("{JOBS}/cleanup?{query}"));
    check(
        &app,
        vec![
            poll("").invalid(&["query", "worker_id"]),
            poll("worker_id=").invalid(&["query", "worker_id"]),
            poll("worker_id=%20%20").invalid(&["query", "worker_id"]),
            poll(&format!("worker_id={}", "w".repeat(129))).invalid(&["query", "worker_id"]),
            poll("worker_id=a%0Ab").invalid(&["query", "worker_id"]),
            poll("worker_id=w&content_types=Audio").invalid(&["query", "content_type"]),
            poll("worker_id=w&content_types=audio,../x").invalid(&["query", "content_type"]),
            poll(&format!(
                "worker_id=w&content_types={}",
                (0..33)
                    .map(|i| format!("t{i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .invalid(&["query", "content_types"]),
            poll(&format!(
                "worker_id=w&content_types={}",
                (0..32)
                    .map(|i| format!("t{i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            poll("worker_id=w&wait=31").invalid(&["query", "wait"]),
            poll("worker_id=w&wait=-1").invalid(&["query", "wait"]),
            poll("worker_id=w&wait=abc").invalid(&["query", "wait"]),
            poll("worker_id=w&wait=NaN").invalid(&["query", "wait"]),
            poll("worker_id=w&wait=inf").invalid(&["query", "wait"]),
            poll("worker_id=w&worker_id=v").invalid(&["query"]),
            poll("worker_id=w&wait=0&content_types=,,audio,,"),
            list("limit=0").invalid(&["query", "limit"]),
            list("limit=abc").invalid(&["query", "limit"]),
            list("limit=-1").invalid(&["query", "limit"]),
            list("limit=501").invalid(&["query", "limit"]),
            list("limit=").invalid(&["query", "limit"]),
            list("status=done").invalid(&["query", "status"]),
            list("status=PENDING").invalid(&["query", "status"]),
            list("content_type=Audio").invalid(&["query", "content_type"]),
            list("cursor=abc").invalid(&["query", "cursor"]),
            list("cursor=0").invalid(&["query", "cursor"]),
            list("cursor=-5").invalid(&["query", "cursor"]),
            list("cursor=99999999999999999999").invalid(&["query", "cursor"]),
            list("limit=500&status=&content_type=&cursor="),
            cleanup("days_old=-1").invalid(&["query", "days_old"]),
            cleanup("days_old=abc").invalid(&["query", "days_old"]),
            cleanup("days_old=1.5").invalid(&["query", "days_old"]),
            cleanup("days_old=36501").invalid(&["query", "days_old"]),
            cleanup("days_old=99999999999").invalid(&["query", "days_old"]),
            cleanup("days_old=").invalid(&["query", "days_old"]),
            cleanup("days_old=36500"),
        ],
    )
    .await;
}
