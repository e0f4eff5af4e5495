//! The three operations every job goes through (create, claim, result), each written for
//! a whole batch of requests in one statement; `batcher.rs` decides what runs together.
//! A batch of one is the single-request case: there is no other code path for these.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use tokio_postgres::types::ToSql;

use super::batcher::BatchOp;
use super::pool::Conn;
use super::{
    conflict, current_from_row, get, job_from_row, pg_error, CURRENT_COLUMNS, HANDOFF_PAYLOAD,
    JOB_COLUMNS,
};
use crate::domain::{HandoffKind, Job, JobStatus, LeaseId};
use crate::store::plan::{self, HistoryStep, ResultChange, ResultPlan};
use crate::store::{
    AttemptOutcome, ClaimParams, CreateJobParams, CreateOnceOutcome, StoreError, StoreFuture,
    SubmitResultParams,
};

type Answers<T> = Result<Vec<Result<T, StoreError>>, StoreError>;

pub(super) struct Creates;

impl BatchOp for Creates {
    type Request = CreateRequest;
    type Response = CreateOnceOutcome;

    fn run<'c>(
        conn: &'c mut Conn,
        requests: Arc<Vec<CreateRequest>>,
    ) -> StoreFuture<'c, Vec<Result<CreateOnceOutcome, StoreError>>> {
        Box::pin(create_or_match_all(conn, requests))
    }
}

pub(super) struct Claims;

impl BatchOp for Claims {
    type Request = ClaimParams;
    type Response = Option<Job>;

    fn run<'c>(
        conn: &'c mut Conn,
        requests: Arc<Vec<ClaimParams>>,
    ) -> StoreFuture<'c, Vec<Result<Option<Job>, StoreError>>> {
        Box::pin(claim_all(conn, requests))
    }
}

pub(super) struct Results;

impl BatchOp for Results {
    type Request = SubmitResultParams;
    type Response = Job;

    fn run<'c>(
        conn: &'c mut Conn,
        requests: Arc<Vec<SubmitResultParams>>,
    ) -> StoreFuture<'c, Vec<Result<Job, StoreError>>> {
        Box::pin(submit_all(conn, requests))
    }
}

/// The statistics deltas of the jobs a batch inserted (CTE `u`), computed as the
/// `jobs_count_inserts` trigger computes them: the batch connections write their own
/// (`Session::Batch`), and the triggers stand aside for them (migration 0003).
const INSERTED_DELTAS: &str = "d AS (INSERT INTO counter_deltas (counter, status, content_type, minute, n) \
         SELECT 'status', status, content_type, 0, count(*) FROM u GROUP BY status, content_type \
         UNION ALL \
         SELECT 'created', '', '', created_at / 60000000, count(*) FROM u GROUP BY created_at / 60000000)";

/// The statistics deltas of the jobs a batch updated (CTE `u`, holding the new rows and,
/// in column `old_status`, each job's status before), computed as the
/// `jobs_count_updates` trigger computes them (see `INSERTED_DELTAS`).
fn updated_deltas(old_status: &str) -> String {
    format!(
        "d AS (INSERT INTO counter_deltas (counter, status, content_type, n, total_micros) \
             WITH moved AS ( \
                 SELECT {old_status} AS old_status, status AS new_status, content_type, started_at, completed_at \
                 FROM u WHERE status <> {old_status}) \
             SELECT 'status', status, content_type, sum(change), 0 \
             FROM (SELECT old_status AS status, content_type, -1 AS change FROM moved \
                   UNION ALL \
                   SELECT new_status, content_type, 1 FROM moved) AS changes \
             GROUP BY status, content_type \
             HAVING sum(change) <> 0 \
             UNION ALL \
             SELECT 'processing', '', content_type, count(*), sum(completed_at - started_at) \
             FROM moved \
             WHERE new_status = 'completed' AND started_at IS NOT NULL \
             GROUP BY content_type)"
    )
}

/// A create as the batch runs it.
#[derive(Clone, Debug)]
pub(super) struct CreateRequest {
    pub params: CreateJobParams,
    /// Whether an unfinished job of the same ingestion task, source file and content type
    /// answers this create instead of a new job (`CreateOnceParams::match_unfinished_job`).
    pub match_unfinished_job: bool,
}

