//! The deliveries tables on SQLite (`migrations/sqlite/0003_deliveries.sql`). Writes go
//! through the store's single writer, so a claim needs no row locks: the writer is the
//! only one changing deliveries.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::SqliteStore;
use crate::clock::Timestamp;
use crate::store::deliveries::*;
use crate::store::{StoreError, StoreFuture};

const DELIVERY_COLUMNS: &str = "id, event_id, sink, job_id, state, attempts, next_attempt_at, \
     last_error, created_at, updated_at, delivered_at";

/// A delivery row as stored; `into_delivery` checks its names.
struct DeliveryRow {
    id: i64,
    event_id: String,
    sink: String,
    job_id: String,
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
    delivered_at: Option<i64>,
}

fn delivery_row(row: &Row<'_>) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: row.get(0)?,
        event_id: row.get(1)?,
        sink: row.get(2)?,
        job_id: row.get(3)?,
        state: row.get(4)?,
        attempts: row.get(5)?,
        next_attempt_at: row.get(6)?,
        last_error: row.get(7)?,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
        delivered_at: row.get(10)?,
    })
}

impl DeliveryRow {
    fn into_delivery(self) -> Result<Delivery, StoreError> {
        Ok(Delivery {
            id: self.id,
            event_id: self.event_id,
            sink: parse_sink(&self.sink)?,
            job_id: parse_job_id(&self.job_id)?,
            state: parse_state(&self.state)?,
            attempts: self.attempts.max(0) as u32,
            next_attempt_at: Timestamp::from_micros(self.next_attempt_at),
            last_error: self.last_error,
            created_at: Timestamp::from_micros(self.created_at),
            updated_at: Timestamp::from_micros(self.updated_at),
            delivered_at: self.delivered_at.map(Timestamp::from_micros),
        })
    }
}

/// Claims for deliveries a fan-out creates: the first `room` of them are created claimed
/// with `token` until `until`, so they need no second write to be claimed.
struct ClaimingNew<'a> {
    token: &'a str,
    room: usize,
    until: i64,
}

fn fan_out(
    conn: &Connection,
    p: FanOutParams,
    mut claiming: Option<ClaimingNew<'_>>,
    claimed: &mut Vec<Claim>,
) -> Result<FanOutReport, StoreError> {
    if p.limit == 0 {
        return Ok(FanOutReport::default());
    }
    let waiting: Vec<(i64, String, Option<String>)> = conn
        .prepare_cached(
            "SELECT h.id, h.job_id, j.task_options FROM handoffs h LEFT JOIN jobs j ON j.id = h.job_id \
             WHERE h.fanned_out_at IS NULL ORDER BY h.id LIMIT ?1",
        )?
        .query_map([p.limit as i64], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut report = FanOutReport::default();
    let now = p.now.as_micros();
    for (handoff_id, job_id, task_options) in waiting {
        let event_id = new_event_id();
        // A job deleted before its hand-off was fanned out has nothing left to deliver.
        let sinks = match &task_options {
            Some(options) => sinks_for(options, &p),
            None => Vec::new(),
        };
        for sink in sinks {
            // Claimed at creation: attempt 1 is running, due again when the claim expires.
            let claim = claiming.as_mut().filter(|c| c.room > 0);
            let (token, attempts, due) = match &claim {
                Some(c) => (Some(c.token), 1, c.until),
                None => (None, 0, now),
            };
            let created: Option<i64> = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO deliveries (handoff_id, event_id, sink, job_id, state, attempts, \
                     next_attempt_at, claim_token, created_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?7, ?8, ?8) RETURNING id",
                )?
                .query_row(
                    params![handoff_id, event_id, sink.as_str(), job_id, attempts, due, token, now],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(delivery_id) = created else {
                continue;
            };
            report.n_deliveries += 1;
            if let Some(c) = claim {
                c.room -= 1;
                claimed.push((
                    delivery_id,
                    1,
                    sink.as_str().to_owned(),
                    handoff_id,
                    event_id.clone(),
                ));
            }
        }
        conn.prepare_cached(
            "UPDATE handoffs SET fanned_out_at = ?2, event_id = ?3 WHERE id = ?1 AND fanned_out_at IS NULL",
        )?
        .execute(params![handoff_id, now, event_id])?;
        report.n_handoffs += 1;
    }
    Ok(report)
}

/// A dispatch step on the writer: records, then claims due deliveries (older ones must
/// not wait behind a stream of new hand-offs), then fans out waiting hand-offs, creating
/// as many of their deliveries claimed as there is room left. The events are read after.
fn dispatch_step(
    conn: &Connection,
    p: DispatchStepParams,
) -> Result<(Vec<RecordOutcome>, FanOutReport, String, Vec<Claim>), StoreError> {
    let recorded = p
        .records
        .into_iter()
        .map(|item| record(conn, item))
        .collect::<Result<Vec<_>, _>>()?;
    let Some((f, c)) = p.claim else {
        return Ok((recorded, FanOutReport::default(), String::new(), Vec::new()));
    };
    let until = c.now.plus(c.claim_for).as_micros();
    let limit = c.limit;
    let (token, mut claimed) = claim(conn, c)?;
    let claiming = ClaimingNew {
        token: &token,
        room: limit.saturating_sub(claimed.len()),
        until,
    };
    let report = fan_out(conn, f, Some(claiming), &mut claimed)?;
    Ok((recorded, report, token, claimed))
}

fn stored_event(
    conn: &Connection,
    handoff_id: i64,
    event_id: String,
) -> Result<StoredEvent, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT h.job_id, h.kind, h.payload, h.created_at, j.ingestion_task_id, j.task_options, \
             j.retry_count, j.result_content, j.result_metadata, j.processing_time, j.id IS NOT NULL \
             FROM handoffs h LEFT JOIN jobs j ON j.id = h.job_id WHERE h.id = ?1",
        )?
        .query_row([handoff_id], |row| {
            let job_exists: bool = row.get(10)?;
            Ok(StoredEvent {
                event_id,
                job_id: row.get(0)?,
                handoff_kind: row.get(1)?,
                handoff_payload: row.get(2)?,
                handoff_created_at: row.get(3)?,
                job: if job_exists {
                    Some(StoredEventJob {
                        ingestion_task_id: row.get(4)?,
                        task_options: row.get(5)?,
                        retry_count: row.get(6)?,
                        result_content: row.get(7)?,
                        result_metadata: row.get(8)?,
                        processing_time: row.get(9)?,
                    })
                } else {
                    None
                },
            })
        })?)
}

