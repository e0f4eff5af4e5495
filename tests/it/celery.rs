//! The Celery sink against a real Redis (127.0.0.1:6379, or `MORAG_TEST_REDIS_URL`) and a
//! real Celery worker (`tests/python/celery_app.py`, run by the Python of the virtual
//! environment `scripts/test.sh` creates, `MORAG_TEST_PYTHON`).
//!
//! Each test uses its own queue and key prefix (`morag-jobs-test-<uuid>`) and deletes every
//! key containing it at the end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use morag_jobs::clock::Timestamp;
use morag_jobs::delivery::celery::{CeleryConfig, CelerySink, Enqueued};
use morag_jobs::delivery::resp::{RedisClient, RedisUrl, Reply};
use morag_jobs::delivery::{DeliveryError, EventKind, OutboundEvent, Sink};
use morag_jobs::domain::JobId;
use serde_json::{json, Value};

const CONTINUE_TASK: &str = "morag.ingest_tasks.continue_ingestion_after_remote_processing";
const FAILURE_TASK: &str = "morag.ingest_tasks.handle_remote_job_failure";

pub fn redis_url() -> String {
    std::env::var("MORAG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// The Python with Celery installed: `MORAG_TEST_PYTHON`, else the virtual environment
/// `scripts/test.sh` keeps in `~/.cache/morag-jobs-venv`.
pub fn python() -> PathBuf {
    if let Ok(path) = std::env::var("MORAG_TEST_PYTHON") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").expect("HOME is set");
    let path = PathBuf::from(home).join(".cache/morag-jobs-venv/bin/python");
    assert!(
        path.exists(),
        "no Python with Celery: run scripts/test.sh (it creates {path:?}) or set MORAG_TEST_PYTHON"
    );
    path
}

/// A namespace of Redis keys for one test, deleted when the test calls `clean_up`.
pub struct TestBroker {
    /// `morag-jobs-test-<uuid>`: the queue name, and the stem of every key the test makes.
    pub stem: String,
    pub redis: RedisClient,
}

impl TestBroker {
    pub fn new() -> TestBroker {
        let stem = format!("morag-jobs-test-{}", uuid::Uuid::new_v4());
        let url = RedisUrl::parse(&redis_url()).unwrap();
        TestBroker {
            stem,
            redis: RedisClient::new(url, Duration::from_secs(5), Duration::from_secs(30)),
        }
    }

    pub fn queue(&self) -> &str {
        &self.stem
    }

    pub fn dedup_key_prefix(&self) -> String {
        format!("{}:sent:", self.stem)
    }

    /// The sink's configuration for this test's queue and key prefix.
    pub fn sink_config(&self) -> CeleryConfig {
        let mut config = CeleryConfig::new(&redis_url()).unwrap();
        config.queue = self.queue().to_owned();
        config.dedup_key_prefix = self.dedup_key_prefix();
        config
    }

    pub async fn command(&self, args: &[&str]) -> Reply {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.redis.command(&args).await.expect("redis answers")
    }

    pub async fn keys(&self) -> Vec<String> {
        let pattern = format!("*{}*", self.stem);
        match self.command(&["KEYS", &pattern]).await {
            Reply::Array(Some(items)) => items
                .into_iter()
                .map(|item| match item {
                    Reply::Bulk(Some(key)) => String::from_utf8(key).unwrap(),
                    other => panic!("KEYS answered {other:?}"),
                })
                .collect(),
            other => panic!("KEYS answered {other:?}"),
        }
    }

    /// Deletes the queue, kombu's binding for it and the dedup markers, and any message of
    /// ours a killed worker left in kombu's shared `unacked` hash.
    pub async fn clean_up(&self) {
        for key in self.keys().await {
            self.command(&["DEL", &key]).await;
        }
        if let Reply::Array(Some(items)) = self.command(&["HGETALL", "unacked"]).await {
            for pair in items.chunks(2) {
                if let [Reply::Bulk(Some(tag)), Reply::Bulk(Some(message))] = pair {
                    if String::from_utf8_lossy(message).contains(&self.stem) {
                        let tag = String::from_utf8_lossy(tag).into_owned();
                        self.command(&["HDEL", "unacked", &tag]).await;
                        self.command(&["ZREM", "unacked_index", &tag]).await;
                    }
                }
            }
        }
        assert!(self.keys().await.is_empty());
    }
}

/// A stock Celery worker process (solo pool) consuming one queue; killed when dropped.
pub struct CeleryWorker {
    child: Child,
    record_path: PathBuf,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl CeleryWorker {
    pub fn start(queue: &str) -> CeleryWorker {
        let dir = tempfile::tempdir().unwrap();
        let record_path = dir.path().join("tasks.jsonl");
        let log_path = dir.path().join("worker.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(python())
            .args([
                "-m",
                "celery",
                "-A",
                "celery_app",
                "worker",
                "--pool",
                "solo",
                "-Q",
                queue,
            ])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args(["--loglevel", "INFO", "--hostname", &format!("{queue}@%h")])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python"))
            .env("MORAG_TEST_CELERY_BROKER", redis_url())
            .env("MORAG_TEST_CELERY_RECORD", &record_path)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the Celery worker starts");
        CeleryWorker {
            child,
            record_path,
            log_path,
            _dir: dir,
        }
    }

    /// Every task the worker ran so far: `{task, task_id, args}`.
    pub fn records(&self) -> Vec<Value> {
        match std::fs::read_to_string(&self.record_path) {
            // A line still being written has no newline yet: it is not a record yet.
            Ok(text) => text
                .split_inclusive('\n')
                .filter(|line| line.ends_with('\n'))
                .map(|line| serde_json::from_str(line).expect("a complete JSON line"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until the worker ran a task for `ingestion_task_id`. The worker runs its
    /// queue in order, one task at a time, so every message enqueued before that one has
    /// run by then: a sentinel sent last makes "exactly one" checkable.
    pub async fn wait_for_ingestion_task(&mut self, ingestion_task_id: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let records = self.records();
            if records.iter().any(|r| r["args"][0] == ingestion_task_id) {
                return records;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the Celery worker exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not run a task for {ingestion_task_id}; it ran {records:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the worker the way an operator would (SIGTERM: a warm shutdown that
    /// acknowledges what it ran), so kombu's shared `unacked` hash keeps nothing of ours.
    pub async fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Drop sends SIGKILL.
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(kind: EventKind, ingestion_task_id: &str, payload: Value) -> OutboundEvent {
    OutboundEvent {
        event_id: format!("evt_{}", uuid::Uuid::new_v4()),
        kind,
        job_id: JobId::new_random(),
        ingestion_task_id: ingestion_task_id.to_owned(),
        payload,
        task_options: json!({"store_in_vector_db": true, "chunk_size": 4000}),
        completed_at: Timestamp::from_micros(1_760_000_000_000_000),
    }
}

fn completion(ingestion_task_id: &str, content: &str) -> OutboundEvent {
    event(
        EventKind::Completed,
        ingestion_task_id,
        json!({"success": true, "content": content, "metadata": {"pages": 2, "title": "Ünïcode"}, "processing_time": 12.5}),
    )
}

fn failure(kind: EventKind, ingestion_task_id: &str) -> OutboundEvent {
    let job_id = JobId::new_random().to_string();
    event(
        kind,
        ingestion_task_id,
        json!({"error_message": "whisper crashed", "retry_count": 3, "job_id": job_id, "reason": kind.failure_reason()}),
    )
}

/// The records of tasks with this Celery task id.
fn runs_of<'a>(records: &'a [Value], event: &OutboundEvent) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["task_id"] == event.event_id.as_str())
        .collect()
}

#[tokio::test]
async fn a_stock_worker_runs_one_continue_task_and_one_failure_task_with_the_seed_arguments() {
    let broker = TestBroker::new();
    let sink = CelerySink::new(broker.sink_config());
    let mut worker = CeleryWorker::start(broker.queue());

    let completed = completion("ingest-completed", "# Report\n\n\"Quoted\" text ✓");
    let timed_out = failure(EventKind::TimedOut, "ingest-timed-out");
    let sentinel = failure(EventKind::Failed, "sentinel");
    for event in [&completed, &timed_out, &sentinel] {
        let (outcome, _) = sink.deliver(event).await;
        outcome.expect("delivered");
    }
    let records = worker.wait_for_ingestion_task("sentinel").await;
    assert_eq!(records.len(), 3, "{records:?}");

    let runs = runs_of(&records, &completed);
    assert_eq!(runs.len(), 1, "{records:?}");
    assert_eq!(runs[0]["task"], CONTINUE_TASK);
    assert_eq!(
        runs[0]["args"],
        json!([
            "ingest-completed",
            completed.payload,
            completed.task_options
        ])
    );
    let runs = runs_of(&records, &timed_out);
    assert_eq!(runs.len(), 1, "{records:?}");
    assert_eq!(runs[0]["task"], FAILURE_TASK);
    assert_eq!(
        runs[0]["args"],
        json!(["ingest-timed-out", timed_out.payload])
    );
    assert_eq!(runs[0]["args"][1]["reason"], "timed_out");

    worker.stop().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn delivering_an_event_twice_enqueues_it_once_even_after_the_server_forgot_the_script() {
    let broker = TestBroker::new();
    let sink = CelerySink::new(broker.sink_config());
    let event = completion("ingest-twice", "twice");

    assert_eq!(sink.enqueue(&event).await.unwrap(), Enqueued::Sent);
    // A restarted Redis forgets cached scripts: EVALSHA answers NOSCRIPT, and the sink
    // must fall back to EVAL and still deduplicate.
    broker.command(&["SCRIPT", "FLUSH"]).await;
    assert_eq!(sink.enqueue(&event).await.unwrap(), Enqueued::AlreadySent);
    assert_eq!(sink.enqueue(&event).await.unwrap(), Enqueued::AlreadySent);
    assert_eq!(
        broker.command(&["LLEN", broker.queue()]).await,
        Reply::Integer(1)
    );
    // The marker outlives any retry schedule, but not forever.
    let marker = sink.dedup_key(&event.event_id);
    let Reply::Integer(ttl) = broker.command(&["TTL", &marker]).await else {
        panic!("TTL is an integer")
    };
    assert!((6 * 86_400..=7 * 86_400).contains(&ttl), "ttl {ttl}");

    let mut worker = CeleryWorker::start(broker.queue());
    let sentinel = failure(EventKind::Cancelled, "sentinel");
    sink.enqueue(&sentinel).await.unwrap();
    let records = worker.wait_for_ingestion_task("sentinel").await;
    assert_eq!(runs_of(&records, &event).len(), 1, "{records:?}");
    assert_eq!(records.len(), 2, "{records:?}");

    worker.stop().await;
    broker.clean_up().await;
}

/// A dispatcher killed after the Redis step but before it recorded the delivery sends the
/// same event again after its restart, from a new process with a new sink: still one task.
#[tokio::test]
async fn a_restarted_dispatcher_redelivering_an_enqueued_event_does_not_run_it_twice() {
    let broker = TestBroker::new();
    let mut worker = CeleryWorker::start(broker.queue());
    let event = failure(EventKind::Failed, "ingest-redelivered");

    let before_the_crash = CelerySink::new(broker.sink_config());
    assert_eq!(
        before_the_crash.enqueue(&event).await.unwrap(),
        Enqueued::Sent
    );
    drop(before_the_crash);

    let after_the_restart = CelerySink::new(broker.sink_config());
    let (outcome, _) = after_the_restart.deliver(&event).await;
    assert_eq!(outcome, Ok(()));
    let sentinel = completion("sentinel", "");
    after_the_restart.enqueue(&sentinel).await.unwrap();

    let records = worker.wait_for_ingestion_task("sentinel").await;
    let runs = runs_of(&records, &event);
    assert_eq!(runs.len(), 1, "{records:?}");
    assert_eq!(
        runs[0]["args"],
        json!(["ingest-redelivered", event.payload])
    );
    assert_eq!(records.len(), 2, "{records:?}");

    worker.stop().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn a_result_of_several_megabytes_reaches_the_worker_intact() {
    let broker = TestBroker::new();
    let sink = CelerySink::new(broker.sink_config());
    let mut worker = CeleryWorker::start(broker.queue());
    // 8 MiB of text with quotes, newlines and non-ASCII, so escaping is exercised.
    let paragraph = "Zeile mit \"Anführungszeichen\", Tabs\tund Umlauten: äöü ß ✓\n";
    let content = paragraph.repeat(8 * 1024 * 1024 / paragraph.len());
    let event = completion("ingest-large", &content);
    assert_eq!(sink.enqueue(&event).await.unwrap(), Enqueued::Sent);

    let records = worker.wait_for_ingestion_task("ingest-large").await;
    let runs = runs_of(&records, &event);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["args"][1]["content"].as_str().unwrap(), content);

    worker.stop().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn an_unreachable_broker_is_a_retryable_failure_that_names_no_password() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = CeleryConfig::new(&format!("redis://:hunter2@127.0.0.1:{port}/0")).unwrap();
    let sink = CelerySink::new(config);
    let (outcome, _) = sink.deliver(&completion("ingest-unreachable", "x")).await;
    match outcome {
        Err(DeliveryError::Retryable(message)) => {
            assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

/// The event ids on the queue, in the order a worker pops them (kombu's Redis transport
/// pops from the tail: the oldest push first).
async fn queued_event_ids(broker: &TestBroker) -> Vec<String> {
    let Reply::Array(Some(items)) = broker.command(&["LRANGE", broker.queue(), "0", "-1"]).await
    else {
        panic!("LRANGE answers an array")
    };
    items
        .into_iter()
        .rev()
        .map(|item| {
            let Reply::Bulk(Some(message)) = item else {
                panic!("a message is a bulk string: {item:?}")
            };
            let envelope: Value = serde_json::from_slice(&message).unwrap();
            envelope["headers"]["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Delivers `events` from concurrent tasks (a dispatcher's attempts) and answers each
/// one's outcome, in the order of `events`. On a current-thread runtime every task queues
/// its event before the sink's flusher task first runs, so they share one batch.
async fn enqueue_concurrently(
    sink: &Arc<CelerySink>,
    events: &[OutboundEvent],
) -> Vec<Result<Enqueued, DeliveryError>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, event) in events.iter().cloned().enumerate() {
        let sink = sink.clone();
        tasks.spawn(async move { (index, sink.enqueue(&event).await) });
    }
    let mut outcomes: Vec<Option<Result<Enqueued, DeliveryError>>> = vec![None; events.len()];
    while let Some(joined) = tasks.join_next().await {
        let (index, outcome) = joined.unwrap();
        outcomes[index] = Some(outcome);
    }
    outcomes.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn concurrent_deliveries_share_one_script_call_and_each_runs_once_in_order() {
    let broker = TestBroker::new();
    let sink = Arc::new(CelerySink::new(broker.sink_config()));
    let events: Vec<OutboundEvent> = (0..100)
        .map(|i| completion(&format!("ingest-batch-{i}"), &format!("content {i}")))
        .collect();

    let outcomes = enqueue_concurrently(&sink, &events).await;
    assert!(
        outcomes.iter().all(|o| *o == Ok(Enqueued::Sent)),
        "{outcomes:?}"
    );
    assert_eq!(
        sink.n_batches(),
        1,
        "the 100 events went in one script call"
    );
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        queued_event_ids(&broker).await,
        ids,
        "first delivered, first popped"
    );
    for event in &events {
        let marker = sink.dedup_key(&event.event_id);
        assert_eq!(
            broker.command(&["EXISTS", &marker]).await,
            Reply::Integer(1)
        );
    }

    let mut worker = CeleryWorker::start(broker.queue());
    let sentinel = failure(EventKind::Failed, "sentinel");
    sink.enqueue(&sentinel).await.unwrap();
    let records = worker.wait_for_ingestion_task("sentinel").await;
    assert_eq!(records.len(), 101, "{records:?}");
    for (i, event) in events.iter().enumerate() {
        let runs = runs_of(&records, event);
        assert_eq!(runs.len(), 1, "{records:?}");
        assert_eq!(runs[0]["args"][1]["content"], format!("content {i}"));
    }

    worker.stop().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn a_batch_with_an_already_sent_event_pushes_only_the_new_ones() {
    let broker = TestBroker::new();
    let sink = Arc::new(CelerySink::new(broker.sink_config()));
    let sent_before = completion("ingest-sent-before", "before");
    assert_eq!(sink.enqueue(&sent_before).await, Ok(Enqueued::Sent));

    let first_new = completion("ingest-new-1", "new");
    let second_new = failure(EventKind::TimedOut, "ingest-new-2");
    let batch = [first_new.clone(), sent_before.clone(), second_new.clone()];
    let outcomes = enqueue_concurrently(&sink, &batch).await;
    assert_eq!(
        outcomes,
        [
            Ok(Enqueued::Sent),
            Ok(Enqueued::AlreadySent),
            Ok(Enqueued::Sent)
        ]
    );
    assert_eq!(sink.n_batches(), 2);
    assert_eq!(
        queued_event_ids(&broker).await,
        [
            sent_before.event_id.clone(),
            first_new.event_id.clone(),
            second_new.event_id.clone()
        ]
    );

    broker.clean_up().await;
}

/// What `broker_proxy` does with the traffic of its connections.
const PROXY_FORWARD: u8 = 0;
/// Closes a connection as soon as the sink sends anything: Redis went away mid-call.
const PROXY_CUT: u8 = 1;
/// Drops what the sink sends and answers nothing: a broker that hangs.
const PROXY_STALL: u8 = 2;

/// A TCP proxy to Redis whose behaviour a test switches (`PROXY_*`) while it runs.
async fn broker_proxy() -> (u16, Arc<AtomicU8>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = RedisUrl::parse(&redis_url()).unwrap();
    let upstream = format!("{}:{}", upstream.host, upstream.port);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mode = Arc::new(AtomicU8::new(PROXY_FORWARD));
    let proxy_mode = mode.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let mode = proxy_mode.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut to_client, mut to_server) = (vec![0; 64 * 1024], vec![0; 64 * 1024]);
                loop {
                    tokio::select! {
                        read = client.read(&mut to_server) => {
                            let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                            match mode.load(Ordering::SeqCst) {
                                PROXY_CUT => return,
                                PROXY_STALL => continue,
                                _ => {}
                            }
                            if server.write_all(&to_server[..n]).await.is_err() {
                                return;
                            }
                        }
                        read = server.read(&mut to_client) => {
                            let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                            if client.write_all(&to_client[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, mode, task)
}

#[tokio::test]
async fn redis_going_away_fails_the_whole_batch_as_retryable_and_a_retry_sends_each_once() {
    let broker = TestBroker::new();
    let (port, mode, proxy) = broker_proxy().await;
    let mut config = broker.sink_config();
    config.broker = RedisUrl::parse(&format!("redis://127.0.0.1:{port}/0")).unwrap();
    let sink = Arc::new(CelerySink::new(config));
    // A pooled connection first, so the failing call is also retried on a new one.
    let warm_up = completion("ingest-warm-up", "");
    assert_eq!(sink.enqueue(&warm_up).await, Ok(Enqueued::Sent));

    mode.store(PROXY_CUT, Ordering::SeqCst);
    let events: Vec<OutboundEvent> = (0..10)
        .map(|i| completion(&format!("ingest-cut-{i}"), "cut"))
        .collect();
    let outcomes = enqueue_concurrently(&sink, &events).await;
    for outcome in &outcomes {
        match outcome {
            Err(DeliveryError::Retryable(message)) => {
                assert!(message.starts_with("celery broker: "), "{message}")
            }
            other => panic!("expected a retryable failure, got {other:?}"),
        }
    }
    assert_eq!(sink.n_batches(), 2, "the ten events went in one call");
    assert_eq!(
        queued_event_ids(&broker).await,
        std::slice::from_ref(&warm_up.event_id)
    );

    // Redis is back: the dispatcher's retries (again together) push each event once.
    mode.store(PROXY_FORWARD, Ordering::SeqCst);
    let outcomes = enqueue_concurrently(&sink, &events).await;
    assert!(
        outcomes.iter().all(|o| *o == Ok(Enqueued::Sent)),
        "{outcomes:?}"
    );
    let mut expected = vec![warm_up.event_id.clone()];
    expected.extend(events.iter().map(|e| e.event_id.clone()));
    assert_eq!(queued_event_ids(&broker).await, expected);

    proxy.abort();
    broker.clean_up().await;
}

/// The dispatcher drops an attempt's future at its timeout; the sink's call for it goes
/// on until the broker's IO timeout, and the sink keeps enqueueing afterwards.
#[tokio::test]
async fn an_attempt_given_up_on_a_hanging_broker_does_not_stop_the_sink() {
    let broker = TestBroker::new();
    let (port, mode, proxy) = broker_proxy().await;
    let mut config = broker.sink_config();
    config.broker = RedisUrl::parse(&format!("redis://127.0.0.1:{port}/0")).unwrap();
    config.io_timeout = Duration::from_secs(1);
    let sink = CelerySink::new(config);

    mode.store(PROXY_STALL, Ordering::SeqCst);
    let given_up = completion("ingest-given-up", "");
    let attempt = tokio::time::timeout(Duration::from_millis(100), sink.enqueue(&given_up)).await;
    assert!(attempt.is_err(), "the broker hangs: {attempt:?}");

    mode.store(PROXY_FORWARD, Ordering::SeqCst);
    let started = Instant::now();
    let next = completion("ingest-next", "");
    assert_eq!(sink.enqueue(&next).await, Ok(Enqueued::Sent));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The hanging call never reached Redis: the retry of the given-up event pushes it.
    assert_eq!(sink.enqueue(&given_up).await, Ok(Enqueued::Sent));
    assert_eq!(
        queued_event_ids(&broker).await,
        [next.event_id.clone(), given_up.event_id.clone()]
    );

    proxy.abort();
    broker.clean_up().await;
}

/// Through the real server: a job that completes, one that fails for good and one that
/// times out for good each make exactly one task run on a stock Celery worker, with the
/// seed's arguments, under the delivery's event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_failed_and_timed_out_jobs_each_run_one_celery_task() {
    let broker = TestBroker::new();
    let prefix = broker.dedup_key_prefix();
    let url = redis_url();
    let app = crate::support::spawn_app_with(&[
        "--celery-broker-url",
        &url,
        "--celery-queue",
        broker.queue(),
        "--celery-dedup-key-prefix",
        &prefix,
        "--max-retries",
        "0",
        "--delivery-poll-interval-ms",
        "60000",
    ])
    .await;
    let mut worker = CeleryWorker::start(broker.queue());

    let create = |task: &'static str| {
        let app = &app;
        async move {
            let path = app.source_file(&format!("{task}.pdf"), b"pdf");
            let (status, body) = app
                .post(
                    "/api/v1/remote-jobs/",
                    json!({"source_file_path": path, "content_type": "document",
                           "task_options": {"chunk_size": 2000}, "ingestion_task_id": task}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let id = body["job_id"].as_str().unwrap().to_owned();
            let (claimed, lease) = app.claim("w1", "document").await;
            assert_eq!(claimed, id);
            (id, lease)
        }
    };
    let (completed, lease) = create("e2e-completed").await;
    let (status, body) = app.succeed(&completed, Some(&lease)).await;
    assert_eq!(
        (status, body["ingestion_continued"].clone()),
        (200, json!(true))
    );
    let (failed, lease) = create("e2e-failed").await;
    let (status, _) = app.fail(&failed, Some(&lease), true).await;
    assert_eq!(status, 200);
    assert_eq!(app.status_of(&failed).await, "failed");
    let (timed_out, _) = create("e2e-timed-out").await;
    app.advance(601);
    app.monitor().rescue_once().await.unwrap();
    assert_eq!(app.status_of(&timed_out).await, "timeout");

    let mut event_ids = Vec::new();
    for id in [&completed, &failed, &timed_out] {
        let deliveries = crate::delivery::wait_until_settled_within(
            &app,
            id,
            "delivered",
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
        assert_eq!(deliveries[0]["sink"], "celery");
        event_ids.push(deliveries[0]["event_id"].as_str().unwrap().to_owned());
    }
    // Every delivery is on the queue; a sentinel pushed now runs after them.
    let sentinel = failure(EventKind::Failed, "sentinel");
    CelerySink::new(broker.sink_config())
        .enqueue(&sentinel)
        .await
        .unwrap();
    let records = worker.wait_for_ingestion_task("sentinel").await;
    assert_eq!(records.len(), 4, "{records:#?}");

    let run = |event_id: &str| {
        let runs: Vec<&Value> = records
            .iter()
            .filter(|r| r["task_id"] == event_id)
            .collect();
        assert_eq!(runs.len(), 1, "{event_id}: {records:#?}");
        runs[0].clone()
    };
    let continued = run(&event_ids[0]);
    assert_eq!(continued["task"], CONTINUE_TASK);
    assert_eq!(
        continued["args"],
        json!(["e2e-completed",
               {"success": true, "content": "converted text", "metadata": {"pages": 1}, "processing_time": 0.5},
               {"chunk_size": 2000}])
    );
    for (event_id, task, job_id, reason) in [
        (&event_ids[1], "e2e-failed", &failed, "failed"),
        (&event_ids[2], "e2e-timed-out", &timed_out, "timed_out"),
    ] {
        let handled = run(event_id);
        assert_eq!(handled["task"], FAILURE_TASK);
        let args = handled["args"].as_array().unwrap();
        assert_eq!(args.len(), 2, "{handled}");
        assert_eq!(args[0], task);
        let info = &args[1];
        assert_eq!(info["job_id"], job_id.as_str(), "{info}");
        assert_eq!(info["reason"], reason, "{info}");
        assert_eq!(info["retry_count"], 0, "{info}");
        assert!(
            info["error_message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{info}"
        );
    }

    worker.stop().await;
    app.stop().await;
    broker.clean_up().await;
}

/// A TCP proxy to Redis that forwards everything, but once a connection sent a script
/// (`EVALSHA`/`EVAL`) it swallows that connection's answers: the script runs on Redis and
/// the server never hears back, as when it dies between the enqueue and recording it.
async fn answer_swallowing_proxy() -> (u16, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = RedisUrl::parse(&redis_url()).unwrap();
    let upstream = format!("{}:{}", upstream.host, upstream.port);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let swallow = Arc::new(AtomicBool::new(false));
                let sent_script = swallow.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        if buffer[..n].windows(4).any(|w| w == b"EVAL") {
                            sent_script.store(true, Ordering::SeqCst);
                        }
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buffer = vec![0; 64 * 1024];
                while let Ok(n) = server_read.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    if !swallow.load(Ordering::SeqCst)
                        && client_write.write_all(&buffer[..n]).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    (port, task)
}

/// The real binary is killed with SIGKILL after its Celery enqueue reached Redis but
/// before it could record the delivery; after a restart it delivers the event again, and
/// the worker still runs one task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_between_the_enqueue_and_recording_it_still_runs_one_task() {
    use crate::support::{complete_document_job, free_port, get_json, ServerProcess};

    let broker = TestBroker::new();
    let (proxy_port, proxy) = answer_swallowing_proxy().await;
    let data = tempfile::tempdir().unwrap();
    let source = data.path().canonicalize().unwrap().join("files/source.pdf");
    std::fs::create_dir_all(source.parent().unwrap()).unwrap();
    std::fs::write(&source, b"%PDF").unwrap();
    let env_with = |broker_url: String| -> Vec<(String, String)> {
        [
            ("MORAG_CELERY_BROKER_URL", broker_url),
            ("MORAG_CELERY_QUEUE", broker.queue().to_owned()),
            ("MORAG_CELERY_DEDUP_KEY_PREFIX", broker.dedup_key_prefix()),
            ("MORAG_DELIVERY_ATTEMPT_TIMEOUT_MS", "1000".into()),
            ("MORAG_DELIVERY_BACKOFF_BASE_MS", "100".into()),
            ("MORAG_DELIVERY_BACKOFF_MAX_MS", "300".into()),
            ("MORAG_DELIVERY_POLL_INTERVAL_MS", "200".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .into()
    };
    let client = reqwest::Client::new();
    let port = free_port();

    // Phase 1: the enqueue reaches Redis, its answer never reaches the server.
    let env = env_with(format!("redis://127.0.0.1:{proxy_port}/0"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut server = ServerProcess::start(data.path(), port, &env);
    server.wait_healthy(&client).await;
    let job_id = complete_document_job(
        &client,
        &server.base,
        json!({"source_file_path": source, "content_type": "document", "ingestion_task_id": "e2e-crash"}),
        json!({"success": true, "content": "text", "metadata": {}, "processing_time": 1.0}),
    )
    .await;
    let started = Instant::now();
    while broker.command(&["LLEN", broker.queue()]).await != Reply::Integer(1) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nothing was enqueued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill_9();
    proxy.abort();

    // Phase 2: restarted, talking to Redis directly, the server delivers the event again.
    let env = env_with(redis_url());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut server = ServerProcess::start(data.path(), port, &env);
    server.wait_healthy(&client).await;
    // The attempt in flight at the crash is taken over once its claim lapsed (the attempt
    // timeout and a 30 s margin).
    let started = Instant::now();
    let delivery = loop {
        let listed: Value = get_json(
            &client,
            format!("{}/api/v1/deliveries?job_id={job_id}", server.base),
        )
        .await;
        let deliveries = listed["deliveries"].as_array().unwrap().clone();
        if deliveries.len() == 1 && deliveries[0]["state"] == "delivered" {
            break deliveries[0].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not delivered after the restart: {deliveries:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        broker.command(&["LLEN", broker.queue()]).await,
        Reply::Integer(1),
        "the redelivery pushed nothing"
    );

    let mut worker = CeleryWorker::start(broker.queue());
    let sentinel = failure(EventKind::Failed, "sentinel");
    CelerySink::new(broker.sink_config())
        .enqueue(&sentinel)
        .await
        .unwrap();
    let records = worker.wait_for_ingestion_task("sentinel").await;
    let event_id = delivery["event_id"].as_str().unwrap();
    let runs: Vec<&Value> = records
        .iter()
        .filter(|r| r["task_id"] == event_id)
        .collect();
    assert_eq!(runs.len(), 1, "{records:#?}");
    assert_eq!(runs[0]["args"][0], "e2e-crash");
    assert_eq!(records.len(), 2, "{records:#?}");

    worker.stop().await;
    server.terminate();
    broker.clean_up().await;
}
