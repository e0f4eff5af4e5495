//! One validated `Config` for the server, built from command-line flags and the
//! `MORAG_*` environment variables MoRAG operators already use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::delivery::celery::CeleryConfig;
use crate::domain::{LifecyclePolicy, RetentionPolicy, RetryPolicy, TimeoutPolicy};
use crate::files::HardLinks;
use crate::store::{DatabaseTarget, DatabaseUrl, Durability, StoreSettings};
use crate::value_parsers::{parse_days, parse_listen_address, parse_seconds, parse_whole_number};

/// `morag-jobs serve` flags. Every flag can also be set through its environment variable.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on: HOST:PORT, where HOST may be a name (`localhost:8700`),
    /// resolved at startup.
    #[arg(long, env = "MORAG_JOBS_ADDR", default_value = "127.0.0.1:8700", value_parser = parse_listen_address)]
    pub addr: SocketAddr,
    /// Directory for the SQLite database and the server's own files (`files/`).
    #[arg(long, env = "MORAG_JOBS_DATA_DIR", default_value = "./morag-jobs-data")]
    pub data_dir: PathBuf,
    /// `normal`: commits survive a crash of the server process; `full`: they also survive
    /// power loss (every commit is fsynced; much slower).
    #[arg(long, env = "MORAG_JOBS_SQLITE_SYNC", default_value = "normal", value_parser = parse_durability)]
    pub sqlite_sync: Durability,
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Execution timeout of audio jobs (seconds, or a duration such as 30m).
    #[arg(long, env = "MORAG_REMOTE_JOB_TIMEOUT_AUDIO", default_value = "1800", value_parser = parse_seconds)]
    pub timeout_audio: u64,
    /// Execution timeout of video jobs (seconds, or a duration such as 30m).
    #[arg(long, env = "MORAG_REMOTE_JOB_TIMEOUT_VIDEO", default_value = "3600", value_parser = parse_seconds)]
    pub timeout_video: u64,
    /// Execution timeout of document jobs (seconds, or a duration such as 30m).
    #[arg(long, env = "MORAG_REMOTE_JOB_TIMEOUT_DOCUMENT", default_value = "600", value_parser = parse_seconds)]
    pub timeout_document: u64,
    /// Execution timeout of image jobs (seconds, or a duration such as 30m).
    #[arg(long, env = "MORAG_REMOTE_JOB_TIMEOUT_IMAGE", default_value = "300", value_parser = parse_seconds)]
    pub timeout_image: u64,
    /// Execution timeout of web jobs (seconds, or a duration such as 30m).
    #[arg(long, env = "MORAG_REMOTE_JOB_TIMEOUT_WEB", default_value = "600", value_parser = parse_seconds)]
    pub timeout_web: u64,
    /// Execution timeout of youtube jobs (seconds, or a duration such as 30m).
    #[arg(long, env = "MORAG_REMOTE_JOB_TIMEOUT_YOUTUBE", default_value = "1800", value_parser = parse_seconds)]
    pub timeout_youtube: u64,
    /// Execution timeout (seconds) for content types without their own.
    #[arg(long, env = "MORAG_REMOTE_JOB_TIMEOUT_DEFAULT", default_value = "3600", value_parser = parse_seconds)]
    pub timeout_default: u64,
    /// Seconds a job may go without a heartbeat, from its first heartbeat on.
    #[arg(long, env = "MORAG_REMOTE_HEARTBEAT_TIMEOUT", default_value = "300", value_parser = parse_seconds)]
    pub heartbeat_timeout: u64,
    /// Seconds a job may wait for a worker before it times out (0 = forever).
    #[arg(long, env = "MORAG_REMOTE_FALLBACK_TIMEOUT", default_value = "0", value_parser = parse_seconds)]
    pub fallback_timeout: u64,

    /// Automatic retries of a failed or timed-out job before its failure is final.
    #[arg(long, env = "MORAG_REMOTE_MAX_RETRIES", default_value_t = 3, value_parser = parse_whole_number::<u32>)]
    pub max_retries: u32,
    /// Seconds before the first retry; doubles with each retry.
    #[arg(long, env = "MORAG_REMOTE_RETRY_BACKOFF_BASE", default_value = "60", value_parser = parse_seconds)]
    pub retry_backoff_base: u64,
    /// Longest delay before a retry (seconds, or a duration such as 1h).
    #[arg(long, env = "MORAG_REMOTE_RETRY_BACKOFF_MAX", default_value = "3600", value_parser = parse_seconds)]
    pub retry_backoff_max: u64,

    /// Seconds between the monitor's full passes (deadlines are also handled as they come due).
    #[arg(long, env = "MORAG_JOB_MONITOR_INTERVAL", default_value = "60", value_parser = parse_seconds)]
    pub monitor_interval: u64,
    /// Seconds between retention cleanups.
    #[arg(long, env = "MORAG_JOB_CLEANUP_INTERVAL", default_value = "3600", value_parser = parse_seconds)]
    pub cleanup_interval: u64,
    /// Days completed and cancelled jobs are kept.
    #[arg(long, env = "MORAG_JOB_RETENTION_DAYS", default_value_t = 7, value_parser = parse_days)]
    pub retention_days: u32,
    /// Days failed and timed-out jobs are kept (default: twice the retention days).
    #[arg(long, env = "MORAG_JOB_RETENTION_DAYS_FAILED", value_parser = parse_days)]
    pub retention_days_failed: Option<u32>,
    /// Days the worker registry keeps the record of a worker it no longer hears from.
    #[arg(long, env = "MORAG_WORKER_RETENTION_DAYS", default_value_t = 7, value_parser = parse_days)]
    pub worker_retention_days: u32,

    /// Colon-separated directories a job's source file must be inside (default: DATA_DIR/files).
    #[arg(long, env = "MORAG_REMOTE_ALLOWED_ROOTS")]
    pub allowed_roots: Option<String>,
    /// Refuse source files with more than one hard link, at creation and at download: a
    /// hard link inside a root can name any file on the same filesystem (see SECURITY.md).
    #[arg(
        long,
        env = "MORAG_REMOTE_REFUSE_HARDLINKS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub refuse_hardlinks: bool,

    /// Comma-separated API keys for workers (poll, heartbeat, result, download).
    #[arg(
        long,
        env = "MORAG_WORKER_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub worker_api_keys: Vec<String>,
    /// Comma-separated API keys with full access.
    #[arg(
        long,
        env = "MORAG_ADMIN_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub admin_api_keys: Vec<String>,
    /// Allow listening on a non-loopback address without any API key.
    #[arg(long, env = "MORAG_JOBS_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    #[command(flatten)]
    pub delivery: crate::delivery::config::DeliveryArgs,
    // Request, connection and lease limits (issue 8), kept in their own module.
    #[command(flatten)]
    pub limits: crate::limits::LimitArgs,

    /// Treat a create whose ingestion task matches an unfinished job with the same source
    /// file and content type as a repeat of that job's create (answer it, make no job).
    #[arg(long, env = "MORAG_CREATE_MATCH_UNFINISHED", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_match_unfinished: bool,

    #[command(flatten)]
    pub celery: CeleryArgs,
}