/// The claim: the due pending deliveries, oldest due first. `INDEXED BY`: left to itself,
/// SQLite read every pending delivery through `deliveries_by_state` and sorted them, for
/// every claim; with a backlog of 20,000 pending deliveries that held delivery to about
/// 400 events per second (BENCHMARKS.md).
pub(super) const CLAIM_DELIVERIES_SQL: &str =
    "UPDATE deliveries SET claim_token = ?1, attempts = attempts + 1, next_attempt_at = ?2, updated_at = ?3 \
     WHERE id IN (SELECT id FROM deliveries INDEXED BY deliveries_due \
                  WHERE state = 'pending' AND next_attempt_at <= ?3 ORDER BY next_attempt_at LIMIT ?4) \
     RETURNING id, attempts, sink, handoff_id, event_id";

/// When the next pending delivery is due (see `CLAIM_DELIVERIES_SQL` for the index).
pub(super) const NEXT_DELIVERY_DUE_SQL: &str =
    "SELECT next_attempt_at FROM deliveries INDEXED BY deliveries_due \
     WHERE state = 'pending' ORDER BY next_attempt_at LIMIT 1";

/// A claimed delivery before its event is read: `(id, attempt, sink, handoff id, event id)`.
type Claim = (i64, i64, String, i64, String);

/// Claims on the writer; the events (results can be large) are read afterwards on a
/// reader connection, so the writer is not held up by reading them.
fn claim(conn: &Connection, p: ClaimDeliveriesParams) -> Result<(String, Vec<Claim>), StoreError> {
    let token = new_claim_token();
    let claimed: Vec<Claim> = conn
        .prepare_cached(CLAIM_DELIVERIES_SQL)?
        .query_map(
            params![
                token,
                p.now.plus(p.claim_for).as_micros(),
                p.now.as_micros(),
                p.limit as i64
            ],
            |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            },
        )?
        .collect::<Result<_, _>>()?;
    Ok((token, claimed))
}

/// Reads each claimed delivery's event, once per hand-off: its deliveries to several
/// sinks share it (a result can be tens of megabytes).
fn claimed_events(
    conn: &Connection,
    token: String,
    claimed: Vec<Claim>,
) -> Result<Vec<ClaimedDelivery>, StoreError> {
    let mut events = EventsByHandoff::default();
    let mut out = Vec::with_capacity(claimed.len());
    for (delivery_id, attempt, sink, handoff_id, event_id) in claimed {
        let event = events.get_or_build(handoff_id, || stored_event(conn, handoff_id, event_id))?;
        out.push(ClaimedDelivery {
            delivery_id,
            claim_token: token.clone(),
            attempt: attempt.max(0) as u32,
            sink: parse_sink(&sink)?,
            event,
        });
    }
    Ok(out)
}

