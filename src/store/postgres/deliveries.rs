//! The deliveries tables on PostgreSQL (`migrations/postgres/0005_deliveries.sql`), safe
//! with several replicas: fan-out locks the hand-offs it handles (waiting for another
//! replica's fan-out, which is short) and claims lock the deliveries they take with
//! `SKIP LOCKED`, so replicas split the work; every outcome
//! is recorded only with the claim's token, so an attempt whose claim expired and was taken
//! over can change nothing.

use std::collections::HashMap;

use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::listen::{announce_wakeups, listen_for_wakeups};
use super::pool::Conn;
use super::{get, pg_error, PostgresStore};
use crate::clock::Timestamp;
use crate::store::deliveries::*;
use crate::store::{StoreError, StoreFuture};

/// The channel replicas announce committed hand-offs on.
const HANDOFFS_CHANNEL: &str = "morag_handoffs_recorded";

/// Tells dispatchers that a hand-off committed: this replica's at once, the others' by a
/// NOTIFY sent after the commit (coalesced, by `listen::announce_wakeups`).
pub(super) struct HandoffSignal {
    local: watch::Sender<u64>,
    announce: std::sync::Arc<tokio::sync::Notify>,
}

impl HandoffSignal {
    /// Starts the listener and the announcer; both stop when `stop` turns true.
    pub(super) fn start(
        config: tokio_postgres::Config,
        pool: std::sync::Arc<super::pool::Pool>,
        replica_id: String,
        stop: watch::Receiver<bool>,
    ) -> HandoffSignal {
        let (local, _) = watch::channel(0u64);
        let announce = std::sync::Arc::new(tokio::sync::Notify::new());
        // No fallback tick here: the dispatcher polls the store on its own interval.
        tokio::spawn(listen_for_wakeups(
            config,
            HANDOFFS_CHANNEL,
            None,
            replica_id.clone(),
            local.clone(),
            stop.clone(),
        ));
        tokio::spawn(announce_wakeups(
            pool,
            HANDOFFS_CHANNEL,
            replica_id,
            announce.clone(),
            stop,
        ));
        HandoffSignal { local, announce }
    }

    pub(super) fn committed(&self) {
        self.local.send_modify(|n| *n += 1);
        self.announce.notify_one();
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.local.subscribe()
    }
}

const DELIVERY_COLUMNS: &str = "id, event_id, sink, job_id, state, attempts, next_attempt_at, \
     last_error, created_at, updated_at, delivered_at";

fn delivery_from_row(row: &Row) -> Result<Delivery, StoreError> {
    Ok(Delivery {
        id: get(row, 0)?,
        event_id: get(row, 1)?,
        sink: parse_sink(get(row, 2)?)?,
        job_id: parse_job_id(get(row, 3)?)?,
        state: parse_state(get(row, 4)?)?,
        attempts: get::<i32>(row, 5)?.max(0) as u32,
        next_attempt_at: Timestamp::from_micros(get(row, 6)?),
        last_error: get(row, 7)?,
        created_at: Timestamp::from_micros(get(row, 8)?),
        updated_at: Timestamp::from_micros(get(row, 9)?),
        delivered_at: get::<Option<i64>>(row, 10)?.map(Timestamp::from_micros),
    })
}

/// Claims for deliveries a fan-out creates: the first `room` of them are created claimed
/// with `token` until `until`, so they need no second write to be claimed.
struct ClaimingNew<'a> {
    token: &'a str,
    room: usize,
    until: i64,
}

/// A delivery created claimed: `(delivery id, sink, hand-off id, event id)`.
type NewClaim = (i64, String, i64, String);

/// Begins a transaction that fans out. A bitmap scan of `handoffs_not_fanned_out` (which
/// the planner picks, expecting few rows) visits every dead entry's heap row until vacuum
/// removes it: about 1.3 ms a call under load, the largest single cost of deliveries. An
/// index scan skips entries it has seen dead before.
const BEGIN_FAN_OUT: &str = "BEGIN; SET LOCAL enable_bitmapscan = off";

async fn fan_out(conn: &mut Conn, p: FanOutParams) -> Result<FanOutReport, StoreError> {
    in_transaction!(conn, BEGIN_FAN_OUT, async {
        let (report, _) = fan_out_rows(conn, p, None).await?;
        Ok(report)
    })
}

