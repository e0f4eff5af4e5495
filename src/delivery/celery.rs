//! The Celery sink: each outcome becomes a Celery task message on a Redis broker, which a
//! stock Celery worker of MoRAG's ingestion runs.
//!
//! A completion calls `continue_ingestion_after_remote_processing(ingestion_task_id,
//! processing_result, task_options)`; a final failure, timeout or cancellation calls
//! `handle_remote_job_failure(ingestion_task_id, failure_info)`. The message is Celery's
//! protocol 2 with a JSON body in kombu's Redis envelope (what `celery.app.amqp.as_task_v2`
//! and `kombu.transport.redis` produce), pushed onto the queue's list, and its task id is the
//! event id.
//!
//! Exactly once: one Lua script sets a marker for the event id (`SET NX EX`) and pushes the
//! message only if the marker was new, in one atomic step on the server. If the server dies
//! after the push but before the dispatcher records the delivery, the next attempt finds the
//! marker and reports success without pushing again.
//!
//! Batches: the dispatcher attempts many deliveries at once, and one Redis round trip each
//! costs both processes a few syscalls per event. Attempts that arrive while a script call
//! is in flight wait for it and then go together in the next call (`batch::Batcher`, at
//! most `MAX_BATCH_EVENTS` events and `MAX_BATCH_BYTES`), each event still with its own
//! marker and its own answer; a lone attempt goes at once.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;
use serde_json::Value;

use super::batch::{BatchLimits, Batcher, Flush};
use super::resp::{RedisClient, RedisError, RedisUrl, Reply, Script};
use super::{AttemptDetail, DeliveryError, OutboundEvent, Sink, SinkFuture, SinkKind};

pub const DEFAULT_CONTINUE_TASK: &str =
    "morag.ingest_tasks.continue_ingestion_after_remote_processing";
pub const DEFAULT_FAILURE_TASK: &str = "morag.ingest_tasks.handle_remote_job_failure";
pub const DEFAULT_QUEUE: &str = "celery";
pub const DEFAULT_DEDUP_KEY_PREFIX: &str = "morag-jobs:celery-sent:";
pub const DEFAULT_DEDUP_DAYS: u32 = 7;

/// Everything the sink needs to know, validated.
#[derive(Clone, Debug)]
pub struct CeleryConfig {
    pub broker: RedisUrl,
    /// Task name for completions.
    pub continue_task: String,
    /// Task name for final failures, timeouts and cancellations.
    pub failure_task: String,
    /// The Celery queue (the Redis list the worker pops from).
    pub queue: String,
    /// Dedup markers are `<prefix><event id>`.
    pub dedup_key_prefix: String,
    /// How long a marker keeps an event from being enqueued again; longer than any
    /// delivery's life, so a late retry never enqueues twice.
    pub dedup_ttl: Duration,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

impl CeleryConfig {
    /// A configuration with the defaults MoRAG uses, for `broker_url`.
    pub fn new(broker_url: &str) -> Result<CeleryConfig, String> {
        Ok(CeleryConfig {
            broker: RedisUrl::parse(broker_url)?,
            continue_task: DEFAULT_CONTINUE_TASK.into(),
            failure_task: DEFAULT_FAILURE_TASK.into(),
            queue: DEFAULT_QUEUE.into(),
            dedup_key_prefix: DEFAULT_DEDUP_KEY_PREFIX.into(),
            dedup_ttl: Duration::from_secs(u64::from(DEFAULT_DEDUP_DAYS) * 86_400),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
        })
    }
}

/// What one delivery did on the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// The task message was pushed.
    Sent,
    /// The event's marker was already there: an earlier attempt pushed it.
    AlreadySent,
}