fn record(conn: &Connection, p: RecordAttemptParams) -> Result<RecordOutcome, StoreError> {
    // One conditional update, fenced by the claim, reads back what the attempts log needs:
    // the due time is kept unless the outcome sets a new one.
    let (outcome, state, _, last_error, delivered_at) = after_attempt(&p.result, 0, p.now);
    let next_attempt_at: Option<i64> = match &p.result {
        AttemptResult::RetryAt { at, .. } => Some(at.as_micros()),
        _ => None,
    };
    let attempts: Option<i64> = conn
        .prepare_cached(
            "UPDATE deliveries SET state = ?3, next_attempt_at = COALESCE(?4, next_attempt_at), \
             last_error = COALESCE(?5, last_error), delivered_at = ?6, claim_token = NULL, updated_at = ?7 \
             WHERE id = ?1 AND claim_token = ?2 AND state = 'pending' RETURNING attempts",
        )?
        .query_row(
            params![
                p.delivery_id,
                p.claim_token,
                state.as_str(),
                next_attempt_at,
                last_error,
                delivered_at,
                p.now.as_micros()
            ],
            |row| row.get(0),
        )
        .optional()?;
    let Some(attempts) = attempts else {
        return Ok(RecordOutcome::ClaimLost);
    };
    let error = match &p.result {
        AttemptResult::Delivered => None,
        AttemptResult::RetryAt { error, .. } | AttemptResult::Dead { error } => {
            Some(error.as_str())
        }
    };
    conn.prepare_cached(
        "INSERT INTO delivery_attempts (delivery_id, attempt, at, outcome, http_status, error) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        p.delivery_id,
        attempts,
        p.now.as_micros(),
        outcome.as_str(),
        p.http_status,
        error
    ])?;
    Ok(RecordOutcome::Recorded)
}

/// The condition of the partial index `deliveries_unsettled` (migration 0006).
const UNSETTLED: &str = "state IN ('pending', 'dead')";

fn list(conn: &Connection, p: DeliveryListParams) -> Result<DeliveryPage, StoreError> {
    let mut conditions = vec!["id < ?1".to_owned()];
    let mut values: Vec<rusqlite::types::Value> = vec![p.cursor.unwrap_or(i64::MAX).into()];
    if let Some(state) = p.state {
        values.push(state.as_str().to_owned().into());
        conditions.push(format!("state = ?{}", values.len()));
        if state != DeliveryState::Delivered {
            // Spelled as the partial index `deliveries_unsettled` is, so SQLite uses it.
            conditions.push(UNSETTLED.to_owned());
        }
    }
    if let Some(sink) = p.sink {
        values.push(sink.as_str().to_owned().into());
        conditions.push(format!("sink = ?{}", values.len()));
    }
    if let Some(job_id) = p.job_id {
        values.push(job_id.to_string().into());
        conditions.push(format!("job_id = ?{}", values.len()));
    }
    values.push(((p.limit + 1) as i64).into());
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE {} ORDER BY id DESC LIMIT ?{}",
        conditions.join(" AND "),
        values.len()
    );
    let rows: Vec<DeliveryRow> = conn
        .prepare_cached(&sql)?
        .query_map(rusqlite::params_from_iter(values), delivery_row)?
        .collect::<Result<_, _>>()?;
    let mut deliveries = rows
        .into_iter()
        .map(DeliveryRow::into_delivery)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if deliveries.len() > p.limit {
        deliveries.truncate(p.limit);
        deliveries.last().map(|d| d.id)
    } else {
        None
    };
    Ok(DeliveryPage {
        deliveries,
        next_cursor,
    })
}

fn select_delivery(conn: &Connection, id: i64) -> Result<Option<Delivery>, StoreError> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?1");
    conn.prepare_cached(&sql)?
        .query_row([id], delivery_row)
        .optional()?
        .map(DeliveryRow::into_delivery)
        .transpose()
}

/// One stored attempt as read: attempt, at, outcome, HTTP status, error.
type AttemptRow = (i64, i64, String, Option<i64>, Option<String>);

