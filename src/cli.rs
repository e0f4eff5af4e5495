//! The `morag-jobs` command line: `serve` runs the server; the other subcommands are a
//! small admin client for a running server, printing tables or (`--json`) raw JSON.

use std::fmt::Write as _;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::app::{shutdown_signal, App};
use crate::clock::SystemClock;
use crate::config::{Config, DatabaseArgs, ServeArgs};
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
    /// Delete finished jobs older than N days on a running server.
    Cleanup {
        #[arg(long)]
        days_old: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobsAction {
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    Show {
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    Cancel {
        job_id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    Retry {
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeliveriesAction {
    List {
        /// pending, delivered or dead.
        #[arg(long)]
        state: Option<String>,
        /// webhook, ingestion_callback or celery.
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        job_id: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One delivery with its attempts.
    Show {
        delivery_id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Makes a dead delivery pending again, with a fresh attempt budget.
    Redrive {
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
    /// Base URL of the server.
    #[arg(long, env = "MORAG_JOBS_URL", default_value = "http://127.0.0.1:8700")]
    pub url: String,
    /// Admin API key.
    #[arg(long, env = "MORAG_JOBS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = Config::from_args(args).context("invalid configuration")?;
            let app = App::build(config, std::sync::Arc::new(SystemClock)).await?;
            app.run(shutdown_signal()).await
        }
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
                query.extend(status.map(|s| ("status".to_owned(), s)));
                query.extend(content_type.map(|c| ("content_type".to_owned(), c)));
                query.extend(cursor.map(|c| ("cursor".to_owned(), c)));
                let body = request(
                    &client,
                    reqwest::Method::GET,
                    "/api/v1/remote-jobs",
                    &query,
                    None,
                )
                .await?;
                print(&client, &body, render_list)
            }
            JobsAction::Show { job_id, client } => {
                let body = request(
                    &client,
                    reqwest::Method::GET,
                    &format!("/api/v1/remote-jobs/{job_id}"),
                    &[],
                    None,
                )
                .await?;
                print(&client, &body, render_detail)
            }
            JobsAction::Cancel {
                job_id,
                reason,
                client,
            } => {
                let payload = serde_json::json!({ "reason": reason });
                let path = format!("/api/v1/remote-jobs/{job_id}/cancel");
                let body =
                    request(&client, reqwest::Method::POST, &path, &[], Some(payload)).await?;
                print(&client, &body, render_status)
            }
            JobsAction::Retry { job_id, client } => {
                let path = format!("/api/v1/remote-jobs/{job_id}/retry");
                let body = request(&client, reqwest::Method::POST, &path, &[], None).await?;
                print(&client, &body, render_status)
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
                .await?;
                print(&client, &body, render_deliveries)
            }
            DeliveriesAction::Show {
                delivery_id,
                client,
            } => {
                let path = format!("/api/v1/deliveries/{delivery_id}");
                let body = request(&client, reqwest::Method::GET, &path, &[], None).await?;
                print(&client, &body, render_delivery)
            }
            DeliveriesAction::Redrive {
                delivery_id,
                client,
            } => {
                let path = format!("/api/v1/deliveries/{delivery_id}/redrive");
                let body = request(&client, reqwest::Method::POST, &path, &[], None).await?;
                print(&client, &body, |v| {
                    format!(
                        "delivery {} is {} again (event {})\n",
                        text(&v["id"]),
                        text(&v["state"]),
                        text(&v["event_id"])
                    )
                })
            }
        },
        Command::Stats(client) => {
            let body = request(
                &client,
                reqwest::Method::GET,
                "/api/v1/remote-jobs/statistics",
                &[],
                None,
            )
            .await?;
            print(&client, &body, render_stats)
        }
        Command::Cleanup { days_old, client } => {
            let query = [("days_old".to_owned(), days_old.to_string())];
            let body = request(
                &client,
                reqwest::Method::POST,
                "/api/v1/remote-jobs/cleanup",
                &query,
                None,
            )
            .await?;
            print(&client, &body, |v| {
                format!(
                    "cleaned {} jobs older than {} days\n",
                    v["cleaned_jobs"], v["days_old"]
                )
            })
        }
    }
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

async fn request(
    client: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    query: &[(String, String)],
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let url = format!("{}{}", client.url.trim_end_matches('/'), path);
    let mut builder = reqwest::Client::new().request(method, &url).query(query);
    if let Some(key) = &client.api_key {
        builder = builder.bearer_auth(key);
    }
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .context("failed to read the response")?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let detail = match &value["detail"] {
            Value::String(s) => s.clone(),
            Value::Null => value.to_string(),
            other => other.to_string(),
        };
        bail!("{status}: {detail}");
    }
    Ok(value)
}

fn print(
    client: &ClientArgs,
    body: &Value,
    render: impl Fn(&Value) -> String,
) -> anyhow::Result<()> {
    if client.json {
        println!("{}", serde_json::to_string_pretty(body)?);
    } else {
        print!("{}", render(body));
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
    use super::table;

    #[test]
    fn tables_align_columns() {
        let out = table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()]]);
        assert_eq!(out, "A          LONGER\nwide cell  x\n");
    }
}