/// Locks the ingestion tasks `$1` for the rest of the transaction, in the order of their
/// lock keys: two batches that share tasks take their common locks in the same order, so
/// they wait for each other instead of deadlocking. (A keyed create, `idempotent_create.rs`,
/// takes one task lock after its key's lock, so it cannot close a cycle with a batch
/// either.) Between the lock and the commit no other create can add an unfinished job of
/// those tasks, on any replica.
pub(super) const LOCK_INGESTION_TASKS_SQL: &str = "SELECT pg_advisory_xact_lock(key) FROM ( \
         SELECT DISTINCT hashtextextended('morag-jobs:ingestion-task:' || task, 0) AS key \
         FROM unnest($1::text[]) AS t(task) ORDER BY key) AS keys";

/// The create statement: per job (arrays `$1`-`$7`) its fields, and in `$11` whether an
/// unfinished job of its ingestion task, source file and content type answers it instead;
/// `$8`, `$9` and `$10` the creation entry's actor, status and reason
/// (`plan::created_step`). Rows of new jobs end in NULL, rows of matched ones in the
/// request's position (from 1).
///
/// The match is the oldest unfinished job, read through `jobs_unfinished_by_ingestion_task`
/// (`seq + 0` keeps a plan made once from walking the primary key in `seq` order instead).
/// It sees only jobs committed before the statement began: callers that match hold the
/// tasks' locks (`LOCK_INGESTION_TASKS_SQL`) taken by an earlier statement of the same
/// transaction, and no two requests of one statement share a task, source and type.
static CREATE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS ( \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $11::bool[]) \
             WITH ORDINALITY AS r(id, content_type, source_file_path, task_options, ingestion_task_id, at, deadline, \
                 match_unfinished, ord)), \
         found AS ( \
             SELECT input.ord AS found_ord, m.* FROM input CROSS JOIN LATERAL ( \
                 SELECT * FROM jobs j \
                 WHERE input.match_unfinished AND j.ingestion_task_id = input.ingestion_task_id \
                   AND j.status IN ('pending', 'processing', 'retrying') \
                   AND j.source_file_path = input.source_file_path AND j.content_type = input.content_type \
                 ORDER BY j.seq + 0 LIMIT 1) AS m), \
         u AS (INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, status, \
                   created_at, updated_at, available_at, deadline_at) \
               SELECT id, content_type, source_file_path, task_options, ingestion_task_id, $9::text, at, at, at, deadline \
               FROM input WHERE NOT EXISTS (SELECT 1 FROM found WHERE found.found_ord = input.ord) ORDER BY ord \
               RETURNING *), \
         h AS (INSERT INTO job_history (job_seq, from_status, to_status, at, actor, reason) \
               SELECT seq, NULL, $9::text, created_at, $8::text, $10::text FROM u ORDER BY seq), \
         {INSERTED_DELTAS} \
         SELECT {JOB_COLUMNS}, NULL::int8 FROM u \
         UNION ALL \
         SELECT {JOB_COLUMNS}, found_ord FROM found"
    )
});

/// The create statement's text, for the plan checks.
#[cfg(test)]
pub(super) fn create_sql() -> String {
    CREATE_SQL.clone()
}

/// Runs a batch of creates. Requests that match unfinished jobs run in one transaction
/// that first locks their ingestion tasks, so the same create racing on another replica
/// waits and then finds this one's job; requests of one batch that would match each other
/// are answered by the first of them. A batch with no matching request is one statement.
async fn create_or_match_all(
    conn: &mut Conn,
    requests: Arc<Vec<CreateRequest>>,
) -> Answers<CreateOnceOutcome> {
    // The first request of each (task, source, type) among those that match; the others
    // are answered with its job.
    let mut first_of_key: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut answered_by: Vec<usize> = Vec::with_capacity(requests.len());
    let mut sent: Vec<CreateRequest> = Vec::with_capacity(requests.len());
    let mut sent_position: Vec<Option<usize>> = vec![None; requests.len()];
    for (i, request) in requests.iter().enumerate() {
        let first = if request.match_unfinished_job {
            let p = &request.params;
            *first_of_key
                .entry((
                    p.ingestion_task_id.as_str(),
                    p.source_file_path.as_str(),
                    p.content_type.as_str(),
                ))
                .or_insert(i)
        } else {
            i
        };
        if first == i {
            sent_position[i] = Some(sent.len());
            sent.push(request.clone());
        }
        answered_by.push(first);
    }
    let mut tasks: Vec<&str> = sent
        .iter()
        .filter(|r| r.match_unfinished_job)
        .map(|r| r.params.ingestion_task_id.as_str())
        .collect();
    tasks.sort_unstable();
    tasks.dedup();
    let answers = if tasks.is_empty() {
        insert_or_match(conn, &sent).await?
    } else {
        insert_or_match_locked(conn, &sent, &tasks).await?
    };
    Ok((0..requests.len())
        .map(|i| {
            let first = answered_by[i];
            let answer = sent_position[first]
                .and_then(|k| answers.get(k))
                .cloned()
                .unwrap_or_else(|| Err(StoreError::Internal("a create got no answer".into())));
            if first == i {
                answer
            } else {
                answer.map(|outcome| match outcome {
                    CreateOnceOutcome::Created(job) | CreateOnceOutcome::MatchedUnfinished(job) => {
                        CreateOnceOutcome::MatchedUnfinished(job)
                    }
                    other => other,
                })
            }
        })
        .collect())
}