/// Sets each event's marker and pushes its message only if the marker was new, for a
/// batch of events in one atomic step, in their order (so the first is popped first, as
/// if they had been pushed one by one).
/// KEYS[1]: the queue's list; KEYS[i] (i >= 2): an event's marker.
/// ARGV[1]: seconds a marker lives; ARGV[i] (i >= 2): the task message of KEYS[i]'s event.
/// Answers an array with, per event, 1 (pushed) or 0 (the marker was there).
static ENQUEUE_EACH_ONCE: Script = Script::new(
    "local pushed = {} \
     for i = 2, #KEYS do \
       if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then \
         redis.call('LPUSH', KEYS[1], ARGV[i]) \
         pushed[i - 1] = 1 \
       else \
         pushed[i - 1] = 0 \
       end \
     end \
     return pushed",
);

/// At most this many events go in one script call.
const MAX_BATCH_EVENTS: usize = 128;
/// And at most this many bytes of markers and messages, so that one call (and the time
/// Redis spends in it) stays bounded; an event larger than this goes alone.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One event waiting to be enqueued: its marker and its task message, moved (not copied)
/// from the caller into the batch and written from there to the socket.
struct PendingEnqueue {
    marker: String,
    message: Vec<u8>,
}

/// Runs the enqueue script for a batch of events.
struct EnqueueBatches {
    redis: RedisClient,
    queue: String,
    /// Seconds a marker lives, as the script's argument.
    ttl_seconds: String,
}

impl Flush for EnqueueBatches {
    type Item = PendingEnqueue;
    type Output = Result<Enqueued, DeliveryError>;

    fn size(item: &PendingEnqueue) -> usize {
        item.marker.len() + item.message.len()
    }

    fn flush<'a>(
        &'a self,
        items: &'a [PendingEnqueue],
    ) -> Pin<Box<dyn Future<Output = Vec<Self::Output>> + Send + 'a>> {
        Box::pin(async move {
            let mut keys: Vec<&[u8]> = Vec::with_capacity(1 + items.len());
            keys.push(self.queue.as_bytes());
            keys.extend(items.iter().map(|item| item.marker.as_bytes()));
            let mut args: Vec<&[u8]> = Vec::with_capacity(1 + items.len());
            args.push(self.ttl_seconds.as_bytes());
            args.extend(items.iter().map(|item| item.message.as_slice()));
            let outcomes = match self
                .redis
                .run_script(&ENQUEUE_EACH_ONCE, &keys, &args)
                .await
            {
                Ok(reply) => outcomes_of(reply, items.len()),
                Err(error) => Err(describe(&error)),
            };
            // A failed call fails every event in it; whatever it did push is marked, so
            // the dispatcher's retries push nothing twice.
            match outcomes {
                Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
                Err(message) => vec![Err(DeliveryError::Retryable(message)); items.len()],
            }
        })
    }
}

/// Reads the script's answer for a batch of `n_events`.
fn outcomes_of(reply: Reply, n_events: usize) -> Result<Vec<Enqueued>, String> {
    let unexpected = |reply: &Reply| format!("the enqueue script answered {reply:?}");
    let Reply::Array(Some(items)) = &reply else {
        return Err(unexpected(&reply));
    };
    if items.len() != n_events {
        return Err(unexpected(&reply));
    }
    items
        .iter()
        .map(|item| match item {
            Reply::Integer(1) => Ok(Enqueued::Sent),
            Reply::Integer(0) => Ok(Enqueued::AlreadySent),
            _ => Err(unexpected(&reply)),
        })
        .collect()
}

pub struct CelerySink {
    config: CeleryConfig,
    /// Concurrent deliveries go to Redis together, one script call per batch.
    batcher: Batcher<EnqueueBatches>,
    /// `morag-jobs@<hostname>`, Celery's `origin` header.
    origin: String,
}

impl CelerySink {
    pub fn new(config: CeleryConfig) -> CelerySink {
        let redis = RedisClient::new(
            config.broker.clone(),
            config.connect_timeout,
            config.io_timeout,
        );
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let batcher = Batcher::new(
            EnqueueBatches {
                redis,
                queue: config.queue.clone(),
                ttl_seconds: config.dedup_ttl.as_secs().max(1).to_string(),
            },
            BatchLimits {
                max_items: MAX_BATCH_EVENTS,
                max_bytes: MAX_BATCH_BYTES,
            },
        );
        CelerySink {
            config,
            batcher,
            origin: format!("morag-jobs@{hostname}"),
        }
    }

