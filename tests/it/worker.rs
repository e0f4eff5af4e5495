//! `morag-jobs worker` end to end: the real server binary and real worker processes
//! running a small shell script as the converter. Short real-time timeouts keep the file
//! fast (heartbeat timeout 3 s, so workers heartbeat every second; no retry backoff).
//! With `MORAG_TEST_STORE=postgres` the server runs on a fresh PostgreSQL database.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use morag_jobs_client::wire::CreateJobRequest;
use morag_jobs_client::ServerClient;
use serde_json::{json, Value};

use crate::support::{free_port, get_json, PgDatabase, ServerProcess};

/// The converter. The first word of its input says what to do; `$PIDS` is where it leaves
/// its own and its child's process ids for the tests that stop it.
const SCRIPT: &str = r#"#!/bin/sh
input="$1"
[ "$2" = "$MORAG_JOB_ID" ] || { echo "placeholder {job_id} was not replaced" >&2; exit 1; }
[ "$3" = "$MORAG_JOB_CONTENT_TYPE" ] || { echo "placeholder {content_type} was not replaced" >&2; exit 1; }
[ "$input" = "$MORAG_JOB_INPUT" ] || { echo "placeholder {input} was not replaced" >&2; exit 1; }
read -r kind rest < "$input"
case "$kind" in
  ok)
    printf 'converted %s (%s)\n' "$rest" "$MORAG_JOB_CONTENT_TYPE"
    printf '{"job": "%s", "item": "%s", "options": %s}' "$MORAG_JOB_ID" "$rest" "$MORAG_JOB_OPTIONS" > "$MORAG_JOB_METADATA_OUT"
    ;;
  progress)
    echo "PROGRESS 40 halfway there" >&2
    echo "an ordinary log line" >&2
    sleep 1.6
    echo "done with progress"
    ;;
  fail)
    echo "loading codec" >&2
    echo "cannot decode frame 7" >&2
    exit 1
    ;;
  permanent)
    echo "the file is corrupt" >&2
    exit 3
    ;;
  slow)
    echo $$ > "$PIDS/$MORAG_JOB_ID.sh"
    sleep 60 &
    echo $! > "$PIDS/$MORAG_JOB_ID.child"
    wait
    ;;
  slow-once)
    if [ ! -e "$PIDS/$MORAG_JOB_ID.started" ]; then
      touch "$PIDS/$MORAG_JOB_ID.started"
      echo $$ > "$PIDS/$MORAG_JOB_ID.sh"
      sleep 60 &
      echo $! > "$PIDS/$MORAG_JOB_ID.child"
      wait
    fi
    echo "finished on the second try"
    ;;
esac
"#;

/// Server settings: heartbeat every second (timeout 3 s), retries at once, two of them.
const SERVER_ENV: &[(&str, &str)] = &[
    ("MORAG_REMOTE_HEARTBEAT_TIMEOUT", "3"),
    ("MORAG_REMOTE_RETRY_BACKOFF_BASE", "0"),
    ("MORAG_REMOTE_RETRY_BACKOFF_MAX", "0"),
    ("MORAG_REMOTE_MAX_RETRIES", "2"),
    ("MORAG_JOB_MONITOR_INTERVAL", "1"),
];

struct Setup {
    server: ServerProcess,
    client: reqwest::Client,
    data: tempfile::TempDir,
    /// The workers' `TMPDIR`: empty whenever no job runs.
    temp: PathBuf,
    pids: PathBuf,
    script: PathBuf,
    _database: Option<PgDatabase>,
}