/// The Celery sink: outcomes become Celery tasks on MoRAG's Redis broker.
#[derive(Args, Debug, Clone, Default)]
pub struct CeleryArgs {
    /// `redis://[[user]:password@]host[:port][/db]` of MoRAG's Celery broker; enables the
    /// Celery sink.
    #[arg(long, env = "MORAG_CELERY_BROKER_URL", hide_env_values = true)]
    pub celery_broker_url: Option<String>,
    /// Task called with `(ingestion_task_id, processing_result, task_options)` on completion.
    #[arg(long, env = "MORAG_CELERY_CONTINUE_TASK", default_value = crate::delivery::celery::DEFAULT_CONTINUE_TASK)]
    pub celery_continue_task: String,
    /// Task called with `(ingestion_task_id, failure_info)` on a final failure, timeout or
    /// cancellation.
    #[arg(long, env = "MORAG_CELERY_FAILURE_TASK", default_value = crate::delivery::celery::DEFAULT_FAILURE_TASK)]
    pub celery_failure_task: String,
    /// The Celery queue the tasks go to.
    #[arg(long, env = "MORAG_CELERY_QUEUE", default_value = crate::delivery::celery::DEFAULT_QUEUE)]
    pub celery_queue: String,
    /// Prefix of the Redis keys that mark an event as enqueued.
    #[arg(long, env = "MORAG_CELERY_DEDUP_KEY_PREFIX", default_value = crate::delivery::celery::DEFAULT_DEDUP_KEY_PREFIX)]
    pub celery_dedup_key_prefix: String,
    /// Days an event's marker keeps it from being enqueued twice.
    #[arg(long, env = "MORAG_CELERY_DEDUP_DAYS", default_value_t = crate::delivery::celery::DEFAULT_DEDUP_DAYS)]
    pub celery_dedup_days: u32,
}

