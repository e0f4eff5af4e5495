//! `morag-jobs worker`: takes jobs from a server and runs a converter command on each.
//!
//! Per job: long-poll, download the source into a private temporary directory, run the
//! command (see `command`), heartbeat while it runs (carrying its `PROGRESS` reports),
//! submit its stdout and metadata or its failure, remove the directory. A heartbeat that
//! answers "cancelled" or "lease lost" stops the command. On SIGTERM/SIGINT the worker
//! stops polling, lets running jobs finish within the shutdown grace and releases the
//! rest, so another worker takes them at once without a retry spent.
//!
//! Talks to the server only over HTTP (`crate::client`). `morag-jobs worker` runs it with
//! the process's signals (`run`); a program embedding it chooses when to stop (`run_until`).

mod command;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::client::{self, ClaimedJob, ClientError, ServerClient};
use crate::wire::SubmitResultRequest;
use command::{ProgressReport, Running};

pub use command::{parse_progress, render_command, shell_quote};

/// How long results and releases are retried through network trouble.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(60);
/// Heartbeats carrying new progress are sent at most this often.
const PROGRESS_HEARTBEAT_SPACING: Duration = Duration::from_secs(1);
/// The interval used when the server announces none (MoRAG's own server).
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Base URL of the server (`http://` is assumed when no scheme is given).
    #[arg(
        long,
        env = "MORAG_WORKER_URL",
        default_value = "http://127.0.0.1:8700"
    )]
    pub url: String,
    /// Worker API key (sent as `Authorization: Bearer KEY`).
    #[arg(long, env = "MORAG_WORKER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// This worker's name, shown in the jobs it takes.
    #[arg(long, env = "MORAG_WORKER_ID")]
    pub worker_id: String,
    /// Content types to take, comma-separated (none: any type).
    #[arg(long, env = "MORAG_WORKER_CONTENT_TYPES", value_delimiter = ',')]
    pub content_types: Vec<String>,
    /// Jobs run at once.
    #[arg(long, env = "MORAG_WORKER_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// The converter command, run through `sh -c`; `{input}`, `{job_id}` and
    /// `{content_type}` are replaced by shell-quoted values (do not quote them yourself).
    #[arg(long, env = "MORAG_WORKER_EXEC")]
    pub exec: String,
    /// Exit codes that mean retrying cannot help: the job fails at once.
    #[arg(
        long,
        env = "MORAG_WORKER_PERMANENT_EXIT_CODES",
        value_delimiter = ',',
        default_value = "3"
    )]
    pub permanent_exit_codes: Vec<i32>,
    /// How long a stopped command gets between SIGTERM and SIGKILL (e.g. 10s, 500ms).
    #[arg(long, env = "MORAG_WORKER_KILL_GRACE", default_value = "10s",
          value_parser = parse_duration)]
    pub kill_grace: Duration,
    /// On SIGTERM/SIGINT, how long running jobs may still take before they are stopped
    /// and released.
    #[arg(long, env = "MORAG_WORKER_SHUTDOWN_GRACE", default_value = "60s",
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long one poll waits for a job (at most 30s, the protocol's limit).
    #[arg(long, env = "MORAG_WORKER_POLL_WAIT", default_value = "30s",
          value_parser = parse_duration)]
    pub poll_wait: Duration,
    /// Where the per-job temporary directories go (default: the system's, `$TMPDIR`).
    #[arg(long, env = "MORAG_WORKER_TEMP_DIR")]
    pub temp_dir: Option<PathBuf>,
}

/// A duration: plain seconds (`90`, `0.5`) or humantime (`90s`, `500ms`, `5m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(Duration::from_secs_f64(seconds));
        }
    }
    humantime::parse_duration(text)
        .map_err(|_| "expected seconds or a duration, e.g. 10, 10s, 500ms or 2m".to_owned())
}

/// Everything a job needs from the worker.
struct Shared {
    args: WorkerArgs,
    permanent: BTreeSet<i32>,
    client: ServerClient,
    temp_root: PathBuf,
    /// True once SIGTERM/SIGINT arrived: no more polls.
    shutting_down: watch::Receiver<bool>,
    /// True once the shutdown grace ran out: running jobs are stopped and released.
    grace_over: watch::Receiver<bool>,
}

