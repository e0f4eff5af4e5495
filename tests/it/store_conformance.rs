//! The storage conformance suite: every lifecycle behaviour, written once against the
//! `Store` trait and run against each backend (`conformance!` at the bottom). A backend
//! is admitted by adding an arm that opens a fresh, empty store and returns a guard that
//! cleans it up.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use morag_jobs::clock::Timestamp;
use morag_jobs::domain::{
    ContentType, HandoffKind, JobId, JobStatus, LeaseId, LifecyclePolicy, RetentionPolicy,
    RetryPolicy, TimeoutPolicy, WorkerId,
};
use morag_jobs::store::postgres::{PostgresOptions, PostgresStore};
use morag_jobs::store::sqlite::{Durability, SqliteOptions, SqliteStore};
use morag_jobs::store::*;
use serde_json::json;

/// A store under test and whatever keeps its database alive until the test ends.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub _guard: Box<dyn std::any::Any + Send>,
}

pub async fn open_sqlite() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(SqliteOptions {
        path: dir.path().join("jobs.sqlite3"),
        durability: Durability::Normal,
    })
    .expect("sqlite opens");
    TestStore {
        store: Arc::new(store),
        _guard: Box::new(dir),
    }
}

pub async fn open_postgres() -> TestStore {
    let database = crate::support::PgDatabase::create().await;
    let store = PostgresStore::open(PostgresOptions::new(database.url.clone()))
        .await
        .expect("postgres store opens");
    TestStore {
        store: Arc::new(store),
        _guard: Box::new(database),
    }
}

const T0: i64 = 1_800_000_000_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_micros(T0 + secs * 1_000_000)
}

fn ct(name: &str) -> ContentType {
    ContentType::parse(name).unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::parse(name).unwrap()
}

fn policy() -> LifecyclePolicy {
    LifecyclePolicy {
        timeouts: TimeoutPolicy {
            heartbeat: Duration::from_secs(30),
            ..TimeoutPolicy::default()
        },
        retry: RetryPolicy {
            max_retries: 2,
            jitter_fraction: 0.0,
            ..RetryPolicy::default()
        },
        retention: RetentionPolicy::from_days(7, None),
    }
}

pub(crate) async fn create(store: &dyn Store, content_type: &str, now: Timestamp) -> JobId {
    create_with(store, content_type, now, None, "/data/files/source.bin").await
}

pub(crate) async fn create_with(
    store: &dyn Store,
    content_type: &str,
    now: Timestamp,
    pending: Option<Timestamp>,
    path: &str,
) -> JobId {
    let id = JobId::new_random();
    let job = store
        .create_job(CreateJobParams {
            id,
            content_type: ct(content_type),
            source_file_path: path.into(),
            task_options: json!({"language": "de"}),
            ingestion_task_id: "ingest-7".into(),
            pending_deadline: pending,
            now,
        })
        .await
        .expect("create");
    assert_eq!(job.id, id);
    id
}

async fn claim(store: &dyn Store, types: &[&str], now: Timestamp) -> Option<(JobId, LeaseId)> {
    store
        .claim_job(ClaimParams {
            worker_id: worker("w1"),
            content_types: types.iter().map(|t| ct(t)).collect(),
            timeouts: policy().timeouts,
            now,
        })
        .await
        .expect("claim")
        .map(|job| {
            assert_eq!(job.status, JobStatus::Processing);
            (job.id, job.lease_id.expect("a claimed job has a lease"))
        })
}

async fn submit(
    store: &dyn Store,
    id: JobId,
    lease: Option<LeaseId>,
    outcome: AttemptOutcome,
    now: Timestamp,
) -> Result<morag_jobs::domain::Job, StoreError> {
    store
        .submit_result(SubmitResultParams {
            job_id: id,
            lease_id: lease,
            outcome,
            policy: policy(),
            jitter: 0.0,
            now,
        })
        .await
}

fn success() -> AttemptOutcome {
    AttemptOutcome::Success {
        content: "text".into(),
        metadata: json!({"k": 1}),
        processing_time: Some(2.0),
    }
}

fn failure(retryable: bool) -> AttemptOutcome {
    AttemptOutcome::Failure {
        error_message: "boom".into(),
        retryable,
    }
}

async fn rescue(store: &dyn Store, now: Timestamp) -> RescueReport {
    store
        .rescue_expired(RescueParams {
            policy: policy(),
            limit: 100,
            jitter_seed: 1,
            now,
        })
        .await
        .expect("rescue")
}

async fn status(store: &dyn Store, id: JobId) -> JobStatus {
    store.get_job(id).await.unwrap().expect("job exists").status
}

async fn transitions(store: &dyn Store, id: JobId) -> Vec<(Option<JobStatus>, JobStatus)> {
    store
        .get_job_detail(id)
        .await
        .unwrap()
        .unwrap()
        .history
        .iter()
        .map(|h| (h.from, h.to))
        .collect()
}

use JobStatus::*;

pub async fn create_then_read_back(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "audio", at(0)).await;
    let job = store.get_job(id).await.unwrap().unwrap();
    assert_eq!((job.status, job.attempt, job.retry_count), (Pending, 0, 0));
    assert_eq!(job.content_type, ct("audio"));
    assert_eq!(job.task_options, json!({"language": "de"}));
    assert_eq!(job.ingestion_task_id, "ingest-7");
    assert_eq!(job.created_at, at(0));
    assert!(job.worker_id.is_none() && job.lease_id.is_none() && job.started_at.is_none());
    assert_eq!(transitions(store, id).await, vec![(None, Pending)]);
    assert!(store.get_job(JobId::new_random()).await.unwrap().is_none());
    assert!(store
        .get_job_detail(JobId::new_random())
        .await
        .unwrap()
        .is_none());
}

pub async fn claims_take_the_oldest_due_job_of_the_requested_types(s: TestStore) {
    let store = &*s.store;
    let video = create(store, "video", at(0)).await;
    let audio1 = create(store, "audio", at(1)).await;
    let audio2 = create(store, "audio", at(2)).await;
    assert_eq!(claim(store, &["image"], at(10)).await, None);
    assert_eq!(claim(store, &["audio"], at(10)).await.unwrap().0, audio1);
    assert_eq!(
        claim(store, &["audio", "video"], at(10)).await.unwrap().0,
        video
    );
    assert_eq!(
        claim(store, &[], at(10)).await.unwrap().0,
        audio2,
        "no types means any type"
    );
    assert_eq!(claim(store, &[], at(10)).await, None);
    let job = store.get_job(audio1).await.unwrap().unwrap();
    assert_eq!((job.attempt, job.started_at), (1, Some(at(10))));
    assert_eq!(job.worker_id, Some(worker("w1")));
    assert_eq!(
        job.execution_deadline,
        Some(at(10 + 1800)),
        "audio's execution timeout"
    );
    assert_eq!(
        job.heartbeat_deadline, None,
        "no heartbeat deadline before the first heartbeat"
    );
    assert_eq!(
        transitions(store, audio1).await,
        vec![(None, Pending), (Some(Pending), Processing)]
    );
}

