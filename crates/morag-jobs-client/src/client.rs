//! The typed HTTP client: every request of the protocol (the worker's poll, download,
//! heartbeat, result and release; ingestion's create, status and cancel), with the bodies
//! of `wire`. Requests whose repetition is harmless and whose loss would cost work (results
//! and releases) are retried with backoff while the failure is transient (the network, a
//! restarting server). Knows nothing of the server's internals: only URLs and JSON.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::wire::{
    CancelRequest, CreateJobRequest, CreateJobResponse, HeartbeatRequest, HeartbeatResponse,
    JobStatusView, PollResponse, ReleaseRequest, SubmitResultRequest, SubmitResultResponse,
    Timestamp, WORKER_ID_HEADER, WORKER_INSTANCE_HEADER, WORKER_VERSION_HEADER,
};

/// The first wait before a retry; each further one doubles, up to `RETRY_MAX_DELAY`.
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(200);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
/// The longest `wait` a poll may ask for.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(30);
/// How long a request other than a poll or a download may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A job the server handed out: a poll's answer when it carried a job and a lease.
#[derive(Clone, Debug)]
pub struct ClaimedJob {
    pub job_id: String,
    pub source_file_url: String,
    pub content_type: String,
    pub task_options: Value,
    /// The attempt's fencing token: heartbeats, the download, the result and a release
    /// carry it, and the server refuses them once the attempt is no longer current.
    pub lease_id: String,
    pub attempt: Option<u32>,
    pub execution_deadline: Option<Timestamp>,
    pub heartbeat_interval_seconds: Option<u64>,
}

impl ClaimedJob {
    /// The job in a poll's answer; `Ok(None)` when it carried none, an error when it
    /// carried a job without what a worker needs (a server that hands out no leases).
    pub fn from_poll(answer: PollResponse) -> Result<Option<ClaimedJob>, String> {
        let Some(job_id) = answer.job_id else {
            return Ok(None);
        };
        let missing = |field: &str| format!("the poll answer for job {job_id} has no {field}");
        Ok(Some(ClaimedJob {
            source_file_url: answer
                .source_file_url
                .ok_or_else(|| missing("source_file_url"))?,
            content_type: answer.content_type.ok_or_else(|| missing("content_type"))?,
            lease_id: answer.lease_id.ok_or_else(|| missing("lease_id"))?,
            task_options: answer.task_options.unwrap_or(Value::Null),
            attempt: answer.attempt,
            execution_deadline: answer.execution_deadline,
            heartbeat_interval_seconds: answer.heartbeat_interval_seconds,
            job_id,
        }))
    }
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

/// One server, reached over a pooled HTTP client; cheap to clone.
#[derive(Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
    /// The registry headers' values: worker id and instance id, once `identify` was called.
    identity: Option<(String, String)>,
}

impl ServerClient {
    /// A client for the server at `base_url` (`http://` is assumed when no scheme is
    /// given), sending `api_key` as a bearer token: a worker key for the worker's requests,
    /// an admin key for ingestion's.
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
            identity: None,
        })
    }

    /// Sends `worker_id` and a fresh instance id with every request from now on.
    pub fn identify(mut self, worker_id: &str) -> Self {
        self.identity = Some((worker_id.to_owned(), uuid::Uuid::new_v4().to_string()));
        self
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
        let mut builder = self.http.request(method, url);
        if let (Some((worker_id, instance)), true) = (&self.identity, ours) {
            builder = builder
                .header(WORKER_ID_HEADER, worker_id)
                .header(WORKER_INSTANCE_HEADER, instance)
                .header(WORKER_VERSION_HEADER, env!("CARGO_PKG_VERSION"));
        }
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
        let answer: PollResponse = json_of(response).await?;
        ClaimedJob::from_poll(answer)
            .map_err(|error| ClientError::Transient(format!("unexpected poll answer: {error}")))
    }

    /// Downloads the job's source into the file `into`.
    /// Downloads the job's source into the file `into` (streamed, never held in memory).
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

    /// Reports that the attempt is alive, with its progress: the answer says whether the
    /// job was cancelled; a lost lease is a refusal (`ClientError::attempt_lost`).
    pub async fn heartbeat(
        &self,
        job: &ClaimedJob,
        progress: Option<f64>,
        message: Option<&str>,
    ) -> Result<HeartbeatResponse, ClientError> {
        let body = HeartbeatRequest {
            lease_id: job.lease_id.clone(),
            progress,
            message: message.map(str::to_owned),
        };
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
        json_of(response).await
    }

    /// Submits the attempt's result, retrying transient failures for up to `patience`.
    /// The request's `lease_id` is set from the job.
    pub async fn submit_result(
        &self,
        job: &ClaimedJob,
        mut body: SubmitResultRequest,
        patience: Duration,
    ) -> Result<SubmitResultResponse, ClientError> {
        body.lease_id = Some(job.lease_id.clone());
        let path = format!("/api/v1/remote-jobs/{}/result", job.job_id);
        self.send_with_retries(reqwest::Method::PUT, &path, &body, patience)
            .await
    }

    /// Hands the attempt back: the job is claimable again at once, no retry spent.
    pub async fn release(
        &self,
        job: &ClaimedJob,
        reason: &str,
        patience: Duration,
    ) -> Result<JobStatusView, ClientError> {
        let path = format!("/api/v1/remote-jobs/{}/release", job.job_id);
        let body = ReleaseRequest {
            lease_id: job.lease_id.clone(),
            reason: Some(reason.to_owned()),
        };
        self.send_with_retries(reqwest::Method::POST, &path, &body, patience)
            .await
    }

    /// Creates a job (ingestion's side; needs an admin key when the server has keys).
    /// Not retried: a lost answer would create the job twice.
    pub async fn create_job(
        &self,
        request: &CreateJobRequest,
    ) -> Result<CreateJobResponse, ClientError> {
        let response = self
            .request(reqwest::Method::POST, "/api/v1/remote-jobs")
            .json(request)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(transient)?;
        json_of(response).await
    }

    /// A job's status (MoRAG's `JobStatusResponse`).
    pub async fn job_status(&self, job_id: &str) -> Result<JobStatusView, ClientError> {
        let response = self
            .request(
                reqwest::Method::GET,
                &format!("/api/v1/remote-jobs/{job_id}/status"),
            )
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(transient)?;
        json_of(response).await
    }

    /// Cancels a job (an admin's request); a worker holding it learns at its next heartbeat.
    pub async fn cancel_job(
        &self,
        job_id: &str,
        reason: Option<&str>,
    ) -> Result<JobStatusView, ClientError> {
        let body = CancelRequest {
            reason: reason.map(str::to_owned),
        };
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("/api/v1/remote-jobs/{job_id}/cancel"),
            )
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(transient)?;
        json_of(response).await
    }

    /// Sends `body` to `path` until it is answered, refused, or `patience` is spent.
    async fn send_with_retries<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
        patience: Duration,
    ) -> Result<T, ClientError> {
        with_retries(patience, || async {
            let response = self
                .request(method.clone(), path)
                .json(body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(transient)?;
            json_of(response).await
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

/// The wait before the first retry.
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
