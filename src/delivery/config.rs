//! The dispatcher's and the HTTP sinks' settings: flags with `MORAG_*` environment
//! variables, validated into one `DeliveryConfig`.

use std::time::Duration;

use clap::Args;

use super::signing::WebhookSecret;
use super::SinkKind;

/// Delivery flags of `morag-jobs serve`.
#[derive(Args, Debug, Clone)]
pub struct DeliveryArgs {
    /// URL that receives every outcome (`processing_result` or `failure_info`) as signed JSON.
    #[arg(long, env = "MORAG_INGESTION_CALLBACK_URL")]
    pub ingestion_callback_url: Option<String>,
    /// Standard Webhooks secret the HTTP sinks sign with (`whsec_` and base64, or any text).
    #[arg(long, env = "MORAG_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// PEM file of extra certificate authorities that https webhooks and the ingestion
    /// callback may be signed by (a private CA), besides the built-in Mozilla roots.
    #[arg(long, env = "MORAG_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<std::path::PathBuf>,
    /// Comma-separated hosts a job's `task_options.webhook_url` may point to (default: any).
    #[arg(long, env = "MORAG_WEBHOOK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub webhook_allowed_hosts: Vec<String>,
    /// Attempts per delivery before it is dead-lettered.
    #[arg(long, env = "MORAG_DELIVERY_MAX_ATTEMPTS", default_value_t = 20)]
    pub delivery_max_attempts: u32,
    /// Milliseconds one attempt may take before it counts as failed.
    #[arg(
        long,
        env = "MORAG_DELIVERY_ATTEMPT_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub delivery_attempt_timeout_ms: u64,
    /// Milliseconds before the first retry; doubles with each attempt (with jitter).
    #[arg(long, env = "MORAG_DELIVERY_BACKOFF_BASE_MS", default_value_t = 1_000)]
    pub delivery_backoff_base_ms: u64,
    /// Milliseconds between retries at most.
    #[arg(
        long,
        env = "MORAG_DELIVERY_BACKOFF_MAX_MS",
        default_value_t = 3_600_000
    )]
    pub delivery_backoff_max_ms: u64,
    /// Deliveries attempted at once at most.
    #[arg(long, env = "MORAG_DELIVERY_CONCURRENCY", default_value_t = 32)]
    pub delivery_concurrency: usize,
    /// Milliseconds between the dispatcher's looks at the store when nothing woke it.
    #[arg(long, env = "MORAG_DELIVERY_POLL_INTERVAL_MS", default_value_t = 5_000)]
    pub delivery_poll_interval_ms: u64,
}

/// Validated delivery settings.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    pub ingestion_callback_url: Option<reqwest::Url>,
    pub webhook_secret: Option<WebhookSecret>,
    /// Certificate authorities trusted for https targets besides the built-in roots
    /// (`MORAG_WEBHOOK_CA_FILE`).
    pub extra_root_certificates: Vec<reqwest::Certificate>,
    /// Lower-case host names; empty means any host.
    pub webhook_allowed_hosts: Vec<String>,
    pub max_attempts: u32,
    pub attempt_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub concurrency: usize,
    pub poll_interval: Duration,
    /// The Celery sink, when `MORAG_CELERY_BROKER_URL` is set (its flags are in `config`).
    pub celery: Option<super::celery::CeleryConfig>,
}

impl DeliveryConfig {
    /// Checks the flags; the error names the setting that is wrong.
    pub fn from_args(args: DeliveryArgs) -> Result<DeliveryConfig, String> {
        let invalid = |message: String| message;
        let ingestion_callback_url =
            match args
                .ingestion_callback_url
                .as_deref()
                .map(str::trim)
                .filter(|u| !u.is_empty())
            {
                None => None,
                Some(text) => Some(parse_http_url(text).map_err(|why| {
                    invalid(format!("MORAG_INGESTION_CALLBACK_URL {text:?}: {why}"))
                })?),
            };
        let webhook_secret = match args
            .webhook_secret
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(text) => Some(
                WebhookSecret::parse(text)
                    .map_err(|why| invalid(format!("MORAG_WEBHOOK_SECRET: {why}")))?,
            ),
        };
        let extra_root_certificates = match &args.webhook_ca_file {
            None => Vec::new(),
            Some(path) => read_certificates(path)
                .map_err(|why| invalid(format!("MORAG_WEBHOOK_CA_FILE {path:?}: {why}")))?,
        };
        if args.delivery_max_attempts == 0 {
            return Err(invalid(
                "MORAG_DELIVERY_MAX_ATTEMPTS must be at least 1".into(),
            ));
        }
        if args.delivery_concurrency == 0 {
            return Err(invalid(
                "MORAG_DELIVERY_CONCURRENCY must be at least 1".into(),
            ));
        }
        if args.delivery_attempt_timeout_ms == 0 || args.delivery_poll_interval_ms == 0 {
            return Err(invalid(
                "MORAG_DELIVERY_ATTEMPT_TIMEOUT_MS and MORAG_DELIVERY_POLL_INTERVAL_MS must be at least 1"
                    .into(),
            ));
        }
        if args.delivery_backoff_max_ms < args.delivery_backoff_base_ms {
            return Err(invalid(
                "MORAG_DELIVERY_BACKOFF_MAX_MS must not be smaller than MORAG_DELIVERY_BACKOFF_BASE_MS"
                    .into(),
            ));
        }
        Ok(DeliveryConfig {
            ingestion_callback_url,
            webhook_secret,
            extra_root_certificates,
            webhook_allowed_hosts: args
                .webhook_allowed_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            max_attempts: args.delivery_max_attempts,
            attempt_timeout: Duration::from_millis(args.delivery_attempt_timeout_ms),
            backoff_base: Duration::from_millis(args.delivery_backoff_base_ms),
            backoff_max: Duration::from_millis(args.delivery_backoff_max_ms),
            concurrency: args.delivery_concurrency,
            poll_interval: Duration::from_millis(args.delivery_poll_interval_ms),
            celery: None,
        })
    }

    /// Whether every outcome goes somewhere (not only those of jobs with a webhook).
    pub fn has_global_sink(&self) -> bool {
        !self.global_sinks().is_empty()
    }

    /// The sinks every outcome goes to, besides per-job webhooks.
    pub fn global_sinks(&self) -> Vec<SinkKind> {
        let mut sinks = Vec::new();
        if self.ingestion_callback_url.is_some() {
            sinks.push(SinkKind::IngestionCallback);
        }
        if self.celery.is_some() {
            sinks.push(SinkKind::Celery);
        }
        sinks
    }

    /// Whether `url` (from a job's task options) may receive a webhook.
    pub fn check_webhook_url(&self, url: &str) -> Result<reqwest::Url, String> {
        let parsed = parse_http_url(url)?;
        if !self.webhook_allowed_hosts.is_empty() {
            let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
            if !self.webhook_allowed_hosts.contains(&host) {
                return Err(format!(
                    "host {host:?} is not in MORAG_WEBHOOK_ALLOWED_HOSTS"
                ));
            }
        }
        Ok(parsed)
    }
}

/// The certificates of a PEM file (one or more `CERTIFICATE` blocks).
fn read_certificates(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("not a PEM certificate bundle ({e})"))?;
    if certificates.is_empty() {
        return Err("it holds no PEM certificate".into());
    }
    Ok(certificates)
}

/// An absolute http(s) URL with a host.
pub fn parse_http_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "only http and https URLs are allowed, not {}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(url)
}