    pub fn config(&self) -> &CeleryConfig {
        &self.config
    }

    /// The Redis key of an event's dedup marker.
    pub fn dedup_key(&self, event_id: &str) -> String {
        format!("{}{event_id}", self.config.dedup_key_prefix)
    }

    /// Script calls (batches of events) made so far.
    pub fn n_batches(&self) -> u64 {
        self.batcher.n_flushes()
    }

    /// Puts the event's task message on the queue unless an earlier call did. Calls made
    /// while another one's batch is in flight are enqueued together, in one script call.
    pub async fn enqueue(&self, event: &OutboundEvent) -> Result<Enqueued, DeliveryError> {
        let delivery_tag = uuid::Uuid::new_v4().to_string();
        let message =
            task_message(event, &self.config, &self.origin, &delivery_tag).map_err(|e| {
                DeliveryError::Permanent(format!("cannot encode the task message: {e}"))
            })?;
        let pending = PendingEnqueue {
            marker: self.dedup_key(&event.event_id),
            message,
        };
        self.batcher.submit(pending).await.unwrap_or_else(|| {
            Err(DeliveryError::Retryable(
                "the Celery sink stopped before enqueueing the event".into(),
            ))
        })
    }
}

fn describe(error: &RedisError) -> String {
    format!("celery broker: {error}")
}

impl Sink for CelerySink {
    fn kind(&self) -> SinkKind {
        SinkKind::Celery
    }

    fn deliver<'a>(&'a self, event: &'a OutboundEvent) -> SinkFuture<'a> {
        Box::pin(async move {
            let outcome = self.enqueue(event).await.map(|_| ());
            (outcome, AttemptDetail::default())
        })
    }
}

/// The embedded options of a protocol 2 body: no callbacks, errbacks, chain or chord.
#[derive(Serialize)]
struct Embed {
    callbacks: Option<()>,
    errbacks: Option<()>,
    chain: Option<()>,
    chord: Option<()>,
}

/// The envelope without its body, in the field order kombu writes.
#[derive(Serialize)]
struct EnvelopeRest<'a> {
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: Headers<'a>,
    properties: Properties<'a>,
}

/// Celery's protocol 2 headers, as `as_task_v2` fills them for a plain `send_task`.
#[derive(Serialize)]
struct Headers<'a> {
    lang: &'a str,
    task: &'a str,
    id: &'a str,
    shadow: Option<&'a str>,
    eta: Option<&'a str>,
    expires: Option<&'a str>,
    group: Option<&'a str>,
    group_index: Option<u32>,
    retries: u32,
    timelimit: [Option<f64>; 2],
    root_id: &'a str,
    parent_id: Option<&'a str>,
    argsrepr: String,
    kwargsrepr: &'a str,
    origin: &'a str,
    ignore_result: bool,
    replaced_task_nesting: u32,
    stamped_headers: Option<()>,
    stamps: serde_json::Map<String, Value>,
}

#[derive(Serialize)]
struct Properties<'a> {
    correlation_id: &'a str,
    reply_to: &'a str,
    delivery_mode: u8,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'a str,
    delivery_tag: &'a str,
}

#[derive(Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// Celery shows `argsrepr` in logs and monitors; it truncates it, and so do we, without
/// rendering a large result whole first.
const ARGSREPR_MAX_BYTES: usize = 1024;

/// The positional arguments of the task an event calls, by reference (a result may be
/// tens of megabytes; it is encoded once, straight into the body).
#[derive(Serialize)]
#[serde(untagged)]
enum TaskArgs<'a> {
    /// `(ingestion_task_id, processing_result, task_options)`
    Continue(&'a str, &'a Value, &'a Value),
    /// `(ingestion_task_id, failure_info)`
    Failure(&'a str, &'a Value),
}

