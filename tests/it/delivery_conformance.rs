//! The deliveries half of the storage conformance suite (`DeliveryStore`), run against
//! each backend like `store_conformance`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use morag_jobs::clock::Timestamp;
use morag_jobs::delivery::{EventKind, SinkKind};
use morag_jobs::domain::{
    ContentType, JobId, LifecyclePolicy, RetentionPolicy, RetryPolicy, TimeoutPolicy, WorkerId,
};
use morag_jobs::store::deliveries::*;
use morag_jobs::store::*;
use serde_json::json;

use crate::store_conformance::{open_postgres, open_sqlite, TestStore};

const T0: i64 = 1_800_000_000_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_micros(T0 + secs * 1_000_000)
}

fn policy() -> LifecyclePolicy {
    LifecyclePolicy {
        timeouts: TimeoutPolicy::default(),
        retry: RetryPolicy {
            max_retries: 0,
            jitter_fraction: 0.0,
            ..RetryPolicy::default()
        },
        retention: RetentionPolicy::from_days(7, None),
    }
}

async fn create(store: &dyn Store, options: serde_json::Value, now: Timestamp) -> JobId {
    create_expiring(store, options, now, None).await
}

async fn create_expiring(
    store: &dyn Store,
    options: serde_json::Value,
    now: Timestamp,
    pending_deadline: Option<Timestamp>,
) -> JobId {
    let id = JobId::new_random();
    store
        .create_job(CreateJobParams {
            id,
            content_type: ContentType::parse("audio").unwrap(),
            source_file_path: format!("/data/files/{id}"),
            task_options: options,
            ingestion_task_id: format!("ingest-{id}"),
            pending_deadline,
            now,
        })
        .await
        .expect("create");
    id
}

/// Creates a job, claims it and reports `outcome`: a finished job with one hand-off.
async fn finish(
    store: &dyn Store,
    options: serde_json::Value,
    outcome: AttemptOutcome,
    now: Timestamp,
) -> JobId {
    finish_after(store, options, outcome, now, || async {}).await
}

/// `finish`, running `between` after the claim and before the result.
async fn finish_after<F: std::future::Future<Output = ()>>(
    store: &dyn Store,
    options: serde_json::Value,
    outcome: AttemptOutcome,
    now: Timestamp,
    between: impl FnOnce() -> F,
) -> JobId {
    let id = create(store, options, now).await;
    let job = store
        .claim_job(ClaimParams {
            worker_id: WorkerId::parse("w1").unwrap(),
            content_types: vec![],
            timeouts: policy().timeouts,
            now,
        })
        .await
        .unwrap()
        .expect("claimable");
    assert_eq!(job.id, id);
    between().await;
    store
        .submit_result(SubmitResultParams {
            job_id: id,
            lease_id: job.lease_id,
            outcome,
            policy: policy(),
            jitter: 0.0,
            now,
        })
        .await
        .unwrap();
    id
}

/// `finish` with a success for a job that names a webhook (a delivery to every sink).
async fn finish_hooked(store: &dyn Store, now: Timestamp) -> JobId {
    finish(
        store,
        json!({"webhook_url": "http://127.0.0.1:9/hook"}),
        success(),
        now,
    )
    .await
}

fn success() -> AttemptOutcome {
    AttemptOutcome::Success {
        content: "converted text".into(),
        metadata: json!({"pages": 3}),
        processing_time: Some(1.5),
    }
}

fn failure() -> AttemptOutcome {
    AttemptOutcome::Failure {
        error_message: "corrupt file".into(),
        retryable: false,
    }
}

fn callback_and_webhooks(now: Timestamp) -> FanOutParams {
    FanOutParams {
        sinks: vec![SinkKind::IngestionCallback],
        webhooks: true,
        limit: 100,
        now,
    }
}