/// Runs the create statement for `requests` (no two of which match each other) and
/// answers each, in order: `Created` with its new job, or `MatchedUnfinished` with the job
/// that answers it. Callers that match hold the tasks' locks (see `CREATE_SQL`).
pub(super) async fn insert_or_match(
    conn: &mut Conn,
    requests: &[CreateRequest],
) -> Answers<CreateOnceOutcome> {
    run_create(conn, requests, None).await
}

/// `insert_or_match` in a transaction of its own that first locks `tasks`. The four
/// statements (BEGIN, the locks, the create, COMMIT) are sent together, in one round trip
/// (tokio-postgres pipelines requests that are polled together): each runs only after the
/// one before it, and should the lock or the create fail, the transaction is aborted and
/// the COMMIT rolls it back.
async fn insert_or_match_locked(
    conn: &mut Conn,
    requests: &[CreateRequest],
    tasks: &[&str],
) -> Answers<CreateOnceOutcome> {
    run_create(conn, requests, Some(tasks)).await
}

async fn run_create(
    conn: &mut Conn,
    requests: &[CreateRequest],
    lock_tasks: Option<&[&str]>,
) -> Answers<CreateOnceOutcome> {
    let lock = match lock_tasks {
        Some(_) => Some(conn.statement(LOCK_INGESTION_TASKS_SQL).await?),
        None => None,
    };
    let sql: &str = &CREATE_SQL;
    let created = plan::created_step();
    let params = || requests.iter().map(|r| &r.params);
    let ids: Vec<String> = params().map(|p| p.id.to_string()).collect();
    let types: Vec<&str> = params().map(|p| p.content_type.as_str()).collect();
    let sources: Vec<&str> = params().map(|p| p.source_file_path.as_str()).collect();
    let options: Vec<String> = params().map(|p| p.task_options.to_string()).collect();
    let ingestion: Vec<&str> = params().map(|p| p.ingestion_task_id.as_str()).collect();
    let nows: Vec<i64> = params().map(|p| p.now.as_micros()).collect();
    let deadlines: Vec<Option<i64>> = params()
        .map(|p| p.pending_deadline.map(|d| d.as_micros()))
        .collect();
    let matching: Vec<bool> = requests.iter().map(|r| r.match_unfinished_job).collect();
    let statement = conn.statement(sql).await?;
    let params: [&(dyn ToSql + Sync); 11] = [
        &ids,
        &types,
        &sources,
        &options,
        &ingestion,
        &nows,
        &deadlines,
        &created.actor.as_str(),
        &created.to.as_str(),
        &created.reason,
        &matching,
    ];
    let client = &conn.client;
    let rows = match (lock, lock_tasks) {
        (Some(lock), Some(tasks)) => {
            let tasks: Vec<&str> = tasks.to_vec();
            let lock_params: [&(dyn ToSql + Sync); 1] = [&tasks];
            // `join!` polls all four at once, in this order, so they are sent together; all
            // four are awaited, so the COMMIT is never left unread.
            let (begun, locked, rows, committed) = tokio::join!(
                client.batch_execute("BEGIN"),
                client.execute(&lock, &lock_params),
                client.query(&statement, &params),
                client.batch_execute("COMMIT"),
            );
            begun.map_err(pg_error)?;
            locked.map_err(pg_error)?;
            let rows = rows.map_err(pg_error)?;
            committed.map_err(pg_error)?;
            rows
        }
        _ => client.query(&statement, &params).await.map_err(pg_error)?,
    };
    let mut new_jobs: HashMap<String, Job> = HashMap::with_capacity(rows.len());
    let mut matched: HashMap<usize, Job> = HashMap::new();
    for row in &rows {
        let job = job_from_row(row)?;
        match get::<Option<i64>>(row, JOB_COLUMN_COUNT)? {
            Some(position) => {
                matched.insert(position as usize - 1, job);
            }
            None => {
                new_jobs.insert(job.id.to_string(), job);
            }
        }
    }
    Ok(ids
        .iter()
        .enumerate()
        .map(|(k, id)| match matched.remove(&k) {
            Some(job) => Ok(CreateOnceOutcome::MatchedUnfinished(job)),
            None => new_jobs
                .remove(id)
                .map(CreateOnceOutcome::Created)
                .ok_or_else(|| StoreError::Internal("the insert returned no row".into())),
        })
        .collect())
}