/// Fans out, inside the caller's transaction.
async fn fan_out_rows(
    conn: &mut Conn,
    p: FanOutParams,
    claiming: Option<ClaimingNew<'_>>,
) -> Result<(FanOutReport, Vec<NewClaim>), StoreError> {
    if p.limit == 0 {
        return Ok((FanOutReport::default(), Vec::new()));
    }
    // Waits for (rather than skips) hand-offs another fan-out holds: after the wait
    // PostgreSQL re-checks `fanned_out_at IS NULL` and leaves them out, so when this
    // returns every hand-off committed before it started is fanned out. The cleaner
    // relies on that: a hand-off still being fanned out would keep its job for a pass.
    // Locks are taken in `h.id` order, so two fan-outs cannot deadlock.
    let statement = conn
        .statement(
            "SELECT h.id, h.job_id, j.task_options FROM handoffs h \
                 LEFT JOIN jobs j ON j.id = h.job_id \
                 WHERE h.fanned_out_at IS NULL ORDER BY h.id LIMIT $1 \
                 FOR UPDATE OF h",
        )
        .await?;
    let rows = conn
        .client
        .query(&statement, &[&(p.limit as i64)])
        .await
        .map_err(pg_error)?;
    let mut report = FanOutReport::default();
    let (mut handoff_ids, mut event_ids) = (Vec::new(), Vec::new());
    let (mut d_handoffs, mut d_events, mut d_sinks, mut d_jobs, mut d_claimed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut room = claiming.as_ref().map_or(0, |c| c.room);
    for row in &rows {
        let handoff_id: i64 = get(row, 0)?;
        let job_id: String = get(row, 1)?;
        let task_options: Option<&str> = get(row, 2)?;
        let event_id = new_event_id();
        // A job deleted before its hand-off was fanned out has nothing to deliver.
        for sink in task_options.map(|o| sinks_for(o, &p)).unwrap_or_default() {
            d_handoffs.push(handoff_id);
            d_events.push(event_id.clone());
            d_sinks.push(sink.as_str());
            d_jobs.push(job_id.clone());
            d_claimed.push(room > 0);
            room = room.saturating_sub(1);
        }
        handoff_ids.push(handoff_id);
        event_ids.push(event_id);
    }
    if handoff_ids.is_empty() {
        return Ok((report, Vec::new()));
    }
    let now = p.now.as_micros();
    let (token, until) = claiming.map_or((None, now), |c| (Some(c.token), c.until));
    // A delivery created claimed has its first attempt running: due again when the claim
    // expires, like one claimed by `claim`.
    let statement = conn
        .statement(
            "INSERT INTO deliveries (handoff_id, event_id, sink, job_id, state, attempts, \
                 next_attempt_at, claim_token, created_at, updated_at) \
                 SELECT x.h, x.e, x.s, x.j, 'pending', CASE WHEN x.c THEN 1 ELSE 0 END, \
                        CASE WHEN x.c THEN $6::int8 ELSE $5::int8 END, \
                        CASE WHEN x.c THEN $7::text END, $5, $5 \
                 FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $8::bool[]) AS x(h, e, s, j, c) \
                 ON CONFLICT (handoff_id, sink) DO NOTHING \
                 RETURNING id, sink, handoff_id, event_id, claim_token IS NOT NULL",
        )
        .await?;
    let created = conn
        .client
        .query(
            &statement,
            &[
                &d_handoffs,
                &d_events,
                &d_sinks,
                &d_jobs,
                &now,
                &until,
                &token,
                &d_claimed,
            ],
        )
        .await
        .map_err(pg_error)?;
    report.n_deliveries = created.len();
    let mut claimed = Vec::new();
    for row in &created {
        if get::<bool>(row, 4)? {
            claimed.push((get(row, 0)?, get(row, 1)?, get(row, 2)?, get(row, 3)?));
        }
    }
    let statement = conn
        .statement(
            "UPDATE handoffs SET fanned_out_at = $3, event_id = x.e \
                 FROM unnest($1::int8[], $2::text[]) AS x(id, e) \
                 WHERE handoffs.id = x.id AND handoffs.fanned_out_at IS NULL",
        )
        .await?;
    report.n_handoffs = conn
        .client
        .execute(&statement, &[&handoff_ids, &event_ids, &now])
        .await
        .map_err(pg_error)? as usize;
    Ok((report, claimed))
}

/// The columns `stored_event_from` reads, from `handoffs h LEFT JOIN jobs j`.
const EVENT_COLUMNS: &str = "h.job_id, h.kind, h.payload, h.created_at, j.ingestion_task_id, \
     j.task_options, j.retry_count::int8, j.result_content, j.result_metadata, \
     j.processing_time, j.id IS NOT NULL";

/// A hand-off's event from `EVENT_COLUMNS`, starting at column `at`.
fn stored_event_from(row: &Row, at: usize, event_id: String) -> Result<StoredEvent, StoreError> {
    let job_exists: bool = get(row, at + 10)?;
    Ok(StoredEvent {
        event_id,
        job_id: get(row, at)?,
        handoff_kind: get(row, at + 1)?,
        handoff_payload: get(row, at + 2)?,
        handoff_created_at: get(row, at + 3)?,
        job: if job_exists {
            Some(StoredEventJob {
                ingestion_task_id: get(row, at + 4)?,
                task_options: get(row, at + 5)?,
                retry_count: get(row, at + 6)?,
                result_content: get(row, at + 7)?,
                result_metadata: get(row, at + 8)?,
                processing_time: get(row, at + 9)?,
            })
        } else {
            None
        },
    })
}

async fn claim(
    conn: &mut Conn,
    p: ClaimDeliveriesParams,
) -> Result<Vec<ClaimedDelivery>, StoreError> {
    claim_with_token(conn, p, &new_claim_token()).await
}

async fn claim_with_token(
    conn: &mut Conn,
    p: ClaimDeliveriesParams,
    token: &str,
) -> Result<Vec<ClaimedDelivery>, StoreError> {
    let sql = format!(
        "WITH picked AS (SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= $3 \
                         ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED), \
              c AS (UPDATE deliveries d SET claim_token = $1, attempts = d.attempts + 1, \
                    next_attempt_at = $2, updated_at = $3 FROM picked WHERE d.id = picked.id \
                    RETURNING d.id, d.attempts, d.sink, d.handoff_id, d.event_id) \
         SELECT c.id, c.attempts, c.sink, c.event_id, c.handoff_id, {EVENT_COLUMNS} \
         FROM c JOIN handoffs h ON h.id = c.handoff_id LEFT JOIN jobs j ON j.id = h.job_id \
         ORDER BY c.id"
    );
    let statement = conn.statement(&sql).await?;
    let rows = conn
        .client
        .query(
            &statement,
            &[
                &token,
                &p.now.plus(p.claim_for).as_micros(),
                &p.now.as_micros(),
                &(p.limit as i64),
            ],
        )
        .await
        .map_err(pg_error)?;
    let mut events = EventsByHandoff::default();
    rows.iter()
        .map(|row| {
            let event =
                events.get_or_build(get(row, 4)?, || stored_event_from(row, 5, get(row, 3)?))?;
            Ok(ClaimedDelivery {
                delivery_id: get(row, 0)?,
                claim_token: token.to_owned(),
                attempt: get::<i32>(row, 1)?.max(0) as u32,
                sink: parse_sink(get(row, 2)?)?,
                event,
            })
        })
        .collect()
}

/// `record_many`, then `claim`, then `fan_out_rows` with the room the claim left, in one
/// transaction; the events of the deliveries created claimed are read once per hand-off.
async fn dispatch_step(conn: &mut Conn, p: DispatchStepParams) -> Result<DispatchStep, StoreError> {
    let begin = if p.claim.as_ref().is_some_and(|(f, _)| f.limit > 0) {
        BEGIN_FAN_OUT
    } else {
        "BEGIN"
    };
    in_transaction!(conn, begin, async {
        let recorded = record_many(conn, p.records).await?;
        let Some((f, c)) = p.claim else {
            return Ok(DispatchStep {
                recorded,
                ..DispatchStep::default()
            });
        };
        let token = new_claim_token();
        let until = c.now.plus(c.claim_for).as_micros();
        let limit = c.limit;
        let mut claimed = claim_with_token(conn, c, &token).await?;
        let claiming = ClaimingNew {
            token: &token,
            room: limit.saturating_sub(claimed.len()),
            until,
        };
        let (fanned_out, created) = fan_out_rows(conn, f, Some(claiming)).await?;
        if !created.is_empty() {
            let handoff_ids: Vec<i64> = created.iter().map(|(_, _, h, _)| *h).collect();
            let sql = format!(
                "SELECT h.id, {EVENT_COLUMNS} FROM handoffs h \
                 LEFT JOIN jobs j ON j.id = h.job_id WHERE h.id = ANY($1)"
            );
            let statement = conn.statement(&sql).await?;
            let rows = conn
                .client
                .query(&statement, &[&handoff_ids])
                .await
                .map_err(pg_error)?;
            let rows_by_handoff = rows
                .iter()
                .map(|row| Ok((get::<i64>(row, 0)?, row)))
                .collect::<Result<HashMap<i64, &Row>, StoreError>>()?;
            let mut events = EventsByHandoff::default();
            for (delivery_id, sink, handoff_id, event_id) in created {
                let row = rows_by_handoff.get(&handoff_id).ok_or_else(|| {
                    StoreError::Internal(format!("hand-off {handoff_id} vanished while fanned out"))
                })?;
                let event =
                    events.get_or_build(handoff_id, || stored_event_from(row, 1, event_id))?;
                claimed.push(ClaimedDelivery {
                    delivery_id,
                    claim_token: token.clone(),
                    attempt: 1,
                    sink: parse_sink(&sink)?,
                    event,
                });
            }
        }
        Ok(DispatchStep {
            recorded,
            fanned_out,
            claimed,
        })
    })
}

/// Records a chunk of attempts in one statement: one conditional update fenced by each
/// item's claim, joined with the items as arrays, and their attempt rows. An item changes its delivery only while its claim token
/// is still the delivery's; the statement returns the ids it changed, so each item learns
/// whether it was recorded.
async fn record_many(
    conn: &mut Conn,
    items: Vec<RecordAttemptParams>,
) -> Result<Vec<RecordOutcome>, StoreError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let n = items.len();
    let mut ids: Vec<i64> = Vec::with_capacity(n);
    let mut tokens: Vec<&str> = Vec::with_capacity(n);
    let mut states: Vec<&str> = Vec::with_capacity(n);
    let mut next_attempts: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut last_errors: Vec<Option<String>> = Vec::with_capacity(n);
    let mut delivered: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut nows: Vec<i64> = Vec::with_capacity(n);
    let mut outcomes: Vec<&str> = Vec::with_capacity(n);
    let mut statuses: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(n);
    for item in &items {
        let (outcome, state, _, last_error, delivered_at) =
            after_attempt(&item.result, 0, item.now);
        ids.push(item.delivery_id);
        tokens.push(&item.claim_token);
        states.push(state.as_str());
        next_attempts.push(match &item.result {
            AttemptResult::RetryAt { at, .. } => Some(at.as_micros()),
            _ => None,
        });
        last_errors.push(last_error);
        delivered.push(delivered_at);
        nows.push(item.now.as_micros());
        outcomes.push(outcome.as_str());
        statuses.push(item.http_status.map(i32::from));
        errors.push(match &item.result {
            AttemptResult::Delivered => None,
            AttemptResult::RetryAt { error, .. } | AttemptResult::Dead { error } => Some(error),
        });
    }
    let statement = conn
        .statement(
            "WITH x AS (SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::text[], \
                                         $6::int8[], $7::int8[], $8::text[], $9::int4[], $10::text[]) \
                        AS x(id, token, state, next_at, last_error, delivered_at, now, outcome, status, error)), \
                  u AS (UPDATE deliveries d SET state = x.state, next_attempt_at = COALESCE(x.next_at, d.next_attempt_at), \
                        last_error = COALESCE(x.last_error, d.last_error), delivered_at = x.delivered_at, \
                        claim_token = NULL, updated_at = x.now \
                        FROM x WHERE d.id = x.id AND d.claim_token = x.token AND d.state = 'pending' \
                        RETURNING d.id, x.token, d.attempts, x.now, x.outcome, x.status, x.error), \
                  a AS (INSERT INTO delivery_attempts (delivery_id, attempt, at, outcome, http_status, error) \
                        SELECT u.id, u.attempts, u.now, u.outcome, u.status, u.error FROM u) \
             SELECT id, token FROM u",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 10] = [
        &ids,
        &tokens,
        &states,
        &next_attempts,
        &last_errors,
        &delivered,
        &nows,
        &outcomes,
        &statuses,
        &errors,
    ];
    let rows = conn
        .client
        .query(&statement, &params)
        .await
        .map_err(pg_error)?;
    let recorded = rows
        .iter()
        .map(|row| Ok((get::<i64>(row, 0)?, get::<String>(row, 1)?)))
        .collect::<Result<std::collections::HashSet<(i64, String)>, StoreError>>()?;
    Ok(items
        .iter()
        .map(|item| {
            if recorded.contains(&(item.delivery_id, item.claim_token.clone())) {
                RecordOutcome::Recorded
            } else {
                RecordOutcome::ClaimLost
            }
        })
        .collect())
}