/// Builds the Redis transport's JSON envelope of a protocol 2 task message for `event`.
/// Pure: the caller supplies the origin and the (random) delivery tag.
pub fn task_message(
    event: &OutboundEvent,
    config: &CeleryConfig,
    origin: &str,
    delivery_tag: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let (task, args) = if event.is_success() {
        (
            config.continue_task.as_str(),
            TaskArgs::Continue(
                &event.ingestion_task_id,
                &event.payload,
                &event.task_options,
            ),
        )
    } else {
        (
            config.failure_task.as_str(),
            TaskArgs::Failure(&event.ingestion_task_id, &event.payload),
        )
    };
    let embed = Embed {
        callbacks: None,
        errbacks: None,
        chain: None,
        chord: None,
    };
    let empty_kwargs = serde_json::Map::new();
    let body = serde_json::to_vec(&(&args, &empty_kwargs, &embed))?;

    let rest = serde_json::to_vec(&EnvelopeRest {
        content_encoding: "utf-8",
        content_type: "application/json",
        headers: Headers {
            lang: "py",
            task,
            id: &event.event_id,
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: [None, None],
            root_id: &event.event_id,
            parent_id: None,
            argsrepr: bounded_repr(&args),
            kwargsrepr: "{}",
            origin,
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: serde_json::Map::new(),
        },
        properties: Properties {
            correlation_id: &event.event_id,
            reply_to: "",
            delivery_mode: 2,
            delivery_info: DeliveryInfo {
                exchange: "",
                routing_key: &config.queue,
            },
            priority: 0,
            body_encoding: "base64",
            delivery_tag,
        },
    })?;

    // `{"body": "<base64>", ` followed by the rest without its opening brace: the body is
    // encoded straight into the message (base64 needs no JSON escaping).
    let engine = &base64::engine::general_purpose::STANDARD;
    let mut message = Vec::with_capacity(16 + body.len() / 3 * 4 + 4 + rest.len());
    message.extend_from_slice(b"{\"body\": \"");
    let start = message.len();
    message.resize(
        start + base64::encoded_len(body.len(), true).unwrap_or(0),
        0,
    );
    let written = engine
        .encode_slice(&body, &mut message[start..])
        .expect("the buffer has the encoded length");
    message.truncate(start + written);
    drop(body);
    message.extend_from_slice(b"\", ");
    message.extend_from_slice(&rest[1..]);
    Ok(message)
}

