//! `worker-overhead`: what `morag-jobs worker` itself adds to each job.
//!
//! The benchmark creates a backlog of jobs on tiny source files, then starts one real
//! `morag-jobs worker` process (the binary next to the server's, with `--exec` as given,
//! `true` by default) and waits until it has finished them all. The figure is, per job,
//! the time from its claim to its result as the server recorded them (`started_at` and
//! `completed_at` of the job's detail, both stamped by the server's clock): the poll's
//! answer travelling back, the private temporary directory, the download, the command
//! (`sh -c true`), reading its output and the metadata file, the result's request and
//! its commit. The time between a result and the worker's next claim is reported
//! separately (a poll round trip), as is the worker's own CPU per job (its process and
//! the commands it ran, from /proc).

use super::*;

/// Runs the scenario against `target` (a server the benchmark started, or `--url`).
pub(super) async fn worker_overhead(target: &Target, args: &Args) -> anyhow::Result<Vec<Metric>> {
    let api = &target.api;
    let content_type = unique_content_type("wo");
    target
        .leftover
        .lock()
        .expect("leftover lock")
        .push(content_type.clone());
    let total = args.overhead_jobs;

    // The backlog first: the worker then claims job after job, and nothing but the
    // worker (and a rare status read) talks to the server while it runs.
    let create_url = api.create_url();
    let mut ids = Vec::with_capacity(total);
    for n in 0..total {
        ids.push(api.create(&create_url, &content_type, n).await?);
    }

    let cpu_before = target.cpu();
    let started = Instant::now();
    let mut worker = WorkerProcess::start(
        &server_binary(args)?,
        &api.server.base,
        args.api_key.as_deref(),
        &content_type,
        &args.overhead_exec,
        args.overhead_concurrency,
    )?;
    let give_up = Instant::now() + Duration::from_secs(args.timeout_secs);
    // Jobs are claimed oldest first, so the last one created is (nearly) the last done;
    // only then is every job checked, which keeps status reads out of the measurement.
    wait_until_final(api, &ids[total - 1], &mut worker, give_up).await?;
    for id in &ids {
        wait_until_final(api, id, &mut worker, give_up).await?;
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu().since(&cpu_before, elapsed);
    let worker_cpu = worker.cpu_seconds();
    worker.stop();

    let mut claim_to_result = Latencies::default();
    let mut spans: Vec<(i64, i64)> = Vec::with_capacity(total);
    let mut not_completed = Vec::new();
    for id in &ids {
        let detail: Value = api
            .send(
                Method::GET,
                &format!("/api/v1/remote-jobs/{id}"),
                None,
                "detail",
            )
            .await?;
        if detail["status"] != "completed" {
            not_completed.push(format!(
                "{id}: {} ({})",
                detail["status"], detail["error_message"]
            ));
            continue;
        }
        let claimed = micros_of(&detail["started_at"])?;
        let finished = micros_of(&detail["completed_at"])?;
        claim_to_result.push(Duration::from_micros((finished - claimed).max(0) as u64));
        spans.push((claimed, finished));
    }
    if !not_completed.is_empty() {
        bail!(
            "{} of {total} jobs did not complete, e.g. {}",
            not_completed.len(),
            not_completed[0]
        );
    }
    // Between one result and the next claim: with one slot, the worker's next poll.
    spans.sort_unstable();
    let mut result_to_next_claim = Latencies::default();
    for pair in spans.windows(2) {
        result_to_next_claim.push(Duration::from_micros((pair[1].0 - pair[0].1).max(0) as u64));
    }
    let busy_micros =
        spans.last().map(|l| l.1).unwrap_or(0) - spans.first().map(|f| f.0).unwrap_or(0);
    let mean_ms = claim_to_result
        .0
        .iter()
        .map(Duration::as_secs_f64)
        .sum::<f64>()
        * 1e3
        / total as f64;

    let mut metrics = claim_to_result.metrics("claim_to_result", "claim to result");
    metrics.push(Metric::new(
        "claim_to_result_mean_ms",
        "claim to result mean",
        mean_ms,
        "ms",
    ));
    metrics.extend(result_to_next_claim.metrics("result_to_next_claim", "result to next claim"));
    metrics.push(Metric::new(
        "jobs_per_second",
        "jobs per second (first claim to last result)",
        total as f64 / (busy_micros.max(1) as f64 / 1e6),
        "jobs/s",
    ));
    if let Some(seconds) = worker_cpu {
        metrics.push(Metric::new(
            "worker_cpu_us_per_job",
            "worker CPU per job (its process and the commands it ran)",
            seconds / total as f64 * 1e6,
            "us",
        ));
        metrics.push(Metric::new(
            "worker_cpu_cores",
            "worker CPU (cores busy)",
            seconds / elapsed.as_secs_f64(),
            "cores",
        ));
    }
    // The worker is neither the server nor the load generator: count it out of "other
    // processes", which should show only load that is not part of the run.
    let worker_seconds = worker_cpu.unwrap_or(0.0);
    for mut metric in cpu.metrics(total) {
        if metric.key == "other_cpu_cores" {
            metric.value = (metric.value - worker_seconds / cpu.elapsed).max(0.0);
        }
        metrics.push(metric);
    }
    Ok(metrics)
}

/// Microseconds since the epoch of an RFC 3339 time in a job's detail.
fn micros_of(value: &Value) -> anyhow::Result<i64> {
    let text = value
        .as_str()
        .with_context(|| format!("not a time: {value}"))?;
    let time =
        humantime::parse_rfc3339_weak(text).with_context(|| format!("not a time: {text}"))?;
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .context("a time before 1970")?;
    Ok(since.as_micros() as i64)
}

async fn wait_until_final(
    api: &Api,
    id: &str,
    worker: &mut WorkerProcess,
    give_up: Instant,
) -> anyhow::Result<()> {
    loop {
        let status: Value = api
            .send(
                Method::GET,
                &format!("/api/v1/remote-jobs/{id}/status"),
                None,
                "status",
            )
            .await?;
        if matches!(
            status["status"].as_str(),
            Some("completed" | "failed" | "timeout" | "cancelled")
        ) {
            return Ok(());
        }
        worker.check_running()?;
        if Instant::now() >= give_up {
            bail!(
                "job {id} is still {} when the run timed out",
                status["status"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `morag-jobs worker` child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    fn start(
        binary: &Path,
        base: &str,
        api_key: Option<&str>,
        content_type: &str,
        exec: &str,
        concurrency: usize,
    ) -> anyhow::Result<WorkerProcess> {
        let log =
            std::env::temp_dir().join(format!("morag-jobs-bench-worker-{}.log", unique_suffix()));
        let mut command = Command::new(binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MORAG_") {
                command.env_remove(&name);
            }
        }
        if let Some(key) = api_key {
            command.env("MORAG_WORKER_API_KEY", key);
        }
        let child = command
            .arg("worker")
            .arg("--url")
            .arg(base)
            .arg("--worker-id")
            .arg("bench-overhead")
            .arg("--content-types")
            .arg(content_type)
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .arg("--exec")
            .arg(exec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("failed to create the worker log")?)
            .spawn()
            .with_context(|| format!("failed to start {binary:?} worker"))?;
        Ok(WorkerProcess { child, log })
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the worker exited ({status}); its log ends:\n{}",
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// The worker's CPU so far, with the commands it ran and waited for (utime, stime,
    /// cutime and cstime).
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let close = stat.rfind(')')?;
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks: f64 = fields[11..15]
            .iter()
            .map(|f| f.parse::<f64>().unwrap_or(0.0))
            .sum();
        Some(ticks / TICKS_PER_SEC)
    }

    fn stop(&mut self) {
        let pid = self.child.id() as i32;
        // SIGTERM lets the worker finish and exit; it has no job left to release.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let give_up = Instant::now() + Duration::from_secs(10);
        while Instant::now() < give_up {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