/// The claim statement for a batch of claimers who want the same content types:
/// `$1` now, `$2`/`$3` the claimers' worker ids and new leases (the first claimer gets
/// the oldest job), `$4` the requested types (or the types with their own timeout when
/// any type may be claimed), `$5` their execution deadlines, `$6` the deadline of other
/// types, `$7` how many claimers; `$8` the claimers' history reasons with the attempt
/// number left as `$9` (`plan::claim_reason_template`), `$10` the claimed status and
/// `$11` the history actor.
pub(super) fn claim_sql(any_type: bool) -> String {
    let candidate = if any_type {
        // Any type: the first entries of the `jobs_queue` index that nobody holds.
        "SELECT j.seq AS c_seq, j.status AS c_previous, j.available_at AS c_available, j.content_type AS c_type \
         FROM jobs j \
         WHERE j.status IN ('pending', 'retrying') AND j.available_at <= $1::int8 \
         ORDER BY j.available_at, j.seq \
         LIMIT $7::int8 \
         FOR UPDATE OF j SKIP LOCKED"
    } else {
        // Some types (the lookup table's names are exactly those, without repeats): per
        // type, the first entries of its range of `jobs_queue_by_type` that nobody holds,
        // locked right there; then the oldest of those over all the types. Locking inside
        // the per-type scan keeps the statement free of any join back to `jobs`, whose
        // order a plan made once (on a then empty table) could get backwards, and lets
        // the scan step over jobs other claimers hold however many they are. With several
        // types it locks up to that many jobs per type and claims only the oldest ones:
        // the others are unlocked again when the statement commits, a few milliseconds on.
        "SELECT candidate.seq AS c_seq, candidate.status AS c_previous, candidate.available_at AS c_available, t.name AS c_type \
         FROM unnest($4::text[]) AS t(name) \
         CROSS JOIN LATERAL ( \
             SELECT q.seq, q.status, q.available_at FROM jobs q \
             WHERE q.status IN ('pending', 'retrying') AND q.content_type = t.name AND q.available_at <= $1::int8 \
             ORDER BY q.available_at, q.seq LIMIT $7::int8 \
             FOR UPDATE OF q SKIP LOCKED) AS candidate \
         ORDER BY candidate.available_at, candidate.seq \
         LIMIT $7::int8"
    };
    // The update needs no condition on the status again: the picked jobs are locked,
    // and `FOR UPDATE` rechecked their conditions on the newest version of each, so
    // nothing can have moved them since. (Repeating `status = c_previous` also gave a
    // plan made on an empty table a reason to find the jobs through `jobs_by_status`,
    // reading every pending entry for each claim.)
    // A fresh attempt has no heartbeat deadline yet, so the monitor's next look
    // (`AttemptDeadlines::next`) is the execution deadline: `c_deadline` sets both.
    format!(
        "WITH c AS ( \
             SELECT c_seq, c_previous, row_number() OVER (ORDER BY c_available, c_seq) AS c_rank, \
                 COALESCE((SELECT d.deadline FROM unnest($4::text[], $5::int8[]) AS d(name, deadline) \
                           WHERE d.name = picked.c_type), $6::int8) AS c_deadline \
             FROM ({candidate}) AS picked), \
         u AS ( \
             UPDATE jobs SET status = $10::text, worker_id = ($2::text[])[c.c_rank], lease_id = ($3::text[])[c.c_rank], attempt = attempt + 1, \
                 started_at = $1::int8, updated_at = $1::int8, execution_deadline = c.c_deadline, \
                 heartbeat_deadline = NULL, last_heartbeat_at = NULL, deadline_at = c.c_deadline, \
                 result_received_at = NULL, progress = NULL, progress_message = NULL \
             FROM c \
             WHERE jobs.seq = c.c_seq \
             RETURNING jobs.*, c.c_previous, c.c_rank), \
         h AS (INSERT INTO job_history (job_seq, from_status, to_status, at, actor, reason) \
               SELECT seq, c_previous, status, $1::int8, $11::text, \
                      replace(($8::text[])[c_rank], $9::text, attempt::text) \
               FROM u ORDER BY c_rank), \
         {deltas} \
         SELECT {JOB_COLUMNS}, c_rank FROM u",
        deltas = updated_deltas("c_previous")
    )
}

