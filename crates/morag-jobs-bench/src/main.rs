//! `morag-jobs-bench`: a load generator for the morag-jobs HTTP API.
//!
//! It starts the real server binary (`morag-jobs serve`, found next to this executable) on
//! a free loopback port with a fresh data directory (and none of the shell's `MORAG_*`
//! variables, so it runs on its defaults) for every measured run, drives it over
//! HTTP, and kills it afterwards, also when a run fails or is interrupted. With `--url` it
//! measures an already running server instead.
//!
//! Scenarios:
//! - `lifecycle`: producers create jobs while workers claim them (poll) and submit results;
//!   the figure is jobs per second from the first create sent to the last result answered,
//!   plus the latency of each request kind.
//! - `claim-latency`: K pending jobs, then sequential claims (each followed by its result
//!   and a replacement create, so the backlog stays at K); poll latency at each K.
//! - `longpoll`: workers wait in long polls; a producer creates jobs one at a time; the
//!   figure is the time from the create to the worker's poll returning the job.
//! - `worker-overhead`: a real `morag-jobs worker` process works through a backlog with a
//!   trivial command (`--exec true`); the figure is the time from each job's claim to its
//!   result (`worker_overhead.rs`).
//! - `wakeup`: `longpoll` across replicas (PostgreSQL, `--replicas 2` or more): the workers
//!   wait on the second replica, the jobs are created on the first, so every pickup
//!   needs the cross-replica notification.
//! - `soak`: `--soak-minutes` of lifecycle load with retention cleanup running (retention
//!   0, cleanup every 30 s), sampling throughput, p99, RSS and the size of the data and
//!   each table per interval (`bench/soak.rs`).
//!
//! With `--database-url postgres://...` the servers run on PostgreSQL: every measured run
//! gets a fresh database `morag_jobs_bench_<random>`, created through the `postgres`
//! maintenance database and dropped `WITH (FORCE)` afterwards (also when the run fails or
//! is interrupted). `--replicas N` starts N servers on that database; clients spread over
//! them round-robin, each worker or producer sticking to one replica.
//!
//! Everything runs on one tokio runtime. Each client task (producer, worker) keeps its own
//! keep-alive HTTP/1.1 connection, driven by hyper's connection-level client with no pool,
//! proxy or URL handling in between, and request bodies are formatted directly: the
//! generator shares the CPU with the server and should take as little of it as it can.
//! (With `reqwest` it took about 190 us of CPU per job, as much as two thirds of the server.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

mod deliveries;
mod soak;
mod worker_overhead;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "morag-jobs-bench",
    about = "Benchmarks the morag-jobs HTTP API: full job lifecycle throughput, claim latency \
             against a backlog, and long-poll pickup latency"
)]
struct Args {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// How many times to run each scenario; figures are the medians of the runs.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The server binary to start (default: `morag-jobs` next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Benchmark an already running server at this base URL instead of starting one.
    #[arg(long)]
    url: Option<String>,
    /// With `--url`: a directory inside the server's allowed roots, for the source file.
    #[arg(long)]
    files_dir: Option<PathBuf>,
    /// With `--url`: an admin API key, sent as a bearer token.
    #[arg(long, env = "MORAG_JOBS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// With `--url`: the server's process id, so its CPU use can be reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Extra flags for `morag-jobs serve` (repeatable), e.g. `--server-arg=--sqlite-sync=full`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Run the servers on PostgreSQL: the URL of a PostgreSQL server (its database part is
    /// ignored). Every run creates a fresh database `morag_jobs_bench_<random>` there
    /// (through the `postgres` maintenance database, so the user needs CREATEDB) and drops
    /// it afterwards. Not read from MORAG_DATABASE_URL, on purpose.
    #[arg(long)]
    database_url: Option<String>,
    /// Server processes to start on the same database (more than 1 needs --database-url).
    /// Producers and workers are spread over them round-robin, each sticking to one.
    #[arg(long, default_value_t = 1)]
    replicas: usize,

    /// lifecycle: jobs to push through the full lifecycle.
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// lifecycle: concurrent workers (poll, then submit the result).
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// lifecycle: concurrent producers (create). 16 keep a backlog in front of 32 workers;
    /// with fewer, workers drain it and wait in long polls, which measures the server's
    /// wake-up path as well.
    #[arg(long, default_value_t = 16)]
    producers: usize,
    /// lifecycle: the `wait` (seconds) of the workers' polls; 0 polls without waiting
    /// and sleeps 1 ms after an empty answer.
    #[arg(long, default_value_t = 1.0)]
    worker_wait: f64,

    /// claim-latency: the backlogs of pending jobs to measure at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    backlogs: Vec<usize>,
    /// claim-latency: measured sequential claims per backlog.
    #[arg(long, default_value_t = 2_000)]
    claims: usize,
    /// claim-latency: unmeasured claims before the measured ones.
    #[arg(long, default_value_t = 200)]
    warmup_claims: usize,
    /// claim-latency: concurrent creates while filling the backlog.
    #[arg(long, default_value_t = 64)]
    fill_concurrency: usize,
    /// claim-latency: how the backlog is filled: `http` (concurrent creates) or `sql`
    /// (PostgreSQL only, as a superuser: the benchmark itself inserts the pending jobs
    /// with one `INSERT ... SELECT ... generate_series`, then runs `VACUUM ANALYZE`).
    #[arg(long, value_enum, default_value = "http")]
    fill: Fill,

    /// longpoll and wakeup: workers waiting in long polls.
    #[arg(long, default_value_t = 8)]
    longpoll_workers: usize,
    /// longpoll and wakeup: jobs created one at a time.
    #[arg(long, default_value_t = 2_000)]
    longpoll_jobs: usize,
    /// longpoll and wakeup: pause (milliseconds) after each create.
    #[arg(long, default_value_t = 5.0)]
    longpoll_pause_ms: f64,
    /// longpoll and wakeup: the `wait` (seconds) of the workers' polls.
    #[arg(long, default_value_t = 30.0)]
    longpoll_wait: f64,

    /// worker-overhead: jobs the worker works through.
    #[arg(long, default_value_t = 1_000)]
    overhead_jobs: usize,
    /// worker-overhead: the worker's `--exec` command.
    #[arg(long, default_value = "true")]
    overhead_exec: String,
    /// worker-overhead: the worker's `--concurrency`.
    #[arg(long, default_value_t = 1)]
    overhead_concurrency: usize,
    /// soak: how long to keep the load up, in minutes.
    #[arg(long, default_value_t = 10.0)]
    soak_minutes: f64,
    /// soak: seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    soak_sample_secs: f64,
    /// lifecycle: the sinks the server delivers every outcome to (see BENCHMARKS.md):
    /// `webhook` (the ingestion callback, to a receiver inside the benchmark), `celery`
    /// (a queue of the run's own in Redis, `--redis-url`), `both`, or `none`.
    #[arg(long, value_enum, default_value = "none")]
    sinks: deliveries::Sinks,
    /// lifecycle with `--sinks`: hold every delivery (the receiver does not answer, a proxy
    /// in front of Redis does not connect) until the last result was answered, then
    /// measure how fast the dispatcher drains that backlog of events.
    #[arg(long)]
    delivery_backlog: bool,
    /// The Redis of `--sinks celery|both` and of `celery-latency`; every key a run makes
    /// contains `morag-jobs-bench-<uuid>` and is deleted afterwards.
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis_url: String,
    /// celery-latency: measured jobs (after 5 warm-up jobs).
    #[arg(long, default_value_t = 200)]
    celery_jobs: usize,
    /// celery-latency: pause (milliseconds) between claiming a job and sending its
    /// result, so each result meets an idle server and an idle worker.
    #[arg(long, default_value_t = 20)]
    celery_pause_ms: u64,
    /// celery-latency: the Python with Celery installed (default: the tests' virtual
    /// environment, `~/.cache/morag-jobs-venv/bin/python`, made by scripts/test.sh).
    #[arg(long)]
    celery_python: Option<PathBuf>,
    /// celery-latency: the directory with the worker's `celery_app.py`.
    #[arg(long, default_value = "tests/python")]
    celery_app_dir: PathBuf,