/// Runs the worker until SIGTERM or SIGINT, then shuts down as described above.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    run_until(args, shutdown_signal()).await
}

/// Runs the worker until `shutdown` completes: then it takes no more jobs, lets running
/// ones finish within the shutdown grace, releases the rest and returns.
pub async fn run_until(
    mut args: WorkerArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // `--content-types ''` (or an empty variable) means any type, as leaving it out does.
    args.content_types.retain(|t| !t.trim().is_empty());
    let client = ServerClient::new(&args.url, args.api_key.clone())?.identify(&args.worker_id);
    let temp_root = args.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let (shutdown_tx, shutting_down) = watch::channel(false);
    let (grace_tx, grace_over) = watch::channel(false);
    let shared = Arc::new(Shared {
        permanent: args.permanent_exit_codes.iter().copied().collect(),
        client,
        temp_root,
        shutting_down,
        grace_over,
        args,
    });
    tracing::info!(
        worker_id = %shared.args.worker_id,
        url = %shared.args.url,
        concurrency = shared.args.concurrency,
        content_types = %shared.args.content_types.join(","),
        "worker started"
    );
    let mut slots = tokio::task::JoinSet::new();
    for _ in 0..shared.args.concurrency {
        slots.spawn(slot_loop(shared.clone()));
    }
    let grace = shared.args.shutdown_grace;
    let signals = tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
        tokio::time::sleep(grace).await;
        let _ = grace_tx.send(true);
    });
    let mut outcome = Ok(());
    while let Some(ended) = slots.join_next().await {
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                // A refusal no retry can fix (a wrong key, an unknown content type): stop.
                outcome = Err(error);
                slots.abort_all();
            }
            Err(error) if error.is_cancelled() => {}
            Err(error) => outcome = Err(anyhow::anyhow!("a worker task failed: {error}")),
        }
    }
    signals.abort();
    tracing::info!("worker stopped");
    outcome
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received: finishing running jobs, taking no more"),
        _ = int.recv() => tracing::info!("SIGINT received: finishing running jobs, taking no more"),
    }
}

/// One of `concurrency` loops: poll, run, repeat, until shutdown.
async fn slot_loop(shared: Arc<Shared>) -> anyhow::Result<()> {
    let mut shutting_down = shared.shutting_down.clone();
    let mut delay = client::first_delay();
    loop {
        if *shutting_down.borrow() {
            return Ok(());
        }
        let poll = shared.client.poll(
            &shared.args.worker_id,
            &shared.args.content_types,
            shared.args.poll_wait,
        );
        let poll_sent = Instant::now();
        // Dropping a waiting poll claims nothing: the server claims only when it answers.
        let polled = tokio::select! {
            polled = poll => polled,
            _ = became_true(&mut shutting_down) => return Ok(()),
        };
        match polled {
            Ok(Some(job)) => {
                delay = client::first_delay();
                run_job(&shared, job).await;
            }
            Ok(None) if answered_early(poll_sent.elapsed(), shared.args.poll_wait) => {
                // The server did not hold the poll: it has no long polls (MoRAG's own
                // server) or had as many waiting as it allows (MORAG_REMOTE_MAX_LONG_POLLS).
                // Polling again at once would spin; wait, longer each time in a row.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = became_true(&mut shutting_down) => return Ok(()),
                }
                delay = client::next_delay(delay);
            }
            Ok(None) => delay = client::first_delay(),
            Err(ClientError::Refused { status, detail }) => {
                anyhow::bail!("the server refused to hand out jobs ({status}): {detail}")
            }
            Err(ClientError::Transient(cause)) => {
                tracing::warn!(%cause, "poll failed; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = became_true(&mut shutting_down) => return Ok(()),
                }
                delay = client::next_delay(delay);
            }
        }
    }
}

/// True when an empty poll answer came back well before the wait it asked for (always,
/// when it asked for none).
fn answered_early(took: Duration, asked: Duration) -> bool {
    took < asked.min(client::MAX_POLL_WAIT) / 2 || asked.is_zero()
}

/// A private directory for one job, removed when dropped, whatever happened.
struct JobDir(PathBuf);

impl JobDir {
    fn create(root: &Path, job_id: &str) -> std::io::Result<JobDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = root.join(format!("morag-job-{job_id}-{:016x}", fastrand::u64(..)));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(JobDir(path))
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), %error, "cannot remove a job's temporary directory");
        }
    }
}

