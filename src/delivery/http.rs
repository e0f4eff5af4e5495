//! The two HTTP sinks: the per-job webhook (MoRAG's notification shape) and the ingestion
//! callback (the full outcome). Both sign with Standard Webhooks when a secret is set, and
//! neither follows redirects (a redirect could lead past `MORAG_WEBHOOK_ALLOWED_HOSTS`).
//!
//! Each body is serialized once, straight from the event (a result of tens of megabytes is
//! not copied again), and handed to the client without another copy.

use std::sync::Arc;

use serde::Serialize;

use super::config::DeliveryConfig;
use super::signing::WebhookSecret;
use super::{AttemptDetail, DeliveryError, EventKind, OutboundEvent, Sink, SinkFuture, SinkKind};
use crate::clock::SharedClock;

/// The HTTP client both sinks share (one connection pool). https targets are verified
/// against the built-in Mozilla roots and the configuration's extra certificate
/// authorities (`MORAG_WEBHOOK_CA_FILE`).
pub fn http_client(config: &DeliveryConfig) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("morag-jobs/", env!("CARGO_PKG_VERSION")));
    for certificate in &config.extra_root_certificates {
        builder = builder.add_root_certificate(certificate.clone());
    }
    // Building fails only when the TLS backend cannot start; the certificates were
    // parsed when the configuration was read.
    builder.build().expect("the HTTP client with rustls builds")
}

/// MoRAG's notification: `{task_id, status, result, completed_at}`.
#[derive(Serialize)]
struct Notification<'a> {
    task_id: &'a str,
    status: &'static str,
    result: &'a serde_json::Value,
    completed_at: String,
}

/// The ingestion callback's body; `processing_result` and `task_options` on completion,
/// `failure_info` otherwise.
#[derive(Serialize)]
struct Callback<'a> {
    event: &'static str,
    job_id: String,
    ingestion_task_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    processing_result: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_options: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_info: Option<&'a serde_json::Value>,
    completed_at: String,
}

/// How much of a receiver's answer is read (and dropped) so its connection can be reused.
const MAX_ANSWER_READ: usize = 64 * 1024;

/// POSTs `body` to `url` with the Standard Webhooks headers, and classifies the answer:
/// 2xx delivered, 410 Gone permanent, anything else (or no answer) worth retrying.
async fn post_signed(
    client: &reqwest::Client,
    clock: &SharedClock,
    secret: Option<&WebhookSecret>,
    url: reqwest::Url,
    event_id: &str,
    body: Vec<u8>,
) -> (Result<(), DeliveryError>, AttemptDetail) {
    let timestamp = clock.now().as_micros().div_euclid(1_000_000);
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", event_id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(secret) = secret {
        request = request.header("webhook-signature", secret.sign(event_id, timestamp, &body));
    }
    match request.body(body).send().await {
        Ok(mut response) => {
            let status = response.status();
            // Read (a bounded part of) the answer: a connection whose response body was
            // not read to its end is closed instead of reused for the next delivery.
            let mut read = 0usize;
            while read < MAX_ANSWER_READ {
                match response.chunk().await {
                    Ok(Some(chunk)) => read += chunk.len(),
                    _ => break,
                }
            }
            let detail = AttemptDetail {
                http_status: Some(status.as_u16()),
            };
            let outcome = if status.is_success() {
                Ok(())
            } else if status == reqwest::StatusCode::GONE {
                Err(DeliveryError::Permanent("HTTP 410 Gone".into()))
            } else {
                Err(DeliveryError::Retryable(format!(
                    "HTTP {}",
                    status.as_u16()
                )))
            };
            (outcome, detail)
        }
        Err(error) => (
            Err(DeliveryError::Retryable(describe(&error))),
            AttemptDetail::default(),
        ),
    }
}

/// A transport error without the URL (a webhook URL may carry a token in its query).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "cannot connect"
    } else if error.is_timeout() {
        "timed out"
    } else if error.is_request() {
        "request failed"
    } else {
        "transport error"
    };
    let mut cause = std::error::Error::source(error);
    let mut innermost = None;
    while let Some(next) = cause {
        innermost = Some(next.to_string());
        cause = next.source();
    }
    match innermost {
        Some(detail) => format!("{kind}: {detail}"),
        None => kind.to_owned(),
    }
}

/// POSTs MoRAG's notification to the job's own `task_options.webhook_url`.
pub struct WebhookSink {
    client: reqwest::Client,
    clock: SharedClock,
    config: Arc<DeliveryConfig>,
}

impl WebhookSink {
    pub fn new(client: reqwest::Client, clock: SharedClock, config: Arc<DeliveryConfig>) -> Self {
        WebhookSink {
            client,
            clock,
            config,
        }
    }
}

impl Sink for WebhookSink {
    fn kind(&self) -> SinkKind {
        SinkKind::Webhook
    }