    /// Threads of the load generator's runtime (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Give up on a scenario run after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// lifecycle, claim-latency and longpoll, plus wakeup with 2 or more replicas.
    All,
    Lifecycle,
    ClaimLatency,
    Longpoll,
    Wakeup,
    WorkerOverhead,
    /// Not part of `all`: minutes of lifecycle load with retention cleanup running.
    Soak,
    /// From a result to the Celery task starting in a real worker (not part of `all`:
    /// it needs Redis and the tests' Celery environment).
    CeleryLatency,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Http,
    Sql,
}

// glibc's malloc was about a fifth of the server's CPU under load (perf); mimalloc's
// per-thread heaps make the many small allocations of HTTP and row decoding cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = if args.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.client_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        // Dropping the benchmark future on SIGINT or SIGTERM (e.g. from `timeout`) drops the
        // server guard, which kills the server and removes its data directory and database.
        tokio::select! {
            result = run(args) => result,
            _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    validate(&args)?;
    let machine = Machine::read();
    progress(&format!(
        "machine: {} CPUs ({}), load average {}",
        machine.cpus, machine.cpu_model, machine.load_average
    ));
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All if args.replicas >= 2 => vec![
            Scenario::Lifecycle,
            Scenario::ClaimLatency,
            Scenario::Longpoll,
            Scenario::Wakeup,
        ],
        Scenario::All => vec![
            Scenario::Lifecycle,
            Scenario::ClaimLatency,
            Scenario::Longpoll,
        ],
        one => vec![one],
    };
    let mut reports = Vec::new();
    for scenario in scenarios {
        let mut runs = Vec::new();
        for run_index in 0..args.runs {
            progress(&format!(
                "{} run {}/{}",
                scenario_name(scenario),
                run_index + 1,
                args.runs
            ));
            let limit = match scenario {
                // The soak's own length, plus time to start and stop.
                Scenario::Soak => Duration::from_secs(
                    args.timeout_secs
                        .max((args.soak_minutes * 60.0) as u64 + 300),
                ),
                _ => Duration::from_secs(args.timeout_secs),
            };
            let metrics = tokio::time::timeout(limit, run_scenario(scenario, &args))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{} did not finish within {} s",
                        scenario_name(scenario),
                        args.timeout_secs
                    )
                })??;
            runs.push(metrics);
        }
        reports.push(ScenarioReport::from_runs(scenario, &args, runs));
    }
    if args.json {
        let scenarios: serde_json::Map<String, Value> = reports
            .iter()
            .map(|r| (r.name.to_owned(), r.to_json()))
            .collect();
        let out = json!({
            "machine": machine.to_json(),
            "server": match &args.url {
                Some(url) => json!({"url": url}),
                None => json!({
                    "binary": server_binary(&args)?.display().to_string(),
                    "args": args.server_args,
                    "store": if args.database_url.is_some() { "postgres" } else { "sqlite" },
                    "replicas": args.replicas,
                }),
            },
            "runs": args.runs,
            "client_threads": args.client_threads,
            "scenarios": scenarios,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "morag-jobs-bench on {} CPUs ({}); load average at start {}",
            machine.cpus, machine.cpu_model, machine.load_average
        );
        match &args.url {
            Some(url) => println!("server: {url} (already running)"),
            None => println!(
                "server: {} x {} on {}, started fresh (new data dir, no MORAG_* variables) for every run{}",
                args.replicas,
                server_binary(&args)?.display(),
                if args.database_url.is_some() {
                    "PostgreSQL (a fresh database per run)"
                } else {
                    "SQLite"
                },
                if args.server_args.is_empty() {
                    String::new()
                } else {
                    format!(" with {}", args.server_args.join(" "))
                }
            ),
        }
        println!(
            "figures: median of {} run(s); latencies are client-side round trips over loopback",
            args.runs
        );
        for report in &reports {
            println!();
            print!("{}", report.render());
        }
    }
    Ok(())
}

fn validate(args: &Args) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.url.is_some() && args.files_dir.is_none() {
        bail!("--url needs --files-dir: a directory inside the server's allowed roots, where the benchmark writes its source file");
    }
    if args.jobs == 0 || args.workers == 0 || args.producers == 0 {
        bail!("--jobs, --workers and --producers must be at least 1");
    }
    if args.backlogs.is_empty() || args.claims == 0 || args.fill_concurrency == 0 {
        bail!("--backlogs, --claims and --fill-concurrency must be non-empty and positive");
    }
    if args.longpoll_workers == 0 || args.longpoll_jobs == 0 {
        bail!("--longpoll-workers and --longpoll-jobs must be at least 1");
    }
    if !(0.0..=30.0).contains(&args.worker_wait) || !(0.0..=30.0).contains(&args.longpoll_wait) {
        bail!("--worker-wait and --longpoll-wait must be from 0 to 30 seconds");
    }
    if args.overhead_jobs == 0 || args.overhead_concurrency == 0 {
        bail!("--overhead-jobs and --overhead-concurrency must be at least 1");
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if args.url.is_some() && (args.database_url.is_some() || args.replicas > 1) {
        bail!("--url measures a running server: --database-url and --replicas only apply to servers the benchmark starts");
    }
    if args.replicas > 1 && args.database_url.is_none() {
        bail!("--replicas above 1 needs --database-url: replicas share a PostgreSQL database");
    }
    if args.fill == Fill::Sql && args.database_url.is_none() {
        bail!("--fill sql needs --database-url");
    }
    if args.scenario == Scenario::Soak
        && (args.url.is_some() || args.soak_minutes <= 0.0 || args.soak_sample_secs < 1.0)
    {
        bail!("the soak scenario starts its own server (no --url) and needs --soak-minutes above 0 and --soak-sample-secs of at least 1");
    }
    if args.scenario == Scenario::Wakeup && args.replicas < 2 {
        bail!("the wakeup scenario needs --replicas 2 or more");
    }
    Ok(())
}

fn scenario_name(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::All => "all",
        Scenario::Lifecycle => "lifecycle",
        Scenario::ClaimLatency => "claim-latency",
        Scenario::Longpoll => "longpoll",
        Scenario::Wakeup => "wakeup",
        Scenario::WorkerOverhead => "worker-overhead",
        Scenario::Soak => "soak",
        Scenario::CeleryLatency => "celery-latency",
    }
}

fn progress(message: &str) {
    eprintln!("[bench] {message}");
}