// Built once: the batch statements are run for every batch.
static CLAIM_ANY_SQL: LazyLock<String> = LazyLock::new(|| claim_sql(true));
static CLAIM_SOME_SQL: LazyLock<String> = LazyLock::new(|| claim_sql(false));
static RESULTS_SQL: LazyLock<String> = LazyLock::new(results_sql);
static STATES_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT id, {CURRENT_COLUMNS} FROM jobs WHERE id = ANY($1::text[])"));

/// Claims for every request, one statement per set of wanted content types.
async fn claim_all(conn: &mut Conn, requests: Arc<Vec<ClaimParams>>) -> Answers<Option<Job>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let same = groups.iter_mut().find(|group| {
            let first = &requests[group[0]];
            first.content_types == request.content_types && first.timeouts == request.timeouts
        });
        match same {
            Some(group) => group.push(i),
            None => groups.push(vec![i]),
        }
    }
    let mut answers: Vec<Result<Option<Job>, StoreError>> =
        requests.iter().map(|_| Ok(None)).collect();
    for group in groups {
        let members: Vec<&ClaimParams> = group.iter().map(|&i| &requests[i]).collect();
        // Each group commits by itself, so a later group's failure must not undo the
        // answers of an earlier one: it fails only its own members.
        match claim_group(conn, &members).await {
            Ok(jobs) => {
                for (i, job) in group.into_iter().zip(jobs) {
                    answers[i] = Ok(job);
                }
            }
            Err(error) => {
                for i in group {
                    answers[i] = Err(error.clone());
                }
            }
        }
    }
    Ok(answers)
}

/// Claims for claimers who want the same types under the same policy; answers in order.
async fn claim_group(
    conn: &mut Conn,
    members: &[&ClaimParams],
) -> Result<Vec<Option<Job>>, StoreError> {
    // One `now` for the batch: the latest, so no job counts as due before its time.
    let first = members[0];
    let now = members.iter().map(|p| p.now).max().unwrap_or(first.now);
    // The execution deadline depends on the content type of the job that is picked, so
    // the policy's deadline for every type that can be picked goes in as a lookup table.
    // (Its types are deduplicated: a type named twice would be scanned twice, and this
    // statement's own locks do not make it skip the jobs it already picked.)
    let (known, deadlines, default_deadline) =
        plan::claim_deadline_table(&first.timeouts, &first.content_types, now);
    let names: Vec<&str> = known.iter().map(|t| t.as_str()).collect();
    let deadlines: Vec<i64> = deadlines.iter().map(|t| t.as_micros()).collect();
    // Types without their own timeout (only possible when any type may be picked).
    let default_deadline = default_deadline.as_micros();
    let workers: Vec<&str> = members.iter().map(|p| p.worker_id.as_str()).collect();
    let reasons: Vec<String> = members
        .iter()
        .map(|p| plan::claim_reason_template(p.worker_id.as_str()))
        .collect();
    let leases: Vec<String> = members
        .iter()
        .map(|_| LeaseId::new_random().to_string())
        .collect();
    let how_many = members.len() as i64;
    let sql: &str = if first.content_types.is_empty() {
        &CLAIM_ANY_SQL
    } else {
        &CLAIM_SOME_SQL
    };
    let statement = conn.statement(sql).await?;
    let rows = conn
        .client
        .query(
            &statement,
            &[
                &now.as_micros(),
                &workers,
                &leases,
                &names,
                &deadlines,
                &default_deadline,
                &how_many,
                &reasons,
                &plan::reasons::ATTEMPT_PLACEHOLDER,
                &plan::CLAIMED_STATUS.as_str(),
                &plan::CLAIM_ACTOR.as_str(),
            ],
        )
        .await
        .map_err(pg_error)?;
    let mut jobs: Vec<Option<Job>> = members.iter().map(|_| None).collect();
    for row in &rows {
        let rank: i64 = get(row, JOB_COLUMN_COUNT)?;
        if let Some(slot) = jobs.get_mut((rank - 1) as usize) {
            *slot = Some(job_from_row(row)?);
        }
    }
    Ok(jobs)
}

/// How many columns `JOB_COLUMNS` names; the batch statements return their request's
/// position after them.
const JOB_COLUMN_COUNT: usize = 22;