impl CeleryArgs {
    /// The sink's configuration, or `None` when no broker is set.
    pub fn config(&self) -> Result<Option<CeleryConfig>, ConfigError> {
        let Some(url) = self
            .celery_broker_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        let invalid = |message: String| ConfigError::Invalid(message);
        let mut config =
            CeleryConfig::new(url).map_err(|e| invalid(format!("MORAG_CELERY_BROKER_URL: {e}")))?;
        for (name, value) in [
            ("MORAG_CELERY_CONTINUE_TASK", &self.celery_continue_task),
            ("MORAG_CELERY_FAILURE_TASK", &self.celery_failure_task),
            ("MORAG_CELERY_QUEUE", &self.celery_queue),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(format!("{name} must not be empty")));
            }
        }
        if self.celery_dedup_days == 0 {
            return Err(invalid("MORAG_CELERY_DEDUP_DAYS must be at least 1".into()));
        }
        config.continue_task = self.celery_continue_task.trim().to_owned();
        config.failure_task = self.celery_failure_task.trim().to_owned();
        config.queue = self.celery_queue.trim().to_owned();
        config.dedup_key_prefix = self.celery_dedup_key_prefix.clone();
        config.dedup_ttl = Duration::from_secs(u64::from(self.celery_dedup_days) * 86_400);
        Ok(Some(config))
    }
}

/// Where jobs are stored; shared by `serve`, `migrate` and `import-morag-dir`.
#[derive(Args, Debug, Clone, Default)]
pub struct DatabaseArgs {
    /// `postgres://user:password@host:port/db` to store jobs in PostgreSQL (needed for
    /// several replicas); `sqlite://PATH`, or nothing, for the embedded SQLite file
    /// (default: DATA_DIR/morag-jobs.sqlite3).
    #[arg(long, env = "MORAG_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PostgreSQL connections per replica at most.
    #[arg(long, env = "MORAG_DATABASE_MAX_CONNECTIONS", default_value_t = 16, value_parser = parse_whole_number::<usize>)]
    pub database_max_connections: usize,
}