async fn run_scenario(scenario: Scenario, args: &Args) -> anyhow::Result<Vec<Metric>> {
    match scenario {
        Scenario::Lifecycle => {
            let sinks = deliveries::SinkRun::start(args).await?;
            let mut run_args = args.clone();
            if let Some(sinks) = &sinks {
                run_args.server_args.extend(sinks.server_args());
            }
            let metrics = match Target::open(&run_args).await {
                Ok(target) => {
                    let metrics = lifecycle(&target, args, sinks.as_ref()).await;
                    target.close().await;
                    metrics
                }
                Err(error) => Err(error),
            };
            if let Some(sinks) = &sinks {
                sinks.clean_up().await;
            }
            metrics
        }
        Scenario::CeleryLatency => deliveries::celery_latency(args).await,
        Scenario::ClaimLatency => {
            let mut metrics = Vec::new();
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for &backlog in &args.backlogs {
                let target = Target::open(args).await?;
                let result = claim_latency(&target, args, backlog).await;
                target.close().await;
                let (more, p50, p99) = result?;
                metrics.extend(more);
                p50s.push((backlog, p50));
                p99s.push((backlog, p99));
            }
            if let (Some(first), Some(last)) = (p50s.first(), p50s.last()) {
                if p50s.len() > 1 && first.1 > 0.0 {
                    metrics.push(Metric::new(
                        format!("p50_ratio_{}_vs_{}", last.0, first.0),
                        format!("poll p50 ratio, {} vs {} pending", last.0, first.0),
                        last.1 / first.1,
                        "x",
                    ));
                }
            }
            if let (Some(first), Some(last)) = (p99s.first(), p99s.last()) {
                if p99s.len() > 1 && first.1 > 0.0 {
                    metrics.push(Metric::new(
                        format!("p99_ratio_{}_vs_{}", last.0, first.0),
                        format!("poll p99 ratio, {} vs {} pending", last.0, first.0),
                        last.1 / first.1,
                        "x",
                    ));
                }
            }
            Ok(metrics)
        }
        Scenario::Longpoll => {
            let target = Target::open(args).await?;
            let metrics = longpoll(&target, args, 0, 0).await;
            target.close().await;
            metrics
        }
        Scenario::Wakeup => {
            let target = Target::open(args).await?;
            // Workers wait on the second replica; jobs are created on the first.
            let metrics = longpoll(&target, args, 1, 0).await;
            target.close().await;
            metrics
        }
        Scenario::WorkerOverhead => {
            let target = Target::open(args).await?;
            let metrics = worker_overhead::worker_overhead(&target, args).await;
            target.close().await;
            metrics
        }
        Scenario::Soak => {
            let mut args = args.clone();
            args.server_args
                .extend(soak::SOAK_SERVER_ARGS.iter().map(|flag| flag.to_string()));
            let target = Target::open(&args).await?;
            let metrics = soak::soak(&target, &args).await;
            target.close().await;
            metrics
        }
        Scenario::All => unreachable!("expanded before"),
    }
}

// ---------------------------------------------------------------------------------------
// The server under test and the HTTP client.

/// The servers a run talks to: freshly started child processes (with their own
/// PostgreSQL database when `--database-url` is given), or a running server.
///
/// Fields drop in declaration order: the servers are killed before their database is
/// dropped.
struct Target {
    /// The first (or only) server's API; `apis[0]` is the same.
    api: Api,
    /// One API per server, each with its own source file.
    apis: Vec<Api>,
    /// Set when this benchmark started the servers.
    servers: Vec<SpawnedServer>,
    /// The run's own PostgreSQL database; dropped after the servers are gone.
    database: Option<BenchDatabase>,
    /// With `--url`: the process id the caller gave.
    url_server_pid: Option<u32>,
    /// The source file every created job points at; removed at the end with `--url`.
    source_file: PathBuf,
    /// Jobs of the benchmark's content types left pending on a server we did not start.
    leftover: Mutex<Vec<String>>,
}

impl Target {
    async fn open(args: &Args) -> anyhow::Result<Target> {
        // Declared before the servers, so an early return kills them before dropping it.
        let database = match &args.database_url {
            Some(url) => Some(BenchDatabase::create(url).await?),
            None => None,
        };
        let mut servers = Vec::new();
        let mut endpoints: Vec<(String, PathBuf)> = Vec::new();
        match &args.url {
            Some(url) => endpoints.push((
                url.trim_end_matches('/').to_owned(),
                args.files_dir.clone().expect("validated"),
            )),
            None => {
                let mut server_args = args.server_args.clone();
                if let Some(database) = &database {
                    server_args.push(format!("--database-url={}", database.url));
                }
                for _ in 0..args.replicas {
                    let server = SpawnedServer::start(&server_binary(args)?, &server_args)?;
                    endpoints.push((server.base.clone(), server.data_dir.join("files")));
                    servers.push(server);
                }
            }
        }
        let mut apis = Vec::new();
        let mut first_source_file = None;
        for (base, files_dir) in endpoints {
            let source_file = files_dir.join(format!("bench-source-{}.txt", unique_suffix()));
            std::fs::write(&source_file, b"morag-jobs benchmark source file\n")
                .with_context(|| format!("failed to write the source file {source_file:?}"))?;
            let source_path = std::fs::canonicalize(&source_file)
                .with_context(|| format!("failed to resolve {source_file:?}"))?;
            apis.push(Api {
                connection: Mutex::new(None),
                server: Server::parse(&base)?,
                source_path: source_path.to_string_lossy().into_owned(),
                source_path_json: serde_json::to_string(&source_path.to_string_lossy())?,
                api_key: args.api_key.clone(),
            });
            first_source_file.get_or_insert(source_file);
        }
        let target = Target {
            api: apis[0].clone(),
            apis,
            servers,
            database,
            url_server_pid: args.server_pid,
            source_file: first_source_file.expect("at least one server"),
            leftover: Mutex::new(Vec::new()),
        };
        target.wait_for_health().await?;
        Ok(target)
    }

    async fn wait_for_health(&self) -> anyhow::Result<()> {
        for (i, api) in self.apis.iter().enumerate() {
            let url = format!("{}/health", api.server.base);
            let give_up = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(server) = self.servers.get(i) {
                    server.check_running()?;
                }
                match api.request(Method::GET, "/health", None).await {
                    Ok((status, _)) if status.is_success() => break,
                    Ok((status, _)) if Instant::now() >= give_up => {
                        bail!("{url} answered {status}")
                    }
                    Err(error) if Instant::now() >= give_up => {
                        return Err(error).with_context(|| format!("{url} did not answer"))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        Ok(())
    }

    /// The API a client task with this index uses: round-robin over the replicas.
    fn api_for(&self, index: usize) -> &Api {
        &self.apis[index % self.apis.len()]
    }

    fn server_pids(&self) -> Vec<u32> {
        if self.servers.is_empty() {
            self.url_server_pid.into_iter().collect()
        } else {
            self.servers.iter().map(|s| s.child.id()).collect()
        }
    }

    /// A memory figure of the servers' (`VmRSS`, `VmHWM` in /proc/PID/status), summed, in
    /// MiB; `None` when no server process is known.
    fn server_memory_mib(&self, field: &str) -> Option<f64> {
        let pids = self.server_pids();
        if pids.is_empty() {
            return None;
        }
        let mut kib = 0.0;
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status
                .lines()
                .find(|l| l.starts_with(&format!("{field}:")))?;
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<f64>().ok())?;
        }
        Some(kib / 1024.0)
    }

    /// CPU use so far of the servers, this process, PostgreSQL (when the run uses it)
    /// and the machine.
    fn cpu(&self) -> CpuSnapshot {
        CpuSnapshot::take(
            &self.server_pids(),
            self.database.as_ref().map(|d| d.name.as_str()),
        )
    }

    /// Completes the benchmark's pending jobs on a server we did not start, and removes
    /// the source file there. Started servers are simply killed with their data
    /// directories, and then their database is dropped.
    async fn close(self) {
        if self.servers.is_empty() {
            let leftover = std::mem::take(&mut *self.leftover.lock().expect("leftover lock"));
            for content_type in leftover {
                if let Err(error) = drain(&self.api, &content_type).await {
                    progress(&format!(
                        "warning: could not complete the leftover {content_type} jobs: {error:#}"
                    ));
                }
            }
            let _ = std::fs::remove_file(&self.source_file);
        }
        drop(self.servers);
        drop(self.database);
    }
}

/// A fresh PostgreSQL database for one run: created through the server's `postgres`
/// maintenance database, dropped `WITH (FORCE)` when this is dropped (also on errors and
/// interruptions, since the run's future is dropped then). The benchmark talks SQL only
/// for this and for seeding a claim-latency backlog (`--fill sql`); the servers create
/// their own tables.
struct BenchDatabase {
    name: String,
    /// The database's URL, for the servers.
    url: String,
    /// Connection settings for the maintenance database.
    admin: tokio_postgres::Config,
}

impl BenchDatabase {
    async fn create(server_url: &str) -> anyhow::Result<BenchDatabase> {
        let mut admin: tokio_postgres::Config = server_url
            .parse()
            .context("--database-url is not a valid PostgreSQL URL")?;
        admin.dbname("postgres");
        admin.connect_timeout(Duration::from_secs(5));
        let name = format!("morag_jobs_bench_{:016x}", fastrand::u64(..));
        let url = url_with_database(server_url, &name)?;
        let client = connect(&admin).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("failed to create the database {name}"))?;
        progress(&format!("  created database {name}"));
        Ok(BenchDatabase { name, url, admin })
    }

