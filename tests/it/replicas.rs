//! Several replicas on one PostgreSQL database: three real `morag-jobs serve` processes,
//! sixteen workers spreading their requests over them, thousands of jobs with random
//! failures. Afterwards every job has exactly one terminal outcome, no attempt was handed
//! to two workers, and every history is a chain of allowed transitions. Then the same
//! with one replica SIGKILLed mid-run.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use morag_jobs::domain::JobStatus;
use serde_json::{json, Value};

use crate::support::PgDatabase;

const N_JOBS: usize = 5_000;
const N_WORKERS: usize = 16;
/// Seconds a `document` attempt may run: short, so attempts lost with a killed replica
/// come back soon.
const EXECUTION_TIMEOUT: &str = "8";

/// A `morag-jobs serve` child process, killed when dropped.
struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    fn start(database_url: &str, data_dir: &Path, sources: &Path) -> Replica {
        let mut child = Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--data-dir",
                data_dir.to_str().unwrap(),
            ])
            .args([
                "--database-url",
                database_url,
                "--allowed-roots",
                sources.to_str().unwrap(),
            ])
            .args([
                "--max-retries",
                "2",
                "--retry-backoff-base",
                "1",
                "--retry-backoff-max",
                "1",
            ])
            .args([
                "--timeout-document",
                EXECUTION_TIMEOUT,
                "--monitor-interval",
                "1",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("morag-jobs serve starts");
        // Read the bound address from the log, then keep draining it so the server never
        // blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (address, found) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut address = Some(address);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if let (Some(sender), Some(at)) = (&address, line.find("addr=")) {
                    let addr: String = line[at + 5..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    let _ = sender.send(addr);
                    address = None;
                }
                if line.contains("ERROR") || line.contains("panicked") {
                    eprintln!("replica: {line}");
                }
            }
        });
        let addr = found
            .recv_timeout(Duration::from_secs(30))
            .expect("the replica reports its address");
        Replica {
            child,
            base: format!("http://{addr}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server colours its log even into a pipe; the colour codes split `addr=...`.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What the workers saw.
#[derive(Default)]
struct Observed {
    /// (job, attempt) of every claim a worker received.
    claims: HashSet<(String, u64)>,
    leases: HashSet<String>,
    duplicate_claims: Vec<String>,
    n_results_accepted: usize,
    /// Answers to results other than 200 (after a lost response, or a timed-out attempt).
    n_results_refused: usize,
}

struct Cluster {
    bases: Vec<String>,
    alive: Vec<AtomicBool>,
    client: reqwest::Client,
}

impl Cluster {
    /// A random live replica.
    fn pick(&self) -> usize {
        loop {
            let i = fastrand::usize(..self.bases.len());
            if self.alive[i].load(Ordering::SeqCst) {
                return i;
            }
        }
    }

    /// Sends to a random live replica; a replica that cannot be reached is tried again
    /// elsewhere, like a load balancer would. Returns the status and JSON body.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        for _ in 0..50 {
            let i = self.pick();
            let mut request = self
                .client
                .request(method.clone(), format!("{}{path}", self.bases[i]))
                .timeout(Duration::from_secs(20));
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if status == 503 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    let text = response.text().await.unwrap_or_default();
                    return (status, serde_json::from_str(&text).unwrap_or(Value::Null));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("no replica answered {method} {path}");
    }
}

async fn worker(
    cluster: Arc<Cluster>,
    name: String,
    observed: Arc<Mutex<Observed>>,
    done: Arc<AtomicBool>,
) {
    let poll = format!("/api/v1/remote-jobs/poll?worker_id={name}&content_types=document&wait=1");
    while !done.load(Ordering::SeqCst) {
        let (status, body) = cluster.send(reqwest::Method::GET, &poll, None).await;
        assert_eq!(status, 200, "poll: {body}");
        let Some(id) = body["job_id"].as_str() else {
            continue;
        };
        let lease = body["lease_id"]
            .as_str()
            .expect("a lease with every claim")
            .to_owned();
        let attempt = body["attempt"].as_u64().expect("the attempt number");
        {
            let mut seen = observed.lock().unwrap();
            if !seen.claims.insert((id.to_owned(), attempt)) || !seen.leases.insert(lease.clone()) {
                seen.duplicate_claims
                    .push(format!("{id} attempt {attempt}"));
            }
        }
        let result = if fastrand::f64() < 0.2 {
            json!({"success": false, "error_message": "random failure", "lease_id": lease})
        } else {
            json!({"success": true, "content": format!("text of {id}"), "metadata": {"attempt": attempt}, "processing_time": 0.01, "lease_id": lease})
        };
        let (status, _) = cluster
            .send(
                reqwest::Method::PUT,
                &format!("/api/v1/remote-jobs/{id}/result"),
                Some(&result),
            )
            .await;
        let mut seen = observed.lock().unwrap();
        if status == 200 {
            seen.n_results_accepted += 1;
        } else {
            seen.n_results_refused += 1;
        }
    }
}

/// Runs the whole scenario; `kill_one` SIGKILLs a replica once a third of the jobs finished.
async fn run(kill_one: bool) {
    let database = PgDatabase::create().await;
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let sources = dirs[3].path().canonicalize().unwrap();
    let source = sources.join("source.pdf");
    std::fs::write(&source, b"%PDF").unwrap();
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start(&database.url, dirs[i].path(), &sources))
        .collect();
    let cluster = Arc::new(Cluster {
        bases: replicas.iter().map(|r| r.base.clone()).collect(),
        alive: (0..3).map(|_| AtomicBool::new(true)).collect(),
        client: reqwest::Client::new(),
    });
    for base in &cluster.bases {
        let ready = Instant::now();
        while cluster
            .client
            .get(format!("{base}/health"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok()
            != Some(200)
        {
            assert!(
                ready.elapsed() < Duration::from_secs(30),
                "{base} never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let started = Instant::now();
    let observed = Arc::new(Mutex::new(Observed::default()));
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..N_WORKERS)
        .map(|w| {
            tokio::spawn(worker(
                cluster.clone(),
                format!("worker-{w}"),
                observed.clone(),
                done.clone(),
            ))
        })
        .collect();

    // Jobs are created while the workers run, through every replica.
    let created = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let creators: Vec<_> = (0..8)
        .map(|_| {
            let (cluster, created, acknowledged) = (cluster.clone(), created.clone(), acknowledged.clone());
            let source = source.to_str().unwrap().to_owned();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let n = created.fetch_add(1, Ordering::SeqCst);
                    if n >= N_JOBS {
                        break;
                    }
                    // One ingestion task per job: repeats of one task's create are one job.
                    let body = json!({"source_file_path": source, "content_type": "document", "ingestion_task_id": format!("load-{n}")});
                    let (status, body) = cluster.send(reqwest::Method::POST, "/api/v1/remote-jobs/", Some(&body)).await;
                    assert_eq!(status, 200, "create: {body}");
                    ids.push(body["job_id"].as_str().unwrap().to_owned());
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                ids
            })
        })
        .collect();
    // Wait until every job is created and finished, killing a replica on the way (while
    // jobs are still being created and worked on) if asked.
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut killed = false;
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE status IN ('completed', 'failed', 'timeout', 'cancelled')), count(*) FROM jobs",
                &[],
            )
            .await
            .unwrap();
        let (finished, total): (i64, i64) = (row.get(0), row.get(1));
        if kill_one && !killed && finished >= (N_JOBS as i64) / 4 {
            cluster.alive[0].store(false, Ordering::SeqCst);
            replicas[0].kill();
            killed = true;
            eprintln!("killed a replica with {total} jobs created, {finished} finished");
        }
        // A create whose answer was lost with the killed replica is sent again, so the
        // table may hold a few more jobs than were acknowledged.
        if acknowledged.load(Ordering::SeqCst) == N_JOBS && finished == total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "{finished} of {total} jobs finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ids = Vec::new();
    for creator in creators {
        ids.extend(creator.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(!kill_one || killed);
    let observed = std::mem::take(&mut *observed.lock().unwrap());
    eprintln!(
        "{} jobs acknowledged in {:?}: {} claims seen, {} results accepted, {} refused, replica killed: {killed}",
        ids.len(),
        started.elapsed(),
        observed.claims.len(),
        observed.n_results_accepted,
        observed.n_results_refused
    );

    // Every acknowledged job exists, once.
    assert_eq!(ids.len(), N_JOBS);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), N_JOBS);
    assert!(
        observed.duplicate_claims.is_empty(),
        "attempts handed out twice: {:?}",
        observed.duplicate_claims
    );

    let rows = client
        .query("SELECT id, status, attempt FROM jobs", &[])
        .await
        .unwrap();
    let n_rows = rows.len();
    eprintln!("{n_rows} jobs stored");
    assert!(
        n_rows == N_JOBS || (kill_one && n_rows < N_JOBS + 20),
        "{n_rows} jobs stored"
    );
    let jobs: HashMap<String, (String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for id in &ids {
        assert!(jobs.contains_key(id), "acknowledged job {id} is missing");
    }

    // Exactly one hand-off per job, matching its outcome.
    let handoffs = client
        .query("SELECT job_id, kind FROM handoffs", &[])
        .await
        .unwrap();
    let mut handoff_of: HashMap<String, String> = HashMap::new();
    for row in &handoffs {
        let previous = handoff_of.insert(row.get(0), row.get(1));
        assert!(
            previous.is_none(),
            "two hand-offs for job {}",
            row.get::<_, String>(0)
        );
    }
    for (id, (status, _)) in &jobs {
        let expected = match status.as_str() {
            "completed" => "job.completed",
            "failed" | "timeout" => "job.failed",
            other => panic!("job {id} ended {other}"),
        };
        assert_eq!(
            handoff_of.get(id).map(String::as_str),
            Some(expected),
            "job {id}"
        );
    }
    if !kill_one {
        let n_completed = jobs.values().filter(|(s, _)| s == "completed").count();
        assert!(n_completed > N_JOBS * 9 / 10, "{n_completed} completed");
    }

    let n_timeouts: i64 = client
        .query_one(
            "SELECT count(*) FROM job_history WHERE to_status = 'timeout'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("{n_timeouts} attempts timed out (lost with the killed replica)");

    // Histories: a chain of allowed transitions from creation to the job's status, with
    // one claim per attempt.
    let history = client
        .query(
            "SELECT j.id, h.from_status, h.to_status FROM job_history h JOIN jobs j ON j.seq = h.job_seq ORDER BY h.job_seq, h.id",
            &[],
        )
        .await
        .unwrap();
    let mut chains: HashMap<String, Vec<(Option<String>, String)>> = HashMap::new();
    for row in &history {
        chains
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2)));
    }
    assert_eq!(chains.len(), n_rows);
    for (id, chain) in &chains {
        assert_eq!(
            chain[0],
            (None, "pending".to_owned()),
            "job {id} starts with its creation"
        );
        for pair in chain.windows(2) {
            let (from, to) = (&pair[1].0, &pair[1].1);
            assert_eq!(
                from.as_deref(),
                Some(pair[0].1.as_str()),
                "job {id}: {chain:?}"
            );
            let (from, to) = (
                JobStatus::parse(from.as_deref().unwrap()).unwrap(),
                JobStatus::parse(to).unwrap(),
            );
            assert!(
                from.can_move_to(to),
                "job {id}: {from} -> {to} in {chain:?}"
            );
        }
        let (status, attempt) = &jobs[id];
        assert_eq!(&chain.last().unwrap().1, status, "job {id}");
        let claims = chain.iter().filter(|(_, to)| to == "processing").count();
        assert_eq!(claims as i32, *attempt, "job {id}: one claim per attempt");
    }

    // The counters agree with the table.
    let stats: Value = cluster
        .client
        .get(format!(
            "{}/api/v1/remote-jobs/statistics",
            cluster.bases[cluster.pick()]
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["total_jobs"], n_rows, "{stats}");
    drop(replicas);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_finish_every_job_exactly_once() {
    run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run_loses_no_job() {
    run(true).await;
}
