//! Conformance cases for idempotent creates (`Store::create_job_once`), run against both
//! backends like the main suite (whose store openers they reuse).

use std::sync::Arc;
use std::time::Duration;

use morag_jobs::clock::Timestamp;
use morag_jobs::domain::{ContentType, JobId, JobStatus, TimeoutPolicy, WorkerId};
use morag_jobs::store::*;
use serde_json::json;

use crate::store_conformance::{open_postgres, open_sqlite, TestStore};

const T0: i64 = 1_800_000_000_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_micros(T0 + secs * 1_000_000)
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn params(
    task: &str,
    source: &str,
    content_type: &str,
    key: Option<(&str, &str)>,
    match_unfinished_job: bool,
    now: Timestamp,
) -> CreateOnceParams {
    CreateOnceParams {
        create: CreateJobParams {
            id: JobId::new_random(),
            content_type: ContentType::parse(content_type).unwrap(),
            source_file_path: source.into(),
            task_options: json!({"language": "de"}),
            ingestion_task_id: task.into(),
            pending_deadline: None,
            now,
        },
        idempotency_key: key.map(|(key, digest)| IdempotencyKeyParams {
            key: key.into(),
            request_digest: digest.into(),
            expires_at: now.plus(DAY),
        }),
        match_unfinished_job,
    }
}

async fn jobs(store: &dyn Store) -> Vec<JobId> {
    let page = store
        .list_jobs(ListParams {
            limit: 500,
            ..ListParams::default()
        })
        .await
        .unwrap();
    page.jobs.into_iter().map(|job| job.id).collect()
}

fn created(outcome: CreateOnceOutcome) -> morag_jobs::domain::Job {
    match outcome {
        CreateOnceOutcome::Created(job) => job,
        other => panic!("expected a new job, got {other:?}"),
    }
}

pub async fn a_repeated_create_with_the_same_key_answers_with_the_first_job(s: TestStore) {
    let store = &*s.store;
    let key = Some(("key-1", "digest-a"));
    let first = created(
        store
            .create_job_once(params(
                "ingest-1",
                "/data/a.pdf",
                "document",
                key,
                false,
                at(0),
            ))
            .await
            .unwrap(),
    );
    let again = store
        .create_job_once(params(
            "ingest-1",
            "/data/a.pdf",
            "document",
            key,
            false,
            at(3600),
        ))
        .await
        .unwrap();
    assert_eq!(
        again,
        CreateOnceOutcome::KeyReplayed {
            job_id: first.id,
            created_at: first.created_at
        }
    );
    // The same key with another request changes nothing.
    let other = store
        .create_job_once(params(
            "ingest-2",
            "/data/b.pdf",
            "document",
            Some(("key-1", "digest-b")),
            false,
            at(7200),
        ))
        .await
        .unwrap();
    assert_eq!(other, CreateOnceOutcome::KeyReusedForOtherRequest);
    assert_eq!(jobs(store).await, vec![first.id]);

    // The answer is replayed even when the job has finished meanwhile.
    store
        .cancel_job(CancelParams {
            job_id: first.id,
            reason: "test".into(),
            now: at(7300),
        })
        .await
        .unwrap();
    let again = store
        .create_job_once(params(
            "ingest-1",
            "/data/a.pdf",
            "document",
            key,
            true,
            at(7400),
        ))
        .await
        .unwrap();
    assert!(matches!(again, CreateOnceOutcome::KeyReplayed { job_id, .. } if job_id == first.id));

    // After 24 hours the key is free again: the same request makes a new job.
    let later = created(
        store
            .create_job_once(params(
                "ingest-1",
                "/data/a.pdf",
                "document",
                key,
                false,
                at(86_401),
            ))
            .await
            .unwrap(),
    );
    assert_ne!(later.id, first.id);
    assert_eq!(jobs(store).await.len(), 2);
}

