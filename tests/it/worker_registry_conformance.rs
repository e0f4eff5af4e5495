//! The worker registry half of the `Store` trait, written once and run against both
//! backends: batches merge into one record per worker process by the rule of
//! `WorkerActivity::merge` (which replicas flushing at once rely on), and the cleaner's
//! deletion takes only workers gone past the cutoff.

use std::sync::Arc;
use std::time::Duration;

use morag_jobs::clock::Timestamp;
use morag_jobs::domain::{ContentType, WorkerId};
use morag_jobs::store::workers::*;
use morag_jobs::store::Store;

use crate::store_conformance::{open_postgres, open_sqlite, TestStore};

const T0: i64 = 1_800_000_000_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_micros(T0 + secs * 1_000_000)
}

fn activity(worker: &str, instance: &str, first: i64, last: i64) -> WorkerActivity {
    let mut activity =
        WorkerActivity::new(WorkerId::parse(worker).unwrap(), instance.into(), at(first));
    activity.last_seen_at = at(last);
    activity
}

fn polled(
    mut activity: WorkerActivity,
    at_secs: i64,
    types: &[&str],
    wait_secs: u64,
) -> WorkerActivity {
    activity.last_poll = Some(PollSeen {
        at: at(at_secs),
        content_types: types
            .iter()
            .map(|t| ContentType::parse(t).unwrap())
            .collect(),
        wait: Duration::from_secs(wait_secs),
    });
    activity
}

async fn record(store: &dyn Store, activities: Vec<WorkerActivity>) {
    store
        .record_worker_activity(RecordWorkerActivityParams { activities })
        .await
        .expect("the batch is written");
}

async fn listed(store: &dyn Store) -> Vec<WorkerRecord> {
    store
        .list_workers(ListWorkersParams { limit: 100 })
        .await
        .unwrap()
}

fn find<'a>(records: &'a [WorkerRecord], worker: &str, instance: &str) -> &'a WorkerRecord {
    records
        .iter()
        .find(|r| r.worker_id == worker && r.instance == instance)
        .unwrap_or_else(|| panic!("no record of {worker}/{instance} in {records:#?}"))
}

async fn batches_merge_into_one_record_per_worker_process(test: TestStore) {
    let store = test.store.as_ref();
    let mut gpu = polled(
        activity("gpu", "first-life", 10, 20),
        20,
        &["audio", "video"],
        30,
    );
    gpu.version = Some((at(10), "0.1.0".into()));
    gpu.address = Some((at(20), "10.0.0.7".into()));
    gpu.sent_heartbeat = true;
    gpu.jobs_in_flight_delta = 2;
    gpu.n_completed = 5;
    gpu.n_failed = 1;
    // MoRAG's client: no instance, polls without waiting, never heartbeats.
    let mut morag = polled(activity("gpu-box", "", 15, 15), 15, &["audio"], 0);
    morag.jobs_in_flight_delta = 1;
    let restarted = polled(activity("gpu", "second-life", 30, 30), 30, &[], 30);
    record(store, vec![gpu, morag, restarted]).await;

    let records = listed(store).await;
    assert_eq!(records.len(), 3, "{records:#?}");
    assert_eq!(
        records.iter().map(|r| r.last_seen_at).collect::<Vec<_>>(),
        vec![at(30), at(20), at(15)],
        "most recently seen first"
    );
    let first = find(&records, "gpu", "first-life");
    assert_eq!(
        first,
        &WorkerRecord {
            worker_id: "gpu".into(),
            instance: "first-life".into(),
            content_types: Some(vec!["audio".into(), "video".into()]),
            poll_wait: Duration::from_secs(30),
            version: Some("0.1.0".into()),
            address: Some("10.0.0.7".into()),
            first_seen_at: at(10),
            last_seen_at: at(20),
            sends_heartbeats: true,
            jobs_in_flight: 2,
            n_completed: 5,
            n_failed: 1,
        }
    );
    let morag = find(&records, "gpu-box", "");
    assert_eq!(morag.content_types, Some(vec!["audio".into()]));
    assert_eq!((morag.sends_heartbeats, morag.jobs_in_flight), (false, 1));
    assert_eq!(morag.poll_wait, Duration::ZERO);
    let second = find(&records, "gpu", "second-life");
    assert_eq!(second.content_types, Some(vec![]), "any type");

    // Another replica flushes what it saw of the first life, partly earlier and partly
    // later: the extremes win, counts add, descriptions come from the latest contact.
    let mut other_replica = activity("gpu", "first-life", 5, 18);
    other_replica.version = Some((at(18), "0.2.0".into()));
    other_replica.jobs_in_flight_delta = -3;
    other_replica.n_completed = 2;
    let older_poll = polled(activity("gpu", "first-life", 12, 12), 12, &["image"], 5);
    record(store, vec![other_replica]).await;
    record(store, vec![older_poll]).await;
    // A heartbeat-only batch (no poll) keeps the poll's fields.
    let mut beat = activity("gpu", "first-life", 25, 25);
    beat.sent_heartbeat = true;
    record(store, vec![beat]).await;

    let records = listed(store).await;
    let first = find(&records, "gpu", "first-life");
    assert_eq!((first.first_seen_at, first.last_seen_at), (at(5), at(25)));
    assert_eq!(first.version.as_deref(), Some("0.2.0"));
    assert_eq!(first.address.as_deref(), Some("10.0.0.7"));
    assert_eq!(
        (first.content_types.clone(), first.poll_wait),
        (
            Some(vec!["audio".to_owned(), "video".to_owned()]),
            Duration::from_secs(30)
        ),
        "an older poll does not replace a newer one's description"
    );
    assert_eq!(
        (first.jobs_in_flight, first.n_completed, first.n_failed),
        (-1, 7, 1)
    );
    assert_eq!(records.len(), 3);
}