pub async fn a_job_is_claimed_once_however_many_claim_at_once(s: TestStore) {
    let store = s.store.clone();
    let mut ids = HashSet::new();
    for i in 0..50 {
        ids.insert(create(&*store, "document", at(i)).await);
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = store
                .claim_job(ClaimParams {
                    worker_id: worker(&format!("w{w}")),
                    content_types: vec![ct("document")],
                    timeouts: policy().timeouts,
                    now: at(100),
                })
                .await
                .unwrap()
            {
                got.push(job.id);
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    assert_eq!(claimed.len(), 50, "every job claimed");
    assert_eq!(
        claimed.iter().collect::<HashSet<_>>().len(),
        50,
        "none claimed twice"
    );
    assert_eq!(claimed.into_iter().collect::<HashSet<_>>(), ids);
}

/// Many requests of every hot kind at once (on PostgreSQL they run in shared batches):
/// each gets its own answer, mixed claim filters never mix up jobs, a duplicate result
/// is refused, and the statistics still match the jobs.
pub async fn concurrent_creates_claims_and_results_each_get_their_own_answer(s: TestStore) {
    let store = s.store.clone();
    let creates = (0..40).map(|i| {
        let store = store.clone();
        let kind = if i % 4 == 0 { "video" } else { "audio" };
        tokio::spawn(async move { (create(&*store, kind, at(i)).await, kind) })
    });
    let mut kinds = std::collections::HashMap::new();
    for created in creates.collect::<Vec<_>>() {
        let (id, kind) = created.await.unwrap();
        kinds.insert(id, kind);
    }
    assert_eq!(kinds.len(), 40, "40 distinct jobs");

    // 50 claimers at once: 30 want audio (30 exist), 10 video (10 exist), 10 anything
    // (nothing is left for them once the others are served, or they take some first).
    let claims = (0..50).map(|w| {
        let store = store.clone();
        let types: Vec<ContentType> = match w % 5 {
            0 => vec![ct("video")],
            1 => vec![],
            _ => vec![ct("audio")],
        };
        tokio::spawn(async move {
            let job = store
                .claim_job(ClaimParams {
                    worker_id: worker(&format!("w{w}")),
                    content_types: types.clone(),
                    timeouts: policy().timeouts,
                    now: at(100),
                })
                .await
                .unwrap();
            (w, types, job)
        })
    });
    let mut claimed = Vec::new();
    for claim in claims.collect::<Vec<_>>() {
        let (w, types, job) = claim.await.unwrap();
        let Some(job) = job else { continue };
        assert_eq!(job.status, Processing);
        assert_eq!(
            job.worker_id,
            Some(worker(&format!("w{w}"))),
            "the claimer's own job"
        );
        if let Some(wanted) = types.first() {
            assert_eq!(&job.content_type, wanted, "a job of the type asked for");
        }
        claimed.push((job.id, job.lease_id.unwrap()));
    }
    let distinct: HashSet<JobId> = claimed.iter().map(|(id, _)| *id).collect();
    assert_eq!(distinct.len(), claimed.len(), "no job claimed twice");
    assert_eq!(distinct.len(), 40, "every job claimed once");

    // Results for all at once: even jobs succeed, odd ones fail (retryable), and the
    // first job's result is sent twice.
    let results = claimed.iter().enumerate().flat_map(|(i, (id, lease))| {
        let copies = if i == 0 { 2 } else { 1 };
        (0..copies).map(move |_| (i, *id, *lease))
    });
    let results = results.map(|(i, id, lease)| {
        let store = store.clone();
        let outcome = if i % 2 == 0 { success() } else { failure(true) };
        tokio::spawn(async move {
            (
                i,
                id,
                submit(&*store, id, Some(lease), outcome, at(110)).await,
            )
        })
    });
    let mut accepted = HashSet::new();
    let mut refused = 0;
    for result in results.collect::<Vec<_>>() {
        let (i, id, answer) = result.await.unwrap();
        match answer {
            Ok(job) => {
                assert_eq!(job.id, id, "the answer is about the job submitted");
                let expected = if i % 2 == 0 { Completed } else { Retrying };
                assert_eq!(job.status, expected);
                assert!(accepted.insert(id), "a result accepted twice");
            }
            Err(StoreError::InvalidTransition { current: Completed }) => refused += 1,
            Err(other) => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(accepted.len(), 40);
    assert_eq!(refused, 1, "the duplicate result is refused");
    for (id, _) in &claimed {
        let history = transitions(&*store, *id).await;
        assert_eq!(history[..2], [(None, Pending), (Some(Pending), Processing)]);
        assert_eq!(
            history.len(),
            if status(&*store, *id).await == Completed {
                3
            } else {
                4
            }
        );
    }

    let stats = store.statistics(at(120)).await.unwrap();
    assert_eq!(stats.total_jobs, 40);
    assert_eq!(stats.status_counts[&Completed], 20);
    assert_eq!(stats.status_counts[&Retrying], 20);
    assert_eq!(stats.status_counts[&Processing], 0);
    assert_eq!(stats.status_counts[&Pending], 0);
    assert_eq!(stats.content_type_counts["audio"], 30);
    assert_eq!(stats.content_type_counts["video"], 10);
}

/// A create that cannot be stored (its id is taken) fails alone: the creates sent at the
/// same moment (on PostgreSQL, in the same batch) are stored all the same.
pub async fn a_failing_create_does_not_fail_its_neighbours(s: TestStore) {
    let store = s.store.clone();
    let taken = JobId::new_random();
    let creates = (0..20).map(|i| {
        let store = store.clone();
        let id = if i % 10 == 0 {
            taken
        } else {
            JobId::new_random()
        };
        tokio::spawn(async move {
            let created = store
                .create_job(CreateJobParams {
                    id,
                    content_type: ct("audio"),
                    source_file_path: "/data/files/source.bin".into(),
                    task_options: json!({}),
                    ingestion_task_id: format!("ingest-{i}"),
                    pending_deadline: None,
                    now: at(i),
                })
                .await;
            (id, created)
        })
    });
    let mut stored = 0;
    let mut refused = 0;
    for create in creates.collect::<Vec<_>>() {
        let (id, created) = create.await.unwrap();
        match created {
            Ok(job) => {
                assert_eq!(job.id, id);
                stored += 1;
            }
            Err(_) => {
                assert_eq!(id, taken, "only a create with the taken id may fail");
                refused += 1;
            }
        }
    }
    assert_eq!(
        (stored, refused),
        (19, 1),
        "one of the two with the same id is refused"
    );
    let stats = store.statistics(at(30)).await.unwrap();
    assert_eq!(stats.total_jobs, 19);
}

pub async fn heartbeats_extend_the_attempt_and_fence_stale_leases(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "image", at(0)).await;
    let (_, lease) = claim(store, &["image"], at(0)).await.unwrap();
    let beat = |lease, now| {
        store.heartbeat(HeartbeatParams {
            job_id: id,
            lease_id: lease,
            progress: Some(40.0),
            message: Some("halfway".into()),
            timeouts: policy().timeouts,
            now,
        })
    };
    let outcome = beat(lease, at(10)).await.unwrap();
    assert_eq!(
        outcome,
        HeartbeatOutcome {
            status: Processing,
            cancelled: false,
            execution_deadline: Some(at(300)),
            heartbeat_deadline: Some(at(40))
        }
    );
    let job = store.get_job(id).await.unwrap().unwrap();
    assert_eq!(
        (
            job.progress,
            job.progress_message.as_deref(),
            job.last_heartbeat_at
        ),
        (Some(40.0), Some("halfway"), Some(at(10)))
    );
    assert_eq!(
        beat(LeaseId::new_random(), at(11)).await,
        Err(StoreError::LeaseMismatch {
            current: Processing
        })
    );
    // Past its heartbeat deadline the attempt cannot be revived by a late heartbeat.
    assert_eq!(beat(lease, at(41)).await, Err(StoreError::DeadlinePassed));
    assert_eq!(
        status(store, id).await,
        Processing,
        "until the monitor acts"
    );
    assert_eq!(
        store
            .heartbeat(HeartbeatParams {
                job_id: JobId::new_random(),
                lease_id: lease,
                progress: None,
                message: None,
                timeouts: policy().timeouts,
                now: at(12)
            })
            .await,
        Err(StoreError::NotFound)
    );
}

pub async fn a_release_makes_the_job_claimable_at_once_without_spending_a_retry(s: TestStore) {
    let store = &*s.store;
    let release = |id, lease, now| {
        store.release_job(ReleaseParams {
            job_id: id,
            lease_id: lease,
            reason: Some("worker shutting down".into()),
            now,
        })
    };
    // A pending deadline, to see that a release does not bring it back.
    let id = create_with(store, "audio", at(0), Some(at(60)), "/data/files/a.mp3").await;
    let (_, lease) = claim(store, &["audio"], at(1)).await.unwrap();
    store
        .heartbeat(HeartbeatParams {
            job_id: id,
            lease_id: lease,
            progress: Some(30.0),
            message: Some("decoding".into()),
            timeouts: policy().timeouts,
            now: at(5),
        })
        .await
        .unwrap();
    assert_eq!(
        release(id, LeaseId::new_random(), at(6)).await,
        Err(StoreError::LeaseMismatch {
            current: Processing
        })
    );
    assert_eq!(
        release(JobId::new_random(), lease, at(6)).await,
        Err(StoreError::NotFound)
    );
    let job = release(id, lease, at(7)).await.unwrap();
    assert_eq!((job.status, job.retry_count, job.attempt), (Pending, 0, 1));
    assert!(job.lease_id.is_none());
    assert_eq!(
        (job.execution_deadline, job.heartbeat_deadline, job.progress),
        (None, None, None)
    );
    assert_eq!(store.next_deadline().await.unwrap(), None);
    let detail = store.get_job_detail(id).await.unwrap().unwrap();
    let last = detail.history.last().unwrap();
    assert_eq!(
        (last.from, last.to, last.at),
        (Some(Processing), Pending, at(7))
    );
    assert_eq!(last.actor, morag_jobs::domain::Actor::Worker);
    assert!(
        last.reason.contains("released") && last.reason.contains("worker shutting down"),
        "{}",
        last.reason
    );
    let stats = store.statistics(at(7)).await.unwrap();
    assert_eq!(stats.status_counts[&Pending], 1);
    assert_eq!(stats.status_counts[&Processing], 0);
    // The old lease is spent: a second release, a heartbeat or a result with it is refused.
    assert_eq!(
        release(id, lease, at(8)).await,
        Err(StoreError::LeaseMismatch { current: Pending })
    );
    assert!(submit(store, id, Some(lease), success(), at(8))
        .await
        .is_err());
    // Claimable at once, ahead of a job created later; past the old pending deadline the
    // monitor leaves it alone.
    let later = create(store, "audio", at(7)).await;
    assert_eq!(rescue(store, at(100)).await, RescueReport::default());
    let (again, second) = claim(store, &["audio"], at(100)).await.unwrap();
    assert_eq!(again, id);
    assert_ne!(second, lease);
    let job = store.get_job(id).await.unwrap().unwrap();
    assert_eq!((job.attempt, job.retry_count), (2, 0));
    submit(store, id, Some(second), success(), at(101))
        .await
        .unwrap();
    assert_eq!(
        transitions(store, id).await,
        vec![
            (None, Pending),
            (Some(Pending), Processing),
            (Some(Processing), Pending),
            (Some(Pending), Processing),
            (Some(Processing), Completed),
        ]
    );
    // Only a processing attempt can be released.
    assert_eq!(
        release(id, second, at(102)).await,
        Err(StoreError::InvalidTransition { current: Completed })
    );
    let (_, third) = claim(store, &["audio"], at(102)).await.unwrap();
    store
        .cancel_job(CancelParams {
            job_id: later,
            reason: "no longer needed".into(),
            now: at(103),
        })
        .await
        .unwrap();
    assert_eq!(
        release(later, third, at(104)).await,
        Err(StoreError::InvalidTransition { current: Cancelled })
    );
}

pub async fn results_complete_once_and_stale_leases_change_nothing(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "web", at(0)).await;
    assert_eq!(
        submit(store, id, None, success(), at(1)).await.unwrap_err(),
        StoreError::InvalidTransition { current: Pending },
        "never claimed"
    );
    let (_, lease) = claim(store, &["web"], at(1)).await.unwrap();
    assert_eq!(
        submit(store, id, Some(LeaseId::new_random()), success(), at(2))
            .await
            .unwrap_err(),
        StoreError::LeaseMismatch {
            current: Processing
        }
    );
    assert_eq!(status(store, id).await, Processing);
    let job = submit(store, id, Some(lease), success(), at(5))
        .await
        .unwrap();
    assert_eq!((job.status, job.completed_at), (Completed, Some(at(5))));
    // Only the detail read loads a result.
    let detail = store.get_job_detail(id).await.unwrap().unwrap();
    assert_eq!(detail.job, job);
    let result = detail.result.expect("result stored");
    assert_eq!(
        (
            result.content.as_str(),
            serde_json::from_str::<serde_json::Value>(result.metadata.get()).unwrap(),
            result.processing_time
        ),
        ("text", json!({"k": 1}), Some(2.0))
    );
    assert_eq!(
        submit(store, id, Some(lease), failure(true), at(6))
            .await
            .unwrap_err(),
        StoreError::InvalidTransition { current: Completed }
    );
    assert_eq!(
        submit(store, id, None, success(), at(6)).await.unwrap_err(),
        StoreError::InvalidTransition { current: Completed }
    );
    assert_eq!(
        submit(store, JobId::new_random(), None, success(), at(6))
            .await
            .unwrap_err(),
        StoreError::NotFound
    );
    let handoffs = store.pending_handoffs(100).await.unwrap();
    assert_eq!(
        handoffs
            .iter()
            .map(|h| (h.job_id, h.kind))
            .collect::<Vec<_>>(),
        vec![(id, HandoffKind::Completed)]
    );
    assert_eq!(handoffs[0].payload["ingestion_task_id"], "ingest-7");
}

pub async fn failures_retry_with_backoff_until_exhausted(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "audio", at(0)).await;
    // max_retries = 2, base 60 s, no jitter: retries at +60 s, then +120 s, then final.
    let (_, lease) = claim(store, &["audio"], at(0)).await.unwrap();
    let job = submit(store, id, Some(lease), failure(true), at(10))
        .await
        .unwrap();
    assert_eq!(
        (job.status, job.retry_count, job.available_at),
        (Retrying, 1, at(70))
    );
    assert_eq!(
        claim(store, &["audio"], at(69)).await,
        None,
        "not claimable before its backoff passed"
    );
    assert_eq!(store.next_deadline().await.unwrap(), Some(at(70)));
    let report = rescue(store, at(70)).await;
    assert_eq!(report.n_retries_due, 1);
    let (_, lease) = claim(store, &["audio"], at(70)).await.unwrap();
    let job = submit(store, id, None, failure(true), at(80))
        .await
        .unwrap();
    assert_eq!(
        (job.status, job.retry_count, job.available_at),
        (Retrying, 2, at(200))
    );
    assert_eq!(
        submit(store, id, Some(lease), failure(true), at(81))
            .await
            .unwrap_err(),
        StoreError::InvalidTransition { current: Retrying },
        "one result per attempt"
    );
    let (_, lease) = claim(store, &["audio"], at(200)).await.unwrap();
    let job = submit(store, id, Some(lease), failure(true), at(210))
        .await
        .unwrap();
    assert_eq!(
        (job.status, job.retry_count, job.attempt, job.completed_at),
        (Failed, 2, 3, Some(at(210)))
    );
    assert_eq!(job.error_message.as_deref(), Some("boom"));
    assert_eq!(
        transitions(store, id).await,
        vec![
            (None, Pending),
            (Some(Pending), Processing),
            (Some(Processing), Failed),
            (Some(Failed), Retrying),
            (Some(Retrying), Processing),
            (Some(Processing), Failed),
            (Some(Failed), Retrying),
            (Some(Retrying), Processing),
            (Some(Processing), Failed),
        ]
    );
    let handoffs = store.pending_handoffs(100).await.unwrap();
    assert_eq!(
        handoffs
            .iter()
            .map(|h| (h.job_id, h.kind))
            .collect::<Vec<_>>(),
        vec![(id, HandoffKind::Failed)],
        "only the final failure is handed off"
    );
}

pub async fn a_failure_marked_not_retryable_is_final_at_once(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "document", at(0)).await;
    let (_, lease) = claim(store, &["document"], at(0)).await.unwrap();
    let job = submit(store, id, Some(lease), failure(false), at(1))
        .await
        .unwrap();
    assert_eq!((job.status, job.retry_count), (Failed, 0));
    assert_eq!(store.pending_handoffs(10).await.unwrap().len(), 1);
}