    /// A connection to this run's database.
    async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let mut config = self.admin.clone();
        config.dbname(&self.name);
        connect(&config).await
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        // Drop runs inside the benchmark's runtime, which cannot be blocked on; a thread
        // with its own runtime does the asynchronous work.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = connect(&admin).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => progress(&format!("  dropped database {}", self.name)),
            Ok(Err(error)) => progress(&format!(
                "warning: could not drop the database {}: {error:#}",
                self.name
            )),
            Err(_) => progress(&format!(
                "warning: dropping the database {} panicked",
                self.name
            )),
        }
    }
}

async fn connect(config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .context("failed to connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            progress(&format!("warning: PostgreSQL connection: {error}"));
        }
    });
    Ok(client)
}

/// `url` with its database (the path) replaced by `name`; user, host and query stay.
fn url_with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .context("--database-url must be a postgres:// URL")?;
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or("");
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// Inserts `count` pending jobs of `content_type` straight into the run's PostgreSQL
/// database, as `morag-jobs` would have created them (one row per job with a UUID id,
/// status `pending`, claimable since before now, no pending deadline; one `created`
/// history entry each; the statistics deltas its counter trigger would have written,
/// aggregated), then `VACUUM ANALYZE`s the table so that neither autovacuum nor stale
/// statistics land in the measurement. Needs a superuser: it turns the per-row trigger
/// off for this one transaction (`session_replication_role = replica`) and writes the
/// aggregate deltas instead, which is what makes a million rows take seconds.
async fn seed_pending(
    database: &BenchDatabase,
    content_type: &str,
    source_path: &str,
    count: usize,
) -> anyhow::Result<()> {
    let mut client = database.connect().await?;
    let now_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_micros() as i64;
    // One microsecond apart, all in the past, in creation order.
    let base = now_micros - count as i64 - 1_000_000;
    let count = count as i64;
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL session_replication_role = replica")
        .await
        .context("seeding needs a PostgreSQL superuser (session_replication_role)")?;
    tx.execute(
        "WITH j AS ( \
             INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, \
                               status, created_at, updated_at, available_at, deadline_at) \
             SELECT gen_random_uuid()::text, $1, $2, '{}', 'bench-seed-' || g, \
                    'pending', $3::int8 + g, $3::int8 + g, $3::int8 + g, NULL \
             FROM generate_series(1, $4::int8) AS g \
             ORDER BY g \
             RETURNING seq, created_at) \
         INSERT INTO job_history (job_seq, from_status, to_status, at, actor, reason) \
         SELECT seq, NULL, 'pending', created_at, 'client', 'created' FROM j ORDER BY seq",
        &[&content_type, &source_path, &base, &count],
    )
    .await
    .context("failed to insert the pending jobs")?;
    tx.execute(
        "INSERT INTO counter_deltas (counter, status, content_type, minute, n) \
         VALUES ('status', 'pending', $1, 0, $2)",
        &[&content_type, &count],
    )
    .await?;
    tx.execute(
        "INSERT INTO counter_deltas (counter, minute, n) \
         SELECT 'created', created_at / 60000000, count(*) FROM jobs \
         WHERE content_type = $1 GROUP BY 2",
        &[&content_type],
    )
    .await?;
    tx.commit().await.context("failed to commit the seed")?;
    // One statement each: several in one string would run as one transaction block.
    for table in ["jobs", "job_history", "counter_deltas"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .with_context(|| format!("failed to vacuum {table} after seeding"))?;
    }
    Ok(())
}