pub async fn a_create_repeating_an_unfinished_job_of_its_ingestion_task_is_that_job(s: TestStore) {
    let store = &*s.store;
    let first = created(
        store
            .create_job_once(params(
                "ingest-7",
                "/data/a.mp3",
                "audio",
                None,
                true,
                at(0),
            ))
            .await
            .unwrap(),
    );
    let again = store
        .create_job_once(params(
            "ingest-7",
            "/data/a.mp3",
            "audio",
            None,
            true,
            at(10),
        ))
        .await
        .unwrap();
    assert_eq!(again, CreateOnceOutcome::MatchedUnfinished(first.clone()));

    // Another source or content type is another job; so is any create with matching off.
    let other_source = created(
        store
            .create_job_once(params(
                "ingest-7",
                "/data/b.mp3",
                "audio",
                None,
                true,
                at(20),
            ))
            .await
            .unwrap(),
    );
    let other_type = created(
        store
            .create_job_once(params(
                "ingest-7",
                "/data/a.mp3",
                "video",
                None,
                true,
                at(30),
            ))
            .await
            .unwrap(),
    );
    let unmatched = created(
        store
            .create_job_once(params(
                "ingest-7",
                "/data/a.mp3",
                "audio",
                None,
                false,
                at(40),
            ))
            .await
            .unwrap(),
    );

    // A processing job still matches (the oldest first); a key sent with a matching create
    // remembers that job.
    let claimed = store
        .claim_job(ClaimParams {
            worker_id: WorkerId::parse("w1").unwrap(),
            content_types: vec![ContentType::parse("audio").unwrap()],
            timeouts: TimeoutPolicy::default(),
            now: at(50),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, first.id);
    let keyed = store
        .create_job_once(params(
            "ingest-7",
            "/data/a.mp3",
            "audio",
            Some(("k", "d")),
            true,
            at(60),
        ))
        .await
        .unwrap();
    assert!(
        matches!(&keyed, CreateOnceOutcome::MatchedUnfinished(job) if job.id == first.id && job.status == JobStatus::Processing),
        "{keyed:?}"
    );

    // Once finished, a job no longer matches: the next create is a new job.
    for id in [first.id, unmatched.id] {
        store
            .cancel_job(CancelParams {
                job_id: id,
                reason: "test".into(),
                now: at(70),
            })
            .await
            .unwrap();
    }
    let fresh = created(
        store
            .create_job_once(params(
                "ingest-7",
                "/data/a.mp3",
                "audio",
                None,
                true,
                at(80),
            ))
            .await
            .unwrap(),
    );
    let replayed = store
        .create_job_once(params(
            "ingest-7",
            "/data/a.mp3",
            "audio",
            Some(("k", "d")),
            true,
            at(90),
        ))
        .await
        .unwrap();
    assert!(
        matches!(replayed, CreateOnceOutcome::KeyReplayed { job_id, .. } if job_id == first.id)
    );
    let mut all = jobs(store).await;
    all.sort();
    let mut expected = vec![
        first.id,
        other_source.id,
        other_type.id,
        unmatched.id,
        fresh.id,
    ];
    expected.sort();
    assert_eq!(all, expected);
}

pub async fn identical_creates_racing_make_one_job(s: TestStore) {
    let store: Arc<dyn Store> = s.store.clone();
    for (round, key) in [(0, None), (1, Some(("race-key", "race-digest")))] {
        let task = format!("ingest-race-{round}");
        let mut racers = Vec::new();
        for _ in 0..16 {
            let store = store.clone();
            let params = params(&task, "/data/race.pdf", "document", key, true, at(round));
            racers.push(tokio::spawn(async move {
                store.create_job_once(params).await.unwrap()
            }));
        }
        let mut new_jobs = Vec::new();
        let mut answered = std::collections::HashSet::new();
        for racer in racers {
            match racer.await.unwrap() {
                CreateOnceOutcome::Created(job) => {
                    answered.insert(job.id);
                    new_jobs.push(job.id);
                }
                CreateOnceOutcome::MatchedUnfinished(job) => {
                    answered.insert(job.id);
                }
                CreateOnceOutcome::KeyReplayed { job_id, .. } => {
                    answered.insert(job_id);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(new_jobs.len(), 1, "round {round}");
        assert_eq!(
            answered.len(),
            1,
            "every racer is answered with the one job"
        );
    }
    assert_eq!(jobs(&*store).await.len(), 2);
    // The statistics count each job once, however it was created.
    let stats = store.statistics(at(2)).await.unwrap();
    assert_eq!(stats.total_jobs, 2);
    assert_eq!(stats.status_counts.get(&JobStatus::Pending), Some(&2));
}

on_both_backends!(
    a_repeated_create_with_the_same_key_answers_with_the_first_job,
    a_create_repeating_an_unfinished_job_of_its_ingestion_task_is_that_job,
    identical_creates_racing_make_one_job,
);

/// Two replicas on one PostgreSQL database: 16 identical creates race, spread over both,
/// some with an Idempotency-Key (their own transaction) and most without (the batched
/// create): the ingestion task's lock makes them one job on every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_creates_racing_on_two_replicas_make_one_job() {
    use morag_jobs::store::postgres::{PostgresOptions, PostgresStore};
    let database = crate::support::PgDatabase::create().await;
    let mut replicas: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        let store = PostgresStore::open(PostgresOptions::new(database.url.clone()))
            .await
            .expect("postgres store opens");
        replicas.push(Arc::new(store));
    }
    for round in 0..5 {
        let task = format!("ingest-replicas-{round}");
        let mut racers = Vec::new();
        for i in 0..16 {
            let store = replicas[i % 2].clone();
            let key = format!("replica-key-{round}-{i}");
            let key = (i % 5 == 0).then_some((key.as_str(), "digest"));
            let params = params(&task, "/data/race.pdf", "document", key, true, at(round));
            racers.push(tokio::spawn(async move {
                store.create_job_once(params).await.unwrap()
            }));
        }
        let mut new_jobs = Vec::new();
        let mut answered = std::collections::HashSet::new();
        for racer in racers {
            match racer.await.unwrap() {
                CreateOnceOutcome::Created(job) => {
                    answered.insert(job.id);
                    new_jobs.push(job.id);
                }
                CreateOnceOutcome::MatchedUnfinished(job) => {
                    answered.insert(job.id);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(new_jobs.len(), 1, "round {round}");
        assert_eq!(
            answered.len(),
            1,
            "round {round}: every racer gets the one job"
        );
    }
    assert_eq!(jobs(&*replicas[0]).await.len(), 5);
    let stats = replicas[1].statistics(at(10)).await.unwrap();
    assert_eq!(stats.status_counts.get(&JobStatus::Pending), Some(&5));
    for store in replicas {
        store.close().await.unwrap();
    }
}
