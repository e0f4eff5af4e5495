//! The `morag-jobs` command line: `serve` runs the server; the other subcommands are a
//! small admin client for a running server, printing tables or (`--json`) raw JSON.

use std::fmt::Write as _;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::app::{shutdown_signal, App};
use crate::clock::SystemClock;
use crate::config::{Config, DatabaseArgs, ServeArgs};
use crate::domain::JobStatus;
use crate::store::DatabaseTarget;

#[derive(Parser, Debug)]
#[command(
    name = "morag-jobs",
    version,
    about = "Remote conversion job server for MoRAG"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (HTTP API and background monitor).
    Serve(ServeArgs),
    /// Apply the database migrations and exit (`serve` also applies them at start).
    Migrate(StorageArgs),
    /// Import the jobs of MoRAG's file-based prototype (its `remote_jobs` directory) into
    /// the configured store. Safe to run again: jobs already stored are skipped.
    ImportMoragDir {
        /// MoRAG's `remote_jobs` directory (with `pending/`, `processing/`, ... inside),
        /// or the directory that contains it.
        dir: std::path::PathBuf,
        /// The server's settings: the same database and timeouts `serve` would use.
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// List, show, cancel or retry jobs on a running server.
    Jobs {
        #[command(subcommand)]
        action: JobsAction,
    },
    /// List, show or redrive deliveries of job outcomes to the ingestion sinks.
    Deliveries {
        #[command(subcommand)]
        action: DeliveriesAction,
    },
    /// Show job statistics of a running server.
    Stats(ClientArgs),
    /// List the workers a running server has heard from, healthy or stale.
    Workers(ClientArgs),
    /// Take jobs from a server and run a converter command on each (see README.md,
    /// "Running a worker").
    Worker(morag_jobs_client::worker::WorkerArgs),
    /// Delete finished jobs older than N days on a running server.
    Cleanup {
        /// Delete jobs that finished more than this many days ago (0: every finished job).
        #[arg(long)]
        days_old: u32,
        /// Only count the jobs that would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobsAction {
    /// List jobs, newest first, a page at a time.
    List {
        /// Only jobs in this status.
        #[arg(long, value_enum)]
        status: Option<StatusChoice>,
        /// Only jobs of this content type: audio, video, document, image, web, youtube,
        /// or a custom type (`[a-z0-9_-]`, up to 32 characters).
        #[arg(long)]
        content_type: Option<String>,
        /// Jobs per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue a listing where the previous page ended (its `more: --cursor` line).
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one job with its transition history.
    Show {
        /// The job's id.
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job (from any state but cancelled).
    Cancel {
        /// The job's id.
        job_id: String,
        /// Why, recorded in the job's history.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Retry a failed or timed-out job now, with a fresh retry budget.
    Retry {
        /// The job's id.
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// The job statuses, as `jobs list --status` accepts them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChoice {
    Pending,
    Processing,
    Completed,
    Failed,
    Timeout,
    Cancelled,
    Retrying,
}

impl StatusChoice {
    pub fn status(self) -> JobStatus {
        match self {
            StatusChoice::Pending => JobStatus::Pending,
            StatusChoice::Processing => JobStatus::Processing,
            StatusChoice::Completed => JobStatus::Completed,
            StatusChoice::Failed => JobStatus::Failed,
            StatusChoice::Timeout => JobStatus::Timeout,
            StatusChoice::Cancelled => JobStatus::Cancelled,
            StatusChoice::Retrying => JobStatus::Retrying,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DeliveriesAction {
    /// Deliveries, newest first, filtered by state, sink or job.
    List {
        /// pending, delivered or dead.
        #[arg(long)]
        state: Option<String>,
        /// webhook, ingestion_callback or celery.
        #[arg(long)]
        sink: Option<String>,
        /// Only the deliveries of this job.
        #[arg(long)]
        job_id: Option<String>,
        /// Deliveries per page (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The `next_cursor` of a previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One delivery with its attempts.
    Show {
        /// The delivery's id (from `deliveries list`).
        delivery_id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Makes a dead delivery pending again, with a fresh attempt budget.
    Redrive {
        /// The delivery's id (from `deliveries list`).
        delivery_id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// The store to work on directly, for subcommands that do not need a running server.
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// Directory of the SQLite database (when no PostgreSQL URL is given).
    #[arg(long, env = "MORAG_JOBS_DATA_DIR", default_value = "./morag-jobs-data")]
    pub data_dir: std::path::PathBuf,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Base URL of the server (`http://` is assumed when no scheme is given).
    #[arg(long, env = "MORAG_JOBS_URL", default_value = "http://127.0.0.1:8700")]
    pub url: String,
    /// Admin API key.
    #[arg(long, env = "MORAG_JOBS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the server's JSON instead of a table (and errors as JSON).
    #[arg(long)]
    pub json: bool,
}

/// An error already printed (as JSON under `--json`): `main` only sets the exit status.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AlreadyReported(String);

/// A failed request to the server, with what the user can do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    pub message: String,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
    /// The server's `detail`, when it sent one.
    pub detail: Value,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Worker(args) => morag_jobs_client::worker::run(args).await,
        Command::Migrate(storage) => migrate(&storage).await,
        Command::ImportMoragDir { dir, serve } => import(dir, serve).await,
        Command::Jobs { action } => match action {
            JobsAction::List {
                status,
                content_type,
                limit,
                cursor,
                client,
            } => {
                let mut query = vec![("limit".to_owned(), limit.to_string())];
                query.extend(status.map(|s| ("status".to_owned(), s.status().as_str().to_owned())));
                query.extend(content_type.map(|c| ("content_type".to_owned(), c)));
                query.extend(cursor.map(|c| ("cursor".to_owned(), c)));
                let body = request(
                    &client,
                    reqwest::Method::GET,
                    "/api/v1/remote-jobs",
                    &query,
                    None,
                )
                .await;
                print(&client, body, render_list)
            }
            JobsAction::Show { job_id, client } => {
                let body = request(
                    &client,
                    reqwest::Method::GET,
                    &format!("/api/v1/remote-jobs/{job_id}"),
                    &[],
                    None,
                )
                .await;
                print(&client, body, render_detail)
            }
            JobsAction::Cancel {
                job_id,
                reason,
                client,
            } => {
                let payload = serde_json::json!({ "reason": reason });
                let path = format!("/api/v1/remote-jobs/{job_id}/cancel");
                let body = request(&client, reqwest::Method::POST, &path, &[], Some(payload)).await;
                print(&client, body, render_status)
            }
            JobsAction::Retry { job_id, client } => {
                let path = format!("/api/v1/remote-jobs/{job_id}/retry");
                let body = request(&client, reqwest::Method::POST, &path, &[], None).await;
                print(&client, body, render_status)
            }
        },
        Command::Deliveries { action } => match action {
            DeliveriesAction::List {
                state,
                sink,
                job_id,
                limit,
                cursor,
                client,
            } => {
                let mut query = vec![("limit".to_owned(), limit.to_string())];
                query.extend(state.map(|s| ("state".to_owned(), s)));
                query.extend(sink.map(|s| ("sink".to_owned(), s)));
                query.extend(job_id.map(|j| ("job_id".to_owned(), j)));
                query.extend(cursor.map(|c| ("cursor".to_owned(), c)));
                let body = request(
                    &client,
                    reqwest::Method::GET,
                    "/api/v1/deliveries",
                    &query,
                    None,
                )
                .await;
                print(&client, body, render_deliveries)
            }
            DeliveriesAction::Show {
                delivery_id,
                client,
            } => {
                let path = format!("/api/v1/deliveries/{delivery_id}");
                let body = request(&client, reqwest::Method::GET, &path, &[], None).await;
                print(&client, body, render_delivery)
            }
            DeliveriesAction::Redrive {
                delivery_id,
                client,
            } => {
                let path = format!("/api/v1/deliveries/{delivery_id}/redrive");
                let body = request(&client, reqwest::Method::POST, &path, &[], None).await;
                print(&client, body, |v| {
                    format!(
                        "delivery {} is {} again (event {})\n",
                        text(&v["id"]),
                        text(&v["state"]),
                        text(&v["event_id"])
                    )
                })
            }
        },
        Command::Workers(client) => {
            let body = request(&client, reqwest::Method::GET, "/api/v1/workers", &[], None).await;
            print(&client, body, render_workers)
        }
        Command::Stats(client) => {
            let body = request(
                &client,
                reqwest::Method::GET,
                "/api/v1/remote-jobs/statistics",
                &[],
                None,
            )
            .await;
            print(&client, body, render_stats)
        }
        Command::Cleanup {
            days_old,
            dry_run,
            client,
        } => {
            let mut query = vec![("days_old".to_owned(), days_old.to_string())];
            if dry_run {
                query.push(("dry_run".to_owned(), "true".to_owned()));
            }
            let body = request(
                &client,
                reqwest::Method::POST,
                "/api/v1/remote-jobs/cleanup",
                &query,
                None,
            )
            .await;
            print(&client, body, |v| {
                if dry_run {
                    format!(
                        "would clean {} jobs older than {} days (dry run: nothing deleted)\n",
                        v["would_clean_jobs"], v["days_old"]
                    )
                } else {
                    format!(
                        "cleaned {} jobs older than {} days\n",
                        v["cleaned_jobs"], v["days_old"]
                    )
                }
            })
        }
    }
}

/// `serve`: checks the port, then the configuration and data directory, then starts.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // The port first: a port in use must not leave a data directory behind.
    check_listen_address(args.addr)?;
    let config = Config::from_args(args).context("invalid configuration")?;
    for warning in config.auth_warnings() {
        tracing::warn!("{warning}");
    }
    let app = App::build(config, std::sync::Arc::new(SystemClock)).await?;
    log_startup_summary(&app.context().config, app.local_addr());
    app.run(shutdown_signal()).await
}

/// Binds the listen address once and lets it go, to report a taken or forbidden port
/// with what to do about it before anything is created.
fn check_listen_address(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(_listener) => Ok(()),
        Err(error) => {
            let why = match error.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "the port is already in use (is another morag-jobs running?)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied (ports below 1024 need privileges)"
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "no interface of this machine has that address"
                }
                _ => "",
            };
            let why = if why.is_empty() {
                error.to_string()
            } else {
                format!("{why}: {error}")
            };
            bail!("cannot listen on {addr}: {why}; choose another address with --addr or MORAG_JOBS_ADDR")
        }
    }
}

/// One line that says what this server is and where its things are (never a secret).
fn log_startup_summary(config: &Config, addr: std::net::SocketAddr) {
    let store = match &config.database {
        DatabaseTarget::Sqlite(path) => format!("sqlite {}", path.display()),
        DatabaseTarget::Postgres(url) => {
            format!("postgres {}", url_without_credentials(url.expose()))
        }
    };
    let auth = if config.is_open() {
        "open (no API keys: every endpoint answers anyone)".to_owned()
    } else {
        format!(
            "API keys ({} worker, {} admin)",
            config.worker_api_keys.len(),
            config.admin_api_keys.len()
        )
    };
    let roots: Vec<String> = config
        .allowed_roots
        .iter()
        .map(|root| root.display().to_string())
        .collect();
    let mut sinks: Vec<&str> = config
        .delivery
        .global_sinks()
        .into_iter()
        .map(|sink| sink.as_str())
        .collect();
    sinks.push("webhook (per job)");
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %addr,
        store,
        data_dir = %config.data_dir.display(),
        allowed_roots = roots.join(":"),
        auth,
        monitor_interval = %humantime::format_duration(config.monitor_interval),
        cleanup_interval = %humantime::format_duration(config.cleanup_interval),
        sinks = sinks.join(", "),
        "morag-jobs starting"
    );
}

/// `postgres://user:secret@host:5432/db?x` -> `host:5432/db`.
fn url_without_credentials(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

/// Explains a flag or variable clap refused: the variable or flag the user actually set,
/// the value, and what was expected. `None` for errors that are not about one value.
pub fn describe_invalid_value(error: &clap::Error, argv: &[String]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use clap::CommandFactory as _;
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let ContextValue::String(arg) = error.get(ContextKind::InvalidArg)? else {
        return None;
    };
    let ContextValue::String(value) = error.get(ContextKind::InvalidValue)? else {
        return None;
    };
    let flag = arg.split_whitespace().next()?.to_owned();
    let long = flag.strip_prefix("--")?;
    let mut found = None;
    let mut commands = vec![Cli::command()];
    while let Some(command) = commands.pop() {
        if let Some(found_arg) = command.get_arguments().find(|a| a.get_long() == Some(long)) {
            found = Some(found_arg.clone());
            break;
        }
        commands.extend(command.get_subcommands().cloned());
    }
    let found = found?;
    let on_command_line = argv
        .iter()
        .any(|a| a == &flag || a.starts_with(&format!("{flag}=")));
    let hidden = found.is_hide_env_values_set();
    let shown_value = if hidden { "***" } else { value.as_str() };
    let setting = match found.get_env().and_then(|env| env.to_str()) {
        Some(env) if !on_command_line && std::env::var_os(env).is_some() => {
            format!("{env}={shown_value}")
        }
        _ => format!("{flag} {shown_value}"),
    };
    let expected = match (
        std::error::Error::source(error),
        error.get(ContextKind::ValidValue),
    ) {
        (Some(source), _) => source.to_string(),
        (None, Some(ContextValue::Strings(valid))) => {
            format!("expected one of {}", valid.join(", "))
        }
        _ => return None,
    };
    Some(format!("{setting}: {expected}"))
}

async fn import(dir: std::path::PathBuf, serve: ServeArgs) -> anyhow::Result<()> {
    use crate::clock::Clock as _;
    let config = Config::from_args(serve).context("invalid configuration")?;
    let dir = if !dir.join("pending").is_dir() && dir.join("remote_jobs").is_dir() {
        dir.join("remote_jobs")
    } else {
        dir
    };
    let store = crate::store::open(&config.database, &config.store_settings)
        .await
        .with_context(|| format!("failed to open the store ({:?})", config.database))?;
    let result =
        crate::import::import_morag_dir(&*store, &dir, &config.policy.timeouts, SystemClock.now())
            .await;
    store.close().await.context("failed to close the store")?;
    let summary = result.context("the import stopped")?;
    for (path, reason) in &summary.malformed {
        eprintln!("malformed: {}: {reason}", path.display());
    }
    println!(
        "imported {} jobs, skipped {} already present, {} malformed files",
        summary.n_imported,
        summary.n_skipped,
        summary.malformed.len()
    );
    Ok(())
}

async fn migrate(storage: &StorageArgs) -> anyhow::Result<()> {
    let target = storage.database.target(&storage.data_dir)?;
    // The SQLite durability setting does not matter for a migration.
    let settings = storage.database.settings(Default::default());
    let report = crate::store::migrate(&target, &settings)
        .await
        .with_context(|| format!("failed to migrate the store ({target:?})"))?;
    let what = match &target {
        DatabaseTarget::Postgres(_) => "PostgreSQL schema".to_owned(),
        DatabaseTarget::Sqlite(path) => format!("SQLite store at {}", path.display()),
    };
    if report.from_version == report.to_version {
        println!("{what} is up to date (version {})", report.to_version);
    } else {
        println!(
            "{what} migrated from version {} to {}",
            report.from_version, report.to_version
        );
    }
    Ok(())
}

/// The server's base URL: `http://` is assumed when no scheme is given.
fn base_url(raw: &str) -> Result<reqwest::Url, ClientError> {
    let raw = raw.trim().trim_end_matches('/');
    let with_scheme = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    match reqwest::Url::parse(&with_scheme) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
        _ => Err(ClientError {
            message: format!(
                "--url / MORAG_JOBS_URL {raw:?}: expected the server's address, e.g. http://127.0.0.1:8700 or 127.0.0.1:8700"
            ),
            status: None,
            detail: Value::Null,
        }),
    }
}

async fn request(
    client: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    query: &[(String, String)],
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let base = base_url(&client.url)?;
    let url = format!("{}{}", base.as_str().trim_end_matches('/'), path);
    let mut builder = reqwest::Client::new().request(method, &url).query(query);
    if let Some(key) = &client.api_key {
        builder = builder.bearer_auth(key);
    }
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.map_err(|error| {
        let base = base.as_str().trim_end_matches('/');
        ClientError {
            message: format!(
                "cannot reach the morag-jobs server at {base}: {}. Is it running there? \
                 Point the CLI at it with --url or MORAG_JOBS_URL",
                root_cause(&error)
            ),
            status: None,
            detail: Value::Null,
        }
    })?;
    let status = response.status();
    let text = response.text().await.map_err(|error| ClientError {
        message: format!("the server's answer broke off: {}", root_cause(&error)),
        status: Some(status.as_u16()),
        detail: Value::Null,
    })?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        return Ok(value);
    }
    let detail = value.get("detail").cloned().unwrap_or(value);
    Err(ClientError {
        message: describe_server_error(status, &detail),
        status: Some(status.as_u16()),
        detail,
    })
}

/// The innermost cause: "Connection refused (os error 111)", not "error sending request".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A server error as a sentence: FastAPI's 422 lists become `field: message` lines.
fn describe_server_error(status: reqwest::StatusCode, detail: &Value) -> String {
    let text = match detail {
        Value::String(text) => text.clone(),
        Value::Array(problems) => problems
            .iter()
            .map(|problem| {
                let field = problem["loc"]
                    .as_array()
                    .map(|loc| {
                        // The first element says where (body, query): the field is enough.
                        let names: Vec<String> = loc.iter().skip(1).map(text_of).collect();
                        names.join(".")
                    })
                    .unwrap_or_default();
                let message = text_of(&problem["msg"]);
                if field.is_empty() {
                    message
                } else {
                    format!("{field}: {message}")
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let hint = match status.as_u16() {
        401 => " (pass an admin key with --api-key or MORAG_JOBS_API_KEY)",
        403 => " (this needs an admin key: --api-key or MORAG_JOBS_API_KEY)",
        _ => "",
    };
    format!("the server answered {status}: {text}{hint}")
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints the answer, or the error (as JSON on stdout under `--json`).
fn print(
    client: &ClientArgs,
    body: Result<Value, ClientError>,
    render: impl Fn(&Value) -> String,
) -> anyhow::Result<()> {
    match body {
        Ok(body) if client.json => println!("{}", serde_json::to_string_pretty(&body)?),
        Ok(body) => print!("{}", render(&body)),
        Err(error) if client.json => {
            let report = serde_json::json!({
                "error": error.message,
                "status": error.status,
                "detail": error.detail,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Err(AlreadyReported(error.message).into());
        }
        Err(error) => return Err(error.into()),
    }
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns as wide as their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

fn render_list(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|job| {
                    [
                        "job_id",
                        "status",
                        "content_type",
                        "attempt",
                        "retry_count",
                        "worker_id",
                        "created_at",
                    ]
                    .iter()
                    .map(|field| text(&job[*field]))
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = table(
        &[
            "JOB ID", "STATUS", "TYPE", "ATTEMPT", "RETRIES", "WORKER", "CREATED",
        ],
        &rows,
    );
    if let Some(cursor) = body["next_cursor"].as_str() {
        let _ = writeln!(out, "more: --cursor {cursor}");
    }
    out
}

fn render_status(body: &Value) -> String {
    let fields = [
        "job_id",
        "status",
        "worker_id",
        "retry_count",
        "created_at",
        "started_at",
        "completed_at",
        "error_message",
    ];
    let rows: Vec<Vec<String>> = fields
        .iter()
        .map(|f| vec![f.to_string(), text(&body[*f])])
        .collect();
    table(&["FIELD", "VALUE"], &rows)
}

fn render_detail(body: &Value) -> String {
    let fields = [
        "job_id",
        "status",
        "content_type",
        "ingestion_task_id",
        "source_file_path",
        "worker_id",
        "attempt",
        "retry_count",
        "created_at",
        "started_at",
        "completed_at",
        "execution_deadline",
        "heartbeat_deadline",
        "progress",
        "error_message",
    ];
    let rows: Vec<Vec<String>> = fields
        .iter()
        .map(|f| vec![f.to_string(), text(&body[*f])])
        .collect();
    let mut out = table(&["FIELD", "VALUE"], &rows);
    let history: Vec<Vec<String>> = body["history"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    ["at", "from", "to", "actor", "reason"]
                        .iter()
                        .map(|f| text(&e[*f]))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    out.push('\n');
    out.push_str(&table(&["AT", "FROM", "TO", "ACTOR", "REASON"], &history));
    out
}

fn render_workers(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["workers"]
        .as_array()
        .map(|workers| {
            workers
                .iter()
                .map(|w| {
                    let types = match w["content_types"].as_array() {
                        Some(types) if types.is_empty() => "*".to_owned(),
                        Some(types) => types.iter().map(text).collect::<Vec<_>>().join(","),
                        None => "-".to_owned(),
                    };
                    let silent = w["seconds_since_last_seen"]
                        .as_f64()
                        .map(|s| format!("{s:.0}s ago"))
                        .unwrap_or_else(|| "-".into());
                    vec![
                        text(&w["worker_id"]),
                        text(&w["instance"]),
                        text(&w["status"]),
                        types,
                        text(&w["jobs_in_flight"]),
                        text(&w["completed"]),
                        text(&w["failed"]),
                        silent,
                        text(&w["address"]),
                        text(&w["version"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = table(
        &[
            "WORKER",
            "INSTANCE",
            "STATUS",
            "TYPES",
            "IN FLIGHT",
            "COMPLETED",
            "FAILED",
            "LAST SEEN",
            "ADDRESS",
            "VERSION",
        ],
        &rows,
    );
    let _ = writeln!(
        out,
        "\nhealthy {}  stale {}  at {}",
        text(&body["healthy"]),
        text(&body["stale"]),
        text(&body["timestamp"])
    );
    out
}

fn render_stats(body: &Value) -> String {
    let mut out = String::new();
    let counts: Vec<Vec<String>> = body["status_counts"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| vec![k.clone(), text(v)]).collect())
        .unwrap_or_default();
    out.push_str(&table(&["STATUS", "JOBS"], &counts));
    out.push('\n');
    let types: Vec<Vec<String>> = body["content_type_counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let avg = body["avg_processing_times"][k]
                        .as_f64()
                        .map(|s| format!("{s:.1}"))
                        .unwrap_or("-".into());
                    vec![k.clone(), text(v), avg]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(&["CONTENT TYPE", "JOBS", "AVG SECONDS"], &types));
    let sinks: Vec<Vec<String>> = body["deliveries"]["per_sink"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(sink, c)| vec![sink.clone(), text(&c["pending"]), text(&c["dead"])])
                .collect()
        })
        .unwrap_or_default();
    if !sinks.is_empty() {
        out.push('\n');
        out.push_str(&table(&["SINK", "PENDING", "DEAD"], &sinks));
        if let Some(age) = body["deliveries"]["oldest_pending_age_seconds"].as_f64() {
            let _ = writeln!(out, "oldest pending delivery: {age:.0} s");
        }
    }
    let healthy_types: Vec<Vec<String>> = body["workers"]["healthy_by_content_type"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| vec![k.clone(), text(v)]).collect())
        .unwrap_or_default();
    if !healthy_types.is_empty() {
        out.push('\n');
        out.push_str(&table(&["CONTENT TYPE", "HEALTHY WORKERS"], &healthy_types));
    }
    let _ = writeln!(
        out,
        "\ntotal {}  created in 24h {}  storage {} MB  at {}",
        text(&body["total_jobs"]),
        text(&body["recent_jobs_24h"]),
        text(&body["storage_size_mb"]),
        text(&body["timestamp"])
    );
    out
}

fn delivery_row(d: &Value) -> Vec<String> {
    vec![
        text(&d["id"]),
        text(&d["sink"]),
        text(&d["state"]),
        text(&d["attempt_count"]),
        text(&d["job_id"]),
        text(&d["event_id"]),
        text(&d["last_error"]),
    ]
}

const DELIVERY_HEADERS: [&str; 7] = [
    "ID",
    "SINK",
    "STATE",
    "ATTEMPTS",
    "JOB",
    "EVENT",
    "LAST ERROR",
];

fn render_deliveries(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["deliveries"]
        .as_array()
        .map(|list| list.iter().map(delivery_row).collect())
        .unwrap_or_default();
    let mut out = table(&DELIVERY_HEADERS, &rows);
    if let Some(cursor) = body["next_cursor"].as_str() {
        let _ = writeln!(out, "more: --cursor {cursor}");
    }
    out
}

fn render_delivery(body: &Value) -> String {
    let mut out = table(&DELIVERY_HEADERS, &[delivery_row(body)]);
    if let Some(next) = body["next_attempt_at"].as_str() {
        let _ = writeln!(out, "next attempt at {next}");
    }
    let attempts: Vec<Vec<String>> = body["attempts"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|a| {
                    vec![
                        text(&a["attempt"]),
                        text(&a["at"]),
                        text(&a["outcome"]),
                        text(&a["http_status"]),
                        text(&a["error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push('\n');
    out.push_str(&table(
        &["ATTEMPT", "AT", "OUTCOME", "HTTP", "ERROR"],
        &attempts,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_choices_are_the_job_statuses() {
        use clap::ValueEnum as _;
        let choices: Vec<&str> = StatusChoice::value_variants()
            .iter()
            .map(|choice| {
                let name = choice.to_possible_value().unwrap().get_name().to_owned();
                assert_eq!(name, choice.status().as_str());
                choice.status().as_str()
            })
            .collect();
        let statuses: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(choices, statuses);
    }

    #[test]
    fn every_command_and_flag_has_help() {
        use clap::CommandFactory as _;
        let mut missing = Vec::new();
        let mut commands = vec![(String::from("morag-jobs"), Cli::command())];
        while let Some((path, command)) = commands.pop() {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(sub_path.clone());
                }
                commands.push((sub_path, sub.clone()));
            }
        }
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn urls_without_a_scheme_are_http() {
        assert_eq!(
            base_url("127.0.0.1:8700").unwrap().as_str(),
            "http://127.0.0.1:8700/"
        );
        assert_eq!(
            base_url("https://jobs.example/").unwrap().as_str(),
            "https://jobs.example/"
        );
        assert!(base_url("ftp://x").is_err());
    }

    #[test]
    fn postgres_urls_are_logged_without_credentials() {
        assert_eq!(
            url_without_credentials("postgres://u:secret@db:5432/jobs?sslmode=disable"),
            "db:5432/jobs"
        );
    }

    #[test]
    fn tables_align_columns() {
        let out = table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()]]);
        assert_eq!(out, "A          LONGER\nwide cell  x\n");
    }
}