/// Claims and completes every pending job of `content_type`, 16 at a time.
async fn drain(api: &Api, content_type: &str) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for i in 0..16 {
        let api = api.clone();
        let url = api.poll_url(&format!("bench-drain-{i}"), content_type, None);
        tasks.push(tokio::spawn(async move {
            while let Some(job) = api.poll(&url).await? {
                api.submit(&job).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

fn server_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.server_bin {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let dir = exe
        .parent()
        .context("this executable's path has no directory")?;
    let name = format!("morag-jobs{}", std::env::consts::EXE_SUFFIX);
    Ok(dir.join(name))
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}", std::process::id())
}

/// A content type no other run uses, so runs against a shared server do not mix.
fn unique_content_type(prefix: &str) -> String {
    let suffix = fastrand::u32(..);
    format!("bench-{prefix}-{suffix:08x}")
}

/// `morag-jobs serve` as a child process. Dropping it kills the process and removes its
/// data directory, whatever happened before.
struct SpawnedServer {
    child: Child,
    data_dir: PathBuf,
    base: String,
}

impl SpawnedServer {
    fn start(binary: &Path, extra_args: &[String]) -> anyhow::Result<SpawnedServer> {
        if !binary.is_file() {
            bail!(
                "server binary {binary:?} not found: build it with `cargo build --release --workspace`, or pass --server-bin"
            );
        }
        let data_dir = std::env::temp_dir().join(format!("morag-jobs-bench-{}", unique_suffix()));
        std::fs::create_dir_all(data_dir.join("files"))
            .with_context(|| format!("failed to create {data_dir:?}"))?;
        // Bind port 0 to learn a free port, then hand it over; the window in between is tiny.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free loopback port")?
            .port();
        let log = std::fs::File::create(data_dir.join("server.log"))
            .context("failed to create the server log")?;
        let mut command = Command::new(binary);
        // The server reads MORAG_* variables (the database URL among them); a benchmark
        // run uses the defaults plus `--server-arg` flags, whatever the shell exported.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MORAG_") {
                command.env_remove(&name);
            }
        }
        let spawned = command
            .arg("serve")
            .arg("--addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&data_dir);
                return Err(error).with_context(|| format!("failed to start {binary:?}"));
            }
        };
        Ok(SpawnedServer {
            child,
            data_dir,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    fn check_running(&self) -> anyhow::Result<()> {
        // `try_wait` needs `&mut`; reading /proc keeps this `&self`.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        let exited = match stat {
            Ok(text) => text
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => true,
        };
        if exited {
            let log = std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("the server exited; its log ends:\n{}", tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(error) = std::fs::remove_dir_all(&self.data_dir) {
            progress(&format!(
                "warning: could not remove {:?}: {error}",
                self.data_dir
            ));
        }
    }
}

/// Where a server listens: `http://HOST:PORT` plus an optional path prefix.
#[derive(Clone)]
struct Server {
    /// The base URL as given, for messages.
    base: String,
    /// `HOST:PORT`, to connect to and for the `Host` header.
    authority: String,
    /// The path prefix every request path is appended to (empty, or `/prefix`).
    prefix: String,
}

impl Server {
    fn parse(base: &str) -> anyhow::Result<Server> {
        let rest = base.strip_prefix("http://").with_context(|| {
            format!("server URL {base:?}: only plain http:// URLs are supported")
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("server URL {base:?} has no host");
        }
        let authority = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Server {
            base: base.to_owned(),
            authority,
            prefix: prefix.to_owned(),
        })
    }
}

type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// The requests of MoRAG's protocol, with bodies formatted by hand. Each clone has a
/// connection of its own, opened on first use and reopened after an error: one clone per
/// client task, so requests on a connection are never interleaved.
struct Api {
    connection: Mutex<Option<Connection>>,
    server: Server,
    /// The source file every job created through this API points at.
    source_path: String,
    /// The source path as a JSON string literal, quotes included.
    source_path_json: String,
    api_key: Option<String>,
}

impl Clone for Api {
    fn clone(&self) -> Api {
        Api {
            connection: Mutex::new(None),
            server: self.server.clone(),
            source_path: self.source_path.clone(),
            source_path_json: self.source_path_json.clone(),
            api_key: self.api_key.clone(),
        }
    }
}

#[derive(Deserialize)]
struct CreateAnswer {
    job_id: String,
}

#[derive(Deserialize)]
struct PollAnswer {
    job_id: Option<String>,
    lease_id: Option<String>,
}

struct Claimed {
    job_id: String,
    lease_id: String,
}

/// How long one request may take, long polls included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

impl Api {
    fn create_url(&self) -> String {
        "/api/v1/remote-jobs/".to_owned()
    }

    fn poll_url(&self, worker_id: &str, content_type: &str, wait: Option<f64>) -> String {
        let mut url = format!(
            "/api/v1/remote-jobs/poll?worker_id={worker_id}&content_types={content_type}&max_jobs=1"
        );
        if let Some(wait) = wait {
            url.push_str(&format!("&wait={wait}"));
        }
        url
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let stream = tokio::net::TcpStream::connect(&self.server.authority)
            .await
            .with_context(|| format!("cannot connect to {}", self.server.base))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        // The connection task ends when its sender is dropped or the server closes it.
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Sends one request on this clone's connection; answers its status and body.
    async fn request(
        &self,
        method: Method,
        path: &str,
        json_body: Option<String>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let reused = self.connection.lock().expect("connection lock").take();
        let mut sender = match reused {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.connect().await?,
        };
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server.prefix))
            .header(hyper::header::HOST, &self.server.authority);
        if let Some(key) = &self.api_key {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let body = match json_body {
            Some(body) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(body))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body)?;
        let exchange = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .context("no answer within the request timeout")??;
        // Only a connection that completed its exchange is kept for the next request.
        *self.connection.lock().expect("connection lock") = Some(sender);
        Ok(answer)
    }

    /// Sends a request and parses a successful answer as `T`.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        json_body: Option<String>,
        what: &str,
    ) -> anyhow::Result<T> {
        let (status, body) = self
            .request(method, path, json_body)
            .await
            .with_context(|| format!("{what}: request failed"))?;
        if !status.is_success() {
            bail!("{what}: {status}: {}", String::from_utf8_lossy(&body));
        }
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "{what}: unexpected answer {}",
                String::from_utf8_lossy(&body)
            )
        })
    }

    async fn create(&self, url: &str, content_type: &str, n: usize) -> anyhow::Result<String> {
        let body = format!(
            r#"{{"source_file_path":{},"content_type":"{content_type}","task_options":{{}},"ingestion_task_id":"bench-{n}"}}"#,
            self.source_path_json
        );
        let answer: CreateAnswer = self.send(Method::POST, url, Some(body), "create").await?;
        Ok(answer.job_id)
    }

    async fn poll(&self, url: &str) -> anyhow::Result<Option<Claimed>> {
        let answer: PollAnswer = self.send(Method::GET, url, None, "poll").await?;
        match (answer.job_id, answer.lease_id) {
            (Some(job_id), Some(lease_id)) => Ok(Some(Claimed { job_id, lease_id })),
            (Some(job_id), None) => bail!("poll: job {job_id} came without a lease"),
            (None, _) => Ok(None),
        }
    }

    async fn submit(&self, job: &Claimed) -> anyhow::Result<()> {
        let url = format!("/api/v1/remote-jobs/{}/result", job.job_id);
        let body = format!(
            r#"{{"success":true,"content":"benchmark result","metadata":{{}},"processing_time":0.001,"lease_id":"{}"}}"#,
            job.lease_id
        );
        let _: serde::de::IgnoredAny = self.send(Method::PUT, &url, Some(body), "result").await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// Round-trip times of one request kind.
#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn push(&mut self, latency: Duration) {
        self.0.push(latency);
    }

    fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// Nearest-rank percentile in milliseconds (0 when empty).
    fn percentile_ms(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1].as_secs_f64() * 1e3
    }

    /// p50, p99 and max as metrics named `{key}_p50_ms` and so on.
    fn metrics(&mut self, key: &str, label: &str) -> Vec<Metric> {
        vec![
            Metric::new(
                format!("{key}_p50_ms"),
                format!("{label} p50"),
                self.percentile_ms(0.50),
                "ms",
            ),
            Metric::new(
                format!("{key}_p99_ms"),
                format!("{label} p99"),
                self.percentile_ms(0.99),
                "ms",
            ),
            Metric::new(
                format!("{key}_max_ms"),
                format!("{label} max"),
                self.percentile_ms(1.0),
                "ms",
            ),
        ]
    }
}

/// Sets `done` when the task fails, so the other tasks of the run stop too.
async fn stop_all_on_error<T>(
    done: Arc<watch::Sender<bool>>,
    task: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let result = task.await;
    if result.is_err() {
        done.send_replace(true);
    }
    result
}

async fn join_all<T>(
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<T>>>,
) -> anyhow::Result<Vec<T>> {
    let mut values = Vec::with_capacity(handles.len());
    let mut first_error = None;
    for handle in handles {
        match handle.await {
            Ok(Ok(value)) => values.push(value),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(anyhow::anyhow!("a benchmark task panicked: {error}"));
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(values),
    }
}

struct WorkerSamples {
    polls: Latencies,
    results: Latencies,
    empty_polls: usize,
}

async fn lifecycle(
    target: &Target,
    args: &Args,
    sinks: Option<&deliveries::SinkRun>,
) -> anyhow::Result<Vec<Metric>> {
    let content_type = unique_content_type("lc");
    target
        .leftover
        .lock()
        .expect("leftover lock")
        .push(content_type.clone());
    let total = args.jobs;
    let next = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let (done, _) = watch::channel(false);
    let done = Arc::new(done);
    let finished_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let wait = (args.worker_wait > 0.0).then_some(args.worker_wait);

    let mut workers = Vec::new();
    for w in 0..args.workers {
        let api = target.api_for(w).clone();
        let url = api.poll_url(&format!("bench-worker-{w}"), &content_type, wait);
        let (done, completed, finished_at) = (done.clone(), completed.clone(), finished_at.clone());
        let mut stop = done.subscribe();
        workers.push(tokio::spawn(stop_all_on_error(done.clone(), async move {
            let mut samples = WorkerSamples {
                polls: Latencies::default(),
                results: Latencies::default(),
                empty_polls: 0,
            };
            loop {
                let sent = Instant::now();
                let polled = tokio::select! {
                    biased;
                    _ = stop.wait_for(|d| *d) => break,
                    polled = api.poll(&url) => polled?,
                };
                let claimed = Instant::now();
                let Some(job) = polled else {
                    samples.empty_polls += 1;
                    if wait.is_none() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    continue;
                };
                samples.polls.push(claimed - sent);
                api.submit(&job).await?;
                samples.results.push(claimed.elapsed());
                if completed.fetch_add(1, Ordering::Relaxed) + 1 == total {
                    *finished_at.lock().expect("finish lock") = Some(Instant::now());
                    done.send_replace(true);
                }
            }
            Ok(samples)
        })));
    }

    let cpu_before = target.cpu();
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let api = target.api_for(p).clone();
        let url = api.create_url();
        let content_type = content_type.clone();
        let next = next.clone();
        let mut stop = done.subscribe();
        producers.push(tokio::spawn(stop_all_on_error(done.clone(), async move {
            let mut creates = Latencies::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || *stop.borrow_and_update() {
                    break;
                }
                let sent = Instant::now();
                api.create(&url, &content_type, n).await?;
                creates.push(sent.elapsed());
            }
            Ok(creates)
        })));
    }

    let producer_samples = join_all(producers).await;
    let worker_samples = join_all(workers).await;
    let (producer_samples, worker_samples) = (producer_samples?, worker_samples?);
    let finished = finished_at
        .lock()
        .expect("finish lock")
        .context("the run stopped before every job completed")?;
    let elapsed = finished - started;
    let cpu = target.cpu().since(&cpu_before, elapsed);

    let mut creates = Latencies::default();
    producer_samples.into_iter().for_each(|c| creates.extend(c));
    let mut polls = Latencies::default();
    let mut results = Latencies::default();
    let mut empty_polls = 0;
    for samples in worker_samples {
        polls.extend(samples.polls);
        results.extend(samples.results);
        empty_polls += samples.empty_polls;
    }
    let mut metrics = vec![
        Metric::new(
            "jobs_per_sec",
            "throughput, first create to last result",
            total as f64 / elapsed.as_secs_f64(),
            "jobs/s",
        ),
        Metric::new("elapsed_s", "elapsed", elapsed.as_secs_f64(), "s"),
        Metric::new(
            "requests_per_sec",
            "HTTP requests per second",
            (3 * total + empty_polls) as f64 / elapsed.as_secs_f64(),
            "req/s",
        ),
    ];
    metrics.extend(creates.metrics("create", "create"));
    // With `--worker-wait`, a poll that finds no job waits for one inside the server, so
    // this includes waiting whenever the workers had drained the backlog.
    metrics.extend(polls.metrics("poll", "poll that claimed a job (incl. long-poll wait)"));
    metrics.extend(results.metrics("result", "result"));
    metrics.push(Metric::new(
        "empty_polls",
        "polls that found no job",
        empty_polls as f64,
        "polls",
    ));
    metrics.extend(cpu.metrics(total));
    if let Some(sinks) = sinks {
        metrics.extend(
            sinks
                .finish(started, finished, Duration::from_secs(120))
                .await?,
        );
    }
    Ok(metrics)
}