impl DatabaseArgs {
    /// Reads the URL: PostgreSQL, an explicit SQLite file, or the default SQLite file.
    pub fn target(&self, data_dir: &Path) -> Result<DatabaseTarget, ConfigError> {
        let url = self.database_url.as_deref().map(str::trim).unwrap_or("");
        if url.is_empty() {
            return Ok(DatabaseTarget::Sqlite(data_dir.join("morag-jobs.sqlite3")));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseTarget::Postgres(DatabaseUrl::new(url)));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(ConfigError::Invalid(
                    "MORAG_DATABASE_URL: sqlite:// needs a file path".into(),
                ));
            }
            return Ok(DatabaseTarget::Sqlite(PathBuf::from(path)));
        }
        Err(ConfigError::Invalid(
            "MORAG_DATABASE_URL must start with postgres://, postgresql:// or sqlite://".into(),
        ))
    }

    /// The backend settings these flags carry besides the target.
    pub fn settings(&self, durability: Durability) -> StoreSettings {
        StoreSettings {
            durability,
            max_connections: self.database_max_connections,
        }
    }
}

// The value parsers answer only what they expected; `cli::describe_invalid_value` puts
// the variable or flag the user set, and the value, in front.

fn parse_durability(text: &str) -> Result<Durability, String> {
    match text.to_ascii_lowercase().as_str() {
        "normal" => Ok(Durability::Normal),
        "full" => Ok(Durability::Full),
        _ => Err("expected normal or full".into()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    /// The cause is part of the message and deliberately not a `source`, so an error
    /// chain prints it once.
    #[error("{what} {path:?}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The validated server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Where jobs are stored.
    pub database: DatabaseTarget,
    /// How the store is run (SQLite durability, PostgreSQL connections).
    pub store_settings: StoreSettings,
    /// The server's own files directory (`DATA_DIR/files`), canonical. Cleanup deletes
    /// source files only in here.
    pub files_dir: PathBuf,
    /// Canonical directories source files must be inside.
    pub allowed_roots: Vec<PathBuf>,
    /// Whether source files with more than one hard link are served.
    pub hard_links: HardLinks,
    pub policy: LifecyclePolicy,
    pub monitor_interval: Duration,
    pub cleanup_interval: Duration,
    pub stats_log_interval: Duration,
    /// How long the record of a worker no longer heard from is kept (the cleaner deletes it).
    pub worker_retention: Duration,
    pub worker_api_keys: Vec<ApiKey>,
    pub admin_api_keys: Vec<ApiKey>,
    pub insecure_no_auth: bool,
    /// Whether a create repeating an unfinished job's ingestion task, source and type
    /// answers with that job.
    pub create_match_unfinished: bool,
    /// Where and how job outcomes are delivered (see `delivery`).
    pub delivery: std::sync::Arc<crate::delivery::config::DeliveryConfig>,

    /// Request, connection and lease limits (issue 8).
    pub limits: crate::limits::Limits,
}

/// An API key. Its `Debug` output is redacted so a logged config never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl Config {
    /// Validates the flags and prepares the data directory (creating `files/`).
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let secs = Duration::from_secs;
        let positive = |name: &str, value: u64| {
            if value == 0 {
                let flag = flag_of(name);
                Err(ConfigError::Invalid(format!(
                    "{name} (or {flag}) is 0: expected at least 1 second, e.g. 60 or 5m"
                )))
            } else {
                Ok(secs(value))
            }
        };
        let mut execution_by_type = BTreeMap::new();
        for (name, value) in [
            ("audio", args.timeout_audio),
            ("video", args.timeout_video),
            ("document", args.timeout_document),
            ("image", args.timeout_image),
            ("web", args.timeout_web),
            ("youtube", args.timeout_youtube),
        ] {
            execution_by_type.insert(
                name.to_owned(),
                positive(
                    &format!("MORAG_REMOTE_JOB_TIMEOUT_{}", name.to_uppercase()),
                    value,
                )?,
            );
        }
        if args.retry_backoff_max < args.retry_backoff_base {
            return Err(ConfigError::Invalid(
                "MORAG_REMOTE_RETRY_BACKOFF_MAX must not be smaller than MORAG_REMOTE_RETRY_BACKOFF_BASE".into(),
            ));
        }
        let policy = LifecyclePolicy {
            timeouts: TimeoutPolicy {
                execution_by_type,
                execution_default: positive(
                    "MORAG_REMOTE_JOB_TIMEOUT_DEFAULT",
                    args.timeout_default,
                )?,
                heartbeat: positive("MORAG_REMOTE_HEARTBEAT_TIMEOUT", args.heartbeat_timeout)?,
                pending: (args.fallback_timeout > 0).then(|| secs(args.fallback_timeout)),
            },
            retry: RetryPolicy {
                max_retries: args.max_retries,
                backoff_base: secs(args.retry_backoff_base),
                backoff_max: secs(args.retry_backoff_max),
                ..RetryPolicy::default()
            },
            retention: RetentionPolicy::from_days(args.retention_days, args.retention_days_failed),
        };

        let worker_api_keys = clean_keys(args.worker_api_keys);
        let admin_api_keys = clean_keys(args.admin_api_keys);
        let open = worker_api_keys.is_empty() && admin_api_keys.is_empty();
        if open && !args.addr.ip().is_loopback() && !args.insecure_no_auth {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {} without API keys: set MORAG_WORKER_API_KEYS and MORAG_ADMIN_API_KEYS, \
                 or pass --insecure-no-auth",
                args.addr
            )));
        }

        let data_dir = prepare_data_dir(&args.data_dir)?;
        let files_dir = data_dir.join("files");
        std::fs::create_dir_all(&files_dir).map_err(|cause| ConfigError::Io {
            what: "cannot create files directory",
            path: files_dir.clone(),
            cause,
        })?;
        let files_dir = canonical(&files_dir, "files directory")?;
        let allowed_roots = match args
            .allowed_roots
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            None => vec![files_dir.clone()],
            Some(list) => list
                .split(':')
                .filter(|part| !part.trim().is_empty())
                .map(|part| {
                    canonical(
                        Path::new(part.trim()),
                        "allowed root (MORAG_REMOTE_ALLOWED_ROOTS or --allowed-roots)",
                    )
                })
                .collect::<Result<_, _>>()?,
        };

        let limits =
            crate::limits::Limits::from_args(&args.limits).map_err(ConfigError::Invalid)?;
        let database = args.database.target(&data_dir)?;
        let store_settings = args.database.settings(args.sqlite_sync);
        Ok(Config {
            addr: args.addr,
            database,
            store_settings,
            data_dir,
            files_dir,
            allowed_roots,
            hard_links: if args.refuse_hardlinks {
                HardLinks::Refuse
            } else {
                HardLinks::Allow
            },
            policy,
            monitor_interval: positive("MORAG_JOB_MONITOR_INTERVAL", args.monitor_interval)?,
            cleanup_interval: positive("MORAG_JOB_CLEANUP_INTERVAL", args.cleanup_interval)?,
            stats_log_interval: secs(600),
            worker_retention: if args.worker_retention_days == 0 {
                let name = "MORAG_WORKER_RETENTION_DAYS";
                return Err(ConfigError::Invalid(format!(
                    "{name} (or {}) is 0: expected at least 1 day, e.g. 7",
                    flag_of(name)
                )));
            } else {
                secs(u64::from(args.worker_retention_days) * 86_400)
            },
            worker_api_keys,
            admin_api_keys,
            insecure_no_auth: args.insecure_no_auth,
            create_match_unfinished: args.create_match_unfinished,
            delivery: {
                let mut delivery =
                    crate::delivery::config::DeliveryConfig::from_args(args.delivery)
                        .map_err(ConfigError::Invalid)?;
                delivery.celery = args.celery.config()?;
                std::sync::Arc::new(delivery)
            },
            limits,
        })
    }

    /// Warnings about keys for one side only: the other side is then refused (401).
    pub fn auth_warnings(&self) -> Vec<String> {
        match (
            self.worker_api_keys.is_empty(),
            self.admin_api_keys.is_empty(),
        ) {
            (false, true) => vec![
                "MORAG_WORKER_API_KEYS is set but MORAG_ADMIN_API_KEYS is not: creating, listing, \
                 statistics and every admin call will be refused (401); set MORAG_ADMIN_API_KEYS"
                    .into(),
            ],
            (true, false) => vec![
                "MORAG_ADMIN_API_KEYS is set but MORAG_WORKER_API_KEYS is not: workers must send an \
                 admin key or be refused (401); set MORAG_WORKER_API_KEYS"
                    .into(),
            ],
            _ => Vec::new(),
        }
    }

    /// True when no API key is configured: every endpoint is open.
    pub fn is_open(&self) -> bool {
        self.worker_api_keys.is_empty() && self.admin_api_keys.is_empty()
    }
}