pub async fn the_monitor_times_out_execution_heartbeat_and_pending(s: TestStore) {
    let store = &*s.store;
    // Execution timeout (image: 300 s), retried.
    let exec = create(store, "image", at(0)).await;
    claim(store, &["image"], at(0)).await.unwrap();
    // Heartbeat timeout (30 s after the last heartbeat), retried.
    let silent = create(store, "video", at(0)).await;
    let (_, lease) = claim(store, &["video"], at(0)).await.unwrap();
    store
        .heartbeat(HeartbeatParams {
            job_id: silent,
            lease_id: lease,
            progress: None,
            message: None,
            timeouts: policy().timeouts,
            now: at(5),
        })
        .await
        .unwrap();
    // Pending timeout: final, no retry.
    let starved = create_with(store, "youtube", at(0), Some(at(20)), "/data/files/y").await;

    assert_eq!(
        rescue(store, at(19)).await,
        RescueReport::default(),
        "nothing expired yet"
    );
    let report = rescue(store, at(35)).await;
    assert_eq!(
        (
            report.n_pending_timed_out,
            report.n_attempts_timed_out,
            report.n_retries_scheduled
        ),
        (1, 1, 1)
    );
    assert_eq!(status(store, starved).await, Timeout);
    let starved_job = store.get_job(starved).await.unwrap().unwrap();
    assert!(
        starved_job
            .error_message
            .unwrap()
            .contains("no worker claimed"),
        "says why, so ingestion can fall back"
    );
    assert_eq!(status(store, silent).await, Retrying);
    let silent_job = store.get_job(silent).await.unwrap().unwrap();
    assert!(silent_job.error_message.unwrap().contains("heartbeat"));
    assert_eq!(
        transitions(store, silent).await[2..],
        [(Some(Processing), Timeout), (Some(Timeout), Retrying)]
    );
    assert_eq!(
        status(store, exec).await,
        Processing,
        "execution deadline not reached yet"
    );

    let report = rescue(store, at(300)).await;
    assert_eq!(report.n_attempts_timed_out, 1);
    let exec_job = store.get_job(exec).await.unwrap().unwrap();
    assert_eq!((exec_job.status, exec_job.retry_count), (Retrying, 1));
    assert!(exec_job.error_message.unwrap().contains("execution"));
    let handoffs = store.pending_handoffs(10).await.unwrap();
    assert_eq!(
        handoffs
            .iter()
            .map(|h| (h.job_id, h.kind))
            .collect::<Vec<_>>(),
        vec![(starved, HandoffKind::Failed)]
    );
}