    fn deliver<'a>(&'a self, event: &'a OutboundEvent) -> SinkFuture<'a> {
        Box::pin(async move {
            let target = event
                .task_options
                .get("webhook_url")
                .and_then(|u| u.as_str())
                .ok_or_else(|| "the job's task_options has no webhook_url".to_owned())
                .and_then(|url| self.config.check_webhook_url(url));
            let url = match target {
                Ok(url) => url,
                Err(why) => {
                    return (
                        Err(DeliveryError::Permanent(format!(
                            "webhook_url refused: {why}"
                        ))),
                        AttemptDetail::default(),
                    )
                }
            };
            let body = Notification {
                task_id: &event.ingestion_task_id,
                status: if event.kind == EventKind::Completed {
                    "SUCCESS"
                } else {
                    "FAILURE"
                },
                result: &event.payload,
                completed_at: event.completed_at.to_rfc3339(),
            };
            let body = serde_json::to_vec(&body).expect("JSON values serialize");
            post_signed(
                &self.client,
                &self.clock,
                self.config.webhook_secret.as_ref(),
                url,
                &event.event_id,
                body,
            )
            .await
        })
    }
}

/// POSTs every outcome to `MORAG_INGESTION_CALLBACK_URL`.
pub struct IngestionCallbackSink {
    client: reqwest::Client,
    clock: SharedClock,
    url: reqwest::Url,
    secret: Option<WebhookSecret>,
}

impl IngestionCallbackSink {
    pub fn new(
        client: reqwest::Client,
        clock: SharedClock,
        url: reqwest::Url,
        secret: Option<WebhookSecret>,
    ) -> Self {
        IngestionCallbackSink {
            client,
            clock,
            url,
            secret,
        }
    }
}

impl Sink for IngestionCallbackSink {
    fn kind(&self) -> SinkKind {
        SinkKind::IngestionCallback
    }

    fn deliver<'a>(&'a self, event: &'a OutboundEvent) -> SinkFuture<'a> {
        Box::pin(async move {
            let completed = event.kind == EventKind::Completed;
            let body = Callback {
                event: event.kind.as_str(),
                job_id: event.job_id.to_string(),
                ingestion_task_id: &event.ingestion_task_id,
                processing_result: completed.then_some(&event.payload),
                task_options: completed.then_some(&event.task_options),
                failure_info: (!completed).then_some(&event.payload),
                completed_at: event.completed_at.to_rfc3339(),
            };
            let body = serde_json::to_vec(&body).expect("JSON values serialize");
            post_signed(
                &self.client,
                &self.clock,
                self.secret.as_ref(),
                self.url.clone(),
                &event.event_id,
                body,
            )
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::delivery::config::{DeliveryArgs, DeliveryConfig};
    use crate::domain::JobId;

    fn config(allowed: &[&str]) -> Arc<DeliveryConfig> {
        Arc::new(
            DeliveryConfig::from_args(DeliveryArgs {
                ingestion_callback_url: None,
                webhook_secret: None,
                webhook_ca_file: None,
                webhook_allowed_hosts: allowed.iter().map(|h| h.to_string()).collect(),
                delivery_max_attempts: 20,
                delivery_attempt_timeout_ms: 1_000,
                delivery_backoff_base_ms: 1_000,
                delivery_backoff_max_ms: 1_000,
                delivery_concurrency: 1,
                delivery_poll_interval_ms: 1_000,
            })
            .unwrap(),
        )
    }

    fn event(webhook_url: &str) -> OutboundEvent {
        OutboundEvent {
            event_id: "evt_1".into(),
            kind: EventKind::Completed,
            job_id: JobId::new_random(),
            ingestion_task_id: "t".into(),
            payload: serde_json::json!({}),
            task_options: serde_json::json!({ "webhook_url": webhook_url }),
            completed_at: Timestamp::from_micros(0),
        }
    }

    /// Refused targets are permanent failures decided before anything is sent (the
    /// configuration may have changed since the job was created and checked).
    #[tokio::test]
    async fn webhooks_go_only_to_allowed_http_targets() {
        let clock: SharedClock = Arc::new(ManualClock::starting_now());
        let sink = WebhookSink::new(
            http_client(&config(&[])),
            clock,
            config(&["hooks.example.org"]),
        );
        for url in [
            "http://127.0.0.1:9/hook",
            "ftp://hooks.example.org/x",
            "https://elsewhere.example.org/x",
        ] {
            let (outcome, detail) = sink.deliver(&event(url)).await;
            assert!(
                matches!(outcome, Err(DeliveryError::Permanent(_))),
                "{url}: {outcome:?}"
            );
            assert_eq!(detail.http_status, None);
        }
        assert!(config(&[]).check_webhook_url("http://anywhere:1/x").is_ok());
        assert!(config(&["Hooks.Example.org"])
            .check_webhook_url("http://HOOKS.example.org/x")
            .is_ok());
    }
}