async fn concurrent_flushes_for_one_worker_all_count(test: TestStore) {
    let store: Arc<dyn Store> = test.store.clone();
    let mut flushes = tokio::task::JoinSet::new();
    for n in 0..16i64 {
        let store = store.clone();
        flushes.spawn(async move {
            let mut seen = polled(
                activity("busy", "only", n, 100 + n),
                100 + n,
                &["audio"],
                10,
            );
            seen.n_completed = 1;
            seen.jobs_in_flight_delta = 1;
            // Each batch also touches a worker of its own, in varying order.
            let own = activity(&format!("w{n}"), "x", n, n);
            let batch = if n % 2 == 0 {
                vec![seen, own]
            } else {
                vec![own, seen]
            };
            store
                .record_worker_activity(RecordWorkerActivityParams { activities: batch })
                .await
        });
    }
    while let Some(done) = flushes.join_next().await {
        done.unwrap().expect("no flush is lost or deadlocked");
    }
    let records = listed(store.as_ref()).await;
    assert_eq!(records.len(), 17);
    let busy = find(&records, "busy", "only");
    assert_eq!((busy.n_completed, busy.jobs_in_flight), (16, 16));
    assert_eq!((busy.first_seen_at, busy.last_seen_at), (at(0), at(115)));
}

async fn gone_workers_are_deleted_past_the_cutoff_only(test: TestStore) {
    let store = test.store.as_ref();
    record(
        store,
        vec![
            activity("gone-long-ago", "a", 0, 10),
            activity("gone-recently", "b", 0, 50),
            activity("alive", "c", 0, 100),
        ],
    )
    .await;
    let deleted = store
        .delete_gone_workers(DeleteGoneWorkersParams {
            last_seen_before: at(50),
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let left: Vec<String> = listed(store)
        .await
        .into_iter()
        .map(|r| r.worker_id)
        .collect();
    assert_eq!(left, vec!["alive", "gone-recently"]);
    // Batches are bounded.
    record(
        store,
        (0..5)
            .map(|n| activity(&format!("old-{n}"), "", 0, 1))
            .collect(),
    )
    .await;
    let params = DeleteGoneWorkersParams {
        last_seen_before: at(2),
        limit: 3,
    };
    assert_eq!(store.delete_gone_workers(params.clone()).await.unwrap(), 3);
    assert_eq!(store.delete_gone_workers(params.clone()).await.unwrap(), 2);
    assert_eq!(store.delete_gone_workers(params).await.unwrap(), 0);
    assert_eq!(listed(store).await.len(), 2);
}

on_both_backends!(
    batches_merge_into_one_record_per_worker_process,
    concurrent_flushes_for_one_worker_all_count,
    gone_workers_are_deleted_past_the_cutoff_only,
);