pub async fn timeouts_exhaust_retries_into_a_final_timeout(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "image", at(0)).await;
    let mut now = 0;
    for expected_retry in 1..=2 {
        claim(store, &["image"], at(now)).await.unwrap();
        now += 300;
        rescue(store, at(now)).await;
        let job = store.get_job(id).await.unwrap().unwrap();
        assert_eq!((job.status, job.retry_count), (Retrying, expected_retry));
        now = (job.available_at.as_micros() - T0) / 1_000_000;
        rescue(store, at(now)).await;
    }
    claim(store, &["image"], at(now)).await.unwrap();
    rescue(store, at(now + 300)).await;
    let job = store.get_job(id).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.attempt, job.completed_at),
        (Timeout, 3, Some(at(now + 300)))
    );
    assert_eq!(store.pending_handoffs(10).await.unwrap().len(), 1);
    assert_eq!(
        store.next_deadline().await.unwrap(),
        None,
        "a final job has no deadline"
    );
}

pub async fn a_late_success_completes_a_timed_out_job_until_it_is_claimed_again(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "image", at(0)).await;
    let (_, lease) = claim(store, &["image"], at(0)).await.unwrap();
    rescue(store, at(300)).await;
    assert_eq!(status(store, id).await, Retrying);
    assert_eq!(
        submit(store, id, None, success(), at(301))
            .await
            .unwrap_err(),
        StoreError::InvalidTransition { current: Retrying },
        "without a lease it cannot prove it ran the attempt"
    );
    assert_eq!(
        submit(store, id, Some(lease), failure(true), at(301))
            .await
            .unwrap_err(),
        StoreError::InvalidTransition { current: Retrying },
        "a late failure changes nothing"
    );
    let job = submit(store, id, Some(lease), success(), at(302))
        .await
        .unwrap();
    assert_eq!(job.status, Completed);
    assert_eq!(
        transitions(store, id).await.last(),
        Some(&(Some(Retrying), Completed))
    );

    // Once claimed again, the old attempt's lease is stale.
    let other = create(store, "image", at(1000)).await;
    let (_, old_lease) = claim(store, &["image"], at(1000)).await.unwrap();
    rescue(store, at(1300)).await;
    let retry_at = store.get_job(other).await.unwrap().unwrap().available_at;
    let (_, new_lease) = claim(store, &["image"], retry_at).await.unwrap();
    assert_ne!(old_lease, new_lease);
    assert_eq!(
        submit(store, other, Some(old_lease), success(), retry_at)
            .await
            .unwrap_err(),
        StoreError::LeaseMismatch {
            current: Processing
        }
    );
    submit(store, other, Some(new_lease), success(), retry_at)
        .await
        .unwrap();
}