/// One result's planned write (`plan::ResultPlan`) with the request it answers and the
/// result's text, borrowed from the request: results can be large.
struct ResultWrite<'a> {
    request: i64,
    job_id: String,
    /// When the result arrived: `updated_at`, `result_received_at` and the history's time.
    at: i64,
    plan: ResultPlan,
    content: Option<&'a str>,
    metadata: Option<String>,
    processing_time: Option<f64>,
    error_message: Option<&'a str>,
}

impl<'a> ResultWrite<'a> {
    fn new(request: i64, p: &'a SubmitResultParams, plan: ResultPlan) -> Self {
        let (content, metadata, processing_time, error_message) = match &p.outcome {
            AttemptOutcome::Success {
                content,
                metadata,
                processing_time,
            } => (
                Some(content.as_str()),
                Some(metadata.to_string()),
                *processing_time,
                None,
            ),
            AttemptOutcome::Failure { error_message, .. } => {
                (None, None, None, Some(error_message.as_str()))
            }
        };
        ResultWrite {
            request,
            job_id: p.job_id.to_string(),
            at: p.now.as_micros(),
            plan,
            content,
            metadata,
            processing_time,
            error_message,
        }
    }

    fn success(&self) -> bool {
        matches!(self.plan.change, ResultChange::Success { .. })
    }

    fn attempt_end(&self) -> Option<&plan::AttemptEnd> {
        match &self.plan.change {
            ResultChange::Failure(end) => Some(end),
            ResultChange::Success { .. } => None,
        }
    }

    fn completed_at(&self) -> Option<i64> {
        match &self.plan.change {
            ResultChange::Success { completed_at, .. } => Some(completed_at.as_micros()),
            ResultChange::Failure(end) => end.completed_at.map(|t| t.as_micros()),
        }
    }
}

/// Records every result. In-time successes (nearly all results) are written first,
/// without reading the jobs; the rest, and any success that write did not apply to, are
/// judged: their jobs' states are read, the domain judges each result, and all accepted
/// ones are written in one conditional statement with their history and hand-off rows. A
/// result whose job moved in between is answered with the state it is in now.
async fn submit_all(conn: &mut Conn, requests: Arc<Vec<SubmitResultParams>>) -> Answers<Job> {
    let mut answers: Vec<Option<Result<Job, StoreError>>> = requests.iter().map(|_| None).collect();
    let in_time: Vec<ResultWrite> = requests
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            plan::plan_in_time_success(p).map(|plan| ResultWrite::new(i as i64, p, plan))
        })
        .collect();
    if !in_time.is_empty() {
        for row in write_results(conn, &in_time).await? {
            let request: i64 = get(&row, JOB_COLUMN_COUNT)?;
            answers[request as usize] = Some(job_from_row(&row));
        }
    }
    let rest: Vec<usize> = (0..requests.len())
        .filter(|&i| answers[i].is_none())
        .collect();
    if !rest.is_empty() {
        // The in-time writes are committed: a failure from here on is the rest's alone.
        match judge_and_write(conn, &requests, &rest).await {
            Ok(judged) => {
                for (i, answer) in rest.into_iter().zip(judged) {
                    answers[i] = Some(answer);
                }
            }
            Err(error) => {
                for i in rest {
                    answers[i] = Some(Err(error.clone()));
                }
            }
        }
    }
    Ok(answers
        .into_iter()
        .map(|answer| {
            answer.unwrap_or_else(|| Err(StoreError::Internal("a result got no answer".into())))
        })
        .collect())
}

