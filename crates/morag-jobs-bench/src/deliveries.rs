//! The benchmark's delivery measurements (issue 9's speed targets), kept apart from the
//! job scenarios:
//!
//! - `--sinks webhook|celery|both` on the lifecycle scenario starts the server with the
//!   ingestion callback pointing at a receiver inside this process and/or the Celery sink
//!   on a queue of its own in Redis, and reports, besides the usual figures, when the
//!   deliveries arrived: events per second at each sink (first to last arrival) and how
//!   long after the last result the last event arrived.
//! - The `celery-latency` scenario runs a real Celery worker (`tests/python/celery_app.py`
//!   in the tests' virtual environment) and measures, one job at a time on an otherwise
//!   idle server, from sending a result to the Celery task starting in that worker (the
//!   task records `time.time()` when it starts; both sides read the same wall clock).
//!
//! Every Redis key a run makes contains its stem `morag-jobs-bench-<uuid>` and is deleted
//! afterwards (also when the run fails), along with any message of ours kombu left in its
//! shared `unacked` hash.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::ValueEnum;
use http_body_util::{BodyExt as _, Full};
use morag_jobs::delivery::resp::{RedisClient, RedisUrl, Reply};
use serde_json::Value;

use super::{progress, unique_content_type, Args, Latencies, Metric, Target};

/// Which sinks the lifecycle scenario's server delivers to.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sinks {
    None,
    /// The ingestion callback, to a receiver inside the benchmark.
    Webhook,
    /// The Celery sink, to a queue of the benchmark's own in Redis.
    Celery,
    Both,
}

impl Sinks {
    fn webhook(self) -> bool {
        matches!(self, Sinks::Webhook | Sinks::Both)
    }

    fn celery(self) -> bool {
        matches!(self, Sinks::Celery | Sinks::Both)
    }
}

/// A Redis namespace of one run: the Celery queue and the dedup markers' prefix.
struct BenchBroker {
    stem: String,
    url: String,
    redis: RedisClient,
}

impl BenchBroker {
    fn new(url: &str) -> anyhow::Result<BenchBroker> {
        let parsed = RedisUrl::parse(url).map_err(|why| anyhow::anyhow!("--redis-url: {why}"))?;
        Ok(BenchBroker {
            stem: format!("morag-jobs-bench-{}", uuid::Uuid::new_v4()),
            url: url.to_owned(),
            redis: RedisClient::new(parsed, Duration::from_secs(5), Duration::from_secs(30)),
        })
    }

    /// The server flags for this namespace, reaching Redis at `url`.
    fn server_args(&self, url: &str) -> Vec<String> {
        vec![
            format!("--celery-broker-url={url}"),
            format!("--celery-queue={}", self.stem),
            format!("--celery-dedup-key-prefix={}:sent:", self.stem),
        ]
    }

    async fn command(&self, args: &[&str]) -> anyhow::Result<Reply> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.redis
            .command(&args)
            .await
            .map_err(|error| anyhow::anyhow!("Redis: {error}"))
    }

    async fn queue_length(&self) -> anyhow::Result<i64> {
        match self.command(&["LLEN", &self.stem]).await? {
            Reply::Integer(n) => Ok(n),
            other => bail!("LLEN answered {other:?}"),
        }
    }

    /// Deletes every key of this run and our messages in kombu's `unacked` hash.
    async fn clean_up(&self) {
        let pattern = format!("*{}*", self.stem);
        // Dedup markers are many (one per event): SCAN in steps rather than one KEYS.
        let mut cursor = "0".to_owned();
        loop {
            let Ok(Reply::Array(Some(page))) = self
                .command(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
                .await
            else {
                break;
            };
            let (next, keys) = match page.as_slice() {
                [Reply::Bulk(Some(next)), Reply::Array(Some(keys))] => {
                    (String::from_utf8_lossy(next).into_owned(), keys.clone())
                }
                _ => break,
            };
            for key in keys {
                if let Reply::Bulk(Some(key)) = key {
                    let key = String::from_utf8_lossy(&key).into_owned();
                    let _ = self.command(&["DEL", &key]).await;
                }
            }
            cursor = next;
            if cursor == "0" {
                break;
            }
        }
        if let Ok(Reply::Array(Some(items))) = self.command(&["HGETALL", "unacked"]).await {
            for pair in items.chunks(2) {
                if let [Reply::Bulk(Some(tag)), Reply::Bulk(Some(message))] = pair {
                    if String::from_utf8_lossy(message).contains(&self.stem) {
                        let tag = String::from_utf8_lossy(tag).into_owned();
                        let _ = self.command(&["HDEL", "unacked", &tag]).await;
                        let _ = self.command(&["ZREM", "unacked_index", &tag]).await;
                    }
                }
            }
        }
    }
}