pub async fn cancel_works_from_every_live_state_and_is_terminal(s: TestStore) {
    let store = &*s.store;
    let cancel = |id, now| {
        store.cancel_job(CancelParams {
            job_id: id,
            reason: "operator".into(),
            now,
        })
    };
    let pending = create(store, "audio", at(0)).await;
    assert_eq!(cancel(pending, at(1)).await.unwrap().status, Cancelled);
    assert_eq!(
        cancel(pending, at(2)).await.unwrap_err(),
        StoreError::InvalidTransition { current: Cancelled }
    );

    let processing = create(store, "audio", at(0)).await;
    let (_, lease) = claim(store, &["audio"], at(0)).await.unwrap();
    cancel(processing, at(3)).await.unwrap();
    // The worker learns at its next heartbeat, and its result is refused.
    let beat = store
        .heartbeat(HeartbeatParams {
            job_id: processing,
            lease_id: lease,
            progress: None,
            message: None,
            timeouts: policy().timeouts,
            now: at(4),
        })
        .await
        .unwrap();
    assert!(beat.cancelled);
    assert_eq!(beat.status, Cancelled);
    assert_eq!(
        submit(store, processing, Some(lease), success(), at(5))
            .await
            .unwrap_err(),
        StoreError::InvalidTransition { current: Cancelled }
    );
    assert_eq!(
        rescue(store, at(100_000)).await,
        RescueReport::default(),
        "a cancelled job has no deadline"
    );

    let completed = create(store, "audio", at(0)).await;
    claim(store, &["audio"], at(0)).await.unwrap();
    submit(store, completed, None, success(), at(1))
        .await
        .unwrap();
    assert_eq!(cancel(completed, at(2)).await.unwrap().status, Cancelled);
    assert_eq!(
        cancel(JobId::new_random(), at(2)).await.unwrap_err(),
        StoreError::NotFound
    );
    let history = store
        .get_job_detail(processing)
        .await
        .unwrap()
        .unwrap()
        .history;
    let last = history.last().unwrap();
    assert_eq!(
        (
            last.from,
            last.to,
            last.actor.as_str(),
            last.reason.as_str()
        ),
        (Some(Processing), Cancelled, "admin", "operator")
    );
}