async fn list(conn: &mut Conn, p: DeliveryListParams) -> Result<DeliveryPage, StoreError> {
    let cursor = p.cursor.unwrap_or(i64::MAX);
    let state = p.state.map(DeliveryState::as_str);
    let sink = p.sink.map(|s| s.as_str());
    let job_id = p.job_id.map(|j| j.to_string());
    let limit = (p.limit + 1) as i64;
    let mut conditions = vec!["id < $1".to_owned()];
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&cursor];
    if let Some(state) = &state {
        params.push(state);
        conditions.push(format!("state = ${}", params.len()));
        if *state != DeliveryState::Delivered.as_str() {
            // The partial index `deliveries_unsettled`'s condition (migration 0009).
            conditions.push("state IN ('pending', 'dead')".to_owned());
        }
    }
    if let Some(sink) = &sink {
        params.push(sink);
        conditions.push(format!("sink = ${}", params.len()));
    }
    if let Some(job_id) = &job_id {
        params.push(job_id);
        conditions.push(format!("job_id = ${}", params.len()));
    }
    params.push(&limit);
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE {} ORDER BY id DESC LIMIT ${}",
        conditions.join(" AND "),
        params.len()
    );
    let statement = conn.statement(&sql).await?;
    let rows = conn
        .client
        .query(&statement, &params)
        .await
        .map_err(pg_error)?;
    let mut deliveries = rows
        .iter()
        .map(delivery_from_row)
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

