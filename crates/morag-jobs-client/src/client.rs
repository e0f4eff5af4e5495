//! The worker's side of the wire protocol: poll, download, heartbeat, result and release,
//! each retried with backoff while the failure is transient (the network, a restarting
//! server). Knows nothing of the server's internals: only URLs and JSON.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// The first wait before a retry; each further one doubles, up to `RETRY_MAX_DELAY`.
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(200);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
/// The longest `wait` a poll may ask for.
const MAX_POLL_WAIT: Duration = Duration::from_secs(30);
/// How long a request other than a poll or a download may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A job the server handed out.
#[derive(Clone, Debug, Deserialize)]
pub struct ClaimedJob {
    pub job_id: String,
    pub source_file_url: String,
    pub content_type: String,
    #[serde(default)]
    pub task_options: Value,
    pub lease_id: String,
    #[serde(default)]
    pub heartbeat_interval_seconds: Option<u64>,
}

#[derive(Deserialize)]
struct PollAnswer {
    job_id: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused with this status: retrying the same request cannot help.
    #[error("the server answered {status}: {detail}")]
    Refused { status: u16, detail: String },
    /// The network or the server failed; retried until the caller's patience ran out.
    #[error("{0}")]
    Transient(String),
}

impl ClientError {
    /// The server said the lease is no longer the job's (409) or the job is gone (404).
    pub fn attempt_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Refused {
                status: 404 | 409,
                ..
            }
        )
    }
}

/// What a heartbeat answered.
pub struct HeartbeatAnswer {
    pub cancelled: bool,
}

#[derive(Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl ServerClient {
    pub fn new(base_url: &str, api_key: Option<String>) -> anyhow::Result<Self> {
        let base = if base_url.contains("://") {
            base_url.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", base_url.trim_end_matches('/'))
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(ServerClient {
            http,
            base,
            api_key,
        })
    }

    /// A request to `path` on the server, or to `path` itself when it is a whole URL (a
    /// server may hand out absolute source URLs).
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        // The key goes only to the server itself, never to another host a URL names.
        let ours = url.starts_with(&format!("{}/", self.base));
        let builder = self.http.request(method, url);
        match &self.api_key {
            Some(key) if ours => builder.bearer_auth(key),
            _ => builder,
        }
    }

    /// One long poll: a job, or `None` when none came within `wait`.
    pub async fn poll(
        &self,
        worker_id: &str,
        content_types: &[String],
        wait: Duration,
    ) -> Result<Option<ClaimedJob>, ClientError> {
        // The protocol's longest wait; a longer one would be refused (422).
        let wait = wait.min(MAX_POLL_WAIT);
        let mut query = vec![
            ("worker_id", worker_id.to_owned()),
            ("wait", format!("{:.3}", wait.as_secs_f64())),
        ];
        if !content_types.is_empty() {
            query.push(("content_types", content_types.join(",")));
        }
        let response = self
            .request(reqwest::Method::GET, "/api/v1/remote-jobs/poll")
            .query(&query)
            .timeout(wait + REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(transient)?;
        let answer: PollAnswer = json_of(response).await?;
        let Some(job_id) = answer.job_id else {
            return Ok(None);
        };
        let mut fields = answer.rest;
        fields.insert("job_id".into(), Value::String(job_id));
        serde_json::from_value(Value::Object(fields))
            .map(Some)
            .map_err(|error| ClientError::Transient(format!("unexpected poll answer: {error}")))
    }

    /// Downloads the job's source into the file `into`.
    pub async fn download(&self, job: &ClaimedJob, into: &Path) -> Result<(), ClientError> {
        let mut response = self
            .request(reqwest::Method::GET, &job.source_file_url)
            .query(&[("lease_id", &job.lease_id)])
            .send()
            .await
            .map_err(transient)?;
        if !response.status().is_success() {
            return Err(refusal(response).await);
        }
        let mut file = tokio::fs::File::create(into)
            .await
            .map_err(|error| ClientError::Transient(format!("cannot write the source: {error}")))?;
        while let Some(chunk) = response.chunk().await.map_err(transient)? {
            file.write_all(&chunk).await.map_err(|error| {
                ClientError::Transient(format!("cannot write the source: {error}"))
            })?;
        }
        file.flush()
            .await
            .map_err(|error| ClientError::Transient(format!("cannot write the source: {error}")))
    }

    pub async fn heartbeat(
        &self,
        job: &ClaimedJob,
        progress: Option<f64>,
        message: Option<&str>,
    ) -> Result<HeartbeatAnswer, ClientError> {
        let body = json!({"lease_id": job.lease_id, "progress": progress, "message": message});
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("/api/v1/remote-jobs/{}/heartbeat", job.job_id),
            )
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(transient)?;
        let answer: Value = json_of(response).await?;
        Ok(HeartbeatAnswer {
            cancelled: answer["cancelled"].as_bool().unwrap_or(false),
        })
    }

    /// Submits the attempt's result, retrying transient failures for up to `patience`.
    pub async fn submit_result(
        &self,
        job: &ClaimedJob,
        body: Value,
        patience: Duration,
    ) -> Result<(), ClientError> {
        let path = format!("/api/v1/remote-jobs/{}/result", job.job_id);
        with_retries(patience, || async {
            let response = self
                .request(reqwest::Method::PUT, &path)
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(transient)?;
            json_of::<Value>(response).await.map(|_| ())
        })
        .await
    }

    /// Hands the attempt back: the job is claimable again at once, no retry spent.
    pub async fn release(
        &self,
        job: &ClaimedJob,
        reason: &str,
        patience: Duration,
    ) -> Result<(), ClientError> {
        let path = format!("/api/v1/remote-jobs/{}/release", job.job_id);
        let body = json!({"lease_id": job.lease_id, "reason": reason});
        with_retries(patience, || async {
            let response = self
                .request(reqwest::Method::POST, &path)
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(transient)?;
            json_of::<Value>(response).await.map(|_| ())
        })
        .await
    }
}