/// Each job outcome is handed off once (issues 9 and 10): cancelling a job that already
/// completed (or failed for good) records the cancellation in its history, with its own
/// time, keeps the job's `completed_at` and result, and writes no second hand-off.
pub async fn cancelling_a_finished_job_keeps_its_outcome_and_hands_nothing_off_again(s: TestStore) {
    let store = &*s.store;
    let cancel = |id, now| {
        store.cancel_job(CancelParams {
            job_id: id,
            reason: "cancel for cleanup".into(),
            now,
        })
    };
    let completed = create(store, "audio", at(0)).await;
    claim(store, &["audio"], at(1)).await.unwrap();
    submit(store, completed, None, success(), at(5))
        .await
        .unwrap();
    let failed = create(store, "audio", at(0)).await;
    claim(store, &["audio"], at(1)).await.unwrap();
    submit(store, failed, None, failure(false), at(6))
        .await
        .unwrap();
    let live = create(store, "audio", at(0)).await;

    for (id, finished_at) in [(completed, at(5)), (failed, at(6))] {
        let job = cancel(id, at(20)).await.unwrap();
        assert_eq!(
            (job.status, job.completed_at),
            (Cancelled, Some(finished_at))
        );
        let detail = store.get_job_detail(id).await.unwrap().unwrap();
        assert_eq!(detail.job.completed_at, Some(finished_at));
        let last = detail.history.last().unwrap();
        assert_eq!(
            (last.to, last.at, last.actor.as_str(), last.reason.as_str()),
            (Cancelled, at(20), "admin", "cancel for cleanup")
        );
    }
    let result = store
        .get_job_detail(completed)
        .await
        .unwrap()
        .unwrap()
        .result
        .expect("the result is kept");
    assert_eq!(result.content, "text");
    // A job cancelled before it had an outcome is handed off as cancelled.
    let job = cancel(live, at(21)).await.unwrap();
    assert_eq!(job.completed_at, Some(at(21)));

    let handoffs = store.pending_handoffs(100).await.unwrap();
    let mut kinds: Vec<(JobId, HandoffKind)> =
        handoffs.iter().map(|h| (h.job_id, h.kind)).collect();
    kinds.sort_by_key(|(id, kind)| (id.to_string(), kind.as_str()));
    let mut expected = vec![
        (completed, HandoffKind::Completed),
        (failed, HandoffKind::Failed),
        (live, HandoffKind::Cancelled),
    ];
    expected.sort_by_key(|(id, kind)| (id.to_string(), kind.as_str()));
    assert_eq!(kinds, expected, "one hand-off per outcome");
}

pub async fn manual_retry_resets_the_budget_and_only_applies_to_failures(s: TestStore) {
    let store = &*s.store;
    let retry = |id, now| store.retry_job(ManualRetryParams { job_id: id, now });
    let id = create(store, "audio", at(0)).await;
    assert_eq!(
        retry(id, at(1)).await.unwrap_err(),
        StoreError::InvalidTransition { current: Pending }
    );
    let (_, lease) = claim(store, &["audio"], at(1)).await.unwrap();
    assert_eq!(
        retry(id, at(1)).await.unwrap_err(),
        StoreError::InvalidTransition {
            current: Processing
        }
    );
    submit(store, id, Some(lease), failure(false), at(2))
        .await
        .unwrap();
    let job = retry(id, at(3)).await.unwrap();
    assert_eq!(
        (
            job.status,
            job.retry_count,
            job.available_at,
            job.completed_at
        ),
        (Retrying, 0, at(3), None)
    );
    assert_eq!(
        claim(store, &["audio"], at(3)).await.unwrap().0,
        id,
        "claimable at once"
    );
    assert_eq!(
        retry(JobId::new_random(), at(3)).await.unwrap_err(),
        StoreError::NotFound
    );
}

pub async fn cleanup_deletes_only_finished_jobs_past_retention(s: TestStore) {
    let store = &*s.store;
    let day = 86_400;
    let done = create_with(store, "audio", at(0), None, "/data/files/a").await;
    let failed = create_with(store, "audio", at(0), None, "/data/files/b").await;
    let shared1 = create_with(store, "audio", at(0), None, "/data/files/shared").await;
    let shared2 = create_with(store, "audio", at(0), None, "/data/files/shared").await;
    let live = create_with(store, "audio", at(0), None, "/data/files/c").await;
    for (id, outcome) in [
        (done, success()),
        (failed, failure(false)),
        (shared1, success()),
    ] {
        let (claimed, lease) = claim(store, &["audio"], at(1)).await.unwrap();
        assert_eq!(claimed, id);
        submit(store, id, Some(lease), outcome, at(1))
            .await
            .unwrap();
    }
    // A hand-off keeps its job until it is fanned out to the sinks (here: none, so
    // outcomes are only stored); see delivery_conformance for deliveries keeping jobs.
    store
        .fan_out_handoffs(deliveries::FanOutParams {
            sinks: vec![],
            webhooks: false,
            limit: 100,
            now: at(2),
        })
        .await
        .unwrap();
    let clean = |retention, now| {
        store.cleanup_finished(CleanupParams {
            retention,
            limit: 100,
            now,
        })
    };
    let count = |retention, now| store.count_cleanable(CountCleanableParams { retention, now });
    assert_eq!(
        count(RetentionPolicy::from_days(7, None), at(8 * day))
            .await
            .unwrap(),
        2,
        "a dry run counts what the cleanup below deletes"
    );
    assert_eq!(
        count(RetentionPolicy::uniform(0), at(2)).await.unwrap(),
        3,
        "every finished job, and only those (counting deletes nothing)"
    );
    let report = clean(RetentionPolicy::from_days(7, None), at(7 * day))
        .await
        .unwrap();
    assert_eq!(report.n_deleted, 0, "exactly at retention: kept");
    let report = clean(RetentionPolicy::from_days(7, None), at(8 * day))
        .await
        .unwrap();
    assert_eq!(
        report.n_deleted, 2,
        "completed past 7 days; the failure is kept 14"
    );
    assert_eq!(
        report.orphaned_source_files,
        vec!["/data/files/a".to_owned()],
        "a file another job uses is not orphaned"
    );
    assert!(store.get_job(done).await.unwrap().is_none());
    assert!(store.get_job_detail(shared1).await.unwrap().is_none());
    assert!(store.get_job(failed).await.unwrap().is_some());
    assert_eq!(
        count(RetentionPolicy::from_days(7, None), at(15 * day))
            .await
            .unwrap(),
        1
    );
    let report = clean(RetentionPolicy::from_days(7, None), at(15 * day))
        .await
        .unwrap();
    assert_eq!(
        (report.n_deleted, report.orphaned_source_files),
        (1, vec!["/data/files/b".to_owned()])
    );
    assert_eq!(
        clean(RetentionPolicy::uniform(0), at(100 * day))
            .await
            .unwrap()
            .n_deleted,
        0,
        "unfinished jobs are never cleaned"
    );
    assert!(
        store.get_job(live).await.unwrap().is_some()
            && store.get_job(shared2).await.unwrap().is_some()
    );
    let stats = store.statistics(at(100 * day)).await.unwrap();
    assert_eq!(stats.total_jobs, 2, "counters follow deletions");
}