/// The judged way for `requests[i]`, `i` in `which`: answers in that order.
async fn judge_and_write(
    conn: &mut Conn,
    requests: &[SubmitResultParams],
    which: &[usize],
) -> Result<Vec<Result<Job, StoreError>>, StoreError> {
    let ids: Vec<String> = which
        .iter()
        .map(|&i| requests[i].job_id.to_string())
        .collect();
    let sql: &str = &STATES_SQL;
    let statement = conn.statement(sql).await?;
    let rows = conn
        .client
        .query(&statement, &[&ids])
        .await
        .map_err(pg_error)?;
    let mut states: HashMap<String, (i64, plan::Row)> = HashMap::with_capacity(rows.len());
    for row in &rows {
        states.insert(get(row, 0)?, current_from_row(row, 1)?);
    }

    // `request` in a write is its position in `which`.
    let mut answers: Vec<Option<Result<Job, StoreError>>> = which.iter().map(|_| None).collect();
    // Each planned write and the row it is for (for the conflict answer).
    let mut writes = Vec::with_capacity(which.len());
    let mut seqs = Vec::with_capacity(which.len());
    for (k, id) in ids.iter().enumerate() {
        match states.get(id) {
            None => answers[k] = Some(Err(StoreError::NotFound)),
            Some((seq, current)) => match plan::plan_result(current, &requests[which[k]]) {
                Ok(plan) => {
                    writes.push(ResultWrite::new(k as i64, &requests[which[k]], plan));
                    seqs.push(*seq);
                }
                Err(refusal) => answers[k] = Some(Err(refusal)),
            },
        }
    }
    if !writes.is_empty() {
        for row in write_results(conn, &writes).await? {
            let k: i64 = get(&row, JOB_COLUMN_COUNT)?;
            answers[k as usize] = Some(job_from_row(&row));
        }
    }
    let mut done = Vec::with_capacity(answers.len());
    for (k, answer) in answers.into_iter().enumerate() {
        done.push(match answer {
            Some(answer) => answer,
            // Planned but not written: another request or replica moved the job first.
            None => match writes.iter().position(|w| w.request == k as i64) {
                Some(at) => Err(conflict(conn, seqs[at], writes[at].plan.expected_status).await),
                None => Err(StoreError::Internal(
                    "a result was neither planned nor refused".into(),
                )),
            },
        });
    }
    Ok(done)
}

/// The results statement: per result (arrays `$1`-`$26`) the job, the state it expects,
/// the state it leaves, and its one or two history rows (`$19`-`$22` the first, `$23`-`$26`
/// the second or NULLs). The history rows travel with their result rather than in arrays
/// of their own: matching them up would be a join, and with only nested loops allowed
/// (`Session::Batch`) every result would be compared with every history row.
pub(super) fn results_sql() -> String {
    format!(
        "WITH r AS (SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::bool[], $5::text[], $6::int4[], \
                 $7::text[], $8::int4[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::bool[], $14::text[], \
                 $15::text[], $16::float8[], $17::text[], $18::text[], \
                 $19::text[], $20::text[], $21::text[], $22::text[], $23::text[], $24::text[], $25::text[], $26::text[]) \
             AS r(request, id, expected_status, any_lease, expected_lease, expected_retry_count, new_status, \
                  new_retry_count, new_available_at, new_deadline_at, new_completed_at, at, success, content, metadata, \
                  took, error, handoff, from1, to1, actor1, reason1, from2, to2, actor2, reason2)), \
         u AS ( \
             UPDATE jobs SET status = r.new_status, retry_count = COALESCE(r.new_retry_count, jobs.retry_count), \
                 available_at = COALESCE(r.new_available_at, jobs.available_at), deadline_at = r.new_deadline_at, \
                 completed_at = r.new_completed_at, updated_at = r.at, result_received_at = r.at, error_message = r.error, \
                 result_content = CASE WHEN r.success THEN r.content ELSE jobs.result_content END, \
                 result_metadata = CASE WHEN r.success THEN r.metadata ELSE jobs.result_metadata END, \
                 processing_time = CASE WHEN r.success THEN r.took ELSE jobs.processing_time END, \
                 progress = CASE WHEN r.success THEN 100 ELSE jobs.progress END \
             FROM r \
             WHERE jobs.id = r.id AND jobs.status = r.expected_status \
               AND (r.any_lease OR jobs.lease_id IS NOT DISTINCT FROM r.expected_lease) \
               AND jobs.result_received_at IS NULL \
               AND (r.expected_retry_count IS NULL OR jobs.retry_count = r.expected_retry_count) \
             RETURNING jobs.*, r.request AS r_request, r.handoff AS r_handoff, r.at AS r_at, \
                 r.expected_status AS r_expected, \
                 r.from1, r.to1, r.actor1, r.reason1, r.from2, r.to2, r.actor2, r.reason2), \
         h AS (INSERT INTO job_history (job_seq, from_status, to_status, at, actor, reason) \
               SELECT u.seq, s.from_status, s.to_status, u.r_at, s.actor, s.reason \
               FROM u CROSS JOIN LATERAL (VALUES (1, u.from1, u.to1, u.actor1, u.reason1), \
                                                 (2, u.from2, u.to2, u.actor2, u.reason2)) \
                   AS s(n, from_status, to_status, actor, reason) \
               WHERE s.to_status IS NOT NULL \
               ORDER BY u.r_request, s.n), \
         o AS (INSERT INTO handoffs (job_id, kind, payload, created_at) \
               SELECT u.id, u.r_handoff, {HANDOFF_PAYLOAD}, u.r_at FROM u \
               WHERE u.r_handoff IS NOT NULL ORDER BY u.r_request), \
         {deltas} \
         SELECT {JOB_COLUMNS}, r_request FROM u",
        deltas = updated_deltas("r_expected")
    )
}

