//! Group commit for the hot operations (create, claim, result).
//!
//! On PostgreSQL most of a small statement's cost is fixed: parsing and planning, executor
//! start-up, the statement-level statistics trigger, and the commit with its WAL flush.
//! Run one at a time, a job's three statements cost about 1.5 ms of database CPU, so
//! concurrent requests of one kind are instead queued here and run together as one
//! statement over arrays (`unnest`), paying the fixed cost once per batch. When the
//! database is idle a batch holds one request and nothing waits; under load the queue
//! fills while earlier batches run, so batches grow exactly when it pays.
//!
//! Correctness does not depend on the batching: each request's change is still
//! conditional on the state it expects, so a batch is equivalent to running its requests
//! one after another, and a request whose condition fails is told so like a single one.
//! A batch that fails as a whole for a reason other than the database being unreachable
//! is rerun one request at a time, so one bad request cannot fail its neighbours.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::pool::{Conn, Pool};
use super::run_pooled;
use crate::store::{StoreError, StoreFuture};

/// Requests per statement at most: enough to amortize the fixed cost, small enough that
/// one statement stays short.
const MAX_BATCH: usize = 128;
/// Batches of one kind that run at once. One: the next batch collects everything that
/// arrives while this one runs, so batches grow with the load. Two in flight halved the
/// batch size and cost more database CPU per job (BENCHMARKS.md).
const MAX_IN_FLIGHT: usize = 1;

/// One kind of operation that can run many requests in one statement.
pub(super) trait BatchOp: Send + Sync + 'static {
    type Request: Clone + Send + Sync + 'static;
    type Response: Send + 'static;

    /// Runs `requests` (at least one) and answers each, in order. An `Err` for the whole
    /// batch means nothing was written. (Shared, not owned: a failed batch is rerun one
    /// request at a time, and results can be large.)
    fn run<'c>(
        conn: &'c mut Conn,
        requests: Arc<Vec<Self::Request>>,
    ) -> StoreFuture<'c, Vec<Result<Self::Response, StoreError>>>;
}

type Queued<Op> = (
    <Op as BatchOp>::Request,
    oneshot::Sender<Result<<Op as BatchOp>::Response, StoreError>>,
);

/// The queue of one kind of operation; a task drains it into batches.
pub(super) struct Batcher<Op: BatchOp> {
    queue: mpsc::UnboundedSender<Queued<Op>>,
    pool: Arc<Pool>,
    timeout: Duration,
}

impl<Op: BatchOp> Batcher<Op> {
    /// Starts the task that runs batches, each within `timeout`, on connections of its
    /// own made with `config` (so each kind can have its own planner settings).
    pub fn start(config: tokio_postgres::Config, timeout: Duration) -> Batcher<Op> {
        let pool = Arc::new(Pool::new(config, MAX_IN_FLIGHT, timeout));
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(dispatch::<Op>(requests, pool.clone(), timeout));
        Batcher {
            queue,
            pool,
            timeout,
        }
    }

    /// Closes the connections; later requests answer `Unavailable`.
    pub fn close(&self) {
        self.pool.close();
    }

    /// Queues `request` and waits for its answer, for at most the operation timeout
    /// (waiting in the queue included), so an outage is answered as quickly as without
    /// batching. A request given up on while still queued is dropped from its batch.
    pub async fn submit(&self, request: Op::Request) -> Result<Op::Response, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((request, reply))
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Unavailable("the store is closed".into())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "PostgreSQL did not answer within {:?}",
                self.timeout
            ))),
        }
    }
}

async fn dispatch<Op: BatchOp>(
    mut requests: mpsc::UnboundedReceiver<Queued<Op>>,
    pool: Arc<Pool>,
    timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = requests.recv().await {
        // Wait for a free slot before draining: what arrives meanwhile joins this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that gave up (timed out, disconnected) must not get work done for it:
        // a claim nobody receives would hold a job until its attempt times out.
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            run_batch::<Op>(&pool, timeout, batch).await;
            drop(slot);
        });
    }
}

async fn run_batch<Op: BatchOp>(pool: &Pool, timeout: Duration, batch: Vec<Queued<Op>>) {
    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let requests = Arc::new(requests);
    let started = std::time::Instant::now();
    let together = run_pooled(pool, timeout, |conn| Op::run(conn, requests.clone())).await;
    tracing::trace!(
        op = std::any::type_name::<Op>(),
        size = requests.len(),
        micros = started.elapsed().as_micros() as u64,
        "batch"
    );
    match together {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(error @ StoreError::Unavailable(_)) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Err(error) if requests.len() == 1 => {
            let _ = replies
                .into_iter()
                .next()
                .map(|reply| reply.send(Err(error)));
        }
        Err(error) => {
            tracing::warn!(%error, size = requests.len(), "a batch failed; running its requests one by one");
            for (request, reply) in requests.iter().zip(replies) {
                let alone = Arc::new(vec![request.clone()]);
                let alone = run_pooled(pool, timeout, |conn| Op::run(conn, alone)).await;
                let answer = alone.and_then(|mut answers| {
                    answers.pop().unwrap_or_else(|| {
                        Err(StoreError::Internal("a batch gave no answer".into()))
                    })
                });
                let _ = reply.send(answer);
            }
        }
    }
}