pub async fn statistics_come_from_counters(s: TestStore) {
    let store = &*s.store;
    for i in 0..3 {
        create(store, "audio", at(i)).await;
    }
    create(store, "video", at(0)).await;
    let old = create(store, "video", at(-2 * 86_400)).await;
    let (_, lease) = claim(store, &["audio"], at(10)).await.unwrap();
    let first = store
        .list_jobs(ListParams {
            status: Some(Processing),
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .jobs[0]
        .id;
    submit(store, first, Some(lease), success(), at(14))
        .await
        .unwrap();
    let (second, lease) = claim(store, &["audio"], at(20)).await.unwrap();
    submit(store, second, Some(lease), success(), at(26))
        .await
        .unwrap();
    store
        .cancel_job(CancelParams {
            job_id: old,
            reason: "x".into(),
            now: at(30),
        })
        .await
        .unwrap();
    let stats = store.statistics(at(60)).await.unwrap();
    assert_eq!(stats.total_jobs, 5);
    assert_eq!(stats.status_counts[&Pending], 2);
    assert_eq!(stats.status_counts[&Completed], 2);
    assert_eq!(stats.status_counts[&Cancelled], 1);
    assert_eq!(stats.status_counts[&Processing], 0);
    assert_eq!(stats.content_type_counts["audio"], 3);
    assert_eq!(stats.content_type_counts["video"], 2);
    assert_eq!(
        stats.avg_processing_secs["audio"], 5.0,
        "(4 s + 6 s) / 2, measured claim to completion"
    );
    assert_eq!(
        stats.created_last_24h, 4,
        "the job from two days ago is not recent"
    );
    assert!(stats.storage_bytes > 0);
}

pub async fn listing_filters_and_pages_newest_first(s: TestStore) {
    let store = &*s.store;
    let (mut audio, mut video, mut all) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..7 {
        audio.push(create(store, "audio", at(i)).await);
        all.push(*audio.last().unwrap());
        video.push(create(store, "video", at(i)).await);
        all.push(*video.last().unwrap());
    }
    // Every page of a filtered listing, followed through the cursors.
    let list_all = |status: Option<JobStatus>, content_type: Option<&str>, limit: usize| {
        let content_type = content_type.map(ct);
        async move {
            let mut seen = Vec::new();
            let mut cursor = None;
            loop {
                let page = store
                    .list_jobs(ListParams {
                        status,
                        content_type: content_type.clone(),
                        limit,
                        cursor,
                    })
                    .await
                    .unwrap();
                assert!(page.jobs.len() <= limit);
                seen.extend(page.jobs.iter().map(|j| j.id));
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break seen,
                }
            }
        }
    };
    audio.reverse();
    all.reverse();
    assert_eq!(list_all(None, Some("audio"), 3).await, audio);
    assert_eq!(
        list_all(Some(Pending), None, 4).await,
        all,
        "both types, merged"
    );
    assert_eq!(list_all(None, None, 5).await, all);
    claim(store, &["video"], at(100)).await.unwrap();
    video.reverse();
    assert_eq!(
        list_all(None, Some("video"), 2).await,
        video,
        "a type's jobs in any status, merged newest first"
    );
    let pending_video: Vec<JobId> = video[..6].to_vec();
    assert_eq!(
        list_all(Some(Pending), Some("video"), 4).await,
        pending_video,
        "the oldest video job was claimed"
    );
    let processing = store
        .list_jobs(ListParams {
            status: Some(Processing),
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(processing.jobs.len(), 1);
    assert_eq!(processing.jobs[0].content_type, ct("video"));
    let none = store
        .list_jobs(ListParams {
            status: Some(Processing),
            content_type: Some(ct("audio")),
            limit: 50,
            cursor: None,
        })
        .await
        .unwrap();
    assert!(none.jobs.is_empty() && none.next_cursor.is_none());
}

pub async fn closing_makes_later_calls_unavailable(s: TestStore) {
    let store = &*s.store;
    create(store, "audio", at(0)).await;
    store.close().await.unwrap();
    let error = store
        .create_job(CreateJobParams {
            id: JobId::new_random(),
            content_type: ct("audio"),
            source_file_path: "/x".into(),
            task_options: json!({}),
            ingestion_task_id: "i".into(),
            pending_deadline: None,
            now: at(1),
        })
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
}

pub async fn write_probes_commit_and_change_no_job(s: TestStore) {
    let store = &*s.store;
    let id = create(store, "audio", at(0)).await;
    store.probe_write(at(1)).await.expect("first probe");
    store
        .probe_write(at(2))
        .await
        .expect("a later probe rewrites the same row");
    assert_eq!(status(store, id).await, JobStatus::Pending);
    assert_eq!(transitions(store, id).await.len(), 1);
    assert_eq!(store.statistics(at(3)).await.unwrap().total_jobs, 1);
    store.close().await.unwrap();
    let error = store.probe_write(at(4)).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
}

pub async fn imported_jobs_are_stored_as_they_are_and_only_once(s: TestStore) {
    use morag_jobs::domain::{Job, JobResult};
    let store = &*s.store;
    let done = Job {
        id: JobId::new_random(),
        content_type: ct("audio"),
        source_file_path: "/data/files/talk.mp3".into(),
        task_options: json!({"model": "large", "a": [1, 2]}),
        ingestion_task_id: "ingest-9".into(),
        status: Completed,
        worker_id: Some(worker("gpu-1")),
        lease_id: None,
        attempt: 1,
        retry_count: 0,
        created_at: at(0),
        started_at: Some(at(5)),
        completed_at: Some(at(9)),
        updated_at: at(9),
        available_at: at(0),
        execution_deadline: None,
        heartbeat_deadline: None,
        last_heartbeat_at: None,
        progress: None,
        progress_message: None,
        error_message: None,
    };
    let done_result = JobResult {
        content: "transcript".into(),
        metadata: serde_json::value::to_raw_value(&json!({"pages": 2})).unwrap(),
        processing_time: Some(4.5),
    };
    let import = |job: Job, deadline_at| {
        let result = (job.status == Completed).then(|| done_result.clone());
        store.import_job(ImportJobParams {
            job,
            result,
            deadline_at,
            reason: "imported from MoRAG".into(),
            now: at(100),
        })
    };
    assert_eq!(
        import(done.clone(), None).await.unwrap(),
        ImportOutcome::Imported
    );
    assert_eq!(
        store.get_job(done.id).await.unwrap().unwrap(),
        done,
        "stored as it is"
    );
    assert_eq!(
        store.get_job_detail(done.id).await.unwrap().unwrap().result,
        Some(done_result.clone()),
        "with its result"
    );
    let mut changed = done.clone();
    changed.status = Failed;
    assert_eq!(
        import(changed, None).await.unwrap(),
        ImportOutcome::AlreadyExists
    );
    assert_eq!(
        status(store, done.id).await,
        Completed,
        "a second import changes nothing"
    );
    let history = store
        .get_job_detail(done.id)
        .await
        .unwrap()
        .unwrap()
        .history;
    assert_eq!(history.len(), 1);
    assert_eq!(
        (history[0].from, history[0].to, history[0].reason.as_str()),
        (None, Completed, "imported from MoRAG")
    );

    // A job MoRAG's worker is still running: the monitor watches its deadline, and the
    // worker's lease-less result is accepted.
    let running = Job {
        id: JobId::new_random(),
        status: Processing,
        lease_id: Some(LeaseId::new_random()),
        started_at: Some(at(50)),
        completed_at: None,
        updated_at: at(50),
        execution_deadline: Some(at(50 + 1800)),
        ..done.clone()
    };
    assert_eq!(
        import(running.clone(), Some(at(50 + 1800))).await.unwrap(),
        ImportOutcome::Imported
    );
    assert_eq!(store.next_deadline().await.unwrap(), Some(at(50 + 1800)));
    assert_eq!(
        submit(store, running.id, None, success(), at(60))
            .await
            .unwrap()
            .status,
        Completed
    );

    // A pending one is claimable like any other.
    let pending = Job {
        id: JobId::new_random(),
        status: Pending,
        worker_id: None,
        attempt: 0,
        started_at: None,
        completed_at: None,
        ..done.clone()
    };
    import(pending.clone(), None).await.unwrap();
    assert_eq!(
        claim(store, &["audio"], at(70)).await.unwrap().0,
        pending.id
    );

    let stats = store.statistics(at(100)).await.unwrap();
    assert_eq!(
        (
            stats.total_jobs,
            stats.status_counts[&Completed],
            stats.status_counts[&Processing]
        ),
        (3, 2, 1)
    );
    let handoffs = store.pending_handoffs(10).await.unwrap();
    assert_eq!(
        handoffs.iter().map(|h| h.job_id).collect::<Vec<_>>(),
        vec![running.id],
        "imports hand nothing off; later transitions do"
    );
}

/// Space freed by cleanup is reported, and what `release_free_space` returns to the file
/// system leaves the database smaller by as much (SQLite; PostgreSQL's autovacuum makes
/// freed space reusable inside its tables and reports none to release).
pub async fn freed_space_is_reported_and_released(s: TestStore) {
    let store = &*s.store;
    let empty = store.storage_space().await.unwrap();
    assert!(empty.database_bytes > 0, "{empty:?}");
    let big_options = json!({"notes": "x".repeat(8_000)});
    for n in 0..200 {
        let job = store
            .create_job(CreateJobParams {
                id: JobId::new_random(),
                content_type: ct("audio"),
                source_file_path: format!("/data/files/{n}"),
                task_options: big_options.clone(),
                ingestion_task_id: format!("ingest-{n}"),
                pending_deadline: None,
                now: at(0),
            })
            .await
            .unwrap();
        store
            .cancel_job(CancelParams {
                job_id: job.id,
                reason: "not needed".into(),
                now: at(1),
            })
            .await
            .unwrap();
    }
    store
        .fan_out_handoffs(deliveries::FanOutParams {
            sinks: vec![],
            webhooks: false,
            limit: 1_000,
            now: at(2),
        })
        .await
        .unwrap();
    let full = store.storage_space().await.unwrap();
    let report = store
        .cleanup_finished(CleanupParams {
            retention: RetentionPolicy::uniform(0),
            limit: 1_000,
            now: at(3),
        })
        .await
        .unwrap();
    assert_eq!(report.n_deleted, 200);
    assert!(
        report.busy > Duration::ZERO,
        "the batch's store time is measured"
    );
    let cleaned = store.storage_space().await.unwrap();
    assert!(cleaned.free_bytes <= cleaned.database_bytes, "{cleaned:?}");
    let released = store.release_free_space(u64::MAX).await.unwrap();
    assert_eq!(
        released, cleaned.free_bytes,
        "all free space goes when asked"
    );
    let after = store.storage_space().await.unwrap();
    assert_eq!(after.free_bytes, 0, "{after:?}");
    assert_eq!(after.database_bytes, cleaned.database_bytes - released);
    assert!(
        full.database_bytes >= 200 * 8_000,
        "the jobs took space: {full:?}"
    );
}

on_both_backends!(
    create_then_read_back,
    claims_take_the_oldest_due_job_of_the_requested_types,
    a_job_is_claimed_once_however_many_claim_at_once,
    concurrent_creates_claims_and_results_each_get_their_own_answer,
    a_failing_create_does_not_fail_its_neighbours,
    heartbeats_extend_the_attempt_and_fence_stale_leases,
    a_release_makes_the_job_claimable_at_once_without_spending_a_retry,
    results_complete_once_and_stale_leases_change_nothing,
    failures_retry_with_backoff_until_exhausted,
    a_failure_marked_not_retryable_is_final_at_once,
    the_monitor_times_out_execution_heartbeat_and_pending,
    timeouts_exhaust_retries_into_a_final_timeout,
    a_late_success_completes_a_timed_out_job_until_it_is_claimed_again,
    cancel_works_from_every_live_state_and_is_terminal,
    cancelling_a_finished_job_keeps_its_outcome_and_hands_nothing_off_again,
    manual_retry_resets_the_budget_and_only_applies_to_failures,
    cleanup_deletes_only_finished_jobs_past_retention,
    freed_space_is_reported_and_released,
    statistics_come_from_counters,
    listing_filters_and_pages_newest_first,
    closing_makes_later_calls_unavailable,
    write_probes_commit_and_change_no_job,
    imported_jobs_are_stored_as_they_are_and_only_once,
);
