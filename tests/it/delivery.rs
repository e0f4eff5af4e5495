//! Outcomes reach the ingestion side: a real HTTP receiver on loopback (failing on
//! purpose), Standard Webhooks signatures checked by an independent implementation of the
//! specification, dead letters and redrive, one hand-off per outcome, retention, and a
//! crash of the real binary while the receiver is down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};

use crate::support::{
    complete_document_job, free_port, get_json, spawn_app_with, ServerProcess, TestApp,
};

/// The secret in the Standard Webhooks form: `whsec_` and the base64 of the key.
pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub webhook_id: String,
    pub timestamp: String,
    pub signature: String,
    pub raw: Bytes,
    pub body: Value,
    /// What the receiver answered.
    pub answered: u16,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Per path: how many of the next requests fail, and with which status.
    failures: HashMap<String, (usize, u16)>,
}

/// A tiny HTTP server on loopback that records every request and answers 200, or a
/// failure status while a path has failures left.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Receiver::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> Receiver {
        let state: Arc<Mutex<ReceiverState>> = Arc::default();
        let recorder = state.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, raw: Bytes| {
            let state = recorder.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let path = uri.path().to_owned();
                let mut state = state.lock().unwrap();
                let answered = match state.failures.get_mut(&path) {
                    Some((left, status)) if *left > 0 => {
                        *left -= 1;
                        *status
                    }
                    _ => 200,
                };
                state.received.push(Received {
                    path,
                    webhook_id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                    raw,
                    answered,
                });
                StatusCode::from_u16(answered).unwrap()
            }
        });
        // Results of tens of megabytes must arrive whole: no body limit here.
        let app = app.layer(axum::extract::DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            addr,
            state,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next `n` requests to `path` are answered with `status`.
    pub fn fail_next(&self, path: &str, n: usize, status: u16) {
        self.state
            .lock()
            .unwrap()
            .failures
            .insert(path.to_owned(), (n, status));
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        self.state
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits (in real time, at most 20 s) until `path` received `n` requests.
    pub async fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let received = self.received(path);
            if received.len() >= n {
                return received;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{path} received {} requests, expected {n}: {received:#?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Verifies a request the way the Standard Webhooks specification says a receiver must,
/// written here from the specification (not with the server's code): the key is the
/// base64 after `whsec_`; the signed content is `id.timestamp.body`; the header holds
/// space-separated `v1,<base64 HMAC-SHA256>` entries, any of which may match.
pub(crate) fn signature_verifies(secret: &str, received: &Received) -> bool {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(secret.strip_prefix("whsec_").expect("whsec_ secret"))
        .expect("base64 key");
    let mut signed = Vec::new();
    signed.extend_from_slice(received.webhook_id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(received.timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(&received.raw);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(&signed);
    let expected = engine.encode(mac.finalize().into_bytes());
    received.signature.split(' ').any(|entry| {
        entry
            .split_once(',')
            .is_some_and(|(version, sig)| version == "v1" && sig == expected)
    })
}

/// The server with the ingestion callback pointed at `receiver`, signing with `SECRET`,
/// and fast retries (1 s base, on the manual clock). The fallback poll is a minute, so
/// a delivery that arrives at once was woken by the commit.
async fn app_delivering_to(receiver: &Receiver, extra: &[&str]) -> TestApp {
    let callback = receiver.url("/callback");
    let mut flags = vec![
        "--ingestion-callback-url",
        &callback,
        "--webhook-secret",
        SECRET,
        "--delivery-backoff-base-ms",
        "1000",
        "--delivery-backoff-max-ms",
        "4000",
        "--delivery-poll-interval-ms",
        "60000",
    ];
    flags.extend_from_slice(extra);
    spawn_app_with(&flags).await
}

/// Creates a job with `task_options`, has a worker claim it, and returns (id, lease).
pub(crate) async fn create_and_claim(app: &TestApp, task_options: Value) -> (String, String) {
    let path = app.source_file(&format!("{}.bin", crate::support::uuid_like()), b"bytes");
    let (status, body) = app
        .post(
            "/api/v1/remote-jobs/",
            json!({"source_file_path": path, "content_type": "document",
                   "task_options": task_options, "ingestion_task_id": "ingest-42"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["job_id"].as_str().unwrap().to_owned();
    let (claimed, lease) = app.claim("w1", "document").await;
    assert_eq!(claimed, id);
    (id, lease)
}

/// Advances the manual clock past any backoff (4 s at most here) and runs a dispatcher
/// pass (the server's own dispatcher may take the work first; either way it is done once).
/// The advance stays well inside a claim's lifetime (attempt timeout + 30 s): an attempt
/// still in flight is not taken over and repeated.
async fn retry_now(app: &TestApp) {
    app.advance(10);
    app.context
        .dispatcher
        .run_once()
        .await
        .expect("dispatcher pass");
}

pub(crate) async fn deliveries_of(app: &TestApp, job_id: &str) -> Vec<Value> {
    let (status, body) = app
        .get(&format!("/api/v1/deliveries?job_id={job_id}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["deliveries"].as_array().unwrap().clone()
}

/// Waits until the job's deliveries are all in `state` (the server records an attempt's
/// outcome just after the receiver answered).
pub(crate) async fn wait_until_settled(app: &TestApp, job_id: &str, state: &str) -> Vec<Value> {
    wait_until_settled_within(app, job_id, state, Duration::from_secs(20)).await
}

/// `wait_until_settled` with its own limit (a sink behind a slower peer, such as Celery's
/// Redis, may need longer).
pub(crate) async fn wait_until_settled_within(
    app: &TestApp,
    job_id: &str,
    state: &str,
    within: Duration,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let deliveries = deliveries_of(app, job_id).await;
        if !deliveries.is_empty() && deliveries.iter().all(|d| d["state"] == state) {
            return deliveries;
        }
        assert!(
            started.elapsed() < within,
            "deliveries of {job_id} not {state}: {deliveries:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_each_outcome_later_signed_under_one_stable_id() {
    let receiver = Receiver::start().await;
    receiver.fail_next("/callback", 2, 503);
    receiver.fail_next("/hook", 1, 500);
    let app = app_delivering_to(&receiver, &[]).await;
    let (id, lease) = create_and_claim(
        &app,
        json!({"webhook_url": receiver.url("/hook"), "language": "de"}),
    )
    .await;
    app.advance(3);
    let (status, body) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"status": "completed", "ingestion_continued": true})
    );

    // The commit wakes the dispatcher: the first attempts come without any clock advance.
    receiver.wait_for("/callback", 1).await;
    receiver.wait_for("/hook", 1).await;
    retry_now(&app).await;
    receiver.wait_for("/hook", 2).await;
    receiver.wait_for("/callback", 2).await;
    retry_now(&app).await;
    let callbacks = receiver.wait_for("/callback", 3).await;
    wait_until_settled(&app, &id, "delivered").await;
    let hooks = receiver.received("/hook");
    assert_eq!(
        callbacks.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![503, 503, 200]
    );
    assert_eq!(
        hooks.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![500, 200]
    );

    let event_id = &callbacks[0].webhook_id;
    assert!(event_id.starts_with("evt_"), "{event_id}");
    for request in callbacks.iter().chain(&hooks) {
        assert_eq!(
            &request.webhook_id, event_id,
            "one id for every attempt and sink"
        );
        assert!(
            signature_verifies(SECRET, request),
            "signature does not verify: {request:#?}"
        );
        assert!(!signature_verifies(
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAA",
            request
        ));
    }
    let completed_at = app.detail(&id).await["completed_at"].clone();
    assert_eq!(
        callbacks[2].body,
        json!({
            "event": "job.completed",
            "job_id": id,
            "ingestion_task_id": "ingest-42",
            "processing_result": {"success": true, "content": "converted text",
                                  "metadata": {"pages": 1}, "processing_time": 0.5},
            "task_options": {"webhook_url": receiver.url("/hook"), "language": "de"},
            "completed_at": completed_at,
        })
    );
    assert_eq!(
        hooks[1].body,
        json!({
            "task_id": "ingest-42",
            "status": "SUCCESS",
            "result": {"success": true, "content": "converted text",
                       "metadata": {"pages": 1}, "processing_time": 0.5},
            "completed_at": completed_at,
        })
    );

    // The admin API shows the attempts; the job detail shows its deliveries.
    let deliveries = deliveries_of(&app, &id).await;
    let callback = deliveries
        .iter()
        .find(|d| d["sink"] == "ingestion_callback")
        .unwrap();
    assert_eq!(callback["event_id"], event_id.as_str());
    assert_eq!(callback["attempt_count"], 3);
    let (status, detail) = app
        .get(&format!("/api/v1/deliveries/{}", callback["id"]))
        .await;
    assert_eq!(status, 200, "{detail}");
    let attempts: Vec<(String, Value)> = detail["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap().to_owned(),
                a["http_status"].clone(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        vec![
            ("failed".into(), json!(503)),
            ("failed".into(), json!(503)),
            ("delivered".into(), json!(200))
        ]
    );
    assert_eq!(
        app.detail(&id).await["deliveries"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (_, stats) = app.get("/api/v1/remote-jobs/statistics").await;
    assert_eq!(
        stats["deliveries"]["oldest_pending_age_seconds"],
        Value::Null
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_and_exhausted_deliveries_dead_letter_and_redrive_delivers() {
    let receiver = Receiver::start().await;
    let app = app_delivering_to(&receiver, &["--delivery-max-attempts", "2"]).await;

    // 410 Gone: dead after one attempt.
    receiver.fail_next("/callback", 1, 410);
    let (gone, lease) = create_and_claim(&app, json!({})).await;
    app.succeed(&gone, Some(&lease)).await;
    receiver.wait_for("/callback", 1).await;
    let dead = wait_until_settled(&app, &gone, "dead").await;
    assert_eq!(dead[0]["attempt_count"], 1);
    assert_eq!(dead[0]["last_error"], "HTTP 410 Gone");

    // 503 twice with two attempts allowed: dead after the second.
    receiver.fail_next("/callback", 2, 503);
    let (exhausted, lease) = create_and_claim(&app, json!({})).await;
    app.fail(&exhausted, Some(&lease), false).await;
    receiver.wait_for("/callback", 2).await;
    retry_now(&app).await;
    receiver.wait_for("/callback", 3).await;
    let dead = wait_until_settled(&app, &exhausted, "dead").await;
    assert_eq!(dead[0]["attempt_count"], 2);

    let (_, stats) = app.get("/api/v1/remote-jobs/statistics").await;
    assert_eq!(
        stats["deliveries"]["per_sink"]["ingestion_callback"],
        json!({"pending": 0, "dead": 2})
    );
    let (status, listed) = app
        .get("/api/v1/deliveries?state=dead&sink=ingestion_callback")
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["deliveries"].as_array().unwrap().len(), 2);

    // Dead deliveries keep their jobs through cleanup.
    app.advance(400 * 86_400);
    let (status, cleaned) = app
        .post("/api/v1/remote-jobs/cleanup?days_old=0", json!({}))
        .await;
    assert_eq!((status, cleaned["cleaned_jobs"].clone()), (200, json!(0)));

    // Redrive: pending again, delivered at once (the receiver answers 200 now).
    let id = dead[0]["id"].clone();
    let (status, redriven) = app
        .post(&format!("/api/v1/deliveries/{id}/redrive"), json!({}))
        .await;
    assert_eq!(status, 200, "{redriven}");
    assert_eq!(redriven["state"], "pending");
    assert_eq!(redriven["attempt_count"], 0);
    let delivered = receiver.wait_for("/callback", 4).await;
    assert_eq!(delivered[3].answered, 200);
    assert_eq!(
        delivered[3].webhook_id, delivered[1].webhook_id,
        "the same event id"
    );
    assert_eq!(delivered[3].body["event"], "job.failed");
    assert_eq!(
        delivered[3].body["failure_info"],
        json!({"error_message": "converter crashed", "retry_count": 0, "job_id": exhausted,
               "reason": "failed"})
    );
    wait_until_settled(&app, &exhausted, "delivered").await;
    let (status, again) = app
        .post(&format!("/api/v1/deliveries/{id}/redrive"), json!({}))
        .await;
    assert_eq!(status, 409, "{again}");
    let (status, _) = app
        .post("/api/v1/deliveries/999999/redrive", json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = app.get("/api/v1/deliveries/not-a-number").await;
    assert_eq!(status, 422);
    let (status, _) = app.get("/api/v1/deliveries?state=lost").await;
    assert_eq!(status, 422);

    // The delivered job may go now; the one with the dead delivery stays.
    let (_, cleaned) = app
        .post("/api/v1/remote-jobs/cleanup?days_old=0", json!({}))
        .await;
    assert_eq!(cleaned["cleaned_jobs"], 1);
    let (status, _) = app.get(&format!("/api/v1/remote-jobs/{gone}/status")).await;
    assert_eq!(status, 200, "the job with a dead delivery is kept");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_handed_off_once_and_a_manual_retry_is_a_new_outcome() {
    let receiver = Receiver::start().await;
    let app = app_delivering_to(&receiver, &["--fallback-timeout", "10"]).await;

    // A final failure, then a duplicate (late) result: one hand-off.
    let (id, lease) = create_and_claim(&app, json!({})).await;
    let (status, body) = app.fail(&id, Some(&lease), false).await;
    assert_eq!(
        (status, body["ingestion_continued"].clone()),
        (200, json!(true))
    );
    let (status, _) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 409, "a second result is refused");
    let (status, _) = app.fail(&id, None, false).await;
    assert_eq!(status, 409);
    receiver.wait_for("/callback", 1).await;

    // A manual retry that succeeds: a new outcome, handed off once.
    let (status, _) = app
        .post(&format!("/api/v1/remote-jobs/{id}/retry"), json!({}))
        .await;
    assert_eq!(status, 200);
    let (claimed, lease) = app.claim("w2", "document").await;
    assert_eq!(claimed, id);
    app.succeed(&id, Some(&lease)).await;
    let (status, _) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 409, "a duplicate success is refused");
    receiver.wait_for("/callback", 2).await;

    // A job no worker claims in time times out for good.
    let path = app.source_file("late.bin", b"bytes");
    let (_, created) = app
        .post(
            "/api/v1/remote-jobs/",
            json!({"source_file_path": path, "content_type": "video", "ingestion_task_id": "ingest-late"}),
        )
        .await;
    let unclaimed = created["job_id"].as_str().unwrap().to_owned();
    app.advance(11);
    app.monitor().rescue_once().await.unwrap();
    receiver.wait_for("/callback", 3).await;
    wait_until_settled(&app, &id, "delivered").await;
    wait_until_settled(&app, &unclaimed, "delivered").await;
    // Nothing else arrives: passes and time change nothing.
    retry_now(&app).await;
    app.context.dispatcher.run_once().await.unwrap();

    let received = receiver.received("/callback");
    let summary: Vec<(String, String)> = received
        .iter()
        .map(|r| {
            (
                r.body["job_id"].as_str().unwrap().to_owned(),
                r.body["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (id.clone(), "job.failed".to_owned()),
            (id.clone(), "job.completed".to_owned()),
            (unclaimed.clone(), "job.timed_out".to_owned()),
        ]
    );
    let ids: HashSet<&str> = received.iter().map(|r| r.webhook_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "each outcome is its own event");
    assert_eq!(received[0].body["failure_info"]["reason"], "failed");
    assert_eq!(received[2].body["failure_info"]["reason"], "timed_out");
    assert_eq!(received[2].body["ingestion_task_id"], "ingest-late");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_url_must_be_http_to_an_allowed_host() {
    let receiver = Receiver::start().await;
    let app = app_delivering_to(&receiver, &["--webhook-allowed-hosts", "hooks.example.org"]).await;
    let path = app.source_file("hook.bin", b"bytes");
    for (url, field_error) in [
        (json!(receiver.url("/hook")), "MORAG_WEBHOOK_ALLOWED_HOSTS"),
        (json!("file:///etc/passwd"), "only http and https"),
        (json!(42), "must be an http(s) URL"),
    ] {
        let (status, body) = app
            .post(
                "/api/v1/remote-jobs/",
                json!({"source_file_path": path, "content_type": "document",
                       "task_options": {"webhook_url": url}, "ingestion_task_id": "t"}),
            )
            .await;
        assert_eq!(status, 422, "{url}: {body}");
        assert!(body.to_string().contains(field_error), "{body}");
        assert!(body.to_string().contains("webhook_url"), "{body}");
    }
    let (status, body) = app
        .post(
            "/api/v1/remote-jobs/",
            json!({"source_file_path": path, "content_type": "document",
                   "task_options": {"webhook_url": "http://hooks.example.org/morag"},
                   "ingestion_task_id": "t"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

/// Short real-time delivery settings for the real binary.
fn crash_env(callback: &str) -> Vec<(String, String)> {
    [
        ("MORAG_INGESTION_CALLBACK_URL", callback),
        ("MORAG_WEBHOOK_SECRET", SECRET),
        ("MORAG_DELIVERY_BACKOFF_BASE_MS", "100"),
        ("MORAG_DELIVERY_BACKOFF_MAX_MS", "300"),
        ("MORAG_DELIVERY_POLL_INTERVAL_MS", "200"),
        ("MORAG_DELIVERY_ATTEMPT_TIMEOUT_MS", "2000"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into()
}

/// Creates `n` jobs on the real server and completes each through the worker API;
/// returns their ids once every result was acknowledged.
async fn complete_jobs(
    client: &reqwest::Client,
    base: &str,
    source: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let create = json!({"source_file_path": source, "content_type": "document",
                            "ingestion_task_id": format!("crash-{i}")});
        let result = json!({"success": true, "content": format!("text {i}")});
        ids.push(complete_document_job(client, base, create, result).await);
    }
    ids
}

/// Waits until the receiver holds an event for every job in `ids`; returns the
/// receiver's distinct event ids by job.
async fn wait_for_jobs(receiver: &Receiver, ids: &[String]) -> BTreeMap<String, HashSet<String>> {
    let started = Instant::now();
    loop {
        let mut by_job: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        for request in receiver
            .received("/callback")
            .iter()
            .filter(|r| r.answered == 200)
        {
            assert!(signature_verifies(SECRET, request));
            by_job
                .entry(request.body["job_id"].as_str().unwrap().to_owned())
                .or_default()
                .insert(request.webhook_id.clone());
        }
        if ids.iter().all(|id| by_job.contains_key(id)) {
            return by_job;
        }
        assert!(
            // An attempt cut off by the kill is repeated after its claim expires
            // (attempt timeout 2 s + 10 s).
            started.elapsed() < Duration::from_secs(40),
            "{} of {} jobs delivered",
            by_job.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_dash_nine_while_the_receiver_is_down_delivers_every_outcome_once() {
    let data = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let receiver_port = free_port();
    let callback = format!("http://127.0.0.1:{receiver_port}/callback");
    let env = crash_env(&callback);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let source = data.path().canonicalize().unwrap().join("files/source.pdf");
    std::fs::create_dir_all(source.parent().unwrap()).unwrap();
    std::fs::write(&source, b"%PDF").unwrap();
    let source = source.to_str().unwrap().to_owned();

    // Phase 1: the receiver is down; results are acknowledged; the server is killed.
    let port = free_port();
    let mut server = ServerProcess::start(data.path(), port, &env);
    server.wait_healthy(&client).await;
    let first = complete_jobs(&client, &server.base, &source, 10).await;
    // Let some attempts fail (connection refused) before the crash.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill_9();

    // Phase 2: the receiver is up; after a restart every outcome arrives.
    let receiver = Receiver::start_on(SocketAddr::from(([127, 0, 0, 1], receiver_port))).await;
    let mut server = ServerProcess::start(data.path(), port, &env);
    server.wait_healthy(&client).await;
    wait_for_jobs(&receiver, &first).await;

    // Phase 3: kill -9 right after results were acknowledged, with the receiver up.
    let second = complete_jobs(&client, &server.base, &source, 10).await;
    server.kill_9();
    let mut server = ServerProcess::start(data.path(), port, &env);
    server.wait_healthy(&client).await;
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    wait_for_jobs(&receiver, &all).await;
    // Anything still in flight would arrive within a few backoffs.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let by_job = wait_for_jobs(&receiver, &all).await;
    assert_eq!(
        by_job.len(),
        20,
        "no event for a job that was not completed"
    );
    for (job, events) in &by_job {
        assert_eq!(events.len(), 1, "job {job} was handed off as {events:?}");
    }
    let (distinct, total): (HashSet<String>, usize) = {
        let received = receiver.received("/callback");
        let delivered: Vec<&Received> = received.iter().filter(|r| r.answered == 200).collect();
        (
            delivered.iter().map(|r| r.webhook_id.clone()).collect(),
            delivered.len(),
        )
    };
    assert_eq!(
        distinct.len(),
        20,
        "every delivery happened once (deduplicated by id)"
    );
    // At least once: a crash between the receiver's answer and the server recording it
    // may repeat a delivery, under the same id. Say how often it happened.
    eprintln!("{total} requests answered 200 for 20 events");
    // A delivery the killed server made but had not recorded stays pending until its claim
    // expires (attempt timeout 2 s + 10 s), then is repeated under its id: wait for that.
    let started = Instant::now();
    loop {
        let listed: Value = get_json(
            &client,
            format!("{}/api/v1/deliveries?state=pending", server.base),
        )
        .await;
        if listed["deliveries"] == json!([]) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing is left pending: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let by_job = wait_for_jobs(&receiver, &all).await;
    for (job, events) in &by_job {
        assert_eq!(events.len(), 1, "job {job} was handed off as {events:?}");
    }
    server.terminate();
}

/// Runs the `morag-jobs` admin CLI against `app`; returns (success, stdout).
fn cli(app: &TestApp, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
        .args(args)
        .args(["--url", &app.base])
        .output()
        .expect("cli runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_shows_and_redrives_deliveries() {
    let receiver = Receiver::start().await;
    receiver.fail_next("/callback", 1, 410);
    let app = app_delivering_to(&receiver, &[]).await;
    let (id, lease) = create_and_claim(&app, json!({})).await;
    app.succeed(&id, Some(&lease)).await;
    let dead = wait_until_settled(&app, &id, "dead").await;
    let delivery_id = dead[0]["id"].to_string();

    let (ok, out) = cli(&app, &["deliveries", "list", "--state", "dead"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ingestion_callback") && out.contains(&id),
        "{out}"
    );
    assert!(out.contains("HTTP 410 Gone"), "{out}");
    let (ok, out) = cli(&app, &["deliveries", "show", &delivery_id]);
    assert!(ok, "{out}");
    assert!(out.contains("dead") && out.contains("410"), "{out}");
    let (ok, out) = cli(&app, &["stats"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("SINK") && out.contains("ingestion_callback"),
        "{out}"
    );
    let (ok, out) = cli(&app, &["deliveries", "redrive", &delivery_id]);
    assert!(ok, "{out}");
    assert!(out.contains("pending again"), "{out}");
    receiver.wait_for("/callback", 2).await;
    wait_until_settled(&app, &id, "delivered").await;
    let (ok, out) = cli(&app, &["deliveries", "redrive", &delivery_id]);
    assert!(!ok, "a delivered delivery cannot be redriven: {out}");
    let (ok, out) = cli(&app, &["deliveries", "list", "--json", "--job-id", &id]);
    assert!(ok, "{out}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["deliveries"][0]["state"], "delivered");
    app.stop().await;
}

/// A result of tens of megabytes (with quotes, newlines and non-ASCII, so escaping counts)
/// reaches every sink whole: the ingestion callback and the per-job webhook over HTTP, and
/// the Celery task message in Redis (a stock worker runs such a message in
/// `celery::a_result_of_several_megabytes_reaches_the_worker_intact`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_of_tens_of_megabytes_reaches_every_sink_whole() {
    use morag_jobs::delivery::resp::Reply;
    let receiver = Receiver::start().await;
    let broker = crate::celery::TestBroker::new();
    let (redis, prefix) = (crate::celery::redis_url(), broker.dedup_key_prefix());
    let celery = [
        "--celery-broker-url",
        &redis,
        "--celery-queue",
        broker.queue(),
        "--celery-dedup-key-prefix",
        &prefix,
    ];
    let app = app_delivering_to(&receiver, &celery).await;
    let (id, lease) = create_and_claim(&app, json!({"webhook_url": receiver.url("/hook")})).await;
    let paragraph = "Zeile mit \"Anführungszeichen\", Tabs\tund Umbrüchen.\n";
    let content = paragraph.repeat(24 * 1024 * 1024 / paragraph.len());
    let (status, body) = app
        .put(
            &format!("/api/v1/remote-jobs/{id}/result"),
            json!({"success": true, "content": content, "metadata": {}, "lease_id": lease}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let callback = receiver.wait_for("/callback", 1).await;
    let hook = receiver.wait_for("/hook", 1).await;
    assert!(callback[0].body["processing_result"]["content"] == content.as_str());
    assert!(hook[0].body["result"]["content"] == content.as_str());
    // The Celery delivery runs beside the HTTP ones and may finish after them.
    let started = Instant::now();
    let message = loop {
        match broker.command(&["LRANGE", broker.queue(), "0", "-1"]).await {
            Reply::Array(Some(items)) if items.len() == 1 => match &items[0] {
                Reply::Bulk(Some(message)) => {
                    break serde_json::from_slice::<Value>(message).unwrap()
                }
                other => panic!("{other:?}"),
            },
            Reply::Array(Some(items)) if items.is_empty() => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "no Celery message"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("one message expected, got {other:?}"),
        }
    };
    let task_body = base64::engine::general_purpose::STANDARD
        .decode(message["body"].as_str().unwrap())
        .unwrap();
    let task_body: Value = serde_json::from_slice(&task_body).unwrap();
    assert!(task_body[0][1]["content"] == content.as_str());
    wait_until_settled(&app, &id, "delivered").await;
    broker.clean_up().await;
}