/// `--flag-name` of a `MORAG_*` variable, for messages that name both.
fn flag_of(variable: &str) -> String {
    let name = variable
        .trim_start_matches("MORAG_REMOTE_JOB_")
        .trim_start_matches("MORAG_REMOTE_")
        .trim_start_matches("MORAG_JOB_")
        .trim_start_matches("MORAG_JOBS_");
    format!("--{}", name.to_ascii_lowercase().replace('_', "-"))
}

/// Creates the data directory if needed and proves it writable, so a bad directory is
/// reported with its cause here rather than as "unable to open database file" later.
fn prepare_data_dir(path: &Path) -> Result<PathBuf, ConfigError> {
    let failed = |what: &'static str| {
        move |cause| ConfigError::Io {
            what,
            path: path.to_owned(),
            cause,
        }
    };
    if path.exists() && !path.is_dir() {
        return Err(ConfigError::Invalid(format!(
            "data directory {path:?} (MORAG_JOBS_DATA_DIR or --data-dir) exists but is not a directory"
        )));
    }
    std::fs::create_dir_all(path).map_err(failed(
        "cannot create the data directory (MORAG_JOBS_DATA_DIR or --data-dir)",
    ))?;
    let probe = path.join(format!(".morag-jobs-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(failed(
        "the data directory (MORAG_JOBS_DATA_DIR or --data-dir) is not writable",
    ))?;
    let _ = std::fs::remove_file(&probe);
    canonical(path, "data directory")
}