async fn claim_latency(
    target: &Target,
    args: &Args,
    backlog: usize,
) -> anyhow::Result<(Vec<Metric>, f64, f64)> {
    let api = &target.api;
    let content_type = unique_content_type("cl");
    target
        .leftover
        .lock()
        .expect("leftover lock")
        .push(content_type.clone());

    progress(&format!("  filling {backlog} pending jobs"));
    let fill_started = Instant::now();
    match (args.fill, &target.database) {
        (Fill::Sql, Some(database)) => {
            seed_pending(database, &content_type, &api.source_path, backlog).await?
        }
        (Fill::Sql, None) => bail!("--fill sql needs --database-url"),
        (Fill::Http, _) => fill_over_http(api, args, &content_type, backlog).await?,
    }
    let fill_secs = fill_started.elapsed().as_secs_f64();

    progress(&format!(
        "  {} sequential claims at {backlog} pending",
        args.claims
    ));
    let create_url = api.create_url();
    let poll_url = api.poll_url("bench-claimer", &content_type, None);
    let (mut polls, mut results, mut creates) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let mut cpu_before = target.cpu();
    let mut measured_from = Instant::now();
    for i in 0..args.warmup_claims + args.claims {
        if i == args.warmup_claims {
            cpu_before = target.cpu();
            measured_from = Instant::now();
        }
        let sent = Instant::now();
        let job = api
            .poll(&poll_url)
            .await?
            .with_context(|| format!("no job to claim although {backlog} should be pending"))?;
        let claimed = Instant::now();
        api.submit(&job).await?;
        let submitted = Instant::now();
        // A replacement keeps the backlog at `backlog`.
        api.create(&create_url, &content_type, backlog + i).await?;
        if i >= args.warmup_claims {
            polls.push(claimed - sent);
            results.push(submitted - claimed);
            creates.push(submitted.elapsed());
        }
    }
    let cpu = target.cpu().since(&cpu_before, measured_from.elapsed());
    let p50 = polls.percentile_ms(0.50);
    let p99 = polls.percentile_ms(0.99);
    let key = format!("pending_{backlog}");
    let mut metrics = vec![Metric::new(
        format!("{key}_fill_jobs_per_sec"),
        match args.fill {
            Fill::Http => format!(
                "{backlog} pending: fill rate ({} concurrent creates)",
                args.fill_concurrency
            ),
            Fill::Sql => format!("{backlog} pending: fill rate (SQL seed, incl. VACUUM ANALYZE)"),
        },
        backlog as f64 / fill_secs,
        "jobs/s",
    )];
    metrics.extend(polls.metrics(
        &format!("{key}_poll"),
        &format!("{backlog} pending: poll (claim)"),
    ));
    metrics.extend(results.metrics(
        &format!("{key}_result"),
        &format!("{backlog} pending: result"),
    ));
    metrics.extend(creates.metrics(
        &format!("{key}_create"),
        &format!("{backlog} pending: create"),
    ));
    let mut other = cpu.other_metric();
    other.key = format!("{key}_{}", other.key);
    other.label = format!("{backlog} pending: {}", other.label);
    metrics.push(other);
    for mut metric in cpu.postgres_metrics(0) {
        metric.key = format!("{key}_{}", metric.key);
        metric.label = format!("{backlog} pending: {}", metric.label);
        metrics.push(metric);
    }
    Ok((metrics, p50, p99))
}

/// Fills the backlog with `fill_concurrency` concurrent creates.
async fn fill_over_http(
    api: &Api,
    args: &Args,
    content_type: &str,
    backlog: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let (done, _) = watch::channel(false);
    let done = Arc::new(done);
    let mut fillers = Vec::new();
    for _ in 0..args.fill_concurrency.min(backlog) {
        let api = api.clone();
        let url = api.create_url();
        let content_type = content_type.to_owned();
        let next = next.clone();
        let stop = done.subscribe();
        fillers.push(tokio::spawn(stop_all_on_error(done.clone(), async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= backlog || *stop.borrow() {
                    return Ok(());
                }
                api.create(&url, &content_type, n).await?;
            }
        })));
    }
    join_all(fillers).await?;
    Ok(())
}