/// An HTTP receiver on loopback that answers every POST with 204 after reading its body,
/// and notes when each distinct event (`webhook-id`) first arrived.
struct Receiver {
    url: String,
    arrivals: Arc<Mutex<Arrivals>>,
    task: tokio::task::JoinHandle<()>,
}

/// Held closed, it makes the sinks wait (`--delivery-backlog`): the receiver does not
/// answer and the Redis proxy does not connect until it opens.
type Gate = tokio::sync::watch::Receiver<bool>;

#[derive(Default)]
struct Arrivals {
    ids: HashSet<String>,
    first: Option<Instant>,
    last: Option<Instant>,
    requests: usize,
}

impl Receiver {
    async fn start(gate: Gate) -> anyhow::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the webhook receiver")?;
        let url = format!("http://{}/morag-outcomes", listener.local_addr()?);
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let shared = arrivals.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let arrivals = shared.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let arrivals = arrivals.clone();
                            let mut gate = gate.clone();
                            async move {
                                let _ = gate.wait_for(|open| *open).await;
                                let id = request
                                    .headers()
                                    .get("webhook-id")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned();
                                // A real receiver reads the whole body before answering.
                                let _ = request.into_body().collect().await;
                                let now = Instant::now();
                                let mut arrivals = arrivals.lock().expect("arrivals lock");
                                arrivals.requests += 1;
                                if arrivals.ids.insert(id) {
                                    arrivals.first.get_or_insert(now);
                                    arrivals.last = Some(now);
                                }
                                drop(arrivals);
                                hyper::Response::builder()
                                    .status(204)
                                    .body(Full::new(Bytes::new()))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Receiver {
            url,
            arrivals,
            task,
        })
    }

    fn distinct(&self) -> usize {
        self.arrivals.lock().expect("arrivals lock").ids.len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of Redis that connects each client through only once the gate
/// opens; the server's Celery sink talks to Redis through it in `--delivery-backlog` runs.
struct RedisGateProxy {
    /// `redis://127.0.0.1:<port>/<db>`: the broker URL the server is given.
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl RedisGateProxy {
    async fn start(redis_url: &str, gate: Gate) -> anyhow::Result<RedisGateProxy> {
        let parsed = url::Url::parse(redis_url).context("--redis-url is not a URL")?;
        let upstream = format!(
            "{}:{}",
            parsed.host_str().unwrap_or("127.0.0.1"),
            parsed.port().unwrap_or(6379)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut url = parsed.clone();
        url.set_host(Some("127.0.0.1"))?;
        url.set_port(Some(listener.local_addr()?.port()))
            .map_err(|_| anyhow::anyhow!("cannot set the proxy's port"))?;
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (mut gate, upstream) = (gate.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = gate.wait_for(|open| *open).await;
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Ok(RedisGateProxy {
            url: url.to_string(),
            task,
        })
    }
}

impl Drop for RedisGateProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches the length of the run's Celery queue (nothing consumes it during the lifecycle
/// run) every millisecond: when the first message arrived and when the last.
struct QueueWatch {
    first: Arc<Mutex<Option<Instant>>>,
    full: Arc<Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl QueueWatch {
    fn start(broker: Arc<BenchBroker>, expected: usize) -> QueueWatch {
        let first = Arc::new(Mutex::new(None));
        let full = Arc::new(Mutex::new(None));
        let (first_seen, full_seen) = (first.clone(), full.clone());
        let task = tokio::spawn(async move {
            loop {
                let length = broker.queue_length().await.unwrap_or(0);
                let now = Instant::now();
                if length > 0 {
                    first_seen.lock().expect("watch lock").get_or_insert(now);
                }
                if length as usize >= expected {
                    *full_seen.lock().expect("watch lock") = Some(now);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        QueueWatch { first, full, task }
    }
}

impl Drop for QueueWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sinks of one lifecycle run: what the server is told, and how arrivals are watched.
pub struct SinkRun {
    receiver: Option<Receiver>,
    broker: Option<Arc<BenchBroker>>,
    proxy: Option<RedisGateProxy>,
    watch: Option<QueueWatch>,
    expected: usize,
    /// Opens the gate (`--delivery-backlog`); open from the start otherwise.
    gate: tokio::sync::watch::Sender<bool>,
    backlog: bool,
}

impl SinkRun {
    /// Starts the receiver and/or picks a Redis namespace; `None` when no sink is asked for.
    pub async fn start(args: &Args) -> anyhow::Result<Option<SinkRun>> {
        if args.sinks == Sinks::None {
            return Ok(None);
        }
        let (gate, gate_watch) = tokio::sync::watch::channel(!args.delivery_backlog);
        let receiver = match args.sinks.webhook() {
            true => Some(Receiver::start(gate_watch.clone()).await?),
            false => None,
        };
        let broker = match args.sinks.celery() {
            true => Some(Arc::new(BenchBroker::new(&args.redis_url)?)),
            false => None,
        };
        let mut proxy = None;
        if let Some(broker) = &broker {
            // Fail early, with a clear message, when Redis is not there.
            broker.queue_length().await?;
            if args.delivery_backlog {
                proxy = Some(RedisGateProxy::start(&args.redis_url, gate_watch.clone()).await?);
            }
        }
        let watch = broker
            .as_ref()
            .map(|b| QueueWatch::start(b.clone(), args.jobs));
        Ok(Some(SinkRun {
            receiver,
            broker,
            proxy,
            watch,
            expected: args.jobs,
            gate,
            backlog: args.delivery_backlog,
        }))
    }

    /// The server flags that enable the sinks.
    pub fn server_args(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(receiver) = &self.receiver {
            flags.push(format!("--ingestion-callback-url={}", receiver.url));
            flags.push("--webhook-secret=whsec_bWlyYWctam9icy1iZW5jaC1zZWNyZXQ=".to_owned());
        }
        if let Some(broker) = &self.broker {
            let url = self.proxy.as_ref().map_or(&broker.url, |proxy| &proxy.url);
            flags.extend(broker.server_args(url));
        }
        if self.backlog {
            // The held attempts must not time out while the backlog builds up.
            flags.push("--delivery-attempt-timeout-ms=300000".to_owned());
        }
        flags
    }

    /// Waits until every event reached every sink (at most `limit`), then reports when
    /// they arrived; `run_started` is the first create, `last_result` the last answer.
    pub async fn finish(
        &self,
        run_started: Instant,
        last_result: Instant,
        limit: Duration,
    ) -> anyhow::Result<Vec<Metric>> {
        let give_up = Instant::now() + limit;
        let mut metrics = Vec::new();
        // With a backlog, the sinks were held until now: the rates count from here.
        let opened = Instant::now();
        self.gate.send_replace(true);
        let first_counted = |first: Instant| if self.backlog { opened } else { first };
        if let Some(receiver) = &self.receiver {
            while receiver.distinct() < self.expected {
                if Instant::now() > give_up {
                    bail!(
                        "only {} of {} events reached the webhook receiver",
                        receiver.distinct(),
                        self.expected
                    );
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let arrivals = receiver.arrivals.lock().expect("arrivals lock");
            let (first, last) = (arrivals.first.expect("some"), arrivals.last.expect("some"));
            metrics.extend(arrival_metrics(
                "webhook",
                "webhook receiver",
                self.backlog,
                self.expected,
                first_counted(first),
                last,
                run_started,
                last_result,
            ));
            metrics.push(Metric::new(
                "webhook_requests",
                "webhook receiver: requests (repeats included)",
                arrivals.requests as f64,
                "requests",
            ));
        }
        if let (Some(watch), Some(_)) = (&self.watch, &self.broker) {
            loop {
                let full = *watch.full.lock().expect("watch lock");
                if let Some(full) = full {
                    let first = watch.first.lock().expect("watch lock").unwrap_or(full);
                    metrics.extend(arrival_metrics(
                        "celery",
                        "Celery queue in Redis",
                        self.backlog,
                        self.expected,
                        first_counted(first),
                        full,
                        run_started,
                        last_result,
                    ));
                    break;
                }
                if Instant::now() > give_up || watch.task.is_finished() {
                    bail!("not every event reached the Celery queue in time");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok(metrics)
    }

    pub async fn clean_up(&self) {
        if let Some(broker) = &self.broker {
            broker.clean_up().await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn arrival_metrics(
    key: &str,
    label: &str,
    backlog: bool,
    events: usize,
    first: Instant,
    last: Instant,
    run_started: Instant,
    last_result: Instant,
) -> Vec<Metric> {
    let spread = last
        .saturating_duration_since(first)
        .as_secs_f64()
        .max(1e-6);
    vec![
        Metric::new(
            format!("{key}_events_per_sec"),
            if backlog {
                format!("{label}: events per second, backlog released to last arrival")
            } else {
                format!("{label}: events per second, first to last arrival")
            },
            events as f64 / spread,
            "events/s",
        ),
        Metric::new(
            format!("{key}_first_event_ms"),
            format!("{label}: first event, from the first create"),
            first.saturating_duration_since(run_started).as_secs_f64() * 1e3,
            "ms",
        ),
        Metric::new(
            format!("{key}_lag_after_last_result_ms"),
            format!("{label}: last event, after the last result's answer"),
            last.saturating_duration_since(last_result).as_secs_f64() * 1e3,
            "ms",
        ),
    ]
}

/// A stock Celery worker (solo pool) on the run's queue, recording each task's start.
struct CeleryWorker {
    child: Child,
    record_path: PathBuf,
    log_path: PathBuf,
}

impl CeleryWorker {
    fn start(args: &Args, broker: &BenchBroker, dir: &std::path::Path) -> anyhow::Result<Self> {
        let app_dir = &args.celery_app_dir;
        if !app_dir.join("celery_app.py").is_file() {
            bail!("{app_dir:?} has no celery_app.py: run from the repository root or pass --celery-app-dir");
        }
        let python = match &args.celery_python {
            Some(python) => python.clone(),
            None => PathBuf::from(std::env::var("HOME").context("HOME is not set")?)
                .join(".cache/morag-jobs-venv/bin/python"),
        };
        if !python.exists() {
            bail!("no Python with Celery at {python:?}: run scripts/test.sh once (it creates the tests' virtual environment) or pass --celery-python");
        }
        let record_path = dir.join("tasks.jsonl");
        let log_path = dir.join("celery.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(python)
            .args([
                "-m",
                "celery",
                "-A",
                "celery_app",
                "worker",
                "--pool",
                "solo",
            ])
            .args(["-Q", &broker.stem])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args(["--loglevel", "WARNING"])
            .args(["--hostname", &format!("{}@%h", broker.stem)])
            .current_dir(app_dir)
            .env("MORAG_TEST_CELERY_BROKER", &broker.url)
            .env("MORAG_TEST_CELERY_RECORD", &record_path)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the Celery worker")?;
        Ok(CeleryWorker {
            child,
            record_path,
            log_path,
        })
    }

    /// When the task for `ingestion_task_id` started (seconds since the epoch), once its
    /// record is there.
    fn started_at(&self, ingestion_task_id: &str) -> Option<f64> {
        let text = std::fs::read_to_string(&self.record_path).ok()?;
        text.lines()
            .filter(|line| line.ends_with('}'))
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|record| record["args"][0] == ingestion_task_id)
            .and_then(|record| record["started_at"].as_f64())
    }

    async fn wait_for(&mut self, ingestion_task_id: &str, limit: Duration) -> anyhow::Result<f64> {
        let give_up = Instant::now() + limit;
        loop {
            if let Some(started) = self.started_at(ingestion_task_id) {
                return Ok(started);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                bail!("the Celery worker exited ({status}):\n{log}");
            }
            if Instant::now() > give_up {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                bail!("the Celery worker ran no task for {ingestion_task_id} within {limit:?}; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `celery-latency`: sequential jobs, each claimed, then (after a pause that lets the
/// server go idle) its success result sent; the figure is from sending the result to
/// the Celery task starting in a real worker.
pub async fn celery_latency(args: &Args) -> anyhow::Result<Vec<Metric>> {
    let broker = BenchBroker::new(&args.redis_url)?;
    broker.queue_length().await?;
    let dir = tempfile_dir()?;
    let outcome = async {
        let mut worker = CeleryWorker::start(args, &broker, &dir)?;
        let mut server_args = args.clone();
        server_args
            .server_args
            .extend(broker.server_args(&broker.url));
        let target = Target::open(&server_args).await?;
        let measured = measure_celery_latency(&target, args, &mut worker).await;
        target.close().await;
        measured
    }
    .await;
    broker.clean_up().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "morag-jobs-bench-celery-{}",
        super::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dir:?}"))?;
    Ok(dir)
}

async fn measure_celery_latency(
    target: &Target,
    args: &Args,
    worker: &mut CeleryWorker,
) -> anyhow::Result<Vec<Metric>> {
    let api = &target.api;
    let content_type = unique_content_type("cel");
    target
        .leftover
        .lock()
        .expect("leftover lock")
        .push(content_type.clone());
    let create_url = api.create_url();
    let poll_url = api.poll_url("bench-celery-latency", &content_type, None);
    let pause = Duration::from_millis(args.celery_pause_ms);
    let mut to_task = Latencies::default();
    let mut answers = Latencies::default();
    // The first job also waits for the worker to connect to Redis.
    let warmup = 5;
    progress(&format!(
        "celery-latency: {warmup} warm-up jobs, then {} measured",
        args.celery_jobs
    ));
    let mut measured_from = None;
    for i in 0..(warmup + args.celery_jobs) {
        if i == warmup {
            measured_from = Some((target.cpu(), Instant::now()));
        }
        let n = 1_000_000 + i;
        let ingestion_task_id = format!("bench-{n}");
        api.create(&create_url, &content_type, n).await?;
        let job = api
            .poll(&poll_url)
            .await?
            .context("the job just created was not claimable")?;
        tokio::time::sleep(pause).await;
        let sent_wall = SystemTime::now();
        let sent = Instant::now();
        api.submit(&job).await?;
        let answered = sent.elapsed();
        let limit = if i == 0 {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(10)
        };
        let started = worker.wait_for(&ingestion_task_id, limit).await?;
        let sent_epoch = sent_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs_f64();
        if i >= warmup {
            to_task.push(Duration::from_secs_f64((started - sent_epoch).max(0.0)));
            answers.push(answered);
        }
    }
    let mut metrics = to_task.metrics(
        "result_to_celery_task",
        "result sent -> Celery task started in the worker",
    );
    metrics.extend(answers.metrics("result", "result answered"));
    // Mostly idle time (the pauses): these say how quiet the machine was.
    if let Some((cpu_before, since)) = measured_from {
        metrics.extend(
            target
                .cpu()
                .since(&cpu_before, since.elapsed())
                .metrics(args.celery_jobs),
        );
    }
    Ok(metrics)
}