/// Why a job ended without a result to submit.
enum Interrupted {
    /// An admin cancelled it.
    Cancelled,
    /// The server no longer counts this attempt as ours (timed out, or the job is gone).
    LeaseLost(String),
    /// The worker is shutting down and the grace ran out.
    ShuttingDown,
}

/// What a job came to: a result for the server, or an interruption.
enum JobEnd {
    Submit {
        body: SubmitResultRequest,
        outcome: String,
    },
    Interrupted(Interrupted),
}

async fn run_job(shared: &Shared, job: ClaimedJob) {
    let started = Instant::now();
    let progress = Arc::new(ProgressReport::default());
    let (stop_tx, stop) = watch::channel(None::<Interrupted>);
    let heartbeats = heartbeat_loop(shared, &job, progress.clone(), stop_tx);
    let work = work_on(shared, &job, progress, stop);
    // The heartbeat loop ends only by stopping the work; the work's end ends both.
    let end = tokio::select! {
        end = work => end,
        _ = heartbeats => unreachable_heartbeat_end(),
    };
    let seconds = started.elapsed().as_secs_f64();
    let worker = &shared.args.worker_id;
    match end {
        JobEnd::Submit { mut body, outcome } => {
            body.processing_time = Some(seconds);
            match shared
                .client
                .submit_result(&job, body, SUBMIT_PATIENCE)
                .await
            {
                Ok(_) => {
                    tracing::info!(job_id = %job.job_id, content_type = %job.content_type, %worker, seconds, "job {outcome}")
                }
                Err(error) => {
                    tracing::warn!(job_id = %job.job_id, content_type = %job.content_type, %worker, seconds, %error, "job {outcome}, but its result was not accepted")
                }
            }
        }
        JobEnd::Interrupted(Interrupted::Cancelled) => {
            tracing::info!(job_id = %job.job_id, content_type = %job.content_type, %worker, seconds, "job cancelled by an admin; command stopped")
        }
        JobEnd::Interrupted(Interrupted::LeaseLost(why)) => {
            tracing::warn!(job_id = %job.job_id, content_type = %job.content_type, %worker, seconds, %why, "job no longer ours; command stopped")
        }
        JobEnd::Interrupted(Interrupted::ShuttingDown) => {
            match shared
                .client
                .release(
                    &job,
                    "worker shutting down",
                    SUBMIT_PATIENCE.min(shared.args.kill_grace + Duration::from_secs(5)),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(job_id = %job.job_id, content_type = %job.content_type, %worker, seconds, "job released: the worker is shutting down")
                }
                Err(error) => {
                    tracing::warn!(job_id = %job.job_id, content_type = %job.content_type, %worker, seconds, %error, "job could not be released; it returns after its heartbeat timeout")
                }
            }
        }
    }
}

/// The heartbeat loop never ends by itself (see `heartbeat_loop`).
fn unreachable_heartbeat_end() -> JobEnd {
    JobEnd::Interrupted(Interrupted::LeaseLost("the heartbeat loop ended".into()))
}

/// Heartbeats at the server's interval, and sooner (at most once a second) when the
/// command reports progress. A "cancelled" answer or a lost lease stops the work; after
/// that the loop only waits for the work to end.
async fn heartbeat_loop(
    shared: &Shared,
    job: &ClaimedJob,
    progress: Arc<ProgressReport>,
    stop: watch::Sender<Option<Interrupted>>,
) {
    let interval = job
        .heartbeat_interval_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
    // The first heartbeat goes out at once: a claim does not arm the heartbeat deadline
    // (MoRAG's client never heartbeats), the first heartbeat does, and until then a worker
    // that dies leaves its job to the execution timeout. It costs one write per job
    // (BENCHMARKS.md, worker-overhead) and runs beside the work, not before it.
    let mut last_beat: Option<tokio::time::Instant> = None;
    loop {
        if let Some(last) = last_beat {
            tokio::select! {
                _ = tokio::time::sleep_until(last + interval) => {}
                _ = progress.changed.notified() => {
                    tokio::time::sleep_until(last + PROGRESS_HEARTBEAT_SPACING).await;
                }
            }
        }
        last_beat = Some(tokio::time::Instant::now());
        let latest = progress
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let answer = shared
            .client
            .heartbeat(
                job,
                latest.as_ref().map(|(percent, _)| *percent),
                latest
                    .as_ref()
                    .map(|(_, message)| message.as_str())
                    .filter(|m| !m.is_empty()),
            )
            .await;
        let interrupted = match answer {
            Ok(answer) if answer.cancelled => Interrupted::Cancelled,
            Ok(_) => continue,
            Err(error) if error.attempt_lost() => Interrupted::LeaseLost(error.to_string()),
            Err(error) => {
                tracing::warn!(job_id = %job.job_id, %error, "heartbeat failed; trying again at the next one");
                continue;
            }
        };
        let _ = stop.send(Some(interrupted));
        return std::future::pending().await;
    }
}