async fn detail(conn: &mut Conn, id: i64) -> Result<Option<DeliveryDetail>, StoreError> {
    // One statement, so the delivery and its attempts agree.
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS}, \
         (SELECT coalesce(json_agg(json_build_object('attempt', a.attempt, 'at', a.at, \
                 'outcome', a.outcome, 'http_status', a.http_status, 'error', a.error) ORDER BY a.id), '[]')::text \
          FROM delivery_attempts a WHERE a.delivery_id = deliveries.id) \
         FROM deliveries WHERE id = $1"
    );
    let statement = conn.statement(&sql).await?;
    let Some(row) = conn
        .client
        .query_opt(&statement, &[&id])
        .await
        .map_err(pg_error)?
    else {
        return Ok(None);
    };
    let delivery = delivery_from_row(&row)?;
    let attempts_text: String = get(&row, 11)?;
    let attempts_json: Vec<serde_json::Value> = serde_json::from_str(&attempts_text)
        .map_err(|e| StoreError::Internal(format!("attempts of delivery {id}: {e}")))?;
    let attempts = attempts_json
        .into_iter()
        .map(|a| {
            let outcome = a["outcome"].as_str().unwrap_or_default();
            Ok(DeliveryAttempt {
                attempt: a["attempt"].as_u64().unwrap_or(0) as u32,
                at: Timestamp::from_micros(a["at"].as_i64().unwrap_or(0)),
                outcome: AttemptOutcomeKind::parse(outcome).ok_or_else(|| {
                    StoreError::Internal(format!("stored attempt outcome {outcome:?} is invalid"))
                })?,
                http_status: a["http_status"]
                    .as_u64()
                    .and_then(|s| u16::try_from(s).ok()),
                error: a["error"].as_str().map(str::to_owned),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(DeliveryDetail { delivery, attempts }))
}

async fn redrive(conn: &mut Conn, p: RedriveParams) -> Result<RedriveOutcome, StoreError> {
    let sql = format!(
        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $2, claim_token = NULL, \
         updated_at = $2 WHERE id = $1 AND state = 'dead' RETURNING {DELIVERY_COLUMNS}"
    );
    let statement = conn.statement(&sql).await?;
    if let Some(row) = conn
        .client
        .query_opt(&statement, &[&p.delivery_id, &p.now.as_micros()])
        .await
        .map_err(pg_error)?
    {
        return Ok(RedriveOutcome::Redriven(delivery_from_row(&row)?));
    }
    let statement = conn
        .statement("SELECT state FROM deliveries WHERE id = $1")
        .await?;
    match conn
        .client
        .query_opt(&statement, &[&p.delivery_id])
        .await
        .map_err(pg_error)?
    {
        Some(row) => Ok(RedriveOutcome::NotDead(parse_state(get(&row, 0)?)?)),
        None => Err(StoreError::NotFound),
    }
}

async fn statistics(conn: &mut Conn) -> Result<DeliveryStatistics, StoreError> {
    let statement = conn
        .statement(
            "SELECT sink, state, count(*)::int8 FROM deliveries WHERE state IN ('pending', 'dead') \
             GROUP BY sink, state",
        )
        .await?;
    let rows = conn.client.query(&statement, &[]).await.map_err(pg_error)?;
    let mut stats = DeliveryStatistics::default();
    for row in &rows {
        let sink: String = get(row, 0)?;
        let state: &str = get(row, 1)?;
        let n: i64 = get(row, 2)?;
        let counts = stats.per_sink.entry(sink).or_default();
        match state {
            "pending" => counts.pending = n.max(0) as u64,
            _ => counts.dead = n.max(0) as u64,
        }
    }
    let oldest: Option<i64> = conn
        .query_value(
            "SELECT min(created_at) FROM deliveries WHERE state = 'pending'",
            &[],
        )
        .await?;
    stats.oldest_pending_created_at = oldest.map(Timestamp::from_micros);
    Ok(stats)
}

async fn next_due(conn: &mut Conn) -> Result<Option<Timestamp>, StoreError> {
    let due: Option<i64> = conn
        .query_value(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM handoffs WHERE fanned_out_at IS NULL) THEN 0::int8 \
             ELSE (SELECT next_attempt_at FROM deliveries WHERE state = 'pending' \
                   ORDER BY next_attempt_at LIMIT 1) END",
            &[],
        )
        .await?;
    Ok(due.map(Timestamp::from_micros))
}

impl DeliveryStore for PostgresStore {
    fn fan_out_handoffs(&self, params: FanOutParams) -> StoreFuture<'_, FanOutReport> {
        self.run(move |c| Box::pin(fan_out(c, params)))
    }

    fn claim_deliveries(
        &self,
        params: ClaimDeliveriesParams,
    ) -> StoreFuture<'_, Vec<ClaimedDelivery>> {
        self.run(move |c| Box::pin(claim(c, params)))
    }

    fn dispatch_step(&self, params: DispatchStepParams) -> StoreFuture<'_, DispatchStep> {
        self.run(move |c| Box::pin(dispatch_step(c, params)))
    }

    fn list_deliveries(&self, params: DeliveryListParams) -> StoreFuture<'_, DeliveryPage> {
        self.run(move |c| Box::pin(list(c, params)))
    }

    fn get_delivery(&self, id: i64) -> StoreFuture<'_, Option<DeliveryDetail>> {
        self.run(move |c| Box::pin(detail(c, id)))
    }

    fn redrive_delivery(&self, params: RedriveParams) -> StoreFuture<'_, RedriveOutcome> {
        self.run(move |c| Box::pin(redrive(c, params)))
    }

    fn delivery_statistics(&self) -> StoreFuture<'_, DeliveryStatistics> {
        self.run(|c| Box::pin(statistics(c)))
    }

    fn next_delivery_due(&self) -> StoreFuture<'_, Option<Timestamp>> {
        self.run(|c| Box::pin(next_due(c)))
    }

    fn handoff_events(&self) -> watch::Receiver<u64> {
        self.handoffs.subscribe()
    }
}