async fn write_results(
    conn: &mut Conn,
    writes: &[ResultWrite<'_>],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let sql: &str = &RESULTS_SQL;
    let column = |f: for<'w> fn(&'w ResultWrite<'w>) -> Option<&'w str>| -> Vec<Option<&str>> {
        writes.iter().map(f).collect()
    };
    let requests: Vec<i64> = writes.iter().map(|w| w.request).collect();
    let ids = column(|w| Some(w.job_id.as_str()));
    let expected_statuses = column(|w| Some(w.plan.expected_status.as_str()));
    let any_leases: Vec<bool> = writes.iter().map(|w| w.plan.expected_lease.any()).collect();
    let expected_leases = column(|w| w.plan.expected_lease.expected());
    let expected_retry_counts: Vec<Option<i32>> = writes
        .iter()
        .map(|w| w.plan.expected_retry_count.map(|n| n as i32))
        .collect();
    let statuses = column(|w| Some(w.plan.status().as_str()));
    let retry_counts: Vec<Option<i32>> = writes
        .iter()
        .map(|w| {
            w.attempt_end()
                .and_then(|end| end.retry_count)
                .map(|n| n as i32)
        })
        .collect();
    let available_ats: Vec<Option<i64>> = writes
        .iter()
        .map(|w| {
            w.attempt_end()
                .and_then(|end| end.available_at)
                .map(|t| t.as_micros())
        })
        .collect();
    let deadline_ats: Vec<Option<i64>> = writes
        .iter()
        .map(|w| {
            w.attempt_end()
                .and_then(|end| end.deadline_at)
                .map(|t| t.as_micros())
        })
        .collect();
    let completed_ats: Vec<Option<i64>> = writes.iter().map(ResultWrite::completed_at).collect();
    let ats: Vec<i64> = writes.iter().map(|w| w.at).collect();
    let successes: Vec<bool> = writes.iter().map(ResultWrite::success).collect();
    let contents = column(|w| w.content);
    let metadatas = column(|w| w.metadata.as_deref());
    let processing_times: Vec<Option<f64>> = writes.iter().map(|w| w.processing_time).collect();
    let errors = column(|w| w.error_message);
    let handoffs = column(|w| w.plan.handoff().map(HandoffKind::as_str));
    let steps: Vec<Vec<&HistoryStep>> = writes.iter().map(|w| w.plan.history()).collect();
    if steps.iter().any(|s| s.is_empty() || s.len() > 2) {
        return Err(StoreError::Internal(
            "a result writes one or two history rows".into(),
        ));
    }
    // The result's `slot`th history row (0 or 1), or NULLs.
    let step_column = |slot: usize, f: fn(&HistoryStep) -> Option<&str>| -> Vec<Option<&str>> {
        steps
            .iter()
            .map(|s| s.get(slot).and_then(|step| f(step)))
            .collect()
    };
    let froms: [Vec<Option<&str>>; 2] =
        [0, 1].map(|slot| step_column(slot, |s| s.from.map(JobStatus::as_str)));
    let tos: [Vec<Option<&str>>; 2] = [0, 1].map(|slot| step_column(slot, |s| Some(s.to.as_str())));
    let actors: [Vec<Option<&str>>; 2] =
        [0, 1].map(|slot| step_column(slot, |s| Some(s.actor.as_str())));
    let reasons: [Vec<Option<&str>>; 2] =
        [0, 1].map(|slot| step_column(slot, |s| Some(s.reason.as_str())));
    let params: [&(dyn ToSql + Sync); 26] = [
        &requests,
        &ids,
        &expected_statuses,
        &any_leases,
        &expected_leases,
        &expected_retry_counts,
        &statuses,
        &retry_counts,
        &available_ats,
        &deadline_ats,
        &completed_ats,
        &ats,
        &successes,
        &contents,
        &metadatas,
        &processing_times,
        &errors,
        &handoffs,
        &froms[0],
        &tos[0],
        &actors[0],
        &reasons[0],
        &froms[1],
        &tos[1],
        &actors[1],
        &reasons[1],
    ];
    let statement = conn.statement(sql).await?;
    conn.client
        .query(&statement, &params)
        .await
        .map_err(pg_error)
}