fn clean_keys(keys: Vec<String>) -> Vec<ApiKey> {
    keys.into_iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .map(ApiKey)
        .collect()
}

fn canonical(path: &Path, what: &'static str) -> Result<PathBuf, ConfigError> {
    std::fs::canonicalize(path).map_err(|cause| ConfigError::Io {
        what,
        path: path.to_owned(),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["test"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).expect("flags parse").serve
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            Config::from_args(args(&["--data-dir", dir.path().to_str().unwrap()])).unwrap();
        assert_eq!(config.addr.to_string(), "127.0.0.1:8700");
        assert_eq!(config.policy.timeouts, TimeoutPolicy::default());
        assert_eq!(config.policy.retry.max_retries, 3);
        assert_eq!(
            config.policy.retention,
            RetentionPolicy::from_days(7, Some(14))
        );
        assert_eq!(config.allowed_roots, vec![config.files_dir.clone()]);
        assert!(config.files_dir.is_dir());
        assert!(config.is_open());
        assert_eq!(config.hard_links, HardLinks::Allow);
        assert!(config.create_match_unfinished);
    }

    #[test]
    fn refuse_hardlinks_is_a_flag() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let config = Config::from_args(args(&["--data-dir", data, "--refuse-hardlinks"])).unwrap();
        assert_eq!(config.hard_links, HardLinks::Refuse);
    }

    #[test]
    fn database_url_selects_the_backend_and_hides_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let config = Config::from_args(args(&["--data-dir", data])).unwrap();
        assert_eq!(
            config.database,
            DatabaseTarget::Sqlite(config.data_dir.join("morag-jobs.sqlite3"))
        );
        let config = Config::from_args(args(&[
            "--data-dir",
            data,
            "--database-url",
            "sqlite:///tmp/x.db",
        ]))
        .unwrap();
        assert_eq!(
            config.database,
            DatabaseTarget::Sqlite(PathBuf::from("/tmp/x.db"))
        );
        let url = "postgres://jobs:hunter2@db.internal:5432/morag";
        let config = Config::from_args(args(&["--data-dir", data, "--database-url", url])).unwrap();
        assert_eq!(
            config.database,
            DatabaseTarget::Postgres(DatabaseUrl::new(url))
        );
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("jobs:***@db.internal"),
            "{debug}"
        );
        let error = Config::from_args(args(&["--data-dir", data, "--database-url", "mysql://x"]))
            .unwrap_err();
        assert!(error.to_string().contains("MORAG_DATABASE_URL"), "{error}");
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_args(args(&[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--admin-api-keys",
            "very-secret-admin",
            "--worker-api-keys",
            "w1, very-secret-worker ,",
        ]))
        .unwrap();
        assert_eq!(
            config.worker_api_keys.len(),
            2,
            "blank entries dropped, spaces trimmed"
        );
        assert_eq!(config.worker_api_keys[1].expose(), "very-secret-worker");
        let debug = format!("{config:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }

    #[test]
    fn open_server_refuses_public_address_unless_insecure() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let refused = Config::from_args(args(&["--data-dir", data, "--addr", "0.0.0.0:8700"]));
        assert!(refused
            .unwrap_err()
            .to_string()
            .contains("without API keys"));
        assert!(Config::from_args(args(&[
            "--data-dir",
            data,
            "--addr",
            "0.0.0.0:8700",
            "--insecure-no-auth"
        ]))
        .is_ok());
        assert!(Config::from_args(args(&[
            "--data-dir",
            data,
            "--addr",
            "0.0.0.0:8700",
            "--admin-api-keys",
            "k"
        ]))
        .is_ok());
    }

    #[test]
    fn bad_values_are_refused_with_the_variable_name() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let error =
            Config::from_args(args(&["--data-dir", data, "--timeout-audio", "0"])).unwrap_err();
        assert!(
            error.to_string().contains("MORAG_REMOTE_JOB_TIMEOUT_AUDIO"),
            "{error}"
        );
        let error = Config::from_args(args(&[
            "--data-dir",
            data,
            "--allowed-roots",
            "/does/not/exist",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("allowed root"), "{error}");
    }

    #[test]
    fn the_celery_sink_is_configured_only_with_a_broker_and_never_shows_its_password() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let config = Config::from_args(args(&["--data-dir", data])).unwrap();
        assert!(config.delivery.celery.is_none());

        let config = Config::from_args(args(&[
            "--data-dir",
            data,
            "--celery-broker-url",
            "redis://:hunter2@127.0.0.1:6379/2",
            "--celery-queue",
            "ingestion",
        ]))
        .unwrap();
        let celery = config.delivery.celery.clone().unwrap();
        assert_eq!((celery.broker.db, celery.queue.as_str()), (2, "ingestion"));
        assert_eq!(
            celery.continue_task,
            "morag.ingest_tasks.continue_ingestion_after_remote_processing"
        );
        assert_eq!(celery.dedup_ttl, std::time::Duration::from_secs(7 * 86_400));
        assert!(!format!("{config:?}").contains("hunter2"));

        for bad in [
            &["--celery-broker-url", "rediss://host"][..],
            &["--celery-broker-url", "redis://host", "--celery-queue", " "],
            &[
                "--celery-broker-url",
                "redis://host",
                "--celery-dedup-days",
                "0",
            ],
        ] {
            let mut flags = vec!["--data-dir", data];
            flags.extend_from_slice(bad);
            let error = Config::from_args(args(&flags)).unwrap_err();
            assert!(error.to_string().contains("MORAG_CELERY_"), "{error}");
        }
    }
}