/// Runs `attempt` until it succeeds, is refused, or `patience` is spent on transient
/// failures, waiting longer after each.
pub async fn with_retries<T, F, Fut>(patience: Duration, mut attempt: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let give_up_at = tokio::time::Instant::now() + patience;
    let mut delay = RETRY_FIRST_DELAY;
    loop {
        match attempt().await {
            Err(ClientError::Transient(cause))
                if tokio::time::Instant::now() + delay < give_up_at =>
            {
                tracing::debug!(%cause, "transient failure, trying again");
                tokio::time::sleep(delay).await;
                delay = next_delay(delay);
            }
            other => return other,
        }
    }
}

/// The wait after `delay`: twice as long, within `RETRY_MAX_DELAY`, with a little jitter
/// so that many workers do not retry in step.
pub fn next_delay(delay: Duration) -> Duration {
    let doubled = (delay * 2).min(RETRY_MAX_DELAY);
    doubled
        .mul_f64(0.75 + fastrand::f64() / 2.0)
        .max(RETRY_FIRST_DELAY)
}

pub fn first_delay() -> Duration {
    RETRY_FIRST_DELAY
}

fn transient(error: reqwest::Error) -> ClientError {
    ClientError::Transient(format!("request failed: {error}"))
}

/// A non-success answer as an error: server trouble and rate limits are transient,
/// everything else a refusal with the server's `detail`.
async fn refusal(response: reqwest::Response) -> ClientError {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("detail").cloned())
        .map(|d| match d {
            Value::String(s) => s,
            other => other.to_string(),
        })
        .unwrap_or(text);
    if status >= 500 || status == 408 || status == 429 {
        ClientError::Transient(format!("the server answered {status}: {detail}"))
    } else {
        ClientError::Refused { status, detail }
    }
}

async fn json_of<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ClientError> {
    if !response.status().is_success() {
        return Err(refusal(response).await);
    }
    response
        .json()
        .await
        .map_err(|error| ClientError::Transient(format!("unreadable answer: {error}")))
}
