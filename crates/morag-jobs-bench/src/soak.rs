//! The `soak` scenario: sustained lifecycle load with retention cleanup running.
//!
//! Producers create jobs and workers claim and complete them, without pause, for
//! `--soak-minutes`, on a server that deletes every finished job at its next cleanup
//! (`SOAK_SERVER_ARGS`: retention 0 days, a cleanup every 30 s, the monitor every 5 s).
//! Every `--soak-sample-secs` it samples: jobs completed per second in the interval, the
//! p99 of the interval's creates and results (the hot-path writes), the servers' RSS,
//! the data size (SQLite: the database file and its WAL; PostgreSQL: the database) and
//! the size of each table with its indexes, and whether the server's last cleanup pass
//! kept up (its statistics' `cleanup` field). The summary checks the figures against the
//! targets of sustained operation: the data size of the last five minutes (the second
//! half of a shorter soak) within 10% of its mean, no interval's throughput below 80% of
//! the median, p99 under 50 ms in every interval, RSS flat.
//!
//! Self-contained on purpose: it uses the benchmark's `Target`, `Api` and `Metric` and
//! nothing of the other scenarios.

use super::*;

/// The server settings of a soak, as `--server-arg` flags (the benchmark starts servers
/// without the shell's `MORAG_*` variables): `MORAG_JOB_RETENTION_DAYS=0`,
/// `MORAG_JOB_CLEANUP_INTERVAL=30`, `MORAG_JOB_MONITOR_INTERVAL=5`.
pub(super) const SOAK_SERVER_ARGS: [&str; 3] = [
    "--retention-days=0",
    "--cleanup-interval=30",
    "--monitor-interval=5",
];

/// The targets the summary checks.
const DATA_SIZE_TOLERANCE: f64 = 0.10;
const MIN_INTERVAL_THROUGHPUT_RATIO: f64 = 0.80;
const P99_LIMIT_MS: f64 = 50.0;
/// RSS counts as flat when the last quarter's samples stay within this of the second
/// quarter's largest (the first quarter is the warm-up: caches and pools fill).
const RSS_TOLERANCE: f64 = 0.10;
/// The window the data size must be flat in: the last five minutes.
const FLAT_WINDOW: Duration = Duration::from_secs(300);

/// What the clients record between two samples.
#[derive(Default)]
struct IntervalRecord {
    /// Round trips of creates and results.
    writes: Vec<Duration>,
    /// Round trips of polls that claimed a job (a long poll's wait included).
    claims: Vec<Duration>,
}

/// One sample.
struct Sample {
    at: Duration,
    jobs_per_sec: f64,
    write_p99_ms: f64,
    claim_p99_ms: f64,
    rss_bytes: u64,
    data_bytes: u64,
    tables: BTreeMap<String, u64>,
    /// From the server's statistics: whether its last cleanup pass caught up.
    cleanup_keeping_up: Option<bool>,
    /// From the server's statistics: the last cleanup pass, as one line.
    cleanup_pass: String,
}