impl Setup {
    async fn start() -> Setup {
        let data = tempfile::tempdir().unwrap();
        let mut env: Vec<(&str, String)> = SERVER_ENV
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        let database = if std::env::var("MORAG_TEST_STORE").as_deref() == Ok("postgres") {
            let database = PgDatabase::create().await;
            env.push(("MORAG_DATABASE_URL", database.url.clone()));
            Some(database)
        } else {
            None
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let server = ServerProcess::start(data.path(), free_port(), &env);
        let client = reqwest::Client::new();
        server.wait_healthy(&client).await;
        let temp = data.path().join("worker-tmp");
        let pids = data.path().join("pids");
        std::fs::create_dir_all(&temp).unwrap();
        std::fs::create_dir_all(&pids).unwrap();
        let script = data.path().join("convert.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        Setup {
            server,
            client,
            data,
            temp,
            pids,
            script,
            _database: database,
        }
    }

    /// A `morag-jobs worker` process.
    fn worker(&self, id: &str, extra: &[&str]) -> WorkerProcess {
        let exec = format!(
            "sh {} {{input}} {{job_id}} {{content_type}}",
            self.script.display()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
            .args(["worker", "--worker-id", id, "--exec", &exec])
            .args(extra)
            .env("MORAG_WORKER_URL", &self.server.base)
            .env("MORAG_WORKER_POLL_WAIT", "2s")
            .env("MORAG_WORKER_KILL_GRACE", "1s")
            .env("TMPDIR", &self.temp)
            .env("PIDS", &self.pids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts");
        WorkerProcess(child)
    }

    async fn create(&self, content_type: &str, input: &str) -> String {
        let path = self
            .data
            .path()
            .canonicalize()
            .unwrap()
            .join("files")
            .join(format!("{}.src", crate::support::uuid_like()));
        std::fs::write(&path, format!("{input}\n")).unwrap();
        // Created through the client library's typed API, as a Rust ingestion would.
        let request = CreateJobRequest {
            source_file_path: path.to_string_lossy().into_owned(),
            content_type: content_type.to_owned(),
            task_options: [("language".to_owned(), json!("en"))].into_iter().collect(),
            ingestion_task_id: "ingest-w".into(),
        };
        ServerClient::new(&self.server.base, None)
            .unwrap()
            .create_job(&request)
            .await
            .expect("created")
            .job_id
    }

    async fn detail(&self, id: &str) -> Value {
        get_json(
            &self.client,
            format!("{}/api/v1/remote-jobs/{id}", self.server.base),
        )
        .await
    }

    /// Waits until `done` holds for the job's detail, and returns it.
    async fn wait_for(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let detail = self.detail(id).await;
            if done(&detail) {
                return detail;
            }
            assert!(
                started.elapsed() < within,
                "job {id} did not get there in {within:?}: {detail:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's worker registry (`GET /api/v1/workers`).
    async fn workers(&self) -> Value {
        get_json(&self.client, format!("{}/api/v1/workers", self.server.base)).await
    }

    /// The one record of `worker` in a registry listing.
    fn worker_record<'a>(&self, registry: &'a Value, worker: &str) -> &'a Value {
        let mut records = registry["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["worker_id"] == worker);
        let record = records
            .next()
            .unwrap_or_else(|| panic!("no {worker} in {registry:#}"));
        assert!(
            records.next().is_none(),
            "two records of {worker}: {registry:#}"
        );
        record
    }

    fn temp_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.temp)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The process id the script wrote to `$PIDS/<job>.<what>`, once it exists.
    async fn pid_of(&self, job: &str, what: &str) -> i32 {
        let path = self.pids.join(format!("{job}.{what}"));
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(pid) = text.trim().parse() {
                    return pid;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(15), "no {path:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct WorkerProcess(Child);

impl WorkerProcess {
    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits for the worker to exit, at most `within`.
    async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "the worker did not exit in {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a process is still running (a zombie, waiting for its parent, is not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

async fn gone_within(pid: i32, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !alive(pid)
}

fn reasons(detail: &Value) -> Vec<(String, String, String, String)> {
    detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
            (text("from"), text("to"), text("actor"), text("reason"))
        })
        .collect()
}

fn is_finished(detail: &Value) -> bool {
    matches!(
        detail["status"].as_str(),
        Some("completed" | "failed" | "timeout" | "cancelled")
    )
}

/// The issue's 200 jobs of five types, plus a failing, a permanently failing and a
/// progress-reporting one, taken by two workers of three slots each and, beside them, by
/// MoRAG's remote-converter request sequence (`morag_converter_replay`: no heartbeats, no
/// lease, no release) for the types it asks for. Every job ends with the script's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_convert_mixed_jobs_with_real_output_metadata_failures_and_progress() {
    let setup = Setup::start().await;
    let types = ["audio", "video", "document", "image", "web"];
    let mut jobs = Vec::new();
    for n in 0..200 {
        let content_type = types[n % types.len()];
        let item = format!("item-{n}");
        let id = setup.create(content_type, &format!("ok {item}")).await;
        jobs.push((id, content_type, item));
    }
    let failing = setup.create("document", "fail").await;
    let permanent = setup.create("document", "permanent").await;
    let progress = setup.create("audio", "progress").await;
    // MoRAG's client starts first, so it surely gets some of its types' jobs.
    let all_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let morag = tokio::spawn(morag_converter_replay(
        setup.server.base.clone(),
        all_done.clone(),
    ));
    let _first = setup.worker(
        "gpu-a",
        &[
            "--concurrency",
            "3",
            "--content-types",
            "audio,video,document,image,web",
        ],
    );
    let _second = setup.worker("gpu-b", &["--concurrency", "3"]);

    let mut workers_seen = std::collections::BTreeSet::new();
    for (id, content_type, item) in &jobs {
        let detail = setup
            .wait_for(id, Duration::from_secs(60), is_finished)
            .await;
        assert_eq!(detail["status"], "completed", "{detail:#}");
        assert_eq!(
            detail["result"]["content"],
            format!("converted {item} ({content_type})\n")
        );
        assert_eq!(
            detail["result"]["metadata"],
            json!({"job": id, "item": item, "options": {"language": "en"}})
        );
        assert_eq!(
            (detail["retry_count"].as_u64(), detail["attempt"].as_u64()),
            (Some(0), Some(1))
        );
        workers_seen.insert(detail["worker_id"].as_str().unwrap().to_owned());
    }
    all_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let morag_jobs = morag.await.unwrap();
    assert!(morag_jobs > 0, "MoRAG's client took no job");
    assert_eq!(
        workers_seen.into_iter().collect::<Vec<_>>(),
        vec!["gpu-a", "gpu-b", "morag-box"],
        "both workers and MoRAG's client took jobs"
    );

    let failed = setup
        .wait_for(&failing, Duration::from_secs(20), is_finished)
        .await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(
        (failed["retry_count"].as_u64(), failed["attempt"].as_u64()),
        (Some(2), Some(3))
    );
    let message = failed["error_message"].as_str().unwrap();
    assert!(
        message.contains("exit code 1") && message.contains("loading codec\ncannot decode frame 7"),
        "{message}"
    );

    let refused = setup
        .wait_for(&permanent, Duration::from_secs(20), is_finished)
        .await;
    assert_eq!(refused["status"], "failed");
    assert_eq!(
        (refused["retry_count"].as_u64(), refused["attempt"].as_u64()),
        (Some(0), Some(1))
    );
    assert!(refused["error_message"]
        .as_str()
        .unwrap()
        .contains("the file is corrupt"));

    let reported = setup
        .wait_for(&progress, Duration::from_secs(20), is_finished)
        .await;
    assert_eq!(reported["status"], "completed", "{reported:#}");
    assert_eq!(reported["progress_message"], "halfway there");
    assert_eq!(reported["result"]["content"], "done with progress\n");

    // The registry counted every result: 201 successes and 4 failures (three attempts of
    // the failing job, one of the permanent one), across our two workers' processes and
    // MoRAG's client, none of them holding a job now.
    let registry = setup.workers().await;
    let records = registry["workers"].as_array().unwrap();
    let total = |field: &str| {
        records
            .iter()
            .map(|w| w[field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(
        (total("completed"), total("failed"), total("jobs_in_flight")),
        (201, 4, 0),
        "{registry:#}"
    );
    let morag_record = setup.worker_record(&registry, "morag-box");
    assert_eq!(morag_record["instance"], Value::Null);
    assert_eq!(morag_record["completed"].as_u64(), Some(morag_jobs));
    for worker in ["gpu-a", "gpu-b"] {
        let record = setup.worker_record(&registry, worker);
        assert_eq!(record["status"], "healthy", "{record:#}");
        assert!(
            record["instance"].as_str().is_some_and(|i| i.len() == 36),
            "{record:#}"
        );
    }

    // Each job's temporary directory went with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(setup.temp_entries(), Vec::<String>::new());
}

/// MoRAG's remote-converter, request by request as `tests/it/morag_client.rs` replays it
/// (`content_types` comma as `%2C`, `max_jobs=1`, no wait, the download at the base URL
/// plus `source_file_url`, a result without a lease), converting as the script does. It
/// asks for web and image jobs only, which are all plain conversions. Returns how many
/// jobs it completed.
async fn morag_converter_replay(
    base: String,
    all_done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let client = reqwest::Client::new();
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let mut completed = 0;
    while !all_done.load(std::sync::atomic::Ordering::SeqCst) {
        let job: Value = get_json(&client, format!(
                "{base}/api/v1/remote-jobs/poll?worker_id=morag-box&content_types=web%2Cimage&max_jobs=1"
            )).await;
        let Some(job_id) = job["job_id"].as_str() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let source = client
            .get(format!(
                "{base}{}",
                job["source_file_url"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(source.status(), 200);
        let text = source.text().await.unwrap();
        let item = text
            .trim()
            .strip_prefix("ok ")
            .expect("only plain conversions");
        let content_type = job["content_type"].as_str().unwrap();
        let payload = json!({
            "success": true,
            "content": format!("converted {item} ({content_type})\n"),
            "metadata": {"job": job_id, "item": item, "options": job["task_options"]},
            "processing_time": 0.01,
        });
        let result = client
            .put(format!("{base}/api/v1/remote-jobs/{job_id}/result"))
            .header("Content-Type", "application/json")
            .body(payload.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200, "the client only checks for 200");
        completed += 1;
    }
    completed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_job_stops_its_command_and_the_commands_children() {
    let setup = Setup::start().await;
    let id = setup.create("video", "slow").await;
    let _worker = setup.worker("gpu-c", &[]);
    let shell = setup.pid_of(&id, "sh").await;
    let child = setup.pid_of(&id, "child").await;
    assert!(alive(shell) && alive(child));
    let cancelled = setup
        .client
        .post(format!(
            "{}/api/v1/remote-jobs/{id}/cancel",
            setup.server.base
        ))
        .json(&json!({"reason": "not needed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let started = Instant::now();
    assert!(
        gone_within(shell, Duration::from_secs(5)).await,
        "the command still runs"
    );
    assert!(
        gone_within(child, Duration::from_secs(5)).await,
        "its child still runs"
    );
    eprintln!(
        "command and child gone {:?} after the cancel",
        started.elapsed()
    );
    let started = Instant::now();
    while !setup.temp_entries().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "temp dir left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(setup.detail(&id).await["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_running_job_to_another_worker_without_a_retry() {
    let setup = Setup::start().await;
    let id = setup.create("audio", "slow-once").await;
    let mut leaving = setup.worker("gpu-leaving", &["--shutdown-grace", "1s"]);
    let shell = setup.pid_of(&id, "sh").await;
    let child = setup.pid_of(&id, "child").await;
    let _staying = setup.worker("gpu-staying", &[]);
    let before = setup.detail(&id).await;
    assert_eq!(before["worker_id"], "gpu-leaving");
    assert_eq!(before["status"], "processing");

    leaving.signal("-TERM");
    let status = leaving.exited(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(!alive(shell) && gone_within(child, Duration::from_secs(2)).await);

    let done = setup
        .wait_for(&id, Duration::from_secs(15), is_finished)
        .await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["result"]["content"], "finished on the second try\n");
    assert_eq!(done["worker_id"], "gpu-staying");
    assert_eq!(
        (done["retry_count"].as_u64(), done["attempt"].as_u64()),
        (Some(0), Some(2))
    );
    let history = reasons(&done);
    let release = history
        .iter()
        .find(|(from, to, _, _)| from == "processing" && to == "pending")
        .unwrap_or_else(|| panic!("no release in {history:?}"));
    assert_eq!(release.2, "worker");
    assert!(
        release.3.contains("released") && release.3.contains("worker shutting down"),
        "{}",
        release.3
    );
    assert!(
        !history
            .iter()
            .any(|(_, to, _, _)| to == "retrying" || to == "failed" || to == "timeout"),
        "{history:?}"
    );
    assert_eq!(setup.temp_entries(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_sigkilled_worker_is_retried_by_the_other_after_the_heartbeat_timeout() {
    let setup = Setup::start().await;
    let id = setup.create("video", "slow-once").await;
    let mut killed = setup.worker("gpu-killed", &[]);
    let shell = setup.pid_of(&id, "sh").await;
    let child = setup.pid_of(&id, "child").await;
    let _other = setup.worker("gpu-other", &[]);

    // The registry shows both workers healthy, the first one holding the job.
    let started = Instant::now();
    let registry = loop {
        let registry = setup.workers().await;
        let listed = registry["workers"].as_array().unwrap().len();
        if listed == 2 || started.elapsed() > Duration::from_secs(10) {
            break registry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let holder = setup.worker_record(&registry, "gpu-killed");
    assert_eq!(
        (holder["status"].as_str(), holder["jobs_in_flight"].as_u64()),
        (Some("healthy"), Some(1)),
        "{registry:#}"
    );
    assert_eq!(
        setup.worker_record(&registry, "gpu-other")["status"],
        "healthy"
    );

    killed.0.kill().unwrap(); // SIGKILL: no release, no more heartbeats.
    killed.0.wait().unwrap();
    // The command and its child die with their worker: the guard in the command's process
    // group sees the worker's lifeline end and kills the group (see `worker::command`).
    assert!(
        gone_within(shell, Duration::from_secs(5)).await,
        "the killed worker's command still runs"
    );
    assert!(
        gone_within(child, Duration::from_secs(5)).await,
        "the killed worker's command's child still runs"
    );

    // Silent past the heartbeat timeout (3 s) while holding a job: stale; the other stays
    // healthy (it long-polls every 2 s).
    let started = Instant::now();
    loop {
        let registry = setup.workers().await;
        let holder = setup.worker_record(&registry, "gpu-killed");
        if holder["status"] == "stale" {
            assert_eq!(holder["jobs_in_flight"], 1, "{registry:#}");
            assert_eq!(
                setup.worker_record(&registry, "gpu-other")["status"],
                "healthy"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the killed worker is still healthy: {registry:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = setup
        .wait_for(&id, Duration::from_secs(15), is_finished)
        .await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["worker_id"], "gpu-other");
    assert_eq!(
        (done["retry_count"].as_u64(), done["attempt"].as_u64()),
        (Some(1), Some(2)),
        "the lost attempt counts as a timeout"
    );
    let history = reasons(&done);
    assert!(
        history
            .iter()
            .any(|(from, to, actor, _)| from == "processing"
                && to == "timeout"
                && actor == "monitor"),
        "{history:?}"
    );
}

/// The release endpoint's refusals: a stale lease is a 409 like a heartbeat's, a released
/// job is claimable at once, and a bad body is a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_endpoint_fences_stale_leases() {
    let setup = Setup::start().await;
    let id = setup.create("image", "ok x").await;
    let base = &setup.server.base;
    let (client, id_ref) = (&setup.client, id.as_str());
    let poll = || async {
        setup
            .client
            .get(format!(
                "{base}/api/v1/remote-jobs/poll?worker_id=w&content_types=image"
            ))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let release = |lease: Value| async move {
        let response = client
            .post(format!("{base}/api/v1/remote-jobs/{id_ref}/release"))
            .json(&json!({"lease_id": lease}))
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    let claimed = poll().await;
    let lease = claimed["lease_id"].clone();
    let (status, body) = release(json!("00000000-0000-4000-8000-000000000000")).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = release(json!("not a lease")).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = release(lease.clone()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("pending")),
        "{body}"
    );
    let (status, body) = release(lease).await;
    assert_eq!(status, 409, "{body}");
    let again = poll().await;
    assert_eq!(again["job_id"].as_str(), Some(id.as_str()));
    assert_eq!(again["attempt"], 2);

    // A job is released at most ten times (`MAX_RELEASES_PER_JOB`): a worker releasing it
    // forever would keep it from ever failing. Past that, the attempt stays the worker's
    // and ends at its timeout like an abandoned one.
    let mut lease = again["lease_id"].clone();
    for n in 2..=10 {
        let (status, body) = release(lease).await;
        assert_eq!(status, 200, "release {n}: {body}");
        let claimed = poll().await;
        assert_eq!(claimed["job_id"].as_str(), Some(id.as_str()));
        lease = claimed["lease_id"].clone();
    }
    let (status, body) = release(lease).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("released 10 times already"),
        "{body}"
    );
    assert_eq!(body["current_status"], "processing");
    assert_eq!(setup.detail(&id).await["retry_count"], 0);
}