/// The arguments as JSON, cut at `ARGSREPR_MAX_BYTES` (on a character boundary) with `...`.
fn bounded_repr(args: &TaskArgs<'_>) -> String {
    struct Capped(Vec<u8>);
    impl Write for Capped {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let room = ARGSREPR_MAX_BYTES + 1 - self.0.len();
            if room == 0 {
                return Err(std::io::Error::other("long enough"));
            }
            let n = data.len().min(room);
            self.0.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut capped = Capped(Vec::with_capacity(ARGSREPR_MAX_BYTES + 1));
    let complete = serde_json::to_writer(&mut capped, args).is_ok();
    let mut text = String::from_utf8_lossy(&capped.0).into_owned();
    if !complete || text.len() > ARGSREPR_MAX_BYTES {
        let mut cut = ARGSREPR_MAX_BYTES.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::delivery::EventKind;
    use crate::domain::JobId;
    use serde_json::json;

    fn event(kind: EventKind, payload: Value) -> OutboundEvent {
        OutboundEvent {
            event_id: "evt_7d0c9a52-51a8-4c57-9d38-5b2e54a0a5b1".into(),
            kind,
            job_id: JobId::new_random(),
            ingestion_task_id: "ingest-42".into(),
            payload,
            task_options: json!({"webhook_url": null, "chunk_size": 4000}),
            completed_at: Timestamp::from_micros(1_700_000_000_000_000),
        }
    }

    #[test]
    fn the_script_answer_gives_each_event_its_own_outcome_or_fails_the_batch() {
        let answer =
            |items: Vec<i64>| Reply::Array(Some(items.into_iter().map(Reply::Integer).collect()));
        assert_eq!(
            outcomes_of(answer(vec![1, 0, 1]), 3),
            Ok(vec![Enqueued::Sent, Enqueued::AlreadySent, Enqueued::Sent])
        );
        for (reply, n_events) in [
            (answer(vec![1, 1]), 3),
            (answer(vec![1, 2]), 2),
            (Reply::Integer(1), 1),
            (Reply::Array(None), 1),
            (
                Reply::Array(Some(vec![Reply::Bulk(Some(b"1".to_vec()))])),
                1,
            ),
        ] {
            let error = outcomes_of(reply.clone(), n_events).unwrap_err();
            assert!(error.contains("the enqueue script answered"), "{error}");
        }
    }

    fn decode(message: &[u8]) -> (Value, Value) {
        let envelope: Value = serde_json::from_slice(message).unwrap();
        let body = base64::engine::general_purpose::STANDARD
            .decode(envelope["body"].as_str().unwrap())
            .unwrap();
        (envelope, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn a_completion_calls_the_continue_task_with_the_result_and_task_options() {
        let config = CeleryConfig::new("redis://127.0.0.1/0").unwrap();
        let result = json!({"success": true, "content": "# Title\n\"quoted\" ✓", "metadata": {"pages": 3}, "processing_time": 1.5});
        let event = event(EventKind::Completed, result.clone());
        let message = task_message(&event, &config, "morag-jobs@host", "tag-1").unwrap();
        let (envelope, body) = decode(&message);

        assert_eq!(
            body,
            json!([["ingest-42", result, event.task_options], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
        );
        let headers = &envelope["headers"];
        assert_eq!(headers["task"], DEFAULT_CONTINUE_TASK);
        assert_eq!(headers["id"], event.event_id);
        assert_eq!(headers["root_id"], event.event_id);
        assert_eq!(headers["lang"], "py");
        assert_eq!(headers["retries"], 0);
        assert_eq!(headers["origin"], "morag-jobs@host");
        assert!(headers["argsrepr"]
            .as_str()
            .unwrap()
            .starts_with("[\"ingest-42\""));
        assert_eq!(envelope["content-type"], "application/json");
        assert_eq!(envelope["content-encoding"], "utf-8");
        let properties = &envelope["properties"];
        assert_eq!(properties["correlation_id"], event.event_id);
        assert_eq!(properties["body_encoding"], "base64");
        assert_eq!(properties["delivery_tag"], "tag-1");
        assert_eq!(
            properties["delivery_info"],
            json!({"exchange": "", "routing_key": "celery"})
        );
    }

    #[test]
    fn failures_timeouts_and_cancellations_call_the_failure_task() {
        let mut config = CeleryConfig::new("redis://127.0.0.1/0").unwrap();
        config.failure_task = "ingest.failed".into();
        config.queue = "ingestion".into();
        for kind in [EventKind::Failed, EventKind::TimedOut, EventKind::Cancelled] {
            let info = json!({"error_message": "boom", "retry_count": 3, "job_id": "j", "reason": kind.failure_reason()});
            let message = task_message(&event(kind, info.clone()), &config, "o", "t").unwrap();
            let (envelope, body) = decode(&message);
            assert_eq!(envelope["headers"]["task"], "ingest.failed");
            assert_eq!(
                envelope["properties"]["delivery_info"]["routing_key"],
                "ingestion"
            );
            assert_eq!(body[0], json!(["ingest-42", info]));
        }
    }

    #[test]
    fn argsrepr_stays_short_for_a_large_result() {
        let config = CeleryConfig::new("redis://127.0.0.1/0").unwrap();
        let content = "é".repeat(1_000_000);
        let result =
            json!({"success": true, "content": content, "metadata": {}, "processing_time": 1.0});
        let message = task_message(
            &event(EventKind::Completed, result.clone()),
            &config,
            "o",
            "t",
        )
        .unwrap();
        let (envelope, body) = decode(&message);
        let argsrepr = envelope["headers"]["argsrepr"].as_str().unwrap();
        assert!(argsrepr.len() <= ARGSREPR_MAX_BYTES + 3 && argsrepr.ends_with("..."));
        assert_eq!(body[0][1], result);
    }
}