pub(super) async fn soak(target: &Target, args: &Args) -> anyhow::Result<Vec<Metric>> {
    let content_type = unique_content_type("soak");
    target
        .leftover
        .lock()
        .expect("leftover lock")
        .push(content_type.clone());
    let duration = Duration::from_secs_f64(args.soak_minutes * 60.0);
    let sample_every = Duration::from_secs_f64(args.soak_sample_secs);
    let completed = Arc::new(AtomicUsize::new(0));
    let record: Arc<Mutex<IntervalRecord>> = Arc::default();
    let (done, _) = watch::channel(false);
    let done = Arc::new(done);
    let wait = (args.worker_wait > 0.0).then_some(args.worker_wait);

    let mut tasks = Vec::new();
    for w in 0..args.workers {
        let api = target.api_for(w).clone();
        let url = api.poll_url(&format!("soak-worker-{w}"), &content_type, wait);
        let (completed, record) = (completed.clone(), record.clone());
        let mut stop = done.subscribe();
        tasks.push(tokio::spawn(stop_all_on_error(done.clone(), async move {
            loop {
                let sent = Instant::now();
                let polled = tokio::select! {
                    biased;
                    _ = stop.wait_for(|d| *d) => break,
                    polled = api.poll(&url) => polled?,
                };
                let claimed = Instant::now();
                let Some(job) = polled else {
                    if wait.is_none() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    continue;
                };
                api.submit(&job).await?;
                let answered = Instant::now();
                completed.fetch_add(1, Ordering::Relaxed);
                let mut record = record.lock().expect("record lock");
                record.claims.push(claimed - sent);
                record.writes.push(answered - claimed);
            }
            anyhow::Ok(())
        })));
    }
    for p in 0..args.producers {
        let api = target.api_for(p).clone();
        let url = api.create_url();
        let content_type = content_type.clone();
        let record = record.clone();
        let mut stop = done.subscribe();
        tasks.push(tokio::spawn(stop_all_on_error(done.clone(), async move {
            let mut n = 0usize;
            while !*stop.borrow_and_update() {
                let sent = Instant::now();
                api.create(&url, &content_type, p * 1_000_000_000 + n)
                    .await?;
                record
                    .lock()
                    .expect("record lock")
                    .writes
                    .push(sent.elapsed());
                n += 1;
            }
            anyhow::Ok(())
        })));
    }

    let sizes = DataSizes::open(target).await?;
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut counted = 0usize;
    let mut last = started;
    let mut failed = done.subscribe();
    progress(&format!(
        "  soak: {:.1} min, {} producers, {} workers, a sample every {:.0} s",
        args.soak_minutes, args.producers, args.workers, args.soak_sample_secs
    ));
    while started.elapsed() < duration {
        let next = last + sample_every;
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = failed.wait_for(|d| *d) => break,
        }
        let now = Instant::now();
        let interval = now - last;
        last = now;
        let total = completed.load(Ordering::Relaxed);
        let jobs = total - counted;
        counted = total;
        let taken = std::mem::take(&mut *record.lock().expect("record lock"));
        let (tables, data_bytes) = sizes.measure().await?;
        let sample = Sample {
            at: now - started,
            jobs_per_sec: jobs as f64 / interval.as_secs_f64(),
            write_p99_ms: Latencies(taken.writes).percentile_ms(0.99),
            claim_p99_ms: Latencies(taken.claims).percentile_ms(0.99),
            rss_bytes: target.server_pids().iter().map(|pid| rss_bytes(*pid)).sum(),
            data_bytes,
            tables,
            cleanup_keeping_up: None,
            cleanup_pass: String::new(),
        };
        let mut sample = sample;
        if let Some(pass) = last_cleanup_pass(&target.api).await {
            sample.cleanup_keeping_up = pass["keeping_up"].as_bool();
            sample.cleanup_pass = format!(
                "{} jobs in {} s, store busy {}",
                pass["jobs_deleted"], pass["seconds"], pass["store_busy_share"]
            );
        }
        progress(&format!(
            "  {:>5.0} s  {:>6.0} jobs/s  write p99 {:>6.1} ms  claim p99 {:>7.1} ms  RSS {:>5.1} MB  data {:>6.1} MB  cleanup {} ({})  [{}]",
            sample.at.as_secs_f64(),
            sample.jobs_per_sec,
            sample.write_p99_ms,
            sample.claim_p99_ms,
            mb(sample.rss_bytes),
            mb(sample.data_bytes),
            match sample.cleanup_keeping_up {
                Some(true) => "keeping up",
                Some(false) => "BEHIND",
                None => "not yet",
            },
            sample.cleanup_pass,
            sample
                .tables
                .iter()
                .map(|(name, bytes)| format!("{name} {:.1}", mb(*bytes)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        samples.push(sample);
    }
    done.send_replace(true);
    join_all(tasks).await?;
    summarize(&samples, duration)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Checks the samples against the targets; each check is a metric (1 = met, 0 = not).
fn summarize(samples: &[Sample], duration: Duration) -> anyhow::Result<Vec<Metric>> {
    if samples.len() < 4 {
        bail!("the soak took fewer than four samples: make --soak-minutes longer");
    }
    let throughputs: Vec<f64> = samples.iter().map(|s| s.jobs_per_sec).collect();
    let median_throughput = median(&throughputs);
    let lowest = throughputs.iter().copied().fold(f64::INFINITY, f64::min);
    let worst_p99 = samples.iter().map(|s| s.write_p99_ms).fold(0.0, f64::max);
    let worst_claim_p99 = samples.iter().map(|s| s.claim_p99_ms).fold(0.0, f64::max);

    // The data size in the last five minutes (the second half of a shorter soak).
    let window = FLAT_WINDOW.min(duration / 2);
    let window_start = samples.last().expect("samples").at.saturating_sub(window);
    let flat: Vec<f64> = samples
        .iter()
        .filter(|s| s.at >= window_start)
        .map(|s| s.data_bytes as f64)
        .collect();
    let flat_mean = flat.iter().sum::<f64>() / flat.len() as f64;
    let data_deviation = flat
        .iter()
        .map(|v| (v / flat_mean - 1.0).abs())
        .fold(0.0, f64::max);

    let quarter = samples.len() / 4;
    let warm_rss = samples[quarter..2 * quarter]
        .iter()
        .map(|s| s.rss_bytes)
        .max()
        .unwrap_or(0) as f64;
    let late_rss = samples[samples.len() - quarter..]
        .iter()
        .map(|s| s.rss_bytes)
        .max()
        .unwrap_or(0) as f64;
    let rss_growth = if warm_rss > 0.0 {
        late_rss / warm_rss - 1.0
    } else {
        0.0
    };
    let behind = samples
        .iter()
        .filter(|s| s.cleanup_keeping_up == Some(false))
        .count();
    let met = |ok: bool| if ok { 1.0 } else { 0.0 };

    let mut metrics = vec![
        Metric::new("samples", "samples taken", samples.len() as f64, "samples"),
        Metric::new(
            "jobs_per_sec_median",
            "throughput, median interval",
            median_throughput,
            "jobs/s",
        ),
        Metric::new(
            "lowest_interval_vs_median",
            "lowest interval / median (target >= 0.80)",
            lowest / median_throughput.max(f64::MIN_POSITIVE),
            "x",
        ),
        Metric::new(
            "write_p99_worst_ms",
            "create and result p99, worst interval (target < 50)",
            worst_p99,
            "ms",
        ),
        Metric::new(
            "claim_p99_worst_ms",
            "claiming poll p99 (incl. long-poll wait), worst interval",
            worst_claim_p99,
            "ms",
        ),
        Metric::new(
            "data_mb_last_window_mean",
            format!("data size, mean of the last {:.0} s", window.as_secs_f64()),
            flat_mean / (1024.0 * 1024.0),
            "MB",
        ),
        Metric::new(
            "data_deviation_last_window",
            "data size, largest deviation from that mean (target <= 0.10)",
            data_deviation,
            "x",
        ),
        Metric::new(
            "rss_mb_end",
            "server RSS at the end",
            mb(samples.last().expect("samples").rss_bytes),
            "MB",
        ),
        Metric::new(
            "rss_growth_late_vs_warm",
            "RSS growth, last quarter's max vs second quarter's (target <= 0.10)",
            rss_growth,
            "x",
        ),
        Metric::new(
            "samples_cleanup_behind",
            "samples whose last cleanup pass fell behind",
            behind as f64,
            "samples",
        ),
    ];
    for (table, bytes) in &samples.last().expect("samples").tables {
        metrics.push(Metric::new(
            format!("table_mb_{table}"),
            format!("table {table} with its indexes, at the end"),
            mb(*bytes),
            "MB",
        ));
    }
    metrics.extend([
        Metric::new(
            "target_data_flat",
            "target met: data size flat (1 = yes)",
            met(data_deviation <= DATA_SIZE_TOLERANCE),
            "yes",
        ),
        Metric::new(
            "target_throughput_steady",
            "target met: no interval below 80% of the median",
            met(lowest >= MIN_INTERVAL_THROUGHPUT_RATIO * median_throughput),
            "yes",
        ),
        Metric::new(
            "target_p99",
            "target met: p99 under 50 ms in every interval",
            met(worst_p99 < P99_LIMIT_MS),
            "yes",
        ),
        Metric::new(
            "target_rss_flat",
            "target met: RSS flat",
            met(rss_growth <= RSS_TOLERANCE),
            "yes",
        ),
    ]);
    Ok(metrics)
}

/// A process's resident set size, from `/proc` (0 when it cannot be read).
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kb| kb * 1024)
}

/// The server's last cleanup pass from its statistics (`None` before its first pass).
async fn last_cleanup_pass(api: &Api) -> Option<Value> {
    let (status, body) = api
        .request(Method::GET, "/api/v1/remote-jobs/statistics", None)
        .await
        .ok()?;
    if !status.is_success() {
        return None;
    }
    let mut stats: Value = serde_json::from_slice(&body).ok()?;
    let pass = stats["cleanup"].take();
    (!pass.is_null()).then_some(pass)
}

/// Measures the data size and the tables of the first server's store.
enum DataSizes {
    /// The SQLite file, read through a read-only connection of the benchmark's own
    /// (WAL lets it read beside the server's writer); `dbstat` sums each b-tree's pages.
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        client: tokio_postgres::Client,
    },
}

impl DataSizes {
    async fn open(target: &Target) -> anyhow::Result<DataSizes> {
        if let Some(database) = &target.database {
            return Ok(DataSizes::Postgres {
                client: database.connect().await?,
            });
        }
        let server = target
            .servers
            .first()
            .context("the soak measures a server it started (no --url)")?;
        Ok(DataSizes::Sqlite {
            path: server.data_dir.join("morag-jobs.sqlite3"),
        })
    }

    /// Each table's size with its indexes, and the data size, in bytes.
    async fn measure(&self) -> anyhow::Result<(BTreeMap<String, u64>, u64)> {
        match self {
            DataSizes::Sqlite { path } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || sqlite_sizes(&path)).await?
            }
            DataSizes::Postgres { client } => {
                let rows = client
                    .query(
                        "SELECT c.relname::text, pg_total_relation_size(c.oid) FROM pg_class c \
                         WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace",
                        &[],
                    )
                    .await?;
                let tables = rows
                    .iter()
                    .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1).max(0) as u64))
                    .collect();
                let total: i64 = client
                    .query_one("SELECT pg_database_size(current_database())", &[])
                    .await?
                    .get(0);
                Ok((tables, total.max(0) as u64))
            }
        }
    }
}

fn sqlite_sizes(path: &Path) -> anyhow::Result<(BTreeMap<String, u64>, u64)> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {path:?}"))?;
    let mut stmt = conn.prepare(
        "SELECT COALESCE(s.tbl_name, d.name), SUM(d.pgsize) FROM dbstat d \
         LEFT JOIN sqlite_schema s ON s.name = d.name GROUP BY 1",
    )?;
    let mut tables = BTreeMap::new();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let name: String = row.get(0)?;
        let bytes: i64 = row.get(1)?;
        tables.insert(name, bytes.max(0) as u64);
    }
    let file = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::fs::metadata(name).map_or(0, |m| m.len())
    };
    Ok((tables, file("") + file("-wal")))
}