/// Downloads, runs the command and decides what to submit, unless stopped first.
async fn work_on(
    shared: &Shared,
    job: &ClaimedJob,
    progress: Arc<ProgressReport>,
    mut stop: watch::Receiver<Option<Interrupted>>,
) -> JobEnd {
    let mut grace_over = shared.grace_over.clone();
    let dir = match JobDir::create(&shared.temp_root, &job.job_id) {
        Ok(dir) => dir,
        Err(error) => {
            return local_failure(format!("cannot create a temporary directory: {error}"))
        }
    };
    let input = dir.0.join("input");
    let metadata_out = dir.0.join("metadata.json");
    let download = client::with_retries(SUBMIT_PATIENCE, || shared.client.download(job, &input));
    tokio::select! {
        downloaded = download => match downloaded {
            Ok(()) => {}
            Err(error) if error.attempt_lost() => {
                return JobEnd::Interrupted(Interrupted::LeaseLost(error.to_string()))
            }
            Err(error) => return local_failure(format!("cannot download the source: {error}")),
        },
        why = stopped(&mut stop) => return JobEnd::Interrupted(why),
        _ = became_true(&mut grace_over) => return JobEnd::Interrupted(Interrupted::ShuttingDown),
    }
    let input_text = input.to_string_lossy().into_owned();
    let command_line = render_command(
        &shared.args.exec,
        &input_text,
        &job.job_id,
        &job.content_type,
    );
    let env = [
        ("MORAG_JOB_INPUT", input_text.clone()),
        ("MORAG_JOB_ID", job.job_id.clone()),
        ("MORAG_JOB_CONTENT_TYPE", job.content_type.clone()),
        ("MORAG_JOB_OPTIONS", job.task_options.to_string()),
        (
            "MORAG_JOB_METADATA_OUT",
            metadata_out.to_string_lossy().into_owned(),
        ),
    ];
    let mut running = match Running::spawn(&command_line, &dir.0, &env, progress) {
        Ok(running) => running,
        Err(error) => return local_failure(format!("cannot start the command: {error}")),
    };
    let grace = shared.args.kill_grace;
    let status = tokio::select! {
        status = running.exited() => status,
        why = stopped(&mut stop) => {
            running.stop(grace).await;
            return JobEnd::Interrupted(why);
        }
        _ = became_true(&mut grace_over) => {
            running.stop(grace).await;
            return JobEnd::Interrupted(Interrupted::ShuttingDown);
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(error) => {
            running.stop(grace).await;
            return local_failure(format!("cannot wait for the command: {error}"));
        }
    };
    let tail = running.tail.clone();
    let finished = running.finish(status, grace).await;
    let outcome = judge_exit(finished.status, &tail.text(), &shared.permanent);
    match outcome {
        Err(failure) => failure,
        Ok(()) => {
            let metadata = match read_metadata(&metadata_out) {
                Ok(metadata) => metadata,
                Err(problem) => {
                    return JobEnd::Submit {
                        body: failure(problem, false),
                        outcome: "failed (bad metadata)".into(),
                    }
                }
            };
            JobEnd::Submit {
                body: SubmitResultRequest {
                    success: true,
                    content: Some(String::from_utf8_lossy(&finished.stdout).into_owned()),
                    metadata: Some(metadata),
                    ..Default::default()
                },
                outcome: "completed".into(),
            }
        }
    }
}

/// Waits until the heartbeat loop says why the work must stop.
async fn stopped(stop: &mut watch::Receiver<Option<Interrupted>>) -> Interrupted {
    match stop.wait_for(Option::is_some).await {
        Ok(reason) => match &*reason {
            Some(Interrupted::Cancelled) => Interrupted::Cancelled,
            Some(Interrupted::LeaseLost(why)) => Interrupted::LeaseLost(why.clone()),
            Some(Interrupted::ShuttingDown) | None => Interrupted::ShuttingDown,
        },
        Err(_) => Interrupted::LeaseLost("the heartbeat loop ended".into()),
    }
}

/// Waits until a shutdown flag is set; never, when its sender is gone unset.
async fn became_true(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|set| *set).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A failure on this machine (not the command's): reported as a retryable failure, so the
/// job may go to another worker.
fn local_failure(message: String) -> JobEnd {
    JobEnd::Submit {
        body: failure(message, true),
        outcome: "failed on this worker".into(),
    }
}

/// Success, or the failure to submit for a non-zero exit or a signal.
// The failure is the request the caller submits as it is, once per job: boxing it to make
// the `Err` small would buy nothing.
#[allow(clippy::result_large_err)]
fn judge_exit(
    status: std::process::ExitStatus,
    stderr_tail: &str,
    permanent: &BTreeSet<i32>,
) -> Result<(), JobEnd> {
    use std::os::unix::process::ExitStatusExt;
    if status.success() {
        return Ok(());
    }
    let (how, retryable) = match (status.code(), status.signal()) {
        (Some(code), _) => (format!("exit code {code}"), !permanent.contains(&code)),
        (None, Some(signal)) => (format!("killed by signal {signal}"), true),
        (None, None) => ("ended abnormally".to_owned(), true),
    };
    let message = if stderr_tail.trim().is_empty() {
        format!("the command failed ({how}) without a message on stderr")
    } else {
        format!("the command failed ({how}): {stderr_tail}")
    };
    Err(JobEnd::Submit {
        body: failure(message, retryable),
        outcome: format!(
            "failed ({how}{})",
            if retryable { "" } else { ", permanent" }
        ),
    })
}

/// A failure to submit, retryable or final.
fn failure(message: String, retryable: bool) -> SubmitResultRequest {
    SubmitResultRequest {
        success: false,
        error_message: Some(message),
        retryable: Some(retryable),
        ..Default::default()
    }
}

/// The metadata the command wrote, or an empty object when it wrote none.
fn read_metadata(path: &Path) -> Result<Map<String, Value>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
        Err(error) => return Err(format!("cannot read the command's metadata file: {error}")),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("the command's metadata file is JSON but not an object".into()),
        Err(error) => Err(format!("the command's metadata file is not JSON: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_directory_is_private_and_removed_when_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir();
        let dir = JobDir::create(&root, "job-1").unwrap();
        let path = dir.0.clone();
        std::fs::write(path.join("input"), b"x").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn an_empty_answer_long_before_the_wait_is_early() {
        let wait = Duration::from_secs(30);
        assert!(answered_early(Duration::from_millis(3), wait));
        assert!(!answered_early(Duration::from_secs(29), wait));
        // A wait past the protocol's limit is cut to it before it is sent.
        assert!(!answered_early(
            Duration::from_secs(20),
            Duration::from_secs(120)
        ));
        // Without a wait every empty answer is early: the next poll comes after a pause.
        assert!(answered_early(Duration::from_millis(1), Duration::ZERO));
    }

    #[test]
    fn durations_take_seconds_and_humantime() {
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn exits_become_failures_with_the_stderr_tail() {
        use std::os::unix::process::ExitStatusExt;
        let permanent: BTreeSet<i32> = [3].into();
        assert!(judge_exit(std::process::ExitStatus::from_raw(0), "", &permanent).is_ok());
        let Err(JobEnd::Submit { body, .. }) = judge_exit(
            std::process::ExitStatus::from_raw(1 << 8),
            "bad input",
            &permanent,
        ) else {
            panic!("exit 1 is a failure")
        };
        assert_eq!(body.retryable, Some(true));
        assert!(body
            .error_message
            .unwrap()
            .contains("exit code 1): bad input"));
        let Err(JobEnd::Submit { body, .. }) = judge_exit(
            std::process::ExitStatus::from_raw(3 << 8),
            "corrupt",
            &permanent,
        ) else {
            panic!("exit 3 is a failure")
        };
        assert_eq!(body.retryable, Some(false));
    }
}