async fn claim(store: &dyn Store, limit: usize, now: Timestamp) -> Vec<ClaimedDelivery> {
    store
        .claim_deliveries(ClaimDeliveriesParams {
            limit,
            claim_for: Duration::from_secs(60),
            now,
        })
        .await
        .expect("claim deliveries")
}

/// `fan_out_and_claim` to the callback and webhooks, claims held for 60 s.
async fn fan_out_and_claim(store: &dyn Store, limit: usize, now: Timestamp) -> DispatchStep {
    store
        .fan_out_and_claim(
            callback_and_webhooks(now),
            ClaimDeliveriesParams {
                limit,
                claim_for: Duration::from_secs(60),
                now,
            },
        )
        .await
        .expect("fan out and claim")
}

async fn record(
    store: &dyn Store,
    claimed: &ClaimedDelivery,
    result: AttemptResult,
    now: Timestamp,
) -> RecordOutcome {
    store
        .record_delivery_attempt(RecordAttemptParams {
            delivery_id: claimed.delivery_id,
            claim_token: claimed.claim_token.clone(),
            result,
            http_status: Some(500),
            now,
        })
        .await
        .expect("record")
}

async fn all_deliveries(store: &dyn Store) -> Vec<Delivery> {
    store
        .list_deliveries(DeliveryListParams {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .deliveries
}

pub async fn hand_offs_fan_out_once_per_sink_with_one_event_id(s: TestStore) {
    let store = &*s.store;
    let with_webhook = finish_hooked(store, at(0)).await;
    let without = finish(store, json!({}), failure(), at(1)).await;
    assert_eq!(
        store.next_delivery_due().await.unwrap(),
        Some(Timestamp::from_micros(0)),
        "a hand-off waiting to be fanned out is due at once"
    );
    let report = store
        .fan_out_handoffs(callback_and_webhooks(at(2)))
        .await
        .unwrap();
    assert_eq!(
        report,
        FanOutReport {
            n_handoffs: 2,
            n_deliveries: 3
        }
    );
    let again = store
        .fan_out_handoffs(callback_and_webhooks(at(3)))
        .await
        .unwrap();
    assert_eq!(again, FanOutReport::default(), "fanned out only once");
    let deliveries = all_deliveries(store).await;
    assert_eq!(deliveries.len(), 3);
    let of = |job: JobId| {
        let mut sinks: Vec<(SinkKind, String)> = deliveries
            .iter()
            .filter(|d| d.job_id == job)
            .map(|d| (d.sink, d.event_id.clone()))
            .collect();
        sinks.sort();
        sinks
    };
    let hooked = of(with_webhook);
    assert_eq!(
        hooked.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![SinkKind::Webhook, SinkKind::IngestionCallback]
    );
    assert_eq!(hooked[0].1, hooked[1].1, "one event id for every sink");
    assert!(hooked[0].1.starts_with("evt_"));
    let plain = of(without);
    assert_eq!(plain.len(), 1);
    assert_ne!(plain[0].1, hooked[0].1);
    assert!(deliveries
        .iter()
        .all(|d| d.state == DeliveryState::Pending && d.attempts == 0));
    assert_eq!(store.next_delivery_due().await.unwrap(), Some(at(2)));
}

pub async fn claimed_events_carry_the_outcome_as_it_was_handed_off(s: TestStore) {
    let store = &*s.store;
    let done = finish(
        store,
        json!({"webhook_url": "http://127.0.0.1:9/hook", "language": "de"}),
        success(),
        at(0),
    )
    .await;
    let failed = finish(store, json!({}), failure(), at(1)).await;
    let timed_out = create_expiring(store, json!({}), at(2), Some(at(12))).await;
    store
        .rescue_expired(RescueParams {
            policy: policy(),
            limit: 10,
            jitter_seed: 1,
            now: at(1_000_000),
        })
        .await
        .unwrap();
    store
        .fan_out_handoffs(FanOutParams {
            sinks: vec![SinkKind::IngestionCallback],
            webhooks: false,
            limit: 100,
            now: at(1_000_001),
        })
        .await
        .unwrap();
    let claimed = claim(store, 10, at(1_000_002)).await;
    assert_eq!(claimed.len(), 3, "webhooks off: one delivery per outcome");
    let event = |job: JobId| {
        claimed
            .iter()
            .map(|c| c.event.clone().expect("event builds"))
            .find(|e| e.job_id == job)
            .expect("claimed")
    };
    let completed = event(done);
    assert_eq!(completed.kind, EventKind::Completed);
    assert_eq!(completed.ingestion_task_id, format!("ingest-{done}"));
    assert_eq!(
        completed.payload,
        json!({"success": true, "content": "converted text", "metadata": {"pages": 3}, "processing_time": 1.5})
    );
    assert_eq!(completed.task_options["language"], "de");
    assert_eq!(completed.completed_at, at(0));
    let failure_event = event(failed);
    assert_eq!(failure_event.kind, EventKind::Failed);
    assert_eq!(
        failure_event.payload,
        json!({"error_message": "corrupt file", "retry_count": 0, "job_id": failed.to_string(), "reason": "failed"})
    );
    let timeout_event = event(timed_out);
    assert_eq!(timeout_event.kind, EventKind::TimedOut);
    assert_eq!(timeout_event.payload["reason"], "timed_out");
    assert!(claimed.iter().all(|c| c.attempt == 1));
}

pub async fn attempts_are_fenced_by_their_claim_and_retried_until_dead(s: TestStore) {
    let store = &*s.store;
    finish(store, json!({}), success(), at(0)).await;
    store
        .fan_out_handoffs(callback_and_webhooks(at(0)))
        .await
        .unwrap();
    let first = claim(store, 10, at(1)).await;
    assert_eq!(first.len(), 1);
    assert!(
        claim(store, 10, at(2)).await.is_empty(),
        "a claimed delivery is not claimed again while its claim holds"
    );
    let retry = AttemptResult::RetryAt {
        at: at(30),
        error: "HTTP 500".into(),
    };
    assert_eq!(
        record(store, &first[0], retry.clone(), at(3)).await,
        RecordOutcome::Recorded
    );
    assert_eq!(
        record(store, &first[0], AttemptResult::Delivered, at(4)).await,
        RecordOutcome::ClaimLost,
        "an outcome is recorded once per claim"
    );
    assert!(
        claim(store, 10, at(29)).await.is_empty(),
        "not due before its retry time"
    );
    let second = claim(store, 10, at(30)).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempt, 2);
    // The second attempt's process vanishes: its claim expires and a third attempt starts.
    let third = claim(store, 10, at(30 + 60)).await;
    assert_eq!(third.len(), 1, "an expired claim is due again");
    assert_eq!(third[0].attempt, 3);
    assert_eq!(
        record(store, &second[0], AttemptResult::Delivered, at(91)).await,
        RecordOutcome::ClaimLost,
        "the lost attempt cannot record anything"
    );
    assert_eq!(
        record(
            store,
            &third[0],
            AttemptResult::Dead {
                error: "HTTP 410".into()
            },
            at(92)
        )
        .await,
        RecordOutcome::Recorded
    );
    let detail = store
        .get_delivery(third[0].delivery_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.delivery.state, DeliveryState::Dead);
    assert_eq!(detail.delivery.attempts, 3);
    assert_eq!(detail.delivery.last_error.as_deref(), Some("HTTP 410"));
    let log: Vec<(u32, AttemptOutcomeKind, Option<u16>)> = detail
        .attempts
        .iter()
        .map(|a| (a.attempt, a.outcome, a.http_status))
        .collect();
    assert_eq!(
        log,
        vec![
            (1, AttemptOutcomeKind::Failed, Some(500)),
            (3, AttemptOutcomeKind::Dead, Some(500)),
        ]
    );
    assert!(
        claim(store, 10, at(1_000)).await.is_empty(),
        "dead is not claimed"
    );
    assert_eq!(store.next_delivery_due().await.unwrap(), None);
    assert!(store.get_delivery(999_999).await.unwrap().is_none());
}

/// The dispatcher records the attempts that ended together in one call: each is fenced by
/// its own claim, so one stale claim in the chunk changes nothing while the rest are
/// recorded, and two deliveries of one hand-off delivered together mark it delivered.
pub async fn a_chunk_of_attempts_is_recorded_item_by_item_with_its_claims(s: TestStore) {
    let store = &*s.store;
    assert!(store
        .record_delivery_attempts(Vec::new())
        .await
        .unwrap()
        .is_empty());
    let two_sinks = finish_hooked(store, at(0)).await;
    let retried = finish(store, json!({}), success(), at(0)).await;
    let dead = finish(store, json!({}), failure(), at(0)).await;
    let stale = finish(store, json!({}), success(), at(0)).await;
    store
        .fan_out_handoffs(callback_and_webhooks(at(0)))
        .await
        .unwrap();
    let claimed = claim(store, 10, at(1)).await;
    assert_eq!(claimed.len(), 5);
    let of_job = |job: JobId| -> Vec<&ClaimedDelivery> {
        claimed
            .iter()
            .filter(|c| c.event.as_ref().unwrap().job_id == job)
            .collect()
    };
    // The stale delivery's first attempt is recorded alone, and it is claimed again: the
    // first claim is now stale.
    let stale_first = of_job(stale)[0];
    let retry_soon = AttemptResult::RetryAt {
        at: at(2),
        error: "HTTP 503".into(),
    };
    assert_eq!(
        record(store, stale_first, retry_soon, at(1)).await,
        RecordOutcome::Recorded
    );
    let stale_again = claim(store, 10, at(2)).await;
    assert_eq!(stale_again.len(), 1);
    assert_eq!(stale_again[0].delivery_id, stale_first.delivery_id);
    let item = |claimed: &ClaimedDelivery, result: AttemptResult| RecordAttemptParams {
        delivery_id: claimed.delivery_id,
        claim_token: claimed.claim_token.clone(),
        result,
        http_status: Some(202),
        now: at(3),
    };
    let mut chunk: Vec<RecordAttemptParams> = of_job(two_sinks)
        .into_iter()
        .map(|c| item(c, AttemptResult::Delivered))
        .collect();
    chunk.push(item(
        of_job(retried)[0],
        AttemptResult::RetryAt {
            at: at(100),
            error: "HTTP 500".into(),
        },
    ));
    chunk.push(item(
        of_job(dead)[0],
        AttemptResult::Dead {
            error: "HTTP 410".into(),
        },
    ));
    chunk.push(item(stale_first, AttemptResult::Delivered));
    let outcomes = store.record_delivery_attempts(chunk.clone()).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Recorded,
            RecordOutcome::Recorded,
            RecordOutcome::Recorded,
            RecordOutcome::Recorded,
            RecordOutcome::ClaimLost,
        ],
        "every item but the stale claim is recorded"
    );
    let detail = |id: i64| async move { store.get_delivery(id).await.unwrap().unwrap() };
    for c in of_job(two_sinks) {
        let d = detail(c.delivery_id).await;
        assert_eq!(d.delivery.state, DeliveryState::Delivered);
        assert_eq!(d.delivery.delivered_at, Some(at(3)));
        assert_eq!(d.attempts.len(), 1);
        assert_eq!(d.attempts[0].outcome, AttemptOutcomeKind::Delivered);
        assert_eq!(d.attempts[0].http_status, Some(202));
    }
    let undelivered: Vec<JobId> = store
        .pending_handoffs(10)
        .await
        .unwrap()
        .iter()
        .map(|h| h.job_id)
        .collect();
    assert!(
        !undelivered.contains(&two_sinks),
        "a hand-off whose deliveries were recorded together is delivered"
    );
    assert_eq!(undelivered.len(), 3);
    let d = detail(of_job(retried)[0].delivery_id).await;
    assert_eq!(
        (
            d.delivery.state,
            d.delivery.next_attempt_at,
            d.delivery.last_error.as_deref()
        ),
        (DeliveryState::Pending, at(100), Some("HTTP 500"))
    );
    assert_eq!(
        (
            d.attempts.len(),
            d.attempts[0].outcome,
            d.attempts[0].attempt
        ),
        (1, AttemptOutcomeKind::Failed, 1)
    );
    let d = detail(of_job(dead)[0].delivery_id).await;
    assert_eq!(d.delivery.state, DeliveryState::Dead);
    assert_eq!(d.attempts[0].outcome, AttemptOutcomeKind::Dead);
    let d = detail(stale_first.delivery_id).await;
    assert_eq!(
        (d.delivery.state, d.delivery.attempts, d.attempts.len()),
        (DeliveryState::Pending, 2, 1),
        "the stale claim's outcome left no trace"
    );
    assert_eq!(d.attempts[0].outcome, AttemptOutcomeKind::Failed);
    // Recording the same chunk again changes nothing: an outcome is recorded once per claim.
    assert_eq!(
        store.record_delivery_attempts(chunk).await.unwrap(),
        vec![RecordOutcome::ClaimLost; 5]
    );
    // The current claim still records.
    assert_eq!(
        store
            .record_delivery_attempts(vec![item(&stale_again[0], AttemptResult::Delivered)])
            .await
            .unwrap(),
        vec![RecordOutcome::Recorded]
    );
    assert_eq!(
        detail(stale_first.delivery_id).await.delivery.state,
        DeliveryState::Delivered
    );
    let pending = store
        .list_deliveries(DeliveryListParams {
            state: Some(DeliveryState::Pending),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .deliveries;
    assert_eq!(
        pending.iter().map(|d| d.job_id).collect::<Vec<_>>(),
        vec![retried]
    );
}

pub async fn redrive_makes_a_dead_delivery_pending_with_a_fresh_budget(s: TestStore) {
    let store = &*s.store;
    finish(store, json!({}), success(), at(0)).await;
    store
        .fan_out_handoffs(callback_and_webhooks(at(0)))
        .await
        .unwrap();
    let claimed = claim(store, 10, at(1)).await;
    let id = claimed[0].delivery_id;
    let redrive = |now| {
        store.redrive_delivery(RedriveParams {
            delivery_id: id,
            now,
        })
    };
    assert_eq!(
        redrive(at(2)).await.unwrap(),
        RedriveOutcome::NotDead(DeliveryState::Pending)
    );
    record(
        store,
        &claimed[0],
        AttemptResult::Dead {
            error: "gone".into(),
        },
        at(3),
    )
    .await;
    let RedriveOutcome::Redriven(delivery) = redrive(at(4)).await.unwrap() else {
        panic!("a dead delivery is redriven");
    };
    assert_eq!(
        (delivery.state, delivery.attempts, delivery.next_attempt_at),
        (DeliveryState::Pending, 0, at(4))
    );
    let again = claim(store, 10, at(4)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 1);
    assert_eq!(
        record(store, &claimed[0], AttemptResult::Delivered, at(5)).await,
        RecordOutcome::ClaimLost,
        "the claim from before the redrive is void"
    );
    assert_eq!(
        record(store, &again[0], AttemptResult::Delivered, at(5)).await,
        RecordOutcome::Recorded
    );
    assert_eq!(
        redrive(at(6)).await.unwrap(),
        RedriveOutcome::NotDead(DeliveryState::Delivered)
    );
    assert_eq!(
        store
            .redrive_delivery(RedriveParams {
                delivery_id: 999_999,
                now: at(6)
            })
            .await
            .unwrap_err(),
        StoreError::NotFound
    );
    assert!(
        store.pending_handoffs(10).await.unwrap().is_empty(),
        "a hand-off whose every delivery arrived is delivered"
    );
}

pub async fn concurrent_claims_never_share_a_delivery(s: TestStore) {
    let store = s.store.clone();
    for i in 0..20 {
        finish(&*store, json!({}), success(), at(i)).await;
    }
    store
        .fan_out_handoffs(callback_and_webhooks(at(100)))
        .await
        .unwrap();
    let claimers: Vec<_> = (0..8)
        .map(|_| {
            let store: Arc<dyn Store> = store.clone();
            tokio::spawn(async move { claim(&*store, 3, at(101)).await })
        })
        .collect();
    let mut seen = HashSet::new();
    for claimer in claimers {
        for claimed in claimer.await.unwrap() {
            assert!(seen.insert(claimed.delivery_id), "claimed twice");
        }
    }
    assert_eq!(seen.len(), 20);
}

pub async fn deliveries_list_by_state_sink_and_job_newest_first(s: TestStore) {
    let store = &*s.store;
    let hooked = finish(
        store,
        json!({"webhook_url": "https://example.com/h"}),
        success(),
        at(0),
    )
    .await;
    for i in 1..4 {
        finish(store, json!({}), success(), at(i)).await;
    }
    store
        .fan_out_handoffs(callback_and_webhooks(at(10)))
        .await
        .unwrap();
    let claimed = claim(store, 1, at(11)).await;
    record(
        store,
        &claimed[0],
        AttemptResult::Dead {
            error: "gone".into(),
        },
        at(12),
    )
    .await;
    let list = |params: DeliveryListParams| store.list_deliveries(params);
    let first = list(DeliveryListParams {
        limit: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(first.deliveries.len(), 2);
    assert!(
        first.deliveries[0].id > first.deliveries[1].id,
        "newest first"
    );
    let second = list(DeliveryListParams {
        limit: 2,
        cursor: first.next_cursor,
        ..Default::default()
    })
    .await
    .unwrap();
    let third = list(DeliveryListParams {
        limit: 2,
        cursor: second.next_cursor,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        first.deliveries.len() + second.deliveries.len() + third.deliveries.len(),
        5
    );
    assert_eq!(third.next_cursor, None);
    let webhooks = list(DeliveryListParams {
        sink: Some(SinkKind::Webhook),
        limit: 10,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(webhooks.deliveries.len(), 1);
    assert_eq!(webhooks.deliveries[0].job_id, hooked);
    let of_job = list(DeliveryListParams {
        job_id: Some(hooked),
        limit: 10,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(of_job.deliveries.len(), 2);
    let dead = list(DeliveryListParams {
        state: Some(DeliveryState::Dead),
        limit: 10,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(dead.deliveries.len(), 1);
    assert_eq!(dead.deliveries[0].id, claimed[0].delivery_id);

    let stats = store.delivery_statistics().await.unwrap();
    let callback = &stats.per_sink["ingestion_callback"];
    let webhook = &stats.per_sink["webhook"];
    assert_eq!(callback.pending + webhook.pending, 4);
    assert_eq!(callback.dead + webhook.dead, 1);
    assert_eq!(stats.oldest_pending_created_at, Some(at(10)));
}

pub async fn cleanup_keeps_jobs_whose_deliveries_are_not_settled(s: TestStore) {
    let store = &*s.store;
    let day = 86_400;
    let pending = finish(store, json!({}), success(), at(0)).await;
    let dead = finish(store, json!({}), success(), at(0)).await;
    let delivered = finish(store, json!({}), success(), at(0)).await;
    let not_fanned_out = finish(store, json!({}), success(), at(0)).await;
    let clean = |now| {
        store.cleanup_finished(CleanupParams {
            retention: RetentionPolicy::from_days(7, None),
            limit: 100,
            now,
        })
    };
    // Not fanned out yet: kept.
    assert_eq!(clean(at(30 * day)).await.unwrap().n_deleted, 0);
    store
        .fan_out_handoffs(callback_and_webhooks(at(1)))
        .await
        .unwrap();
    let _ = not_fanned_out;
    for claimed in claim(store, 10, at(2)).await {
        let job = claimed.event.as_ref().unwrap().job_id;
        let result = if job == pending {
            AttemptResult::RetryAt {
                at: at(100 * day),
                error: "down".into(),
            }
        } else if job == dead {
            AttemptResult::Dead {
                error: "gone".into(),
            }
        } else {
            AttemptResult::Delivered
        };
        record(store, &claimed, result, at(3)).await;
    }
    assert_eq!(
        clean(at(30 * day)).await.unwrap().n_deleted,
        2,
        "the delivered ones go"
    );
    assert!(store.get_job(delivered).await.unwrap().is_none());
    assert!(store.get_job(pending).await.unwrap().is_some());
    assert!(store.get_job(dead).await.unwrap().is_some());
    assert!(
        all_deliveries(store)
            .await
            .iter()
            .all(|d| d.job_id != delivered),
        "a deleted job's deliveries go with it"
    );
    // An admin cancels the job with the dead delivery: it may go. Whatever the cancel
    // hands off is delivered first.
    store
        .cancel_job(CancelParams {
            job_id: dead,
            reason: "give up".into(),
            now: at(31 * day),
        })
        .await
        .unwrap();
    store
        .fan_out_handoffs(callback_and_webhooks(at(31 * day)))
        .await
        .unwrap();
    for claimed in claim(store, 10, at(31 * day)).await {
        record(store, &claimed, AttemptResult::Delivered, at(31 * day)).await;
    }
    assert_eq!(clean(at(60 * day)).await.unwrap().n_deleted, 1);
    assert!(store.get_job(dead).await.unwrap().is_none());
    assert!(
        store.get_job(pending).await.unwrap().is_some(),
        "a pending delivery keeps its job"
    );
}

/// PostgreSQL only (SQLite has one process): a hand-off committed through one replica
/// wakes the other replicas' dispatchers, through the NOTIFY sent after the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hand_offs_wake_the_dispatchers_of_other_replicas() {
    use morag_jobs::store::postgres::{PostgresOptions, PostgresStore};
    let database = crate::support::PgDatabase::create().await;
    let open = || PostgresStore::open(PostgresOptions::new(database.url.clone()));
    let first = open().await.expect("first replica");
    let second = open().await.expect("second replica");
    let mut woken = second.handoff_events();
    // The listener bumps once when it starts listening; wait for that (or its having
    // happened already), then only a notification can bump it.
    let _ = tokio::time::timeout(Duration::from_secs(2), woken.changed()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    woken.mark_unchanged();
    // A create and a claim hand nothing off; the result does.
    finish_after(&first, json!({}), success(), at(1), || async {
        assert!(
            tokio::time::timeout(Duration::from_millis(500), woken.changed())
                .await
                .is_err(),
            "a create and a claim hand nothing off"
        );
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), woken.changed())
        .await
        .expect("the other replica's dispatcher is woken")
        .unwrap();
    first.close().await.unwrap();
    second.close().await.unwrap();
}

/// One write fans out and claims: due deliveries first, then new ones created claimed while
/// the limit has room; the rest of the new ones wait pending, due now.
pub async fn fan_out_and_claim_takes_due_ones_first_and_creates_new_ones_claimed(s: TestStore) {
    let store = &*s.store;
    // An older delivery, failed once and due again at 10 s.
    let older = finish(store, json!({}), failure(), at(0)).await;
    store
        .fan_out_handoffs(callback_and_webhooks(at(0)))
        .await
        .unwrap();
    let first = claim(store, 10, at(1)).await;
    assert_eq!(first.len(), 1);
    let retry = AttemptResult::RetryAt {
        at: at(10),
        error: "503".into(),
    };
    assert_eq!(
        record(store, &first[0], retry, at(1)).await,
        RecordOutcome::Recorded
    );
    // Two new hand-offs: three deliveries (one job names a webhook).
    let hooked = finish_hooked(store, at(11)).await;
    let plain = finish(store, json!({}), success(), at(11)).await;
    let claim_for = Duration::from_secs(60);
    let taken = fan_out_and_claim(store, 3, at(12)).await;
    assert_eq!(
        taken.fanned_out,
        FanOutReport {
            n_handoffs: 2,
            n_deliveries: 3
        }
    );
    let jobs: Vec<(JobId, u32)> = taken
        .claimed
        .iter()
        .map(|c| (c.event.as_ref().unwrap().job_id, c.attempt))
        .collect();
    assert_eq!(jobs.len(), 3, "the limit");
    assert_eq!(
        jobs[0],
        (older, 2),
        "the due delivery first, on its second attempt"
    );
    assert!(jobs[1..].iter().all(|(_, attempt)| *attempt == 1));
    assert_eq!(
        jobs[1].0, hooked,
        "then the new ones, oldest hand-off first"
    );
    assert_eq!(jobs[2].0, hooked);
    // The hand-off's two deliveries share one event, read once.
    assert!(Arc::ptr_eq(
        taken.claimed[1].event.as_ref().unwrap(),
        taken.claimed[2].event.as_ref().unwrap()
    ));
    assert_eq!(
        taken.claimed[1].event.as_ref().unwrap().payload["content"],
        "converted text"
    );
    // One new delivery did not fit: pending, unclaimed, due now; the claimed ones are not
    // claimable again until their claim expires.
    let rest = claim(store, 10, at(13)).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(
        (rest[0].event.as_ref().unwrap().job_id, rest[0].attempt),
        (plain, 1)
    );
    assert!(claim(store, 10, at(14)).await.is_empty());
    // A delivery created claimed is recorded with its claim like any other.
    for claimed in &taken.claimed[1..] {
        assert_eq!(
            record(store, claimed, AttemptResult::Delivered, at(15)).await,
            RecordOutcome::Recorded
        );
    }
    let hooked_deliveries: Vec<Delivery> = all_deliveries(store)
        .await
        .into_iter()
        .filter(|d| d.job_id == hooked)
        .collect();
    assert!(hooked_deliveries
        .iter()
        .all(|d| d.state == DeliveryState::Delivered && d.attempts == 1));
    // The older delivery's claim expires (12 s + 60 s): due again, third attempt.
    let expired = claim(store, 10, at(12).plus(claim_for)).await;
    assert_eq!(
        expired
            .iter()
            .map(|c| (c.event.as_ref().unwrap().job_id, c.attempt))
            .collect::<Vec<_>>(),
        vec![(older, 3)]
    );
    // Nothing waits to be fanned out and every claim holds: nothing to do.
    let idle = fan_out_and_claim(store, 5, at(50)).await;
    assert_eq!(idle, DispatchStep::default());
    // Delivered everywhere: only the older job's and the plain job's hand-offs are pending.
    let pending: HashSet<JobId> = store
        .pending_handoffs(10)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.job_id)
        .collect();
    assert_eq!(pending, HashSet::from([older, plain]));
}

on_both_backends!(
    hand_offs_fan_out_once_per_sink_with_one_event_id,
    claimed_events_carry_the_outcome_as_it_was_handed_off,
    attempts_are_fenced_by_their_claim_and_retried_until_dead,
    a_chunk_of_attempts_is_recorded_item_by_item_with_its_claims,
    redrive_makes_a_dead_delivery_pending_with_a_fresh_budget,
    concurrent_claims_never_share_a_delivery,
    deliveries_list_by_state_sink_and_job_newest_first,
    cleanup_keeps_jobs_whose_deliveries_are_not_settled,
    fan_out_and_claim_takes_due_ones_first_and_creates_new_ones_claimed,
);