/// Workers long-poll on replica `poll_on`; jobs are created one at a time on replica
/// `create_on` (the same for `longpoll`, different for `wakeup`).
async fn longpoll(
    target: &Target,
    args: &Args,
    poll_on: usize,
    create_on: usize,
) -> anyhow::Result<Vec<Metric>> {
    let api = target.api_for(create_on);
    let poll_api = target.api_for(poll_on);
    let content_type = unique_content_type(if poll_on == create_on { "lp" } else { "wk" });
    target
        .leftover
        .lock()
        .expect("leftover lock")
        .push(content_type.clone());
    let total = args.longpoll_jobs;
    let (done, _) = watch::channel(false);
    let done = Arc::new(done);
    let picked = Arc::new(AtomicUsize::new(0));
    let all_picked = Arc::new(tokio::sync::Notify::new());

    let mut workers = Vec::new();
    for w in 0..args.longpoll_workers {
        let api = poll_api.clone();
        let url = api.poll_url(
            &format!("bench-longpoll-{w}"),
            &content_type,
            Some(args.longpoll_wait),
        );
        let (picked, all_picked) = (picked.clone(), all_picked.clone());
        let mut stop = done.subscribe();
        workers.push(tokio::spawn(stop_all_on_error(done.clone(), async move {
            let mut pickups: Vec<(String, Instant)> = Vec::new();
            loop {
                let polled = tokio::select! {
                    biased;
                    _ = stop.wait_for(|d| *d) => break,
                    polled = api.poll(&url) => polled?,
                };
                let Some(job) = polled else { continue };
                pickups.push((job.job_id.clone(), Instant::now()));
                api.submit(&job).await?;
                if picked.fetch_add(1, Ordering::Relaxed) + 1 >= total {
                    all_picked.notify_one();
                }
            }
            Ok(pickups)
        })));
    }

    // Let every worker reach its long poll before the first job exists (connecting takes
    // longer with a thousand of them).
    tokio::time::sleep(Duration::from_millis(300 + args.longpoll_workers as u64)).await;
    let memory_waiting = target.server_memory_mib("VmRSS");
    let cpu_before = target.cpu();
    let started = Instant::now();
    let create_url = api.create_url();
    let pause = Duration::from_secs_f64(args.longpoll_pause_ms / 1e3);
    let mut created: Vec<(String, Instant, Instant)> = Vec::with_capacity(total);
    let producing = async {
        for n in 0..total {
            let sent = Instant::now();
            let job_id = api.create(&create_url, &content_type, n).await?;
            created.push((job_id, sent, Instant::now()));
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        let give_up = Instant::now() + Duration::from_secs(60);
        while picked.load(Ordering::Relaxed) < total {
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "only {} of {total} jobs were picked up within 60 s",
                    picked.load(Ordering::Relaxed)
                );
            }
            let _ = tokio::time::timeout(left, all_picked.notified()).await;
        }
        anyhow::Ok(())
    };
    let produced = stop_all_on_error(done.clone(), producing).await;
    let cpu = target.cpu().since(&cpu_before, started.elapsed());
    done.send_replace(true);
    let pickups = join_all(workers).await;
    produced?;
    let pickups: HashMap<String, Instant> = pickups?.into_iter().flatten().collect();

    let (mut from_sent, mut from_answered, mut creates) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let mut before_answer = 0usize;
    for (job_id, sent, answered) in &created {
        let picked_at = pickups
            .get(job_id)
            .with_context(|| format!("job {job_id} was created but no worker got it"))?;
        from_sent.push(picked_at.saturating_duration_since(*sent));
        if picked_at < answered {
            before_answer += 1;
        }
        from_answered.push(picked_at.saturating_duration_since(*answered));
        creates.push(*answered - *sent);
    }
    let mut metrics = Vec::new();
    metrics.extend(from_sent.metrics(
        "pickup_from_create_sent",
        "pickup after the create was sent",
    ));
    metrics.extend(from_answered.metrics(
        "pickup_from_create_answered",
        "pickup after the create was answered",
    ));
    metrics.push(Metric::new(
        "picked_before_create_answered",
        "jobs the worker had before the create answered",
        before_answer as f64,
        "jobs",
    ));
    metrics.extend(creates.metrics("create", "create"));
    // The same pickup as the server saw it: from the create's arrival (`created_at`) to the
    // claim (`started_at`), both stamped by the server's clock, so the load generator's own
    // scheduling (a thousand connections on one thread) is not in it.
    let mut server_side = Latencies::default();
    for (job_id, _, _) in &created {
        let status: Value = api
            .send(
                Method::GET,
                &format!("/api/v1/remote-jobs/{job_id}/status"),
                None,
                "status",
            )
            .await?;
        let (Some(created_at), Some(started_at)) =
            (status["created_at"].as_str(), status["started_at"].as_str())
        else {
            bail!("job {job_id} has no claim time: {status}");
        };
        let created_at = humantime::parse_rfc3339_weak(created_at)?;
        let started_at = humantime::parse_rfc3339_weak(started_at)?;
        server_side.push(started_at.duration_since(created_at).unwrap_or_default());
    }
    metrics.extend(server_side.metrics(
        "pickup_server_side",
        "pickup on the server's clock (created_at to started_at)",
    ));
    if let Some(mib) = memory_waiting {
        metrics.push(Metric::new(
            "server_rss_waiting_mib",
            "server memory (RSS) with every worker in a long poll",
            mib,
            "MiB",
        ));
    }
    if let Some(mib) = target.server_memory_mib("VmHWM") {
        metrics.push(Metric::new(
            "server_peak_rss_mib",
            "server memory peak (RSS high-water mark) over the run",
            mib,
            "MiB",
        ));
    }
    metrics.extend(cpu.metrics(total));
    Ok(metrics)
}

// ---------------------------------------------------------------------------------------
// CPU accounting from /proc: where the time went during a run.

/// CPU seconds per thread name of the server, and of this process.
struct CpuSnapshot {
    server_threads: BTreeMap<String, f64>,
    client: f64,
    /// CPU seconds per process of PostgreSQL's that works for this run (see
    /// `postgres_processes`), when the run uses it.
    postgres: Option<HashMap<u32, f64>>,
    /// Busy CPU seconds of the whole machine, from /proc/stat.
    machine: f64,
}

/// Linux reports /proc times in USER_HZ, which is 100 on every supported architecture.
const TICKS_PER_SEC: f64 = 100.0;

fn stat_cpu_seconds(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / TICKS_PER_SEC))
}

/// CPU seconds of each PostgreSQL process that works for `database`: its backends and
/// autovacuum workers (their process titles name the database), and the shared ones
/// (postmaster, WAL writer, checkpointer, background writer, launchers). Backends of
/// other databases on the same server (other people's tests, say) are left out, so their
/// work shows up as other load.
fn postgres_processes(database: &str) -> HashMap<u32, f64> {
    const SHARED: [&str; 5] = [
        "walwriter",
        "checkpointer",
        "background writer",
        "autovacuum launcher",
        "logical replication launcher",
    ];
    let mut processes = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return processes;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some((name, secs)) = stat_cpu_seconds(&stat) else {
            continue;
        };
        if name != "postgres" {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let title = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = if let Some(rest) = title.strip_prefix("postgres: ") {
            rest.contains(database) || SHARED.iter().any(|s| rest.contains(s))
        } else {
            true // the postmaster
        };
        if ours {
            processes.insert(pid, secs);
        }
    }
    processes
}

impl CpuSnapshot {
    fn take(server_pids: &[u32], postgres_database: Option<&str>) -> CpuSnapshot {
        let mut server_threads = BTreeMap::new();
        for &pid in server_pids {
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for task in tasks.flatten() {
                    let stat =
                        std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                    if let Some((name, secs)) = stat_cpu_seconds(&stat) {
                        *server_threads.entry(name).or_insert(0.0) += secs;
                    }
                }
            }
        }
        let client = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| stat_cpu_seconds(&stat))
            .map(|(_, secs)| secs)
            .unwrap_or(0.0);
        // The first line of /proc/stat: user nice system idle iowait irq softirq steal ...
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let line = stat.lines().next()?.strip_prefix("cpu ")?.to_owned();
                let ticks: Vec<f64> = line
                    .split_whitespace()
                    .filter_map(|t| t.parse().ok())
                    .collect();
                let busy: f64 = [0, 1, 2, 5, 6, 7]
                    .iter()
                    .filter_map(|&i| ticks.get(i))
                    .sum();
                Some(busy / TICKS_PER_SEC)
            })
            .unwrap_or(0.0);
        let postgres = postgres_database.map(postgres_processes);
        CpuSnapshot {
            server_threads,
            client,
            postgres,
            machine,
        }
    }

    fn since(&self, before: &CpuSnapshot, elapsed: Duration) -> CpuUse {
        let server_threads = self
            .server_threads
            .iter()
            .map(|(name, secs)| {
                (
                    name.clone(),
                    secs - before.server_threads.get(name).copied().unwrap_or(0.0),
                )
            })
            .collect();
        CpuUse {
            server_threads,
            client: self.client - before.client,
            // A process that exited in between is lost; one that started counts fully.
            postgres: match (&self.postgres, &before.postgres) {
                (Some(now), Some(then)) => Some(
                    now.iter()
                        .map(|(pid, secs)| secs - then.get(pid).copied().unwrap_or(0.0))
                        .filter(|delta| *delta > 0.0)
                        .sum(),
                ),
                _ => None,
            },
            machine: self.machine - before.machine,
            elapsed: elapsed.as_secs_f64(),
        }
    }
}

struct CpuUse {
    server_threads: BTreeMap<String, f64>,
    client: f64,
    postgres: Option<f64>,
    machine: f64,
    elapsed: f64,
}