fn detail(conn: &Connection, id: i64) -> Result<Option<DeliveryDetail>, StoreError> {
    let Some(delivery) = select_delivery(conn, id)? else {
        return Ok(None);
    };
    let rows: Vec<AttemptRow> = conn
        .prepare_cached(
            "SELECT attempt, at, outcome, http_status, error FROM delivery_attempts \
             WHERE delivery_id = ?1 ORDER BY id",
        )?
        .query_map([id], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let attempts = rows
        .into_iter()
        .map(|(attempt, at, outcome, http_status, error)| {
            Ok(DeliveryAttempt {
                attempt: attempt.max(0) as u32,
                at: Timestamp::from_micros(at),
                outcome: AttemptOutcomeKind::parse(&outcome).ok_or_else(|| {
                    StoreError::Internal(format!("stored attempt outcome {outcome:?} is invalid"))
                })?,
                http_status: http_status.and_then(|s| u16::try_from(s).ok()),
                error,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(DeliveryDetail { delivery, attempts }))
}

fn redrive(conn: &Connection, p: RedriveParams) -> Result<RedriveOutcome, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, claim_token = NULL, \
             updated_at = ?2 WHERE id = ?1 AND state = 'dead'",
        )?
        .execute(params![p.delivery_id, p.now.as_micros()])?;
    let delivery = select_delivery(conn, p.delivery_id)?.ok_or(StoreError::NotFound)?;
    Ok(if changed == 1 {
        RedriveOutcome::Redriven(delivery)
    } else {
        RedriveOutcome::NotDead(delivery.state)
    })
}

fn statistics(conn: &Connection) -> Result<DeliveryStatistics, StoreError> {
    let mut stats = DeliveryStatistics::default();
    let rows: Vec<(String, String, i64)> = conn
        .prepare_cached(
            "SELECT sink, state, count(*) FROM deliveries WHERE state IN ('pending', 'dead') \
             GROUP BY sink, state",
        )?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (sink, state, n) in rows {
        let counts = stats.per_sink.entry(sink).or_default();
        match state.as_str() {
            "pending" => counts.pending = n.max(0) as u64,
            _ => counts.dead = n.max(0) as u64,
        }
    }
    stats.oldest_pending_created_at = conn
        .prepare_cached("SELECT min(created_at) FROM deliveries WHERE state = 'pending'")?
        .query_row([], |row| row.get::<_, Option<i64>>(0))?
        .map(Timestamp::from_micros);
    Ok(stats)
}

fn next_due(conn: &Connection) -> Result<Option<Timestamp>, StoreError> {
    let waiting = conn
        .prepare_cached("SELECT 1 FROM handoffs WHERE fanned_out_at IS NULL LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?
        .is_some();
    if waiting {
        return Ok(Some(Timestamp::from_micros(0)));
    }
    Ok(conn
        .prepare_cached(NEXT_DELIVERY_DUE_SQL)?
        .query_row([], |row| row.get::<_, i64>(0))
        .optional()?
        .map(Timestamp::from_micros))
}

impl SqliteStore {
    /// The events of claimed deliveries, read on a reader connection after the claim.
    async fn events_of(
        &self,
        token: String,
        claimed: Vec<Claim>,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |conn| claimed_events(conn, token, claimed))
            .await
    }
}

impl DeliveryStore for SqliteStore {
    fn fan_out_handoffs(&self, params: FanOutParams) -> StoreFuture<'_, FanOutReport> {
        self.write(move |conn| fan_out(conn, params, None, &mut Vec::new()))
    }

    fn claim_deliveries(
        &self,
        params: ClaimDeliveriesParams,
    ) -> StoreFuture<'_, Vec<ClaimedDelivery>> {
        let claiming = self.write(move |conn| claim(conn, params));
        Box::pin(async move {
            let (token, claimed) = claiming.await?;
            self.events_of(token, claimed).await
        })
    }

    fn dispatch_step(&self, params: DispatchStepParams) -> StoreFuture<'_, DispatchStep> {
        // After the requests' writes (see `writer::QueuedWrite::background`).
        let writing = self.write_in_background(move |conn| dispatch_step(conn, params));
        Box::pin(async move {
            let (recorded, fanned_out, token, claimed) = writing.await?;
            Ok(DispatchStep {
                recorded,
                fanned_out,
                claimed: self.events_of(token, claimed).await?,
            })
        })
    }

    fn list_deliveries(&self, params: DeliveryListParams) -> StoreFuture<'_, DeliveryPage> {
        self.read(move |conn| list(conn, params))
    }

    fn get_delivery(&self, id: i64) -> StoreFuture<'_, Option<DeliveryDetail>> {
        self.read(move |conn| {
            // One read transaction, so the delivery and its attempts agree.
            conn.execute_batch("BEGIN")?;
            let result = detail(conn, id);
            conn.execute_batch("COMMIT")?;
            result
        })
    }

    fn redrive_delivery(&self, params: RedriveParams) -> StoreFuture<'_, RedriveOutcome> {
        self.write(move |conn| redrive(conn, params))
    }

    fn delivery_statistics(&self) -> StoreFuture<'_, DeliveryStatistics> {
        self.read(statistics)
    }

    fn next_delivery_due(&self) -> StoreFuture<'_, Option<Timestamp>> {
        self.read(next_due)
    }

    fn handoff_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.handoffs_committed.subscribe()
    }
}