impl CpuUse {
    /// CPU that neither the server, nor the load generator, nor PostgreSQL used: other
    /// load on the machine.
    fn other_metric(&self) -> Metric {
        let server: f64 = self.server_threads.values().sum();
        let postgres = self.postgres.unwrap_or(0.0);
        Metric::new(
            "other_cpu_cores",
            "other processes' CPU during the run (cores busy)",
            ((self.machine - server - self.client - postgres) / self.elapsed).max(0.0),
            "cores",
        )
    }

    fn postgres_metrics(&self, jobs: usize) -> Vec<Metric> {
        let Some(postgres) = self.postgres else {
            return Vec::new();
        };
        let mut metrics = vec![Metric::new(
            "postgres_cpu_cores",
            "PostgreSQL CPU: this database's backends and the shared processes (cores busy)",
            postgres / self.elapsed,
            "cores",
        )];
        if jobs > 0 {
            metrics.push(Metric::new(
                "postgres_cpu_us_per_job",
                "PostgreSQL CPU per job",
                postgres / jobs as f64 * 1e6,
                "us",
            ));
        }
        metrics
    }

    fn metrics(&self, jobs: usize) -> Vec<Metric> {
        if self.server_threads.is_empty() {
            let mut metrics = self.postgres_metrics(jobs);
            metrics.extend([
                Metric::new(
                    "client_cpu_cores",
                    "load generator CPU (cores busy)",
                    self.client / self.elapsed,
                    "cores",
                ),
                Metric::new(
                    "machine_cpu_cores",
                    "whole machine CPU (cores busy)",
                    self.machine / self.elapsed,
                    "cores",
                ),
            ]);
            return metrics;
        }
        let server: f64 = self.server_threads.values().sum();
        let mut metrics = vec![
            Metric::new(
                "server_cpu_cores",
                "server CPU (cores busy)",
                server / self.elapsed,
                "cores",
            ),
            Metric::new(
                "client_cpu_cores",
                "load generator CPU (cores busy)",
                self.client / self.elapsed,
                "cores",
            ),
            Metric::new(
                "server_cpu_us_per_job",
                "server CPU per job",
                server / jobs as f64 * 1e6,
                "us",
            ),
            Metric::new(
                "client_cpu_us_per_job",
                "load generator CPU per job",
                self.client / jobs as f64 * 1e6,
                "us",
            ),
        ];
        metrics.extend(self.postgres_metrics(jobs));
        metrics.push(self.other_metric());
        for (name, secs) in &self.server_threads {
            let key: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            metrics.push(Metric::new(
                format!("server_thread_{key}_cores"),
                format!("server threads named {name:?} (cores busy)"),
                secs / self.elapsed,
                "cores",
            ));
        }
        metrics
    }
}

// ---------------------------------------------------------------------------------------
// Reporting.

#[derive(Clone, Debug)]
struct Metric {
    key: String,
    label: String,
    value: f64,
    unit: &'static str,
}

impl Metric {
    fn new(
        key: impl Into<String>,
        label: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Metric {
        Metric {
            key: key.into(),
            label: label.into(),
            value,
            unit,
        }
    }
}

/// More CPU than this used by other processes during a run makes its figures suspect.
const OTHER_LOAD_WARNING: f64 = 0.25;

struct ScenarioReport {
    name: &'static str,
    parameters: Value,
    /// In first-seen order: key, label, unit, the value of each run.
    metrics: Vec<(String, String, &'static str, Vec<f64>)>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "jobs/s" | "req/s" | "polls" | "jobs" | "samples" | "yes" => format!("{value:.0}"),
        "ms" => format!("{value:.3}"),
        "us" => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

impl ScenarioReport {
    fn from_runs(scenario: Scenario, args: &Args, runs: Vec<Vec<Metric>>) -> ScenarioReport {
        let parameters = match scenario {
            Scenario::Lifecycle => json!({
                "jobs": args.jobs, "workers": args.workers, "producers": args.producers,
                "worker_wait_secs": args.worker_wait,
                "sinks": format!("{:?}", args.sinks).to_lowercase(),
                "delivery_backlog": args.delivery_backlog,
            }),
            Scenario::CeleryLatency => json!({
                "jobs": args.celery_jobs, "pause_ms": args.celery_pause_ms,
            }),
            Scenario::ClaimLatency => json!({
                "backlogs": args.backlogs, "claims": args.claims, "warmup_claims": args.warmup_claims,
                "fill_concurrency": args.fill_concurrency,
            }),
            Scenario::Longpoll | Scenario::Wakeup => json!({
                "workers": args.longpoll_workers, "jobs": args.longpoll_jobs,
                "pause_ms": args.longpoll_pause_ms, "wait_secs": args.longpoll_wait,
            }),
            Scenario::WorkerOverhead => json!({
                "jobs": args.overhead_jobs, "exec": args.overhead_exec,
                "concurrency": args.overhead_concurrency,
            }),
            Scenario::Soak => json!({
                "minutes": args.soak_minutes, "sample_secs": args.soak_sample_secs,
                "workers": args.workers, "producers": args.producers,
                "worker_wait_secs": args.worker_wait,
                "server_args": soak::SOAK_SERVER_ARGS,
            }),
            Scenario::All => Value::Null,
        };
        let mut parameters = parameters;
        if let Value::Object(map) = &mut parameters {
            map.insert(
                "store".into(),
                json!(if args.database_url.is_some() {
                    "postgres"
                } else {
                    "sqlite"
                }),
            );
            map.insert("replicas".into(), json!(args.replicas));
            if scenario == Scenario::ClaimLatency {
                map.insert(
                    "fill".into(),
                    json!(format!("{:?}", args.fill).to_lowercase()),
                );
            }
        }
        let mut metrics: Vec<(String, String, &'static str, Vec<f64>)> = Vec::new();
        for run in runs {
            for metric in run {
                match metrics.iter_mut().find(|m| m.0 == metric.key) {
                    Some(existing) => existing.3.push(metric.value),
                    None => {
                        metrics.push((metric.key, metric.label, metric.unit, vec![metric.value]))
                    }
                }
            }
        }
        ScenarioReport {
            name: scenario_name(scenario),
            parameters,
            metrics,
        }
    }

    fn to_json(&self) -> Value {
        let metrics: serde_json::Map<String, Value> = self
            .metrics
            .iter()
            .map(|(key, label, unit, values)| {
                (
                    key.clone(),
                    json!({"label": label, "unit": unit, "median": median(values), "runs": values}),
                )
            })
            .collect();
        json!({"parameters": self.parameters, "metrics": metrics})
    }

    fn render(&self) -> String {
        let mut out = format!("== {} ({})\n", self.name, self.parameters);
        for (key, _, _, values) in &self.metrics {
            if key.ends_with("other_cpu_cores") && values.iter().any(|v| *v > OTHER_LOAD_WARNING) {
                out.push_str(&format!(
                    "  warning: other processes kept {} cores busy during a run ({key}); these figures are low\n",
                    values.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join("/")
                ));
            }
        }
        let width = self
            .metrics
            .iter()
            .map(|m| m.1.chars().count())
            .max()
            .unwrap_or(0);
        for (_, label, unit, values) in &self.metrics {
            let runs = if values.len() > 1 {
                let each: Vec<String> = values.iter().map(|v| format_value(*v, unit)).collect();
                format!("   runs: {}", each.join(", "))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "  {label:<width$}  {:>10} {unit}{runs}\n",
                format_value(median(values), unit)
            ));
        }
        out
    }
}

struct Machine {
    cpus: usize,
    cpu_model: String,
    load_average: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                line.strip_prefix("model name")
                    .and_then(|rest| rest.split_once(':'))
            })
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .map(|text| {
                text.split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            load_average,
        }
    }

    fn to_json(&self) -> Value {
        json!({"cpus": self.cpus, "cpu_model": self.cpu_model, "load_average_at_start": self.load_average})
    }
}
